//! The benchmark: dynachord over HTTP against the equivalent raw DynamoDB
//! calls, in the same run, on the same DynamoDB Local. Prints each figure,
//! DynamoDB requests per operation (from the `x-dynachord-ddb-calls` header),
//! and the ratio service/raw. Medians over rounds; the machine is shared.
//!
//! Then chords (`--chords 1000,10000`): DynamoDB requests per part (the
//! stores' from the response header, chord-join's from its log line per
//! chord), and the time from the last part's store to the callback landing on
//! SQS; beside it, in the same run on the same DynamoDB Local, Celery 5.7's own
//! DynamoDB backend joining a chord of the same size
//! (`bench/celery_dynamodb_chord.py`).
//!
//! Then large results (`--large 1,20`, in MB): a store and a fetch through
//! the service as the Python package makes them (upload through a presigned
//! PUT and commit; GET, then the presigned URL it answers), against a raw
//! S3 PutObject and GetObject of the same bytes on the same moto server;
//! and the requests each costs, counted from the responses' headers.
//!
//! Then the processing cache (`--cache 500`, see `cache.rs`): a hit and a
//! coalesced miss against the raw GetItem and UpdateItem they stand for.
//!
//! Then a chord body's fan-out (`--fanout 500`, see `fanout.rs`): a group
//! body of N tasks from the part's store to all N on the queue, against raw
//! SendMessage and SendMessageBatch calls.
//!
//! Then a chord's redrive (`--redrive 1000`, see `redrive.rs`): a chord a
//! tenth of whose parts failed, redriven, against its first join.
//!
//! Or only the cold-start bench (`--cold-start`, see `coldstart.rs`), or only
//! the cost model, which writes docs/COST.md (`--cost`, see `cost.rs`).
//!
//! `./dev bench [--n 1000] [--rounds 3] [--chords 1000,10000] [--large 1,20] [--cache 500] [--fanout 500] [--redrive 1000]`
//! builds it, starts the local stack if none is up, and runs it.

mod cache;
mod coldstart;
mod cost;
mod fanout;
mod redrive;

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use aws_sdk_dynamodb::Client;
use dynachord::ids::{Namespace, TaskId};
use dynachord::store::schema::{attr, SK_ITEM};
use dynachord::store::task_key;
use futures::future::try_join_all;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The benchmark: the service against raw DynamoDB calls on the same
/// DynamoDB Local, in the same run.
#[derive(clap::Parser)]
#[command(name = "bench")]
struct Args {
    /// Results per measurement.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Rounds per measurement (the median is printed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Chord sizes to join, comma-separated (`--chords` alone: none).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000", num_args = 0..)]
    chords: Vec<usize>,
    /// Large result sizes to store and fetch, in MB, comma-separated (`--large` alone: none).
    #[arg(long, value_delimiter = ',', default_value = "1,20", num_args = 0..)]
    large: Vec<usize>,
    /// Processing cache requests per measurement (hits, coalesced misses; 0: none).
    #[arg(long, default_value_t = 500)]
    cache: usize,
    /// Tasks in a chord's group body to fan out (0: none).
    #[arg(long, default_value_t = 500)]
    fanout: usize,
    /// Parts of a chord a tenth of which fail, then redriven (0: none).
    #[arg(long, default_value_t = 1000)]
    redrive: usize,
    /// Only the cold-start bench: each release function (`--lambda-dir`) against a Runtime API stub.
    #[arg(long)]
    cold_start: bool,
    /// Only the cost model: the cold-start bench, then the service's requests; writes docs/COST.md.
    #[arg(long)]
    cost: bool,
    /// Fresh processes per function in the cold-start bench.
    #[arg(long, default_value_t = 10)]
    cold_runs: usize,
    /// Warm invocations per process in the cold-start bench.
    #[arg(long, default_value_t = 100)]
    warm: usize,
    /// Where `cargo lambda build --release` wrote the functions.
    #[arg(long, default_value = "target/lambda")]
    lambda_dir: std::path::PathBuf,
    /// The functions' environment, as the local stack writes it.
    #[arg(long, default_value = ".local/functions.env")]
    functions_env: std::path::PathBuf,
    #[arg(long, env = "DYNACHORD_ENDPOINT", default_value = "http://127.0.0.1:9000")]
    endpoint: String,
    /// moto's server: the local stack's S3 (and SQS).
    #[arg(long, env = "SQS_ENDPOINT", default_value = "http://127.0.0.1:5000")]
    moto: String,
    #[arg(long, env = "DYNAMODB_ENDPOINT", default_value = "http://127.0.0.1:8000")]
    dynamodb: String,
    #[arg(long, env = "TABLE_NAME", default_value = "dynachord-local")]
    table: String,
}

