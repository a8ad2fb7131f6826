//! The tracked (pending or dead) entries by LSN, compact: a queued entry costs
//! its 40-byte slot (LSN, offset, id, interned source and destination), where a
//! `BTreeMap<u64, Meta>` cost ~150 B. A dead letter's attempts and reason live
//! beside, in a map of the few dead letters.
//!
//! Slots are kept in LSN order in chunks of up to [`CHUNK`] (a `BTreeMap` of
//! `VecDeque`s keyed by each chunk's lowest LSN): entries arrive in LSN order
//! (appended to the last chunk) and leave roughly in LSN order (from a chunk's
//! front), so neither end moves the rest. A chunk that empties is dropped; one
//! down to a quarter of its capacity is shrunk.

use crate::state::Tracked;
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use uuid::Uuid;

/// Slots per chunk, at most.
const CHUNK: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Slot {
    lsn: u64,
    offset: u64,
    id: Uuid,
    source: u32,
    destination: u32,
}

/// One tracked entry, borrowed from the map.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetaRef<'a> {
    pub lsn: u64,
    pub id: Uuid,
    /// Offset of its ENTRY record in its segment.
    pub offset: u64,
    pub source: &'a Arc<str>,
    pub destination: &'a Arc<str>,
    dead: Option<&'a (u32, String)>,
}

impl MetaRef<'_> {
    pub fn is_pending(&self) -> bool {
        self.dead.is_none()
    }

    pub fn status(&self) -> Tracked {
        match self.dead {
            None => Tracked::Pending,
            Some((attempts, reason)) => Tracked::Dead {
                attempts: *attempts,
                reason: reason.clone(),
            },
        }
    }
}

/// Tracked entries by LSN (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct TrackedMap {
    chunks: BTreeMap<u64, VecDeque<Slot>>,
    /// Dead letters by LSN (few; ordered, so listing them stops at its limit).
    dead: BTreeMap<u64, (u32, String)>,
    names: Vec<Arc<str>>,
    by_name: FxHashMap<Arc<str>, u32>,
}

impl TrackedMap {
    /// The one shared copy of a source or destination name.
    pub fn intern(&mut self, s: &str) -> Arc<str> {
        let i = self.name_index(s);
        self.names[i as usize].clone()
    }

    fn name_index(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.by_name.get(s) {
            return i;
        }
        let a: Arc<str> = Arc::from(s);
        let i = u32::try_from(self.names.len()).expect("fewer than 2^32 names");
        self.names.push(a.clone());
        self.by_name.insert(a, i);
        i
    }

    /// The chunk that holds, or would hold, `lsn`.
    fn chunk_key(&self, lsn: u64) -> Option<u64> {
        self.chunks
            .range(..=lsn)
            .next_back()
            .or_else(|| self.chunks.iter().next())
            .map(|(k, _)| *k)
    }

