//! The idempotency-key index: `(source, key) → (id, lsn, accepted_at)` in sled.
//!
//! A *derived* index: the WAL is the truth (every ENTRY record carries its key),
//! and the index is rebuilt from it when missing, unreadable or behind.
//!
//! ## Invariants
//! - **A key is claimed before its entry is appended.** A claim lives in memory
//!   until the entry is in the WAL *and* in the index (or the call failed); a
//!   concurrent call with the same key waits for the claim to settle and then
//!   replays the result, so exactly one entry per key is written.
//! - **The `upto` mark never runs ahead.** It is written only while no keyed call is
//!   between its WAL append and its index insert (a write lock the keyed calls hold
//!   for reading), and flushed; so every keyed entry with LSN ≤ `upto` is in the
//!   index on disk, and opening catches up from `upto + 1` by reading the WAL.
//! - Keys older than the window count as absent and are pruned.

use crate::Accepted;
use spool_wal::{Entry, Wal};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{watch, RwLock, RwLockReadGuard};
use uuid::Uuid;

const UPTO: &[u8] = b"m:upto";

/// What a claim found for one entry.
pub(crate) enum Claim {
    /// No key: write it.
    Unkeyed,
    /// This call owns the key (its index key): write it, then settle.
    Own(Vec<u8>),
    /// Accepted before: answer with the original.
    Replay(Accepted),
    /// The same key appears earlier in this call (at that index).
    SameCall(usize),
    /// Another call is writing this key: wait, then claim again.
    Wait(watch::Receiver<bool>),
}

/// What the index remembers of a written entry: id, LSN, accepted-at (µs).
pub(crate) type Written = (Uuid, u64, i64);

pub(crate) struct KeyIndex {
    db: sled::Db,
    window_us: i64,
    claims: Mutex<HashMap<Vec<u8>, watch::Sender<bool>>>,
    /// Keyed calls hold it for reading from their append to their index insert.
    pub(crate) recording: RwLock<()>,
}

/// `k:` + source length (u32) + source + key: unambiguous for any strings.
fn index_key(source: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + source.len() + key.len());
    k.extend_from_slice(b"k:");
    k.extend_from_slice(&(source.len() as u32).to_be_bytes());
    k.extend_from_slice(source.as_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

fn encode(id: Uuid, lsn: u64, at_us: i64) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..16].copy_from_slice(id.as_bytes());
    v[16..24].copy_from_slice(&lsn.to_be_bytes());
    v[24..].copy_from_slice(&at_us.to_be_bytes());
    v
}

fn decode(v: &[u8]) -> Option<(Uuid, u64, i64)> {
    let v: &[u8; 32] = v.try_into().ok()?;
    let id = Uuid::from_slice(&v[..16]).ok()?;
    let lsn = u64::from_be_bytes(v[16..24].try_into().ok()?);
    let at = i64::from_be_bytes(v[24..].try_into().ok()?);
    Some((id, lsn, at))
}

