//! [`ResultStore`] on DynamoDB.
//!
//! Where each store invariant of `docs/INVARIANTS.md` is enforced:
//! - S1, one conditional write, no read before it: [`DynamoStore::put_task`].
//! - S2, SUCCESS never overwritten, a ready state never replaced by a
//!   non-ready one: [`write_condition`].
//! - S3, expiry on every item, expired reads as missing: `expires_at` on every
//!   write, [`decode`] on every read, and the `expires_at <= :now` arm of the
//!   write condition (an expired item does not block a new write).
//! - S4, consistent reads: every `GetItem` and `BatchGetItem` here.
//! - S5, batch reads in chunks of 100 in parallel, unprocessed keys retried
//!   with backoff, request order kept: [`DynamoStore::get_tasks`].
//! - S6, throttling retried then 503: the SDK's retry config
//!   ([`crate::aws::shared_config`]) and [`classify`].

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, ReturnValuesOnConditionCheckFailure};
use aws_sdk_dynamodb::Client;
use futures::future::try_join_all;
use std::collections::HashMap;
use std::io::{Read, Write};

use super::blobs::{expiry_class, gzip, object_key, object_key_under, sha256_hex, BlobRef, Blobs, Presigned, Shape};
pub use super::retry::classify;
use super::retry::Backoff;
use super::schema::{attr, SK_ITEM};
use super::{
    group_doc, group_key, task_key, Claim, GroupRecord, Payload, PutOutcome, ResultStore, SavedGroup, Stored,
    TaskRecord, Within,
};
use crate::config::Config;
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::meta::{State, READY_STATES};
use crate::time::now_epoch;

/// Keys per `BatchGetItem`: DynamoDB's limit.
pub const BATCH_CHUNK: usize = 100;
/// Documents larger than this are stored deflate-compressed.
pub const COMPRESS_ABOVE: usize = 16 * 1024;
/// Largest stored document after compression; DynamoDB's item limit is 400 KB
/// and keys and attributes need room too.
pub const MAX_ITEM_DOC: usize = 390 * 1024;

use super::item::{get_n, get_s, key, Item};
pub use super::item::{item_size, MAX_ITEM_BYTES};

#[derive(Clone, Debug)]
pub struct DynamoStore {
    client: Client,
    table: String,
    backoff: Backoff,
    /// Large results in S3; `None` without `RESULTS_BUCKET`.
    large: Option<Large>,
}

