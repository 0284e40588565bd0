//! The processing cache's entries, as the cache needs them: the
//! [`CacheStore`] trait over one item per `(namespace, operation, uri)`,
//! moved between its phases by conditional writes only, implemented for
//! DynamoDB in [`super::dynamo`] (see there for the phases and attributes).

use std::future::Future;

use crate::error::StoreError;
use crate::ids::Namespace;
use crate::store::ResultStore;

/// The partition key of an entry.
pub fn entry_key(ns: &Namespace, hash: &str) -> String {
    format!("{}/cache/{hash}", ns.as_str())
}

/// The entry hash of `(op, uri)`: 128 bits of SHA-256.
pub fn entry_hash(op: &str, uri: &str) -> String {
    let mut text = String::with_capacity(op.len() + uri.len() + 1);
    text.push_str(op);
    text.push('\n');
    text.push_str(uri);
    crate::store::blobs::sha256_hex(text.as_bytes())[..32].to_owned()
}

/// Where an entry is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePhase {
    Processing,
    Settling,
    Cached,
    Quarantined,
}

impl CachePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::Settling => "settling",
            Self::Cached => "cached",
            Self::Quarantined => "quarantined",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "processing" => Self::Processing,
            "settling" => Self::Settling,
            "cached" => Self::Cached,
            "quarantined" => Self::Quarantined,
            _ => return None,
        })
    }
}

/// An entry as read.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub op: String,
    pub uri: String,
    pub phase: CachePhase,
    pub task_id: String,
    /// Processing: until when the processing holds the entry; settling: the claim's lease.
    pub lease_until: i64,
    pub waiters: Vec<String>,
    pub waiter_count: u64,
    pub waiters_bytes: u64,
    /// The `request_id`s whose `cb_args` are in `waiters`.
    pub request_ids: Vec<String>,
    pub spec: String,
    pub result: Option<String>,
    pub result_task: Option<String>,
    /// Settling: whether the processing succeeded.
    pub succeeded: bool,
    pub until: i64,
    pub token: Option<String>,
    /// Settling: the claim that re-checked itself for a send (see `cattr::SENDING` in [`super::dynamo`]).
    pub sending: Option<String>,
    pub error: Option<String>,
    pub attempts: u32,
    pub expires_at: i64,
}

impl CacheEntry {
    /// Whether the entry answers with a result: cached, or settling a success.
    pub fn has_result(&self) -> bool {
        match self.phase {
            CachePhase::Cached => true,
            CachePhase::Settling => self.succeeded,
            _ => false,
        }
    }

    /// Whether the request `request_id` already waits on this processing
    /// (it was sent again after its answer was lost).
    pub fn waited_on_by(&self, request_id: Option<&str>) -> bool {
        self.phase == CachePhase::Processing && request_id.is_some_and(|id| self.request_ids.iter().any(|r| r == id))
    }

    /// Whether a request may delegate the processing again: the processing's
    /// lease ran out, or the quarantine is over.
    pub fn is_open(&self, now: i64) -> bool {
        match self.phase {
            CachePhase::Processing => self.lease_until <= now,
            CachePhase::Quarantined => self.until <= now,
            _ => false,
        }
    }
}

/// How a processing's result settles its entry.
#[derive(Debug, Clone)]
pub enum Settle {
    /// The result, inline (JSON) or on the task (its id), kept until `expires_at`.
    Success { result: Option<String>, result_task: Option<String>, expires_at: i64 },
    /// The processing failed with `error` (Celery's exception JSON).
    Failure { error: String },
}

/// A settling claim: the processing's task, the claim's token and its lease.
#[derive(Debug, Clone, Copy)]
pub struct EntryClaim<'a> {
    pub task_id: &'a str,
    pub token: &'a str,
    pub lease_until: i64,
}

/// The outcome of a conditional write on an entry.
#[derive(Debug)]
pub enum Written {
    /// It applied; the entry as it is now.
    Applied(CacheEntry),
    /// Its condition did not hold; the entry as it was (`None`: absent or expired).
    Refused(Option<CacheEntry>),
}

/// A miss to write: join the processing, or delegate it.
#[derive(Debug, Clone)]
pub struct Miss<'a> {
    pub hash: &'a str,
    pub op: &'a str,
    pub uri: &'a str,
    /// The `cb_args` of the requests, as JSON texts.
    pub waiters: &'a [String],
    /// The request's `request_id`: a request sent again with the same one
    /// appends nothing.
    pub request_id: Option<&'a str>,
    pub max_waiters: u64,
    pub max_waiters_bytes: u64,
}

