//! The chord's items in DynamoDB: one state item (`size`, `done`, `state`,
//! callback, claim token and lease) and one item per counted part, under the
//! chord's key: [`ChordStore`] on DynamoDB. See [`super`] for the join
//! built on them.

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use std::collections::BTreeMap;
use std::time::Duration;

use super::store::{chord_key, ChordPart, ChordPhase, ChordRegistration, ChordState, ChordStore, RedriveTo, Sending};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::store::dynamo::DynamoStore;
use crate::store::item::{get_n, get_s, key, n, s, Item};
use crate::store::retry::classify;
use crate::store::schema::{attr, SK_CHORD_STATE, SK_PART_PREFIX};
use crate::time::now_epoch;

/// Parts per transaction: DynamoDB allows 100 actions, one is the counter.
pub const PARTS_PER_TRANSACTION: usize = 99;

fn part_sk(index: u32) -> String {
    format!("{SK_PART_PREFIX}{index:010}")
}

fn transaction_error(
    e: &aws_sdk_dynamodb::error::SdkError<TransactWriteItemsError, aws_smithy_runtime_api::http::Response>,
) -> Option<Vec<Option<String>>> {
    match e.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
            Some(c.cancellation_reasons().iter().map(|r| r.code().map(str::to_owned)).collect())
        }
        _ => None,
    }
}

/// The counting transaction's update of the chord's state item: registers
/// the chord on first use, and adds the parts (and the failed among them)
/// to its counts.
fn count_update(
    table: &str,
    pk: &str,
    chord: &ChordRegistration,
    parts: &[&ChordPart],
    expires_at: i64,
) -> Result<TransactWriteItem, StoreError> {
    let deadline = if chord.deadline.is_some() { ", #deadline = if_not_exists(#deadline, :deadline)" } else { "" };
    let mut update = Update::builder()
        .table_name(table)
        .set_key(Some(key(pk, SK_CHORD_STATE)))
        .update_expression(format!(
            "SET #size = if_not_exists(#size, :size), #cb = if_not_exists(#cb, :cb), \
             #cbid = if_not_exists(#cbid, :cbid), #state = if_not_exists(#state, :open), \
             #exp = if_not_exists(#exp, :exp), #opened = if_not_exists(#opened, :now){deadline} ADD #done :k, #failed :f",
        ))
        .expression_attribute_names("#size", attr::SIZE)
        .expression_attribute_names("#cb", attr::CALLBACK)
        .expression_attribute_names("#cbid", attr::CALLBACK_ID)
        .expression_attribute_names("#state", attr::STATE)
        .expression_attribute_names("#exp", attr::EXPIRES_AT)
        .expression_attribute_names("#done", attr::DONE)
        .expression_attribute_names("#failed", attr::FAILED)
        .expression_attribute_names("#opened", attr::OPENED_AT)
        .expression_attribute_values(":now", n(now_epoch()))
        .expression_attribute_values(":size", n(chord.size))
        .expression_attribute_values(":cb", s(chord.callback.clone()))
        .expression_attribute_values(":cbid", s(chord.callback_id.clone()))
        .expression_attribute_values(":open", s(ChordPhase::Open.as_str()))
        .expression_attribute_values(":exp", n(expires_at))
        .expression_attribute_values(":k", n(parts.len()))
        .expression_attribute_values(":f", n(parts.iter().filter(|p| p.failed).count()));
    if let Some(seconds) = chord.deadline {
        update = update
            .expression_attribute_names("#deadline", attr::DEADLINE_AT)
            .expression_attribute_values(":deadline", n(now_epoch() + i64::from(seconds)));
    }
    let update = update.build().map_err(|e| StoreError::Other(e.to_string()))?;
    Ok(TransactWriteItem::builder().update(update).build())
}

