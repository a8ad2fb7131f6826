//! The I/O seam: every write-side operation on segment files and the WAL
//! directory goes through [`WalIo`], so tests can inject a failing `write`,
//! `fdatasync` or `ftruncate` — or a power loss — deterministically and without
//! root. [`RealIo`], the default, is the filesystem itself. Reads (recovery, the
//! reader, the offline tools) use the filesystem directly: what they see is what a
//! restarted process would see.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// An open segment file, for writing.
pub trait SegmentIo: Send {
    /// Write all of `buf` at byte offset `off`.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// `fdatasync`: make every byte written so far durable.
    fn sync_data(&self) -> io::Result<()>;
    /// `ftruncate` to `len` bytes (not durable until the next `sync_data`).
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// Opening, creating and removing segment files, and syncing their directory.
pub trait WalIo: Send + Sync + 'static {
    /// Create `path`, which must not exist yet.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn SegmentIo>>;
    /// Open the existing file `path` for writing.
    fn open(&self, path: &Path) -> io::Result<Box<dyn SegmentIo>>;
    /// Remove the file `path`.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// fsync the directory `dir`, making creations and removals in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Rename `from` over `to` atomically (not durable until `sync_dir`).
    /// Only `spool wal compact` renames, offline; the fault seam does not
    /// model it.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealIo;

impl SegmentIo for File {
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

impl WalIo for RealIo {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn SegmentIo>> {
        let f = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(f))
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn SegmentIo>> {
        Ok(Box::new(OpenOptions::new().write(true).open(path)?))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
