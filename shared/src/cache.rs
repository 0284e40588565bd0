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

use aws_lambda_events::event::dynamodb::EventRecord;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::celery::{MessageContext, Signature};
use crate::config::Config;
use crate::dispatch::{CallbackSink, DispatchError, Outgoing};
use crate::error::{ApiError, StoreError};
use crate::ids::{Namespace, TaskId};
use crate::meta::State;
use crate::metrics::{self, Point};
use crate::service::{parse_body, App, Reply};
use crate::store::cache::{
    entry_hash, processing_task_id, CacheEntry, CachePhase, Delegation, EntryClaim, Miss, Settle, Written,
};
use crate::store::{DynamoStore, ResultStore};
use crate::time::now_epoch;

/// The longest operation name, and the longest uri (bytes).
pub const MAX_OP_LEN: usize = 128;
pub const MAX_URI_BYTES: usize = 2048;
/// The longest task name an operation may give.
const MAX_TASK_NAME: usize = 256;
/// Keys resolved at once in a bulk request.
const CONCURRENT_KEYS: usize = 16;
/// Rounds of read-decide-write one key may take when others race it.
const ROUNDS: usize = 4;

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

/// One key of a request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    op: String,
    uri: String,
    #[serde(default)]
    cb_args: Option<Box<RawValue>>,
}

/// `POST /v1/cache/get-or-delegate`: one key (`op`, `uri`, `cb_args`,
/// `operation`) or many (`requests`, `operations`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetOrDelegateRequest {
    #[serde(default)]
    requests: Option<Vec<KeyRequest>>,
    #[serde(default)]
    operations: Option<HashMap<String, OperationSpec>>,
    #[serde(default)]
    op: Option<String>,
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    cb_args: Option<Box<RawValue>>,
    #[serde(default)]
    operation: Option<OperationSpec>,
    /// Chosen by the client for the request and kept when it sends it
    /// again: a repeat appends no `cb_args` a second time.
    #[serde(default)]
    request_id: Option<String>,
}

/// The most characters of a `request_id`.
const MAX_REQUEST_ID_LEN: usize = 64;

fn check_request_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        return Ok(());
    }
    Err(ApiError::BadBody(format!(
        "request_id {id:?} must be 1 to {MAX_REQUEST_ID_LEN} characters of letters, digits, - and _"
    )))
}

/// `POST /v1/cache/entry` and `POST /v1/cache/invalidate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyOnly {
    op: String,
    uri: String,
}

fn check_key(op: &str, uri: &str) -> Result<(), ApiError> {
    let op_ok = !op.is_empty()
        && op.len() <= MAX_OP_LEN
        && op.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c));
    if !op_ok {
        return Err(ApiError::BadBody(format!(
            "op {op:?} must be 1 to {MAX_OP_LEN} characters of letters, digits and -_.:@"
        )));
    }
    if uri.is_empty() || uri.len() > MAX_URI_BYTES {
        return Err(ApiError::BadBody(format!("uri must be 1 to {MAX_URI_BYTES} bytes; it is {}", uri.len())));
    }
    Ok(())
}

/// One distinct key of a request, with the `cb_args` of every request for it.
struct Key {
    hash: String,
    op: String,
    uri: String,
    waiters: Vec<String>,
    spec: OperationSpec,
}

/// How one key was answered.
enum Answer {
    Hit(CacheEntry),
    /// Processing: delegated by this request, or joined.
    Processing {
        entry: CacheEntry,
        delegated: bool,
    },
    Quarantined(CacheEntry),
    /// The processing just failed and is being quarantined: ask again.
    Settling(CacheEntry),
    Failed(ApiError),
}

