//! Send once: the protocol both stream consumers follow, the chord join
//! ([`crate::chord`]) and the processing cache's settling
//! ([`crate::cache::settle`]). Its rules are stated once, in
//! `docs/INVARIANTS.md` ("Sending once"):
//!
//! 1. **Claim** the item with a conditional write (a token and a lease).
//! 2. **Re-check** the claim with a conditional write just before each send
//!    ([`recheck_then_send`]), recording on the item what may have gone out
//!    once the send is made: a claim taken over sends nothing, and one that
//!    takes over never sends again what may have gone out.
//! 3. **Send.** A send that failed for good, one that did not go out, and
//!    one whose outcome is unknown are told apart ([`Sent`]); nothing is
//!    recorded for a send that did not go out, and one that may have gone
//!    out counts as sent (at most once: `docs/INVARIANTS.md`, O5).
//! 4. **Record** the progress after each send, retried with backoff
//!    ([`persist`]). When every attempt fails, the claim's token and progress
//!    are kept in this process ([`Unfinished`]), so the record's retry goes
//!    on from there and never sends again.
//!
//! A stream batch is handled per item ([`by_key`]), items concurrently, and
//! the records of an item that did not advance are reported in
//! `batchItemFailures` ([`batch_item_failures`]), so one item never holds
//! or replays the rest of its batch.

use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use crate::dispatch::DispatchError;
use crate::error::StoreError;

/// Attempts at a write that must follow a send, and the first pause
/// between them (doubling): about 3 s in all.
pub const PERSIST_ATTEMPTS: u32 = 6;
pub const PERSIST_FIRST_PAUSE: Duration = Duration::from_millis(100);

