//! The group-commit writer thread: the only code that writes segments.
//!
//! Appenders encode their record bodies on their own thread, push them into the
//! inbox and wait on a oneshot. The writer takes *everything* in the inbox at once
//! (that is the group), assigns LSNs, frames it into one buffer, issues one
//! `write` and — when any record in the group asked for durability — one
//! `fdatasync`. While it syncs, the next group gathers in the inbox.
//!
//! ## How appenders are answered
//! - A record takes effect (is applied to the [`State`]) and its appender hears
//!   `Ok` only once it is durable: after the `fdatasync` covering it under
//!   `sync = "always"`, after its `write` otherwise (and for markers, which never
//!   wait for a sync). So the visible LSN never runs ahead of what is synced, and
//!   an entry that was refused is never pending.
//! - Every successful `fdatasync` — a rotation's seal in the middle of a group
//!   included — answers everyone it covered at once: a later failure in the same
//!   group cannot turn a durable entry into a refused one.
//! - A failed `write` refuses only the appends of that write. The file is cut back
//!   to where the write began and the cut is fdatasynced, so a refused record can
//!   never come back; that sync also covers everything written before it.
//! - A failed `fdatasync` poisons the handle: Linux reports a writeback error once
//!   and may drop the pages, so a later sync could "succeed" over lost data. Every
//!   append not yet answered is refused, the file is cut back to its last synced
//!   length, and every later call fails until a restart recovers from the disk.

use crate::config::{SyncMode, WalConfig};
use crate::error::{Result, WalError};
use crate::format::{self, Kind, FRAME_HEADER_LEN};
use crate::inbox::{Inbox, Op, Reply};
use crate::io::{SegmentIo, WalIo};
use crate::segment;
use crate::state::{SegInfo, State};
use crate::wal::{RetentionReport, WalObserver};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// What the handle and the writer share.
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub config: WalConfig,
    pub inbox: Mutex<Inbox>,
    pub wake: Condvar,
    pub state: Mutex<State>,
    /// Highest LSN readers may see: every record up to it is durable under
    /// `always`, written otherwise.
    pub visible_lsn: AtomicU64,
    pub observer: Arc<dyn WalObserver>,
    pub io: Arc<dyn WalIo>,
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One framed record: where it lies, and its body for applying once durable.
struct Rec {
    lsn: u64,
    kind: Kind,
    off: u64,
    body: Vec<u8>,
}

/// An append waiting for its records to be written (and synced).
struct Waiter {
    reply: Reply<Vec<u64>>,
    recs: Vec<Rec>,
    needs_sync: bool,
}

pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub file: Box<dyn SegmentIo>,
    pub seg_first: u64,
    /// Bytes of the current segment written.
    pub seg_len: u64,
    /// Of them, durable.
    pub synced_len: u64,
    /// Records other than the head checkpoint are in the current segment (or the
    /// buffer): only then may it rotate, so an oversized append cannot rotate forever.
    pub seg_has_records: bool,
    /// Bytes of the current segment before its first record: the header and,
    /// when this writer made the segment, the head checkpoint (which grows with
    /// the pending set and is not counted against `segment_bytes`).
    seg_head: u64,
    /// Bytes of records in the segments sealed since the newest checkpoint head.
    since_checkpoint: u64,
    pub next_lsn: u64,
    /// Highest LSN written to the file.
    pub written_lsn: u64,
    /// Framed, not yet written; goes at `seg_len`.
    buf: Vec<u8>,
    /// Appends whose records are in `buf`.
    buffered: Vec<Waiter>,
    /// Appends written and waiting for an fdatasync.
    unsynced: Vec<Waiter>,
    last_sync: Instant,
    poisoned: Option<WalError>,
    /// Ops to wait for before writing a group (see `run`).
    gather_target: usize,
    /// Longest wait for them: half the last fdatasync, at most 1 ms.
    gather_window: Duration,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        file: Box<dyn SegmentIo>,
        seg_first: u64,
        seg_len: u64,
        next_lsn: u64,
    ) -> Writer {
        Writer {
            shared,
            file,
            seg_first,
            seg_len,
            synced_len: seg_len,
            seg_has_records: seg_len > format::SEGMENT_HEADER_LEN as u64,
            // A segment continued at open: its checkpoint's length is not
            // known here, so it counts (one early rotation at most).
            seg_head: format::SEGMENT_HEADER_LEN as u64,
            since_checkpoint: 0,
            next_lsn,
            written_lsn: next_lsn - 1,
            buf: Vec::with_capacity(1 << 20),
            buffered: Vec::new(),
            unsynced: Vec::new(),
            last_sync: Instant::now(),
            poisoned: None,
            gather_target: 1,
            gather_window: Duration::ZERO,
        }
    }

    fn always(&self) -> bool {
        self.shared.config.sync == SyncMode::Always
    }

    pub fn run(&mut self) {
        loop {
            let (ops, closing) = self.gather();
            self.process(ops);
            if self.sync_deadline().is_some_and(|at| at <= Instant::now()) {
                let _ = self.sync();
            }
            if closing {
                // Late submitters after `closing` was set are refused in `submit`;
                // take anything that slipped in before it.
                let rest = std::mem::take(&mut self.shared.inbox().ops);
                self.process(rest);
                let _ = self.sync();
                return;
            }
        }
    }

    /// Wait for the next group.
    fn gather(&mut self) -> (Vec<Op>, bool) {
        let shared = self.shared.clone();
        let mut inbox = shared.inbox();
        let mut gather_until: Option<Instant> = None;
        loop {
            if inbox.closing {
                break;
            }
            let (n, waiting) = (inbox.ops.len(), inbox.waiting);
            let now = Instant::now();
            let until = if n > 0 {
                // Gather: the appenders answered last time are usually about to
                // come back; a group that waits a fraction of an fsync for them
                // saves a whole fsync. Only ops that wait for the fsync count
                // (a delivery's markers do not): a group of markers alone is
                // written at once, and markers never hold back an appender.
                let until = *gather_until.get_or_insert(now + self.gather_window);
                if waiting == 0 || waiting >= self.gather_target || now >= until {
                    break;
                }
                inbox.want = self.gather_target;
                Some(until)
            } else {
                match self.sync_deadline() {
                    Some(at) if at <= now => break,
                    other => other,
                }
            };
            inbox = match until {
                Some(at) => {
                    let r = shared.wake.wait_timeout(inbox, at - now);
                    r.unwrap_or_else(|p| p.into_inner()).0
                }
                None => shared.wake.wait(inbox).unwrap_or_else(|p| p.into_inner()),
            };
        }
        inbox.want = 0;
        inbox.waiting = 0;
        (std::mem::take(&mut inbox.ops), inbox.closing)
    }

    /// When the interval mode owes an fdatasync.
    fn sync_deadline(&self) -> Option<Instant> {
        match self.shared.config.sync {
            SyncMode::Interval(d) if self.seg_len > self.synced_len => Some(self.last_sync + d),
            _ => None,
        }
    }

    fn process(&mut self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let mut syncers: Vec<Reply<()>> = Vec::new();
        let mut need_sync = false;
        let (mut appends, mut records, mut waiting) = (0usize, 0usize, 0usize);
        for op in ops {
            if let Some(e) = &self.poisoned {
                op.fail(e.clone());
                continue;
            }
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
                        && self.seg_len.saturating_sub(self.seg_head) + self.buf.len() as u64 + size
                            > self.shared.config.segment_bytes
                    {
                        if let Err(e) = self.rotate() {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    }
                    appends += 1;
                    records += recs.len();
                    let needs_sync = durable && self.always();
                    need_sync |= needs_sync;
                    waiting += usize::from(needs_sync);
                    self.frame(recs, reply, needs_sync);
                }
                Op::Sync(reply) => {
                    need_sync = true;
                    syncers.push(reply);
                }
                Op::Rotate(reply) => {
                    // A segment with nothing after its checkpoint has nothing to seal.
                    let r = if self.seg_has_records || !self.buf.is_empty() {
                        self.rotate()
                    } else {
                        Ok(())
                    };
                    let _ = reply.send(r);
                }
                Op::Retention(reply) => {
                    let _ = reply.send(self.retention(false));
                }
            }
        }
        // A failed write has answered its own appenders; a sync still covers the rest.
        let _ = self.flush();
        let synced = if need_sync { self.sync() } else { Ok(()) };
        if appends > 0 {
            self.shared.observer.group(appends, records);
        }
        if need_sync {
            // The group to expect next: everyone just answered after the fsync
            // plus everyone waiting who arrived while this group was written and
            // synced (those cannot be of this group). Under other modes there
            // is no fsync to share.
            let arrived = self.shared.inbox().waiting;
            self.gather_target = waiting + syncers.len() + arrived;
        }
        for s in syncers {
            let _ = s.send(synced.clone());
        }
    }

    /// Frame an append's records into the buffer.
    fn frame(&mut self, records: Vec<(Kind, Vec<u8>)>, reply: Reply<Vec<u64>>, needs_sync: bool) {
        let mut recs = Vec::with_capacity(records.len());
        for (kind, body) in records {
            let lsn = self.next_lsn;
            self.next_lsn += 1;
            let synced_before = self.buf.is_empty() && self.seg_len == self.synced_len;
            let off = self.seg_len + self.buf.len() as u64;
            format::encode_frame_flagged(&mut self.buf, kind, synced_before, lsn, &body);
            recs.push(Rec {
                lsn,
                kind,
                off,
                body,
            });
        }
        self.buffered.push(Waiter {
            reply,
            recs,
            needs_sync,
        });
    }

    /// Write the buffer. Records that need no fdatasync take effect now; the rest
    /// wait for one. On failure, refuse the buffer's appends and cut the file back.
    fn flush(&mut self) -> Result<()> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let start = self.seg_len;
        if let Err(e) = self.file.write_all_at(&self.buf, start) {
            let err = WalError::io(self.seg_path(), e);
            self.buf.clear();
            // Cut back durably before refusing: a refused record must never come back.
            let cut = self.file.set_len(start).and_then(|()| self.fdatasync());
            match cut {
                Ok(()) => self.synced(),
                Err(e) => {
                    self.poison(format!(
                        "could not cut back a failed write of {}: {e}",
                        self.seg_path().display()
                    ));
                }
            }
            for w in self.buffered.drain(..) {
                let _ = w.reply.send(Err(err.clone()));
            }
            return Err(err);
        }
        self.seg_len += self.buf.len() as u64;
        self.buf.clear();
        self.seg_has_records = true;
        if let Some(s) = self.shared.state().segments.get_mut(&self.seg_first) {
            s.bytes = self.seg_len;
            s.modified = SystemTime::now();
        }
        self.written_lsn = self.next_lsn - 1;
        let (now, later): (Vec<_>, Vec<_>) = self.buffered.drain(..).partition(|w| !w.needs_sync);
        self.unsynced.extend(later);
        if !self.always() {
            self.publish(self.written_lsn);
        }
        self.commit(now);
        Ok(())
    }

    /// fdatasync the current segment if anything is unsynced; answer what it covered.
    fn sync(&mut self) -> Result<()> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        if self.seg_len == self.synced_len && self.unsynced.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.fdatasync() {
            return Err(self.poison(format!(
                "fdatasync of {} failed: {e}",
                self.seg_path().display()
            )));
        }
        self.synced();
        Ok(())
    }

    fn fdatasync(&mut self) -> std::io::Result<()> {
        let t = Instant::now();
        self.file.sync_data()?;
        let took = t.elapsed();
        self.gather_window = (took / 2).min(Duration::from_millis(1));
        self.shared.observer.fsync(took);
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Everything written is durable now.
    fn synced(&mut self) {
        self.synced_len = self.seg_len;
        // Visible before anyone hears Ok: an appender may read right after.
        self.publish(self.written_lsn);
        let done = std::mem::take(&mut self.unsynced);
        self.commit(done);
    }

    /// Apply the appends' records to the state, then answer them.
    fn commit(&mut self, waiters: Vec<Waiter>) {
        if waiters.is_empty() {
            return;
        }
        {
            let mut st = self.shared.state();
            for r in waiters.iter().flat_map(|w| &w.recs) {
                // Bodies were encoded by this crate; a decode failure is a bug.
                st.apply(r.off, r.lsn, r.kind, &r.body)
                    .expect("WAL applied a record it encoded itself");
            }
        }
        for w in waiters {
            let _ = w.reply.send(Ok(w.recs.iter().map(|r| r.lsn).collect()));
        }
    }

    fn publish(&self, lsn: u64) {
        self.shared.visible_lsn.fetch_max(lsn, Ordering::Release);
    }

    fn seg_path(&self) -> PathBuf {
        self.shared
            .dir
            .join(format::segment_file_name(self.seg_first))
    }

    /// Refuse everything from now on; cut off the records of every append not yet
    /// answered (best effort: they may already be gone from the disk). Records
    /// already answered — markers, and appends under `interval`/`never` — stay.
    fn poison(&mut self, why: String) -> WalError {
        tracing::error!(reason = %why, "WAL poisoned; refusing further writes until restart");
        let e = WalError::Poisoned(why);
        self.poisoned = Some(e.clone());
        let refused = self.unsynced.iter().chain(&self.buffered);
        let first_refused = refused.filter_map(|w| w.recs.first()).map(|r| r.off).min();
        if let Some(cut) = first_refused.filter(|c| *c < self.seg_len) {
            let _ = self.file.set_len(cut);
            self.seg_len = cut;
        }
        self.buf.clear();
        for w in self.unsynced.drain(..).chain(self.buffered.drain(..)) {
            let _ = w.reply.send(Err(e.clone()));
        }
        e
    }

    /// Seal the current segment (fdatasync) and start the next, with a
    /// checkpoint if it is within [`Writer::checkpoint_limit`]: without one,
    /// recovery walks on from the last segment that has one, and retention
    /// keeps that segment and the rest.
    fn rotate(&mut self) -> Result<()> {
        self.seal_and_start()?;
        let _ = self.retention(false);
        Ok(())
    }

    /// The largest checkpoint a rotation writes: a quarter of `segment_bytes`,
    /// or an eighth of the records written since the last one. A checkpoint
    /// lists every tracked entry, so under a big backlog (or many dead letters
    /// that never leave) it is written only now and then: at most an eighth of
    /// the bytes written, and recovery walks at most 8 × its size of records.
    fn checkpoint_limit(&self) -> u64 {
        let since = self.since_checkpoint + self.seg_len.saturating_sub(self.seg_head);
        (self.shared.config.segment_bytes / 4).max(since / 8)
    }

    /// [`Writer::rotate`] without the retention after it.
    fn seal_and_start(&mut self) -> Result<()> {
        self.flush()?;
        self.sync()?;
        let first = self.next_lsn;
        let sealed = self.seg_len.saturating_sub(self.seg_head);
        let cp = self
            .shared
            .state()
            .checkpoint_within(self.checkpoint_limit());
        let created =
            segment::create_segment(&*self.shared.io, &self.shared.dir, first, cp.as_ref());
        let (file, len) = match created {
            Ok(c) => c,
            // A half-made segment that may survive would shadow this one's tail.
            Err(WalError::Poisoned(why)) => return Err(self.poison(why)),
            Err(e) => return Err(e),
        };
        {
            let mut st = self.shared.state();
            st.segments
                .insert(first, SegInfo::new(len, SystemTime::now()));
            if cp.is_some() {
                st.recovery_start = first;
            }
        }
        if cp.is_some() {
            // The checkpoint is record `first`.
            self.next_lsn += 1;
            self.written_lsn = first;
            self.publish(first);
            self.since_checkpoint = 0;
        } else {
            self.since_checkpoint += sealed;
        }
        self.file = file;
        self.seg_first = first;
        self.seg_len = len;
        self.seg_head = len;
        self.synced_len = len;
        self.seg_has_records = false;
        Ok(())
    }

    fn check_quota(&mut self) -> Result<()> {
        let Some(limit) = self.shared.config.max_bytes else {
            return Ok(());
        };
        let used = |w: &Writer| w.shared.state().total_bytes() + w.buf.len() as u64;
        if used(self) < limit {
            return Ok(());
        }
        self.retention(true)?;
        let used = used(self);
        if used < limit {
            Ok(())
        } else {
            Err(WalError::QuotaExceeded { used, limit })
        }
    }

    /// Delete sealed segments holding no pending entry and no dead letter that are
    /// older than the retention (or, with `forced`, oldest first while over the
    /// quota). Everything written is synced first: the DELIVERED records that
    /// freed a segment must be durable before it goes.
    fn retention(&mut self, forced: bool) -> Result<RetentionReport> {
        self.flush()?;
        self.sync()?;
        let mut report = self.delete_segments(forced);
        // Segments done with, but walked at recovery since the last checkpoint
        // (rotations skipped it while the backlog was big): once a checkpoint
        // is within its limit again, start a segment with one, so they can go.
        // Best effort: what could go has gone already.
        let blocked = (self.seg_has_records || !self.buf.is_empty()) && {
            let st = self.shared.state();
            st.checkpoint_estimate() <= self.checkpoint_limit()
                && st
                    .segments
                    .range(st.recovery_start..self.seg_first)
                    .any(|(_, info)| info.live == 0)
        };
        if blocked {
            match self.seal_and_start() {
                Ok(()) => {
                    let more = self.delete_segments(forced);
                    report.segments_deleted += more.segments_deleted;
                    report.bytes_freed += more.bytes_freed;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a segment with a checkpoint for retention")
                }
            }
        }
        Ok(report)
    }

    /// Retention's deletions (see [`Writer::retention`]), after the sync.
    fn delete_segments(&mut self, forced: bool) -> RetentionReport {
        let mut report = RetentionReport::default();
        let cutoff = SystemTime::now()
            .checked_sub(self.shared.config.retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let limit = self.shared.config.max_bytes.unwrap_or(u64::MAX);
        loop {
            let victim = {
                let st = self.shared.state();
                let over = forced && st.total_bytes() >= limit;
                let oldest = st.segments.keys().next().copied();
                // A segment with tombstones goes only once it is the oldest: an
                // older one may hold what they forgot.
                st.segments
                    .range(..st.recovery_start.min(self.seg_first))
                    .find(|(first, info)| {
                        info.live == 0
                            && (info.tombstones == 0 || Some(**first) == oldest)
                            && (over || info.modified <= cutoff)
                    })
                    .map(|(first, info)| (*first, info.bytes))
            };
            let Some((first, bytes)) = victim else {
                break;
            };
            let path = self.shared.dir.join(format::segment_file_name(first));
            if let Err(e) = self.shared.io.remove(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "retention could not delete segment");
                    break;
                }
            }
            {
                self.shared.state().retire_segment(first);
            }
            report.segments_deleted += 1;
            report.bytes_freed += bytes;
        }
        if report.segments_deleted > 0 {
            if let Err(e) = self.shared.io.sync_dir(&self.shared.dir) {
                tracing::warn!(error = %e, "fsync of WAL directory after retention failed");
            }
            tracing::info!(
                segments = report.segments_deleted,
                bytes = report.bytes_freed,
                "WAL retention deleted segments"
            );
        }
        report
    }
}
