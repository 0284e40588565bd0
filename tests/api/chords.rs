//! Chords joined on the server from the stream, the callback dispatched once.
//! `./dev test` runs the stack with two pumps that each deliver every batch
//! twice, so every chord here is joined under redelivery.

use crate::helpers::{random_hex, Api};
use crate::sqs::Queue;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

pub(crate) struct Chord {
    pub(crate) gid: String,
    pub(crate) callback_id: String,
    pub(crate) callback: Value,
}

impl Chord {
    pub(crate) fn new(api: &Api, queue: &Queue, options: Value) -> Self {
        let gid = api.id("g");
        let callback_id = api.id("cb");
        let mut opts = json!({"task_id": callback_id, "reply_to": "oid-1", "group_id": gid, "queue": queue.name});
        opts.as_object_mut().unwrap().extend(options.as_object().cloned().unwrap_or_default());
        let callback = json!({"task": "proj.tasks.tsum", "args": [], "kwargs": {}, "options": opts, "subtask_type": null, "immutable": false});
        Self { gid, callback_id, callback }
    }

    pub(crate) fn part(&self, task_id: &str, index: usize, size: usize, status: &str, result: Value) -> Value {
        json!({
            "status": status, "result": result, "traceback": null, "children": [],
            "group_id": self.gid, "group_index": index, "task_id": task_id,
            "chord": {"size": size, "callback": self.callback},
        })
    }

    /// Stores `size` SUCCESS parts with `result(i)` (raw JSON text, so any
    /// number survives), `parallel` at a time, in shuffled order.
    async fn store_parts(&self, api: &Api, size: usize, parallel: usize, result: impl Fn(usize) -> String) {
        let mut order: Vec<usize> = (0..size).collect();
        order.reverse();
        order.rotate_left(size / 3);
        let parts: Vec<(String, String)> = order
            .iter()
            .map(|&i| {
                let id = api.id(&format!("p{i}"));
                let body = self.part(&id, i, size, "SUCCESS", json!("@result@")).to_string();
                (id, body.replace("\"@result@\"", &result(i)))
            })
            .collect();
        futures::stream::iter(parts)
            .map(|(id, body)| async move { api.put_task_raw(&id, &body).await.expect(200) })
            .buffer_unordered(parallel)
            .collect::<Vec<_>>()
            .await;
    }
}

#[tokio::test]
async fn a_chord_of_3_calls_back_once_with_results_in_index_order() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({}));
    chord.store_parts(&api, 3, 1, |i| format!(r#"{{"i":{i},"big":123456789012345678901234567890}}"#)).await;
    let messages = queue.expect(Duration::from_secs(60), Duration::from_secs(4)).await;
    assert_eq!(messages.len(), 1, "exactly one callback: {messages:?}");
    let m = &messages[0];
    assert_eq!(
        (m.headers["task"].as_str(), m.headers["id"].as_str()),
        (Some("proj.tasks.tsum"), Some(chord.callback_id.as_str()))
    );
    assert_eq!(m.headers["group"], json!(chord.gid));
    assert_eq!(m.properties["correlation_id"], json!(chord.callback_id));
    assert_eq!(m.properties["reply_to"], "oid-1");
    assert_eq!(m.properties["delivery_info"]["routing_key"], json!(queue.name));
    let results: Vec<u64> = m.body[0][0].as_array().unwrap().iter().map(|r| r["i"].as_u64().unwrap()).collect();
    assert_eq!(results, [0, 1, 2], "results in group_index order");
    assert_eq!(m.body[1], json!({}));
    assert!(m.raw_body.contains(r#"{"i":0,"big":123456789012345678901234567890}"#), "results exact: {}", m.raw_body);
    let status = api.call(reqwest::Method::GET, &format!("/v1/chords/{}", chord.gid), None).await.expect(200);
    // When its first part was counted: within the last minutes (the clocks are this machine's).
    let opened = status.json["opened_at"].as_i64().expect("opened_at");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now - 300..=now + 5).contains(&opened), "{opened} vs {now}");
    assert_eq!(
        status.json,
        json!({"group_id": chord.gid, "size": 3, "done": 3, "succeeded": 3, "failed": 0, "pending": 0,
               "state": "dispatched", "callback_id": chord.callback_id, "error": null, "opened_at": opened,
               "deadline_at": null, "stalled_at": null})
    );
}

#[tokio::test]
async fn callback_args_follow_the_results_unless_immutable() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let mut chord = Chord::new(&api, &queue, json!({}));
    chord.callback["args"] = json!(["extra", 7]);
    chord.callback["kwargs"] = json!({"scale": 2});
    chord.store_parts(&api, 2, 2, |i| i.to_string()).await;
    let m = queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].body[0], json!([[0, 1], "extra", 7]));
    assert_eq!(m[0].body[1], json!({"scale": 2}));
    assert_eq!(m[0].headers["argsrepr"], "([0, 1], 'extra', 7)");

    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let mut chord = Chord::new(&api, &queue, json!({}));
    chord.callback["args"] = json!(["only"]);
    chord.callback["immutable"] = json!(true);
    chord.store_parts(&api, 2, 2, |i| i.to_string()).await;
    let m = queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].body[0], json!(["only"]));
}