/// Where large results go, and when (see [`super::blobs`]).
#[derive(Clone, Debug)]
pub struct Large {
    pub blobs: Blobs,
    /// A result whose compressed meta passes this many bytes goes to S3.
    pub spill_above: usize,
    /// So does one whose meta, uncompressed, is more than a read answers in
    /// full (`INLINE_RESULT_BYTES`): a result that compresses well would
    /// otherwise come back whole, past Lambda's response limit.
    pub inline_bytes: usize,
    /// The largest uploaded result, uncompressed.
    pub max_result_bytes: u64,
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>, backoff: Backoff) -> Self {
        Self { client, table: table.into(), backoff, large: None }
    }

    /// Keeps large results in S3 as `large` says.
    pub fn with_large(mut self, large: Large) -> Self {
        self.large = Some(large);
        self
    }

    fn large(&self) -> Result<&Large, StoreError> {
        self.large.as_ref().ok_or(StoreError::NoBucket)
    }

    /// Builds the client from the environment; with `AUTO_CREATE_TABLE` also
    /// creates the table.
    pub async fn from_config(config: &Config) -> Result<Self, String> {
        Self::from_shared(config, &crate::aws::shared_config(config).await).await
    }

    /// As [`DynamoStore::from_config`], over an already loaded AWS configuration.
    pub async fn from_shared(config: &Config, shared: &aws_config::SdkConfig) -> Result<Self, String> {
        let client = Client::from_conf(crate::aws::dynamodb_config(shared));
        if config.auto_create_table {
            super::schema::ensure_table(&client, &config.table_name).await?;
        }
        let store = Self::new(client, config.table_name.clone(), Backoff::from_config(config));
        Ok(match &config.results.bucket {
            Some(bucket) => store.with_large(Large {
                blobs: Blobs::new(shared, bucket.clone(), config.results.presign),
                spill_above: config.results.spill_above,
                inline_bytes: config.results.inline_bytes,
                max_result_bytes: config.results.max_result_bytes,
            }),
            None => store,
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.backoff.max_attempts
    }

    /// Whether a conditional write applied: `false` when its condition did
    /// not hold; any other error as [`classify`] maps it.
    pub(crate) fn applied<O, E, R>(
        &self,
        sent: Result<O, aws_sdk_dynamodb::error::SdkError<E, R>>,
    ) -> Result<bool, StoreError>
    where
        E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        Ok(self.written(sent)?.is_some())
    }

    /// A conditional write's output when it applied, `None` when its
    /// condition did not hold; any other error as [`classify`] maps it.
    pub(crate) fn written<O, E, R>(
        &self,
        sent: Result<O, aws_sdk_dynamodb::error::SdkError<E, R>>,
    ) -> Result<Option<O>, StoreError>
    where
        E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        use aws_sdk_dynamodb::error::ProvideErrorMetadata;
        match sent {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(classify(e, self.attempts())),
        }
    }

    pub(crate) fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// Deletes an object no item points to any more, best effort.
    async fn delete_object(&self, key: &str, why: &str) {
        if let Some(large) = &self.large {
            large.blobs.delete_quietly(key, why).await;
        }
    }

    fn key(pk: String) -> Item {
        key(pk, SK_ITEM)
    }

    pub(crate) async fn get_item(&self, pk: String) -> Result<Option<Item>, StoreError> {
        self.get_item_at(pk, SK_ITEM).await
    }

    pub(crate) async fn get_item_at(&self, pk: String, sk: &str) -> Result<Option<Item>, StoreError> {
        let key = HashMap::from([
            (attr::PK.to_owned(), AttributeValue::S(pk)),
            (attr::SK.to_owned(), AttributeValue::S(sk.to_owned())),
        ]);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(e, self.backoff.max_attempts))?;
        Ok(out.item)
    }

    /// Deletes an item; returns what it held.
    async fn delete_item(&self, pk: String) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(pk)))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| classify(e, self.backoff.max_attempts))?;
        Ok(out.attributes)
    }

    /// The document attribute of a result, and its object in S3 when the
    /// result is large: written to S3 here, before the item (see
    /// [`super::blobs`]), or, for an upload, checked there.
    async fn place_result(&self, ns: &Namespace, record: &TaskRecord, lifetime: i64) -> Result<Placed, StoreError> {
        if let Some(upload) = &record.upload {
            let large = self.large()?;
            let key = object_key(ns, &record.task_id, &upload.sha256);
            let bytes = large.blobs.verify(&key, &upload.sha256, large.max_result_bytes, upload.shape).await?;
            let (name, doc, size) = encode_doc(&record.json)?;
            if size > MAX_ITEM_DOC {
                return Err(StoreError::TooLarge { size, limit: MAX_ITEM_DOC });
            }
            // Tagged for its item once the item is written.
            let blob = BlobRef { key, bytes, fields: upload.shape == Shape::Fields };
            return Ok((name, doc, Some(blob), false));
        }
        let split = match self.keep(&record.json)? {
            Keep::Item(name, doc, size) => return in_item(name, doc, size),
            Keep::Spill(large) => crate::meta::split_result(&record.json, record.status.as_str()).map(|s| (large, s)),
        };
        let Some((large, (meta, result))) = split else {
            let (name, doc, size) = encode_doc(&record.json)?;
            return in_item(name, doc, size);
        };
        let object = gzip(result.as_bytes());
        let key = object_key(ns, &record.task_id, &sha256_hex(&object));
        // An object already there (the same result stored before) keeps the
        // tag its item gave it until this item is written.
        let written = large.blobs.put(&key, object, &expiry_class(lifetime)).await?;
        let (name, doc, size) = encode_doc(&meta)?;
        if size > MAX_ITEM_DOC {
            if written {
                large.blobs.delete_quietly(&key, "the meta without its result is too large").await;
            }
            return Err(StoreError::TooLarge { size, limit: MAX_ITEM_DOC });
        }
        Ok((name, doc, Some(BlobRef::result(key, result.len() as u64)), written))
    }

    /// A saved group's document and its result's object, as for a task's
    /// ([`DynamoStore::place_result`]): an uploaded object checked, or a
    /// result too large for an item written to S3 first. The document is
    /// `{"result":...}`, or `{"result":null}` when the result is in S3.
    async fn place_group(&self, pk: &str, record: &GroupRecord, lifetime: i64) -> Result<Placed, StoreError> {
        let result = match &record.result {
            Payload::Uploaded { sha256 } => {
                let large = self.large()?;
                let key = object_key_under(pk, sha256);
                let bytes = large.blobs.verify(&key, sha256, large.max_result_bytes, Shape::Result).await?;
                let (name, doc, _) = encode_doc(&group_doc("null"))?;
                return Ok((name, doc, Some(BlobRef::result(key, bytes)), false));
            }
            Payload::Json(result) => result,
        };
        let large = match self.keep(&group_doc(result))? {
            Keep::Item(name, doc, size) => return in_item(name, doc, size),
            Keep::Spill(large) => large,
        };
        let object = gzip(result.as_bytes());
        let key = object_key_under(pk, &sha256_hex(&object));
        let written = large.blobs.put(&key, object, &expiry_class(lifetime)).await?;
        let (name, doc, _) = encode_doc(&group_doc("null"))?;
        Ok((name, doc, Some(BlobRef::result(key, result.len() as u64)), written))
    }

    /// Where a document goes: in its item, or, with a bucket, its result to
    /// S3 when it is longer than a read answers whole (whatever it
    /// compresses to, so it is not compressed just to tell: a chord's
    /// results may be 100 MB) or compresses past `SPILL_ABOVE_BYTES`.
    fn keep(&self, json: &str) -> Result<Keep<'_>, StoreError> {
        if let Some(large) = self.large.as_ref().filter(|large| json.len() > large.inline_bytes) {
            return Ok(Keep::Spill(large));
        }
        let (name, doc, size) = encode_doc(json)?;
        Ok(match self.large.as_ref().filter(|large| size > large.spill_above) {
            Some(large) => Keep::Spill(large),
            None => Keep::Item(name, doc, size),
        })
    }

    /// After an item that points to `ours` (if any) replaced `replaced`:
    /// the replaced item's object is deleted unless it is ours, and ours,
    /// unless this write put it there, now lives as long as the item
    /// (invariant S8).
    async fn settle_objects(&self, replaced: Option<&Item>, ours: Option<&str>, fresh: bool, lifetime: i64) {
        if let Some(old) = replaced.and_then(blob_of).filter(|old| Some(old.key.as_str()) != ours) {
            self.delete_object(&old.key, "its result was replaced").await;
        }
        if let (Some(key), false, Some(large)) = (ours, fresh, &self.large) {
            if let Err(err) = large.blobs.set_class(key, &expiry_class(lifetime)).await {
                tracing::error!(key, error = %err, "the result's object keeps its earlier lifetime tag");
            }
        }
    }

    /// The items of `ids`' results, read consistently in chunks of `chunk`
    /// keys (at most DynamoDB's 100), concurrently: the keys in request
    /// order, and the items found by key.
    async fn get_items(
        &self,
        ns: &Namespace,
        ids: &[TaskId],
        chunk: usize,
    ) -> Result<(Vec<String>, HashMap<String, Item>), StoreError> {
        // BatchGetItem refuses duplicate keys: fetch each key once, then put
        // the answers back in request order.
        let keys: Vec<String> = ids.iter().map(|id| task_key(ns, id)).collect();
        let mut unique: Vec<String> = Vec::with_capacity(keys.len());
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        for key in &keys {
            if seen.insert(key.as_str()) {
                unique.push(key.clone());
            }
        }
        // Chunks run concurrently within this task (not spawned), so the call
        // counter of the request sees them.
        let chunks = try_join_all(unique.chunks(chunk).map(|keys| self.get_chunk(keys))).await?;
        let mut found: HashMap<String, Item> = HashMap::with_capacity(unique.len());
        for chunk in chunks {
            found.extend(chunk);
        }
        Ok((keys, found))
    }

    /// One `BatchGetItem` chunk (at most 100 distinct keys), retrying
    /// unprocessed keys with backoff until done or out of attempts.
    pub(crate) async fn get_chunk(&self, pks: &[String]) -> Result<HashMap<String, Item>, StoreError> {
        let mut found = HashMap::with_capacity(pks.len());
        let mut pending: Vec<Item> = pks.iter().map(|pk| Self::key(pk.clone())).collect();
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            if attempt > 1 {
                if attempt > self.backoff.max_attempts {
                    return Err(StoreError::Throttled { attempts: attempt - 1 });
                }
                crate::calls::note_retry();
                tokio::time::sleep(self.backoff.delay(attempt - 1)).await;
            }
            let request = KeysAndAttributes::builder()
                .set_keys(Some(std::mem::take(&mut pending)))
                .consistent_read(true)
                .build()
                .map_err(|e| StoreError::Other(e.to_string()))?;
            let mut out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| classify(e, self.backoff.max_attempts))?;
            for item in out.responses.as_mut().and_then(|r| r.remove(&self.table)).unwrap_or_default() {
                if let Some(AttributeValue::S(pk)) = item.get(attr::PK) {
                    found.insert(pk.clone(), item);
                }
            }
            if let Some(mut unprocessed) = out.unprocessed_keys.and_then(|mut u| u.remove(&self.table)) {
                pending = std::mem::take(&mut unprocessed.keys);
            }
        }
        Ok(found)
    }
}

