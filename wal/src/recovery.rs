//! Rebuilding the [`State`] from disk at open.
//!
//! 1. Find the newest segment whose first record is a CHECKPOINT (every rotated
//!    segment starts with one). Without one, start from the oldest segment.
//! 2. Load the entries the checkpoint lists from the older segments, reading only
//!    the frames at the offsets it names.
//! 3. Walk every frame from that segment on, applying each to the state.
//! 4. A torn tail of the newest segment is truncated (or its file removed when even
//!    its header is incomplete); the next LSN skips every LSN the torn bytes could
//!    have held, so no LSN is handed out twice.

use crate::config::OnCorruption;
use crate::error::{Result, WalError};
use crate::format::{self, Checkpoint, FrameParse, Kind, Record, FRAME_HEADER_LEN};
use crate::scan::{self, End, SegmentFile};
use crate::state::{SegInfo, State, Tracked};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// What recovery found, for logs and metrics.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Segment files present after recovery.
    pub segments: usize,
    /// Bytes read from segments.
    pub bytes_scanned: u64,
    /// Frames applied.
    pub records_scanned: u64,
    /// LSN of the checkpoint recovery started from, if any.
    pub checkpoint_lsn: Option<u64>,
    /// The torn tail that was cut off, if any.
    pub torn_tail: Option<TornTail>,
    /// Damaged regions skipped under `on_corruption = "skip"`.
    pub skipped_regions: u64,
    /// Records (entries or markers) in those regions, at most: the LSN gap
    /// across each region. A lost entry is lost data; a lost DELIVERED marker
    /// only means the entry is delivered again (idempotently).
    pub skipped_records: u64,
    /// Pending entries whose records were lost (skipped damage, or a missing segment).
    pub lost_entries: u64,
    /// Entries pending after recovery.
    pub pending: u64,
    /// Dead letters after recovery.
    pub dead: u64,
    /// The LSN the next record gets.
    pub next_lsn: u64,
    /// Wall time spent.
    pub elapsed: Duration,
}

/// A torn tail found at recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Segment file name.
    pub segment: String,
    /// Offset where the valid data ends.
    pub offset: u64,
    /// Bytes removed.
    pub bytes: u64,
}

/// Recovered state plus where appending continues.
pub(crate) struct Recovered {
    pub state: State,
    pub report: RecoveryReport,
    /// The newest segment and its valid length, if one remains.
    pub active: Option<(SegmentFile, u64)>,
    pub next_lsn: u64,
}

/// Read the first frame of a segment if it is a CHECKPOINT with the segment's first LSN.
fn read_head_checkpoint(seg: &SegmentFile) -> Option<Checkpoint> {
    let mut f = File::open(&seg.path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = [0u8; format::SEGMENT_HEADER_LEN + FRAME_HEADER_LEN];
    f.read_exact(&mut head).ok()?;
    if format::decode_segment_header(&head).ok()? != seg.first_lsn {
        return None;
    }
    let body_len = u32::from_le_bytes(head[32..36].try_into().unwrap()) as u64;
    if head[40] != Kind::Checkpoint as u8 || body_len > len.saturating_sub(head.len() as u64) {
        return None;
    }
    let mut frame = head[32..].to_vec();
    frame.resize(FRAME_HEADER_LEN + body_len as usize, 0);
    f.read_exact(&mut frame[FRAME_HEADER_LEN..]).ok()?;
    match format::parse_frame(&frame) {
        FrameParse::Ok(fr) if fr.lsn == seg.first_lsn => {
            match format::decode_record(fr.kind, fr.body) {
                Ok(Record::Checkpoint(cp)) => Some(cp),
                _ => None,
            }
        }
        _ => None,
    }
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now())
}

