//! The load test: many concurrent clients storing and fetching results, with
//! chords mixed in, against the local stack over HTTP; then the same number
//! of raw PutItem + consistent GetItem pairs from as many clients, straight
//! to the same DynamoDB Local, in the same run.
//!
//! It checks, and exits non-zero when it fails:
//! - no lost write: every acknowledged store reads back identical, one by
//!   one right after it and again all together (batch-get) at the end;
//! - every chord's callback arrives exactly once, with its parts' results
//!   complete and in order (no duplicate, none lost);
//! - no request answered anything but 200 (a 503 is counted and fails the
//!   run), and none left without an answer within 30 s: each is sent once,
//!   and a 5xx or a time-out is a failure, whoever answered it.
//!
//! It prints throughput and the p50/p99 latency of stores and fetches beside
//! the raw DynamoDB Local figures. Figures only, never asserted: the machine
//! is shared and noisy.
//!
//! `./dev test` runs it at its default size (50 clients, 20,000 results, 2%
//! of them in chords of 50). `./dev load --clients 100 --results 200000` is the long
//! variant (release build).

use aws_sdk_dynamodb::types::AttributeValue;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dynachord::ids::{Namespace, TaskId};
use dynachord::store::schema::{attr, SK_ITEM};
use dynachord::store::task_key;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The load test: many clients store and read back results, with chords
/// mixed in, against the local stack.
#[derive(clap::Parser)]
#[command(name = "load")]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 50, value_parser = positive)]
    clients: usize,
    /// Results stored in all.
    #[arg(long, default_value_t = 20_000, value_parser = positive)]
    results: usize,
    /// Parts per chord.
    #[arg(long, default_value_t = 50, value_parser = positive)]
    chord_size: usize,
    /// Share of the results that are chord parts (0 to 1).
    #[arg(long, default_value_t = 0.02, value_parser = share)]
    chord_share: f64,
    #[arg(long, env = "DYNACHORD_ENDPOINT", default_value = "http://127.0.0.1:9000")]
    endpoint: String,
    #[arg(long, env = "DYNAMODB_ENDPOINT", default_value = "http://127.0.0.1:8000")]
    dynamodb: String,
    #[arg(long, env = "SQS_ENDPOINT", default_value = "http://127.0.0.1:5000")]
    sqs: String,
    #[arg(long, env = "TABLE_NAME", default_value = "dynachord-local")]
    table: String,
}

fn positive(raw: &str) -> Result<usize, String> {
    raw.parse().ok().filter(|&n: &usize| n > 0).ok_or_else(|| format!("{raw:?} is not a whole number above 0"))
}

fn share(raw: &str) -> Result<f64, String> {
    let value: f64 = raw.parse().map_err(|_| format!("{raw:?} is not a number"))?;
    (0.0..=1.0).contains(&value).then_some(value).ok_or_else(|| format!("{value} is not between 0 and 1"))
}

/// One result to store: a plain task, or part `index` of chord `chord`.
#[derive(Clone)]
struct Work {
    id: String,
    body: String,
    result: Value,
}

/// The run's results: plain tasks with results of varied size and shape,
/// and `chords` chords of `size` parts, interleaved so parts of every chord
/// are stored by many clients at once.
/// A chord the plan expects a callback for: group id, callback id, results.
type ExpectedChord = (String, String, Vec<Value>);

fn plan(tag: &str, a: &Args, queue: &str) -> (Vec<Work>, Vec<ExpectedChord>) {
    let chords = ((a.results as f64 * a.chord_share) as usize) / a.chord_size;
    let mut chord_work = Vec::new();
    let mut chord_list = Vec::new();
    for c in 0..chords {
        let gid = format!("load-{tag}-g{c}");
        let callback_id = format!("load-{tag}-cb{c}");
        let callback = json!({"task": "load.collect", "args": [], "kwargs": {}, "immutable": false,
            "options": {"task_id": callback_id, "queue": queue}});
        let mut results = Vec::new();
        for i in 0..a.chord_size {
            let id = format!("load-{tag}-g{c}-p{i}");
            let result = json!({"chord": c, "part": i});
            let body = json!({"status": "SUCCESS", "result": result, "traceback": null, "children": [],
                "group_id": gid, "group_index": i, "chord": {"size": a.chord_size, "callback": callback}});
            chord_work.push(Work { id, body: body.to_string(), result: result.clone() });
            results.push(result);
        }
        chord_list.push((gid, callback_id, results));
    }
    let plain = a.results - chord_work.len();
    let mut work: Vec<Work> = (0..plain)
        .map(|i| {
            let result = match i % 4 {
                0 => json!(i),
                1 => json!({"i": i, "big": 123456789012345678901234567890u128.to_string(), "text": "é✓"}),
                2 => json!({"i": i, "payload": "x".repeat(1 + i % 2000)}),
                _ => json!([i, null, true, {"nested": [i]}]),
            };
            let id = format!("load-{tag}-t{i}");
            let body = json!({"status": "SUCCESS", "result": result, "traceback": null, "children": []});
            Work { id, body: body.to_string(), result }
        })
        .collect();
    // Chord parts spread evenly through the plain stores, in an order that
    // is not their index order.
    let step = (work.len() / chord_work.len().max(1)).max(1);
    for (n, part) in chord_work.into_iter().rev().enumerate() {
        work.insert((n * step).min(work.len()), part);
    }
    (work, chord_list)
}

