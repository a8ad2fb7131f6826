//! # spool-destination — where entries end up, and where agents read them back
//!
//! A [`Destination`] writes batches of [`LoggedEntry`] idempotently and serves the
//! read path (by id; by source with subject, full-text, time range and a cursor).
//! Two implementations: [`SqliteDestination`] (the embedded default) and
//! [`PostgresDestination`]. [`open`] builds one from a [`DestinationConfig`].
//!
//! ## Invariants
//! - **Idempotent writes.** Rows are keyed by the entry id, and keyed entries are
//!   unique by (source, idempotency_key); writing an entry again (a redelivery
//!   after a crash, or a retry another node took) never makes a second row and
//!   never changes the first: the first write wins, the rest are counted.
//! - **Opening never needs the database.** [`open`] checks the configuration
//!   only; connections are made, and the schema migrated, at the first use, so
//!   spool starts while a destination is down.
//! - **A batch is one transaction.** It is written whole or not at all.
//! - **Every error is classified by who is to blame** ([`DestinationError`]): an
//!   outage (`Unavailable`: retry, never an attempt), an unknown cause
//!   (`Transient`: retry, counting attempts), or the entry (`Rejected`: it will
//!   never go in). Entries a destination would reject are found before writing and named
//!   by their index in the batch; a rejection without an index means "some entry
//!   of this batch" and the caller splits the batch to find it.
//! - **Schema versioned.** Migrations run forward at open; a database whose schema
//!   is newer than this build is refused with [`DestinationError::SchemaTooNew`].
//! - **Sources are isolated.** Every read is scoped to one source.
//! - **SQLite commits durably** (`journal_mode=WAL`, `synchronous=FULL`): spool's
//!   own WAL is truncated on the strength of the destination's commit.

mod error;
mod postgres;
mod query;
mod recall;
mod sqlite;
mod validate;
mod vectors;
mod words;

pub use error::DestinationError;
pub use postgres::PostgresDestination;
pub use query::{Query, DEFAULT_LIMIT, DEFAULT_PAGE_BYTES, MAX_LIMIT, MAX_TIME_US, MIN_TIME_US};
pub use recall::{Hit, Search, DEFAULT_K, MAX_K, RRF_K};
pub use spool_wal::{Entry, LoggedEntry, Tombstone};
pub use sqlite::SqliteDestination;
pub use validate::{check_payload, check_text, Embedding, Field, InvalidEntry, PayloadFields};
pub use words::{payload_words, words, MAX_INDEXED_BYTES, MAX_QUERY_WORDS, MAX_WORD_BYTES};

use async_trait::async_trait;
use std::sync::Arc;
use uuid::Uuid;

/// Result alias of this crate.
pub type Result<T, E = DestinationError> = std::result::Result<T, E>;

/// An entry as a destination holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEntry {
    /// LSN of its WAL record (of the spool node that accepted it).
    pub lsn: u64,
    /// The entry; `payload` is JSON text (Postgres returns its normalized `jsonb` form).
    pub entry: Entry,
    /// When the destination committed it (µs since the epoch).
    pub delivered_at_us: i64,
}

/// One page of a [`Query`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// Entries, newest first.
    pub entries: Vec<StoredEntry>,
    /// Cursor for the next page; `None` when this page is the last.
    pub next_cursor: Option<String>,
}

/// Where entries are delivered. Implementations are cheap to share (`Arc<dyn Destination>`).
#[async_trait]
pub trait Destination: Send + Sync + 'static {
    /// The configured name.
    fn name(&self) -> &str;

    /// Write a batch in one transaction, inserting what is new (first write wins).
    /// Answers how many entries of the batch were already held: a redelivery of
    /// the same id, or a keyed entry whose (source, idempotency_key) another
    /// spool node stored first.
    async fn write_batch(&self, batch: &[LoggedEntry]) -> Result<u64>;

    /// One entry of `source` by id.
    async fn get(&self, source: &str, id: Uuid) -> Result<Option<StoredEntry>>;

    /// Which of `ids` are stored for `source` (one query in the real
    /// destinations; this default asks one by one).
    async fn known(&self, source: &str, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        let mut found = Vec::new();
        for id in ids {
            if self.get(source, *id).await?.is_some() {
                found.push(*id);
            }
        }
        Ok(found)
    }

    /// A page of one source's entries, newest first.
    async fn query(&self, q: &Query) -> Result<Page>;

    /// One source's entries ranked by text, vector similarity, or both fused.
    async fn search(&self, s: &Search) -> Result<Vec<Hit>>;

    /// Delete the entries a tombstone forgets (of its source: those it names by
    /// id, and with its subject those accepted at or before its time). Answers
    /// how many rows went; deleting what is not there is not an error.
    async fn forget(&self, t: &Tombstone) -> Result<u64>;

    /// Is the destination reachable and writable? The first successful contact
    /// migrates the schema.
    async fn health(&self) -> Result<()>;

    /// Close connections; later calls fail.
    async fn close(&self);
}

