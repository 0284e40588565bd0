//! Where results live. Handlers depend on the [`ResultStore`] trait;
//! [`DynamoStore`] implements it on one DynamoDB table (see [`schema`]).
//!
//! Keys: every key starts with the caller's namespace, so tenants never share
//! an item: `<ns>/task/<task_id>`, `<ns>/group/<group_id>`.

pub mod blobs;
pub mod cache;
pub mod chords;
pub mod dynamo;
pub mod retry;
pub mod schema;

#[cfg(test)]
pub(crate) mod memory;

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::State;

pub use blobs::{BlobRef, Presigned};
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
    /// The SHA-256 of the result's uploaded object, when the worker
    /// uploaded it (then `json` has `"result":null`).
    pub upload: Option<String>,
}

/// The chord a stored task is a part of: what its item carries so that
/// chord-join can count it and, once complete, call back.
#[derive(Debug, Clone, PartialEq)]
pub struct PartOf {
    pub size: u32,
    /// The callback signature, as JSON text.
    pub callback: String,
}

/// A chord part as the store counts it: one part item per `group_index`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPart {
    pub index: u32,
    pub task_id: TaskId,
    /// The part's own expiry; the chord's items live at least as long.
    pub expires_at: i64,
}

/// What the first counted part registers on the chord's state item (the
/// first writer's size and callback win).
#[derive(Debug, Clone, PartialEq)]
pub struct ChordRegistration {
    pub size: u32,
    /// The callback signature, as JSON text.
    pub callback: String,
    pub callback_id: String,
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
    /// Forgets a result, its object in S3 too.
    fn delete_task(&self, ns: &Namespace, id: &TaskId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The result (JSON text) of a result kept in S3; `None` when its object
    /// is gone (the result was replaced or forgotten since its item was read).
    fn read_blob(&self, blob: &BlobRef) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// A presigned URL that reads a result's object (gzip-compressed JSON).
    fn blob_url(&self, blob: &BlobRef) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// A presigned PUT for the result of `id`, an object of `bytes` bytes
    /// whose SHA-256 is `sha256`, kept at least `lifetime` seconds if never
    /// committed.
    fn upload_url(
        &self,
        ns: &Namespace,
        id: &TaskId,
        sha256: &str,
        bytes: u64,
        lifetime: i64,
    ) -> impl Future<Output = Result<Presigned, StoreError>> + Send;
    fn put_group(
        &self,
        ns: &Namespace,
        id: &GroupId,
        json: &str,
        expires_at: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn get_group(
        &self,
        ns: &Namespace,
        id: &GroupId,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    fn delete_group(&self, ns: &Namespace, id: &GroupId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// A chord's progress; `None` until its first part has been counted.
    fn get_chord(
        &self,
        ns: &Namespace,
        id: &GroupId,
    ) -> impl Future<Output = Result<Option<ChordState>, StoreError>> + Send;
}

/// Where a chord is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChordPhase {
    /// Counting parts.
    Open,
    /// Complete and claimed by one chord-join invocation (token and lease).
    Joining,
    /// The callback was sent.
    Dispatched,
    /// The chord failed: ChordError stored on the callback, errbacks sent.
    Failed,
}

impl ChordPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Joining => "joining",
            Self::Dispatched => "dispatched",
            Self::Failed => "failed",
        }
    }

    /// A stored phase; anything unknown reads as `open` (the state a chord
    /// is registered in).
    pub fn parse(raw: &str) -> Self {
        match raw {
            "joining" => Self::Joining,
            "dispatched" => Self::Dispatched,
            "failed" => Self::Failed,
            _ => Self::Open,
        }
    }

    /// Dispatched or failed: nothing more happens to the chord.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Dispatched | Self::Failed)
    }
}

/// A chord's state item.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordState {
    pub size: u32,
    pub done: u32,
    pub phase: ChordPhase,
    pub callback: String,
    pub callback_id: String,
    pub error: Option<String>,
    /// Joins that failed and were given back (bounded by `CHORD_MAX_ATTEMPTS`).
    pub attempts: u32,
    /// Errbacks of a failing chord already sent, in order.
    pub errbacks_sent: u32,
    /// Messages of the callback already sent, in order, when the body is
    /// more than one (a group's tasks, a chord's header).
    pub body_sent: u32,
    /// The state item's expiry (epoch seconds).
    pub expires_at: i64,
}

impl ChordState {
    pub fn is_final(&self) -> bool {
        self.phase.is_final()
    }
}

/// The chord operations of chord-join, over the chord's state item and part
/// items (see [`chords`] for DynamoDB). Every claim transition is
/// conditional on the claim's token, so an invocation that lost its claim
/// changes nothing.
pub trait ChordStore: ResultStore {
    /// Counts each part once however often it is delivered; registers the
    /// chord on first use. Returns how many parts were new.
    fn count_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        chord: &ChordRegistration,
        parts: &[ChordPart],
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;
    /// The state item, read consistently.
    fn chord_state(
        &self,
        ns: &Namespace,
        gid: &GroupId,
    ) -> impl Future<Output = Result<Option<ChordState>, StoreError>> + Send;
    /// Moves the chord's expiry to `expires_at` if that is later (a chord
    /// lives as long as its newest part).
    fn extend_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        expires_at: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// open → joining with `token` and a lease (or takes over a claim whose
    /// lease ran out). `false` when someone else holds it or it is final.
    fn claim_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Re-checks the claim just before a send and renews its lease:
    /// `false` when `token` no longer holds it.
    fn renew_claim(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Gives the claim back after a join that sent nothing (joining →
    /// open, only while `token` holds it) and counts the failed attempt.
    /// Returns whether it applied.
    fn release_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Records, while `token` holds the claim, that the chord is failing
    /// with `error` and that its first `errbacks_sent` errbacks went out; a
    /// later join of the chord goes on failing it, never sends its callback.
    fn record_failure(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        error: &str,
        errbacks_sent: u32,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Records, while `token` holds the claim, that the first `sent`
    /// messages of the callback went out, so a retry sends only the rest.
    fn record_sent(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        sent: u32,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// joining → `phase` (dispatched or failed), only while `token` holds the claim.
    fn finish_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        phase: ChordPhase,
        error: Option<&str>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// The counted parts' task ids in `group_index` order.
    fn chord_part_ids(
        &self,
        ns: &Namespace,
        gid: &GroupId,
    ) -> impl Future<Output = Result<Vec<TaskId>, StoreError>> + Send;
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

/// The partition key of a chord's state and part items.
pub fn chord_key(ns: &Namespace, id: &GroupId) -> String {
    format!("{}/chord/{}", ns.as_str(), id)
}

/// The partition key of a saved group.
pub fn group_key(ns: &Namespace, id: &GroupId) -> String {
    format!("{}/group/{}", ns.as_str(), id)
}
