//! The engine's background tasks, all in its one `TaskTracker` and stopped by
//! its one `CancellationToken` at drain: per lane a feeder (WAL backlog and
//! requeued dead letters into the queue) and a start-up probe of the destination;
//! and the tickers — idempotency-key upkeep, WAL retention, free disk under the WAL.

use crate::backoff::Backoff;
use crate::engine::Inner;
use crate::lane::Lane;
use spool_wal::Tracked;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the key index's mark is persisted (expired keys are pruned every
/// 120th tick).
const KEY_MARK_EVERY: Duration = Duration::from_secs(5);
/// How often free disk space under the WAL is read.
const DISK_EVERY: Duration = Duration::from_secs(1);

impl Inner {
    /// Move pending entries from the WAL into the queue as capacity frees: the
    /// backlog found at start (LSN ≤ `boundary`), then requeued dead letters.
    pub(crate) async fn feeder(self: Arc<Self>, lane: Arc<Lane>, boundary: u64) {
        let mut cursor = 0u64;
        loop {
            let space = lane.space.notified();
            if self.stop_background.is_cancelled() {
                return;
            }
            let free = lane.free().min(1024);
            let mut fed = false;
            if free > 0 {
                let requeued = lane.take_requeued(free);
                let from_requeue = !requeued.is_empty();
                // LSNs only: workers read the records back when they take them.
                // The WAL state is scanned off the async threads.
                let (wal, name, asked) = (self.wal.clone(), lane.name.clone(), requeued.clone());
                let scan = tokio::task::spawn_blocking(move || {
                    if from_requeue {
                        // Only what is still pending: a redriven LSN may have
                        // been delivered or failed again meanwhile.
                        asked
                            .into_iter()
                            .filter(|l| wal.status_of(*l) == Some(Tracked::Pending))
                            .collect()
                    } else {
                        wal.pending_lsns_for(&name, cursor, boundary, free)
                    }
                })
                .await;
                let lsns: Vec<u64> = match scan {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(destination = %lane.name, error = %e, "feeder task failed");
                        lane.return_requeued(requeued);
                        tokio::task::yield_now().await;
                        continue;
                    }
                };
                if let Some(&last) = lsns.last() {
                    if lane.try_reserve(lsns.len()) {
                        if !from_requeue {
                            cursor = last;
                        }
                        lane.push(lsns);
                        fed = true;
                    } else if from_requeue {
                        // An ingest took the space meanwhile: wait for more.
                        lane.return_requeued(requeued);
                    }
                } else if from_requeue {
                    fed = true;
                } else if cursor < boundary {
                    cursor = boundary;
                    tracing::info!(destination = %lane.name, "WAL backlog fed into the queue");
                }
            }
            if fed {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = space => {}
                _ = self.stop_background.cancelled() => return,
            }
        }
    }

    /// At start: is the destination there? Until it answers, it is reported
    /// down (`/readyz`, `spool_destination_up`); the first answer migrates its
    /// schema. Writes are accepted all along.
    pub(crate) async fn probe_at_start(self: Arc<Self>, lane: Arc<Lane>) {
        let mut retry = Backoff::new(
            self.cfg.backoff_initial,
            self.cfg.backoff_max,
            self.cfg.backoff_initial / 2,
        );
        loop {
            let res = tokio::select! {
                r = lane.dest.health() => r,
                _ = self.stop_background.cancelled() => return,
            };
            match res {
                Ok(()) => {
                    self.up(&lane);
                    return;
                }
                Err(e) => {
                    if lane.set_down(Some(e.to_string())) {
                        if e.is_transient() {
                            tracing::warn!(destination = %lane.name, error = %e, "destination unavailable at start; accepting writes and probing");
                        } else {
                            // Not an outage that passes by itself (a schema newer
                            // than this build): an operator must act.
                            tracing::error!(destination = %lane.name, error = %e, "destination cannot be used; accepting writes into the WAL and probing");
                        }
                        self.observer.destination_up(&lane.name, false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry.next()) => {}
                _ = self.stop_background.cancelled() => return,
            }
        }
    }

    /// Persist the key index's mark every few seconds and prune expired keys
    /// every ten minutes.
    pub(crate) async fn key_upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(KEY_MARK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.stop_background.cancelled() => return,
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

    /// Delete WAL segments retention allows to go, every `retention_every`.
    pub(crate) async fn retention(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.retention_every) => {}
                _ = self.stop_background.cancelled() => return,
            }
            match self.wal.run_retention().await {
                Ok(r) if r.segments_deleted > 0 => tracing::info!(
                    segments = r.segments_deleted,
                    bytes = r.bytes_freed,
                    "WAL retention removed segments"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "WAL retention failed"),
            }
        }
    }

    /// Keep the low-disk flag current: below `min_free_bytes` writes are refused.
    pub(crate) async fn watch_disk(self: Arc<Self>) {
        loop {
            self.read_disk();
            tokio::select! {
                _ = tokio::time::sleep(DISK_EVERY) => {}
                _ = self.stop_background.cancelled() => return,
            }
        }
    }

    pub(crate) fn read_disk(&self) {
        let min = self.cfg.min_free_bytes;
        if min == 0 {
            return;
        }
        let Ok(free) = fs4::available_space(self.wal.dir()) else {
            return;
        };
        self.free_bytes.store(free, Ordering::Relaxed);
        let low = free < min;
        if self.low_disk.swap(low, Ordering::Relaxed) != low {
            if low {
                tracing::warn!(
                    free,
                    min_free_bytes = min,
                    "disk under the WAL is low; refusing writes"
                );
            } else {
                tracing::info!(free, "disk space under the WAL recovered; accepting writes");
            }
        }
    }
}
