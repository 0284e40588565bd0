//! Failing a chord as Celery does: the callback's task (and what would
//! have run after it) stored as FAILURE with a ChordError, its errbacks
//! sent, each once, and the callback never sent.

use serde_json::{json, Value};

use super::results::{exception_in, result_of, Failure};
use super::{ChordPhase, ChordStore, Claim, JoinError, Joiner, Sending};
use crate::celery::{ErrbackCall, MessageContext, Signature};
use crate::dispatch::{CallbackSink, Outgoing};
use crate::ids::{Namespace, TaskId};
use crate::meta::State;
use crate::metrics;
use crate::once::Window;
use crate::store::TaskRecord;
use crate::time::{now_celery, now_epoch};

/// An errback's message as Celery sends an old-style one: the failed
/// task's id first, unless the errback is immutable; the chord-error header
/// lets the worker's package call a new-style one instead.
struct ErrbackMessage {
    errback: Signature,
    args: String,
    chord_error: Value,
}

impl ErrbackMessage {
    /// What it holds in memory until sent.
    fn bytes(&self) -> usize {
        self.args.len() + self.chord_error.to_string().len()
    }
}

/// The message of `call`; `None` when its errback cannot be read (checked
/// at store time, so only a damaged item has one): it is passed over.
fn errback_message(call: &ErrbackCall, exceptions: &Exceptions) -> Option<ErrbackMessage> {
    let fallback = uuid::Uuid::new_v4().to_string();
    let errback = Signature::from_value(call.errback.clone(), Some(&fallback)).ok()?;
    let failed = &call.failed;
    let mut args = if errback.immutable { Vec::new() } else { vec![Value::String(failed.task_id.to_string())] };
    args.extend(errback.args.iter().cloned());
    let chord_error = json!({
        "id": failed.task_id.as_str(), "task": failed.task, "args": failed.args, "kwargs": failed.kwargs,
        "errbacks": failed.errbacks(), "immutable": errback.immutable, "exc": exceptions.of(&failed.task_id),
    });
    Some(ErrbackMessage { errback, args: Value::Array(args).to_string(), chord_error })
}

/// How a failing chord treats an errback whose send may succeed if retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum OnTransient {
    /// Stop, give the claim back, and try again later.
    Retry,
    /// The chord is out of attempts: log it and go on with the next.
    Skip,
}

/// The exceptions a failing chord gives: a group body's members, and the
/// group, get the failed part's own exception when there is one, as Celery
/// 5.7 gives them (the ChordError's cause); everything else the ChordError.
struct Exceptions {
    error: Value,
    cause: Option<Value>,
    caused: Vec<TaskId>,
}

impl Exceptions {
    fn of_failure(sig: &Signature, failure: &Failure) -> Self {
        let error =
            json!({"exc_type": "ChordError", "exc_message": [failure.message], "exc_module": "celery.exceptions"});
        let members = sig.group_members();
        let mut caused: Vec<TaskId> = Vec::new();
        if failure.cause.is_some() && !members.is_empty() {
            caused.push(sig.task_id.clone());
            caused.extend(members.iter().flat_map(Signature::ids_that_never_run));
        }
        Self { error, cause: failure.cause.clone(), caused }
    }

    /// The exception task `id` fails with.
    fn of(&self, id: &TaskId) -> &Value {
        match &self.cause {
            Some(cause) if self.caused.contains(id) => cause,
            _ => &self.error,
        }
    }
}

