//! Rebuilding the [`State`] from disk at open.
//!
//! 1. Find the newest segment whose first record is a CHECKPOINT (a rotated
//!    segment starts with one unless the backlog made it too big; retention
//!    keeps every segment from it on). Without one, start from the oldest segment.
//! 2. Load the entries the checkpoint lists from the older segments, reading only
//!    the frames at the offsets it names. The checkpoint's segment list says which
//!    segment holds each; an entry whose segment is gone is delivered if a later
//!    DELIVERED record says so (retention deletes a segment only after syncing the
//!    markers that freed it), and lost otherwise.
//! 3. Walk every frame from that segment on, applying each to the state.
//! 4. A torn tail of the newest segment is truncated (or its file removed when even
//!    its header is incomplete); the next LSN skips every LSN the torn bytes could
//!    have held, so no LSN is handed out twice.

use crate::config::OnCorruption;
use crate::error::{Result, WalError};
use crate::format::{self, Checkpoint, FrameParse, Kind, Record, FRAME_HEADER_LEN};
use crate::io::WalIo;
use crate::segment::{self, End, FrameReader, SegmentFile, Walker};
use crate::state::{SegInfo, State, Tracked};
use std::collections::{BTreeMap, HashMap};
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
    /// The newest segment, its valid length and its format version, if one remains.
    pub active: Option<(SegmentFile, u64, u32)>,
    pub next_lsn: u64,
}

