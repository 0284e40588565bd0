//! The chord's items, as the join needs them: the [`ChordStore`] trait
//! over a chord's state item and its part items, implemented for DynamoDB
//! in `chord/dynamo.rs`. Every claim transition is conditional on the
//! claim's token, so an invocation that lost its claim changes nothing.

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::store::ResultStore;

/// A chord part as the store counts it: one part item per `group_index`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPart {
    pub index: u32,
    pub task_id: TaskId,
    /// The part's own expiry; the chord's items live at least as long.
    pub expires_at: i64,
    /// Whether the part failed (FAILURE or REVOKED).
    pub failed: bool,
    /// When the part's result was stored (epoch milliseconds), if its item
    /// says: a part a redrive removed from the count is counted again only
    /// from a result stored after that (a replayed record of its failure is not).
    pub stored_at: Option<i64>,
}

/// What the first counted part registers on the chord's state item (the
/// first writer's size and callback win).
#[derive(Debug, Clone, PartialEq)]
pub struct ChordRegistration {
    pub size: u32,
    /// The callback signature, as JSON text.
    pub callback: String,
    pub callback_id: String,
    /// The body's deadline, in seconds from the first part counted.
    pub deadline: Option<u32>,
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
    /// Its failed parts are being sent again (`POST /v1/chords/{id}/redrive`);
    /// it opens again once they are all out.
    Redriving,
}

impl ChordPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Joining => "joining",
            Self::Dispatched => "dispatched",
            Self::Failed => "failed",
            Self::Redriving => "redriving",
        }
    }

    /// A stored phase; anything unknown reads as `open` (the state a chord
    /// is registered in).
    pub fn parse(raw: &str) -> Self {
        match raw {
            "joining" => Self::Joining,
            "dispatched" => Self::Dispatched,
            "failed" => Self::Failed,
            "redriving" => Self::Redriving,
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
    /// Counted parts that failed (FAILURE or REVOKED).
    pub failed: u32,
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
    /// How many of the callback's messages, and of the errbacks, may have
    /// gone out: set by the re-check before each send ([`Sending`]).
    pub body_sending: u32,
    pub errbacks_sending: u32,
    /// The state item's expiry (epoch seconds).
    pub expires_at: i64,
    /// When the chord's first part was counted (epoch seconds); `None` for
    /// chords registered before it was kept.
    pub opened_at: Option<i64>,
    /// Redrives asked so far.
    pub redrives: u32,
    /// Failed parts the redrive under way sent in its last window (set
    /// with their un-counting, before the send).
    pub redrive_window: u32,
    /// Where the redrive under way sends the parts.
    pub redrive_to: RedriveTo,
    /// When the chord's deadline passes (epoch seconds), if its body has one.
    pub deadline_at: Option<i64>,
    /// Whether the message that wakes chord-join at the deadline was sent.
    pub deadline_armed: bool,
    /// When the chord was found open past its deadline (epoch seconds).
    pub stalled_at: Option<i64>,
}

/// Where a redrive sends a chord's failed parts: each to the queue its
/// result names (`queue`, with `result_extended`), with kombu's
/// `queue_name_prefix` if given, else the deployment's default queue; or
/// all of them to `queue`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedriveTo {
    pub queue: Option<String>,
    pub prefix: Option<String>,
}

impl RedriveTo {
    /// The queue a part goes to, from the queue its result names.
    pub fn queue_of(&self, stored: Option<&str>) -> Option<String> {
        if let Some(queue) = &self.queue {
            return Some(queue.clone());
        }
        let stored = stored.filter(|q| !q.is_empty())?;
        Some(format!("{}{stored}", self.prefix.as_deref().unwrap_or("")))
    }
}

impl ChordState {
    pub fn is_final(&self) -> bool {
        self.phase.is_final()
    }

    /// Counts every message that may have gone out as sent (a claim taken
    /// over from one that was sending never sends it again, invariant O5);
    /// returns how many were not recorded as sent.
    pub fn count_sending_as_sent(&mut self) -> u32 {
        let unsure =
            self.body_sending.saturating_sub(self.body_sent) + self.errbacks_sending.saturating_sub(self.errbacks_sent);
        self.body_sent = self.body_sent.max(self.body_sending);
        self.errbacks_sent = self.errbacks_sent.max(self.errbacks_sending);
        unsure
    }
}

