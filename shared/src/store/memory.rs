//! An in-memory [`ResultStore`] for unit tests of the service layer, the
//! chord join and the processing cache. It mirrors the DynamoDB write
//! condition (see `dynamo::write_condition`); the integration suite checks
//! the real one. Faults are injected through its public fields.
//!
//! The chord's and the cache's own items live in its extension `ext`, a
//! type of their own (`chord/memory.rs`, `cache/memory.rs`), where their
//! store traits are implemented beside their DynamoDB ones: so this module
//! knows nothing of either.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{
    group_key, task_key, BlobRef, Claim, GroupRecord, Payload, Presigned, PutOutcome, ResultStore, SavedGroup, Shape,
    Stored, TaskRecord, Within,
};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::time::now_epoch;

/// A stored task or group: its status (tasks), document and expiry.
type Entry = (Option<Stored>, String, i64);
#[derive(Default)]
pub struct MemoryStore<X = ()> {
    items: Mutex<HashMap<String, Entry>>,
    reads: AtomicUsize,
    /// Results whose meta is longer than this (0: none) are kept as blobs,
    /// as the DynamoDB store keeps large results in S3.
    pub spill_above: AtomicUsize,
    /// Blob key → the result's JSON text (uploads included).
    pub blobs: Mutex<HashMap<String, String>>,
    /// The most document bytes one `get_tasks_within` returned inflated.
    pub largest_read: AtomicUsize,
    /// Claims on tasks' runs, by task key (invariant S10).
    claims: Mutex<HashMap<String, Claim>>,
    /// The objects of saved groups whose result is a blob, by group key.
    group_blobs: Mutex<HashMap<String, BlobRef>>,
    /// The items of the chord join or the cache, and their faults.
    pub ext: X,
}

impl<X> MemoryStore<X> {
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.items.lock().unwrap().is_empty()
    }

    fn live(&self, key: &str) -> Option<(Option<Stored>, String)> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let items = self.items.lock().unwrap();
        items.get(key).filter(|(_, _, exp)| *exp > now_epoch()).map(|(s, doc, _)| (s.clone(), doc.clone()))
    }
}

impl<X: Send + Sync> ResultStore for MemoryStore<X> {
    async fn put_task(&self, ns: &Namespace, r: &TaskRecord) -> Result<PutOutcome, StoreError> {
        let mut items = self.items.lock().unwrap();
        let key = task_key(ns, &r.task_id);
        if let Some((Some(old), _, exp)) = items.get(&key) {
            let rerun = r.claim.as_ref().is_some_and(|c| c.rerun);
            let refused = *exp > now_epoch()
                && (old.status.as_str() == "SUCCESS" || (old.status.is_ready() && !r.status.is_ready() && !rerun));
            if refused {
                return Ok(PutOutcome::Refused { stored: old.status.to_string() });
            }
            let held = self.claims.lock().unwrap().get(&key).cloned();
            if let (Some(ours), Some(held), true) = (&r.claim, held, *exp > now_epoch()) {
                if held.token != ours.token && held.until_ms > crate::time::now_millis() {
                    return Ok(PutOutcome::Claimed { stored: old.status.to_string(), until_ms: held.until_ms });
                }
            }
        }
        // A store replaces the item: its claim, if any, is the new one.
        match &r.claim {
            Some(claim) => self.claims.lock().unwrap().insert(key.clone(), claim.clone()),
            None => self.claims.lock().unwrap().remove(&key),
        };
        let spill_above = self.spill_above.load(Ordering::SeqCst);
        let stored = if let Some(upload) = &r.upload {
            let key = super::blobs::object_key(ns, &r.task_id, &upload.sha256);
            let blobs = self.blobs.lock().unwrap();
            let sha = &upload.sha256;
            let result = blobs.get(&key).ok_or_else(|| StoreError::BadUpload(format!("no upload {sha}")))?;
            let blob = BlobRef { key, bytes: result.len() as u64, fields: upload.shape == Shape::Fields };
            Stored { status: r.status.clone(), json: r.json.clone(), blob: Some(blob) }
        } else if spill_above > 0 && r.json.len() > spill_above {
            let (meta, result) = crate::meta::split_result(&r.json, r.status.as_str()).expect("a meta as served");
            let key = super::blobs::object_key(ns, &r.task_id, &super::blobs::sha256_hex(result.as_bytes()));
            self.blobs.lock().unwrap().insert(key.clone(), result.to_owned());
            Stored { status: r.status.clone(), json: meta, blob: Some(BlobRef::result(key, result.len() as u64)) }
        } else {
            Stored::new(r.status.clone(), r.json.clone())
        };
        items.insert(key, (Some(stored), String::new(), r.expires_at));
        Ok(PutOutcome::Stored)
    }

    async fn get_task(&self, ns: &Namespace, id: &TaskId) -> Result<Option<Stored>, StoreError> {
        Ok(self.live(&task_key(ns, id)).and_then(|(s, _)| s))
    }

