//! Redrive: a chord that failed, or called back with tolerated failures,
//! sends its failed parts again, with their task ids and arguments, and
//! joins again once they have reported (`docs/API.md`, "Redriving a
//! chord"; invariant C11).
//!
//! `POST /v1/chords/{id}/redrive` ([`crate::service::redrive_chord`]) moves
//! the chord's state item from final to `redriving` with one conditional
//! write. That write's stream record brings the chord here, where the
//! redrive is sent by the protocol of [`crate::once`]:
//! 1. claim the redrive (a token and a lease);
//! 2. per window of failed parts: read their results (name, arguments and
//!    queue, stored with `result_extended`); in one transaction, remove
//!    them from the count (so their next results are counted, C1) and
//!    record the window, under the claim: the re-check before the send;
//!    then send them as Celery task messages carrying the chord, as
//!    `chord.run` sent them. A part whose send surely did not go out is
//!    counted again as failed; one that may have gone out counts as sent
//!    (O5), and a claim that takes over from a dead one never sends its
//!    window again.
//! 3. open the chord again; if its parts have all reported by then, join
//!    it here, as any complete chord is joined (C2, C3).

use aws_lambda_events::event::dynamodb::EventRecord;
use serde_json::{json, Map, Value};

use super::fail::OnTransient;
use super::{chord_key, ChordPart, ChordPhase, ChordState, ChordStore, Claim, JoinError, Joiner};
use crate::celery::{MessageContext, Signature};
use crate::dispatch::{CallbackSink, Outgoing};
use crate::ids::{GroupId, Namespace, TaskId};
use crate::metrics;
use crate::once::{self, Window};
use crate::store::schema::{attr, SK_CHORD_STATE};
use crate::store::{Stored, Within};
use crate::stream::Image;

/// Failed parts sent again after one re-check: the re-check removes them
/// from the count in one DynamoDB transaction (100 actions at most, one of
/// them the chord's state item).
pub const REDRIVE_WINDOW_PARTS: usize = super::dynamo::PARTS_PER_TRANSACTION;

/// A redriving chord, read from its state item's stream record.
#[derive(Debug, Clone)]
pub struct Redrive {
    pub sequence: String,
    pub ns: Namespace,
    pub group_id: GroupId,
}

impl once::Record for Redrive {
    fn item(&self) -> String {
        chord_key(&self.ns, &self.group_id)
    }

    fn sequence(&self) -> &str {
        &self.sequence
    }
}

/// The chord a record names, if it is a chord's state item in the
/// `redriving` phase; anything else is `None`.
pub fn redrive_of(record: &EventRecord) -> Option<Redrive> {
    let image = Image::of(record)?;
    if image.s(attr::SK)? != SK_CHORD_STATE || image.s(attr::STATE)? != ChordPhase::Redriving.as_str() {
        return None;
    }
    let (ns, gid) = image.s(attr::PK)?.split_once("/chord/")?;
    Some(Redrive { ns: Namespace::parse(ns).ok()?, group_id: GroupId::parse(gid).ok()?, sequence: image.sequence })
}

/// How sending a redrive's parts ended.
enum Resent {
    /// Every failed part went out (or may have).
    All,
    /// The claim was taken over; whoever holds it goes on.
    Lost,
    /// No retry can send the rest (a part whose arguments were not
    /// stored, a queue refused): the chord fails again, with this error.
    Stopped(String),
}

/// A failed part, its message, and the message's arguments (JSON text).
type PartMessage = (ChordPart, Signature, String);

/// A stored part's meta with its arguments, read from S3 when they were
/// uploaded with its result (a meta too large to send: the object holds
/// the large fields); `None` when that object is gone (forgotten since).
pub async fn with_arguments<S: crate::store::ResultStore>(
    store: &S,
    stored: Stored,
) -> Result<Option<String>, crate::error::StoreError> {
    match &stored.blob {
        Some(blob) if blob.fields => Ok(store
            .read_blob(blob)
            .await?
            .map(|object| crate::meta::join_fields(&stored.json, &object).unwrap_or(stored.json))),
        _ => Ok(Some(stored.json)),
    }
}