impl DynamoStore {
    async fn count_chunk(
        &self,
        pk: &str,
        chord: &ChordRegistration,
        mut parts: Vec<&ChordPart>,
    ) -> Result<u32, StoreError> {
        let backoff = self.backoff();
        let mut attempt = 0;
        while !parts.is_empty() {
            attempt += 1;
            // An hour past the newest part: later parts of that hour need no extension.
            let expires_at = parts.iter().map(|p| p.expires_at).max().unwrap_or(0).max(now_epoch()) + 3600;
            let mut actions = Vec::with_capacity(parts.len() + 1);
            for part in &parts {
                let mut item = key(pk, &part_sk(part.index));
                item.insert(attr::TASK_ID.into(), s(part.task_id.as_str()));
                item.insert(attr::EXPIRES_AT.into(), n(expires_at));
                if part.failed {
                    item.insert(attr::FAILED.into(), AttributeValue::Bool(true));
                }
                // New, or removed from the count by a redrive before this result was stored.
                let put = Put::builder()
                    .table_name(self.table())
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(#pk) OR #redriven < :stored")
                    .expression_attribute_names("#pk", attr::PK)
                    .expression_attribute_names("#redriven", attr::REDRIVEN_AT)
                    .expression_attribute_values(":stored", n(part.stored_at.unwrap_or(0)))
                    .build()
                    .map_err(|e| StoreError::Other(e.to_string()))?;
                actions.push(TransactWriteItem::builder().put(put).build());
            }
            actions.push(count_update(self.table(), pk, chord, &parts, expires_at)?);
            match self.client().transact_write_items().set_transact_items(Some(actions)).send().await {
                Ok(_) => return Ok(parts.len() as u32),
                Err(err) => {
                    let Some(reasons) = transaction_error(&err) else {
                        return Err(classify(err, self.attempts()));
                    };
                    let counted_before: Vec<bool> =
                        reasons.iter().map(|r| r.as_deref() == Some("ConditionalCheckFailed")).collect();
                    if counted_before.iter().any(|&c| c) {
                        // Drop the parts that were already counted; try the rest at once.
                        let mut i = 0;
                        parts.retain(|_| {
                            let keep = !counted_before.get(i).copied().unwrap_or(false);
                            i += 1;
                            keep
                        });
                        continue;
                    }
                    // A conflicting transaction on the same state item (another
                    // invocation counting this chord): back off and try again.
                    if attempt >= backoff.max_attempts {
                        return Err(StoreError::Throttled { attempts: attempt });
                    }
                    tokio::time::sleep(backoff.delay(attempt)).await;
                }
            }
        }
        Ok(0)
    }

    /// An update of the chord's state item that names its state and claim
    /// token (`#state`, `#token`, `:token`, `:joining`); every claim
    /// transition uses them. DynamoDB refuses names an update does not use,
    /// so `#lease` is added by the transitions that touch the lease.
    fn update_claim(&self, ns: &Namespace, gid: &GroupId, token: &str) -> UpdateItemFluentBuilder {
        self.client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(key(chord_key(ns, gid), SK_CHORD_STATE)))
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#token", attr::TOKEN)
            .expression_attribute_values(":token", s(token))
            .expression_attribute_values(":joining", s(ChordPhase::Joining.as_str()))
    }

    /// Sends a conditional update: `true` if it applied, `false` if its
    /// condition did not hold.
    async fn send_conditional(&self, request: UpdateItemFluentBuilder) -> Result<bool, StoreError> {
        self.applied(request.send().await)
    }

    /// Sends a conditional update of the state item: the state after it,
    /// `None` if its condition did not hold.
    async fn send_for_state(&self, request: UpdateItemFluentBuilder) -> Result<Option<ChordState>, StoreError> {
        let request = request.return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew);
        let written = self.written(request.send().await)?;
        Ok(written.map(|out| state_of(&out.attributes.unwrap_or_default())))
    }
}

