//! What dynachord costs on AWS, from figures measured in this run:
//! `./dev bench --cost` writes `docs/COST.md`.
//!
//! Measured here:
//! - DynamoDB requests per store, fetch, 5 s long-poll and chord part, from the
//!   service's `x-dynachord-ddb-calls` header and chord-join's log line per
//!   chord, on the local stack;
//! - the size of a stored result's item (read raw from DynamoDB Local), which
//!   sets its read and write units;
//! - each function's warm duration and the bytes it logs per invocation (the
//!   release build against a Runtime API stub, `coldstart.rs`), and the
//!   metrics its Embedded Metric Format lines define;
//! - a chord callback's message size, and Celery 5.7's DynamoDB backend's
//!   requests for the last part of a chord of the same size (its join).
//!
//! Not measurable here, so parameters with their assumption stated: prices
//! (`PRICES`, dated), how many stream records chord-join gets per invocation,
//! and how long a DynamoDB request takes in AWS (DynamoDB Local answers in
//! well under a millisecond; in a region a request takes a few).

use crate::coldstart::Figures;
use crate::Service;
use dynachord::store::item::item_size;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Instant;

/// List prices, us-east-1, as dated; edit and run again to re-price.
pub struct Prices {
    pub as_of: &'static str,
    pub api_per_million: f64,
    pub lambda_requests_per_million: f64,
    pub lambda_gb_second_arm64: f64,
    pub ddb_write_units_per_million: f64,
    pub ddb_read_units_per_million: f64,
    pub ddb_wcu_hour: f64,
    pub ddb_rcu_hour: f64,
    pub ddb_storage_gb_month: f64,
    pub ddb_pitr_gb_month: f64,
    pub sqs_per_million: f64,
    pub s3_put_per_thousand: f64,
    pub s3_get_per_thousand: f64,
    pub logs_ingest_gb: f64,
    pub custom_metric_month: f64,
    pub alarm_month: f64,
    pub dashboard_month: f64,
    pub elasticache_t4g_micro_hour: f64,
}

pub const PRICES: Prices = Prices {
    as_of: "2025-06 (us-east-1 list prices; not re-read since)",
    api_per_million: 1.00, // HTTP API, first 300 million a month
    lambda_requests_per_million: 0.20,
    lambda_gb_second_arm64: 0.000_013_333_4,
    ddb_write_units_per_million: 0.625, // on-demand, after the November 2024 cut
    ddb_read_units_per_million: 0.125,
    ddb_wcu_hour: 0.000_65,
    ddb_rcu_hour: 0.000_13,
    ddb_storage_gb_month: 0.25,
    ddb_pitr_gb_month: 0.20,
    sqs_per_million: 0.40, // standard queue; each 64 KB of a message is a request
    s3_put_per_thousand: 0.005,
    s3_get_per_thousand: 0.0004,
    logs_ingest_gb: 0.50,
    custom_metric_month: 0.30,
    alarm_month: 0.10,
    dashboard_month: 3.00,
    elasticache_t4g_micro_hour: 0.016,
};

/// Assumptions, stated in the document.
const DDB_LATENCY_MS: f64 = 4.0; // one DynamoDB request in a region, as Lambda sees it
const RECORDS_PER_JOIN_INVOCATION: f64 = 10.0; // BatchSize 100, window 0: parts arrive spread out
const HOURS_PER_MONTH: f64 = 730.0;
const MILLION: f64 = 1_000_000.0;

fn write_units(bytes: usize) -> f64 {
    bytes.div_ceil(1024).max(1) as f64
}

fn read_units(bytes: usize) -> f64 {
    bytes.div_ceil(4096).max(1) as f64
}

/// Lambda's price of one invocation: its request and its billed GB-seconds
/// (duration rounded up to the millisecond).
fn lambda_cost(p: &Prices, memory_mb: f64, ms: f64) -> f64 {
    p.lambda_requests_per_million / MILLION + memory_mb / 1024.0 * ms.ceil() / 1000.0 * p.lambda_gb_second_arm64
}

/// How callers reach the functions: the template's `FrontDoor`.
#[derive(Clone, Copy, PartialEq)]
pub enum Door {
    /// One API Gateway HTTP API in front of the functions (billed per request).
    HttpApi,
    /// Each HTTP function's own Lambda function URL (no charge per request).
    FunctionUrls,
}

