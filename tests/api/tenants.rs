//! Tenants: a caller's namespace comes from its IAM identity, as API Gateway
//! puts it in the request context, through the deployment's `TENANTS` map;
//! nothing a caller sends picks it. The local stack maps the two callers
//! below (devstack's `LOCAL_TENANTS`); requests through the router carry no
//! caller and are in `NAMESPACE`.
//!
//! Each test uses the same ids as both tenants: whatever one does to "its"
//! id must not reach the other's.

use crate::chords::Chord;
use crate::helpers::{poll_until, random_hex, success, Api};
use crate::sqs::Queue;
use serde_json::{json, Value};
use std::time::Duration;

const TENANT_A: &str = "arn:aws:iam::111111111111:user/tenant-a";
const TENANT_B: &str = "arn:aws:iam::222222222222:user/tenant-b";
const STRANGER: &str = "arn:aws:iam::333333333333:user/nobody";

#[tokio::test]
async fn tenant_b_cannot_read_overwrite_forget_or_batch_get_tenant_a_results() {
    let api = Api::new();
    let (a, b) = (api.as_caller(TENANT_A), api.as_caller(TENANT_B));
    let id = api.id("secret");
    a.put_task(&id, success(json!({"owner": "a"}))).await.expect(200);
    let before = a.get_task(&id).await.expect(200);
    assert_eq!(before.json["result"], json!({"owner": "a"}));

    // Reading: B, and a caller without identity, see nothing under A's id.
    assert_eq!(b.get_task(&id).await.expect(200).json["status"], "PENDING");
    assert_eq!(b.get_task_wait(&id, 0.5).await.expect(200).json["status"], "PENDING");
    let batch = b.batch_get(&[id.clone(), id.clone()], None).await.expect(200);
    assert!(batch.json["results"].as_array().unwrap().iter().all(|r| r["status"] == "PENDING"), "{}", batch.text);
    assert_eq!(api.get_task(&id).await.expect(200).json["status"], "PENDING");

    // Writing: B's SUCCESS for the same id is B's own (no 409 from A's), and
    // B's forget removes only B's.
    b.put_task(&id, success(json!({"owner": "b"}))).await.expect(200);
    assert_eq!(b.get_task(&id).await.expect(200).json["result"], json!({"owner": "b"}));
    b.forget(&id).await.expect(204);
    assert_eq!(b.get_task(&id).await.expect(200).json["status"], "PENDING");

    // A's result is byte for byte what it was.
    assert_eq!(a.get_task(&id).await.expect(200).text, before.text);
    let batch = a.batch_get(std::slice::from_ref(&id), None).await.expect(200);
    assert_eq!(batch.json["results"][0]["result"], json!({"owner": "a"}));
}

#[tokio::test]
async fn tenant_b_cannot_restore_or_delete_tenant_a_groups() {
    let api = Api::new();
    let (a, b) = (api.as_caller(TENANT_A), api.as_caller(TENANT_B));
    let gid = api.id("group");
    let saved = json!({"result": [[gid, null], [[[api.id("t1"), null], null]]]}).to_string();
    a.put_group(&gid, &saved).await.expect(200);
    let before = a.get_group(&gid).await.expect(200).text;
    b.get_group(&gid).await.expect_error(404, "group_not_found");
    b.delete_group(&gid).await;
    assert_eq!(a.get_group(&gid).await.expect(200).text, before);
}

#[tokio::test]
async fn tenant_b_cannot_see_count_or_complete_tenant_a_chords() {
    let api = Api::new();
    let (a, b) = (api.as_caller(TENANT_A), api.as_caller(TENANT_B));
    // Tenant A's queue: the local stack grants it the queues named tenant-a-*.
    let queue = Queue::new(&format!("tenant-a-{}", api.id("q"))).await;
    let chord = Chord::new(&api, &queue, json!({}));
    store_part(&a, &chord, 0, "a").await;
    store_part(&a, &chord, 1, "a").await;
    // B stores the third part of "the same" chord: it counts in B's chord.
    // B may not name A's queue, so B's callback uses a queue of its own.
    let queue_b = Queue::new(&format!("tenant-b-{}", api.id("q"))).await;
    let chord_b = Chord::new(&api, &queue_b, json!({}));
    assert_eq!(chord_b.gid, chord.gid);
    store_part(&b, &chord_b, 2, "b").await;
    let chord_path = format!("/v1/chords/{}", chord.gid);
    let waited = Duration::from_secs(120);
    poll_until("A's chord to count 2 parts", waited, || progress(&a, &chord_path, 2)).await;
    poll_until("B's chord to count 1 part", waited, || progress(&b, &chord_path, 1)).await;

    // A's own third part completes A's chord, with A's results only.
    store_part(&a, &chord, 2, "a").await;
    let messages = queue.expect(Duration::from_secs(60), Duration::from_secs(4)).await;
    assert_eq!(messages.len(), 1, "exactly one callback: {messages:?}");
    assert_eq!(messages[0].body[0], json!([["a0", "a1", "a2"]]));
    let of_b = b.call(reqwest::Method::GET, &chord_path, None).await.expect(200);
    assert_eq!((of_b.json["done"].clone(), of_b.json["state"].clone()), (json!(1), json!("open")), "{}", of_b.text);
    assert!(queue_b.drain(Duration::from_secs(1)).await.is_empty(), "B's chord is not complete");
    // Without identity (NAMESPACE) there is no such chord at all.
    api.call(reqwest::Method::GET, &chord_path, None).await.expect_error(404, "chord_not_found");
}

