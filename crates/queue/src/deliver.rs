//! Workers: take batches from a lane, write them to the destination, record the
//! outcome in the WAL, settle receipts.
//!
//! The policy follows the error's class (see `DestinationError`):
//! - **Outage** (`Unavailable`/`TimedOut`, or an unknown error while the health
//!   check fails): a timed-out batch of several entries is split first (a smaller
//!   one may pass in time); otherwise the breaker opens — the lane is marked down, the worker waits with
//!   backoff and retries the same batch (the write is the probe). No attempt is
//!   counted, so an outage of any kind never makes a dead letter.
//! - **Rejected**: the entry named (or, unnamed, found by splitting the batch)
//!   becomes a dead letter at once; the rest is delivered.
//! - **Unknown cause** (`Transient`): a batch is split so one entry's error cannot
//!   fail the others; a single entry retries with backoff, counting attempts, and
//!   becomes a dead letter after `max_attempts`.

use crate::backoff::Backoff;
use crate::engine::Inner;
use crate::lane::Lane;
use crate::Outcome;
use spool_destination::DestinationError;
use spool_wal::{LoggedEntry, ReadBack, Tracked, WalError};
use std::sync::Arc;
use std::time::Duration;

/// The reason a receipt reports for an entry forgotten before it was delivered.
pub const FORGOTTEN: &str = "forgotten before delivery";

impl Inner {
    pub(crate) async fn worker(self: Arc<Self>, lane: Arc<Lane>) {
        while let Some(lsns) = lane
            .take(self.cfg.batch_max.max(1), self.cfg.batch_linger)
            .await
        {
            // Read the batch back from the WAL and deliver what was read; what
            // could not be read for an I/O error (a local fault the entry did
            // not cause: no attempt is counted, like an outage) is read again
            // with backoff until it reads or the drain deadline passes.
            let (mut todo, mut retry) = (lsns, self.backoff());
            loop {
                let (batch, unread) = self.read_back(&lane, todo).await;
                if !batch.is_empty() {
                    self.deliver(&lane, batch).await;
                }
                let Some((_, first)) = unread.first() else {
                    break;
                };
                let d = retry.next();
                tracing::warn!(destination = %lane.name, entries = unread.len(), error = %first, retry_ms = d.as_millis() as u64, "could not read queued entries back from the WAL; retrying");
                todo = unread.into_iter().map(|u| u.0).collect();
                self.pause(d).await;
                if self.stop.is_cancelled() {
                    self.give_up(&lane, &todo);
                    break;
                }
            }
            if self.stop.is_cancelled() {
                break;
            }
        }
    }

    /// The records of taken LSNs, read back from the WAL: the entries read,
    /// and those whose read failed with an I/O error (to read again). An entry no
    /// longer pending is released and its waiters told its end; one whose
    /// record is damaged or missing becomes a dead letter at once (never
    /// marked delivered: it never reached the destination).
    async fn read_back(
        &self,
        lane: &Lane,
        lsns: Vec<u64>,
    ) -> (Vec<LoggedEntry>, Vec<(u64, WalError)>) {
        let wal = self.wal.clone();
        let asked = lsns.clone();
        let answers = match tokio::task::spawn_blocking(move || wal.read_queued(&asked)).await {
            Ok(a) => a,
            Err(e) => {
                // A bug, not the entries' fault: fed again by the feeder.
                tracing::error!(destination = %lane.name, error = %e, "reading queued entries back failed; queued again");
                self.settle(lsns.iter().copied(), &Outcome::Pending);
                lane.release(&lsns, false);
                lane.add_requeued(lsns);
                return (Vec::new(), Vec::new());
            }
        };
        let (mut batch, mut unread) = (Vec::with_capacity(lsns.len()), Vec::new());
        for (lsn, answer) in answers {
            match answer {
                ReadBack::Entry(entry) => batch.push(LoggedEntry { lsn, entry }),
                ReadBack::Gone => {
                    let outcome = match self.wal.status_of(lsn) {
                        Some(Tracked::Dead { reason, .. }) => Outcome::Failed { reason },
                        _ if self.wal.ended_by_forget(lsn) => Outcome::Failed {
                            reason: FORGOTTEN.into(),
                        },
                        _ => Outcome::Delivered,
                    };
                    self.settle([lsn], &outcome);
                    lane.release(&[lsn], false);
                }
                ReadBack::Forgotten => self.forgotten(lane, &[lsn]).await,
                ReadBack::Failed(e @ WalError::Corrupt { .. }) => {
                    tracing::error!(destination = %lane.name, lsn, error = %e, "a queued entry's WAL record is unreadable: a dead letter");
                    let reason = format!("WAL record unreadable: {e}");
                    self.fail(lane, &[lsn], 1, &reason, "unreadable").await;
                }
                ReadBack::Failed(e) => unread.push((lsn, e)),
            }
        }
        (batch, unread)
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(
            self.cfg.backoff_initial,
            self.cfg.backoff_max,
            self.cfg.backoff_initial / 2,
        )
    }

