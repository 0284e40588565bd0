//! Cold start and size: each function's deployable `bootstrap` (as
//! `cargo lambda build --release` writes it) run against a minimal Lambda
//! Runtime API served here, as Lambda's own runtime API would drive it.
//!
//! For each function and each of `--runs` fresh processes it measures:
//! - init: from spawning the process to its first `GET /runtime/invocation/next`
//!   (the SDK's configuration loaded, clients built);
//! - first: the first invocation, from handing the event to its response
//!   (the first DynamoDB request opens its connection);
//! - warm: the `--warm` invocations after it (medians, and p99 over all runs).
//!
//! The functions run with the local stack's environment (`.local/functions.env`,
//! written by devstack), so their DynamoDB calls go to DynamoDB Local over
//! plain HTTP: TLS is not in these figures. The events are what API Gateway
//! (payload 2.0) would send: store PUTs new results, fetch GETs them,
//! batch-fetch asks for 10 at a time, and chord-join gets a stream record of a
//! plain result (one it reads and passes over; the deployed filter would not
//! even send it, so chord-join's figures are the runtime's and parsing's).
//! Every response is checked (a 2xx, no runtime error), so a failing function
//! cannot pass for a fast one.
//!
//! `./dev bench --cold-start [--cold-runs 10] [--warm 100]` builds the
//! release zips and runs it. `--cost` uses its warm durations and log bytes.

use crate::median;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, Mutex};

pub const FUNCTIONS: [&str; 4] = ["store", "fetch", "batch-fetch", "chord-join"];
const PREFIX: &str = "/2018-06-01/runtime";

/// What the runtime API stub saw, in order.
enum Seen {
    Next(Instant),
    Response { request_id: String, at: Instant, body: String },
    Error { body: String },
}

/// A Runtime API for one process: `/next` waits for the event the bench
/// hands it; responses and errors are reported back.
struct Stub {
    seen: mpsc::UnboundedSender<Seen>,
    events: Mutex<mpsc::UnboundedReceiver<(String, Value)>>,
}

impl Stub {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, String> {
        let path = request.uri().path().to_owned();
        let body = request.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        let rest = path.strip_prefix(PREFIX).unwrap_or(&path);
        if rest == "/invocation/next" {
            let _ = self.seen.send(Seen::Next(Instant::now()));
            let Some((request_id, event)) = self.events.lock().await.recv().await else {
                return Err("no more events".into());
            };
            let deadline = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_secs(30);
            return Ok(Response::builder()
                .header("content-type", "application/json")
                .header("lambda-runtime-aws-request-id", request_id)
                .header("lambda-runtime-deadline-ms", deadline.as_millis().to_string())
                .header("lambda-runtime-invoked-function-arn", "arn:aws:lambda:us-east-1:123456789012:function:bench")
                .header("lambda-runtime-trace-id", "Root=1-00000000-000000000000000000000000;Sampled=0")
                .body(Full::new(Bytes::from(event.to_string())))
                .unwrap());
        }
        let at = Instant::now();
        let seen = match rest.strip_prefix("/invocation/") {
            Some(tail) if tail.ends_with("/response") => {
                Seen::Response { request_id: tail.trim_end_matches("/response").to_owned(), at, body }
            }
            _ => Seen::Error { body: format!("{path}: {body}") },
        };
        let _ = self.seen.send(seen);
        Ok(Response::builder().status(202).body(Full::new(Bytes::from_static(b"{}"))).unwrap())
    }
}

/// Serves a stub on an ephemeral port; returns its address and handles.
async fn serve(
) -> (String, mpsc::UnboundedReceiver<Seen>, mpsc::UnboundedSender<(String, Value)>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a local port");
    let address = listener.local_addr().unwrap().to_string();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let stub = Arc::new(Stub { seen: seen_tx, events: Mutex::new(events_rx) });
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let stub = stub.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| stub.clone().handle(request));
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (address, seen_rx, events_tx, server)
}

/// An API Gateway HTTP API event (payload format 2.0).
fn http_event(method: &str, route: &str, path: &str, body: Option<String>) -> Value {
    json!({
        "version": "2.0", "routeKey": format!("{method} {route}"), "rawPath": path, "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "bench.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {
            "accountId": "123456789012", "apiId": "bench", "domainName": "bench.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "bench", "requestId": "bench", "routeKey": format!("{method} {route}"), "stage": "$default",
            "time": "01/Dec/2026:00:00:00 +0000", "timeEpoch": 0,
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "coldstart"},
        },
        "body": body, "isBase64Encoded": false,
    })
}

