//! The live WAL: a cheap-to-clone handle in front of one writer thread
//! (`writer.rs`), plus the reads that serve from the recovered state.

use crate::config::WalConfig;
use crate::entry::Entry;
use crate::error::{Result, WalError};
use crate::format::{self, Kind, SEGMENT_HEADER_LEN};
use crate::inbox::{Inbox, Op, Reply};
use crate::io::{RealIo, WalIo};
use crate::recovery::{self, RecoveryReport};
use crate::segment;
use crate::state::{SegInfo, Tracked};
use crate::writer::{Shared, Writer};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
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

/// What [`Wal::open_with`] plugs in besides the configuration.
#[derive(Clone)]
pub struct WalHooks {
    /// Receives fsync and group-size figures.
    pub observer: Arc<dyn WalObserver>,
    /// The I/O seam segments are written through ([`RealIo`] by default).
    pub io: Arc<dyn WalIo>,
}

impl Default for WalHooks {
    fn default() -> Self {
        WalHooks {
            observer: Arc::new(NoObserver),
            io: Arc::new(RealIo),
        }
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
        self.shared.inbox().closing = true;
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
    pub(crate) shared: Arc<Shared>,
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
        Self::open_with(dir, config, WalHooks::default())
    }

    /// [`Wal::open`] with an observer and an I/O seam.
    pub fn open_with(dir: impl AsRef<Path>, config: WalConfig, hooks: WalHooks) -> Result<Wal> {
        config.validate()?;
        let dir = dir.as_ref().to_owned();
        let io = hooks.io;
        std::fs::create_dir_all(&dir).map_err(|e| WalError::io(&dir, e))?;
        let lock = lock_dir(&dir)?;
        let rec = recovery::recover(&dir, config.on_corruption, Some(&*io))?;
        let mut state = rec.state;
        state.prune_purged();
        let mut next_lsn = rec.next_lsn;
        // Continue the newest segment if this build writes its version. Either way
        // sync it first: a killed process leaves unsynced bytes in the page cache,
        // and what follows them is flagged as written after synced history.
        let mut continued = None;
        if let Some((seg, len, version)) = rec.active {
            let f = io.open(&seg.path).map_err(|e| WalError::io(&seg.path, e))?;
            f.sync_data().map_err(|e| WalError::io(&seg.path, e))?;
            if version == format::FORMAT_VERSION {
                continued = Some((f, seg.first_lsn, len));
            } else {
                // Sealed as it is; the next segment may not take its name.
                next_lsn = next_lsn.max(seg.first_lsn + 1);
            }
        }
        let (file, seg_first, seg_len) = match continued {
            Some(c) => c,
            None => {
                let cp = state.checkpoint_within(config.segment_bytes / 4);
                // The first segment of a WAL needs none (there is nothing before it).
                let cp = cp.filter(|_| !state.segments.is_empty());
                let (f, len) = segment::create_segment(&*io, &dir, next_lsn, cp.as_ref())?;
                if cp.is_some() || state.segments.is_empty() {
                    state.recovery_start = next_lsn;
                }
                state
                    .segments
                    .insert(next_lsn, SegInfo::new(len, SystemTime::now()));
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
            inbox: Mutex::new(Inbox {
                stamp: state.stamp,
                ..Inbox::default()
            }),
            wake: Condvar::new(),
            state: Mutex::new(state),
            visible_lsn: (next_lsn - 1).into(),
            observer: hooks.observer,
            io,
        });
        let mut writer = Writer::new(shared.clone(), file, seg_first, seg_len, next_lsn);
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

    /// Hand `op` to the writer; answers the stamps its records were given.
    fn submit(&self, op: Op) -> Result<Vec<i64>> {
        let mut inbox = self.shared.inbox();
        if inbox.closing {
            return Err(WalError::Closed);
        }
        let stamps = inbox.push(op);
        let wake = inbox.ops.len() == 1 || (inbox.want > 0 && inbox.waiting == inbox.want);
        drop(inbox);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(stamps)
    }

    pub(crate) async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        self.call_stamped(op).await.map(|(t, _)| t)
    }

