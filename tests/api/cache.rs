//! The processing cache over HTTP, with this test playing the worker: it
//! reads the processing's task message from SQS (moto), stores the
//! processing's result as a worker would, and reads the callback or the
//! quarantine message chord-join sends. The stack's two pumps deliver every
//! stream record four times, so "once" is checked against redelivery.

use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

use crate::helpers::{poll_until, success, Api, Resp};
use crate::sqs::{Queue, TaskMessage};

const SETTLE: Duration = Duration::from_secs(60);
/// How long a queue is watched for a second message after the first.
const DUPLICATES: Duration = Duration::from_secs(3);

const TENANT_A: &str = "arn:aws:iam::111111111111:user/tenant-a";
const TENANT_B: &str = "arn:aws:iam::222222222222:user/tenant-b";

/// An operation whose messages all go to `queue`.
fn operation(queue: &str) -> Value {
    json!({
        "task": "tests.thumbnail",
        "queue": queue,
        "callback": {"task": "tests.thumbnail_done", "queue": queue},
        "quarantine": {"task": "tests.quarantine", "queue": queue},
        "ttl": 600,
    })
}

/// `POST /v1/cache/get-or-delegate` with `body`: one key or many.
async fn get_or_delegate(api: &Api, body: Value) -> Resp {
    api.call(Method::POST, "/v1/cache/get-or-delegate", Some(body.to_string())).await
}

async fn ask(api: &Api, op: &Value, uri: &str, cb_args: Value) -> Resp {
    get_or_delegate(api, json!({"op": "thumbnail", "uri": uri, "cb_args": cb_args, "operation": op})).await
}

async fn entry(api: &Api, uri: &str) -> Value {
    let body = json!({"op": "thumbnail", "uri": uri});
    api.call(Method::POST, "/v1/cache/entry", Some(body.to_string())).await.expect(200).json
}

async fn wait_state(api: &Api, uri: &str, state: &str) -> Value {
    poll_until(&format!("entry {uri} {state}"), SETTLE, || async {
        let e = entry(api, uri).await;
        (e["state"] == state).then_some(e)
    })
    .await
}

/// The messages of task `name` among `messages`.
fn named<'a>(messages: &'a [TaskMessage], name: &str) -> Vec<&'a TaskMessage> {
    messages.iter().filter(|m| m.headers["task"] == name).collect()
}

#[tokio::test]
async fn concurrent_misses_make_one_processing_and_one_callback_with_every_cb_args() {
    let api = Api::new();
    let queue = Queue::new(&api.id("cache")).await;
    let op = operation(&queue.name);
    let uri = format!("s3://bucket/{}.png", api.id("img"));
    let answers: Vec<Resp> = futures::stream::iter((0..20).map(|i| ask(&api, &op, &uri, json!({"client": i}))))
        .buffer_unordered(10)
        .collect()
        .await;
    let answers: Vec<Value> = answers.into_iter().map(|r| r.expect(200).json).collect();
    let delegated: Vec<&Value> = answers.iter().filter(|a| a["delegated"] == true).collect();
    assert_eq!(delegated.len(), 1, "one request delegates: {answers:?}");
    let task_id = delegated[0]["task_id"].as_str().unwrap().to_owned();
    assert!(answers.iter().all(|a| a["state"] == "processing" && a["task_id"] == task_id.as_str()));
    let mut counts: Vec<u64> = answers.iter().map(|a| a["waiters"].as_u64().unwrap()).collect();
    counts.sort();
    assert_eq!(counts, (1..=20).collect::<Vec<u64>>(), "each request appended once");
    // A miss while it runs: one read, one conditional write.
    let joined = ask(&api, &op, &uri, json!({"client": 20})).await.expect(200);
    assert_eq!((joined.json["waiters"].as_u64(), joined.ddb_calls), (Some(21), Some(2)));

    let sent = queue.expect(SETTLE, DUPLICATES).await;
    let processing = named(&sent, "tests.thumbnail");
    assert_eq!(processing.len(), 1, "one processing message");
    assert_eq!(processing[0].headers["id"], task_id.as_str());
    assert_eq!(processing[0].headers["group"], Value::Null);
    assert_eq!(processing[0].body[0], json!([uri]));

    api.put_task(&task_id, success(json!({"width": 64, "uri": uri}))).await.expect(200);
    let cached = wait_state(&api, &uri, "cached").await;
    assert_eq!(cached["task_id"], task_id.as_str());
    let sent = queue.expect(SETTLE, DUPLICATES).await;
    let callbacks = named(&sent, "tests.thumbnail_done");
    assert_eq!(callbacks.len(), 1, "one callback although every record came four times: {sent:?}");
    assert_eq!(callbacks[0].headers["id"], format!("{task_id}-callback"));
    let args = &callbacks[0].body[0][0];
    assert_eq!(args[0], json!({"width": 64, "uri": uri}));
    let mut clients: Vec<u64> = args[1].as_array().unwrap().iter().map(|c| c["client"].as_u64().unwrap()).collect();
    clients.sort();
    assert_eq!(clients, (0..=20).collect::<Vec<u64>>());

    // A hit: one consistent read, no message.
    let hit = ask(&api, &op, &uri, json!({"client": 99})).await.expect(200);
    assert_eq!(hit.json["state"], "cached");
    assert_eq!(hit.json["result"], json!({"width": 64, "uri": uri}));
    assert_eq!((hit.json["task_id"].as_str(), hit.ddb_calls), (Some(task_id.as_str()), Some(1)));
    assert!(queue.drain(DUPLICATES).await.is_empty(), "a hit sends nothing");
}

