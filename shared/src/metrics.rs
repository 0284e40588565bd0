//! Metrics as CloudWatch Embedded Metric Format: one JSON line on stdout per
//! data point, which CloudWatch Logs turns into metrics with no extra
//! network call. The process also keeps a running total of each, which
//! tests read.
//!
//! Dimensions are kept few, so the number of metrics (and their cost) stays
//! fixed whatever the traffic: per route (`Route`, 9 values) for requests,
//! none for chords. Never a task or chord id.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The CloudWatch namespace of every metric.
pub const NAMESPACE: &str = "dynachord";

/// A chord-join invocation found, just before a send, that its claim had
/// been taken over: it sent nothing.
pub const CHORD_CLAIM_LOST: &str = "ChordClaimLost";
/// A callback went out, but marking the chord dispatched found it no
/// longer ours.
pub const CHORD_MARK_LOST: &str = "ChordMarkLost";
/// A callback went out, and marking the chord dispatched failed even after
/// retries (it is finished later from the process's memory).
pub const CHORD_MARK_FAILED: &str = "ChordMarkFailed";
/// A join failed with an error retrying may fix; the claim was given back.
pub const CHORD_JOIN_RETRIED: &str = "ChordJoinRetried";
/// A chord failed: ChordError stored on its callback.
pub const CHORD_FAILED: &str = "ChordFailed";
/// Failed parts a chord's body tolerated (their exceptions in their slots).
pub const CHORD_FAILURES_TOLERATED: &str = "ChordFailuresTolerated";
/// A chord's callback was sent.
pub const CHORD_DISPATCHED: &str = "ChordDispatched";
/// A chord taken over from a claim that was sending: the message it may
/// have sent is not sent again (its outcome is unknown).
pub const CHORD_RESEND_SKIPPED: &str = "ChordResendSkipped";
/// A callback, errback or cache message whose send's outcome is unknown (a
/// time-out or a 5xx after the request went out): it counts as sent and is
/// never sent again (`docs/INVARIANTS.md`, O5).
pub const SEND_OUTCOME_UNKNOWN: &str = "SendOutcomeUnknown";
/// Chords found open past their deadline (`deadline_seconds`), each once.
pub const CHORD_STALLED: &str = "ChordStalled";
/// Chords whose failed parts a redrive sent again.
pub const CHORD_REDRIVEN: &str = "ChordRedriven";
/// Results of a dispatched chord's parts forgotten at its body's request
/// (`forget_parts`).
pub const CHORD_PARTS_FORGOTTEN: &str = "ChordPartsForgotten";
/// Chord parts counted for the first time (each part once).
pub const CHORD_PARTS_COUNTED: &str = "ChordPartsCounted";
/// Milliseconds from the newest part's store to its chord's callback sent.
pub const CHORD_JOIN_LATENCY: &str = "ChordJoinLatency";

/// Processing cache: keys answered from the cache, misses that delegated
/// a processing, and misses that joined one (per request, under its route).
pub const CACHE_HITS: &str = "CacheHits";
pub const CACHE_DELEGATED: &str = "CacheDelegated";
pub const CACHE_COALESCED: &str = "CacheCoalesced";
/// Processings settled from the stream: callbacks sent, failures
/// quarantined, and messages that could not be sent at all.
pub const CACHE_CALLBACKS_SENT: &str = "CacheCallbacksSent";
pub const CACHE_QUARANTINED: &str = "CacheQuarantined";
pub const CACHE_SEND_FAILED: &str = "CacheSendFailed";
/// An entry whose message went out but whose final write kept failing
/// (kept in the process, finished by the record's retry, never sent twice).
pub const CACHE_FINISH_FAILED: &str = "CacheFinishFailed";
/// A settling claim taken over from one that was about to send: settled
/// without sending again (its message may or may not have gone out).
pub const CACHE_RESEND_SKIPPED: &str = "CacheResendSkipped";

/// Per request, dimension `Route`.
/// Claims on a task's run refused (the task was ready, or another live
/// claim held it): each is a delivery of a task that did not run again.
pub const TASK_RUNS_REFUSED: &str = "TaskRunsRefused";
pub const REQUESTS: &str = "Requests";
/// Milliseconds the function spent on the request.
pub const LATENCY: &str = "Latency";
/// DynamoDB requests the request made (retries included), and the retries alone.
pub const DDB_CALLS: &str = "DynamoDBCalls";
pub const DDB_RETRIES: &str = "DynamoDBRetries";
/// S3 requests (large results).
pub const S3_CALLS: &str = "S3Calls";
/// Outcomes other than success (a request that has none answered 2xx):
/// refused (409, a state that stands); throttled (503 after the retries);
/// rejected (any other 4xx, bad input); failed (any other 5xx).
pub const REFUSED: &str = "Refused";
pub const THROTTLED: &str = "Throttled";
pub const REJECTED: &str = "Rejected";
pub const FAILED: &str = "Failed";
/// GET of a task: its result was ready (a hit), or not (pending).
pub const HITS: &str = "Hits";
pub const PENDING: &str = "Pending";
/// Milliseconds a long-poll waited (only for requests with `wait`).
pub const LONG_POLL_WAIT: &str = "LongPollWait";
/// Ids in a batch-get, and the results it answered as references.
pub const BATCH_SIZE: &str = "BatchSize";
pub const BATCH_REFERENCES: &str = "BatchReferences";

