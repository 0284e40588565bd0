//! Settling processings from the stream (in chord-join): the processing's
//! result is kept as the entry and the operation's callback sent, or its
//! quarantine message, each once, by the protocol of [`crate::once`].

use aws_lambda_events::event::dynamodb::EventRecord;
use serde_json::json;

use super::store::{entry_key, CacheEntry, CachePhase, CacheStore, EntryClaim, Settle, Written};
use super::{callback_id, no_group, task_signature, OperationSpec};
use crate::chord::result_of;
use crate::config::Config;
use crate::dispatch::{CallbackSink, DispatchError, Outgoing};
use crate::error::StoreError;
use crate::ids::{Namespace, TaskId};
use crate::meta::State;
use crate::metrics;
use crate::once::{self, Sent, Unfinished};
use crate::store::Stored;
use crate::stream::Image;
use crate::time::now_epoch;

/// A processing's task changed state, read from a stream record.
#[derive(Debug, Clone)]
pub struct Done {
    pub sequence: String,
    pub ns: Namespace,
    pub hash: String,
    pub task_id: TaskId,
    pub status: State,
    /// The task item's expiry: an entry that refers to the task's result
    /// lives no longer.
    pub expires_at: i64,
}

impl once::Record for Done {
    fn item(&self) -> String {
        entry_key(&self.ns, &self.hash)
    }

    fn sequence(&self) -> &str {
        &self.sequence
    }
}

/// The processing state a record carries, if its item is a processing's task.
pub fn done_of(record: &EventRecord) -> Option<Done> {
    use crate::store::schema::attr;
    let image = Image::of(record)?;
    let (ns, task_id) = image.task()?;
    Some(Done {
        ns,
        hash: image.s(attr::CACHE_KEY)?.to_owned(),
        task_id,
        status: State::parse(image.s(attr::STATUS)?).ok()?,
        expires_at: image.n(attr::EXPIRES_AT).unwrap_or(i64::MAX),
        sequence: image.sequence,
    })
}

/// Why a processing did not settle this time; its record is retried.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("entry {0} is being settled by another invocation")]
    Busy(String),
}

/// Settles processings from the stream (in chord-join): keeps the result
/// and sends the callback, or sends the quarantine message, each once.
pub struct Settler<S, T> {
    pub store: S,
    pub sink: T,
    pub config: Config,
    /// Entries whose message went out but whose final write kept failing:
    /// entry key → (claim token, quarantined until). A retry in this
    /// process finishes them and never sends again (invariant K3).
    unfinished: Unfinished<Option<i64>>,
}

/// A claimed entry about to send: its namespace, hash and claim token, and
/// the entry as the claim wrote it.
struct Claimed<'a> {
    ns: &'a Namespace,
    hash: &'a str,
    token: &'a str,
    entry: &'a CacheEntry,
}

impl<S: CacheStore, T: CallbackSink> Settler<S, T> {
    pub fn new(store: S, sink: T, config: Config) -> Self {
        Self { store, sink, config, unfinished: Unfinished::default() }
    }

    /// Settles the batch's processings (a key's records in order, keys
    /// concurrently); returns the sequence numbers to retry.
    pub async fn handle(&self, done: Vec<Done>) -> Vec<String> {
        once::by_key(done, |records| async move {
            for (i, record) in records.iter().enumerate() {
                match self.settle(record).await {
                    Ok(()) => continue,
                    Err(err @ SettleError::Busy(_)) => tracing::info!(task = %record.task_id, "{err}; will retry"),
                    Err(err) => tracing::error!(task = %record.task_id, error = %err, "settling failed; will retry"),
                }
                return records[i..].iter().map(|r| r.sequence.clone()).collect();
            }
            Vec::new()
        })
        .await
    }

    async fn settle(&self, done: &Done) -> Result<(), SettleError> {
        let (ns, hash, task_id) = (&done.ns, done.hash.as_str(), done.task_id.as_str());
        let Some(entry) = self.store.cache_entry(ns, hash).await? else { return Ok(()) };
        if entry.task_id != task_id {
            return Ok(()); // a processing that was replaced after its lease ran out
        }
        let key = entry_key(ns, hash);
        if let Some((token, until)) = self.unfinished.get(&key) {
            if entry.phase == CachePhase::Settling && entry.token.as_deref() == Some(token.as_str()) {
                // Its message went out, but finishing the entry failed: finish it now, sending nothing.
                return self.finish(ns, hash, &token, until).await;
            }
            self.unfinished.forget(&key);
        }
        let spec = serde_json::from_str(&entry.spec).unwrap_or_else(|_| OperationSpec::named(""));
        let now = now_epoch();
        if !done.status.is_ready() {
            // Started, or retrying with a countdown: the processing lives; renew its lease.
            if matches!(done.status, State::Started | State::Retry) && entry.phase == CachePhase::Processing {
                self.store.cache_lease(ns, hash, task_id, now + spec.lease(&self.config)).await?;
            }
            return Ok(());
        }
        match entry.phase {
            CachePhase::Cached | CachePhase::Quarantined => return Ok(()), // settled before: a redelivery
            CachePhase::Settling if entry.lease_until > now => return Err(SettleError::Busy(task_id.to_owned())),
            _ => {}
        }
        let stored = self.store.get_task(ns, &done.task_id).await?;
        let settle = self.outcome(done, &spec, stored.as_ref(), now);
        let token = uuid::Uuid::new_v4().to_string();
        let lease = self.config.chord.lease.as_secs() as i64;
        let claim = EntryClaim { task_id, token: &token, lease_until: now + lease };
        let claimed = match self.store.cache_claim(ns, hash, &claim, &settle, now).await? {
            Written::Applied(entry) => entry,
            Written::Refused(Some(e)) if e.task_id == task_id && matches!(e.phase, CachePhase::Settling) => {
                return Err(SettleError::Busy(task_id.to_owned()))
            }
            Written::Refused(_) => return Ok(()),
        };
        let until = match settle {
            Settle::Success { .. } => None,
            Settle::Failure { .. } => Some(spec.quarantine_for.map_or(0, |s| now + s as i64)),
        };
        let claimed = Claimed { ns, hash, token: &token, entry: &claimed };
        self.send_claimed(&claimed, &spec, &settle, stored.as_ref(), until).await
    }

