//! The embedded SQLite destination.
//!
//! One writer connection (SQLite has one writer at a time anyway; a single
//! connection avoids SQLITE_BUSY between our own writers) and a small pool of
//! readers, all in WAL journal mode with `synchronous=FULL`. A batch is one
//! transaction of multi-row `INSERT … ON CONFLICT DO NOTHING` statements (the
//! conflict is the id, or the unique (source, idempotency_key)). Checkpoints run
//! on a connection of their own, beside the writer. Connections are
//! made, and the schema migrated, at the first use, so a database that cannot be
//! opened yet (locked, read-only, disk full) is an outage, not a failed start. A
//! contentless FTS5 table indexes the words of each payload's string values
//! ([`crate::words`]), inserted with the rows; its tokenizer only splits at
//! spaces, so what is indexed is exactly what Rust computed.

use crate::error::classify;
use crate::query::{fitting, Query};
use crate::recall::{to_le_bytes, Hit, Search};
use crate::vectors::VectorIndex;

mod recall;
use crate::words::{fts5_query, payload_words, query_words};
use crate::{
    page, screen, Candidates, Destination, DestinationError, Page, Result, StoredEntry,
    BACKFILL_ROWS,
};
use async_trait::async_trait;
use futures_util::TryStreamExt;
use spool_wal::{Entry, LoggedEntry, Tombstone};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Executor, QueryBuilder, Row, Sqlite};
use std::path::Path;
use std::time::Duration;
use tokio::sync::OnceCell;
use uuid::Uuid;

/// Schema migrations, in order; the schema version is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: entries, read indexes, full-text index over payload string values.
    r#"
    CREATE TABLE spool_entries (
        id              TEXT PRIMARY KEY NOT NULL,
        lsn             INTEGER NOT NULL,
        source          TEXT NOT NULL,
        subject         TEXT,
        idempotency_key TEXT,
        payload         TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        delivered_at    INTEGER NOT NULL
    );
    CREATE INDEX spool_entries_by_subject ON spool_entries (source, subject, created_at, id);
    CREATE INDEX spool_entries_by_time ON spool_entries (source, created_at, id);
    CREATE VIRTUAL TABLE spool_entries_fts USING fts5(body, content='', detail=none, columnsize=0);
    CREATE TRIGGER spool_entries_fts_insert AFTER INSERT ON spool_entries BEGIN
        INSERT INTO spool_entries_fts (rowid, body)
        SELECT new.rowid, group_concat(value, ' ') FROM json_tree(new.payload) WHERE type = 'text';
    END;
    "#,
    // 2: keyed entries are unique per source. Of copies stored before this, the
    // first accepted stays; the others move to spool_entries_displaced (kept, not
    // deleted) and leave the contentless full-text index.
    r#"
    CREATE TABLE spool_entries_displaced AS SELECT * FROM spool_entries WHERE 0;
    CREATE TEMP TABLE spool_dup_keys AS
        SELECT r FROM (
            SELECT rowid AS r, row_number() OVER (
                PARTITION BY source, idempotency_key ORDER BY created_at, id) AS n
              FROM spool_entries WHERE idempotency_key IS NOT NULL)
         WHERE n > 1;
    INSERT INTO spool_entries_displaced
        SELECT * FROM spool_entries WHERE rowid IN (SELECT r FROM spool_dup_keys);
    INSERT INTO spool_entries_fts (spool_entries_fts, rowid, body)
        SELECT 'delete', e.rowid,
               (SELECT group_concat(value, ' ') FROM json_tree(e.payload) WHERE type = 'text')
          FROM spool_entries e WHERE e.rowid IN (SELECT r FROM spool_dup_keys);
    DELETE FROM spool_entries WHERE rowid IN (SELECT r FROM spool_dup_keys);
    DROP TABLE spool_dup_keys;
    CREATE UNIQUE INDEX spool_entries_by_key ON spool_entries (source, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    "#,
    // 3: full-text words computed by spool (crate::words), the same for the
    // index and for queries in every script; the tokenizer only splits at
    // spaces (every character category is a token character). Rows already
    // stored are indexed by `backfill_words` in the same transaction.
    r#"
    DROP TRIGGER spool_entries_fts_insert;
    DROP TABLE spool_entries_fts;
    CREATE VIRTUAL TABLE spool_entries_words USING fts5(words, content='', detail=none,
        columnsize=0, tokenize="unicode61 categories 'L* M* N* P* S* Z* C*' separators ' ' remove_diacritics 0");
    "#,
    // 4: embeddings (little-endian f32s), for vector recall by exact scan.
    r#"
    ALTER TABLE spool_entries ADD COLUMN embedding BLOB;
    "#,
];

