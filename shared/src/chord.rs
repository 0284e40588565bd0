//! The chord join, driven by DynamoDB Streams (the `chord-join` function).
//!
//! A chord part is a task result stored with `group_id`, `group_index` and
//! `chord: {size, callback}`; the chord travels on the part's own item, so a
//! store stays one write. For each batch of stream records:
//! 1. keep records where a chord part is ready (SUCCESS, FAILURE, REVOKED);
//! 2. per chord, count each part once: one `TransactWriteItems` of up to 99
//!    part items (`attribute_not_exists`) plus `ADD done :k` on the chord's
//!    state item, which the first part registers (first writer wins);
//! 3. when `done >= size`, claim the dispatch with a conditional write
//!    (open → joining, a token, a lease); only the claimer joins;
//! 4. join: read the parts in `group_index` order, BatchGet their results;
//!    a FAILURE/REVOKED part fails the chord with Celery's ChordError (the
//!    callback's task stored as FAILURE, its errbacks sent), otherwise the
//!    callback is sent with `args = [results] + callback.args`;
//! 5. mark the chord dispatched (conditional on the token).
//!
//! A crash between claim and mark is healed by the stream's retry: the part
//! records come again, count nothing new, and claim the chord once the lease
//! has run out. Records of a chord that failed here are reported in
//! `batchItemFailures`, so one bad chord never blocks or replays the others.

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::dispatch::{DispatchError, MessageContext, Target};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::State;
use crate::store::{DynamoStore, ResultStore, TaskRecord};
use crate::time::{now_celery, now_epoch};

/// A Celery signature, as a worker sends it in `request.chord`.
#[derive(Debug, Clone)]
pub struct Signature {
    pub task: String,
    pub task_id: TaskId,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub options: Map<String, Value>,
    pub immutable: bool,
    /// The signature as received.
    pub raw: Value,
}

impl Signature {
    /// Parses a callback signature; it must name its task and pre-assigned `options.task_id`.
    pub fn parse(json: &str) -> Result<Self, String> {
        let raw: Value = serde_json::from_str(json).map_err(|e| format!("callback is not JSON: {e}"))?;
        Self::from_value(raw, None)
    }

    /// Parses a signature; without `options.task_id`, `fallback_id` is used if given.
    pub fn from_value(raw: Value, fallback_id: Option<&str>) -> Result<Self, String> {
        let obj = raw.as_object().ok_or("callback must be a signature object")?;
        let task = obj.get("task").and_then(Value::as_str).filter(|t| !t.is_empty());
        let task = task.ok_or("callback needs a \"task\" name")?.to_owned();
        let options = match obj.get("options") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => return Err("callback options must be an object".into()),
        };
        match options.get("queue") {
            None | Some(Value::Null) => {}
            Some(Value::String(q)) if !q.is_empty() => {}
            Some(_) => return Err("callback options.queue must be a queue name or null".into()),
        }
        if !matches!(options.get("link_error"), None | Some(Value::Null | Value::Array(_) | Value::Object(_))) {
            return Err("callback options.link_error must be a signature, a list of them, or null".into());
        }
        let task_id = options
            .get("task_id")
            .and_then(Value::as_str)
            .or(fallback_id)
            .ok_or("callback needs options.task_id (Celery pre-assigns it)")?;
        let task_id = TaskId::parse(task_id).map_err(|e| format!("callback options.task_id: {e}"))?;
        let args = match obj.get("args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err("callback args must be a list".into()),
        };
        let kwargs = match obj.get("kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(k)) => k.clone(),
            Some(_) => return Err("callback kwargs must be an object".into()),
        };
        let immutable = match obj.get("immutable") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("callback immutable must be true, false or null".into()),
        };
        Ok(Self { task, task_id, args, kwargs, options, immutable, raw })
    }
}

/// A chord part entering a ready state, read from a stream record.
#[derive(Debug, Clone)]
pub struct Part {
    pub sequence: String,
    pub ns: Namespace,
    pub group_id: GroupId,
    pub index: u32,
    pub task_id: TaskId,
    pub size: u32,
    pub callback: String,
    pub expires_at: i64,
}

/// The image's attributes as DynamoDB JSON: `{"name": {"S": "..."}}`.
fn image_json(record: &EventRecord) -> Value {
    serde_json::to_value(&record.change.new_image).unwrap_or(Value::Null)
}

fn attr_str<'a>(image: &'a Value, name: &str, kind: &str) -> Option<&'a str> {
    image.get(name)?.get(kind)?.as_str()
}