impl Door {
    fn name(self) -> &'static str {
        match self {
            Door::HttpApi => "HTTP API",
            Door::FunctionUrls => "function URLs",
        }
    }

    /// The local stack's URL of `path` through this door: the router (the
    /// HTTP API's layout), or the function's own URL (`/lambda-url/<fn>`).
    fn url(self, base: &str, function: &str, path: &str) -> String {
        match self {
            Door::HttpApi => format!("{base}{path}"),
            Door::FunctionUrls => format!("{base}/lambda-url/{function}{path}"),
        }
    }
}

/// One front door on the local stack: a store and a fetch of a 100-byte
/// result through it (medians), and the bytes each request's body and its
/// answer's body carry.
struct DoorFigures {
    door: Door,
    store_ms: f64,
    fetch_ms: f64,
    store_bytes: (usize, usize),
    fetch_bytes: (usize, usize),
}

async fn measure_door(service: &Service, door: Door, tag: &str, n: usize) -> DoorFigures {
    let (mut stores, mut fetches) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut store_bytes, mut fetch_bytes) = ((0, 0), (0, 0));
    for i in 0..n {
        let id = format!("cost-{tag}-door-{i}");
        let body = serde_json::json!({"status": "SUCCESS", "result": crate::random_hex(50), "task_id": id}).to_string();
        let started = Instant::now();
        let (answer, _) = service
            .send(service.http.put(door.url(&service.base, "store", &format!("/v1/tasks/{id}"))).body(body.clone()))
            .await;
        stores.push(started.elapsed().as_secs_f64() * 1000.0);
        store_bytes = (body.len(), answer.len());
        let started = Instant::now();
        let (answer, _) =
            service.send(service.http.get(door.url(&service.base, "fetch", &format!("/v1/tasks/{id}")))).await;
        fetches.push(started.elapsed().as_secs_f64() * 1000.0);
        fetch_bytes = (0, answer.len());
    }
    DoorFigures { door, store_ms: crate::median(stores), fetch_ms: crate::median(fetches), store_bytes, fetch_bytes }
}

struct Measured {
    /// Each front door, interleaved in this run.
    doors: Vec<DoorFigures>,
    store_calls: f64,
    fetch_calls: f64,
    item_bytes: usize,
    /// (result KB, its item's bytes).
    by_size: Vec<(usize, usize)>,
    poll_calls: f64,
    poll_secs: f64,
    part_store_calls: f64,
    join_calls_per_chord: f64,
    callback_bytes: usize,
    celery_last_part_requests: Option<u64>,
    /// A 1 MB result (random hex, barely compressible) stored and fetched as
    /// the Python package does: through S3 by presigned URLs.
    large_store: crate::Requests,
    large_fetch: crate::Requests,
    large_secs: f64,
}