#[tokio::test]
async fn a_request_sent_again_with_its_request_id_appends_its_cb_args_once() {
    let api = Api::new();
    let queue = Queue::new(&api.id("again")).await;
    let op = operation(&queue.name);
    let uri = format!("s3://bucket/{}.png", api.id("again"));
    let body = |client: u64, rid: &str| json!({"op": "thumbnail", "uri": uri, "cb_args": {"client": client}, "operation": op, "request_id": rid});
    let first = get_or_delegate(&api, body(0, "req-0")).await.expect(200).json;
    assert_eq!((first["delegated"].as_bool(), first["waiters"].as_u64()), (Some(true), Some(1)));
    let task_id = first["task_id"].as_str().unwrap().to_owned();
    // The delegating request and a joining one, each sent twice: two waiters.
    let joined = get_or_delegate(&api, body(1, "req-1")).await.expect(200).json;
    assert_eq!(joined["waiters"], 2);
    for (client, rid) in [(0, "req-0"), (1, "req-1")] {
        let again = get_or_delegate(&api, body(client, rid)).await;
        assert_eq!(again.ddb_calls, Some(1), "a repeat is answered from the read: {}", again.text);
        let again = again.expect(200).json;
        assert_eq!((again["state"].as_str(), again["task_id"].as_str()), (Some("processing"), Some(task_id.as_str())));
        assert_eq!((again["delegated"].as_bool(), again["waiters"].as_u64()), (Some(false), Some(2)));
    }
    // Bulk requests carry one too.
    let requests = json!([{"op": "thumbnail", "uri": uri, "cb_args": {"client": 2}}]);
    let bulk = json!({"requests": requests, "operations": {"thumbnail": op}, "request_id": "req-2"});
    for _ in 0..2 {
        let answer = get_or_delegate(&api, bulk.clone()).await.expect(200).json;
        assert_eq!(answer["results"][0]["waiters"], 3);
    }
    // A bad request id changes nothing.
    for rid in ["", "has space", &"x".repeat(65)] {
        get_or_delegate(&api, body(3, rid)).await.expect_error(400, "invalid_body");
    }
    assert_eq!(entry(&api, &uri).await["waiters"], 3);

    api.put_task(&task_id, success(json!("done"))).await.expect(200);
    wait_state(&api, &uri, "cached").await;
    let sent = queue.expect(SETTLE, DUPLICATES).await;
    let callbacks = named(&sent, "tests.thumbnail_done");
    assert_eq!(callbacks.len(), 1, "{sent:?}");
    let clients: Vec<u64> =
        callbacks[0].body[0][0][1].as_array().unwrap().iter().map(|c| c["client"].as_u64().unwrap()).collect();
    assert_eq!(clients, [0, 1, 2], "each request's cb_args once");
}

