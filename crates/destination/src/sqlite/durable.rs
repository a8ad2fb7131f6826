//! Commits made durable together (group commit for SQLite).
//!
//! The writer commits with `synchronous=NORMAL`: SQLite writes the commit's
//! frames to the `-wal` file but does not fsync it, and gives the writer back
//! at once. A write is answered only after one `fdatasync` of that file, begun
//! after its commit, returned — so what the caller is told is on disk is on
//! disk, as with `synchronous=FULL`, while the next batch's statements run
//! during the sync and one sync covers every commit made before it began.
//!
//! Why that suffices: in WAL mode a commit is its frames in the `-wal` file
//! (syncing that inode through any descriptor flushes them); a checkpoint in
//! NORMAL mode syncs the `-wal` before and the database after copying, and only
//! a completed checkpoint lets the `-wal` restart or (at the last close) be
//! removed, so a commit no longer in the file is in the synced database. The
//! directory is synced once per `-wal` file (SQLite would do that at its first
//! sync, which NORMAL leaves to a checkpoint).
//!
//! A failed sync leaves unknown pages lost while the page cache reads them
//! back (a later sync would succeed and prove nothing): the destination is then
//! unavailable until spool restarts, when the WAL delivers again whatever was
//! not marked delivered.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tokio::sync::Mutex;

/// Tickets for commits, and the syncs that cover them.
pub(super) struct GroupSync {
    wal: PathBuf,
    dir: PathBuf,
    /// Commits made so far (a commit's ticket is the count after it).
    committed: AtomicU64,
    /// The highest ticket a finished sync covers, and the `-wal` file's inode
    /// whose directory entry is synced.
    synced: Mutex<(u64, Option<u64>)>,
    /// Why a sync failed, once one has.
    failed: OnceLock<String>,
    /// [`sync`], but for tests that make it fail.
    sync: SyncFn,
}

type SyncFn = fn(&Path, &Path, Option<u64>) -> std::io::Result<Option<u64>>;

impl GroupSync {
    /// For the database at `db`.
    pub(super) fn new(db: &Path) -> Self {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let dir = match db.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        GroupSync {
            wal: wal.into(),
            dir,
            committed: AtomicU64::new(0),
            synced: Mutex::new((0, None)),
            failed: OnceLock::new(),
            sync,
        }
    }

    /// A ticket for a commit that has returned: [`durable`](Self::durable)
    /// waits for it.
    pub(super) fn committed(&self) -> u64 {
        self.committed.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Why writes are refused, when a sync has failed.
    pub(super) fn failed(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Wait until the commit of `ticket` is on disk: joins a sync begun after
    /// it, or runs one covering every commit made so far.
    pub(super) async fn durable(&self, ticket: u64) -> Result<(), String> {
        let mut synced = self.synced.lock().await;
        if let Some(e) = self.failed() {
            return Err(e.to_owned());
        }
        if synced.0 >= ticket {
            return Ok(());
        }
        let through = self.committed.load(Ordering::SeqCst);
        let (wal, dir, inode, sync) = (self.wal.clone(), self.dir.clone(), synced.1, self.sync);
        let res = tokio::task::spawn_blocking(move || sync(&wal, &dir, inode))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match res {
            Ok(inode) => {
                *synced = (through, inode);
                Ok(())
            }
            Err(e) => {
                let why = format!(
                    "syncing {} failed ({e}); what it held may be lost: restart spool to deliver again",
                    self.wal.display()
                );
                tracing::error!("{why}");
                Err(self.failed.get_or_init(|| why).clone())
            }
        }
    }
}

/// fdatasync the `-wal` file (and its directory when the file is new);
/// answers its inode. No file: SQLite removed it after a checkpoint had
/// synced everything into the database.
fn sync(wal: &Path, dir: &Path, known: Option<u64>) -> std::io::Result<Option<u64>> {
    let f = match File::open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    f.sync_data()?;
    let inode = f.metadata()?.ino();
    if known != Some(inode) {
        File::open(dir)?.sync_all()?;
    }
    Ok(Some(inode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    static SYNCS: AtomicUsize = AtomicUsize::new(0);
    static FAILS: AtomicUsize = AtomicUsize::new(0);

    fn counted(_: &Path, _: &Path, _: Option<u64>) -> std::io::Result<Option<u64>> {
        SYNCS.fetch_add(1, Ordering::SeqCst);
        Ok(Some(1))
    }

    fn eio(_: &Path, _: &Path, _: Option<u64>) -> std::io::Result<Option<u64>> {
        FAILS.fetch_add(1, Ordering::SeqCst);
        Err(std::io::Error::from_raw_os_error(5))
    }

    #[tokio::test]
    async fn one_sync_covers_the_commits_made_before_it_began_and_no_later_one() {
        let g = GroupSync {
            sync: counted,
            ..GroupSync::new(Path::new("/nowhere/spool.db"))
        };
        let first = g.committed();
        g.durable(first).await.unwrap();
        assert_eq!(SYNCS.load(Ordering::SeqCst), 1);
        // Three commits, then one sync for the last covers the other two.
        let [a, b, c] = [g.committed(), g.committed(), g.committed()];
        g.durable(c).await.unwrap();
        g.durable(a).await.unwrap();
        g.durable(b).await.unwrap();
        assert_eq!(SYNCS.load(Ordering::SeqCst), 2);
        // A commit after that sync needs a sync of its own.
        let d = g.committed();
        g.durable(d).await.unwrap();
        assert_eq!(SYNCS.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_sync_refuses_every_later_commit_without_syncing_again() {
        let g = GroupSync {
            sync: eio,
            ..GroupSync::new(Path::new("/nowhere/spool.db"))
        };
        let t = g.committed();
        let why = g.durable(t).await.unwrap_err();
        assert!(
            why.contains("spool.db-wal") && why.contains("restart"),
            "{why}"
        );
        assert_eq!(g.failed(), Some(why.as_str()));
        // A later sync could succeed and prove nothing: none is tried.
        let t = g.committed();
        assert_eq!(g.durable(t).await.unwrap_err(), why);
        assert_eq!(FAILS.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_wal_file_is_synced_with_its_directory_once_and_a_removed_one_needs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("spool.db-wal");
        assert_eq!(sync(&wal, dir.path(), None).unwrap(), None);
        std::fs::write(&wal, b"frames").unwrap();
        let inode = std::fs::metadata(&wal).unwrap().ino();
        assert_eq!(sync(&wal, dir.path(), None).unwrap(), Some(inode));
        // Known inode: the directory is not needed (a missing one is not opened).
        let gone = dir.path().join("gone");
        assert_eq!(sync(&wal, &gone, Some(inode)).unwrap(), Some(inode));
        assert!(sync(&wal, &gone, None).is_err());
    }
}
