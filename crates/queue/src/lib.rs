//! # spool-queue — the delivery engine
//!
//! [`Engine::ingest`] takes entries, reserves queue capacity for them, appends them
//! to the WAL (group commit, durable per its sync mode), hands them to their
//! destination's bounded queue and answers `{id, lsn}`. Worker tasks take batches,
//! write them to the destination, and append DELIVERED markers; failures retry with
//! capped, jittered exponential backoff and end as dead letters (FAILED records).
//! The HTTP server is a thin front on this crate; a Rust program can embed it.
//!
//! ## Invariants
//! - **Full writes nothing.** Capacity is reserved before the WAL append; a call
//!   that cannot reserve all it needs fails with [`IngestError::Full`] and leaves
//!   no record. A failed append gives the reservation back.
//! - **Every entry ends DELIVERED or FAILED.** An accepted entry is held by exactly
//!   one lane until a worker delivers it (DELIVERED marker), isolates it as poison
//!   or exhausts `max_attempts` (FAILED marker). Its capacity is released then — and
//!   only then, or when shutdown gives up on it (it stays pending in the WAL).
//! - **No entry is stranded.** Entries pending in the WAL at start, and dead letters
//!   requeued by an operator, are fed into the queue by a feeder as capacity frees.
//! - **An outage is not a failure.** Errors are classified by who is to blame
//!   (`DestinationError`): an outage of any kind (unreachable, read-only, full,
//!   locked, timed out) pauses the lane and probes, never counting an attempt;
//!   only an entry's own errors burn attempts or make dead letters. Producers see
//!   `Full` once the queue fills. The engine starts while a destination is down.
//! - **Dead letters wait for an operator**: kept through retention until
//!   [`Engine::requeue`] or [`Engine::purge`]. A requeue that races the failure
//!   being recorded is redriven when the worker lets go of the entry.
//! - **One door.** The server reaches the WAL and destinations only through the
//!   engine; every background task runs in one `TaskTracker` stopped by one
//!   `CancellationToken` at drain.
//! - **Every receipt settles once**: delivered, failed (with reason), or — at its
//!   deadline or at shutdown — still pending ("not confirmed", never a failure).
//! - **Drain runs once**, however often and concurrently [`Engine::shutdown`] is
//!   called; workers are joined before destinations and the WAL are closed.
//! - The ingest critical section (reserve → append → enqueue) runs in its own task,
//!   so a caller that gives up midway cannot leak capacity or strand entries.
//!
//! ## Embedding
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use spool_queue::{Engine, EngineConfig};
//! use spool_wal::{Entry, Wal, WalConfig};
//! let wal = Wal::open("./data/wal", WalConfig::default())?;
//! let sqlite = spool_destination::SqliteDestination::open("main", "./data/spool.db".as_ref(), None, spool_destination::DEFAULT_SQLITE_TIMEOUT)?;
//! let engine = Engine::start(wal, vec![std::sync::Arc::new(sqlite)], EngineConfig::default())?;
//! let receipt = engine
//!     .ingest(vec![Entry::new("agents", "main", br#"{"text":"hi"}"#.to_vec())], true)
//!     .await?;
//! let outcomes = receipt.wait(std::time::Duration::from_secs(5)).await;
//! println!("{:?}", outcomes);
//! engine.shutdown(std::time::Duration::from_secs(30)).await;
//! # Ok(()) }
//! ```

mod backoff;
mod deliver;
pub mod dlq;
mod engine;
mod ingest;
mod keys;
mod lane;
mod memory;
mod tasks;

pub use backoff::{delay as backoff_delay, jittered};
pub use deliver::FORGOTTEN;
pub use dlq::{DlqOutcome, Select};
pub use engine::{Check, Engine, EntryStatus, Found, LaneStats, ShutdownReport};
pub use ingest::PURGED;
pub use memory::{Forget, ForgetError, Forgotten};
pub use spool_wal::{DeadLetter, Entry, LoggedEntry, RecoveryReport, RetentionReport, WalStatus};

use std::time::Duration;
use uuid::Uuid;

/// `[queue]` of spool.toml.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Entries each destination's queue holds (accepted, not yet terminal).
    pub capacity: usize,
    /// Worker tasks per destination.
    pub workers: usize,
    /// Most entries in one destination write.
    pub batch_max: usize,
    /// Longest a worker waits to fill a batch once it has one entry.
    pub batch_linger: Duration,
    /// Attempts before an entry becomes a dead letter.
    pub max_attempts: u32,
    /// First retry delay ceiling.
    pub backoff_initial: Duration,
    /// Largest retry delay ceiling.
    pub backoff_max: Duration,
    /// How long an idempotency key is remembered (per source).
    pub idempotency_window: Duration,
    /// Directory of the idempotency-key index (sled). `None` keeps it in memory
    /// and rebuilds it from the WAL at every start.
    pub key_index: Option<std::path::PathBuf>,
    /// How often WAL retention runs.
    pub retention_every: Duration,
    /// Writes are refused while free disk under the WAL is below this (0: never).
    pub min_free_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            capacity: 10_000,
            workers: 4,
            batch_max: 500,
            batch_linger: Duration::from_millis(5),
            max_attempts: 10,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(60),
            idempotency_window: Duration::from_secs(24 * 3600),
            key_index: None,
            retention_every: Duration::from_secs(60),
            min_free_bytes: 0,
        }
    }
}

