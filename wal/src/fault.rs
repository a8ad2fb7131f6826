//! [`FaultIo`]: a [`WalIo`] for tests (cargo feature `fault-injection`). Real files
//! underneath, plus what the real thing cannot do on demand:
//!
//! - **injected failures** — the n-th `write`, `fdatasync`, `ftruncate`, create,
//!   remove or directory sync from now fails once, with EIO or ENOSPC (a failing
//!   ENOSPC write leaves the first half of its bytes behind, as a short write does);
//! - **a held call** — the next call of a kind blocks until released, so a test
//!   can queue several appends into one group deterministically;
//! - **power loss** — every file is rewritten to what a disk would hold after the
//!   power went: the bytes covered by a successful `fdatasync`, plus any chosen
//!   subset of the unsynced 512-byte chunks (holes included). A failed
//!   `fdatasync` dooms the writes it should have covered, as Linux does: a later
//!   `fdatasync` that "succeeds" does not make them durable.
//!
//! File creations and removals count as durable at once (the WAL syncs the
//! directory right after each).

use crate::io::{SegmentIo, WalIo};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// A kind of I/O call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// Creating a segment file.
    Create,
    /// `pwrite`.
    Write,
    /// `fdatasync`.
    Sync,
    /// `ftruncate`.
    SetLen,
    /// Removing a segment file.
    Remove,
    /// fsync of the directory.
    SyncDir,
}

/// The error an injected failure returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// EIO.
    Eio,
    /// ENOSPC.
    NoSpace,
}

impl Fault {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Fault::Eio => libc::EIO,
            Fault::NoSpace => libc::ENOSPC,
        })
    }
}

/// Size of the unit a power loss keeps or drops.
pub const SECTOR: u64 = 512;

/// One unsynced change a power loss may keep or drop, in the order it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsynced {
    /// Position among all unsynced changes (numbered from 0).
    pub n: u64,
    /// An `ftruncate` (else a [`SECTOR`]-aligned piece of a write).
    pub truncation: bool,
}

enum Pending {
    Write {
        off: u64,
        data: Vec<u8>,
        doomed: bool,
    },
    SetLen {
        len: u64,
        doomed: bool,
    },
}

#[derive(Default)]
struct Image {
    durable: Vec<u8>,
    pending: Vec<Pending>,
}

fn apply_write(img: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[off as usize..end].copy_from_slice(data);
}

#[derive(Default)]
struct State {
    files: HashMap<PathBuf, Image>,
    armed: Vec<(FaultOp, u64, Fault)>,
    calls: HashMap<FaultOp, u64>,
    held: Option<FaultOp>,
    holding: bool,
    crashed: bool,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    cv: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a call; block while it is held; the injected failure, if one is due.
    fn enter(&self, op: FaultOp) -> Result<(), Fault> {
        let mut st = self.lock();
        if st.crashed {
            return Err(Fault::Eio);
        }
        let n = st.calls.entry(op).or_default();
        let nth = *n;
        *n += 1;
        if st.held == Some(op) {
            st.held = None;
            st.holding = true;
            self.cv.notify_all();
            while st.holding {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.crashed {
                return Err(Fault::Eio);
            }
        }
        if let Some(i) = st
            .armed
            .iter()
            .position(|(o, at, _)| *o == op && *at == nth)
        {
            return Err(st.armed.remove(i).2);
        }
        Ok(())
    }
}

/// See the module documentation.
#[derive(Clone, Default)]
pub struct FaultIo {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FaultIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultIo").finish_non_exhaustive()
    }
}

impl FaultIo {
    /// A fresh seam with nothing armed.
    pub fn new() -> FaultIo {
        FaultIo::default()
    }

    /// The `nth` (0-based) call of `op` counted from now fails once with `fault`.
    pub fn fail(&self, op: FaultOp, nth: u64, fault: Fault) {
        let mut st = self.inner.lock();
        let base = st.calls.get(&op).copied().unwrap_or(0);
        st.armed.push((op, base + nth, fault));
    }

