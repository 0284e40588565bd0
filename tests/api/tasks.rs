//! Store, fetch and forget single results; the store invariants.

use crate::helpers::{poll_until, success, Api};
use serde_json::json;

#[tokio::test]
async fn stores_and_fetches_extended_celery_meta() {
    let api = Api::new();
    let id = api.id("t");
    let meta = json!({
        "status": "SUCCESS", "result": 3, "traceback": null, "children": [],
        "date_done": "2026-11-22T23:15:35.403592+00:00", "group_id": "g1", "parent_id": "p1",
        "name": "proj.tasks.add", "args": [1, 2], "kwargs": {}, "worker": "celery@w1",
        "retries": 0, "queue": "celery", "task_id": id,
    });
    let stored = api.put_task(&id, meta.clone()).await.expect(200);
    assert_eq!(stored.ddb_calls, Some(1), "a store is exactly one DynamoDB request");
    assert_eq!(stored.json["status"], "SUCCESS");
    let got = api.get_task(&id).await.expect(200);
    assert_eq!(got.json, meta);
    assert!(
        got.text.starts_with(r#"{"status":"SUCCESS","result":3,"traceback":null"#),
        "Celery's field order: {}",
        got.text
    );
}

#[tokio::test]
async fn any_json_result_round_trips_exactly() {
    let api = Api::new();
    let id = api.id("exact");
    let result = r#"{"big":123456789012345678901234567890,"neg":-0.000000000000000000001,"f":1.50,"u":"\u00e9 ☃ 𝄞","empty":"","nested":{"a":[[],{},null,true,false]}}"#;
    let body = format!(r#"{{"status":"SUCCESS","result":{result}}}"#);
    api.put_task_raw(&id, &body).await.expect(200);
    let got = api.get_task(&id).await.expect(200);
    assert!(got.text.contains(&format!(r#""result":{result},"#)), "{}", got.text);
    for (i, value) in ["", "[]", "0", "\"\""].into_iter().enumerate() {
        let id = api.id(&format!("v{i}"));
        let result = if value.is_empty() { "null" } else { value };
        api.put_task_raw(&id, &format!(r#"{{"status":"SUCCESS","result":{result}}}"#)).await.expect(200);
        assert!(api.get_task(&id).await.text.contains(&format!(r#""result":{result},"#)));
    }
}

#[tokio::test]
async fn large_results_are_stored_compressed_and_round_trip() {
    let api = Api::new();
    let id = api.id("large");
    let result: Vec<String> = (0..20_000).map(|i| format!("item {i}")).collect();
    api.put_task(&id, success(json!(result))).await.expect(200);
    assert_eq!(api.get_task(&id).await.expect(200).json["result"], json!(result));
}

#[tokio::test]
async fn a_result_over_the_item_limit_is_stored_all_the_same() {
    let api = Api::new();
    let id = api.id("huge");
    // 900 KB of random hex barely compresses: over DynamoDB's 400 KB item
    // limit, so it goes to S3 (see large.rs).
    let noise: String = (0..900_000 / 32).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    api.put_task(&id, success(json!(noise))).await.expect(200);
    assert_eq!(api.get_task(&id).await.json["status"], "SUCCESS");
}

#[tokio::test]
async fn unknown_ids_read_as_pending_never_as_errors() {
    let api = Api::new();
    let id = api.id("never-stored");
    let got = api.get_task(&id).await.expect(200);
    assert_eq!(
        got.json,
        json!({"status": "PENDING", "result": null, "traceback": null, "children": [], "date_done": null, "task_id": id})
    );
}

#[tokio::test]
async fn success_is_never_overwritten() {
    let api = Api::new();
    let id = api.id("s");
    api.put_task(&id, success(json!("first"))).await.expect(200);
    for status in ["SUCCESS", "FAILURE", "REVOKED", "STARTED", "RETRY", "PENDING", "PROGRESS"] {
        let refused =
            api.put_task(&id, json!({"status": status, "result": "second"})).await.expect_error(409, "state_conflict");
        assert_eq!(refused.json["error"]["stored_status"], "SUCCESS");
        assert_eq!(refused.ddb_calls, Some(1), "a refusal needs no extra read");
    }
    assert_eq!(api.get_task(&id).await.json["result"], "first");
}

#[tokio::test]
async fn a_ready_state_is_not_replaced_by_a_non_ready_one() {
    let api = Api::new();
    let id = api.id("f");
    api.put_task(&id, json!({"status": "STARTED", "result": {"pid": 1, "hostname": "w1"}})).await.expect(200);
    api.put_task(&id, json!({"status": "RETRY", "result": "again"})).await.expect(200);
    api.put_task(&id, json!({"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"}})).await.expect(200);
    let late = api.put_task(&id, json!({"status": "STARTED"})).await.expect_error(409, "state_conflict");
    assert_eq!(late.json["error"]["stored_status"], "FAILURE");
    api.put_task(&id, json!({"status": "PROGRESS"})).await.expect_error(409, "state_conflict");
    assert_eq!(api.get_task(&id).await.json["result"]["exc_type"], "ValueError");
    // A ready state may replace another ready state, except SUCCESS (Celery's rule).
    api.put_task(&id, success(json!("retried ok"))).await.expect(200);
    assert_eq!(api.get_task(&id).await.json["result"], "retried ok");
}

#[tokio::test]
async fn custom_states_are_stored_and_not_ready() {
    let api = Api::new();
    let id = api.id("custom");
    api.put_task(&id, json!({"status": "PROGRESS", "result": {"done": 3, "total": 10}})).await.expect(200);
    let got = api.get_task(&id).await.expect(200);
    assert_eq!((got.json["status"].as_str(), got.json["date_done"].is_null()), (Some("PROGRESS"), true));
    api.put_task(&id, json!({"status": "STARTED"})).await.expect(200);
}

#[tokio::test]
async fn expired_results_read_as_pending_and_do_not_block_new_writes() {
    let api = Api::new();
    let id = api.id("exp");
    // A few seconds leave the first read inside the lifetime on a loaded
    // machine; then poll until the stored instant has passed.
    let stored =
        api.put_task(&id, json!({"status": "SUCCESS", "result": "short-lived", "expires_in": 4})).await.expect(200);
    assert!(stored.json["expires_at"].as_u64().is_some());
    assert_eq!(api.get_task(&id).await.json["status"], "SUCCESS");
    // DynamoDB deletes expired items late (DynamoDB Local never does): the read must treat it as missing.
    let pending = || async { (api.get_task(&id).await.expect(200).json["status"] == "PENDING").then_some(()) };
    poll_until("the result to expire", std::time::Duration::from_secs(30), pending).await;
    let batch = api.batch_get(std::slice::from_ref(&id), None).await.expect(200);
    assert_eq!(batch.json["results"][0]["status"], "PENDING");
    api.put_task(&id, json!({"status": "STARTED"})).await.expect(200);
    assert_eq!(api.get_task(&id).await.json["status"], "STARTED");
}

#[tokio::test]
async fn results_carry_the_default_expiry() {
    let api = Api::new();
    let id = api.id("ttl");
    let stored = api.put_task(&id, success(json!(1))).await.expect(200);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let expires_at = stored.json["expires_at"].as_i64().unwrap();
    assert!((expires_at - now - 86_400).abs() < 60, "default TTL is one day: {expires_at} vs {now}");
}

#[tokio::test]
async fn forget_removes_the_result_and_is_idempotent() {
    let api = Api::new();
    let id = api.id("forget");
    api.put_task(&id, success(json!(1))).await.expect(200);
    api.forget(&id).await.expect(204);
    api.forget(&id).await.expect(204);
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING");
    // Forgotten, a SUCCESS can be stored again.
    api.put_task(&id, success(json!(2))).await.expect(200);
}

#[tokio::test]
async fn reads_are_consistent_right_after_a_write() {
    let api = Api::new();
    for i in 0..30 {
        let id = api.id(&format!("c{i}"));
        api.put_task(&id, success(json!(i))).await.expect(200);
        assert_eq!(api.get_task(&id).await.json["result"], json!(i));
    }
}
