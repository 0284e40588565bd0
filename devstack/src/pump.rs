//! The stream pump: plays Lambda's DynamoDB Streams event source mapping on
//! the local stack. It tails the table's stream on DynamoDB Local and invokes
//! `chord-join` through cargo lambda watch's invoke endpoint with Lambda's
//! event format, honouring the batch size and batching window; when the
//! function reports `batchItemFailures` it retries from the first failed
//! sequence number, and when the invocation fails it retries the whole batch,
//! with backoff, as Lambda does.
//!
//! For tests it can deliver every batch twice (`replay`), and several pumps
//! can tail one stream side by side: every record then reaches the function
//! more than once, which the join must absorb.

use aws_sdk_dynamodbstreams::types::{AttributeValue, Record, ShardIteratorType};
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct PumpConfig {
    pub name: String,
    pub table: String,
    pub invoke_url: String,
    pub batch_size: usize,
    pub window: Duration,
    pub replay: bool,
    /// How long an invocation may take before it counts as failed (Lambda's
    /// function timeout; a killed invocation may never answer locally).
    pub invoke_timeout: Duration,
}

/// DynamoDB JSON (`{"S": "..."}`) for a stream attribute value.
fn attr_json(value: &AttributeValue) -> Value {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    match value {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::B(b) => json!({ "B": b64(b.as_ref()) }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        AttributeValue::Null(n) => json!({ "NULL": n }),
        AttributeValue::Ss(v) => json!({ "SS": v }),
        AttributeValue::Ns(v) => json!({ "NS": v }),
        AttributeValue::Bs(v) => json!({ "BS": v.iter().map(|b| b64(b.as_ref())).collect::<Vec<_>>() }),
        AttributeValue::L(items) => json!({ "L": items.iter().map(attr_json).collect::<Vec<_>>() }),
        AttributeValue::M(map) => json!({ "M": image_json(map) }),
        _ => Value::Null,
    }
}

fn image_json(image: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(image.iter().map(|(k, v)| (k.clone(), attr_json(v))).collect::<Map<_, _>>())
}

/// A stream record as Lambda hands it to a function.
fn lambda_record(record: &Record, stream_arn: &str) -> Value {
    let change = record.dynamodb.as_ref();
    let image = |f: fn(&aws_sdk_dynamodbstreams::types::StreamRecord) -> Option<&HashMap<String, AttributeValue>>| {
        change.and_then(f).map(image_json)
    };
    let mut dynamodb = json!({
        "ApproximateCreationDateTime": change.and_then(|c| c.approximate_creation_date_time).map_or(0.0, |t| t.secs() as f64),
        "Keys": image(|c| c.keys.as_ref()).unwrap_or(json!({})),
        "SequenceNumber": change.and_then(|c| c.sequence_number.clone()),
        "SizeBytes": change.and_then(|c| c.size_bytes).unwrap_or(0),
        "StreamViewType": change.and_then(|c| c.stream_view_type.as_ref()).map(|v| v.as_str().to_owned()),
    });
    if let Some(new) = image(|c| c.new_image.as_ref()) {
        dynamodb["NewImage"] = new;
    }
    if let Some(old) = image(|c| c.old_image.as_ref()) {
        dynamodb["OldImage"] = old;
    }
    json!({
        "eventID": record.event_id,
        "eventName": record.event_name.as_ref().map(|n| n.as_str().to_owned()),
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": dynamodb,
        "eventSourceARN": stream_arn,
    })
}

fn sequence(record: &Record) -> String {
    record.dynamodb.as_ref().and_then(|c| c.sequence_number.clone()).unwrap_or_default()
}

/// Sequence numbers are decimal strings of varying length: order by length, then text.
fn seq_key(seq: &str) -> (usize, &str) {
    (seq.len(), seq)
}

enum Outcome {
    Done,
    /// Retry from this sequence number on.
    RetryFrom(String),
    Failed(String),
}

/// An iterator on `shard_id` that starts after the record with sequence
/// number `after`, or at the shard's oldest record when `after` is None.
async fn shard_iterator(
    streams: &aws_sdk_dynamodbstreams::Client,
    arn: &str,
    shard_id: &str,
    after: Option<&str>,
) -> Option<String> {
    let request = streams.get_shard_iterator().stream_arn(arn).shard_id(shard_id);
    let request = match after {
        Some(seq) => request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(seq),
        None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
    };
    request.send().await.ok().and_then(|o| o.shard_iterator)
}

async fn invoke(http: &reqwest::Client, url: &str, records: &[Record], arn: &str, timeout: Duration) -> Outcome {
    let event = json!({ "Records": records.iter().map(|r| lambda_record(r, arn)).collect::<Vec<_>>() });
    let response = match http.post(url).json(&event).timeout(timeout).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let status = response.status();
    let function_error = response.headers().contains_key("x-amz-function-error");
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() || function_error || body.get("errorType").is_some() {
        return Outcome::Failed(format!("{status}: {body}"));
    }
    let failed = body["batchItemFailures"].as_array().cloned().unwrap_or_default();
    let first = failed.iter().filter_map(|f| f["itemIdentifier"].as_str()).min_by_key(|s| seq_key(s));
    match first {
        Some(seq) => Outcome::RetryFrom(seq.to_owned()),
        None if failed.is_empty() => Outcome::Done,
        // A failure without an identifier fails the whole batch (Lambda's rule).
        None => Outcome::Failed("batchItemFailures without itemIdentifier".into()),
    }
}

struct Shard {
    iterator: Option<String>,
    /// The last record read into the buffer: where a new iterator resumes
    /// when this one stops working (DynamoDB Local restarted, say).
    last_read: Option<String>,
    buffer: Vec<Record>,
    first_buffered: Option<Instant>,
    retry_at: Option<Instant>,
    failures: u32,
}

/// What every step of a pump needs.
struct Pump {
    config: PumpConfig,
    http: reqwest::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    arn: String,
}

/// Runs one pump until the process ends: finds the stream, then, over and
/// over, picks up new shards, reads each shard's records, and delivers full
/// (or waited-for) batches.
pub async fn run(ddb: aws_sdk_dynamodb::Client, streams: aws_sdk_dynamodbstreams::Client, config: PumpConfig) {
    let arn = stream_arn(&ddb, &config).await;
    let pump = Pump { config, http: reqwest::Client::new(), streams, arn };
    let mut shards: HashMap<String, Shard> = HashMap::new();
    let mut finished: std::collections::HashSet<String> = Default::default();
    let mut last_describe = Instant::now() - Duration::from_secs(60);
    loop {
        if last_describe.elapsed() > Duration::from_secs(2) {
            last_describe = Instant::now();
            pump.discover_shards(&mut shards, &finished).await;
        }
        let mut idle = true;
        for (id, shard) in shards.iter_mut() {
            let read = pump.read(id, shard).await;
            let delivered = pump.deliver(shard).await;
            idle &= !(read || delivered);
        }
        shards.retain(|id, shard| {
            let done = shard.iterator.is_none() && shard.buffer.is_empty();
            if done {
                finished.insert(id.clone());
            }
            !done
        });
        if idle {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The table's stream ARN, once the table has one.
async fn stream_arn(ddb: &aws_sdk_dynamodb::Client, config: &PumpConfig) -> String {
    loop {
        match ddb.describe_table().table_name(&config.table).send().await {
            Ok(out) => {
                if let Some(arn) = out.table.and_then(|t| t.latest_stream_arn) {
                    return arn;
                }
            }
            Err(e) => eprintln!("{}: describe table: {e}", config.name),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Pump {
    /// Starts reading every shard not seen before, from its oldest record.
    async fn discover_shards(&self, shards: &mut HashMap<String, Shard>, finished: &std::collections::HashSet<String>) {
        let Ok(out) = self.streams.describe_stream().stream_arn(&self.arn).send().await else { return };
        for shard in out.stream_description.and_then(|d| d.shards).unwrap_or_default() {
            let Some(id) = shard.shard_id else { continue };
            if shards.contains_key(&id) || finished.contains(&id) {
                continue;
            }
            let iterator = shard_iterator(&self.streams, &self.arn, &id, None).await;
            let fresh = Shard {
                iterator,
                last_read: None,
                buffer: Vec::new(),
                first_buffered: None,
                retry_at: None,
                failures: 0,
            };
            shards.insert(id, fresh);
        }
    }

    /// Reads more records into the shard's buffer while its batch is not
    /// full; `true` if any came.
    async fn read(&self, id: &str, shard: &mut Shard) -> bool {
        if shard.buffer.len() >= self.config.batch_size {
            return false;
        }
        let Some(iterator) = shard.iterator.clone() else { return false };
        match self.streams.get_records().shard_iterator(iterator).limit(1000).send().await {
            Ok(out) => {
                let records = out.records.unwrap_or_default();
                shard.iterator = out.next_shard_iterator;
                let Some(last) = records.last() else { return false };
                shard.last_read = Some(sequence(last));
                shard.first_buffered.get_or_insert_with(Instant::now);
                shard.buffer.extend(records);
                true
            }
            Err(e) => {
                eprintln!("{}: get records on {id}: {e}; getting a new iterator", self.config.name);
                // Resume after the last record read (from the start if
                // none), as Lambda's event source mapping does.
                if let Some(fresh) = shard_iterator(&self.streams, &self.arn, id, shard.last_read.as_deref()).await {
                    shard.iterator = Some(fresh);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                false
            }
        }
    }

    /// Delivers the shard's next batch when it is full, its window has
    /// passed, or the shard has ended, and no retry is pending; applies the
    /// function's answer. `true` if a batch went out.
    async fn deliver(&self, shard: &mut Shard) -> bool {
        if shard.buffer.is_empty() || shard.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        let full = shard.buffer.len() >= self.config.batch_size;
        let waited = shard.first_buffered.is_some_and(|t| t.elapsed() >= self.config.window);
        if !(full || waited || shard.iterator.is_none()) {
            return false;
        }
        let n = shard.buffer.len().min(self.config.batch_size);
        let deliveries = if self.config.replay { 2 } else { 1 };
        let mut outcome = Outcome::Done;
        for _ in 0..deliveries {
            let batch = &shard.buffer[..n];
            outcome = invoke(&self.http, &self.config.invoke_url, batch, &self.arn, self.config.invoke_timeout).await;
            if !matches!(outcome, Outcome::Done) {
                break;
            }
        }
        match outcome {
            Outcome::Done => {
                shard.buffer.drain(..n);
                shard.failures = 0;
                shard.retry_at = None;
            }
            Outcome::RetryFrom(seq) => {
                // Records before the first failure are done; retry from it
                // (an identifier not in the batch retries all of it, as Lambda does).
                let keep_from = shard.buffer[..n].iter().position(|r| sequence(r) == seq).unwrap_or(0);
                shard.buffer.drain(..keep_from);
                shard.failures += 1;
                shard.retry_at = Some(Instant::now() + backoff(shard.failures));
            }
            Outcome::Failed(why) => {
                shard.failures += 1;
                eprintln!("{}: chord-join invocation failed ({why}); retrying the batch", self.config.name);
                shard.retry_at = Some(Instant::now() + backoff(shard.failures));
            }
        }
        shard.first_buffered = if shard.buffer.is_empty() { None } else { Some(Instant::now()) };
        true
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(6)).min(5000))
}