#[tokio::test]
async fn a_chord_of_10000_parts_calls_back_once_complete_and_in_order() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({}));
    chord.store_parts(&api, 10_000, 32, |i| i.to_string()).await;
    let messages = queue.expect(Duration::from_secs(300), Duration::from_secs(5)).await;
    assert_eq!(messages.len(), 1, "exactly one callback");
    let results = messages[0].body[0][0].as_array().unwrap();
    assert_eq!(results.len(), 10_000);
    assert!(results.iter().enumerate().all(|(i, r)| r.as_u64() == Some(i as u64)), "complete and in index order");
    let status = api.call(reqwest::Method::GET, &format!("/v1/chords/{}", chord.gid), None).await.expect(200);
    assert_eq!((status.json["done"].as_u64(), status.json["state"].as_str()), (Some(10_000), Some("dispatched")));
}

#[tokio::test]
async fn a_failed_part_fails_the_chord_like_celery() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let errback = json!({"task": "proj.tasks.on_error", "args": [], "kwargs": {}, "options": {"queue": queue.name}, "immutable": false});
    let chord = Chord::new(&api, &queue, json!({"link_error": [errback]}));
    let failure = json!({"exc_type": "ValueError", "exc_message": ["boom", 42], "exc_module": "builtins"});
    let ids: Vec<String> = (0..4).map(|i| api.id(&format!("p{i}"))).collect();
    for (i, id) in ids.iter().enumerate() {
        let (status, result) = match i {
            1 => ("FAILURE", failure.clone()),
            3 => (
                "REVOKED",
                json!({"exc_type": "TaskRevokedError", "exc_message": ["revoked"], "exc_module": "celery.exceptions"}),
            ),
            _ => ("SUCCESS", json!(i)),
        };
        api.put_task(id, chord.part(id, i, 4, status, result)).await.expect(200);
    }
    let messages = queue.expect(Duration::from_secs(60), Duration::from_secs(4)).await;
    assert_eq!(messages.len(), 1, "the errback only, never the callback: {messages:?}");
    assert_eq!(messages[0].headers["task"], "proj.tasks.on_error");
    assert_eq!(messages[0].body[0], json!([chord.callback_id]), "old-style errback: the failed task's id");
    let cb = api.get_task(&chord.callback_id).await.expect(200);
    assert_eq!(cb.json["status"], "FAILURE");
    assert_eq!(
        cb.json["result"],
        json!({"exc_type": "ChordError", "exc_message": [format!("Dependency {} raised ValueError('boom', 42)", ids[1])], "exc_module": "celery.exceptions"})
    );
    let status = api.call(reqwest::Method::GET, &format!("/v1/chords/{}", chord.gid), None).await.expect(200);
    assert_eq!(status.json["state"], "failed");
}

