//! A fault-injecting destination for the retry/backoff logic, and helpers.
#![allow(dead_code)]

use async_trait::async_trait;
use spool_destination::{
    Destination, DestinationError, Hit, Page, Query, Search, StoredEntry, Tombstone,
};
use spool_wal::{Entry, LoggedEntry};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use uuid::Uuid;

/// A destination that keeps rows in memory and fails on command.
pub struct Faulty {
    name: String,
    pub rows: Mutex<HashMap<Uuid, LoggedEntry>>,
    /// Times (tokio clock) of each write attempt.
    pub attempts: Mutex<Vec<tokio::time::Instant>>,
    /// LSNs of every write attempt, in order.
    pub written: Mutex<Vec<u64>>,
    /// Ids of every row ever inserted (also those deleted since).
    pub inserted: Mutex<Vec<Uuid>>,
    /// Failures of unknown cause still to serve (health stays OK).
    pub fail_next: AtomicU32,
    /// Fail every write with an error of unknown cause (health stays OK).
    pub fail_always: AtomicBool,
    /// Down: writes and health checks fail (an outage).
    pub down: AtomicBool,
    /// Writes fail as an outage (read-only, locked) while health passes.
    pub refuse_writes: AtomicBool,
    /// Writes never return.
    pub hang: AtomicBool,
    /// Reject entries whose payload contains "poison" — naming the index, or not.
    pub reject_with_index: AtomicBool,
}

impl Faulty {
    pub fn new(name: &str) -> std::sync::Arc<Faulty> {
        std::sync::Arc::new(Faulty {
            name: name.into(),
            rows: Mutex::default(),
            attempts: Mutex::default(),
            written: Mutex::default(),
            inserted: Mutex::default(),
            fail_next: AtomicU32::new(0),
            fail_always: AtomicBool::new(false),
            down: AtomicBool::new(false),
            refuse_writes: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            reject_with_index: AtomicBool::new(true),
        })
    }

    fn unknown(&self, m: &str) -> DestinationError {
        DestinationError::Transient {
            destination: self.name.clone(),
            message: m.into(),
        }
    }

    fn outage(&self, m: &str) -> DestinationError {
        DestinationError::Unavailable {
            destination: self.name.clone(),
            message: m.into(),
        }
    }

    pub fn row_count(&self) -> usize {
        self.rows.lock().unwrap().len()
    }
}

#[async_trait]
impl Destination for Faulty {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_batch(&self, batch: &[LoggedEntry]) -> Result<u64, DestinationError> {
        self.attempts
            .lock()
            .unwrap()
            .push(tokio::time::Instant::now());
        self.written
            .lock()
            .unwrap()
            .extend(batch.iter().map(|e| e.lsn));
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(self.outage("connection refused"));
        }
        if self.refuse_writes.load(Ordering::SeqCst) {
            return Err(self.outage("read-only transaction"));
        }
        if self.fail_always.load(Ordering::SeqCst) {
            return Err(self.unknown("internal error"));
        }
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(self.unknown("internal error"));
        }
        if let Some(i) = batch
            .iter()
            .position(|e| e.entry.payload.windows(6).any(|w| w == b"poison"))
        {
            return Err(DestinationError::Rejected {
                destination: self.name.clone(),
                index: self.reject_with_index.load(Ordering::SeqCst).then_some(i),
                reason: "constraint violated".into(),
            });
        }
        let mut rows = self.rows.lock().unwrap();
        let mut duplicates = 0;
        for e in batch {
            match rows.entry(e.entry.id) {
                std::collections::hash_map::Entry::Occupied(_) => duplicates += 1,
                std::collections::hash_map::Entry::Vacant(v) => {
                    self.inserted.lock().unwrap().push(e.entry.id);
                    v.insert(e.clone());
                }
            }
        }
        Ok(duplicates)
    }

    async fn get(&self, source: &str, id: Uuid) -> Result<Option<StoredEntry>, DestinationError> {
        let rows = self.rows.lock().unwrap();
        Ok(rows
            .get(&id)
            .filter(|e| e.entry.source == source)
            .map(|e| StoredEntry {
                lsn: e.lsn,
                entry: e.entry.clone(),
                delivered_at_us: 0,
            }))
    }

    async fn query(&self, _q: &Query) -> Result<Page, DestinationError> {
        Ok(Page::default())
    }

    async fn health(&self) -> Result<(), DestinationError> {
        if self.down.load(Ordering::SeqCst) {
            Err(self.outage("connection refused"))
        } else {
            Ok(())
        }
    }

    async fn search(&self, _s: &Search) -> Result<Vec<Hit>, DestinationError> {
        Ok(Vec::new())
    }

    async fn forget(&self, t: &Tombstone) -> Result<u64, DestinationError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(self.outage("connection refused"));
        }
        let mut rows = self.rows.lock().unwrap();
        let before = rows.len();
        rows.retain(|_, le| {
            let e = &le.entry;
            !t.covers_parts(&e.source, e.id, e.subject.as_deref(), e.accepted_at_us)
        });
        Ok((before - rows.len()) as u64)
    }

    async fn close(&self) {}
}

pub fn entry(n: u64) -> Entry {
    Entry::new("agents", "main", format!(r#"{{"n":{n}}}"#).into_bytes())
}

pub fn poison(n: u64) -> Entry {
    Entry::new(
        "agents",
        "main",
        format!(r#"{{"n":{n},"x":"poison"}}"#).into_bytes(),
    )
}

/// A real SQLite destination named `main` at DIR/spool.db.
pub fn sqlite_in(dir: &std::path::Path) -> Arc<spool_destination::SqliteDestination> {
    Arc::new(
        spool_destination::SqliteDestination::open(
            "main",
            &dir.join("spool.db"),
            None,
            spool_destination::DEFAULT_SQLITE_TIMEOUT,
        )
        .unwrap(),
    )
}