async fn measure_service(service: &Service, sdk: &aws_config::SdkConfig, table: &str) -> Measured {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let n = 200;
    let ids: Vec<String> = (0..n).map(|i| format!("cost-{tag}-{i}")).collect();
    let (_, store_calls) = service.store_all(&ids).await;
    let (_, fetch_calls) = service.fetch_all(&ids).await;
    let raw = aws_sdk_dynamodb::Client::new(sdk);
    let got = raw
        .get_item()
        .table_name(table)
        .set_key(Some(crate::task_item_key(&ids[0])))
        .send()
        .await
        .expect("DynamoDB Local answers");
    let item = got.item.expect("the stored result's item");

    // Items by result size: results of random hex (deflate halves it; a
    // document over 16 KB is stored compressed), read back raw.
    let mut by_size = Vec::new();
    for kb in [1usize, 4, 16, 64] {
        let id = format!("cost-{tag}-{kb}kb");
        let body = serde_json::json!({"status": "SUCCESS", "result": crate::random_hex(kb * 1024)}).to_string();
        service.send(service.http.put(format!("{}/v1/tasks/{id}", service.base)).body(body)).await;
        let raw_item = raw.get_item().table_name(table).set_key(Some(crate::task_item_key(&id))).send().await;
        let raw_item = raw_item.expect("DynamoDB Local answers");
        by_size.push((kb, item_size(&raw_item.item.expect("stored"))));
    }

    // Long-polls of 5 s on a result that never comes (the worst case: the
    // whole wait is billed, and every poll of the table is a read).
    let (mut poll_calls, mut poll_secs) = (0u32, 0f64);
    let polls = 3;
    for i in 0..polls {
        let started = Instant::now();
        let req = service.http.get(format!("{}/v1/tasks/cost-{tag}-missing-{i}?wait=5", service.base));
        poll_calls += service.send(req).await.1;
        poll_secs += started.elapsed().as_secs_f64();
    }

    let json = serde_json::json!(crate::random_hex(1_000_000)).to_string();
    let id = format!("cost-{tag}-large");
    let started = Instant::now();
    let large_store = crate::store_large(service, &id, &json).await;
    let large_fetch = crate::fetch_large(service, &id, json.len()).await;
    let large_secs = started.elapsed().as_secs_f64();

    // The two doors in alternation, so that neither gets a quieter machine.
    let mut doors = Vec::new();
    for round in 0..2 {
        for door in [Door::HttpApi, Door::FunctionUrls] {
            let run = format!("{tag}-{round}-{}", if door == Door::HttpApi { "api" } else { "url" });
            doors.push(measure_door(service, door, &run, 100).await);
        }
    }
    let doors = [Door::HttpApi, Door::FunctionUrls]
        .into_iter()
        .map(|door| {
            let runs: Vec<&DoorFigures> = doors.iter().filter(|f| f.door == door).collect();
            DoorFigures {
                door,
                store_ms: crate::median(runs.iter().map(|f| f.store_ms).collect()),
                fetch_ms: crate::median(runs.iter().map(|f| f.fetch_ms).collect()),
                store_bytes: runs[0].store_bytes,
                fetch_bytes: runs[0].fetch_bytes,
            }
        })
        .collect();

    let chord = crate::chord_run(service, sdk, 1000).await;
    let celery = crate::celery_join(1000).ok();
    Measured {
        doors,
        store_calls: store_calls as f64 / n as f64,
        fetch_calls: fetch_calls as f64 / n as f64,
        item_bytes: item_size(&item),
        by_size,
        poll_calls: poll_calls as f64 / polls as f64,
        poll_secs: poll_secs / polls as f64,
        part_store_calls: chord.store_calls_per_part,
        join_calls_per_chord: chord.join_calls.unwrap_or(0) as f64,
        callback_bytes: chord.callback_bytes,
        celery_last_part_requests: celery.map(|c| c.1),
        large_store,
        large_fetch,
        large_secs,
    }
}

/// The metrics the EMF lines define (name and dimension values), each a
/// custom metric CloudWatch bills per month.
fn metrics(figures: &[Figures]) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in figures.iter().flat_map(|f| f.emf.iter()) {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        for directive in doc["_aws"]["CloudWatchMetrics"].as_array().into_iter().flatten() {
            let dims: Vec<String> = directive["Dimensions"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|set| set.as_array().into_iter().flatten())
                .filter_map(|d| d.as_str())
                .map(|d| format!("{d}={}", doc[d].as_str().unwrap_or("")))
                .collect();
            for metric in directive["Metrics"].as_array().into_iter().flatten() {
                seen.insert(format!("{} {}", metric["Name"].as_str().unwrap_or(""), dims.join(",")));
            }
        }
    }
    seen
}

/// Today's date, UTC, as YYYY-MM-DD.
fn today() -> String {
    civil((std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 86400) as i64)
}

/// Days since 1970-01-01 as a civil date (Howard Hinnant's algorithm).
fn civil(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn usd(x: f64) -> String {
    if x > 0.0 && x < 0.001 {
        format!("${x:.5}")
    } else if x >= 100.0 {
        format!("${x:.0}")
    } else if x >= 1.0 {
        format!("${x:.2}")
    } else {
        format!("${x:.3}")
    }
}

/// Measures, prices and writes `docs/COST.md`; prints it too.
pub async fn run(service: &Service, sdk: &aws_config::SdkConfig, table: &str, figures: &[Figures]) {
    let m = measure_service(service, sdk, table).await;
    let b = Bill::of(&m, figures, Door::HttpApi);
    let u = Bill::of(&m, figures, Door::FunctionUrls);
    let mut d = String::new();
    write_measured(&mut d, &m, &b, figures);
    write_doors(&mut d, &m, figures);
    write_work(&mut d, &m, &b, &u);
    write_idle(&mut d, &b, &u);
    std::fs::write("docs/COST.md", &d).expect("docs/ is writable");
    println!("\n{d}");
    eprintln!("wrote docs/COST.md");
}

/// The prices this run's measurements come to.
struct Bill<'a> {
    figures: &'a [Figures],
    door: Door,
    /// Write and read units of a stored result's item.
    w: f64,
    r: f64,
    api: f64,
    /// A million tasks stored and fetched once: all of it, its DynamoDB
    /// requests, and Celery's DynamoDB backend's price.
    tasks: f64,
    tasks_ddb: f64,
    celery_tasks: f64,
    /// A million 5 s long-polls; Celery's reads and price for the same wait.
    polls: f64,
    celery_poll_reads: f64,
    celery_polls: f64,
    /// A million chord parts in chords of 1,000.
    join_calls_per_part: f64,
    chord_total: f64,
    chord_ddb: f64,
    celery_chord_requests: Option<f64>,
    celery_chord_cost: Option<f64>,
    callback_requests: f64,
    sqs: f64,
    /// A million 1 MB results through S3.
    large: f64,
    /// Idle, a month.
    provisioned: f64,
    alarms: f64,
    metric_names: usize,
    elasticache: f64,
}

