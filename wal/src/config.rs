//! WAL configuration (`[wal]` of spool.toml, minus `dir`).

use crate::error::WalError;
use std::str::FromStr;
use std::time::Duration;

/// When appends are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// fdatasync before an append resolves (group commit). The default: an
    /// acknowledged entry survives kill -9 and power loss.
    Always,
    /// An append resolves once written to the OS; fdatasync at most this often.
    /// Survives kill -9; power loss may lose up to the interval.
    Interval(Duration),
    /// Never fdatasync on the append path (segments are still synced when sealed).
    /// Survives kill -9; power loss may lose everything not yet sealed.
    Never,
}

impl FromStr for SyncMode {
    type Err = WalError;

    fn from_str(s: &str) -> Result<Self, WalError> {
        match s {
            "always" => Ok(SyncMode::Always),
            "never" => Ok(SyncMode::Never),
            _ => {
                let Some(d) = s.strip_prefix("interval:") else {
                    return Err(WalError::Config(format!(
                        "sync must be \"always\", \"interval:<duration>\" or \"never\", got {s:?}"
                    )));
                };
                let d = humantime::parse_duration(d).map_err(|e| {
                    WalError::Config(format!("sync interval {d:?} is not a duration: {e}"))
                })?;
                if d.is_zero() {
                    return Err(WalError::Config("sync interval must be above zero".into()));
                }
                Ok(SyncMode::Interval(d))
            }
        }
    }
}

/// What recovery does with damage that is not a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCorruption {
    /// Refuse to open, naming segment and offset (the default).
    #[default]
    Stop,
    /// Skip the damaged bytes, count the loss, and go on.
    Skip,
}

impl FromStr for OnCorruption {
    type Err = WalError;

    fn from_str(s: &str) -> Result<Self, WalError> {
        match s {
            "stop" => Ok(OnCorruption::Stop),
            "skip" => Ok(OnCorruption::Skip),
            _ => Err(WalError::Config(format!(
                "on_corruption must be \"stop\" or \"skip\", got {s:?}"
            ))),
        }
    }
}

/// Tuning of a WAL.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Rotate to a new segment once the current one reaches this size.
    pub segment_bytes: u64,
    /// Durability of appends.
    pub sync: SyncMode,
    /// How long delivered history is kept for replay.
    pub retention: Duration,
    /// Quota of all segments together; `None` for no quota.
    pub max_bytes: Option<u64>,
    /// Recovery policy for mid-log damage.
    pub on_corruption: OnCorruption,
    /// Largest record body accepted by `append` (checkpoints are exempt).
    pub max_record_bytes: usize,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_bytes: 64 << 20,
            sync: SyncMode::Always,
            retention: Duration::from_secs(24 * 3600),
            max_bytes: None,
            on_corruption: OnCorruption::Stop,
            max_record_bytes: 16 << 20,
        }
    }
}

impl WalConfig {
    pub(crate) fn validate(&self) -> Result<(), WalError> {
        if self.segment_bytes < 4096 {
            return Err(WalError::Config(
                "segment_bytes must be at least 4KiB".into(),
            ));
        }
        if self.max_record_bytes == 0 || self.max_record_bytes > crate::format::MAX_FRAME_BODY {
            return Err(WalError::Config(
                "max_record_bytes must be between 1 byte and 1GiB".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_modes_parse() {
        assert_eq!("always".parse::<SyncMode>().unwrap(), SyncMode::Always);
        assert_eq!("never".parse::<SyncMode>().unwrap(), SyncMode::Never);
        assert_eq!(
            "interval:10ms".parse::<SyncMode>().unwrap(),
            SyncMode::Interval(Duration::from_millis(10))
        );
        for bad in ["", "sometimes", "interval:", "interval:0s", "interval:fast"] {
            assert!(bad.parse::<SyncMode>().is_err(), "{bad:?} accepted");
        }
    }
}
