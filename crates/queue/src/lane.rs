//! One destination's lane: its bounded capacity, the entries waiting for a
//! worker — by LSN only: their records are in the WAL, read back when a worker
//! takes them ([`spool_wal::Wal::read_queued`]) — and the set of LSNs held
//! (queued or being delivered). Both are compressed bitmaps (a queued entry
//! costs well under a byte of them: a lane's LSNs are nearly dense), and
//! workers take the lowest LSNs queued, so the oldest entries go first.
//!
//! Capacity is reserved *before* the WAL append and released when an entry is
//! terminal (delivered or failed) or dropped at shutdown. An entry is held from
//! the moment it is pushed until it is released; an LSN that is held is never
//! queued twice, so nothing is delivered twice by the same process. An LSN pushed
//! while still held (a dead letter requeued while its worker is still recording
//! the failure) is redriven once it is released, never dropped.

use roaring::RoaringTreemap;
use spool_destination::Destination;
use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub(crate) struct Lane {
    pub dest: Arc<dyn Destination>,
    pub name: String,
    pub capacity: usize,
    used: AtomicUsize,
    state: Mutex<LaneState>,
    /// Entries were pushed, or the lane closed.
    pub work: Notify,
    /// Capacity was released, or requeued entries await feeding.
    pub space: Notify,
    /// Why the destination is down (the last outage error); `None` while up.
    down: Mutex<Option<String>>,
    rate: Mutex<Rate>,
}

#[derive(Default)]
struct LaneState {
    /// Queued, not yet taken.
    items: RoaringTreemap,
    /// Queued or being delivered.
    held: RoaringTreemap,
    closed: bool,
    /// Requeued dead letters waiting for the feeder.
    requeued: BTreeSet<u64>,
    /// Pushed while held: requeued when released.
    redrive: HashSet<u64>,
}

/// Delivered entries per second, over windows of about a second.
struct Rate {
    since: Instant,
    count: u64,
    per_sec: f64,
}

impl Lane {
    pub fn new(dest: Arc<dyn Destination>, capacity: usize) -> Lane {
        Lane {
            name: dest.name().to_owned(),
            dest,
            capacity,
            used: AtomicUsize::new(0),
            state: Mutex::new(LaneState::default()),
            work: Notify::new(),
            space: Notify::new(),
            down: Mutex::new(None),
            rate: Mutex::new(Rate {
                since: Instant::now(),
                count: 0,
                per_sec: 0.0,
            }),
        }
    }