/// `POST /v1/cache/get-or-delegate`.
pub async fn get_or_delegate<T: CallbackSink>(
    app: &App<DynamoStore>,
    sink: &T,
    ns: &Namespace,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let mut request: GetOrDelegateRequest = parse_body(body, "a get-or-delegate request")?;
    let request_id = request.request_id.take();
    if let Some(id) = &request_id {
        check_request_id(id)?;
    }
    let (requests, operations, single) = match request {
        GetOrDelegateRequest {
            requests: Some(requests),
            operations,
            op: None,
            uri: None,
            cb_args: None,
            operation: None,
            request_id: None,
        } => (requests, operations.unwrap_or_default(), false),
        GetOrDelegateRequest {
            requests: None,
            operations: None,
            op: Some(op),
            uri: Some(uri),
            cb_args,
            operation,
            request_id: None,
        } => {
            let operations = operation.map(|spec| HashMap::from([(op.clone(), spec)])).unwrap_or_default();
            (vec![KeyRequest { op, uri, cb_args }], operations, true)
        }
        _ => {
            return Err(ApiError::BadBody(
                "give either op, uri, cb_args and operation, or requests and operations".into(),
            ))
        }
    };
    let config = &app.config;
    if requests.is_empty() {
        return Err(ApiError::BadBody("requests is empty: give at least one key".into()));
    }
    if requests.len() > config.cache.max_keys {
        return Err(ApiError::BatchTooLarge { count: requests.len(), limit: config.cache.max_keys });
    }
    for (op, spec) in &operations {
        check_key(op, "-")?;
        spec.check(op, config, ns)?;
    }
    // Every key checked before anything is read: bad input changes nothing.
    let mut keys: Vec<Key> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut slots = Vec::with_capacity(requests.len());
    for request in requests {
        check_key(&request.op, &request.uri)?;
        let spec = operations.get(&request.op).ok_or_else(|| {
            ApiError::UnknownOperation(format!(
                "operation {:?} is not described in the request (operation, or operations)",
                request.op
            ))
        })?;
        let waiter = request.cb_args.map_or_else(|| "null".to_owned(), |raw| raw.get().to_owned());
        if waiter.len() > config.cache.max_cb_args_bytes {
            return Err(ApiError::BadBody(format!(
                "cb_args is {} bytes; the limit is {} (CACHE_MAX_CB_ARGS_BYTES)",
                waiter.len(),
                config.cache.max_cb_args_bytes
            )));
        }
        let hash = entry_hash(&request.op, &request.uri);
        let at = *index.entry(hash.clone()).or_insert_with(|| {
            keys.push(Key { hash, op: request.op, uri: request.uri, waiters: Vec::new(), spec: spec.clone() });
            keys.len() - 1
        });
        keys[at].waiters.push(waiter);
        slots.push(at);
    }
    // The waiters one request adds to a key are bounded as the entry's are,
    // before anything is written (a new entry's first write takes them all
    // at once).
    for key in &keys {
        let bytes: usize = key.waiters.iter().map(String::len).sum();
        if key.waiters.len() as u64 > config.cache.max_waiters || bytes as u64 > config.cache.max_waiters_bytes {
            return Err(ApiError::TooManyWaiters(format!(
                "the request waits on {} {:?} {} times with {bytes} bytes of cb_args; the limits are {} and {} \
                 (CACHE_MAX_WAITERS, CACHE_MAX_WAITERS_BYTES)",
                key.op,
                key.uri,
                key.waiters.len(),
                config.cache.max_waiters,
                config.cache.max_waiters_bytes
            )));
        }
    }
    let hashes: Vec<String> = keys.iter().map(|k| k.hash.clone()).collect();
    let entries = app.store.cache_entries(ns, &hashes).await?;
    // The futures are built first: a stream that maps with a closure over
    // borrowed keys is not Send in the function's handler.
    let rid = request_id.as_deref();
    let pending: Vec<_> =
        keys.iter().zip(entries).map(|(key, entry)| resolve(app, sink, ns, key, rid, entry)).collect();
    let answers: Vec<Answer> = futures::stream::iter(pending).buffered(CONCURRENT_KEYS).collect().await;
    let counts = |f: fn(&Answer) -> bool| answers.iter().filter(|a| f(a)).count() as f64;
    let points = [
        Point::count(metrics::CACHE_HITS, counts(|a| matches!(a, Answer::Hit(_)))),
        Point::count(metrics::CACHE_DELEGATED, counts(|a| matches!(a, Answer::Processing { delegated: true, .. }))),
        Point::count(metrics::CACHE_COALESCED, counts(|a| matches!(a, Answer::Processing { delegated: false, .. }))),
    ];
    if single {
        let answer = answers.into_iter().next().expect("one key");
        if let Answer::Failed(err) = answer {
            return Err(err);
        }
        let mut budget = config.batch_response_bytes;
        let mut reply = Reply::ok(answer_json(&keys[0], &answer, &mut budget));
        reply.metrics.extend(points);
        return Ok(reply);
    }
    // Results past the response's budget are left out; the client asks for them again.
    let mut budget = config.batch_response_bytes.saturating_sub(64 * slots.len());
    let mut body = String::from("{\"results\":[");
    for (i, at) in slots.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&answer_json(&keys[*at], &answers[*at], &mut budget));
    }
    body.push_str("]}");
    let mut reply = Reply::ok(body);
    reply.metrics.extend(points);
    reply.metrics.push(Point::count(metrics::BATCH_SIZE, slots.len() as f64));
    Ok(reply)
}

