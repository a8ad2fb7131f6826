//! The engine: accept path, workers, feeders, drain.

use crate::backoff;
use crate::keys::{Claim, KeyIndex};
use crate::lane::Lane;
use crate::{Accepted, EngineConfig, EngineObserver, IngestError, NoObserver, Outcome, Receipt};
use spool_destination::{Destination, DestinationError};
use spool_wal::{DeadLetter, Entry, LoggedEntry, Tracked, Wal};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, OnceCell};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// How one entry of an ingest call is answered.
enum Plan {
    /// Written: index into the call's written entries.
    Write(usize),
    /// Answered from its idempotency key.
    Replay(Accepted),
    /// A repeat of an earlier entry (index) of the same call.
    SameAs(usize),
}

/// The delivery engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    wal: Wal,
    cfg: EngineConfig,
    lanes: HashMap<String, Arc<Lane>>,
    observer: Arc<dyn EngineObserver>,
    closed: AtomicBool,
    ingests: TaskTracker,
    /// Receipt senders by LSN (several when idempotent replays wait on one entry).
    waiters: Mutex<HashMap<u64, Vec<oneshot::Sender<Outcome>>>>,
    keys: KeyIndex,
    workers: Mutex<Vec<JoinHandle<()>>>,
    feeders: Mutex<Vec<JoinHandle<()>>>,
    /// Cancelled when the drain deadline passes: workers stop mid-retry.
    stop: CancellationToken,
    stop_feeding: CancellationToken,
    drained: OnceCell<ShutdownReport>,
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
    /// False while an outage is detected.
    pub up: bool,
}

/// What a drain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether the deadline passed before every queued entry was delivered.
    pub deadline_passed: bool,
    /// Entries left pending in the WAL (delivered after the next start).
    pub left_pending: usize,
}

