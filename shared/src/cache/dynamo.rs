//! The processing cache's entries in DynamoDB (see `docs/CACHE.md`): one item
//! per `(namespace, operation, uri)`, keyed by a hash of the operation and
//! the uri, moved between its phases by conditional writes only.
//!
//! - `processing`: one delegated processing (`task_id`) holds the entry
//!   until `lease_until`; concurrent misses append their `cb_args` to
//!   `waiters` (bounded in count and bytes).
//! - `settling`: the processing's result came in; one chord-join invocation
//!   (`token`, lease in `lease_until`) sends the callback or the quarantine
//!   message. A success already carries its result, so it reads as a hit.
//! - `cached`: the result (`result`, or `result_task` when it is large),
//!   until `expires_at`.
//! - `quarantined`: the processing failed; requests are answered so until
//!   `until`, then delegate again.

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use std::collections::HashMap;

use super::store::{entry_key, CacheEntry, CachePhase, CacheStore, Delegation, EntryClaim, Miss, Settle, Written};
use crate::error::StoreError;
use crate::ids::Namespace;
use crate::store::dynamo::{DynamoStore, BATCH_CHUNK};
use crate::store::item::{get_n, get_s, key, n, s, Item};
use crate::store::retry::classify;
use crate::store::schema::{attr, SK_ITEM};

/// Attribute names of cache entries (besides `pk`, `sk`, `state`,
/// `task_id`, `lease_until`, `token`, `error`, `expires_at`).
pub mod cattr {
    pub const OP: &str = "op";
    pub const URI: &str = "uri";
    /// The operation as the delegating request described it (JSON).
    pub const SPEC: &str = "spec";
    /// The `cb_args` of every request that joined the processing, as JSON texts.
    pub const WAITERS: &str = "waiters";
    pub const WAITER_COUNT: &str = "waiter_count";
    pub const WAITERS_BYTES: &str = "waiters_bytes";
    /// The `request_id`s of the requests whose `cb_args` are in `waiters`
    /// (a string set), so a request sent again appends nothing.
    pub const REQUEST_IDS: &str = "request_ids";
    pub const RESULT: &str = "result";
    pub const RESULT_TASK: &str = "result_task";
    /// `success` or `failure`, while settling.
    pub const OUTCOME: &str = "outcome";
    pub const UNTIL: &str = "until";
    /// Settling attempts that failed before sending.
    pub const ATTEMPTS: &str = "attempts";
    /// While settling: the token of the claim that was about to send (set
    /// by the conditional re-check just before the send), so a claim taken
    /// over later knows a message may have gone out and sends none.
    pub const SENDING: &str = "sending";
}

/// An entry item as the service sees it: `None` when expired or unreadable.
pub fn decode_entry(item: &Item, now: i64) -> Option<CacheEntry> {
    let expires_at = get_n(item, attr::EXPIRES_AT).unwrap_or(0);
    if expires_at <= now {
        return None;
    }
    let waiters = match item.get(cattr::WAITERS) {
        Some(AttributeValue::L(list)) => list.iter().filter_map(|v| v.as_s().ok().cloned()).collect(),
        _ => Vec::new(),
    };
    Some(CacheEntry {
        op: get_s(item, cattr::OP)?,
        uri: get_s(item, cattr::URI)?,
        phase: CachePhase::parse(&get_s(item, attr::STATE)?)?,
        task_id: get_s(item, attr::TASK_ID).unwrap_or_default(),
        lease_until: get_n(item, attr::LEASE_UNTIL).unwrap_or(0),
        waiters,
        waiter_count: get_n(item, cattr::WAITER_COUNT).unwrap_or(0).max(0) as u64,
        waiters_bytes: get_n(item, cattr::WAITERS_BYTES).unwrap_or(0).max(0) as u64,
        request_ids: match item.get(cattr::REQUEST_IDS) {
            Some(AttributeValue::Ss(ids)) => ids.clone(),
            _ => Vec::new(),
        },
        spec: get_s(item, cattr::SPEC).unwrap_or_default(),
        result: get_s(item, cattr::RESULT),
        result_task: get_s(item, cattr::RESULT_TASK),
        succeeded: get_s(item, cattr::OUTCOME).as_deref() != Some("failure"),
        until: get_n(item, cattr::UNTIL).unwrap_or(0),
        token: get_s(item, attr::TOKEN),
        sending: get_s(item, cattr::SENDING),
        error: get_s(item, attr::ERROR),
        attempts: get_n(item, cattr::ATTEMPTS).unwrap_or(0).max(0) as u32,
        expires_at,
    })
}