/// Runs a write that must follow a send, retrying errors with backoff
/// ([`PERSIST_ATTEMPTS`]); the last error when every attempt failed. `item`
/// and `doing` name it in the log.
pub async fn persist<F, Fut, T>(item: &str, doing: &str, write: F) -> Result<T, StoreError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut pause = PERSIST_FIRST_PAUSE;
    let mut attempt = 1;
    loop {
        match write().await {
            Err(err) if attempt < PERSIST_ATTEMPTS => {
                tracing::warn!(item, attempt, error = %err, "{doing} failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            done => return done,
        }
    }
}

/// What became of a send after its re-check.
#[derive(Debug)]
pub enum Sent {
    /// It went out.
    Out,
    /// The claim was taken over before the send: nothing went out.
    Lost,
    /// The target refused it for good (a queue not allowed, a message too
    /// large): retrying cannot help, and nothing went out.
    Refused(DispatchError),
    /// It did not go out, and a retry may fix that; nothing is recorded as sent.
    Failed(DispatchError),
    /// Nobody knows whether it went out (a time-out, a 5xx after the
    /// request went out): it counts as sent, and is never sent again
    /// (counted as `SendOutcomeUnknown`).
    Unknown(DispatchError),
}

impl Sent {
    /// A send's outcome (a lost claim aside).
    fn of(result: Result<(), DispatchError>) -> Self {
        match result {
            Ok(()) => Self::Out,
            Err(err) if err.is_permanent() => Self::Refused(err),
            Err(err) if err.may_have_gone_out() => {
                crate::metrics::count(crate::metrics::SEND_OUTCOME_UNKNOWN);
                Self::Unknown(err)
            }
            Err(err) => Self::Failed(err),
        }
    }

    /// Whether the message went out, or may have.
    fn went_out(&self) -> bool {
        matches!(self, Self::Out | Self::Unknown(_))
    }
}

/// Re-checks the claim (a conditional write that also renews its lease:
/// `false` when the claim is no longer ours), and only then sends.
pub async fn recheck_then_send<R, S>(recheck: R, send: S) -> Result<Sent, StoreError>
where
    R: Future<Output = Result<bool, StoreError>>,
    S: Future<Output = Result<(), DispatchError>>,
{
    if !recheck.await? {
        return Ok(Sent::Lost);
    }
    Ok(Sent::of(send.await))
}

/// What became of a window of messages sent together after one re-check.
#[derive(Debug)]
pub enum Window {
    /// Every message went out, or may have (those count as sent).
    Out,
    /// The claim was taken over before the send: nothing went out.
    Lost,
    /// The first `sent` went out (or may have) and none after them did; a
    /// retry may send the rest.
    Partial { sent: usize, error: DispatchError },
    /// A message cannot go out (refused for good), or one did not go out
    /// while a later one did, so a retry would send that one again: which
    /// went out, and the error of the first that did not.
    Broken { went_out: Vec<bool>, error: DispatchError },
}

impl Window {
    fn of(sent: Vec<Sent>) -> Self {
        let went_out: Vec<bool> = sent.iter().map(Sent::went_out).collect();
        let prefix = went_out.iter().take_while(|w| **w).count();
        let mut rest = sent.into_iter().skip(prefix);
        let (permanent, error) = match rest.next() {
            None => return Self::Out,
            Some(Sent::Refused(err)) => (true, err),
            Some(Sent::Failed(err)) => (false, err),
            Some(Sent::Out | Sent::Unknown(_) | Sent::Lost) => {
                unreachable!("the prefix ends at one that did not go out")
            }
        };
        if permanent || went_out[prefix..].iter().any(|w| *w) {
            return Self::Broken { went_out, error };
        }
        Self::Partial { sent: prefix, error }
    }
}

/// Re-checks the claim once, then sends a window of messages together (see
/// [`Window`]). Each message whose outcome is unknown is logged by the
/// name `name` gives its place in the window.
pub async fn recheck_then_send_all<R, S, N>(recheck: R, send: S, name: N) -> Result<Window, StoreError>
where
    R: Future<Output = Result<bool, StoreError>>,
    S: Future<Output = Vec<Result<(), DispatchError>>>,
    N: Fn(usize) -> String,
{
    if !recheck.await? {
        return Ok(Window::Lost);
    }
    let sent: Vec<Sent> = send.await.into_iter().map(Sent::of).collect();
    for (i, sent) in sent.iter().enumerate() {
        if let Sent::Unknown(err) = sent {
            tracing::error!(task = %name(i), error = %err, "send outcome unknown: counted as sent, never sent again");
        }
    }
    Ok(Window::of(sent))
}

/// Claims whose messages went out but whose progress could not be
/// recorded, kept in this process: an item's key → its claim's token and
/// progress. The next delivery of the item's records goes on from there,
/// under the same claim, instead of sending again.
pub struct Unfinished<P> {
    claims: Mutex<HashMap<String, (String, P)>>,
}

impl<P: Clone> Default for Unfinished<P> {
    fn default() -> Self {
        Self { claims: Mutex::new(HashMap::new()) }
    }
}

impl<P: Clone> Unfinished<P> {
    fn claims(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, P)>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the claim `token` of `key` with its `progress`.
    pub fn keep(&self, key: &str, token: &str, progress: P) {
        self.claims().insert(key.to_owned(), (token.to_owned(), progress));
    }

    /// The kept claim of `key`, if any: its token and progress.
    pub fn get(&self, key: &str) -> Option<(String, P)> {
        self.claims().get(key).cloned()
    }

    /// Forgets `key`'s claim: its progress was recorded, or it is over.
    pub fn forget(&self, key: &str) {
        self.claims().remove(key);
    }
}

/// A stream record an item's handler works on.
pub trait Record {
    /// The item it advances; records of one item are handled together.
    fn item(&self) -> String;
    /// Its sequence number, for `batchItemFailures`.
    fn sequence(&self) -> &str;
}

/// Groups records by item, handles the items concurrently, and returns the
/// sequence numbers `handle` names for retry.
pub async fn by_key<R, H, Fut>(records: Vec<R>, handle: H) -> Vec<String>
where
    R: Record,
    H: Fn(Vec<R>) -> Fut,
    Fut: Future<Output = Vec<String>>,
{
    let mut items: BTreeMap<String, Vec<R>> = BTreeMap::new();
    for record in records {
        items.entry(record.item()).or_default().push(record);
    }
    futures::future::join_all(items.into_values().map(handle)).await.into_iter().flatten().collect()
}

/// The stream consumer's answer: the records to retry, by sequence number.
pub fn batch_item_failures(sequences: impl IntoIterator<Item = String>) -> DynamoDbEventResponse {
    let mut response = DynamoDbEventResponse::default();
    response.batch_item_failures = sequences
        .into_iter()
        .map(|sequence| {
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(sequence);
            failure
        })
        .collect();
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_write_after_a_send_is_retried_then_its_last_error_returned() {
        let tries = AtomicU32::new(0);
        let failing = persist("x", "writing", || async {
            tries.fetch_add(1, Ordering::SeqCst);
            Err::<bool, _>(StoreError::Unavailable("down".into()))
        });
        assert!(matches!(failing.await, Err(StoreError::Unavailable(_))));
        assert_eq!(tries.load(Ordering::SeqCst), PERSIST_ATTEMPTS);
        let tries = AtomicU32::new(0);
        let recovering = persist("x", "writing", || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(StoreError::Unavailable("down".into())),
                _ => Ok(true),
            }
        });
        assert!(recovering.await.unwrap());
        assert_eq!(tries.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_lost_claim_never_reaches_the_send() {
        let sends = AtomicU32::new(0);
        let send = async {
            sends.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        assert!(matches!(recheck_then_send(async { Ok(false) }, send).await, Ok(Sent::Lost)));
        let failed_recheck = recheck_then_send(async { Err(StoreError::Unavailable("down".into())) }, async {
            sends.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        assert!(failed_recheck.await.is_err());
        assert_eq!(sends.load(Ordering::SeqCst), 0);
        let refused = recheck_then_send(async { Ok(true) }, async { Err(DispatchError::NotAllowed("q".into())) });
        assert!(matches!(refused.await, Ok(Sent::Refused(_))));
        let transient = recheck_then_send(async { Ok(true) }, async {
            Err(DispatchError::Send { target: "SQS", code: "timeout".into() })
        });
        assert!(matches!(transient.await, Ok(Sent::Failed(_))));
        let unknown = recheck_then_send(async { Ok(true) }, async {
            Err(DispatchError::Unknown { target: "SQS", code: "time-out".into() })
        });
        assert!(matches!(unknown.await, Ok(Sent::Unknown(_))));
    }

    #[test]
    fn a_window_is_out_partial_or_broken_by_where_its_sends_stopped() {
        let out = || Ok(());
        let not_sent = || Err(DispatchError::Send { target: "SQS", code: "ThrottlingException".into() });
        let unknown = || Err(DispatchError::Unknown { target: "SQS", code: "time-out".into() });
        let refused = || Err(DispatchError::Refused { target: "SQS", code: "AccessDenied".into() });
        let of = |results: Vec<Result<(), DispatchError>>| Window::of(results.into_iter().map(Sent::of).collect());
        assert!(matches!(of(vec![out(), unknown(), out()]), Window::Out));
        assert!(matches!(of(vec![out(), unknown(), not_sent(), not_sent()]), Window::Partial { sent: 2, .. }));
        assert!(matches!(of(vec![not_sent(), not_sent()]), Window::Partial { sent: 0, .. }));
        match of(vec![out(), not_sent(), out()]) {
            Window::Broken { went_out, .. } => assert_eq!(went_out, [true, false, true]),
            other => panic!("{other:?}"),
        }
        match of(vec![out(), refused(), not_sent()]) {
            Window::Broken { went_out, error } => {
                assert_eq!(went_out, [true, false, false]);
                assert!(error.is_permanent());
            }
            other => panic!("{other:?}"),
        }
    }

    struct R(&'static str, &'static str);
    impl Record for R {
        fn item(&self) -> String {
            self.0.to_owned()
        }
        fn sequence(&self) -> &str {
            self.1
        }
    }

    #[tokio::test]
    async fn records_are_handled_per_item_and_only_the_failed_items_come_back() {
        let records = vec![R("a", "1"), R("b", "2"), R("a", "3"), R("c", "4")];
        let failed = by_key(records, |rs: Vec<R>| async move {
            assert!(rs.windows(2).all(|w| w[0].0 == w[1].0), "one item per call");
            if rs[0].0 == "a" {
                rs.iter().map(|r| r.sequence().to_owned()).collect()
            } else {
                Vec::new()
            }
        })
        .await;
        assert_eq!(failed, ["1", "3"]);
        let response = batch_item_failures(failed);
        let ids: Vec<_> = response.batch_item_failures.iter().map(|f| f.item_identifier.clone().unwrap()).collect();
        assert_eq!(ids, ["1", "3"]);
    }

    #[test]
    fn a_kept_claim_is_there_until_forgotten() {
        let kept: Unfinished<u32> = Unfinished::default();
        assert!(kept.get("k").is_none());
        kept.keep("k", "token", 2);
        assert_eq!(kept.get("k"), Some(("token".to_owned(), 2)));
        kept.forget("k");
        assert!(kept.get("k").is_none());
    }
}