/// A task result's item: its key, status, document (or its object's
/// reference), expiry, and what chord-join reads from the stream (a chord
/// part's group, index and chord; a processing cache task's entry).
fn task_item(ns: &Namespace, record: &TaskRecord, doc_attr: &str, doc: AttributeValue, blob: Option<&BlobRef>) -> Item {
    let mut item = DynamoStore::key(task_key(ns, &record.task_id));
    item.insert(attr::STATUS.into(), AttributeValue::S(record.status.as_str().into()));
    item.insert(doc_attr.into(), doc);
    item.insert(attr::DOC_BYTES.into(), AttributeValue::N(record.json.len().to_string()));
    item.insert(attr::EXPIRES_AT.into(), AttributeValue::N(record.expires_at.to_string()));
    item.insert(attr::STORED_AT.into(), AttributeValue::N(crate::time::now_millis().to_string()));
    if let Some(blob) = blob {
        insert_blob(&mut item, blob);
    }
    if let Some(group_id) = &record.group_id {
        item.insert(attr::GROUP_ID.into(), AttributeValue::S(group_id.to_string()));
    }
    if let Some(index) = record.group_index {
        item.insert(attr::GROUP_INDEX.into(), AttributeValue::N(index.to_string()));
    }
    // A processing cache's task: its result settles the entry it names.
    if let Some(hash) = crate::ids::entry_of_processing(record.task_id.as_str()) {
        item.insert(attr::CACHE_KEY.into(), AttributeValue::S(hash.to_owned()));
    }
    if let Some(chord) = &record.chord {
        item.insert(attr::CHORD_SIZE.into(), AttributeValue::N(chord.size.to_string()));
        item.insert(attr::CHORD_CALLBACK.into(), AttributeValue::S(chord.callback.clone()));
    }
    if let Some(claim) = &record.claim {
        item.insert(attr::CLAIM_TOKEN.into(), AttributeValue::S(claim.token.clone()));
        item.insert(attr::CLAIM_UNTIL.into(), AttributeValue::N(claim.until_ms.to_string()));
    }
    item
}

