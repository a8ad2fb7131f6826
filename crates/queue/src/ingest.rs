//! The accept path: claim idempotency keys, reserve capacity, append to the WAL,
//! queue, and hand out receipts.

use crate::engine::Inner;
use crate::keys::Claim;
use crate::lane::Lane;
use crate::EntryStatus;
use crate::{Accepted, IngestError, Outcome, Receipt, FORGOTTEN};
use spool_wal::{Entry, WalError};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// The failure reason a replay of a purged entry reports.
pub const PURGED: &str = "purged by an operator (a dead letter discarded; never delivered)";

/// How one entry of an ingest call is answered.
enum Plan {
    /// Written: index into the call's written entries.
    Write(usize),
    /// Answered from its idempotency key.
    Replay(Accepted),
    /// A repeat of an earlier entry (index) of the same call.
    SameAs(usize),
}

impl Inner {
    /// Open for writes: not shutting down, disk above `min_free_bytes`.
    pub(crate) fn writable(&self) -> Result<(), IngestError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(IngestError::Closed);
        }
        if self.low_disk.load(Ordering::Relaxed) {
            return Err(IngestError::LowDisk {
                free: self.free_bytes.load(Ordering::Relaxed),
                min: self.cfg.min_free_bytes,
            });
        }
        Ok(())
    }

    pub(crate) async fn ingest(
        self: Arc<Self>,
        entries: Vec<Entry>,
        track: bool,
    ) -> Result<Receipt, IngestError> {
        self.writable()?;
        if let Some(e) = entries
            .iter()
            .find(|e| !self.lanes.contains_key(&e.destination))
        {
            return Err(IngestError::UnknownDestination(e.destination.clone()));
        }
        let sources: Vec<String> = entries.iter().map(|e| e.source.clone()).collect();
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
        let lsns = match self.append(&mut write).await {
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
            self.watch(&accepted, &sources)
        } else {
            Vec::new()
        };
        // Once per run of one source (a call is usually one source's).
        for run in write.chunk_by(|a, b| a.source == b.source) {
            self.observer.accepted(&run[0].source, run.len() as u64);
        }
        // The queue holds LSNs: the entries (and their payloads) are dropped
        // here and read back from the WAL when a worker takes them.
        let mut by_lane: HashMap<&str, Vec<u64>> = HashMap::new();
        for (entry, lsn) in write.iter().zip(lsns) {
            let name = self.lanes[&entry.destination].name.as_str();
            by_lane.entry(name).or_default().push(lsn);
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
    /// Each entry's `accepted_at_us` becomes the stamp the WAL stored.
    async fn append(&self, write: &mut [Entry]) -> Result<Vec<u64>, IngestError> {
        if write.is_empty() {
            return Ok(Vec::new());
        }
        let mut need: Vec<(&Arc<Lane>, usize)> = Vec::new();
        for e in write.iter() {
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
                for e in write.iter() {
                    self.observer.shed(&e.source, 1);
                }
                return Err(IngestError::Full {
                    destination: lane.name.clone(),
                    retry_after: lane.retry_after(),
                });
            }
        }
        let res = self.wal.append_stamped(write).await;
        // The quota is a bound, like capacity, not a failing WAL (nor a sign
        // that an earlier failure is over: nothing was written).
        if !matches!(res, Err(WalError::QuotaExceeded { .. })) {
            self.wal_failing.store(res.is_err(), Ordering::Relaxed);
        }
        res.map_err(|e| {
            for (l, m) in &need {
                l.unreserve(*m);
            }
            match e {
                WalError::QuotaExceeded { used, limit } => {
                    for e in write.iter() {
                        self.observer.shed(&e.source, 1);
                    }
                    // Space comes back as the slowest backlog drains, whichever
                    // destination this write was for.
                    let retry_after = self.lanes.values().map(|l| l.retry_after()).max();
                    IngestError::WalFull {
                        used,
                        limit,
                        retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
                    }
                }
                e => IngestError::from(e),
            }
        })
    }

    /// Receipt handles for `accepted`: entries in flight settle later; replays
    /// of entries already terminal settle now.
    fn watch(&self, accepted: &[Accepted], sources: &[String]) -> Vec<oneshot::Receiver<Outcome>> {
        let mut w = self.waiters.lock().unwrap();
        accepted
            .iter()
            .zip(sources)
            .map(|(a, source)| {
                let (tx, rx) = oneshot::channel();
                // Under the waiters lock: workers record an outcome in the WAL
                // before they settle, so "pending" here means it settles later.
                let now = if a.replayed {
                    match self.status_of(a.lsn) {
                        Some(EntryStatus::Pending) => None,
                        Some(EntryStatus::Failed { reason, .. }) => {
                            Some(Outcome::Failed { reason })
                        }
                        Some(EntryStatus::Purged) => Some(Outcome::Failed {
                            reason: PURGED.into(),
                        }),
                        // Forgotten by id (a retained tombstone names it:
                        // also after a restart).
                        None if self.wal.forgot_id(source, a.id).is_some() => {
                            Some(Outcome::Failed {
                                reason: FORGOTTEN.into(),
                            })
                        }
                        Some(EntryStatus::Delivered { .. }) | None => Some(Outcome::Delivered),
                    }
                } else {
                    None
                };
                match now {
                    Some(o) => {
                        let _ = tx.send(o);
                    }
                    None => {
                        let v = w.entry(a.lsn).or_default();
                        // Receipts dropped by callers that stopped waiting go:
                        // replays of a pending entry cannot grow this list.
                        v.retain(|tx| !tx.is_closed());
                        v.push(tx);
                    }
                }
                rx
            })
            .collect()
    }

    pub(crate) fn settle(&self, lsns: impl IntoIterator<Item = u64>, outcome: &Outcome) {
        let mut w = self.waiters.lock().unwrap();
        for l in lsns {
            for tx in w.remove(&l).into_iter().flatten() {
                let _ = tx.send(outcome.clone());
            }
        }
    }
}
