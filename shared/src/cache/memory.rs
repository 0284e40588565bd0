//! [`CacheStore`] on the in-memory store of the unit tests: each
//! conditional write of `cache/dynamo.rs`, its condition and its update,
//! under one lock. faults are the fields of [`Entries`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use super::store::{entry_key, CacheEntry, CachePhase, CacheStore, Delegation, EntryClaim, Miss, Settle, Written};
use crate::error::StoreError;
use crate::ids::Namespace;
use crate::store::memory::{injected, MemoryStore};
use crate::time::now_epoch;

/// The cache's entries in memory, and the faults a test injects.
#[derive(Default)]
pub struct Entries {
    /// Entry key → the entry.
    entries: Mutex<HashMap<String, CacheEntry>>,
    /// Fault: every re-check before a send finds the claim taken over.
    pub steal_claims: AtomicBool,
    /// Fault: this many coming `cache_finish` calls fail as if DynamoDB were down.
    pub fail_finishes: AtomicU32,
    /// Fault: this many coming re-checks before a send fail as if DynamoDB were down.
    pub fail_rechecks: AtomicU32,
}

/// The in-memory store with the cache's entries.
pub type MemoryCacheStore = MemoryStore<Entries>;

impl MemoryCacheStore {
    /// Applies `write` to the entry of `hash` (`None` when absent): it
    /// returns whether its condition held. The answer is the entry after
    /// the write, or as it was when refused (expired entries read as none).
    fn write_entry(
        &self,
        ns: &Namespace,
        hash: &str,
        now: i64,
        write: impl FnOnce(&mut Option<CacheEntry>) -> bool,
    ) -> Written {
        let mut entries = self.ext.entries.lock().unwrap();
        let key = entry_key(ns, hash);
        let mut entry = entries.get(&key).cloned();
        let before = entry.clone().filter(|e| e.expires_at > now);
        if !write(&mut entry) {
            return Written::Refused(before);
        }
        match entry {
            Some(entry) => {
                entries.insert(key, entry.clone());
                Written::Applied(entry)
            }
            None => {
                entries.remove(&key);
                Written::Refused(None)
            }
        }
    }
}

/// An entry a miss opens: processing under `delegation`.
fn opened(miss: &Miss<'_>, delegation: &Delegation<'_>) -> CacheEntry {
    CacheEntry {
        op: miss.op.to_owned(),
        uri: miss.uri.to_owned(),
        phase: CachePhase::Processing,
        task_id: delegation.task_id.to_owned(),
        lease_until: delegation.lease_until,
        waiters: Vec::new(),
        waiter_count: 0,
        waiters_bytes: 0,
        request_ids: Vec::new(),
        spec: delegation.spec.to_owned(),
        result: None,
        result_task: None,
        succeeded: true,
        until: 0,
        token: None,
        sending: None,
        error: None,
        attempts: 0,
        expires_at: delegation.expires_at,
    }
}

/// Whether `miss` fits the entry's bounds and is not there already.
fn fits(e: &CacheEntry, miss: &Miss<'_>) -> bool {
    e.waiter_count + miss.waiters.len() as u64 <= miss.max_waiters
        && e.waiters_bytes + miss.bytes() <= miss.max_waiters_bytes
}

fn add_waiters(e: &mut CacheEntry, miss: &Miss<'_>) {
    e.waiters.extend(miss.waiters.iter().cloned());
    e.waiter_count += miss.waiters.len() as u64;
    e.waiters_bytes += miss.bytes();
    if let Some(id) = miss.request_id.filter(|id| !e.request_ids.iter().any(|r| r == id)) {
        e.request_ids.push(id.to_owned());
    }
}

impl CacheStore for MemoryCacheStore {
    async fn cache_entry(&self, ns: &Namespace, hash: &str) -> Result<Option<CacheEntry>, StoreError> {
        let entries = self.ext.entries.lock().unwrap();
        Ok(entries.get(&entry_key(ns, hash)).filter(|e| e.expires_at > now_epoch()).cloned())
    }

    async fn cache_entries(&self, ns: &Namespace, hashes: &[String]) -> Result<Vec<Option<CacheEntry>>, StoreError> {
        let mut found = Vec::with_capacity(hashes.len());
        for hash in hashes {
            found.push(self.cache_entry(ns, hash).await?);
        }
        Ok(found)
    }

    async fn cache_join(
        &self,
        ns: &Namespace,
        miss: &Miss<'_>,
        task_id: &str,
        now: i64,
    ) -> Result<Written, StoreError> {
        Ok(self.write_entry(ns, miss.hash, now, |entry| match entry {
            Some(e)
                if e.phase == CachePhase::Processing
                    && e.task_id == task_id
                    && e.lease_until > now
                    && e.expires_at > now
                    && fits(e, miss)
                    && !miss.request_id.is_some_and(|id| e.request_ids.iter().any(|r| r == id)) =>
            {
                add_waiters(e, miss);
                true
            }
            _ => false,
        }))
    }

