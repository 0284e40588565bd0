//! Deadlines: a chord whose body carries `deadline_seconds` is reported
//! when it is still open that long after its first part was counted, and,
//! with `fail_at_deadline`, failed with a ChordError that names the parts
//! still missing, its errbacks called (`docs/API.md`, "Deadlines";
//! invariant C12).
//!
//! Nothing in the stream happens at a deadline, so chord-join sends itself
//! a delayed message when it first counts such a chord (SQS delays up to 15
//! minutes; a later deadline is reached by sending the message on again).
//! The message arrives through the deadline queue's event source; chord-join
//! then reads the chord, and if it is still open past its deadline records
//! `stalled_at` once (`ChordStalled`) and, if asked, fails it under a claim,
//! as any chord fails. A copy of the message, or one that comes early, does
//! nothing more.

use serde_json::{json, Value};
use std::time::Duration;

use super::fail::OnTransient;
use super::{ChordPhase, ChordState, ChordStore, Claim, JoinError, Joiner};
use crate::celery::Signature;
use crate::dispatch::{CallbackSink, DispatchError, MAX_DELAY};
use crate::ids::{GroupId, Namespace};
use crate::metrics;
use crate::time::now_epoch;

/// Missing parts a stalled chord's log line and ChordError name by index.
const MISSING_NAMED: usize = 20;

/// A message from the deadline queue: which chord to look at.
#[derive(Debug, Clone)]
pub struct Wake {
    /// The SQS message id, as `batchItemFailures` names it.
    pub id: String,
    pub ns: Namespace,
    pub group_id: GroupId,
}

/// The wake-up a deadline queue's message carries (its `messageId` and
/// `body`, as Lambda's SQS event has them); `None` for anything else.
pub fn wake_of(record: &Value) -> Option<Wake> {
    let body: Value = serde_json::from_str(record.get("body")?.as_str()?).ok()?;
    Some(Wake {
        id: record.get("messageId")?.as_str()?.to_owned(),
        ns: Namespace::parse(body.get("ns")?.as_str()?).ok()?,
        group_id: GroupId::parse(body.get("group_id")?.as_str()?).ok()?,
    })
}

impl<S: ChordStore, T: CallbackSink> Joiner<S, T> {
    /// Sends the message that wakes chord-join at the chord's deadline, once
    /// the chord has one and before it is recorded as sent (a copy is
    /// harmless; a deadline never armed would never be reported).
    pub(super) async fn arm_deadline(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        state: &ChordState,
    ) -> Result<(), JoinError> {
        let Some(at) = state.deadline_at else { return Ok(()) };
        if state.deadline_armed || state.is_final() {
            return Ok(());
        }
        match self.wake_at(ns, gid, at).await {
            Ok(()) => {}
            // No deadline queue, or one that refuses: the chord goes on without
            // its report, never held back for it.
            Err(err) if err.is_permanent() => {
                tracing::error!(chord = %gid, error = %err, "the chord's deadline cannot be armed; it will not be reported");
            }
            Err(err) => return Err(err.into()),
        }
        self.store.arm_deadline(ns, gid).await?;
        Ok(())
    }

    async fn wake_at(&self, ns: &Namespace, gid: &GroupId, at: i64) -> Result<(), DispatchError> {
        let delay = Duration::from_secs((at - now_epoch()).clamp(0, MAX_DELAY.as_secs() as i64) as u64);
        let body = json!({"ns": ns.as_str(), "group_id": gid.as_str()}).to_string();
        self.sink.send_later(&body, delay).await
    }

    /// Looks at each chord a deadline message names, concurrently; returns
    /// the ids of the messages to be received again.
    pub async fn handle_wakes(&self, wakes: Vec<Wake>) -> Vec<String> {
        let checked = futures::future::join_all(wakes.iter().map(|wake| async move {
            match self.check_deadline(&wake.ns, &wake.group_id).await {
                Ok(()) => None,
                Err(err) => {
                    tracing::error!(chord = %wake.group_id, error = %err, "checking a chord's deadline failed; will retry");
                    Some(wake.id.clone())
                }
            }
        }))
        .await;
        checked.into_iter().flatten().collect()
    }

