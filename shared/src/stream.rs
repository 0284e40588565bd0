//! Reading DynamoDB Streams records: the new image of an item that was
//! written, as both stream consumers read it (chord parts, and the
//! processing cache's tasks).

use aws_lambda_events::event::dynamodb::EventRecord;
use serde_json::Value;

use crate::ids::{Namespace, TaskId};
use crate::store::schema::attr;

/// The new image of a written item, with the record's sequence number.
pub struct Image {
    attrs: Value,
    pub sequence: String,
}

impl Image {
    /// The record's new image; `None` for a removal (TTL or a delete),
    /// which neither consumer acts on.
    pub fn of(record: &EventRecord) -> Option<Self> {
        if record.event_name == "REMOVE" {
            return None;
        }
        Some(Self {
            attrs: serde_json::to_value(&record.change.new_image).ok()?,
            sequence: record.change.sequence_number.clone().unwrap_or_default(),
        })
    }

    /// A string attribute.
    pub fn s(&self, name: &str) -> Option<&str> {
        self.attrs.get(name)?.get("S")?.as_str()
    }

    /// A number attribute, parsed as `N`.
    pub fn n<N: std::str::FromStr>(&self, name: &str) -> Option<N> {
        self.attrs.get(name)?.get("N")?.as_str()?.parse().ok()
    }

    /// The namespace and id of a task result's item.
    pub fn task(&self) -> Option<(Namespace, TaskId)> {
        crate::store::parse_task_key(self.s(attr::PK)?)
    }
}
