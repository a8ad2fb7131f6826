//! The engine: its state, its public API (the one door the server and embedders
//! use), the accept path and the drain. Workers live in `deliver.rs`, the feeder
//! and tickers in `tasks.rs`.

use crate::dlq::{self, DlqOutcome, Select};
use crate::keys::KeyIndex;
use crate::lane::Lane;
use crate::{EngineConfig, EngineObserver, IngestError, NoObserver, Outcome, Receipt};
use spool_destination::{Destination, DestinationError, Page, Query};
use spool_wal::{
    DeadLetter, Entry, RecoveryReport, RetentionReport, Tracked, Wal, WalError, WalStatus,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, OnceCell};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// The delivery engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub wal: Wal,
    pub cfg: EngineConfig,
    pub lanes: HashMap<String, Arc<Lane>>,
    pub observer: Arc<dyn EngineObserver>,
    pub closed: AtomicBool,
    ingests: TaskTracker,
    /// Receipt senders by LSN (several when idempotent replays wait on one entry).
    pub waiters: Mutex<HashMap<u64, Vec<oneshot::Sender<Outcome>>>>,
    pub keys: KeyIndex,
    workers: TaskTracker,
    /// Feeders, start-up probes and tickers.
    background: TaskTracker,
    /// Cancelled when the drain deadline passes: workers stop mid-retry.
    pub stop: CancellationToken,
    /// Cancelled at drain: every background task stops.
    pub stop_background: CancellationToken,
    drained: OnceCell<ShutdownReport>,
    /// Free bytes under the WAL (last reading) and whether below `min_free_bytes`.
    pub free_bytes: AtomicU64,
    pub low_disk: AtomicBool,
    /// The last append failed (cleared by the next success).
    pub wal_failing: AtomicBool,
    /// Requeue and purge one at a time (each reads the dead letters, then writes).
    dlq_ops: tokio::sync::Mutex<()>,
    /// Wakes the tombstone task (a forget was appended).
    pub tombstones: tokio::sync::Notify,
}

/// Figures of one destination's lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneStats {
    /// Destination name.
    pub destination: String,
    /// Entries waiting for a worker.
    pub depth: usize,
    /// Entries accepted and not yet terminal (queued + being delivered).
    pub in_flight: usize,
    /// Capacity.
    pub capacity: usize,
    /// False while the destination is unavailable (at start, or an outage).
    pub up: bool,
    /// Why it is down, while it is.
    pub down_reason: Option<String>,
}

/// What a drain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether the deadline passed before every queued entry was delivered.
    pub deadline_passed: bool,
    /// Entries left pending in the WAL (delivered after the next start).
    pub left_pending: usize,
}

/// Where an entry is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryStatus {
    /// Accepted (durable in the WAL), not delivered yet.
    Pending,
    /// In its destination.
    Delivered {
        /// When the destination committed it (µs since the epoch).
        delivered_at_us: i64,
    },
    /// A dead letter.
    Failed {
        /// Delivery attempts made.
        attempts: u32,
        /// Why.
        reason: String,
    },
    /// A dead letter an operator purged: never delivered.
    Purged,
}

impl From<Tracked> for EntryStatus {
    fn from(t: Tracked) -> Self {
        match t {
            Tracked::Pending => EntryStatus::Pending,
            Tracked::Dead { attempts, reason } => EntryStatus::Failed { attempts, reason },
        }
    }
}

/// An entry found by [`Engine::get`].
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// LSN of its WAL record.
    pub lsn: u64,
    /// The entry.
    pub entry: Entry,
    /// Its status.
    pub status: EntryStatus,
}

/// One readiness check: its name and, when failing, why.
pub type Check = (String, Result<(), String>);

