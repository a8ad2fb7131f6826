//! Agent memory through the engine: forgetting (TOMBSTONE records delivered
//! as deletes) and recall (search of a source's delivered entries).
//!
//! Guarantee: **forgotten means forgotten.** A forget is durable in the WAL
//! before it is answered; from then on no worker delivers an entry it covers
//! (read back as `Forgotten`, marked done without a write), replay and redrive
//! skip them, and its delete reaches the destination — at once when it is up,
//! else from the tombstone task, which retries until it is applied. A covered
//! entry a worker was writing at that moment is caught after its write: the
//! worker appends a tombstone of its own for it, so the row goes too.

use crate::engine::{Engine, Inner};
use crate::lane::Lane;
use crate::{IngestError, Outcome, FORGOTTEN};
use spool_destination::{DestinationError, Hit, Search, Tombstone};
use spool_wal::{now_us, LoggedEntry};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// What to forget of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forget {
    /// These entries.
    Ids(Vec<Uuid>),
    /// Every entry with this subject accepted until now.
    Subject(String),
}

/// What a forget did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgotten {
    /// LSN of its TOMBSTONE record (durable).
    pub lsn: u64,
    /// Ids asked for that this spool never saw in the source (not in the
    /// tombstone). Empty for a forget by subject.
    pub unknown: Vec<Uuid>,
    /// Whether the destination has applied the delete already (else the
    /// tombstone task applies it once the destination is reachable).
    pub applied: bool,
    /// Rows the destination deleted, when applied.
    pub deleted: u64,
}

/// Why a forget was refused (nothing written).
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// None of the ids was ever seen in the source.
    #[error("no entry with any of these ids was ever accepted for this source")]
    NotFound,
    /// The WAL could not take the tombstone, or the engine is closing.
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

impl Engine {
    /// Forget entries of `source` (delivered to `destination`): a durable
    /// TOMBSTONE, then the delete. See the module doc.
    pub async fn forget(
        &self,
        source: &str,
        destination: &str,
        what: Forget,
    ) -> Result<Forgotten, ForgetError> {
        let inner = &self.inner;
        inner.writable()?;
        let lane = inner
            .lanes
            .get(destination)
            .ok_or_else(|| IngestError::UnknownDestination(destination.to_owned()))?;
        let (ids, subject, unknown) = match what {
            Forget::Subject(s) => (Vec::new(), Some(s), Vec::new()),
            Forget::Ids(ids) => {
                let ids = dedup(ids);
                // Forgotten already: nothing new to write for those.
                let done: Vec<u64> = ids
                    .iter()
                    .filter_map(|id| inner.wal.forgot_id(source, *id))
                    .collect();
                let open: Vec<Uuid> = ids
                    .iter()
                    .copied()
                    .filter(|id| inner.wal.forgot_id(source, *id).is_none())
                    .collect();
                let (known, unknown) = self.seen(source, lane, open).await;
                if known.is_empty() {
                    if let Some(&lsn) = done.iter().max() {
                        let pending = inner.wal.pending_tombstones();
                        return Ok(Forgotten {
                            lsn,
                            unknown,
                            applied: !done.iter().any(|l| pending.iter().any(|p| p.0 == *l)),
                            deleted: 0,
                        });
                    }
                    return Err(ForgetError::NotFound);
                }
                (known, None, unknown)
            }
        };
        let mut t = Tombstone {
            at_us: now_us(),
            source: source.to_owned(),
            destination: destination.to_owned(),
            ids,
            subject,
        };
        let lsn = inner.wal.forget(&mut t).await.map_err(IngestError::Wal)?;
        // While the destination is down, the tombstone task applies it later.
        let applied = match lane.down_reason() {
            None => inner.apply_tombstone(lane, lsn, &t, false).await,
            Some(_) => None,
        };
        inner.tombstones.notify_one();
        Ok(Forgotten {
            lsn,
            unknown,
            applied: applied.is_some(),
            deleted: applied.unwrap_or(0),
        })
    }

    /// Which of `ids` were ever accepted for `source`: pending or dead in the
    /// WAL, or in the destination (one query). A destination that cannot be
    /// asked (down, or failing) counts as "maybe": they are forgotten anyway.
    /// Answers (known, never seen).
    async fn seen(&self, source: &str, lane: &Lane, ids: Vec<Uuid>) -> (Vec<Uuid>, Vec<Uuid>) {
        let wal = &self.inner.wal;
        let (mut known, ask): (Vec<Uuid>, Vec<Uuid>) = ids.into_iter().partition(|id| {
            wal.lookup(*id)
                .is_some_and(|st| wal.source_of(st.lsn).as_deref() == Some(source))
        });
        if ask.is_empty() {
            return (known, Vec::new());
        }
        let stored = match lane.down_reason() {
            Some(_) => None,
            None => lane.dest.known(source, &ask).await.ok(),
        };
        match stored {
            None => {
                known.extend(ask);
                (known, Vec::new())
            }
            Some(stored) => {
                let (found, unknown) = ask.into_iter().partition(|id| stored.contains(id));
                known.extend::<Vec<Uuid>>(found);
                (known, unknown)
            }
        }
    }

