//! The processing cache (Backache's model; `docs/CACHE.md`): get-or-delegate
//! on the same table, stream and dispatcher as chords.
//!
//! - A request asks for the result of operation `op` on resource `uri`. A
//!   hit is answered from the entry (one consistent read).
//! - A miss that wins one conditional write delegates the processing: a
//!   Celery task message for the operation's task, whose id
//!   (`dcache-{hash}-{nonce}`) names the entry.
//! - A miss while that processing runs appends its `cb_args` with one
//!   conditional update (bounded in count and size).
//! - The processing's result, stored like any result, reaches chord-join
//!   through the stream: [`Settler`] claims the entry, keeps the result as
//!   the cache entry (TTL per operation), and sends the operation's callback
//!   once with `(result, [cb_args, ...])`; a failure sends one quarantine
//!   message `(operation, uri, exception)` instead and leaves the entry to
//!   be delegated again (or quarantined for a while, if the operation says).
//! - A processing that vanishes is delegated again once its lease runs
//!   out, never while it holds it; its STARTED and RETRY states renew it.

pub mod dynamo;
#[cfg(test)]
mod memory;
pub mod request;
pub mod settle;
pub mod store;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::celery::{MessageContext, Signature};
use crate::config::Config;
use crate::error::ApiError;
use crate::ids::Namespace;

pub use request::{entry_state, get_or_delegate, invalidate};
pub use settle::{done_of, Done, SettleError, Settler};
pub use store::{entry_hash, entry_key, CacheEntry, CachePhase, CacheStore};

/// The longest operation name, and the longest uri (bytes).
pub const MAX_OP_LEN: usize = 128;
pub const MAX_URI_BYTES: usize = 2048;
/// The longest task name an operation may give.
const MAX_TASK_NAME: usize = 256;

/// A task an operation names: its name and, optionally, its queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskRef {
    pub task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// An operation as a request describes it. The delegating request's
/// description is kept on the entry and used when the processing settles.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperationSpec {
    /// The processing task: called with `[uri]`.
    pub task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Called once per processing with `[[result, [cb_args, ...]]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<TaskRef>,
    /// Called once per failed processing with `[operation, uri, exception]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<TaskRef>,
    /// Seconds a result stays cached (default `RESULT_TTL_SECONDS`).
    #[serde(default, deserialize_with = "crate::whole::optional", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    /// Seconds a processing holds its entry (default `CACHE_LEASE_SECONDS`).
    #[serde(default, deserialize_with = "crate::whole::optional", skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
    /// Seconds a failed key stays quarantined (default 0: the next request delegates again).
    #[serde(default, deserialize_with = "crate::whole::optional", skip_serializing_if = "Option::is_none")]
    pub quarantine_for: Option<u64>,
}

impl OperationSpec {
    /// An operation of `task` alone: every option at its default.
    pub fn named(task: &str) -> Self {
        Self {
            task: task.to_owned(),
            queue: None,
            callback: None,
            quarantine: None,
            ttl: None,
            lease: None,
            quarantine_for: None,
        }
    }

    fn ttl(&self, config: &Config) -> i64 {
        self.ttl.unwrap_or(config.result_ttl.as_secs()) as i64
    }

    fn lease(&self, config: &Config) -> i64 {
        self.lease.unwrap_or(config.cache.lease.as_secs()) as i64
    }

    /// Checks names, bounds and queues (each must be granted to `ns`, as a
    /// chord callback's are) before anything is read or written.
    fn check(&self, op: &str, config: &Config, ns: &Namespace) -> Result<(), ApiError> {
        let bad = |m: String| ApiError::BadBody(format!("operation {op:?}: {m}"));
        let tasks = [Some(self.task.as_str()), self.callback.as_ref().map(|c| c.task.as_str())]
            .into_iter()
            .chain([self.quarantine.as_ref().map(|q| q.task.as_str())])
            .flatten();
        for task in tasks {
            if task.is_empty()
                || task.len() > MAX_TASK_NAME
                || task.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(bad(format!("task name {task:?} must be 1 to {MAX_TASK_NAME} characters without spaces")));
            }
        }
        let max_ttl = config.max_result_ttl.as_secs();
        for (name, value, min, max) in [
            ("ttl", self.ttl, 1, max_ttl),
            ("lease", self.lease, 10, 86_400),
            ("quarantine_for", self.quarantine_for, 0, max_ttl),
        ] {
            if let Some(v) = value.filter(|v| !(min..=max).contains(v)) {
                return Err(bad(format!("{name} {v} is outside {min}..={max} seconds")));
            }
        }
        if config.callbacks.lambda_function.is_some() {
            return Ok(());
        }
        let queues = [self.queue.as_deref(), self.callback.as_ref().map(|c| c.queue.as_deref()).unwrap_or(None)]
            .into_iter()
            .chain([self.quarantine.as_ref().and_then(|q| q.queue.as_deref())]);
        for queue in queues {
            let queue = queue.unwrap_or(&config.callbacks.default_queue);
            if config.callbacks.queue_url(ns, queue).is_none() {
                return Err(ApiError::CallbackNotAllowed(format!(
                    "operation {op:?}: queue {queue:?} is not one this tenant's tasks may be sent to"
                )));
            }
        }
        Ok(())
    }
}

/// The callback's task id of a processing.
pub fn callback_id(task_id: &str) -> String {
    format!("{task_id}-callback")
}

/// Messages of the cache belong to no group.
fn no_group() -> MessageContext<'static> {
    MessageContext { group_id: "", parent_id: None, root_id: None, chord_error: None }
}

/// A message's signature: the task an operation names, with `task_id`.
fn task_signature(task: &TaskRef, task_id: &str) -> Result<Signature, String> {
    Signature::from_value(json!({"task": task.task, "options": {"task_id": task_id, "queue": task.queue}}), None)
}