impl Engine {
    /// Start workers and background tasks. Must run inside a tokio runtime.
    /// Opens the idempotency-key index and catches it up with the WAL (reading
    /// the WAL when the index is new or in memory); fails only if the index
    /// cannot be opened or rebuilt. Destinations need not be reachable: they are
    /// probed in the background and reported down until they answer.
    pub fn start(
        wal: Wal,
        destinations: Vec<Arc<dyn Destination>>,
        cfg: EngineConfig,
    ) -> std::io::Result<Engine> {
        Self::start_with_observer(wal, destinations, cfg, Arc::new(NoObserver))
    }

    /// [`Engine::start`] with an observer for metrics.
    pub fn start_with_observer(
        wal: Wal,
        destinations: Vec<Arc<dyn Destination>>,
        cfg: EngineConfig,
        observer: Arc<dyn EngineObserver>,
    ) -> std::io::Result<Engine> {
        let keys = KeyIndex::open(cfg.key_index.as_deref(), cfg.idempotency_window, &wal)?;
        let mut lanes = HashMap::new();
        for d in destinations {
            let lane = Arc::new(Lane::new(d, cfg.capacity.max(1)));
            lanes.insert(lane.name.clone(), lane);
        }
        let boundary = wal.status().visible_lsn;
        let inner = Arc::new(Inner {
            wal,
            cfg,
            lanes,
            observer,
            closed: AtomicBool::new(false),
            ingests: TaskTracker::new(),
            waiters: Mutex::new(HashMap::new()),
            keys,
            workers: TaskTracker::new(),
            background: TaskTracker::new(),
            stop: CancellationToken::new(),
            stop_background: CancellationToken::new(),
            drained: OnceCell::new(),
            free_bytes: AtomicU64::new(u64::MAX),
            low_disk: AtomicBool::new(false),
            wal_failing: AtomicBool::new(false),
            dlq_ops: tokio::sync::Mutex::new(()),
            tombstones: tokio::sync::Notify::new(),
        });
        inner.read_disk();
        let bg = &inner.background;
        for lane in inner.lanes.values() {
            for _ in 0..inner.cfg.workers.max(1) {
                inner.workers.spawn(inner.clone().worker(lane.clone()));
            }
            bg.spawn(inner.clone().feeder(lane.clone(), boundary));
            bg.spawn(inner.clone().probe_at_start(lane.clone()));
        }
        bg.spawn(inner.clone().key_upkeep());
        bg.spawn(inner.clone().retention());
        bg.spawn(inner.clone().watch_disk());
        bg.spawn(inner.clone().tombstone_task());
        let orphans = inner.wal.status().pending
            - inner
                .lanes
                .keys()
                .map(|d| inner.wal.pending_count_for(d))
                .sum::<u64>();
        if orphans > 0 {
            tracing::warn!(
                entries = orphans,
                "WAL holds pending entries for destinations that are not configured; they stay pending"
            );
        }
        Ok(Engine { inner })
    }