/// The migration after which existing rows' words are indexed from Rust.
const WORDS_MIGRATION: usize = 3;

/// Rows per INSERT statement (10 parameters each; SQLite allows 32766).
const ROWS_PER_STATEMENT: usize = 500;

/// The SQLite destination.
pub struct SqliteDestination {
    name: String,
    writer: SqlitePool,
    readers: SqlitePool,
    /// Set once the schema is migrated (at the first successful use).
    migrated: OnceCell<()>,
    /// Embeddings in memory, per source searched by vector.
    vectors: VectorIndex,
    /// Runs SQLite's checkpoints, so that the writer does not.
    checkpointer: SqlitePool,
    checkpointing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    commits: std::sync::atomic::AtomicU64,
}

/// A passive checkpoint is started after this many committed batches, when
/// none is running. It copies pages but cannot restart the `-wal` while the
/// writer goes on: under steady load the writer's own checkpoint at
/// `wal_autocheckpoint` pages (cheap then: only the uncopied tail) restarts it,
/// so the `-wal` file stays under about 16 MiB.
const COMMITS_PER_CHECKPOINT: u64 = 8;

impl SqliteDestination {
    /// The database at `path` (created if missing, with its directory), connected
    /// and migrated at the first use: this fails only when the directory cannot be
    /// created. `readers` is the size of the read pool (default 4); a statement
    /// waits up to `busy_timeout` for another writer's lock (then: an outage).
    pub fn open(
        name: &str,
        path: &Path,
        readers: Option<u32>,
        busy_timeout: Duration,
    ) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                DestinationError::Config(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            // A forgotten row's bytes are zeroed in the file, not left in free pages.
            .pragma("secure_delete", "ON")
            .busy_timeout(busy_timeout);
        Ok(SqliteDestination {
            name: name.to_owned(),
            // The writer checkpoints only if the checkpointer falls far behind.
            writer: SqlitePoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(opts.clone().pragma("wal_autocheckpoint", "4000")),
            // Never creates the database (a file moved away stays gone).
            checkpointer: SqlitePoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(opts.clone().create_if_missing(false)),
            checkpointing: Default::default(),
            commits: Default::default(),
            readers: SqlitePoolOptions::new()
                .max_connections(readers.unwrap_or(4).max(1))
                .connect_lazy_with(opts.read_only(true).create_if_missing(false)),
            migrated: OnceCell::new(),
            vectors: VectorIndex::default(),
        })
    }

    /// Migrate once (at the first use that succeeds).
    async fn ready(&self) -> Result<()> {
        self.migrated
            .get_or_try_init(|| self.migrate())
            .await
            .map(drop)
    }

    fn err(&self, e: sqlx::Error) -> DestinationError {
        classify(&self.name, e)
    }

    /// Now and then, start a checkpoint beside the writer.
    fn committed(&self) {
        use std::sync::atomic::Ordering;
        let n = self.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(COMMITS_PER_CHECKPOINT) {
            self.checkpoint();
        }
    }