/// A metric's unit, as CloudWatch names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Milliseconds,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Self::Count => "Count",
            Self::Milliseconds => "Milliseconds",
        }
    }
}

/// One data point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub name: &'static str,
    pub value: f64,
    pub unit: Unit,
}

impl Point {
    pub fn count(name: &'static str, value: f64) -> Self {
        Self { name, value, unit: Unit::Count }
    }

    pub fn millis(name: &'static str, value: f64) -> Self {
        Self { name, value, unit: Unit::Milliseconds }
    }
}

/// Totals by metric name and dimension values, for tests.
static TOTALS: Mutex<BTreeMap<(String, String), f64>> = Mutex::new(BTreeMap::new());

/// The EMF line for `points` under `dimensions` (name, value).
pub fn line(dimensions: &[(&str, &str)], points: &[Point]) -> serde_json::Value {
    line_with(dimensions, points, &[])
}

/// As [`line`], with `properties`: fields of the log line that are not
/// metrics (a request id, to find the request's other log lines).
pub fn line_with(dimensions: &[(&str, &str)], points: &[Point], properties: &[(&str, &str)]) -> serde_json::Value {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let names: Vec<&str> = dimensions.iter().map(|(name, _)| *name).collect();
    // A count is declared without its unit (CloudWatch's default, None):
    // every request writes this line, and its bytes are what CloudWatch
    // Logs bills (docs/COST.md).
    let metrics: Vec<serde_json::Value> = points
        .iter()
        .map(|p| match p.unit {
            Unit::Count => serde_json::json!({"Name": p.name}),
            unit => serde_json::json!({"Name": p.name, "Unit": unit.as_str()}),
        })
        .collect();
    let mut line = serde_json::json!({
        "_aws": {
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{"Namespace": NAMESPACE, "Dimensions": [names], "Metrics": metrics}],
        },
    });
    for (name, value) in dimensions {
        line[*name] = (*value).into();
    }
    for point in points {
        line[point.name] = compact(point.value);
    }
    for (name, value) in properties {
        line[*name] = (*value).into();
    }
    line
}

/// A value as few bytes hold it: a whole number without a fraction, any
/// other to a hundredth (of a millisecond, for times).
fn compact(value: f64) -> serde_json::Value {
    if value.fract() == 0.0 && value.abs() < 9e15 {
        (value as i64).into()
    } else {
        ((value * 100.0).round() / 100.0).into()
    }
}

/// Writes `points` under `dimensions` as one EMF line, and adds them to the
/// process's totals.
pub fn emit(dimensions: &[(&str, &str)], points: &[Point]) {
    emit_with(dimensions, points, &[]);
}

/// As [`emit`], with `properties` on the line (see [`line_with`]).
pub fn emit_with(dimensions: &[(&str, &str)], points: &[Point], properties: &[(&str, &str)]) {
    if points.is_empty() {
        return;
    }
    let key: Vec<String> = dimensions.iter().map(|(n, v)| format!("{n}={v}")).collect();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    for point in points {
        *totals.entry((point.name.to_owned(), key.join(","))).or_default() += point.value;
    }
    drop(totals);
    println!("{}", line_with(dimensions, points, properties));
}

/// Counts one occurrence of `name`, with no dimension.
pub fn count(name: &'static str) {
    emit(&[], &[Point::count(name, 1.0)]);
}

/// How much of `name` was emitted with no dimension in this process.
pub fn total(name: &str) -> u64 {
    total_with(name, &[]) as u64
}

/// How much of `name` was emitted under `dimensions` in this process.
pub fn total_with(name: &str, dimensions: &[(&str, &str)]) -> f64 {
    let key: Vec<String> = dimensions.iter().map(|(n, v)| format!("{n}={v}")).collect();
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).get(&(name.to_owned(), key.join(","))).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_embedded_metric_format() {
        let line = line(&[("Route", "GetTask")], &[Point::count(HITS, 1.0), Point::millis(LATENCY, 12.5)]);
        let aws = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(aws["Namespace"], NAMESPACE);
        assert_eq!(aws["Dimensions"], serde_json::json!([["Route"]]));
        // Counts carry no unit (CloudWatch's default), and whole numbers no fraction.
        assert_eq!(aws["Metrics"], serde_json::json!([{"Name": "Hits"}, {"Name": "Latency", "Unit": "Milliseconds"}]));
        assert_eq!(
            (line["Route"].as_str(), line["Hits"].as_i64(), line["Latency"].as_f64()),
            (Some("GetTask"), Some(1), Some(12.5))
        );
        assert_eq!(compact(3.21456), serde_json::json!(3.21));
        assert!(line.to_string().contains(r#""Hits":1,"#), "{line}");
        assert!(line["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    }

    #[test]
    fn totals_are_kept_per_dimension() {
        emit(&[("Route", "Test")], &[Point::count("TestMetric", 2.0)]);
        emit(&[], &[Point::count("TestMetric", 1.0)]);
        assert!(total_with("TestMetric", &[("Route", "Test")]) >= 2.0);
        assert!(total("TestMetric") >= 1);
    }
}
