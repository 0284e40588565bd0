//! Celery task meta: the document a worker stores and a client reads, in the
//! field order Celery writes it (see `docs/CELERY_WIRE.md`).
//!
//! Values a worker chooses (`result`, `args`, `kwargs`, `children`, ...) are
//! kept as raw JSON text, never re-encoded, so any JSON value round-trips
//! exactly: big integers, float spellings, unicode escapes, key order.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

use crate::ids::{GroupId, TaskId};

/// Longest custom state name accepted.
pub const MAX_STATE_LEN: usize = 64;

/// A task state. Celery's built-in states, plus custom ones (`PROGRESS`, ...)
/// as long as they are well-formed: `A-Z`, `0-9` and `_`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Received,
    Started,
    Retry,
    Success,
    Failure,
    Revoked,
    Custom(String),
}

impl State {
    pub fn parse(raw: &str) -> Result<Self, String> {
        Ok(match raw {
            "PENDING" => Self::Pending,
            "RECEIVED" => Self::Received,
            "STARTED" => Self::Started,
            "RETRY" => Self::Retry,
            "SUCCESS" => Self::Success,
            "FAILURE" => Self::Failure,
            "REVOKED" => Self::Revoked,
            _ => {
                let well_formed = raw.len() <= MAX_STATE_LEN
                    && raw.starts_with(|c: char| c.is_ascii_uppercase())
                    && raw.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                if !well_formed {
                    return Err(format!(
                        "unknown state {raw:?}: use a Celery state (PENDING, RECEIVED, STARTED, RETRY, \
                         SUCCESS, FAILURE, REVOKED) or a custom one of A-Z, 0-9 and _ (at most {MAX_STATE_LEN})"
                    ));
                }
                Self::Custom(raw.to_owned())
            }
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Pending => "PENDING",
            Self::Received => "RECEIVED",
            Self::Started => "STARTED",
            Self::Retry => "RETRY",
            Self::Success => "SUCCESS",
            Self::Failure => "FAILURE",
            Self::Revoked => "REVOKED",
            Self::Custom(name) => name,
        }
    }

    /// Ready states are final for a client: SUCCESS, FAILURE, REVOKED.
    pub fn is_ready(&self) -> bool {
        Self::is_ready_str(self.as_str())
    }

    /// Whether a stored status names a ready state.
    pub fn is_ready_str(status: &str) -> bool {
        READY_STATES.contains(&status)
    }
}

/// The states in which a task is done (Celery's `READY_STATES`).
pub const READY_STATES: [&str; 3] = ["SUCCESS", "FAILURE", "REVOKED"];

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for State {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        State::parse(&raw).map_err(serde::de::Error::custom)
    }
}

fn de_group_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<GroupId>, D::Error> {
    Option::<String>::deserialize(d)?.map(|raw| GroupId::parse(&raw).map_err(serde::de::Error::custom)).transpose()
}

fn ser_group_id<S: serde::Serializer>(id: &Option<GroupId>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_some(id.as_ref().map(GroupId::as_str).unwrap_or_default())
}

/// The body of `PUT /v1/tasks/{task_id}`: Celery's task meta, plus
/// `expires_in` (seconds) to override the deployment's result TTL.
///
/// Serialising it gives the meta as stored and served, in Celery's field
/// order; `task_id` is always the one from the path.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskMeta {
    pub status: State,
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    #[serde(default)]
    pub traceback: Option<String>,
    #[serde(default)]
    pub children: Option<Box<RawValue>>,
    #[serde(default)]
    pub date_done: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_group_id",
        serialize_with = "ser_group_id",
        skip_serializing_if = "Option::is_none"
    )]
    pub group_id: Option<GroupId>,
    #[serde(default, deserialize_with = "crate::whole::optional", skip_serializing_if = "Option::is_none")]
    pub group_index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kwargs: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, deserialize_with = "crate::whole::optional", skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default)]
    pub task_id: Option<String>,
    /// Request only: this result's time to live in seconds.
    #[serde(default, deserialize_with = "crate::whole::optional", skip_serializing)]
    pub expires_in: Option<u64>,
    /// Request only: the chord this task is a part of (`request.chord` and
    /// `chord_size` from the worker). Kept on the part's item, never served.
    #[serde(default, skip_serializing)]
    pub chord: Option<ChordSpec>,
    /// Request only: the result was uploaded through a presigned URL
    /// (`POST /v1/tasks/{task_id}/upload`) instead of sent in `result`.
    #[serde(default, skip_serializing)]
    pub result_upload: Option<UploadSpec>,
    /// Request only: this store claims the task for one run (see
    /// [`ClaimSpec`]). Kept on the item as `claim_token`/`claim_until`,
    /// never served.
    #[serde(default, skip_serializing)]
    pub claim: Option<ClaimSpec>,
}