    /// A passive checkpoint on its own connection (copies committed pages into
    /// the database while the writer goes on; it never blocks the writer).
    fn checkpoint(&self) {
        use std::sync::atomic::Ordering;
        if self.checkpointing.swap(true, Ordering::SeqCst) {
            return;
        }
        /// Clears the flag however the task ends (also dropped unfinished).
        struct Running(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let running = Running(self.checkpointing.clone());
        let (pool, name) = (self.checkpointer.clone(), self.name.clone());
        tokio::spawn(async move {
            let _running = running;
            let res = async {
                let mut conn = pool.acquire().await?;
                let res = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&mut *conn)
                    .await;
                if res.is_err() {
                    conn.close_on_drop();
                }
                res
            };
            if let Err(e) = res.await {
                // The writer's own checkpoint still bounds the -wal.
                tracing::warn!(destination = %name, "checkpoint beside the writer failed: {e}");
            }
        });
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.writer.acquire().await.map_err(|e| self.err(e))?;
        let res = self.migrate_on(&mut conn).await;
        if res.is_err() {
            // Possibly opened read-only (or on a full disk): open afresh next time.
            conn.close_on_drop();
        }
        res
    }

    async fn migrate_on(&self, conn: &mut sqlx::SqliteConnection) -> Result<()> {
        use sqlx::Connection;
        // IMMEDIATE: it reads, then writes; the busy timeout applies to the lock.
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(e))?;
        tx.execute("CREATE TABLE IF NOT EXISTS spool_schema (version INTEGER NOT NULL)")
            .await
            .map_err(|e| self.err(e))?;
        let found: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM spool_schema")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        let found = found.unwrap_or(0);
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(DestinationError::SchemaTooNew {
                destination: self.name.clone(),
                found,
                known,
            });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.execute(*m).await.map_err(|e| self.err(e))?;
            if i + 1 == WORDS_MIGRATION {
                backfill_words(&mut tx).await.map_err(|e| self.err(e))?;
            }
            sqlx::query("INSERT INTO spool_schema (version) VALUES (?)")
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
            tracing::info!(destination = %self.name, version = i + 1, "migrated SQLite schema");
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    fn uuid(&self, id: &str) -> Result<Uuid> {
        Uuid::try_parse(id).map_err(|_| DestinationError::Transient {
            destination: self.name.clone(),
            message: format!("row with malformed id {id:?}"),
        })
    }

    fn row(&self, r: &SqliteRow) -> Result<StoredEntry> {
        let id: String = r.get(0);
        let payload: String = r.get(5);
        Ok(StoredEntry {
            lsn: r.get::<i64, _>(1) as u64,
            entry: Entry {
                id: self.uuid(&id)?,
                source: r.get(2),
                destination: self.name.clone(),
                subject: r.get(3),
                idempotency_key: r.get(4),
                accepted_at_us: r.get(6),
                payload: payload.into_bytes(),
                // Reads answer the payload (which holds it as posted).
                embedding: None,
            },
            delivered_at_us: r.get(7),
        })
    }
}

/// Index the words of every row stored before migration 3.
async fn backfill_words(conn: &mut sqlx::SqliteConnection) -> sqlx::Result<()> {
    let mut after = 0i64;
    loop {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT rowid, payload FROM spool_entries WHERE rowid > ? ORDER BY rowid LIMIT ?",
        )
        .bind(after)
        .bind(BACKFILL_ROWS)
        .fetch_all(&mut *conn)
        .await?;
        let Some(&(last, _)) = rows.last() else {
            return Ok(());
        };
        after = last;
        let words: Vec<(i64, String)> = rows
            .into_iter()
            .map(|(rowid, p)| (rowid, payload_words(p.as_bytes())))
            .collect();
        let words: Vec<(i64, &str)> = words.iter().map(|(r, w)| (*r, w.as_str())).collect();
        index_words(conn, &words).await?;
    }
}