/// The task message that runs a failed part again, from its stored result:
/// its task, arguments and keyword arguments (kept with `result_extended`),
/// carrying the chord (`callback`) as `chord.run` sent it; `Err` says why
/// it cannot be made.
pub fn part_message(
    stored: &str,
    part: &ChordPart,
    gid: &GroupId,
    callback: &str,
    to: &super::RedriveTo,
    redrive: u32,
) -> Result<(Signature, String), String> {
    let id = &part.task_id;
    let meta: Value = serde_json::from_str(stored).map_err(|e| format!("part {id}'s result is not JSON: {e}"))?;
    let (Some(task), Some(Value::Array(args))) = (meta.get("name").and_then(Value::as_str), meta.get("args")) else {
        return Err(format!(
            "part {id}'s task name and arguments were not stored (store results with result_extended=True)"
        ));
    };
    let kwargs = match meta.get("kwargs") {
        Some(Value::Object(kwargs)) => kwargs.clone(),
        _ => Map::new(),
    };
    let callback: Value = serde_json::from_str(callback).map_err(|e| format!("the chord's callback: {e}"))?;
    let mut options = json!({
        "task_id": id.as_str(),
        "group_id": gid.as_str(),
        "group_index": part.index,
        "chord": callback,
        crate::celery::REDRIVE_HEADER: redrive,
    });
    if let Some(queue) = to.queue_of(meta.get("queue").and_then(Value::as_str)) {
        options["queue"] = queue.into();
    }
    for name in ["root_id", "parent_id"] {
        if let Some(Value::String(value)) = meta.get(name) {
            options[name] = value.clone().into();
        }
    }
    let raw = json!({"task": task, "args": args, "kwargs": kwargs, "options": options});
    let args = serde_json::to_string(args).map_err(|e| e.to_string())?;
    Ok((Signature::from_value(raw, None)?, args))
}

impl<S: ChordStore, T: CallbackSink> Joiner<S, T> {
    /// Sends the failed parts of every redriving chord the records name,
    /// chords concurrently; returns the sequence numbers of the records
    /// whose chord should be tried again.
    pub async fn handle_redrives(&self, records: Vec<Redrive>) -> Vec<String> {
        once::by_key(records, |records| async move {
            let (ns, gid) = (&records[0].ns, &records[0].group_id);
            match self.redrive(ns, gid).await {
                Ok(()) => return Vec::new(),
                Err(err @ JoinError::Busy(_)) => tracing::info!(chord = %gid, "{err}; will retry"),
                Err(err) => tracing::error!(chord = %gid, error = %err, "chord redrive failed; will retry"),
            }
            records.into_iter().map(|r| r.sequence).collect()
        })
        .await
    }

    /// Claims a redriving chord, sends its failed parts, opens it again, and
    /// joins it if they have all reported by then.
    async fn redrive(&self, ns: &Namespace, gid: &GroupId) -> Result<(), JoinError> {
        let token = uuid::Uuid::new_v4().to_string();
        let Some(state) = self.store.claim_redrive(ns, gid, &token, self.config.lease).await? else {
            return match self.store.chord_state(ns, gid).await? {
                Some(s) if s.phase == ChordPhase::Redriving => Err(JoinError::Busy(gid.to_string())),
                // Redriven already; its join may be what is left.
                Some(s) => self.join_if_complete(ns, gid, &s).await,
                None => Ok(()),
            };
        };
        if state.redrive_window > 0 {
            // Taken over from a claim that was sending a window: it stays sent (O5).
            let window = state.redrive_window;
            metrics::emit(&[], &[metrics::Point::count(metrics::CHORD_RESEND_SKIPPED, window.into())]);
            tracing::error!(chord = %gid, parts = window, "redrive taken over from a claim that was sending; not sent again");
        }
        let error = match self.resend_failed(ns, gid, &token, &state).await {
            Ok(Resent::All) => None,
            Ok(Resent::Lost) => return Ok(()),
            Ok(Resent::Stopped(message)) => Some(message),
            Err(err) if state.attempts + 1 >= self.config.max_attempts => {
                let attempts = state.attempts + 1;
                Some(format!("ChordError: redrive stopped after {attempts} attempts: {}", err.public()))
            }
            Err(err) => {
                if let Err(release) = self.store.release_redrive(ns, gid, &token).await {
                    tracing::warn!(chord = %gid, error = %release, "giving the redrive back failed; it lapses with its lease");
                }
                return Err(err);
            }
        };
        let lease = self.config.lease;
        let Some(ended) = self.store.end_redrive(ns, gid, &token, error.as_deref(), lease).await? else {
            self.lost(gid, "ending the redrive");
            return Ok(());
        };
        let Some(message) = error else {
            metrics::count(metrics::CHORD_REDRIVEN);
            tracing::info!(chord = %gid, redrives = ended.redrives, "chord redriven: its failed parts were sent again");
            return self.join_if_complete(ns, gid, &ended).await;
        };
        // The chord fails again, as a join fails it: the callback (whose
        // earlier result the redrive forgot) gets the ChordError, its errbacks go once.
        tracing::error!(chord = %gid, error = %message, "chord redrive stopped; the chord fails again");
        let ids = self.store.chord_part_ids(ns, gid).await?;
        // The last part on record is the errbacks' parent; with none left, the callback.
        let callback = TaskId::parse(&ended.callback_id).ok();
        let Some(last) = ids.last().or(callback.as_ref()) else {
            return Err(JoinError::Missing(gid.to_string()));
        };
        let claim = Claim { ns, gid, token: &token, last, state: &ended, newest_stored: None };
        self.fail_claimed(&claim, message, OnTransient::Skip).await
    }