#[tokio::test]
async fn a_callback_too_large_for_its_queue_carries_a_reference_to_its_results() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({}));
    // Three results of 500 KB: the message would be over SQS's 1 MiB.
    chord.store_parts(&api, 3, 3, |i| format!("\"{}\"", i.to_string().repeat(500_000))).await;
    let messages = queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1, "sent once");
    let reference = &messages[0].body[0][0]["dynachord_ref"];
    let id = reference["task_id"].as_str().unwrap_or_else(|| panic!("no reference in {:?}", messages[0].body));
    // The results, stored as a result of their own (in S3, as they are past
    // what an item holds), read back whole: 1.5 MB is under INLINE_RESULT_BYTES.
    let stored = api.get_task(id).await.expect(200);
    assert_eq!(stored.json["status"], "SUCCESS");
    let expected: Vec<String> = (0..3).map(|i| i.to_string().repeat(500_000)).collect();
    assert_eq!(stored.json["result"], json!(expected), "every result, in order");
    assert_eq!(stored.json["result"].to_string().len() as u64, reference["bytes"].as_u64().unwrap());
}

#[tokio::test]
async fn results_adding_up_to_200_mb_fail_their_chord_past_what_chord_join_holds_and_the_rest_of_the_batch_goes_on() {
    let (api, other) = (Api::new(), Api::new());
    let (queue, other_queue) = (Queue::new(&api.id("q")).await, Queue::new(&other.id("q")).await);
    let huge = Chord::new(&api, &queue, json!({}));
    let healthy = Chord::new(&other, &other_queue, json!({}));
    // 290 parts of 700,000 random hex characters: 203 MB of results (each
    // in S3), past CHORD_MAX_RESULTS_BYTES (128 MiB). The healthy chord's parts are
    // stored among them, so their records share the stream's batches.
    const PARTS: usize = 290;
    futures::stream::iter(0..PARTS)
        .map(|i| {
            let (api, other, huge, healthy) = (&api, &other, &huge, &healthy);
            async move {
                let id = api.id(&format!("p{i}"));
                api.put_task(&id, huge.part(&id, i, PARTS, "SUCCESS", json!(random_hex(700_000)))).await.expect(200);
                if i % 97 == 0 {
                    let j = i / 97;
                    let id = other.id(&format!("p{j}"));
                    other.put_task(&id, healthy.part(&id, j, 3, "SUCCESS", json!(j))).await.expect(200);
                }
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    assert_fails_clearly(&api, &huge, "(CHORD_MAX_RESULTS_BYTES)").await;
    assert!(queue.drain(Duration::from_secs(1)).await.is_empty(), "nothing sent for the huge chord");
    let messages = other_queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1, "the healthy chord went on");
    assert_eq!(messages[0].body[0], json!([[0, 1, 2]]));
}

#[tokio::test]
async fn a_chord_of_tiny_then_well_compressed_huge_results_fails_cleanly_and_the_next_chord_goes_on() {
    let (api, other) = (Api::new(), Api::new());
    let (queue, other_queue) = (Queue::new(&api.id("q")).await, Queue::new(&other.id("q")).await);
    let huge = Chord::new(&api, &queue, json!({}));
    let healthy = Chord::new(&other, &other_queue, json!({}));
    // 25 tiny parts, then 560 of 250,000 "x" each: stored inline (each
    // compresses to a few hundred bytes), 140 MB once inflated, past
    // CHORD_MAX_RESULTS_BYTES (128 MiB). chord-join reads them in windows
    // bounded by what each part states it inflates to, and fails the chord.
    const TINY: usize = 25;
    const PARTS: usize = TINY + 560;
    futures::stream::iter(0..PARTS)
        .map(|i| {
            let (api, huge) = (&api, &huge);
            async move {
                let id = api.id(&format!("p{i}"));
                let result = if i < TINY { json!(i) } else { json!("x".repeat(250_000)) };
                api.put_task(&id, huge.part(&id, i, PARTS, "SUCCESS", result)).await.expect(200);
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for j in 0..3 {
        let id = other.id(&format!("p{j}"));
        other.put_task(&id, healthy.part(&id, j, 3, "SUCCESS", json!(j))).await.expect(200);
    }
    assert_fails_clearly(&api, &huge, "(CHORD_MAX_RESULTS_BYTES)").await;
    assert!(queue.drain(Duration::from_secs(1)).await.is_empty(), "nothing sent for the huge chord");
    let messages = other_queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1, "the healthy chord stored after it went on");
    assert_eq!(messages[0].body[0], json!([[0, 1, 2]]));
}

#[tokio::test]
async fn a_chords_status_counts_its_parts_by_state_and_names_the_failed_ones() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({}));
    let failure = json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"});
    let ids: Vec<String> = (0..6).map(|i| api.id(&format!("p{i}"))).collect();
    // Five of six parts: 0, 2 and 4 succeed, 1 and 3 fail; 5 never reports.
    for (i, id) in ids.iter().enumerate().take(5) {
        let (status, result) = if i % 2 == 1 { ("FAILURE", failure.clone()) } else { ("SUCCESS", json!(i)) };
        api.put_task(id, chord.part(id, i, 6, status, result)).await.expect(200);
    }
    let path = format!("/v1/chords/{}", chord.gid);
    let mut status = Value::Null;
    for _ in 0..120 {
        status = api.call(reqwest::Method::GET, &path, None).await.json;
        if status["done"] == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let counts = (&status["done"], &status["succeeded"], &status["failed"], &status["pending"]);
    assert_eq!(counts, (&json!(5), &json!(3), &json!(2), &json!(1)), "{status}");
    assert!(status.get("failed_ids").is_none(), "listed only on request");
    let listed = api.call(reqwest::Method::GET, &format!("{path}?failed_ids=true"), None).await.expect(200);
    assert_eq!(listed.json["failed_ids"], json!([ids[1], ids[3]]));
    assert_eq!(listed.json["failed_ids_truncated"], false);
    let bad = api.call(reqwest::Method::GET, &format!("{path}?failed_ids=maybe"), None).await.expect(400);
    assert_eq!(bad.json["error"]["code"], "invalid_query", "{}", bad.json);
}

#[tokio::test]
async fn a_body_that_tolerates_failed_parts_is_called_back_with_their_exceptions() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({"tolerated_failures": 2}));
    let failure = json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"});
    for i in 0..5 {
        let id = api.id(&format!("p{i}"));
        let (status, result) = if i == 1 || i == 4 { ("FAILURE", failure.clone()) } else { ("SUCCESS", json!(i)) };
        api.put_task(&id, chord.part(&id, i, 5, status, result)).await.expect(200);
    }
    let messages = queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0].body[0], json!([[0, failure, 2, 3, failure]]));
    let status = api.call(reqwest::Method::GET, &format!("/v1/chords/{}", chord.gid), None).await.expect(200);
    assert_eq!((&status.json["state"], &status.json["failed"]), (&json!("dispatched"), &json!(2)));
    // A tolerance that is not a count or a share is refused when the part is stored.
    let bad = Chord::new(&api, &queue, json!({"tolerated_failures": -1}));
    let id = api.id("bad-p0");
    let refused = api.put_task(&id, bad.part(&id, 0, 1, "SUCCESS", json!(0))).await.expect(400);
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("tolerated_failures"), "{}", refused.json);
    assert_eq!(api.get_task(&id).await.expect(200).json["status"], "PENDING", "nothing stored");
}