impl Engine {
    /// Start workers and feeders for each destination. Must run inside a tokio
    /// runtime. Opens the idempotency-key index and catches it up with the WAL
    /// (reading the WAL when the index is new or in memory); fails only if the
    /// index cannot be opened or rebuilt.
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
            workers: Mutex::new(Vec::new()),
            feeders: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
            stop_feeding: CancellationToken::new(),
            drained: OnceCell::new(),
        });
        for lane in inner.lanes.values() {
            for _ in 0..inner.cfg.workers.max(1) {
                let (i, l) = (inner.clone(), lane.clone());
                inner
                    .workers
                    .lock()
                    .unwrap()
                    .push(tokio::spawn(i.worker(l)));
            }
            let (i, l) = (inner.clone(), lane.clone());
            inner
                .feeders
                .lock()
                .unwrap()
                .push(tokio::spawn(i.feeder(l, boundary)));
        }
        let upkeep = tokio::spawn(inner.clone().key_upkeep());
        inner.feeders.lock().unwrap().push(upkeep);
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

    /// The WAL the engine writes.
    pub fn wal(&self) -> &Wal {
        &self.inner.wal
    }

    /// Names of the destinations.
    pub fn destinations(&self) -> Vec<String> {
        self.inner.lanes.keys().cloned().collect()
    }

    /// A destination by name.
    pub fn destination(&self, name: &str) -> Option<Arc<dyn Destination>> {
        self.inner.lanes.get(name).map(|l| l.dest.clone())
    }

    /// Figures of every lane.
    pub fn lanes(&self) -> Vec<LaneStats> {
        let mut v: Vec<LaneStats> = self
            .inner
            .lanes
            .values()
            .map(|l| LaneStats {
                destination: l.name.clone(),
                depth: l.depth(),
                in_flight: l.used(),
                capacity: l.capacity,
                up: l.up.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by(|a, b| a.destination.cmp(&b.destination));
        v
    }

    /// Pending or dead status of an entry the WAL still tracks (by id).
    pub fn status(&self, id: Uuid) -> Option<(u64, Tracked)> {
        self.inner.wal.lookup(id).map(|s| (s.lsn, s.status))
    }

    /// Dead letters, oldest first.
    pub fn dead_letters(&self, source: Option<&str>, limit: usize) -> Vec<DeadLetter> {
        self.inner.wal.dead_letters(source, limit)
    }

    /// Requeue dead letters by id (`None`: all of them). Returns the ids requeued.
    pub async fn requeue(&self, ids: Option<&[Uuid]>) -> Result<Vec<Uuid>, IngestError> {
        let dead = self.inner.wal.dead_letters(None, usize::MAX);
        let chosen: Vec<&DeadLetter> = match ids {
            None => dead.iter().collect(),
            Some(ids) => dead.iter().filter(|d| ids.contains(&d.id)).collect(),
        };
        let lsns: Vec<u64> = chosen.iter().map(|d| d.lsn).collect();
        let done = self.inner.wal.requeue(&lsns).await?;
        let mut out = Vec::new();
        for d in chosen.into_iter().filter(|d| done.contains(&d.lsn)) {
            if let Some(lane) = self.inner.lanes.get(&d.destination) {
                lane.add_requeued([d.lsn]);
            }
            out.push(d.id);
        }
        Ok(out)
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
    async fn ingest(
        self: Arc<Self>,
        entries: Vec<Entry>,
        track: bool,
    ) -> Result<Receipt, IngestError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(IngestError::Closed);
        }
        if let Some(e) = entries
            .iter()
            .find(|e| !self.lanes.contains_key(&e.destination))
        {
            return Err(IngestError::UnknownDestination(e.destination.clone()));
        }
        let claims = self.claim_keys(&entries).await;
        // Split: what is written, and how each entry of the call is answered.
        let mut write = Vec::new();
        let mut owned: Vec<(Vec<u8>, usize)> = Vec::new();
        let mut plan = Vec::with_capacity(entries.len());
        for (e, c) in entries.into_iter().zip(claims) {
            match c {
                Claim::Unkeyed | Claim::Own(_) => {
                    if let Claim::Own(k) = c {
                        owned.push((k, write.len()));
                    }
                    plan.push(Plan::Write(write.len()));
                    write.push(e);
                }
                Claim::Replay(a) => plan.push(Plan::Replay(a)),
                Claim::SameCall(i) => plan.push(Plan::SameAs(i)),
                Claim::Wait(_) => unreachable!("claim_keys returns no pending claim"),
            }
        }
        // Keyed calls hold the index's recording lock from append to settle, so
        // its persisted mark never covers an entry whose key is not indexed.
        let recording = if owned.is_empty() {
            None
        } else {
            Some(self.keys.recording().await)
        };
        let lsns = match self.append(&write).await {
            Ok(l) => l,
            Err(e) => {
                self.keys
                    .settle(owned.into_iter().map(|(k, _)| (k, None)).collect());
                return Err(e);
            }
        };
        self.keys.settle(
            owned
                .into_iter()
                .map(|(k, j)| (k, Some((write[j].id, lsns[j], write[j].accepted_at_us))))
                .collect(),
        );
        drop(recording);
        let mut accepted: Vec<Accepted> = Vec::with_capacity(plan.len());
        for p in &plan {
            let a = match p {
                Plan::Write(j) => Accepted {
                    id: write[*j].id,
                    lsn: lsns[*j],
                    replayed: false,
                },
                Plan::Replay(a) => a.clone(),
                Plan::SameAs(i) => Accepted {
                    replayed: true,
                    ..accepted[*i].clone()
                },
            };
            accepted.push(a);
        }
        let waiters = if track {
            self.watch(&accepted)
        } else {
            Vec::new()
        };
        for e in &write {
            self.observer.accepted(&e.source, 1);
        }
        let mut by_lane: HashMap<&str, Vec<LoggedEntry>> = HashMap::new();
        for (entry, lsn) in write.into_iter().zip(lsns) {
            let name = self.lanes[&entry.destination].name.as_str();
            by_lane
                .entry(name)
                .or_default()
                .push(LoggedEntry { lsn, entry });
        }
        for (name, v) in by_lane {
            self.lanes[name].push(v);
        }
        Ok(Receipt { accepted, waiters })
    }

    /// Claim the idempotency keys of a call, waiting out concurrent calls that
    /// are writing the same keys.
    async fn claim_keys(&self, entries: &[Entry]) -> Vec<Claim> {
        loop {
            let claims = self.keys.claim(entries);
            let waits: Vec<_> = claims
                .iter()
                .filter_map(|c| match c {
                    Claim::Wait(rx) => Some(rx.clone()),
                    _ => None,
                })
                .collect();
            if waits.is_empty() {
                return claims;
            }
            // Give back what this call claimed (two calls each holding a key the
            // other wants must not wait for each other), wait, then look again.
            let mine = claims
                .into_iter()
                .filter_map(|c| match c {
                    Claim::Own(k) => Some((k, None)),
                    _ => None,
                })
                .collect();
            self.keys.settle(mine);
            for mut rx in waits {
                let _ = rx.wait_for(|settled| *settled).await;
            }
        }
    }

    /// Reserve capacity for `write` (all or nothing), then append it to the WAL.
    /// Nothing is written when capacity is short; a failed append gives it back.
    async fn append(&self, write: &[Entry]) -> Result<Vec<u64>, IngestError> {
        if write.is_empty() {
            return Ok(Vec::new());
        }
        let mut need: Vec<(&Arc<Lane>, usize)> = Vec::new();
        for e in write {
            let lane = &self.lanes[&e.destination];
            match need.iter_mut().find(|(l, _)| Arc::ptr_eq(l, lane)) {
                Some((_, n)) => *n += 1,
                None => need.push((lane, 1)),
            }
        }
        for (i, (lane, n)) in need.iter().enumerate() {
            if !lane.try_reserve(*n) {
                for (l, m) in &need[..i] {
                    l.unreserve(*m);
                }
                for e in write {
                    self.observer.shed(&e.source, 1);
                }
                return Err(IngestError::Full {
                    destination: lane.name.clone(),
                    retry_after: lane.retry_after(),
                });
            }
        }
        self.wal.append(write).await.map_err(|e| {
            for (l, m) in &need {
                l.unreserve(*m);
            }
            IngestError::from(e)
        })
    }

    /// Receipt handles for `accepted`: entries in flight settle later; replays
    /// of entries already terminal settle now.
    fn watch(&self, accepted: &[Accepted]) -> Vec<oneshot::Receiver<Outcome>> {
        let mut w = self.waiters.lock().unwrap();
        accepted
            .iter()
            .map(|a| {
                let (tx, rx) = oneshot::channel();
                // Under the waiters lock: workers record an outcome in the WAL
                // before they settle, so "pending" here means it settles later.
                let now = if a.replayed {
                    match self.wal.status_of(a.lsn) {
                        Some(Tracked::Pending) => None,
                        Some(Tracked::Dead { reason, .. }) => Some(Outcome::Failed { reason }),
                        None => Some(Outcome::Delivered),
                    }
                } else {
                    None
                };
                match now {
                    Some(o) => {
                        let _ = tx.send(o);
                    }
                    None => w.entry(a.lsn).or_default().push(tx),
                }
                rx
            })
            .collect()
    }

    fn settle(&self, lsns: impl IntoIterator<Item = u64>, outcome: &Outcome) {
        let mut w = self.waiters.lock().unwrap();
        for l in lsns {
            for tx in w.remove(&l).into_iter().flatten() {
                let _ = tx.send(outcome.clone());
            }
        }
    }

    async fn worker(self: Arc<Self>, lane: Arc<Lane>) {
        while let Some(batch) = lane
            .take(self.cfg.batch_max.max(1), self.cfg.batch_linger)
            .await
        {
            self.deliver(&lane, batch).await;
            if self.stop.is_cancelled() {
                break;
            }
        }
    }

    /// Deliver a batch until every entry in it is terminal (or the drain deadline
    /// passes, leaving the rest pending in the WAL).
    async fn deliver(&self, lane: &Lane, batch: Vec<LoggedEntry>) {
        let mut work = vec![(batch, 0u32)];
        while let Some((mut b, mut attempts)) = work.pop() {
            loop {
                let res = tokio::select! {
                    r = lane.dest.write_batch(&b) => r,
                    _ = self.stop.cancelled() => {
                        self.give_up(lane, &b);
                        break;
                    }
                };
                match res {
                    Ok(()) => {
                        self.delivered(lane, &b).await;
                        break;
                    }
                    Err(e) if e.is_transient() => {
                        if lane.dest.health().await.is_err() {
                            // An outage: pause and probe; attempts are not burned.
                            self.await_recovery(lane).await;
                            continue;
                        }
                        attempts += 1;
                        if attempts >= self.cfg.max_attempts {
                            self.fail(lane, &b, attempts, &e.to_string(), "max_attempts")
                                .await;
                            break;
                        }
                        self.observer.retry(&lane.name);
                        let d = backoff::jittered(
                            attempts,
                            self.cfg.backoff_initial,
                            self.cfg.backoff_max,
                        );
                        tracing::debug!(destination = %lane.name, attempts, delay_ms = d.as_millis() as u64, error = %e, "retrying batch");
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = self.stop.cancelled() => {}
                        }
                    }
                    Err(DestinationError::Rejected {
                        index: Some(i),
                        reason,
                        ..
                    }) if i < b.len() => {
                        let bad = b.remove(i);
                        self.fail(
                            lane,
                            std::slice::from_ref(&bad),
                            attempts + 1,
                            &reason,
                            "rejected",
                        )
                        .await;
                        if b.is_empty() {
                            break;
                        }
                    }
                    Err(e) => {
                        if b.len() == 1 {
                            self.fail(lane, &b, attempts + 1, &e.to_string(), "rejected")
                                .await;
                        } else {
                            // Some entry of the batch is refused: split to isolate it.
                            let right = b.split_off(b.len() / 2);
                            work.push((right, attempts));
                            work.push((b, attempts));
                        }
                        break;
                    }
                }
            }
            if self.stop.is_cancelled() {
                for (rest, _) in work.drain(..) {
                    self.give_up(lane, &rest);
                }
            }
        }
    }

    async fn await_recovery(&self, lane: &Lane) {
        if lane.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(destination = %lane.name, "destination unreachable; pausing deliveries and probing");
            self.observer.destination_up(&lane.name, false);
        }
        let mut probe = 0u32;
        loop {
            probe = probe.saturating_add(1);
            let d = backoff::jittered(probe, self.cfg.backoff_initial, self.cfg.backoff_max)
                .max(self.cfg.backoff_initial / 2);
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = self.stop.cancelled() => return,
            }
            if lane.dest.health().await.is_ok() {
                if !lane.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(destination = %lane.name, "destination reachable again; resuming deliveries");
                    self.observer.destination_up(&lane.name, true);
                }
                return;
            }
        }
    }

    /// Append a status marker, retrying while the WAL cannot write (a full disk):
    /// an entry is terminal only once its marker is in the WAL, so its capacity
    /// stays held meanwhile. At the drain deadline it gives up; the entry then
    /// stays pending and is redelivered (idempotently) after the next start.
    async fn record<F, Fut>(&self, lane: &Lane, what: &str, append: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = spool_wal::Result<()>>,
    {
        let mut delay = Duration::from_millis(50);
        loop {
            match append().await {
                Ok(()) => return,
                Err(e) if self.stop.is_cancelled() || !e.is_retryable() => {
                    tracing::warn!(destination = %lane.name, error = %e, "could not record {what} in the WAL; the entries stay pending");
                    return;
                }
                Err(e) => {
                    tracing::warn!(destination = %lane.name, error = %e, retry_ms = delay.as_millis() as u64, "could not record {what} in the WAL; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.cancelled() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn delivered(&self, lane: &Lane, b: &[LoggedEntry]) {
        let lsns: Vec<u64> = b.iter().map(|e| e.lsn).collect();
        self.record(lane, "delivery", || self.wal.mark_delivered(&lsns))
            .await;
        let at: Vec<i64> = b.iter().map(|e| e.entry.accepted_at_us).collect();
        self.observer.delivered(&lane.name, &at);
        self.settle(lsns.iter().copied(), &Outcome::Delivered);
        lane.release(&lsns, true);
    }

    async fn fail(
        &self,
        lane: &Lane,
        b: &[LoggedEntry],
        attempts: u32,
        reason: &str,
        class: &'static str,
    ) {
        for e in b {
            self.record(lane, "failure", || {
                self.wal.mark_failed(e.lsn, attempts, reason)
            })
            .await;
        }
        tracing::warn!(destination = %lane.name, entries = b.len(), attempts, reason, "entries became dead letters");
        self.observer.failed(&lane.name, class, b.len() as u64);
        let lsns: Vec<u64> = b.iter().map(|e| e.lsn).collect();
        self.settle(
            lsns.iter().copied(),
            &Outcome::Failed {
                reason: reason.to_owned(),
            },
        );
        lane.release(&lsns, false);
    }

    /// The drain deadline passed: these stay pending in the WAL.
    fn give_up(&self, lane: &Lane, b: &[LoggedEntry]) {
        let lsns: Vec<u64> = b.iter().map(|e| e.lsn).collect();
        self.settle(lsns.iter().copied(), &Outcome::Pending);
        lane.release(&lsns, false);
    }

    /// Move pending entries from the WAL into the queue as capacity frees: the
    /// backlog found at start (LSN ≤ `boundary`), then requeued dead letters.
    async fn feeder(self: Arc<Self>, lane: Arc<Lane>, boundary: u64) {
        let mut cursor = 0u64;
        loop {
            let space = lane.space.notified();
            if self.stop_feeding.is_cancelled() {
                return;
            }
            let free = lane.free().min(1024);
            let mut fed = false;
            if free > 0 {
                let requeued = lane.take_requeued(free);
                let from_requeue = !requeued.is_empty();
                let (wal, name) = (self.wal.clone(), lane.name.clone());
                let read = if from_requeue {
                    tokio::task::spawn_blocking(move || wal.read_entries(&requeued)).await
                } else if cursor < boundary {
                    tokio::task::spawn_blocking(move || {
                        wal.pending_for(&name, cursor, boundary, free)
                    })
                    .await
                } else {
                    Ok(Ok(Vec::new()))
                };
                match read {
                    Ok(Ok(entries)) if !entries.is_empty() => {
                        let last = entries.iter().map(|e| e.lsn).max().unwrap_or(0);
                        if lane.try_reserve(entries.len()) {
                            if !from_requeue {
                                cursor = last;
                            }
                            lane.push(entries);
                        } else if from_requeue {
                            // An ingest took the space meanwhile: try again later.
                            lane.add_requeued(entries.iter().map(|e| e.lsn));
                        }
                        fed = true;
                    }
                    Ok(Ok(_)) => {
                        if !from_requeue && cursor < boundary {
                            cursor = boundary;
                            tracing::info!(destination = %lane.name, "WAL backlog fed into the queue");
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(destination = %lane.name, error = %e, "feeder could not read the WAL")
                    }
                    Err(e) => {
                        tracing::error!(destination = %lane.name, error = %e, "feeder task failed")
                    }
                }
            }
            if fed {
                continue;
            }
            tokio::select! {
                _ = space => {}
                _ = self.stop_feeding.cancelled() => return,
            }
        }
    }

    /// Persist the key index's mark every few seconds and prune expired keys
    /// every ten minutes, until feeding stops.
    async fn key_upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop_feeding.cancelled() => return,
            }
            self.keys.mark(&self.wal).await;
            if n % 120 == 0 {
                let pruned = self.keys.prune();
                if pruned > 0 {
                    tracing::info!(keys = pruned, "expired idempotency keys pruned");
                }
            }
        }
    }

    async fn drain(self: Arc<Self>, timeout: Duration) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + timeout;
        self.closed.store(true, Ordering::SeqCst);
        self.ingests.close();
        let _ = tokio::time::timeout_at(deadline, self.ingests.wait()).await;
        self.stop_feeding.cancel();
        let feeders: Vec<_> = std::mem::take(&mut *self.feeders.lock().unwrap());
        for f in feeders {
            let _ = f.await;
        }
        for lane in self.lanes.values() {
            lane.close();
        }
        let workers: Vec<_> = std::mem::take(&mut *self.workers.lock().unwrap());
        let mut report = ShutdownReport::default();
        let mut pending = workers.into_iter();
        for w in pending.by_ref() {
            tokio::pin!(w);
            tokio::select! {
                _ = &mut w => {}
                _ = tokio::time::sleep_until(deadline) => {
                    report.deadline_passed = true;
                    self.stop.cancel();
                    let _ = w.await;
                    break;
                }
            }
        }
        if report.deadline_passed {
            for w in pending {
                let _ = w.await;
            }
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
