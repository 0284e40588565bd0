//! The table: one definition for the local stack (`AUTO_CREATE_TABLE`,
//! `devstack`) and the deployed one (`infra/template.yaml`, which a test
//! compares against [`TABLE`]).

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, StreamSpecification,
    StreamViewType, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;
use std::time::Duration;

/// Attribute names, shared by every item kind.
pub mod attr {
    pub const PK: &str = "pk";
    pub const SK: &str = "sk";
    /// TTL attribute: epoch seconds.
    pub const EXPIRES_AT: &str = "expires_at";
    /// Top-level status, for conditions and stream filters.
    pub const STATUS: &str = "status";
    /// The meta or group JSON, as served.
    pub const DOC: &str = "doc";
    /// The same, deflate-compressed, when large.
    pub const DOC_Z: &str = "doc_z";
    /// The document's size uncompressed: a read knows what an item will
    /// cost once inflated before it inflates it.
    pub const DOC_BYTES: &str = "doc_bytes";
    /// When a result was stored (epoch milliseconds): chord-join measures
    /// a join's latency from its newest part's.
    pub const STORED_AT: &str = "stored_at";
    /// On a result kept in S3: its object's key, and the result's size.
    pub const BLOB_KEY: &str = "blob_key";
    pub const BLOB_BYTES: &str = "blob_bytes";
    /// On a result whose object holds the meta's large fields (`result`,
    /// `args`, `kwargs`), not the result alone: `true`.
    pub const BLOB_FIELDS: &str = "blob_fields";
    /// On a claimed task (invariant S10): the claimer's token, and when
    /// its claim lapses (epoch milliseconds).
    pub const CLAIM_TOKEN: &str = "claim_token";
    pub const CLAIM_UNTIL: &str = "claim_until";
    pub const GROUP_ID: &str = "group_id";
    pub const GROUP_INDEX: &str = "group_index";
    /// On a chord part: the chord's size and callback signature (JSON).
    pub const CHORD_SIZE: &str = "chord_size";
    pub const CHORD_CALLBACK: &str = "chord_callback";
    /// On a chord's state item.
    pub const SIZE: &str = "size";
    pub const DONE: &str = "done";
    pub const STATE: &str = "state";
    pub const CALLBACK: &str = "callback";
    pub const CALLBACK_ID: &str = "callback_id";
    pub const TOKEN: &str = "token";
    pub const LEASE_UNTIL: &str = "lease_until";
    pub const ERROR: &str = "error";
    /// Joins that failed and gave the claim back.
    pub const ATTEMPTS: &str = "attempts";
    /// Errbacks of a failing chord already sent.
    pub const ERRBACKS_SENT: &str = "errbacks_sent";
    /// Messages of a multi-message body (a group, a chord) already sent.
    pub const BODY_SENT: &str = "body_sent";
    /// How many of the body's messages, or of a failing chord's errbacks,
    /// may have gone out: written by the re-check just before each send, so
    /// a claim that takes over never sends one again (invariant O5).
    pub const BODY_SENDING: &str = "body_sending";
    pub const ERRBACKS_SENDING: &str = "errbacks_sending";
    /// On a chord's state item: when its first part was counted (epoch seconds).
    pub const OPENED_AT: &str = "opened_at";
    /// On a chord's state item: how many redrives were asked (`POST
    /// /v1/chords/{id}/redrive`), and how many failed parts the redrive
    /// under way sent in its last window (they count as sent if its
    /// claimer dies, invariant O5).
    pub const REDRIVES: &str = "redrives";
    pub const REDRIVE_WINDOW: &str = "redrive_window";
    /// On a chord's state item: where its redrive sends the failed parts
    /// (a queue for all of them, or a prefix for each part's own queue).
    /// On a chord's part item: a part a redrive removed from the count, and
    /// when (epoch milliseconds); a result stored later counts it again.
    pub const REDRIVEN_AT: &str = "redriven_at";
    /// On a chord's state item: when its deadline passes (epoch seconds),
    /// whether the message that wakes chord-join then was sent, and when it
    /// was found open past it.
    pub const DEADLINE_AT: &str = "deadline_at";
    pub const DEADLINE_ARMED: &str = "deadline_armed";
    pub const STALLED_AT: &str = "stalled_at";
    pub const REDRIVE_QUEUE: &str = "redrive_queue";
    pub const REDRIVE_PREFIX: &str = "redrive_prefix";
    /// On a chord's state item: the counted parts that failed (FAILURE or
    /// REVOKED); on a part item, `true` when the part failed.
    pub const FAILED: &str = "failed";
    /// On a chord's part item.
    pub const TASK_ID: &str = "task_id";
    /// On a processing cache's task result: the entry it settles.
    pub const CACHE_KEY: &str = "cache_key";
}

/// The sort key of a chord's state item.
pub const SK_CHORD_STATE: &str = "state";
/// The sort key prefix of a chord's part items; the index is zero-padded so
/// parts sort in `group_index` order.
pub const SK_PART_PREFIX: &str = "part#";

/// The sort key of single-item records (task results, groups).
pub const SK_ITEM: &str = "_";

/// What the table looks like, as data, for comparison with the template.
pub struct TableSpec {
    pub hash_key: &'static str,
    pub range_key: &'static str,
    pub ttl_attribute: &'static str,
    pub stream_view: &'static str,
}

pub const TABLE: TableSpec = TableSpec {
    hash_key: attr::PK,
    range_key: attr::SK,
    ttl_attribute: attr::EXPIRES_AT,
    stream_view: "NEW_AND_OLD_IMAGES",
};

/// Creates the table if it does not exist, waits until it is active, and
/// turns TTL on. Safe to call from several processes at once.
pub async fn ensure_table(client: &Client, name: &str) -> Result<(), String> {
    let key = |n: &str, t| KeySchemaElement::builder().attribute_name(n).key_type(t).build();
    let def = |n: &str| AttributeDefinition::builder().attribute_name(n).attribute_type(ScalarAttributeType::S).build();
    let created = client
        .create_table()
        .table_name(name)
        .key_schema(key(TABLE.hash_key, KeyType::Hash).map_err(|e| e.to_string())?)
        .key_schema(key(TABLE.range_key, KeyType::Range).map_err(|e| e.to_string())?)
        .attribute_definitions(def(TABLE.hash_key).map_err(|e| e.to_string())?)
        .attribute_definitions(def(TABLE.range_key).map_err(|e| e.to_string())?)
        .billing_mode(BillingMode::PayPerRequest)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::from(TABLE.stream_view))
                .build()
                .map_err(|e| e.to_string())?,
        )
        .send()
        .await;
    if let Err(err) = created {
        let in_use = err.as_service_error().is_some_and(|e| e.is_resource_in_use_exception());
        if !in_use {
            return Err(format!("creating table {name}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&err)));
        }
    }
    for _ in 0..100 {
        let described = client.describe_table().table_name(name).send().await;
        let active =
            described.ok().and_then(|d| d.table).and_then(|t| t.table_status).is_some_and(|s| s.as_str() == "ACTIVE");
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ttl = TimeToLiveSpecification::builder()
        .enabled(true)
        .attribute_name(TABLE.ttl_attribute)
        .build()
        .map_err(|e| e.to_string())?;
    match client.update_time_to_live().table_name(name).time_to_live_specification(ttl).send().await {
        Ok(_) => Ok(()),
        // Enabling TTL twice is refused with a validation error; it is on.
        Err(err) if format!("{:?}", err).contains("TimeToLive is already enabled") => Ok(()),
        Err(err) => Err(format!("enabling TTL on {name}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&err))),
    }
}
