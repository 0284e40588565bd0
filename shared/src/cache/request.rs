//! The cache's routes: get-or-delegate (one key or many), an entry's
//! state, and invalidation. Each key is read, decided and written until it
//! is answered; a miss that wins its conditional write sends the
//! processing's task message.

use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::HashMap;

use super::store::{entry_hash, CacheEntry, CachePhase, CacheStore, Delegation, Miss, Written};
use super::{callback_id, no_group, OperationSpec, MAX_OP_LEN, MAX_URI_BYTES};
use crate::celery::Signature;
use crate::config::Config;
use crate::dispatch::{CallbackSink, DispatchError, Outgoing};
use crate::error::{ApiError, StoreError};
use crate::ids::{processing_task_id, Namespace, TaskId};
use crate::metrics::{self, Point};
use crate::service::{parse_body, App, Reply};
use crate::time::now_epoch;

/// Keys resolved at once in a bulk request.
const CONCURRENT_KEYS: usize = 16;
/// Rounds of read-decide-write one key may take when others race it.
const ROUNDS: usize = 4;

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

/// A get-or-delegate request, checked: its distinct keys with their
/// waiters, each request's key (`slots`), and whether it named one key.
struct Checked {
    keys: Vec<Key>,
    slots: Vec<usize>,
    single: bool,
    request_id: Option<String>,
}

/// `POST /v1/cache/get-or-delegate`.
pub async fn get_or_delegate<S: CacheStore, T: CallbackSink>(
    app: &App<S>,
    sink: &T,
    ns: &Namespace,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let Checked { keys, slots, single, request_id } = check_request(&app.config, ns, body)?;
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
    let budget = app.config.batch_response_bytes;
    let mut reply =
        if single { single_reply(&keys[0], answers, budget)? } else { bulk_reply(&keys, &slots, &answers, budget) };
    reply.metrics.extend(points);
    Ok(reply)
}

/// The answer to a request for one key: its answer, or its error.
fn single_reply(key: &Key, answers: Vec<Answer>, mut budget: usize) -> Result<Reply, ApiError> {
    match answers.into_iter().next().expect("one key") {
        Answer::Failed(err) => Err(err),
        answer => Ok(Reply::ok(answer_json(key, &answer, &mut budget))),
    }
}

/// The answer to a bulk request: each request's answer, in order. Results
/// past the response's budget are left out; the client asks for them again.
fn bulk_reply(keys: &[Key], slots: &[usize], answers: &[Answer], budget: usize) -> Reply {
    let mut budget = budget.saturating_sub(64 * slots.len());
    let mut body = String::from("{\"results\":[");
    for (i, at) in slots.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&answer_json(&keys[*at], &answers[*at], &mut budget));
    }
    body.push_str("]}");
    let mut reply = Reply::ok(body);
    reply.metrics.push(Point::count(metrics::BATCH_SIZE, slots.len() as f64));
    reply
}

/// A request's keys and operations, as parsed: whether it named one key,
/// and its `request_id`.
struct Parsed {
    requests: Vec<KeyRequest>,
    operations: HashMap<String, OperationSpec>,
    single: bool,
    request_id: Option<String>,
}

/// Parses the body into its requests and operations: one key (`op`, `uri`,
/// `cb_args`, `operation`) or many (`requests`, `operations`).
fn parse_request(body: &[u8]) -> Result<Parsed, ApiError> {
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
    Ok(Parsed { requests, operations, single, request_id })
}

/// Checks every key, operation and bound before anything is read: bad
/// input changes nothing.
fn check_request(config: &Config, ns: &Namespace, body: &[u8]) -> Result<Checked, ApiError> {
    let Parsed { requests, operations, single, request_id } = parse_request(body)?;
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
    check_waiters(config, &keys)?;
    Ok(Checked { keys, slots, single, request_id })
}

