//! Reading a chord's results for its callback: the parts' results in
//! order, in windows of bounded bytes, and the list by reference when the
//! callback's message would be too large to carry it.

use serde_json::{json, Value};

use super::{ChordStore, Claim, JoinError, Joiner};
use crate::celery::{chord_error_message, ResultsLayout, Signature};
use crate::dispatch::{CallbackSink, Outgoing};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::State;
use crate::metrics;
use crate::store::{Stored, TaskRecord, Within};
use crate::time::{now_celery, now_epoch};

/// Why a chord fails: Celery's ChordError message and, when a part failed,
/// that part's exception (the ChordError's cause in Celery 5.7).
pub(super) struct Failure {
    pub message: String,
    pub cause: Option<Value>,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self { message, cause: None }
    }
}

/// A window of part results inflates at most this many bytes of their
/// documents, so a chord's memory stays bounded whatever its results add up
/// to, and however well they compress.
const READ_WINDOW_BYTES: usize = 8 << 20;

/// Parts a window reads at most (as four requests side by side): their
/// items, before anything is inflated, stay under 40 MB whatever they hold
/// (100 of DynamoDB's 400 KB items).
const READ_WINDOW_PARTS: usize = 100;

/// What a part's document may hold besides its result (status, dates,
/// traceback): its read may pass the room left for results by this much.
const META_SLACK: usize = 64 << 10;

/// The failed parts a join tolerates, and those it has met so far.
struct Failures {
    tolerated: u32,
    seen: u32,
}

/// A part whose result is no longer stored.
fn gone(id: &TaskId) -> Failure {
    format!("Dependency {id} has no result (forgotten or expired)").into()
}

impl<S: ChordStore, T: CallbackSink> Joiner<S, T> {
    /// The parts' results as one JSON array (text), in order, nested as
    /// `layout` says (a header with a chain that ends in a group); or, as the
    /// inner `Err`, the ChordError message of the first part that failed,
    /// has no result, or makes the results larger than chord-join holds
    /// (`CHORD_MAX_RESULTS_BYTES`). Results kept in S3 are read from there.
    /// Up to `tolerated` failed parts do not fail it: their results (the
    /// exception, as Celery stores it) take their slots.
    ///
    /// Memory stays bounded whatever the parts hold (invariant C6): a window
    /// reads at most [`READ_WINDOW_PARTS`] items, and inflates at most
    /// [`READ_WINDOW_BYTES`] of their documents, by the size each item
    /// states before it is inflated; a part that does not fit starts the
    /// next window.
    pub(super) async fn read_results(
        &self,
        ns: &Namespace,
        ids: &[TaskId],
        tolerated: u32,
        layout: &ResultsLayout,
    ) -> Result<Result<String, Failure>, JoinError> {
        let limit = self.config.max_results_bytes;
        let mut results = String::new();
        let (mut start, mut failures) = (0, Failures { tolerated, seen: 0 });
        while start < ids.len() {
            let window = &ids[start..(start + READ_WINDOW_PARTS).min(ids.len())];
            let room = limit.saturating_sub(results.len()).saturating_add(META_SLACK);
            let metas = self.store.get_tasks_within(ns, window, READ_WINDOW_BYTES.min(room)).await?;
            let mut read = 0;
            for (id, meta) in window.iter().zip(metas) {
                let stored = match meta {
                    Some(Within::Whole(stored)) => stored,
                    // It starts the next window, with the budget to itself.
                    Some(Within::Over { .. }) if read > 0 => break,
                    Some(Within::Over { .. }) => match self.read_alone(ns, id, room).await? {
                        Ok(stored) => stored,
                        Err(failure) => return Ok(Err(failure)),
                    },
                    None => return Ok(Err(gone(id))),
                };
                let before = layout.before(start + read);
                read += 1;
                if let Err(failure) = self.append(&mut results, before, id, stored, &mut failures).await? {
                    return Ok(Err(failure));
                }
            }
            start += read;
        }
        results.push_str(layout.after());
        if results.len() > limit {
            return Ok(Err(too_many_bytes(limit).into()));
        }
        if failures.seen > 0 {
            metrics::emit(&[], &[metrics::Point::count(metrics::CHORD_FAILURES_TOLERATED, failures.seen.into())]);
            tracing::info!(
                failed = failures.seen,
                tolerated,
                "failed parts tolerated: the callback gets their exceptions"
            );
        }
        Ok(Ok(results))
    }