/// The meta every stored result carries: a Celery SUCCESS of modest size.
fn meta(task_id: &str, i: usize) -> String {
    serde_json::json!({
        "status": "SUCCESS", "result": {"i": i, "payload": "x".repeat(100)}, "traceback": null,
        "children": [], "date_done": "2026-11-22T23:15:35.403592+00:00", "task_id": task_id,
    })
    .to_string()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

struct Service {
    http: reqwest::Client,
    base: String,
}

impl Service {
    /// Sends a request; returns the body and the DynamoDB calls it cost.
    async fn send(&self, req: reqwest::RequestBuilder) -> (String, u32) {
        let resp = req.send().await.expect("the local stack answers");
        let status = resp.status();
        let calls =
            resp.headers().get("x-dynachord-ddb-calls").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
        let body = resp.text().await.unwrap();
        assert!(status.is_success(), "{status}: {body}");
        (body, calls)
    }

    async fn store_all(&self, ids: &[String]) -> (Duration, u32) {
        let started = Instant::now();
        let mut calls = 0;
        for (i, id) in ids.iter().enumerate() {
            let req = self.http.put(format!("{}/v1/tasks/{id}", self.base)).body(meta(id, i));
            calls += self.send(req).await.1;
        }
        (started.elapsed(), calls)
    }

    async fn fetch_all(&self, ids: &[String]) -> (Duration, u32) {
        let started = Instant::now();
        let mut calls = 0;
        for id in ids {
            let (body, c) = self.send(self.http.get(format!("{}/v1/tasks/{id}", self.base))).await;
            assert!(body.contains("SUCCESS"));
            calls += c;
        }
        (started.elapsed(), calls)
    }

    async fn batch(&self, ids: &[String]) -> (Duration, u32) {
        let started = Instant::now();
        let req = self
            .http
            .post(format!("{}/v1/tasks/batch-get", self.base))
            .body(serde_json::json!({ "task_ids": ids }).to_string());
        let (body, calls) = self.send(req).await;
        let took = started.elapsed();
        assert_eq!(body.matches("\"SUCCESS\"").count(), ids.len());
        (took, calls)
    }
}

/// The key of the table's item under partition key `pk`.
fn item_key(pk: String) -> HashMap<String, AttributeValue> {
    dynachord::store::item::key(pk, SK_ITEM)
}

/// The item key of task `id` in the default namespace.
fn task_item_key(id: &str) -> HashMap<String, AttributeValue> {
    item_key(task_key(&Namespace::default(), &TaskId::parse(id).unwrap()))
}

/// About `bytes` of random hex: barely compressible, like most large payloads.
fn random_hex(bytes: usize) -> String {
    (0..bytes / 32).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect()
}

struct Raw {
    client: Client,
    table: String,
}

impl Raw {
    fn key(&self, id: &str) -> HashMap<String, AttributeValue> {
        task_item_key(id)
    }

    async fn put_all(&self, ids: &[String]) -> Duration {
        let started = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let mut item = self.key(id);
            item.insert(attr::STATUS.into(), AttributeValue::S("SUCCESS".into()));
            item.insert(attr::DOC.into(), AttributeValue::S(meta(id, i)));
            item.insert(attr::EXPIRES_AT.into(), AttributeValue::N("99999999999".into()));
            self.client.put_item().table_name(&self.table).set_item(Some(item)).send().await.unwrap();
        }
        started.elapsed()
    }

    async fn get_all(&self, ids: &[String]) -> Duration {
        let started = Instant::now();
        for id in ids {
            let out = self
                .client
                .get_item()
                .table_name(&self.table)
                .set_key(Some(self.key(id)))
                .consistent_read(true)
                .send()
                .await
                .unwrap();
            assert!(out.item.is_some());
        }
        started.elapsed()
    }

    /// BatchGetItem of all ids, chunks of 100, in parallel or one after another.
    async fn batch(&self, ids: &[String], parallel: bool) -> Duration {
        let started = Instant::now();
        let chunk = |ids: &[String]| {
            let keys = KeysAndAttributes::builder()
                .set_keys(Some(ids.iter().map(|id| self.key(id)).collect()))
                .consistent_read(true)
                .build()
                .unwrap();
            let request = self.client.batch_get_item().request_items(&self.table, keys);
            async move {
                let out = request.send().await?;
                assert!(out.unprocessed_keys.is_none_or(|u| u.is_empty()));
                Ok::<usize, aws_sdk_dynamodb::Error>(out.responses.map_or(0, |r| r.values().map(Vec::len).sum()))
            }
        };
        let found: usize = if parallel {
            try_join_all(ids.chunks(100).map(chunk)).await.unwrap().into_iter().sum()
        } else {
            let mut found = 0;
            for c in ids.chunks(100) {
                found += chunk(c).await.unwrap();
            }
            found
        };
        assert_eq!(found, ids.len());
        started.elapsed()
    }
}

