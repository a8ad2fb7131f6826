//! # spool-wal — the durable, checksummed, group-committed write-ahead log
//!
//! Every entry spool accepts is an ENTRY record here before the producer hears
//! "accepted"; every later change of its status is another record appended after
//! it. Nothing is ever rewritten in place. The byte format is in
//! `docs/wal-format.md` (format version [`FORMAT_VERSION`]); a unit test keeps the
//! constants of [`format`] and that document in step.
//!
//! ## Invariants
//! - **Ack means durable.** Under [`SyncMode::Always`] an [`Wal::append`] resolves
//!   only after the `fdatasync` that covers its records returned.
//! - **Group commit.** One writer thread owns the active segment. Whatever appends
//!   are waiting when it is free form one group: one `write`, one `fdatasync`.
//! - **LSNs** are `u64`, strictly increasing across segments. An LSN that was
//!   acknowledged or visible is never handed out again — not after a failed write,
//!   not after a torn tail is cut off. (LSNs of refused appends may be reused after
//!   a restart: nobody was ever told them.)
//! - **Every record is checksummed** (CRC32 over kind, LSN and body) and **never
//!   spans segments**. Segment headers carry their own CRC.
//! - **Only the newest segment can have a torn tail.** A segment is fdatasynced
//!   before the next one is created, and a new segment (header + checkpoint) is
//!   fdatasynced, with its directory, before anything is appended to it.
//! - **No entry is both refused and durable.** A failed write is cut back to
//!   where it began and the cut is fdatasynced; only that write's appenders get the
//!   error (`NoSpace` for a full disk), and the WAL works again once space returns.
//!   Every successful fdatasync answers all it covered at once. A failed
//!   `fdatasync` refuses every append not yet answered and poisons the handle.
//! - **The visible LSN never runs ahead of what is durable**, and a record takes
//!   effect in the state only once it is.
//! - **A crash alone never stops startup.** Each frame says whether everything
//!   before it was synced when it was written; damage that no later such frame
//!   vouches for is the last unsynced write — a torn tail, cut off and reported.
//! - **Recovery reads little.** Every rotated segment begins with a CHECKPOINT of
//!   the undelivered set; recovery starts at the newest one and reads older
//!   segments only at the offsets the checkpoint names.
//! - **Damage is never silent.** A torn tail of the newest segment is cut off and
//!   reported; damage anywhere else stops [`Wal::open`] with segment and offset,
//!   unless `on_corruption = "skip"`, which skips it and counts the loss.
//! - **Retention never drops a pending entry or a dead letter.** A sealed segment
//!   goes only when every entry in it is delivered, and it is older than the
//!   retention (or the quota forces it) — after the markers that freed it are synced.
//! - **All segment writes go through one seam** ([`io::WalIo`]), so tests inject
//!   failing writes, syncs and power loss (feature `fault-injection`, [`fault`]).
//!
//! ## Files
//! ```text
//! <dir>/LOCK                        flock'ed by the process that has the WAL open
//! <dir>/00000000000000000001.wal    segment: header (32 B) + frames; named by first LSN
//! <dir>/00000000000000512345.wal    rotated segment: header + CHECKPOINT + frames
//! ```
//!
//! ## Example
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), spool_wal::WalError> {
//! use spool_wal::{Entry, Wal, WalConfig};
//! let dir = tempfile::tempdir().unwrap();
//! let wal = Wal::open(dir.path(), WalConfig::default())?;
//! let lsns = wal.append(&[Entry::new("agents", "main", br#"{"text":"hi"}"#.to_vec())]).await?;
//! assert_eq!(wal.status().pending, 1);
//! wal.mark_delivered(&lsns).await?;
//! assert_eq!(wal.status().pending, 0);
//! wal.close();
//! # Ok(()) }
//! ```

mod compact;
pub mod config;
pub mod entry;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod forget;
pub mod format;
mod inbox;
pub mod inspect;
pub mod io;
mod read;
pub mod reader;
mod recovery;
mod segment;
mod state;
mod tracked;
mod wal;
mod writer;

pub use compact::CompactReport;
pub use config::{OnCorruption, SyncMode, WalConfig};
pub use entry::{now_us, Entry, LoggedEntry};
pub use error::{Result, WalError};
pub use format::{Kind, Record, Tombstone, FORMAT_VERSION};
pub use read::ReadBack;
pub use reader::Reader;
pub use recovery::{RecoveryReport, TornTail};
pub use state::Tracked;
pub use wal::{DeadLetter, EntryStatus, RetentionReport, Wal, WalHooks, WalObserver, WalStatus};

#[doc(hidden)]
/// Entry points for the fuzz targets; not a stable API.
pub mod fuzzing {
    use crate::config::OnCorruption;
    use crate::format::{self, FrameParse};

    /// Decode every frame and body in `data` as the scanner would.
    pub fn decode_bytes(data: &[u8]) {
        let _ = format::decode_segment_header(data);
        let mut pos = 0;
        while pos < data.len() {
            match format::parse_frame(&data[pos..]) {
                FrameParse::Ok(f) => {
                    let _ = format::decode_record(f.kind, f.body);
                    pos += f.len();
                }
                _ => pos += 1,
            }
        }
    }

    /// Recover a directory holding the given segment images, both policies.
    pub fn recover_dir(dir: &std::path::Path) {
        for policy in [OnCorruption::Stop, OnCorruption::Skip] {
            let _ = crate::recovery::recover(dir, policy, None);
        }
        let _ = crate::inspect::verify(dir);
    }
}