/// The write condition of a store (invariant S2): the item is absent or
/// expired, or its stored status lets the new one replace it.
/// - a ready state (SUCCESS, FAILURE, REVOKED) replaces anything but SUCCESS;
/// - a non-ready state replaces only non-ready states.
///
/// A claim (invariant S10) also needs that no other live claim holds the
/// task: none stored, lapsed, or its own token (a renewal).
///
/// Returns the expression and its values.
pub fn write_condition(new: &State, claim: Option<&Claim>, now: i64) -> (String, Vec<(String, AttributeValue)>) {
    let mut values = vec![(":now".to_owned(), AttributeValue::N(now.to_string()))];
    // A ready state, and a rerun's claim, replace anything but SUCCESS.
    let replaceable = if new.is_ready() || claim.is_some_and(|c| c.rerun) {
        values.push((":success".to_owned(), AttributeValue::S("SUCCESS".into())));
        "#status <> :success".to_owned()
    } else {
        let names: Vec<String> = READY_STATES.iter().map(|s| format!(":{}", s.to_lowercase())).collect();
        for (name, state) in names.iter().zip(READY_STATES) {
            values.push((name.clone(), AttributeValue::S(state.into())));
        }
        format!("NOT (#status IN ({}))", names.join(", "))
    };
    let guard = match claim {
        None => replaceable,
        Some(claim) => {
            values.push((":now_ms".to_owned(), AttributeValue::N(crate::time::now_millis().to_string())));
            values.push((":token".to_owned(), AttributeValue::S(claim.token.clone())));
            format!(
                "({replaceable} AND (attribute_not_exists(#claim_until) OR #claim_until <= :now_ms \
                 OR #claim_token = :token))"
            )
        }
    };
    (format!("attribute_not_exists(#pk) OR #expires_at <= :now OR {guard}"), values)
}

/// The document attribute: plain JSON, or deflate-compressed when large;
/// and its size.
fn encode_doc(json: &str) -> Result<(&'static str, AttributeValue, usize), StoreError> {
    if json.len() <= COMPRESS_ABOVE {
        return Ok((attr::DOC, AttributeValue::S(json.to_owned()), json.len()));
    }
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(json.as_bytes()).map_err(|e| StoreError::Other(e.to_string()))?;
    let compressed = encoder.finish().map_err(|e| StoreError::Other(e.to_string()))?;
    let size = compressed.len();
    Ok((attr::DOC_Z, AttributeValue::B(Blob::new(compressed)), size))
}

