//! Where results live. Handlers depend on the [`ResultStore`] trait;
//! [`DynamoStore`] implements it on one DynamoDB table (see [`schema`]).
//!
//! Keys: every key starts with the caller's namespace, so tenants never share
//! an item: `<ns>/task/<task_id>`, `<ns>/group/<group_id>`.

pub mod blobs;
pub mod dynamo;
pub mod item;
pub mod retry;
pub mod schema;

#[cfg(test)]
pub(crate) mod memory;

use std::future::Future;

use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::State;

pub use blobs::{BlobRef, Presigned, Shape};
pub use dynamo::DynamoStore;

/// A task result as stored: its status (for readiness) and the meta JSON as
/// served. For a result kept in S3, `json` has `"result":null` and `blob`
/// points to the result (see [`blobs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub status: State,
    pub json: String,
    pub blob: Option<BlobRef>,
}

impl Stored {
    pub fn new(status: State, json: String) -> Self {
        Self { status, json, blob: None }
    }
}

/// A result read within a byte budget ([`ResultStore::get_tasks_within`]):
/// whole, or, when inflating its document would pass the budget, only its
/// status and its document's size (nothing of it inflated).
#[derive(Debug, Clone, PartialEq)]
pub enum Within {
    Whole(Stored),
    Over { status: State, bytes: u64 },
}

impl Within {
    pub fn status(&self) -> &State {
        match self {
            Self::Whole(stored) => &stored.status,
            Self::Over { status, .. } => status,
        }
    }
}

/// One result to store.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub task_id: TaskId,
    pub status: State,
    /// The meta JSON, exactly as it will be served.
    pub json: String,
    /// Epoch seconds after which the item reads as missing.
    pub expires_at: i64,
    pub group_id: Option<GroupId>,
    pub group_index: Option<u32>,
    /// A chord part's chord: its size and callback.
    pub chord: Option<PartOf>,
    /// The result's uploaded object, when the worker uploaded it (then
    /// `json` has `"result":null`, and no `args` or `kwargs` when the
    /// object holds them too).
    pub upload: Option<Upload>,
    /// A claim on the task's run: written only if the task is not ready and
    /// no other live claim holds it (invariant S10).
    pub claim: Option<Claim>,
}

/// An object a worker uploaded through a presigned URL, to commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// The SHA-256 of the object as uploaded (lowercase hex).
    pub sha256: String,
    /// What it must hold (see [`blobs::Shape`]).
    pub shape: blobs::Shape,
}

/// A group saved with `GroupResult.save`: its result and when it expires.
#[derive(Debug, Clone)]
pub struct GroupRecord {
    pub result: Payload,
    /// Epoch seconds after which the item reads as missing.
    pub expires_at: i64,
}

/// A saved group's result (`GroupResult.as_tuple()`): sent in the request
/// as JSON text, or uploaded through a presigned URL (gzip-compressed JSON
/// whose SHA-256 is named).
#[derive(Debug, Clone)]
pub enum Payload {
    Json(String),
    Uploaded { sha256: String },
}

/// A saved group as read: its document, and its result's object when the
/// result is in S3 (then the document is `{"result":null}`).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedGroup {
    pub json: String,
    pub blob: Option<BlobRef>,
}

/// A claim on a task's run, as stored: its token and when it lapses.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub token: String,
    /// Epoch milliseconds after which another token may claim the task.
    pub until_ms: i64,
    /// A rerun's claim (a redriven chord part): it may replace a FAILURE or
    /// REVOKED result, never a SUCCESS.
    pub rerun: bool,
}

/// The chord a stored task is a part of: what its item carries so that
/// chord-join can count it and, once complete, call back.
#[derive(Debug, Clone, PartialEq)]
pub struct PartOf {
    pub size: u32,
    /// The callback signature, as JSON text.
    pub callback: String,
}

