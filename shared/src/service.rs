//! The operations behind the routes, generic over the store so they are
//! tested with a fake as well as with DynamoDB Local.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

use crate::celery::Signature;
use crate::chord::{ChordPhase, ChordState, ChordStore, RedriveTo};
use crate::config::Config;
use crate::error::{ApiError, StoreError};
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::{pending_json, with_result_ref, TaskMeta, UploadSpec};
use crate::metrics::{self, Point};
use crate::store::{
    group_key, task_key, BlobRef, Claim, GroupRecord, PartOf, Payload, PutOutcome, ResultStore, Stored, TaskRecord,
    Upload, Within,
};
use crate::time::now_epoch;

/// What a function holds for its lifetime: configuration and the store.
pub struct App<S> {
    pub config: Config,
    pub store: S,
}

/// A successful answer: status and JSON body (empty for 204), and the
/// metrics the route adds to the request's (see [`crate::metrics`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub metrics: Vec<Point>,
}

impl Reply {
    pub fn ok(body: String) -> Self {
        Self { status: 200, body, metrics: Vec::new() }
    }

    pub fn no_content() -> Self {
        Self { status: 204, body: String::new(), metrics: Vec::new() }
    }

    /// The reply with one more metric.
    pub fn with(mut self, point: Point) -> Self {
        self.metrics.push(point);
        self
    }
}

/// First and longest pause between two reads of a long-poll. Each read is a
/// consistent `GetItem`; the pause grows so an idle wait costs a few reads a
/// second, while a result stored mid-wait is seen within a quarter second.
const POLL_FIRST: Duration = Duration::from_millis(25);
const POLL_MAX: Duration = Duration::from_millis(250);

/// The most results a batch-get's long-poll re-reads per second, on
/// average: before it re-reads `k` results still waiting, it pauses at
/// least `k / BATCH_POLL_READS_PER_SECOND` seconds. One waiting result is
/// re-read every 250 ms, as by a single long-poll; 1,000 every 5 s. A
/// batch-get of `n` ids waiting `W` seconds therefore reads at most
/// `n + 200 W` results before its wait ends, and `n` more once at its end:
/// 1,000 pending ids for 20 s, at most 6,000 (it was 80,000).
const BATCH_POLL_READS_PER_SECOND: f64 = 200.0;

/// The pause before re-reading `waiting` results, the backoff's `pause` at least.
fn batch_poll_pause(pause: Duration, waiting: usize) -> Duration {
    pause.max(Duration::from_secs_f64(waiting as f64 / BATCH_POLL_READS_PER_SECOND))
}

fn expires_at(config: &Config, expires_in: Option<u64>) -> Result<i64, ApiError> {
    let ttl = match expires_in {
        None => config.result_ttl,
        Some(secs) if secs >= 1 && secs <= config.max_result_ttl.as_secs() => Duration::from_secs(secs),
        Some(secs) => {
            return Err(ApiError::ExpiresOutOfRange { requested: secs, max: config.max_result_ttl.as_secs() })
        }
    };
    Ok(now_epoch() + ttl.as_secs() as i64)
}

/// `PUT /v1/tasks/{task_id}`: one conditional write. A refusal is a 409 that
/// names the stored status; the stored item is untouched.
pub async fn store_task<S: ResultStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &TaskId,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let meta = TaskMeta::parse(body, id)?;
    let record = TaskRecord {
        task_id: id.clone(),
        status: meta.status.clone(),
        json: meta.to_json(),
        expires_at: expires_at(&app.config, meta.expires_in)?,
        group_id: meta.group_id.clone(),
        group_index: meta.group_index,
        chord: meta.chord.as_ref().map(|c| PartOf { size: c.size, callback: c.callback.get().to_owned() }),
        upload: meta.result_upload.as_ref().map(|u| Upload { sha256: u.sha256.clone(), shape: u.shape() }),
        claim: meta.claim.as_ref().map(|c| Claim {
            token: c.token.clone(),
            until_ms: crate::time::now_millis() + (c.lease_seconds * 1000) as i64,
            rerun: c.rerun,
        }),
    };
    if let Some(chord) = &record.chord {
        check_callback(&app.config, ns, &chord.callback)?;
    }
    match app.store.put_task(ns, &record).await? {
        PutOutcome::Stored => Ok(Reply::ok(
            serde_json::json!({
                "task_id": id.as_str(),
                "status": record.status.as_str(),
                "date_done": meta.date_done,
                "expires_at": record.expires_at,
            })
            .to_string(),
        )),
        PutOutcome::Refused { stored } if record.claim.is_some() => {
            Err(ApiError::ClaimRefused { task_id: id.to_string(), stored, expires_in_ms: None })
        }
        PutOutcome::Refused { stored } => {
            Err(ApiError::Conflict { task_id: id.to_string(), stored, refused: record.status.to_string() })
        }
        PutOutcome::Claimed { stored, until_ms } => Err(ApiError::ClaimRefused {
            task_id: id.to_string(),
            stored,
            expires_in_ms: Some((until_ms - crate::time::now_millis()).max(0) as u64),
        }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadRequest {
    sha256: String,
    /// The object's size: the presigned PUT accepts exactly this many bytes.
    #[serde(deserialize_with = "crate::whole::required")]
    bytes: u64,
    #[serde(default, deserialize_with = "crate::whole::optional")]
    expires_in: Option<u64>,
}

/// `POST /v1/tasks/{task_id}/upload`: a presigned PUT for a result too large
/// to send in a request. The worker uploads the result's JSON, gzip-compressed,
/// then stores the meta with `"result_upload": {"sha256": ...}` instead of
/// `result` (see `docs/LARGE_RESULTS.md`). Nothing is stored until then.
pub async fn upload_task<S: ResultStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &TaskId,
    body: &[u8],
) -> Result<Reply, ApiError> {
    presign_upload(app, &task_key(ns, id), ("task_id", id.as_str()), body).await
}

/// `POST /v1/groups/{group_id}/upload`: as [`upload_task`], for a saved
/// group's result (`GroupResult.as_tuple()` of a large group), committed by
/// `PUT /v1/groups/{group_id}` with `"result_upload": {"sha256": ...}`.
pub async fn upload_group<S: ResultStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &GroupId,
    body: &[u8],
) -> Result<Reply, ApiError> {
    presign_upload(app, &group_key(ns, id), ("group_id", id.as_str()), body).await
}