/// The `kind` of a `[[destination]]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A SQLite database file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// `[[destination]]` of spool.toml.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Name sources refer to.
    pub name: String,
    /// Backend.
    pub kind: Kind,
    /// SQLite file (kind = "sqlite").
    #[serde(default)]
    pub path: Option<String>,
    /// Connection URL (kind = "postgres"); `env:NAME` reads it from the environment.
    #[serde(default)]
    pub url: Option<String>,
    /// Connections in the pool (Postgres) / readers (SQLite).
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// Longest one statement may take — Postgres: `statement_timeout` and a
    /// client deadline (default 30 s); SQLite: the busy timeout waiting for
    /// another writer's lock (default 5 s). Past it the destination counts as down.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<std::time::Duration>,
}

/// Default of [`DestinationConfig::timeout`] for Postgres.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default of [`DestinationConfig::timeout`] for SQLite (its busy timeout).
pub const DEFAULT_SQLITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolve an `env:NAME` value.
pub fn resolve_env(value: &str) -> Result<String> {
    match value.strip_prefix("env:") {
        Some(var) => std::env::var(var).map_err(|_| {
            DestinationError::Config(format!("environment variable {var} is not set"))
        }),
        None => Ok(value.to_owned()),
    }
}

/// The destination a config describes. Checks the configuration only: the
/// database is contacted (and migrated) at the first use.
pub fn open(cfg: &DestinationConfig) -> Result<Arc<dyn Destination>> {
    let need = |v: &Option<String>, key: &str| {
        v.as_deref().map(resolve_env).transpose()?.ok_or_else(|| {
            DestinationError::Config(format!(
                "destination {:?} of kind {:?} needs `{key}`",
                cfg.name, cfg.kind
            ))
        })
    };
    Ok(match cfg.kind {
        Kind::Sqlite => {
            let path = need(&cfg.path, "path")?;
            Arc::new(SqliteDestination::open(
                &cfg.name,
                path.as_ref(),
                cfg.pool_size,
                cfg.timeout.unwrap_or(DEFAULT_SQLITE_TIMEOUT),
            )?)
        }
        Kind::Postgres => {
            let url = need(&cfg.url, "url")?;
            Arc::new(PostgresDestination::open(
                &cfg.name,
                &url,
                cfg.pool_size,
                cfg.timeout.unwrap_or(DEFAULT_TIMEOUT),
            )?)
        }
    })
}

/// Check each entry before writing, so a poison entry is named by its index
/// instead of failing the whole batch ([`check_payload`]: one streaming pass,
/// no `serde_json::Value`). `no_nul` adds Postgres' rule (no NUL in text).
pub(crate) fn screen(name: &str, batch: &[LoggedEntry], no_nul: bool) -> Result<()> {
    for (i, le) in batch.iter().enumerate() {
        let e = &le.entry;
        check_payload(&e.payload, no_nul)
            .map(drop)
            .and_then(|()| check_text("source", Some(&e.source), no_nul))
            .and_then(|()| check_text("subject", e.subject.as_deref(), no_nul))
            .and_then(|()| check_text("idempotency_key", e.idempotency_key.as_deref(), no_nul))
            .and_then(|()| match &e.embedding {
                Some(v) if v.is_empty() || v.iter().any(|x| !x.is_finite()) => Err(InvalidEntry {
                    field: "embedding",
                    reason: "must be a non-empty array of finite numbers".into(),
                }),
                _ => Ok(()),
            })
            .map_err(|invalid| DestinationError::Rejected {
                destination: name.to_owned(),
                index: Some(i),
                reason: invalid.to_string(),
            })?;
    }
    Ok(())
}

/// Rows per words-backfill statement (both destinations): at most this many
/// payloads in memory at once.
pub(crate) const BACKFILL_ROWS: i64 = 100;

/// A page's first step: the candidates in page order, each (id, accepted at,
/// payload bytes).
pub(crate) type Candidates = Vec<(uuid::Uuid, i64, i64)>;

/// A page's second step: the entries read by id (in any order, some perhaps
/// gone since), put in the candidates' order; the cursor continues after the
/// last candidate that fit, even if that one is gone, so a page emptied by a
/// concurrent delete never ends the listing.
pub(crate) fn page(
    candidates: &Candidates,
    fit: usize,
    limit: u32,
    mut entries: Vec<StoredEntry>,
) -> Page {
    let order: std::collections::HashMap<uuid::Uuid, usize> = candidates[..fit]
        .iter()
        .enumerate()
        .map(|(i, c)| (c.0, i))
        .collect();
    entries.retain(|e| order.contains_key(&e.entry.id));
    entries.sort_by_key(|e| order[&e.entry.id]);
    let more = fit < candidates.len() || candidates.len() == limit as usize;
    let next_cursor = candidates[..fit]
        .last()
        .filter(|_| more)
        .map(|&(id, created_us, _)| query::Cursor { created_us, id }.encode());
    Page {
        entries,
        next_cursor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page whose entries were all deleted between its two steps still
    /// continues the listing after them (it does not end it).
    #[test]
    fn a_page_emptied_between_its_steps_still_has_a_cursor() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let candidates: Candidates = ids.iter().map(|&id| (id, 1_000, 10)).collect();
        let p = page(&candidates, 2, 3, Vec::new());
        assert!(p.entries.is_empty());
        let cursor = query::Cursor::decode(p.next_cursor.as_deref().unwrap()).unwrap();
        assert_eq!(cursor.id, ids[1]);
        // The last page (fewer candidates than the limit, all fit): no cursor.
        assert!(page(&candidates, 3, 10, Vec::new()).next_cursor.is_none());
    }
}
