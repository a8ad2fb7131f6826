//! The in-memory view of the log: which entries are pending, which are dead
//! letters, where their records lie, and what each segment still holds.
//!
//! Recovery and the live writer build it with the same [`State::apply`], frame by
//! frame, so what a restart rebuilds is by construction what the running process had.

use crate::format::{self, BodyError, Checkpoint, DeadRef, Kind, Record, TombRef, Tombstone};
use crate::tracked::TrackedMap;
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::SystemTime;
use uuid::Uuid;

/// Why an entry is not yet delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    /// Waiting for delivery.
    Pending,
    /// A dead letter.
    Dead {
        /// Delivery attempts made.
        attempts: u32,
        /// Why it failed.
        reason: String,
    },
}

/// What the state knows of one segment.
#[derive(Debug, Clone)]
pub(crate) struct SegInfo {
    /// Bytes in the file.
    pub bytes: u64,
    /// Tracked entries (pending or dead letters) whose ENTRY record is in this
    /// segment: retention never deletes a segment while this is above zero.
    pub live: u64,
    /// Last modification (seal) time, for retention.
    pub modified: SystemTime,
    /// TOMBSTONE records in this segment: while an older segment is retained
    /// (it may hold what they forgot), retention keeps this one.
    pub tombstones: u64,
}

impl SegInfo {
    /// A segment holding nothing tracked yet.
    pub fn new(bytes: u64, modified: SystemTime) -> SegInfo {
        SegInfo {
            bytes,
            live: 0,
            modified,
            tombstones: 0,
        }
    }
}

/// A retained TOMBSTONE record.
#[derive(Debug, Clone)]
pub(crate) struct TombMeta {
    pub offset: u64,
    /// The destination has applied its delete.
    pub delivered: bool,
    pub tombstone: Arc<Tombstone>,
}

/// Totals over a whole scan (offline stats).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Totals {
    pub records: u64,
    pub entries: u64,
    pub delivered: u64,
    /// FAILED records seen (an entry failed, requeued and failed again counts twice).
    pub failed_records: u64,
    /// Tracked entries a TOMBSTONE ended.
    pub forgotten: u64,
}

/// Per subject: (accept time up to which, tombstone LSN) of each tombstone.
type SubjectTombstones = FxHashMap<Box<str>, Vec<(i64, u64)>>;

#[derive(Debug, Default)]
pub(crate) struct State {
    pub tracked: TrackedMap,
    pub segments: BTreeMap<u64, SegInfo>,
    /// The segment recovery would start its walk from: the newest whose head is
    /// a checkpoint (the oldest, without one). Retention deletes only segments
    /// before it: those from it on are walked at recovery.
    pub recovery_start: u64,
    pub pending: u64,
    pub dead: u64,
    pub totals: Totals,
    /// Purged dead letters whose ENTRY record may still be retained.
    pub purged: BTreeSet<u64>,
    /// Pending entries a tombstone ended (by id) since this WAL was opened, while
    /// their ENTRY record may be retained: their receipts say forgotten.
    pub ended_by_forget: BTreeSet<u64>,
    /// Retained TOMBSTONE records by LSN.
    pub tombstones: BTreeMap<u64, TombMeta>,
    /// Of the retained tombstones: ids forgotten, each with (source, tombstone LSN).
    forgotten_ids: FxHashMap<Uuid, Vec<(Arc<str>, u64)>>,
    /// Of the retained tombstones: per source and subject, (accept time up to
    /// which, tombstone LSN).
    forgotten_subjects: FxHashMap<Arc<str>, SubjectTombstones>,
    /// Highest stamp (accept or forget time) of any record applied, or named by
    /// a checkpoint: the next stamp is above it.
    pub stamp: i64,
}

impl State {
    /// First LSN of the segment holding `lsn`.
    pub fn segment_of(&self, lsn: u64) -> Option<u64> {
        self.segments.range(..=lsn).next_back().map(|(k, _)| *k)
    }

