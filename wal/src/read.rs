//! Reading entries back from the segments: the backlog and the delivery
//! queue's records ([`Wal::read_queued`]), by the offsets the state tracks.

use crate::entry::{Entry, LoggedEntry};
use crate::error::{Result, WalError};
use crate::format::{self, FrameParse, Kind};
use crate::segment::{self, FrameReader, SegmentFile};
use crate::wal::Wal;

/// A queued entry read back from the WAL for delivery ([`Wal::read_queued`]).
#[derive(Debug)]
pub enum ReadBack {
    /// The entry, as it was appended (its record's CRC checked).
    Entry(Entry),
    /// No longer pending (delivered, a dead letter, purged, forgotten by id):
    /// nothing to deliver.
    Gone,
    /// A tombstone forgot it (by subject) while it was pending: it must never
    /// reach the destination; mark it done ([`Wal::mark_delivered`]).
    Forgotten,
    /// Its record cannot be read: `WalError::Corrupt` when its bytes are
    /// damaged or its segment is gone (retrying cannot help), else the I/O
    /// error (a retry may pass).
    Failed(WalError),
}

impl Wal {
    /// Read up to `limit` pending entries with LSN > `after`, oldest first, from
    /// disk. Used to feed the delivery queue after a restart, as space allows.
    pub fn pending_after(&self, after: u64, limit: usize) -> Result<Vec<LoggedEntry>> {
        let wanted: Vec<(u64, u64, u64)> = {
            let st = self.shared.state();
            st.tracked
                .iter_from(after.saturating_add(1))
                .filter(|m| m.is_pending())
                .take(limit)
                .filter_map(|m| Some((m.lsn, st.segment_of(m.lsn)?, m.offset)))
                .collect()
        };
        self.read_at(&wanted)
    }

