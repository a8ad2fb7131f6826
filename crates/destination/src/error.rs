//! Errors at the destination boundary, classified for the delivery policy.

/// A destination error. [`DestinationError::is_transient`] drives retry policy:
/// transient errors retry the batch with backoff; anything else means the
/// destination rejects this data and the queue isolates the entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationError {
    /// The destination could not be reached or was busy: connection refused or
    /// reset, timeout, pool exhausted, serialization failure or deadlock, server
    /// starting up or shutting down, SQLITE_BUSY, disk full. Retry later.
    #[error("destination {destination} unavailable: {message}")]
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
    /// Retrying the same write later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, DestinationError::Transient { .. })
    }

    /// The data itself was refused; retrying it unchanged cannot succeed.
    pub fn is_rejection(&self) -> bool {
        matches!(self, DestinationError::Rejected { .. })
    }
}

/// Classify a sqlx error of destination `name`.
pub(crate) fn classify(name: &str, e: sqlx::Error) -> DestinationError {
    use sqlx::Error as E;
    let transient = |message: String| DestinationError::Transient {
        destination: name.to_owned(),
        message,
    };
    let rejected = |reason: String| DestinationError::Rejected {
        destination: name.to_owned(),
        index: None,
        reason,
    };
    match e {
        E::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let msg = db.message().to_owned();
            if code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
                // PostgreSQL SQLSTATE: class 22 (data exception) and 23 (integrity
                // constraint) are the data's fault; everything else — connection
                // (08), resources (53), operator intervention (57: shutdown,
                // starting up), serialization/deadlock (40), even a missing table
                // (42) — is not something a single entry can cause.
                match &code[..2] {
                    "22" | "23" => rejected(format!("{msg} (SQLSTATE {code})")),
                    _ => transient(format!("{msg} (SQLSTATE {code})")),
                }
            } else {
                // SQLite result codes (the primary code is the low byte).
                let primary = code.parse::<i32>().unwrap_or(0) & 0xff;
                match primary {
                    // CONSTRAINT, TOOBIG, MISMATCH, RANGE
                    19 | 18 | 20 | 25 => rejected(format!("{msg} (SQLite code {code})")),
                    _ => transient(format!("{msg} (SQLite code {code})")),
                }
            }
        }
        E::Encode(err) => rejected(format!("cannot encode value: {err}")),
        other => transient(other.to_string()),
    }
}