#[tokio::test]
async fn a_header_shape_nests_the_results_the_callback_gets_and_a_malformed_one_is_refused() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    // chord([a, b | group(c, d), e | group(f, g | group(h))], cb): five parts.
    let shape = json!([null, [null, null], [null, [null]]]);
    let chord = Chord::new(&api, &queue, json!({"dynachord_header_shape": shape}));
    let ids: Vec<String> = (0..5).map(|i| api.id(&format!("p{i}"))).collect();
    for (i, id) in ids.iter().enumerate().rev() {
        api.put_task(id, chord.part(id, i, 5, "SUCCESS", json!(i))).await.expect(200);
    }
    let messages = queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0].body[0], json!([[0, [1, 2], [3, [4]]]]));
    // A shape that does not hold the chord's parts, or is not arrays of
    // nulls, is refused when the part is stored, and nothing is stored.
    for (bad_shape, why) in [
        (json!([null, [null]]), "has 2 parts, but the chord has 3"),
        (json!([null, "x", null]), "arrays and nulls only"),
    ] {
        let bad = Chord::new(&api, &queue, json!({"dynachord_header_shape": bad_shape}));
        let id = api.id("bad-p0");
        let refused = api.put_task(&id, bad.part(&id, 0, 3, "SUCCESS", json!(0))).await.expect(400);
        assert_eq!(refused.json["error"]["code"], "invalid_meta", "{}", refused.json);
        assert!(refused.json["error"]["message"].as_str().unwrap().contains(why), "{}", refused.json);
        assert_eq!(api.get_task(&id).await.expect(200).json["status"], "PENDING", "nothing stored");
    }
}