#[derive(Default)]
struct Tally {
    store_ms: Vec<f64>,
    fetch_ms: Vec<f64>,
    failures: Vec<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(what: &str, mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
    println!("  {what:<34} p50 {p50:>8.2} ms   p99 {p99:>8.2} ms   ({} calls)", ms.len());
    (p50, p99)
}

/// The service: each client stores its next result, reads it back at once
/// and compares. Returns the
/// acknowledged results and the wall time.
async fn service_run(a: &Args, work: Arc<Vec<Work>>, tally: Arc<Mutex<Tally>>) -> (Vec<Work>, Duration) {
    let http =
        reqwest::Client::builder().pool_max_idle_per_host(a.clients).timeout(Duration::from_secs(30)).build().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(Vec::with_capacity(work.len())));
    let started = Instant::now();
    let progress = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..a.clients)
        .map(|_| {
            let (http, work, next, acked, tally, progress) =
                (http.clone(), work.clone(), next.clone(), acked.clone(), tally.clone(), progress.clone());
            let base = a.endpoint.clone();
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = work.get(i) else { break };
                    let t = Instant::now();
                    let stored = store(&http, &base, w).await;
                    let store_ms = t.elapsed().as_secs_f64() * 1000.0;
                    if let Err(why) = stored {
                        tally.lock().unwrap().failures.push(format!("store {}: {why}", w.id));
                        continue;
                    }
                    acked.lock().unwrap().push(w.clone());
                    let t = Instant::now();
                    let read = fetch(&http, &base, &w.id).await;
                    let fetch_ms = t.elapsed().as_secs_f64() * 1000.0;
                    let mut tally = tally.lock().unwrap();
                    tally.store_ms.push(store_ms);
                    tally.fetch_ms.push(fetch_ms);
                    match read {
                        Ok(v) if v["status"] == "SUCCESS" && v["result"] == w.result => {}
                        other => tally.failures.push(format!("read back {}: {other:?}", w.id)),
                    }
                    drop(tally);
                    let done = progress.fetch_add(1, Ordering::Relaxed) + 1;
                    if done % 5000 == 0 {
                        eprintln!("  {done} stored and read back");
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("a client task");
    }
    let took = started.elapsed();
    let acked = Arc::try_unwrap(acked).ok().expect("clients are done").into_inner().unwrap();
    (acked, took)
}

/// Sends a request once and reads its answer: its status and its body.
async fn send(request: reqwest::RequestBuilder) -> Result<(u16, String), String> {
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.map_err(|e| e.to_string())?))
}

/// Stores one result, as a worker's client does.
async fn store(http: &reqwest::Client, base: &str, w: &Work) -> Result<(), String> {
    match send(http.put(format!("{base}/v1/tasks/{}", w.id)).body(w.body.clone())).await? {
        (200, _) => Ok(()),
        (status, text) => Err(format!("{status} {text}")),
    }
}

/// Reads one result back.
async fn fetch(http: &reqwest::Client, base: &str, id: &str) -> Result<Value, String> {
    match send(http.get(format!("{base}/v1/tasks/{id}"))).await? {
        (200, text) => serde_json::from_str(&text).map_err(|e| e.to_string()),
        (status, text) => Err(format!("{status} {text}")),
    }
}

