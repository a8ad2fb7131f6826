//! The live WAL: a cheap-to-clone handle in front of one writer thread.
//!
//! Appenders encode their record bodies on their own thread, push them into the
//! inbox and wait on a oneshot. The writer thread takes *everything* in the inbox
//! at once (that is the group), assigns LSNs, frames it into one buffer, issues one
//! `write` and — when any record in the group asked for durability — one
//! `fdatasync`, then answers every appender of the group. While it syncs, the next
//! group gathers in the inbox.

use crate::config::{SyncMode, WalConfig};
use crate::entry::{Entry, LoggedEntry};
use crate::error::{Result, WalError};
use crate::format::{self, FrameParse, Kind, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::recovery::{self, RecoveryReport};
use crate::state::{SegInfo, State, Tracked};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;
use uuid::Uuid;

/// Receives timings from the writer thread (for metrics). Called on the writer
/// thread: keep it cheap.
pub trait WalObserver: Send + Sync + 'static {
    /// One fdatasync took `d`.
    fn fsync(&self, d: Duration) {
        let _ = d;
    }
    /// One group of `records` records (from `appends` append calls) was written.
    fn group(&self, appends: usize, records: usize) {
        let _ = (appends, records);
    }
}

struct NoObserver;
impl WalObserver for NoObserver {}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Op {
    Append {
        records: Vec<(Kind, Vec<u8>)>,
        /// Wait for fdatasync (under `sync = "always"`).
        durable: bool,
        /// Refused when the quota is reached (entries; markers always pass, since they free space).
        gated: bool,
        reply: Reply<Vec<u64>>,
    },
    Sync(Reply<()>),
    Rotate(Reply<()>),
    Retention(Reply<RetentionReport>),
}

#[derive(Default)]
struct Inbox {
    ops: Vec<Op>,
    closing: bool,
    /// The writer is gathering a group and wants a wake-up at this many ops.
    want: usize,
}

struct Shared {
    dir: PathBuf,
    config: WalConfig,
    inbox: Mutex<Inbox>,
    wake: Condvar,
    state: Mutex<State>,
    /// Highest LSN readers may see (synced under `always`, written otherwise).
    visible_lsn: AtomicU64,
    observer: Arc<dyn WalObserver>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Owns the writer thread; the last [`Wal`] clone to go joins it.
struct Handle {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The directory lock, released once the writer has stopped.
    lock: Mutex<Option<File>>,
}

impl Handle {
    fn close(&self) {
        {
            let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
            inbox.closing = true;
        }
        self.shared.wake.notify_one();
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

/// What a retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segment files deleted.
    pub segments_deleted: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Dead letters that expired with their segments.
    pub dead_letters_expired: u64,
}

/// Live figures of the WAL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStatus {
    /// Segment files.
    pub segments: u64,
    /// Bytes of all segments.
    pub bytes: u64,
    /// Entries awaiting delivery.
    pub pending: u64,
    /// Dead letters.
    pub dead: u64,
    /// Oldest pending LSN.
    pub oldest_pending_lsn: Option<u64>,
    /// Highest LSN visible to readers.
    pub visible_lsn: u64,
}

/// A dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// LSN of its ENTRY record.
    pub lsn: u64,
    /// Entry id.
    pub id: Uuid,
    /// Source it was posted to.
    pub source: String,
    /// Destination it failed at.
    pub destination: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// Why it failed.
    pub reason: String,
}

/// Status of an entry the WAL still tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryStatus {
    /// LSN of its ENTRY record.
    pub lsn: u64,
    /// Pending or dead.
    pub status: Tracked,
}

/// A write-ahead log open for appending. Cheap to clone; all clones share one
/// writer thread, which stops when the last clone is dropped or [`Wal::close`] runs.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    handle: Arc<Handle>,
    report: Arc<RecoveryReport>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// Take the directory's lock file, or fail with [`WalError::Locked`].
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| WalError::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(WalError::Locked {
            dir: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(WalError::io(&path, e)),
    }
}

