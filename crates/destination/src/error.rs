//! Errors at the destination boundary, classified for the delivery policy.

/// A destination error, classified for the delivery policy by what caused it:
///
/// - [`Unavailable`](DestinationError::Unavailable) — the destination cannot take
///   writes now, whatever the data (unreachable, read-only, full, locked, timed
///   out, shutting down). The engine pauses and probes; **no attempt is counted**.
/// - [`Transient`](DestinationError::Transient) — a retry may succeed but the
///   cause is not known to be an outage. The engine isolates it to one entry and
///   counts attempts.
/// - [`Rejected`](DestinationError::Rejected) — an entry the destination will
///   never take. The engine isolates it and makes it a dead letter at once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// The destination cannot take writes right now, whatever the data: connection
    /// refused/reset/timed out, pool exhausted, read-only, disk full, out of
    /// memory, too many connections, locked past the timeout, statement timeout,
    /// serialization failure or deadlock, starting up or shutting down.
    #[error("destination {destination} unavailable: {message}")]
    Unavailable {
        /// Destination name.
        destination: String,
        /// What happened.
        message: String,
    },
    /// An outage that a smaller batch may get through: a statement timeout (the
    /// server's 57014 or the client deadline) or the server out of memory. The
    /// engine splits a batch on it; a single entry is treated as an outage.
    #[error("destination {destination} timed out: {message}")]
    TimedOut {
        /// Destination name.
        destination: String,
        /// What happened.
        message: String,
    },
    /// A failure of unknown cause: retry later, counting attempts.
    #[error("destination {destination} failed: {message}")]
    Transient {
        /// Destination name.
        destination: String,
        /// What happened.
        message: String,
    },
    /// The destination rejects the data. With `index`, the entry at that position
    /// of the batch is the culprit; without, some entry of the batch is (split it
    /// to find out).
    #[error("destination {destination} rejected {}: {reason}", index.map_or("the batch".to_owned(), |i| format!("entry #{i} of the batch")))]
    Rejected {
        /// Destination name.
        destination: String,
        /// Position in the batch of the rejected entry, when known.
        index: Option<usize>,
        /// Why.
        reason: String,
    },
    /// The database schema is newer than this build knows.
    #[error("destination {destination} has schema version {found}; this build knows up to {known} (upgrade spool)")]
    SchemaTooNew {
        /// Destination name.
        destination: String,
        /// Version found in the database.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// A bad query parameter (e.g. a cursor that is not one of ours).
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// Misconfiguration (bad URL, missing environment variable, unknown kind).
    #[error("destination configuration: {0}")]
    Config(String),
}

impl DestinationError {
    /// Retrying the same write later may succeed (an outage or an unknown cause).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DestinationError::Unavailable { .. }
                | DestinationError::TimedOut { .. }
                | DestinationError::Transient { .. }
        )
    }

    /// The destination as a whole cannot take writes now: no entry is to blame.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            DestinationError::Unavailable { .. } | DestinationError::TimedOut { .. }
        )
    }

    /// An outage a smaller batch may get through (a timeout, out of memory).
    pub fn is_timeout(&self) -> bool {
        matches!(self, DestinationError::TimedOut { .. })
    }

    /// The same error, as an outage: for failures outside any entry's control
    /// (a migration that could not run).
    pub(crate) fn into_outage(self) -> DestinationError {
        match self {
            DestinationError::Rejected {
                destination,
                reason: message,
                ..
            }
            | DestinationError::Transient {
                destination,
                message,
            } => DestinationError::Unavailable {
                destination,
                message,
            },
            other => other,
        }
    }

    /// The data itself was refused; retrying it unchanged cannot succeed.
    pub fn is_rejection(&self) -> bool {
        matches!(self, DestinationError::Rejected { .. })
    }
}