/// One key's answer as JSON text (a result is copied as stored).
fn answer_json(key: &Key, answer: &Answer, budget: &mut usize) -> String {
    let head = json!({"op": key.op, "uri": key.uri});
    let mut fields = match answer {
        Answer::Hit(entry) => {
            let mut v = json!({"state": "cached", "task_id": entry.task_id, "expires_at": entry.expires_at});
            if let Some(task) = &entry.result_task {
                v["result_task"] = task.as_str().into();
            } else if entry.result.as_ref().is_some_and(|r| r.len() > *budget) {
                v["result_omitted"] = true.into();
            }
            v
        }
        Answer::Processing { entry, delegated } => json!({
            "state": "processing", "task_id": entry.task_id, "callback_id": callback_id(&entry.task_id),
            "delegated": delegated, "waiters": entry.waiter_count, "lease_until": entry.lease_until,
        }),
        Answer::Quarantined(entry) => json!({
            "state": "quarantined", "task_id": entry.task_id, "until": entry.until,
            "error": entry.error.as_deref().and_then(|e| serde_json::from_str::<Value>(e).ok()),
        }),
        Answer::Settling(entry) => json!({"state": "settling", "task_id": entry.task_id}),
        Answer::Failed(err) => {
            let (status, code) = err.status_and_code();
            if status >= 500 {
                tracing::warn!(op = %key.op, uri = %key.uri, error = %err, "a key of a bulk get-or-delegate failed");
            }
            json!({"state": "error", "error": {"code": code, "message": err.public_message(None), "status": status}})
        }
    };
    if let (Value::Object(map), Value::Object(head)) = (&mut fields, head) {
        let mut merged = head;
        merged.append(map);
        fields = Value::Object(merged);
    }
    let mut text = fields.to_string();
    // The result goes in as stored, not re-encoded.
    if let Answer::Hit(entry) = answer {
        if let (Some(result), None, false) = (&entry.result, &entry.result_task, fields.get("result_omitted").is_some())
        {
            *budget = budget.saturating_sub(result.len());
            text.truncate(text.len() - 1);
            text.push_str(",\"result\":");
            text.push_str(result);
            text.push('}');
        }
    }
    text
}

/// The callback's task id of a processing.
pub fn callback_id(task_id: &str) -> String {
    format!("{task_id}-callback")
}