fn row(what: &str, secs: f64, n: usize, calls: Option<f64>, raw: Option<f64>) {
    let calls = calls.map_or("-".to_owned(), |c| format!("{c:.2}"));
    let ratio = raw.map_or("-".to_owned(), |r| format!("{:.2}x", secs / r));
    println!("{what:<48} {secs:>9.3} {:>10.3} {calls:>10} {ratio:>8}", secs * 1000.0 / n as f64);
}

#[tokio::main]
async fn main() {
    let a = <Args as clap::Parser>::parse();
    let service = Service { http: reqwest::Client::new(), base: a.endpoint.clone() };
    let sdk = dynachord::aws::local_config(Some(&a.dynamodb)).await;
    if a.cold_start || a.cost {
        let figures = coldstart::measure(&a.lambda_dir, &a.functions_env, a.cold_runs, a.warm).await;
        coldstart::print(&figures, a.cold_runs, a.warm);
        if a.cost {
            cost::run(&service, &sdk, &a.table, &figures).await;
        }
        return;
    }
    let raw = Raw { client: Client::new(&sdk), table: a.table.clone() };
    println!(
        "dynachord bench: n = {}, rounds = {}, service {}, DynamoDB Local {}",
        a.n, a.rounds, a.endpoint, a.dynamodb
    );

    core_bench(&service, &raw, &a).await;

    long_poll_bench(&service).await;

    if !a.large.is_empty() {
        large_bench(&service, &a).await;
    }

    let sqs = aws_sdk_sqs::Client::from_conf(aws_sdk_sqs::config::Builder::from(&sdk).endpoint_url(&a.moto).build());
    if a.cache > 0 {
        cache::cache_bench(&service, &raw.client, &a.table, &sqs, a.cache).await;
    }

    if a.fanout > 0 {
        fanout::fanout_bench(&service, &sqs, a.fanout, a.rounds).await;
    }

    if a.redrive > 0 {
        redrive::redrive_bench(&service, &sqs, a.redrive, a.rounds).await;
    }

    if !a.chords.is_empty() {
        println!("\nchords: last part stored -> callback on SQS, against Celery 5.7's DynamoDB backend joining the same size");
        println!(
            "{:>7} {:>12} {:>12} {:>12} {:>14} {:>12} {:>14} {:>8}",
            "parts", "store/part", "join/part", "ddb/part", "last->queue s", "celery s", "celery ddb", "speedup"
        );
        for &n in &a.chords {
            chord_bench(&service, &sdk, n).await;
        }
        println!("(ddb/part: DynamoDB requests per part, amortised: each store's, plus chord-join's from its log;");
        println!(" celery ddb: requests of Celery's on_chord_part_return for the last part alone; target: ddb/part <= 2, speedup >= 5x at 1000)");
    }
}

