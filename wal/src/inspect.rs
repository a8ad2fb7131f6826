//! Offline inspection for the operator tools: verify, inspect, stats.
//!
//! Each function takes the directory lock first, so it refuses to run against a
//! WAL that a live process holds, and never modifies the files.

use crate::config::OnCorruption;
use crate::error::{Result, WalError};
use crate::format::{self, Kind, Record};
use crate::recovery::TornTail;
use crate::segment::{self, End, Walker};
use crate::state::{State, Tracked};
use crate::wal::lock_dir;
use std::path::Path;
use uuid::Uuid;

/// Damage found by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Segment file name.
    pub segment: String,
    /// Byte offset of the first bad record (or header) in it.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// Result of walking every record.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Segment files.
    pub segments: usize,
    /// Valid records.
    pub records: u64,
    /// Bytes of all segments.
    pub bytes: u64,
    /// A torn tail of the newest segment (not an error: recovery cuts it off).
    pub torn_tail: Option<TornTail>,
    /// The first damaged record, if any.
    pub damage: Option<Damage>,
}

impl VerifyReport {
    /// No damage (a torn tail is not damage).
    pub fn is_ok(&self) -> bool {
        self.damage.is_none()
    }
}

/// Walk every segment, applying every frame to a fresh state.
fn full_scan(dir: &Path, state: &mut State) -> Result<VerifyReport> {
    if !dir.is_dir() {
        return Err(WalError::Config(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let _lock = lock_dir(dir)?;
    let segs = segment::list_segments(dir)?;
    let mut report = VerifyReport {
        segments: segs.len(),
        ..Default::default()
    };
    let mut walker = Walker::new(segs, 0, OnCorruption::Stop);
    while let Some(seg) = walker.peek().cloned() {
        let walked = walker.next_segment(|off, f| state.apply(off, f.lsn, f.kind, f.body));
        match walked.expect("peeked a segment") {
            Ok(w) => {
                report.bytes += w.bytes;
                state.segments.insert(
                    seg.first_lsn,
                    crate::state::SegInfo::new(w.bytes, std::time::SystemTime::now()),
                );
                if let End::Torn { offset, .. } = w.walk.end {
                    report.torn_tail = Some(TornTail {
                        segment: seg.name.clone(),
                        offset,
                        bytes: w.bytes - offset,
                    });
                }
            }
            Err(WalError::Corrupt {
                segment,
                offset,
                reason,
            }) => {
                report.bytes += std::fs::metadata(&seg.path).map_or(0, |m| m.len());
                report.damage = Some(Damage {
                    segment,
                    offset,
                    reason,
                });
                break;
            }
            Err(e) => return Err(e),
        }
    }
    report.records = state.totals.records;
    Ok(report)
}

/// Check every record of the WAL in `dir`. Damage is reported in the result, not
/// as an error; errors are for I/O problems and a locked directory.
pub fn verify(dir: impl AsRef<Path>) -> Result<VerifyReport> {
    full_scan(dir.as_ref(), &mut State::default())
}

/// Totals of a WAL directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Segment files.
    pub segments: usize,
    /// Bytes of all segments.
    pub bytes: u64,
    /// Valid records.
    pub records: u64,
    /// ENTRY records.
    pub entries: u64,
    /// Entries awaiting delivery.
    pub pending: u64,
    /// Entries delivered (of those still retained).
    pub delivered: u64,
    /// Dead letters.
    pub failed: u64,
    /// Oldest pending LSN.
    pub oldest_pending_lsn: Option<u64>,
}

/// Totals of the WAL in `dir` (a full scan). Fails on damage.
pub fn stats(dir: impl AsRef<Path>) -> Result<WalStats> {
    let mut st = State::default();
    let report = full_scan(dir.as_ref(), &mut st)?;
    if let Some(d) = report.damage {
        return Err(WalError::Corrupt {
            segment: d.segment,
            offset: d.offset,
            reason: d.reason,
        });
    }
    Ok(WalStats {
        segments: report.segments,
        bytes: report.bytes,
        records: st.totals.records,
        entries: st.totals.entries,
        pending: st.pending,
        delivered: st.totals.delivered,
        failed: st.dead,
        oldest_pending_lsn: st.tracked.oldest_pending(),
    })
}

/// One record, as `spool wal inspect` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    /// LSN.
    pub lsn: u64,
    /// Kind.
    pub kind: Kind,
    /// Source (entries only).
    pub source: Option<String>,
    /// Entry id (entries only).
    pub id: Option<Uuid>,
    /// Current status of an entry: "pending", "delivered" or "failed".
    pub status: Option<&'static str>,
    /// Body bytes.
    pub bytes: u64,
    /// The LSNs a marker names (or the target of FAILED).
    pub targets: Vec<u64>,
}

/// Records with LSN ≥ `from`, at most `limit`, with each entry's current status.
pub fn inspect(dir: impl AsRef<Path>, from: u64, limit: usize) -> Result<Vec<RecordInfo>> {
    let dir = dir.as_ref();
    let mut st = State::default();
    let report = full_scan(dir, &mut st)?;
    let _lock = lock_dir(dir)?;
    let mut out = Vec::new();
    for item in crate::reader::Reader::open_dir(dir, from).take(limit) {
        let (lsn, rec) = match item {
            Ok(x) => x,
            Err(e) if report.damage.is_some() => {
                tracing::debug!(error = %e, "inspect stops at damage");
                break;
            }
            Err(e) => return Err(e),
        };
        let mut body = Vec::new();
        format::encode_record(&rec, &mut body);
        let mut info = RecordInfo {
            lsn,
            kind: rec.kind(),
            source: None,
            id: None,
            status: None,
            bytes: body.len() as u64,
            targets: Vec::new(),
        };
        match rec {
            Record::Entry(e) => {
                info.id = Some(e.id);
                info.status = Some(match st.tracked.get(lsn).map(|m| m.status()) {
                    Some(Tracked::Pending) => "pending",
                    Some(Tracked::Dead { .. }) => "failed",
                    None if st.purged.contains(&lsn) => "purged",
                    None if st.forgets(
                        lsn,
                        e.source.as_str(),
                        e.id,
                        e.subject.as_deref(),
                        e.accepted_at_us,
                    ) =>
                    {
                        "forgotten"
                    }
                    None => "delivered",
                });
                info.source = Some(e.source);
            }
            Record::Tombstone(t) => {
                info.source = Some(t.source);
                info.status = Some(match st.tombstones.get(&lsn) {
                    Some(m) if !m.delivered => "pending",
                    _ => "delivered",
                });
            }
            Record::Delivered(l) | Record::Requeued(l) | Record::Purged(l) => info.targets = l,
            Record::Failed { lsn, .. } => info.targets = vec![lsn],
            Record::Checkpoint(_) | Record::Erased(_) => {}
        }
        out.push(info);
    }
    Ok(out)
}
