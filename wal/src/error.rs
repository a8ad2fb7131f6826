//! The WAL's error type.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong in the WAL, with the facts policy needs. Cheap to
/// clone: one failed group write answers every appender of the group with it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// An I/O error other than running out of space.
    #[error("WAL I/O error on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The filesystem is full (ENOSPC/EDQUOT). Nothing of the failed append
    /// remains on disk; appends work again once space returns.
    #[error("no space left on the WAL device ({path})")]
    NoSpace {
        /// File that could not be written.
        path: PathBuf,
    },
    /// `wal.max_bytes` is reached and no segment can be released yet.
    #[error("WAL quota exceeded: {used} bytes in use, limit {limit}")]
    QuotaExceeded {
        /// Bytes of all segments.
        used: u64,
        /// The configured quota.
        limit: u64,
    },
    /// A record larger than the configured limit.
    #[error("record of {len} bytes exceeds the WAL record limit of {limit} bytes")]
    RecordTooLarge {
        /// Encoded body size.
        len: usize,
        /// Configured limit.
        limit: usize,
    },
    /// A field does not fit the format (e.g. a source name over 65535 bytes).
    #[error("invalid record: {0}")]
    InvalidRecord(&'static str),
    /// Damaged data that is not a torn tail.
    #[error("corrupt WAL: segment {segment}, offset {offset}: {reason}")]
    Corrupt {
        /// Segment file name.
        segment: String,
        /// Byte offset of the bad record or header in that segment.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An earlier fdatasync failed; this handle refuses all further writes.
    #[error("WAL is unusable after an fsync failure ({0}); restart to recover from disk")]
    Poisoned(String),
    /// The WAL was closed.
    #[error("WAL is closed")]
    Closed,
    /// Another process holds the directory.
    #[error("WAL directory {dir} is in use by another process (lock file {dir}/LOCK)")]
    Locked {
        /// The WAL directory.
        dir: PathBuf,
    },
    /// A configuration value is out of range.
    #[error("invalid WAL configuration: {0}")]
    Config(String),
}

impl WalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> WalError {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => WalError::NoSpace { path },
            _ => WalError::Io {
                path,
                source: Arc::new(source),
            },
        }
    }

    /// The disk is full or the quota reached: the caller should answer "unavailable,
    /// retry later"; nothing was written.
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            WalError::NoSpace { .. } | WalError::QuotaExceeded { .. }
        )
    }

    /// Data on disk is damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, WalError::Corrupt { .. })
    }

    /// A later attempt may succeed without operator action.
    pub fn is_retryable(&self) -> bool {
        self.is_out_of_space() || matches!(self, WalError::Io { .. })
    }
}

/// Result alias of this crate.
pub type Result<T, E = WalError> = std::result::Result<T, E>;
