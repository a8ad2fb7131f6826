//! # spool-wire — the JSON of spool's HTTP API, defined once
//!
//! The server serializes these and spool-client deserializes them, so neither
//! side spells a field name by hand. Query strings are typed too
//! ([`WriteParams`], [`ReadParams`], [`DeadLetterParams`]).
//!
//! ## Invariants
//! - Field names and values are SPEC "HTTP API (v1)"; a change here is a change
//!   of the contract (docs/http-api.md, docs/openapi.yaml).
//! - Payloads travel as raw JSON ([`RawValue`]): the server writes a stored
//!   payload out as it is, never through a parsed `serde_json::Value`.

use serde::{Deserialize, Serialize};
pub use serde_json::value::RawValue;
use uuid::Uuid;

/// Every error answer: `{"error","message"}` (+ `retry_after_seconds` for 429/503).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The machine-readable code (`queue_full`, `invalid_entry`, ...).
    pub error: String,
    /// What went wrong, for a human.
    pub message: String,
    /// Seconds to wait before retrying (also the `Retry-After` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

/// The state of an accepted entry in a write answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryState {
    /// In the WAL, fsynced; not (yet) confirmed delivered.
    Durable,
    /// In its destination.
    Delivered,
    /// A dead letter (see `reason`).
    Failed,
    /// A state this client does not know (from a newer server): reading an
    /// answer never fails on one.
    #[serde(other)]
    Unknown,
}

/// One entry of a write answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryAnswer {
    /// The entry's id (the original one for an idempotent replay).
    pub id: Uuid,
    /// Its WAL position on the node that accepted it.
    pub lsn: u64,
    /// Where it is.
    pub status: EntryState,
    /// Why it failed (with `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to a write (`200`/`202`), one entry per entry sent, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteAnswer {
    /// The entries.
    pub entries: Vec<EntryAnswer>,
}

/// `wait=` of a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wait {
    /// Answer once the entries are fsynced (the default).
    #[default]
    Durable,
    /// Answer once they are delivered or failed, or at `timeout_ms`.
    Delivered,
}

/// The query string of `POST /v1/{source}/entries`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteParams {
    /// What to wait for.
    #[serde(default)]
    pub wait: Wait,
    /// How long `wait=delivered` may wait (default 5000, at most 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The query string of `GET /v1/{source}/entries`. Times are RFC 3339 or Unix
/// seconds, checked by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadParams {
    /// Only this subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Full-text: every word must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Accepted at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Accepted before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Page size, 1-1000 (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// A previous page's `next_cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// An entry read back. `P` is the payload: `&RawValue` when the server writes
/// it, `Box<RawValue>` when a client reads it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEntry<P> {
    /// Its id.
    pub id: Uuid,
    /// Its WAL position on the node that accepted it.
    pub lsn: u64,
    /// Its subject.
    pub subject: Option<String>,
    /// The entry as written (JSON).
    pub payload: P,
    /// When it was accepted (RFC 3339).
    pub created_at: String,
    /// `pending`, `delivered` or `failed` (reads by id only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Why it failed (`failed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Attempts made (`failed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// When it was delivered (`delivered` only, RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
}

/// A page of a read, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<P> {
    /// The entries.
    pub entries: Vec<StoredEntry<P>>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// The query string of `GET /v1/admin/dead-letters`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterParams {
    /// Only this source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// At most this many (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// A dead letter (PERMANENT_FAILURE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The entry's id.
    pub id: Uuid,
    /// Its WAL position.
    pub lsn: u64,
    /// Its source.
    pub source: String,
    /// The destination that refused it.
    pub destination: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub reason: String,
}

/// `GET /v1/admin/dead-letters`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetters {
    /// Oldest first.
    pub dead_letters: Vec<DeadLetter>,
}