    /// Up to `limit` LSNs pending for `destination` with `after < LSN ≤ upto`,
    /// oldest first: the state alone, no read (the delivery queue holds LSNs
    /// and reads the records back when it delivers them, [`Wal::read_queued`]).
    pub fn pending_lsns_for(
        &self,
        destination: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Vec<u64> {
        if after >= upto {
            return Vec::new();
        }
        let st = self.shared.state();
        st.tracked
            .iter_from(after + 1)
            .take_while(|m| m.lsn <= upto)
            .filter(|m| m.is_pending() && &**m.destination == destination)
            .take(limit)
            .map(|m| m.lsn)
            .collect()
    }

    /// Read queued entries back for delivery: one answer per LSN asked, in
    /// the order asked, never an omission. An entry no longer pending is
    /// [`ReadBack::Gone`]; a record that cannot be read is
    /// [`ReadBack::Failed`] with `Corrupt` (its bytes are damaged, or its
    /// segment is missing although the entry is pending: retrying cannot help)
    /// or another error (I/O: it may pass on a retry). One bad record never
    /// hides the others.
    pub fn read_queued(&self, lsns: &[u64]) -> Vec<(u64, ReadBack)> {
        let mut wanted: Vec<(u64, u64, u64)> = Vec::with_capacity(lsns.len());
        let mut answers: std::collections::HashMap<u64, ReadBack> = {
            let st = self.shared.state();
            lsns.iter()
                .filter_map(|&l| {
                    let place = st
                        .tracked
                        .get(l)
                        .filter(|m| m.is_pending())
                        .and_then(|m| Some((st.segment_of(l)?, m.offset)));
                    match place {
                        Some((seg, off)) => {
                            wanted.push((seg, off, l));
                            None
                        }
                        None => Some((l, ReadBack::Gone)),
                    }
                })
                .collect()
        };
        wanted.sort_unstable();
        let mut open: Option<(u64, std::result::Result<FrameReader, WalError>)> = None;
        for (seg, off, lsn) in wanted {
            let file = SegmentFile::new(&self.shared.dir, seg);
            if open.as_ref().map(|o| o.0) != Some(seg) {
                open = Some((seg, FrameReader::open(&file)));
            }
            let answer = match open.as_mut().map(|o| &mut o.1) {
                Some(Ok(r)) => match entry_at(r, lsn, off) {
                    Ok(entry) => ReadBack::Entry(entry),
                    Err(e) => ReadBack::Failed(e),
                },
                // Each entry of a missing segment named with its own offset.
                Some(Err(e)) if segment::is_missing(e) => ReadBack::Failed(WalError::Corrupt {
                    segment: file.name.clone(),
                    offset: off,
                    reason: "the segment holding a pending entry is missing".into(),
                }),
                Some(Err(e)) => ReadBack::Failed(e.clone()),
                None => unreachable!("opened above"),
            };
            answers.insert(lsn, answer);
        }
        let st = self.shared.state();
        for (lsn, answer) in answers.iter_mut() {
            if let ReadBack::Entry(e) = answer {
                if st.forgets(
                    *lsn,
                    &e.source,
                    e.id,
                    e.subject.as_deref(),
                    e.accepted_at_us,
                ) {
                    *answer = ReadBack::Forgotten;
                }
            }
        }
        drop(st);
        lsns.iter()
            .map(|l| (*l, answers.remove(l).unwrap_or(ReadBack::Gone)))
            .collect()
    }

    /// Entries pending for `destination`.
    pub fn pending_count_for(&self, destination: &str) -> u64 {
        let st = self.shared.state();
        st.tracked
            .iter()
            .filter(|m| m.is_pending() && &**m.destination == destination)
            .count() as u64
    }

    /// Read the given tracked entries (pending or dead) from disk, in LSN order.
    /// LSNs the WAL no longer tracks are left out.
    pub fn read_entries(&self, lsns: &[u64]) -> Result<Vec<LoggedEntry>> {
        let wanted: Vec<(u64, u64, u64)> = {
            let st = self.shared.state();
            let mut v: Vec<_> = lsns
                .iter()
                .filter_map(|l| {
                    let m = st.tracked.get(*l)?;
                    Some((*l, st.segment_of(*l)?, m.offset))
                })
                .collect();
            v.sort_unstable();
            v
        };
        self.read_at(&wanted)
    }

    /// Read ENTRY frames at (lsn, segment, offset), sorted by lsn.
    fn read_at(&self, wanted: &[(u64, u64, u64)]) -> Result<Vec<LoggedEntry>> {
        let mut out = Vec::with_capacity(wanted.len());
        let mut open: Option<(u64, FrameReader)> = None;
        for &(lsn, seg, off) in wanted {
            if open.as_ref().map(|o| o.0) != Some(seg) {
                match FrameReader::open(&SegmentFile::new(&self.shared.dir, seg)) {
                    Ok(r) => open = Some((seg, r)),
                    // Removed by retention since we looked: no longer tracked.
                    Err(e) if segment::is_missing(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            let (_, r) = open.as_mut().expect("opened above");
            out.push(LoggedEntry {
                lsn,
                entry: entry_at(r, lsn, off)?,
            });
        }
        Ok(out)
    }
}

/// The ENTRY record `lsn` at `off`: its frame checked (CRC, LSN, kind) and
/// decoded; anything else there is `Corrupt`, naming segment and offset.
fn entry_at(r: &mut FrameReader, lsn: u64, off: u64) -> Result<Entry> {
    let entry = match r.frame_at(off)? {
        FrameParse::Ok(fr) if fr.lsn == lsn && fr.kind == Kind::Entry => {
            format::decode_entry(fr.body).map_err(|e| e.0)
        }
        FrameParse::Bad(reason) => Err(reason),
        FrameParse::Ok(_) | FrameParse::Incomplete => {
            Err("the tracked offset does not hold the entry")
        }
    };
    entry.map_err(|reason| r.corrupt(off, reason))
}