    /// Accept entries: reserve capacity, append to the WAL (durable), queue them.
    /// With `track`, the receipt can wait for each entry's outcome.
    pub async fn ingest(&self, entries: Vec<Entry>, track: bool) -> Result<Receipt, IngestError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(IngestError::Closed);
        }
        let inner = self.inner.clone();
        // Its own task: a caller that gives up cannot interrupt reserve → append → enqueue.
        self.inner
            .ingests
            .spawn(async move { inner.ingest(entries, track).await })
            .await
            .unwrap_or(Err(IngestError::Closed))
    }

    /// Names of the destinations.
    pub fn destinations(&self) -> Vec<String> {
        self.inner.lanes.keys().cloned().collect()
    }

    fn lane(&self, destination: &str) -> Result<&Arc<Lane>, DestinationError> {
        self.inner
            .lanes
            .get(destination)
            .ok_or_else(|| DestinationError::Config(format!("unknown destination {destination:?}")))
    }

    /// A page of one source's delivered entries in `destination`.
    pub async fn query(&self, destination: &str, q: &Query) -> Result<Page, DestinationError> {
        self.lane(destination)?.dest.query(q).await
    }

    /// Status of the entry at `lsn` while the WAL knows more than "done":
    /// pending, a dead letter, or purged; `None` once it is delivered (or for an
    /// LSN never accepted).
    pub fn status(&self, lsn: u64) -> Option<EntryStatus> {
        self.inner.status_of(lsn)
    }

    /// An entry of `source` by id, wherever it is: pending or dead in the WAL, or
    /// delivered to `destination` (the source's destination).
    pub async fn get(
        &self,
        source: &str,
        destination: &str,
        id: Uuid,
    ) -> Result<Option<Found>, DestinationError> {
        // Forgotten: gone, even before the destination has applied the delete.
        if self.inner.wal.forgot_id(source, id).is_some() {
            return Ok(None);
        }
        if let Some(st) = self.inner.wal.lookup(id) {
            let wal = self.inner.wal.clone();
            let read = tokio::task::spawn_blocking(move || wal.read_entries(&[st.lsn])).await;
            if let Ok(Ok(mut v)) = read {
                // Read after the lookup: it may have been delivered meanwhile;
                // then the destination has it (below).
                if let (Some(le), Some(status)) = (v.pop(), self.inner.wal.status_of(st.lsn)) {
                    // Forgotten by subject while pending: gone for readers too.
                    if le.entry.source != source || self.inner.wal.forgets(&le) {
                        return Ok(None);
                    }
                    return Ok(Some(Found {
                        lsn: le.lsn,
                        entry: le.entry,
                        status: status.into(),
                    }));
                }
            }
        }
        let stored = self.lane(destination)?.dest.get(source, id).await?;
        Ok(stored.map(|s| Found {
            lsn: s.lsn,
            entry: s.entry,
            status: EntryStatus::Delivered {
                delivered_at_us: s.delivered_at_us,
            },
        }))
    }

    /// Figures of every lane.
    pub fn lanes(&self) -> Vec<LaneStats> {
        let mut v: Vec<LaneStats> = self
            .inner
            .lanes
            .values()
            .map(|l| (l, l.down_reason()))
            .map(|(l, down)| LaneStats {
                destination: l.name.clone(),
                depth: l.depth(),
                in_flight: l.used(),
                capacity: l.capacity,
                up: down.is_none(),
                down_reason: down,
            })
            .collect();
        v.sort_by(|a, b| a.destination.cmp(&b.destination));
        v
    }

    /// Live figures of the WAL.
    pub fn wal_status(&self) -> WalStatus {
        self.inner.wal.status()
    }

    /// What WAL recovery found at start.
    pub fn recovery_report(&self) -> &RecoveryReport {
        self.inner.wal.recovery_report()
    }

    /// Run a WAL retention pass now (the engine runs one every `retention_every`).
    pub async fn run_retention(&self) -> Result<RetentionReport, WalError> {
        self.inner.wal.run_retention().await
    }

    /// Readiness: the WAL writes, the disk under it is above `min_free_bytes`,
    /// every destination is up (its breaker closed and its health check passing
    /// within 2 s).
    pub async fn readiness(&self) -> Vec<Check> {
        let inner = &self.inner;
        let mut checks: Vec<Check> = vec![(
            "wal".into(),
            if inner.wal_failing.load(Ordering::Relaxed) {
                Err("the last WAL append failed".into())
            } else {
                Ok(())
            },
        )];
        if inner.cfg.min_free_bytes > 0 {
            inner.read_disk();
            let (free, min) = (
                inner.free_bytes.load(Ordering::Relaxed),
                inner.cfg.min_free_bytes,
            );
            checks.push((
                "disk".into(),
                if free >= min {
                    Ok(())
                } else {
                    Err(format!(
                        "{free} bytes free under the WAL, below wal.min_free_bytes ({min})"
                    ))
                },
            ));
        }
        let mut lanes: Vec<&Arc<Lane>> = inner.lanes.values().collect();
        lanes.sort_by(|a, b| a.name.cmp(&b.name));
        for l in lanes {
            let r = match l.down_reason() {
                Some(why) => Err(why),
                None => match tokio::time::timeout(Duration::from_secs(2), l.dest.health()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("health check timed out".into()),
                },
            };
            checks.push((format!("destination:{}", l.name), r));
        }
        checks
    }

    /// Receipt handles waiting for outcomes (bounded by the clients waiting).
    pub fn waiting(&self) -> usize {
        self.inner
            .waiters
            .lock()
            .unwrap()
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Dead letters, oldest first.
    pub fn dead_letters(&self, source: Option<&str>, limit: usize) -> Vec<DeadLetter> {
        self.inner.wal.dead_letters(source, limit)
    }

    /// Requeue dead letters: pending again (durably) and fed to their
    /// destination's queue as it has room.
    pub async fn requeue(&self, which: Select<'_>) -> Result<DlqOutcome, WalError> {
        let _one = self.inner.dlq_ops.lock().await;
        let out = dlq::requeue(&self.inner.wal, which).await?;
        for d in &out.done {
            if let Some(lane) = self.inner.lanes.get(&d.destination) {
                lane.add_requeued([d.lsn]);
            }
        }
        Ok(out)
    }

    /// Purge dead letters: terminal without delivery (durably); their WAL
    /// segments may then go.
    pub async fn purge(&self, which: Select<'_>) -> Result<DlqOutcome, WalError> {
        let _one = self.inner.dlq_ops.lock().await;
        dlq::purge(&self.inner.wal, which).await
    }

    /// Stop accepting, deliver what is queued until `timeout`, join the workers,
    /// settle every receipt, sync and close the WAL and destinations. Runs once;
    /// every call (also concurrent ones) gets the same report.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let inner = self.inner.clone();
        self.inner
            .drained
            .get_or_init(|| inner.drain(timeout))
            .await
            .clone()
    }

    /// Whether shutdown has begun.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }
}

