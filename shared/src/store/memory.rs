//! An in-memory [`ResultStore`] and [`ChordStore`] for unit tests of the
//! service layer and the chord join. It mirrors the DynamoDB write condition
//! (see `dynamo::write_condition`) and the claim transitions (see
//! `chords.rs`); the integration suite checks the real ones. Faults are
//! injected through its public fields.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::{
    chord_key, group_key, task_key, BlobRef, ChordPart, ChordPhase, ChordRegistration, ChordState, ChordStore,
    Presigned, PutOutcome, ResultStore, Stored, TaskRecord,
};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::time::now_epoch;

/// A stored task or group: its status (tasks), document and expiry.
type Entry = (Option<Stored>, String, i64);
/// A chord's state item with its claim token and lease.
type Claimed = (ChordState, Option<String>, i64);

#[derive(Default)]
pub struct MemoryStore {
    items: Mutex<HashMap<String, Entry>>,
    reads: AtomicUsize,
    /// Chord key → state item, token and lease.
    chords: Mutex<HashMap<String, Claimed>>,
    /// Chord key → counted parts by index.
    parts: Mutex<HashMap<String, BTreeMap<u32, ChordPart>>>,
    /// Fault: this many coming `finish_chord` calls fail as if DynamoDB were down.
    pub fail_finishes: AtomicU32,
    /// How many coming `record_sent` calls fail as if DynamoDB were down.
    pub fail_records: AtomicU32,
    /// How many coming `record_failure` calls that record an errback sent
    /// (not the failure itself) fail as if DynamoDB were down.
    pub fail_errback_records: AtomicU32,
    /// Fault: every `renew_claim` finds the claim taken over.
    pub steal_claims: AtomicBool,
    /// Results whose meta is longer than this (0: none) are kept as blobs,
    /// as the DynamoDB store keeps large results in S3.
    pub spill_above: AtomicUsize,
    /// Blob key → the result's JSON text (uploads included).
    pub blobs: Mutex<HashMap<String, String>>,
}

impl MemoryStore {
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

impl ResultStore for MemoryStore {
    async fn put_task(&self, ns: &Namespace, r: &TaskRecord) -> Result<PutOutcome, StoreError> {
        let mut items = self.items.lock().unwrap();
        let key = task_key(ns, &r.task_id);
        if let Some((Some(old), _, exp)) = items.get(&key) {
            let refused = *exp > now_epoch()
                && (old.status.as_str() == "SUCCESS" || (old.status.is_ready() && !r.status.is_ready()));
            if refused {
                return Ok(PutOutcome::Refused { stored: old.status.to_string() });
            }
        }
        let spill_above = self.spill_above.load(Ordering::SeqCst);
        let stored = if let Some(sha) = &r.upload {
            let key = super::blobs::object_key(ns, &r.task_id, sha);
            let blobs = self.blobs.lock().unwrap();
            let result = blobs.get(&key).ok_or_else(|| StoreError::BadUpload(format!("no upload {sha}")))?;
            Stored {
                status: r.status.clone(),
                json: r.json.clone(),
                blob: Some(BlobRef { key, bytes: result.len() as u64 }),
            }
        } else if spill_above > 0 && r.json.len() > spill_above {
            let (meta, result) = crate::meta::split_result(&r.json, r.status.as_str()).expect("a meta as served");
            let key = super::blobs::object_key(ns, &r.task_id, &super::blobs::sha256_hex(result.as_bytes()));
            self.blobs.lock().unwrap().insert(key.clone(), result.to_owned());
            Stored { status: r.status.clone(), json: meta, blob: Some(BlobRef { key, bytes: result.len() as u64 }) }
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

    async fn delete_task(&self, ns: &Namespace, id: &TaskId) -> Result<(), StoreError> {
        let old = self.items.lock().unwrap().remove(&task_key(ns, id));
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
        ns: &Namespace,
        id: &TaskId,
        sha256: &str,
        _bytes: u64,
        _lifetime: i64,
    ) -> Result<Presigned, StoreError> {
        let key = super::blobs::object_key(ns, id, sha256);
        Ok(Presigned { url: format!("memory:///{key}"), headers: vec![] })
    }

    async fn put_group(&self, ns: &Namespace, id: &GroupId, json: &str, expires_at: i64) -> Result<(), StoreError> {
        self.items.lock().unwrap().insert(group_key(ns, id), (None, json.to_owned(), expires_at));
        Ok(())
    }

    async fn get_group(&self, ns: &Namespace, id: &GroupId) -> Result<Option<String>, StoreError> {
        Ok(self.live(&group_key(ns, id)).map(|(_, doc)| doc))
    }

    async fn delete_group(&self, ns: &Namespace, id: &GroupId) -> Result<(), StoreError> {
        self.items.lock().unwrap().remove(&group_key(ns, id));
        Ok(())
    }

    async fn get_chord(&self, ns: &Namespace, id: &GroupId) -> Result<Option<ChordState>, StoreError> {
        self.chord_state(ns, id).await
    }
}

impl MemoryStore {
    /// Applies `change` to the chord's state if `token` holds its claim.
    fn if_held(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        change: impl FnOnce(&mut ChordState, &mut i64),
    ) -> bool {
        let mut chords = self.chords.lock().unwrap();
        match chords.get_mut(&chord_key(ns, gid)) {
            Some((state, Some(held), lease)) if state.phase == ChordPhase::Joining && held == token => {
                change(state, lease);
                true
            }
            _ => false,
        }
    }

    /// Forgets the chord's part items, as an expiry would.
    pub fn drop_parts(&self, ns: &Namespace, gid: &GroupId) {
        self.parts.lock().unwrap().remove(&chord_key(ns, gid));
    }
}

impl ChordStore for MemoryStore {
    async fn count_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        chord: &ChordRegistration,
        parts: &[ChordPart],
    ) -> Result<u32, StoreError> {
        let key = chord_key(ns, gid);
        let mut all = self.parts.lock().unwrap();
        let counted = all.entry(key.clone()).or_default();
        let mut new = 0;
        for part in parts {
            if let std::collections::btree_map::Entry::Vacant(e) = counted.entry(part.index) {
                e.insert(part.clone());
                new += 1;
            }
        }
        let expires_at = parts.iter().map(|p| p.expires_at).max().unwrap_or(0);
        let mut chords = self.chords.lock().unwrap();
        let entry = chords.entry(key).or_insert_with(|| {
            let state = ChordState {
                size: chord.size,
                done: 0,
                phase: ChordPhase::Open,
                callback: chord.callback.clone(),
                callback_id: chord.callback_id.clone(),
                error: None,
                attempts: 0,
                errbacks_sent: 0,
                body_sent: 0,
                expires_at,
            };
            (state, None, 0)
        });
        entry.0.done += new;
        Ok(new)
    }

    async fn chord_state(&self, ns: &Namespace, gid: &GroupId) -> Result<Option<ChordState>, StoreError> {
        Ok(self.chords.lock().unwrap().get(&chord_key(ns, gid)).map(|(state, _, _)| state.clone()))
    }

    async fn extend_chord(&self, ns: &Namespace, gid: &GroupId, expires_at: i64) -> Result<(), StoreError> {
        if let Some((state, _, _)) = self.chords.lock().unwrap().get_mut(&chord_key(ns, gid)) {
            state.expires_at = state.expires_at.max(expires_at);
        }
        Ok(())
    }

    async fn claim_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = now_epoch();
        let mut chords = self.chords.lock().unwrap();
        let Some((state, held, until)) = chords.get_mut(&chord_key(ns, gid)) else { return Ok(false) };
        let free = state.phase == ChordPhase::Open || (state.phase == ChordPhase::Joining && *until < now);
        if state.done < state.size || !free {
            return Ok(false);
        }
        state.phase = ChordPhase::Joining;
        *held = Some(token.to_owned());
        *until = now + lease.as_secs() as i64;
        Ok(true)
    }