impl Wal {
    /// Open (creating if needed) the WAL in `dir`, recovering its state.
    pub fn open(dir: impl AsRef<Path>, config: WalConfig) -> Result<Wal> {
        Self::open_with_observer(dir, config, Arc::new(NoObserver))
    }

    /// [`Wal::open`] with an observer for fsync and group-size figures.
    pub fn open_with_observer(
        dir: impl AsRef<Path>,
        config: WalConfig,
        observer: Arc<dyn WalObserver>,
    ) -> Result<Wal> {
        config.validate()?;
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(|e| WalError::io(&dir, e))?;
        let lock = lock_dir(&dir)?;
        let rec = recovery::recover(&dir, config.on_corruption, true)?;
        let mut state = rec.state;
        let next_lsn = rec.next_lsn;
        let (file, seg_first, seg_len) = match rec.active {
            Some((seg, len)) => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .map_err(|e| WalError::io(&seg.path, e))?;
                (f, seg.first_lsn, len)
            }
            None => {
                let with_checkpoint = !state.segments.is_empty();
                let (f, len) = create_segment(&dir, next_lsn, &state, with_checkpoint)?;
                state.segments.insert(
                    next_lsn,
                    SegInfo {
                        bytes: len,
                        live: 0,
                        modified: SystemTime::now(),
                    },
                );
                (f, next_lsn, len)
            }
        };
        let next_lsn = if seg_first == next_lsn && seg_len > SEGMENT_HEADER_LEN as u64 {
            next_lsn + 1 // the new segment's checkpoint took it
        } else {
            next_lsn
        };
        let mut report = rec.report;
        report.next_lsn = next_lsn;
        report.segments = state.segments.len();
        tracing::info!(
            dir = %dir.display(),
            segments = report.segments,
            pending = report.pending,
            dead = report.dead,
            next_lsn,
            torn_tail = report.torn_tail.is_some(),
            skipped = report.skipped_regions,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "WAL recovered"
        );
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            config,
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            state: Mutex::new(state),
            visible_lsn: AtomicU64::new(next_lsn - 1),
            observer,
        });
        let mut writer = Writer {
            shared: shared.clone(),
            file,
            seg_first,
            seg_len,
            seg_has_records: seg_len > SEGMENT_HEADER_LEN as u64,
            next_lsn,
            buf: Vec::with_capacity(1 << 20),
            frames: Vec::new(),
            dirty: false,
            last_sync: Instant::now(),
            poisoned: None,
            gather_target: 1,
            gather_window: Duration::ZERO,
        };
        let thread = std::thread::Builder::new()
            .name("spool-wal-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| WalError::io(&dir, e))?;
        Ok(Wal {
            handle: Arc::new(Handle {
                shared: shared.clone(),
                thread: Mutex::new(Some(thread)),
                lock: Mutex::new(Some(lock)),
            }),
            shared,
            report: Arc::new(report),
        })
    }

    /// What recovery found when this WAL was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The WAL directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The configuration in force.
    pub fn config(&self) -> &WalConfig {
        &self.shared.config
    }

    fn submit(&self, op: Op) -> Result<()> {
        let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if inbox.closing {
            return Err(WalError::Closed);
        }
        inbox.ops.push(op);
        let wake = inbox.ops.len() == 1 || inbox.ops.len() == inbox.want;
        drop(inbox);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.submit(op(tx))?;
        rx.await.unwrap_or(Err(WalError::Closed))
    }

    fn encode_entries(&self, entries: &[Entry]) -> Result<Vec<(Kind, Vec<u8>)>> {
        let limit = self.shared.config.max_record_bytes;
        entries
            .iter()
            .map(|e| {
                if e.source.len() > crate::entry::MAX_NAME_LEN
                    || e.destination.len() > crate::entry::MAX_NAME_LEN
                {
                    return Err(WalError::InvalidRecord(
                        "source and destination names are limited to 65535 bytes",
                    ));
                }
                let len = e.encoded_len();
                if len > limit {
                    return Err(WalError::RecordTooLarge { len, limit });
                }
                let mut body = Vec::with_capacity(len);
                format::encode_entry(e, &mut body);
                Ok((Kind::Entry, body))
            })
            .collect()
    }

    /// Append entries as one group; resolves with their LSNs once durable (per the
    /// sync mode). All or nothing: on error no record of the call is on disk.
    ///
    /// The write goes ahead even if the returned future is dropped; callers that
    /// must know the outcome should not drop it.
    pub async fn append(&self, entries: &[Entry]) -> Result<Vec<u64>> {
        let records = self.encode_entries(entries)?;
        self.call(|reply| Op::Append {
            records,
            durable: true,
            gated: true,
            reply,
        })
        .await
    }

    /// Blocking form of [`Wal::append`], for threads outside an async runtime.
    pub fn append_blocking(&self, entries: &[Entry]) -> Result<Vec<u64>> {
        let records = self.encode_entries(entries)?;
        let (tx, rx) = oneshot::channel();
        self.submit(Op::Append {
            records,
            durable: true,
            gated: true,
            reply: tx,
        })?;
        rx.blocking_recv().unwrap_or(Err(WalError::Closed))
    }

    async fn marker(&self, kind: Kind, body: Vec<u8>, durable: bool) -> Result<u64> {
        let lsns = self
            .call(|reply| Op::Append {
                records: vec![(kind, body)],
                durable,
                gated: false,
                reply,
            })
            .await?;
        Ok(lsns[0])
    }

    /// Record that these entries were delivered. Resolves once written (not
    /// fsynced: a lost marker only means an idempotent redelivery).
    pub async fn mark_delivered(&self, lsns: &[u64]) -> Result<()> {
        if lsns.is_empty() {
            return Ok(());
        }
        let mut body = Vec::new();
        format::encode_lsns(lsns, &mut body);
        self.marker(Kind::Delivered, body, false).await.map(drop)
    }

    /// Record that an entry failed permanently (it becomes a dead letter).
    pub async fn mark_failed(&self, lsn: u64, attempts: u32, reason: &str) -> Result<()> {
        let mut body = Vec::new();
        format::encode_failed(lsn, attempts, reason, &mut body);
        self.marker(Kind::Failed, body, false).await.map(drop)
    }

    /// Put dead letters back to pending. Returns the LSNs that were dead letters
    /// (others are ignored). Durable once it resolves.
    pub async fn requeue(&self, lsns: &[u64]) -> Result<Vec<u64>> {
        let dead: Vec<u64> = {
            let st = self.shared.state();
            lsns.iter()
                .copied()
                .filter(|l| matches!(st.tracked.get(l), Some(m) if m.status != Tracked::Pending))
                .collect()
        };
        if dead.is_empty() {
            return Ok(dead);
        }
        let mut body = Vec::new();
        format::encode_lsns(&dead, &mut body);
        self.marker(Kind::Requeued, body, true).await?;
        Ok(dead)
    }

    /// fdatasync everything written so far, whatever the sync mode.
    pub async fn sync(&self) -> Result<()> {
        self.call(Op::Sync).await
    }

    /// Seal the current segment and start a new one (with a checkpoint).
    pub async fn rotate(&self) -> Result<()> {
        self.call(Op::Rotate).await
    }

    /// Delete sealed segments that retention or the quota allow to go.
    pub async fn run_retention(&self) -> Result<RetentionReport> {
        self.call(Op::Retention).await
    }

    /// Close: finish queued work, fdatasync, stop the writer thread. Blocks until
    /// done; later calls on any clone fail with [`WalError::Closed`]. Idempotent.
    pub fn close(&self) {
        self.handle.close();
    }

    /// Live figures.
    pub fn status(&self) -> WalStatus {
        let st = self.shared.state();
        WalStatus {
            segments: st.segments.len() as u64,
            bytes: st.total_bytes(),
            pending: st.pending,
            dead: st.dead,
            oldest_pending_lsn: st
                .tracked
                .iter()
                .find(|(_, m)| m.status == Tracked::Pending)
                .map(|(l, _)| *l),
            visible_lsn: self.shared.visible_lsn.load(Ordering::Acquire),
        }
    }

    /// Status of a tracked (pending or dead) entry, by LSN.
    pub fn status_of(&self, lsn: u64) -> Option<Tracked> {
        self.shared
            .state()
            .tracked
            .get(&lsn)
            .map(|m| m.status.clone())
    }

    /// Status of a tracked (pending or dead) entry, by id.
    pub fn lookup(&self, id: Uuid) -> Option<EntryStatus> {
        let st = self.shared.state();
        let lsn = *st.by_id.get(&id)?;
        st.tracked.get(&lsn).map(|m| EntryStatus {
            lsn,
            status: m.status.clone(),
        })
    }

    /// Dead letters, oldest first, optionally of one source, at most `limit`.
    pub fn dead_letters(&self, source: Option<&str>, limit: usize) -> Vec<DeadLetter> {
        let st = self.shared.state();
        st.tracked
            .iter()
            .filter_map(|(lsn, m)| match &m.status {
                Tracked::Dead { attempts, reason } if source.is_none_or(|s| s == &*m.source) => {
                    Some(DeadLetter {
                        lsn: *lsn,
                        id: m.id,
                        source: m.source.to_string(),
                        destination: m.destination.to_string(),
                        attempts: *attempts,
                        reason: reason.clone(),
                    })
                }
                _ => None,
            })
            .take(limit)
            .collect()
    }

    /// Read up to `limit` pending entries with LSN > `after`, oldest first, from
    /// disk. Used to feed the delivery queue after a restart, as space allows.
    pub fn pending_after(&self, after: u64, limit: usize) -> Result<Vec<LoggedEntry>> {
        self.read_tracked(after, limit, |s| *s == Tracked::Pending)
    }

    /// Read up to `limit` pending entries for `destination` with `after < LSN ≤ upto`,
    /// oldest first, from disk (the delivery engine's redrive after a restart).
    pub fn pending_for(
        &self,
        destination: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<LoggedEntry>> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let wanted: Vec<(u64, u64, u64)> = {
            let st = self.shared.state();
            st.tracked
                .range(after + 1..=upto)
                .filter(|(_, m)| m.status == Tracked::Pending && &*m.destination == destination)
                .take(limit)
                .filter_map(|(l, m)| Some((*l, st.segment_of(*l)?, m.offset)))
                .collect()
        };
        self.read_at(&wanted)
    }

    /// Entries pending for `destination`.
    pub fn pending_count_for(&self, destination: &str) -> u64 {
        let st = self.shared.state();
        st.tracked
            .values()
            .filter(|m| m.status == Tracked::Pending && &*m.destination == destination)
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
                    let m = st.tracked.get(l)?;
                    Some((*l, st.segment_of(*l)?, m.offset))
                })
                .collect();
            v.sort_unstable();
            v
        };
        self.read_at(&wanted)
    }

    fn read_tracked(
        &self,
        after: u64,
        limit: usize,
        keep: impl Fn(&Tracked) -> bool,
    ) -> Result<Vec<LoggedEntry>> {
        let wanted: Vec<(u64, u64, u64)> = {
            let st = self.shared.state();
            st.tracked
                .range(after.saturating_add(1)..)
                .filter(|(_, m)| keep(&m.status))
                .take(limit)
                .filter_map(|(l, m)| Some((*l, st.segment_of(*l)?, m.offset)))
                .collect()
        };
        self.read_at(&wanted)
    }

    /// Read ENTRY frames at (lsn, segment, offset), sorted by lsn.
    fn read_at(&self, wanted: &[(u64, u64, u64)]) -> Result<Vec<LoggedEntry>> {
        let mut out = Vec::with_capacity(wanted.len());
        let mut open: Option<(u64, File, PathBuf)> = None;
        let mut buf = Vec::new();
        for &(lsn, seg, off) in wanted {
            if open.as_ref().map(|o| o.0) != Some(seg) {
                let path = self.shared.dir.join(format::segment_file_name(seg));
                match File::open(&path) {
                    Ok(f) => open = Some((seg, f, path)),
                    // Removed by retention since we looked: no longer tracked.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(WalError::io(&path, e)),
                }
            }
            let (_, f, path) = open.as_ref().expect("opened above");
            let corrupt = |reason: &str| WalError::Corrupt {
                segment: format::segment_file_name(seg),
                offset: off,
                reason: reason.to_owned(),
            };
            buf.resize(FRAME_HEADER_LEN, 0);
            f.read_exact_at(&mut buf, off)
                .map_err(|e| WalError::io(path, e))?;
            let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
            if len > format::MAX_FRAME_BODY {
                return Err(corrupt("frame length exceeds the format limit"));
            }
            buf.resize(FRAME_HEADER_LEN + len, 0);
            f.read_exact_at(&mut buf[FRAME_HEADER_LEN..], off + FRAME_HEADER_LEN as u64)
                .map_err(|e| WalError::io(path, e))?;
            match format::parse_frame(&buf) {
                FrameParse::Ok(fr) if fr.lsn == lsn && fr.kind == Kind::Entry => {
                    let entry = format::decode_entry(fr.body).map_err(|e| corrupt(e.0))?;
                    out.push(LoggedEntry { lsn, entry });
                }
                FrameParse::Bad(r) => return Err(corrupt(r)),
                _ => return Err(corrupt("tracked offset does not hold the entry")),
            }
        }
        Ok(out)
    }

    /// Iterate every record with LSN ≥ `from` that is visible now (records
    /// appended later are not included; open another reader to continue).
    pub fn reader(&self, from: u64) -> crate::reader::Reader {
        let upto = self.shared.visible_lsn.load(Ordering::Acquire);
        crate::reader::Reader::new(
            self.shared.dir.clone(),
            from,
            upto,
            self.shared.config.on_corruption,
        )
    }
}