impl<'a> Bill<'a> {
    fn of(m: &Measured, figures: &'a [Figures], door: Door) -> Self {
        let p = &PRICES;
        let (w, r) = (write_units(m.item_bytes), read_units(m.item_bytes));
        let mut b = Bill {
            figures,
            door,
            w,
            r,
            // A function URL is billed as the invocation it makes, no more.
            api: if door == Door::HttpApi { p.api_per_million / MILLION } else { 0.0 },
            tasks: 0.0,
            tasks_ddb: (m.store_calls + m.fetch_calls) * MILLION,
            celery_tasks: (wru(w) + rru(r)) * MILLION, // one PutItem, one GetItem
            polls: 0.0,
            celery_poll_reads: 5.0 / 0.5 + 1.0, // AsyncResult.get polls every 0.5 s
            celery_polls: 0.0,
            join_calls_per_part: m.join_calls_per_chord / 1000.0,
            chord_total: 0.0,
            chord_ddb: 0.0,
            celery_chord_requests: m.celery_last_part_requests.map(|last| MILLION * 2.0 + 1000.0 * last as f64),
            // Priced as a write unit each for the part's PutItem and counter update,
            // and a read unit for each request of the last part's join.
            celery_chord_cost: m
                .celery_last_part_requests
                .map(|last| wru(2.0 * w) * MILLION + rru(1000.0 * last as f64 * r)),
            callback_requests: 1000.0 * m.callback_bytes.div_ceil(65536).max(1) as f64,
            sqs: 0.0,
            large: 0.0,
            provisioned: 5.0 * HOURS_PER_MONTH * (p.ddb_rcu_hour + p.ddb_wcu_hour),
            alarms: 10.0 * p.alarm_month,
            metric_names: metrics(figures).len(),
            elasticache: p.elasticache_t4g_micro_hour * HOURS_PER_MONTH,
        };
        b.tasks = (b.store_one(m) + b.fetch_one(m)) * MILLION;
        b.celery_polls = rru(b.celery_poll_reads * r) * MILLION;
        b.polls = (b.api + lambda_cost(p, 256.0, m.poll_secs * 1000.0) + rru(m.poll_calls * r) + b.log_cost("fetch"))
            * MILLION;
        b.sqs = b.callback_requests * p.sqs_per_million / MILLION;
        b.chord_total = b.chord_parts(m);
        b.chord_ddb = MILLION * (m.part_store_calls + b.join_calls_per_part);
        b.large = b.large_one(m) * MILLION;
        b
    }

    fn figure(&self, name: &str) -> &Figures {
        self.figures.iter().find(|f| f.function == name).expect("measured")
    }

    /// In a region each DynamoDB request adds its latency to the function's duration.
    fn billed(&self, name: &str, calls: f64) -> f64 {
        self.figure(name).warm_ms + calls * DDB_LATENCY_MS
    }

    fn log_cost(&self, name: &str) -> f64 {
        self.figure(name).log_bytes_per_invocation / 1e9 * PRICES.logs_ingest_gb
    }

    fn store_lambda(&self, m: &Measured) -> f64 {
        lambda_cost(&PRICES, 512.0, self.billed("store", m.store_calls))
    }

    fn fetch_lambda(&self, m: &Measured) -> f64 {
        lambda_cost(&PRICES, 256.0, self.billed("fetch", m.fetch_calls))
    }

