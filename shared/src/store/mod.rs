//! Where results live. Handlers depend on the [`ResultStore`] trait;
//! [`DynamoStore`] implements it on one DynamoDB table (see [`schema`]).
//!
//! Keys: every key starts with the caller's namespace, so tenants never share
//! an item: `<ns>/task/<task_id>`, `<ns>/group/<group_id>`.

pub mod chords;
pub mod dynamo;
pub mod retry;
pub mod schema;

#[cfg(test)]
pub(crate) mod memory;

use std::future::Future;

use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::State;

pub use dynamo::DynamoStore;

/// A task result as stored: its status (for readiness) and the meta JSON as served.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub status: State,
    pub json: String,
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
    /// A chord part's chord: size and callback signature (JSON).
    pub chord: Option<(u32, String)>,
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
    /// One conditional write, no read before it (invariants 1 and 2).
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
    fn delete_task(&self, ns: &Namespace, id: &TaskId) -> impl Future<Output = Result<(), StoreError>> + Send;
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

/// A chord's state item.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordState {
    pub size: u32,
    pub done: u32,
    /// `open`, `joining`, `dispatched` or `failed`.
    pub state: String,
    pub callback: String,
    pub callback_id: String,
    pub error: Option<String>,
}

impl ChordState {
    pub fn is_final(&self) -> bool {
        self.state == "dispatched" || self.state == "failed"
    }
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
