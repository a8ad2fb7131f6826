//! Segment files: listing and creating them, reading one frame at an offset, and
//! walking them — the one walk that recovery, the offline tools and the reader
//! share — classifying every byte range as valid frames, a torn tail, or
//! corruption.
//!
//! ## The torn-tail rule
//! Only the newest segment can hold a torn write (a segment is fdatasynced before
//! the next is created). In it, damage is a torn tail — cut off, never an error —
//! unless a valid frame *after* the damage carries
//! [`FRAME_FLAG_SYNCED`](format::FRAME_FLAG_SYNCED): that frame was written when
//! every byte before it, the damaged ones included, was durable, so the damage is
//! in synced history and is corruption. A power loss can leave holes anywhere in
//! the last unsynced write, with valid-looking frames after them; none of those
//! frames is flagged, so a crash alone never stops startup.

use crate::config::OnCorruption;
use crate::error::{Result, WalError};
use crate::format::{
    self, Checkpoint, Frame, FrameParse, HeaderError, Kind, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::io::{SegmentIo, WalIo};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A segment file on disk.
#[derive(Debug, Clone)]
pub(crate) struct SegmentFile {
    pub first_lsn: u64,
    pub path: PathBuf,
    pub name: String,
}

impl SegmentFile {
    pub fn new(dir: &Path, first_lsn: u64) -> SegmentFile {
        let name = format::segment_file_name(first_lsn);
        SegmentFile {
            first_lsn,
            path: dir.join(&name),
            name,
        }
    }
}

/// Segment files of `dir`, oldest first. Other files are ignored.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>> {
    let rd = std::fs::read_dir(dir).map_err(|e| WalError::io(dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| WalError::io(dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(first_lsn) = format::parse_segment_file_name(name) {
            out.push(SegmentFile {
                first_lsn,
                path: ent.path(),
                name: name.to_owned(),
            });
        }
    }
    out.sort_by_key(|s| s.first_lsn);
    Ok(out)
}

/// Create segment `first` holding its header and, if given, `checkpoint` as record
/// `first`; fdatasync it and the directory. On failure nothing is left behind.
pub(crate) fn create_segment(
    io: &dyn WalIo,
    dir: &Path,
    first: u64,
    checkpoint: Option<&Checkpoint>,
) -> Result<(Box<dyn SegmentIo>, u64)> {
    let path = dir.join(format::segment_file_name(first));
    let mut buf = format::encode_segment_header(first).to_vec();
    if let Some(cp) = checkpoint {
        let mut body = Vec::new();
        format::encode_checkpoint(cp, &mut body);
        format::encode_frame(&mut buf, Kind::Checkpoint, first, &body);
    }
    let mut created = false;
    let attempt = |created: &mut bool| -> std::io::Result<Box<dyn SegmentIo>> {
        let f = io.create_new(&path)?;
        *created = true;
        f.write_all_at(&buf, 0)?;
        f.sync_data()?;
        io.sync_dir(dir)?;
        Ok(f)
    };
    match attempt(&mut created) {
        Ok(f) => Ok((f, buf.len() as u64)),
        Err(e) => {
            // Leave nothing half-made behind: a later recovery must not see it. If
            // that cannot be made sure of, the writer must stop (it would go on
            // appending to the older segment, which the new one's checkpoint hides).
            if created {
                if let Err(c) = io.remove(&path).and_then(|()| io.sync_dir(dir)) {
                    return Err(WalError::Poisoned(format!(
                        "creating {} failed ({e}) and removing it failed too ({c})",
                        path.display()
                    )));
                }
            }
            Err(WalError::io(&path, e))
        }
    }
}

/// How a walk over one segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Every byte is a valid frame.
    Clean,
    /// The bytes from `offset` on are the last, unsynced write, cut short or holed
    /// (see the module doc). Only in the newest segment; elsewhere it is corruption.
    Torn {
        offset: u64,
        /// Highest LSN of a valid-looking frame inside the torn bytes.
        max_lsn: Option<u64>,
    },
}

/// The result of walking one segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Walk {
    pub end: End,
    /// LSN of the last valid frame, if any.
    pub last_lsn: Option<u64>,
    /// Damaged regions skipped (only with `OnCorruption::Skip`).
    pub skipped: u64,
    /// Records those regions held, at most: the LSN gap across each (at least 1).
    pub skipped_records: u64,
    /// Format version of the segment header (0 when the header is damaged).
    pub version: u32,
}

