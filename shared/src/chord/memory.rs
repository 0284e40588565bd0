//! [`ChordStore`] on the in-memory store of the unit tests: the claim
//! transitions of `chord/dynamo.rs`, one lock each.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::store::{chord_key, ChordPart, ChordPhase, ChordRegistration, ChordState, ChordStore, RedriveTo, Sending};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace};
use crate::store::memory::{injected, MemoryStore};
use crate::time::now_epoch;

/// A chord's state item with its claim token and lease.
type Claimed = (ChordState, Option<String>, i64);

/// The chord's items in memory, and the faults a test injects.
#[derive(Default)]
pub struct Chords {
    /// Chord key → state item, token and lease.
    chords: Mutex<HashMap<String, Claimed>>,
    /// Chord key → counted parts by index.
    parts: Mutex<HashMap<String, BTreeMap<u32, ChordPart>>>,
    /// Chord key → parts a redrive removed from the count, by index, with
    /// when (epoch milliseconds): counted again only from a later result.
    redriven: Mutex<HashMap<String, BTreeMap<u32, i64>>>,
    /// Fault: this many coming `finish_chord` calls fail as if DynamoDB were down.
    pub fail_finishes: AtomicU32,
    /// How many coming `record_sent` calls fail as if DynamoDB were down.
    pub fail_records: AtomicU32,
    /// How many coming `record_failure` calls that record an errback sent
    /// (not the failure itself) fail as if DynamoDB were down.
    pub fail_errback_records: AtomicU32,
    /// Fault: every `renew_claim` finds the claim taken over.
    pub steal_claims: AtomicBool,
}

/// The in-memory store with the chord's items.
pub type MemoryChordStore = MemoryStore<Chords>;

impl MemoryChordStore {
    /// Applies `change` to the chord's state if `token` holds its claim.
    fn if_held(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        change: impl FnOnce(&mut ChordState, &mut i64),
    ) -> bool {
        let mut chords = self.ext.chords.lock().unwrap();
        match chords.get_mut(&chord_key(ns, gid)) {
            Some((state, Some(held), lease)) if state.phase == ChordPhase::Joining && held == token => {
                change(state, lease);
                true
            }
            _ => false,
        }
    }

    /// Ends every claim's lease now, as the death of its holder would.
    pub fn lapse_claims(&self) {
        for (_, _, until) in self.ext.chords.lock().unwrap().values_mut() {
            *until = now_epoch() - 1;
        }
    }

    /// Claims the chord with `token` and a lease when `free` says it may be
    /// claimed (given its state and whether a live lease holds it), moving
    /// it to `phase`: the state as claimed.
    fn claim_if(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
        free: impl FnOnce(&ChordState, bool) -> bool,
        phase: ChordPhase,
    ) -> Option<ChordState> {
        let now = now_epoch();
        let mut chords = self.ext.chords.lock().unwrap();
        let (state, held, until) = chords.get_mut(&chord_key(ns, gid))?;
        if !free(state, held.is_some() && *until >= now) {
            return None;
        }
        state.phase = phase;
        *held = Some(token.to_owned());
        *until = now + lease.as_secs() as i64;
        Some(state.clone())
    }

    /// Applies `change` to the chord's state if `token` holds its redrive.
    fn if_redriving(&self, ns: &Namespace, gid: &GroupId, token: &str, change: impl FnOnce(&mut Claimed)) -> bool {
        let mut chords = self.ext.chords.lock().unwrap();
        match chords.get_mut(&chord_key(ns, gid)) {
            Some(claimed) if claimed.0.phase == ChordPhase::Redriving && claimed.1.as_deref() == Some(token) => {
                change(claimed);
                true
            }
            _ => false,
        }
    }

    /// Moves every chord's deadline to the second before now.
    pub fn pass_deadlines(&self) {
        for (state, _, _) in self.ext.chords.lock().unwrap().values_mut() {
            state.deadline_at = state.deadline_at.map(|_| now_epoch() - 1);
        }
    }

    /// Forgets the chord's part items, as an expiry would.
    pub fn drop_parts(&self, ns: &Namespace, gid: &GroupId) {
        self.ext.parts.lock().unwrap().remove(&chord_key(ns, gid));
    }
}