/// Add rows' words (rowid, words) to the full-text index.
async fn index_words(conn: &mut sqlx::SqliteConnection, rows: &[(i64, &str)]) -> sqlx::Result<()> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO spool_entries_words (rowid, words) ");
        qb.push_values(chunk, |mut b, (rowid, words)| {
            b.push_bind(*rowid).push_bind(*words);
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Insert a batch in one transaction, with its words (`words[i]` are
/// `batch[i]`'s); answers which entries were inserted (not already held).
///
/// Rows get explicit rowids past the table's highest (read under the write
/// lock), so a row's words are indexed by the
/// rowid it was given, without a row coming back per entry. An entry skipped as
/// a conflict (its id, or its source's key, already held) leaves its rowid
/// unused; only when a statement inserted fewer rows than it carried are the
/// rowids that exist looked up.
async fn insert(
    conn: &mut sqlx::SqliteConnection,
    batch: &[LoggedEntry],
    words: &[String],
) -> sqlx::Result<Vec<bool>> {
    use sqlx::Connection;
    let now = spool_wal::now_us();
    let mut inserted = Vec::with_capacity(batch.len());
    // IMMEDIATE: the write lock first (waiting up to the busy timeout), so the
    // highest rowid read is the one written after.
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut next: i64 = sqlx::query_scalar("SELECT coalesce(max(rowid), 0) + 1 FROM spool_entries")
        .fetch_one(&mut *tx)
        .await?;
    for (chunk, words) in batch
        .chunks(ROWS_PER_STATEMENT)
        .zip(words.chunks(ROWS_PER_STATEMENT))
    {
        let first = next;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "INSERT INTO spool_entries (rowid, {COLUMNS}, embedding) "
        ));
        qb.push_values(chunk, |mut b, le| {
            let e = &le.entry;
            b.push_bind(next)
                .push_bind(e.id.hyphenated().to_string())
                .push_bind(le.lsn as i64)
                .push_bind(e.source.as_str())
                .push_bind(e.subject.as_deref())
                .push_bind(e.idempotency_key.as_deref())
                // Validated as UTF-8 JSON by `screen`.
                .push_bind(std::str::from_utf8(&e.payload).unwrap_or_default())
                .push_bind(e.accepted_at_us)
                .push_bind(now)
                .push_bind(e.embedding.as_deref().map(to_le_bytes));
            next += 1;
        });
        qb.push(" ON CONFLICT DO NOTHING");
        let done = qb.build().execute(&mut *tx).await?.rows_affected();
        let new: Vec<bool> = if done == chunk.len() as u64 {
            vec![true; chunk.len()]
        } else {
            // Some were conflicts: which rowids were used?
            let used: std::collections::HashSet<i64> =
                sqlx::query_scalar("SELECT rowid FROM spool_entries WHERE rowid BETWEEN ? AND ?")
                    .bind(first)
                    .bind(next - 1)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
            (first..next).map(|r| used.contains(&r)).collect()
        };
        let indexed: Vec<(i64, &str)> = new
            .iter()
            .zip(words)
            .zip(first..)
            .filter(|((new, w), _)| **new && !w.is_empty())
            .map(|((_, w), rowid)| (rowid, w.as_str()))
            .collect();
        index_words(&mut tx, &indexed).await?;
        inserted.extend(new);
    }
    tx.commit().await?;
    Ok(inserted)
}

const COLUMNS: &str =
    "id, lsn, source, subject, idempotency_key, payload, created_at, delivered_at";

#[async_trait]
impl Destination for SqliteDestination {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_batch(&self, batch: &[LoggedEntry]) -> Result<u64> {
        if batch.is_empty() {
            return Ok(0);
        }
        screen(&self.name, batch, false)?;
        self.ready().await?;
        // Computed before the writer is taken: another worker's batch commits
        // meanwhile.
        let words: Vec<String> = batch
            .iter()
            .map(|le| payload_words(&le.entry.payload))
            .collect();
        let mut conn = self.writer.acquire().await.map_err(|e| self.err(e))?;
        match insert(&mut conn, batch, &words).await {
            Ok(inserted) => {
                self.committed();
                // The index is updated while the (single) writer is held, so
                // its updates follow commit order (a forget cannot slip between).
                let written: Vec<&Entry> = batch
                    .iter()
                    .zip(&inserted)
                    .filter(|(_, new)| **new)
                    .map(|(le, _)| &le.entry)
                    .collect();
                self.vectors.added(&written).await;
                drop(conn);
                Ok((batch.len() - written.len()) as u64)
            }
            Err(e) => {
                let e = self.err(e);
                if !e.is_rejection() {
                    // A connection that met an outage (a file that was read-only,
                    // a full disk, an I/O error) may keep its state: open afresh.
                    conn.close_on_drop();
                }
                Err(e)
            }
        }
    }

    async fn get(&self, source: &str, id: Uuid) -> Result<Option<StoredEntry>> {
        self.ready().await?;
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM spool_entries WHERE id = ? AND source = ?"
        ))
        .bind(id.hyphenated().to_string())
        .bind(source)
        .fetch_optional(&self.readers)
        .await
        .map_err(|e| self.err(e))?;
        row.map(|r| self.row(&r)).transpose()
    }

    async fn known(&self, source: &str, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        self.known_ids(source, ids).await
    }

    async fn search(&self, s: &Search) -> Result<Vec<Hit>> {
        self.search_hits(s).await
    }

    async fn forget(&self, t: &Tombstone) -> Result<u64> {
        self.forget_rows(t).await
    }

    async fn query(&self, q: &Query) -> Result<Page> {
        let (limit, cursor) = q.checked()?;
        self.ready().await?;
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT id, created_at, octet_length(payload) FROM spool_entries WHERE source = ",
        );
        qb.push_bind(q.source.as_str());
        if let Some(s) = &q.subject {
            qb.push(" AND subject = ").push_bind(s.as_str());
        }
        if let Some(t) = q.since_us {
            qb.push(" AND created_at >= ").push_bind(t);
        }
        if let Some(t) = q.until_us {
            qb.push(" AND created_at < ").push_bind(t);
        }
        if let Some(c) = cursor {
            qb.push(" AND (created_at, id) < (")
                .push_bind(c.created_us)
                .push(", ")
                .push_bind(c.id.hyphenated().to_string())
                .push(")");
        }
        if let Some(text) = q.q.as_deref().filter(|t| !t.trim().is_empty()) {
            let w = query_words(text);
            if w.is_empty() {
                return Ok(Page::default());
            }
            qb.push(
                " AND rowid IN (SELECT rowid FROM spool_entries_words WHERE spool_entries_words MATCH ",
            )
            .push_bind(fts5_query(&w))
            .push(")");
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(limit as i64);
        // The candidates' sizes first, then the payloads of those that fit,
        // by id (unordered: the primary key, whatever the planner thinks).
        let found: Vec<(String, i64, i64)> = qb
            .build_query_as()
            .fetch_all(&self.readers)
            .await
            .map_err(|e| self.err(e))?;
        let candidates: Candidates = found
            .iter()
            .map(|(id, at, len)| Ok((self.uuid(id)?, *at, *len)))
            .collect::<Result<_>>()?;
        let lens: Vec<i64> = candidates.iter().map(|c| c.2).collect();
        let n = fitting(&lens, q.max_bytes);
        let mut entries = Vec::with_capacity(n);
        if n > 0 {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new(format!("SELECT {COLUMNS} FROM spool_entries WHERE id IN ("));
            let mut list = qb.separated(", ");
            // The ids as stored (the text the primary key holds).
            for (id, _, _) in &found[..n] {
                list.push_bind(id.as_str());
            }
            qb.push(")");
            let mut rows = qb.build().fetch(&self.readers);
            while let Some(r) = rows.try_next().await.map_err(|e| self.err(e))? {
                entries.push(self.row(&r)?);
            }
        }
        Ok(page(&candidates, n, limit, entries))
    }

    /// Migrated, the table there, and writable: takes the write lock (waiting up
    /// to the busy timeout) and gives it back. A read-only file, a missing table
    /// or another writer holding the lock past the timeout fail it.
    async fn health(&self) -> Result<()> {
        self.ready().await?;
        let mut conn = self.writer.acquire().await.map_err(|e| self.err(e))?;
        let probe = async {
            sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
            let table = sqlx::query("SELECT 1 FROM spool_entries LIMIT 0")
                .execute(&mut *conn)
                .await;
            sqlx::query("ROLLBACK").execute(&mut *conn).await?;
            table.map(drop)
        };
        match probe.await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Maybe mid-transaction, maybe opened read-only: open afresh.
                conn.close_on_drop();
                Err(self.err(e))
            }
        }
    }

    async fn close(&self) {
        self.checkpointer.close().await;
        self.writer.close().await;
        self.readers.close().await;
    }
}