    async fn get_tasks(&self, ns: &Namespace, ids: &[TaskId]) -> Result<Vec<Option<Stored>>, StoreError> {
        Ok(ids.iter().map(|id| self.live(&task_key(ns, id)).and_then(|(s, _)| s)).collect())
    }

    async fn get_tasks_within(
        &self,
        ns: &Namespace,
        ids: &[TaskId],
        budget: usize,
    ) -> Result<Vec<Option<Within>>, StoreError> {
        let (mut left, mut inflated) = (Some(budget), 0);
        let read = self.get_tasks(ns, ids).await?.into_iter().map(|stored| {
            stored.map(|stored| match left {
                Some(room) if stored.json.len() <= room => {
                    left = Some(room - stored.json.len());
                    inflated += stored.json.len();
                    Within::Whole(stored)
                }
                _ => {
                    left = None;
                    Within::Over { bytes: stored.json.len() as u64, status: stored.status }
                }
            })
        });
        let read = read.collect();
        self.largest_read.fetch_max(inflated, Ordering::SeqCst);
        Ok(read)
    }

    async fn delete_task(&self, ns: &Namespace, id: &TaskId) -> Result<(), StoreError> {
        let old = self.items.lock().unwrap().remove(&task_key(ns, id));
        self.claims.lock().unwrap().remove(&task_key(ns, id));
        if let Some(blob) = old.and_then(|(stored, _, _)| stored?.blob) {
            self.blobs.lock().unwrap().remove(&blob.key);
        }
        Ok(())
    }

    async fn read_blob(&self, blob: &BlobRef) -> Result<Option<String>, StoreError> {
        Ok(self.blobs.lock().unwrap().get(&blob.key).cloned())
    }

    async fn blob_url(&self, blob: &BlobRef) -> Result<String, StoreError> {
        Ok(format!("memory:///{}", blob.key))
    }

    async fn upload_url(
        &self,
        item_key: &str,
        sha256: &str,
        _bytes: u64,
        _lifetime: i64,
    ) -> Result<Presigned, StoreError> {
        let key = super::blobs::object_key_under(item_key, sha256);
        Ok(Presigned { url: format!("memory:///{key}"), headers: vec![] })
    }

    async fn put_group(&self, ns: &Namespace, id: &GroupId, record: &GroupRecord) -> Result<(), StoreError> {
        let pk = group_key(ns, id);
        let spill_above = self.spill_above.load(Ordering::SeqCst);
        let blob = match &record.result {
            Payload::Uploaded { sha256 } => {
                let key = super::blobs::object_key_under(&pk, sha256);
                let blobs = self.blobs.lock().unwrap();
                let result = blobs.get(&key).ok_or_else(|| StoreError::BadUpload(format!("no upload {sha256}")))?;
                Some(BlobRef::result(key, result.len() as u64))
            }
            Payload::Json(result) if spill_above > 0 && result.len() > spill_above => {
                let key = super::blobs::object_key_under(&pk, &super::blobs::sha256_hex(result.as_bytes()));
                self.blobs.lock().unwrap().insert(key.clone(), result.clone());
                Some(BlobRef::result(key, result.len() as u64))
            }
            Payload::Json(_) => None,
        };
        let doc = match (&record.result, &blob) {
            (Payload::Json(result), None) => super::group_doc(result),
            _ => super::group_doc("null"),
        };
        self.items.lock().unwrap().insert(pk.clone(), (None, doc, record.expires_at));
        let old = match blob {
            Some(blob) => self.group_blobs.lock().unwrap().insert(pk, blob.clone()).filter(|old| old.key != blob.key),
            None => self.group_blobs.lock().unwrap().remove(&pk),
        };
        if let Some(old) = old {
            self.blobs.lock().unwrap().remove(&old.key);
        }
        Ok(())
    }

    async fn get_group(&self, ns: &Namespace, id: &GroupId) -> Result<Option<SavedGroup>, StoreError> {
        let pk = group_key(ns, id);
        let blob = self.group_blobs.lock().unwrap().get(&pk).cloned();
        Ok(self.live(&pk).map(|(_, json)| SavedGroup { json, blob }))
    }

    async fn delete_group(&self, ns: &Namespace, id: &GroupId) -> Result<(), StoreError> {
        let pk = group_key(ns, id);
        self.items.lock().unwrap().remove(&pk);
        if let Some(old) = self.group_blobs.lock().unwrap().remove(&pk) {
            self.blobs.lock().unwrap().remove(&old.key);
        }
        Ok(())
    }
}

/// A fault a test injects: while `failing` counts down, a call fails as if
/// DynamoDB were down.
pub fn injected(failing: &AtomicU32) -> Result<(), StoreError> {
    match failing.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
        Ok(_) => Err(StoreError::Unavailable("injected".into())),
        Err(_) => Ok(()),
    }
}