/// The `i`-th event of a run for `function`; fetch and batch-fetch read what
/// store's run of the same number stored.
fn event(function: &str, run: &str, i: usize) -> Value {
    let id = |i: usize| format!("cold-{run}-{i}");
    match function {
        "store" => {
            let meta = json!({"status": "SUCCESS", "result": {"i": i, "payload": "x".repeat(100)}});
            http_event("PUT", "/v1/tasks/{task_id}", &format!("/v1/tasks/{}", id(i)), Some(meta.to_string()))
        }
        "fetch" => http_event("GET", "/v1/tasks/{task_id}", &format!("/v1/tasks/{}", id(i)), None),
        "batch-fetch" => {
            let ids: Vec<String> = (0..10).map(|k| id((i + k) % 20)).collect();
            http_event("POST", "/v1/tasks/batch-get", "/v1/tasks/batch-get", Some(json!({"task_ids": ids}).to_string()))
        }
        _ => json!({"Records": [{
            "eventID": format!("{run}-{i}"), "eventName": "INSERT", "eventVersion": "1.1", "eventSource": "aws:dynamodb",
            "awsRegion": "us-east-1",
            "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/dynachord-local/stream/2026-12-01T00:00:00.000",
            "dynamodb": {
                "ApproximateCreationDateTime": 1796083200.0, "SequenceNumber": format!("{}", 1000 + i), "SizeBytes": 100,
                "StreamViewType": "NEW_AND_OLD_IMAGES",
                "Keys": {"pk": {"S": format!("default#task#{}", id(i))}, "sk": {"S": "item"}},
                "NewImage": {"pk": {"S": format!("default#task#{}", id(i))}, "sk": {"S": "item"}, "status": {"S": "SUCCESS"}},
            },
        }]}),
    }
}

/// A response the function gave: API Gateway's with a 2xx, or chord-join's
/// with no failed records.
fn check(function: &str, body: &str) {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let ok = match function {
        "chord-join" => value["batchItemFailures"].as_array().is_some_and(|f| f.is_empty()),
        _ => value["statusCode"].as_u64().is_some_and(|s| (200..300).contains(&s)),
    };
    assert!(ok, "{function} answered {body}");
}

struct Run {
    init: Duration,
    first: Duration,
    warm: Vec<Duration>,
    log_bytes: usize,
    invocations: usize,
    /// Embedded Metric Format lines (the metrics CloudWatch would make).
    emf: Vec<String>,
}

/// One function's figures over its runs.
pub struct Figures {
    pub function: &'static str,
    pub zip_bytes: u64,
    pub binary_bytes: u64,
    /// Medians, in milliseconds.
    pub init_ms: f64,
    pub init_range_ms: (f64, f64),
    pub first_ms: f64,
    pub warm_ms: f64,
    pub warm_p99_ms: f64,
    /// What it logs per invocation (init included), as CloudWatch Logs ingests it.
    pub log_bytes_per_invocation: f64,
    pub emf: Vec<String>,
}

async fn one_run(
    function: &str,
    binary: &Path,
    env: &HashMap<String, String>,
    run: &str,
    warm: usize,
) -> Result<Run, String> {
    let (address, mut seen, events, server) = serve().await;
    let mut child = tokio::process::Command::new(binary)
        .envs(env)
        .env("AWS_LAMBDA_RUNTIME_API", &address)
        .env("AWS_LAMBDA_FUNCTION_NAME", function)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{function}"))
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "coldstart")
        // As deployed (LogLevel INFO): what it logs is what CloudWatch ingests.
        .env("RUST_LOG", "INFO")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let started = Instant::now();
    let stdout = child.stdout.take().expect("piped");
    let logged = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let (mut bytes, mut emf) = (0usize, Vec::new());
        while let Ok(Some(line)) = lines.next_line().await {
            bytes += line.len() + 1;
            if line.contains("\"_aws\"") {
                emf.push(line);
            }
        }
        (bytes, emf)
    });
    let result = async {
        let mut times = Vec::with_capacity(warm + 1);
        let mut init = Duration::ZERO;
        for i in 0..=warm {
            match recv(&mut seen).await {
                Some(Seen::Next(at)) if i == 0 => init = at - started,
                Some(Seen::Next(_)) => {}
                Some(Seen::Error { body }) => return Err(format!("{function}: {body}")),
                _ => return Err(format!("{function} never asked for an event")),
            }
            let request_id = format!("{run}-{i}");
            let handed = Instant::now();
            events.send((request_id.clone(), event(function, run, i))).map_err(|e| e.to_string())?;
            match recv(&mut seen).await {
                Some(Seen::Response { request_id: id, at, body }) if id == request_id => {
                    check(function, &body);
                    times.push(at - handed);
                }
                Some(Seen::Error { body }) => return Err(format!("{function}: {body}")),
                _ => return Err(format!("{function} did not answer event {i}")),
            }
        }
        Ok((init, times))
    }
    .await;
    // The process is this run's own: stopped by its handle (its PID).
    let _ = child.start_kill();
    let output = child.wait_with_output().await;
    server.abort();
    let (log_bytes, emf) = logged.await.unwrap_or_default();
    match result {
        Ok((init, times)) => {
            Ok(Run { init, first: times[0], warm: times[1..].to_vec(), log_bytes, invocations: times.len(), emf })
        }
        Err(e) => {
            if let Ok(output) = output {
                eprintln!("{}", String::from_utf8_lossy(&output.stderr));
            }
            Err(e)
        }
    }
}