impl DynamoStore {
    /// The counted parts in `group_index` order (only the failed ones,
    /// with `failed`), at most `limit`; and whether there are more.
    async fn parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        failed: bool,
        limit: usize,
    ) -> Result<(Vec<ChordPart>, bool), StoreError> {
        let mut parts = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut query = self
                .client()
                .query()
                .table_name(self.table())
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :part)")
                .expression_attribute_names("#pk", attr::PK)
                .expression_attribute_names("#sk", attr::SK)
                .expression_attribute_values(":pk", s(chord_key(ns, gid)))
                .expression_attribute_values(":part", s(SK_PART_PREFIX))
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            if failed {
                query = query
                    .filter_expression("#failed = :yes")
                    .expression_attribute_names("#failed", attr::FAILED)
                    .expression_attribute_values(":yes", AttributeValue::Bool(true));
            }
            let out = query.send().await.map_err(|e| classify(e, self.attempts()))?;
            for item in out.items.unwrap_or_default() {
                if parts.len() == limit {
                    return Ok((parts, true));
                }
                if let Some(part) = part_of_item(&item) {
                    parts.push(part);
                }
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok((parts, false)),
            }
        }
    }

    /// An update of a redriving chord's state item that names its state and
    /// claim token (`#state`, `#token`, `:token`, `:redriving`).
    fn update_redrive(&self, ns: &Namespace, gid: &GroupId, token: &str) -> UpdateItemFluentBuilder {
        self.client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(key(chord_key(ns, gid), SK_CHORD_STATE)))
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#token", attr::TOKEN)
            .expression_attribute_values(":token", s(token))
            .expression_attribute_values(":redriving", s(ChordPhase::Redriving.as_str()))
    }

    /// One transaction over a redrive's window of parts and the chord's
    /// state item, the state's update conditional on the claim: `false`
    /// when the claim was lost.
    async fn redrive_transaction(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        parts: Vec<TransactWriteItem>,
        state: Update,
    ) -> Result<bool, StoreError> {
        let mut actions = parts;
        actions.push(TransactWriteItem::builder().update(state).build());
        let last = actions.len() - 1;
        match self.client().transact_write_items().set_transact_items(Some(actions)).send().await {
            Ok(_) => Ok(true),
            Err(err) => match transaction_error(&err) {
                Some(reasons) if reasons.get(last).and_then(|r| r.as_deref()) == Some("ConditionalCheckFailed") => {
                    tracing::warn!(chord = %gid, ns = %ns.as_str(), token, "the redrive's claim was lost");
                    Ok(false)
                }
                Some(reasons) => Err(StoreError::Other(format!("a redrive's parts changed under it: {reasons:?}"))),
                None => Err(classify(err, self.attempts())),
            },
        }
    }

    /// The state item's update of a redrive's window: `done` and `failed`
    /// moved by `delta`, under the claim; `set` adds to the SET clause.
    fn redrive_count(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        delta: i64,
        set: Option<(&str, AttributeValue, &str, AttributeValue)>,
    ) -> Result<Update, StoreError> {
        let mut update = Update::builder()
            .table_name(self.table())
            .set_key(Some(key(chord_key(ns, gid), SK_CHORD_STATE)))
            .condition_expression(HELD_REDRIVE)
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#token", attr::TOKEN)
            .expression_attribute_names("#done", attr::DONE)
            .expression_attribute_names("#failed", attr::FAILED)
            .expression_attribute_values(":token", s(token))
            .expression_attribute_values(":redriving", s(ChordPhase::Redriving.as_str()))
            .expression_attribute_values(":delta", n(delta));
        update = match set {
            Some((a, av, b, bv)) => update
                .update_expression("SET #a = :a, #b = :b ADD #done :delta, #failed :delta")
                .expression_attribute_names("#a", a)
                .expression_attribute_values(":a", av)
                .expression_attribute_names("#b", b)
                .expression_attribute_values(":b", bv),
            None => update.update_expression("ADD #done :delta, #failed :delta"),
        };
        update.build().map_err(|e| StoreError::Other(e.to_string()))
    }
}

/// A part item as the join reads it; `None` for one a redrive removed
/// from the count.
fn part_of_item(item: &Item) -> Option<ChordPart> {
    if item.contains_key(attr::REDRIVEN_AT) {
        return None;
    }
    let index = get_s(item, attr::SK)?.strip_prefix(SK_PART_PREFIX)?.parse().ok()?;
    Some(ChordPart {
        index,
        task_id: TaskId::parse(&get_s(item, attr::TASK_ID)?).ok()?,
        expires_at: get_n(item, attr::EXPIRES_AT).unwrap_or(0),
        failed: matches!(item.get(attr::FAILED), Some(AttributeValue::Bool(true))),
        stored_at: None,
    })
}