#[tokio::test]
async fn a_tenant_cannot_aim_a_callback_or_errback_at_another_tenants_queue() {
    let api = Api::new();
    let (a, b) = (api.as_caller(TENANT_A), api.as_caller(TENANT_B));
    let queue_b = Queue::new(&format!("tenant-b-{}", api.id("q"))).await;
    let queue_a = Queue::new(&format!("tenant-a-{}", api.id("q"))).await;
    let other = |name: &str| json!({"task": "evil.task", "args": ["rm -rf"], "options": {"queue": name}});
    let refused = [
        // The callback itself, on B's queue.
        (json!({"queue": queue_b.name}), "callback on B's queue"),
        // The deployment's default queue is not granted to A either.
        (json!({"queue": null}), "callback on the default queue"),
        // An errback, a link, the rest of a chain: every signature counts.
        (json!({"queue": queue_a.name, "link_error": [other(&queue_b.name)]}), "errback on B's queue"),
        (json!({"queue": queue_a.name, "link": [other(&queue_b.name)]}), "link on B's queue"),
        (json!({"queue": queue_a.name, "chain": [other("celery")]}), "chain on the default queue"),
    ];
    for (options, what) in refused {
        let chord = Chord::new(&api, &queue_a, options);
        let id = a.id(&format!("p-{}", what.len()));
        let resp = a.put_task(&id, chord.part(&id, 0, 1, "SUCCESS", json!(1))).await;
        assert_eq!(resp.ddb_calls, Some(0), "{what}: refused before any work: {}", resp.text);
        resp.expect_error(400, "callback_not_allowed");
        assert_eq!(a.get_task(&id).await.expect(200).json["status"], "PENDING", "{what}: nothing stored");
    }
    // B's own callback on B's queue is fine and reaches B's queue only.
    let chord = Chord::new(&api, &queue_b, json!({}));
    let id = b.id("ok");
    b.put_task(&id, chord.part(&id, 0, 1, "SUCCESS", json!("b"))).await.expect(200);
    let messages = queue_b.expect(Duration::from_secs(60), Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].body[0], json!([["b"]]));
    assert!(queue_a.drain(Duration::from_secs(1)).await.is_empty(), "nothing reached A's queue");
}