/// Reads, decides and writes one key until it is answered: a hit, a
/// quarantine, a join of the running processing, or a delegation.
async fn resolve<T: CallbackSink>(
    app: &App<DynamoStore>,
    sink: &T,
    ns: &Namespace,
    key: &Key,
    request_id: Option<&str>,
    mut entry: Option<CacheEntry>,
) -> Answer {
    let config = &app.config;
    let miss = Miss {
        hash: &key.hash,
        op: &key.op,
        uri: &key.uri,
        waiters: &key.waiters,
        request_id,
        max_waiters: config.cache.max_waiters,
        max_waiters_bytes: config.cache.max_waiters_bytes,
    };
    let too_many = |e: &CacheEntry| {
        ApiError::TooManyWaiters(format!(
            "processing {} already has {} waiters ({} bytes of cb_args); the limits are {} and {} \
             (CACHE_MAX_WAITERS, CACHE_MAX_WAITERS_BYTES)",
            e.task_id, e.waiter_count, e.waiters_bytes, config.cache.max_waiters, config.cache.max_waiters_bytes
        ))
    };
    for _ in 0..ROUNDS {
        let now = now_epoch();
        let written = match &entry {
            Some(e) if e.has_result() => return Answer::Hit(e.clone()),
            // This request, sent again: its cb_args are there already.
            Some(e) if !e.is_open(now) && e.waited_on_by(request_id) => {
                return Answer::Processing { entry: e.clone(), delegated: false };
            }
            Some(e) if e.phase == CachePhase::Settling => return Answer::Settling(e.clone()),
            Some(e) if e.phase == CachePhase::Quarantined && !e.is_open(now) => return Answer::Quarantined(e.clone()),
            Some(e) if e.phase == CachePhase::Processing && !e.is_open(now) => {
                match app.store.cache_join(ns, &miss, &e.task_id, now).await {
                    Ok(Written::Refused(Some(old)))
                        if old.task_id == e.task_id && !old.is_open(now_epoch()) && !old.waited_on_by(request_id) =>
                    {
                        if old.phase == CachePhase::Processing {
                            return Answer::Failed(too_many(&old));
                        }
                        Ok(Written::Refused(Some(old)))
                    }
                    other => other,
                }
            }
            open => {
                let replaces = open.as_ref().filter(|e| e.phase == CachePhase::Processing).map(|e| e.task_id.clone());
                // Taking over a processing this request already waits on
                // (sent again after the lease ran out): nothing to append.
                let again = Miss { waiters: &[], request_id: None, ..miss.clone() };
                let miss = if open.as_ref().is_some_and(|e| e.waited_on_by(request_id)) { &again } else { &miss };
                let task_id = processing_task_id(&key.hash);
                let spec = serde_json::to_string(&key.spec).expect("a spec serializes");
                let lease_until = now + key.spec.lease(config);
                let delegation = Delegation {
                    task_id: task_id.as_str(),
                    spec: &spec,
                    lease_until,
                    expires_at: lease_until + 86_400,
                    replaces: replaces.as_deref(),
                };
                match app.store.cache_delegate(ns, miss, &delegation, now).await {
                    Ok(Written::Applied(new)) => return delegate(app, sink, ns, key, &task_id, new).await,
                    Ok(Written::Refused(Some(old)))
                        if replaces.is_some()
                            && old.phase == CachePhase::Processing
                            && Some(&old.task_id) == replaces.as_ref() =>
                    {
                        return Answer::Failed(too_many(&old));
                    }
                    other => other,
                }
            }
        };
        match written {
            Ok(Written::Applied(new)) => return Answer::Processing { entry: new, delegated: false },
            Ok(Written::Refused(current)) => entry = current,
            Err(err) => return Answer::Failed(err.into()),
        }
    }
    Answer::Failed(ApiError::Throttled { retry_after_secs: 1 })
}