/// A presigned PUT for an object of the item keyed `item_key`, named in
/// the answer as `owner` (`task_id` or `group_id` and its value).
async fn presign_upload<S: ResultStore>(
    app: &App<S>,
    item_key: &str,
    owner: (&str, &str),
    body: &[u8],
) -> Result<Reply, ApiError> {
    let request: UploadRequest = parse_body(body, "an upload request")?;
    if !crate::ids::is_sha256_hex(&request.sha256) {
        return Err(ApiError::BadBody("sha256 must be 64 lowercase hex digits".into()));
    }
    let limit = app.config.results.max_result_bytes;
    if request.bytes > limit {
        return Err(ApiError::UploadTooLarge { limit });
    }
    let lifetime = expires_at(&app.config, request.expires_in)? - now_epoch();
    let presigned = app.store.upload_url(item_key, &request.sha256, request.bytes, lifetime).await?;
    let headers: serde_json::Map<String, serde_json::Value> =
        presigned.headers.into_iter().map(|(name, value)| (name, value.into())).collect();
    Ok(Reply::ok(
        serde_json::json!({
            owner.0: owner.1,
            "method": "PUT",
            "url": presigned.url,
            "headers": headers,
            "expires_in": app.config.results.presign.as_secs(),
            "max_bytes": limit,
        })
        .to_string(),
    ))
}

/// The meta of a stored result as answered: for a result in S3, with the
/// result put back when it is at most `INLINE_RESULT_BYTES` and the answer
/// stays under Lambda's limit, else with a `result_ref` (a presigned URL).
/// `None` when the result's object is gone: the result was replaced or
/// forgotten since its item was read, so the caller reads it again.
async fn answered<S: ResultStore>(app: &App<S>, stored: Stored) -> Result<Option<String>, ApiError> {
    let Some(blob) = &stored.blob else { return Ok(Some(stored.json)) };
    let status = stored.status.as_str();
    if blob.bytes <= app.config.results.inline_bytes as u64 {
        let Some(object) = app.store.read_blob(blob).await? else { return Ok(None) };
        let json = crate::meta::join_object(&stored.json, status, &object, blob.fields)
            .ok_or_else(|| ApiError::Internal(format!("stored meta of {} has no result to fill", blob.key)))?;
        if escaped_len(&json) <= app.config.batch_response_bytes {
            return Ok(Some(json));
        }
    }
    Ok(Some(result_ref(app, &stored).await?))
}

/// A result in S3 as a reference: the meta with `"result":null` and
/// `"result_ref": {"url", "bytes", "encoding", "expires_in"}`, and
/// `"fields": true` when the object holds the meta's large fields (an
/// object of `result`, `args`, `kwargs`) rather than the result alone.
async fn result_ref<S: ResultStore>(app: &App<S>, stored: &Stored) -> Result<String, ApiError> {
    let blob = stored.blob.as_ref().expect("only a result in S3 has a reference");
    let reference = blob_reference(app, blob).await?;
    with_result_ref(&stored.json, stored.status.as_str(), &reference.to_string())
        .ok_or_else(|| ApiError::Internal(format!("stored meta of {} has no result to refer to", blob.key)))
}

/// What a reference to an object in S3 says: its presigned URL, size,
/// encoding, how long the URL lives, and whether it holds large fields.
async fn blob_reference<S: ResultStore>(app: &App<S>, blob: &BlobRef) -> Result<serde_json::Value, ApiError> {
    let mut reference = serde_json::json!({
        "url": app.store.blob_url(blob).await?,
        "bytes": blob.bytes,
        "encoding": "gzip",
        "expires_in": app.config.results.presign.as_secs(),
    });
    if blob.fields {
        reference["fields"] = true.into();
    }
    Ok(reference)
}

/// A request body: a JSON object read as `T`, or 400 `invalid_body` saying
/// it is not `what`.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    crate::meta::json_object(body)
        .and_then(|()| serde_json::from_slice(body))
        .map_err(|e| ApiError::BadBody(format!("body is not {what}: {e}")))
}

/// How often a read goes back to the item when the object it pointed to
/// was replaced in between.
const REREADS: usize = 3;

/// Bounds what a chord part can make chord-join send, before anything is
/// stored (invariants T2 and T3): the callback's size, its errbacks, and the queues
/// it and every signature in it name, which must be granted to `ns`.
fn check_callback(config: &Config, ns: &Namespace, callback: &str) -> Result<(), ApiError> {
    let limits = &config.chord;
    if callback.len() > limits.max_callback_bytes {
        return Err(ApiError::CallbackTooLarge { size: callback.len(), limit: limits.max_callback_bytes });
    }
    let sig = Signature::parse(callback).map_err(|e| ApiError::BadBody(format!("chord: {e}")))?;
    sig.tolerated_failures(0).map_err(|e| ApiError::BadBody(format!("chord: the callback's {e}")))?;
    sig.forgets_parts().map_err(|e| ApiError::BadBody(format!("chord: the callback's {e}")))?;
    sig.deadline().map_err(|e| ApiError::BadBody(format!("chord: the callback's {e}")))?;
    // The callback's own errbacks, and each of a group body's members' (a
    // failed chord calls those for each member).
    let members = sig.group_members();
    for (what, errbacks) in std::iter::once(("the callback", &sig))
        .chain(members.iter().map(|m| ("a task of its group", m)))
        .map(|(what, s)| (what, s.errbacks().len()))
    {
        if errbacks > limits.max_errbacks {
            return Err(ApiError::CallbackNotAllowed(format!(
                "{what} has {errbacks} errbacks; at most {} are allowed",
                limits.max_errbacks
            )));
        }
    }
    // Everything a success or a failure of the chord makes chord-join send.
    let sends = sig.body_messages().map_or(1, |m| m.len()) + sig.errback_calls().len();
    if sends > limits.max_messages {
        return Err(ApiError::CallbackNotAllowed(format!(
            "the callback would make the chord send {sends} messages (its body's and the errbacks a failure \
             calls); at most {} are allowed (CHORD_MAX_MESSAGES)",
            limits.max_messages
        )));
    }
    if config.callbacks.lambda_function.is_some() {
        return Ok(());
    }
    let default = sig.queue().is_none().then(|| config.callbacks.default_queue.clone());
    for queue in sig.queues_named().into_iter().chain(default) {
        if config.callbacks.queue_url(ns, &queue).is_none() {
            return Err(ApiError::CallbackNotAllowed(format!(
                "queue {queue:?} is not one this tenant's callbacks may use"
            )));
        }
    }
    Ok(())
}