impl Miss<'_> {
    pub fn bytes(&self) -> u64 {
        self.waiters.iter().map(|w| w.len() as u64).sum()
    }
}

/// A delegation: the new processing's task and lease, and the operation.
#[derive(Debug, Clone)]
pub struct Delegation<'a> {
    pub task_id: &'a str,
    pub spec: &'a str,
    pub lease_until: i64,
    /// A processing entry outlives its lease by a day, so a vanished
    /// processing's waiters are kept for the next.
    pub expires_at: i64,
    /// The processing whose lease ran out, taken over with its waiters;
    /// `None` for an entry that is absent, expired, or out of quarantine.
    pub replaces: Option<&'a str>,
}

/// The cache's operations on its entries. Every write is conditional, and
/// answers what it found when its condition did not hold ([`Written`]), so
/// the caller decides again without another read.
pub trait CacheStore: ResultStore {
    /// One entry, read consistently; `None` when absent or expired.
    fn cache_entry(
        &self,
        ns: &Namespace,
        hash: &str,
    ) -> impl Future<Output = Result<Option<CacheEntry>, StoreError>> + Send;
    /// Entries in the order of `hashes` (distinct), read consistently.
    fn cache_entries(
        &self,
        ns: &Namespace,
        hashes: &[String],
    ) -> impl Future<Output = Result<Vec<Option<CacheEntry>>, StoreError>> + Send;
    /// A concurrent miss: appends its `cb_args` to the processing `task_id`
    /// while that processing holds the entry and the bounds allow
    /// (invariant K2).
    fn cache_join(
        &self,
        ns: &Namespace,
        miss: &Miss<'_>,
        task_id: &str,
        now: i64,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;
    /// A miss that delegates: the entry is absent or expired, its
    /// quarantine is over, or its processing's lease ran out (then its
    /// waiters are kept for the new one). One conditional write decides
    /// which request delegates (invariant K1).
    fn cache_delegate(
        &self,
        ns: &Namespace,
        miss: &Miss<'_>,
        delegation: &Delegation<'_>,
        now: i64,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;
    /// Moves a processing's lease (its task started, retried, or its
    /// delegation failed: `lease_until` now), while `task_id` still holds it.
    fn cache_lease(
        &self,
        ns: &Namespace,
        hash: &str,
        task_id: &str,
        lease_until: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// processing → settling under the claim's token (or takes over a
    /// settling claim whose lease ran out), for the result of its task. A
    /// success keeps its result from here on, so requests read it as a hit;
    /// each claim counts an attempt.
    fn cache_claim(
        &self,
        ns: &Namespace,
        hash: &str,
        claim: &EntryClaim<'_>,
        settle: &Settle,
        now: i64,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send;
    /// Renews a settling claim's lease: just before a send (`sending`,
    /// which records that this claim is about to send), or to give the
    /// claim back after a send that failed with nothing sent (`lease_until`
    /// now, clearing that record). `false` when `token` no longer holds it.
    fn cache_renew(
        &self,
        ns: &Namespace,
        hash: &str,
        token: &str,
        lease_until: i64,
        sending: bool,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// settling → cached (a success) or quarantined until `until` (a
    /// failure), dropping the waiters, while `token` holds the claim. A
    /// failure with no quarantine time removes the entry instead, so the
    /// next request delegates again.
    fn cache_finish(
        &self,
        ns: &Namespace,
        hash: &str,
        token: &str,
        quarantined_until: Option<i64>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Removes a cached or quarantined (or expired) entry; an entry being
    /// processed or settled stays. Returns the entry as it was.
    fn cache_invalidate(&self, ns: &Namespace, hash: &str) -> impl Future<Output = Result<Written, StoreError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_processing_task_id_names_its_entry() {
        let hash = entry_hash("thumbnail", "s3://bucket/a.png");
        assert_eq!(hash.len(), 32);
        assert_ne!(hash, entry_hash("thumbnail", "s3://bucket/b.png"));
        let id = crate::ids::processing_task_id(&hash);
        assert_eq!(crate::ids::entry_of_processing(id.as_str()), Some(hash.as_str()));
        for other in ["dcache-", "dcache-abc-def", "celery-1", &format!("dcache-{hash}-XYZ")] {
            assert_eq!(crate::ids::entry_of_processing(other), None, "{other}");
        }
    }
}