/// Read the first frame of a segment if it is a CHECKPOINT with the segment's first LSN.
fn read_head_checkpoint(seg: &SegmentFile) -> Option<Checkpoint> {
    let mut r = FrameReader::open(seg).ok()?;
    if format::decode_segment_header(r.bytes_at(0, format::SEGMENT_HEADER_LEN).ok()?).ok()?
        != seg.first_lsn
    {
        return None;
    }
    match r.frame_at(format::SEGMENT_HEADER_LEN as u64).ok()? {
        FrameParse::Ok(f) if f.lsn == seg.first_lsn && f.kind == Kind::Checkpoint => {
            match format::decode_record(f.kind, f.body) {
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

/// Rebuild state from `dir`. With `repair`, a torn tail is cut off on disk (through
/// that seam, durably); without (offline inspection) the disk is left as it is.
pub(crate) fn recover(
    dir: &Path,
    policy: OnCorruption,
    repair: Option<&dyn WalIo>,
) -> Result<Recovered> {
    let started = Instant::now();
    let segs = segment::list_segments(dir)?;
    let mut report = RecoveryReport::default();
    let mut state = State::default();

    let base = (0..segs.len())
        .rev()
        .find_map(|i| read_head_checkpoint(&segs[i]).map(|cp| (i, cp)));
    let start = base.as_ref().map_or(0, |(i, _)| *i);
    state.recovery_start = segs.get(start).map_or(0, |s| s.first_lsn);

    for s in &segs[..start] {
        let bytes = std::fs::metadata(&s.path)
            .map_err(|e| WalError::io(&s.path, e))?
            .len();
        state
            .segments
            .insert(s.first_lsn, SegInfo::new(bytes, modified(&s.path)));
    }
    let mut missing = HashMap::new();
    if let Some((i, cp)) = &base {
        report.checkpoint_lsn = Some(segs[*i].first_lsn);
        missing = load_checkpoint_entries(&segs[..*i], cp, policy, &mut state, &mut report)?;
    }

    let mut walker = Walker::new(segs, start, policy);
    let mut prev_lsn = walker.peek().map_or(0, |s| s.first_lsn.saturating_sub(1));
    let mut active = None;
    let mut next_floor = 0;
    let mut remove_newest = None;
    while let Some(seg) = walker.peek().cloned() {
        // Registered before its frames are applied: they count as live in it.
        state
            .segments
            .insert(seg.first_lsn, SegInfo::new(0, modified(&seg.path)));
        let walked = walker.next_segment(|off, f| {
            if !missing.is_empty() && f.kind == Kind::Delivered {
                if let Ok(Record::Delivered(lsns)) = format::decode_record(f.kind, f.body) {
                    for l in lsns {
                        missing.remove(&l);
                    }
                }
            }
            state.apply(off, f.lsn, f.kind, f.body)
        });
        let Some(walked) = walked else { break };
        let walked = walked?;
        report.bytes_scanned += walked.bytes;
        report.skipped_regions += walked.walk.skipped;
        report.skipped_records += walked.walk.skipped_records;
        prev_lsn = prev_lsn.max(walked.walk.last_lsn.unwrap_or(0));
        let newest = walked.index + 1 == walker.segments().len();
        let mut valid_len = walked.bytes;
        if let End::Torn { offset, max_lsn } = walked.walk.end {
            let bytes = walked.bytes - offset;
            tracing::warn!(segment = %seg.name, offset, bytes, "truncating torn WAL tail");
            report.torn_tail = Some(TornTail {
                segment: seg.name.clone(),
                offset,
                bytes,
            });
            // No LSN the torn bytes held, or could have held (at most one per frame
            // header's worth of bytes), is handed out again.
            next_floor = (prev_lsn + bytes.div_ceil(FRAME_HEADER_LEN as u64))
                .max(max_lsn.unwrap_or(0))
                .max(seg.first_lsn);
            valid_len = offset;
            if offset == 0 {
                remove_newest = Some(seg.clone());
            }
        }
        // A later segment holding nothing but its header: its creation was cut short
        // before its checkpoint was synced; nothing in it was ever acknowledged.
        if newest && walked.index > 0 && valid_len <= format::SEGMENT_HEADER_LEN as u64 {
            remove_newest = Some(seg.clone());
            next_floor = next_floor.max(seg.first_lsn);
        }
        if newest && remove_newest.is_none() {
            active = Some((seg.clone(), valid_len, walked.walk.version));
        }
        match (&remove_newest, state.segments.get_mut(&seg.first_lsn)) {
            (Some(_), _) => drop(state.segments.remove(&seg.first_lsn)),
            (None, Some(info)) => info.bytes = valid_len,
            (None, None) => {}
        }
    }
    report.records_scanned = state.totals.records;
    // Listed by the checkpoint, segment gone, and no later DELIVERED record: lost.
    for (lsn, status) in missing {
        tracing::error!(lsn, status = ?status, "the segment of an undelivered entry is missing; entry lost");
        report.lost_entries += 1;
    }

    if let Some(io) = repair {
        let fail = |p: &Path, e| WalError::io(p, e);
        if let Some(seg) = &remove_newest {
            io.remove(&seg.path).map_err(|e| fail(&seg.path, e))?;
            io.sync_dir(dir).map_err(|e| fail(dir, e))?;
        } else if let (Some((seg, len, _)), Some(_)) = (&active, &report.torn_tail) {
            let f = io.open(&seg.path).map_err(|e| fail(&seg.path, e))?;
            f.set_len(*len).map_err(|e| fail(&seg.path, e))?;
            f.sync_data().map_err(|e| fail(&seg.path, e))?;
        }
    }

    let next_lsn = prev_lsn.max(next_floor) + 1;
    report.segments = state.segments.len();
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

/// What a checkpoint lists at an offset.
enum Listed {
    Entry(Tracked),
    Tombstone { delivered: bool },
}

/// Load the entries and tombstones a checkpoint lists from the segments before it. Returns those
/// whose segment is missing (see the module doc).
fn load_checkpoint_entries(
    older: &[SegmentFile],
    cp: &Checkpoint,
    policy: OnCorruption,
    state: &mut State,
    report: &mut RecoveryReport,
) -> Result<HashMap<u64, Tracked>> {
    // The first LSN of the segment an LSN was written to: by the checkpoint's list
    // (exact even after retention deleted segments in between), else by the files.
    let on_disk: Vec<u64> = older.iter().map(|s| s.first_lsn).collect();
    let firsts = cp.segments.as_deref().unwrap_or(&on_disk);
    let segment_of = |lsn: u64| {
        let i = firsts.partition_point(|f| *f <= lsn).checked_sub(1)?;
        older.iter().position(|s| s.first_lsn == firsts[i])
    };
    let mut by_seg: BTreeMap<usize, Vec<(u64, u64, Listed)>> = BTreeMap::new();
    let mut missing = HashMap::new();
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
    let tombstones = cp.tombstones.iter().map(|t| {
        (
            t.lsn,
            t.offset,
            Listed::Tombstone {
                delivered: t.delivered,
            },
        )
    });
    let wanted = wanted
        .map(|(l, o, s)| (l, o, Listed::Entry(s)))
        .chain(tombstones);
    for (lsn, off, listed) in wanted {
        match (segment_of(lsn), listed) {
            (Some(i), listed) => by_seg.entry(i).or_default().push((lsn, off, listed)),
            (None, Listed::Entry(status)) => {
                missing.insert(lsn, status);
            }
            // Retired with its segment after the checkpoint was written.
            (None, Listed::Tombstone { .. }) => {}
        }
    }
    for (i, mut items) in by_seg {
        let seg = &older[i];
        items.sort_unstable_by_key(|(_, off, _)| *off);
        let mut reader = FrameReader::open(seg)?;
        for (lsn, off, listed) in items {
            let frame = reader.frame_at(off)?;
            let kind = match listed {
                Listed::Entry(_) => Kind::Entry,
                Listed::Tombstone { .. } => Kind::Tombstone,
            };
            // A version-1 checkpoint maps by the files present, which is wrong once
            // retention deleted the entry's own segment: treat it as missing.
            let wrong_segment = cp.segments.is_none()
                && !matches!(frame, FrameParse::Ok(f) if f.lsn == lsn && f.kind == Kind::Entry);
            if let (true, Listed::Entry(status)) = (wrong_segment, &listed) {
                missing.insert(lsn, status.clone());
                continue;
            }
            let res = match frame {
                // Erased by `spool wal compact` after this checkpoint was
                // written: compaction erases only entries that had ended
                // (delivered, then forgotten), so it is not pending.
                FrameParse::Ok(f)
                    if f.lsn == lsn && f.kind == Kind::Erased && kind == Kind::Entry =>
                {
                    Ok(())
                }
                FrameParse::Ok(f) if f.lsn == lsn && f.kind == kind => match listed {
                    Listed::Entry(status) => state.insert_entry(lsn, off, f.body, status),
                    Listed::Tombstone { delivered } => {
                        state.insert_tombstone(lsn, off, f.body, delivered)
                    }
                }
                .map_err(|e| e.0),
                FrameParse::Ok(_) => Err("checkpoint names a frame of another LSN"),
                FrameParse::Bad(r) => Err(r),
                FrameParse::Incomplete => {
                    Err("checkpoint names an offset past the end of the segment")
                }
            };
            if let Err(reason) = res {
                if policy == OnCorruption::Stop {
                    return Err(reader.corrupt(off, reason));
                }
                tracing::warn!(segment = %seg.name, offset = off, lsn, reason, "skipping damaged entry named by checkpoint");
                report.skipped_regions += 1;
                report.skipped_records += 1;
                report.lost_entries += 1;
            }
        }
        report.bytes_scanned += std::fs::metadata(&seg.path).map_or(0, |m| m.len());
    }
    Ok(missing)
}
