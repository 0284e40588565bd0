//! The operations behind the routes, generic over the store so they are
//! tested with a fake as well as with DynamoDB Local.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::time::Duration;
use tokio::time::Instant;

use crate::celery::Signature;
use crate::config::Config;
use crate::error::ApiError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::{pending_json, TaskMeta};
use crate::store::{PartOf, PutOutcome, ResultStore, Stored, TaskRecord};
use crate::time::now_epoch;

/// What a function holds for its lifetime: configuration and the store.
pub struct App<S> {
    pub config: Config,
    pub store: S,
}

/// A successful answer: status and JSON body (empty for 204).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn ok(body: String) -> Self {
        Self { status: 200, body }
    }

    pub fn no_content() -> Self {
        Self { status: 204, body: String::new() }
    }
}

/// First and longest pause between two reads of a long-poll. Each read is a
/// consistent `GetItem`; the pause grows so an idle wait costs a few reads a
/// second, while a result stored mid-wait is seen within a quarter second.
const POLL_FIRST: Duration = Duration::from_millis(25);
const POLL_MAX: Duration = Duration::from_millis(250);

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
        PutOutcome::Refused { stored } => {
            Err(ApiError::Conflict { task_id: id.to_string(), stored, refused: record.status.to_string() })
        }
    }
}