#[tokio::test]
async fn a_body_that_asks_forgets_its_parts_results_once_it_is_sent() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({"forget_parts": true}));
    let ids: Vec<String> = (0..3).map(|i| api.id(&format!("p{i}"))).collect();
    for (i, id) in ids.iter().enumerate() {
        api.put_task(id, chord.part(id, i, 3, "SUCCESS", json!(i * 10))).await.expect(200);
    }
    let messages = queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0].body[0], json!([[0, 10, 20]]), "the callback has the results");
    // Forgotten after the send: each part reads as unknown (PENDING).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for id in &ids {
        while api.get_task(id).await.expect(200).json["status"] != "PENDING" {
            assert!(std::time::Instant::now() < deadline, "{id} was not forgotten");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let status = api.call(reqwest::Method::GET, &format!("/v1/chords/{}", chord.gid), None).await.expect(200);
    assert_eq!((&status.json["state"], &status.json["succeeded"]), (&json!("dispatched"), &json!(3)));
    // Anything but a boolean is refused when the part is stored.
    let bad = Chord::new(&api, &queue, json!({"forget_parts": "yes"}));
    let id = api.id("bad-p0");
    let refused = api.put_task(&id, bad.part(&id, 0, 1, "SUCCESS", json!(0))).await.expect(400);
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("forget_parts"), "{}", refused.json);
    assert_eq!(api.get_task(&id).await.expect(200).json["status"], "PENDING", "nothing stored");
}

#[tokio::test]
async fn a_callback_to_a_queue_that_does_not_exist_fails_the_chord_without_retrying_forever() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({"queue": api.id("no-such-queue")}));
    chord.store_parts(&api, 2, 2, |i| i.to_string()).await;
    assert_fails_clearly(&api, &chord, "does not exist").await;
}

