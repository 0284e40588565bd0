//! Bad input: a clear 4xx with `error.code`/`error.message`, never a 500,
//! and nothing stored changes.

use crate::helpers::{api_gateway_event, success, Api};
use serde_json::json;

/// Stores a sentinel result, runs `bad` against its id, and checks the
/// sentinel is byte for byte what it was.
async fn unchanged_after(api: &Api, name: &str, bad: impl AsyncFnOnce(&str)) {
    let id = api.id(name);
    api.put_task(&id, json!({"status": "STARTED", "result": {"pid": 7}})).await.expect(200);
    let before = api.get_task(&id).await.text;
    bad(&id).await;
    assert_eq!(api.get_task(&id).await.text, before, "bad input changed a stored result");
}

#[tokio::test]
async fn malformed_or_mistyped_meta_is_refused() {
    let api = Api::new();
    unchanged_after(&api, "meta", async |id| {
        for body in [
            "{bad json",
            "",
            "[]",
            "null",
            r#"{"result": 1}"#,
            r#"{"status": 3}"#,
            r#"{"status": "SUCCESS", "retries": "three"}"#,
            r#"{"status": "SUCCESS", "traceback": 5}"#,
            r#"{"status": "SUCCESS", "children": "x"}"#,
            r#"{"status": "SUCCESS", "args": {}}"#,
            r#"{"status": "SUCCESS", "kwargs": []}"#,
            r#"{"status": "SUCCESS", "group_index": -1}"#,
            r#"{"status": "SUCCESS", "stauts": "typo"}"#,
            r#"{"status": "SUCCESS", "task_id": "someone-else"}"#,
            r#"{"status": "SUCCESS", "group_id": "bad/group"}"#,
        ] {
            api.put_task_raw(id, body).await.expect_error(400, "invalid_meta");
        }
        for body in [r#"{"status": "SUCCESS", "expires_in": 0}"#, r#"{"status": "SUCCESS", "expires_in": 999999999}"#] {
            api.put_task_raw(id, body).await.expect_error(400, "invalid_body");
        }
    })
    .await;
}

#[tokio::test]
async fn unknown_state_names_are_refused_custom_ones_must_be_well_formed() {
    let api = Api::new();
    unchanged_after(&api, "state", async |id| {
        for status in ["success", "DONE!", "", "1ST", "IN PROGRESS", &"X".repeat(65)] {
            let resp = api.put_task(id, json!({"status": status})).await.expect_error(400, "invalid_meta");
            assert!(resp.text.contains("state"), "{}", resp.text);
        }
    })
    .await;
}

#[tokio::test]
async fn invalid_ids_are_refused() {
    let api = Api::new();
    for bad in ["a%20b", "a%2Fb", "%C3%A9", "a%23b"] {
        api.put_task(bad, success(json!(1))).await.expect_error(400, "invalid_id");
        api.get_task(bad).await.expect_error(400, "invalid_id");
        api.forget(bad).await.expect_error(400, "invalid_id");
        api.put_group(bad, r#"{"result": []}"#).await.expect_error(400, "invalid_id");
    }
    api.batch_get_raw(&json!({"task_ids": ["ok", "a/b"]}).to_string()).await.expect_error(400, "invalid_body");
}

#[tokio::test]
async fn bad_batch_bodies_are_refused() {
    let api = Api::new();
    for body in [
        "{",
        "[]",
        r#"{"task_ids": "t1"}"#,
        r#"{"ids": ["t1"]}"#,
        r#"{"task_ids": ["t1"], "extra": 1}"#,
        r#"{"task_ids": [1]}"#,
    ] {
        api.batch_get_raw(body).await.expect_error(400, "invalid_body");
    }
    assert_eq!(api.batch_get(&[], None).await.expect(200).json, json!({"results": []}));
    let id = api.id("w");
    for wait in ["-1", "abc", "NaN", "inf"] {
        api.call(reqwest::Method::GET, &format!("/v1/tasks/{id}?wait={wait}"), None)
            .await
            .expect_error(400, "invalid_query");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_404() {
    let api = Api::new();
    let id = api.id("r");
    for (method, path) in [
        (reqwest::Method::PATCH, format!("/v1/tasks/{id}")),
        (reqwest::Method::POST, format!("/v1/tasks/{id}")),
        (reqwest::Method::GET, "/v1/tasks/batch-get".to_owned()),
        (reqwest::Method::GET, "/v2/tasks/x".to_owned()),
        (reqwest::Method::GET, "/v1/chords".to_owned()),
    ] {
        let resp = api.call(method.clone(), &path, None).await;
        assert_eq!(resp.status, 404, "{method} {path}: {}", resp.text);
    }
}

/// A body that is not UTF-8 reaches a function base64-encoded
/// (`isBase64Encoded`), as API Gateway hands it over, and each route answers
/// its own 400: sent over HTTP, as a worker would.
#[tokio::test]
async fn a_body_that_is_not_utf8_is_a_400_from_the_function() {
    let api = Api::new();
    let id = api.id("binary");
    let binary = vec![0xff, 0xfe, 0x00, b'{'];
    for path in [
        format!("/v1/tasks/{id}"),
        format!("/v1/groups/{id}"),
        "/v1/cache/entry".to_owned(),
        "/v1/cache/get-or-delegate".to_owned(),
    ] {
        let method = if path.starts_with("/v1/cache") { reqwest::Method::POST } else { reqwest::Method::PUT };
        let resp = api.call_bytes(method, &path, binary.clone()).await;
        assert_eq!(resp.status, 400, "{path}: {}", resp.text);
        assert!(!resp.code().is_empty(), "{path}: the service's own error: {}", resp.text);
    }
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING", "nothing stored");
    api.get_group(&id).await.expect_error(404, "group_not_found");
    // The same event straight to the function: the same answer.
    let event = api_gateway_event("PUT", &format!("/v1/tasks/{id}"), "", Some(&binary), None);
    assert_eq!(event["isBase64Encoded"], true);
    let resp = api
        .call(reqwest::Method::POST, "/2015-03-31/functions/store/invocations", Some(event.to_string()))
        .await
        .expect(200);
    assert_eq!(resp.json["statusCode"], 400, "{}", resp.text);
    let body: serde_json::Value = serde_json::from_str(resp.json["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "invalid_meta");
}

/// A body past API Gateway's 10 MB is refused before any function runs, as
/// API Gateway refuses it (413); one past the service's own `MAX_BODY_BYTES`
/// but within 10 MB is the service's 413, with its JSON error.
#[tokio::test]
async fn a_body_past_the_gateways_limit_is_a_413() {
    let api = Api::new();
    let id = api.id("huge");
    let huge = format!(r#"{{"status":"SUCCESS","result":"{}"}}"#, "x".repeat(11 << 20));
    let resp = api.call_bytes(reqwest::Method::PUT, &format!("/v1/tasks/{id}"), huge.into_bytes()).await;
    assert_eq!(resp.status, 413, "{}", resp.text);
    let large = format!(r#"{{"status":"SUCCESS","result":"{}"}}"#, "x".repeat(2 << 20));
    api.call_bytes(reqwest::Method::PUT, &format!("/v1/tasks/{id}"), large.into_bytes())
        .await
        .expect_error(413, "body_too_large");
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING", "nothing stored");
}