/// `GET /v1/tasks/{task_id}?wait=S`: the stored meta, or PENDING. With a wait,
/// reads again until the task is ready or the wait is over.
pub async fn fetch_task<S: ResultStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &TaskId,
    wait: Duration,
) -> Result<Reply, ApiError> {
    let started = Instant::now();
    let deadline = started + wait;
    let mut pause = POLL_FIRST;
    loop {
        let stored = app.store.get_task(ns, id).await?;
        let ready = stored.as_ref().is_some_and(|s| s.status.is_ready());
        if ready || Instant::now() + pause > deadline {
            let reply = answer_task(app, ns, id, stored).await?;
            let reply = reply.with(Point::count(if ready { metrics::HITS } else { metrics::PENDING }, 1.0));
            if wait.is_zero() {
                return Ok(reply);
            }
            return Ok(reply.with(Point::millis(metrics::LONG_POLL_WAIT, started.elapsed().as_secs_f64() * 1000.0)));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// The answer to a GET of a result read as `stored`.
async fn answer_task<S: ResultStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &TaskId,
    mut stored: Option<Stored>,
) -> Result<Reply, ApiError> {
    for _ in 0..REREADS {
        let Some(found) = stored else { return Ok(Reply::ok(pending_json(id))) };
        if let Some(json) = answered(app, found).await? {
            return Ok(Reply::ok(json));
        }
        stored = app.store.get_task(ns, id).await?;
    }
    Err(ApiError::Unavailable { retry_after_secs: 1 })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    task_ids: Vec<String>,
    #[serde(default)]
    wait: Option<f64>,
}

/// `POST /v1/tasks/batch-get`: `{"task_ids": [...], "wait": S?}` to
/// `{"results": [...]}` in request order. With a wait, re-reads only the
/// tasks not yet ready, each distinct id once a round, until all are ready or
/// the wait is over; the pauses grow with how many still wait (see
/// [`BATCH_POLL_READS_PER_SECOND`]), and the last read is at the wait's end.
pub async fn batch_fetch<S: ResultStore>(app: &App<S>, ns: &Namespace, body: &[u8]) -> Result<Reply, ApiError> {
    let request: BatchRequest = parse_body(body, "a batch-get request")?;
    if request.task_ids.len() > app.config.max_batch_ids {
        return Err(ApiError::BatchTooLarge { count: request.task_ids.len(), limit: app.config.max_batch_ids });
    }
    let wait = parse_wait(request.wait, app.config.max_wait)?;
    let ids = request
        .task_ids
        .iter()
        .enumerate()
        .map(|(i, raw)| TaskId::parse(raw).map_err(|e| ApiError::BadBody(format!("task_ids[{i}]: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;

    let deadline = Instant::now() + wait;
    let mut pause = POLL_FIRST;
    // The documents held here stay within the response's budget: what does
    // not fit is not inflated, and is answered as a reference.
    let budget = app.config.batch_response_bytes;
    let mut results: Vec<Option<Within>> = app.store.get_tasks_within(ns, &ids, budget).await?;
    loop {
        let mut again: Vec<TaskId> = (0..ids.len())
            .filter(|&i| !results[i].as_ref().is_some_and(|s| s.status().is_ready()))
            .map(|i| ids[i].clone())
            .collect();
        again.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        again.dedup();
        let left = deadline.saturating_duration_since(Instant::now());
        if again.is_empty() || left < POLL_FIRST {
            break;
        }
        tokio::time::sleep(batch_poll_pause(pause, again.len()).min(left)).await;
        pause = (pause * 2).min(POLL_MAX);
        let held: usize = results
            .iter()
            .flatten()
            .map(|r| match r {
                Within::Whole(stored) if stored.status.is_ready() => stored.json.len(),
                _ => 0,
            })
            .sum();
        let reread = app.store.get_tasks_within(ns, &again, budget.saturating_sub(held)).await?;
        let read: HashMap<&str, Option<Within>> = again.iter().map(TaskId::as_str).zip(reread).collect();
        for (i, id) in ids.iter().enumerate() {
            if let Some(stored) = read.get(id.as_str()) {
                results[i] = stored.clone();
            }
        }
    }
    let pieces = batch_pieces(app, &ids, results).await?;
    let (body, references) = batch_body(&ids, pieces, app.config.batch_response_bytes);
    Ok(Reply::ok(body)
        .with(Point::count(metrics::BATCH_SIZE, ids.len() as f64))
        .with(Point::count(metrics::BATCH_REFERENCES, references as f64)))
}

/// One result of a batch-get: its meta as answered, or `None` when it can
/// only come back as a reference (a result in S3 not read here); its
/// status; and its size.
type Piece = (Option<String>, String, u64);

/// The batch's results as answered. Results in S3 are read (a few at a
/// time) while they fit `INLINE_RESULT_BYTES` each and the response's
/// budget together; the others come back as references.
async fn batch_pieces<S: ResultStore>(
    app: &App<S>,
    ids: &[TaskId],
    results: Vec<Option<Within>>,
) -> Result<Vec<Piece>, ApiError> {
    use futures::StreamExt;
    let mut room = app.config.batch_response_bytes as u64;
    let mut reads = Vec::new();
    let mut pieces: Vec<Piece> = Vec::with_capacity(ids.len());
    for (i, (id, stored)) in ids.iter().zip(results).enumerate() {
        match stored {
            None => pieces.push((Some(pending_json(id)), "PENDING".into(), 0)),
            // Past the response's budget: never inflated, answered as a reference.
            Some(Within::Over { status, bytes }) => pieces.push((None, status.to_string(), bytes)),
            Some(Within::Whole(stored)) => {
                let status = stored.status.to_string();
                match &stored.blob {
                    None => {
                        let size = stored.json.len() as u64;
                        pieces.push((Some(stored.json), status, size))
                    }
                    Some(blob) => {
                        let (bytes, size) = (blob.bytes, blob.bytes + stored.json.len() as u64);
                        pieces.push((None, status, size));
                        if bytes <= (app.config.results.inline_bytes as u64).min(room) {
                            room -= bytes;
                            reads.push((i, stored));
                        }
                    }
                }
            }
        }
    }
    let read: Vec<(usize, Option<String>)> = futures::stream::iter(reads)
        .map(|(i, stored)| async move {
            let blob = stored.blob.as_ref().expect("only results in S3 are read");
            let object = app.store.read_blob(blob).await?;
            let status = stored.status.as_str();
            Ok::<_, ApiError>((i, object.and_then(|o| crate::meta::join_object(&stored.json, status, &o, blob.fields))))
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    for (i, json) in read {
        // An object gone since its item was read stays a reference: its GET reads the item again.
        pieces[i].0 = json;
    }
    Ok(pieces)
}

/// `{"results": [...]}` in request order, within `budget` bytes as Lambda
/// counts them (the body JSON-escaped). Results are included in order while
/// the rest of the ids still fit as references; a result past that, or one
/// in S3 not read here, comes back as a reference,
/// `{"task_id", "status", "ref": {"bytes"}}`, to read with `GET /v1/tasks/{task_id}`.
/// Returns the body and how many results it answers as references.
fn batch_body(ids: &[TaskId], pieces: Vec<Piece>, budget: usize) -> (String, usize) {
    let costs: Vec<Option<usize>> = pieces.iter().map(|(piece, _, _)| piece.as_deref().map(escaped_len)).collect();
    let wanted: u64 = pieces.iter().map(|(_, _, size)| size + 1).sum();
    let mut body = String::with_capacity(wanted.min(budget as u64) as usize + 16);
    body.push_str(r#"{"results":["#);
    let mut used = escaped_len(&body) + 2;
    let whole: Option<usize> = costs.iter().copied().sum();
    if whole.is_some_and(|whole| used + whole + pieces.len() <= budget) {
        // All of it fits, as almost always: no references to work out.
        for (i, (piece, _, _)) in pieces.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(piece.as_deref().expect("every piece is whole"));
        }
        body.push_str("]}");
        return (body, 0);
    }
    let references: Vec<String> = ids
        .iter()
        .zip(&pieces)
        .map(|(id, (_, status, bytes))| {
            serde_json::json!({"task_id": id.as_str(), "status": status, "ref": {"bytes": bytes}}).to_string()
        })
        .collect();
    // What the items after each one cost at least: all of them as references.
    let mut after = vec![0usize; ids.len() + 1];
    for i in (0..ids.len()).rev() {
        after[i] = after[i + 1] + escaped_len(&references[i]) + 1;
    }
    let mut referred = 0;
    for (i, (piece, _, _)) in pieces.iter().enumerate() {
        if i > 0 {
            body.push(',');
            used += 1;
        }
        match (piece, costs[i]) {
            (Some(piece), Some(cost)) if used + cost + after[i + 1] <= budget => {
                body.push_str(piece);
                used += cost;
            }
            _ => {
                body.push_str(&references[i]);
                used += escaped_len(&references[i]);
                referred += 1;
            }
        }
    }
    body.push_str("]}");
    (body, referred)
}

/// The length of `text` once escaped as a JSON string (as the proxy
/// response carries the body).
fn escaped_len(text: &str) -> usize {
    text.len()
        + text
            .bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
                b if b < 0x20 => 5,
                _ => 0,
            })
            .sum::<usize>()
}

/// Checks a requested wait (seconds) against `MAX_WAIT_SECONDS`.
pub fn parse_wait(wait: Option<f64>, max_wait: Duration) -> Result<Duration, ApiError> {
    match wait {
        None => Ok(Duration::ZERO),
        Some(secs) if secs.is_finite() && secs >= 0.0 && secs <= max_wait.as_secs_f64() => {
            Ok(Duration::from_secs_f64(secs))
        }
        Some(secs) => Err(ApiError::BadQuery(format!("wait {secs} is outside 0..={} seconds", max_wait.as_secs()))),
    }
}

/// `DELETE /v1/tasks/{task_id}`: forget (Celery's `forget`). Idempotent.
pub async fn forget_task<S: ResultStore>(app: &App<S>, ns: &Namespace, id: &TaskId) -> Result<Reply, ApiError> {
    app.store.delete_task(ns, id).await?;
    Ok(Reply::no_content())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupRequest {
    #[serde(default)]
    result: Option<Box<RawValue>>,
    /// The result was uploaded (`POST /v1/groups/{group_id}/upload`).
    #[serde(default)]
    result_upload: Option<UploadSpec>,
    #[serde(default, deserialize_with = "crate::whole::optional")]
    expires_in: Option<u64>,
}

/// `PUT /v1/groups/{group_id}`: `GroupResult.save`, the body Celery stores
/// (`{"result": <GroupResult.as_tuple()>}`), or, for a group too large to
/// send, `{"result_upload": {"sha256": ...}}` after its upload. A later
/// save replaces it.
pub async fn save_group<S: ResultStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &GroupId,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let request: GroupRequest = parse_body(body, "a saved group")?;
    let result = match (request.result, request.result_upload) {
        (Some(result), None) => Payload::Json(result.get().to_owned()),
        (None, Some(upload)) if upload.fields => {
            return Err(ApiError::BadBody("result_upload: a saved group's upload holds its result, not fields".into()))
        }
        (None, Some(upload)) if !crate::ids::is_sha256_hex(&upload.sha256) => {
            return Err(ApiError::BadBody("result_upload: sha256 must be 64 lowercase hex digits".into()))
        }
        (None, Some(upload)) => Payload::Uploaded { sha256: upload.sha256 },
        _ => return Err(ApiError::BadBody("a saved group carries result or result_upload (exactly one)".into())),
    };
    let expires_at = expires_at(&app.config, request.expires_in)?;
    app.store.put_group(ns, id, &GroupRecord { result, expires_at }).await?;
    Ok(Reply::ok(serde_json::json!({"group_id": id.as_str(), "expires_at": expires_at}).to_string()))
}

/// `GET /v1/groups/{group_id}`: the saved group, or 404 (Celery's restore
/// gives None). A result in S3 is put back when it is at most
/// `INLINE_RESULT_BYTES`, else answered as `"result":null` with a
/// `result_ref`, as a task's is.
pub async fn restore_group<S: ResultStore>(app: &App<S>, ns: &Namespace, id: &GroupId) -> Result<Reply, ApiError> {
    for _ in 0..REREADS {
        let Some(saved) = app.store.get_group(ns, id).await? else { break };
        let Some(blob) = &saved.blob else { return Ok(Reply::ok(saved.json)) };
        if blob.bytes <= app.config.results.inline_bytes as u64 {
            // Gone since the item was read (saved again or deleted): read again.
            let Some(result) = app.store.read_blob(blob).await? else { continue };
            let json = crate::store::group_doc(&result);
            if escaped_len(&json) <= app.config.batch_response_bytes {
                return Ok(Reply::ok(json));
            }
        }
        let reference = blob_reference(app, blob).await?;
        return Ok(Reply::ok(format!(r#"{{"result":null,"result_ref":{reference}}}"#)));
    }
    Err(ApiError::GroupNotFound(id.to_string()))
}

/// The most failed parts' ids a chord's status lists.
pub const MAX_FAILED_IDS: usize = 1000;

/// `GET /v1/chords/{group_id}`: a chord's progress, with its parts counted
/// by state (succeeded, failed, pending), and with `failed_ids` the ids of
/// its failed parts (at most [`MAX_FAILED_IDS`]); 404 before its first part
/// has been counted.
pub async fn chord_status<S: ChordStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &GroupId,
    failed_ids: bool,
) -> Result<Reply, ApiError> {
    let Some(chord) = app.store.chord_state(ns, id).await? else {
        return Err(ApiError::ChordNotFound(id.to_string()));
    };
    let done = chord.done.min(chord.size);
    let failed = chord.failed.min(done);
    let mut answer = serde_json::json!({
        "group_id": id.as_str(),
        "size": chord.size,
        "done": done,
        "succeeded": done - failed,
        "failed": failed,
        "pending": chord.size - done,
        "state": chord.phase.as_str(),
        "callback_id": chord.callback_id,
        "error": chord.error,
        "opened_at": chord.opened_at,
        "deadline_at": chord.deadline_at,
        "stalled_at": chord.stalled_at,
    });
    if failed_ids {
        let (ids, more) = app.store.failed_part_ids(ns, id, MAX_FAILED_IDS).await?;
        answer["failed_ids"] = ids.iter().map(TaskId::as_str).collect::<Vec<_>>().into();
        answer["failed_ids_truncated"] = more.into();
    }
    Ok(Reply::ok(answer.to_string()))
}

/// `POST /v1/chords/{group_id}/redrive`: sends a chord's failed parts
/// again, with their task ids and arguments, and joins it again once they
/// have reported (`docs/API.md`, "Redriving a chord"). Allowed when the
/// chord failed, or called back with tolerated failures; the first failed
/// part's arguments must be on record (`result_extended`). The chord moves
/// to `redriving` with one conditional write, and chord-join sends the
/// parts from that write's stream record (`chord/redrive.rs`). The
/// callback's earlier result, and those of the tasks it runs, are
/// forgotten, so they can be stored again and a caller waits for the new
/// ones. Asked again while the redrive is under way, it answers the same.
pub async fn redrive_chord<S: ChordStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &GroupId,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let to = redrive_to(&app.config, ns, body)?;
    if app.config.callbacks.lambda_function.is_some() {
        let why = "a redrive sends Celery task messages; this deployment calls back a Lambda function";
        return Err(ApiError::RedriveRefused(why.into()));
    }
    let Some(state) = app.store.chord_state(ns, id).await? else {
        return Err(ApiError::ChordNotFound(id.to_string()));
    };
    let redriving = match state.phase {
        ChordPhase::Redriving => state.failed,
        ChordPhase::Open | ChordPhase::Joining => {
            let (phase, done, size) = (state.phase.as_str(), state.done.min(state.size), state.size);
            return Err(ApiError::RedriveRefused(format!(
                "chord {id} is {phase}, {done} of {size} parts reported; only a chord that failed, \
                 or called back with tolerated failures, can be redriven"
            )));
        }
        ChordPhase::Dispatched | ChordPhase::Failed if state.failed == 0 => {
            return Err(ApiError::RedriveRefused(format!("chord {id} has no failed part to redrive")));
        }
        ChordPhase::Dispatched | ChordPhase::Failed => {
            check_redrivable(app, ns, id, &state, &to).await?;
            if !app.store.start_redrive(ns, id, &state, &to).await? {
                let why = format!("chord {id} changed while its redrive was asked (another redrive?); ask again");
                return Err(ApiError::RedriveRefused(why));
            }
            state.failed
        }
    };
    forget_callback_results(app, ns, &state.callback).await?;
    let answer = serde_json::json!({
        "group_id": id.as_str(),
        "state": ChordPhase::Redriving.as_str(),
        "redriving": redriving,
        "redrives": state.redrives + u32::from(state.phase != ChordPhase::Redriving),
    });
    Ok(Reply { status: 202, body: answer.to_string(), metrics: Vec::new() })
}

/// Where a redrive's body says to send the parts: `{"queue": name}` for
/// all of them, or `{"queue_prefix": prefix}` (kombu's SQS
/// `queue_name_prefix`) before each part's own queue; an empty body sends
/// each part to the queue its result names, or the default queue. A queue
/// the tenant may not use is refused here (invariant T2).
fn redrive_to(config: &Config, ns: &Namespace, body: &[u8]) -> Result<RedriveTo, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        queue: Option<String>,
        queue_prefix: Option<String>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RedriveTo::default());
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| ApiError::BadBody(format!("redrive: {e}")))?;
    let name_ok = |q: &String| !q.is_empty() && q.len() <= 80;
    if body.queue.as_ref().is_some_and(|q| !name_ok(q)) || body.queue_prefix.as_ref().is_some_and(|p| p.len() > 80) {
        return Err(ApiError::BadBody("redrive: a queue name or prefix is at most 80 characters".into()));
    }
    if let Some(queue) = &body.queue {
        if config.callbacks.queue_url(ns, queue).is_none() {
            return Err(ApiError::CallbackNotAllowed(format!("queue {queue:?} is not one this tenant may use")));
        }
    }
    Ok(RedriveTo { queue: body.queue, prefix: body.queue_prefix.filter(|p| !p.is_empty()) })
}

/// Refuses a redrive whose first failed part cannot be sent again (its
/// arguments not stored, its result gone, its queue not the tenant's), so
/// the common mistake is told at once and changes nothing.
async fn check_redrivable<S: ChordStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &GroupId,
    state: &ChordState,
    to: &RedriveTo,
) -> Result<(), ApiError> {
    let Some(part) = app.store.failed_parts(ns, id, 1).await?.into_iter().next() else {
        return Err(ApiError::RedriveRefused(format!("chord {id}'s failed parts are no longer on record")));
    };
    let Some(stored) = app.store.get_task(ns, &part.task_id).await? else {
        let why = format!("part {}'s result expired or was forgotten; it cannot be sent again", part.task_id);
        return Err(ApiError::RedriveRefused(why));
    };
    let Some(json) = crate::chord::with_arguments(&app.store, stored).await? else {
        let why = format!("part {}'s result was forgotten; it cannot be sent again", part.task_id);
        return Err(ApiError::RedriveRefused(why));
    };
    let (sig, _) = crate::chord::part_message(&json, &part, id, &state.callback, to, state.redrives + 1)
        .map_err(|why| ApiError::RedriveRefused(format!("chord {id} cannot be redriven: {why}")))?;
    if let Some(queue) = sig.queue() {
        if app.config.callbacks.queue_url(ns, queue).is_none() {
            return Err(ApiError::CallbackNotAllowed(format!(
                "part {} would go to queue {queue:?}, which this tenant may not use; name a queue",
                part.task_id
            )));
        }
    }
    Ok(())
}

/// Forgets the results a redriven chord's callback left (its ChordError,
/// or the result of a callback that ran with tolerated failures), and those
/// of the tasks it runs, so they can be stored again: at most
/// `CHORD_MAX_MESSAGES` of them, checked when the chord was stored.
async fn forget_callback_results<S: ChordStore>(app: &App<S>, ns: &Namespace, callback: &str) -> Result<(), ApiError> {
    use futures::StreamExt;
    let Ok(sig) = Signature::parse(callback) else { return Ok(()) };
    let ids = sig.ids_that_never_run();
    let forgotten: Vec<Result<(), StoreError>> = futures::stream::iter(ids)
        .map(|id| async move { app.store.delete_task(ns, &id).await })
        .buffer_unordered(16)
        .collect()
        .await;
    forgotten.into_iter().collect::<Result<(), StoreError>>()?;
    Ok(())
}

/// `DELETE /v1/groups/{group_id}`. Idempotent.
pub async fn delete_group<S: ResultStore>(app: &App<S>, ns: &Namespace, id: &GroupId) -> Result<Reply, ApiError> {
    app.store.delete_group(ns, id).await?;
    Ok(Reply::no_content())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use std::sync::Arc;

    fn app() -> Arc<App<MemoryStore>> {
        Arc::new(App { config: Config::for_table("t"), store: MemoryStore::default() })
    }

    fn tid(s: &str) -> TaskId {
        TaskId::parse(s).unwrap()
    }

    async fn put(app: &App<MemoryStore>, id: &str, body: &str) -> Result<Reply, ApiError> {
        store_task(app, &Namespace::default(), &tid(id), body.as_bytes()).await
    }

    #[tokio::test]
    async fn a_refused_write_is_a_conflict_naming_the_stored_state() {
        let app = app();
        put(&app, "t1", r#"{"status":"SUCCESS","result":1}"#).await.unwrap();
        let err = put(&app, "t1", r#"{"status":"STARTED"}"#).await.unwrap_err();
        assert!(matches!(&err, ApiError::Conflict { stored, .. } if stored == "SUCCESS"), "{err:?}");
        let got = fetch_task(&app, &Namespace::default(), &tid("t1"), Duration::ZERO).await.unwrap();
        assert!(got.body.contains(r#""result":1"#));
    }

    #[tokio::test]
    async fn a_claim_holds_a_task_for_one_token_until_it_lapses_or_the_task_is_ready() {
        let app = app();
        let claim = |token: &str, lease: u64| {
            format!(r#"{{"status":"STARTED","claim":{{"token":"{token}","lease_seconds":{lease}}}}}"#)
        };
        put(&app, "t1", &claim("holder-one", 60)).await.unwrap();
        let held = put(&app, "t1", &claim("holder-two", 60)).await.unwrap_err();
        assert_eq!(held.status_and_code(), (409, "task_claimed"));
        assert!(matches!(held, ApiError::ClaimRefused { expires_in_ms: Some(ms), .. } if ms > 59_000), "{held:?}");
        put(&app, "t1", &claim("holder-one", 60)).await.expect("its own token renews it");
        // A lapsed claim is taken over.
        let ns = Namespace::default();
        let lapsed = TaskRecord {
            task_id: tid("t2"),
            status: crate::meta::State::Started,
            json: r#"{"status":"STARTED"}"#.into(),
            expires_at: now_epoch() + 60,
            group_id: None,
            group_index: None,
            chord: None,
            upload: None,
            claim: Some(Claim { token: "dead-holder".into(), until_ms: crate::time::now_millis() - 1, rerun: false }),
        };
        app.store.put_task(&ns, &lapsed).await.unwrap();
        put(&app, "t2", &claim("next-delivery", 60)).await.expect("a lapsed claim is taken over");
        // Ready: no claim again, a conflict as any store's.
        put(&app, "t1", r#"{"status":"SUCCESS","result":1}"#).await.unwrap();
        let done = put(&app, "t1", &claim("holder-one", 60)).await.unwrap_err();
        assert_eq!(done.status_and_code(), (409, "state_conflict"));
        let body: serde_json::Value = serde_json::from_str(&done.to_json("r")).unwrap();
        assert_eq!(body["error"]["stored_status"], "SUCCESS");
    }

    #[tokio::test]
    async fn long_poll_returns_soon_after_the_result_lands() {
        let app = app();
        let writer = {
            let app = app.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                put(&app, "t1", r#"{"status":"SUCCESS","result":"late"}"#).await.unwrap();
            })
        };
        let started = Instant::now();
        let got = fetch_task(&app, &Namespace::default(), &tid("t1"), Duration::from_secs(5)).await.unwrap();
        writer.await.unwrap();
        assert!(got.body.contains("late"));
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
    }

    /// A long-poll of many pending ids reads at most `n + 200 W` results
    /// before its wait of `W` seconds ends, and `n` more at its end, each
    /// distinct id once a round however often it is asked for (here 700
    /// distinct of 1,000 ids for 2 s: at most 1,000 + 400 + 700; the backoff
    /// alone re-read all 1,000 every 25 to 250 ms).
    #[tokio::test]
    async fn a_batch_long_poll_reads_a_bounded_number_of_results() {
        let app = app();
        let mut ids: Vec<String> = (0..700).map(|i| format!("pending-{i}")).collect();
        ids.extend(ids[..300].to_vec());
        let body = serde_json::json!({"task_ids": ids, "wait": 2.0}).to_string();
        let got = batch_fetch(&app, &Namespace::default(), body.as_bytes()).await.unwrap();
        let reads = app.store.reads();
        let results: serde_json::Value = serde_json::from_str(&got.body).unwrap();
        assert_eq!(results["results"].as_array().unwrap().len(), 1000);
        assert!(reads <= 1000 + 200 * 2 + 700, "{reads} results read");
        assert!(reads >= 1000 + 700, "read again at the wait's end: {reads}");
    }

    #[tokio::test]
    async fn long_poll_gives_up_at_the_deadline_with_the_latest_state() {
        let app = app();
        put(&app, "t1", r#"{"status":"STARTED"}"#).await.unwrap();
        let got = fetch_task(&app, &Namespace::default(), &tid("t1"), Duration::from_millis(200)).await.unwrap();
        assert!(got.body.contains("STARTED"));
    }

    #[tokio::test]
    async fn batch_keeps_order_and_duplicates_and_reads_unknown_as_pending() {
        let app = app();
        put(&app, "a", r#"{"status":"SUCCESS","result":"A"}"#).await.unwrap();
        put(&app, "b", r#"{"status":"FAILURE","result":"B"}"#).await.unwrap();
        let reply = batch_fetch(&app, &Namespace::default(), br#"{"task_ids":["b","nope","a","b"]}"#).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        let got: Vec<(&str, &str)> = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["task_id"].as_str().unwrap(), r["status"].as_str().unwrap()))
            .collect();
        assert_eq!(got, [("b", "FAILURE"), ("nope", "PENDING"), ("a", "SUCCESS"), ("b", "FAILURE")]);
    }

    #[tokio::test]
    async fn a_batch_of_results_that_compress_well_holds_no_more_than_its_response_budget() {
        // 200 results of 100 KB that DynamoDB stores compressed to almost
        // nothing: 20 MB once inflated, against a 1 MB budget.
        let mut app: App<MemoryStore> = App { config: Config::for_table("t"), store: MemoryStore::default() };
        app.config.batch_response_bytes = 1 << 20;
        let ids: Vec<String> = (0..200).map(|i| format!("z{i}")).collect();
        let body = format!(r#"{{"status":"SUCCESS","result":"{}"}}"#, "z".repeat(100_000));
        for id in &ids {
            store_task(&app, &Namespace::default(), &tid(id), body.as_bytes()).await.unwrap();
        }
        let request = serde_json::json!({ "task_ids": ids }).to_string();
        let reply = batch_fetch(&app, &Namespace::default(), request.as_bytes()).await.unwrap();
        let largest = app.store.largest_read.load(std::sync::atomic::Ordering::SeqCst);
        assert!(largest <= 1 << 20, "the read inflated {largest} bytes");
        let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        let items = v["results"].as_array().unwrap();
        assert_eq!(items.len(), 200);
        let whole = items.iter().filter(|r| r.get("ref").is_none()).count();
        assert!((1..20).contains(&whole), "{whole} whole, the rest references");
        assert!(items.iter().all(|r| r["status"] == "SUCCESS"));
    }

    #[tokio::test]
    async fn a_batch_past_its_response_budget_answers_the_rest_as_references() {
        let mut app: App<MemoryStore> = App { config: Config::for_table("t"), store: MemoryStore::default() };
        app.config.batch_response_bytes = 64 << 10;
        // Results of quotes (`\"` in the stored JSON), which escaping doubles again: Lambda counts the escaped body.
        let result = "\\\"".repeat(5_000);
        let ids: Vec<String> = (0..10).map(|i| format!("big{i}")).collect();
        for id in &ids {
            let body = format!(r#"{{"status":"SUCCESS","result":"{result}"}}"#);
            store_task(&app, &Namespace::default(), &tid(id), body.as_bytes()).await.unwrap();
        }
        let mut asked = ids.clone();
        asked.push("unknown".into());
        let request = serde_json::json!({ "task_ids": asked }).to_string();
        let reply = batch_fetch(&app, &Namespace::default(), request.as_bytes()).await.unwrap();
        assert!(escaped_len(&reply.body) <= 64 << 10, "{} bytes escaped", escaped_len(&reply.body));
        let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        let items = v["results"].as_array().unwrap();
        assert_eq!(items.len(), 11, "one item per id, in order");
        let full = items.iter().take_while(|r| r.get("ref").is_none()).count();
        assert!((1..10).contains(&full), "{full} full results, then references");
        for (i, item) in items.iter().enumerate() {
            assert_eq!(item["task_id"], asked[i].as_str());
            if i < full {
                assert_eq!(item["result"].as_str().unwrap(), "\"".repeat(5_000));
            } else if i < 10 {
                assert_eq!((item["status"].as_str(), item.get("result")), (Some("SUCCESS"), None));
                assert!(item["ref"]["bytes"].as_u64().unwrap() > 10_000, "the stored meta's size: {item}");
            }
        }
        assert!(items[10]["status"] == "PENDING", "a small answer after the budget is still an answer or a reference");
    }

    #[tokio::test]
    async fn a_result_in_s3_is_answered_whole_or_by_reference() {
        use std::sync::atomic::Ordering;
        let mut app: App<MemoryStore> = App { config: Config::for_table("t"), store: MemoryStore::default() };
        app.store.spill_above.store(200, Ordering::SeqCst);
        app.config.results.inline_bytes = 1000;
        let ns = Namespace::default();
        let mut sent = Vec::new();
        for (id, n) in [("small", 10), ("mid", 500), ("big", 5000)] {
            let body = format!(r#"{{"status":"SUCCESS","result":["{}",1.50]}}"#, "x".repeat(n));
            store_task(&app, &ns, &tid(id), body.as_bytes()).await.unwrap();
            sent.push(format!(r#"["{}",1.50]"#, "x".repeat(n)));
        }
        assert_eq!(app.store.blobs.lock().unwrap().len(), 2, "the two large results went to S3");
        let (app, ns) = (&app, &ns);
        let body = |id: &'static str| async move { fetch_task(app, ns, &tid(id), Duration::ZERO).await.unwrap().body };
        for (id, result) in [("small", &sent[0]), ("mid", &sent[1])] {
            let got = body(id).await;
            assert!(got.starts_with(&format!(r#"{{"status":"SUCCESS","result":{result},"traceback""#)), "{got}");
        }
        let big: serde_json::Value = serde_json::from_str(&body("big").await).unwrap();
        assert_eq!(big["result"], serde_json::Value::Null);
        assert_eq!(big["result_ref"]["bytes"], sent[2].len());
        assert_eq!(big["result_ref"]["encoding"], "gzip");
        assert!(big["result_ref"]["url"].as_str().unwrap().starts_with("memory:///default/task/big/"));

        let reply = batch_fetch(app, ns, br#"{"task_ids":["big","mid","small"]}"#).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert!(v["results"][0]["ref"]["bytes"].as_u64().unwrap() as usize > sent[2].len(), "the meta's size: {v}");
        assert_eq!(v["results"][1]["result"][0].as_str().unwrap().len(), 500, "read from S3 and put back");
        assert_eq!(v["results"][2]["result"][0], "x".repeat(10));

        forget_task(app, ns, &tid("big")).await.unwrap();
        assert_eq!(app.store.blobs.lock().unwrap().len(), 1, "forget deletes the object too");
        assert!(body("big").await.contains("PENDING"));
    }

    #[tokio::test]
    async fn an_upload_is_asked_for_then_committed_without_a_result() {
        let app = app();
        let ns = Namespace::default();
        let sha = crate::store::blobs::sha256_hex(b"object");
        let ask = format!(r#"{{"sha256":"{sha}","bytes":6}}"#);
        let reply = upload_task(&app, &ns, &tid("up"), ask.as_bytes()).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!((v["method"].as_str(), v["expires_in"].as_u64()), (Some("PUT"), Some(900)));
        assert!(v["url"].as_str().unwrap().ends_with(&format!("default/task/up/{sha}")));
        let no_size = format!(r#"{{"sha256":"{sha}"}}"#);
        for bad in [r#"{"sha256":"abc","bytes":1}"#, r#"{}"#, r#"{"sha256":"x","extra":1}"#, &no_size] {
            assert!(upload_task(&app, &ns, &tid("up"), bad.as_bytes()).await.is_err(), "{bad}");
        }
        let too_big = format!(r#"{{"sha256":"{sha}","bytes":{}}}"#, (512u64 << 20) + 1);
        let err = upload_task(&app, &ns, &tid("up"), too_big.as_bytes()).await.unwrap_err();
        assert_eq!(err.status_and_code(), (413, "result_too_large"));

        let commit = format!(r#"{{"status":"SUCCESS","result_upload":{{"sha256":"{sha}"}}}}"#);
        let err = store_task(&app, &ns, &tid("up"), commit.as_bytes()).await.unwrap_err();
        assert_eq!(err.status_and_code().1, "invalid_upload", "nothing was uploaded: {err}");
        assert!(fetch_task(&app, &ns, &tid("up"), Duration::ZERO).await.unwrap().body.contains("PENDING"));
        let key = crate::store::blobs::object_key(&ns, &tid("up"), &sha);
        app.store.blobs.lock().unwrap().insert(key, r#"{"big":true}"#.into());
        store_task(&app, &ns, &tid("up"), commit.as_bytes()).await.unwrap();
        let got = fetch_task(&app, &ns, &tid("up"), Duration::ZERO).await.unwrap().body;
        assert!(got.starts_with(r#"{"status":"SUCCESS","result":{"big":true},"#), "{got}");
        let both = format!(r#"{{"status":"SUCCESS","result":1,"result_upload":{{"sha256":"{sha}"}}}}"#);
        let err = store_task(&app, &ns, &tid("up2"), both.as_bytes()).await.unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
    }

    #[tokio::test]
    async fn batch_limits_are_checked_before_any_read() {
        let app = app();
        let ids: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
        let body = serde_json::json!({ "task_ids": ids }).to_string();
        let err = batch_fetch(&app, &Namespace::default(), body.as_bytes()).await.unwrap_err();
        assert!(matches!(err, ApiError::BatchTooLarge { count: 1001, limit: 1000 }));
        assert_eq!(app.store.reads(), 0);
        for bad in
            [r#"{"task_ids":["ok","a/b"]}"#, r#"{"task_ids":"a"}"#, r#"{"ids":[]}"#, r#"{"task_ids":[],"wait":99}"#]
        {
            assert!(batch_fetch(&app, &Namespace::default(), bad.as_bytes()).await.is_err(), "{bad}");
        }
        assert_eq!(app.store.reads(), 0);
    }

    #[tokio::test]
    async fn expires_in_is_bounded() {
        let app = app();
        for body in [r#"{"status":"SUCCESS","expires_in":0}"#, r#"{"status":"SUCCESS","expires_in":99999999999}"#] {
            let err = put(&app, "t1", body).await.unwrap_err();
            assert!(matches!(err, ApiError::ExpiresOutOfRange { max: 2_592_000, .. }), "{body}");
            let json: serde_json::Value = serde_json::from_str(&err.to_json("r")).unwrap();
            assert_eq!(json["error"]["max_expires_in"], 2_592_000, "the package clamps to it");
        }
        assert!(app.store.is_empty());
    }

    #[tokio::test]
    async fn groups_save_restore_delete() {
        let app = app();
        let ns = Namespace::default();
        let g = GroupId::parse("g1").unwrap();
        let saved = r#"{"result":[["g1",null],[[["t1",null],null]]]}"#;
        save_group(&app, &ns, &g, saved.as_bytes()).await.unwrap();
        assert_eq!(restore_group(&app, &ns, &g).await.unwrap().body, saved);
        delete_group(&app, &ns, &g).await.unwrap();
        assert!(matches!(restore_group(&app, &ns, &g).await, Err(ApiError::GroupNotFound(_))));
        assert!(save_group(&app, &ns, &g, br#"{"results":[]}"#).await.is_err());
        for not_an_object in [&b"[null, null]"[..], b"[[1], 60]", b"\"x\"", b"7"] {
            let err = save_group(&app, &ns, &g, not_an_object).await.unwrap_err();
            assert!(err.to_string().contains("expected a JSON object"), "{err}");
        }
        let err = batch_fetch(&app, &ns, br#"[["a"], null]"#).await.unwrap_err();
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
    }

    #[tokio::test]
    async fn a_large_saved_group_is_kept_as_an_object_and_read_back_whole_and_follows_its_group() {
        let app = app();
        app.store.spill_above.store(100, std::sync::atomic::Ordering::SeqCst);
        let (ns, g) = (Namespace::default(), GroupId::parse("g1").unwrap());
        let members: Vec<String> = (0..20).map(|i| format!(r#"[["t{i}",null],null]"#)).collect();
        let result = format!(r#"[["g1",null],[{}]]"#, members.join(","));
        let saved = format!(r#"{{"result":{result}}}"#);
        save_group(&app, &ns, &g, saved.as_bytes()).await.unwrap();
        assert_eq!(app.store.blobs.lock().unwrap().len(), 1, "spilled");
        assert_eq!(restore_group(&app, &ns, &g).await.unwrap().body, saved, "read back whole");
        // An upload: committed under its SHA-256, the spilled object replaced.
        let uploaded = r#"[["g1",null],[]]"#;
        let sha = crate::store::blobs::sha256_hex(uploaded.as_bytes());
        let key = crate::store::blobs::object_key_under(&group_key(&ns, &g), &sha);
        app.store.blobs.lock().unwrap().insert(key.clone(), uploaded.to_owned());
        let commit = format!(r#"{{"result_upload":{{"sha256":"{sha}"}}}}"#);
        save_group(&app, &ns, &g, commit.as_bytes()).await.unwrap();
        assert_eq!(app.store.blobs.lock().unwrap().keys().collect::<Vec<_>>(), [&key], "the old object went");
        assert_eq!(restore_group(&app, &ns, &g).await.unwrap().body, format!(r#"{{"result":{uploaded}}}"#));
        for bad in [
            format!(r#"{{"result":1,"result_upload":{{"sha256":"{sha}"}}}}"#),
            format!(r#"{{"result_upload":{{"sha256":"{sha}","fields":true}}}}"#),
            r#"{"result_upload":{"sha256":"abc"}}"#.to_owned(),
            "{}".to_owned(),
        ] {
            assert!(matches!(save_group(&app, &ns, &g, bad.as_bytes()).await, Err(ApiError::BadBody(_))), "{bad}");
        }
        delete_group(&app, &ns, &g).await.unwrap();
        assert!(app.store.blobs.lock().unwrap().is_empty(), "deleted with its group");
    }

    #[tokio::test]
    async fn a_saved_group_in_s3_past_what_an_answer_holds_is_answered_by_reference() {
        let mut config = Config::for_table("t");
        config.batch_response_bytes = 100;
        let app = App { config, store: MemoryStore::<()>::default() };
        app.store.spill_above.store(10, std::sync::atomic::Ordering::SeqCst);
        let (ns, g) = (Namespace::default(), GroupId::parse("g1").unwrap());
        let saved = format!(r#"{{"result":[["g1",null],[[["{}",null],null]]]}}"#, "t".repeat(100));
        save_group(&app, &ns, &g, saved.as_bytes()).await.unwrap();
        let answer: serde_json::Value =
            serde_json::from_str(&restore_group(&app, &ns, &g).await.unwrap().body).unwrap();
        assert_eq!(answer["result"], serde_json::Value::Null);
        assert!(answer["result_ref"]["url"].as_str().unwrap().contains("/group/g1/"), "{answer}");
        assert_eq!(answer["result_ref"]["bytes"], saved.len() - r#"{"result":}"#.len());
    }
}