#[tokio::test]
async fn what_one_part_can_make_chord_join_send_is_bounded_at_store_time() {
    let api = Api::new();
    let a = api.as_caller(TENANT_A);
    let queue = Queue::new(&format!("tenant-a-{}", api.id("q"))).await;
    let errback = json!({"task": "e", "options": {"queue": queue.name}});
    // 16 errbacks are accepted, 17 are not.
    let chord = Chord::new(&api, &queue, json!({"link_error": vec![errback.clone(); 16]}));
    let id = a.id("sixteen");
    a.put_task(&id, chord.part(&id, 0, 2, "SUCCESS", json!(1))).await.expect(200);
    let chord = Chord::new(&api, &queue, json!({"link_error": vec![errback.clone(); 17]}));
    let id = a.id("seventeen");
    a.put_task(&id, chord.part(&id, 0, 2, "SUCCESS", json!(1))).await.expect_error(400, "callback_not_allowed");
    // So are 17 on a task of a group callback (a failed chord calls them for that task).
    let mut chord = Chord::new(&api, &queue, json!({}));
    let member =
        json!({"task": "t", "options": {"task_id": api.id("m"), "queue": queue.name, "link_error": vec![errback; 17]}});
    chord.callback["task"] = json!("celery.group");
    chord.callback["kwargs"] = json!({"tasks": [member]});
    let id = a.id("seventeen-in-a-group");
    let resp = a.put_task(&id, chord.part(&id, 0, 2, "SUCCESS", json!(1))).await;
    assert!(resp.text.contains("a task of its group has 17 errbacks"), "{}", resp.text);
    resp.expect_error(400, "callback_not_allowed");
    // A group body whose members and errbacks would make one failed part send
    // 509 + 509 x 16 messages is refused, naming the limit (CHORD_MAX_MESSAGES,
    // 500); 29 members and 16 errbacks, 493 messages, are accepted.
    let group_body = |members: usize, errbacks: usize| {
        let mut chord = Chord::new(&api, &queue, json!({}));
        let tasks: Vec<Value> = (0..members)
            .map(|i| json!({"task": "t", "options": {"task_id": api.id(&format!("m{i}")), "queue": queue.name}}))
            .collect();
        let group_errbacks: Vec<Value> =
            (0..errbacks).map(|i| json!({"task": format!("e{i}"), "options": {"queue": queue.name}})).collect();
        chord.callback["task"] = json!("celery.group");
        chord.callback["kwargs"] = json!({"tasks": tasks});
        chord.callback["options"]["link_error"] = json!(group_errbacks);
        chord
    };
    let chord = group_body(509, 16);
    let id = a.id("many-messages");
    let resp = a.put_task(&id, chord.part(&id, 0, 2, "FAILURE", json!(1))).await;
    assert!(resp.text.contains("CHORD_MAX_MESSAGES") && resp.text.contains("8653"), "{}", resp.text);
    resp.expect_error(400, "callback_not_allowed");
    assert_eq!(a.get_task(&id).await.expect(200).json["status"], "PENDING", "nothing stored");
    let chord = group_body(29, 16);
    let id = a.id("under-the-limit");
    a.put_task(&id, chord.part(&id, 0, 2, "SUCCESS", json!(1))).await.expect(200);
    // A callback past 64 KiB is refused as too large.
    let mut chord = Chord::new(&api, &queue, json!({}));
    chord.callback["kwargs"] = json!({"pad": "x".repeat(70_000)});
    let id = a.id("big-callback");
    let resp = a.put_task(&id, chord.part(&id, 0, 2, "SUCCESS", json!(1))).await;
    assert_eq!(resp.ddb_calls, Some(0), "{}", resp.text);
    resp.expect_error(413, "callback_too_large");
    // A meta that fits alone but not with its callback: 413, not a 500
    // echoing DynamoDB's error. (A large result goes to S3; a traceback stays
    // on the item.)
    let mut chord = Chord::new(&api, &queue, json!({}));
    chord.callback["kwargs"] = json!({"pad": "y".repeat(60_000)});
    let id = a.id("big-item");
    let traceback = random_hex(700_000);
    let mut part = chord.part(&id, 0, 2, "SUCCESS", json!(1));
    part["traceback"] = json!(traceback);
    let resp = a.put_task(&id, part).await;
    resp.expect_error(413, "result_too_large");
    assert_eq!(a.get_task(&id).await.expect(200).json["status"], "PENDING");
    // The same meta without the callback is stored.
    let mut alone = success(json!(1));
    alone["traceback"] = json!(traceback);
    a.put_task(&id, alone).await.expect(200);
}

/// `Some` once `who`'s chord at `path` is open with `done` parts counted.
async fn progress(who: &Api, path: &str, done: u64) -> Option<()> {
    let r = who.call(reqwest::Method::GET, path, None).await;
    (r.status == 200 && r.json["done"] == done && r.json["state"] == "open").then_some(())
}

/// Stores part `i` of 3 of `chord` as `who`, with result `"<tag><i>"`.
async fn store_part(who: &Api, chord: &Chord, i: usize, tag: &str) {
    let id = who.id(&format!("p{i}"));
    who.put_task(&id, chord.part(&id, i, 3, "SUCCESS", json!(format!("{tag}{i}")))).await.expect(200);
}

#[tokio::test]
async fn a_caller_the_tenants_map_does_not_name_is_refused_and_nothing_changes() {
    let api = Api::new();
    let (a, stranger) = (api.as_caller(TENANT_A), api.as_caller(STRANGER));
    let id = api.id("guarded");
    a.put_task(&id, success(json!(1))).await.expect(200);
    let before = a.get_task(&id).await.text;
    stranger.get_task(&id).await.expect_error(403, "unknown_tenant");
    stranger.put_task(&id, success(json!(2))).await.expect_error(403, "unknown_tenant");
    stranger.forget(&id).await.expect_error(403, "unknown_tenant");
    stranger.batch_get(std::slice::from_ref(&id), None).await.expect_error(403, "unknown_tenant");
    assert_eq!(a.get_task(&id).await.text, before);
}