/// A result's document attribute, its object in S3 if any, and whether this
/// store wrote that object (else it was there: uploaded, or stored before,
/// and its lifetime tag is set once the item is written).
type Placed = (&'static str, AttributeValue, Option<BlobRef>, bool);

/// Where a document goes ([`DynamoStore::keep`]): its attribute (name,
/// value, size), or its result to S3.
enum Keep<'a> {
    Item(&'static str, AttributeValue, usize),
    Spill(&'a Large),
}

/// A document kept whole in its item, if it fits one.
fn in_item(name: &'static str, doc: AttributeValue, size: usize) -> Result<Placed, StoreError> {
    if size > MAX_ITEM_DOC {
        return Err(StoreError::TooLarge { size, limit: MAX_ITEM_DOC });
    }
    Ok((name, doc, None, false))
}

/// The object a result item points to.
fn blob_of(item: &Item) -> Option<BlobRef> {
    match (item.get(attr::BLOB_KEY), item.get(attr::BLOB_BYTES)) {
        (Some(AttributeValue::S(key)), Some(AttributeValue::N(bytes))) => Some(BlobRef {
            key: key.clone(),
            bytes: bytes.parse().ok()?,
            fields: matches!(item.get(attr::BLOB_FIELDS), Some(AttributeValue::Bool(true))),
        }),
        _ => None,
    }
}

/// Points an item to its object.
fn insert_blob(item: &mut Item, blob: &BlobRef) {
    item.insert(attr::BLOB_KEY.into(), AttributeValue::S(blob.key.clone()));
    item.insert(attr::BLOB_BYTES.into(), AttributeValue::N(blob.bytes.to_string()));
    if blob.fields {
        item.insert(attr::BLOB_FIELDS.into(), AttributeValue::Bool(true));
    }
}

fn decode_doc(item: &Item) -> Option<String> {
    decode_doc_within(item, usize::MAX).ok()?
}

/// An item's document, inflated only if it is at most `limit` bytes:
/// `Err(bytes)` with its size (at least `limit + 1`) when it is larger.
/// The size on the item is checked first; inflating stops one byte past
/// `limit` whatever the item says.
fn decode_doc_within(item: &Item, limit: usize) -> Result<Option<String>, u64> {
    let told = match item.get(attr::DOC_BYTES) {
        Some(AttributeValue::N(n)) => n.parse::<u64>().ok(),
        _ => None,
    };
    match (item.get(attr::DOC), item.get(attr::DOC_Z)) {
        (Some(AttributeValue::S(json)), _) if json.len() > limit => Err(json.len() as u64),
        (Some(AttributeValue::S(json)), _) => Ok(Some(json.clone())),
        (_, Some(AttributeValue::B(_))) if told.is_some_and(|bytes| bytes > limit as u64) => Err(told.unwrap_or(0)),
        (_, Some(AttributeValue::B(blob))) => {
            let mut json = String::new();
            let cap = (limit as u64).saturating_add(1);
            let read = flate2::read::DeflateDecoder::new(blob.as_ref()).take(cap).read_to_string(&mut json);
            match read {
                Ok(n) if n > limit => Err(told.unwrap_or(0).max(n as u64)),
                Ok(_) => Ok(Some(json)),
                Err(_) => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

fn expires_at(item: &Item) -> Option<i64> {
    get_n(item, attr::EXPIRES_AT)
}

/// An item as the service sees it: `None` when expired (invariant S3) or
/// unreadable.
fn decode(item: &Item, now: i64) -> Option<Stored> {
    match decode_within(item, now, &mut Some(usize::MAX))? {
        Within::Whole(stored) => Some(stored),
        Within::Over { .. } => None,
    }
}

/// An item read within what is left of a budget (see
/// [`ResultStore::get_tasks_within`]); `left` shrinks by what it inflated.
fn decode_within(item: &Item, now: i64, left: &mut Option<usize>) -> Option<Within> {
    if expires_at(item).is_some_and(|at| at <= now) {
        return None;
    }
    let status = State::parse(&get_s(item, attr::STATUS)?).ok()?;
    let Some(room) = *left else {
        let bytes = get_n(item, attr::DOC_BYTES).unwrap_or(0).max(0) as u64;
        return Some(Within::Over { status, bytes });
    };
    match decode_doc_within(item, room) {
        Ok(json) => {
            let json = json?;
            *left = Some(room - json.len());
            Some(Within::Whole(Stored { status, json, blob: blob_of(item) }))
        }
        Err(bytes) => {
            // Nothing after the first that does not fit is inflated either.
            *left = None;
            Some(Within::Over { status, bytes })
        }
    }
}

impl ResultStore for DynamoStore {
    async fn put_task(&self, ns: &Namespace, record: &TaskRecord) -> Result<PutOutcome, StoreError> {
        let now = now_epoch();
        let lifetime = record.expires_at - now;
        let (doc_attr, doc, blob, fresh) = self.place_result(ns, record, lifetime).await?;
        let item = task_item(ns, record, doc_attr, doc, blob.as_ref());
        // The whole item, callback included, must fit: refused here as too
        // large rather than by DynamoDB with an error text of its own.
        let size = item_size(&item);
        if size > MAX_ITEM_BYTES {
            if let (Some(blob), true) = (&blob, fresh) {
                self.delete_object(&blob.key, "its item is too large").await;
            }
            return Err(StoreError::TooLarge { size, limit: MAX_ITEM_BYTES });
        }
        let (condition, values) = write_condition(&record.status, record.claim.as_ref(), now);
        let mut put = self.client.put_item();
        if record.claim.is_some() {
            put = put
                .expression_attribute_names("#claim_until", attr::CLAIM_UNTIL)
                .expression_attribute_names("#claim_token", attr::CLAIM_TOKEN);
        }
        let result = put
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .expression_attribute_names("#pk", attr::PK)
            .expression_attribute_names("#status", attr::STATUS)
            .expression_attribute_names("#expires_at", attr::EXPIRES_AT)
            .set_expression_attribute_values(Some(values.into_iter().collect()))
            // The item replaced, whose object (if any) is no longer served.
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            // On refusal DynamoDB returns the stored item: the 409 needs no extra read.
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        let ours = blob.as_ref().map(|b| b.key.as_str());
        match result {
            Ok(out) => {
                self.settle_objects(out.attributes.as_ref(), ours, fresh, lifetime).await;
                Ok(PutOutcome::Stored)
            }
            Err(err) => match err.as_service_error() {
                Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(refusal)) => {
                    let stored = match refusal.item.as_ref().and_then(|i| i.get(attr::STATUS)) {
                        Some(AttributeValue::S(s)) => s.clone(),
                        _ => "unknown".to_owned(),
                    };
                    // Ours was refused: its object is deleted, unless the
                    // stored result is the same object (a store sent again).
                    let kept = refusal.item.as_ref().and_then(blob_of).map(|b| b.key);
                    if let Some(key) = ours.filter(|key| kept.as_deref() != Some(*key)) {
                        self.delete_object(key, "its store was refused").await;
                    }
                    // A claim refused by a task that is not ready: another
                    // live claim holds it.
                    let held = refusal.item.as_ref().and_then(|i| get_n(i, attr::CLAIM_UNTIL));
                    match held {
                        Some(until_ms) if record.claim.is_some() && !State::is_ready_str(&stored) => {
                            Ok(PutOutcome::Claimed { stored, until_ms })
                        }
                        _ => Ok(PutOutcome::Refused { stored }),
                    }
                }
                // Whether the write happened is unknown: the object stays.
                // No item points to it unless the write did happen; an
                // object no item points to is never served, and the
                // lifecycle rules remove it.
                _ => Err(classify(err, self.backoff.max_attempts)),
            },
        }
    }

    async fn get_task(&self, ns: &Namespace, id: &TaskId) -> Result<Option<Stored>, StoreError> {
        let item = self.get_item(task_key(ns, id)).await?;
        Ok(item.and_then(|item| decode(&item, now_epoch())))
    }

    async fn get_tasks(&self, ns: &Namespace, ids: &[TaskId]) -> Result<Vec<Option<Stored>>, StoreError> {
        let (keys, found) = self.get_items(ns, ids, BATCH_CHUNK).await?;
        let now = now_epoch();
        Ok(keys.iter().map(|key| found.get(key).and_then(|item| decode(item, now))).collect())
    }

    async fn get_tasks_within(
        &self,
        ns: &Namespace,
        ids: &[TaskId],
        budget: usize,
    ) -> Result<Vec<Option<Within>>, StoreError> {
        // At least four requests side by side when there are few keys (a
        // chord's read window), chunks of 100 (DynamoDB's most) when many.
        let chunk = ids.len().div_ceil(4).clamp(1, BATCH_CHUNK);
        let (keys, found) = self.get_items(ns, ids, chunk).await?;
        let (now, mut left) = (now_epoch(), Some(budget));
        Ok(keys.iter().map(|key| found.get(key).and_then(|item| decode_within(item, now, &mut left))).collect())
    }

    async fn delete_task(&self, ns: &Namespace, id: &TaskId) -> Result<(), StoreError> {
        let old = self.delete_item(task_key(ns, id)).await?;
        if let Some(blob) = old.as_ref().and_then(blob_of) {
            self.delete_object(&blob.key, "its result was forgotten").await;
        }
        Ok(())
    }

    async fn read_blob(&self, blob: &BlobRef) -> Result<Option<String>, StoreError> {
        self.large()?.blobs.read(blob).await
    }

    async fn blob_url(&self, blob: &BlobRef) -> Result<String, StoreError> {
        self.large()?.blobs.presign_get(&blob.key).await
    }

    async fn upload_url(
        &self,
        item_key: &str,
        sha256: &str,
        bytes: u64,
        lifetime: i64,
    ) -> Result<Presigned, StoreError> {
        self.large()?.blobs.presign_put(&object_key_under(item_key, sha256), &expiry_class(lifetime), bytes).await
    }

    async fn put_group(&self, ns: &Namespace, id: &GroupId, record: &GroupRecord) -> Result<(), StoreError> {
        let pk = group_key(ns, id);
        let lifetime = record.expires_at - now_epoch();
        let (doc_attr, doc, blob, fresh) = self.place_group(&pk, record, lifetime).await?;
        let mut item = Self::key(pk);
        item.insert(doc_attr.into(), doc);
        item.insert(attr::EXPIRES_AT.into(), AttributeValue::N(record.expires_at.to_string()));
        if let Some(blob) = &blob {
            insert_blob(&mut item, blob);
        }
        let ours = blob.as_ref().map(|b| b.key.as_str());
        let written = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            // The group saved before, whose object (if any) is no longer served.
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await;
        match written {
            Ok(out) => {
                self.settle_objects(out.attributes.as_ref(), ours, fresh, lifetime).await;
                Ok(())
            }
            // Whether the write happened is unknown: the object stays (see put_task).
            Err(err) => Err(classify(err, self.backoff.max_attempts)),
        }
    }

    async fn get_group(&self, ns: &Namespace, id: &GroupId) -> Result<Option<SavedGroup>, StoreError> {
        let now = now_epoch();
        let item = self.get_item(group_key(ns, id)).await?;
        Ok(item
            .filter(|item| expires_at(item).is_none_or(|at| at > now))
            .and_then(|item| Some(SavedGroup { json: decode_doc(&item)?, blob: blob_of(&item) })))
    }

    async fn delete_group(&self, ns: &Namespace, id: &GroupId) -> Result<(), StoreError> {
        let old = self.delete_item(group_key(ns, id)).await?;
        if let Some(blob) = old.as_ref().and_then(blob_of) {
            self.delete_object(&blob.key, "its group was forgotten").await;
        }
        Ok(())
    }
}

/// The real SDK client against a scripted HTTP layer: retries, backoff and
/// error mapping as they run in production, with throttling DynamoDB Local
/// cannot produce.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls::{counted, CountCalls};
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    use aws_smithy_types::retry::RetryConfig;
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    const TABLE: &str = "results";

    fn store(max_attempts: u32, respond: impl Fn(Value) -> (u16, Value) + Send + Sync + 'static) -> DynamoStore {
        let http = crate::scripted::client(move |req: lambda_http::http::Request<aws_smithy_types::body::SdkBody>| {
            let body: Value = serde_json::from_slice(req.body().bytes().unwrap_or(b"{}")).unwrap_or(Value::Null);
            let (status, reply) = respond(body);
            lambda_http::http::Response::builder().status(status).body(reply.to_string()).unwrap()
        });
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("a", "b", None, None, "test"))
            .http_client(http)
            .retry_config(
                RetryConfig::standard().with_max_attempts(max_attempts).with_initial_backoff(Duration::from_millis(1)),
            )
            .interceptor(CountCalls)
            .build();
        let backoff = Backoff { max_attempts, initial: Duration::from_millis(1), max: Duration::from_millis(5) };
        DynamoStore::new(Client::from_conf(config), TABLE, backoff)
    }

    fn throttled() -> (u16, Value) {
        (
            400,
            json!({"__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException", "message": "slow down"}),
        )
    }

    fn item(pk: &str) -> Value {
        json!({"pk": {"S": pk}, "sk": {"S": "_"}, "status": {"S": "SUCCESS"}, "doc": {"S": format!("{{\"pk\":\"{pk}\"}}")}, "expires_at": {"N": "99999999999"}})
    }

    fn requested_keys(body: &Value) -> Vec<String> {
        body["RequestItems"][TABLE]["Keys"]
            .as_array()
            .map(|keys| keys.iter().map(|k| k["pk"]["S"].as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    }

    fn ids(n: usize) -> Vec<TaskId> {
        (0..n).map(|i| TaskId::parse(&format!("t{i}")).unwrap()).collect()
    }

    #[tokio::test]
    async fn throttling_is_retried_then_reported_after_the_configured_attempts() {
        let store = store(3, |_| throttled());
        let (result, calls) = counted(store.get_task(&Namespace::default(), &ids(1)[0])).await;
        assert!(matches!(result, Err(StoreError::Throttled { .. })), "{result:?}");
        assert_eq!(calls, 3, "one request per configured attempt");
        let api = crate::error::ApiError::from(result.unwrap_err());
        assert_eq!((api.status_and_code().0, api.retry_after()), (503, Some(1)));
    }

    #[tokio::test]
    async fn a_throttled_store_that_recovers_is_acknowledged() {
        let seen = Arc::new(Mutex::new(0));
        let counter = seen.clone();
        let store = store(5, move |_| {
            let mut n = counter.lock().unwrap();
            *n += 1;
            if *n <= 2 {
                throttled()
            } else {
                (200, json!({}))
            }
        });
        let record = TaskRecord {
            task_id: ids(1)[0].clone(),
            status: State::Success,
            json: "{}".into(),
            expires_at: 1,
            group_id: None,
            group_index: None,
            chord: None,
            upload: None,
            claim: None,
        };
        let (result, calls) = counted(store.put_task(&Namespace::default(), &record)).await;
        assert_eq!(result.unwrap(), PutOutcome::Stored);
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn unprocessed_keys_are_retried_and_order_and_duplicates_are_kept() {
        let requests = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
        let log = requests.clone();
        // Each call answers the first half of its keys and leaves the rest unprocessed.
        let store = store(10, move |body| {
            let keys = requested_keys(&body);
            log.lock().unwrap().push(keys.clone());
            let (done, rest) = keys.split_at(keys.len().div_ceil(2));
            let rest: Vec<Value> = rest.iter().map(|pk| json!({"pk": {"S": pk}, "sk": {"S": "_"}})).collect();
            let mut reply = json!({"Responses": {TABLE: done.iter().map(|pk| item(pk)).collect::<Vec<_>>()}});
            if !rest.is_empty() {
                reply["UnprocessedKeys"] = json!({TABLE: {"Keys": rest, "ConsistentRead": true}});
            }
            (200, reply)
        });
        let mut wanted = ids(250);
        wanted.push(wanted[7].clone());
        wanted.insert(0, wanted[249].clone());
        let (result, calls) = counted(store.get_tasks(&Namespace::default(), &wanted)).await;
        let got = result.unwrap();
        assert_eq!(got.len(), wanted.len());
        for (id, stored) in wanted.iter().zip(&got) {
            let json = &stored.as_ref().expect("every key is found in the end").json;
            assert!(json.contains(&format!("default/task/{id}\"")), "{id}: {json}");
        }
        let requests = requests.lock().unwrap();
        assert_eq!(calls as usize, requests.len());
        for keys in requests.iter() {
            assert!(keys.len() <= BATCH_CHUNK, "chunks of at most 100");
            let unique: std::collections::HashSet<_> = keys.iter().collect();
            assert_eq!(unique.len(), keys.len(), "no duplicate keys in a request");
        }
        let first_round: usize = requests.iter().take(3).map(Vec::len).sum();
        assert_eq!(first_round, 250, "250 distinct keys go out as 3 chunks first");
    }

    #[tokio::test]
    async fn keys_left_unprocessed_past_the_attempts_are_throttling() {
        let store = store(4, |body| {
            let keys: Vec<Value> =
                requested_keys(&body).iter().map(|pk| json!({"pk": {"S": pk}, "sk": {"S": "_"}})).collect();
            (200, json!({"Responses": {TABLE: []}, "UnprocessedKeys": {TABLE: {"Keys": keys}}}))
        });
        let (result, calls) = counted(store.get_tasks(&Namespace::default(), &ids(3))).await;
        assert!(matches!(result, Err(StoreError::Throttled { attempts: 4 })), "{result:?}");
        assert_eq!(calls, 4);
    }

    #[tokio::test]
    async fn an_unreachable_dynamodb_is_unavailable_not_an_internal_error() {
        // A real HTTP client to a port where nothing listens (no scripted layer).
        let sdk = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url("http://127.0.0.1:9")
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("a", "b", None, None, "test"))
            .retry_config(RetryConfig::standard().with_max_attempts(2).with_initial_backoff(Duration::from_millis(1)))
            .build();
        let backoff = Backoff { max_attempts: 2, initial: Duration::from_millis(1), max: Duration::from_millis(5) };
        let store = DynamoStore::new(Client::from_conf(sdk), "t", backoff);
        let result = store.get_task(&Namespace::default(), &ids(1)[0]).await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "{result:?}");
        assert_eq!(crate::error::ApiError::from(result.unwrap_err()).status_and_code(), (503, "unavailable"));
    }

    #[test]
    fn the_write_condition_guards_success_and_ready_states() {
        let (ready, values) = write_condition(&State::Failure, None, 5);
        assert_eq!(ready, "attribute_not_exists(#pk) OR #expires_at <= :now OR #status <> :success");
        assert_eq!(values.len(), 2);
        let (not_ready, values) = write_condition(&State::Started, None, 5);
        assert_eq!(
            not_ready,
            "attribute_not_exists(#pk) OR #expires_at <= :now OR NOT (#status IN (:success, :failure, :revoked))"
        );
        assert_eq!(values.len(), 4);
        let claim = Claim { token: "holder-one".into(), until_ms: 9, rerun: false };
        let (claimed, values) = write_condition(&State::Started, Some(&claim), 5);
        assert_eq!(
            claimed,
            "attribute_not_exists(#pk) OR #expires_at <= :now OR (NOT (#status IN (:success, :failure, :revoked)) \
             AND (attribute_not_exists(#claim_until) OR #claim_until <= :now_ms OR #claim_token = :token))"
        );
        assert_eq!(values.len(), 6);
        let rerun = Claim { rerun: true, ..claim };
        let (rerun, values) = write_condition(&State::Started, Some(&rerun), 5);
        assert_eq!(
            rerun,
            "attribute_not_exists(#pk) OR #expires_at <= :now OR (#status <> :success \
             AND (attribute_not_exists(#claim_until) OR #claim_until <= :now_ms OR #claim_token = :token))"
        );
        assert_eq!(values.len(), 4);
    }

    #[test]
    fn documents_compress_when_large_and_decode_back() {
        let small = "{\"a\":1}";
        let big = format!("[{}]", vec!["\"same text\""; 5000].join(","));
        for json in [small.to_owned(), big] {
            let (name, value, _) = encode_doc(&json).unwrap();
            assert_eq!(name == attr::DOC_Z, json.len() > COMPRESS_ABOVE);
            let item = HashMap::from([(name.to_owned(), value)]);
            assert_eq!(decode_doc(&item).unwrap(), json);
        }
    }

    #[test]
    fn a_document_is_inflated_only_within_the_budget_whatever_its_item_says() {
        // 1 MB that compresses to about a kilobyte.
        let json = format!("\"{}\"", "x".repeat(1 << 20));
        let (name, value, size) = encode_doc(&json).unwrap();
        assert!(size < 8192, "{size}");
        let told = |bytes: Option<usize>| {
            let mut item = HashMap::from([(name.to_owned(), value.clone())]);
            if let Some(bytes) = bytes {
                item.insert(attr::DOC_BYTES.to_owned(), AttributeValue::N(bytes.to_string()));
            }
            item
        };
        // Its size on the item refuses it before anything is inflated.
        assert_eq!(decode_doc_within(&told(Some(json.len())), 1000), Err(json.len() as u64));
        // No size (an item stored before it was kept), or a size that lies:
        // inflating stops one byte past the budget.
        assert_eq!(decode_doc_within(&told(None), 1000), Err(1001));
        assert_eq!(decode_doc_within(&told(Some(10)), 1000), Err(1001));
        assert_eq!(decode_doc_within(&told(Some(json.len())), json.len()), Ok(Some(json.clone())));
        // In a read, the first that does not fit and every one after it are Over.
        let ok = HashMap::from([
            (attr::STATUS.to_owned(), AttributeValue::S("SUCCESS".into())),
            (attr::DOC.to_owned(), AttributeValue::S("{\"result\":1}".into())),
        ]);
        let mut huge = told(Some(json.len()));
        huge.insert(attr::STATUS.to_owned(), AttributeValue::S("SUCCESS".into()));
        let mut left = Some(100);
        let read: Vec<_> = [&ok, &huge, &ok].iter().map(|item| decode_within(item, 0, &mut left)).collect();
        assert!(matches!(read[0], Some(Within::Whole(_))));
        assert_eq!(read[1], Some(Within::Over { status: State::Success, bytes: json.len() as u64 }));
        assert!(matches!(read[2], Some(Within::Over { .. })), "nothing after it is inflated");
    }
}