    /// Bytes of all segments.
    pub fn total_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Track an entry read from `body` (an ENTRY body) at `offset` of its segment.
    pub fn insert_entry(
        &mut self,
        lsn: u64,
        offset: u64,
        body: &[u8],
        status: Tracked,
    ) -> Result<(), BodyError> {
        let e = format::decode_entry_ref(body)?;
        self.stamp = self.stamp.max(e.accepted_at_us);
        let pending = status == Tracked::Pending;
        let old = self
            .tracked
            .insert(lsn, e.id, offset, e.source, e.destination, status);
        if let Some(old) = old {
            // Only a forged log repeats an LSN; keep counts honest anyway.
            self.forget_counts(lsn, &old);
        }
        self.seg_live(lsn, 1);
        if pending {
            self.pending += 1;
        } else {
            self.dead += 1;
        }
        Ok(())
    }

    fn seg_live(&mut self, lsn: u64, delta: i64) {
        if let Some(first) = self.segment_of(lsn) {
            let s = self
                .segments
                .get_mut(&first)
                .expect("segment_of returned a key");
            s.live = s.live.saturating_add_signed(delta);
        }
    }

    fn forget_counts(&mut self, lsn: u64, status: &Tracked) {
        self.seg_live(lsn, -1);
        match status {
            Tracked::Pending => self.pending -= 1,
            Tracked::Dead { .. } => self.dead -= 1,
        }
    }

    /// Drop an entry from tracking (delivered).
    fn remove(&mut self, lsn: u64) -> bool {
        match self.tracked.remove(lsn) {
            Some(status) => {
                self.forget_counts(lsn, &status);
                true
            }
            None => false,
        }
    }

    /// Apply one valid frame that lies at `offset` of the segment starting at `seg`.
    pub fn apply(
        &mut self,
        offset: u64,
        lsn: u64,
        kind: Kind,
        body: &[u8],
    ) -> Result<(), BodyError> {
        self.totals.records += 1;
        match kind {
            Kind::Entry => {
                self.totals.entries += 1;
                self.insert_entry(lsn, offset, body, Tracked::Pending)?;
            }
            Kind::Tombstone => self.insert_tombstone(lsn, offset, body, false)?,
            // An erased forgotten entry: nothing to track.
            Kind::Erased => {}
            _ => match format::decode_record(kind, body)? {
                Record::Delivered(lsns) => {
                    for l in lsns {
                        if self.remove(l) {
                            self.totals.delivered += 1;
                        } else {
                            self.tombstone_delivered(l);
                        }
                    }
                }
                Record::Failed {
                    lsn: target,
                    attempts,
                    reason,
                } => {
                    self.totals.failed_records += 1;
                    self.mark_dead(target, attempts, reason);
                }
                Record::Requeued(lsns) => {
                    for l in lsns {
                        self.requeue(l);
                    }
                }
                Record::Purged(lsns) => {
                    for l in lsns {
                        if self.tracked.get(l).is_some_and(|m| !m.is_pending()) {
                            self.remove(l);
                            self.purged.insert(l);
                        }
                    }
                }
                Record::Checkpoint(cp) => self.apply_checkpoint(lsn, &cp),
                Record::Entry(_) | Record::Tombstone(_) | Record::Erased(_) => {
                    unreachable!("handled above")
                }
            },
        }
        Ok(())
    }

    fn mark_dead(&mut self, lsn: u64, attempts: u32, reason: String) {
        let old = self
            .tracked
            .set_status(lsn, Tracked::Dead { attempts, reason });
        if old == Some(Tracked::Pending) {
            self.pending -= 1;
            self.dead += 1;
        }
    }

    fn requeue(&mut self, lsn: u64) {
        if self.tracked.get(lsn).is_some_and(|m| !m.is_pending()) {
            self.tracked.set_status(lsn, Tracked::Pending);
            self.dead -= 1;
            self.pending += 1;
        }
    }