    /// A part that alone passes a window's budget, read with what is left
    /// of `CHORD_MAX_RESULTS_BYTES` as its own.
    async fn read_alone(&self, ns: &Namespace, id: &TaskId, room: usize) -> Result<Result<Stored, Failure>, JoinError> {
        let limit = self.config.max_results_bytes;
        Ok(match self.store.get_tasks_within(ns, std::slice::from_ref(id), room).await?.pop().flatten() {
            Some(Within::Whole(stored)) => Ok(stored),
            Some(Within::Over { .. }) => Err(too_many_bytes(limit).into()),
            None => Err(gone(id)),
        })
    }

    /// Appends `before` and one part's result to `results`; the inner `Err` fails the
    /// chord: the part failed, its object is gone, or the results pass
    /// `CHORD_MAX_RESULTS_BYTES`.
    async fn append(
        &self,
        results: &mut String,
        before: &str,
        id: &TaskId,
        stored: Stored,
        failures: &mut Failures,
    ) -> Result<Result<(), Failure>, JoinError> {
        let limit = self.config.max_results_bytes;
        if stored.blob.as_ref().is_some_and(|blob| results.len() as u64 + blob.bytes > limit as u64) {
            return Ok(Err(too_many_bytes(limit).into()));
        }
        let (json, result) = match &stored.blob {
            None => {
                let result = result_of(&stored.json);
                (stored.json, result)
            }
            // A part in S3; its object is gone only if it was forgotten.
            Some(blob) => match self.store.read_blob(blob).await? {
                None => return Ok(Err(gone(id))),
                // The object holds the result, with its arguments too for a
                // meta that was too large to send.
                Some(object) if blob.fields => match crate::meta::join_fields_and_result(&stored.json, &object) {
                    Some(joined) => joined,
                    None => (stored.json, "null".to_owned()),
                },
                Some(result) => {
                    let meta = crate::meta::join_result(&stored.json, stored.status.as_str(), &result);
                    (meta.unwrap_or(stored.json), result)
                }
            },
        };
        if matches!(stored.status, State::Failure | State::Revoked) {
            if failures.seen >= failures.tolerated {
                let cause = exception_in(&result);
                return Ok(Err(Failure { message: chord_error_message(id, &json), cause }));
            }
            failures.seen += 1;
        }
        results.push_str(before);
        results.push_str(&result);
        // With a closing bracket still to come (nested results may close
        // more: checked again once they are all read).
        if results.len() + 1 > limit {
            return Ok(Err(too_many_bytes(limit).into()));
        }
        Ok(Ok(()))
    }