/// Stores, fetches and batch-gets `a.n` results through the service and
/// straight on DynamoDB Local, `a.rounds` times, and prints the medians and
/// ratios.
async fn core_bench(service: &Service, raw: &Raw, a: &Args) {
    let (t, calls) = core_rounds(service, raw, a).await;
    let m = |k: &str| median(t[k].clone());
    let per_op = |k: &str, ops: usize| calls.get(k).map(|&c| c as f64 / ops as f64);
    let n = a.n;
    println!("\n{:<48} {:>9} {:>10} {:>10} {:>8}", "what (median)", "seconds", "ms/item", "ddb/op", "vs raw");
    row(
        &format!("service: store {n} results, sequential"),
        m("store"),
        n,
        per_op("store", n * a.rounds),
        Some(m("raw put")),
    );
    row(&format!("raw: PutItem x {n}, sequential"), m("raw put"), n, Some(1.0), None);
    row(&format!("service: fetch {n} one by one"), m("fetch"), n, per_op("fetch", n * a.rounds), Some(m("raw get")));
    row(&format!("raw: GetItem x {n}, consistent, sequential"), m("raw get"), n, Some(1.0), None);
    let batches = t["batch"].len();
    row(
        &format!("service: batch-get {n} in one call"),
        m("batch"),
        n,
        per_op("batch", batches),
        Some(m("raw batch parallel")),
    );
    row(
        &format!("raw: BatchGetItem {n} keys, chunks in parallel"),
        m("raw batch parallel"),
        n,
        Some(n.div_ceil(100) as f64),
        None,
    );
    row(
        &format!("raw: BatchGetItem {n} keys, chunks in sequence"),
        m("raw batch sequential"),
        n,
        Some(n.div_ceil(100) as f64),
        None,
    );
    println!(
        "\n(ddb/op for batch-get is per call; targets: store = 1 request, batch-get <= 1.5x raw parallel BatchGetItem)"
    );
}

/// The rounds of [`core_bench`]: each operation's times, and the DynamoDB
/// requests the service reported.
async fn core_rounds(
    service: &Service,
    raw: &Raw,
    a: &Args,
) -> (HashMap<&'static str, Vec<f64>>, HashMap<&'static str, u32>) {
    let mut t: HashMap<&'static str, Vec<f64>> = HashMap::new();
    let mut calls: HashMap<&'static str, u32> = HashMap::new();
    for round in 0..a.rounds {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let svc_ids: Vec<String> = (0..a.n).map(|i| format!("bench-{tag}-s{i}")).collect();
        let raw_ids: Vec<String> = (0..a.n).map(|i| format!("bench-{tag}-r{i}")).collect();
        let mut record = |name, secs: Duration, c: Option<u32>| {
            t.entry(name).or_default().push(secs.as_secs_f64());
            if let Some(c) = c {
                *calls.entry(name).or_default() += c;
            }
        };
        let (d, c) = service.store_all(&svc_ids).await;
        record("store", d, Some(c));
        record("raw put", raw.put_all(&raw_ids).await, None);
        let (d, c) = service.fetch_all(&svc_ids).await;
        record("fetch", d, Some(c));
        record("raw get", raw.get_all(&raw_ids).await, None);
        for _ in 0..5 {
            let (d, c) = service.batch(&svc_ids).await;
            record("batch", d, Some(c));
            record("raw batch parallel", raw.batch(&raw_ids, true).await, None);
            record("raw batch sequential", raw.batch(&raw_ids, false).await, None);
        }
        eprintln!("round {} of {} done", round + 1, a.rounds);
    }
    (t, calls)
}