impl<S: ChordStore, T: CallbackSink> Joiner<S, T> {
    /// Fails a claimed chord whose callback signature is readable.
    pub(super) async fn fail_claimed(
        &self,
        claim: &Claim<'_>,
        message: String,
        on_transient: OnTransient,
    ) -> Result<(), JoinError> {
        let Ok(sig) = Signature::parse(&claim.state.callback) else {
            return self.finish(claim, ChordPhase::Failed, Some(&message)).await;
        };
        // Messages of the body that went out, or may have (this attempt's too), run: spare them.
        let recorded = self.store.chord_state(claim.ns, claim.gid).await?.map_or(0, |s| s.body_sent);
        let sent = recorded.max(claim.state.body_sent);
        let spared: Vec<TaskId> = match sig.body_messages() {
            Ok(messages) if self.sink.sends_task_messages() => {
                messages.iter().take(sent as usize).flat_map(Signature::ids_that_never_run).collect()
            }
            _ => Vec::new(),
        };
        let cause = self.cause_of(claim.ns, &message).await?;
        self.fail_sparing(claim, &sig, Failure { message, cause }, on_transient, &spared).await
    }

    /// The exception of the part a ChordError message names
    /// (`Dependency <id> raised ...`), read again, so a retry gives a group
    /// body's members the same exception the first attempt did.
    async fn cause_of(&self, ns: &Namespace, message: &str) -> Result<Option<Value>, JoinError> {
        let named = message.strip_prefix("Dependency ").and_then(|rest| rest.split_once(" raised "));
        let Some(id) = named.and_then(|(id, _)| TaskId::parse(id).ok()) else { return Ok(None) };
        let stored = self.store.get_tasks(ns, std::slice::from_ref(&id)).await?.pop().flatten();
        Ok(stored
            .filter(|t| matches!(t.status, State::Failure | State::Revoked))
            .and_then(|t| exception_in(&result_of(&t.json))))
    }

    /// Fails the chord as Celery does: the callback's task stored as FAILURE
    /// with a ChordError, its errbacks sent (each once across retries,
    /// progress kept on the chord's state item), the callback never sent.
    pub(super) async fn fail(
        &self,
        claim: &Claim<'_>,
        sig: &Signature,
        failure: impl Into<Failure>,
        on_transient: OnTransient,
    ) -> Result<(), JoinError> {
        self.fail_sparing(claim, sig, failure.into(), on_transient, &[]).await
    }

    /// As [`Joiner::fail`], leaving the tasks in `spared` alone: they were
    /// sent before the body's send failed, and they run.
    pub(super) async fn fail_sparing(
        &self,
        claim: &Claim<'_>,
        sig: &Signature,
        failure: Failure,
        on_transient: OnTransient,
        spared: &[TaskId],
    ) -> Result<(), JoinError> {
        let Claim { ns, gid, token, .. } = *claim;
        let exceptions = Exceptions::of_failure(sig, &failure);
        let message = failure.message;
        self.fail_tasks(claim, sig, &exceptions, spared).await?;
        // From here on the chord is failing: a retry fails it again, never calls back.
        if claim.state.error.as_deref() != Some(message.as_str())
            && !self.store.record_failure(ns, gid, token, &message, claim.state.errbacks_sent).await?
        {
            self.lost(gid, "recording the failure");
            return Ok(());
        }
        if !self.send_errbacks(claim, sig, &message, &exceptions, on_transient, spared).await? {
            return Ok(());
        }
        self.finish(claim, ChordPhase::Failed, Some(&message)).await?;
        metrics::count(metrics::CHORD_FAILED);
        tracing::info!(chord = %gid, callback = %sig.task_id, %message, "chord failed");
        Ok(())
    }

    /// Stores the callback's task, and whatever would have run after it
    /// (the rest of its chain), as FAILURE, as on Celery's own backends. A
    /// refusal means a task already has a SUCCESS: it stands.
    async fn fail_tasks(
        &self,
        claim: &Claim<'_>,
        sig: &Signature,
        exceptions: &Exceptions,
        spared: &[TaskId],
    ) -> Result<(), JoinError> {
        let meta = json!({
            "status": "FAILURE", "result": exceptions.error, "traceback": null, "children": [],
            "date_done": now_celery(), "group_id": claim.gid.as_str(), "task_id": sig.task_id.as_str(),
        });
        for task_id in sig.ids_that_never_run().into_iter().filter(|id| !spared.contains(id)) {
            let mut meta = meta.clone();
            meta["task_id"] = task_id.as_str().into();
            meta["result"] = exceptions.of(&task_id).clone();
            let record = TaskRecord {
                task_id,
                status: State::Failure,
                json: meta.to_string(),
                expires_at: now_epoch() + self.result_ttl.as_secs() as i64,
                group_id: None,
                group_index: None,
                chord: None,
                upload: None,
                claim: None,
            };
            self.store.put_task(claim.ns, &record).await?;
        }
        Ok(())
    }