/// Sends the processing's task message; if it cannot be sent, the lease is
/// ended at once, so the next request delegates again (the waiters stay).
async fn delegate<T: CallbackSink>(
    app: &App<DynamoStore>,
    sink: &T,
    ns: &Namespace,
    key: &Key,
    task_id: &TaskId,
    entry: CacheEntry,
) -> Answer {
    let options = json!({"task_id": task_id.as_str(), "queue": key.spec.queue});
    let raw = json!({"task": key.spec.task, "args": [key.uri], "kwargs": {}, "options": options});
    let sig = match Signature::from_value(raw, None) {
        Ok(sig) => sig,
        Err(e) => return Answer::Failed(ApiError::BadBody(format!("operation {:?}: {e}", key.op))),
    };
    let args = json!([key.uri]).to_string();
    let event = || {
        json!({"cache": {"action": "process", "op": key.op, "uri": key.uri, "task_id": task_id.as_str()},
               "namespace": ns.as_str()})
        .to_string()
    };
    let out = Outgoing { sig: &sig, args: &args, event: &event, cx: no_group() };
    match sink.send(ns, &out).await {
        Ok(()) => {
            tracing::info!(op = %key.op, task = %task_id, waiters = entry.waiter_count, "processing delegated");
            Answer::Processing { entry, delegated: true }
        }
        Err(err) => {
            tracing::error!(op = %key.op, task = %task_id, error = %err, "delegating the processing failed");
            if let Err(e) = app.store.cache_lease(ns, &key.hash, task_id.as_str(), 0).await {
                tracing::warn!(error = %e, "ending the lease failed; the entry waits for it to run out");
            }
            let err = match err {
                DispatchError::NotAllowed(q) => ApiError::CallbackNotAllowed(format!("queue {q:?}")),
                other if other.is_permanent() => ApiError::DelegationRefused(other.to_string()),
                other => ApiError::DelegationFailed(other.to_string()),
            };
            Answer::Failed(err)
        }
    }
}

/// Messages of the cache belong to no group.
fn no_group() -> MessageContext<'static> {
    MessageContext { group_id: "", parent_id: None, root_id: None, chord_error: None }
}

/// `POST /v1/cache/entry`: an entry's state: `cached`, `processing` (with
/// its waiters), `settling`, `quarantined`, or `missing`.
pub async fn entry_state(app: &App<DynamoStore>, ns: &Namespace, body: &[u8]) -> Result<Reply, ApiError> {
    let KeyOnly { op, uri } = parse_body(body, "a cache key ({op, uri})")?;
    check_key(&op, &uri)?;
    let entry = app.store.cache_entry(ns, &entry_hash(&op, &uri)).await?;
    let now = now_epoch();
    let answer = match entry {
        None => json!({"state": "missing"}),
        Some(e) if e.is_open(now) => json!({"state": "missing", "task_id": e.task_id, "waiters": e.waiter_count}),
        Some(e) => {
            let phase = if e.has_result() { "cached" } else { e.phase.as_str() };
            let mut v = json!({"state": phase, "task_id": e.task_id, "expires_at": e.expires_at});
            match e.phase {
                CachePhase::Processing => {
                    v["waiters"] = e.waiter_count.into();
                    v["lease_until"] = e.lease_until.into();
                    v["callback_id"] = callback_id(&e.task_id).into();
                }
                CachePhase::Quarantined => {
                    v["until"] = e.until.into();
                    v["error"] = e.error.as_deref().and_then(|x| serde_json::from_str(x).ok()).unwrap_or(Value::Null);
                }
                _ => {}
            }
            if let Some(task) = &e.result_task {
                v["result_task"] = task.as_str().into();
            } else if let Some(result) = &e.result {
                v["result_bytes"] = result.len().into();
            }
            v
        }
    };
    let mut answer = answer;
    answer["op"] = op.into();
    answer["uri"] = uri.into();
    Ok(Reply::ok(answer.to_string()))
}

/// `POST /v1/cache/invalidate`: forgets a cached or quarantined result, so
/// the next request delegates again. An entry being processed stays (its
/// waiters are owed a callback): `invalidated: false`, with its state.
pub async fn invalidate(app: &App<DynamoStore>, ns: &Namespace, body: &[u8]) -> Result<Reply, ApiError> {
    let KeyOnly { op, uri } = parse_body(body, "a cache key ({op, uri})")?;
    check_key(&op, &uri)?;
    let answer = match app.store.cache_invalidate(ns, &entry_hash(&op, &uri)).await? {
        Written::Applied(_) => json!({"invalidated": true}),
        Written::Refused(None) => json!({"invalidated": false, "state": "missing"}),
        Written::Refused(Some(e)) => json!({"invalidated": false, "state": e.phase.as_str(), "task_id": e.task_id}),
    };
    let mut answer = answer;
    answer["op"] = op.into();
    answer["uri"] = uri.into();
    Ok(Reply::ok(answer.to_string()))
}

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