/// The waiters one request adds to a key are bounded as the entry's are,
/// before anything is written (a new entry's first write takes them all at
/// once).
fn check_waiters(config: &Config, keys: &[Key]) -> Result<(), ApiError> {
    for key in keys {
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
    Ok(())
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

/// One round of a key's resolution: answered, or a conditional write made
/// (applied, or refused with the entry as it is now).
enum Round {
    Answered(Answer),
    Wrote(Result<Written, StoreError>),
}

/// Reads, decides and writes one key until it is answered: a hit, a
/// quarantine, a join of the running processing, or a delegation.
async fn resolve<S: CacheStore, T: CallbackSink>(
    app: &App<S>,
    sink: &T,
    ns: &Namespace,
    key: &Key,
    request_id: Option<&str>,
    mut entry: Option<CacheEntry>,
) -> Answer {
    let miss = Miss {
        hash: &key.hash,
        op: &key.op,
        uri: &key.uri,
        waiters: &key.waiters,
        request_id,
        max_waiters: app.config.cache.max_waiters,
        max_waiters_bytes: app.config.cache.max_waiters_bytes,
    };
    for _ in 0..ROUNDS {
        let now = now_epoch();
        let round = match &entry {
            Some(e) if e.has_result() => Round::Answered(Answer::Hit(e.clone())),
            // This request, sent again: its cb_args are there already.
            Some(e) if !e.is_open(now) && e.waited_on_by(request_id) => {
                Round::Answered(Answer::Processing { entry: e.clone(), delegated: false })
            }
            Some(e) if e.phase == CachePhase::Settling => Round::Answered(Answer::Settling(e.clone())),
            Some(e) if e.phase == CachePhase::Quarantined && !e.is_open(now) => {
                Round::Answered(Answer::Quarantined(e.clone()))
            }
            Some(e) if e.phase == CachePhase::Processing && !e.is_open(now) => join(app, ns, &miss, e, now).await,
            open => delegate_open(app, sink, ns, key, &miss, open.as_ref(), now).await,
        };
        match round {
            Round::Answered(answer) => return answer,
            Round::Wrote(Ok(Written::Applied(new))) => return Answer::Processing { entry: new, delegated: false },
            Round::Wrote(Ok(Written::Refused(current))) => entry = current,
            Round::Wrote(Err(err)) => return Answer::Failed(err.into()),
        }
    }
    Answer::Failed(ApiError::Throttled { retry_after_secs: 1 })
}

/// Joins the running processing `e`: appends the miss's waiters while it
/// holds the entry and the bounds allow.
async fn join<S: CacheStore>(app: &App<S>, ns: &Namespace, miss: &Miss<'_>, e: &CacheEntry, now: i64) -> Round {
    match app.store.cache_join(ns, miss, &e.task_id, now).await {
        Ok(Written::Refused(Some(old)))
            if old.task_id == e.task_id && !old.is_open(now_epoch()) && !old.waited_on_by(miss.request_id) =>
        {
            if old.phase == CachePhase::Processing {
                return Round::Answered(Answer::Failed(too_many(&app.config, &old)));
            }
            Round::Wrote(Ok(Written::Refused(Some(old))))
        }
        other => Round::Wrote(other),
    }
}

/// Delegates the processing of an entry that is absent, expired, out of
/// quarantine, or whose processing's lease ran out (then taken over with its
/// waiters); the one request whose write applies sends the task message.
async fn delegate_open<S: CacheStore, T: CallbackSink>(
    app: &App<S>,
    sink: &T,
    ns: &Namespace,
    key: &Key,
    miss: &Miss<'_>,
    open: Option<&CacheEntry>,
    now: i64,
) -> Round {
    let replaces = open.filter(|e| e.phase == CachePhase::Processing).map(|e| e.task_id.clone());
    // Taking over a processing this request already waits on (sent again
    // after the lease ran out): nothing to append.
    let again = Miss { waiters: &[], request_id: None, ..miss.clone() };
    let miss = if open.is_some_and(|e| e.waited_on_by(miss.request_id)) { &again } else { miss };
    let task_id = processing_task_id(&key.hash);
    let spec = serde_json::to_string(&key.spec).expect("a spec serializes");
    let lease_until = now + key.spec.lease(&app.config);
    let delegation = Delegation {
        task_id: task_id.as_str(),
        spec: &spec,
        lease_until,
        expires_at: lease_until + 86_400,
        replaces: replaces.as_deref(),
    };
    match app.store.cache_delegate(ns, miss, &delegation, now).await {
        Ok(Written::Applied(new)) => Round::Answered(delegate(app, sink, ns, key, &task_id, new).await),
        Ok(Written::Refused(Some(old)))
            if replaces.is_some() && old.phase == CachePhase::Processing && Some(&old.task_id) == replaces.as_ref() =>
        {
            Round::Answered(Answer::Failed(too_many(&app.config, &old)))
        }
        other => Round::Wrote(other),
    }
}

/// The refusal of a miss past the processing's bounds.
fn too_many(config: &Config, e: &CacheEntry) -> ApiError {
    ApiError::TooManyWaiters(format!(
        "processing {} already has {} waiters ({} bytes of cb_args); the limits are {} and {} \
         (CACHE_MAX_WAITERS, CACHE_MAX_WAITERS_BYTES)",
        e.task_id, e.waiter_count, e.waiters_bytes, config.cache.max_waiters, config.cache.max_waiters_bytes
    ))
}

/// Sends the processing's task message; if it cannot be sent, the lease is
/// ended at once, so the next request delegates again (the waiters stay).
async fn delegate<S: CacheStore, T: CallbackSink>(
    app: &App<S>,
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
            tracing::debug!(op = %key.op, task = %task_id, waiters = entry.waiter_count, "processing delegated");
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

/// `POST /v1/cache/entry`: an entry's state: `cached`, `processing` (with
/// its waiters), `settling`, `quarantined`, or `missing`.
pub async fn entry_state<S: CacheStore>(app: &App<S>, ns: &Namespace, body: &[u8]) -> Result<Reply, ApiError> {
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
pub async fn invalidate<S: CacheStore>(app: &App<S>, ns: &Namespace, body: &[u8]) -> Result<Reply, ApiError> {
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