    fn store_one(&self, m: &Measured) -> f64 {
        self.api + self.store_lambda(m) + wru(m.store_calls * self.w) + self.log_cost("store")
    }

    fn fetch_one(&self, m: &Measured) -> f64 {
        self.api + self.fetch_lambda(m) + rru(m.fetch_calls * self.r) + self.log_cost("fetch")
    }

    /// A million tasks' DynamoDB price, stored and fetched once, at (w, r) units an item.
    fn tasks_ddb_cost(m: &Measured, w: f64, r: f64) -> f64 {
        (wru(m.store_calls * w) + rru(m.fetch_calls * r)) * MILLION
    }

    /// A million chord parts in chords of 1,000: each part a store (the
    /// part's result, then chord-join's count in a transaction: 2 units per
    /// item), each chord a join and one callback message.
    fn chord_parts(&self, m: &Measured) -> f64 {
        let p = &PRICES;
        let part_store = self.api
            + lambda_cost(p, 512.0, self.billed("store", m.part_store_calls))
            + wru(m.part_store_calls * self.w)
            + self.log_cost("store");
        let join_invocations = MILLION / RECORDS_PER_JOIN_INVOCATION;
        // Units of chord-join's requests per part: the transactional count (the
        // part's marker, 2 units, and the counter's update, 2 units per
        // invocation's transaction), the join's consistent read of the part, and
        // the chord's own three writes (claim, dispatched, expiry) spread over it.
        let join_write_units = 2.0 + 2.0 / RECORDS_PER_JOIN_INVOCATION + 3.0 / 1000.0;
        let join_ms =
            self.figure("chord-join").warm_ms + RECORDS_PER_JOIN_INVOCATION * self.join_calls_per_part * DDB_LATENCY_MS;
        let join = join_invocations * (lambda_cost(p, 1024.0, join_ms) + self.log_cost("chord-join"))
            + MILLION * (wru(join_write_units) + rru(self.r));
        part_store * MILLION + join + self.sqs
    }

    /// A 1 MB result stored and fetched once, through S3. The client's S3
    /// requests are a PUT and a GET; the service's are priced as PUTs (its
    /// commit reads the object and tags it: an upper bound). Lambda is billed
    /// the whole exchange as measured here (debug build: an upper bound).
    fn large_one(&self, m: &Measured) -> f64 {
        let (p, ls, lf) = (&PRICES, &m.large_store, &m.large_fetch);
        f64::from(ls.api + lf.api) * self.api
            + lambda_cost(p, 512.0, m.large_secs * 1000.0)
            + f64::from(ls.s3_direct) * p.s3_put_per_thousand / 1000.0
            + f64::from(lf.s3_direct) * p.s3_get_per_thousand / 1000.0
            + f64::from(ls.s3_by_service + lf.s3_by_service) * p.s3_put_per_thousand / 1000.0
            + wru(f64::from(ls.ddb) * self.w)
            + rru(f64::from(lf.ddb) * self.r)
    }
}

fn wru(units: f64) -> f64 {
    units * PRICES.ddb_write_units_per_million / MILLION
}

fn rru(units: f64) -> f64 {
    units * PRICES.ddb_read_units_per_million / MILLION
}

