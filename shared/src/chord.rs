//! The chord join, driven by DynamoDB Streams (the `chord-join` function).
//! `docs/ARCHITECTURE.md` follows a record through it; `docs/INVARIANTS.md`
//! lists what it promises (C1 to C8) and the tests that hold it to them.
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
//! hardest cases are unit tests with in-memory fakes (below).

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use crate::celery::{chord_error_message, MessageContext, Signature};
use crate::config::{ChordConfig, Config};
use crate::dispatch::{CallbackSink, DispatchError, Outgoing, Target};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::State;
use crate::metrics;
use crate::store::{
    chord_key, ChordPart, ChordPhase, ChordRegistration, ChordState, ChordStore, DynamoStore, TaskRecord,
};
use crate::time::{now_celery, now_epoch};

/// A chord part entering a ready state, read from a stream record.
#[derive(Debug, Clone)]
pub struct Part {
    pub sequence: String,
    pub ns: Namespace,
    pub group_id: GroupId,
    pub chord: ChordRegistration,
    pub part: ChordPart,
    /// When the part's result was stored (epoch milliseconds), if its item says.
    pub stored_at: Option<i64>,
}

/// The image's attributes as DynamoDB JSON: `{"name": {"S": "..."}}`.
fn image_json(record: &EventRecord) -> Value {
    serde_json::to_value(&record.change.new_image).unwrap_or(Value::Null)
}

fn attr_str<'a>(image: &'a Value, name: &str, kind: &str) -> Option<&'a str> {
    image.get(name)?.get(kind)?.as_str()
}

