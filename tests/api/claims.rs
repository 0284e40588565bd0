//! Claims on a task's run (invariant S10): the store a worker makes before it
//! runs a task, which succeeds for one delivery of the task's message only.

use crate::helpers::{poll_until, success, Api};
use serde_json::{json, Value};
use std::time::Duration;

fn claim(token: &str, lease_seconds: u64) -> Value {
    json!({"status": "STARTED", "result": {"pid": 1}, "claim": {"token": token, "lease_seconds": lease_seconds}})
}

#[tokio::test]
async fn one_claim_holds_a_task_until_it_is_ready_and_is_renewed_by_its_own_token() {
    let api = Api::new();
    let id = api.id("claimed");
    let first = api.put_task(&id, claim("token-one", 60)).await.expect(200);
    assert_eq!(first.ddb_calls, Some(1), "a claim is one conditional write");
    // Another delivery's claim is refused and changes nothing.
    let other = api.put_task(&id, claim("token-two", 60)).await.expect_error(409, "task_claimed");
    assert_eq!(other.json["error"]["stored_status"], "STARTED");
    let left = other.json["error"]["claim_expires_in"].as_f64().unwrap();
    assert!(left > 50.0 && left <= 60.0, "{}", other.text);
    // The holder renews it, and stores its result over it.
    api.put_task(&id, claim("token-one", 60)).await.expect(200);
    api.put_task(&id, success(json!(42))).await.expect(200);
    // A ready task is not claimed again, by anyone.
    for token in ["token-one", "token-two"] {
        let late = api.put_task(&id, claim(token, 60)).await.expect_error(409, "state_conflict");
        assert_eq!(late.json["error"]["stored_status"], "SUCCESS");
    }
    assert_eq!(api.get_task(&id).await.expect(200).json["result"], 42);
}

#[tokio::test]
async fn a_claim_whose_holder_stopped_renewing_is_taken_over_after_its_lease() {
    let api = Api::new();
    let id = api.id("lapsed");
    api.put_task(&id, claim("dead-worker", 1)).await.expect(200);
    api.put_task(&id, claim("next-delivery", 60)).await.expect_error(409, "task_claimed");
    poll_until("the lapsed claim to be taken over", Duration::from_secs(10), || async {
        (api.put_task(&id, claim("next-delivery", 60)).await.status == 200).then_some(())
    })
    .await;
    // The dead holder cannot renew what was taken over.
    api.put_task(&id, claim("dead-worker", 1)).await.expect_error(409, "task_claimed");
}

#[tokio::test]
async fn a_store_without_a_claim_is_as_before_and_releases_the_claim() {
    let api = Api::new();
    let id = api.id("release");
    api.put_task(&id, claim("holder-aa", 60)).await.expect(200);
    // Old clients (and a task's RETRY) store as before: the item is replaced
    // and holds no claim after it.
    api.put_task(&id, json!({"status": "RETRY", "result": null})).await.expect(200);
    api.put_task(&id, claim("another-bb", 60)).await.expect(200);
}

#[tokio::test]
async fn a_bad_claim_is_refused_and_changes_nothing() {
    let api = Api::new();
    let id = api.id("bad");
    api.put_task(&id, claim("holder-aa", 60)).await.expect(200);
    let bad = [
        json!({"status": "SUCCESS", "result": 1, "claim": {"token": "holder-aa", "lease_seconds": 60}}),
        json!({"status": "STARTED", "claim": {"token": "short", "lease_seconds": 60}}),
        json!({"status": "STARTED", "claim": {"token": "has a space", "lease_seconds": 60}}),
        json!({"status": "STARTED", "claim": {"token": "holder-bb", "lease_seconds": 0}}),
        json!({"status": "STARTED", "claim": {"token": "holder-bb", "lease_seconds": 3601}}),
        json!({"status": "STARTED", "claim": {"token": "holder-bb"}}),
        json!({"status": "STARTED", "claim": {"token": "holder-bb", "lease_seconds": 5, "x": 1}}),
        json!({"status": "STARTED", "claim": "holder-bb"}),
    ];
    for body in bad {
        api.put_task(&id, body).await.expect_error(400, "invalid_meta");
    }
    // Still the first holder's.
    api.put_task(&id, claim("holder-bb", 60)).await.expect_error(409, "task_claimed");
    assert_eq!(api.get_task(&id).await.expect(200).json["status"], "STARTED");
}

#[tokio::test]
async fn a_rerun_claims_a_failed_task_but_never_a_succeeded_one() {
    let api = Api::new();
    let id = api.id("rerun");
    api.put_task(&id, json!({"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["x"]}}))
        .await
        .expect(200);
    api.put_task(&id, claim("plain-run", 60)).await.expect_error(409, "state_conflict");
    let mut rerun = claim("rerun-one", 60);
    rerun["claim"]["rerun"] = json!(true);
    api.put_task(&id, rerun.clone()).await.expect(200);
    // Claimed now: another rerun's delivery is held off like any other.
    let mut other = rerun.clone();
    other["claim"]["token"] = json!("rerun-two");
    api.put_task(&id, other).await.expect_error(409, "task_claimed");
    api.put_task(&id, success(json!(1))).await.expect(200);
    api.put_task(&id, rerun).await.expect_error(409, "state_conflict");
}
