//! The cache's promises (K1 to K5 in `docs/INVARIANTS.md`) held against the
//! in-memory store and a scripted sink: each test breaks one on purpose (a
//! race, a hostile bound, a send or a write that fails at the worst moment)
//! and shows it holds. The integration suite runs the same paths on
//! DynamoDB Local through the functions.

use serde_json::{json, Value};
use std::sync::atomic::Ordering;

use super::memory::MemoryCacheStore as MemoryStore;
use super::store::{EntryClaim, Settle};
use super::*;
use crate::fakes::{transient, unknown, FakeSink};
use crate::ids::TaskId;
use crate::meta::State;
use crate::once::PERSIST_ATTEMPTS;
use crate::service::App;
use crate::store::{ResultStore, TaskRecord};
use crate::time::now_epoch;

fn config(extra: &[(&str, &str)]) -> Config {
    let mut vars: Vec<(String, String)> = vec![
        ("TABLE_NAME".into(), "t".into()),
        ("AUTH_MODE".into(), "none".into()),
        ("CALLBACK_QUEUE_URLS".into(), "celery=http://q/celery,thumbs=http://q/thumbs".into()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())).unwrap()
}

fn app(extra: &[(&str, &str)]) -> App<MemoryStore> {
    App { config: config(extra), store: MemoryStore::default() }
}

fn ns(name: &str) -> Namespace {
    Namespace::parse(name).unwrap()
}

const OPERATION: &str = r#"{"task": "t.thumb", "callback": {"task": "t.done"}, "quarantine": {"task": "t.bad"}}"#;

/// One key's get-or-delegate, as a worker sends it.
fn request(uri: &str, cb_args: Value) -> Vec<u8> {
    let operation: Value = serde_json::from_str(OPERATION).unwrap();
    json!({"op": "thumbnail", "uri": uri, "cb_args": cb_args, "operation": operation}).to_string().into_bytes()
}

async fn ask(app: &App<MemoryStore>, sink: &FakeSink, ns: &Namespace, body: &[u8]) -> Result<Value, ApiError> {
    let reply = get_or_delegate(app, sink, ns, body).await?;
    Ok(serde_json::from_str(&reply.body).unwrap())
}

/// The processing's task stores `status` with `result`, as its worker
/// would; the stream's view of it.
async fn finish_task(app: &App<MemoryStore>, ns: &Namespace, task_id: &str, status: State, result: Value) -> Done {
    let id = TaskId::parse(task_id).unwrap();
    let meta = json!({"status": status.as_str(), "result": result, "task_id": task_id});
    let record = TaskRecord {
        task_id: id.clone(),
        status: status.clone(),
        json: meta.to_string(),
        expires_at: now_epoch() + 3600,
        group_id: None,
        group_index: None,
        chord: None,
        upload: None,
        claim: None,
    };
    app.store.put_task(ns, &record).await.unwrap();
    Done {
        sequence: format!("seq-{task_id}-{}", status.as_str()),
        ns: ns.clone(),
        hash: crate::ids::entry_of_processing(task_id).unwrap().to_owned(),
        task_id: id,
        status,
        expires_at: now_epoch() + 3600,
    }
}

fn settler(app: App<MemoryStore>, sink: FakeSink) -> Settler<MemoryStore, FakeSink> {
    Settler::new(app.store, sink, app.config)
}

fn callbacks(sink: &FakeSink) -> Vec<String> {
    sink.sent().into_iter().filter(|(task, ..)| task == "t.done").map(|(_, _, args)| args).collect()
}

#[tokio::test]
async fn k1_one_processing_per_key_however_many_misses_race() {
    let (app, sink, ns) = (app(&[]), FakeSink::default(), ns("default"));
    let asks = (0..8).map(|i| ask(&app, &sink, &ns, Box::leak(request("s3://b/a.png", json!(i)).into_boxed_slice())));
    let answers = futures::future::join_all(asks).await;
    let delegated = answers.iter().filter(|a| a.as_ref().unwrap()["delegated"] == true).count();
    assert_eq!(delegated, 1, "{answers:?}");
    assert_eq!(sink.sent().len(), 1, "one processing message");
    let entry = app.store.cache_entry(&ns, &entry_hash("thumbnail", "s3://b/a.png")).await.unwrap().unwrap();
    assert_eq!(entry.waiter_count, 8, "every miss waits on the one processing");
}