impl Inner {
    pub(crate) fn status_of(&self, lsn: u64) -> Option<EntryStatus> {
        match self.wal.status_of(lsn) {
            Some(t) => Some(t.into()),
            None if self.wal.is_purged(lsn) => Some(EntryStatus::Purged),
            None => None,
        }
    }

    async fn drain(self: Arc<Self>, timeout: Duration) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + timeout;
        self.closed.store(true, Ordering::SeqCst);
        self.ingests.close();
        let _ = tokio::time::timeout_at(deadline, self.ingests.wait()).await;
        self.stop_background.cancel();
        self.background.close();
        // Bounded too: a feeder mid-read or the key index mid-flush must not
        // hold the workers' deadline hostage.
        let _ = tokio::time::timeout_at(deadline, self.background.wait()).await;
        for lane in self.lanes.values() {
            lane.close();
        }
        self.workers.close();
        let mut report = ShutdownReport::default();
        if tokio::time::timeout_at(deadline, self.workers.wait())
            .await
            .is_err()
        {
            report.deadline_passed = true;
            self.stop.cancel();
            self.workers.wait().await;
        }
        for lane in self.lanes.values() {
            report.left_pending += lane.abandon();
        }
        // Receipts of entries still in flight settle as "not confirmed".
        let rest: Vec<_> = self.waiters.lock().unwrap().drain().collect();
        for tx in rest.into_iter().flat_map(|(_, v)| v) {
            let _ = tx.send(Outcome::Pending);
        }
        self.keys.mark(&self.wal).await;
        report.left_pending = report.left_pending.max(self.wal.status().pending as usize);
        if let Err(e) = self.wal.sync().await {
            tracing::error!(error = %e, "final WAL sync failed");
        }
        for lane in self.lanes.values() {
            lane.dest.close().await;
        }
        let wal = self.wal.clone();
        let _ = tokio::task::spawn_blocking(move || wal.close()).await;
        tracing::info!(
            left_pending = report.left_pending,
            deadline_passed = report.deadline_passed,
            "engine drained"
        );
        report
    }
}
