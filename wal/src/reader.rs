//! Sequential reading of records from an LSN on, for redrive and operator replay.

use crate::config::OnCorruption;
use crate::error::{Result, WalError};
use crate::format::{self, Record};
use crate::scan::{self, SegmentFile};
use std::collections::VecDeque;
use std::path::PathBuf;

/// Iterates `(lsn, record)` for every record with `from ≤ lsn ≤ upto`, oldest first.
///
/// Reads one segment at a time. Safe to use while a [`crate::Wal`] appends: it
/// stops at the LSN that was visible when it was made, and a segment retention
/// removes under it is skipped. Damage yields one `Err` and ends the iteration.
pub struct Reader {
    dir: PathBuf,
    from: u64,
    upto: u64,
    policy: OnCorruption,
    segs: Option<Vec<SegmentFile>>,
    next_seg: usize,
    prev_lsn: u64,
    ready: VecDeque<(u64, Record)>,
    done: bool,
}

impl Reader {
    pub(crate) fn new(dir: PathBuf, from: u64, upto: u64, policy: OnCorruption) -> Reader {
        Reader {
            dir,
            from,
            upto,
            policy,
            segs: None,
            next_seg: 0,
            prev_lsn: 0,
            ready: VecDeque::new(),
            done: false,
        }
    }

    /// Read a WAL directory that no process has open (the offline tools). Takes the
    /// directory lock for the reader's lifetime is *not* done here; see `inspect`.
    pub fn open_dir(dir: impl Into<PathBuf>, from: u64) -> Reader {
        Reader::new(dir.into(), from, u64::MAX, OnCorruption::Stop)
    }

    fn fill(&mut self) -> Result<()> {
        if self.segs.is_none() {
            let segs = scan::list_segments(&self.dir)?;
            // Start at the segment holding `from`.
            self.next_seg = segs
                .partition_point(|s| s.first_lsn <= self.from)
                .saturating_sub(1);
            self.segs = Some(segs);
        }
        let segs = self.segs.as_ref().expect("listed above");
        while self.ready.is_empty() && self.next_seg < segs.len() {
            let seg = &segs[self.next_seg];
            let newest = self.next_seg + 1 == segs.len();
            self.next_seg += 1;
            if seg.first_lsn > self.upto {
                break;
            }
            let buf = match scan::read_segment(seg) {
                Ok(b) => b,
                Err(WalError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let (from, upto) = (self.from, self.upto);
            let ready = &mut self.ready;
            let walk =
                scan::walk_segment(seg, &buf, self.prev_lsn, newest, self.policy, |_, f| {
                    if f.lsn >= from && f.lsn <= upto {
                        ready.push_back((f.lsn, format::decode_record(f.kind, f.body)?));
                    }
                    Ok(())
                })?;
            if let Some(l) = walk.last_lsn {
                self.prev_lsn = l;
            }
        }
        Ok(())
    }
}

impl Iterator for Reader {
    type Item = Result<(u64, Record)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.ready.is_empty() {
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
        }
        match self.ready.pop_front() {
            Some(r) => Some(Ok(r)),
            None => {
                self.done = true;
                None
            }
        }
    }
}