/// A chord's state item as the join reads it.
fn state_of(item: &Item) -> ChordState {
    let count = |name| get_n(item, name).unwrap_or(0) as u32;
    ChordState {
        size: count(attr::SIZE),
        done: count(attr::DONE),
        failed: count(attr::FAILED),
        phase: ChordPhase::parse(&get_s(item, attr::STATE).unwrap_or_default()),
        callback: get_s(item, attr::CALLBACK).unwrap_or_default(),
        callback_id: get_s(item, attr::CALLBACK_ID).unwrap_or_default(),
        error: get_s(item, attr::ERROR),
        attempts: count(attr::ATTEMPTS),
        errbacks_sent: count(attr::ERRBACKS_SENT),
        body_sent: count(attr::BODY_SENT),
        body_sending: count(attr::BODY_SENDING),
        errbacks_sending: count(attr::ERRBACKS_SENDING),
        expires_at: get_n(item, attr::EXPIRES_AT).unwrap_or(0),
        opened_at: get_n(item, attr::OPENED_AT),
        redrives: count(attr::REDRIVES),
        redrive_window: count(attr::REDRIVE_WINDOW),
        deadline_at: get_n(item, attr::DEADLINE_AT),
        deadline_armed: matches!(item.get(attr::DEADLINE_ARMED), Some(AttributeValue::Bool(true))),
        stalled_at: get_n(item, attr::STALLED_AT),
        redrive_to: RedriveTo {
            queue: get_s(item, attr::REDRIVE_QUEUE).filter(|q| !q.is_empty()),
            prefix: get_s(item, attr::REDRIVE_PREFIX).filter(|p| !p.is_empty()),
        },
    }
}

/// A lease of `lease` from now (a second at least), as stored.
fn lease_until(lease: Duration) -> AttributeValue {
    n(now_epoch() + lease.as_secs().max(1) as i64)
}

/// The condition every transition of a held claim shares.
const HELD: &str = "#state = :joining AND #token = :token";
/// The same for a held redrive.
const HELD_REDRIVE: &str = "#state = :redriving AND #token = :token";