impl DynamoStore {
    fn entry_item_key(ns: &Namespace, hash: &str) -> Item {
        key(entry_key(ns, hash), SK_ITEM)
    }

    /// Sends an update of an entry; the entry after it, or before it when
    /// its condition did not hold.
    async fn write_entry(
        &self,
        request: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> Result<Written, StoreError> {
        let now = crate::time::now_epoch();
        let sent = request
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match sent {
            Ok(out) => {
                let entry = out.attributes.as_ref().and_then(|item| decode_entry(item, now - 1));
                entry
                    .map(Written::Applied)
                    .ok_or_else(|| StoreError::Other("an updated cache entry is unreadable".into()))
            }
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(refusal)) => {
                    Ok(Written::Refused(refusal.item.as_ref().and_then(|item| decode_entry(item, now))))
                }
                _ => Err(classify(err, self.attempts())),
            },
        }
    }

    fn update_entry(
        &self,
        ns: &Namespace,
        hash: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client().update_item().table_name(self.table()).set_key(Some(Self::entry_item_key(ns, hash)))
    }

    /// The update and condition clauses that record `miss.request_id` and
    /// refuse a request already recorded (`#rids`, `:rid`, `:rids`); empty
    /// without one.
    fn request_id_clauses(miss: &Miss<'_>) -> (&'static str, &'static str) {
        match miss.request_id {
            Some(_) => (", #rids :rids", " AND NOT contains(#rids, :rid)"),
            None => ("", ""),
        }
    }

    /// Names `#rids` and gives `:rids` (and `:rid`, for a condition on it)
    /// when the miss has a request id.
    fn with_request_id(
        request: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
        miss: &Miss<'_>,
        in_condition: bool,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        let Some(id) = miss.request_id else { return request };
        let request = request
            .expression_attribute_names("#rids", cattr::REQUEST_IDS)
            .expression_attribute_values(":rids", AttributeValue::Ss(vec![id.to_owned()]));
        if in_condition {
            request.expression_attribute_values(":rid", s(id))
        } else {
            request
        }
    }
}

impl CacheStore for DynamoStore {
    /// One entry, read consistently.
    async fn cache_entry(&self, ns: &Namespace, hash: &str) -> Result<Option<CacheEntry>, StoreError> {
        let item = self.get_item(entry_key(ns, hash)).await?;
        Ok(item.and_then(|item| decode_entry(&item, crate::time::now_epoch())))
    }

    /// Entries in the order of `hashes` (distinct), read consistently in
    /// chunks of 100, concurrently.
    async fn cache_entries(&self, ns: &Namespace, hashes: &[String]) -> Result<Vec<Option<CacheEntry>>, StoreError> {
        if hashes.len() == 1 {
            return Ok(vec![self.cache_entry(ns, &hashes[0]).await?]);
        }
        let keys: Vec<String> = hashes.iter().map(|h| entry_key(ns, h)).collect();
        let chunks = futures::future::try_join_all(keys.chunks(BATCH_CHUNK).map(|c| self.get_chunk(c))).await?;
        let mut found: HashMap<String, Item> = HashMap::new();
        for chunk in chunks {
            found.extend(chunk);
        }
        let now = crate::time::now_epoch();
        Ok(keys.iter().map(|k| found.get(k).and_then(|item| decode_entry(item, now))).collect())
    }