/// Rebuild state from `dir`. With `repair`, a torn tail is cut off on disk; without
/// (offline inspection) the disk is left as it is.
pub(crate) fn recover(dir: &Path, policy: OnCorruption, repair: bool) -> Result<Recovered> {
    let started = Instant::now();
    let mut segs = scan::list_segments(dir)?;
    let mut report = RecoveryReport::default();
    let mut state = State::default();

    let base = (0..segs.len())
        .rev()
        .find_map(|i| read_head_checkpoint(&segs[i]).map(|cp| (i, cp)));
    let start = base.as_ref().map_or(0, |(i, _)| *i);

    for s in &segs[..start] {
        let bytes = std::fs::metadata(&s.path)
            .map_err(|e| WalError::io(&s.path, e))?
            .len();
        state.segments.insert(
            s.first_lsn,
            SegInfo {
                bytes,
                live: 0,
                modified: modified(&s.path),
            },
        );
    }
    if let Some((i, cp)) = &base {
        report.checkpoint_lsn = Some(segs[*i].first_lsn);
        load_checkpoint_entries(&segs[..*i], cp, policy, &mut state, &mut report)?;
    }

    let mut prev_lsn = segs.get(start).map_or(0, |s| s.first_lsn.saturating_sub(1));
    let mut active = None;
    let mut torn_gap = 0;
    let n = segs.len();
    let mut remove_newest = false;
    let mut buf = Vec::new();
    for (i, seg) in segs.iter().enumerate().skip(start) {
        let newest = i + 1 == n;
        scan::read_segment_into(seg, &mut buf)?;
        report.bytes_scanned += buf.len() as u64;
        state.segments.insert(
            seg.first_lsn,
            SegInfo {
                bytes: buf.len() as u64,
                live: 0,
                modified: modified(&seg.path),
            },
        );
        let walk = scan::walk_segment(seg, &buf, prev_lsn, newest, policy, |off, f| {
            state.apply(off, f.lsn, f.kind, f.body)
        })?;
        report.skipped_regions += walk.skipped;
        report.skipped_records += walk.skipped_records;
        prev_lsn = walk.last_lsn.unwrap_or(prev_lsn).max(prev_lsn);
        let mut valid_len = buf.len() as u64;
        if let End::Torn { offset } = walk.end {
            let bytes = buf.len() as u64 - offset;
            tracing::warn!(segment = %seg.name, offset, bytes, "truncating torn WAL tail");
            report.torn_tail = Some(TornTail {
                segment: seg.name.clone(),
                offset,
                bytes,
            });
            // At most one record per frame header's worth of torn bytes.
            torn_gap = bytes.div_ceil(FRAME_HEADER_LEN as u64);
            valid_len = offset;
            if offset == 0 {
                remove_newest = true;
                prev_lsn = prev_lsn.max(seg.first_lsn);
            }
        }
        if newest && !remove_newest {
            active = Some((seg.clone(), valid_len));
        }
        if let Some(s) = state.segments.get_mut(&seg.first_lsn) {
            s.bytes = valid_len;
        }
    }
    report.records_scanned = state.totals.records;

    if repair {
        if remove_newest {
            let seg = segs.pop().expect("newest segment exists");
            state.segments.remove(&seg.first_lsn);
            std::fs::remove_file(&seg.path).map_err(|e| WalError::io(&seg.path, e))?;
            sync_dir(dir)?;
        } else if let (Some((seg, len)), Some(_)) = (&active, &report.torn_tail) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(|e| WalError::io(&seg.path, e))?;
            f.set_len(*len).map_err(|e| WalError::io(&seg.path, e))?;
            f.sync_all().map_err(|e| WalError::io(&seg.path, e))?;
        }
    } else if remove_newest {
        segs.pop();
    }

    let next_lsn = prev_lsn + 1 + torn_gap;
    report.segments = segs.len();
    report.pending = state.pending;
    report.dead = state.dead;
    report.next_lsn = next_lsn;
    report.elapsed = started.elapsed();
    Ok(Recovered {
        state,
        report,
        active,
        next_lsn,
    })
}

/// Load the entries a checkpoint lists from the segments before it.
fn load_checkpoint_entries(
    older: &[SegmentFile],
    cp: &Checkpoint,
    policy: OnCorruption,
    state: &mut State,
    report: &mut RecoveryReport,
) -> Result<()> {
    // Group wanted (lsn, offset, status) by segment.
    let mut by_seg: BTreeMap<usize, Vec<(u64, u64, Tracked)>> = BTreeMap::new();
    let seg_index = |lsn: u64| older.partition_point(|s| s.first_lsn <= lsn).checked_sub(1);
    let wanted = cp
        .pending
        .iter()
        .map(|(l, o)| (*l, *o, Tracked::Pending))
        .chain(cp.dead.iter().map(|d| {
            (
                d.lsn,
                d.offset,
                Tracked::Dead {
                    attempts: d.attempts,
                    reason: d.reason.clone(),
                },
            )
        }));
    for (lsn, off, status) in wanted {
        match seg_index(lsn) {
            Some(i) => by_seg.entry(i).or_default().push((lsn, off, status)),
            None if status == Tracked::Pending => {
                tracing::error!(lsn, "pending entry's segment is missing; entry lost");
                report.lost_entries += 1;
            }
            // A dead letter whose segment retention removed: expired.
            None => {}
        }
    }
    for (i, items) in by_seg {
        let seg = &older[i];
        let buf = scan::read_segment(seg)?;
        report.bytes_scanned += buf.len() as u64;
        for (lsn, off, status) in items {
            let frame = buf.get(off as usize..).map(format::parse_frame);
            let res = match frame {
                Some(FrameParse::Ok(f)) if f.lsn == lsn && f.kind == Kind::Entry => state
                    .insert_entry(lsn, off, f.body, status)
                    .map_err(|e| e.0),
                Some(FrameParse::Ok(_)) => Err("checkpoint names a frame of another LSN"),
                Some(FrameParse::Bad(r)) => Err(r),
                _ => Err("checkpoint names an offset past the end of the segment"),
            };
            if let Err(reason) = res {
                if policy == OnCorruption::Stop {
                    return Err(WalError::Corrupt {
                        segment: seg.name.clone(),
                        offset: off,
                        reason: reason.to_owned(),
                    });
                }
                tracing::warn!(segment = %seg.name, offset = off, lsn, reason, "skipping damaged entry named by checkpoint");
                report.skipped_regions += 1;
                report.skipped_records += 1;
                report.lost_entries += 1;
            }
        }
    }
    Ok(())
}

/// fsync a directory, making file creations and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| WalError::io(dir, e))
}