/// A claim on a task's run, made by the store of a state that is not
/// ready (STARTED): it is stored only if the task is not ready and no other
/// live claim holds it, so of the workers that got the same task's message
/// one runs it (see `docs/API.md`, "Claiming a task's run"). The same token
/// renews the claim.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimSpec {
    /// The claimer's token: 8 to 64 of `A-Z a-z 0-9 - _`.
    pub token: String,
    /// How long the claim lives unless renewed (1 to `MAX_CLAIM_LEASE_SECONDS`).
    #[serde(deserialize_with = "crate::whole::required")]
    pub lease_seconds: u64,
    /// A run a redrive asked for: the claim may also replace a FAILURE or
    /// REVOKED result (never a SUCCESS).
    #[serde(default)]
    pub rerun: bool,
}

/// The longest lease a claim may ask for: a running worker renews its claim
/// well within it, and a dead one holds the task no longer than this.
pub const MAX_CLAIM_LEASE_SECONDS: u64 = 3600;

/// An uploaded result: the SHA-256 (lowercase hex) of the object as
/// uploaded, and what the object holds: the result alone, or with
/// `fields`, a JSON object of the meta's large fields (`result`, `args`,
/// `kwargs`, `traceback`), for a meta too large to send even without its
/// result (`result_extended` arguments of megabytes, a traceback of
/// megabytes).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadSpec {
    pub sha256: String,
    #[serde(default)]
    pub fields: bool,
}

impl UploadSpec {
    /// What the uploaded object must hold.
    pub fn shape(&self) -> crate::store::Shape {
        if self.fields {
            crate::store::Shape::Fields
        } else {
            crate::store::Shape::Result
        }
    }
}

/// Largest chord accepted.
pub const MAX_CHORD_SIZE: u32 = 100_000;

/// A part's chord: how many parts, and the callback signature.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChordSpec {
    #[serde(deserialize_with = "crate::whole::required")]
    pub size: u32,
    pub callback: Box<RawValue>,
}

/// Why a task meta body was refused.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("body is not valid task meta: {0}")]
    Invalid(#[from] serde_json::Error),
    #[error("body task_id {body:?} does not match the path's {path:?}")]
    TaskIdMismatch { body: String, path: String },
    #[error("{field} must be {expected}")]
    WrongShape { field: &'static str, expected: &'static str },
    #[error("chord: {0}")]
    BadChord(String),
    #[error("result_upload: {0}")]
    BadUpload(String),
    #[error("claim: {0}")]
    BadClaim(String),
}

impl TaskMeta {
    /// Parses and checks a store body for `task_id`; fills what Celery would
    /// (`children` = `[]`, `date_done` for ready states) and pins `task_id`.
    pub fn parse(body: &[u8], task_id: &TaskId) -> Result<Self, MetaError> {
        json_object(body)?;
        let mut meta: TaskMeta = serde_json::from_slice(body)?;
        if let Some(body_id) = &meta.task_id {
            if body_id != task_id.as_str() {
                return Err(MetaError::TaskIdMismatch { body: body_id.clone(), path: task_id.to_string() });
            }
        }
        check_shape("children", &meta.children, "a list", b'[')?;
        check_shape("args", &meta.args, "a list", b'[')?;
        check_shape("kwargs", &meta.kwargs, "an object", b'{')?;
        if let Some(chord) = &meta.chord {
            check_chord(chord, meta.group_id.is_some(), meta.group_index)?;
        }
        if let Some(upload) = &meta.result_upload {
            if meta.result.is_some() {
                return Err(MetaError::BadUpload("a body carries result or result_upload, not both".into()));
            }
            if !crate::ids::is_sha256_hex(&upload.sha256) {
                return Err(MetaError::BadUpload("sha256 must be 64 lowercase hex digits".into()));
            }
            if upload.fields && (meta.args.is_some() || meta.kwargs.is_some()) {
                return Err(MetaError::BadUpload(
                    "with fields, args and kwargs are in the uploaded object, not in the body".into(),
                ));
            }
        }
        if let Some(claim) = &meta.claim {
            check_claim(claim, &meta.status)?;
        }
        if meta.children.is_none() {
            meta.children = Some(raw("[]"));
        }
        if meta.date_done.is_none() && meta.status.is_ready() {
            meta.date_done = Some(crate::time::now_celery());
        }
        meta.task_id = Some(task_id.to_string());
        Ok(meta)
    }