    /// Calls of `op` so far.
    pub fn calls(&self, op: FaultOp) -> u64 {
        self.inner.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// The next call of `op` blocks until [`FaultIo::release`].
    pub fn hold(&self, op: FaultOp) {
        self.inner.lock().held = Some(op);
    }

    /// Wait until the held call has been made (and is blocked).
    pub fn wait_held(&self) {
        let mut st = self.inner.lock();
        while !st.holding {
            st = self.inner.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Let the held call go on.
    pub fn release(&self) {
        self.inner.lock().holding = false;
        self.inner.cv.notify_all();
    }

    /// The process "dies": every later call (and a held one) fails with EIO and
    /// changes nothing, so closing the WAL afterwards makes nothing more durable.
    pub fn crash(&self) {
        self.inner.lock().crashed = true;
        self.release();
    }

    /// Cut the power: [`FaultIo::crash`], then rewrite every file this seam wrote to
    /// as the disk would hold it — its durable bytes, plus each [`Unsynced`] change
    /// for which `keep` says yes.
    pub fn power_loss(&self, mut keep: impl FnMut(Unsynced) -> bool) -> io::Result<()> {
        self.crash();
        let mut st = self.inner.lock();
        let mut chunk = 0u64;
        for (path, img) in std::mem::take(&mut st.files) {
            let mut bytes = img.durable;
            for p in &img.pending {
                match p {
                    Pending::Write { off, data, .. } => {
                        let mut at = *off;
                        let end = off + data.len() as u64;
                        while at < end {
                            let next = ((at / SECTOR) + 1) * SECTOR;
                            let stop = next.min(end);
                            if keep(Unsynced {
                                n: chunk,
                                truncation: false,
                            }) {
                                let s = (at - off) as usize..(stop - off) as usize;
                                apply_write(&mut bytes, at, &data[s]);
                            }
                            chunk += 1;
                            at = stop;
                        }
                    }
                    Pending::SetLen { len, .. } => {
                        if keep(Unsynced {
                            n: chunk,
                            truncation: true,
                        }) {
                            bytes.resize(*len as usize, 0);
                        }
                        chunk += 1;
                    }
                }
            }
            if path.exists() {
                std::fs::write(&path, &bytes)?;
            }
        }
        Ok(())
    }

    fn track(&self, path: &Path, file: File, durable: Vec<u8>) -> Box<dyn SegmentIo> {
        let image = Image {
            durable,
            pending: Vec::new(),
        };
        self.inner.lock().files.insert(path.to_owned(), image);
        Box::new(FaultFile {
            inner: self.inner.clone(),
            path: path.to_owned(),
            file,
        })
    }
}

struct FaultFile {
    inner: Arc<Inner>,
    path: PathBuf,
    file: File,
}

impl FaultFile {
    fn pending(&self, p: Pending) {
        let mut st = self.inner.lock();
        if let Some(img) = st.files.get_mut(&self.path) {
            img.pending.push(p);
        }
    }
}

impl SegmentIo for FaultFile {
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match self.inner.enter(FaultOp::Write) {
            Ok(()) => {
                FileExt::write_all_at(&self.file, buf, off)?;
                self.pending(Pending::Write {
                    off,
                    data: buf.to_vec(),
                    doomed: false,
                });
                Ok(())
            }
            Err(Fault::NoSpace) => {
                let half = &buf[..buf.len() / 2];
                FileExt::write_all_at(&self.file, half, off)?;
                self.pending(Pending::Write {
                    off,
                    data: half.to_vec(),
                    doomed: false,
                });
                Err(Fault::NoSpace.error())
            }
            Err(f) => Err(f.error()),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        let res = self.inner.enter(FaultOp::Sync);
        let mut st = self.inner.lock();
        if st.crashed {
            return Err(Fault::Eio.error());
        }
        let Some(img) = st.files.get_mut(&self.path) else {
            return res.map_err(Fault::error);
        };
        match res {
            Ok(()) => {
                // Durability is simulated here; the real fdatasync would only cost time.
                let mut left = Vec::new();
                for p in img.pending.drain(..) {
                    match p {
                        Pending::Write {
                            off,
                            data,
                            doomed: false,
                        } => apply_write(&mut img.durable, off, &data),
                        Pending::SetLen { len, doomed: false } => {
                            img.durable.resize(len as usize, 0)
                        }
                        doomed => left.push(doomed),
                    }
                }
                img.pending = left;
                Ok(())
            }
            Err(f) => {
                // Linux may drop the dirty pages and clear the error: what this
                // sync should have covered is never durable now.
                for p in &mut img.pending {
                    match p {
                        Pending::Write { doomed, .. } | Pending::SetLen { doomed, .. } => {
                            *doomed = true
                        }
                    }
                }
                Err(f.error())
            }
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.enter(FaultOp::SetLen).map_err(Fault::error)?;
        self.file.set_len(len)?;
        self.pending(Pending::SetLen { len, doomed: false });
        Ok(())
    }
}

impl WalIo for FaultIo {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn SegmentIo>> {
        self.inner.enter(FaultOp::Create).map_err(Fault::error)?;
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(self.track(path, file, Vec::new()))
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn SegmentIo>> {
        if self.inner.lock().crashed {
            return Err(Fault::Eio.error());
        }
        // What a fresh process finds is durable once it syncs it, which `Wal::open` does.
        let durable = std::fs::read(path)?;
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(self.track(path, file, durable))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.enter(FaultOp::Remove).map_err(Fault::error)?;
        std::fs::remove_file(path)?;
        self.inner.lock().files.remove(path);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.enter(FaultOp::SyncDir).map_err(Fault::error)?;
        let _ = dir;
        Ok(())
    }
}