/// The part a record carries, if it is a chord part in a ready state;
/// anything else is `None` (ignored, not an error).
pub fn part_of(record: &EventRecord) -> Option<Part> {
    if record.event_name == "REMOVE" {
        return None;
    }
    let image = image_json(record);
    let status = State::parse(attr_str(&image, crate::store::schema::attr::STATUS, "S")?).ok()?;
    if !status.is_ready() {
        return None;
    }
    use crate::store::schema::attr;
    let size: u32 = attr_str(&image, attr::CHORD_SIZE, "N")?.parse().ok()?;
    let callback = attr_str(&image, attr::CHORD_CALLBACK, "S")?.to_owned();
    let group_id = GroupId::parse(attr_str(&image, attr::GROUP_ID, "S")?).ok()?;
    let index: u32 = attr_str(&image, attr::GROUP_INDEX, "N")?.parse().ok()?;
    let (ns, task_id) = crate::store::parse_task_key(attr_str(&image, attr::PK, "S")?)?;
    let expires_at = attr_str(&image, attr::EXPIRES_AT, "N").and_then(|n| n.parse().ok()).unwrap_or(0);
    Some(Part {
        sequence: record.change.sequence_number.clone().unwrap_or_default(),
        ns,
        group_id,
        index,
        task_id,
        size,
        callback,
        expires_at,
    })
}

/// Celery's ChordError text for the first failed part: `Dependency <id> raised <repr>`.
pub fn chord_error_message(task_id: &TaskId, meta_json: &str) -> String {
    let meta: Value = serde_json::from_str(meta_json).unwrap_or(Value::Null);
    let result = &meta["result"];
    let exc_type = result["exc_type"].as_str().unwrap_or(match meta["status"].as_str() {
        Some("REVOKED") => "TaskRevokedError",
        _ => "Exception",
    });
    let args = match &result["exc_message"] {
        Value::Array(items) => items.iter().map(crate::dispatch::py_repr).collect::<Vec<_>>().join(", "),
        Value::Null => String::new(),
        other => crate::dispatch::py_repr(other),
    };
    format!("Dependency {task_id} raised {exc_type}({args})")
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("chord {0} is being joined by another invocation")]
    Busy(String),
    #[error("chord {0}: {1}")]
    Inconsistent(String, String),
}

/// The chord-join function's state: the store and where callbacks go.
pub struct Joiner {
    pub store: DynamoStore,
    pub target: Target,
    /// How long a claim holds before another invocation may take it over.
    pub lease: Duration,
    /// Lifetime of the ChordError stored on a failed chord's callback.
    pub result_ttl: Duration,
}

impl Joiner {
    /// Builds the joiner from the environment: the service's `Config`, the
    /// callback target (`CALLBACK_*`), and `CHORD_LEASE_SECONDS` (default 60).
    pub async fn from_env() -> Result<Self, String> {
        let config = crate::config::Config::from_env().map_err(|e| e.to_string())?;
        let targets =
            crate::dispatch::TargetConfig::from_lookup(|v| std::env::var(v).ok()).map_err(|e| e.to_string())?;
        let lease = match std::env::var("CHORD_LEASE_SECONDS") {
            Err(_) => 60,
            Ok(raw) => raw.trim().parse::<u64>().ok().filter(|&s| s >= 1).ok_or_else(|| {
                format!("configuration: CHORD_LEASE_SECONDS: {raw:?} is not a whole number of seconds")
            })?,
        };
        let shared = crate::store::dynamo::shared_config(&config).await;
        Ok(Self {
            store: DynamoStore::from_shared(&config, &shared).await?,
            target: Target::new(targets, &shared),
            lease: Duration::from_secs(lease),
            result_ttl: config.result_ttl,
        })
    }

    /// Handles one batch of stream records; the failures name the records to retry.
    pub async fn handle(&self, event: Event) -> DynamoDbEventResponse {
        let mut chords: BTreeMap<(String, String), Vec<Part>> = BTreeMap::new();
        for record in &event.records {
            if let Some(part) = part_of(record) {
                chords.entry((part.ns.as_str().to_owned(), part.group_id.to_string())).or_default().push(part);
            }
        }
        // Chords advance concurrently, within this task.
        let outcomes = futures::future::join_all(chords.into_values().map(|parts| async move {
            // Each chord counts its own DynamoDB requests (the benchmark reads this line).
            let (outcome, calls) = crate::calls::counted(self.advance(&parts)).await;
            tracing::info!(chord = %parts[0].group_id, parts = parts.len(), ddb_calls = calls, "chord advanced");
            (parts, outcome)
        }))
        .await;
        let mut failures = Vec::new();
        for (parts, outcome) in outcomes {
            if let Err(err) = outcome {
                match &err {
                    JoinError::Busy(_) => tracing::info!(chord = %parts[0].group_id, "{err}; will retry"),
                    _ => tracing::error!(chord = %parts[0].group_id, error = %err, "chord join failed; will retry"),
                }
                failures.extend(parts.iter().map(|p| {
                    let mut failure = DynamoDbBatchItemFailure::default();
                    failure.item_identifier = Some(p.sequence.clone());
                    failure
                }));
            }
        }
        let mut response = DynamoDbEventResponse::default();
        response.batch_item_failures = failures;
        response
    }