/// The page's head and "Measured in this run".
fn write_measured(d: &mut String, m: &Measured, b: &Bill, figures: &[Figures]) {
    let (w, r) = (b.w, b.r);
    let _ = writeln!(d, "# What dynachord costs\n");
    let _ = writeln!(
        d,
        "Generated by `./dev bench --cost` (bench/src/cost.rs) from this run's measurements; \
         do not edit by hand. Prices: {}. Lambda on arm64 (the template's default).\n",
        PRICES.as_of
    );
    let _ = writeln!(d, "## Measured in this run\n");
    let _ = writeln!(d, "| what | figure |\n|---|---|");
    let _ = writeln!(d, "| DynamoDB requests per store / fetch | {:.2} / {:.2} |", m.store_calls, m.fetch_calls);
    let _ = writeln!(
        d,
        "| a stored result's item (Celery meta, 100-byte result) | {} bytes: {w} write unit, {r} read unit |",
        m.item_bytes
    );
    let _ = writeln!(
        d,
        "| a 5 s long-poll on a result that never comes | {:.2} s, {:.1} DynamoDB reads |",
        m.poll_secs, m.poll_calls
    );
    let _ = writeln!(
        d,
        "| a chord part (chord of 1,000) | {:.2} DynamoDB requests in its store, {:.2} in chord-join |",
        m.part_store_calls, b.join_calls_per_part
    );
    let _ = writeln!(d, "| a chord of 1,000's callback message | {} bytes |", m.callback_bytes);
    let _ = writeln!(
        d,
        "| a 1 MB result stored, then fetched (as the Python package does) | store: {}; fetch: {}; {:.2} s in all |",
        m.large_store.describe(),
        m.large_fetch.describe(),
        m.large_secs
    );
    for x in figures {
        let _ = writeln!(
            d,
            "| {} warm invocation, logs per invocation | {:.2} ms, {:.0} bytes |",
            x.function, x.warm_ms, x.log_bytes_per_invocation
        );
    }
    let _ = writeln!(d, "| custom metrics the functions' EMF lines define in this run | {} |", b.metric_names);
    let _ = writeln!(d, "\nAssumed (not measurable on one machine): a DynamoDB request adds {DDB_LATENCY_MS} ms to a function's duration in a region (DynamoDB Local answers in under a millisecond); chord-join gets {RECORDS_PER_JOIN_INVOCATION} records per invocation (BatchSize 100, no batching window: parts stored over time arrive in small batches); Lambda reads its stream for free.\n");
}

/// "Front doors": what each door's requests carry and take here, and what
/// each hop adds on AWS, from what AWS documents.
fn write_doors(d: &mut String, m: &Measured, figures: &[Figures]) {
    let warm = |name: &str| figures.iter().find(|f| f.function == name).map_or(0.0, |f| f.warm_ms);
    let _ = writeln!(d, "## Front doors\n");
    let _ = writeln!(d, "Measured here, through each door of the local stack (the router that stands for the HTTP API, and each function's own URL), 200 stores and 200 fetches each, the doors in alternation:\n");
    let _ = writeln!(d, "| door | requests per store / fetch | store: body sent / answered (bytes) | fetch: answered (bytes) | store median | fetch median | the function's own duration (store / fetch, warm, release build) |");
    let _ = writeln!(d, "|---|---|---|---|---|---|---|");
    for f in &m.doors {
        let _ = writeln!(
            d,
            "| {} | 1 / 1 | {} / {} | {} | {:.2} ms | {:.2} ms | {:.2} ms / {:.2} ms |",
            f.door.name(),
            f.store_bytes.0,
            f.store_bytes.1,
            f.fetch_bytes.1,
            f.store_ms,
            f.fetch_ms,
            warm("store"),
            warm("fetch")
        );
    }
    let _ = writeln!(d, "\nOn one machine both doors reach the same function host, so the medians differ by the router's work alone. On AWS:");
    let _ = writeln!(d, "- **HTTP API**: the caller's request goes to API Gateway, which checks its SigV4 signature (IAM auth), matches the route, and invokes the function. AWS publishes no latency figure for that hop; a deployment measures it as the HTTP API's `Latency` minus its `IntegrationLatency` (both CloudWatch metrics of API Gateway, documented in \"Monitoring HTTP API metrics\", API Gateway Developer Guide). Its integration times out at 30 s (\"Quotas for HTTP APIs\", the same guide), so a long-poll stays under it (MaxWaitSeconds at most 25).");
    let _ = writeln!(d, "- **Function URLs**: the caller's request goes to Lambda's own front end, which checks the signature and invokes the function: no other service's hop, no per-request price (\"Lambda function URLs\" and \"AWS Lambda pricing\": a URL's requests are billed as invocations). A request may run for the function's whole timeout (Lambda allows up to 15 minutes, \"Lambda quotas\"; the template keeps 29 s for both doors), and a buffered answer is at most 6 MB, as behind API Gateway (a streamed one may be larger; the functions do not stream yet).");
    let _ = writeln!(d, "- Either way the function's own duration is the column above, plus the DynamoDB requests it makes in a region (assumed {DDB_LATENCY_MS} ms each below).\n");
}

