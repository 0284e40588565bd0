//! Tenants: a caller's namespace comes from its IAM identity, as API Gateway
//! puts it in the request context, through the deployment's `TENANTS` map;
//! nothing a caller sends picks it. The local stack maps the two callers
//! below (devstack's `LOCAL_TENANTS`); requests through the router carry no
//! caller and are in `NAMESPACE`.
//!
//! Each test uses the same ids as both tenants: whatever one does to "its"
//! id must not reach the other's.

use crate::chords::Chord;
use crate::helpers::{success, Api};
use crate::sqs::Queue;
use serde_json::json;
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
    let queue = Queue::new(&api.id("q")).await;
    let chord = Chord::new(&api, &queue, json!({}));
    store_part(&a, &chord, 0, "a").await;
    store_part(&a, &chord, 1, "a").await;
    // B stores the third part of "the same" chord: it counts in B's chord.
    store_part(&b, &chord, 2, "b").await;
    let chord_path = format!("/v1/chords/{}", chord.gid);
    let settle = Duration::from_secs(3);
    tokio::time::sleep(settle).await;
    let of_a = a.call(reqwest::Method::GET, &chord_path, None).await.expect(200);
    assert_eq!((of_a.json["done"].clone(), of_a.json["state"].clone()), (json!(2), json!("open")), "{}", of_a.text);
    let of_b = b.call(reqwest::Method::GET, &chord_path, None).await.expect(200);
    assert_eq!((of_b.json["done"].clone(), of_b.json["state"].clone()), (json!(1), json!("open")), "{}", of_b.text);
    assert!(queue.drain(Duration::from_secs(1)).await.is_empty(), "no chord is complete");

    // A's own third part completes A's chord, with A's results only.
    store_part(&a, &chord, 2, "a").await;
    let messages = queue.expect(Duration::from_secs(60), Duration::from_secs(4)).await;
    assert_eq!(messages.len(), 1, "exactly one callback: {messages:?}");
    assert_eq!(messages[0].body[0], json!([["a0", "a1", "a2"]]));
    let of_b = b.call(reqwest::Method::GET, &chord_path, None).await.expect(200);
    assert_eq!((of_b.json["done"].clone(), of_b.json["state"].clone()), (json!(1), json!("open")), "{}", of_b.text);
    // Without identity (NAMESPACE) there is no such chord at all.
    api.call(reqwest::Method::GET, &chord_path, None).await.expect_error(404, "chord_not_found");
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