    /// Counts the parts, and joins the chord if they complete it.
    async fn advance(&self, parts: &[Part]) -> Result<(), JoinError> {
        let first = &parts[0];
        let (ns, gid) = (&first.ns, &first.group_id);
        self.store.count_parts(ns, gid, parts).await?;
        let status = self
            .store
            .chord_state(ns, gid)
            .await?
            .ok_or_else(|| JoinError::Inconsistent(gid.to_string(), "state item missing after counting".into()))?;
        if status.done < status.size || status.is_final() {
            return Ok(());
        }
        let token = uuid::Uuid::new_v4().to_string();
        if !self.store.claim_chord(ns, gid, &token, self.lease).await? {
            let now = self.store.chord_state(ns, gid).await?;
            return match now {
                Some(s) if s.is_final() => Ok(()),
                _ => Err(JoinError::Busy(gid.to_string())),
            };
        }
        let last = parts.iter().max_by_key(|p| p.index).expect("parts are not empty");
        let joined = self.join(ns, gid, &status.callback, &token, &last.task_id).await;
        if joined.is_err() {
            // Let the retry claim it at once rather than after the lease.
            let _ = self.store.release_chord(ns, gid, &token).await;
        }
        joined
    }

    async fn join(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        callback: &str,
        token: &str,
        last: &TaskId,
    ) -> Result<(), JoinError> {
        let sig = Signature::parse(callback).map_err(|e| JoinError::Inconsistent(gid.to_string(), e))?;
        let ids = self.store.chord_part_ids(ns, gid).await?;
        let metas = self.store.get_tasks(ns, &ids).await?;
        let mut results = String::with_capacity(metas.iter().flatten().map(|m| m.json.len()).sum::<usize>() + 2);
        let mut culprit = None;
        for (id, meta) in ids.iter().zip(&metas) {
            match meta {
                None => {
                    culprit = Some(format!("Dependency {id} has no result (forgotten or expired)"));
                    break;
                }
                Some(stored) if matches!(stored.status, State::Failure | State::Revoked) => {
                    culprit = Some(chord_error_message(id, &stored.json));
                    break;
                }
                Some(stored) => {
                    let result = result_of(&stored.json);
                    results.push(if results.is_empty() { '[' } else { ',' });
                    results.push_str(&result);
                }
            }
        }
        if results.is_empty() {
            results.push('[');
        }
        results.push(']');
        let cx = MessageContext { group_id: gid.as_str(), parent_id: Some(last.as_str()), root_id: None };
        if let Some(message) = culprit {
            return self.fail(ns, gid, &sig, token, message, &cx).await;
        }
        let mut args = results.clone();
        if sig.immutable {
            args = Value::Array(sig.args.clone()).to_string();
        } else if !sig.args.is_empty() {
            let rest = Value::Array(sig.args.clone()).to_string();
            args = format!("[{results},{}", &rest[1..]);
        } else {
            args = format!("[{args}]");
        }
        let event = || format!(r#"{{"chord_id":{},"callback":{},"results":{results}}}"#, json!(gid.as_str()), sig.raw);
        match self.target.send(&sig, &args, event, &cx).await {
            Ok(()) => {
                self.store.finish_chord(ns, gid, token, "dispatched", None).await?;
                tracing::info!(chord = %gid, parts = ids.len(), callback = %sig.task_id, "chord dispatched");
                Ok(())
            }
            Err(err) if err.is_permanent() => {
                let message = format!("ChordError: callback not sent: {err}");
                self.fail(ns, gid, &sig, token, message, &cx).await
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Fails the chord as Celery does: the callback's task stored as FAILURE
    /// with a ChordError, its errbacks sent, the callback never sent.
    async fn fail(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        sig: &Signature,
        token: &str,
        message: String,
        cx: &MessageContext<'_>,
    ) -> Result<(), JoinError> {
        let error = json!({"exc_type": "ChordError", "exc_message": [message], "exc_module": "celery.exceptions"});
        let meta = json!({
            "status": "FAILURE", "result": error, "traceback": null, "children": [],
            "date_done": now_celery(), "group_id": gid.as_str(), "task_id": sig.task_id.as_str(),
        });
        let record = TaskRecord {
            task_id: sig.task_id.clone(),
            status: State::Failure,
            json: meta.to_string(),
            expires_at: now_epoch() + self.result_ttl.as_secs() as i64,
            group_id: None,
            group_index: None,
            chord: None,
        };
        // A refusal means the callback's task already has a SUCCESS: it stands.
        self.store.put_task(ns, &record).await?;
        let errbacks: Vec<Value> = match sig.options.get("link_error") {
            Some(Value::Array(list)) => list.clone(),
            Some(one @ Value::Object(_)) => vec![one.clone()],
            _ => Vec::new(),
        };
        for raw in errbacks {
            let fallback = uuid::Uuid::new_v4().to_string();
            let Ok(errback) = Signature::from_value(raw, Some(&fallback)) else {
                continue;
            };
            // Old-style errback call: the failed task's id first.
            let mut args = vec![Value::String(sig.task_id.to_string())];
            args.extend(errback.args.iter().cloned());
            let args = Value::Array(args).to_string();
            let event = || json!({"chord_id": gid.as_str(), "callback": sig.raw, "error": error}).to_string();
            match self.target.send(&errback, &args, event, cx).await {
                Ok(()) => {}
                Err(err) if err.is_permanent() => tracing::error!(chord = %gid, error = %err, "errback not sent"),
                Err(err) => return Err(err.into()),
            }
        }
        self.store.finish_chord(ns, gid, token, "failed", Some(&message)).await?;
        tracing::info!(chord = %gid, callback = %sig.task_id, %message, "chord failed");
        Ok(())
    }
}

/// The `result` of a stored meta, as raw JSON text (exact).
fn result_of(meta_json: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chord_errors_read_like_celerys() {
        let id = TaskId::parse("t2").unwrap();
        let meta = r#"{"status":"FAILURE","result":{"exc_type":"ValueError","exc_message":["boom",42],"exc_module":"builtins"}}"#;
        assert_eq!(chord_error_message(&id, meta), "Dependency t2 raised ValueError('boom', 42)");
        let revoked = r#"{"status":"REVOKED","result":{"exc_type":"TaskRevokedError","exc_message":["revoked"],"exc_module":"celery.exceptions"}}"#;
        assert_eq!(chord_error_message(&id, revoked), "Dependency t2 raised TaskRevokedError('revoked')");
    }

    #[test]
    fn results_are_taken_raw() {
        assert_eq!(
            result_of(r#"{"status":"SUCCESS","result":{"n":1.50,"big":123456789012345678901234567890}}"#),
            r#"{"n":1.50,"big":123456789012345678901234567890}"#
        );
        assert_eq!(result_of(r#"{"status":"SUCCESS"}"#), "null");
    }

    #[test]
    fn signatures_need_a_task_and_a_task_id() {
        let sig =
            Signature::parse(r#"{"task":"t.sum","args":[1],"kwargs":{},"options":{"task_id":"cb"},"immutable":true}"#)
                .unwrap();
        assert_eq!((sig.task.as_str(), sig.task_id.as_str(), sig.immutable), ("t.sum", "cb", true));
        assert!(Signature::parse(r#"{"task":"t"}"#).is_err());
        assert!(Signature::parse(r#"{"options":{"task_id":"cb"}}"#).is_err());
        assert!(Signature::parse(r#"{"task":"t","options":{"task_id":"a/b"}}"#).is_err());
        assert!(Signature::from_value(json!({"task": "e"}), Some("x")).is_ok());
    }

    #[test]
    fn signature_fields_of_the_wrong_type_are_refused() {
        let with = |extra: Value| {
            let mut sig = json!({"task": "t", "options": {"task_id": "cb"}});
            for (k, v) in extra.as_object().unwrap() {
                if k == "queue" || k == "link_error" {
                    sig["options"][k] = v.clone();
                } else {
                    sig[k] = v.clone();
                }
            }
            Signature::from_value(sig, None)
        };
        for bad in [
            json!({"task": ""}),
            json!({"immutable": {}}),
            json!({"immutable": "yes"}),
            json!({"args": {}}),
            json!({"kwargs": []}),
            json!({"queue": ""}),
            json!({"queue": 7}),
            json!({"link_error": "x"}),
        ] {
            assert!(with(bad.clone()).is_err(), "{bad} must be refused");
        }
        for good in [
            json!({"immutable": null}),
            json!({"queue": "q"}),
            json!({"queue": null}),
            json!({"link_error": [{"task": "e"}]}),
        ] {
            assert!(with(good.clone()).is_ok(), "{good} must be accepted");
        }
    }
}