/// The part a record carries, if it is a chord part in a ready state;
/// anything else is `None` (ignored, not an error).
pub fn part_of(record: &EventRecord) -> Option<Part> {
    use crate::store::schema::attr;
    if record.event_name == "REMOVE" {
        return None;
    }
    let image = image_json(record);
    let status = State::parse(attr_str(&image, attr::STATUS, "S")?).ok()?;
    if !status.is_ready() {
        return None;
    }
    let size: u32 = attr_str(&image, attr::CHORD_SIZE, "N")?.parse().ok()?;
    let callback = attr_str(&image, attr::CHORD_CALLBACK, "S")?.to_owned();
    let group_id = GroupId::parse(attr_str(&image, attr::GROUP_ID, "S")?).ok()?;
    let index: u32 = attr_str(&image, attr::GROUP_INDEX, "N")?.parse().ok()?;
    let (ns, task_id) = crate::store::parse_task_key(attr_str(&image, attr::PK, "S")?)?;
    let expires_at = attr_str(&image, attr::EXPIRES_AT, "N").and_then(|n| n.parse().ok()).unwrap_or(0);
    let callback_id = Signature::parse(&callback).map(|s| s.task_id.to_string()).unwrap_or_default();
    Some(Part {
        sequence: record.change.sequence_number.clone().unwrap_or_default(),
        ns,
        group_id,
        chord: ChordRegistration { size, callback, callback_id },
        part: ChordPart { index, task_id, expires_at },
        stored_at: attr_str(&image, attr::STORED_AT, "N").and_then(|n| n.parse().ok()),
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

/// How a failing chord treats an errback whose send may succeed if retried.
#[derive(Debug, Clone, Copy, PartialEq)]
enum OnTransient {
    /// Stop, give the claim back, and try again later.
    Retry,
    /// The chord is out of attempts: log it and go on with the next.
    Skip,
}

/// Attempts at marking a chord dispatched after its callback went out, and
/// the first pause between them (doubling).
const MARK_ATTEMPTS: u32 = 6;
const MARK_FIRST_PAUSE: Duration = Duration::from_millis(100);

/// How far past its newest part a chord's expiry is moved (seconds).
const EXTEND_PAST_NEWEST: i64 = 3600;

/// Part results are read in windows sized to hold about this many bytes,
/// so a chord's memory stays bounded whatever its results add up to.
const READ_WINDOW_BYTES: usize = 8 << 20;

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
    /// Chords whose callback (or some of its messages) went out but whose
    /// progress could not be recorded: chord key → the claim's token and how
    /// many messages went out. The next invocation in this process goes on
    /// from there instead of joining again.
    unmarked: Mutex<HashMap<String, (String, u32)>>,
}

impl Joiner<DynamoStore, Target> {
    /// Builds the joiner from the environment (see [`Config`]).
    pub async fn from_env() -> Result<Self, String> {
        let config = Config::from_env().map_err(|e| e.to_string())?;
        let shared = crate::store::dynamo::shared_config(&config).await;
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
            unmarked: Mutex::new(HashMap::new()),
        }
    }

    /// Handles one batch of stream records; the failures name the records to retry.
    pub async fn handle(&self, event: Event) -> DynamoDbEventResponse {
        let parts: Vec<Part> = event.records.iter().filter_map(part_of).collect();
        let mut response = DynamoDbEventResponse::default();
        response.batch_item_failures = self
            .handle_parts(parts)
            .await
            .into_iter()
            .map(|sequence| {
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = Some(sequence);
                failure
            })
            .collect();
        response
    }

    /// Advances every chord the parts belong to, concurrently; returns the
    /// sequence numbers of the parts whose chord should be tried again.
    pub async fn handle_parts(&self, parts: Vec<Part>) -> Vec<String> {
        let mut chords: BTreeMap<(String, String), Vec<Part>> = BTreeMap::new();
        for part in parts {
            chords.entry((part.ns.as_str().to_owned(), part.group_id.to_string())).or_default().push(part);
        }
        let outcomes = futures::future::join_all(chords.into_values().map(|parts| async move {
            // Each chord counts its own DynamoDB requests (the benchmark reads this line).
            let (outcome, calls) = crate::calls::counted(self.advance(&parts)).await;
            tracing::info!(chord = %parts[0].group_id, parts = parts.len(), ddb_calls = calls, "chord advanced");
            (parts, outcome)
        }))
        .await;
        let mut failures = Vec::new();
        for (parts, outcome) in outcomes {
            if let Err(err) = outcome {
                match &err {
                    JoinError::Busy(_) => tracing::info!(chord = %parts[0].group_id, "{err}; will retry"),
                    _ => tracing::error!(chord = %parts[0].group_id, error = %err, "chord join failed; will retry"),
                }
                failures.extend(parts.into_iter().map(|p| p.sequence));
            }
        }
        failures
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
        let newest_stored = parts.iter().filter_map(|p| p.stored_at).max();
        let state = self.store.chord_state(ns, gid).await?.ok_or_else(|| JoinError::Missing(gid.to_string()))?;
        let key = chord_key(ns, gid);
        if state.is_final() {
            self.forget_unmarked(&key);
            return Ok(());
        }
        // A chord lives as long as its newest part (invariant C8). It is
        // moved an hour past that, so the parts of the next hour need no write.
        let newest = counted.iter().map(|p| p.expires_at).max().unwrap_or(0);
        if newest > state.expires_at {
            self.store.extend_chord(ns, gid, newest + EXTEND_PAST_NEWEST).await?;
        }
        let last = &parts.iter().max_by_key(|p| p.part.index).expect("parts are not empty").part.task_id;
        if let Some((token, sent)) = self.unmarked_progress(&key) {
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
        if state.done < state.size {
            return Ok(());
        }
        let token = uuid::Uuid::new_v4().to_string();
        if !self.store.claim_chord(ns, gid, &token, self.config.lease).await? {
            return match self.store.chord_state(ns, gid).await? {
                Some(s) if s.is_final() => Ok(()),
                _ => Err(JoinError::Busy(gid.to_string())),
            };
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
            return self.mark_dispatched(ns, gid, claim.token, total).await;
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
        let results = match self.read_results(ns, &ids).await? {
            Ok(results) => results,
            Err(message) => return self.fail(claim, &sig, message, OnTransient::Retry).await,
        };
        let results = match self.results_or_reference(claim, &sig, &messages, results).await? {
            Ok(results) => results,
            Err(message) => return self.fail(claim, &sig, message, OnTransient::Retry).await,
        };
        let event = || lambda_event(claim, &sig, &results);
        // Each message once across retries: progress is kept on the chord's
        // state item, under the claim, after each send.
        for (i, task) in messages.iter().enumerate().skip(state.body_sent as usize) {
            let args = args_with_results(task, &results);
            let out = Outgoing { sig: task, args: &args, event: &event, cx: claim.context() };
            if !self.still_ours(claim).await? {
                return Ok(());
            }
            match self.sink.send(ns, &out).await {
                Ok(()) => {}
                Err(err) if err.is_permanent() => {
                    let message = format!("ChordError: callback not sent: {err}");
                    let spared: Vec<TaskId> = messages[..i].iter().flat_map(Signature::ids_that_never_run).collect();
                    return self.fail_sparing(claim, &sig, message.into(), OnTransient::Retry, &spared).await;
                }
                Err(err) => return Err(err.into()),
            }
            let sent = i as u32 + 1;
            if sent < total && !self.record_sent(ns, gid, claim.token, sent).await? {
                return Ok(());
            }
        }
        self.mark_dispatched(ns, gid, claim.token, total).await?;
        metrics::count(metrics::CHORD_DISPATCHED);
        if let Some(stored) = claim.newest_stored {
            let latency = (crate::time::now_millis() - stored).max(0) as f64;
            metrics::emit(&[], &[metrics::Point::millis(metrics::CHORD_JOIN_LATENCY, latency)]);
        }
        tracing::info!(chord = %gid, parts = ids.len(), messages = total, callback = %sig.task_id, "chord dispatched");
        Ok(())
    }

    /// The parts' results as one JSON array (text), in order; or, as the
    /// inner `Err`, the ChordError message of the first part that failed,
    /// has no result, or makes the results larger than chord-join holds
    /// (`CHORD_MAX_RESULTS_BYTES`). Results kept in S3 are read from there.
    async fn read_results(&self, ns: &Namespace, ids: &[TaskId]) -> Result<Result<String, Failure>, JoinError> {
        let limit = self.config.max_results_bytes;
        let mut results = String::from("[");
        let mut start = 0;
        // Small at first, so a few huge results are caught before many are read.
        let mut window = 25;
        while start < ids.len() {
            let chunk = &ids[start..(start + window).min(ids.len())];
            let metas = self.store.get_tasks(ns, chunk).await?;
            let mut read = 0usize;
            for (id, meta) in chunk.iter().zip(metas) {
                let gone = || Ok(Err(format!("Dependency {id} has no result (forgotten or expired)").into()));
                let Some(stored) = meta else { return gone() };
                if stored.blob.as_ref().is_some_and(|blob| results.len() as u64 + blob.bytes > limit as u64) {
                    return Ok(Err(too_many_bytes(limit).into()));
                }
                let (json, result) = match &stored.blob {
                    None => {
                        let result = result_of(&stored.json);
                        (stored.json, result)
                    }
                    // A part in S3; its object is gone only if it was forgotten.
                    Some(blob) => match self.store.read_blob(blob).await? {
                        None => return gone(),
                        Some(result) => {
                            let meta = crate::meta::join_result(&stored.json, stored.status.as_str(), &result);
                            (meta.unwrap_or(stored.json), result)
                        }
                    },
                };
                read += json.len();
                if matches!(stored.status, State::Failure | State::Revoked) {
                    let cause = exception_in(&result);
                    return Ok(Err(Failure { message: chord_error_message(id, &json), cause }));
                }
                if results.len() > 1 {
                    results.push(',');
                }
                results.push_str(&result);
                // With the closing bracket still to come.
                if results.len() + 1 > limit {
                    return Ok(Err(too_many_bytes(limit).into()));
                }
            }
            start += chunk.len();
            // Size the next window to the results seen so far.
            let average = (read / chunk.len().max(1)).max(1);
            window = (READ_WINDOW_BYTES / average).clamp(25, 4000);
        }
        results.push(']');
        Ok(Ok(results))
    }

    /// The results as the messages carry them: the list itself, or, when a
    /// message carrying it would pass the target's limit
    /// (`CALLBACK_MAX_BYTES`), a reference to it, stored as a result of its
    /// own (`{"dynachord_ref": {"task_id", "bytes"}}`; the Celery package
    /// puts the list back before the task runs; see `docs/LARGE_RESULTS.md`).
    /// The inner `Err` is a ChordError message: too large, and no way to
    /// store them.
    async fn results_or_reference(
        &self,
        claim: &Claim<'_>,
        sig: &Signature,
        messages: &[Signature],
        results: String,
    ) -> Result<Result<String, String>, JoinError> {
        let event = || lambda_event(claim, sig, &results);
        // Past the limit on its own, the list needs no message built to tell.
        let too_large = results.len() > self.max_message_bytes
            || messages.iter().any(|task| {
                let args = args_with_results(task, &results);
                let out = Outgoing { sig: task, args: &args, event: &event, cx: claim.context() };
                self.sink.message_bytes(claim.ns, &out) > self.max_message_bytes
            });
        if !too_large {
            return Ok(Ok(results));
        }
        let id = results_id(claim.gid);
        let now = now_epoch();
        let json = format!(
            r#"{{"status":"SUCCESS","result":{results},"traceback":null,"children":[],"date_done":{},"task_id":{}}}"#,
            json!(now_celery()),
            json!(id.as_str())
        );
        let record = TaskRecord {
            task_id: id.clone(),
            status: State::Success,
            json,
            expires_at: (now + self.result_ttl.as_secs() as i64).max(claim.state.expires_at),
            group_id: None,
            group_index: None,
            chord: None,
            upload: None,
        };
        // Refused: an earlier attempt stored the same results.
        match self.store.put_task(claim.ns, &record).await {
            Ok(_) => {}
            Err(err @ (StoreError::TooLarge { .. } | StoreError::NoBucket)) => {
                return Ok(Err(format!(
                    "ChordError: the callback with its results is more than {} bytes (CALLBACK_MAX_BYTES), and \
                     the results cannot be stored to send a reference instead ({err}); set RESULTS_BUCKET",
                    self.max_message_bytes
                )))
            }
            Err(err) => return Err(err.into()),
        }
        tracing::info!(chord = %claim.gid, results = %id, bytes = results.len(), "results sent by reference");
        Ok(Ok(json!({"dynachord_ref": {"task_id": id.as_str(), "bytes": results.len()}}).to_string()))
    }

    /// Fails a claimed chord whose callback signature is readable.
    async fn fail_claimed(
        &self,
        claim: &Claim<'_>,
        message: String,
        on_transient: OnTransient,
    ) -> Result<(), JoinError> {
        let Ok(sig) = Signature::parse(&claim.state.callback) else {
            return self.finish(claim, ChordPhase::Failed, Some(&message)).await;
        };
        // Messages of the body that went out (this attempt's too) run: spare them.
        let sent = self.store.chord_state(claim.ns, claim.gid).await?.map_or(claim.state.body_sent, |s| s.body_sent);
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
    async fn fail(
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
    async fn fail_sparing(
        &self,
        claim: &Claim<'_>,
        sig: &Signature,
        failure: Failure,
        on_transient: OnTransient,
        spared: &[TaskId],
    ) -> Result<(), JoinError> {
        let Claim { ns, gid, token, .. } = *claim;
        let Failure { message, cause } = failure;
        let error = json!({"exc_type": "ChordError", "exc_message": [message], "exc_module": "celery.exceptions"});
        // A group body's members, and the group, get the failed part's own
        // exception when there is one, as Celery 5.7 gives them (the
        // ChordError's cause); everything else gets the ChordError.
        let members = sig.group_members();
        let mut caused: Vec<TaskId> = Vec::new();
        if cause.is_some() && !members.is_empty() {
            caused.push(sig.task_id.clone());
            caused.extend(members.iter().flat_map(Signature::ids_that_never_run));
        }
        let exception_of = |id: &TaskId| match &cause {
            Some(cause) if caused.contains(id) => cause,
            _ => &error,
        };
        let meta = json!({
            "status": "FAILURE", "result": error, "traceback": null, "children": [],
            "date_done": now_celery(), "group_id": gid.as_str(), "task_id": sig.task_id.as_str(),
        });
        // The callback's task, and whatever would have run after it (the
        // rest of its chain), fail with the ChordError, as on Celery's own
        // backends. A refusal means a task already has a SUCCESS: it stands.
        for task_id in sig.ids_that_never_run().into_iter().filter(|id| !spared.contains(id)) {
            let mut meta = meta.clone();
            meta["task_id"] = task_id.as_str().into();
            meta["result"] = exception_of(&task_id).clone();
            let record = TaskRecord {
                task_id,
                status: State::Failure,
                json: meta.to_string(),
                expires_at: now_epoch() + self.result_ttl.as_secs() as i64,
                group_id: None,
                group_index: None,
                chord: None,
                upload: None,
            };
            self.store.put_task(ns, &record).await?;
        }
        let already = claim.state.errbacks_sent;
        // From here on the chord is failing: a retry fails it again, never calls back.
        if claim.state.error.as_deref() != Some(message.as_str())
            && !self.store.record_failure(ns, gid, token, &message, already).await?
        {
            self.lost(gid, "recording the failure");
            return Ok(());
        }
        // A group member sent before the failure runs: it reports no failure.
        let calls: Vec<_> = sig.errback_calls().into_iter().filter(|c| !spared.contains(&c.failed.task_id)).collect();
        let already = already as usize;
        // Checked at store time: at most CHORD_MAX_ERRBACKS of the callback's
        // own, and of each group member's, which with the group's makes at
        // most twice that a member.
        let most = self.config.max_errbacks * if members.is_empty() { 1 } else { 2 * members.len() };
        for (i, call) in calls.iter().enumerate().take(most).skip(already) {
            let fallback = uuid::Uuid::new_v4().to_string();
            let Ok(errback) = Signature::from_value(call.errback.clone(), Some(&fallback)) else { continue };
            let failed = &call.failed;
            // As Celery sends an old-style errback: the failed task's id
            // first, unless the errback is immutable. The header lets the
            // worker's package call a new-style one instead.
            let mut args = if errback.immutable { Vec::new() } else { vec![Value::String(failed.task_id.to_string())] };
            args.extend(errback.args.iter().cloned());
            let args = Value::Array(args).to_string();
            let chord_error = json!({
                "id": failed.task_id.as_str(), "task": failed.task, "args": failed.args, "kwargs": failed.kwargs,
                "errbacks": failed.errbacks(), "immutable": errback.immutable, "exc": exception_of(&failed.task_id),
            });
            let event = || {
                json!({"chord_id": gid.as_str(), "namespace": ns.as_str(), "callback": sig.raw, "error": error})
                    .to_string()
            };
            if !self.still_ours(claim).await? {
                return Ok(());
            }
            let cx = MessageContext { chord_error: Some(&chord_error), ..claim.context() };
            match self.sink.send(ns, &Outgoing { sig: &errback, args: &args, event: &event, cx }).await {
                Ok(()) => {}
                Err(err) if err.is_permanent() || on_transient == OnTransient::Skip => {
                    tracing::error!(chord = %gid, errback = %errback.task, error = %err, "errback not sent")
                }
                Err(err) => return Err(err.into()),
            }
            // Recorded as the callback's progress is: retried, and kept in
            // this process when it keeps failing, so the errback that went
            // out is never sent again from here (invariant C3).
            let sent = i as u32 + 1;
            let recorded =
                self.persist(gid, "recording an errback", || self.store.record_failure(ns, gid, token, &message, sent));
            match recorded.await {
                Ok(true) => {}
                Ok(false) => {
                    self.lost(gid, "recording an errback");
                    return Ok(());
                }
                Err(err) => return Err(self.keep_unmarked(ns, gid, token, sent, err)),
            }
        }
        self.finish(claim, ChordPhase::Failed, Some(&message)).await?;
        metrics::count(metrics::CHORD_FAILED);
        tracing::info!(chord = %gid, callback = %sig.task_id, %message, "chord failed");
        Ok(())
    }

    /// Re-checks the claim, and renews its lease, just before a send.
    async fn still_ours(&self, claim: &Claim<'_>) -> Result<bool, JoinError> {
        if self.store.renew_claim(claim.ns, claim.gid, claim.token, self.config.lease).await? {
            return Ok(true);
        }
        metrics::count(metrics::CHORD_CLAIM_LOST);
        tracing::error!(chord = %claim.gid, "the claim was taken over before the send; nothing sent");
        Ok(false)
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
    /// callback went out, retrying with backoff. If every attempt fails, the
    /// claim's token is kept so the next invocation in this process finishes
    /// the mark without sending again.
    async fn mark_dispatched(&self, ns: &Namespace, gid: &GroupId, token: &str, total: u32) -> Result<(), JoinError> {
        let persisted = self.persist(gid, "marking the chord dispatched", || {
            self.store.finish_chord(ns, gid, token, ChordPhase::Dispatched, None)
        });
        match persisted.await {
            Ok(applied) => {
                self.forget_unmarked(&chord_key(ns, gid));
                if !applied {
                    self.lost(gid, "marking the chord dispatched");
                }
                Ok(())
            }
            Err(err) => Err(self.keep_unmarked(ns, gid, token, total, err)),
        }
    }

    /// Records that the first `sent` messages of the callback went out,
    /// retrying with backoff; `false` when the claim is no longer ours. If
    /// every attempt fails, the progress is kept in this process, as
    /// [`Joiner::mark_dispatched`] keeps its token.
    async fn record_sent(&self, ns: &Namespace, gid: &GroupId, token: &str, sent: u32) -> Result<bool, JoinError> {
        let persisted =
            self.persist(gid, "recording the callback's progress", || self.store.record_sent(ns, gid, token, sent));
        match persisted.await {
            Ok(true) => Ok(true),
            Ok(false) => {
                self.lost(gid, "recording the callback's progress");
                Ok(false)
            }
            Err(err) => Err(self.keep_unmarked(ns, gid, token, sent, err)),
        }
    }

    /// Runs a write that must follow a send, retrying errors with backoff.
    async fn persist<F, Fut>(&self, gid: &GroupId, doing: &str, write: F) -> Result<bool, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<bool, StoreError>>,
    {
        let mut pause = MARK_FIRST_PAUSE;
        let mut attempt = 1;
        loop {
            match write().await {
                Err(err) if attempt < MARK_ATTEMPTS => {
                    tracing::warn!(chord = %gid, attempt, error = %err, "{doing} failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                done => return done,
            }
        }
    }

    /// Keeps, in this process, how far a claimed chord's sends got when
    /// recording it failed; the next invocation goes on from there.
    fn keep_unmarked(&self, ns: &Namespace, gid: &GroupId, token: &str, sent: u32, err: StoreError) -> JoinError {
        metrics::count(metrics::CHORD_MARK_FAILED);
        self.unmarked.lock().unwrap_or_else(|e| e.into_inner()).insert(chord_key(ns, gid), (token.to_owned(), sent));
        JoinError::Unmarked(gid.to_string(), err)
    }

    fn unmarked_progress(&self, key: &str) -> Option<(String, u32)> {
        self.unmarked.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    fn forget_unmarked(&self, key: &str) {
        self.unmarked.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
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

/// The Lambda target's event: the chord, its namespace, the callback
/// signature and the results (or the reference to them).
fn lambda_event(claim: &Claim<'_>, sig: &Signature, results: &str) -> String {
    format!(
        r#"{{"chord_id":{},"namespace":{},"callback":{},"results":{results}}}"#,
        json!(claim.gid.as_str()),
        json!(claim.ns.as_str()),
        sig.raw
    )
}

/// The id under which a chord's results are stored when its callback
/// carries a reference to them: derived from the chord's id, so every
/// attempt of the join stores them under the same one.
pub fn results_id(gid: &GroupId) -> TaskId {
    let digest = crate::store::blobs::sha256_hex(gid.as_str().as_bytes());
    TaskId::parse(&format!("dynachord-chord-results-{}", &digest[..40])).expect("a valid id")
}

/// Why a chord fails: Celery's ChordError message and, when a part failed,
/// that part's exception (the ChordError's cause in Celery 5.7).
struct Failure {
    message: String,
    cause: Option<Value>,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self { message, cause: None }
    }
}

/// A failed part's result, when it is an exception as Celery stores one.
fn exception_in(result: &str) -> Option<Value> {
    serde_json::from_str::<Value>(result).ok().filter(|r| r["exc_type"].is_string())
}

fn too_many_bytes(limit: usize) -> String {
    format!(
        "ChordError: the parts' results add up to more than {limit} bytes, the most chord-join joins \
         (CHORD_MAX_RESULTS_BYTES)"
    )
}

/// A message's args: the chord's results (a JSON array, as text) first,
/// then the task's own, unless the task is immutable.
fn args_with_results(task: &Signature, results: &str) -> String {
    if task.immutable {
        Value::Array(task.args.clone()).to_string()
    } else if task.args.is_empty() {
        format!("[{results}]")
    } else {
        let rest = Value::Array(task.args.clone()).to_string();
        format!("[{results},{}", &rest[1..])
    }
}

/// The `result` of a stored meta, as raw JSON text (exact).
pub(crate) fn result_of(meta_json: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Meta<'a> {
        #[serde(borrow)]
        result: Option<&'a serde_json::value::RawValue>,
    }
    serde_json::from_str::<Meta>(meta_json)
        .ok()
        .and_then(|m| m.result.map(|r| r.get().to_owned()))
        .unwrap_or_else(|| "null".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_taken_raw() {
        assert_eq!(
            result_of(r#"{"status":"SUCCESS","result":{"n":1.50,"big":123456789012345678901234567890}}"#),
            r#"{"n":1.50,"big":123456789012345678901234567890}"#
        );
        assert_eq!(result_of(r#"{"status":"SUCCESS"}"#), "null");
    }

    use crate::dispatch::DispatchError;
    use crate::store::memory::MemoryStore;
    use crate::store::{PutOutcome, ResultStore};
    use std::collections::VecDeque;
    use std::sync::atomic::Ordering;

    /// A callback sink that records what it sends, and answers from a
    /// script (then `Ok`).
    #[derive(Default)]
    struct FakeSink {
        sent: Mutex<Vec<(String, String, String)>>,
        /// The chord-error header of each errback that went out.
        chord_errors: Mutex<Vec<Value>>,
        script: Mutex<VecDeque<Result<(), DispatchError>>>,
    }

    impl FakeSink {
        fn answering(answers: Vec<Result<(), DispatchError>>) -> Self {
            Self { script: Mutex::new(answers.into()), ..Self::default() }
        }

        /// (task, task id, args) of each message that went out.
        fn sent(&self) -> Vec<(String, String, String)> {
            self.sent.lock().unwrap().clone()
        }
    }

    impl CallbackSink for FakeSink {
        async fn send(&self, _ns: &Namespace, out: &Outgoing<'_>) -> Result<(), DispatchError> {
            let answer = self.script.lock().unwrap().pop_front().unwrap_or(Ok(()));
            if answer.is_ok() {
                self.sent.lock().unwrap().push((
                    out.sig.task.clone(),
                    out.sig.task_id.to_string(),
                    out.args.to_owned(),
                ));
                self.chord_errors.lock().unwrap().extend(out.cx.chord_error.cloned());
            }
            answer
        }
    }

    fn transient() -> DispatchError {
        DispatchError::Send { target: "SQS", code: "InternalError".into() }
    }

    const CALLBACK: &str = r#"{"task":"t.sum","args":[],"kwargs":{},"options":{"task_id":"cb",
        "link_error":[{"task":"t.e1","options":{"task_id":"e1"}},{"task":"t.e2","options":{"task_id":"e2"}}]}}"#;

    /// group(t.a.on_error(e.own), t.b | t.c) with the group's errback e.all
    /// also on t.a (as group.on_error leaves it) and on the group itself.
    const GROUP_WITH_ERRBACKS: &str = r#"{"task":"celery.group","options":{"task_id":"grp","link_error":[{"task":"e.all"}]},
        "kwargs":{"tasks":[
          {"task":"t.a","options":{"task_id":"ga","link_error":[{"task":"e.own"},{"task":"e.all"}]}},
          {"task":"celery.chain","options":{},"kwargs":{"tasks":[
            {"task":"t.b","options":{"task_id":"gb"}},{"task":"t.c","options":{"task_id":"gc"}}]}}]}}"#;

    fn joiner(sink: FakeSink) -> Joiner<MemoryStore, FakeSink> {
        Joiner::new(MemoryStore::default(), sink, &Config::for_table("t"))
    }

    fn gid() -> GroupId {
        GroupId::parse("g1").unwrap()
    }

    /// Stores part `i` of a chord of `size` with `status` and result `i`,
    /// and returns the stream's view of it.
    async fn part(j: &Joiner<MemoryStore, FakeSink>, i: u32, size: u32, status: &str) -> Part {
        part_with(j, i, size, status, CALLBACK).await
    }

    async fn part_with(j: &Joiner<MemoryStore, FakeSink>, i: u32, size: u32, status: &str, callback: &str) -> Part {
        let ns = Namespace::default();
        let task_id = TaskId::parse(&format!("p{i}")).unwrap();
        // A failed part's result is its exception, as Celery stores it.
        let result = if status == "FAILURE" {
            format!(r#"{{"exc_type":"ValueError","exc_message":["part {i}"],"exc_module":"builtins"}}"#)
        } else {
            i.to_string()
        };
        let json = format!(r#"{{"status":"{status}","result":{result},"task_id":"p{i}"}}"#);
        let status = State::parse(status).unwrap();
        let record = TaskRecord {
            task_id: task_id.clone(),
            status,
            json,
            expires_at: now_epoch() + 3600,
            group_id: Some(gid()),
            group_index: Some(i),
            chord: None,
            upload: None,
        };
        assert_eq!(j.store.put_task(&ns, &record).await.unwrap(), PutOutcome::Stored);
        Part {
            sequence: format!("seq-{i}"),
            ns,
            group_id: gid(),
            chord: ChordRegistration { size, callback: callback.into(), callback_id: "cb".into() },
            part: ChordPart { index: i, task_id, expires_at: now_epoch() + 3600 },
            stored_at: Some(crate::time::now_millis()),
        }
    }

    async fn chord_of(j: &Joiner<MemoryStore, FakeSink>, statuses: &[&str]) -> Vec<Part> {
        let mut parts = Vec::new();
        for (i, status) in statuses.iter().enumerate() {
            parts.push(part(j, i as u32, statuses.len() as u32, status).await);
        }
        parts
    }

    async fn phase(j: &Joiner<MemoryStore, FakeSink>) -> ChordState {
        j.store.chord_state(&Namespace::default(), &gid()).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_complete_chord_calls_back_once_with_results_in_order_and_a_replay_changes_nothing() {
        let j = joiner(FakeSink::default());
        let parts = chord_of(&j, &["SUCCESS", "SUCCESS", "SUCCESS"]).await;
        let mut shuffled = parts.clone();
        shuffled.reverse();
        assert!(j.handle_parts(shuffled).await.is_empty());
        assert_eq!(j.sink.sent(), [("t.sum".into(), "cb".into(), "[[0,1,2]]".into())]);
        assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
        // The same batch again, and again: nothing more is counted or sent.
        assert!(j.handle_parts(parts.clone()).await.is_empty());
        assert!(j.handle_parts(parts).await.is_empty());
        assert_eq!(j.sink.sent().len(), 1);
        assert_eq!(phase(&j).await.done, 3);
    }

    /// A group as the body, as Celery freezes it: three tasks, one immutable.
    const GROUP_BODY: &str = r#"{"task":"celery.group","kwargs":{"tasks":[
        {"task":"t.a","args":[],"options":{"task_id":"g0","group_index":0}},
        {"task":"t.b","args":[7],"options":{"task_id":"g1","group_index":1}},
        {"task":"t.c","args":[9],"immutable":true,"options":{"task_id":"g2","group_index":2}}]},
        "options":{"task_id":"cb"}}"#;

    async fn group_bodied(j: &Joiner<MemoryStore, FakeSink>) -> Vec<Part> {
        vec![part_with(j, 0, 2, "SUCCESS", GROUP_BODY).await, part_with(j, 1, 2, "SUCCESS", GROUP_BODY).await]
    }

    fn group_sent() -> Vec<(String, String, String)> {
        [("t.a", "g0", "[[0,1]]"), ("t.b", "g1", "[[0,1],7]"), ("t.c", "g2", "[9]")]
            .map(|(t, id, args)| (t.to_owned(), id.to_owned(), args.to_owned()))
            .to_vec()
    }

    #[tokio::test]
    async fn a_group_body_sends_each_task_once_with_the_results_even_when_a_send_fails_midway() {
        let j = joiner(FakeSink::answering(vec![Ok(()), Err(transient())]));
        let parts = group_bodied(&j).await;
        assert_eq!(j.handle_parts(parts.clone()).await.len(), 2, "retried after the second send failed");
        let state = phase(&j).await;
        assert_eq!((state.phase, state.body_sent, state.attempts), (ChordPhase::Open, 1, 1));
        assert!(j.handle_parts(parts.clone()).await.is_empty());
        assert!(j.handle_parts(parts).await.is_empty());
        assert_eq!(j.sink.sent(), group_sent(), "each task once, in order, the results first unless immutable");
        assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    }

    #[tokio::test]
    async fn a_group_body_whose_progress_cannot_be_recorded_goes_on_without_sending_twice() {
        let j = joiner(FakeSink::default());
        j.store.fail_records.store(MARK_ATTEMPTS, Ordering::SeqCst);
        let parts = group_bodied(&j).await;
        assert_eq!(j.handle_parts(parts.clone()).await.len(), 2);
        assert_eq!(j.sink.sent().len(), 1, "stopped after the send it could not record");
        assert_eq!(phase(&j).await.phase, ChordPhase::Joining, "the claim is kept after a send");
        assert!(j.handle_parts(parts.clone()).await.is_empty());
        assert!(j.handle_parts(parts).await.is_empty());
        assert_eq!(j.sink.sent(), group_sent());
        assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    }

    /// An errback went out, and every attempt to record it failed: the
    /// records come again, and the join goes on from the next errback in
    /// this process, never sending the first again (C3).
    #[tokio::test]
    async fn an_errback_whose_record_fails_is_never_sent_again() {
        let j = joiner(FakeSink::default());
        j.store.fail_errback_records.store(MARK_ATTEMPTS, Ordering::SeqCst);
        let parts = chord_of(&j, &["SUCCESS", "FAILURE"]).await;
        assert_eq!(j.handle_parts(parts.clone()).await.len(), 2, "the records come again");
        let sent =
            |j: &Joiner<MemoryStore, FakeSink>| -> Vec<String> { j.sink.sent().into_iter().map(|s| s.0).collect() };
        assert_eq!(sent(&j), ["t.e1"], "stopped after the errback it could not record");
        assert_eq!(phase(&j).await.phase, ChordPhase::Joining, "the claim is kept after a send");
        assert!(j.handle_parts(parts.clone()).await.is_empty());
        assert!(j.handle_parts(parts).await.is_empty());
        assert_eq!(sent(&j), ["t.e1", "t.e2"], "each errback once");
        assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
    }

    #[tokio::test]
    async fn a_group_body_that_fails_midway_fails_only_the_tasks_not_sent() {
        let mut j = joiner(FakeSink::answering(vec![Ok(()), Err(transient())]));
        j.config.max_attempts = 1;
        let parts = group_bodied(&j).await;
        assert!(j.handle_parts(parts).await.is_empty(), "failed for good on its last attempt");
        assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
        let (ns, store) = (Namespace::default(), &j.store);
        for (id, expected) in
            [("g0", None), ("g1", Some(State::Failure)), ("g2", Some(State::Failure)), ("cb", Some(State::Failure))]
        {
            let status = store.get_task(&ns, &TaskId::parse(id).unwrap()).await.unwrap().map(|s| s.status);
            // g0 was sent: it runs and stores its own result. The others never run: their waiters get the ChordError.
            assert_eq!(status, expected, "{id}");
        }
    }

    #[tokio::test]
    async fn a_lost_claim_sends_nothing() {
        let j = joiner(FakeSink::default());
        j.store.steal_claims.store(true, Ordering::SeqCst);
        let before = metrics::total(metrics::CHORD_CLAIM_LOST);
        let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
        assert!(j.handle_parts(parts).await.is_empty());
        assert!(j.sink.sent().is_empty(), "nothing sent once the claim is not ours");
        assert!(metrics::total(metrics::CHORD_CLAIM_LOST) > before);
    }

    #[tokio::test]
    async fn a_transient_send_error_gives_the_claim_back_and_the_callback_goes_once_later() {
        let j = joiner(FakeSink::answering(vec![Err(transient())]));
        let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
        let retry = j.handle_parts(parts.clone()).await;
        assert_eq!(retry, ["seq-0", "seq-1"], "the records are retried");
        let state = phase(&j).await;
        assert_eq!((state.phase, state.attempts), (ChordPhase::Open, 1), "claim given back, attempt counted");
        assert!(j.handle_parts(parts.clone()).await.is_empty());
        assert!(j.handle_parts(parts).await.is_empty());
        assert_eq!(j.sink.sent().len(), 1, "sent once: {:?}", j.sink.sent());
        assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    }

    #[tokio::test]
    async fn a_failed_mark_after_a_send_never_leads_to_a_second_send() {
        let j = joiner(FakeSink::default());
        // Every attempt of the first mark fails, as if DynamoDB were down.
        j.store.fail_finishes.store(MARK_ATTEMPTS, Ordering::SeqCst);
        let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
        let retry = j.handle_parts(parts.clone()).await;
        assert_eq!(retry.len(), 2, "the records come again to finish the mark");
        assert_eq!(j.sink.sent().len(), 1);
        let state = phase(&j).await;
        assert_eq!(state.phase, ChordPhase::Joining, "the claim is kept, never given back after a send");
        assert_eq!(state.attempts, 0);
        assert!(j.handle_parts(parts.clone()).await.is_empty());
        assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched, "finished from the chord's state");
        assert!(j.handle_parts(parts).await.is_empty());
        assert_eq!(j.sink.sent().len(), 1, "never a second send");
    }

    #[tokio::test]
    async fn a_mark_that_fails_a_few_times_is_retried_on_its_own() {
        let j = joiner(FakeSink::default());
        j.store.fail_finishes.store(2, Ordering::SeqCst);
        let parts = chord_of(&j, &["SUCCESS"]).await;
        assert!(j.handle_parts(parts).await.is_empty(), "no record retried");
        assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
        assert_eq!(j.sink.sent().len(), 1);
    }

    #[tokio::test]
    async fn a_permanent_error_fails_the_chord_once_and_sends_its_errbacks() {
        let refused = DispatchError::Refused { target: "SQS", code: "AccessDenied".into() };
        let j = joiner(FakeSink::answering(vec![Err(refused)]));
        let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
        assert!(j.handle_parts(parts.clone()).await.is_empty());
        let state = phase(&j).await;
        assert_eq!(state.phase, ChordPhase::Failed);
        assert!(state.error.as_deref().unwrap().contains("AccessDenied"), "{state:?}");
        let sent: Vec<String> = j.sink.sent().into_iter().map(|(task, _, _)| task).collect();
        assert_eq!(sent, ["t.e1", "t.e2"], "errbacks only, once each");
        let cb = j.store.get_task(&Namespace::default(), &TaskId::parse("cb").unwrap()).await.unwrap().unwrap();
        assert!(cb.json.contains("ChordError") && cb.json.contains("AccessDenied"), "{}", cb.json);
        assert!(j.handle_parts(parts).await.is_empty());
        assert_eq!(j.sink.sent().len(), 2, "a replay sends nothing more");
    }

    #[tokio::test]
    async fn a_failed_part_fails_the_chord_with_celerys_chord_error() {
        let j = joiner(FakeSink::default());
        let parts = chord_of(&j, &["SUCCESS", "FAILURE", "SUCCESS"]).await;
        assert!(j.handle_parts(parts).await.is_empty());
        let state = phase(&j).await;
        assert_eq!(state.phase, ChordPhase::Failed);
        assert!(state.error.as_deref().unwrap().starts_with("Dependency p1 raised"), "{state:?}");
        assert!(j.sink.sent().iter().all(|(task, _, _)| task != "t.sum"), "the callback is never sent");
    }

    #[tokio::test]
    async fn errbacks_go_out_as_celery_sends_them_with_the_failed_callback_in_a_header() {
        let callback = r#"{"task":"t.sum","args":[7],"kwargs":{"k":1},"options":{"task_id":"cb","link_error":[
            {"task":"t.old","args":["note"],"options":{"task_id":"e1"}},
            {"task":"t.fixed","args":["a","b"],"immutable":true,"options":{"task_id":"e2"}}]}}"#;
        let j = joiner(FakeSink::default());
        let parts =
            vec![part_with(&j, 0, 2, "SUCCESS", callback).await, part_with(&j, 1, 2, "FAILURE", callback).await];
        assert!(j.handle_parts(parts).await.is_empty());
        let sent: Vec<(String, String)> = j.sink.sent().into_iter().map(|(task, _, args)| (task, args)).collect();
        let expected = [("t.old", r#"["cb","note"]"#), ("t.fixed", r#"["a","b"]"#)];
        assert_eq!(
            sent,
            expected.map(|(t, a)| (t.to_owned(), a.to_owned())),
            "the failed task's id first, unless immutable"
        );
        let headers = j.sink.chord_errors.lock().unwrap().clone();
        assert_eq!(headers.len(), 2, "one header a message");
        for (header, immutable) in headers.iter().zip([false, true]) {
            assert_eq!(header["immutable"], immutable);
            assert_eq!((&header["id"], &header["task"], &header["args"]), (&json!("cb"), &json!("t.sum"), &json!([7])));
            assert_eq!(header["kwargs"], json!({"k": 1}));
            assert_eq!(header["errbacks"].as_array().map(Vec::len), Some(2));
            assert_eq!(
                (&header["exc"]["exc_type"], &header["exc"]["exc_module"]),
                (&json!("ChordError"), &json!("celery.exceptions"))
            );
            assert!(header["exc"]["exc_message"][0].as_str().unwrap().starts_with("Dependency p1 raised"), "{header}");
        }
    }

    #[tokio::test]
    async fn a_failed_group_body_gives_each_member_the_parts_exception_and_calls_its_errbacks_as_celery() {
        let j = joiner(FakeSink::default());
        let parts = vec![
            part_with(&j, 0, 2, "FAILURE", GROUP_WITH_ERRBACKS).await,
            part_with(&j, 1, 2, "SUCCESS", GROUP_WITH_ERRBACKS).await,
        ];
        assert!(j.handle_parts(parts).await.is_empty());
        let ns = Namespace::default();
        for id in ["grp", "ga", "gb", "gc"] {
            let stored = j.store.get_task(&ns, &TaskId::parse(id).unwrap()).await.unwrap().unwrap();
            let meta: Value = serde_json::from_str(&stored.json).unwrap();
            assert_eq!(meta["result"]["exc_type"], "ValueError", "{id}: the failed part's own exception");
            assert_eq!(meta["result"]["exc_message"], json!(["part 0"]), "{id}");
        }
        let sent: Vec<(String, String)> = j.sink.sent().into_iter().map(|(task, _, args)| (task, args)).collect();
        let expected = [("e.own", r#"["ga"]"#), ("e.all", r#"["ga"]"#), ("e.all", r#"["gc"]"#)];
        assert_eq!(
            sent,
            expected.map(|(t, a)| (t.to_owned(), a.to_owned())),
            "each member's own, then the group's, once each"
        );
        let headers = j.sink.chord_errors.lock().unwrap().clone();
        assert_eq!(headers.iter().map(|h| h["id"].as_str().unwrap()).collect::<Vec<_>>(), ["ga", "ga", "gc"]);
        assert!(headers.iter().all(|h| h["exc"]["exc_type"] == "ValueError"), "{headers:?}");
    }

    #[tokio::test]
    async fn a_group_body_refused_midway_calls_errbacks_only_for_the_members_not_sent() {
        let refused = DispatchError::Refused { target: "SQS", code: "AccessDenied".into() };
        let j = joiner(FakeSink::answering(vec![Ok(()), Err(refused)]));
        let parts = vec![
            part_with(&j, 0, 2, "SUCCESS", GROUP_WITH_ERRBACKS).await,
            part_with(&j, 1, 2, "SUCCESS", GROUP_WITH_ERRBACKS).await,
        ];
        assert!(j.handle_parts(parts).await.is_empty());
        let sent: Vec<(String, String)> = j.sink.sent().into_iter().map(|(task, _, args)| (task, args)).collect();
        let expected = [("t.a", "[[0,1]]"), ("e.all", r#"["gc"]"#)];
        assert_eq!(
            sent,
            expected.map(|(t, a)| (t.to_owned(), a.to_owned())),
            "t.a was sent and runs: no errback for it"
        );
        let headers = j.sink.chord_errors.lock().unwrap().clone();
        assert_eq!(headers[0]["exc"]["exc_type"], "ChordError", "no part failed: the ChordError itself");
    }

    #[tokio::test]
    async fn errbacks_are_sent_at_most_once_across_retries() {
        // The callback is refused for good; the second errback fails once
        // with an error a retry may fix.
        let refused = DispatchError::Refused { target: "SQS", code: "AccessDenied".into() };
        let j = joiner(FakeSink::answering(vec![Err(refused), Ok(()), Err(transient())]));
        let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
        assert_eq!(j.handle_parts(parts.clone()).await.len(), 2, "retried after the errback's failure");
        assert_eq!(phase(&j).await.errbacks_sent, 1, "progress is on the chord's item");
        assert!(j.handle_parts(parts).await.is_empty());
        let sent: Vec<String> = j.sink.sent().into_iter().map(|(task, _, _)| task).collect();
        assert_eq!(sent, ["t.e1", "t.e2"], "each errback once");
        assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
    }

    #[tokio::test]
    async fn a_chord_that_keeps_failing_is_failed_after_its_attempts_and_stops_coming_back() {
        let attempts = Config::for_table("t").chord.max_attempts as usize;
        let j = joiner(FakeSink::answering((0..100).map(|_| Err(transient())).collect()));
        let parts = chord_of(&j, &["SUCCESS"]).await;
        let mut retried = 0;
        while !j.handle_parts(parts.clone()).await.is_empty() {
            retried += 1;
            assert!(retried < 100, "a poison chord must not be retried for ever");
        }
        assert_eq!(retried, attempts - 1);
        let state = phase(&j).await;
        assert_eq!(state.phase, ChordPhase::Failed);
        assert!(state.error.as_deref().unwrap().contains(&format!("after {attempts} attempts")), "{state:?}");
    }

    #[tokio::test]
    async fn a_chord_whose_part_records_expired_fails_instead_of_calling_back_short() {
        let j = joiner(FakeSink::default());
        let parts = chord_of(&j, &["SUCCESS", "SUCCESS", "SUCCESS"]).await;
        assert!(j.handle_parts(parts[..2].to_vec()).await.is_empty());
        j.store.drop_parts(&Namespace::default(), &gid());
        assert!(j.handle_parts(parts[2..].to_vec()).await.is_empty());
        let state = phase(&j).await;
        assert_eq!(state.phase, ChordPhase::Failed);
        assert!(state.error.as_deref().unwrap().contains("1 of the chord's 3 parts"), "{state:?}");
        assert!(j.sink.sent().iter().all(|(task, _, _)| task != "t.sum"));
    }

    #[tokio::test]
    async fn results_past_the_targets_limit_go_by_reference_and_past_the_joins_limit_fail_the_chord() {
        let (mut by_reference, mut too_many) = (joiner(FakeSink::default()), joiner(FakeSink::default()));
        by_reference.max_message_bytes = 1024;
        too_many.config.max_results_bytes = 1024;
        let ns = Namespace::default();
        for j in [&by_reference, &too_many] {
            let mut parts = Vec::new();
            for i in 0..50u32 {
                let mut p = part(j, i, 50, "SUCCESS").await;
                let big = format!(r#"{{"status":"SUCCESS","result":"{i}{}","task_id":"p{i}"}}"#, "x".repeat(100));
                let record = TaskRecord {
                    task_id: p.part.task_id.clone(),
                    status: State::Success,
                    json: big,
                    expires_at: now_epoch() + 3600,
                    group_id: None,
                    group_index: None,
                    chord: None,
                    upload: None,
                };
                j.store.delete_task(&ns, &p.part.task_id).await.unwrap();
                j.store.put_task(&ns, &record).await.unwrap();
                p.sequence = format!("s{i}");
                parts.push(p);
            }
            assert!(j.handle_parts(parts.clone()).await.is_empty());
            // A second delivery changes nothing.
            assert!(j.handle_parts(parts).await.is_empty());
        }
        assert_eq!(phase(&by_reference).await.phase, ChordPhase::Dispatched);
        let sent = by_reference.sink.sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let args: Value = serde_json::from_str(&sent[0].2).unwrap();
        let id = results_id(&gid());
        assert_eq!(
            args[0],
            json!({"dynachord_ref": {"task_id": id.as_str(), "bytes": args[0]["dynachord_ref"]["bytes"]}})
        );
        let stored = by_reference.store.get_task(&ns, &id).await.unwrap().unwrap();
        let results: Value = serde_json::from_str(&stored.json).unwrap();
        let results = results["result"].as_array().unwrap().clone();
        assert_eq!(results.len(), 50);
        assert_eq!(results[7], json!(format!("7{}", "x".repeat(100))), "in order");
        assert_eq!(args[0]["dynachord_ref"]["bytes"], Value::Array(results).to_string().len());

        let state = phase(&too_many).await;
        assert_eq!(state.phase, ChordPhase::Failed);
        assert!(state.error.as_deref().unwrap().contains("more than 1024 bytes"), "{state:?}");
        assert!(too_many.sink.sent().iter().all(|(task, _, _)| task != "t.sum"));
    }

    #[tokio::test]
    async fn the_results_and_message_limits_hold_at_the_limit_and_not_one_past_it() {
        // Two parts whose results are their index: `[0,1]` (5 bytes), and the
        // fake sink counts a message by its args, `[[0,1]]` (7 bytes).
        let outcome = |results_limit: usize, message_limit: usize| async move {
            let mut j = joiner(FakeSink::default());
            j.config.max_results_bytes = results_limit;
            j.max_message_bytes = message_limit;
            let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
            assert!(j.handle_parts(parts).await.is_empty());
            (phase(&j).await.phase, j.sink.sent().first().map(|(_, _, args)| args.clone()))
        };
        let (results, message) = ("[0,1]".len(), "[[0,1]]".len());
        assert_eq!(outcome(results, message).await, (ChordPhase::Dispatched, Some("[[0,1]]".into())));
        assert_eq!(outcome(results - 1, message).await.0, ChordPhase::Failed, "one byte past CHORD_MAX_RESULTS_BYTES");
        let (phase, args) = outcome(results, message - 1).await;
        assert_eq!(phase, ChordPhase::Dispatched);
        assert!(args.unwrap().contains("dynachord_ref"), "one byte past CALLBACK_MAX_BYTES: by reference");
    }

    #[tokio::test]
    async fn each_counted_part_extends_the_chords_life() {
        let j = joiner(FakeSink::default());
        let mut parts = chord_of(&j, &["SUCCESS", "SUCCESS", "SUCCESS"]).await;
        parts[1].part.expires_at += 1000;
        assert!(j.handle_parts(parts[..1].to_vec()).await.is_empty());
        let first = phase(&j).await.expires_at;
        assert!(j.handle_parts(parts[1..2].to_vec()).await.is_empty());
        let extended = phase(&j).await.expires_at;
        assert!(extended >= parts[1].part.expires_at && extended > first, "{first} → {extended}");
    }
}