#[tokio::test]
async fn k1_a_processing_is_delegated_again_only_after_its_lease_and_started_renews_it() {
    let (app, sink, ns) = (app(&[]), FakeSink::default(), ns("default"));
    let first = ask(&app, &sink, &ns, &request("u", json!(1))).await.unwrap();
    let task_id = first["task_id"].as_str().unwrap().to_owned();
    let hash = entry_hash("thumbnail", "u");
    // STARTED renews the lease from the stream.
    app.store.cache_lease(&ns, &hash, &task_id, now_epoch() + 5).await.unwrap();
    let started = finish_task(&app, &ns, &task_id, State::Started, Value::Null).await;
    let s = settler(app, FakeSink::default());
    assert!(s.handle(vec![started]).await.is_empty());
    let entry = s.store.cache_entry(&ns, &hash).await.unwrap().unwrap();
    assert!(entry.lease_until > now_epoch() + 600, "renewed to the operation's lease");
    let app = App { config: s.config, store: s.store };
    // While it holds the lease, a miss joins; once it ran out, one delegates again, keeping the waiters.
    let joined = ask(&app, &sink, &ns, &request("u", json!(2))).await.unwrap();
    assert_eq!((joined["delegated"].clone(), joined["task_id"].clone()), (json!(false), json!(task_id)));
    app.store.cache_lease(&ns, &hash, &task_id, now_epoch() - 1).await.unwrap();
    let again = ask(&app, &sink, &ns, &request("u", json!(3))).await.unwrap();
    assert_eq!(again["delegated"], true);
    assert_ne!(again["task_id"], json!(task_id));
    assert_eq!(again["waiters"], 3, "the vanished processing's waiters are kept");
    assert_eq!(sink.sent().len(), 2);
}

#[tokio::test]
async fn k2_waiters_are_bounded_in_count_and_bytes_and_a_refusal_changes_nothing() {
    let (app, sink, ns) =
        (app(&[("CACHE_MAX_WAITERS", "2"), ("CACHE_MAX_WAITERS_BYTES", "1024")]), FakeSink::default(), ns("default"));
    ask(&app, &sink, &ns, &request("u", json!(1))).await.unwrap();
    ask(&app, &sink, &ns, &request("u", json!(2))).await.unwrap();
    let hash = entry_hash("thumbnail", "u");
    let before = app.store.cache_entry(&ns, &hash).await.unwrap();
    let third = ask(&app, &sink, &ns, &request("u", json!(3))).await.unwrap_err();
    assert_eq!(third.status_and_code(), (409, "too_many_waiters"));
    let big = ask(&app, &sink, &ns, &request("v", json!("x".repeat(9000)))).await.unwrap_err();
    assert_eq!(big.status_and_code(), (400, "invalid_body"), "one request's cb_args past CACHE_MAX_CB_ARGS_BYTES");
    assert_eq!(app.store.cache_entry(&ns, &hash).await.unwrap(), before, "nothing changed");
    // Many waiters of one request past the bytes bound: refused before any write.
    let many = json!({"requests": (0..2).map(|_| json!({"op": "thumbnail", "uri": "w", "cb_args": "y".repeat(600)}))
        .collect::<Vec<_>>(), "operations": {"thumbnail": serde_json::from_str::<Value>(OPERATION).unwrap()}});
    let refused = ask(&app, &sink, &ns, many.to_string().as_bytes()).await.unwrap_err();
    assert_eq!(refused.status_and_code().1, "too_many_waiters");
    assert!(app.store.cache_entry(&ns, &entry_hash("thumbnail", "w")).await.unwrap().is_none());
    assert_eq!(sink.sent().len(), 1, "only the first key's processing went out");
}

/// A key delegated and its processing succeeded: the settler and its record.
async fn succeeded(sink: FakeSink) -> (Settler<MemoryStore, FakeSink>, Done) {
    let (app, ns) = (app(&[]), ns("default"));
    let delegating = FakeSink::default();
    let first = ask(&app, &delegating, &ns, &request("u", json!("a"))).await.unwrap();
    ask(&app, &delegating, &ns, &request("u", json!("b"))).await.unwrap();
    let done = finish_task(&app, &ns, first["task_id"].as_str().unwrap(), State::Success, json!({"w": 64})).await;
    (settler(app, sink), done)
}