/// What a long-poll of many pending results costs: a 5 s batch-get of 1,000
/// ids that are never stored, its DynamoDB calls (BatchGetItem, 100 keys
/// each), the results they read, and how long it held the request.
async fn long_poll_bench(service: &Service) {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let ids: Vec<String> = (0..1000).map(|i| format!("bench-{tag}-pending-{i}")).collect();
    let started = Instant::now();
    let req = service
        .http
        .post(format!("{}/v1/tasks/batch-get", service.base))
        .body(serde_json::json!({ "task_ids": ids, "wait": 5 }).to_string());
    let (body, calls) = service.send(req).await;
    assert_eq!(body.matches("\"PENDING\"").count(), ids.len());
    println!(
        "\nlong-poll: batch-get of 1000 pending ids, wait 5 s: {:.2} s, {calls} DynamoDB calls, {} results read \
         (bound: n + 200 per second of wait + n at its end = {})",
        started.elapsed().as_secs_f64(),
        calls as usize * 100,
        1000 + 200 * 5 + 1000
    );
}

/// One chord of `n` parts through the service, then Celery's join of the same size.
/// One chord's figures: its parts' stores, chord-join's requests, the time
/// from the last part's store to the callback on SQS, the callback's size.
pub(crate) struct ChordRun {
    pub store_calls_per_part: f64,
    pub join_calls: Option<u64>,
    pub landed_secs: f64,
    pub callback_bytes: usize,
}

