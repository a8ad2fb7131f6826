//! Walking segment files: listing them, and classifying what each byte range is —
//! valid frames, a torn tail, or corruption.

use crate::config::OnCorruption;
use crate::error::{Result, WalError};
use crate::format::{self, Frame, FrameParse, HeaderError, SEGMENT_HEADER_LEN};
use std::path::{Path, PathBuf};

/// A segment file on disk.
#[derive(Debug, Clone)]
pub(crate) struct SegmentFile {
    pub first_lsn: u64,
    pub path: PathBuf,
    pub name: String,
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

/// How a walk over one segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Every byte is a valid frame.
    Clean,
    /// The bytes from `offset` on hold nothing valid: a write that was cut short.
    /// Only reported for the newest segment; elsewhere it is corruption.
    Torn { offset: u64 },
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
}

/// Walk the frames of a whole segment image `buf`, calling `visit(offset, frame)` for
/// each valid one in order. `prev_lsn` is the last LSN before this segment. Damage
/// followed by valid frames, or any damage in a sealed segment, is corruption:
/// an error under `Stop`, skipped and counted under `Skip`.
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
    };
    let floor = prev_lsn.max(seg.first_lsn.saturating_sub(1));
    match format::decode_segment_header(buf) {
        Ok(first) if first == seg.first_lsn => {}
        Err(HeaderError::Version(v)) => {
            return Err(corrupt(
                8,
                &format!(
                    "segment format version {v}; this build reads version {}",
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
                walk.end = End::Torn { offset: 0 };
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
        match next {
            None if newest => {
                walk.end = End::Torn { offset: pos as u64 };
                return Ok(walk);
            }
            _ if policy == OnCorruption::Stop => return Err(corrupt(pos, reason)),
            None => {
                tracing::warn!(segment = %seg.name, offset = pos, reason, "skipping damaged tail of sealed segment");
                walk.skipped += 1;
                walk.skipped_records += 1;
                return Ok(walk);
            }
            Some(n) => {
                let records = match format::parse_frame(&buf[n..]) {
                    FrameParse::Ok(f) => (f.lsn - last - 1).max(1),
                    _ => 1,
                };
                tracing::warn!(segment = %seg.name, offset = pos, skipped_bytes = n - pos, records, reason, "skipping damaged record");
                walk.skipped += 1;
                walk.skipped_records += records;
                pos = n;
            }
        }
    }
    Ok(walk)
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

/// Read a whole segment file.
pub(crate) fn read_segment(seg: &SegmentFile) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_segment_into(seg, &mut buf)?;
    Ok(buf)
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
