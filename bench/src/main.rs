//! The benchmark: dynachord over HTTP against the equivalent raw DynamoDB
//! calls, in the same run, on the same DynamoDB Local. Prints each figure,
//! DynamoDB requests per operation (from the `x-dynachord-ddb-calls` header),
//! and the ratio service/raw. Medians over rounds; the machine is shared.
//!
//! `./dev bench [--n 1000] [--rounds 3]` builds it, starts the local stack if
//! none is up, and runs it.

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use aws_sdk_dynamodb::Client;
use dynachord::ids::{Namespace, TaskId};
use dynachord::store::schema::{attr, SK_ITEM};
use dynachord::store::task_key;
use futures::future::try_join_all;
use std::collections::HashMap;
use std::time::{Duration, Instant};

struct Args {
    n: usize,
    rounds: usize,
    endpoint: String,
    dynamodb: String,
    table: String,
}

fn args() -> Args {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let mut a = Args {
        n: 1000,
        rounds: 3,
        endpoint: env("DYNACHORD_ENDPOINT", "http://127.0.0.1:9000"),
        dynamodb: env("DYNAMODB_ENDPOINT", "http://127.0.0.1:8000"),
        table: env("TABLE_NAME", "dynachord-local"),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--n", Some(v)) => a.n = v,
            ("--rounds", Some(v)) => a.rounds = v,
            _ => {
                eprintln!("usage: bench [--n 1000] [--rounds 3]");
                std::process::exit(2)
            }
        }
    }
    a
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
        let calls = resp
            .headers()
            .get("x-dynachord-ddb-calls")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
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

struct Raw {
    client: Client,
    table: String,
}

impl Raw {
    fn key(&self, id: &str) -> HashMap<String, AttributeValue> {
        let pk = task_key(&Namespace::default(), &TaskId::parse(id).unwrap());
        HashMap::from([
            (attr::PK.to_owned(), AttributeValue::S(pk)),
            (attr::SK.to_owned(), AttributeValue::S(SK_ITEM.to_owned())),
        ])
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
    let a = args();
    let service = Service { http: reqwest::Client::new(), base: a.endpoint.clone() };
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&a.dynamodb)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("local", "local", None, None, "bench"))
        .load()
        .await;
    let raw = Raw { client: Client::new(&sdk), table: a.table.clone() };
    println!("dynachord bench: n = {}, rounds = {}, service {}, DynamoDB Local {}", a.n, a.rounds, a.endpoint, a.dynamodb);

    let mut t: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut calls: HashMap<&str, u32> = HashMap::new();
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
    let m = |k: &str| median(t[k].clone());
    let per_op = |k: &str, ops: usize| calls.get(k).map(|&c| c as f64 / ops as f64);
    let n = a.n;
    println!("\n{:<48} {:>9} {:>10} {:>10} {:>8}", "what (median)", "seconds", "ms/item", "ddb/op", "vs raw");
    row(&format!("service: store {n} results, sequential"), m("store"), n, per_op("store", n * a.rounds), Some(m("raw put")));
    row(&format!("raw: PutItem x {n}, sequential"), m("raw put"), n, Some(1.0), None);
    row(&format!("service: fetch {n} one by one"), m("fetch"), n, per_op("fetch", n * a.rounds), Some(m("raw get")));
    row(&format!("raw: GetItem x {n}, consistent, sequential"), m("raw get"), n, Some(1.0), None);
    let batches = t["batch"].len();
    row(&format!("service: batch-get {n} in one call"), m("batch"), n, per_op("batch", batches), Some(m("raw batch parallel")));
    row(&format!("raw: BatchGetItem {n} keys, chunks in parallel"), m("raw batch parallel"), n, Some(n.div_ceil(100) as f64), None);
    row(&format!("raw: BatchGetItem {n} keys, chunks in sequence"), m("raw batch sequential"), n, Some(n.div_ceil(100) as f64), None);
    println!("\n(ddb/op for batch-get is per call; targets: store = 1 request, batch-get <= 1.5x raw parallel BatchGetItem)");
}