    /// The results as the messages carry them: the list itself, or, when a
    /// message carrying it would pass the target's limit
    /// (`CALLBACK_MAX_BYTES`), a reference to it, stored as a result of its
    /// own (`{"dynachord_ref": {"task_id", "bytes"}}`; the Celery package
    /// puts the list back before the task runs; see `docs/LARGE_RESULTS.md`).
    /// The inner `Err` is a ChordError message: too large, and no way to
    /// store them.
    pub(super) async fn results_or_reference(
        &self,
        claim: &Claim<'_>,
        sig: &Signature,
        messages: &[Signature],
        results: String,
    ) -> Result<Result<String, String>, JoinError> {
        let event = || lambda_event(claim, sig, &results);
        // Past the limit on its own, the list needs no message built to tell.
        let too_large = results.len() > self.max_message_bytes
            || messages.iter().any(|task| {
                let args = args_with_results(task, &results);
                let out = Outgoing { sig: task, args: &args, event: &event, cx: claim.context() };
                self.sink.message_bytes(claim.ns, &out) > self.max_message_bytes
            });
        if !too_large {
            return Ok(Ok(results));
        }
        let id = results_id(claim.gid);
        let now = now_epoch();
        let json = format!(
            r#"{{"status":"SUCCESS","result":{results},"traceback":null,"children":[],"date_done":{},"task_id":{}}}"#,
            json!(now_celery()),
            json!(id.as_str())
        );
        let record = TaskRecord {
            task_id: id.clone(),
            status: State::Success,
            json,
            expires_at: (now + self.result_ttl.as_secs() as i64).max(claim.state.expires_at),
            group_id: None,
            group_index: None,
            chord: None,
            upload: None,
            claim: None,
        };
        // Refused: an earlier attempt stored the same results.
        match self.store.put_task(claim.ns, &record).await {
            Ok(_) => {}
            Err(err @ (StoreError::TooLarge { .. } | StoreError::NoBucket)) => {
                return Ok(Err(format!(
                    "ChordError: the callback with its results is more than {} bytes (CALLBACK_MAX_BYTES), and \
                     the results cannot be stored to send a reference instead ({err}); set RESULTS_BUCKET",
                    self.max_message_bytes
                )))
            }
            Err(err) => return Err(err.into()),
        }
        tracing::info!(chord = %claim.gid, results = %id, bytes = results.len(), "results sent by reference");
        Ok(Ok(json!({"dynachord_ref": {"task_id": id.as_str(), "bytes": results.len()}}).to_string()))
    }
}

/// The id under which a chord's results are stored when its callback
/// carries a reference to them: derived from the chord's id, so every
/// attempt of the join stores them under the same one.
pub fn results_id(gid: &GroupId) -> TaskId {
    let digest = crate::store::blobs::sha256_hex(gid.as_str().as_bytes());
    TaskId::parse(&format!("dynachord-chord-results-{}", &digest[..40])).expect("a valid id")
}

/// A failed part's result, when it is an exception as Celery stores one.
pub(super) fn exception_in(result: &str) -> Option<Value> {
    serde_json::from_str::<Value>(result).ok().filter(|r| r["exc_type"].is_string())
}

fn too_many_bytes(limit: usize) -> String {
    format!(
        "ChordError: the parts' results add up to more than {limit} bytes, the most chord-join joins \
         (CHORD_MAX_RESULTS_BYTES)"
    )
}

/// A message's args: the chord's results (a JSON array, as text) first,
/// then the task's own, unless the task is immutable.
pub(super) fn args_with_results(task: &Signature, results: &str) -> String {
    if task.immutable {
        Value::Array(task.args.clone()).to_string()
    } else if task.args.is_empty() {
        format!("[{results}]")
    } else {
        let rest = Value::Array(task.args.clone()).to_string();
        format!("[{results},{}", &rest[1..])
    }
}

/// The `result` of a stored meta, as raw JSON text (exact).
pub fn result_of(meta_json: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Meta<'a> {
        #[serde(borrow)]
        result: Option<&'a serde_json::value::RawValue>,
    }
    serde_json::from_str::<Meta>(meta_json)
        .ok()
        .and_then(|m| m.result.map(|r| r.get().to_owned()))
        .unwrap_or_else(|| "null".into())
}

/// The Lambda target's event: the chord, its namespace, the callback
/// signature and the results (or the reference to them).
pub(super) fn lambda_event(claim: &Claim<'_>, sig: &Signature, results: &str) -> String {
    format!(
        r#"{{"chord_id":{},"namespace":{},"callback":{},"results":{results}}}"#,
        json!(claim.gid.as_str()),
        json!(claim.ns.as_str()),
        sig.raw
    )
}
