//! `spool wal compact`: rewrite sealed segments without what producers forgot.
//!
//! A forgotten entry's ENTRY record stays in its segment until retention
//! deletes the segment. Compaction erases it sooner: in a copy of each sealed
//! segment holding one, every such frame keeps its length, LSN and synced flag
//! but becomes an ERASED record with a zeroed body (so every offset a
//! checkpoint names stays right); the copy is written to a new file,
//! fdatasynced, renamed over the segment and the directory fsynced. A segment
//! is never rewritten in place, and a crash at any point leaves either the old
//! segment or the new one (a stray `.compact` file is ignored and replaced by
//! the next run). Entries still tracked (pending or dead) are left as they are;
//! the newest segment, being written, is never touched.

use crate::error::{Result, WalError};
use crate::format::{
    self, FrameParse, Kind, FRAME_FLAG_SYNCED, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::segment::{self, SegmentFile};
use crate::wal::Wal;

/// What a compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Sealed segments read.
    pub segments_scanned: u64,
    /// Segments rewritten (each held at least one forgotten entry).
    pub segments_rewritten: u64,
    /// ENTRY records erased.
    pub entries_erased: u64,
    /// Body bytes zeroed.
    pub bytes_erased: u64,
}

impl Wal {
    /// Erase the records of forgotten entries from every sealed segment (see
    /// the module doc). Meant for an offline WAL (`spool wal compact`).
    pub fn compact(&self) -> Result<CompactReport> {
        let sealed: Vec<u64> = {
            let st = self.shared.state();
            let newest = st.segments.keys().next_back().copied();
            st.segments
                .keys()
                .copied()
                .filter(|f| Some(*f) != newest)
                .collect()
        };
        let mut report = CompactReport::default();
        let mut buf = Vec::new();
        for first in sealed {
            let seg = SegmentFile::new(&self.shared.dir, first);
            match segment::read_segment_into(&seg, &mut buf) {
                Ok(()) => {}
                Err(e) if segment::is_missing(&e) => continue,
                Err(e) => return Err(e),
            }
            report.segments_scanned += 1;
            let erased = self.erase_forgotten(&seg, &mut buf)?;
            if erased.0 == 0 {
                continue;
            }
            self.swap_in(&seg, &buf)?;
            report.segments_rewritten += 1;
            report.entries_erased += erased.0;
            report.bytes_erased += erased.1;
            tracing::info!(segment = %seg.name, entries = erased.0, "erased forgotten entries");
        }
        Ok(report)
    }

    /// Erase, in the segment image `buf`, the ENTRY frames of forgotten,
    /// untracked entries; (frames, body bytes) erased.
    fn erase_forgotten(&self, seg: &SegmentFile, buf: &mut [u8]) -> Result<(u64, u64)> {
        let corrupt = |offset: usize, reason: &str| WalError::Corrupt {
            segment: seg.name.clone(),
            offset: offset as u64,
            reason: reason.to_owned(),
        };
        let mut targets = Vec::new();
        {
            let st = self.shared.state();
            let mut pos = SEGMENT_HEADER_LEN;
            while pos < buf.len() {
                let f = match format::parse_frame(&buf[pos..]) {
                    FrameParse::Ok(f) => f,
                    FrameParse::Bad(r) => return Err(corrupt(pos, r)),
                    FrameParse::Incomplete => {
                        return Err(corrupt(pos, "incomplete frame in a sealed segment"))
                    }
                };
                if f.kind == Kind::Entry && !st.tracked.contains(f.lsn) {
                    let e = format::decode_entry_ref(f.body).map_err(|e| corrupt(pos, e.0))?;
                    if st.forgets(f.lsn, e.source, e.id, e.subject, e.accepted_at_us) {
                        targets.push((pos, f.body.len()));
                    }
                }
                pos += f.len();
            }
        }
        let mut bytes = 0;
        for &(pos, n) in &targets {
            let kind = &mut buf[pos + 8];
            *kind = (*kind & FRAME_FLAG_SYNCED) | Kind::Erased as u8;
            buf[pos + FRAME_HEADER_LEN..pos + FRAME_HEADER_LEN + n].fill(0);
            let crc = crc32fast::hash(&buf[pos + 8..pos + FRAME_HEADER_LEN + n]);
            buf[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
            bytes += n as u64;
        }
        if !targets.is_empty() {
            // ERASED is a version-4 kind: the rewritten segment says so.
            let first =
                format::decode_segment_header(buf).map_err(|_| corrupt(0, "bad segment header"))?;
            buf[..SEGMENT_HEADER_LEN].copy_from_slice(&format::encode_segment_header(first));
        }
        Ok((targets.len() as u64, bytes))
    }

    /// Write `buf` to a new file, fdatasync it, rename it over `seg`, fsync the directory.
    fn swap_in(&self, seg: &SegmentFile, buf: &[u8]) -> Result<()> {
        let io = &self.shared.io;
        let dir = &self.shared.dir;
        let tmp = seg.path.with_extension("wal.compact");
        let fail = |p: &std::path::Path, e| WalError::io(p, e);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(&tmp, e)),
        }
        // Its age is the segment's (retention counts from its last write).
        let modified = std::fs::metadata(&seg.path)
            .and_then(|m| m.modified())
            .map_err(|e| fail(&seg.path, e))?;
        let f = io.create_new(&tmp).map_err(|e| fail(&tmp, e))?;
        f.write_all_at(buf, 0).map_err(|e| fail(&tmp, e))?;
        f.sync_data().map_err(|e| fail(&tmp, e))?;
        drop(f);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.set_modified(modified))
            .map_err(|e| fail(&tmp, e))?;
        io.rename(&tmp, &seg.path).map_err(|e| fail(&seg.path, e))?;
        io.sync_dir(dir).map_err(|e| fail(dir, e))
    }
}