/// Waits for the chord to fail with `reason` in its error, recorded on the
/// callback's task as Celery's ChordError.
async fn assert_fails_clearly(api: &Api, chord: &Chord, reason: &str) {
    let mut status = Value::Null;
    for _ in 0..120 {
        status = api.call(reqwest::Method::GET, &format!("/v1/chords/{}", chord.gid), None).await.json;
        if status["state"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(status["state"], "failed", "{status}");
    assert!(status["error"].as_str().unwrap().contains(reason), "{status}");
    let cb = api.get_task(&chord.callback_id).await.expect(200);
    assert_eq!(cb.json["status"], "FAILURE");
    assert_eq!(cb.json["result"]["exc_type"], "ChordError");
    assert!(cb.json["result"]["exc_message"][0].as_str().unwrap().contains(reason), "{}", cb.json);
}

#[tokio::test]
async fn chord_status_of_an_unknown_chord_is_404_and_bad_chords_are_refused() {
    let api = Api::new();
    api.call(reqwest::Method::GET, &format!("/v1/chords/{}", api.id("nope")), None)
        .await
        .expect_error(404, "chord_not_found");
    let id = api.id("p");
    let cb = json!({"task": "t", "options": {"task_id": api.id("cb")}});
    for body in [
        json!({"status": "SUCCESS", "chord": {"size": 2, "callback": cb}}),
        json!({"status": "SUCCESS", "group_id": "g", "group_index": 5, "chord": {"size": 2, "callback": cb}}),
        json!({"status": "SUCCESS", "group_id": "g", "group_index": 0, "chord": {"size": 2, "callback": {"task": "t"}}}),
        json!({"status": "SUCCESS", "group_id": "g", "group_index": 0, "chord": {"size": 2}}),
    ] {
        api.put_task(&id, body).await.expect_error(400, "invalid_meta");
    }
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING");
}

#[tokio::test]
async fn a_claim_left_by_a_crashed_invocation_heals_after_its_lease() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({}));
    let p0 = api.id("p0");
    api.put_task(&p0, chord.part(&p0, 0, 2, "SUCCESS", json!(0))).await.expect(200);
    let status_path = format!("/v1/chords/{}", chord.gid);
    for _ in 0..100 {
        if api.call(reqwest::Method::GET, &status_path, None).await.json["done"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Fault injection: leave the state an invocation that claimed the chord and
    // died before dispatching leaves behind (joining, its token, a lease).
    let endpoint = std::env::var("DYNAMODB_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:8000".into());
    let dynamodb = aws_sdk_dynamodb::Client::new(&dynachord::aws::local_config(Some(&endpoint)).await);
    let lease_until = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3;
    dynamodb
        .update_item()
        .table_name(std::env::var("TABLE_NAME").unwrap_or_else(|_| "dynachord-local".into()))
        .key("pk", AttributeValue::S(format!("default/chord/{}", chord.gid)))
        .key("sk", AttributeValue::S("state".into()))
        .update_expression("SET #s = :joining, #t = :token, #l = :lease")
        .expression_attribute_names("#s", "state")
        .expression_attribute_names("#t", "token")
        .expression_attribute_names("#l", "lease_until")
        .expression_attribute_values(":joining", AttributeValue::S("joining".into()))
        .expression_attribute_values(":token", AttributeValue::S("crashed-invocation".into()))
        .expression_attribute_values(":lease", AttributeValue::N(lease_until.to_string()))
        .send()
        .await
        .unwrap();
    let p1 = api.id("p1");
    let stored_at = std::time::Instant::now();
    api.put_task(&p1, chord.part(&p1, 1, 2, "SUCCESS", json!(1))).await.expect(200);
    let messages = queue.expect(Duration::from_secs(60), Duration::ZERO).await;
    let arrived = stored_at.elapsed();
    assert_eq!(messages.len(), 1, "the stream's retry dispatched it once the lease ran out");
    assert_eq!(messages[0].body[0], json!([[0, 1]]));
    assert!(arrived >= Duration::from_millis(1500), "not before the crashed claim's lease ran out: {arrived:?}");
    assert!(queue.drain(Duration::from_secs(4)).await.is_empty(), "and only once");
    let status = api.call(reqwest::Method::GET, &status_path, None).await.expect(200);
    assert_eq!(status.json["state"], "dispatched");
}

/// A part as a worker with `result_extended` stores it: its task, arguments and queue too.
fn extended(chord: &Chord, queue: &Queue, id: &str, index: usize, size: usize, status: &str, result: Value) -> Value {
    let mut part = chord.part(id, index, size, status, result);
    part["name"] = json!("proj.tasks.flaky");
    part["args"] = json!([index, "x"]);
    part["kwargs"] = json!({"k": index});
    part["queue"] = json!(queue.name);
    part
}

#[tokio::test]
async fn a_failed_chord_is_redriven_its_failed_parts_sent_again_and_it_joins_once_with_every_result() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({}));
    let failure = json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"});
    let ids: Vec<String> = (0..4).map(|i| api.id(&format!("p{i}"))).collect();
    let redrive = format!("/v1/chords/{}/redrive", chord.gid);
    for (i, id) in ids.iter().enumerate() {
        let (status, result) = if i % 2 == 1 { ("FAILURE", failure.clone()) } else { ("SUCCESS", json!(i)) };
        api.put_task(id, extended(&chord, &queue, id, i, 4, status, result)).await.expect(200);
        if i == 0 {
            // Once counted, and still open: refused, and nothing changes.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let status = format!("/v1/chords/{}", chord.gid);
            while api.call(reqwest::Method::GET, &status, None).await.status != 200 {
                assert!(std::time::Instant::now() < deadline, "the first part was not counted");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            api.call(reqwest::Method::POST, &redrive, None).await.expect_error(409, "redrive_refused");
        }
    }
    chord_status_when(&api, &chord.gid, Duration::from_secs(60), |s| s["state"] == "failed").await;
    // A body that is not what the route takes is refused.
    let bad = api.call(reqwest::Method::POST, &redrive, Some(json!({"queues": 1}).to_string())).await;
    bad.expect_error(400, "invalid_body");
    let answer = api.call(reqwest::Method::POST, &redrive, None).await.expect(202);
    assert_eq!((&answer.json["redriving"], &answer.json["redrives"]), (&json!(2), &json!(1)), "{}", answer.json);
    // The callback's ChordError is forgotten: a caller waits for the new result.
    assert_eq!(api.get_task(&chord.callback_id).await.expect(200).json["status"], "PENDING");
    let resent = queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    let mut resent_ids: Vec<&str> = resent.iter().map(|m| m.headers["id"].as_str().unwrap()).collect();
    resent_ids.sort();
    let mut failed = vec![ids[1].as_str(), ids[3].as_str()];
    failed.sort();
    assert_eq!(resent_ids, failed, "only the failed parts");
    for message in &resent {
        assert_eq!(message.headers["task"], "proj.tasks.flaky");
        assert_eq!(message.headers["group"], json!(chord.gid));
        assert_eq!(message.body[2]["chord"]["options"]["task_id"], json!(chord.callback_id), "carries its chord");
        let index = message.headers["group_index"].as_u64().unwrap() as usize;
        assert_eq!(message.body[0], json!([index, "x"]));
    }
    // The worker runs them again; they succeed and report (the stack's
    // pumps deliver each record twice, and an old failure's record again).
    for i in [1, 3] {
        api.put_task(&ids[i], extended(&chord, &queue, &ids[i], i, 4, "SUCCESS", json!(i))).await.expect(200);
    }
    let callbacks = queue.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(callbacks.len(), 1, "{callbacks:?}");
    assert_eq!(callbacks[0].body[0], json!([[0, 1, 2, 3]]));
    let status = api.call(reqwest::Method::GET, &format!("/v1/chords/{}", chord.gid), None).await.expect(200);
    assert_eq!(
        (&status.json["state"], &status.json["succeeded"]),
        (&json!("dispatched"), &json!(4)),
        "{}",
        status.json
    );
    // Nothing failed now: a second redrive is refused.
    let refused = api.call(reqwest::Method::POST, &redrive, None).await.expect(409);
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("no failed part"), "{}", refused.json);
}