    async fn cache_delegate(
        &self,
        ns: &Namespace,
        miss: &Miss<'_>,
        delegation: &Delegation<'_>,
        now: i64,
    ) -> Result<Written, StoreError> {
        Ok(self.write_entry(ns, miss.hash, now, |entry| {
            let held = match (entry.as_ref(), delegation.replaces) {
                (Some(e), Some(old)) => {
                    e.phase == CachePhase::Processing
                        && e.task_id == old
                        && e.lease_until <= now
                        && e.expires_at > now
                        && fits(e, miss)
                }
                (None, None) => true,
                (Some(e), None) => e.expires_at <= now || (e.phase == CachePhase::Quarantined && e.until <= now),
                (None, Some(_)) => false,
            };
            if !held {
                return false;
            }
            let mut new = opened(miss, delegation);
            if let (Some(old), Some(_)) = (entry.as_ref(), delegation.replaces) {
                // A takeover keeps the old processing's waiters and request ids.
                new.waiters = old.waiters.clone();
                new.waiter_count = old.waiter_count;
                new.waiters_bytes = old.waiters_bytes;
                new.request_ids = old.request_ids.clone();
            }
            add_waiters(&mut new, miss);
            *entry = Some(new);
            true
        }))
    }

    async fn cache_lease(
        &self,
        ns: &Namespace,
        hash: &str,
        task_id: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        let written = self.write_entry(ns, hash, now_epoch(), |entry| match entry {
            Some(e) if e.phase == CachePhase::Processing && e.task_id == task_id => {
                e.lease_until = lease_until;
                true
            }
            _ => false,
        });
        Ok(matches!(written, Written::Applied(_)))
    }

    async fn cache_claim(
        &self,
        ns: &Namespace,
        hash: &str,
        claim: &EntryClaim<'_>,
        settle: &Settle,
        now: i64,
    ) -> Result<Written, StoreError> {
        Ok(self.write_entry(ns, hash, now, |entry| match entry {
            Some(e)
                if e.task_id == claim.task_id
                    && (e.phase == CachePhase::Processing
                        || (e.phase == CachePhase::Settling && e.lease_until <= now)) =>
            {
                e.phase = CachePhase::Settling;
                e.lease_until = claim.lease_until;
                e.token = Some(claim.token.to_owned());
                e.attempts += 1;
                match settle {
                    Settle::Success { result, result_task, expires_at } => {
                        e.succeeded = true;
                        match (result, result_task) {
                            (None, Some(task)) => e.result_task = Some(task.clone()),
                            (result, _) => e.result = Some(result.clone().unwrap_or_else(|| "null".into())),
                        }
                        e.expires_at = *expires_at;
                    }
                    Settle::Failure { error } => {
                        e.succeeded = false;
                        e.error = Some(error.clone());
                    }
                }
                true
            }
            _ => false,
        }))
    }

    async fn cache_renew(
        &self,
        ns: &Namespace,
        hash: &str,
        token: &str,
        lease_until: i64,
        sending: bool,
    ) -> Result<bool, StoreError> {
        if sending && self.ext.steal_claims.load(Ordering::SeqCst) {
            return Ok(false);
        }
        if sending {
            injected(&self.ext.fail_rechecks)?;
        }
        let written = self.write_entry(ns, hash, now_epoch(), |entry| match entry {
            Some(e) if e.phase == CachePhase::Settling && e.token.as_deref() == Some(token) => {
                e.lease_until = lease_until;
                e.sending = sending.then(|| token.to_owned());
                true
            }
            _ => false,
        });
        Ok(matches!(written, Written::Applied(_)))
    }

    async fn cache_finish(
        &self,
        ns: &Namespace,
        hash: &str,
        token: &str,
        quarantined_until: Option<i64>,
    ) -> Result<bool, StoreError> {
        injected(&self.ext.fail_finishes)?;
        let mut held = false;
        self.write_entry(ns, hash, now_epoch(), |entry| {
            let Some(e) =
                entry.as_mut().filter(|e| e.phase == CachePhase::Settling && e.token.as_deref() == Some(token))
            else {
                return false;
            };
            held = true;
            match quarantined_until {
                Some(until) if until <= 0 => *entry = None,
                _ => {
                    e.phase = if quarantined_until.is_some() { CachePhase::Quarantined } else { CachePhase::Cached };
                    e.until = quarantined_until.unwrap_or(e.until);
                    e.waiters.clear();
                    (e.waiter_count, e.waiters_bytes, e.lease_until, e.attempts) = (0, 0, 0, 0);
                    (e.token, e.sending, e.succeeded) = (None, None, true);
                    e.request_ids.clear();
                }
            }
            true
        });
        Ok(held)
    }

    async fn cache_invalidate(&self, ns: &Namespace, hash: &str) -> Result<Written, StoreError> {
        let now = now_epoch();
        let mut removed = None;
        let written = self.write_entry(ns, hash, now, |entry| match entry.take() {
            Some(e) if matches!(e.phase, CachePhase::Cached | CachePhase::Quarantined) || e.expires_at <= now => {
                removed = Some(e).filter(|e| e.expires_at > now);
                true
            }
            other => {
                *entry = other;
                false
            }
        });
        Ok(match (written, removed) {
            (Written::Refused(None), Some(old)) => Written::Applied(old),
            (written, _) => written,
        })
    }
}
