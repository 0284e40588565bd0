//! Fakes behind the crate's traits for unit tests: a callback sink that
//! records what it sends and answers from a script.

use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Mutex;

use crate::dispatch::{CallbackSink, DispatchError, Outgoing};
use crate::ids::Namespace;

/// A callback sink that records what it sends, and answers from a
/// script (then `Ok`). A message whose answer says it may have gone out
/// ([`unknown`]) is recorded as sent: the worst case.
#[derive(Default)]
pub struct FakeSink {
    sent: Mutex<Vec<(String, String, String)>>,
    /// The chord-error header of each errback that went out.
    pub chord_errors: Mutex<Vec<Value>>,
    script: Mutex<VecDeque<Result<(), DispatchError>>>,
    /// The body and delay of each message sent to the deadline queue.
    pub later: Mutex<Vec<(String, std::time::Duration)>>,
    /// The deployment has no deadline queue: every `send_later` is refused.
    no_deadline_queue: bool,
    /// Sends every message of a window, as concurrent batches do, instead
    /// of stopping at the first that did not go out but may if retried.
    pub all_at_once: bool,
}

impl FakeSink {
    pub fn answering(answers: Vec<Result<(), DispatchError>>) -> Self {
        Self { script: Mutex::new(answers.into()), ..Self::default() }
    }

    /// The answers still to come, to script more.
    pub fn script_mut(&self) -> std::sync::MutexGuard<'_, VecDeque<Result<(), DispatchError>>> {
        self.script.lock().unwrap()
    }

    /// A sink of a deployment without a deadline queue.
    pub fn without_deadline_queue() -> Self {
        Self { no_deadline_queue: true, ..Self::default() }
    }

    /// (task, task id, args) of each message that went out.
    pub fn sent(&self) -> Vec<(String, String, String)> {
        self.sent.lock().unwrap().clone()
    }
}

impl CallbackSink for FakeSink {
    async fn send(&self, _ns: &Namespace, out: &Outgoing<'_>) -> Result<(), DispatchError> {
        let answer = self.script.lock().unwrap().pop_front().unwrap_or(Ok(()));
        if answer.as_ref().map_or_else(DispatchError::may_have_gone_out, |()| true) {
            self.sent.lock().unwrap().push((out.sig.task.clone(), out.sig.task_id.to_string(), out.args.to_owned()));
            self.chord_errors.lock().unwrap().extend(out.cx.chord_error.cloned());
        }
        answer
    }

    async fn send_later(&self, body: &str, delay: std::time::Duration) -> Result<(), DispatchError> {
        if self.no_deadline_queue {
            return Err(DispatchError::NoSuchTarget { target: "queue", name: "CHORD_DEADLINE_QUEUE_URL".into() });
        }
        self.later.lock().unwrap().push((body.to_owned(), delay));
        Ok(())
    }

    async fn send_all(&self, ns: &Namespace, outs: &[Outgoing<'_>]) -> Vec<Result<(), DispatchError>> {
        crate::dispatch::one_by_one(self, ns, outs, !self.all_at_once).await
    }
}

/// A send that did not go out, which a retry may fix.
pub fn transient() -> DispatchError {
    DispatchError::Send { target: "SQS", code: "ThrottlingException".into() }
}

/// A send whose outcome is unknown: it may have gone out.
pub fn unknown() -> DispatchError {
    DispatchError::Unknown { target: "SQS", code: "time-out".into() }
}