/// The body of `POST /v1/admin/dead-letters/{requeue,purge}`: exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSelect {
    /// These entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<Uuid>>,
    /// Every dead letter.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// The answer to a requeue or purge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterAnswer {
    /// How many were requeued (requeue only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeued: Option<usize>,
    /// How many were purged (purge only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged: Option<usize>,
    /// Which.
    pub ids: Vec<Uuid>,
    /// Asked-for ids that were not dead letters.
    pub not_dead_letters: Vec<Uuid>,
}

/// The body of `POST /v1/{source}/forget`: exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgetRequest {
    /// These entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<Uuid>>,
    /// Every entry with this subject accepted until now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// The answer to a forget (`DELETE /v1/{source}/entries/{id}`, `POST /v1/{source}/forget`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetAnswer {
    /// LSN of the TOMBSTONE record (durable before this answer).
    pub lsn: u64,
    /// Ids forgotten (forget by ids).
    pub forgotten: Vec<Uuid>,
    /// Ids asked for that this source never had.
    pub unknown: Vec<Uuid>,
    /// The subject forgotten (forget by subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Whether the destination has deleted them already (else it will, as soon
    /// as it is reachable; reads and searches stop finding them either way once
    /// it has).
    pub applied: bool,
    /// Rows the destination deleted (when applied).
    pub deleted: u64,
}

/// The body of `POST /v1/{source}/search`: `q`, `embedding` or both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// Text: entries holding every word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// A query vector (the source's `embedding_dims` numbers): ranked by cosine similarity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
    /// Only entries with this subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Accepted at or after (RFC 3339 or Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Accepted before (RFC 3339 or Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Hits wanted (default 10, at most 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<u32>,
}

/// The text signal of a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextSignal {
    /// Rank among the text matches (1 = best).
    pub rank: u32,
}

/// The vector signal of a hit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VectorSignal {
    /// Rank by similarity (1 = best).
    pub rank: u32,
    /// Cosine similarity to the query vector (-1..1).
    pub similarity: f32,
}

/// Which signals found a hit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Its words matched `q`.
    pub text: Option<TextSignal>,
    /// Its embedding ranked among the nearest to `embedding`.
    pub vector: Option<VectorSignal>,
}

/// One search hit. `P` is the payload, as in [`StoredEntry`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hit<P> {
    /// Its id.
    pub id: Uuid,
    /// Its WAL position on the node that accepted it.
    pub lsn: u64,
    /// Its subject.
    pub subject: Option<String>,
    /// The entry as written (JSON).
    pub payload: P,
    /// When it was accepted (RFC 3339).
    pub created_at: String,
    /// Reciprocal rank fusion over its signals (each `1 / (60 + rank)`); higher is better.
    pub score: f64,
    /// The signals that found it.
    pub signals: Signals,
}

/// `POST /v1/{source}/search`: best first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchAnswer<P> {
    /// The hits.
    pub hits: Vec<Hit<P>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_payload_goes_out_verbatim() {
        let raw: &RawValue = serde_json::from_str(r#"{"b": 1e400, "a":"\u00e9"}"#).unwrap();
        let e = StoredEntry {
            id: Uuid::nil(),
            lsn: 7,
            subject: None,
            payload: raw,
            created_at: "1970-01-01T00:00:00Z".into(),
            status: None,
            reason: None,
            attempts: None,
            delivered_at: None,
        };
        let out = serde_json::to_string(&e).unwrap();
        assert!(
            out.contains(r#""payload":{"b": 1e400, "a":"\u00e9"}"#),
            "{out}"
        );
        let back: StoredEntry<Box<RawValue>> = serde_json::from_str(&out).unwrap();
        assert_eq!(back.payload.get(), raw.get());
    }

    #[test]
    fn states_and_waits_are_lowercase() {
        assert_eq!(
            serde_json::to_string(&EntryState::Durable).unwrap(),
            r#""durable""#
        );
        let p: WriteParams = serde_json::from_str(r#"{"wait":"delivered"}"#).unwrap();
        assert_eq!(p.wait, Wait::Delivered);
    }
}