impl KeyIndex {
    /// Open the index at `path` (`None`: in memory, rebuilt at every start) and
    /// catch it up with the WAL. An unreadable index is discarded and rebuilt.
    pub fn open(path: Option<&Path>, window: Duration, wal: &Wal) -> std::io::Result<KeyIndex> {
        let db = match path {
            None => sled::Config::new().temporary(true).open(),
            Some(p) => match sled::open(p) {
                Ok(db) => Ok(db),
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "idempotency index unreadable; rebuilding it from the WAL");
                    std::fs::remove_dir_all(p)?;
                    sled::open(p)
                }
            },
        }
        .map_err(std::io::Error::other)?;
        let index = KeyIndex {
            db,
            window_us: i64::try_from(window.as_micros()).unwrap_or(i64::MAX),
            claims: Mutex::new(HashMap::new()),
            recording: RwLock::new(()),
        };
        index.catch_up(wal)?;
        Ok(index)
    }

    fn upto(&self) -> u64 {
        self.db
            .get(UPTO)
            .ok()
            .flatten()
            .and_then(|v| Some(u64::from_be_bytes(v.as_ref().try_into().ok()?)))
            .unwrap_or(0)
    }

    /// Index the keyed entries the WAL holds past `upto`.
    fn catch_up(&self, wal: &Wal) -> std::io::Result<()> {
        let from = self.upto() + 1;
        let visible = wal.status().visible_lsn;
        if from > visible {
            return Ok(());
        }
        let horizon = spool_wal::now_us().saturating_sub(self.window_us);
        let mut indexed = 0u64;
        let mut batch = sled::Batch::default();
        for rec in wal.reader(from) {
            let (lsn, rec) = rec.map_err(std::io::Error::other)?;
            if let spool_wal::Record::Entry(e) = rec {
                if let Some(k) = &e.idempotency_key {
                    if e.accepted_at_us >= horizon {
                        batch.insert(
                            index_key(&e.source, k),
                            &encode(e.id, lsn, e.accepted_at_us)[..],
                        );
                        indexed += 1;
                    }
                }
            }
        }
        batch.insert(UPTO, &visible.to_be_bytes()[..]);
        self.db.apply_batch(batch).map_err(std::io::Error::other)?;
        self.db.flush().map_err(std::io::Error::other)?;
        if indexed > 0 {
            tracing::info!(
                keys = indexed,
                from_lsn = from,
                "idempotency index caught up from the WAL"
            );
        }
        Ok(())
    }

    fn lookup(&self, k: &[u8]) -> Option<Accepted> {
        let v = self.db.get(k).ok()??;
        let (id, lsn, at) = decode(&v)?;
        (at >= spool_wal::now_us().saturating_sub(self.window_us)).then_some(Accepted {
            id,
            lsn,
            replayed: true,
        })
    }

    /// Decide, per entry, whether it is written, replayed, or must wait for a
    /// concurrent call. Keys this call now owns must be settled with [`Self::settle`].
    pub fn claim(&self, entries: &[Entry]) -> Vec<Claim> {
        if entries.iter().all(|e| e.idempotency_key.is_none()) {
            return entries.iter().map(|_| Claim::Unkeyed).collect();
        }
        let mut claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut out = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let Some(key) = &e.idempotency_key else {
                out.push(Claim::Unkeyed);
                continue;
            };
            let k = index_key(&e.source, key);
            if let Some(&first) = seen.get(&k) {
                out.push(Claim::SameCall(first));
            } else if let Some(tx) = claims.get(&k) {
                out.push(Claim::Wait(tx.subscribe()));
            } else if let Some(a) = self.lookup(&k) {
                out.push(Claim::Replay(a));
            } else {
                claims.insert(k.clone(), watch::channel(false).0);
                seen.insert(k.clone(), i);
                out.push(Claim::Own(k));
            }
        }
        out
    }

    /// Record the keys this call owned — `(index key, Some(written))` for a written
    /// entry, `None` when nothing was written — and release the claims.
    pub fn settle(&self, owned: Vec<(Vec<u8>, Option<Written>)>) {
        let mut batch = sled::Batch::default();
        let mut any = false;
        for (k, v) in &owned {
            if let Some((id, lsn, at)) = v {
                batch.insert(k.as_slice(), &encode(*id, *lsn, *at)[..]);
                any = true;
            }
        }
        if any {
            if let Err(err) = self.db.apply_batch(batch) {
                // The WAL has the keys: the next start re-indexes them from there.
                tracing::error!(error = %err, "could not update the idempotency index");
            }
        }
        let mut map = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        for (k, _) in owned {
            if let Some(tx) = map.remove(&k) {
                let _ = tx.send(true);
            }
        }
    }

    /// Hold the recording lock for reading (a keyed call from append to settle).
    pub async fn recording(&self) -> RwLockReadGuard<'_, ()> {
        self.recording.read().await
    }

    /// Persist the `upto` mark at the WAL's visible LSN: every keyed entry up to it
    /// is indexed. Flushes the index.
    pub async fn mark(&self, wal: &Wal) {
        {
            let _quiet = self.recording.write().await;
            let visible = wal.status().visible_lsn;
            if let Err(e) = self.db.insert(UPTO, &visible.to_be_bytes()[..]) {
                tracing::error!(error = %e, "could not update the idempotency index mark");
            }
        }
        if let Err(e) = self.db.flush_async().await {
            tracing::error!(error = %e, "could not flush the idempotency index");
        }
    }

    /// Drop keys older than the window. Returns how many.
    pub fn prune(&self) -> u64 {
        let horizon = spool_wal::now_us().saturating_sub(self.window_us);
        let mut pruned = 0u64;
        for kv in self.db.scan_prefix(b"k:") {
            let Ok((k, v)) = kv else { break };
            // Compare-and-swap: a fresh insert of the same key meanwhile stays.
            if decode(&v).is_none_or(|(_, _, at)| at < horizon)
                && matches!(
                    self.db.compare_and_swap(k, Some(v), None::<&[u8]>),
                    Ok(Ok(()))
                )
            {
                pruned += 1;
            }
        }
        pruned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_garbage_is_absent() {
        let id = Uuid::now_v7();
        assert_eq!(decode(&encode(id, 42, -7)), Some((id, 42, -7)));
        assert_eq!(decode(b"short"), None);
        assert_ne!(index_key("a", "bc"), index_key("ab", "c"));
    }
}
