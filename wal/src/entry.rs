//! The one `Entry` type of spool: what a producer sent, as the WAL stores it and
//! every destination receives it.

use uuid::Uuid;

/// An accepted entry. Defined once for the whole workspace: the WAL stores it,
/// the queue carries it, destinations write it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Globally unique id (UUIDv7, assigned at accept). Destinations upsert by it.
    pub id: Uuid,
    /// Source (producer namespace) the entry was posted to.
    pub source: String,
    /// Name of the destination it is delivered to.
    pub destination: String,
    /// Optional subject, for reads and filtering.
    pub subject: Option<String>,
    /// Optional producer idempotency key.
    pub idempotency_key: Option<String>,
    /// Accept time, microseconds since the Unix epoch.
    pub accepted_at_us: i64,
    /// The entry exactly as posted (JSON text).
    pub payload: Vec<u8>,
    /// The entry's embedding (finite numbers, the source's `embedding_dims`), if it
    /// carried one; delivered for vector search.
    pub embedding: Option<Vec<f32>>,
}

/// An entry together with the LSN of its ENTRY record.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEntry {
    /// LSN of the ENTRY record.
    pub lsn: u64,
    /// The entry.
    pub entry: Entry,
}

/// Longest `source` or `destination` name the format stores (a u16 length).
pub const MAX_NAME_LEN: usize = u16::MAX as usize;

impl Entry {
    /// A new entry with a fresh UUIDv7 and the current time.
    pub fn new(
        source: impl Into<String>,
        destination: impl Into<String>,
        payload: Vec<u8>,
    ) -> Self {
        Entry {
            id: Uuid::now_v7(),
            source: source.into(),
            destination: destination.into(),
            subject: None,
            idempotency_key: None,
            accepted_at_us: now_us(),
            payload,
            embedding: None,
        }
    }

    /// Bytes the ENTRY body takes in the WAL.
    pub fn encoded_len(&self) -> usize {
        16 + 8
            + 1
            + 2
            + self.source.len()
            + 2
            + self.destination.len()
            + self.subject.as_ref().map_or(0, |s| 4 + s.len())
            + self.idempotency_key.as_ref().map_or(0, |s| 4 + s.len())
            + 4
            + self.payload.len()
            + self.embedding.as_ref().map_or(0, |v| 4 + 4 * v.len())
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_micros() as i64
}