/// The processing state a record carries, if its item is a processing's task.
pub fn done_of(record: &EventRecord) -> Option<Done> {
    use crate::store::cache::cattr;
    use crate::store::schema::attr;
    if record.event_name == "REMOVE" {
        return None;
    }
    let image = serde_json::to_value(&record.change.new_image).ok()?;
    let get = |name: &str, kind: &str| image.get(name)?.get(kind)?.as_str().map(str::to_owned);
    let hash = get(cattr::CACHE_KEY, "S")?;
    let status = State::parse(&get(attr::STATUS, "S")?).ok()?;
    let (ns, task_id) = crate::store::parse_task_key(&get(attr::PK, "S")?)?;
    Some(Done {
        sequence: record.change.sequence_number.clone().unwrap_or_default(),
        ns,
        hash,
        task_id,
        status,
        expires_at: get(attr::EXPIRES_AT, "N").and_then(|n| n.parse().ok()).unwrap_or(i64::MAX),
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

/// Attempts at finishing an entry after its message went out, and the first
/// pause between them (doubling).
const FINISH_ATTEMPTS: u32 = 6;
const FINISH_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// An entry of a namespace: `(namespace, hash)`.
type EntryKey = (String, String);
/// A claim whose message went out: its token, and the quarantine's end.
type Unfinished = (String, Option<i64>);

/// Settles processings from the stream (in chord-join): keeps the result
/// and sends the callback, or sends the quarantine message, each once.
pub struct Settler<T> {
    pub store: DynamoStore,
    pub sink: T,
    pub config: Config,
    /// Entries whose message went out but whose final write kept failing:
    /// `(namespace, hash)` → (claim token, quarantined until). A retry in
    /// this process finishes them and never sends again (invariant K3).
    unfinished: Mutex<HashMap<EntryKey, Unfinished>>,
}

impl<T: CallbackSink> Settler<T> {
    pub fn new(store: DynamoStore, sink: T, config: Config) -> Self {
        Self { store, sink, config, unfinished: Mutex::new(HashMap::new()) }
    }

    /// Settles the batch's processings (a key's records in order, keys
    /// concurrently); returns the sequence numbers to retry.
    pub async fn handle(&self, done: Vec<Done>) -> Vec<String> {
        let mut by_key: BTreeMap<(String, String), Vec<Done>> = BTreeMap::new();
        for d in done {
            by_key.entry((d.ns.as_str().to_owned(), d.hash.clone())).or_default().push(d);
        }
        let outcomes = futures::future::join_all(by_key.into_values().map(|records| async move {
            for (i, record) in records.iter().enumerate() {
                if let Err(err) = self.settle(record).await {
                    match &err {
                        SettleError::Busy(_) => tracing::info!(task = %record.task_id, "{err}; will retry"),
                        _ => tracing::error!(task = %record.task_id, error = %err, "settling failed; will retry"),
                    }
                    return records[i..].iter().map(|r| r.sequence.clone()).collect::<Vec<_>>();
                }
            }
            Vec::new()
        }))
        .await;
        outcomes.into_iter().flatten().collect()
    }

    async fn settle(&self, done: &Done) -> Result<(), SettleError> {
        let (ns, hash, task_id) = (&done.ns, done.hash.as_str(), done.task_id.as_str());
        let Some(entry) = self.store.cache_entry(ns, hash).await? else { return Ok(()) };
        if entry.task_id != task_id {
            return Ok(()); // a processing that was replaced after its lease ran out
        }
        if let Some((token, until)) = self.unfinished_of(ns, hash) {
            if entry.phase == CachePhase::Settling && entry.token.as_deref() == Some(token.as_str()) {
                // Its message went out, but finishing the entry failed: finish it now, sending nothing.
                return self.finish(ns, hash, &token, until).await;
            }
            self.forget_unfinished(ns, hash);
        }
        let spec: OperationSpec = serde_json::from_str(&entry.spec).unwrap_or(OperationSpec {
            task: String::new(),
            queue: None,
            callback: None,
            quarantine: None,
            ttl: None,
            lease: None,
            quarantine_for: None,
        });
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
        let settle = match &stored {
            Some(stored) if stored.status == State::Success => {
                let ttl_end = now + spec.ttl(&self.config);
                let inline = match &stored.blob {
                    None => Some(crate::chord::result_of(&stored.json)),
                    Some(_) => None,
                }
                .filter(|r| r.len() <= self.config.cache.inline_result_bytes);
                match inline {
                    Some(result) => Settle::Success { result: Some(result), result_task: None, expires_at: ttl_end },
                    // Kept on the task, so the entry lives no longer than the task's result.
                    None => Settle::Success {
                        result: None,
                        result_task: Some(task_id.to_owned()),
                        expires_at: ttl_end.min(done.expires_at),
                    },
                }
            }
            Some(stored) => Settle::Failure { error: crate::chord::result_of(&stored.json) },
            None => Settle::Failure {
                error: json!({"exc_type": "LookupError", "exc_module": "builtins",
                              "exc_message": ["the processing's result expired or was forgotten before it was cached"]})
                .to_string(),
            },
        };
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
        let quarantined_until = match settle {
            Settle::Success { .. } => None,
            Settle::Failure { .. } => Some(spec.quarantine_for.map_or(0, |s| now + s as i64)),
        };
        if claimed.sending.as_deref().is_some_and(|earlier| earlier != token) {
            // An earlier claim re-checked itself for a send and then lost
            // its lease (a crash, or its final write kept failing): its
            // message may have gone out, so none goes out again (K3).
            tracing::error!(task = %task_id, "an earlier claim was sending; settled without sending again");
            metrics::count(metrics::CACHE_RESEND_SKIPPED);
            return self.finish(ns, hash, &token, quarantined_until).await;
        }
        if claimed.attempts > self.config.chord.max_attempts {
            tracing::error!(task = %task_id, attempts = claimed.attempts, "giving up sending the processing's message");
            metrics::count(metrics::CACHE_SEND_FAILED);
            return self.finish(ns, hash, &token, quarantined_until).await;
        }
        let sent = match &settle {
            Settle::Success { .. } => self.send_callback(ns, &token, &spec, &claimed, stored.as_ref()).await,
            Settle::Failure { error } => self.send_quarantine(ns, &token, &spec, &claimed, error).await,
        };
        match sent {
            Ok(()) => {}
            Err(SendOutcome::Lost) => {
                tracing::error!(task = %task_id, "the entry's claim was taken over before the send; nothing sent");
                return Ok(());
            }
            Err(SendOutcome::Permanent(err)) => {
                metrics::count(metrics::CACHE_SEND_FAILED);
                tracing::error!(task = %task_id, error = %err, "the processing's message cannot be sent; settled without it");
            }
            Err(SendOutcome::Retry(err)) => {
                // Nothing went out: end the claim now so a retry takes it at once.
                let _ = self.store.cache_renew(ns, hash, &token, now, false).await;
                return Err(err);
            }
        }
        self.finish(ns, hash, &token, quarantined_until).await
    }

    /// Sends the operation's callback with `[[result, [cb_args, ...]]]`; the
    /// result by reference (`{"dynachord_ref": {"task_id", "bytes"}}`) when
    /// it is kept on the task or would make the message too large.
    async fn send_callback(
        &self,
        ns: &Namespace,
        token: &str,
        spec: &OperationSpec,
        entry: &CacheEntry,
        stored: Option<&crate::store::Stored>,
    ) -> Result<(), SendOutcome> {
        let Some(callback) = &spec.callback else { return Ok(()) };
        let waiters = format!("[{}]", entry.waiters.join(","));
        let bytes = stored.map_or(0, |s| s.blob.as_ref().map_or(s.json.len() as u64, |b| b.bytes));
        let reference = json!({"dynachord_ref": {"task_id": entry.task_id, "bytes": bytes}}).to_string();
        let sig = task_signature(callback, &callback_id(&entry.task_id)).map_err(SendOutcome::Permanent)?;
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
        self.send(ns, token, &entry.task_id, &out).await?;
        metrics::count(metrics::CACHE_CALLBACKS_SENT);
        tracing::info!(task = %entry.task_id, waiters = entry.waiters.len(), "cache callback sent");
        Ok(())
    }

    /// Sends the operation's quarantine message `[operation, uri, exception]`.
    async fn send_quarantine(
        &self,
        ns: &Namespace,
        token: &str,
        spec: &OperationSpec,
        entry: &CacheEntry,
        error: &str,
    ) -> Result<(), SendOutcome> {
        metrics::count(metrics::CACHE_QUARANTINED);
        let Some(quarantine) = &spec.quarantine else { return Ok(()) };
        let sig =
            task_signature(quarantine, &format!("{}-quarantine", entry.task_id)).map_err(SendOutcome::Permanent)?;
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
        self.send(ns, token, &entry.task_id, &out).await?;
        tracing::info!(task = %entry.task_id, op = %entry.op, "processing quarantined");
        Ok(())
    }

    /// Re-checks the claim, renewing its lease, then sends.
    async fn send(&self, ns: &Namespace, token: &str, task_id: &str, out: &Outgoing<'_>) -> Result<(), SendOutcome> {
        let hash = crate::store::cache::hash_of_task(task_id).unwrap_or_default();
        let lease = now_epoch() + self.config.chord.lease.as_secs() as i64;
        match self.store.cache_renew(ns, hash, token, lease, true).await {
            Ok(true) => {}
            Ok(false) => return Err(SendOutcome::Lost),
            Err(e) => return Err(SendOutcome::Retry(e.into())),
        }
        match self.sink.send(ns, out).await {
            Ok(()) => Ok(()),
            Err(err) if err.is_permanent() => Err(SendOutcome::Permanent(err.to_string())),
            Err(err) => Err(SendOutcome::Retry(err.into())),
        }
    }

    /// Moves the entry to its final phase after the send, retrying with
    /// backoff. If every attempt fails, the claim is kept in this process,
    /// so the record's retry finishes the entry without sending again.
    async fn finish(&self, ns: &Namespace, hash: &str, token: &str, until: Option<i64>) -> Result<(), SettleError> {
        let mut pause = FINISH_FIRST_PAUSE;
        for attempt in 1..=FINISH_ATTEMPTS {
            match self.store.cache_finish(ns, hash, token, until).await {
                Ok(true) => {
                    self.forget_unfinished(ns, hash);
                    return Ok(());
                }
                Ok(false) => {
                    self.forget_unfinished(ns, hash);
                    tracing::error!(hash, "finishing found the entry no longer ours");
                    return Ok(());
                }
                Err(err) if attempt == FINISH_ATTEMPTS => {
                    metrics::count(metrics::CACHE_FINISH_FAILED);
                    let key = (ns.as_str().to_owned(), hash.to_owned());
                    self.unfinished.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (token.to_owned(), until));
                    return Err(err.into());
                }
                Err(err) => {
                    tracing::warn!(hash, attempt, error = %err, "finishing the entry failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        Ok(())
    }
}

impl<T> Settler<T> {
    fn unfinished_of(&self, ns: &Namespace, hash: &str) -> Option<(String, Option<i64>)> {
        let key = (ns.as_str().to_owned(), hash.to_owned());
        self.unfinished.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned()
    }

    fn forget_unfinished(&self, ns: &Namespace, hash: &str) {
        let key = (ns.as_str().to_owned(), hash.to_owned());
        self.unfinished.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }
}

/// Why a send did not happen.
enum SendOutcome {
    /// Another invocation holds the claim now.
    Lost,
    /// Retrying cannot help (a queue refused, a message too large).
    Permanent(String),
    Retry(SettleError),
}

/// A message's signature: the task an operation names, with `task_id`.
fn task_signature(task: &TaskRef, task_id: &str) -> Result<Signature, String> {
    Signature::from_value(json!({"task": task.task, "options": {"task_id": task_id, "queue": task.queue}}), None)
}