/// "Work": a million of each kind, beside Celery's DynamoDB backend.
fn write_work(d: &mut String, m: &Measured, b: &Bill, u: &Bill) {
    let (w, r, ls, lf) = (b.w, b.r, &m.large_store, &m.large_fetch);
    let Bill { api, tasks, tasks_ddb, celery_tasks, polls, celery_polls, celery_poll_reads, .. } = *b;
    let Bill {
        chord_total, chord_ddb, celery_chord_cost, celery_chord_requests, large, callback_requests, sqs, ..
    } = *b;
    let p = &PRICES;
    let _ = writeln!(d, "## Work\n");
    let _ = writeln!(
        d,
        "| work | dynachord, {} | dynachord, {} | its DynamoDB requests | Celery's DynamoDB backend, DynamoDB only |",
        b.door.name(),
        u.door.name()
    );
    let _ = writeln!(d, "|---|---|---|---|---|");
    let _ = writeln!(
        d,
        "| 1 million tasks stored and fetched once | {} | {} | {:.1} million | {} (1 PutItem + 1 GetItem each, 2 million requests) |",
        usd(tasks),
        usd(u.tasks),
        tasks_ddb / MILLION,
        usd(celery_tasks)
    );
    let _ = writeln!(
        d,
        "| 1 million 5 s long-polls (the whole wait) | {} | {} | {:.1} million | {} (no long-poll: `get()` reads every 0.5 s, {:.0} million reads) |",
        usd(polls),
        usd(u.polls),
        m.poll_calls,
        usd(celery_polls),
        celery_poll_reads
    );
    let _ = writeln!(
        d,
        "| 1 million chord parts in chords of 1,000 | {} | {} | {:.1} million | {} |",
        usd(chord_total),
        usd(u.chord_total),
        chord_ddb / MILLION,
        match (celery_chord_cost, celery_chord_requests) {
            (Some(cost), Some(c)) => format!(
                "{} ({:.1} million requests: a PutItem and a counter update per part, and the last part's join)",
                usd(cost),
                c / MILLION
            ),
            _ => "not measured (Celery's script failed)".to_owned(),
        }
    );
    let _ = writeln!(
        d,
        "| 1 million 1 MB results stored and fetched once (through S3) | {} | {} | {:.1} million, and {:.1} million S3 requests | not possible (DynamoDB items stop at 400 KB) |",
        usd(large),
        usd(u.large),
        f64::from(ls.ddb + lf.ddb),
        f64::from(ls.s3_direct + lf.s3_direct + ls.s3_by_service + lf.s3_by_service)
    );
    // By result size: a result's units grow with its item (a write unit per
    // KB, a consistent read unit per 4 KB), as stored here; past
    // SpillAboveBytes (64 KB compressed) it goes to S3 (the row above).
    let _ = writeln!(d, "\nBy result size, a million stored and fetched once (results of random hex; a document over 16 KB is stored deflate-compressed, so its item is smaller than the result):\n");
    let _ = writeln!(
        d,
        "| result | its item | write + read units each | DynamoDB | all of it, {} | all of it, {} |\n|---|---|---|---|---|---|",
        b.door.name(),
        u.door.name()
    );
    let base_ddb = Bill::tasks_ddb_cost(m, w, r);
    for &(kb, bytes) in &m.by_size {
        let (w, r) = (write_units(bytes), read_units(bytes));
        let ddb = Bill::tasks_ddb_cost(m, w, r);
        let _ = writeln!(
            d,
            "| {kb} KB | {:.1} KB | {w:.0} + {r:.0} | {} | {} | {} |",
            bytes as f64 / 1024.0,
            usd(ddb),
            usd(tasks - base_ddb + ddb),
            usd(u.tasks - base_ddb + ddb)
        );
    }
    let _ = writeln!(d, "\nWhere a million tasks stored and fetched once goes: API Gateway {} (none through function URLs), Lambda {}, DynamoDB {}, CloudWatch Logs {} (each request's metrics line, {:.0} bytes from store and {:.0} from fetch; no START, END or REPORT line at the template's SystemLogLevel WARN).",
        usd(2.0 * api * MILLION),
        usd((b.store_lambda(m) + b.fetch_lambda(m)) * MILLION),
        usd(Bill::tasks_ddb_cost(m, w, r)),
        usd((b.log_cost("store") + b.log_cost("fetch")) * MILLION),
        b.figure("store").log_bytes_per_invocation,
        b.figure("fetch").log_bytes_per_invocation);
    let _ = writeln!(d, "A long-poll is mostly Lambda's wait ({} of {} per million): clients that can wait on a chord or a batch (one request for many results) pay it once.",
        usd(lambda_cost(p, 256.0, m.poll_secs * 1000.0) * MILLION), usd(polls));
    let _ = writeln!(d, "A chord's callback is {callback_requests:.0} SQS requests per 1,000 chords ({}).\n", usd(sqs));
}