/// Bounds what a chord part can make chord-join send, before anything is
/// stored (invariants T2 and T3): the callback's size, its errbacks, and the queues
/// it and every signature in it name, which must be granted to `ns`.
fn check_callback(config: &Config, ns: &Namespace, callback: &str) -> Result<(), ApiError> {
    let limits = &config.chord;
    if callback.len() > limits.max_callback_bytes {
        return Err(ApiError::CallbackTooLarge { size: callback.len(), limit: limits.max_callback_bytes });
    }
    let sig = Signature::parse(callback).map_err(|e| ApiError::BadBody(format!("chord: {e}")))?;
    let errbacks = sig.errbacks().len();
    if errbacks > limits.max_errbacks {
        return Err(ApiError::CallbackNotAllowed(format!(
            "the callback has {errbacks} errbacks; at most {} are allowed",
            limits.max_errbacks
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
    let deadline = Instant::now() + wait;
    let mut pause = POLL_FIRST;
    loop {
        let stored = app.store.get_task(ns, id).await?;
        let ready = stored.as_ref().is_some_and(|s| s.status.is_ready());
        if ready || Instant::now() + pause > deadline {
            return Ok(Reply::ok(stored.map_or_else(|| pending_json(id), |s| s.json)));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
    }
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
/// tasks not yet ready until all are or the wait is over.
pub async fn batch_fetch<S: ResultStore>(app: &App<S>, ns: &Namespace, body: &[u8]) -> Result<Reply, ApiError> {
    let request: BatchRequest = crate::meta::json_object(body)
        .and_then(|()| serde_json::from_slice(body))
        .map_err(|e| ApiError::BadBody(format!("body is not a batch-get request: {e}")))?;
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
    let mut results: Vec<Option<Stored>> = app.store.get_tasks(ns, &ids).await?;
    loop {
        let waiting: Vec<usize> =
            (0..ids.len()).filter(|&i| !results[i].as_ref().is_some_and(|s| s.status.is_ready())).collect();
        if waiting.is_empty() || Instant::now() + pause > deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL_MAX);
        let again: Vec<TaskId> = waiting.iter().map(|&i| ids[i].clone()).collect();
        for (i, stored) in waiting.into_iter().zip(app.store.get_tasks(ns, &again).await?) {
            results[i] = stored;
        }
    }
    Ok(Reply::ok(batch_body(&ids, results, app.config.batch_response_bytes)))
}

/// `{"results": [...]}` in request order, within `budget` bytes as Lambda
/// counts them (the body JSON-escaped). Results are included in order while
/// the rest of the ids still fit as references; a result past that comes
/// back as a reference, `{"task_id", "status", "ref": {"bytes"}}`, to read
/// with `GET /v1/tasks/{task_id}`.
fn batch_body(ids: &[TaskId], results: Vec<Option<Stored>>, budget: usize) -> String {
    let pieces: Vec<(std::borrow::Cow<'_, str>, &str)> = ids
        .iter()
        .zip(&results)
        .map(|(id, stored)| match stored {
            Some(stored) => (std::borrow::Cow::Borrowed(stored.json.as_str()), stored.status.as_str()),
            None => (std::borrow::Cow::Owned(pending_json(id)), "PENDING"),
        })
        .collect();
    let costs: Vec<usize> = pieces.iter().map(|(piece, _)| escaped_len(piece)).collect();
    let mut body = String::with_capacity(pieces.iter().map(|(p, _)| p.len() + 1).sum::<usize>().min(budget) + 16);
    body.push_str(r#"{"results":["#);
    let mut used = escaped_len(&body) + 2;
    if used + costs.iter().sum::<usize>() + pieces.len() <= budget {
        // All of it fits, as almost always: no references to work out.
        for (i, (piece, _)) in pieces.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(piece);
        }
        body.push_str("]}");
        return body;
    }
    let references: Vec<String> = ids
        .iter()
        .zip(&pieces)
        .map(|(id, (piece, status))| {
            serde_json::json!({"task_id": id.as_str(), "status": status, "ref": {"bytes": piece.len()}}).to_string()
        })
        .collect();
    // What the items after each one cost at least: all of them as references.
    let mut after = vec![0usize; ids.len() + 1];
    for i in (0..ids.len()).rev() {
        after[i] = after[i + 1] + escaped_len(&references[i]) + 1;
    }
    for (i, (piece, _)) in pieces.iter().enumerate() {
        if i > 0 {
            body.push(',');
            used += 1;
        }
        let cost = costs[i];
        if used + cost + after[i + 1] <= budget {
            body.push_str(piece);
            used += cost;
        } else {
            body.push_str(&references[i]);
            used += escaped_len(&references[i]);
        }
    }
    body.push_str("]}");
    body
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
    result: Box<RawValue>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// `PUT /v1/groups/{group_id}`: `GroupResult.save`, the body Celery stores
/// (`{"result": <GroupResult.as_tuple()>}`). A later save replaces it.
pub async fn save_group<S: ResultStore>(
    app: &App<S>,
    ns: &Namespace,
    id: &GroupId,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let request: GroupRequest = crate::meta::json_object(body)
        .and_then(|()| serde_json::from_slice(body))
        .map_err(|e| ApiError::BadBody(format!("body is not a saved group: {e}")))?;
    let expires_at = expires_at(&app.config, request.expires_in)?;
    let doc = format!(r#"{{"result":{}}}"#, request.result.get());
    app.store.put_group(ns, id, &doc, expires_at).await?;
    Ok(Reply::ok(serde_json::json!({"group_id": id.as_str(), "expires_at": expires_at}).to_string()))
}

/// `GET /v1/groups/{group_id}`: the saved group, or 404 (Celery's restore gives None).
pub async fn restore_group<S: ResultStore>(app: &App<S>, ns: &Namespace, id: &GroupId) -> Result<Reply, ApiError> {
    match app.store.get_group(ns, id).await? {
        Some(doc) => Ok(Reply::ok(doc)),
        None => Err(ApiError::GroupNotFound(id.to_string())),
    }
}

/// `GET /v1/chords/{group_id}`: a chord's progress, or 404 before its first
/// part has been counted.
pub async fn chord_status<S: ResultStore>(app: &App<S>, ns: &Namespace, id: &GroupId) -> Result<Reply, ApiError> {
    match app.store.get_chord(ns, id).await? {
        Some(chord) => Ok(Reply::ok(
            serde_json::json!({
                "group_id": id.as_str(),
                "size": chord.size,
                "done": chord.done.min(chord.size),
                "state": chord.phase.as_str(),
                "callback_id": chord.callback_id,
                "error": chord.error,
            })
            .to_string(),
        )),
        None => Err(ApiError::ChordNotFound(id.to_string())),
    }
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
    async fn a_batch_past_its_response_budget_answers_the_rest_as_references() {
        let mut app = App { config: Config::for_table("t"), store: MemoryStore::default() };
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
}