    /// A concurrent miss: appends its `cb_args` to the processing `task_id`
    /// while that processing holds the entry and the bounds allow.
    async fn cache_join(
        &self,
        ns: &Namespace,
        miss: &Miss<'_>,
        task_id: &str,
        now: i64,
    ) -> Result<Written, StoreError> {
        let bytes = miss.bytes();
        let (add_id, not_joined) = Self::request_id_clauses(miss);
        let request = self
            .update_entry(ns, miss.hash)
            .update_expression(format!("SET #w = list_append(#w, :w) ADD #wc :k, #wb :b{add_id}"))
            .condition_expression(format!(
                "#state = :processing AND #task = :task AND #lease > :now AND #exp > :now \
                 AND #wc <= :maxc AND #wb <= :maxb{not_joined}"
            ))
            .expression_attribute_names("#w", cattr::WAITERS)
            .expression_attribute_names("#wc", cattr::WAITER_COUNT)
            .expression_attribute_names("#wb", cattr::WAITERS_BYTES)
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#task", attr::TASK_ID)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_names("#exp", attr::EXPIRES_AT)
            .expression_attribute_values(":w", AttributeValue::L(miss.waiters.iter().map(|w| s(w.clone())).collect()))
            .expression_attribute_values(":k", n(miss.waiters.len()))
            .expression_attribute_values(":b", n(bytes))
            .expression_attribute_values(":processing", s(CachePhase::Processing.as_str()))
            .expression_attribute_values(":task", s(task_id))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":maxc", n(miss.max_waiters.saturating_sub(miss.waiters.len() as u64)))
            .expression_attribute_values(":maxb", n(miss.max_waiters_bytes.saturating_sub(bytes)));
        self.write_entry(Self::with_request_id(request, miss, true)).await
    }

    /// A miss that delegates: the entry is absent or expired, its
    /// quarantine is over, or its processing's lease ran out (then its
    /// waiters are kept for the new one). One conditional write decides
    /// which request delegates.
    async fn cache_delegate(
        &self,
        ns: &Namespace,
        miss: &Miss<'_>,
        delegation: &Delegation<'_>,
        now: i64,
    ) -> Result<Written, StoreError> {
        let bytes = miss.bytes();
        // A takeover keeps the old processing's request ids and adds this
        // one (to a set: a second add changes nothing), its own condition
        // deciding any race; a new processing has only this request's.
        let add_id = if miss.request_id.is_some() { " ADD #rids :rids" } else { "" };
        let (set_ids, remove_ids) = match miss.request_id {
            Some(_) => (", #rids = :rids", ""),
            None => ("", ", #rids"),
        };
        let (update, condition) = match delegation.replaces {
            Some(_) => (
                format!("SET {COMMON}, #w = list_append(#w, :w), #wc = #wc + :k, #wb = #wb + :b {REMOVE}{add_id}"),
                "#state = :processing AND #task = :old AND #lease <= :now AND #exp > :now \
                 AND #wc <= :maxc AND #wb <= :maxb"
                    .to_owned(),
            ),
            None => (
                format!("SET {COMMON}, #w = :w, #wc = :k, #wb = :b{set_ids} {REMOVE}{remove_ids}"),
                "attribute_not_exists(#state) OR #exp <= :now OR (#state = :quarantined AND #until <= :now)".to_owned(),
            ),
        };
        const COMMON: &str =
            "#op = :op, #uri = :uri, #state = :processing, #task = :task, #lease = :lease, #spec = :spec, #exp = :exp";
        const REMOVE: &str = "REMOVE #result, #rtask, #token, #outcome, #error, #attempts, #until, #sending";
        let mut request = self
            .update_entry(ns, miss.hash)
            .update_expression(update)
            .condition_expression(condition)
            .expression_attribute_names("#sending", cattr::SENDING)
            .expression_attribute_names("#op", cattr::OP)
            .expression_attribute_names("#uri", cattr::URI)
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#task", attr::TASK_ID)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_names("#spec", cattr::SPEC)
            .expression_attribute_names("#exp", attr::EXPIRES_AT)
            .expression_attribute_names("#w", cattr::WAITERS)
            .expression_attribute_names("#wc", cattr::WAITER_COUNT)
            .expression_attribute_names("#wb", cattr::WAITERS_BYTES)
            .expression_attribute_names("#result", cattr::RESULT)
            .expression_attribute_names("#rtask", cattr::RESULT_TASK)
            .expression_attribute_names("#token", attr::TOKEN)
            .expression_attribute_names("#outcome", cattr::OUTCOME)
            .expression_attribute_names("#error", attr::ERROR)
            .expression_attribute_names("#attempts", cattr::ATTEMPTS)
            .expression_attribute_names("#until", cattr::UNTIL)
            .expression_attribute_values(":op", s(miss.op))
            .expression_attribute_values(":uri", s(miss.uri))
            .expression_attribute_values(":processing", s(CachePhase::Processing.as_str()))
            .expression_attribute_values(":task", s(delegation.task_id))
            .expression_attribute_values(":lease", n(delegation.lease_until))
            .expression_attribute_values(":spec", s(delegation.spec))
            .expression_attribute_values(":exp", n(delegation.expires_at))
            .expression_attribute_values(":w", AttributeValue::L(miss.waiters.iter().map(|w| s(w.clone())).collect()))
            .expression_attribute_values(":k", n(miss.waiters.len()))
            .expression_attribute_values(":b", n(bytes))
            .expression_attribute_values(":now", n(now));
        request = match delegation.replaces {
            Some(old) => Self::with_request_id(request, miss, false)
                .expression_attribute_values(":old", s(old))
                .expression_attribute_values(":maxc", n(miss.max_waiters.saturating_sub(miss.waiters.len() as u64)))
                .expression_attribute_values(":maxb", n(miss.max_waiters_bytes.saturating_sub(bytes))),
            // `#rids` is set, or removed when the request has no id.
            None => Self::with_request_id(request, miss, false)
                .expression_attribute_names("#rids", cattr::REQUEST_IDS)
                .expression_attribute_values(":quarantined", s(CachePhase::Quarantined.as_str())),
        };
        self.write_entry(request).await
    }

    /// Moves a processing's lease (its task started, retried, or its
    /// delegation failed: `lease_until` now), while `task_id` still holds it.
    async fn cache_lease(
        &self,
        ns: &Namespace,
        hash: &str,
        task_id: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        let request = self
            .update_entry(ns, hash)
            .update_expression("SET #lease = :lease")
            .condition_expression("#state = :processing AND #task = :task")
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#task", attr::TASK_ID)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_values(":processing", s(CachePhase::Processing.as_str()))
            .expression_attribute_values(":task", s(task_id))
            .expression_attribute_values(":lease", n(lease_until));
        Ok(matches!(self.write_entry(request).await?, Written::Applied(_)))
    }

    /// processing → settling under `token` (or takes over a settling claim
    /// whose lease ran out), for the result of `task_id`. A success keeps
    /// its result from here on, so requests read it as a hit.
    async fn cache_claim(
        &self,
        ns: &Namespace,
        hash: &str,
        claim: &EntryClaim<'_>,
        settle: &Settle,
        now: i64,
    ) -> Result<Written, StoreError> {
        let EntryClaim { task_id, token, lease_until } = *claim;
        let mut request = self
            .update_entry(ns, hash)
            .condition_expression("#task = :task AND (#state = :processing OR (#state = :settling AND #lease <= :now))")
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#task", attr::TASK_ID)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_names("#token", attr::TOKEN)
            .expression_attribute_names("#outcome", cattr::OUTCOME)
            .expression_attribute_names("#attempts", cattr::ATTEMPTS)
            .expression_attribute_values(":task", s(task_id))
            .expression_attribute_values(":processing", s(CachePhase::Processing.as_str()))
            .expression_attribute_values(":settling", s(CachePhase::Settling.as_str()))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":lease", n(lease_until))
            .expression_attribute_values(":token", s(token))
            .expression_attribute_values(":one", n(1));
        let common = "SET #state = :settling, #lease = :lease, #token = :token, #outcome = :outcome";
        request = match settle {
            Settle::Success { result, result_task, expires_at } => {
                let (set, value) = match (result, result_task) {
                    (Some(result), _) => ("#result", s(result.clone())),
                    (None, Some(task)) => ("#rtask", s(task.clone())),
                    (None, None) => ("#result", s("null")),
                };
                request
                    .update_expression(format!("{common}, {set} = :value, #exp = :exp ADD #attempts :one"))
                    .expression_attribute_names(set, if set == "#result" { cattr::RESULT } else { cattr::RESULT_TASK })
                    .expression_attribute_names("#exp", attr::EXPIRES_AT)
                    .expression_attribute_values(":value", value)
                    .expression_attribute_values(":exp", n(*expires_at))
                    .expression_attribute_values(":outcome", s("success"))
            }
            Settle::Failure { error } => request
                .update_expression(format!("{common}, #error = :error ADD #attempts :one"))
                .expression_attribute_names("#error", attr::ERROR)
                .expression_attribute_values(":error", s(error.clone()))
                .expression_attribute_values(":outcome", s("failure")),
        };
        self.write_entry(request).await
    }

    /// Renews a settling claim's lease: just before a send (`sending`,
    /// which records that this claim is about to send), or to give the
    /// claim back after a send that failed with nothing sent (`lease_until`
    /// now, clearing that record). `false` when `token` no longer holds it.
    async fn cache_renew(
        &self,
        ns: &Namespace,
        hash: &str,
        token: &str,
        lease_until: i64,
        sending: bool,
    ) -> Result<bool, StoreError> {
        let update =
            if sending { "SET #lease = :lease, #sending = :token" } else { "SET #lease = :lease REMOVE #sending" };
        let request = self
            .update_entry(ns, hash)
            .update_expression(update)
            .condition_expression("#state = :settling AND #token = :token")
            .expression_attribute_names("#sending", cattr::SENDING)
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#token", attr::TOKEN)
            .expression_attribute_names("#lease", attr::LEASE_UNTIL)
            .expression_attribute_values(":settling", s(CachePhase::Settling.as_str()))
            .expression_attribute_values(":token", s(token))
            .expression_attribute_values(":lease", n(lease_until));
        Ok(matches!(self.write_entry(request).await?, Written::Applied(_)))
    }

    /// settling → cached (a success) or quarantined until `until` (a
    /// failure), dropping the waiters, while `token` holds the claim. A
    /// failure with no quarantine time removes the entry instead, so the
    /// next request delegates again.
    async fn cache_finish(
        &self,
        ns: &Namespace,
        hash: &str,
        token: &str,
        quarantined_until: Option<i64>,
    ) -> Result<bool, StoreError> {
        let names = [("#state", attr::STATE), ("#token", attr::TOKEN)];
        let held = "#state = :settling AND #token = :token";
        match quarantined_until {
            Some(until) if until <= 0 => {
                let mut request = self
                    .client()
                    .delete_item()
                    .table_name(self.table())
                    .set_key(Some(Self::entry_item_key(ns, hash)))
                    .condition_expression(held)
                    .expression_attribute_values(":settling", s(CachePhase::Settling.as_str()))
                    .expression_attribute_values(":token", s(token));
                for (name, value) in names {
                    request = request.expression_attribute_names(name, value);
                }
                self.applied(request.send().await)
            }
            _ => {
                let (phase, set) = match quarantined_until {
                    Some(_) => (CachePhase::Quarantined, ", #until = :until"),
                    None => (CachePhase::Cached, ""),
                };
                let mut request = self
                    .update_entry(ns, hash)
                    .update_expression(format!(
                        "SET #state = :phase{set} REMOVE #w, #wc, #wb, #token, #lease, #outcome, #attempts, #sending, #rids"
                    ))
                    .expression_attribute_names("#rids", cattr::REQUEST_IDS)
                    .condition_expression(held)
                    .expression_attribute_names("#sending", cattr::SENDING)
                    .expression_attribute_names("#w", cattr::WAITERS)
                    .expression_attribute_names("#wc", cattr::WAITER_COUNT)
                    .expression_attribute_names("#wb", cattr::WAITERS_BYTES)
                    .expression_attribute_names("#lease", attr::LEASE_UNTIL)
                    .expression_attribute_names("#outcome", cattr::OUTCOME)
                    .expression_attribute_names("#attempts", cattr::ATTEMPTS)
                    .expression_attribute_values(":settling", s(CachePhase::Settling.as_str()))
                    .expression_attribute_values(":token", s(token))
                    .expression_attribute_values(":phase", s(phase.as_str()));
                if let Some(until) = quarantined_until {
                    request = request
                        .expression_attribute_names("#until", cattr::UNTIL)
                        .expression_attribute_values(":until", n(until));
                }
                for (name, value) in names {
                    request = request.expression_attribute_names(name, value);
                }
                Ok(matches!(self.write_entry(request).await?, Written::Applied(_)))
            }
        }
    }

    /// Removes a cached or quarantined (or expired) entry; an entry being
    /// processed or settled stays. Returns the entry as it was.
    async fn cache_invalidate(&self, ns: &Namespace, hash: &str) -> Result<Written, StoreError> {
        let now = crate::time::now_epoch();
        let sent = self
            .client()
            .delete_item()
            .table_name(self.table())
            .set_key(Some(Self::entry_item_key(ns, hash)))
            .condition_expression("#state IN (:cached, :quarantined) OR #exp <= :now")
            .expression_attribute_names("#state", attr::STATE)
            .expression_attribute_names("#exp", attr::EXPIRES_AT)
            .expression_attribute_values(":cached", s(CachePhase::Cached.as_str()))
            .expression_attribute_values(":quarantined", s(CachePhase::Quarantined.as_str()))
            .expression_attribute_values(":now", n(now))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match sent {
            Ok(out) => Ok(match out.attributes.as_ref().and_then(|item| decode_entry(item, now)) {
                Some(entry) => Written::Applied(entry),
                None => Written::Refused(None),
            }),
            Err(err) => match err.as_service_error() {
                Some(aws_sdk_dynamodb::operation::delete_item::DeleteItemError::ConditionalCheckFailedException(
                    refusal,
                )) => Ok(Written::Refused(refusal.item.as_ref().and_then(|item| decode_entry(item, now)))),
                _ => Err(classify(err, self.attempts())),
            },
        }
    }
}