    /// Joins an open chord whose parts have all been counted.
    async fn join_if_complete(&self, ns: &Namespace, gid: &GroupId, state: &ChordState) -> Result<(), JoinError> {
        if state.phase != ChordPhase::Open || state.done < state.size {
            return Ok(());
        }
        let ids = self.store.chord_part_ids(ns, gid).await?;
        let Some(last) = ids.last() else { return Ok(()) };
        self.claim_and_join(ns, gid, last, None).await
    }

    /// Sends the chord's failed parts again, a window at a time, each
    /// window removed from the count just before its send (see the module).
    async fn resend_failed(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        state: &ChordState,
    ) -> Result<Resent, JoinError> {
        if !self.sink.sends_task_messages() {
            return Ok(Resent::Stopped(
                "ChordError: a redrive sends Celery task messages; this deployment calls a Lambda function".into(),
            ));
        }
        loop {
            let failed = self.store.failed_parts(ns, gid, self.window_messages.min(REDRIVE_WINDOW_PARTS)).await?;
            if failed.is_empty() {
                return Ok(Resent::All);
            }
            let window = match self.part_messages(ns, gid, state, failed).await? {
                Ok(window) => window,
                Err(message) => return Ok(Resent::Stopped(format!("ChordError: redrive stopped: {message}"))),
            };
            let parts: Vec<ChordPart> = window.iter().map(|(part, _, _)| part.clone()).collect();
            let no_event = String::new;
            let cx = || MessageContext { group_id: gid.as_str(), parent_id: None, root_id: None, chord_error: None };
            let outs: Vec<Outgoing> =
                window.iter().map(|(_, sig, args)| Outgoing { sig, args, event: &no_event, cx: cx() }).collect();
            let recheck = self.store.uncount_parts(ns, gid, token, self.config.lease, &parts);
            let name = |i: usize| parts[i].task_id.to_string();
            let (went_out, error) =
                match once::recheck_then_send_all(recheck, self.sink.send_all(ns, &outs), name).await? {
                    Window::Out => continue,
                    Window::Lost => {
                        metrics::count(metrics::CHORD_CLAIM_LOST);
                        return Ok(Resent::Lost);
                    }
                    Window::Partial { sent, error } => ((0..parts.len()).map(|i| i < sent).collect::<Vec<_>>(), error),
                    Window::Broken { went_out, error } => (went_out, error),
                };
            // What surely did not go out is counted again as failed, for the next attempt.
            let not_out: Vec<ChordPart> =
                parts.iter().zip(&went_out).filter(|(_, out)| !**out).map(|(p, _)| p.clone()).collect();
            if !self.store.recount_parts(ns, gid, token, &not_out).await? {
                return Ok(Resent::Lost);
            }
            return match error {
                e if e.is_permanent() => Ok(Resent::Stopped(format!("ChordError: redrive stopped: {e}"))),
                e => Err(JoinError::Dispatch(e)),
            };
        }
    }

    /// The messages of a window of failed parts, from their stored results,
    /// holding at most [`super::SEND_WINDOW_BYTES`] of them at once (a part
    /// that does not fit starts the next window; the first is read alone).
    /// The inner `Err` says why a part cannot be sent again.
    async fn part_messages(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        state: &ChordState,
        failed: Vec<ChordPart>,
    ) -> Result<Result<Vec<PartMessage>, String>, JoinError> {
        let ids: Vec<TaskId> = failed.iter().map(|p| p.task_id.clone()).collect();
        let read = self.store.get_tasks_within(ns, &ids, super::SEND_WINDOW_BYTES).await?;
        let mut window = Vec::with_capacity(failed.len());
        for (part, within) in failed.into_iter().zip(read) {
            let stored: Stored = match within {
                Some(Within::Whole(stored)) => stored,
                Some(Within::Over { .. }) if !window.is_empty() => break,
                Some(Within::Over { .. }) => match self.store.get_task(ns, &part.task_id).await? {
                    Some(stored) => stored,
                    None => return Ok(Err(format!("part {}'s result expired or was forgotten", part.task_id))),
                },
                None => return Ok(Err(format!("part {}'s result expired or was forgotten", part.task_id))),
            };
            // Arguments too large for the item are in S3 with the result:
            // that part is read alone, in a window of its own.
            if stored.blob.as_ref().is_some_and(|b| b.fields) && !window.is_empty() {
                break;
            }
            let Some(json) = with_arguments(&self.store, stored).await? else {
                return Ok(Err(format!("part {}'s result was forgotten", part.task_id)));
            };
            match part_message(&json, &part, gid, &state.callback, &state.redrive_to, state.redrives) {
                Ok((sig, args)) => window.push((part, sig, args)),
                Err(why) => return Ok(Err(why)),
            }
        }
        Ok(Ok(window))
    }
}