    /// [`Wal::call`], also answering the stamps the op's records were given.
    pub(crate) async fn call_stamped<T>(
        &self,
        op: impl FnOnce(Reply<T>) -> Op,
    ) -> Result<(T, Vec<i64>)> {
        let (tx, rx) = oneshot::channel();
        let stamps = self.submit(op(tx))?;
        let t = rx.await.unwrap_or(Err(WalError::Closed))?;
        Ok((t, stamps))
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
    /// Each entry is stored with `accepted_at_us` raised, if need be, so stamps
    /// rise with the LSN (docs/wal-format.md, "Stamps rise with the LSN"):
    /// [`Wal::append_stamped`] tells the caller the stamps.
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

    /// [`Wal::append`], setting each entry's `accepted_at_us` to the stamp it was
    /// stored with.
    pub async fn append_stamped(&self, entries: &mut [Entry]) -> Result<Vec<u64>> {
        let records = self.encode_entries(entries)?;
        let (lsns, stamps) = self
            .call_stamped(|reply| Op::Append {
                records,
                durable: true,
                gated: true,
                reply,
            })
            .await?;
        for (e, at) in entries.iter_mut().zip(stamps) {
            e.accepted_at_us = at;
        }
        Ok(lsns)
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
        self.dead_letter_marker(Kind::Requeued, lsns).await
    }

    /// Whether the entry at `lsn` is a dead letter an operator purged (its record
    /// may still be retained; replay must not deliver it).
    pub fn is_purged(&self, lsn: u64) -> bool {
        self.shared.state().purged.contains(&lsn)
    }

    /// Whether the entry at `lsn` was pending when a tombstone forgot it by id
    /// (since this WAL was opened): it ended without being delivered.
    pub fn ended_by_forget(&self, lsn: u64) -> bool {
        self.shared.state().ended_by_forget.contains(&lsn)
    }

    /// Discard dead letters: they become terminal without being delivered, and
    /// their segments may go. Returns the LSNs that were dead letters (others,
    /// pending or unknown, are ignored). Durable once it resolves.
    pub async fn purge(&self, lsns: &[u64]) -> Result<Vec<u64>> {
        self.dead_letter_marker(Kind::Purged, lsns).await
    }

    /// A durable REQUEUED or PURGED record for those of `lsns` that are dead
    /// letters; answers them.
    async fn dead_letter_marker(&self, kind: Kind, lsns: &[u64]) -> Result<Vec<u64>> {
        let dead: Vec<u64> = {
            let st = self.shared.state();
            lsns.iter()
                .copied()
                .filter(|l| st.tracked.get(*l).is_some_and(|m| !m.is_pending()))
                .collect()
        };
        if dead.is_empty() {
            return Ok(dead);
        }
        let mut body = Vec::new();
        format::encode_lsns(&dead, &mut body);
        self.marker(kind, body, true).await?;
        Ok(dead)
    }

    /// fdatasync everything written so far, whatever the sync mode.
    pub async fn sync(&self) -> Result<()> {
        self.call(Op::Sync).await
    }

    /// Seal the current segment and start a new one (with a checkpoint, unless
    /// the backlog makes it too big: see docs/wal-format.md).
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
            oldest_pending_lsn: st.tracked.oldest_pending(),
            visible_lsn: self.shared.visible_lsn.load(Ordering::Acquire),
        }
    }

    /// Status of a tracked (pending or dead) entry, by LSN.
    pub fn status_of(&self, lsn: u64) -> Option<Tracked> {
        self.shared.state().tracked.get(lsn).map(|m| m.status())
    }

    /// Status of a tracked (pending or dead) entry, by id.
    pub fn lookup(&self, id: Uuid) -> Option<EntryStatus> {
        let st = self.shared.state();
        let m = st.tracked.with_id(id).max_by_key(|m| m.lsn)?;
        Some(EntryStatus {
            lsn: m.lsn,
            status: m.status(),
        })
    }

    /// The source of a tracked (pending or dead) entry, by LSN.
    pub fn source_of(&self, lsn: u64) -> Option<Arc<str>> {
        self.shared
            .state()
            .tracked
            .get(lsn)
            .map(|m| m.source.clone())
    }

    /// Dead letters, oldest first, optionally of one source, at most `limit`.
    pub fn dead_letters(&self, source: Option<&str>, limit: usize) -> Vec<DeadLetter> {
        let st = self.shared.state();
        st.tracked
            .dead()
            .filter(|m| source.is_none_or(|s| s == &**m.source))
            .take(limit)
            .filter_map(|m| match m.status() {
                Tracked::Dead { attempts, reason } => Some(DeadLetter {
                    lsn: m.lsn,
                    id: m.id,
                    source: m.source.to_string(),
                    destination: m.destination.to_string(),
                    attempts,
                    reason,
                }),
                Tracked::Pending => None,
            })
            .collect()
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