#[tokio::test]
async fn a_chord_whose_parts_arguments_were_not_stored_is_refused_a_redrive_and_nothing_changes() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({}));
    let failure = json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"});
    let id = api.id("p0");
    api.put_task(&id, chord.part(&id, 0, 1, "FAILURE", failure)).await.expect(200);
    chord_status_when(&api, &chord.gid, Duration::from_secs(60), |s| s["state"] == "failed").await;
    let redrive = format!("/v1/chords/{}/redrive", chord.gid);
    let refused = api.call(reqwest::Method::POST, &redrive, None).await.expect_error(409, "redrive_refused");
    let message = refused.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("result_extended=True"), "{message}");
    let status = api.call(reqwest::Method::GET, &format!("/v1/chords/{}", chord.gid), None).await.expect(200);
    assert_eq!((&status.json["state"], &status.json["failed"]), (&json!("failed"), &json!(1)));
    assert_eq!(api.get_task(&chord.callback_id).await.expect(200).json["status"], "FAILURE", "kept");
    let unknown = format!("/v1/chords/{}/redrive", api.id("nope"));
    api.call(reqwest::Method::POST, &unknown, None).await.expect_error(404, "chord_not_found");
}

/// The chord's status once `ready` holds for it, within `limit`.
async fn chord_status_when(api: &Api, gid: &str, limit: Duration, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let status = api.call(reqwest::Method::GET, &format!("/v1/chords/{gid}"), None).await;
        if status.status == 200 && ready(&status.json) {
            return status.json;
        }
        assert!(std::time::Instant::now() < deadline, "not within {limit:?}: {}", status.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_chord_whose_last_part_never_runs_is_reported_at_its_deadline() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    // Reported only.
    let chord = Chord::new(&api, &queue, json!({"deadline_seconds": 2}));
    let id = api.id("p0");
    api.put_task(&id, chord.part(&id, 0, 2, "SUCCESS", json!(0))).await.expect(200);
    let opened = chord_status_when(&api, &chord.gid, Duration::from_secs(60), |s| !s["deadline_at"].is_null()).await;
    assert_eq!(opened["deadline_at"].as_i64().unwrap(), opened["opened_at"].as_i64().unwrap() + 2);
    // Reported within the deadline and one poll of the deadline queue (a
    // second, and a stream poll's worth of slack on a busy machine).
    let stalled = chord_status_when(&api, &chord.gid, Duration::from_secs(20), |s| !s["stalled_at"].is_null()).await;
    assert!(stalled["stalled_at"].as_i64().unwrap() >= stalled["deadline_at"].as_i64().unwrap(), "{stalled}");
    assert_eq!(stalled["state"], "open");
}

#[tokio::test]
async fn a_chord_that_asks_is_failed_at_its_deadline_naming_its_missing_parts() {
    let api = Api::new();
    let queue = Queue::new(&api.id("q")).await;
    // The ChordError names the missing parts; the errback goes once.
    let errback = json!([{"task": "proj.tasks.on_error", "options": {"task_id": api.id("eb"), "queue": queue.name}}]);
    let chord =
        Chord::new(&api, &queue, json!({"deadline_seconds": 1, "fail_at_deadline": true, "link_error": errback}));
    let id = api.id("q0");
    api.put_task(&id, chord.part(&id, 0, 3, "SUCCESS", json!(0))).await.expect(200);
    let failed = chord_status_when(&api, &chord.gid, Duration::from_secs(30), |s| s["state"] == "failed").await;
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("deadline passed") && error.contains("2 of 3 (group_index 1, 2)"), "{error}");
    let callback = api.get_task(&chord.callback_id).await.expect(200);
    assert_eq!(callback.json["status"], "FAILURE");
    let sent = queue.expect(Duration::from_secs(30), Duration::from_secs(2)).await;
    let tasks: Vec<&Value> = sent.iter().map(|m| &m.headers["task"]).collect();
    assert_eq!(tasks, [&json!("proj.tasks.on_error")], "the errback only, once");
    // A late part changes nothing.
    let late = api.id("q1");
    api.put_task(&late, chord.part(&late, 1, 3, "SUCCESS", json!(1))).await.expect(200);
    let after = chord_status_when(&api, &chord.gid, Duration::from_secs(30), |s| s["done"] == 2).await;
    assert_eq!(after["state"], "failed");
    // A deadline that is not whole seconds is refused when the part is stored.
    let bad = Chord::new(&api, &queue, json!({"deadline_seconds": 0}));
    let id = api.id("bad");
    api.put_task(&id, bad.part(&id, 0, 1, "SUCCESS", json!(0))).await.expect_error(400, "invalid_body");
}