/// What `ingest` answers per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Entry id.
    pub id: Uuid,
    /// LSN of its WAL record.
    pub lsn: u64,
    /// True when its idempotency key was accepted before: `id`/`lsn` are the
    /// original's and nothing new was written.
    pub replayed: bool,
}

/// How an entry ended, as a receipt reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// In the destination.
    Delivered,
    /// A dead letter.
    Failed {
        /// Why.
        reason: String,
    },
    /// Not confirmed yet: still in flight (deadline passed, or shutdown). Never a failure.
    Pending,
}

/// Why `ingest` refused a call. Nothing of the call was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The destination's queue has no room for the call.
    #[error("queue of destination {destination} is full; retry after {retry_after:?}")]
    Full {
        /// The full destination.
        destination: String,
        /// Suggested wait, from the current drain rate.
        retry_after: Duration,
    },
    /// The WAL is at `wal.max_bytes` and no delivered segment is left to
    /// delete: the backlog waits on disk, up to the quota, like a full queue.
    #[error("the WAL is at its quota ({used} of {limit} bytes); retry after {retry_after:?}")]
    WalFull {
        /// Bytes the WAL holds.
        used: u64,
        /// `wal.max_bytes`.
        limit: u64,
        /// Suggested wait, from the drain rate of the destinations written to.
        retry_after: Duration,
    },
    /// The engine is shutting down.
    #[error("shutting down")]
    Closed,
    /// Free disk under the WAL is below `min_free_bytes`.
    #[error("{free} bytes free under the WAL, below the minimum of {min}")]
    LowDisk {
        /// Free bytes (last reading).
        free: u64,
        /// The configured minimum.
        min: u64,
    },
    /// An entry names a destination the engine does not have.
    #[error("unknown destination {0:?}")]
    UnknownDestination(String),
    /// The WAL could not take the entries (disk full, quota, I/O, too large).
    #[error(transparent)]
    Wal(#[from] spool_wal::WalError),
}

/// Receives the engine's events for metrics. Called on hot paths: keep it cheap.
pub trait EngineObserver: Send + Sync + 'static {
    /// Entries of `source` were accepted.
    fn accepted(&self, source: &str, n: u64) {
        let _ = (source, n);
    }
    /// Entries of `source` were refused because a queue was full.
    fn shed(&self, source: &str, n: u64) {
        let _ = (source, n);
    }
    /// Entries reached `destination`; `accepted_at_us` lets you observe accept→delivered.
    fn delivered(&self, destination: &str, accepted_at_us: &[i64]) {
        let _ = (destination, accepted_at_us);
    }
    /// A batch write to `destination` is retried.
    fn retry(&self, destination: &str) {
        let _ = destination;
    }
    /// Entries became dead letters; `reason` is "rejected" or "max_attempts".
    fn failed(&self, destination: &str, reason: &'static str, n: u64) {
        let _ = (destination, reason, n);
    }
    /// `n` entries of a delivered batch were already in `destination` (a
    /// redelivery, or a keyed entry another node stored first).
    fn duplicates(&self, destination: &str, n: u64) {
        let _ = (destination, n);
    }
    /// `destination` went down (outage detected) or came back.
    fn destination_up(&self, destination: &str, up: bool) {
        let _ = (destination, up);
    }
}

/// An observer that ignores everything.
pub struct NoObserver;
impl EngineObserver for NoObserver {}

/// The outcome handles of one `ingest` call.
#[derive(Debug)]
pub struct Receipt {
    /// Per entry, in the order given: id and LSN (durable).
    pub accepted: Vec<Accepted>,
    waiters: Vec<tokio::sync::oneshot::Receiver<Outcome>>,
}

impl Receipt {
    /// Whether any entry was answered from its idempotency key (nothing new written for it).
    pub fn any_replayed(&self) -> bool {
        self.accepted.iter().any(|a| a.replayed)
    }

    /// Wait, without a deadline, until every entry settles (delivered, failed, or
    /// pending at shutdown — shutdown settles every receipt, so this never hangs
    /// past it).
    pub async fn outcomes(self) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(self.accepted.len());
        if self.waiters.is_empty() {
            out.resize(self.accepted.len(), Outcome::Pending);
        }
        for rx in self.waiters {
            out.push(rx.await.unwrap_or(Outcome::Pending));
        }
        out
    }

    /// Wait until every entry is delivered or failed, or `timeout` passes (those
    /// still in flight report [`Outcome::Pending`]). Without waiters (ingest was
    /// called with `track = false`) everything is `Pending` at once.
    pub async fn wait(self, timeout: Duration) -> Vec<Outcome> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(self.accepted.len());
        if self.waiters.is_empty() {
            out.resize(self.accepted.len(), Outcome::Pending);
            return out;
        }
        for rx in self.waiters {
            out.push(match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(o)) => o,
                _ => Outcome::Pending,
            });
        }
        out
    }
}