    /// How the processing's stored result settles its entry: kept inline,
    /// by reference to the task when large, or as a failure.
    fn outcome(&self, done: &Done, spec: &OperationSpec, stored: Option<&Stored>, now: i64) -> Settle {
        let Some(stored) = stored else {
            let error = json!({"exc_type": "LookupError", "exc_module": "builtins",
                "exc_message": ["the processing's result expired or was forgotten before it was cached"]});
            return Settle::Failure { error: error.to_string() };
        };
        if stored.status != State::Success {
            return Settle::Failure { error: result_of(&stored.json) };
        }
        let ttl_end = now + spec.ttl(&self.config);
        let inline = match &stored.blob {
            None => Some(result_of(&stored.json)),
            Some(_) => None,
        }
        .filter(|r| r.len() <= self.config.cache.inline_result_bytes);
        match inline {
            Some(result) => Settle::Success { result: Some(result), result_task: None, expires_at: ttl_end },
            // Kept on the task, so the entry lives no longer than the task's result.
            None => Settle::Success {
                result: None,
                result_task: Some(done.task_id.to_string()),
                expires_at: ttl_end.min(done.expires_at),
            },
        }
    }

    /// Sends the claimed entry's message, at most once (invariant K3), and
    /// finishes the entry.
    async fn send_claimed(
        &self,
        claimed: &Claimed<'_>,
        spec: &OperationSpec,
        settle: &Settle,
        stored: Option<&Stored>,
        until: Option<i64>,
    ) -> Result<(), SettleError> {
        let Claimed { ns, hash, token, entry } = *claimed;
        let task_id = entry.task_id.as_str();
        if entry.sending.as_deref().is_some_and(|earlier| earlier != token) {
            // An earlier claim re-checked itself for a send and then lost
            // its lease (a crash, or its final write kept failing): its
            // message may have gone out, so none goes out again (K3).
            tracing::error!(task = %task_id, "an earlier claim was sending; settled without sending again");
            metrics::count(metrics::CACHE_RESEND_SKIPPED);
            return self.finish(ns, hash, token, until).await;
        }
        if entry.attempts > self.config.chord.max_attempts {
            tracing::error!(task = %task_id, attempts = entry.attempts, "giving up sending the processing's message");
            metrics::count(metrics::CACHE_SEND_FAILED);
            return self.finish(ns, hash, token, until).await;
        }
        let sent = match settle {
            Settle::Success { .. } => self.send_callback(claimed, spec, stored).await,
            Settle::Failure { error } => self.send_quarantine(claimed, spec, error).await,
        };
        let sent = match sent {
            Ok(sent) => sent,
            // The re-check itself failed: nothing went out; end the claim now
            // so a retry takes it at once (it lapses with its lease otherwise).
            Err(err) => {
                let _ = self.store.cache_renew(ns, hash, token, now_epoch(), false).await;
                return Err(err);
            }
        };
        match sent {
            Sent::Out => {}
            Sent::Unknown(err) => {
                tracing::error!(task = %task_id, error = %err, "the processing's message counted as sent, not sent again")
            }
            Sent::Lost => {
                tracing::error!(task = %task_id, "the entry's claim was taken over before the send; nothing sent");
                return Ok(());
            }
            Sent::Refused(err) => {
                metrics::count(metrics::CACHE_SEND_FAILED);
                tracing::error!(task = %task_id, error = %err, "the processing's message cannot be sent; settled without it");
            }
            Sent::Failed(err) => {
                // Nothing went out: end the claim now so a retry takes it at once.
                let _ = self.store.cache_renew(ns, hash, token, now_epoch(), false).await;
                return Err(err.into());
            }
        }
        self.finish(ns, hash, token, until).await
    }