/// What the stub saw next, or None after 30 s.
async fn recv(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Option<Seen> {
    tokio::time::timeout(Duration::from_secs(30), seen.recv()).await.ok().flatten()
}

fn env_file(path: &Path) -> HashMap<String, String> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e} (is the local stack up?)", path.display()));
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((xs.len() as f64 * p) as usize).min(xs.len() - 1)]
}

/// The `bootstrap` of a deployable zip, extracted into `dir` (the very bytes
/// Lambda would run), made executable; returns its path.
fn unzip(zip: &Path, dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    assert!(zip.exists(), "{} is missing: run ./dev build-lambdas", zip.display());
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("a writable target dir");
    let status = std::process::Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(zip)
        .arg(dir)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "could not extract {}", zip.display());
    let binary = dir.join("bootstrap");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("bootstrap extracted");
    binary
}

/// Runs each function `runs` times, `warm` invocations after the first.
pub async fn measure(lambda_dir: &Path, env_file_path: &Path, runs: usize, warm: usize) -> Vec<Figures> {
    let env = env_file(env_file_path);
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut all = Vec::new();
    for function in FUNCTIONS {
        let zip = lambda_dir.join(function).join("bootstrap.zip");
        let binary = unzip(&zip, &lambda_dir.join("coldstart").join(function));
        let size = |path: &Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let mut done = Vec::new();
        for r in 0..runs {
            match one_run(function, &binary, &env, &format!("{tag}-{r}"), warm).await {
                Ok(run) => done.push(run),
                Err(e) => panic!("{e}"),
            }
        }
        let inits: Vec<f64> = done.iter().map(|r| ms(r.init)).collect();
        let range = inits.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let warms: Vec<f64> = done.iter().flat_map(|r| r.warm.iter().map(|d| ms(*d))).collect();
        let invocations: usize = done.iter().map(|r| r.invocations).sum();
        all.push(Figures {
            function,
            zip_bytes: size(&zip),
            binary_bytes: size(&binary),
            init_ms: median(inits),
            init_range_ms: range,
            first_ms: median(done.iter().map(|r| ms(r.first)).collect()),
            warm_ms: median(warms.clone()),
            warm_p99_ms: percentile(warms, 0.99),
            log_bytes_per_invocation: done.iter().map(|r| r.log_bytes).sum::<usize>() as f64 / invocations as f64,
            emf: done.into_iter().flat_map(|r| r.emf).collect(),
        });
    }
    all
}

/// Prints the figures, one row per function.
pub fn print(figures: &[Figures], runs: usize, warm: usize) {
    println!(
        "\ncold start: {runs} fresh processes per function, {warm} warm invocations each, against a Runtime API stub"
    );
    println!(
        "{:<12} {:>9} {:>10} {:>20} {:>9} {:>8} {:>9} {:>9}",
        "function", "zip MB", "binary MB", "init ms (min-max)", "first ms", "warm ms", "warm p99", "log B/inv"
    );
    for f in figures {
        println!(
            "{:<12} {:>9.2} {:>10.2} {:>7.1} ({:>4.1}-{:>5.1}) {:>9.2} {:>8.2} {:>9.2} {:>9.0}",
            f.function,
            f.zip_bytes as f64 / 1e6,
            f.binary_bytes as f64 / 1e6,
            f.init_ms,
            f.init_range_ms.0,
            f.init_range_ms.1,
            f.first_ms,
            f.warm_ms,
            f.warm_p99_ms,
            f.log_bytes_per_invocation,
        );
    }
    println!("(medians; goal: each zip under 4 MB, init under 20 ms; DynamoDB Local over plain HTTP, so no TLS here)");
}