    /// The meta as stored and served (compact JSON, Celery's field order).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("task meta always serialises")
    }
}

/// A claim is made by the store of a state that is not ready, with a
/// well-formed token and a lease within bounds.
fn check_claim(claim: &ClaimSpec, status: &State) -> Result<(), MetaError> {
    if status.is_ready() {
        return Err(MetaError::BadClaim(format!(
            "a claim is made with a state that is not ready (STARTED), not {status}"
        )));
    }
    let token_ok = (8..=64).contains(&claim.token.len())
        && claim.token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !token_ok {
        return Err(MetaError::BadClaim("token must be 8 to 64 of A-Z, a-z, 0-9, - and _".into()));
    }
    if !(1..=MAX_CLAIM_LEASE_SECONDS).contains(&claim.lease_seconds) {
        return Err(MetaError::BadClaim(format!("lease_seconds must be 1 to {MAX_CLAIM_LEASE_SECONDS}")));
    }
    Ok(())
}

/// Refuses a body that is not a JSON object before serde reads it: serde
/// would read a struct from an array too, field by field (`[null, null]`).
pub fn json_object(body: &[u8]) -> Result<(), serde_json::Error> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => Ok(()),
        Some(_) => Err(serde::de::Error::custom("invalid type: expected a JSON object")),
    }
}

fn check_chord(chord: &ChordSpec, has_group: bool, index: Option<u32>) -> Result<(), MetaError> {
    let bad = |m: String| Err(MetaError::BadChord(m));
    if !(1..=MAX_CHORD_SIZE).contains(&chord.size) {
        return bad(format!("size {} is outside 1..={MAX_CHORD_SIZE}", chord.size));
    }
    let Some(index) = index.filter(|_| has_group) else {
        return bad("a chord part needs group_id and group_index".into());
    };
    if index >= chord.size {
        return bad(format!("group_index {index} is not below the chord size {}", chord.size));
    }
    let callback = crate::celery::Signature::parse(chord.callback.get()).map_err(MetaError::BadChord)?;
    callback.check_sendable().map_err(MetaError::BadChord)?;
    callback.results_layout(chord.size).map_err(MetaError::BadChord)?;
    Ok(())
}

fn check_shape(
    field: &'static str,
    value: &Option<Box<RawValue>>,
    expected: &'static str,
    opener: u8,
) -> Result<(), MetaError> {
    match value {
        Some(v) if v.get().as_bytes().first() != Some(&opener) => Err(MetaError::WrongShape { field, expected }),
        _ => Ok(()),
    }
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("static JSON is valid")
}

/// The start of a meta as stored, up to its result: Celery's field order
/// puts `status` first and `result` second.
fn result_head(status: &str) -> String {
    format!(r#"{{"status":{},"result":"#, serde_json::to_string(status).expect("a string serialises"))
}

/// Splits a meta as stored (see [`TaskMeta::to_json`]) into the meta with
/// `"result":null` and the result's JSON text, exactly as stored.
pub fn split_result<'a>(json: &'a str, status: &str) -> Option<(String, &'a str)> {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        result: Option<&'a RawValue>,
    }
    let head = result_head(status);
    if !json.starts_with(&head) {
        return None;
    }
    let raw = serde_json::from_str::<Head>(json).ok()?.result?.get();
    let start = raw.as_ptr() as usize - json.as_ptr() as usize;
    (start == head.len()).then(|| (format!("{head}null{}", &json[start + raw.len()..]), raw))
}