    /// Wait `d`, or less if the drain deadline passes.
    async fn pause(&self, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.cancelled() => {}
        }
    }

    /// Deliver a batch until every entry in it is terminal (or the drain deadline
    /// passes, leaving the rest pending in the WAL).
    async fn deliver(&self, lane: &Lane, batch: Vec<LoggedEntry>) {
        let mut probe = self.backoff();
        let mut work = vec![(batch, self.backoff())];
        while let Some((mut b, mut retry)) = work.pop() {
            loop {
                // Forgotten since it was read (while an outage held it, say):
                // never written.
                self.drop_forgotten(lane, &mut b).await;
                if b.is_empty() {
                    break;
                }
                // Past the drain deadline nothing more is tried (and no attempt
                // is burned): what is left stays pending in the WAL.
                let res = tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => {
                        self.give_up(lane, &lsns_of(&b));
                        break;
                    }
                    r = lane.dest.write_batch(&b) => r,
                };
                let e = match res {
                    Ok(duplicates) => {
                        self.up(lane);
                        self.delivered(lane, &b, duplicates).await;
                        break;
                    }
                    Err(e) => e,
                };
                if e.is_outage() {
                    if e.is_timeout() && b.len() > 1 {
                        // A smaller batch may get through in time.
                        let right = b.split_off(b.len() / 2);
                        work.push((right, retry.clone()));
                        work.push((b, retry));
                        break;
                    }
                    self.outage(lane, &e, &mut probe).await;
                    continue;
                }
                if let DestinationError::Rejected {
                    index: Some(i),
                    reason,
                    ..
                } = &e
                {
                    if *i < b.len() {
                        let bad = b.remove(*i);
                        self.fail(lane, &[bad.lsn], retry.attempts() + 1, reason, "rejected")
                            .await;
                        if b.is_empty() {
                            break;
                        }
                        continue;
                    }
                }
                if b.len() > 1 {
                    if !e.is_rejection() && !self.healthy(lane).await {
                        self.outage(lane, &e, &mut probe).await;
                        continue;
                    }
                    // Some entry of the batch is to blame: split to isolate it.
                    let right = b.split_off(b.len() / 2);
                    work.push((right, retry.clone()));
                    work.push((b, retry));
                    break;
                }
                if e.is_rejection() {
                    self.fail(
                        lane,
                        &lsns_of(&b),
                        retry.attempts() + 1,
                        &e.to_string(),
                        "rejected",
                    )
                    .await;
                    break;
                }
                // One entry, unknown cause: an outage after all, or an attempt.
                if !self.healthy(lane).await {
                    self.outage(lane, &e, &mut probe).await;
                    continue;
                }
                let d = retry.next();
                if retry.attempts() >= self.cfg.max_attempts {
                    self.fail(
                        lane,
                        &lsns_of(&b),
                        retry.attempts(),
                        &e.to_string(),
                        "max_attempts",
                    )
                    .await;
                    break;
                }
                self.observer.retry(&lane.name);
                tracing::debug!(destination = %lane.name, attempts = retry.attempts(), delay_ms = d.as_millis() as u64, error = %e, "retrying entry");
                self.pause(d).await;
            }
            if self.stop.is_cancelled() {
                for (rest, _) in work.drain(..) {
                    self.give_up(lane, &lsns_of(&rest));
                }
            }
        }
    }

    /// Whether the health check passes (false when the drain deadline passes
    /// first: the caller then gives up at its next step).
    async fn healthy(&self, lane: &Lane) -> bool {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => false,
            r = lane.dest.health() => r.is_ok(),
        }
    }

    /// The breaker: mark the destination down, wait, let the caller retry.
    async fn outage(&self, lane: &Lane, e: &DestinationError, probe: &mut Backoff) {
        if lane.set_down(Some(e.to_string())) {
            tracing::warn!(destination = %lane.name, error = %e, "destination unavailable; pausing deliveries and probing");
            self.observer.destination_up(&lane.name, false);
        }
        self.pause(probe.next()).await;
    }

    pub(crate) fn up(&self, lane: &Lane) {
        if lane.set_down(None) {
            tracing::info!(destination = %lane.name, "destination reachable again; resuming deliveries");
            self.observer.destination_up(&lane.name, true);
        }
    }

    /// Append a status marker, retrying while the WAL cannot write (a full disk):
    /// an entry is terminal only once its marker is in the WAL, so its capacity
    /// stays held meanwhile. At the drain deadline it gives up; the entry then
    /// stays pending and is redelivered (idempotently) after the next start.
    pub(crate) async fn record<F, Fut>(&self, lane: &Lane, what: &str, append: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = spool_wal::Result<()>>,
    {
        let mut retry = Backoff::new(
            Duration::from_millis(50),
            Duration::from_secs(2),
            Duration::from_millis(25),
        );
        loop {
            match append().await {
                Ok(()) => return true,
                Err(e) if self.stop.is_cancelled() || !e.is_retryable() => {
                    tracing::warn!(destination = %lane.name, error = %e, "could not record {what} in the WAL; the entries stay pending");
                    return false;
                }
                Err(e) => {
                    let d = retry.next();
                    tracing::warn!(destination = %lane.name, error = %e, retry_ms = d.as_millis() as u64, "could not record {what} in the WAL; retrying");
                    self.pause(d).await;
                }
            }
        }
    }

    async fn delivered(&self, lane: &Lane, b: &[LoggedEntry], duplicates: u64) {
        self.forget_late(lane, b).await;
        let lsns: Vec<u64> = b.iter().map(|e| e.lsn).collect();
        // Delivered either way (a lost marker only means a redelivery, which
        // the destination answers as a duplicate).
        self.record(lane, "delivery", || self.wal.mark_delivered(&lsns))
            .await;
        let at: Vec<i64> = b.iter().map(|e| e.entry.accepted_at_us).collect();
        self.observer.delivered(&lane.name, &at);
        if duplicates > 0 {
            self.observer.duplicates(&lane.name, duplicates);
        }
        self.settle(lsns.iter().copied(), &Outcome::Delivered);
        lane.release(&lsns, true);
    }

    async fn fail(
        &self,
        lane: &Lane,
        lsns: &[u64],
        attempts: u32,
        reason: &str,
        class: &'static str,
    ) {
        let mut recorded = Vec::with_capacity(lsns.len());
        for &lsn in lsns {
            if self
                .record(lane, "failure", || {
                    self.wal.mark_failed(lsn, attempts, reason)
                })
                .await
            {
                recorded.push(lsn);
            } else {
                // No FAILED marker: still pending in the WAL, never "failed".
                self.give_up(lane, &[lsn]);
            }
        }
        if recorded.is_empty() {
            return;
        }
        tracing::warn!(destination = %lane.name, entries = recorded.len(), attempts, reason, "entries became dead letters");
        self.observer
            .failed(&lane.name, class, recorded.len() as u64);
        self.settle(
            recorded.iter().copied(),
            &Outcome::Failed {
                reason: reason.to_owned(),
            },
        );
        lane.release(&recorded, false);
    }

    /// The drain deadline passed: these stay pending in the WAL.
    fn give_up(&self, lane: &Lane, lsns: &[u64]) {
        self.settle(lsns.iter().copied(), &Outcome::Pending);
        lane.release(lsns, false);
    }
}

fn lsns_of(b: &[LoggedEntry]) -> Vec<u64> {
    b.iter().map(|e| e.lsn).collect()
}