/// Every acknowledged result again, 1,000 per batch-get.
async fn verify_all(a: &Args, acked: &[Work]) -> Vec<String> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let mut lost = Vec::new();
    for chunk in acked.chunks(1000) {
        let ids: Vec<&str> = chunk.iter().map(|w| w.id.as_str()).collect();
        let body = json!({"task_ids": ids}).to_string();
        let url = format!("{}/v1/tasks/batch-get", a.endpoint);
        let body: Value = match send(http.post(&url).body(body)).await {
            Ok((200, text)) => serde_json::from_str(&text).unwrap_or(Value::Null),
            Ok((status, text)) => {
                lost.push(format!("batch-get: {status} {text}"));
                continue;
            }
            Err(e) => {
                lost.push(format!("batch-get of {} ids: {e}", ids.len()));
                continue;
            }
        };
        let results = body["results"].as_array().cloned().unwrap_or_default();
        if results.len() != chunk.len() {
            lost.push(format!("batch-get of {} ids answered {} results", chunk.len(), results.len()));
        }
        for (w, got) in chunk.iter().zip(&results) {
            // A result past the response's size budget comes as a reference: read it on its own.
            let got = match got.get("ref") {
                None => got.clone(),
                Some(_) => match send(http.get(format!("{}/v1/tasks/{}", a.endpoint, w.id))).await {
                    Ok((200, text)) => serde_json::from_str(&text).unwrap_or(Value::Null),
                    other => json!({"unreadable reference": format!("{other:?}")}),
                },
            };
            if got["status"] != "SUCCESS" || got["result"] != w.result {
                lost.push(format!("{}: {got}", w.id));
            }
        }
    }
    lost
}