/// Create segment `first` holding its header and, with `with_checkpoint`, a
/// CHECKPOINT of `state` as record `first`; fsync it and the directory.
fn create_segment(
    dir: &Path,
    first: u64,
    state: &State,
    with_checkpoint: bool,
) -> Result<(File, u64)> {
    let path = dir.join(format::segment_file_name(first));
    let mut buf = format::encode_segment_header(first).to_vec();
    if with_checkpoint {
        let mut body = Vec::new();
        format::encode_checkpoint(&state.checkpoint(), &mut body);
        format::encode_frame(&mut buf, Kind::Checkpoint, first, &body);
    }
    let attempt = || -> std::io::Result<File> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        f.write_all_at(&buf, 0)?;
        f.sync_data()?;
        Ok(f)
    };
    match attempt() {
        Ok(f) => {
            recovery::sync_dir(dir)?;
            Ok((f, buf.len() as u64))
        }
        Err(e) => {
            // Leave nothing half-made behind: a later recovery must not see it.
            let _ = std::fs::remove_file(&path);
            let _ = recovery::sync_dir(dir);
            Err(WalError::io(&path, e))
        }
    }
}

/// One framed record of the current buffer: its LSN, kind and body range.
struct Framed {
    lsn: u64,
    kind: Kind,
    at: usize,
    len: usize,
}

