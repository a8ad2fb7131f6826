//! Sequential reading of records from an LSN on, for redrive and operator replay.

use crate::config::OnCorruption;
use crate::error::Result;
use crate::format::{self, Record};
use crate::segment::{self, Walker};
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
    walker: Option<Walker>,
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
            walker: None,
            ready: VecDeque::new(),
            done: false,
        }
    }

    /// Read a WAL directory that no process has open (the offline tools). Taking
    /// the directory lock is the caller's business; see `inspect`.
    pub fn open_dir(dir: impl Into<PathBuf>, from: u64) -> Reader {
        Reader::new(dir.into(), from, u64::MAX, OnCorruption::Stop)
    }

    fn fill(&mut self) -> Result<()> {
        if self.walker.is_none() {
            let segs = segment::list_segments(&self.dir)?;
            // Start at the segment holding `from`.
            let start = segs
                .partition_point(|s| s.first_lsn <= self.from)
                .saturating_sub(1);
            self.walker = Some(Walker::new(segs, start, self.policy).skipping_missing());
        }
        let walker = self.walker.as_mut().expect("made above");
        let (from, upto) = (self.from, self.upto);
        while self.ready.is_empty() && walker.peek().is_some_and(|s| s.first_lsn <= upto) {
            let ready = &mut self.ready;
            let walked = walker.next_segment(|_, f| {
                if f.lsn >= from && f.lsn <= upto {
                    ready.push_back((f.lsn, format::decode_record(f.kind, f.body)?));
                }
                Ok(())
            });
            if let Some(Err(e)) = walked {
                return Err(e);
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