/// A meta whose result was split off ([`split_result`]) with `result` put back.
pub fn join_result(meta: &str, status: &str, result: &str) -> Option<String> {
    let head = result_head(status) + "null";
    let rest = meta.strip_prefix(&head)?;
    let mut json = String::with_capacity(meta.len() + result.len());
    json.push_str(&head[..head.len() - 4]);
    json.push_str(result);
    json.push_str(rest);
    Some(json)
}

/// A meta whose result was split off, with `"result_ref": reference` after
/// its `"result":null` (the result is read from the reference's URL).
pub fn with_result_ref(meta: &str, status: &str, reference: &str) -> Option<String> {
    let head = result_head(status) + "null";
    let rest = meta.strip_prefix(&head)?;
    Some(format!(r#"{head},"result_ref":{reference}{rest}"#))
}

/// The large fields of a meta as a fields upload holds them
/// ([`crate::store::Shape::Fields`]).
#[derive(Deserialize)]
struct LargeFields {
    #[serde(default)]
    result: Option<Box<RawValue>>,
    #[serde(default)]
    args: Option<Box<RawValue>>,
    #[serde(default)]
    kwargs: Option<Box<RawValue>>,
    #[serde(default)]
    traceback: Option<String>,
}

/// A meta stored without its large fields, with them put back from the
/// object of a fields upload (`fields`), in Celery's field order.
pub fn join_fields(meta: &str, fields: &str) -> Option<String> {
    let mut whole: TaskMeta = serde_json::from_str(meta).ok()?;
    let large: LargeFields = serde_json::from_str(fields).ok()?;
    put_back(&mut whole, large);
    Some(whole.to_json())
}

/// As [`join_fields`], with the result alone too, from one read of each.
pub fn join_fields_and_result(meta: &str, fields: &str) -> Option<(String, String)> {
    let mut whole: TaskMeta = serde_json::from_str(meta).ok()?;
    let large: LargeFields = serde_json::from_str(fields).ok()?;
    let result = raw_or_null(&large.result);
    put_back(&mut whole, large);
    Some((whole.to_json(), result))
}

fn raw_or_null(value: &Option<Box<RawValue>>) -> String {
    value.as_ref().map_or_else(|| "null".to_owned(), |r| r.get().to_owned())
}

fn put_back(whole: &mut TaskMeta, large: LargeFields) {
    whole.result = large.result;
    whole.args = large.args.or(whole.args.take());
    whole.kwargs = large.kwargs.or(whole.kwargs.take());
    whole.traceback = large.traceback.or(whole.traceback.take());
}

/// A meta whose result is in S3, with the object's text put back: the
/// result alone ([`join_result`]), or the large fields ([`join_fields`]).
pub fn join_object(meta: &str, status: &str, object: &str, fields: bool) -> Option<String> {
    if fields {
        join_fields(meta, object)
    } else {
        join_result(meta, status, object)
    }
}

/// What a task that was never stored, or has expired, reads as (Celery's
/// PENDING meta): never an error.
pub fn pending_json(task_id: &TaskId) -> String {
    format!(
        r#"{{"status":"PENDING","result":null,"traceback":null,"children":[],"date_done":null,"task_id":{}}}"#,
        serde_json::to_string(task_id.as_str()).expect("a string serialises")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(s: &str) -> TaskId {
        TaskId::parse(s).unwrap()
    }

    #[test]
    fn round_trips_any_json_result_exactly() {
        let body = r#"{"status":"SUCCESS","result":{"big":123456789012345678901234567890,"f":1.0e3,"u":"\u00e9☃","e":"","n":[null,true,{}]},"traceback":null,"children":[],"date_done":"2026-11-22T23:15:35.403592+00:00","task_id":"t1"}"#;
        let meta = TaskMeta::parse(body.as_bytes(), &tid("t1")).unwrap();
        assert_eq!(meta.to_json(), body);
    }

    #[test]
    fn a_fields_upload_is_put_back_in_celerys_field_order() {
        let body = r#"{"status":"SUCCESS","name":"big","worker":"w1","result_upload":{"sha256":"SHA","fields":true}}"#
            .replace("SHA", &"a".repeat(64));
        let stored = TaskMeta::parse(body.as_bytes(), &tid("t1")).unwrap().to_json();
        let object = r#"{"args":[[1,2],"x"],"kwargs":{"k":{"n":null}},"result":{"r":1.0e3}}"#;
        let whole = join_object(&stored, "SUCCESS", object, true).unwrap();
        let served: serde_json::Value = serde_json::from_str(&whole).unwrap();
        assert_eq!(served["result"], serde_json::json!({"r": 1000.0}));
        assert_eq!(served["args"], serde_json::json!([[1, 2], "x"]));
        assert_eq!(served["kwargs"], serde_json::json!({"k": {"n": null}}));
        assert_eq!(served["name"], "big");
        assert!(whole.starts_with(r#"{"status":"SUCCESS","result":{"r":1.0e3},"traceback":null"#), "{whole}");
        assert!(whole.find(r#""args""#) < whole.find(r#""worker""#), "{whole}");
        assert_eq!(join_fields_and_result(&stored, object).unwrap(), (whole.clone(), r#"{"r":1.0e3}"#.to_owned()));
        assert_eq!(join_fields_and_result(&stored, r#"{"args":[]}"#).unwrap().1, "null");
        // A failure's traceback of megabytes travels in the object too.
        let failed = body.replace("SUCCESS", "FAILURE");
        let stored = TaskMeta::parse(failed.as_bytes(), &tid("t1")).unwrap().to_json();
        let object = r#"{"result":{"exc_type":"ValueError"},"traceback":"Traceback (most recent call last):\n"}"#;
        let whole = join_object(&stored, "FAILURE", object, true).unwrap();
        assert!(
            whole.starts_with(
                r#"{"status":"FAILURE","result":{"exc_type":"ValueError"},"traceback":"Traceback (most recent call last):\n""#
            ),
            "{whole}"
        );
        // A body with fields carries neither args nor kwargs itself.
        for also in [r#","args":[1]"#, r#","kwargs":{}"#] {
            let twice = body.replacen(r#","worker""#, &format!(r#"{also},"worker""#), 1);
            assert!(matches!(TaskMeta::parse(twice.as_bytes(), &tid("t1")), Err(MetaError::BadUpload(_))), "{twice}");
        }
    }

    #[test]
    fn keeps_celerys_field_order_for_extended_meta() {
        let body = r#"{"task_id":"t1","queue":"celery","status":"SUCCESS","result":3,"name":"proj.tasks.add","args":[1,2],"kwargs":{},"worker":"celery@w1","retries":0,"parent_id":"p1","group_id":"g1","date_done":"2026-11-22T23:15:35.403592+00:00","traceback":null,"children":[]}"#;
        let meta = TaskMeta::parse(body.as_bytes(), &tid("t1")).unwrap();
        assert_eq!(
            meta.to_json(),
            r#"{"status":"SUCCESS","result":3,"traceback":null,"children":[],"date_done":"2026-11-22T23:15:35.403592+00:00","group_id":"g1","parent_id":"p1","name":"proj.tasks.add","args":[1,2],"kwargs":{},"worker":"celery@w1","retries":0,"queue":"celery","task_id":"t1"}"#
        );
    }

    #[test]
    fn fills_defaults_like_celery() {
        let meta = TaskMeta::parse(br#"{"status":"FAILURE","result":{"exc_type":"ValueError","exc_message":["boom"],"exc_module":"builtins"}}"#, &tid("t1")).unwrap();
        assert!(meta.date_done.as_deref().unwrap().ends_with("+00:00"));
        let json: serde_json::Value = serde_json::from_str(&meta.to_json()).unwrap();
        assert_eq!(json["children"], serde_json::json!([]));
        assert_eq!(json["task_id"], "t1");
        let started = TaskMeta::parse(br#"{"status":"STARTED","result":{"pid":1}}"#, &tid("t1")).unwrap();
        assert_eq!(started.date_done, None, "only ready states get a date_done");
    }

    #[test]
    fn states_known_custom_and_refused() {
        assert!(State::parse("SUCCESS").unwrap().is_ready());
        assert!(!State::parse("RETRY").unwrap().is_ready());
        assert_eq!(State::parse("PROGRESS").unwrap(), State::Custom("PROGRESS".into()));
        for bad in ["success", "", "1ABC", "A-B", "A B", &"A".repeat(MAX_STATE_LEN + 1)] {
            assert!(State::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_bad_bodies() {
        let t1 = tid("t1");
        for (body, needle) in [
            (r#"{"status":"DONE!"}"#, "unknown state"),
            (r#"{"result":1}"#, "missing field `status`"),
            (r#"{"status":"SUCCESS","stauts":1}"#, "unknown field `stauts`"),
            (r#"{"status":"SUCCESS","retries":"x"}"#, "invalid type"),
            (r#"{"status":"SUCCESS","task_id":"t2"}"#, "does not match"),
            (r#"{"status":"SUCCESS","children":{}}"#, "children must be a list"),
            (r#"{"status":"SUCCESS","group_id":"a/b"}"#, "group id"),
            (r#"{"status":"SUCCESS","expires_in":-1}"#, "invalid value"),
            (r#"[1]"#, "invalid type"),
            (r#"["SUCCESS"]"#, "expected a JSON object"),
            (r#"{"status":"SUCCESS""#, "EOF"),
            (
                r#"{"status":"SUCCESS","chord":{"size":2,"callback":{"task":"t","options":{"task_id":"cb"}}}}"#,
                "needs group_id",
            ),
            (
                r#"{"status":"SUCCESS","group_id":"g","group_index":2,"chord":{"size":2,"callback":{"task":"t","options":{"task_id":"cb"}}}}"#,
                "not below",
            ),
            (
                r#"{"status":"SUCCESS","group_id":"g","group_index":0,"chord":{"size":0,"callback":{"task":"t","options":{"task_id":"cb"}}}}"#,
                "outside",
            ),
            (
                r#"{"status":"SUCCESS","group_id":"g","group_index":0,"chord":{"size":1,"callback":{"task":"t"}}}"#,
                "task_id",
            ),
            (r#"{"status":"SUCCESS","group_id":"g","group_index":0,"chord":{"size":1,"callback":[]}}"#, "callback"),
        ] {
            let err = TaskMeta::parse(body.as_bytes(), &t1).unwrap_err().to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }

    /// JSON Schema's integers include integral floats: `1.0` is taken as 1
    /// and stored as 1, so a client reading it back gets an integer.
    #[test]
    fn integral_floats_are_integers_and_are_stored_as_such() {
        let body = r#"{"status":"SUCCESS","group_id":"g","group_index":1.0,"retries":2.0,"expires_in":60.0,"chord":{"size":2.0,"callback":{"task":"t","options":{"task_id":"cb"}}}}"#;
        let meta = TaskMeta::parse(body.as_bytes(), &tid("t1")).unwrap();
        assert_eq!((meta.group_index, meta.retries, meta.expires_in), (Some(1), Some(2), Some(60)));
        let json = meta.to_json();
        assert!(json.contains(r#""group_index":1,"#) && json.contains(r#""retries":2"#), "{json}");
        let bad = r#"{"status":"SUCCESS","retries":2.5}"#;
        assert!(TaskMeta::parse(bad.as_bytes(), &tid("t1")).unwrap_err().to_string().contains("whole number"));
    }

    #[test]
    fn a_result_is_split_off_and_put_back_exactly() {
        let body = r#"{"status":"SUCCESS","result":{"big":[1,2.50,"\u00e9"]},"traceback":null,"children":[],"date_done":null,"task_id":"t1"}"#;
        let json = TaskMeta::parse(body.as_bytes(), &tid("t1")).unwrap().to_json();
        let (meta, result) = split_result(&json, "SUCCESS").unwrap();
        assert_eq!(result, r#"{"big":[1,2.50,"\u00e9"]}"#);
        assert!(meta.starts_with(r#"{"status":"SUCCESS","result":null,"traceback""#), "{meta}");
        assert_eq!(join_result(&meta, "SUCCESS", result).unwrap(), json);
        let with_ref = with_result_ref(&meta, "SUCCESS", r#"{"url":"u"}"#).unwrap();
        let v: serde_json::Value = serde_json::from_str(&with_ref).unwrap();
        assert_eq!((v["result"].clone(), v["result_ref"]["url"].clone()), (serde_json::json!(null), "u".into()));
        assert!(split_result(&json, "FAILURE").is_none(), "the status must match");
        assert!(join_result(&json, "SUCCESS", "1").is_none(), "only a meta whose result was split off");
    }

    #[test]
    fn pending_is_celerys_pending_meta() {
        let v: serde_json::Value = serde_json::from_str(&pending_json(&tid("t-1"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status":"PENDING","result":null,"traceback":null,"children":[],"date_done":null,"task_id":"t-1"})
        );
    }
}
