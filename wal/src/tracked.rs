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
//!
//! There is no map from id to LSN (it cost more than the slots: 25 B a bucket at
//! half load). Each chunk knows the range of its ids' first 8 bytes, which for
//! spool's UUIDv7 ids lead with their accept time in ms; the ranges only widen
//! (a removal leaves them), so a chunk never misses an id it holds. A chunk
//! whose range spans at most [`NARROW`] (100 ms) is indexed by its range's
//! start, the others are listed apart: finding an id looks at the narrow chunks
//! starting within 100 ms before it, and at every wide one. An append starts
//! a new chunk rather than widen the last past that, so every chunk the log
//! fills in order is narrow; ids out of time order (a clock stepped back) only make
//! chunks wide, and finding slower.

use crate::state::Tracked;
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use uuid::Uuid;

/// Slots per chunk, at most.
const CHUNK: usize = 256;

/// The widest id range (in [`id_key`] units: 100 ms of UUIDv7 time) of a
/// chunk found through the start of its range: a lookup looks at the chunks
/// begun in the 100 ms before the id's time (a few, even at 200k entries/s),
/// and below ~2,500 entries/s a chunk holds 100 ms of entries, not [`CHUNK`].
const NARROW: u64 = 100 << 16;

#[derive(Debug, Clone, Copy)]
struct Slot {
    lsn: u64,
    offset: u64,
    id: Uuid,
    source: u32,
    destination: u32,
}

/// Up to [`CHUNK`] slots in LSN order, and the range of their ids' keys.
#[derive(Debug)]
struct Chunk {
    slots: VecDeque<Slot>,
    /// Lowest and highest [`id_key`] of any slot put here (a removal leaves them).
    ids: (u64, u64),
}

impl Chunk {
    fn of(slots: VecDeque<Slot>) -> Chunk {
        let keys = slots.iter().map(|s| id_key(&s.id));
        let ids = keys.fold((u64::MAX, 0), |(lo, hi), k| (lo.min(k), hi.max(k)));
        Chunk { slots, ids }
    }

    fn push_at(&mut self, at: usize, slot: Slot) {
        let k = id_key(&slot.id);
        self.ids = (self.ids.0.min(k), self.ids.1.max(k));
        self.slots.insert(at, slot);
    }

    fn may_hold(&self, key: u64) -> bool {
        self.ids.0 <= key && key <= self.ids.1
    }

    /// Where the index finds it: `Some(start of its id range)` if narrow.
    fn place(&self) -> Option<u64> {
        (self.ids.1.saturating_sub(self.ids.0) <= NARROW).then_some(self.ids.0)
    }
}