impl ChordStore for DynamoStore {
    /// Per chunk of 99, one transaction puts the part items
    /// (`attribute_not_exists`) and adds their number to `done`, registering
    /// the chord on first use. Parts already counted are dropped from a
    /// cancelled transaction and the rest tried again.
    async fn count_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        chord: &ChordRegistration,
        parts: &[ChordPart],
    ) -> Result<u32, StoreError> {
        let pk = chord_key(ns, gid);
        // One action per item in a transaction: a batch may hold a part twice.
        let unique: BTreeMap<u32, &ChordPart> = parts.iter().map(|p| (p.index, p)).collect();
        let unique: Vec<&ChordPart> = unique.into_values().collect();
        let mut counted = 0;
        for chunk in unique.chunks(PARTS_PER_TRANSACTION) {
            counted += self.count_chunk(&pk, chord, chunk.to_vec()).await?;
        }
        Ok(counted)
    }

    async fn chord_state(&self, ns: &Namespace, gid: &GroupId) -> Result<Option<ChordState>, StoreError> {
        let item = self.get_item_at(chord_key(ns, gid), SK_CHORD_STATE).await?;
        Ok(item.as_ref().map(state_of))
    }

    async fn extend_chord(&self, ns: &Namespace, gid: &GroupId, expires_at: i64) -> Result<(), StoreError> {
        let request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(key(chord_key(ns, gid), SK_CHORD_STATE)))
            .update_expression("SET #exp = :exp")
            .condition_expression("attribute_exists(#exp) AND #exp < :exp")
            .expression_attribute_names("#exp", attr::EXPIRES_AT)
            .expression_attribute_values(":exp", n(expires_at));
        // Already as late (or later): nothing to do.
        self.send_conditional(request).await.map(|_| ())
    }

    async fn claim_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> Result<Option<ChordState>, StoreError> {
        let now = now_epoch();
        let request = self
            .update_claim(ns, gid, token)
            .update_expression("SET #state = :joining, #token = :token, #lease = :lease")
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .condition_expression("#done >= #size AND (#state = :open OR (#state = :joining AND #lease < :now))")
            .expression_attribute_names("#done", attr::DONE)
            .expression_attribute_names("#size", attr::SIZE)
            .expression_attribute_values(":open", s(ChordPhase::Open.as_str()))
            .expression_attribute_values(":lease", lease_until(lease))
            .expression_attribute_values(":now", n(now));
        self.send_for_state(request).await
    }

    async fn renew_claim(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
        sending: Sending,
    ) -> Result<bool, StoreError> {
        let (name, count) = match sending {
            Sending::Body(count) => (attr::BODY_SENDING, count),
            Sending::Errbacks(count) => (attr::ERRBACKS_SENDING, count),
        };
        let request = self
            .update_claim(ns, gid, token)
            .update_expression("SET #lease = :lease, #sending = :sending")
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_names("#sending", name)
            .condition_expression(HELD)
            .expression_attribute_values(":lease", lease_until(lease))
            .expression_attribute_values(":sending", n(count));
        self.send_conditional(request).await
    }

    async fn release_chord(&self, ns: &Namespace, gid: &GroupId, token: &str) -> Result<bool, StoreError> {
        let request = self
            .update_claim(ns, gid, token)
            .update_expression(
                "SET #state = :open, #bsending = if_not_exists(#bsent, :zero), \
                 #esending = if_not_exists(#esent, :zero) REMOVE #token, #lease ADD #attempts :one",
            )
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .condition_expression(HELD)
            .expression_attribute_names("#attempts", attr::ATTEMPTS)
            .expression_attribute_names("#bsending", attr::BODY_SENDING)
            .expression_attribute_names("#bsent", attr::BODY_SENT)
            .expression_attribute_names("#esending", attr::ERRBACKS_SENDING)
            .expression_attribute_names("#esent", attr::ERRBACKS_SENT)
            .expression_attribute_values(":open", s(ChordPhase::Open.as_str()))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1));
        self.send_conditional(request).await
    }

    async fn record_failure(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        error: &str,
        errbacks_sent: u32,
    ) -> Result<bool, StoreError> {
        let request = self
            .update_claim(ns, gid, token)
            .update_expression("SET #error = :error, #sent = :sent")
            .condition_expression(HELD)
            .expression_attribute_names("#error", attr::ERROR)
            .expression_attribute_names("#sent", attr::ERRBACKS_SENT)
            .expression_attribute_values(":error", s(error))
            .expression_attribute_values(":sent", n(errbacks_sent));
        self.send_conditional(request).await
    }

    async fn record_sent(&self, ns: &Namespace, gid: &GroupId, token: &str, sent: u32) -> Result<bool, StoreError> {
        let request = self
            .update_claim(ns, gid, token)
            .update_expression("SET #sent = :sent")
            .condition_expression(HELD)
            .expression_attribute_names("#sent", attr::BODY_SENT)
            .expression_attribute_values(":sent", n(sent));
        self.send_conditional(request).await
    }

    async fn finish_chord(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        phase: ChordPhase,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut request = self
            .update_claim(ns, gid, token)
            .condition_expression(HELD)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_values(":phase", s(phase.as_str()));
        request = match error {
            Some(error) => request
                .update_expression("SET #state = :phase, #error = :error REMOVE #lease")
                .expression_attribute_names("#error", attr::ERROR)
                .expression_attribute_values(":error", s(error)),
            None => request.update_expression("SET #state = :phase REMOVE #lease"),
        };
        self.send_conditional(request).await
    }

    async fn arm_deadline(&self, ns: &Namespace, gid: &GroupId) -> Result<(), StoreError> {
        let request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(key(chord_key(ns, gid), SK_CHORD_STATE)))
            .update_expression("SET #armed = :yes")
            .condition_expression("attribute_exists(#armed) OR attribute_exists(#deadline)")
            .expression_attribute_names("#armed", attr::DEADLINE_ARMED)
            .expression_attribute_names("#deadline", attr::DEADLINE_AT)
            .expression_attribute_values(":yes", AttributeValue::Bool(true));
        self.send_conditional(request).await.map(|_| ())
    }

    async fn mark_stalled(&self, ns: &Namespace, gid: &GroupId) -> Result<bool, StoreError> {
        let request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(key(chord_key(ns, gid), SK_CHORD_STATE)))
            .update_expression("SET #stalled = :now")
            .condition_expression("attribute_not_exists(#stalled) AND (#state = :open OR #state = :redriving)")
            .expression_attribute_names("#stalled", attr::STALLED_AT)
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_values(":now", n(now_epoch()))
            .expression_attribute_values(":open", s(ChordPhase::Open.as_str()))
            .expression_attribute_values(":redriving", s(ChordPhase::Redriving.as_str()));
        self.send_conditional(request).await
    }

    async fn claim_stalled(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> Result<Option<ChordState>, StoreError> {
        let request = self
            .update_claim(ns, gid, token)
            .update_expression("SET #state = :joining, #token = :token, #lease = :lease")
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .condition_expression("#state = :open")
            .expression_attribute_values(":open", s(ChordPhase::Open.as_str()))
            .expression_attribute_values(":lease", lease_until(lease));
        self.send_for_state(request).await
    }

    /// One consistent Query, paged.
    async fn counted_parts(&self, ns: &Namespace, gid: &GroupId) -> Result<Vec<ChordPart>, StoreError> {
        Ok(self.parts(ns, gid, false, usize::MAX).await?.0)
    }

    /// One consistent Query, paged, with a filter.
    async fn failed_parts(&self, ns: &Namespace, gid: &GroupId, limit: usize) -> Result<Vec<ChordPart>, StoreError> {
        Ok(self.parts(ns, gid, true, limit).await?.0)
    }

    async fn start_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        seen: &ChordState,
        to: &RedriveTo,
    ) -> Result<bool, StoreError> {
        let request = self
            .client()
            .update_item()
            .table_name(self.table())
            .set_key(Some(key(chord_key(ns, gid), SK_CHORD_STATE)))
            .update_expression(
                "SET #state = :redriving, #attempts = :zero, #bsent = :zero, #bsending = :zero, \
                 #esent = :zero, #esending = :zero, #window = :zero, #to = :to, #prefix = :prefix REMOVE #error, #token, #lease ADD #redrives :one",
            )
            .condition_expression(
                "#state = :seen AND #done = :done AND #failed = :failed \
                 AND (attribute_not_exists(#redrives) OR #redrives = :redrives)",
            )
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#attempts", attr::ATTEMPTS)
            .expression_attribute_names("#bsent", attr::BODY_SENT)
            .expression_attribute_names("#bsending", attr::BODY_SENDING)
            .expression_attribute_names("#esent", attr::ERRBACKS_SENT)
            .expression_attribute_names("#esending", attr::ERRBACKS_SENDING)
            .expression_attribute_names("#window", attr::REDRIVE_WINDOW)
            .expression_attribute_names("#error", attr::ERROR)
            .expression_attribute_names("#token", attr::TOKEN)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_names("#redrives", attr::REDRIVES)
            .expression_attribute_names("#done", attr::DONE)
            .expression_attribute_names("#failed", attr::FAILED)
            .expression_attribute_values(":redriving", s(ChordPhase::Redriving.as_str()))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":seen", s(seen.phase.as_str()))
            .expression_attribute_values(":done", n(seen.done))
            .expression_attribute_values(":failed", n(seen.failed))
            .expression_attribute_values(":redrives", n(seen.redrives))
            .expression_attribute_names("#to", attr::REDRIVE_QUEUE)
            .expression_attribute_names("#prefix", attr::REDRIVE_PREFIX)
            .expression_attribute_values(":to", s(to.queue.clone().unwrap_or_default()))
            .expression_attribute_values(":prefix", s(to.prefix.clone().unwrap_or_default()));
        self.send_conditional(request).await
    }

    async fn claim_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
    ) -> Result<Option<ChordState>, StoreError> {
        let now = now_epoch();
        let request = self
            .update_redrive(ns, gid, token)
            .update_expression("SET #token = :token, #lease = :lease")
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .condition_expression("#state = :redriving AND (attribute_not_exists(#token) OR #lease < :now)")
            .expression_attribute_values(":lease", lease_until(lease))
            .expression_attribute_values(":now", n(now));
        self.send_for_state(request).await
    }

    /// One transaction: each part item replaced (while it is a failed part)
    /// by one marked `redriven_at`, now, which only a result stored later
    /// replaces, and the state's counts lowered, its lease renewed and the window
    /// recorded, under the claim.
    async fn uncount_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        lease: Duration,
        parts: &[ChordPart],
    ) -> Result<bool, StoreError> {
        let pk = chord_key(ns, gid);
        let mut removals = Vec::with_capacity(parts.len());
        let now = crate::time::now_millis();
        for part in parts {
            let mut item = key(&pk, &part_sk(part.index));
            item.insert(attr::TASK_ID.into(), s(part.task_id.as_str()));
            item.insert(attr::EXPIRES_AT.into(), n(part.expires_at));
            item.insert(attr::REDRIVEN_AT.into(), n(now));
            let put = Put::builder()
                .table_name(self.table())
                .set_item(Some(item))
                .condition_expression("#failed = :yes")
                .expression_attribute_names("#failed", attr::FAILED)
                .expression_attribute_values(":yes", AttributeValue::Bool(true))
                .build()
                .map_err(|e| StoreError::Other(e.to_string()))?;
            removals.push(TransactWriteItem::builder().put(put).build());
        }
        let until = lease_until(lease);
        let set = Some((attr::LEASE_UNTIL, until, attr::REDRIVE_WINDOW, n(parts.len())));
        let state = self.redrive_count(ns, gid, token, -(parts.len() as i64), set)?;
        self.redrive_transaction(ns, gid, token, removals, state).await
    }

    /// One transaction: each part item put back as failed (where it is
    /// still marked `redriven_at`) and the state's counts raised, under the claim.
    async fn recount_parts(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        parts: &[ChordPart],
    ) -> Result<bool, StoreError> {
        let pk = chord_key(ns, gid);
        let mut puts = Vec::with_capacity(parts.len());
        for part in parts {
            let mut item = key(&pk, &part_sk(part.index));
            item.insert(attr::TASK_ID.into(), s(part.task_id.as_str()));
            item.insert(attr::EXPIRES_AT.into(), n(part.expires_at));
            item.insert(attr::FAILED.into(), AttributeValue::Bool(true));
            let put = Put::builder()
                .table_name(self.table())
                .set_item(Some(item))
                .condition_expression("attribute_exists(#redriven)")
                .expression_attribute_names("#redriven", attr::REDRIVEN_AT)
                .build()
                .map_err(|e| StoreError::Other(e.to_string()))?;
            puts.push(TransactWriteItem::builder().put(put).build());
        }
        let state = self.redrive_count(ns, gid, token, parts.len() as i64, None)?;
        self.redrive_transaction(ns, gid, token, puts, state).await
    }

    async fn end_redrive(
        &self,
        ns: &Namespace,
        gid: &GroupId,
        token: &str,
        error: Option<&str>,
        lease: Duration,
    ) -> Result<Option<ChordState>, StoreError> {
        let request = self
            .update_redrive(ns, gid, token)
            .condition_expression(HELD_REDRIVE)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_names("#window", attr::REDRIVE_WINDOW);
        let request = match error {
            Some(error) => request
                .update_expression("SET #state = :joining, #error = :error, #lease = :lease REMOVE #window")
                .expression_attribute_names("#error", attr::ERROR)
                .expression_attribute_values(":error", s(error))
                .expression_attribute_values(":joining", s(ChordPhase::Joining.as_str()))
                .expression_attribute_values(":lease", lease_until(lease)),
            None => request
                .update_expression("SET #state = :open REMOVE #token, #lease, #window")
                .expression_attribute_values(":open", s(ChordPhase::Open.as_str())),
        };
        self.send_for_state(request).await
    }

    async fn release_redrive(&self, ns: &Namespace, gid: &GroupId, token: &str) -> Result<bool, StoreError> {
        let request = self
            .update_redrive(ns, gid, token)
            .update_expression("REMOVE #token, #lease ADD #attempts :one")
            .condition_expression(HELD_REDRIVE)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_names("#attempts", attr::ATTEMPTS)
            .expression_attribute_values(":one", n(1));
        self.send_conditional(request).await
    }
}