#[tokio::test]
async fn a_bulk_request_answers_hits_and_delegates_misses_in_request_order() {
    let api = Api::new();
    let queue = Queue::new(&api.id("bulk")).await;
    let op = operation(&queue.name);
    let uris: Vec<String> = (0..300).map(|i| format!("doc://{}/{i}", api.id("bulk"))).collect();
    let bulk = |uris: Vec<String>, cb: Value| {
        let requests: Vec<Value> =
            uris.iter().map(|u| json!({"op": "thumbnail", "uri": u, "cb_args": cb.clone()})).collect();
        get_or_delegate(&api, json!({"requests": requests, "operations": {"thumbnail": op.clone()}}))
    };
    // Half of them cached first.
    let first = bulk(uris[..150].to_vec(), json!("first")).await.expect(200);
    let first = first.json["results"].as_array().unwrap().clone();
    assert!(first.iter().all(|a| a["delegated"] == true), "{:?}", first[0]);
    // Stored as workers would, a few at a time (the emulator serves a bounded number at once).
    futures::stream::iter(first.iter().zip(&uris))
        .map(|(a, uri)| {
            let api = &api;
            async move {
                api.put_task(a["task_id"].as_str().unwrap(), success(json!({"of": uri}))).await.expect(200);
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    for uri in &uris[..150] {
        wait_state(&api, uri, "cached").await;
    }
    let mut asked = uris.clone();
    asked.push(uris[0].clone()); // a key twice: answered twice, the same
    let second = bulk(asked, json!("second")).await.expect(200);
    let results = second.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 301);
    for (i, (answer, uri)) in results.iter().zip(uris.iter().chain([&uris[0]])).enumerate() {
        assert_eq!(answer["uri"], uri.as_str(), "request order");
        if i < 150 || i == 300 {
            assert_eq!((answer["state"].as_str(), &answer["result"]), (Some("cached"), &json!({"of": uri})));
        } else {
            assert_eq!((answer["state"].as_str(), &answer["delegated"]), (Some("processing"), &json!(true)));
        }
    }
    // The hits cost their share of three BatchGetItem calls; each miss one write.
    assert_eq!(second.ddb_calls, Some(3 + 150));
    // 450 messages (and 150 callbacks) take longer to drain than one window.
    let deadline = std::time::Instant::now() + SETTLE;
    let mut sent = Vec::new();
    while named(&sent, "tests.thumbnail").len() < 300 && std::time::Instant::now() < deadline {
        sent.extend(queue.drain(Duration::from_secs(2)).await);
    }
    sent.extend(queue.drain(DUPLICATES).await);
    assert_eq!(named(&sent, "tests.thumbnail").len(), 300, "150 + 150 processings, each once");
    assert_eq!(named(&sent, "tests.thumbnail_done").len(), 150, "each cached key called back once");
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let api = Api::new();
    let queue = Queue::new(&api.id("bad")).await;
    let op = operation(&queue.name);
    let uri = format!("s3://b/{}", api.id("bad"));
    let with = |field: &str, value: Value| {
        let mut spec = op.clone();
        spec[field] = value;
        json!({"op": "thumbnail", "uri": uri, "operation": spec})
    };
    let cases = [
        (json!({"op": "thumb nail", "uri": uri, "operation": op}), 400, "invalid_body"),
        (json!({"op": "thumbnail", "uri": "", "operation": op}), 400, "invalid_body"),
        (json!({"op": "thumbnail", "uri": "u".repeat(2049), "operation": op}), 400, "invalid_body"),
        (json!({"op": "thumbnail", "uri": uri}), 400, "unknown_operation"),
        (json!({"op": "thumbnail", "uri": uri, "operation": op, "requests": []}), 400, "invalid_body"),
        (json!({"op": "thumbnail", "uri": uri, "operation": op, "extra": 1}), 400, "invalid_body"),
        (json!({"op": "thumbnail", "uri": uri, "operation": op, "cb_args": "x".repeat(8200)}), 400, "invalid_body"),
        (with("ttl", json!(0)), 400, "invalid_body"),
        (with("lease", json!(5)), 400, "invalid_body"),
        (with("task", json!("")), 400, "invalid_body"),
        (with("color", json!("red")), 400, "invalid_body"),
        // No key at all is bad input, not a batch too large.
        (json!({"requests": [], "operations": {"thumbnail": op}}), 400, "invalid_body"),
    ];
    for (body, status, code) in cases {
        get_or_delegate(&api, body.clone()).await.expect_error(status, code);
    }
    let many: Vec<Value> = (0..1001).map(|i| json!({"op": "thumbnail", "uri": format!("{uri}/{i}")})).collect();
    get_or_delegate(&api, json!({"requests": many, "operations": {"thumbnail": op}}))
        .await
        .expect_error(413, "batch_too_large");
    assert_eq!(entry(&api, &uri).await["state"], "missing", "nothing was stored");
    assert!(queue.drain(DUPLICATES).await.is_empty(), "nothing was sent");
}

#[tokio::test]
async fn waiters_are_bounded_in_bytes_with_a_clear_error() {
    let api = Api::new();
    let queue = Queue::new(&api.id("bound")).await;
    let op = operation(&queue.name);
    let uri = format!("s3://b/{}", api.id("bound"));
    let big = "x".repeat(8000);
    for _ in 0..8 {
        ask(&api, &op, &uri, json!(big)).await.expect(200);
    }
    // 8 x 8002 bytes stored; a ninth passes CACHE_MAX_WAITERS_BYTES (65536).
    let refused = ask(&api, &op, &uri, json!(big)).await.expect_error(409, "too_many_waiters");
    assert!(refused.text.contains("CACHE_MAX_WAITERS_BYTES"), "{}", refused.text);
    assert_eq!(entry(&api, &uri).await["waiters"], 8);
    // Small cb_args still fit.
    assert_eq!(ask(&api, &op, &uri, json!(1)).await.expect(200).json["waiters"], 9);
}

/// One request that names a new key many times adds all its waiters in the
/// entry's first write: they are bounded as the entry's are, before anything
/// is written (60 copies of 8 KB would pass DynamoDB's item limit).
#[tokio::test]
async fn one_request_cannot_pass_the_waiters_bounds_of_a_new_key() {
    let api = Api::new();
    let queue = Queue::new(&api.id("copies")).await;
    let op = operation(&queue.name);
    let uri = format!("s3://b/{}", api.id("copies"));
    let big = "x".repeat(8000);
    let requests: Vec<Value> = (0..60).map(|_| json!({"op": "thumbnail", "uri": uri, "cb_args": big})).collect();
    let refused = get_or_delegate(&api, json!({"requests": requests, "operations": {"thumbnail": op}}))
        .await
        .expect_error(409, "too_many_waiters");
    assert!(refused.text.contains("CACHE_MAX_WAITERS_BYTES"), "{}", refused.text);
    assert_eq!(entry(&api, &uri).await["state"], "missing", "nothing written");
    // Within the bounds, the same key many times is one processing.
    let requests: Vec<Value> = (0..8).map(|i| json!({"op": "thumbnail", "uri": uri, "cb_args": i})).collect();
    let answered =
        get_or_delegate(&api, json!({"requests": requests, "operations": {"thumbnail": op}})).await.expect(200);
    assert_eq!(answered.json["results"][7]["waiters"], 8, "{}", answered.text);
}

#[tokio::test]
async fn tenants_have_their_own_entries_and_queues() {
    let api = Api::new();
    let (a, b) = (api.as_caller(TENANT_A), api.as_caller(TENANT_B));
    let qa = Queue::new(&format!("tenant-a-{}", api.id("cache"))).await;
    let qb = Queue::new(&format!("tenant-b-{}", api.id("cache"))).await;
    let uri = format!("s3://shared/{}", api.id("same"));
    let ra = ask(&a, &operation(&qa.name), &uri, json!("a")).await.expect(200).json;
    let rb = ask(&b, &operation(&qb.name), &uri, json!("b")).await.expect(200).json;
    assert!(ra["delegated"] == true && rb["delegated"] == true, "{ra} {rb}");
    assert_ne!(ra["task_id"], rb["task_id"]);
    // B may not aim a processing, a callback or a quarantine at A's queue.
    for field in ["queue", "callback", "quarantine"] {
        let mut spec = operation(&qb.name);
        spec[field] = if field == "queue" { json!(qa.name) } else { json!({"task": "t", "queue": qa.name}) };
        let other = format!("{uri}/{field}");
        ask(&b, &spec, &other, json!(null)).await.expect_error(400, "callback_not_allowed");
        assert_eq!(entry(&b, &other).await["state"], "missing");
    }
    // B storing a result under A's processing id settles nothing of A's.
    let a_task = ra["task_id"].as_str().unwrap();
    b.put_task(a_task, success(json!("from b"))).await.expect(200);
    a.put_task(a_task, success(json!("from a"))).await.expect(200);
    assert_eq!(wait_state(&a, &uri, "cached").await["task_id"], a_task);
    let hit = ask(&a, &operation(&qa.name), &uri, json!(null)).await.expect(200).json;
    assert_eq!(hit["result"], "from a");
    assert_eq!(entry(&b, &uri).await["state"], "processing", "B's own processing is still running");
    let callbacks = qa.expect(SETTLE, DUPLICATES).await;
    assert_eq!(named(&callbacks, "tests.thumbnail_done").len(), 1);
    assert!(named(&qb.drain(DUPLICATES).await, "tests.thumbnail_done").is_empty());
}

#[tokio::test]
async fn a_vanished_processing_is_delegated_again_after_its_lease_keeping_its_waiters() {
    let api = Api::new();
    let queue = Queue::new(&api.id("lease")).await;
    let mut op = operation(&queue.name);
    op["lease"] = json!(10);
    let uri = format!("s3://b/{}", api.id("lease"));
    let first = ask(&api, &op, &uri, json!(1)).await.expect(200).json;
    let old = first["task_id"].as_str().unwrap().to_owned();
    // While the lease holds, requests join it.
    assert_eq!(ask(&api, &op, &uri, json!(2)).await.expect(200).json["delegated"], false);
    wait_state(&api, &uri, "missing").await; // the lease ran out
    let again = ask(&api, &op, &uri, json!(3)).await.expect(200).json;
    assert_eq!((&again["delegated"], &again["waiters"]), (&json!(true), &json!(3)), "{again}");
    let new = again["task_id"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    // The vanished one's result, should it come, settles nothing.
    api.put_task(&old, success(json!("late"))).await.expect(200);
    api.put_task(&new, success(json!("fresh"))).await.expect(200);
    wait_state(&api, &uri, "cached").await;
    let sent = queue.expect(SETTLE, DUPLICATES).await;
    assert_eq!(named(&sent, "tests.thumbnail").len(), 2);
    let callbacks = named(&sent, "tests.thumbnail_done");
    assert_eq!(callbacks.len(), 1);
    assert_eq!(callbacks[0].body[0][0], json!(["fresh", [1, 2, 3]]));
}

#[tokio::test]
async fn a_failure_sends_one_quarantine_message_and_the_next_request_delegates_again() {
    let api = Api::new();
    let queue = Queue::new(&api.id("fail")).await;
    let op = operation(&queue.name);
    let uri = format!("s3://b/{}", api.id("fail"));
    let task = ask(&api, &op, &uri, json!("w")).await.expect(200).json["task_id"].as_str().unwrap().to_owned();
    // A retry keeps the entry (and renews its lease).
    api.put_task(&task, json!({"status": "RETRY", "result": {"exc_type": "Retry", "exc_message": []}}))
        .await
        .expect(200);
    let error = json!({"exc_type": "ValueError", "exc_message": ["corrupt", 3], "exc_module": "builtins"});
    api.put_task(&task, json!({"status": "FAILURE", "result": error, "traceback": "tb"})).await.expect(200);
    wait_state(&api, &uri, "missing").await;
    let sent = queue.expect(SETTLE, DUPLICATES).await;
    let quarantined = named(&sent, "tests.quarantine");
    assert_eq!(quarantined.len(), 1, "{sent:?}");
    assert_eq!(quarantined[0].body[0], json!(["thumbnail", uri, error]));
    assert_eq!(quarantined[0].headers["id"], format!("{task}-quarantine"));
    assert!(named(&sent, "tests.thumbnail_done").is_empty(), "no callback for a failure");
    let again = ask(&api, &op, &uri, json!("w2")).await.expect(200).json;
    assert_eq!((&again["delegated"], &again["waiters"]), (&json!(true), &json!(1)));
    assert_ne!(again["task_id"], task.as_str());
}

#[tokio::test]
async fn a_key_can_stay_quarantined_for_a_while_or_be_invalidated() {
    let api = Api::new();
    let queue = Queue::new(&api.id("hold")).await;
    let mut op = operation(&queue.name);
    op["quarantine_for"] = json!(3600);
    let uri = format!("s3://b/{}", api.id("hold"));
    let task = ask(&api, &op, &uri, json!(null)).await.expect(200).json["task_id"].as_str().unwrap().to_owned();
    let invalidate = |uri: &str| {
        let body = json!({"op": "thumbnail", "uri": uri}).to_string();
        let api = &api;
        async move { api.call(Method::POST, "/v1/cache/invalidate", Some(body)).await.expect(200).json }
    };
    // A processing is not invalidated: its waiters are owed a callback.
    assert_eq!(
        invalidate(&uri).await,
        json!({"invalidated": false, "state": "processing", "task_id": task, "op": "thumbnail", "uri": uri})
    );
    let error = json!({"exc_type": "ProcessingInQuarantineException", "exc_message": [{"why": "404"}]});
    api.put_task(&task, json!({"status": "FAILURE", "result": error})).await.expect(200);
    let held = wait_state(&api, &uri, "quarantined").await;
    assert_eq!(held["error"], error);
    let answer = ask(&api, &op, &uri, json!(null)).await.expect(200).json;
    assert_eq!(answer["state"], "quarantined");
    assert!(answer["until"].as_i64().unwrap() > dynachord::time::now_epoch() + 3000);
    assert_eq!(invalidate(&uri).await["invalidated"], true);
    assert_eq!(ask(&api, &op, &uri, json!(null)).await.expect(200).json["delegated"], true);
}

#[tokio::test]
async fn a_large_result_stays_on_its_task_and_the_callback_refers_to_it() {
    let api = Api::new();
    let queue = Queue::new(&api.id("large")).await;
    let op = operation(&queue.name);
    let uri = format!("s3://b/{}", api.id("large"));
    let task = ask(&api, &op, &uri, json!(7)).await.expect(200).json["task_id"].as_str().unwrap().to_owned();
    // Past CACHE_INLINE_RESULT_BYTES (200 KiB), under what the local stack answers whole (256 KiB).
    let value = crate::helpers::random_hex(220_000);
    api.put_task(&task, success(json!(value))).await.expect(200);
    let cached = wait_state(&api, &uri, "cached").await;
    assert_eq!(cached["result_task"], task.as_str());
    let hit = ask(&api, &op, &uri, json!(null)).await.expect(200).json;
    assert_eq!((&hit["result_task"], &hit["result"]), (&json!(task), &Value::Null));
    assert_eq!(api.get_task(&task).await.expect(200).json["result"], json!(value));
    let sent = queue.expect(SETTLE, DUPLICATES).await;
    let callbacks = named(&sent, "tests.thumbnail_done");
    assert_eq!(callbacks.len(), 1);
    assert_eq!(callbacks[0].body[0][0][0]["dynachord_ref"]["task_id"], task.as_str());
    assert_eq!(callbacks[0].body[0][0][1], json!([7]));
}

#[tokio::test]
async fn a_queue_that_refuses_the_processing_is_a_400_and_the_key_stays_open() {
    let api = Api::new();
    let queue = Queue::new(&api.id("open")).await;
    let uri = format!("s3://b/{}", api.id("refused"));
    let missing = operation(&format!("{}-never-created", queue.name));
    ask(&api, &missing, &uri, json!("w1")).await.expect_error(400, "delegation_refused");
    let again = ask(&api, &operation(&queue.name), &uri, json!("w2")).await.expect(200).json;
    assert_eq!(again["delegated"], true, "{again}");
    let sent = queue.expect(SETTLE, DUPLICATES).await;
    assert_eq!(named(&sent, "tests.thumbnail").len(), 1);
}