    fn view(&self, s: &Slot) -> MetaRef<'_> {
        MetaRef {
            lsn: s.lsn,
            id: s.id,
            offset: s.offset,
            source: &self.names[s.source as usize],
            destination: &self.names[s.destination as usize],
            dead: self.dead.get(&s.lsn),
        }
    }

    fn find(&self, lsn: u64) -> Option<&Slot> {
        let chunk = self.chunks.get(&self.chunk_key(lsn)?)?;
        let i = chunk.binary_search_by_key(&lsn, |s| s.lsn).ok()?;
        chunk.get(i)
    }

    pub fn get(&self, lsn: u64) -> Option<MetaRef<'_>> {
        self.find(lsn).map(|s| self.view(s))
    }

    pub fn contains(&self, lsn: u64) -> bool {
        self.find(lsn).is_some()
    }

    /// Track an entry; answers the status of one it replaces (same LSN: only a
    /// forged log repeats one).
    pub fn insert(
        &mut self,
        lsn: u64,
        id: Uuid,
        offset: u64,
        source: &str,
        destination: &str,
        status: Tracked,
    ) -> Option<Tracked> {
        let slot = Slot {
            lsn,
            offset,
            id,
            source: self.name_index(source),
            destination: self.name_index(destination),
        };
        let old = self.remove(lsn).map(|(_, status)| status);
        if let Tracked::Dead { attempts, reason } = status {
            self.dead.insert(lsn, (attempts, reason));
        }
        let Some(key) = self.chunk_key(lsn) else {
            self.chunks.insert(lsn, VecDeque::from([slot]));
            return old;
        };
        let last = self.chunks.keys().next_back() == Some(&key);
        let chunk = self.chunks.get_mut(&key).expect("chunk_key is a key");
        let at = chunk.partition_point(|s| s.lsn < lsn);
        if at == chunk.len() && last && chunk.len() >= CHUNK {
            // The common case: past the end of a full last chunk.
            self.chunks.insert(lsn, VecDeque::from([slot]));
            return old;
        }
        chunk.insert(at, slot);
        let key = if lsn < key {
            // Below the first chunk's lowest LSN: re-key it.
            let c = self.chunks.remove(&key).expect("chunk_key is a key");
            self.chunks.insert(lsn, c);
            lsn
        } else {
            key
        };
        let chunk = self.chunks.get_mut(&key).expect("a key");
        if chunk.len() > CHUNK {
            let upper = chunk.split_off(chunk.len() / 2);
            self.chunks.insert(upper[0].lsn, upper);
        }
        old
    }

    /// Stop tracking `lsn`; answers its id and status.
    pub fn remove(&mut self, lsn: u64) -> Option<(Uuid, Tracked)> {
        let key = self.chunk_key(lsn)?;
        let chunk = self.chunks.get_mut(&key).expect("chunk_key is a key");
        let i = chunk.binary_search_by_key(&lsn, |s| s.lsn).ok()?;
        let slot = chunk.remove(i).expect("found above");
        if chunk.is_empty() {
            self.chunks.remove(&key);
        } else {
            if chunk.len() * 4 <= chunk.capacity() && chunk.capacity() > 4 {
                chunk.shrink_to(chunk.len() * 2);
            }
            if i == 0 {
                // The chunk's lowest LSN changed: re-key it.
                let c = self.chunks.remove(&key).expect("chunk_key is a key");
                self.chunks.insert(c[0].lsn, c);
            }
        }
        let status = match self.dead.remove(&lsn) {
            None => Tracked::Pending,
            Some((attempts, reason)) => Tracked::Dead { attempts, reason },
        };
        Some((slot.id, status))
    }

    /// Set a tracked entry's status; answers the old one (`None`: not tracked).
    pub fn set_status(&mut self, lsn: u64, status: Tracked) -> Option<Tracked> {
        self.find(lsn)?;
        let old = match status {
            Tracked::Pending => self.dead.remove(&lsn),
            Tracked::Dead { attempts, reason } => self.dead.insert(lsn, (attempts, reason)),
        };
        Some(match old {
            None => Tracked::Pending,
            Some((attempts, reason)) => Tracked::Dead { attempts, reason },
        })
    }

    /// The lowest LSN pending (not a dead letter).
    pub fn oldest_pending(&self) -> Option<u64> {
        self.iter().find(|m| m.is_pending()).map(|m| m.lsn)
    }

    /// The dead letters, in LSN order (without scanning the pending entries).
    pub fn dead(&self) -> impl Iterator<Item = MetaRef<'_>> + '_ {
        self.dead.keys().filter_map(|l| self.get(*l))
    }

    /// Every tracked entry, in LSN order.
    pub fn iter(&self) -> impl Iterator<Item = MetaRef<'_>> + '_ {
        self.chunks.values().flatten().map(|s| self.view(s))
    }

    /// The tracked entries with LSN ≥ `from`, in LSN order.
    pub fn iter_from(&self, from: u64) -> impl Iterator<Item = MetaRef<'_>> + '_ {
        let start = self
            .chunks
            .range(..=from)
            .next_back()
            .map_or(0, |(k, _)| *k);
        self.chunks
            .range(start..)
            .flat_map(|(_, c)| c)
            .skip_while(move |s| s.lsn < from)
            .map(|s| self.view(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, bool),
        Remove(u64),
        Dead(u64),
        Requeue(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // LSNs mostly rising (as the log appends), some anywhere; few enough
        // distinct ones that removes and re-inserts hit.
        prop_oneof![
            4 => (0u64..3000, any::<bool>()).prop_map(|(l, d)| Op::Insert(l, d)),
            3 => (0u64..3000).prop_map(Op::Remove),
            1 => (0u64..3000).prop_map(Op::Dead),
            1 => (0u64..3000).prop_map(Op::Requeue),
        ]
    }

    fn dead(l: u64) -> Tracked {
        Tracked::Dead {
            attempts: l as u32,
            reason: format!("r{l}"),
        }
    }

    proptest! {
        #[test]
        fn behaves_like_an_ordered_map(ops in proptest::collection::vec(op(), 1..2000), seq in 0u64..2000) {
            let mut m = TrackedMap::default();
            let mut model: BTreeMap<u64, (u64, Tracked)> = BTreeMap::new();
            // A rising run first (fills chunks the way the log does).
            for l in 0..seq {
                let lsn = 10_000 + l;
                m.insert(lsn, Uuid::from_u64_pair(lsn, 1), lsn * 7, "s", "d", Tracked::Pending);
                model.insert(lsn, (lsn * 7, Tracked::Pending));
            }
            for op in ops {
                match op {
                    Op::Insert(l, d) => {
                        let st = if d { dead(l) } else { Tracked::Pending };
                        let got = m.insert(l, Uuid::from_u64_pair(l, 1), l * 7, "s", if l % 2 == 0 { "a" } else { "b" }, st.clone());
                        let want = model.insert(l, (l * 7, st)).map(|(_, s)| s);
                        prop_assert_eq!(got, want);
                    }
                    Op::Remove(l) => {
                        let got = m.remove(l);
                        let want = model.remove(&l).map(|(_, s)| (Uuid::from_u64_pair(l, 1), s));
                        prop_assert_eq!(got, want);
                    }
                    Op::Dead(l) => {
                        let want = model.get_mut(&l).map(|e| std::mem::replace(&mut e.1, dead(l)));
                        prop_assert_eq!(m.set_status(l, dead(l)), want);
                    }
                    Op::Requeue(l) => {
                        let want = model.get_mut(&l).map(|e| std::mem::replace(&mut e.1, Tracked::Pending));
                        prop_assert_eq!(m.set_status(l, Tracked::Pending), want);
                    }
                }
            }
            let got: Vec<(u64, u64, Tracked)> = m.iter().map(|r| (r.lsn, r.offset, r.status())).collect();
            let want: Vec<(u64, u64, Tracked)> = model.iter().map(|(l, (o, s))| (*l, *o, s.clone())).collect();
            prop_assert_eq!(got, want);
            for from in [0, 1, 500, 2999, 3000, 10_000, 10_500, u64::MAX] {
                let got: Vec<u64> = m.iter_from(from).map(|r| r.lsn).collect();
                let want: Vec<u64> = model.range(from..).map(|(l, _)| *l).collect();
                prop_assert_eq!(got, want);
            }
            for l in [0, 7, 2999, 10_001] {
                prop_assert_eq!(m.get(l).map(|r| (r.id, r.status())), model.get(&l).map(|(_, s)| (Uuid::from_u64_pair(l, 1), s.clone())));
                prop_assert_eq!(m.contains(l), model.contains_key(&l));
            }
            let got: Vec<u64> = m.dead().map(|r| r.lsn).collect();
            let want: Vec<u64> = model.iter().filter(|(_, (_, s))| *s != Tracked::Pending).map(|(l, _)| *l).collect();
            prop_assert_eq!(got, want);
            // Every chunk is keyed by its lowest LSN and none is empty.
            for (k, c) in &m.chunks {
                prop_assert_eq!(Some(*k), c.front().map(|s| s.lsn));
            }
        }
    }

    #[test]
    fn a_queued_entry_costs_its_slot() {
        assert_eq!(std::mem::size_of::<Slot>(), 40);
    }
}