    /// A checkpoint lists every undelivered entry before it: anything tracked
    /// before it and not listed was delivered (its marker may lie in a segment
    /// that retention removed). Dead letters take the checkpoint's word.
    fn apply_checkpoint(&mut self, cp_lsn: u64, cp: &Checkpoint) {
        let listed: HashSet<u64> = cp
            .pending
            .iter()
            .map(|(l, _)| *l)
            .chain(cp.dead.iter().map(|d| d.lsn))
            .collect();
        let gone: Vec<u64> = self
            .tracked
            .iter()
            .map(|m| m.lsn)
            .take_while(|l| *l < cp_lsn)
            .filter(|l| !listed.contains(l))
            .collect();
        for l in gone {
            if self.remove(l) {
                self.totals.delivered += 1;
            }
        }
        for d in &cp.dead {
            if self.tracked.get(d.lsn).is_some_and(|m| m.is_pending()) {
                self.mark_dead(d.lsn, d.attempts, d.reason.clone());
            }
        }
        self.stamp = self.stamp.max(cp.stamp);
        self.purged.extend(cp.purged.iter().copied());
        // Tombstones before it that it does not list were retired with their segment.
        let listed: HashSet<u64> = cp.tombstones.iter().map(|t| t.lsn).collect();
        let retired: Vec<u64> = self
            .tombstones
            .range(..cp_lsn)
            .map(|(l, _)| *l)
            .filter(|l| !listed.contains(l))
            .collect();
        if !retired.is_empty() {
            for l in retired {
                self.tombstones.remove(&l);
            }
            self.rebuild_forgotten();
        }
        for t in cp.tombstones.iter().filter(|t| t.delivered) {
            self.tombstone_delivered(t.lsn);
        }
    }