    /// Sends the operation's callback with `[[result, [cb_args, ...]]]`; the
    /// result by reference (`{"dynachord_ref": {"task_id", "bytes"}}`) when
    /// it is kept on the task or would make the message too large.
    async fn send_callback(
        &self,
        claimed: &Claimed<'_>,
        spec: &OperationSpec,
        stored: Option<&Stored>,
    ) -> Result<Sent, SettleError> {
        let Some(callback) = &spec.callback else { return Ok(Sent::Out) };
        let Claimed { ns, entry, .. } = *claimed;
        let waiters = format!("[{}]", entry.waiters.join(","));
        let bytes = stored.map_or(0, |s| s.blob.as_ref().map_or(s.json.len() as u64, |b| b.bytes));
        let reference = json!({"dynachord_ref": {"task_id": entry.task_id, "bytes": bytes}}).to_string();
        let sig = match task_signature(callback, &callback_id(&entry.task_id)) {
            Ok(sig) => sig,
            Err(e) => return Ok(Sent::Refused(unreadable(e))),
        };
        let event_of = |result: &str| {
            format!(
                r#"{{"cache":{{"action":"callback","op":{},"uri":{},"task_id":{}}},"namespace":{},"result":{result},"cb_args":{waiters}}}"#,
                json!(entry.op),
                json!(entry.uri),
                json!(entry.task_id),
                json!(ns.as_str())
            )
        };
        let mut result = entry.result.as_deref().unwrap_or(&reference).to_owned();
        let mut args = format!("[[{result},{waiters}]]");
        {
            let event = || event_of(&result);
            let out = Outgoing { sig: &sig, args: &args, event: &event, cx: no_group() };
            if entry.result.is_some() && self.sink.message_bytes(ns, &out) > self.config.callbacks.max_bytes {
                result = reference.clone();
                args = format!("[[{result},{waiters}]]");
            }
        }
        let event = || event_of(&result);
        let out = Outgoing { sig: &sig, args: &args, event: &event, cx: no_group() };
        let sent = self.send(claimed, &out).await?;
        if let Sent::Out = sent {
            metrics::count(metrics::CACHE_CALLBACKS_SENT);
            tracing::info!(task = %entry.task_id, waiters = entry.waiters.len(), "cache callback sent");
        }
        Ok(sent)
    }

    /// Sends the operation's quarantine message `[operation, uri, exception]`.
    async fn send_quarantine(
        &self,
        claimed: &Claimed<'_>,
        spec: &OperationSpec,
        error: &str,
    ) -> Result<Sent, SettleError> {
        metrics::count(metrics::CACHE_QUARANTINED);
        let Some(quarantine) = &spec.quarantine else { return Ok(Sent::Out) };
        let Claimed { ns, entry, .. } = *claimed;
        let sig = match task_signature(quarantine, &format!("{}-quarantine", entry.task_id)) {
            Ok(sig) => sig,
            Err(e) => return Ok(Sent::Refused(unreadable(e))),
        };
        let args = format!("[{},{},{error}]", json!(entry.op), json!(entry.uri));
        let event = || {
            format!(
                r#"{{"cache":{{"action":"quarantine","op":{},"uri":{},"task_id":{}}},"namespace":{},"exception":{error}}}"#,
                json!(entry.op),
                json!(entry.uri),
                json!(entry.task_id),
                json!(ns.as_str())
            )
        };
        let out = Outgoing { sig: &sig, args: &args, event: &event, cx: no_group() };
        let sent = self.send(claimed, &out).await?;
        if let Sent::Out = sent {
            tracing::info!(task = %entry.task_id, op = %entry.op, "processing quarantined");
        }
        Ok(sent)
    }

    /// Re-checks the claim, renewing its lease and recording that it is
    /// sending, then sends (see [`once::recheck_then_send`]).
    async fn send(&self, claimed: &Claimed<'_>, out: &Outgoing<'_>) -> Result<Sent, SettleError> {
        let lease = now_epoch() + self.config.chord.lease.as_secs() as i64;
        let recheck = self.store.cache_renew(claimed.ns, claimed.hash, claimed.token, lease, true);
        Ok(once::recheck_then_send(recheck, self.sink.send(claimed.ns, out)).await?)
    }

    /// Moves the entry to its final phase after the send, retried with
    /// backoff. If every attempt fails, the claim is kept in this process,
    /// so the record's retry finishes the entry without sending again.
    async fn finish(&self, ns: &Namespace, hash: &str, token: &str, until: Option<i64>) -> Result<(), SettleError> {
        let key = entry_key(ns, hash);
        match once::persist(&key, "finishing the entry", || self.store.cache_finish(ns, hash, token, until)).await {
            Ok(applied) => {
                self.unfinished.forget(&key);
                if !applied {
                    tracing::error!(hash, "finishing found the entry no longer ours");
                }
                Ok(())
            }
            Err(err) => {
                metrics::count(metrics::CACHE_FINISH_FAILED);
                self.unfinished.keep(&key, token, until);
                Err(err.into())
            }
        }
    }
}

/// An operation's task that cannot make a message (checked when it was
/// delegated, so only a damaged entry gets here): retrying cannot help.
fn unreadable(why: String) -> DispatchError {
    DispatchError::Refused { target: "the operation's task", code: why }
}