    fn st(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserve `n` slots, all or none.
    pub fn try_reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.capacity).then_some(u + n)
            })
            .is_ok()
    }

    /// Give back `n` reserved slots that were never pushed (a failed append).
    pub fn unreserve(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.space.notify_waiters();
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.used())
    }

    /// Queue reserved entries for the workers. Entries already held are not
    /// queued again (their reservation is given back): they are fed again once
    /// released, in case their holder ends them before they were pushed.
    pub fn push(&self, lsns: impl IntoIterator<Item = u64>) {
        let mut dup = 0;
        {
            let mut st = self.st();
            for lsn in lsns {
                if st.held.insert(lsn) {
                    st.items.insert(lsn);
                } else {
                    st.redrive.insert(lsn);
                    dup += 1;
                }
            }
        }
        if dup > 0 {
            self.unreserve(dup);
        }
        self.work.notify_waiters();
    }

    /// Entries are terminal (or dropped at shutdown): free their slots.
    pub fn release(&self, lsns: &[u64], delivered: bool) {
        {
            let mut st = self.st();
            for l in lsns {
                st.held.remove(*l);
                if st.redrive.remove(l) {
                    st.requeued.insert(*l);
                }
            }
        }
        self.used.fetch_sub(lsns.len(), Ordering::AcqRel);
        if delivered {
            let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
            r.count += lsns.len() as u64;
            let el = r.since.elapsed();
            if el >= Duration::from_secs(1) {
                r.per_sec = r.count as f64 / el.as_secs_f64();
                r.count = 0;
                r.since = Instant::now();
            }
        }
        self.space.notify_waiters();
    }

    /// Seconds a producer should wait before retrying: the time the current drain
    /// rate needs to empty the queue, at least 1 s, at most 60 s (10 s when
    /// nothing is draining, e.g. during an outage).
    pub fn retry_after(&self) -> Duration {
        let rate = self.rate.lock().unwrap_or_else(|p| p.into_inner()).per_sec;
        let secs = if rate < 1.0 {
            10.0
        } else {
            (self.used() as f64 / rate).ceil()
        };
        Duration::from_secs(secs.clamp(1.0, 60.0) as u64)
    }

    /// Take up to `max` entries, waiting up to `linger` for a fuller batch once
    /// the first entry is there. `None` when the lane is closed and empty.
    pub async fn take(&self, max: usize, linger: Duration) -> Option<Vec<u64>> {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let notified = self.work.notified();
            {
                let mut st = self.st();
                if !st.items.is_empty() {
                    let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + linger);
                    if st.items.len() >= max as u64 || st.closed || tokio::time::Instant::now() >= d
                    {
                        let lsns: Vec<u64> = st.items.iter().take(max).collect();
                        let last = *lsns.last().expect("items is not empty");
                        st.items.remove_range(..=last);
                        return Some(lsns);
                    }
                } else if st.closed {
                    return None;
                } else {
                    // Another worker took what was there: wait for new work afresh.
                    deadline = None;
                }
            }
            match deadline {
                Some(d) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(d) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Stop taking new work: workers finish what is queued, then see `None`.
    pub fn close(&self) {
        self.st().closed = true;
        self.work.notify_waiters();
        self.space.notify_waiters();
    }

    pub fn depth(&self) -> usize {
        self.st().items.len() as usize
    }

    /// Drop whatever is still queued (shutdown deadline): it stays pending in the WAL.
    pub fn abandon(&self) -> usize {
        let lsns: Vec<u64> = std::mem::take(&mut self.st().items).into_iter().collect();
        self.release(&lsns, false);
        lsns.len()
    }

    pub fn add_requeued(&self, lsns: impl IntoIterator<Item = u64>) {
        self.st().requeued.extend(lsns);
        self.space.notify_waiters();
    }

    /// Requeued LSNs the feeder took but found no room for: back in the set,
    /// without waking the feeder (it waits for capacity instead).
    pub fn return_requeued(&self, lsns: impl IntoIterator<Item = u64>) {
        self.st().requeued.extend(lsns);
    }

    /// Mark the destination down with why (`Some`) or up (`None`). Answers
    /// whether up/down changed.
    pub fn set_down(&self, reason: Option<String>) -> bool {
        let mut d = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let changed = d.is_some() != reason.is_some();
        *d = reason;
        changed
    }

    /// Why the destination is down; `None` while it is up.
    pub fn down_reason(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Up to `n` requeued LSNs to feed, removed from the set.
    pub fn take_requeued(&self, n: usize) -> Vec<u64> {
        let mut st = self.st();
        let v: Vec<u64> = st.requeued.iter().copied().take(n).collect();
        for l in &v {
            st.requeued.remove(l);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spool_destination::{DestinationError, Page, Query, StoredEntry};
    use spool_wal::LoggedEntry;

    struct Nowhere;

    #[async_trait::async_trait]
    impl Destination for Nowhere {
        fn name(&self) -> &str {
            "nowhere"
        }
        async fn write_batch(&self, _: &[LoggedEntry]) -> Result<u64, DestinationError> {
            Ok(0)
        }
        async fn get(
            &self,
            _: &str,
            _: uuid::Uuid,
        ) -> Result<Option<StoredEntry>, DestinationError> {
            Ok(None)
        }
        async fn query(&self, _: &Query) -> Result<Page, DestinationError> {
            Ok(Page::default())
        }
        async fn search(
            &self,
            _: &spool_destination::Search,
        ) -> Result<Vec<spool_destination::Hit>, DestinationError> {
            Ok(Vec::new())
        }
        async fn forget(&self, _: &spool_destination::Tombstone) -> Result<u64, DestinationError> {
            Ok(0)
        }
        async fn health(&self) -> Result<(), DestinationError> {
            Ok(())
        }
        async fn close(&self) {}
    }

    /// A dead letter requeued while its worker still holds it (the FAILED record
    /// is written, the release not yet done): the feeder's push finds it held.
    /// It must be fed again once released — before, it was dropped and stayed
    /// pending in the WAL, unqueued, until a restart.
    #[test]
    fn a_requeue_that_races_the_failure_is_redriven_at_release() {
        let lane = Lane::new(Arc::new(Nowhere), 10);
        assert!(lane.try_reserve(1));
        lane.push([7]);
        assert!(lane.st().items.remove(7), "a worker takes it");
        // The requeue's feed of LSN 7 arrives while it is still held.
        assert!(lane.try_reserve(1));
        lane.push([7]);
        assert_eq!(lane.used(), 1, "the duplicate's reservation is given back");
        assert!(
            lane.take_requeued(10).is_empty(),
            "nothing to feed while held"
        );
        // The worker records the failure and lets go: the requeue is fed now.
        lane.release(&[7], false);
        assert_eq!(lane.take_requeued(10), vec![7]);
        assert_eq!(lane.used(), 0);
    }

    /// Pushes that arrive out of LSN order (two ingests finishing in the other
    /// order, the feeder's backlog) are taken lowest first, each once.
    #[tokio::test]
    async fn workers_take_the_lowest_lsns_queued_first() {
        let lane = Lane::new(Arc::new(Nowhere), 10);
        assert!(lane.try_reserve(6));
        lane.push([9, 5]);
        lane.push([1, 70_000, 3, 5]);
        assert_eq!(lane.used(), 5, "the second 5 is held already");
        assert_eq!(lane.depth(), 5);
        let none = Duration::ZERO;
        assert_eq!(lane.take(2, none).await, Some(vec![1, 3]));
        assert_eq!(lane.take(10, none).await, Some(vec![5, 9, 70_000]));
        assert_eq!(lane.depth(), 0);
        lane.release(&[1, 3, 5, 9, 70_000], true);
        assert_eq!(lane.used(), 0);
        lane.close();
        assert_eq!(lane.take(10, none).await, None);
    }
}