/// Walk the frames of a whole segment image `buf`, calling `visit(offset, frame)` for
/// each valid one in order. `prev_lsn` is the last LSN before this segment. Damage is
/// a torn tail or corruption by the module's rule; corruption is an error under
/// `Stop`, skipped and counted under `Skip`.
pub(crate) fn walk_segment(
    seg: &SegmentFile,
    buf: &[u8],
    prev_lsn: u64,
    newest: bool,
    policy: OnCorruption,
    mut visit: impl FnMut(u64, Frame<'_>) -> std::result::Result<(), format::BodyError>,
) -> Result<Walk> {
    let corrupt = |offset: usize, reason: &str| WalError::Corrupt {
        segment: seg.name.clone(),
        offset: offset as u64,
        reason: reason.to_owned(),
    };
    let mut walk = Walk {
        end: End::Clean,
        last_lsn: None,
        skipped: 0,
        skipped_records: 0,
        version: 0,
    };
    let floor = prev_lsn.max(seg.first_lsn.saturating_sub(1));
    match format::decode_segment_header(buf) {
        Ok(first) if first == seg.first_lsn => walk.version = format::segment_header_version(buf),
        Err(HeaderError::Version(v)) => {
            return Err(corrupt(
                8,
                &format!(
                    "segment format version {v}; this build reads versions {} to {}",
                    format::MIN_READ_VERSION,
                    format::FORMAT_VERSION
                ),
            ))
        }
        other => {
            let reason = match other {
                Ok(_) => "segment header names another first LSN than its file name",
                Err(HeaderError::Invalid(r)) => r,
                Err(_) => "segment header is incomplete",
            };
            let rest = buf.get(SEGMENT_HEADER_LEN..).unwrap_or(&[]);
            if newest && resync(rest, 0, floor).is_none() {
                // A segment whose creation was cut short: nothing in it was ever acknowledged.
                walk.end = End::Torn {
                    offset: 0,
                    max_lsn: None,
                };
                return Ok(walk);
            }
            if policy == OnCorruption::Stop {
                return Err(corrupt(0, reason));
            }
            walk.skipped += 1;
            walk.skipped_records += 1;
            tracing::warn!(segment = %seg.name, offset = 0, reason, "skipping damaged segment header");
        }
    }
    let mut pos = SEGMENT_HEADER_LEN.min(buf.len());
    let mut last = floor;
    while pos < buf.len() {
        let reason = match format::parse_frame(&buf[pos..]) {
            FrameParse::Ok(f) if f.lsn > last => match visit(pos as u64, f) {
                Ok(()) => {
                    last = f.lsn;
                    walk.last_lsn = Some(f.lsn);
                    pos += f.len();
                    continue;
                }
                Err(e) => e.0,
            },
            FrameParse::Ok(_) => "record LSN does not increase",
            FrameParse::Incomplete => "record extends past the end of the segment",
            FrameParse::Bad(r) => r,
        };
        let next = resync(&buf[pos..], 1, last).map(|n| pos + n);
        if newest {
            let (synced_after, max_lsn) = frames_after(buf, next, last);
            if !synced_after {
                walk.end = End::Torn {
                    offset: pos as u64,
                    max_lsn,
                };
                return Ok(walk);
            }
        }
        if policy == OnCorruption::Stop {
            return Err(corrupt(pos, reason));
        }
        let Some(n) = next else {
            tracing::warn!(segment = %seg.name, offset = pos, reason, "skipping damaged tail of sealed segment");
            walk.skipped += 1;
            walk.skipped_records += 1;
            return Ok(walk);
        };
        let records = match format::parse_frame(&buf[n..]) {
            FrameParse::Ok(f) => (f.lsn - last - 1).max(1),
            _ => 1,
        };
        tracing::warn!(segment = %seg.name, offset = pos, skipped_bytes = n - pos, records, reason, "skipping damaged record");
        walk.skipped += 1;
        walk.skipped_records += records;
        pos = n;
    }
    Ok(walk)
}

/// Over the valid frames from `from` on (skipping damage): whether any carries the
/// synced flag, and the highest LSN among them.
fn frames_after(buf: &[u8], mut from: Option<usize>, after: u64) -> (bool, Option<u64>) {
    let mut max_lsn = None;
    while let Some(pos) = from {
        match format::parse_frame(&buf[pos..]) {
            FrameParse::Ok(f) if f.lsn > after && body_decodes(f) => {
                if f.synced_before {
                    return (true, max_lsn.max(Some(f.lsn)));
                }
                max_lsn = max_lsn.max(Some(f.lsn));
                from = Some(pos + f.len());
            }
            _ => from = resync(&buf[pos..], 1, after).map(|n| pos + n),
        }
    }
    (false, max_lsn)
}

/// The first offset at or after `from` in `buf` where a valid frame with an LSN above
/// `after` starts. Used to tell a torn tail (nothing valid follows) from corruption.
pub(crate) fn resync(buf: &[u8], from: usize, after: u64) -> Option<usize> {
    (from..buf.len()).find(|&off| {
        matches!(format::parse_frame(&buf[off..]), FrameParse::Ok(f)
            if f.lsn > after && body_decodes(f))
    })
}

fn body_decodes(f: Frame<'_>) -> bool {
    format::decode_record(f.kind, f.body).is_ok()
}

/// Read a whole segment file into `buf`, reusing its allocation (a fresh 64 MiB
/// buffer per segment costs more in page faults than the read itself).
pub(crate) fn read_segment_into(seg: &SegmentFile, buf: &mut Vec<u8>) -> Result<()> {
    use std::io::Read;
    buf.clear();
    std::fs::File::open(&seg.path)
        .and_then(|mut f| f.read_to_end(buf))
        .map_err(|e| WalError::io(&seg.path, e))?;
    Ok(())
}

/// Whether an error is a segment file that is not there (removed by retention).
pub(crate) fn is_missing(e: &WalError) -> bool {
    matches!(e, WalError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// One segment walked by a [`Walker`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Walked {
    /// Index in [`Walker::segments`].
    pub index: usize,
    /// Bytes in the file.
    pub bytes: u64,
    pub walk: Walk,
}

/// Walks segments in order, each with the last LSN of the one before: the one
/// segment walk of the crate.
pub(crate) struct Walker {
    segs: Vec<SegmentFile>,
    next: usize,
    prev_lsn: u64,
    policy: OnCorruption,
    /// Segments that vanish meanwhile are skipped (a reader beside a live WAL).
    skip_missing: bool,
    buf: Vec<u8>,
}

impl Walker {
    /// Walk `segs` from index `start` on.
    pub fn new(segs: Vec<SegmentFile>, start: usize, policy: OnCorruption) -> Walker {
        let prev_lsn = segs.get(start).map_or(0, |s| s.first_lsn.saturating_sub(1));
        Walker {
            segs,
            next: start,
            prev_lsn,
            policy,
            skip_missing: false,
            buf: Vec::new(),
        }
    }

    /// Skip segments removed since they were listed instead of failing.
    pub fn skipping_missing(mut self) -> Walker {
        self.skip_missing = true;
        self
    }

    /// The segments being walked.
    pub fn segments(&self) -> &[SegmentFile] {
        &self.segs
    }

    /// The segment the next call walks, if any.
    pub fn peek(&self) -> Option<&SegmentFile> {
        self.segs.get(self.next)
    }

    /// Walk the next segment, calling `visit` for each valid frame.
    pub fn next_segment(
        &mut self,
        mut visit: impl FnMut(u64, Frame<'_>) -> std::result::Result<(), format::BodyError>,
    ) -> Option<Result<Walked>> {
        loop {
            let index = self.next;
            let seg = self.segs.get(index)?;
            self.next += 1;
            match read_segment_into(seg, &mut self.buf) {
                Ok(()) => {}
                Err(e) if self.skip_missing && is_missing(&e) => continue,
                Err(e) => return Some(Err(e)),
            }
            let newest = index + 1 == self.segs.len();
            let walk = match walk_segment(
                seg,
                &self.buf,
                self.prev_lsn,
                newest,
                self.policy,
                &mut visit,
            ) {
                Ok(w) => w,
                Err(e) => return Some(Err(e)),
            };
            self.prev_lsn = self.prev_lsn.max(walk.last_lsn.unwrap_or(0));
            return Some(Ok(Walked {
                index,
                bytes: self.buf.len() as u64,
                walk,
            }));
        }
    }
}

/// Reads frames at given offsets of one segment file through a read-ahead window,
/// so offsets visited in order cost one sequential read per window.
pub(crate) struct FrameReader {
    file: File,
    seg: SegmentFile,
    len: u64,
    win: Vec<u8>,
    win_off: u64,
}

/// Read-ahead: large enough that offsets visited in order cost few reads, small
/// enough that one entry read on a request path stays cheap.
const WINDOW: usize = 64 << 10;

impl FrameReader {
    pub fn open(seg: &SegmentFile) -> Result<FrameReader> {
        let file = File::open(&seg.path).map_err(|e| WalError::io(&seg.path, e))?;
        let len = file
            .metadata()
            .map_err(|e| WalError::io(&seg.path, e))?
            .len();
        Ok(FrameReader {
            file,
            seg: seg.clone(),
            len,
            win: Vec::new(),
            win_off: 0,
        })
    }

    /// The bytes at `off..off + n` (fewer where the file ends).
    pub fn bytes_at(&mut self, off: u64, n: usize) -> Result<&[u8]> {
        let end = off.saturating_add(n as u64).min(self.len);
        let covered = off >= self.win_off && end <= self.win_off + self.win.len() as u64;
        if !covered {
            let want = (n.max(WINDOW) as u64).min(self.len.saturating_sub(off)) as usize;
            self.win.resize(want, 0);
            self.file
                .read_exact_at(&mut self.win, off)
                .map_err(|e| WalError::io(&self.seg.path, e))?;
            self.win_off = off;
        }
        let start = (off - self.win_off) as usize;
        let stop = (end.max(off) - self.win_off) as usize;
        Ok(&self.win[start..stop])
    }

    /// What lies at `off`: a valid frame, damage, or the end of the file.
    pub fn frame_at(&mut self, off: u64) -> Result<FrameParse<'_>> {
        let head = self.bytes_at(off, FRAME_HEADER_LEN)?;
        let mut need = FRAME_HEADER_LEN;
        if head.len() == FRAME_HEADER_LEN {
            let body = u32::from_le_bytes(head[0..4].try_into().unwrap()) as usize;
            if body <= format::MAX_FRAME_BODY {
                need += body;
            }
        }
        Ok(format::parse_frame(self.bytes_at(off, need)?))
    }

    /// An error naming this segment and `off`.
    pub fn corrupt(&self, off: u64, reason: &str) -> WalError {
        WalError::Corrupt {
            segment: self.seg.name.clone(),
            offset: off,
            reason: reason.to_owned(),
        }
    }
}
