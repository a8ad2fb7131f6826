//! Queries of the read path: filters, the opaque cursor, full-text terms.

use crate::DestinationError;
use uuid::Uuid;

/// Largest page a query may ask for.
pub const MAX_LIMIT: u32 = 1000;
/// Page size when none is asked for.
pub const DEFAULT_LIMIT: u32 = 50;

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
        if id.len() != 32 {
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
        let cursor = self.cursor.as_deref().map(Cursor::decode).transpose()?;
        Ok((limit, cursor))
    }
}

/// The words of a full-text query: runs of letters and digits, lower-cased.
/// Everything else (quotes, operators, SQL) is a separator, never syntax.
pub(crate) fn words(q: &str) -> Vec<String> {
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ] {
            assert!(Cursor::decode(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn words_never_carry_syntax() {
        assert_eq!(
            words(r#"hello "world" OR x*"#),
            ["hello", "world", "or", "x"]
        );
        assert_eq!(
            words("'; DROP TABLE spool_entries; --"),
            ["drop", "table", "spool", "entries"]
        );
        assert!(words("  ** ").is_empty());
        assert_eq!(words("Grüße 東京"), ["grüße", "東京"]);
    }
}