/// What the re-check before a send records: the callback's messages, or
/// the errbacks, that may have gone out once the send is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sending {
    Body(u32),
    Errbacks(u32),
}

/// The chord operations of chord-join, over the chord's state item and part
/// items (see `chord/dynamo.rs` for DynamoDB). Every claim transition is
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
    /// The state item, read consistently; `None` until the chord's first
    /// part has been counted.
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
    /// lease ran out): the state as claimed. `None` when someone else holds
    /// it or it is final.
    fn claim_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<ChordState>, StoreError>> + Send;
    /// Re-checks the claim just before a send, renews its lease, and
    /// records what may have gone out once the send is made (`sending`):
    /// `false` when `token` no longer holds it.
    fn renew_claim(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
        sending: Sending,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Gives the claim back after a join that sent nothing more than it
    /// recorded (joining → open, only while `token` holds it): what may
    /// have gone out is what was recorded sent again, and the failed
    /// attempt is counted. Returns whether it applied.
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
    /// The task ids of the counted parts that failed, in `group_index`
    /// order, at most `limit` of them; and whether there are more.
    fn failed_part_ids(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<TaskId>, bool), StoreError>> + Send {
        async move {
            let mut failed = self.failed_parts(ns, gid, limit.saturating_add(1)).await?;
            let more = failed.len() > limit;
            failed.truncate(limit);
            Ok((failed.into_iter().map(|p| p.task_id).collect(), more))
        }
    }
    /// The counted parts that failed, in `group_index` order, at most `limit`.
    fn failed_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ChordPart>, StoreError>> + Send;
    /// Asks a redrive of a chord as `seen` (final, some parts failed):
    /// final → redriving, the join's progress and error cleared, `redrives`
    /// counted, `to` kept; `false` when the chord is no longer as seen (one write,
    /// so two callers never both start one).
    fn start_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        seen: &ChordState,
        to: &RedriveTo,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Claims a redriving chord with `token` and a lease (or takes over a
    /// claim whose lease ran out): the state as claimed, `None` when it is
    /// not redriving or someone else holds it.
    fn claim_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<ChordState>, StoreError>> + Send;
    /// While `token` holds the redrive: removes `parts` (failed) from the
    /// count, so their next results are counted, and records them as the
    /// window about to be sent, renewing the lease; one write, the
    /// re-check before their send. `false` when the claim was lost.
    fn uncount_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
        parts: &[ChordPart],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// While `token` holds the redrive: counts `parts` again as failed
    /// (their send surely did not go out).
    fn recount_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        parts: &[ChordPart],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Ends the redrive `token` holds: redriving → open; or, with `error`,
    /// → joining, still held by `token` with a fresh `lease`, failing with
    /// it (the caller fails the chord as a join does). The state after,
    /// `None` when the claim was lost.
    fn end_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        error: Option<&str>,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<ChordState>, StoreError>> + Send;
    /// Gives a redrive claim back, counting the attempt (the chord stays redriving).
    fn release_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Records that the deadline's wake-up message was sent.
    fn arm_deadline(&self, ns: &Namespace, gid: &GroupId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Records that the chord was found open (or redriving) past its
    /// deadline, once: `true` for the call that recorded it.
    fn mark_stalled(&self, ns: &Namespace, gid: &GroupId) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// open → joining with `token` and a lease, however many parts were
    /// counted: a chord failed at its deadline. `None` when it is not open.
    fn claim_stalled(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<ChordState>, StoreError>> + Send;
    /// The counted parts, in `group_index` order.
    fn counted_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
    ) -> impl Future<Output = Result<Vec<ChordPart>, StoreError>> + Send;
    /// The counted parts' task ids in `group_index` order.
    fn chord_part_ids(
        &self,
        ns: &Namespace,
        gid: &GroupId,
    ) -> impl Future<Output = Result<Vec<TaskId>, StoreError>> + Send {
        async move { Ok(self.counted_parts(ns, gid).await?.into_iter().map(|p| p.task_id).collect()) }
    }
}

/// The partition key of a chord's state and part items.
pub fn chord_key(ns: &Namespace, id: &GroupId) -> String {
    format!("{}/chord/{}", ns.as_str(), id)
}