    async fn renew_claim(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        if self.steal_claims.load(Ordering::SeqCst) {
            return Ok(false);
        }
        Ok(self.if_held(ns, gid, token, |_, until| *until = now_epoch() + lease.as_secs() as i64))
    }

    async fn release_chord(&self, ns: &Namespace, gid: &GroupId, token: &str) -> Result<bool, StoreError> {
        // The old token may stay: it only counts while the chord is joining,
        // and the next claim replaces it.
        Ok(self.if_held(ns, gid, token, |state, until| {
            state.phase = ChordPhase::Open;
            state.attempts += 1;
            *until = 0;
        }))
    }

    async fn record_failure(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        error: &str,
        errbacks_sent: u32,
    ) -> Result<bool, StoreError> {
        let failing = self.fail_errback_records.load(Ordering::SeqCst);
        if failing > 0 && errbacks_sent > 0 {
            self.fail_errback_records.store(failing - 1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected".into()));
        }
        Ok(self.if_held(ns, gid, token, |state, _| {
            state.error = Some(error.to_owned());
            state.errbacks_sent = errbacks_sent;
        }))
    }

    async fn record_sent(&self, ns: &Namespace, gid: &GroupId, token: &str, sent: u32) -> Result<bool, StoreError> {
        let failing = self.fail_records.load(Ordering::SeqCst);
        if failing > 0 {
            self.fail_records.store(failing - 1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected".into()));
        }
        Ok(self.if_held(ns, gid, token, |state, _| state.body_sent = sent))
    }

    async fn finish_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        phase: ChordPhase,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let failing = self.fail_finishes.load(Ordering::SeqCst);
        if failing > 0 {
            self.fail_finishes.store(failing - 1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected".into()));
        }
        Ok(self.if_held(ns, gid, token, |state, _| {
            state.phase = phase;
            state.error = error.map(str::to_owned);
        }))
    }

    async fn chord_part_ids(&self, ns: &Namespace, gid: &GroupId) -> Result<Vec<TaskId>, StoreError> {
        let parts = self.parts.lock().unwrap();
        Ok(parts.get(&chord_key(ns, gid)).map(|p| p.values().map(|p| p.task_id.clone()).collect()).unwrap_or_default())
    }
}
