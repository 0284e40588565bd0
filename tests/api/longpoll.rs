//! `GET ?wait=S` returns as soon as the result is ready.

use crate::helpers::{success, Api};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_long_poll_returns_soon_after_another_client_stores_the_result() {
    let api = Api::new();
    let writer = Api::new();
    let id = api.id("lp");
    let started = Instant::now();
    let (resp, stored_at) = tokio::join!(api.get_task_wait(&id, 15.0), async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        writer.put_task(&id, success(json!("done"))).await.expect(200);
        started.elapsed()
    });
    let returned_at = started.elapsed();
    assert_eq!(resp.expect(200).json["result"], "done");
    // Functional bound, not a benchmark: the poll saw the write long before its
    // 15 s limit (it reads about every 200 ms; the margin is for a busy machine).
    let lag = returned_at.saturating_sub(stored_at);
    assert!(lag < Duration::from_secs(5), "returned {lag:?} after the store");
}

#[tokio::test]
async fn a_long_poll_on_a_ready_result_returns_at_once() {
    let api = Api::new();
    let id = api.id("ready");
    api.put_task(&id, success(json!(1))).await.expect(200);
    let started = Instant::now();
    let resp = api.get_task_wait(&id, 15.0).await.expect(200);
    assert_eq!(resp.ddb_calls, Some(1));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_long_poll_ends_at_its_wait_with_the_current_state() {
    let api = Api::new();
    let id = api.id("slow");
    api.put_task(&id, json!({"status": "STARTED"})).await.expect(200);
    let started = Instant::now();
    let resp = api.get_task_wait(&id, 1.0).await.expect(200);
    assert_eq!(resp.json["status"], "STARTED");
    assert!(started.elapsed() >= Duration::from_millis(700), "it waited");
}