#[tokio::test]
async fn k3_the_callback_goes_once_with_every_waiter_however_often_its_record_comes() {
    let (s, done) = succeeded(FakeSink::default()).await;
    for _ in 0..3 {
        assert!(s.handle(vec![done.clone(), done.clone()]).await.is_empty());
    }
    assert_eq!(callbacks(&s.sink), [r#"[[{"w":64},["a","b"]]]"#]);
    let entry = s.store.cache_entry(&done.ns, &done.hash).await.unwrap().unwrap();
    assert_eq!((entry.phase, entry.result.as_deref()), (CachePhase::Cached, Some(r#"{"w":64}"#)));
}

#[tokio::test]
async fn k3_a_finish_that_keeps_failing_after_the_send_never_sends_again() {
    let (s, done) = succeeded(FakeSink::default()).await;
    s.store.ext.fail_finishes.store(PERSIST_ATTEMPTS, Ordering::SeqCst);
    let retried = s.handle(vec![done.clone()]).await;
    assert_eq!(retried, vec![done.sequence.clone()], "retried");
    assert_eq!(callbacks(&s.sink).len(), 1);
    assert!(s.handle(vec![done.clone()]).await.is_empty());
    assert_eq!(callbacks(&s.sink).len(), 1, "the retry finished the entry without a second send");
    let entry = s.store.cache_entry(&done.ns, &done.hash).await.unwrap().unwrap();
    assert_eq!(entry.phase, CachePhase::Cached);
}

#[tokio::test]
async fn k3_a_claim_taken_over_before_the_send_sends_nothing() {
    let (s, done) = succeeded(FakeSink::default()).await;
    s.store.ext.steal_claims.store(true, Ordering::SeqCst);
    assert!(s.handle(vec![done.clone()]).await.is_empty());
    assert!(callbacks(&s.sink).is_empty());
}

#[tokio::test]
async fn k3_a_recheck_that_fails_sends_nothing_and_gives_the_claim_back_for_the_retry() {
    let (s, done) = succeeded(FakeSink::default()).await;
    s.store.ext.fail_rechecks.store(1, Ordering::SeqCst);
    let retried = s.handle(vec![done.clone()]).await;
    assert_eq!(retried, vec![done.sequence.clone()]);
    assert!(callbacks(&s.sink).is_empty(), "nothing went out");
    let entry = s.store.cache_entry(&done.ns, &done.hash).await.unwrap().unwrap();
    assert!(entry.lease_until <= now_epoch(), "the claim was given back, not left to lapse");
    assert!(s.handle(vec![done.clone()]).await.is_empty());
    assert_eq!(callbacks(&s.sink).len(), 1, "the retry sent it, once");
}

#[tokio::test]
async fn k3_a_claim_that_took_over_from_one_that_was_sending_settles_without_sending() {
    let (s, done) = succeeded(FakeSink::default()).await;
    // An earlier claim re-checked itself for its send, then died: its lease ran out.
    let (ns, hash, now) = (&done.ns, done.hash.as_str(), now_epoch());
    let claim = EntryClaim { task_id: done.task_id.as_str(), token: "crashed", lease_until: now - 1 };
    let settle = Settle::Success { result: Some("1".into()), result_task: None, expires_at: now + 60 };
    s.store.cache_claim(ns, hash, &claim, &settle, now).await.unwrap();
    assert!(s.store.cache_renew(ns, hash, "crashed", now - 1, true).await.unwrap());
    assert!(s.handle(vec![done.clone()]).await.is_empty());
    assert!(callbacks(&s.sink).is_empty(), "its message may have gone out: none goes out again");
    assert_eq!(s.store.cache_entry(ns, hash).await.unwrap().unwrap().phase, CachePhase::Cached);
}

#[tokio::test]
async fn k3_a_send_whose_outcome_is_unknown_counts_as_sent_and_settles_the_entry() {
    let (s, done) = succeeded(FakeSink::answering(vec![Err(unknown())])).await;
    assert!(s.handle(vec![done.clone()]).await.is_empty(), "nothing to retry");
    assert!(s.handle(vec![done.clone()]).await.is_empty());
    assert_eq!(callbacks(&s.sink).len(), 1, "it may have gone out: never sent again");
    assert_eq!(s.store.cache_entry(&done.ns, &done.hash).await.unwrap().unwrap().phase, CachePhase::Cached);
}

#[tokio::test]
async fn k4_a_message_that_cannot_be_sent_is_tried_a_bounded_number_of_times_then_settled_without_it() {
    let attempts = config(&[]).chord.max_attempts as usize;
    let (s, done) = succeeded(FakeSink::answering((0..attempts + 5).map(|_| Err(transient())).collect())).await;
    let mut deliveries = 0;
    while !s.handle(vec![done.clone()]).await.is_empty() {
        deliveries += 1;
        assert!(deliveries <= attempts, "the record came back past CHORD_MAX_ATTEMPTS");
    }
    assert_eq!(deliveries, attempts);
    assert!(callbacks(&s.sink).is_empty());
    assert_eq!(s.store.cache_entry(&done.ns, &done.hash).await.unwrap().unwrap().phase, CachePhase::Cached);
}

#[tokio::test]
async fn k4_a_failed_processing_sends_one_quarantine_message_and_the_next_request_delegates_again() {
    let (app, sink, ns) = (app(&[]), FakeSink::default(), ns("default"));
    let first = ask(&app, &sink, &ns, &request("u", json!(1))).await.unwrap();
    let error = json!({"exc_type": "ValueError", "exc_message": ["bad image"], "exc_module": "builtins"});
    let done = finish_task(&app, &ns, first["task_id"].as_str().unwrap(), State::Failure, error).await;
    let s = settler(app, FakeSink::default());
    assert!(s.handle(vec![done.clone(), done]).await.is_empty());
    let sent = s.sink.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "t.bad");
    let args: Value = serde_json::from_str(&sent[0].2).unwrap();
    assert_eq!((&args[0], &args[1], &args[2]["exc_type"]), (&json!("thumbnail"), &json!("u"), &json!("ValueError")));
    let app = App { config: s.config, store: s.store };
    let again = ask(&app, &sink, &ns, &request("u", json!(2))).await.unwrap();
    assert_eq!(again["delegated"], true);
}

#[tokio::test]
async fn k5_entries_and_queues_are_the_tenants_own() {
    let (app, sink) = (app(&[]), FakeSink::default());
    let (a, b) = (ns("tenant-a"), ns("tenant-b"));
    let first = ask(&app, &sink, &a, &request("u", json!(1))).await.unwrap();
    // Another tenant's same key is its own entry, its own processing.
    let theirs = ask(&app, &sink, &b, &request("u", json!(2))).await.unwrap();
    assert_eq!(theirs["delegated"], true);
    assert_ne!(theirs["task_id"], first["task_id"]);
    // A queue not granted is refused before anything is written.
    let foreign = json!({"op": "resize", "uri": "u", "operation": {"task": "t.r", "queue": "payments"}});
    let refused = ask(&app, &sink, &a, foreign.to_string().as_bytes()).await.unwrap_err();
    assert_eq!(refused.status_and_code().1, "callback_not_allowed");
    assert!(app.store.cache_entry(&a, &entry_hash("resize", "u")).await.unwrap().is_none());
    // A result stored under tenant b with tenant a's processing id settles nothing of a's.
    let forged = finish_task(&app, &b, first["task_id"].as_str().unwrap(), State::Success, json!("forged")).await;
    let s = settler(app, FakeSink::default());
    assert!(s.handle(vec![forged]).await.is_empty());
    assert!(s.sink.sent().is_empty());
    let entry = s.store.cache_entry(&a, &entry_hash("thumbnail", "u")).await.unwrap().unwrap();
    assert_eq!(entry.phase, CachePhase::Processing, "tenant a's processing is untouched");
}

#[tokio::test]
async fn invalidation_forgets_a_cached_result_and_leaves_a_processing_alone() {
    let (s, done) = succeeded(FakeSink::default()).await;
    assert!(s.handle(vec![done.clone()]).await.is_empty());
    let app = App { config: s.config, store: s.store };
    let body = br#"{"op": "thumbnail", "uri": "u"}"#;
    let state: Value = serde_json::from_str(&entry_state(&app, &done.ns, body).await.unwrap().body).unwrap();
    assert_eq!(state["state"], "cached");
    let gone: Value = serde_json::from_str(&invalidate(&app, &done.ns, body).await.unwrap().body).unwrap();
    assert_eq!(gone["invalidated"], true);
    let sink = FakeSink::default();
    let fresh = ask(&app, &sink, &done.ns, &request("u", json!(1))).await.unwrap();
    assert_eq!(fresh["delegated"], true);
    let kept: Value = serde_json::from_str(&invalidate(&app, &done.ns, body).await.unwrap().body).unwrap();
    assert_eq!((kept["invalidated"].clone(), kept["state"].clone()), (json!(false), json!("processing")));
}