    /// Track a TOMBSTONE record read from `body` at `offset` of its segment. The
    /// tracked entries it forgets by id end here: never delivered, never requeued.
    pub fn insert_tombstone(
        &mut self,
        lsn: u64,
        offset: u64,
        body: &[u8],
        delivered: bool,
    ) -> Result<(), BodyError> {
        let t = Arc::new(format::decode_tombstone(body)?);
        self.stamp = self.stamp.max(t.at_us);
        for id in &t.ids {
            let ended: Vec<u64> = self
                .tracked
                .with_id(*id)
                .filter(|m| m.lsn < lsn && **m.source == t.source)
                .map(|m| m.lsn)
                .collect();
            for l in ended {
                self.remove(l);
                self.ended_by_forget.insert(l);
                self.totals.forgotten += 1;
            }
        }
        self.index_forgotten(lsn, &t);
        if let Some(first) = self.segment_of(lsn) {
            let seg = self
                .segments
                .get_mut(&first)
                .expect("segment_of returned a key");
            seg.tombstones += 1;
            if !delivered {
                seg.live += 1;
            }
        }
        let meta = TombMeta {
            offset,
            delivered,
            tombstone: t,
        };
        if let Some(old) = self.tombstones.insert(lsn, meta) {
            // Only a forged log repeats an LSN; keep counts honest anyway.
            if let Some(seg) = self.segment_of(lsn).and_then(|f| self.segments.get_mut(&f)) {
                seg.tombstones -= 1;
                if !old.delivered {
                    seg.live = seg.live.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    fn index_forgotten(&mut self, lsn: u64, t: &Tombstone) {
        let source = self.tracked.intern(&t.source);
        for id in &t.ids {
            self.forgotten_ids
                .entry(*id)
                .or_default()
                .push((source.clone(), lsn));
        }
        if let Some(subject) = &t.subject {
            self.forgotten_subjects
                .entry(source)
                .or_default()
                .entry(subject.as_str().into())
                .or_default()
                .push((t.at_us, lsn));
        }
    }

    fn rebuild_forgotten(&mut self) {
        self.forgotten_ids.clear();
        self.forgotten_subjects.clear();
        let all: Vec<(u64, Arc<Tombstone>)> = self
            .tombstones
            .iter()
            .map(|(l, m)| (*l, m.tombstone.clone()))
            .collect();
        for (lsn, t) in all {
            self.index_forgotten(lsn, &t);
        }
    }

    /// A tombstone's delete was applied: it no longer pins its segment for that.
    fn tombstone_delivered(&mut self, lsn: u64) {
        let Some(m) = self.tombstones.get_mut(&lsn) else {
            return;
        };
        if !m.delivered {
            m.delivered = true;
            self.seg_live(lsn, -1);
        }
    }

    /// Whether a retained tombstone forgets the entry at `lsn`: one written
    /// after it (in log order) that names its id, or its subject with an accept
    /// time at or after the entry's.
    pub fn forgets(
        &self,
        lsn: u64,
        source: &str,
        id: Uuid,
        subject: Option<&str>,
        accepted_at_us: i64,
    ) -> bool {
        self.forgotten_ids
            .get(&id)
            .is_some_and(|v| v.iter().any(|(s, t)| **s == *source && lsn < *t))
            || subject.is_some_and(|subject| {
                self.forgotten_subjects
                    .get(source)
                    .and_then(|m| m.get(subject))
                    .is_some_and(|v| {
                        v.iter()
                            .any(|(upto, t)| accepted_at_us <= *upto && lsn < *t)
                    })
            })
    }

    /// The LSN of a retained tombstone that forgot `id` (by id) in `source`.
    pub fn forgot_id(&self, source: &str, id: Uuid) -> Option<u64> {
        self.forgotten_ids
            .get(&id)?
            .iter()
            .find(|(s, _)| **s == *source)
            .map(|(_, t)| *t)
    }

    /// Drop the segment starting at `first` (retention deleted it) with the
    /// tombstones it held.
    pub fn retire_segment(&mut self, first: u64) {
        self.segments.remove(&first);
        let end = self
            .segments
            .range(first..)
            .next()
            .map_or(u64::MAX, |(k, _)| *k);
        let gone: Vec<u64> = self.tombstones.range(first..end).map(|(l, _)| *l).collect();
        if !gone.is_empty() {
            for l in gone {
                self.tombstones.remove(&l);
            }
            self.rebuild_forgotten();
        }
        self.prune_purged();
    }

    /// Forget purged (and forgotten) LSNs older than every retained segment
    /// (their ENTRY records are gone, so nothing can replay them).
    pub fn prune_purged(&mut self) {
        let oldest = self.segments.keys().next().copied().unwrap_or(u64::MAX);
        self.purged = self.purged.split_off(&oldest);
        self.ended_by_forget = self.ended_by_forget.split_off(&oldest);
    }

    /// The checkpoint describing this state, if it is at most `limit` bytes
    /// (about; encoded): a checkpoint lists every tracked entry, so with a big
    /// backlog writing one at each rotation would cost more than the records.
    pub fn checkpoint_within(&self, limit: u64) -> Option<Checkpoint> {
        (self.checkpoint_estimate() <= limit).then(|| self.checkpoint())
    }

    /// About how many bytes [`State::checkpoint`] would encode to.
    pub fn checkpoint_estimate(&self) -> u64 {
        16 * self.pending
            + 24 * self.dead
            + self.tracked.reason_bytes()
            + 32 * self.tombstones.len() as u64
            + 8 * (self.segments.len() + self.purged.len()) as u64
    }

    /// The checkpoint describing this state (before a new segment is added to it).
    pub fn checkpoint(&self) -> Checkpoint {
        let mut cp = Checkpoint {
            segments: Some(self.segments.keys().copied().collect()),
            purged: self.purged.iter().copied().collect(),
            tombstones: self
                .tombstones
                .iter()
                .map(|(lsn, m)| TombRef {
                    lsn: *lsn,
                    offset: m.offset,
                    delivered: m.delivered,
                })
                .collect(),
            stamp: self.stamp,
            ..Checkpoint::default()
        };
        for m in self.tracked.iter() {
            match m.status() {
                Tracked::Pending => cp.pending.push((m.lsn, m.offset)),
                Tracked::Dead { attempts, reason } => cp.dead.push(DeadRef {
                    lsn: m.lsn,
                    offset: m.offset,
                    attempts,
                    reason,
                }),
            }
        }
        cp
    }
}