/// The outcome of a store that reached DynamoDB.
#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    Stored,
    /// The stored state does not let this write replace it (a SUCCESS, or a
    /// ready state facing a non-ready one); nothing was changed.
    Refused {
        stored: String,
    },
    /// A claim refused because another live claim holds the task; nothing
    /// was changed.
    Claimed {
        stored: String,
        /// Epoch milliseconds at which the holder's claim lapses.
        until_ms: i64,
    },
}

/// The operations the service needs from storage. Every read is strongly
/// consistent and treats expired items as missing.
pub trait ResultStore: Send + Sync {
    /// One conditional write, no read before it (invariants S1 and S2).
    fn put_task(
        &self,
        ns: &Namespace,
        record: &TaskRecord,
    ) -> impl Future<Output = Result<PutOutcome, StoreError>> + Send;
    /// `None` when the task was never stored, was forgotten, or has expired.
    fn get_task(&self, ns: &Namespace, id: &TaskId) -> impl Future<Output = Result<Option<Stored>, StoreError>> + Send;
    /// Results in the order of `ids`; duplicates allowed; `None` as in [`ResultStore::get_task`].
    fn get_tasks(
        &self,
        ns: &Namespace,
        ids: &[TaskId],
    ) -> impl Future<Output = Result<Vec<Option<Stored>>, StoreError>> + Send;
    /// As [`ResultStore::get_tasks`], holding at most `budget` bytes of
    /// documents once inflated: results are inflated in the order of `ids`
    /// while they fit, and every one after the first that does not is
    /// [`Within::Over`]. A document's size is known before it is inflated
    /// (kept on its item), and inflating stops at the budget whatever the
    /// item says, so a result that compresses well cannot make a read hold
    /// more than asked.
    fn get_tasks_within(
        &self,
        ns: &Namespace,
        ids: &[TaskId],
        budget: usize,
    ) -> impl Future<Output = Result<Vec<Option<Within>>, StoreError>> + Send;
    /// Forgets a result, its object in S3 too.
    fn delete_task(&self, ns: &Namespace, id: &TaskId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The result (JSON text) of a result kept in S3; `None` when its object
    /// is gone (the result was replaced or forgotten since its item was read).
    fn read_blob(&self, blob: &BlobRef) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// A presigned URL that reads a result's object (gzip-compressed JSON).
    fn blob_url(&self, blob: &BlobRef) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// A presigned PUT for an object of the item keyed `item_key` (a task's
    /// result, [`task_key`], or a saved group's, [`group_key`]): `bytes`
    /// bytes whose SHA-256 is `sha256`, kept at least `lifetime` seconds if
    /// never committed.
    fn upload_url(
        &self,
        item_key: &str,
        sha256: &str,
        bytes: u64,
        lifetime: i64,
    ) -> impl Future<Output = Result<Presigned, StoreError>> + Send;
    /// Saves a group, replacing any saved before (and its object). A
    /// result too large for an item goes to S3, as a task's does.
    fn put_group(
        &self,
        ns: &Namespace,
        id: &GroupId,
        record: &GroupRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn get_group(
        &self,
        ns: &Namespace,
        id: &GroupId,
    ) -> impl Future<Output = Result<Option<SavedGroup>, StoreError>> + Send;
    /// Forgets a saved group, its object in S3 too.
    fn delete_group(&self, ns: &Namespace, id: &GroupId) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The partition key of a task result.
pub fn task_key(ns: &Namespace, id: &TaskId) -> String {
    format!("{}/task/{}", ns.as_str(), id)
}

/// The namespace and task id of a task key (from a stream record).
pub fn parse_task_key(pk: &str) -> Option<(Namespace, TaskId)> {
    let (ns, id) = pk.split_once("/task/")?;
    Some((Namespace::parse(ns).ok()?, TaskId::parse(id).ok()?))
}

/// A saved group's document: Celery's `{"result": <GroupResult.as_tuple()>}`
/// (`{"result":null}` when the result is in S3).
pub fn group_doc(result: &str) -> String {
    format!(r#"{{"result":{result}}}"#)
}

/// The partition key of a saved group.
pub fn group_key(ns: &Namespace, id: &GroupId) -> String {
    format!("{}/group/{}", ns.as_str(), id)
}
