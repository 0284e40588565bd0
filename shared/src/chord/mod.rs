//! The chord join, driven by DynamoDB Streams (the `chord-join` function).
//! `docs/ARCHITECTURE.md` follows a record through it; `docs/INVARIANTS.md`
//! lists what it promises (C1 to C12) and the tests that hold it to them.
//! A failed chord's redrive is in `redrive.rs`, deadlines in `deadline.rs`.
//!
//! A chord part is a task result stored with `group_id`, `group_index` and
//! `chord: {size, callback}`; the chord travels on the part's own item, so a
//! store stays one write. For each batch of stream records:
//! 1. keep records where a chord part is ready (SUCCESS, FAILURE, REVOKED);
//! 2. per chord, count each part once ([`ChordStore::count_parts`]), and
//!    keep the chord's items alive as long as its newest part;
//! 3. when `done >= size`, claim the join with a conditional write (open →
//!    joining, a token, a lease longer than chord-join's timeout); only the
//!    claimer joins;
//! 4. join: check that exactly `size` parts were counted, read their
//!    results in `group_index` order, summing their sizes as they arrive so
//!    a callback too large for its target fails before it is built;
//!    a FAILURE/REVOKED part fails the chord with Celery's ChordError (the
//!    callback's task stored as FAILURE, its errbacks sent, each once);
//! 5. re-check the claim with a conditional write just before sending, send,
//!    then mark the chord dispatched (retried with backoff). Once a send has
//!    succeeded the claim is never given back.
//!
//! Errors retrying cannot fix fail the chord at once; other errors give the
//! claim back and count an attempt on the chord's state item, and after
//! `CHORD_MAX_ATTEMPTS` the chord fails clearly. So a chord's records are
//! reported in `batchItemFailures` a bounded number of times, and one bad
//! chord never holds its stream shard for ever.
//!
//! The join is generic over a [`ChordStore`] and a [`CallbackSink`], so its
//! hardest cases are unit tests with in-memory fakes (`tests.rs`). It
//! sends by the protocol of [`crate::once`], which the cache shares.

mod deadline;
mod dynamo;
mod fail;
#[cfg(test)]
mod memory;
mod redrive;
mod results;
pub mod store;
#[cfg(test)]
mod tests;

use aws_lambda_events::event::dynamodb::EventRecord;
use std::time::Duration;

use crate::celery::{MessageContext, Signature};
use crate::config::{ChordConfig, Config};
use crate::dispatch::{CallbackSink, DispatchError, Outgoing, Target};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::State;
use crate::metrics;
use crate::once::{self, Unfinished, Window};
use crate::store::DynamoStore;
use crate::stream::Image;
pub use deadline::{wake_of, Wake};
use fail::OnTransient;
pub use redrive::{part_message, redrive_of, with_arguments, Redrive, REDRIVE_WINDOW_PARTS};
use results::{args_with_results, lambda_event};
pub use results::{result_of, results_id};
pub use store::{chord_key, ChordPart, ChordPhase, ChordRegistration, ChordState, ChordStore, RedriveTo, Sending};

/// A chord part entering a ready state, read from a stream record.
#[derive(Debug, Clone)]
pub struct Part {
    pub sequence: String,
    pub ns: Namespace,
    pub group_id: GroupId,
    pub chord: ChordRegistration,
    pub part: ChordPart,
}

impl once::Record for Part {
    fn item(&self) -> String {
        chord_key(&self.ns, &self.group_id)
    }

    fn sequence(&self) -> &str {
        &self.sequence
    }
}

