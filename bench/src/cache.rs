//! The processing cache's costs (`--cache N`): N hits of one cached key and
//! N coalesced misses (requests that join a running processing), one at a
//! time over HTTP, against the raw DynamoDB calls they stand for on the
//! same DynamoDB Local in the same run: a consistent GetItem of the entry,
//! and a conditional UpdateItem that appends to a list. Prints the median
//! latency per request, the DynamoDB requests each cost (from the
//! `x-dynachord-ddb-calls` header) and the ratio service/raw.

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use dynachord::cache::{entry_hash, entry_key};
use dynachord::ids::Namespace;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use crate::{item_key, median, Service};

/// Joins per processing: well under `CACHE_MAX_WAITERS` and its bytes.
const JOINS_PER_KEY: usize = 250;

pub async fn cache_bench(service: &Service, raw: &Client, table: &str, sqs: &aws_sdk_sqs::Client, n: usize) {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let queue = format!("bench-cache-{tag}");
    sqs.create_queue().queue_name(&queue).send().await.expect("SQS answers");
    let operation = json!({"task": "bench.measure", "queue": queue, "lease": 3600,
        "callback": {"task": "bench.measure_done", "queue": queue}});
    let ask = |uri: &str, cb: Value| {
        let body = json!({"op": "measure", "uri": uri, "cb_args": cb, "operation": operation});
        service.http.post(format!("{}/v1/cache/get-or-delegate", service.base)).body(body.to_string())
    };

    // A cached key: delegated, its processing's result stored as a worker would.
    let hit_uri = format!("bench://{tag}/hit");
    let (body, _) = service.send(ask(&hit_uri, json!(null))).await;
    let task_id = serde_json::from_str::<Value>(&body).unwrap()["task_id"].as_str().unwrap().to_owned();
    let result = json!({"status": "SUCCESS", "result": {"width": 640, "height": 480, "uri": hit_uri}});
    service.send(service.http.put(format!("{}/v1/tasks/{task_id}", service.base)).body(result.to_string())).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (body, _) = service.send(ask(&hit_uri, json!(null))).await;
        if body.contains("\"cached\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the processing never settled: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut hits = Vec::with_capacity(n);
    let mut hit_calls = 0;
    for i in 0..n {
        let started = Instant::now();
        let (body, calls) = service.send(ask(&hit_uri, json!(i))).await;
        hits.push(started.elapsed().as_secs_f64());
        assert!(body.contains("\"cached\""), "{body}");
        hit_calls += calls;
    }

    // Coalesced misses: the first request of each key delegates, the rest join it.
    let mut joins = Vec::with_capacity(n);
    let mut join_calls = 0;
    for k in 0..n.div_ceil(JOINS_PER_KEY) {
        let uri = format!("bench://{tag}/miss{k}");
        service.send(ask(&uri, json!("first"))).await;
        for i in 0..JOINS_PER_KEY.min(n - k * JOINS_PER_KEY) {
            let started = Instant::now();
            let (body, calls) = service.send(ask(&uri, json!(i))).await;
            joins.push(started.elapsed().as_secs_f64());
            assert!(body.contains("\"delegated\":false"), "{body}");
            join_calls += calls;
        }
    }

    let (raw_gets, raw_updates) = raw_calls(raw, table, &tag, &hit_uri, n).await;
    let ms = |xs: &[f64]| median(xs.to_vec()) * 1000.0;
    println!("\nprocessing cache: {n} requests each, one at a time (median per request)");
    println!("{:<52} {:>10} {:>10} {:>8}", "what", "ms", "ddb/req", "vs raw");
    let line = |what: &str, xs: &[f64], calls: Option<f64>, base: Option<&[f64]>| {
        let calls = calls.map_or("1.00".to_owned(), |c| format!("{c:.2}"));
        let ratio = base.map_or("-".to_owned(), |b| format!("{:.2}x", ms(xs) / ms(b)));
        println!("{what:<52} {:>10.2} {calls:>10} {ratio:>8}", ms(xs));
    };
    line("service: hit (get-or-delegate of a cached key)", &hits, Some(hit_calls as f64 / n as f64), Some(&raw_gets));
    line("raw: GetItem of the entry, consistent", &raw_gets, None, None);
    line(
        "service: coalesced miss (joins the running processing)",
        &joins,
        Some(join_calls as f64 / joins.len() as f64),
        Some(&raw_updates),
    );
    line("raw: conditional UpdateItem appending to a list", &raw_updates, None, None);
    println!("(a hit is 1 consistent read; a coalesced miss is that read, then 1 conditional update)");
}

/// The raw calls the cache's requests stand for, `n` of each: the entry's
/// consistent GetItem, and a conditional append to a list on an item of its own.
async fn raw_calls(raw: &Client, table: &str, tag: &str, hit_uri: &str, n: usize) -> (Vec<f64>, Vec<f64>) {
    // The raw calls: the entry's consistent GetItem; an append to a list on an item of its own.
    let entry = item_key(entry_key(&Namespace::default(), &entry_hash("measure", hit_uri)));
    let mut raw_gets = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let out =
            raw.get_item().table_name(table).set_key(Some(entry.clone())).consistent_read(true).send().await.unwrap();
        raw_gets.push(started.elapsed().as_secs_f64());
        assert!(out.item.is_some());
    }
    let appended = item_key(format!("bench-raw-cache/{tag}"));
    let mut raw_updates = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        raw.update_item()
            .table_name(table)
            .set_key(Some(appended.clone()))
            .update_expression("SET w = list_append(if_not_exists(w, :empty), :w), expires_at = :exp ADD wc :one")
            .condition_expression("attribute_not_exists(wc) OR wc < :max")
            .expression_attribute_values(":empty", AttributeValue::L(vec![]))
            .expression_attribute_values(":w", AttributeValue::L(vec![AttributeValue::S(i.to_string())]))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":max", AttributeValue::N("100000".into()))
            .expression_attribute_values(":exp", AttributeValue::N("99999999999".into()))
            .send()
            .await
            .unwrap();
        raw_updates.push(started.elapsed().as_secs_f64());
    }
    (raw_gets, raw_updates)
}