/// An append waiting for the group to finish.
struct Waiter {
    reply: Reply<Vec<u64>>,
    lsns: Vec<u64>,
}

struct Writer {
    shared: Arc<Shared>,
    file: File,
    seg_first: u64,
    seg_len: u64,
    /// Records other than the head checkpoint are in the current segment (or the
    /// buffer): only then may it rotate, so an oversized append cannot rotate forever.
    seg_has_records: bool,
    next_lsn: u64,
    buf: Vec<u8>,
    frames: Vec<Framed>,
    dirty: bool,
    last_sync: Instant,
    poisoned: Option<String>,
    /// Ops to wait for before writing a group (see `run`).
    gather_target: usize,
    /// Longest wait for them: half the last fdatasync, at most 1 ms.
    gather_window: Duration,
}

/// A copy of an error for each of many waiters (io::Error is not Clone).
fn dup(e: &WalError) -> WalError {
    match e {
        WalError::Io { path, source } => WalError::Io {
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        WalError::NoSpace { path } => WalError::NoSpace { path: path.clone() },
        WalError::QuotaExceeded { used, limit } => WalError::QuotaExceeded {
            used: *used,
            limit: *limit,
        },
        WalError::Poisoned(s) => WalError::Poisoned(s.clone()),
        WalError::Corrupt {
            segment,
            offset,
            reason,
        } => WalError::Corrupt {
            segment: segment.clone(),
            offset: *offset,
            reason: reason.clone(),
        },
        other => WalError::Poisoned(other.to_string()),
    }
}

impl Writer {
    fn run(&mut self) {
        loop {
            let (ops, closing) = {
                let mut inbox = self.shared.inbox.lock().unwrap_or_else(|p| p.into_inner());
                let mut gather_until: Option<Instant> = None;
                loop {
                    if inbox.closing {
                        break;
                    }
                    let n = inbox.ops.len();
                    if n > 0 {
                        // Gather: the appenders answered last time are usually
                        // about to come back; a group that waits a fraction of an
                        // fsync for them saves a whole fsync.
                        let until = *gather_until
                            .get_or_insert_with(|| Instant::now() + self.gather_window);
                        let now = Instant::now();
                        if n >= self.gather_target || now >= until {
                            break;
                        }
                        inbox.want = self.gather_target;
                        inbox = self
                            .shared
                            .wake
                            .wait_timeout(inbox, until - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        continue;
                    }
                    match self.sync_deadline() {
                        Some(at) => {
                            let now = Instant::now();
                            if at <= now {
                                break;
                            }
                            inbox = self
                                .shared
                                .wake
                                .wait_timeout(inbox, at - now)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                        None => {
                            inbox = self
                                .shared
                                .wake
                                .wait(inbox)
                                .unwrap_or_else(|p| p.into_inner())
                        }
                    }
                }
                inbox.want = 0;
                (std::mem::take(&mut inbox.ops), inbox.closing)
            };
            self.process(ops);
            if self.sync_deadline().is_some_and(|at| at <= Instant::now()) {
                let _ = self.fdatasync();
            }
            if closing {
                // Late submitters after `closing` was set are refused in `submit`;
                // take anything that slipped in before it.
                let rest = std::mem::take(
                    &mut self
                        .shared
                        .inbox
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .ops,
                );
                self.process(rest);
                if self.dirty {
                    let _ = self.fdatasync();
                }
                return;
            }
        }
    }

    /// When the interval mode owes an fdatasync.
    fn sync_deadline(&self) -> Option<Instant> {
        match self.shared.config.sync {
            SyncMode::Interval(d) if self.dirty => Some(self.last_sync + d),
            _ => None,
        }
    }

    fn process(&mut self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        if let Some(p) = &self.poisoned {
            let e = WalError::Poisoned(p.clone());
            for op in ops {
                reply_err(op, dup(&e));
            }
            return;
        }
        let always = self.shared.config.sync == SyncMode::Always;
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut syncers: Vec<Reply<()>> = Vec::new();
        let mut need_sync = false;
        let (mut appends, mut records) = (0usize, 0usize);
        for op in ops {
            match op {
                Op::Append {
                    records: recs,
                    durable,
                    gated,
                    reply,
                } => {
                    if gated {
                        if let Err(e) = self.check_quota() {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    }
                    let size: u64 = recs
                        .iter()
                        .map(|(_, b)| (FRAME_HEADER_LEN + b.len()) as u64)
                        .sum();
                    if (self.seg_has_records || !self.buf.is_empty())
                        && self.seg_len + self.buf.len() as u64 + size
                            > self.shared.config.segment_bytes
                    {
                        if let Err(e) = self.flush(&mut waiters).and_then(|()| self.rotate()) {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    }
                    let mut lsns = Vec::with_capacity(recs.len());
                    for (kind, body) in recs {
                        let lsn = self.next_lsn;
                        self.next_lsn += 1;
                        let at = self.buf.len() + FRAME_HEADER_LEN;
                        format::encode_frame(&mut self.buf, kind, lsn, &body);
                        self.frames.push(Framed {
                            lsn,
                            kind,
                            at,
                            len: body.len(),
                        });
                        lsns.push(lsn);
                    }
                    appends += 1;
                    records += lsns.len();
                    need_sync |= durable && always;
                    waiters.push(Waiter { reply, lsns });
                }
                Op::Sync(reply) => {
                    need_sync = true;
                    syncers.push(reply);
                }
                Op::Rotate(reply) => {
                    let r = self.flush(&mut waiters).and_then(|()| {
                        // A segment with nothing after its checkpoint has nothing to seal.
                        if self.seg_has_records {
                            self.rotate()
                        } else {
                            Ok(())
                        }
                    });
                    let _ = reply.send(r);
                }
                Op::Retention(reply) => {
                    let r = self.flush(&mut waiters).map(|()| self.retention(false));
                    let _ = reply.send(r);
                }
            }
        }
        let mut result = self.flush(&mut waiters);
        if result.is_ok() && need_sync && self.dirty {
            result = self.fdatasync();
        }
        if result.is_ok() {
            self.shared
                .visible_lsn
                .store(self.next_lsn - 1, Ordering::Release);
        }
        if appends > 0 {
            self.shared.observer.group(appends, records);
        }
        if need_sync {
            // The group to expect next: everyone about to be answered plus everyone
            // who arrived while this group was written and synced (those cannot be
            // of this group). Under other modes there is no fsync to share.
            let arrived = self
                .shared
                .inbox
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ops
                .len();
            self.gather_target = waiters.len() + syncers.len() + arrived;
        }
        for w in waiters {
            let _ = w.reply.send(match &result {
                Ok(()) => Ok(w.lsns),
                Err(e) => Err(dup(e)),
            });
        }
        for s in syncers {
            let _ = s.send(result.as_ref().map(|_| ()).map_err(dup));
        }
    }

    /// Write the framed buffer to the segment and apply it to the state. On failure,
    /// cut the file back so no partial record remains, and fail the group's waiters.
    fn flush(&mut self, waiters: &mut Vec<Waiter>) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let start = self.seg_len;
        if let Err(e) = self.file.write_all_at(&self.buf, start) {
            let err = WalError::io(self.seg_path(), e);
            if let Err(te) = self.file.set_len(start) {
                self.poison(format!("could not cut back a failed write: {te}"));
            }
            for w in waiters.drain(..) {
                let _ = w.reply.send(Err(dup(&err)));
            }
            self.buf.clear();
            self.frames.clear();
            return Err(err);
        }
        {
            let mut st = self.shared.state();
            for f in &self.frames {
                let off = start + (f.at - FRAME_HEADER_LEN) as u64;
                let body = &self.buf[f.at..f.at + f.len];
                // Bodies were encoded by this crate; a decode failure is a bug.
                st.apply(off, f.lsn, f.kind, body)
                    .expect("WAL applied a record it encoded itself");
            }
            if let Some(s) = st.segments.get_mut(&self.seg_first) {
                s.bytes = start + self.buf.len() as u64;
                s.modified = SystemTime::now();
            }
        }
        self.seg_len += self.buf.len() as u64;
        self.seg_has_records = true;
        self.dirty = true;
        self.buf.clear();
        self.frames.clear();
        Ok(())
    }

    fn seg_path(&self) -> PathBuf {
        self.shared
            .dir
            .join(format::segment_file_name(self.seg_first))
    }

    fn poison(&mut self, why: String) {
        tracing::error!(reason = %why, "WAL poisoned; refusing further writes until restart");
        self.poisoned = Some(why);
    }

    /// fdatasync the current segment. A failure poisons the handle: after a failed
    /// fsync the kernel may have dropped the dirty pages and cleared the error, so a
    /// retry could "succeed" without the data being on disk. Only a restart, which
    /// recovers from what is really on disk, is safe.
    fn fdatasync(&mut self) -> Result<()> {
        let t = Instant::now();
        if let Err(e) = self.file.sync_data() {
            let msg = format!("fdatasync of {} failed: {e}", self.seg_path().display());
            self.poison(msg.clone());
            return Err(WalError::Poisoned(msg));
        }
        let took = t.elapsed();
        self.gather_window = (took / 2).min(Duration::from_millis(1));
        self.shared.observer.fsync(took);
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Seal the current segment (fdatasync) and start the next with a checkpoint.
    fn rotate(&mut self) -> Result<()> {
        if self.dirty {
            self.fdatasync()?;
        }
        let first = self.next_lsn;
        let (file, len) = {
            let st = self.shared.state();
            create_segment(&self.shared.dir, first, &st, true)?
        };
        {
            let mut st = self.shared.state();
            st.segments.insert(
                first,
                SegInfo {
                    bytes: len,
                    live: 0,
                    modified: SystemTime::now(),
                },
            );
        }
        self.next_lsn += 1;
        self.file = file;
        self.seg_first = first;
        self.seg_len = len;
        self.seg_has_records = false;
        self.dirty = false;
        self.shared.visible_lsn.store(first, Ordering::Release);
        let _ = self.retention(false);
        Ok(())
    }

    fn check_quota(&mut self) -> Result<()> {
        let Some(limit) = self.shared.config.max_bytes else {
            return Ok(());
        };
        let used = self.shared.state().total_bytes() + self.buf.len() as u64;
        if used < limit {
            return Ok(());
        }
        self.retention(true);
        let used = self.shared.state().total_bytes() + self.buf.len() as u64;
        if used < limit {
            Ok(())
        } else {
            Err(WalError::QuotaExceeded { used, limit })
        }
    }

    /// Delete sealed segments with no pending entry that are older than the
    /// retention (or, with `forced`, oldest first while over the quota).
    fn retention(&mut self, forced: bool) -> RetentionReport {
        let mut report = RetentionReport::default();
        let cutoff = SystemTime::now()
            .checked_sub(self.shared.config.retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let limit = self.shared.config.max_bytes.unwrap_or(u64::MAX);
        loop {
            let victim = {
                let st = self.shared.state();
                let over = forced && st.total_bytes() >= limit;
                let mut it = st.segments.iter().peekable();
                let mut found = None;
                while let Some((first, info)) = it.next() {
                    let Some((next, _)) = it.peek() else { break };
                    if *first == self.seg_first {
                        break;
                    }
                    if info.live == 0 && (over || info.modified <= cutoff) {
                        found = Some((*first, **next, info.bytes));
                        break;
                    }
                }
                found
            };
            let Some((first, next, bytes)) = victim else {
                break;
            };
            let path = self.shared.dir.join(format::segment_file_name(first));
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "retention could not delete segment");
                    break;
                }
            }
            let expired = self.shared.state().drop_segment(first, next);
            report.segments_deleted += 1;
            report.bytes_freed += bytes;
            report.dead_letters_expired += expired;
        }
        if report.segments_deleted > 0 {
            if let Err(e) = recovery::sync_dir(&self.shared.dir) {
                tracing::warn!(error = %e, "fsync of WAL directory after retention failed");
            }
            tracing::info!(
                segments = report.segments_deleted,
                bytes = report.bytes_freed,
                expired_dead_letters = report.dead_letters_expired,
                "WAL retention deleted segments"
            );
        }
        report
    }
}

fn reply_err(op: Op, e: WalError) {
    match op {
        Op::Append { reply, .. } => drop(reply.send(Err(e))),
        Op::Sync(reply) | Op::Rotate(reply) => drop(reply.send(Err(e))),
        Op::Retention(reply) => drop(reply.send(Err(e))),
    }
}
