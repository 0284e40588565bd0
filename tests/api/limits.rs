//! Every size and count limit of README's "Limits" table, at the limit
//! (accepted) and one past it (refused with its code). A refused request
//! made no DynamoDB request at all (`x-dynachord-ddb-calls: 0`: the check
//! ran before any work) and left nothing stored. The local stack runs with
//! the defaults of `shared/src/config.rs`.

use crate::helpers::{success, Api, Resp};
use serde_json::json;

const MAX_ID_LEN: usize = 128;
const MAX_BODY_BYTES: usize = 1 << 20;
const MAX_BATCH_IDS: usize = 1000;
const MAX_WAIT_SECONDS: f64 = 20.0;
const MAX_STATE_LEN: usize = 64;
const MAX_RESULT_TTL_SECONDS: u64 = 30 * 86_400;
const MAX_CHORD_SIZE: u64 = 100_000;

/// Refused with `status`/`code`, before any DynamoDB request.
#[track_caller]
fn refused_before_work(resp: Resp, status: u16, code: &str) {
    assert_eq!(resp.ddb_calls, Some(0), "a refused request made DynamoDB requests: {}", resp.text);
    resp.expect_error(status, code);
}

#[tokio::test]
async fn id_length() {
    let api = Api::new();
    let at = format!("{}-{}", api.id("i"), "a".repeat(MAX_ID_LEN - api.id("i").len() - 1));
    assert_eq!(at.len(), MAX_ID_LEN);
    api.put_task(&at, success(json!(1))).await.expect(200);
    assert_eq!(api.get_task(&at).await.expect(200).json["result"], 1);
    api.put_group(&at, &json!({"result": [[at, null], []]}).to_string()).await.expect(200);
    assert_eq!(api.batch_get(std::slice::from_ref(&at), None).await.expect(200).json["results"][0]["result"], 1);

    let past = format!("{at}b");
    refused_before_work(api.put_task(&past, success(json!(1))).await, 400, "invalid_id");
    refused_before_work(api.get_task(&past).await, 400, "invalid_id");
    refused_before_work(api.forget(&past).await, 400, "invalid_id");
    refused_before_work(api.put_group(&past, r#"{"result": []}"#).await, 400, "invalid_id");
    refused_before_work(api.batch_get(std::slice::from_ref(&past), None).await, 400, "invalid_body");
    api.call(reqwest::Method::GET, &format!("/v1/chords/{past}"), None).await.expect_error(400, "invalid_id");
}

#[tokio::test]
async fn body_size() {
    let api = Api::new();
    let (at_id, past_id) = (api.id("at-cap"), api.id("past-cap"));
    let body = |fill: char, len: usize| {
        let frame = r#"{"status":"SUCCESS","result":""}"#.len();
        format!(r#"{{"status":"SUCCESS","result":"{}"}}"#, fill.to_string().repeat(len - frame))
    };
    let at = body('y', MAX_BODY_BYTES);
    assert_eq!(at.len(), MAX_BODY_BYTES);
    api.put_task_raw(&at_id, &at).await.expect(200);
    // One byte over is refused before the body is read as JSON (valid or not).
    let past = body('x', MAX_BODY_BYTES + 1);
    assert_eq!(past.len(), MAX_BODY_BYTES + 1);
    refused_before_work(api.put_task_raw(&past_id, &past).await, 413, "body_too_large");
    refused_before_work(api.put_task_raw(&past_id, &"{".repeat(MAX_BODY_BYTES + 1)).await, 413, "body_too_large");
    assert_eq!(api.get_task(&past_id).await.json["status"], "PENDING");
}

#[tokio::test]
async fn ids_per_batch_get() {
    let api = Api::new();
    let ids: Vec<String> = (0..=MAX_BATCH_IDS).map(|i| api.id(&i.to_string())).collect();
    let at = api.batch_get(&ids[..MAX_BATCH_IDS], None).await.expect(200);
    assert_eq!(at.json["results"].as_array().unwrap().len(), MAX_BATCH_IDS);
    refused_before_work(api.batch_get(&ids, None).await, 413, "batch_too_large");
}

#[tokio::test]
async fn long_poll_wait() {
    let api = Api::new();
    let id = api.id("w");
    api.put_task(&id, success(json!("ready"))).await.expect(200);
    // A ready result answers at once, whatever the wait.
    for wait in [0.0, MAX_WAIT_SECONDS] {
        assert_eq!(api.get_task_wait(&id, wait).await.expect(200).json["result"], "ready");
        assert_eq!(
            api.batch_get(std::slice::from_ref(&id), Some(wait)).await.expect(200).json["results"][0]["result"],
            "ready"
        );
    }
    for past in [MAX_WAIT_SECONDS + 0.001, -0.001] {
        refused_before_work(api.get_task_wait(&id, past).await, 400, "invalid_query");
        refused_before_work(api.batch_get(std::slice::from_ref(&id), Some(past)).await, 400, "invalid_query");
    }
}

#[tokio::test]
async fn custom_state_name_length() {
    let api = Api::new();
    let id = api.id("state");
    let at = "S".repeat(MAX_STATE_LEN);
    api.put_task(&id, json!({"status": at})).await.expect(200);
    refused_before_work(api.put_task(&id, json!({"status": format!("{at}S")})).await, 400, "invalid_meta");
    assert_eq!(api.get_task(&id).await.json["status"], json!(at));
}

#[tokio::test]
async fn result_ttl() {
    let api = Api::new();
    let id = api.id("ttl");
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for at in [1, MAX_RESULT_TTL_SECONDS] {
        let before = now();
        let stored = api
            .put_task(&api.id(&format!("ttl-{at}")), json!({"status": "STARTED", "expires_in": at}))
            .await
            .expect(200);
        let expires_at = stored.json["expires_at"].as_u64().unwrap();
        assert!((before + at..=now() + at).contains(&expires_at), "{at}: {}", stored.text);
    }
    for past in [0, MAX_RESULT_TTL_SECONDS + 1] {
        refused_before_work(
            api.put_task(&id, json!({"status": "SUCCESS", "expires_in": past})).await,
            400,
            "invalid_body",
        );
    }
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING");
}

#[tokio::test]
async fn chord_size() {
    let api = Api::new();
    let part = |size: u64, name: &str| {
        let gid = api.id(&format!("g-{name}"));
        json!({"status": "SUCCESS", "result": 1, "group_id": gid, "group_index": 0, "expires_in": 60,
            "chord": {"size": size, "callback": {"task": "proj.tsum", "args": [], "kwargs": {},
                "options": {"task_id": api.id(&format!("cb-{name}")), "queue": "celery"}}}})
    };
    // A part of a chord of the largest size registers it (it never completes
    // here and expires in a minute).
    api.put_task(&api.id("p-at"), part(MAX_CHORD_SIZE, "at")).await.expect(200);
    let past_id = api.id("p-past");
    refused_before_work(api.put_task(&past_id, part(MAX_CHORD_SIZE + 1, "past")).await, 400, "invalid_meta");
    refused_before_work(api.put_task(&past_id, part(0, "zero")).await, 400, "invalid_meta");
    assert_eq!(api.get_task(&past_id).await.json["status"], "PENDING");
}