/// "Idle, a month" and "Reading it".
fn write_idle(d: &mut String, b: &Bill, u: &Bill) {
    let p = &PRICES;
    let Bill { tasks, provisioned, alarms, metric_names, elasticache, .. } = *b;
    let metric_month = metric_names as f64 * p.custom_metric_month;
    let _ = writeln!(d, "## Idle, a month\n");
    let _ = writeln!(d, "| what | a month |\n|---|---|");
    let _ = writeln!(d, "| table, PROVISIONED at the template's 5 RCU + 5 WCU | {} |", usd(provisioned));
    let _ = writeln!(d, "| table, PAY_PER_REQUEST | $0 |");
    let _ = writeln!(d, "| Lambda, API Gateway, SQS, S3 with no traffic | $0 |");
    let _ = writeln!(d, "| 10 alarms | {} |", usd(alarms));
    let _ = writeln!(d, "| the dashboard (an account's first 3 are free) | {} |", usd(p.dashboard_month));
    let _ = writeln!(
        d,
        "| storage and point-in-time recovery, per GB of results kept | {} |",
        usd(p.ddb_storage_gb_month + p.ddb_pitr_gb_month)
    );
    let _ = writeln!(
        d,
        "| custom metrics, once published ({} seen in this run; billed only in hours they are written) | {} |",
        metric_names,
        usd(metric_month)
    );
    let _ = writeln!(d, "\nBeside it: the smallest ElastiCache node for Celery's Redis backend, cache.t4g.micro, one node with no replica, costs {} a month whether used or not.", usd(elasticache));
    let _ = writeln!(d, "\n## Reading it\n");
    let _ = writeln!(d, "- Per request, dynachord costs more than Celery's DynamoDB backend, which calls DynamoDB from the worker directly: through the HTTP API, most of a store or a fetch is API Gateway's and Lambda's request price, not DynamoDB's; through function URLs ({} per million tasks against {}), Lambda's request price ($0.20 a million invocations) is the floor left above DynamoDB's. What it buys is one conditional write per store, consistent reads, long-polls, batch-gets and a server-side chord join, with no client holding AWS table credentials.", usd(u.tasks), usd(tasks));
    let _ = writeln!(d, "- Against the smallest Redis node, dynachord idles at {} a month on demand (alarms and dashboard) and costs {} per million tasks stored and fetched through the HTTP API, {} through function URLs: it is cheaper below about {:.1} (HTTP API) or {:.1} (function URLs) million tasks a month, and needs no node to size, patch or fail over.", usd(alarms + p.dashboard_month), usd(tasks), usd(u.tasks), (elasticache - alarms - p.dashboard_month) / tasks, (elasticache - alarms - p.dashboard_month) / u.tasks);
    let _ = writeln!(d, "- Function URLs give up what the HTTP API adds: its per-route throttling (a function's reserved concurrency is the only cap), its access log, custom domains without a CloudFront distribution, and a route table in front of the functions (each function refuses what it does not serve itself, with the same JSON 404). They keep IAM auth and tenants. A long-poll is kept to MaxWaitSeconds (at most 25 s) behind either door: the functions' 29 s timeout is the template's for both.");
    let _ = writeln!(d, "- A long-poll bills its whole wait in Lambda. Batch-gets and chords (one request or one callback for many results) are the cheap way to wait for many results.");
    let _ = writeln!(d, "- The local stack delivers each stream batch twice (two pumps), so chord-join's requests per part here are at most what a deployment makes.");
    let _ = writeln!(d, "- Measured on {}: requests and sizes through the local stack, durations and log bytes from the release build against a Runtime API stub. Re-run `./dev bench --cost` after a change; edit `PRICES` in bench/src/cost.rs to re-price.", today());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), "1970-01-01");
        assert_eq!(civil(19_782), "2024-02-29");
        assert_eq!(civil(20_788), "2026-12-01");
    }

    #[test]
    fn units_follow_dynamodbs_rules() {
        assert_eq!((write_units(1), write_units(1024), write_units(1025)), (1.0, 1.0, 2.0));
        assert_eq!((read_units(4096), read_units(4097)), (1.0, 2.0));
    }
}