/// The part a record carries, if it is a chord part in a ready state;
/// anything else is `None` (ignored, not an error).
pub fn part_of(record: &EventRecord) -> Option<Part> {
    use crate::store::schema::attr;
    let image = Image::of(record)?;
    let status = State::parse(image.s(attr::STATUS)?).ok()?;
    if !status.is_ready() {
        return None;
    }
    let callback = image.s(attr::CHORD_CALLBACK)?.to_owned();
    let sig = Signature::parse(&callback).ok();
    let callback_id = sig.as_ref().map(|s| s.task_id.to_string()).unwrap_or_default();
    let deadline = sig.and_then(|s| s.deadline().ok().flatten()).map(|d| d.seconds);
    let (ns, task_id) = image.task()?;
    Some(Part {
        ns,
        group_id: GroupId::parse(image.s(attr::GROUP_ID)?).ok()?,
        chord: ChordRegistration { size: image.n(attr::CHORD_SIZE)?, callback, callback_id, deadline },
        part: ChordPart {
            index: image.n(attr::GROUP_INDEX)?,
            task_id,
            expires_at: image.n(attr::EXPIRES_AT).unwrap_or(0),
            failed: matches!(status, State::Failure | State::Revoked),
            stored_at: image.n(attr::STORED_AT),
        },
        sequence: image.sequence,
    })
}

/// Why a chord did not advance this time; its records are retried.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("chord {0} is being joined by another invocation")]
    Busy(String),
    #[error("chord {0}: state item missing after counting")]
    Missing(String),
    /// The callback went out but the chord could not be marked dispatched;
    /// a later invocation finishes the mark, and sends nothing.
    #[error("chord {0}: callback sent, marking it dispatched failed: {1}")]
    Unmarked(String, StoreError),
}

impl JoinError {
    /// The error as a tenant may read it (in the chord's status and its
    /// ChordError): DynamoDB's own text can name tables and accounts, so
    /// only its kind is given; the log has the rest.
    fn public(&self) -> String {
        match self {
            Self::Store(StoreError::Throttled { .. }) => "DynamoDB kept throttling".into(),
            Self::Store(StoreError::Unavailable(_)) => "DynamoDB was unavailable".into(),
            Self::Store(_) => "a DynamoDB error".into(),
            other => other.to_string(),
        }
    }
}

/// The most messages (of a body, or errbacks) sent together after one
/// re-check, and the most bytes of their arguments held at once: a window
/// goes out in concurrent batches, and its progress is recorded once.
pub const SEND_WINDOW_MESSAGES: usize = 100;
pub const SEND_WINDOW_BYTES: usize = 8 << 20;