impl ChordStore for MemoryChordStore {
    async fn count_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        chord: &ChordRegistration,
        parts: &[ChordPart],
    ) -> Result<u32, StoreError> {
        let key = chord_key(ns, gid);
        let mut all = self.ext.parts.lock().unwrap();
        let counted = all.entry(key.clone()).or_default();
        let mut redriven = self.ext.redriven.lock().unwrap();
        let redriven = redriven.entry(key.clone()).or_default();
        let (mut new, mut failed) = (0, 0);
        for part in parts {
            if let Some(at) = redriven.get(&part.index) {
                if part.stored_at.unwrap_or(0) <= *at {
                    continue;
                }
                redriven.remove(&part.index);
            }
            if let std::collections::btree_map::Entry::Vacant(e) = counted.entry(part.index) {
                e.insert(part.clone());
                new += 1;
                failed += u32::from(part.failed);
            }
        }
        let expires_at = parts.iter().map(|p| p.expires_at).max().unwrap_or(0);
        let mut chords = self.ext.chords.lock().unwrap();
        let entry = chords.entry(key).or_insert_with(|| {
            let state = ChordState {
                size: chord.size,
                done: 0,
                failed: 0,
                phase: ChordPhase::Open,
                callback: chord.callback.clone(),
                callback_id: chord.callback_id.clone(),
                error: None,
                attempts: 0,
                errbacks_sent: 0,
                body_sent: 0,
                body_sending: 0,
                errbacks_sending: 0,
                expires_at,
                opened_at: Some(now_epoch()),
                redrives: 0,
                redrive_window: 0,
                redrive_to: Default::default(),
                deadline_at: chord.deadline.map(|s| now_epoch() + i64::from(s)),
                deadline_armed: false,
                stalled_at: None,
            };
            (state, None, 0)
        });
        entry.0.done += new;
        entry.0.failed += failed;
        Ok(new)
    }

    async fn chord_state(&self, ns: &Namespace, gid: &GroupId) -> Result<Option<ChordState>, StoreError> {
        Ok(self.ext.chords.lock().unwrap().get(&chord_key(ns, gid)).map(|(state, _, _)| state.clone()))
    }

    async fn extend_chord(&self, ns: &Namespace, gid: &GroupId, expires_at: i64) -> Result<(), StoreError> {
        if let Some((state, _, _)) = self.ext.chords.lock().unwrap().get_mut(&chord_key(ns, gid)) {
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
    ) -> Result<Option<ChordState>, StoreError> {
        // A joining chord whose lease ran out may be taken over.
        let free = |state: &ChordState, live: bool| {
            state.done >= state.size
                && (state.phase == ChordPhase::Open || (state.phase == ChordPhase::Joining && !live))
        };
        Ok(self.claim_if(ns, gid, token, lease, free, ChordPhase::Joining))
    }

    async fn renew_claim(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
        sending: Sending,
    ) -> Result<bool, StoreError> {
        if self.ext.steal_claims.load(Ordering::SeqCst) {
            return Ok(false);
        }
        Ok(self.if_held(ns, gid, token, |state, until| {
            *until = now_epoch() + lease.as_secs() as i64;
            match sending {
                Sending::Body(count) => state.body_sending = count,
                Sending::Errbacks(count) => state.errbacks_sending = count,
            }
        }))
    }

    async fn release_chord(&self, ns: &Namespace, gid: &GroupId, token: &str) -> Result<bool, StoreError> {
        // The old token may stay: it only counts while the chord is joining,
        // and the next claim replaces it.
        Ok(self.if_held(ns, gid, token, |state, until| {
            state.phase = ChordPhase::Open;
            state.attempts += 1;
            state.body_sending = state.body_sent;
            state.errbacks_sending = state.errbacks_sent;
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
        if errbacks_sent > 0 {
            injected(&self.ext.fail_errback_records)?;
        }
        Ok(self.if_held(ns, gid, token, |state, _| {
            state.error = Some(error.to_owned());
            state.errbacks_sent = errbacks_sent;
        }))
    }

    async fn record_sent(&self, ns: &Namespace, gid: &GroupId, token: &str, sent: u32) -> Result<bool, StoreError> {
        injected(&self.ext.fail_records)?;
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
        injected(&self.ext.fail_finishes)?;
        Ok(self.if_held(ns, gid, token, |state, _| {
            state.phase = phase;
            state.error = error.map(str::to_owned);
        }))
    }

    async fn failed_parts(&self, ns: &Namespace, gid: &GroupId, limit: usize) -> Result<Vec<ChordPart>, StoreError> {
        let parts = self.ext.parts.lock().unwrap();
        let failed = parts.get(&chord_key(ns, gid)).into_iter().flat_map(|p| p.values().filter(|p| p.failed));
        Ok(failed.take(limit).cloned().collect())
    }

    async fn start_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        seen: &ChordState,
        to: &RedriveTo,
    ) -> Result<bool, StoreError> {
        let mut chords = self.ext.chords.lock().unwrap();
        let Some((state, held, _)) = chords.get_mut(&chord_key(ns, gid)) else { return Ok(false) };
        let same = (state.phase, state.done, state.failed, state.redrives)
            == (seen.phase, seen.done, seen.failed, seen.redrives);
        if !same {
            return Ok(false);
        }
        *state = ChordState {
            phase: ChordPhase::Redriving,
            error: None,
            attempts: 0,
            body_sent: 0,
            body_sending: 0,
            errbacks_sent: 0,
            errbacks_sending: 0,
            redrive_window: 0,
            redrives: state.redrives + 1,
            redrive_to: to.clone(),
            ..state.clone()
        };
        *held = None;
        Ok(true)
    }

    async fn claim_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> Result<Option<ChordState>, StoreError> {
        let free = |state: &ChordState, live: bool| state.phase == ChordPhase::Redriving && !live;
        Ok(self.claim_if(ns, gid, token, lease, free, ChordPhase::Redriving))
    }

    async fn uncount_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
        parts: &[ChordPart],
    ) -> Result<bool, StoreError> {
        let mut all = self.ext.parts.lock().unwrap();
        let counted = all.entry(chord_key(ns, gid)).or_default();
        if parts.iter().any(|p| !counted.get(&p.index).is_some_and(|c| c.failed)) {
            return Err(StoreError::Other("a redrive's parts changed under it".into()));
        }
        let held = self.if_redriving(ns, gid, token, |(state, _, until)| {
            state.done -= parts.len() as u32;
            state.failed -= parts.len() as u32;
            state.redrive_window = parts.len() as u32;
            *until = now_epoch() + lease.as_secs() as i64;
        });
        if held {
            let mut redriven = self.ext.redriven.lock().unwrap();
            let redriven = redriven.entry(chord_key(ns, gid)).or_default();
            for part in parts {
                counted.remove(&part.index);
                redriven.insert(part.index, crate::time::now_millis());
            }
        }
        Ok(held)
    }

    async fn recount_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        parts: &[ChordPart],
    ) -> Result<bool, StoreError> {
        let mut all = self.ext.parts.lock().unwrap();
        let counted = all.entry(chord_key(ns, gid)).or_default();
        let mut redriven = self.ext.redriven.lock().unwrap();
        let redriven = redriven.entry(chord_key(ns, gid)).or_default();
        if parts.iter().any(|p| counted.contains_key(&p.index) || !redriven.contains_key(&p.index)) {
            return Err(StoreError::Other("a redrive's parts changed under it".into()));
        }
        let held = self.if_redriving(ns, gid, token, |(state, _, _)| {
            state.done += parts.len() as u32;
            state.failed += parts.len() as u32;
        });
        if held {
            for part in parts {
                redriven.remove(&part.index);
                counted.insert(part.index, ChordPart { failed: true, ..part.clone() });
            }
        }
        Ok(held)
    }

    async fn end_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        error: Option<&str>,
        lease: Duration,
    ) -> Result<Option<ChordState>, StoreError> {
        let mut ended = None;
        self.if_redriving(ns, gid, token, |(state, held, until)| {
            state.redrive_window = 0;
            match error {
                Some(error) => {
                    state.phase = ChordPhase::Joining;
                    state.error = Some(error.to_owned());
                    *until = now_epoch() + lease.as_secs() as i64;
                }
                None => {
                    state.phase = ChordPhase::Open;
                    (*held, *until) = (None, 0);
                }
            }
            ended = Some(state.clone());
        });
        Ok(ended)
    }

    async fn release_redrive(&self, ns: &Namespace, gid: &GroupId, token: &str) -> Result<bool, StoreError> {
        Ok(self.if_redriving(ns, gid, token, |(state, held, until)| {
            state.attempts += 1;
            (*held, *until) = (None, 0);
        }))
    }

    async fn arm_deadline(&self, ns: &Namespace, gid: &GroupId) -> Result<(), StoreError> {
        if let Some((state, _, _)) = self.ext.chords.lock().unwrap().get_mut(&chord_key(ns, gid)) {
            state.deadline_armed = true;
        }
        Ok(())
    }

    async fn mark_stalled(&self, ns: &Namespace, gid: &GroupId) -> Result<bool, StoreError> {
        let mut chords = self.ext.chords.lock().unwrap();
        let Some((state, _, _)) = chords.get_mut(&chord_key(ns, gid)) else { return Ok(false) };
        let open = matches!(state.phase, ChordPhase::Open | ChordPhase::Redriving);
        if state.stalled_at.is_some() || !open {
            return Ok(false);
        }
        state.stalled_at = Some(now_epoch());
        Ok(true)
    }

    async fn claim_stalled(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> Result<Option<ChordState>, StoreError> {
        let free = |state: &ChordState, _live: bool| state.phase == ChordPhase::Open;
        Ok(self.claim_if(ns, gid, token, lease, free, ChordPhase::Joining))
    }

    async fn counted_parts(&self, ns: &Namespace, gid: &GroupId) -> Result<Vec<ChordPart>, StoreError> {
        let parts = self.ext.parts.lock().unwrap();
        Ok(parts.get(&chord_key(ns, gid)).map(|p| p.values().cloned().collect()).unwrap_or_default())
    }
}