/// Waits for one callback per chord; returns (duplicates, missing, wrong).
async fn collect_callbacks(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    chords: &[(String, String, Vec<Value>)],
) -> (usize, usize, Vec<String>) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut wrong = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut settled_at: Option<Instant> = None;
    while Instant::now() < deadline {
        let got = sqs.receive_message().queue_url(url).max_number_of_messages(10).wait_time_seconds(1).send().await;
        let messages = got.map(|g| g.messages.unwrap_or_default()).unwrap_or_default();
        for m in messages {
            let _ =
                sqs.delete_message().queue_url(url).receipt_handle(m.receipt_handle.unwrap_or_default()).send().await;
            let envelope: Value = B64
                .decode(m.body.unwrap_or_default())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            let id = envelope["headers"]["id"].as_str().unwrap_or("").to_owned();
            let body: Value = envelope["body"]
                .as_str()
                .and_then(|b| B64.decode(b).ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            match chords.iter().find(|(_, cb, _)| *cb == id) {
                Some((_, _, results)) if body[0][0] == Value::Array(results.clone()) => {}
                Some(_) => wrong.push(format!("callback {id}: results not complete or not in order")),
                None => wrong.push(format!("a message no chord of this run sent: {id:?}")),
            }
            *seen.entry(id).or_default() += 1;
        }
        if seen.len() >= chords.len() {
            // All here: keep listening a little for duplicates.
            let at = *settled_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
    }
    let duplicates = seen.values().map(|n| n.saturating_sub(1)).sum();
    let missing = chords.iter().filter(|(_, cb, _)| !seen.contains_key(cb)).count();
    (duplicates, missing, wrong)
}

/// The baseline: the same number of PutItem + consistent GetItem pairs from
/// as many clients, straight to DynamoDB Local.
async fn raw_run(a: &Args, client: aws_sdk_dynamodb::Client, work: Arc<Vec<Work>>) -> (Vec<f64>, Vec<f64>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let times = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let started = Instant::now();
    let clients: Vec<_> = (0..a.clients)
        .map(|_| {
            let (client, work, next, times, table, tag) =
                (client.clone(), work.clone(), next.clone(), times.clone(), a.table.clone(), tag.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = work.get(i) else { break };
                    let id = TaskId::parse(&format!("raw-{tag}-{i}")).unwrap();
                    let key = HashMap::from([
                        (attr::PK.to_owned(), AttributeValue::S(task_key(&Namespace::default(), &id))),
                        (attr::SK.to_owned(), AttributeValue::S(SK_ITEM.to_owned())),
                    ]);
                    let mut item = key.clone();
                    item.insert(attr::STATUS.into(), AttributeValue::S("SUCCESS".into()));
                    item.insert(attr::DOC.into(), AttributeValue::S(w.body.clone()));
                    item.insert(attr::EXPIRES_AT.into(), AttributeValue::N("99999999999".into()));
                    let t = Instant::now();
                    client.put_item().table_name(&table).set_item(Some(item)).send().await.expect("raw PutItem");
                    let put_ms = t.elapsed().as_secs_f64() * 1000.0;
                    let t = Instant::now();
                    let got =
                        client.get_item().table_name(&table).set_key(Some(key)).consistent_read(true).send().await;
                    let get_ms = t.elapsed().as_secs_f64() * 1000.0;
                    assert!(got.expect("raw GetItem").item.is_some());
                    let mut times = times.lock().unwrap();
                    times.0.push(put_ms);
                    times.1.push(get_ms);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("a raw client task");
    }
    let took = started.elapsed();
    let (puts, gets) = Arc::try_unwrap(times).expect("clients are done").into_inner().unwrap();
    (puts, gets, took)
}

/// Prints the service's and the raw baseline's throughput, latencies and
/// ratios; gives the tally back for the checks.
fn print_speed(results: usize, mut tally: Tally, took: Duration, raw: (Vec<f64>, Vec<f64>, Duration)) -> Tally {
    let (raw_puts, raw_gets, raw_took) = raw;
    let n = results as f64;
    println!("\nservice (HTTP, cargo lambda watch, debug or release as built) and raw DynamoDB Local, same run:");
    println!(
        "  service: {} stores + {} fetches in {:.2} s: {:.0} results/s",
        tally.store_ms.len(),
        tally.fetch_ms.len(),
        took.as_secs_f64(),
        n / took.as_secs_f64()
    );
    println!(
        "  raw:     {} PutItem + {} GetItem in {:.2} s: {:.0} results/s",
        raw_puts.len(),
        raw_gets.len(),
        raw_took.as_secs_f64(),
        n / raw_took.as_secs_f64()
    );
    let (s50, s99) = summary("service store (PUT)", std::mem::take(&mut tally.store_ms));
    let (r50, r99) = summary("raw PutItem", raw_puts);
    let (f50, f99) = summary("service fetch (GET)", std::mem::take(&mut tally.fetch_ms));
    let (g50, g99) = summary("raw GetItem (consistent)", raw_gets);
    println!(
        "  ratios service/raw: store p50 {:.1}x p99 {:.1}x; fetch p50 {:.1}x p99 {:.1}x; throughput {:.2}x",
        s50 / r50,
        s99 / r99,
        f50 / g50,
        f99 / g99,
        raw_took.as_secs_f64() / took.as_secs_f64()
    );
    tally
}

#[tokio::main]
async fn main() {
    let a = <Args as clap::Parser>::parse();
    let sdk = dynachord::aws::local_config(None).await;
    let dynamodb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&sdk).endpoint_url(&a.dynamodb).build(),
    );
    let sqs = aws_sdk_sqs::Client::from_conf(aws_sdk_sqs::config::Builder::from(&sdk).endpoint_url(&a.sqs).build());
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let queue = format!("load-{tag}");
    let url = sqs.create_queue().queue_name(&queue).send().await.expect("SQS (moto) answers").queue_url.unwrap();
    let (work, chords) = plan(&tag, &a, &queue);
    let parts = chords.len() * a.chord_size;
    println!(
        "dynachord load: {} clients, {} results ({} in {} chords of {}), service {}, DynamoDB Local {}",
        a.clients,
        work.len(),
        parts,
        chords.len(),
        a.chord_size,
        a.endpoint,
        a.dynamodb
    );
    let work = Arc::new(work);
    let tally = Arc::new(Mutex::new(Tally::default()));

    let (acked, took) = service_run(&a, work.clone(), tally.clone()).await;
    eprintln!("service run done in {:.1} s; reading every acknowledged result back", took.as_secs_f64());
    let phase = Instant::now();
    let lost = verify_all(&a, &acked).await;
    eprintln!("read back in {:.1} s; waiting for {} chord callbacks", phase.elapsed().as_secs_f64(), chords.len());
    let phase = Instant::now();
    let (duplicates, missing, wrong) = collect_callbacks(&sqs, &url, &chords).await;
    eprintln!(
        "callbacks collected in {:.1} s; raw DynamoDB Local baseline: {} clients",
        phase.elapsed().as_secs_f64(),
        a.clients
    );
    let (raw_puts, raw_gets, raw_took) = raw_run(&a, dynamodb, work.clone()).await;

    let tally = Arc::try_unwrap(tally).ok().expect("clients are done").into_inner().unwrap();
    let tally = print_speed(work.len(), tally, took, (raw_puts, raw_gets, raw_took));
    println!("\nchecks:");
    println!(
        "  acknowledged stores: {} of {}; failed requests (each sent once): {}",
        acked.len(),
        work.len(),
        tally.failures.len()
    );
    println!("  lost or changed after the run (batch-get of all {}): {}", acked.len(), lost.len());
    println!(
        "  chords: {} callbacks expected, {} missing, {} duplicated, {} wrong",
        chords.len(),
        missing,
        duplicates,
        wrong.len()
    );
    let mut problems: Vec<String> = tally.failures.into_iter().chain(lost).chain(wrong).collect();
    if missing > 0 {
        problems.push(format!("{missing} chord callbacks never arrived"));
    }
    if duplicates > 0 {
        problems.push(format!("{duplicates} duplicate chord callbacks"));
    }
    if !problems.is_empty() {
        eprintln!("\nload test FAILED ({} problems); the first ones:", problems.len());
        for p in problems.iter().take(10) {
            eprintln!("  {p}");
        }
        std::process::exit(1);
    }
    println!("load test passed: nothing lost, every callback once");
}