/// The first 8 bytes of an id, big-endian: a UUIDv7's ms timestamp leads.
fn id_key(id: &Uuid) -> u64 {
    let b = id.as_bytes();
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
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
    chunks: BTreeMap<u64, Chunk>,
    /// Narrow chunks by (start of id range, chunk key).
    narrow: BTreeSet<(u64, u64)>,
    /// Keys of the other chunks.
    wide: BTreeSet<u64>,
    /// Dead letters by LSN (few; ordered, so listing them stops at its limit).
    dead: BTreeMap<u64, (u32, String)>,
    /// Bytes of the dead letters' reasons (a checkpoint carries them).
    reason_bytes: u64,
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

    fn index(&mut self, key: u64, place: Option<u64>, add: bool) {
        let changed = match place {
            Some(lo) if add => self.narrow.insert((lo, key)),
            Some(lo) => self.narrow.remove(&(lo, key)),
            None if add => self.wide.insert(key),
            None => self.wide.remove(&key),
        };
        debug_assert!(changed, "the chunk index is out of step");
    }

    fn put_chunk(&mut self, key: u64, chunk: Chunk) {
        self.index(key, chunk.place(), true);
        self.chunks.insert(key, chunk);
    }

    fn take_chunk(&mut self, key: u64) -> Chunk {
        let chunk = self.chunks.remove(&key).expect("a chunk key");
        self.index(key, chunk.place(), false);
        chunk
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
        let chunk = &self.chunks.get(&self.chunk_key(lsn)?)?.slots;
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
        let old = self.remove(lsn);
        if let Tracked::Dead { attempts, reason } = status {
            self.set_dead(lsn, Some((attempts, reason)));
        }
        let alone = || Chunk::of(VecDeque::from([slot]));
        let Some(key) = self.chunk_key(lsn) else {
            self.put_chunk(lsn, alone());
            return old;
        };
        let last = self.chunks.keys().next_back() == Some(&key);
        let chunk = &self.chunks[&key];
        let at = chunk.slots.partition_point(|s| s.lsn < lsn);
        if at == chunk.slots.len() && last {
            // The common case: an append after the last chunk's end. It starts
            // a chunk when the last is full, or would stop being narrow.
            let k = id_key(&slot.id);
            let (lo, narrow) = (chunk.ids.0, chunk.place().is_some());
            if chunk.slots.len() >= CHUNK || (narrow && (k < lo || k - lo > NARROW)) {
                self.put_chunk(lsn, alone());
                return old;
            }
            // Its place in the index stays: narrow from the same start, or wide.
            let chunk = self.chunks.get_mut(&key).expect("a chunk key");
            chunk.push_at(at, slot);
            return old;
        }
        let mut chunk = self.take_chunk(key);
        chunk.push_at(at, slot);
        // Below the first chunk's lowest LSN: it is keyed anew.
        let key = key.min(lsn);
        if chunk.slots.len() > CHUNK {
            let upper = chunk.slots.split_off(chunk.slots.len() / 2);
            self.put_chunk(upper[0].lsn, Chunk::of(upper));
            chunk = Chunk::of(chunk.slots);
        }
        self.put_chunk(key, chunk);
        old
    }

    /// Stop tracking `lsn`; answers its status.
    pub fn remove(&mut self, lsn: u64) -> Option<Tracked> {
        let key = self.chunk_key(lsn)?;
        let chunk = &mut self.chunks.get_mut(&key).expect("chunk_key is a key").slots;
        let i = chunk.binary_search_by_key(&lsn, |s| s.lsn).ok()?;
        chunk.remove(i);
        if chunk.len() * 4 <= chunk.capacity() && chunk.capacity() > 4 {
            chunk.shrink_to(chunk.len() * 2);
        }
        if chunk.is_empty() {
            self.take_chunk(key);
        } else if i == 0 {
            // The chunk's lowest LSN changed: re-key it.
            let c = self.take_chunk(key);
            self.put_chunk(c.slots[0].lsn, c);
        }
        Some(match self.set_dead(lsn, None) {
            None => Tracked::Pending,
            Some((attempts, reason)) => Tracked::Dead { attempts, reason },
        })
    }

    /// The tracked entries with id `id` (one, unless a forged log repeats it),
    /// in no particular order (see the module doc for how they are found).
    pub fn with_id(&self, id: Uuid) -> impl Iterator<Item = MetaRef<'_>> + '_ {
        let k = id_key(&id);
        let narrow = self
            .narrow
            .range((k.saturating_sub(NARROW), 0)..=(k, u64::MAX))
            .map(|(_, key)| key);
        narrow
            .chain(&self.wide)
            .map(|key| &self.chunks[key])
            .filter(move |c| c.may_hold(k))
            .flat_map(|c| &c.slots)
            .filter(move |s| s.id == id)
            .map(|s| self.view(s))
    }

    /// Set a tracked entry's status; answers the old one (`None`: not tracked).
    pub fn set_status(&mut self, lsn: u64, status: Tracked) -> Option<Tracked> {
        self.find(lsn)?;
        let old = match status {
            Tracked::Pending => self.set_dead(lsn, None),
            Tracked::Dead { attempts, reason } => self.set_dead(lsn, Some((attempts, reason))),
        };
        Some(match old {
            None => Tracked::Pending,
            Some((attempts, reason)) => Tracked::Dead { attempts, reason },
        })
    }

    /// Make `lsn` a dead letter with these details (`None`: not one);
    /// answers the details it had.
    fn set_dead(&mut self, lsn: u64, dead: Option<(u32, String)>) -> Option<(u32, String)> {
        let old = match dead {
            Some(d) => {
                self.reason_bytes += d.1.len() as u64;
                self.dead.insert(lsn, d)
            }
            None => self.dead.remove(&lsn),
        };
        if let Some((_, r)) = &old {
            self.reason_bytes -= r.len() as u64;
        }
        old
    }

    /// Bytes of the dead letters' reasons.
    pub fn reason_bytes(&self) -> u64 {
        self.reason_bytes
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
        self.chunks
            .values()
            .flat_map(|c| &c.slots)
            .map(|s| self.view(s))
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
            .flat_map(|(_, c)| &c.slots)
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

    /// Mostly rising with the LSN (as UUIDv7s do), every third one anywhere.
    fn id(l: u64) -> Uuid {
        if l.is_multiple_of(3) {
            Uuid::from_u64_pair(l.wrapping_mul(0x9E37_79B9_7F4A_7C15), l)
        } else {
            Uuid::from_u64_pair(l, 1)
        }
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
                m.insert(lsn, id(lsn), lsn * 7, "s", "d", Tracked::Pending);
                model.insert(lsn, (lsn * 7, Tracked::Pending));
            }
            for op in ops {
                match op {
                    Op::Insert(l, d) => {
                        let st = if d { dead(l) } else { Tracked::Pending };
                        let got = m.insert(l, id(l), l * 7, "s", if l % 2 == 0 { "a" } else { "b" }, st.clone());
                        let want = model.insert(l, (l * 7, st)).map(|(_, s)| s);
                        prop_assert_eq!(got, want);
                    }
                    Op::Remove(l) => {
                        let got = m.remove(l);
                        let want = model.remove(&l).map(|(_, s)| s);
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
                prop_assert_eq!(m.get(l).map(|r| (r.id, r.status())), model.get(&l).map(|(_, s)| (id(l), s.clone())));
                prop_assert_eq!(m.contains(l), model.contains_key(&l));
            }
            let reasons: u64 = model.values().map(|(_, s)| match s { Tracked::Dead { reason, .. } => reason.len() as u64, _ => 0 }).sum();
            prop_assert_eq!(m.reason_bytes(), reasons);
            let got: Vec<u64> = m.dead().map(|r| r.lsn).collect();
            let want: Vec<u64> = model.iter().filter(|(_, (_, s))| *s != Tracked::Pending).map(|(l, _)| *l).collect();
            prop_assert_eq!(got, want);
            // Every chunk is keyed by its lowest LSN and none is empty.
            for (k, c) in &m.chunks {
                prop_assert_eq!(Some(*k), c.slots.front().map(|s| s.lsn));
            }
            // The id index lists every chunk once, where its range says.
            let mut narrow = BTreeSet::new();
            let mut wide = BTreeSet::new();
            for (k, c) in &m.chunks {
                match c.place() {
                    Some(lo) => narrow.insert((lo, *k)),
                    None => wide.insert(*k),
                };
                prop_assert!(c.slots.iter().all(|s| c.may_hold(id_key(&s.id))));
            }
            prop_assert_eq!(&narrow, &m.narrow);
            prop_assert_eq!(&wide, &m.wide);
            // Every tracked id is found, and only there.
            for (l, (_, s)) in &model {
                let got: Vec<(u64, Tracked)> = m.with_id(id(*l)).map(|r| (r.lsn, r.status())).collect();
                prop_assert_eq!(got, vec![(*l, s.clone())]);
            }
            for l in [1u64, 2999, 10_001, 20_000] {
                if !model.contains_key(&l) {
                    prop_assert_eq!(m.with_id(id(l)).count(), 0);
                }
            }
        }
    }

    #[test]
    fn a_queued_entry_costs_its_slot() {
        assert_eq!(std::mem::size_of::<Slot>(), 40);
    }
}