    /// Whether `id` of `source` was forgotten (by id).
    pub fn is_forgotten(&self, source: &str, id: Uuid) -> bool {
        self.inner.wal.forgot_id(source, id).is_some()
    }

    /// Recall: `source`'s delivered entries in `destination` ranked by text,
    /// vector similarity, or both.
    pub async fn search(
        &self,
        destination: &str,
        s: &Search,
    ) -> Result<Vec<Hit>, DestinationError> {
        let lane = self.inner.lanes.get(destination).ok_or_else(|| {
            DestinationError::Config(format!("unknown destination {destination:?}"))
        })?;
        lane.dest.search(s).await
    }
}

fn dedup(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

impl Inner {
    /// Apply a tombstone's delete and (unless `applied` already) record it
    /// done. `Some(rows)` once applied.
    async fn apply_tombstone(
        &self,
        lane: &Lane,
        lsn: u64,
        t: &Tombstone,
        applied: bool,
    ) -> Option<u64> {
        match lane.dest.forget(t).await {
            Ok(rows) => {
                if !applied {
                    if let Err(e) = self.wal.mark_delivered(&[lsn]).await {
                        // Applied again at the next start: deleting twice is harmless.
                        tracing::warn!(lsn, error = %e, "could not record a tombstone as applied");
                    }
                }
                Some(rows)
            }
            Err(e) => {
                tracing::warn!(destination = %lane.name, lsn, error = %e, "tombstone not applied yet; retrying in the background");
                None
            }
        }
    }

    /// Apply every pending tombstone, retrying with backoff while a destination
    /// cannot take it; woken by each forget. At start it applies every retained
    /// tombstone once more, applied or not: a row a worker committed just after
    /// a forget's delete ran, whose own late tombstone a crash kept from the
    /// WAL, goes then.
    pub(crate) async fn tombstone_task(self: Arc<Self>) {
        let mut again: BTreeSet<u64> = self
            .wal
            .tombstones()
            .into_iter()
            .filter(|t| t.2)
            .map(|t| t.0)
            .collect();
        let mut retry = self.backoff();
        loop {
            let mut behind = false;
            for (lsn, t, applied) in self.wal.tombstones() {
                if self.stop_background.is_cancelled() {
                    return;
                }
                if applied && !again.contains(&lsn) {
                    continue;
                }
                // A tombstone for a destination no longer configured stays pending.
                let Some(lane) = self.lanes.get(&t.destination) else {
                    continue;
                };
                if lane.down_reason().is_some() {
                    behind = true;
                    continue;
                }
                match self.apply_tombstone(lane, lsn, &t, applied).await {
                    Some(_) => drop(again.remove(&lsn)),
                    None => behind = true,
                }
            }
            let wait = if behind {
                retry.next()
            } else {
                retry = self.backoff();
                Duration::from_secs(3600)
            };
            tokio::select! {
                _ = self.tombstones.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop_background.cancelled() => return,
            }
        }
    }

    /// Entries a tombstone covers, read for delivery: done (marked so in the
    /// WAL), never written; their receipts say so.
    pub(crate) async fn forgotten(&self, lane: &Lane, lsns: &[u64]) {
        self.record(lane, "a forgotten entry", || self.wal.mark_delivered(lsns))
            .await;
        self.settle(
            lsns.iter().copied(),
            &Outcome::Failed {
                reason: FORGOTTEN.into(),
            },
        );
        lane.release(lsns, false);
    }

    /// Take the entries a tombstone covers out of a batch about to be written.
    pub(crate) async fn drop_forgotten(&self, lane: &Lane, batch: &mut Vec<LoggedEntry>) {
        let gone = self.wal.forgotten_among(batch.iter());
        if gone.is_empty() {
            return;
        }
        let lsns: Vec<u64> = batch
            .iter()
            .filter(|le| gone.contains(&le.entry.id))
            .map(|le| le.lsn)
            .collect();
        batch.retain(|le| !gone.contains(&le.entry.id));
        self.forgotten(lane, &lsns).await;
    }

    /// After a batch was written: entries a tombstone covered meanwhile (it
    /// came while the write was in flight) get a tombstone of their own, so
    /// the rows just written go too.
    pub(crate) async fn forget_late(&self, lane: &Lane, batch: &[LoggedEntry]) {
        let late = self.wal.forgotten_among(batch.iter());
        if late.is_empty() {
            return;
        }
        let mut by_source: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
        for le in batch.iter().filter(|le| late.contains(&le.entry.id)) {
            by_source
                .entry(&le.entry.source)
                .or_default()
                .push(le.entry.id);
        }
        for (source, ids) in by_source {
            let t = Tombstone {
                at_us: now_us(),
                source: source.to_owned(),
                destination: lane.name.clone(),
                ids,
                subject: None,
            };
            let wal = &self.wal;
            self.record(lane, "a late forget", || async {
                wal.forget(&mut t.clone()).await.map(drop)
            })
            .await;
        }
        self.tombstones.notify_one();
    }
}