/// Classify a sqlx error of destination `name` (see [`DestinationError`]).
pub(crate) fn classify(name: &str, e: sqlx::Error) -> DestinationError {
    use sqlx::Error as E;
    let destination = name.to_owned();
    match e {
        E::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let msg = db.message().to_owned();
            let class = if code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
                postgres_class(&code)
            } else {
                sqlite_class(&code)
            };
            let what = if code.len() == 5 {
                format!("{msg} (SQLSTATE {code})")
            } else {
                format!("{msg} (SQLite code {code})")
            };
            match class {
                Class::Timeout => DestinationError::TimedOut {
                    destination,
                    message: what,
                },
                Class::Outage => DestinationError::Unavailable {
                    destination,
                    message: what,
                },
                Class::Entry => DestinationError::Rejected {
                    destination,
                    index: None,
                    reason: what,
                },
                Class::Unknown => DestinationError::Transient {
                    destination,
                    message: what,
                },
            }
        }
        E::Encode(err) => DestinationError::Rejected {
            destination,
            index: None,
            reason: format!("cannot encode value: {err}"),
        },
        // The connection itself: I/O, TLS, pool timeout or closed, a crashed
        // connection worker, a protocol error from a half-dead server.
        E::Io(_)
        | E::Tls(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed
        | E::Protocol(_) => DestinationError::Unavailable {
            destination,
            message: e.to_string(),
        },
        other => DestinationError::Transient {
            destination,
            message: other.to_string(),
        },
    }
}

/// Who is to blame for a database error.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// The destination as a whole, but a smaller batch may pass (no attempt).
    Timeout,
    /// The destination as a whole (no attempt counted).
    Outage,
    /// The entry (isolate it; a dead letter).
    Entry,
    /// Not known: retried, attempts counted.
    Unknown,
}

/// PostgreSQL SQLSTATE → class. A statement timeout (57014) and out of memory
/// (53200) are outages a smaller batch may get through. Data exceptions (22),
/// integrity violations (23)
/// and program limits (54: "string is too long for tsvector", index row too big)
/// come from an entry. Connection (08), read-only transaction (25006), resources
/// (53: disk full, out of memory, too many connections), lock not available
/// (55P03), operator intervention (57: shutdown, statement timeout), system errors
/// (58), serialization/deadlock (40), authorization (28, 42501), a missing database
/// (3D000) or table (42P01) come from the destination.
fn postgres_class(code: &str) -> Class {
    if matches!(code, "57014" | "53200") {
        return Class::Timeout;
    }
    match &code[..2] {
        "22" | "23" | "54" => Class::Entry,
        "08" | "53" | "57" | "58" | "40" | "28" => Class::Outage,
        _ => match code {
            "25006" | "55P03" | "55006" | "42501" | "3D000" | "42P01" => Class::Outage,
            _ => Class::Unknown,
        },
    }
}

/// SQLite result code (the primary code is the low byte) → class.
fn sqlite_class(code: &str) -> Class {
    match code.parse::<i32>().unwrap_or(0) & 0xff {
        // CONSTRAINT, TOOBIG, MISMATCH, RANGE
        19 | 18 | 20 | 25 => Class::Entry,
        // PERM, BUSY, LOCKED, NOMEM, READONLY, INTERRUPT, IOERR, CORRUPT, FULL,
        // CANTOPEN, PROTOCOL, AUTH, NOTADB
        3 | 5 | 6 | 7 | 8 | 9 | 10 | 11 | 13 | 14 | 15 | 23 | 26 => Class::Outage,
        _ => Class::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_codes_are_classified_by_who_is_to_blame() {
        for c in ["22P02", "23505", "23514", "54000", "22021"] {
            assert_eq!(postgres_class(c), Class::Entry, "{c}");
        }
        for c in [
            "08006", "25006", "53100", "53300", "57P01", "57P03", "55P03", "40001", "40P01",
            "58030",
        ] {
            assert_eq!(postgres_class(c), Class::Outage, "{c}");
        }
        for c in ["57014", "53200"] {
            assert_eq!(postgres_class(c), Class::Timeout, "{c}");
        }
        assert_eq!(postgres_class("XX000"), Class::Unknown);
    }

    #[test]
    fn sqlite_codes_are_classified_by_who_is_to_blame() {
        // Extended codes carry the primary code in the low byte.
        for c in ["5", "517", "6", "8", "1032", "10", "13", "14"] {
            assert_eq!(sqlite_class(c), Class::Outage, "{c}");
        }
        for c in ["19", "1555", "2067", "18", "20", "25"] {
            assert_eq!(sqlite_class(c), Class::Entry, "{c}");
        }
        assert_eq!(sqlite_class("1"), Class::Unknown);
    }
}