/// Joins a chord of `n` parts through the service and waits for its callback.
pub(crate) async fn chord_run(service: &Service, sdk: &aws_config::SdkConfig, n: usize) -> ChordRun {
    use futures::StreamExt;
    let sqs_endpoint = std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
    let sqs =
        aws_sdk_sqs::Client::from_conf(aws_sdk_sqs::config::Builder::from(sdk).endpoint_url(&sqs_endpoint).build());
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let queue = format!("bench-{tag}");
    let url = sqs.create_queue().queue_name(&queue).send().await.expect("SQS answers").queue_url.unwrap();
    let gid = format!("bench-{tag}-g");
    let callback = serde_json::json!({"task": "bench.tsum", "args": [], "kwargs": {}, "immutable": false,
        "options": {"task_id": format!("bench-{tag}-cb"), "queue": queue}});
    let part = |i: usize| {
        let id = format!("bench-{tag}-p{i}");
        let body = serde_json::json!({"status": "SUCCESS", "result": i, "group_id": gid, "group_index": i,
            "chord": {"size": n, "callback": callback}});
        service.http.put(format!("{}/v1/tasks/{id}", service.base)).body(body.to_string())
    };
    // All parts but the last, 16 at a time; wait until chord-join has counted them.
    let store_calls: u32 = futures::stream::iter(0..n - 1)
        .map(|i| async move { service.send(part(i)).await.1 })
        .buffer_unordered(16)
        .collect::<Vec<u32>>()
        .await
        .into_iter()
        .sum();
    let status_url = format!("{}/v1/chords/{gid}", service.base);
    let started = Instant::now();
    loop {
        let (body, _) = service.send(service.http.get(&status_url)).await;
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        if status["done"].as_u64() == Some(n as u64 - 1) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "chord-join did not count the parts: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The measured step: the last part's store until the callback is on the queue.
    let started = Instant::now();
    let last_calls = service.send(part(n - 1)).await.1;
    let callback_bytes = loop {
        let got = sqs.receive_message().queue_url(&url).wait_time_seconds(1).send().await.unwrap();
        if let Some(message) = got.messages.and_then(|m| m.into_iter().next()) {
            break message.body.map_or(0, |b| b.len());
        }
        assert!(started.elapsed() < Duration::from_secs(600), "no callback");
    };
    let landed_secs = started.elapsed().as_secs_f64();
    // chord-join writes its line for the chord once the callback is marked sent.
    let join_calls = wait_for_join_calls(&gid).await;
    ChordRun {
        store_calls_per_part: (store_calls + last_calls) as f64 / n as f64,
        join_calls,
        landed_secs,
        callback_bytes,
    }
}

/// chord-join's requests for a chord, once its log shows the dispatch (up to 10 s).
async fn wait_for_join_calls(gid: &str) -> Option<u64> {
    let started = Instant::now();
    loop {
        let calls = join_calls_from_log(gid);
        if calls.is_some_and(|c| c > 0) || started.elapsed() > Duration::from_secs(10) {
            return calls;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn chord_bench(service: &Service, sdk: &aws_config::SdkConfig, n: usize) {
    let run = chord_run(service, sdk, n).await;
    let (landed, join_calls) = (run.landed_secs, run.join_calls);
    let store_per_part = run.store_calls_per_part;
    let join_per_part = join_calls.map(|c| c as f64 / n as f64);
    let celery = celery_join(n);
    let fmt = |v: Option<f64>, p: usize| v.map_or("n/a".to_owned(), |v| format!("{v:.p$}"));
    let ok = celery.as_ref().ok();
    println!(
        "{n:>7} {store_per_part:>12.3} {:>12} {:>12} {landed:>14.3} {:>12} {:>14} {:>8}",
        fmt(join_per_part, 3),
        fmt(join_per_part.map(|j| j + store_per_part), 3),
        ok.map_or("failed".to_owned(), |c| format!("{:.3}", c.0)),
        ok.map_or("-".to_owned(), |c| c.1.to_string()),
        ok.map_or("-".to_owned(), |c| format!("{:.1}x", c.0 / landed)),
    );
    if let Err(why) = celery {
        println!("        Celery's DynamoDB backend could not join {n} parts: {why}");
    }
}

/// chord-join's DynamoDB requests for one chord, summed from its log lines
/// (`chord advanced ... ddb_calls`) in the local stack's `.local/watch.log`.
fn join_calls_from_log(gid: &str) -> Option<u64> {
    let log = std::fs::read_to_string(".local/watch.log").ok()?;
    let total = log
        .lines()
        .filter(|l| l.contains("chord advanced") && l.contains(gid))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter(|v| v["fields"]["chord"] == gid)
        .filter_map(|v| v["fields"]["ddb_calls"].as_u64())
        .sum();
    Some(total)
}

/// Celery 5.7's DynamoDB backend joining a chord of `n`: (seconds, DynamoDB
/// requests), or why it could not.
fn celery_join(n: usize) -> Result<(f64, u64), String> {
    let out = std::process::Command::new(".venv/bin/python")
        .args(["bench/celery_dynamodb_chord.py", "--n", &n.to_string()])
        .output()
        .map_err(|e| format!("not run: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(stderr.lines().last().unwrap_or("no output").to_owned());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).map_err(|e| e.to_string())?;
    match (v["seconds"].as_f64(), v["ddb_requests_last_part"].as_u64()) {
        (Some(secs), Some(calls)) => Ok((secs, calls)),
        _ => Err(format!("unexpected output: {v}")),
    }
}

/// A response's request counts: (DynamoDB, S3) from its headers.
fn counts(resp: &reqwest::Response) -> (u32, u32) {
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0);
    (header("x-dynachord-ddb-calls"), header("x-dynachord-s3-calls"))
}

/// Requests one large store or fetch made: the client's, and the service's.
#[derive(Default, Clone, Copy)]
pub(crate) struct Requests {
    api: u32,
    s3_direct: u32,
    ddb: u32,
    s3_by_service: u32,
}

impl Requests {
    fn add(&mut self, resp: &reqwest::Response) {
        let (ddb, s3) = counts(resp);
        self.api += 1;
        self.ddb += ddb;
        self.s3_by_service += s3;
    }

    fn describe(&self) -> String {
        format!(
            "{} API + {} S3 from the client; the service made {} DynamoDB + {} S3",
            self.api, self.s3_direct, self.ddb, self.s3_by_service
        )
    }
}

/// Stores `json` (a result's JSON) as the Python package does past its
/// upload threshold: gzip, ask for a presigned PUT, upload, commit.
async fn store_large(service: &Service, id: &str, json: &str) -> Requests {
    use dynachord::store::blobs::{gzip, sha256_hex};
    let mut requests = Requests::default();
    let object = gzip(json.as_bytes());
    let sha = sha256_hex(&object);
    let ask = serde_json::json!({"sha256": sha, "bytes": object.len()}).to_string();
    let resp = service.http.post(format!("{}/v1/tasks/{id}/upload", service.base)).body(ask).send().await.unwrap();
    requests.add(&resp);
    let grant: serde_json::Value = resp.error_for_status().unwrap().json().await.unwrap();
    let mut put = service.http.put(grant["url"].as_str().unwrap()).body(object);
    for (name, value) in grant["headers"].as_object().unwrap() {
        put = put.header(name.as_str(), value.as_str().unwrap());
    }
    put.send().await.unwrap().error_for_status().unwrap();
    requests.s3_direct += 1;
    let commit = serde_json::json!({"status": "SUCCESS", "result_upload": {"sha256": sha}}).to_string();
    let resp = service.http.put(format!("{}/v1/tasks/{id}", service.base)).body(commit).send().await.unwrap();
    requests.add(&resp);
    resp.error_for_status().unwrap();
    requests
}

/// Fetches a large result as the package does: GET, then its `result_ref`.
async fn fetch_large(service: &Service, id: &str, expected_len: usize) -> Requests {
    let mut requests = Requests::default();
    let resp = service.http.get(format!("{}/v1/tasks/{id}", service.base)).send().await.unwrap();
    requests.add(&resp);
    let meta: serde_json::Value = resp.error_for_status().unwrap().json().await.unwrap();
    let text = match meta["result_ref"]["url"].as_str() {
        Some(url) => {
            let bytes = service.http.get(url).send().await.unwrap().bytes().await.unwrap();
            requests.s3_direct += 1;
            dynachord::store::blobs::gunzip(&bytes).unwrap()
        }
        None => meta["result"].to_string(),
    };
    assert_eq!(text.len(), expected_len);
    requests
}

/// Large results through the service against raw S3 on the same moto.
async fn large_bench(service: &Service, a: &Args) {
    let sdk = dynachord::aws::local_config(Some(&a.moto)).await;
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true).build());
    let bucket = "dynachord-local-results";
    println!("\nlarge results: as the Python package stores and fetches them, against raw S3 of the same bytes (moto)");
    println!("{:<48} {:>9} {:>10}", "what (median)", "seconds", "vs raw");
    for &mb in &a.large {
        let json = serde_json::json!(random_hex(mb * 1_000_000)).to_string();
        let mut t: HashMap<&str, Vec<f64>> = HashMap::new();
        let (mut stored, mut fetched) = (Requests::default(), Requests::default());
        for round in 0..a.rounds {
            let id = format!("bench-large-{}-{round}", uuid::Uuid::new_v4().simple());
            let started = Instant::now();
            stored = store_large(service, &id, &json).await;
            t.entry("store").or_default().push(started.elapsed().as_secs_f64());
            let started = Instant::now();
            fetched = fetch_large(service, &id, json.len()).await;
            t.entry("fetch").or_default().push(started.elapsed().as_secs_f64());
            let key = format!("bench-raw/{id}");
            let started = Instant::now();
            s3.put_object().bucket(bucket).key(&key).body(json.clone().into_bytes().into()).send().await.unwrap();
            t.entry("raw put").or_default().push(started.elapsed().as_secs_f64());
            let started = Instant::now();
            let got = s3.get_object().bucket(bucket).key(&key).send().await.unwrap().body.collect().await.unwrap();
            assert_eq!(got.into_bytes().len(), json.len());
            t.entry("raw get").or_default().push(started.elapsed().as_secs_f64());
            s3.delete_object().bucket(bucket).key(&key).send().await.unwrap();
        }
        let m = |k: &str| median(t[k].clone());
        let line = |what: String, secs: f64, raw: Option<f64>| {
            let ratio = raw.map_or("-".to_owned(), |r| format!("{:.2}x", secs / r));
            println!("{what:<48} {secs:>9.3} {ratio:>10}");
        };
        line(format!("service: store {mb} MB (upload + commit)"), m("store"), Some(m("raw put")));
        line(format!("raw: S3 PutObject {mb} MB"), m("raw put"), None);
        line(format!("service: fetch {mb} MB (GET + presigned GET)"), m("fetch"), Some(m("raw get")));
        line(format!("raw: S3 GetObject {mb} MB"), m("raw get"), None);
        println!("  requests per {mb} MB store: {}", stored.describe());
        println!("  requests per {mb} MB fetch: {}", fetched.describe());
    }
}