    /// Sends the failing chord's errbacks, each once across retries (its
    /// progress recorded as the callback's is); `false` when the claim was
    /// lost on the way.
    async fn send_errbacks(
        &self,
        claim: &Claim<'_>,
        sig: &Signature,
        message: &str,
        exceptions: &Exceptions,
        on_transient: OnTransient,
        spared: &[TaskId],
    ) -> Result<bool, JoinError> {
        let Claim { ns, gid, token, .. } = *claim;
        // A group member sent before the failure runs: it reports no failure.
        let calls: Vec<_> = sig.errback_calls().into_iter().filter(|c| !spared.contains(&c.failed.task_id)).collect();
        // Checked at store time: at most CHORD_MAX_ERRBACKS of the callback's
        // own, and of each group member's, which with the group's makes at
        // most twice that a member.
        let members = sig.group_members().len();
        let most = self.config.max_errbacks * if members == 0 { 1 } else { 2 * members };
        let error = &exceptions.error;
        let event = || {
            json!({"chord_id": gid.as_str(), "namespace": ns.as_str(), "callback": sig.raw, "error": error}).to_string()
        };
        let skip = claim.state.errbacks_sent as usize;
        let prepared = calls.iter().take(most).enumerate().skip(skip);
        let mut prepared =
            prepared.filter_map(|(i, call)| errback_message(call, exceptions).map(|m| (i, m))).peekable();
        let mut next = claim.state.errbacks_sent as usize;
        let last = calls.len().min(most);
        while next < last {
            // An unreadable errback (checked at store time) is passed over.
            let window = super::next_window(&mut prepared, self.window_messages, |(_, m)| m.bytes());
            let end = prepared.peek().map_or(last, |(i, ..)| *i);
            let outs: Vec<Outgoing> = window
                .iter()
                .map(|(_, m)| Outgoing {
                    sig: &m.errback,
                    args: &m.args,
                    event: &event,
                    cx: MessageContext { chord_error: Some(&m.chord_error), ..claim.context() },
                })
                .collect();
            let name = |i: usize| window[i].1.errback.task.clone();
            let not_sent: Vec<usize> = match self.send_window(claim, &outs, Sending::Errbacks(end as u32), name).await?
            {
                Window::Out => Vec::new(),
                Window::Lost => return Ok(false),
                Window::Partial { sent, error } if on_transient == OnTransient::Retry => {
                    // The first `sent` went out, none after: record them; a retry sends the rest.
                    let sent = window.get(sent).map_or(end, |(i, ..)| *i) as u32;
                    let write = || self.store.record_failure(ns, gid, token, message, sent);
                    if sent as usize > next && !self.record(claim, sent, "recording an errback", write).await? {
                        return Ok(false);
                    }
                    return Err(error.into());
                }
                Window::Partial { sent, error } => {
                    tracing::error!(chord = %gid, error = %error, "errbacks not sent");
                    (sent..window.len()).collect()
                }
                Window::Broken { went_out, error } => {
                    tracing::error!(chord = %gid, error = %error, "errbacks not sent");
                    went_out.iter().enumerate().filter(|(_, out)| !**out).map(|(i, _)| i).collect()
                }
            };
            for i in not_sent {
                tracing::error!(chord = %gid, errback = %window[i].1.errback.task, "errback not sent");
            }
            let sent = end as u32;
            let write = || self.store.record_failure(ns, gid, token, message, sent);
            if !self.record(claim, sent, "recording an errback", write).await? {
                return Ok(false);
            }
            next = end;
        }
        Ok(true)
    }
}
