//! An in-memory [`ResultStore`] for unit tests of the service layer. It
//! mirrors the DynamoDB write condition (see `dynamo::write_condition`); the
//! integration suite checks the real one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{group_key, task_key, ChordState, PutOutcome, ResultStore, Stored, TaskRecord};
use crate::error::StoreError;
use crate::ids::{GroupId, Namespace, TaskId};
use crate::time::now_epoch;

#[derive(Default)]
pub struct MemoryStore {
    items: Mutex<HashMap<String, (Option<Stored>, String, i64)>>,
    reads: AtomicUsize,
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
        let stored = Stored { status: r.status.clone(), json: r.json.clone() };
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
        self.items.lock().unwrap().remove(&task_key(ns, id));
        Ok(())
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

    async fn get_chord(&self, _ns: &Namespace, _id: &GroupId) -> Result<Option<ChordState>, StoreError> {
        Ok(None)
    }
}