/// The next window: `items` taken as they are made, at most `most` of
/// them and [`SEND_WINDOW_BYTES`] by `size`
/// (one at least, whatever its size); the rest stay in `items`.
fn next_window<T, I: Iterator<Item = T>>(
    items: &mut std::iter::Peekable<I>,
    most: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<T> {
    let (mut window, mut bytes) = (Vec::new(), 0);
    while let Some(item) = items.peek() {
        let item_bytes = size(item);
        if window.len() == most || (!window.is_empty() && bytes + item_bytes > SEND_WINDOW_BYTES) {
            break;
        }
        bytes += item_bytes;
        window.extend(items.next());
    }
    window
}

/// Parts' results forgotten at once after a join (`forget_parts`).
const FORGET_CONCURRENCY: usize = 16;

/// How far past its newest part a chord's expiry is moved (seconds).
const EXTEND_PAST_NEWEST: i64 = 3600;

/// The chord-join function's state: the store, where callbacks go, and the
/// join's settings.
pub struct Joiner<S, T> {
    pub store: S,
    pub sink: T,
    pub config: ChordConfig,
    /// Lifetime of the ChordError stored on a failed chord's callback.
    pub result_ttl: Duration,
    /// The largest callback message the target accepts (`CALLBACK_MAX_BYTES`).
    pub max_message_bytes: usize,
    /// Chords whose callback (or some of its messages, or a failing
    /// chord's errbacks) went out but whose progress could not be recorded:
    /// chord key → the claim's token and how many messages went out. The
    /// next invocation in this process goes on from there instead of
    /// joining again.
    unmarked: Unfinished<u32>,
    /// The most messages sent together ([`SEND_WINDOW_MESSAGES`]).
    pub window_messages: usize,
}

impl Joiner<DynamoStore, Target> {
    /// Builds the joiner from the environment (see [`Config`]).
    pub async fn from_env() -> Result<Self, String> {
        let config = Config::from_env().map_err(|e| e.to_string())?;
        let shared = crate::aws::shared_config(&config).await;
        let store = DynamoStore::from_shared(&config, &shared).await?;
        let sink = Target::new(config.callbacks.clone(), &shared);
        Ok(Self::new(store, sink, &config))
    }
}

impl<S: ChordStore, T: CallbackSink> Joiner<S, T> {
    pub fn new(store: S, sink: T, config: &Config) -> Self {
        Self {
            store,
            sink,
            config: config.chord.clone(),
            result_ttl: config.result_ttl,
            max_message_bytes: config.callbacks.max_bytes,
            unmarked: Unfinished::default(),
            window_messages: SEND_WINDOW_MESSAGES,
        }
    }

    /// Advances every chord the parts belong to, concurrently; returns the
    /// sequence numbers of the parts whose chord should be tried again.
    pub async fn handle_parts(&self, parts: Vec<Part>) -> Vec<String> {
        once::by_key(parts, |parts| async move {
            // Each chord counts its own DynamoDB requests (the benchmark reads this line).
            let (outcome, calls) = crate::calls::counted(self.advance(&parts)).await;
            let gid = &parts[0].group_id;
            tracing::info!(chord = %gid, parts = parts.len(), ddb_calls = calls, "chord advanced");
            match outcome {
                Ok(()) => return Vec::new(),
                Err(err @ JoinError::Busy(_)) => tracing::info!(chord = %gid, "{err}; will retry"),
                Err(err) => tracing::error!(chord = %gid, error = %err, "chord join failed; will retry"),
            }
            parts.into_iter().map(|p| p.sequence).collect()
        })
        .await
    }

    /// Counts the parts, and joins the chord if they complete it.
    async fn advance(&self, parts: &[Part]) -> Result<(), JoinError> {
        let first = &parts[0];
        let (ns, gid) = (&first.ns, &first.group_id);
        let counted: Vec<ChordPart> = parts.iter().map(|p| p.part.clone()).collect();
        let new = self.store.count_parts(ns, gid, &first.chord, &counted).await?;
        if new > 0 {
            metrics::emit(&[], &[metrics::Point::count(metrics::CHORD_PARTS_COUNTED, new.into())]);
        }
        let newest_stored = parts.iter().filter_map(|p| p.part.stored_at).max();
        let state = self.store.chord_state(ns, gid).await?.ok_or_else(|| JoinError::Missing(gid.to_string()))?;
        let key = chord_key(ns, gid);
        if state.is_final() {
            self.unmarked.forget(&key);
            return Ok(());
        }
        // A chord lives as long as its newest part (invariant C8). It is
        // moved an hour past that, so the parts of the next hour need no write.
        let newest = counted.iter().map(|p| p.expires_at).max().unwrap_or(0);
        if newest > state.expires_at {
            self.store.extend_chord(ns, gid, newest + EXTEND_PAST_NEWEST).await?;
        }
        self.arm_deadline(ns, gid, &state).await?;
        let last = &parts.iter().max_by_key(|p| p.part.index).expect("parts are not empty").part.task_id;
        if let Some((token, sent)) = self.unmarked.get(&key) {
            // Our messages went out earlier but recording it failed: go on
            // from there under the same claim, sending nothing twice
            // (invariant C3): the callback's, or a failing chord's errbacks.
            let mut state = state;
            if let Some(message) = state.error.clone() {
                state.errbacks_sent = state.errbacks_sent.max(sent);
                let claim = Claim { ns, gid, token: &token, last, state: &state, newest_stored };
                return self.fail_claimed(&claim, message, OnTransient::Retry).await;
            }
            state.body_sent = state.body_sent.max(sent);
            return self.join(&Claim { ns, gid, token: &token, last, state: &state, newest_stored }).await;
        }
        // A redriving chord is joined when its redrive ends (`redrive.rs`).
        if state.done < state.size || state.phase == ChordPhase::Redriving {
            return Ok(());
        }
        self.claim_and_join(ns, gid, last, newest_stored).await
    }

    /// Claims a complete chord and joins it: gives the claim back when
    /// nothing was sent, fails the chord once out of attempts.
    async fn claim_and_join(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        last: &TaskId,
        newest_stored: Option<i64>,
    ) -> Result<(), JoinError> {
        let token = uuid::Uuid::new_v4().to_string();
        let Some(mut state) = self.store.claim_chord(ns, gid, &token, self.config.lease).await? else {
            return match self.store.chord_state(ns, gid).await? {
                Some(s) if s.is_final() => Ok(()),
                _ => Err(JoinError::Busy(gid.to_string())),
            };
        };
        let unsure = state.count_sending_as_sent();
        if unsure > 0 {
            // Taken over from a claim that was sending: what it may have sent stays sent (O5).
            metrics::emit(&[], &[metrics::Point::count(metrics::CHORD_RESEND_SKIPPED, unsure.into())]);
            tracing::error!(chord = %gid, messages = unsure, "taken over from a claim that was sending; not sent again");
        }
        let claim = Claim { ns, gid, token: &token, last, state: &state, newest_stored };
        let joined = match &state.error {
            // An earlier join began failing the chord: finish that.
            Some(message) => self.fail_claimed(&claim, message.clone(), OnTransient::Retry).await,
            None => self.join(&claim).await,
        };
        match joined {
            Ok(()) => Ok(()),
            Err(err @ JoinError::Unmarked(..)) => Err(err),
            Err(err) if state.attempts + 1 >= self.config.max_attempts => {
                // Out of attempts: fail the chord for good, under our claim.
                let attempts = state.attempts + 1;
                let message = format!("ChordError: callback not sent after {attempts} attempts: {}", err.public());
                self.fail_claimed(&claim, message, OnTransient::Skip).await
            }
            Err(err) => {
                metrics::count(metrics::CHORD_JOIN_RETRIED);
                // Nothing was sent: give the claim back (only if still ours),
                // counting the attempt, so a retry may claim it at once.
                if let Err(release) = self.store.release_chord(ns, gid, &token).await {
                    tracing::warn!(chord = %gid, error = %release, "giving the claim back failed; it lapses with its lease");
                }
                Err(err)
            }
        }
    }

    /// Joins a claimed chord: checks its parts, reads their results, and
    /// sends the callback or fails the chord. An `Err` means nothing was
    /// sent (the caller gives the claim back), or, for
    /// [`JoinError::Unmarked`], that the callback went out.
    async fn join(&self, claim: &Claim<'_>) -> Result<(), JoinError> {
        let Claim { ns, gid, state, .. } = *claim;
        let sig = match Signature::parse(&state.callback) {
            Ok(sig) => sig,
            Err(e) => {
                // Checked at store time, so only a damaged item gets here.
                let message = format!("ChordError: the chord's callback cannot be read: {e}");
                self.finish(claim, ChordPhase::Failed, Some(&message)).await?;
                return Ok(());
            }
        };
        // What goes out: the body as Celery's apply_async sends it (a chain
        // as its first task carrying the rest, a group's tasks, a chord's
        // header); the Lambda target gets the whole signature in one event.
        let messages = if self.sink.sends_task_messages() {
            match sig.body_messages() {
                Ok(messages) => messages,
                Err(e) => return self.fail(claim, &sig, format!("ChordError: {e}"), OnTransient::Retry).await,
            }
        } else {
            vec![sig.clone()]
        };
        let total = messages.len() as u32;
        if state.body_sent >= total {
            // Everything went out before; only the mark is left (invariant C3).
            return self.mark_dispatched(claim, total).await;
        }
        let ids = self.store.chord_part_ids(ns, gid).await?;
        if ids.len() != state.size as usize {
            let why = if ids.len() < state.size as usize {
                "the others expired or were removed before the join"
            } else {
                "its parts disagree on the chord's size"
            };
            let message = format!("ChordError: {} of the chord's {} parts are on record; {why}", ids.len(), state.size);
            return self.fail(claim, &sig, message, OnTransient::Retry).await;
        }
        // Within what the body tolerates, failed parts' exceptions take their slots.
        let tolerated = sig.tolerated_failures(state.size).unwrap_or(0);
        let layout = match sig.results_layout(state.size) {
            Ok(layout) => layout,
            // Checked at store time, so only a damaged item gets here.
            Err(e) => return self.fail(claim, &sig, format!("ChordError: {e}"), OnTransient::Retry).await,
        };
        let results = match self.read_results(ns, &ids, tolerated, &layout).await? {
            Ok(results) => results,
            Err(message) => return self.fail(claim, &sig, message, OnTransient::Retry).await,
        };
        let results = match self.results_or_reference(claim, &sig, &messages, results).await? {
            Ok(results) => results,
            Err(message) => return self.fail(claim, &sig, message, OnTransient::Retry).await,
        };
        let event = || lambda_event(claim, &sig, &results);
        // Each message once across retries: a window of messages goes out
        // after one re-check, and progress is kept on the chord's state
        // item, under the claim, after each window.
        let doing = "recording the callback's progress";
        let record =
            |sent: u32| self.record(claim, sent, doing, move || self.store.record_sent(ns, gid, claim.token, sent));
        let mut next = state.body_sent as usize;
        while next < messages.len() {
            let mut made = messages[next..].iter().map(|task| args_with_results(task, &results)).peekable();
            let args = next_window(&mut made, self.window_messages, String::len);
            let end = next + args.len();
            let window = &messages[next..end];
            let outs: Vec<Outgoing> = window
                .iter()
                .zip(&args)
                .map(|(sig, args)| Outgoing { sig, args, event: &event, cx: claim.context() })
                .collect();
            let name = |i: usize| window[i].task_id.to_string();
            match self.send_window(claim, &outs, Sending::Body(end as u32), name).await? {
                Window::Out => {}
                Window::Lost => return Ok(()),
                Window::Partial { sent, error } => {
                    // The first `sent` went out, none after: record them; a retry sends the rest.
                    if sent > 0 && !record((next + sent) as u32).await? {
                        return Ok(());
                    }
                    return Err(error.into());
                }
                Window::Broken { went_out, error } => {
                    let message = format!("ChordError: callback not sent: {error}");
                    let ran = window.iter().zip(&went_out).filter(|(_, out)| **out).map(|(task, _)| task);
                    let spared: Vec<TaskId> =
                        messages[..next].iter().chain(ran).flat_map(Signature::ids_that_never_run).collect();
                    return self.fail_sparing(claim, &sig, message.into(), OnTransient::Retry, &spared).await;
                }
            }
            if end < messages.len() && !record(end as u32).await? {
                return Ok(());
            }
            next = end;
        }
        self.mark_dispatched(claim, total).await?;
        metrics::count(metrics::CHORD_DISPATCHED);
        if let Some(stored) = claim.newest_stored {
            let latency = (crate::time::now_millis() - stored).max(0) as f64;
            metrics::emit(&[], &[metrics::Point::millis(metrics::CHORD_JOIN_LATENCY, latency)]);
        }
        tracing::info!(chord = %gid, parts = ids.len(), messages = total, callback = %sig.task_id, "chord dispatched");
        // Checked at store time. Kept when a part failed: a redrive needs them all.
        if sig.forgets_parts().unwrap_or(false) && state.failed == 0 {
            self.forget_parts(ns, gid, &ids).await;
        }
        Ok(())
    }

    /// Forgets the results of a dispatched chord's parts (their items and
    /// any S3 objects), [`FORGET_CONCURRENCY`] at a time. Best effort: the
    /// callback is out, a part not forgotten expires with its result's
    /// lifetime, and failures are logged, not retried.
    async fn forget_parts(&self, ns: &Namespace, gid: &GroupId, ids: &[TaskId]) {
        use futures::StreamExt;
        let outcomes: Vec<Result<(), StoreError>> = futures::stream::iter(ids)
            .map(|id| self.store.delete_task(ns, id))
            .buffer_unordered(FORGET_CONCURRENCY)
            .collect()
            .await;
        let forgotten = outcomes.iter().filter(|o| o.is_ok()).count();
        metrics::emit(&[], &[metrics::Point::count(metrics::CHORD_PARTS_FORGOTTEN, forgotten as f64)]);
        if let Some(Err(err)) = outcomes.iter().find(|o| o.is_err()) {
            let kept = ids.len() - forgotten;
            tracing::warn!(chord = %gid, kept, error = %err, "some parts' results were not forgotten; they expire");
        }
    }

    /// Re-checks the claim (renewing its lease, and recording what may have
    /// gone out once the sends are made) just before a window of sends, then
    /// sends them together (see [`once::recheck_then_send_all`]); `name`
    /// names a message of the window in the log.
    async fn send_window(
        &self,
        claim: &Claim<'_>,
        outs: &[Outgoing<'_>],
        sending: Sending,
        name: impl Fn(usize) -> String,
    ) -> Result<Window, JoinError> {
        let recheck = self.store.renew_claim(claim.ns, claim.gid, claim.token, self.config.lease, sending);
        let window = once::recheck_then_send_all(recheck, self.sink.send_all(claim.ns, outs), name).await?;
        if let Window::Lost = window {
            metrics::count(metrics::CHORD_CLAIM_LOST);
            tracing::error!(chord = %claim.gid, "the claim was taken over before the send; nothing sent");
        }
        Ok(window)
    }

    /// Moves a claimed chord to a final phase; a chord no longer ours is
    /// logged and counted, not an error.
    async fn finish(&self, claim: &Claim<'_>, phase: ChordPhase, error: Option<&str>) -> Result<(), JoinError> {
        if !self.store.finish_chord(claim.ns, claim.gid, claim.token, phase, error).await? {
            self.lost(claim.gid, "finishing");
        }
        Ok(())
    }

    fn lost(&self, gid: &GroupId, doing: &str) {
        metrics::count(metrics::CHORD_MARK_LOST);
        tracing::error!(chord = %gid, "{doing} found the chord no longer ours");
    }

    /// Marks the chord dispatched after all `total` messages of its
    /// callback went out (see [`Joiner::record`]).
    async fn mark_dispatched(&self, claim: &Claim<'_>, total: u32) -> Result<(), JoinError> {
        let (ns, gid, token) = (claim.ns, claim.gid, claim.token);
        let doing = "marking the chord dispatched";
        self.record(claim, total, doing, || self.store.finish_chord(ns, gid, token, ChordPhase::Dispatched, None))
            .await?;
        self.unmarked.forget(&chord_key(ns, gid));
        Ok(())
    }

    /// Records that the first `sent` messages (the callback's, or a failing
    /// chord's errbacks) went out, with `write`, retried with backoff;
    /// `false` when the claim is no longer ours. If every attempt fails, the
    /// progress is kept in this process, and the next delivery goes on from
    /// there without sending again (invariant C3).
    async fn record<F, Fut>(&self, claim: &Claim<'_>, sent: u32, doing: &str, write: F) -> Result<bool, JoinError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<bool, StoreError>>,
    {
        let key = chord_key(claim.ns, claim.gid);
        match once::persist(&key, doing, write).await {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.lost(claim.gid, doing);
                Ok(false)
            }
            Err(err) => {
                metrics::count(metrics::CHORD_MARK_FAILED);
                self.unmarked.keep(&key, claim.token, sent);
                Err(JoinError::Unmarked(claim.gid.to_string(), err))
            }
        }
    }
}

/// A chord this invocation has claimed.
#[derive(Clone, Copy)]
struct Claim<'a> {
    ns: &'a Namespace,
    gid: &'a GroupId,
    token: &'a str,
    /// The last header task (the callback's parent).
    last: &'a TaskId,
    /// The state item as read before the claim.
    state: &'a ChordState,
    /// When the newest part of this delivery was stored (epoch ms): the
    /// join's latency is measured from it.
    newest_stored: Option<i64>,
}

impl<'a> Claim<'a> {
    fn context(&self) -> MessageContext<'a> {
        MessageContext {
            group_id: self.gid.as_str(),
            parent_id: Some(self.last.as_str()),
            root_id: None,
            chord_error: None,
        }
    }
}
