//! Metrics as CloudWatch Embedded Metric Format: one JSON line on stdout per
//! data point, which CloudWatch Logs turns into a metric with no extra
//! network call. The process also keeps a running total of each, which
//! tests read.

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
/// A chord's callback was sent.
pub const CHORD_DISPATCHED: &str = "ChordDispatched";

static TOTALS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts one occurrence of `name`: an EMF line, and the process's total.
pub fn count(name: &'static str) {
    *TOTALS.lock().unwrap_or_else(|e| e.into_inner()).entry(name).or_default() += 1;
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let line = serde_json::json!({
        "_aws": {
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [[]],
                "Metrics": [{"Name": name, "Unit": "Count"}],
            }],
        },
        name: 1,
    });
    println!("{line}");
}

/// How often `name` was counted in this process.
pub fn total(name: &str) -> u64 {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).get(name).copied().unwrap_or(0)
}