    /// Reports a chord still open past its deadline, once, and fails it if
    /// its body asks; a chord whose deadline is still ahead is looked at
    /// again then.
    async fn check_deadline(&self, ns: &Namespace, gid: &GroupId) -> Result<(), JoinError> {
        let Some(state) = self.store.chord_state(ns, gid).await? else { return Ok(()) };
        let Some(at) = state.deadline_at else { return Ok(()) };
        if state.is_final() {
            return Ok(());
        }
        if now_epoch() < at {
            // Woken early: SQS delays at most 15 minutes.
            return Ok(self.wake_at(ns, gid, at).await?);
        }
        let counted: Vec<u32> = self.store.counted_parts(ns, gid).await?.iter().map(|p| p.index).collect();
        let missing = missing(&counted, state.size);
        if self.store.mark_stalled(ns, gid).await? {
            metrics::count(metrics::CHORD_STALLED);
            tracing::error!(chord = %gid, missing = %missing, phase = state.phase.as_str(), "chord open past its deadline");
        }
        let fails = Signature::parse(&state.callback).ok().and_then(|s| s.deadline().ok().flatten());
        if !fails.is_some_and(|d| d.fail) || state.phase != ChordPhase::Open {
            return Ok(());
        }
        self.fail_at_deadline(ns, gid, &missing).await
    }

    /// Fails an open chord whose deadline passed, under a claim, as a chord
    /// fails (ChordError on its callback, its errbacks sent once).
    async fn fail_at_deadline(&self, ns: &Namespace, gid: &GroupId, missing: &str) -> Result<(), JoinError> {
        let token = uuid::Uuid::new_v4().to_string();
        // Joining or final meanwhile: its join decides.
        let Some(state) = self.store.claim_stalled(ns, gid, &token, self.config.lease).await? else { return Ok(()) };
        let ids = self.store.chord_part_ids(ns, gid).await?;
        let Some(last) = ids.last() else { return Ok(()) };
        let message = format!("ChordError: the chord's deadline passed with parts missing: {missing}");
        let claim = Claim { ns, gid, token: &token, last, state: &state, newest_stored: None };
        let failed = self.fail_claimed(&claim, message, OnTransient::Retry).await;
        if failed.is_err() {
            // Nothing was sent: give the claim back, for the message's retry.
            if let Err(release) = self.store.release_chord(ns, gid, &token).await {
                tracing::warn!(chord = %gid, error = %release, "giving the claim back failed; it lapses with its lease");
            }
        }
        failed
    }
}

/// The parts of a chord of `size` not among `counted` (in order), named by
/// `group_index`: how many, and the first [`MISSING_NAMED`].
fn missing(counted: &[u32], size: u32) -> String {
    let mut counted = counted.iter().copied().peekable();
    let mut absent = Vec::new();
    let mut total = 0;
    for index in 0..size {
        while counted.next_if(|c| *c < index).is_some() {}
        if counted.next_if_eq(&index).is_none() {
            total += 1;
            if absent.len() < MISSING_NAMED {
                absent.push(index.to_string());
            }
        }
    }
    let more = if total > absent.len() { format!(" and {} more", total - absent.len()) } else { String::new() };
    format!("{total} of {size} (group_index {}{more})", absent.join(", "))
}

#[cfg(test)]
mod tests {
    use super::missing;

    #[test]
    fn missing_parts_are_named_by_index_then_counted() {
        assert_eq!(missing(&[0, 1, 3], 5), "2 of 5 (group_index 2, 4)");
        let counted: Vec<u32> = (0..100).filter(|i| i % 4 != 0).collect();
        assert_eq!(
            missing(&counted, 100),
            "25 of 100 (group_index 0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76 and 5 more)"
        );
    }
}
