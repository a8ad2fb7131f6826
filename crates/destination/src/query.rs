//! Queries of the read path: filters, time bounds, the opaque cursor.

use crate::DestinationError;
use uuid::Uuid;

/// Largest page a query may ask for.
pub const MAX_LIMIT: u32 = 1000;
/// Page size when none is asked for.
pub const DEFAULT_LIMIT: u32 = 50;

/// Earliest time a query may name: 0001-01-01T00:00:00Z, in µs since the epoch.
pub const MIN_TIME_US: i64 = -62_135_596_800_000_000;
/// Latest time a query may name: 9999-12-31T23:59:59.999999Z.
pub const MAX_TIME_US: i64 = 253_402_300_799_999_999;

/// A read of one source's entries, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Source whose entries are read (always required: sources never see each other's data).
    pub source: String,
    /// Only entries with this subject.
    pub subject: Option<String>,
    /// Full-text search: entries whose payload string values contain every word.
    pub q: Option<String>,
    /// Accepted at or after (µs since the epoch).
    pub since_us: Option<i64>,
    /// Accepted before (µs since the epoch).
    pub until_us: Option<i64>,
    /// Page size (1..=1000).
    pub limit: u32,
    /// Continue after this cursor (from a previous page's `next_cursor`).
    pub cursor: Option<String>,
    /// Payload bytes a page may hold (0: [`DEFAULT_PAGE_BYTES`]); the first
    /// entry is always included, however large. A page cut short by bytes has a
    /// `next_cursor`, so a read's memory is bounded by this, not by `limit`.
    pub max_bytes: usize,
}

/// Payload bytes of a page when the query does not say.
pub const DEFAULT_PAGE_BYTES: usize = 8 << 20;

/// How many of a page's candidate rows (their payload lengths, in order) fit in
/// `max_bytes`: at least one.
pub(crate) fn fitting(lens: &[i64], max_bytes: usize) -> usize {
    let max = if max_bytes == 0 {
        DEFAULT_PAGE_BYTES
    } else {
        max_bytes
    } as i64;
    let mut total = 0i64;
    let n = lens
        .iter()
        .take_while(|&&len| {
            let fits = total < max && total.saturating_add(len) <= max;
            total = total.saturating_add(len);
            fits
        })
        .count();
    n.max(1).min(lens.len())
}

/// Position after which the next page starts: (accepted_at, id) of the last entry
/// of the previous page. Keyset pagination: stable under concurrent inserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub created_us: i64,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{:x}.{}", self.created_us, self.id.simple())
    }

    pub fn decode(s: &str) -> Result<Cursor, DestinationError> {
        let bad = || {
            DestinationError::InvalidQuery(format!(
                "cursor {s:?} is not a cursor this server issued"
            ))
        };
        let (t, id) = s.split_once('.').ok_or_else(bad)?;
        let created_us = i64::from_str_radix(t, 16).map_err(|_| bad())?;
        if id.len() != 32 || !(MIN_TIME_US..=MAX_TIME_US).contains(&created_us) {
            return Err(bad());
        }
        let id = Uuid::try_parse(id).map_err(|_| bad())?;
        Ok(Cursor { created_us, id })
    }
}

impl Query {
    /// Check limits and decode the cursor.
    pub(crate) fn checked(&self) -> Result<(u32, Option<Cursor>), DestinationError> {
        let limit = if self.limit == 0 {
            DEFAULT_LIMIT
        } else {
            self.limit
        };
        if limit > MAX_LIMIT {
            return Err(DestinationError::InvalidQuery(format!(
                "limit {limit} is above the maximum of {MAX_LIMIT}"
            )));
        }
        for (name, t) in [("since", self.since_us), ("until", self.until_us)] {
            if let Some(t) = t.filter(|t| !(MIN_TIME_US..=MAX_TIME_US).contains(t)) {
                return Err(DestinationError::InvalidQuery(format!(
                    "{name} ({t} µs since the epoch) is outside the years 1-9999"
                )));
            }
        }
        if self.subject.as_deref().is_some_and(|s| s.contains('\0')) {
            return Err(DestinationError::InvalidQuery(
                "subject contains a NUL character (U+0000), which no stored subject has".into(),
            ));
        }
        let cursor = self.cursor.as_deref().map(Cursor::decode).transpose()?;
        Ok((limit, cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_holds_what_fits_and_always_one() {
        assert_eq!(fitting(&[], 10), 0);
        assert_eq!(fitting(&[100], 10), 1);
        assert_eq!(fitting(&[4, 4, 4], 10), 2);
        assert_eq!(fitting(&[5, 5, 1], 10), 2);
        assert_eq!(fitting(&[1, 1, 1], 0), 3);
    }

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = Cursor {
            created_us: 1_700_000_000_123_456,
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in [
            "",
            ".",
            "zz.00",
            "1.",
            "1.not-a-uuid",
            "1.'; DROP TABLE x; --",
            "-7fffffffffffffff.0190a1b2c3d4e5f60718293a4b5c6d7e",
            "7fffffffffffffff.0190a1b2c3d4e5f60718293a4b5c6d7e",
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?} accepted");
        }
    }
}
