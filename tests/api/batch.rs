//! Batch-get: complete, in request order, duplicates allowed, unknown ids PENDING.

use crate::helpers::Api;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_batch_of_1000_comes_back_complete_and_in_order() {
    let api = Api::new();
    let stored = api.store_many("b", 900).await;
    // Interleave 100 unknown ids and repeat some, then shuffle deterministically.
    let mut ids: Vec<String> = stored.clone();
    ids.extend((0..90).map(|i| api.id(&format!("unknown-{i}"))));
    ids.extend(stored[..10].iter().cloned());
    ids.reverse();
    ids.rotate_left(333);
    assert_eq!(ids.len(), 1000);
    let resp = api.batch_get(&ids, None).await.expect(200);
    let results = resp.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 1000);
    for (id, result) in ids.iter().zip(results) {
        assert_eq!(result["task_id"], json!(id));
        match stored.iter().position(|s| s == id) {
            Some(i) => assert_eq!((&result["status"], &result["result"]), (&json!("SUCCESS"), &json!({"i": i}))),
            None => assert_eq!(result["status"], "PENDING"),
        }
    }
    // 990 distinct keys are 10 chunks of at most 100: 10 BatchGetItem calls
    // when nothing is left unprocessed.
    let calls = resp.ddb_calls.unwrap();
    assert!((10..=40).contains(&calls), "{calls} DynamoDB calls for 990 distinct keys");
}

#[tokio::test]
async fn a_batch_wait_returns_when_the_last_result_lands() {
    let api = Api::new();
    let ids: Vec<String> = (0..5).map(|i| api.id(&format!("w{i}"))).collect();
    for id in &ids[..4] {
        api.put_task(id, json!({"status": "SUCCESS", "result": 1})).await.expect(200);
    }
    api.put_task(&ids[4], json!({"status": "STARTED"})).await.expect(200);
    let started = Instant::now();
    let (resp, ()) = tokio::join!(api.batch_get(&ids, Some(10.0)), async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        api.put_task(&ids[4], json!({"status": "FAILURE", "result": "late"})).await.expect(200);
    });
    let took = started.elapsed();
    let results = resp.expect(200).json["results"].as_array().unwrap().clone();
    assert_eq!(results[4]["status"], "FAILURE");
    assert!(took < Duration::from_secs(8), "the wait ended when all were ready, not at its limit: {took:?}");
}

#[tokio::test]
async fn a_batch_wait_gives_the_latest_states_at_its_limit() {
    let api = Api::new();
    let id = api.id("never");
    let resp = api.batch_get(&[id.clone(), id], Some(0.5)).await.expect(200);
    assert_eq!(resp.json["results"][1]["status"], "PENDING");
}

/// Every answer arrives whole, however large: batch-gets whose answers are
/// about 100 KB, 250 KB, 1 MB and 4.5 MB (the most a batch-get answers whole
/// is `BATCH_RESPONSE_BYTES`, 5 MB), 25 of each one after another and 25
/// four at a time, 200 in all. The local function host used to cut off or
/// drop answers past about 64 KB (docs/LOCAL_STACK.md); counts, not times.
#[tokio::test]
async fn large_batch_answers_all_arrive_whole_serial_and_concurrent() {
    use futures::StreamExt;
    let api = Api::new();
    let value = crate::helpers::random_hex(25_000);
    let ids: Vec<String> = (0..180).map(|i| api.id(&format!("big-{i}"))).collect();
    futures::stream::iter(&ids)
        .map(|id| api.put_task(id, json!({"status": "SUCCESS", "result": value})))
        .buffer_unordered(8)
        .for_each(|resp| async move {
            resp.expect(200);
        })
        .await;
    let check = |n: usize, resp: crate::helpers::Resp| {
        let resp = resp.expect(200);
        let results = resp.json["results"].as_array().unwrap_or_else(|| panic!("no results: {:.200}", resp.text));
        assert_eq!(results.len(), n);
        for (id, result) in ids.iter().zip(results) {
            assert_eq!((&result["task_id"], &result["result"]), (&json!(id), &json!(value)), "{id} whole");
        }
        resp.text.len()
    };
    let mut answered = 0;
    for n in [4, 10, 40, 180] {
        let mut bytes = 0;
        for _ in 0..25 {
            bytes = check(n, api.batch_get(&ids[..n], None).await);
            answered += 1;
        }
        let together: Vec<_> =
            futures::stream::iter(0..25).map(|_| api.batch_get(&ids[..n], None)).buffer_unordered(4).collect().await;
        for resp in together {
            check(n, resp);
            answered += 1;
        }
        println!("{n} results: answers of {bytes} bytes, 50 of 50 whole");
    }
    assert_eq!(answered, 200);
}
