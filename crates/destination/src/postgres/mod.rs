//! The PostgreSQL destination.
//!
//! A batch is one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING` (one
//! statement per batch, arrays bound per column — never one INSERT per row); the
//! conflict is either the id (a redelivery) or (source, idempotency_key) (a keyed
//! retry another spool node stored first). The pool connects lazily and the schema
//! is migrated at the first successful contact, so spool starts while Postgres is
//! down. Every statement has a server-side `statement_timeout` and a slightly
//! longer client-side deadline: a black-holed connection is an outage, never a
//! hung worker.
//! The payload is `jsonb`; full-text search uses a GIN index over the `words`
//! `tsvector`, made with `array_to_tsvector` from the words spool computed
//! ([`crate::words`]) — no parser, no dictionary, no locale: the same words
//! SQLite's index holds, and queried as quoted lexemes the same way.

use crate::error::classify;
use crate::query::{fitting, Query};
use crate::recall::{self, Hit, Search};
use crate::words::{payload_words, query_words, tsquery};
use crate::{
    page, screen, Candidates, Destination, DestinationError, Page, Result, StoredEntry,
    BACKFILL_ROWS,
};
use async_trait::async_trait;
use futures_util::TryStreamExt;
use spool_wal::{Entry, LoggedEntry, Tombstone};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Postgres, QueryBuilder, Row};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;
use uuid::Uuid;

const MIGRATIONS: &[&str] = &[
    // 1: entries, read indexes, full-text index over payload string values.
    r#"
    CREATE TABLE spool_entries (
        id              uuid PRIMARY KEY,
        lsn             bigint NOT NULL,
        source          text NOT NULL,
        subject         text,
        idempotency_key text,
        payload         jsonb NOT NULL,
        created_at      timestamptz NOT NULL,
        delivered_at    timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX spool_entries_by_subject ON spool_entries (source, subject, created_at DESC, id DESC);
    CREATE INDEX spool_entries_by_time ON spool_entries (source, created_at DESC, id DESC);
    CREATE INDEX spool_entries_fts ON spool_entries
        USING gin (jsonb_to_tsvector('simple', payload, '["string"]'));
    "#,
    // 2: keyed entries are unique per source (several nodes share a database and
    // each keeps its own key index). Of copies stored before this, the first
    // accepted stays; the others move to spool_entries_displaced (kept, not
    // deleted). The lock keeps older nodes from adding a copy meanwhile.
    r#"
    LOCK TABLE spool_entries IN SHARE ROW EXCLUSIVE MODE;
    CREATE TABLE spool_entries_displaced (LIKE spool_entries);
    WITH moved AS (
        DELETE FROM spool_entries a USING spool_entries b
         WHERE a.idempotency_key IS NOT NULL
           AND a.source = b.source AND a.idempotency_key = b.idempotency_key
           AND (a.created_at, a.id) > (b.created_at, b.id)
        RETURNING a.*
    )
    INSERT INTO spool_entries_displaced SELECT * FROM moved;
    CREATE UNIQUE INDEX spool_entries_by_key ON spool_entries (source, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    "#,
    // 3: full-text words computed by spool (crate::words), independent of the
    // server's parser and locale. Rows already stored get theirs from
    // `backfill_words` in the same transaction, then the index is built.
    // A row without words (written by an older node after this migration) is
    // found through spool_entries_unworded (built after the backfill, empty)
    // and indexed in the background after the next start.
    r#"
    LOCK TABLE spool_entries IN SHARE ROW EXCLUSIVE MODE;
    DROP INDEX spool_entries_fts;
    ALTER TABLE spool_entries ADD COLUMN words tsvector;
    "#,
    // 4: embeddings, for vector recall (pgvector casts them, see vector.rs).
    r#"
    ALTER TABLE spool_entries ADD COLUMN embedding real[];
    "#,
];

/// The migration after which existing rows' words are computed from Rust.
const WORDS_MIGRATION: usize = 3;

/// Rows' words as a tsvector, from the space-joined words spool computed.
const WORDS_SQL: &str = "array_to_tsvector(string_to_array(w, ' '))";

/// Advisory lock key serializing migrations of several spool nodes.
const MIGRATION_LOCK: i64 = 0x5350_4f4f_4c00_0001;

const SELECT: &str = "SELECT id, lsn, source, subject, idempotency_key, payload::text, \
     (extract(epoch from created_at) * 1000000)::int8, \
     (extract(epoch from delivered_at) * 1000000)::int8 FROM spool_entries";

/// Micros since the epoch as timestamptz, in SQL.
const TS: &str = "(timestamptz 'epoch' + ";
const TS_END: &str = " * interval '1 microsecond')";

/// ` AND …` for a subject and a time range (a read's or a search's).
fn push_bounds<'a>(
    qb: &mut QueryBuilder<'a, Postgres>,
    subject: Option<&'a str>,
    since_us: Option<i64>,
    until_us: Option<i64>,
) {
    if let Some(subject) = subject {
        qb.push(" AND subject = ").push_bind(subject);
    }
    if let Some(t) = since_us {
        qb.push(" AND created_at >= ")
            .push(TS)
            .push_bind(t)
            .push(TS_END);
    }
    if let Some(t) = until_us {
        qb.push(" AND created_at < ")
            .push(TS)
            .push_bind(t)
            .push(TS_END);
    }
}

/// ` AND …` for a search's subject and time bounds.
fn push_filters<'a>(qb: &mut QueryBuilder<'a, Postgres>, s: &'a Search) {
    push_bounds(qb, s.subject.as_deref(), s.since_us, s.until_us);
}

mod vector;

/// The PostgreSQL destination.
pub struct PostgresDestination {
    name: String,
    pool: PgPool,
    timeout: Duration,
    /// Set once the schema is migrated (at the first successful contact): the
    /// pgvector extension, if the server has it.
    migrated: OnceCell<Option<vector::Pgvector>>,
}

impl PostgresDestination {
    /// A pool of `pool_size` (default 8) connections to `url`, made lazily: this
    /// fails only on a malformed URL, never because Postgres is down. Each
    /// statement may take `timeout` (server-side `statement_timeout` and a client
    /// deadline). The schema is migrated at the first successful contact
    /// ([`Destination::health`] makes one).
    pub fn open(name: &str, url: &str, pool_size: Option<u32>, timeout: Duration) -> Result<Self> {
        let timeout = timeout.max(Duration::from_millis(10));
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| DestinationError::Config(format!("destination {name}: bad url: {e}")))?;
        // SET after connecting, not startup options: connection poolers
        // (PgBouncer) refuse unknown startup parameters.
        let ms = timeout.as_millis();
        let setup: Arc<[String]> = [
            format!("SET statement_timeout = {ms}"),
            format!("SET idle_in_transaction_session_timeout = {ms}"),
            "SET tcp_keepalives_idle = 30".into(),
            "SET tcp_keepalives_interval = 10".into(),
            "SET tcp_keepalives_count = 3".into(),
        ]
        .into();
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.unwrap_or(8).max(1))
            .acquire_timeout(timeout.min(Duration::from_secs(5)))
            .after_connect(move |conn, _| {
                let setup = setup.clone();
                Box::pin(async move {
                    for stmt in setup.iter() {
                        conn.execute(stmt.as_str()).await?;
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(opts);
        Ok(PostgresDestination {
            name: name.to_owned(),
            pool,
            timeout,
            migrated: OnceCell::new(),
        })
    }

    fn err(&self, e: sqlx::Error) -> DestinationError {
        classify(&self.name, e)
    }

    /// Run `op` once the schema is migrated, within the client deadline: the
    /// server's `statement_timeout` plus a margin, so the server's 57014 is what
    /// normally ends a slow statement and the deadline only a silent connection.
    async fn run<T, F>(&self, op: F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, sqlx::Error>>,
    {
        // A migration has no deadline (an index build on a large table may take
        // long; abandoning it would leave the server building it anyway), and
        // its failures are never an entry's fault.
        self.pgvector().await?;
        let deadline = self.timeout + (self.timeout / 2).max(Duration::from_millis(500));
        tokio::time::timeout(deadline, op)
            .await
            .map_err(|_| DestinationError::TimedOut {
                destination: self.name.clone(),
                message: format!("no answer within {deadline:?}"),
            })?
            .map_err(|e| self.err(e))
    }

    /// Migrate the schema (once), answering whether pgvector is there.
    async fn pgvector(&self) -> Result<Option<&vector::Pgvector>> {
        let found = self
            .migrated
            .get_or_try_init(|| async { self.migrate().await.map_err(|e| e.into_outage()) })
            .await?;
        Ok(found.as_ref())
    }

    async fn migrate(&self) -> Result<Option<vector::Pgvector>> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        // Computing words between statements leaves the transaction idle.
        tx.execute(
            "SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0",
        )
        .await
        .map_err(|e| self.err(e))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.execute("CREATE TABLE IF NOT EXISTS spool_schema (version integer NOT NULL)")
            .await
            .map_err(|e| self.err(e))?;
        let found: Option<i32> = sqlx::query_scalar("SELECT max(version) FROM spool_schema")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        let found = found.unwrap_or(0) as i64;
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
                backfill_words(&mut tx, None)
                    .await
                    .map_err(|e| self.err(e))?;
                tx.execute(
                    "CREATE INDEX spool_entries_words ON spool_entries USING gin (words); \
                     CREATE INDEX spool_entries_unworded ON spool_entries (id) WHERE words IS NULL",
                )
                .await
                .map_err(|e| self.err(e))?;
            }
            sqlx::query("INSERT INTO spool_schema (version) VALUES ($1)")
                .bind(i as i32 + 1)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
            tracing::info!(destination = %self.name, version = i + 1, "migrated Postgres schema");
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        if found >= WORDS_MIGRATION as i64 {
            tokio::spawn(index_stragglers(self.pool.clone(), self.name.clone()));
        }
        vector::probe(&self.pool, &self.name)
            .await
            .map_err(|e| self.err(e))
    }

    fn row(&self, r: &PgRow) -> StoredEntry {
        let payload: String = r.get(5);
        StoredEntry {
            lsn: r.get::<i64, _>(1) as u64,
            entry: Entry {
                id: r.get(0),
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
        }
    }
}

/// Compute the words of rows without them, in id order, [`BACKFILL_ROWS`] at
/// a time, up to id `upto` (all of them when `None`). In migration 3 that is
/// every row stored before it.
async fn backfill_words(conn: &mut sqlx::PgConnection, upto: Option<Uuid>) -> sqlx::Result<u64> {
    let (mut after, mut done) = (Uuid::nil(), 0);
    loop {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, payload::text FROM spool_entries \
              WHERE words IS NULL AND id > $1 AND ($2::uuid IS NULL OR id <= $2) \
              ORDER BY id LIMIT $3",
        )
        .bind(after)
        .bind(upto)
        .bind(BACKFILL_ROWS)
        .fetch_all(&mut *conn)
        .await?;
        let Some(&(last, _)) = rows.last() else {
            return Ok(done);
        };
        after = last;
        done += rows.len() as u64;
        let (ids, words): (Vec<Uuid>, Vec<String>) = rows
            .into_iter()
            .map(|(id, p)| (id, payload_words(p.as_bytes())))
            .unzip();
        sqlx::query(&format!(
            "UPDATE spool_entries e SET words = {WORDS_SQL} \
             FROM UNNEST($1::uuid[], $2::text[]) AS t(id, w) WHERE e.id = t.id"
        ))
        .bind(&ids)
        .bind(&words)
        .execute(&mut *conn)
        .await?;
    }
}

/// Index, in the background and one short statement at a time, the rows an
/// older node stored without words (`q` does not find them until then): those
/// there at the start, so a node still writing them cannot keep it going.
async fn index_stragglers(pool: PgPool, name: String) {
    let run = async {
        let mut conn = pool.acquire().await?;
        let upto: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM spool_entries WHERE words IS NULL ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&mut *conn)
        .await?;
        match upto {
            Some(upto) => backfill_words(&mut conn, Some(upto)).await,
            None => Ok(0),
        }
    };
    match run.await {
        Ok(0) => {}
        Ok(n) => tracing::info!(destination = %name, rows = n, "indexed rows stored without words"),
        Err(e) => {
            tracing::warn!(destination = %name, error = %e, "indexing rows stored without words stopped; the next start goes on")
        }
    }
}

#[async_trait]
impl Destination for PostgresDestination {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_batch(&self, batch: &[LoggedEntry]) -> Result<u64> {
        if batch.is_empty() {
            return Ok(0);
        }
        screen(&self.name, batch, true)?;
        let n = batch.len();
        let (mut ids, mut lsns, mut sources) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut subjects, mut keys, mut payloads, mut created, mut words) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut embeddings: Vec<Option<String>> = Vec::with_capacity(n);
        for le in batch {
            let e = &le.entry;
            ids.push(e.id);
            lsns.push(le.lsn as i64);
            sources.push(e.source.as_str());
            subjects.push(e.subject.as_deref());
            keys.push(e.idempotency_key.as_deref());
            // Validated as UTF-8 JSON by `screen`.
            payloads.push(std::str::from_utf8(&e.payload).unwrap_or_default());
            created.push(e.accepted_at_us);
            words.push(payload_words(&e.payload));
            // An array literal: one text[] parameter, cast per row (UNNEST would
            // flatten a two-dimensional real[]). `{}` prints an f32 so that it
            // parses back to the same value.
            embeddings.push(e.embedding.as_ref().map(|v| {
                let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
                format!("{{{}}}", items.join(","))
            }));
        }
        let done = self
            .run(
                sqlx::query(&format!(
                    "INSERT INTO spool_entries (id, lsn, source, subject, idempotency_key, payload, created_at, words, embedding) \
                     SELECT id, lsn, source, subject, ikey, payload::jsonb, \
                            timestamptz 'epoch' + created * interval '1 microsecond', {WORDS_SQL}, emb::real[] \
                     FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::text[], $9::text[]) \
                          AS t(id, lsn, source, subject, ikey, payload, created, w, emb) \
                     ON CONFLICT DO NOTHING",
                ))
                .bind(&ids)
                .bind(&lsns)
                .bind(&sources)
                .bind(&subjects)
                .bind(&keys)
                .bind(&payloads)
                .bind(&created)
                .bind(&words)
                .bind(&embeddings)
                .execute(&self.pool),
            )
            .await?;
        Ok(n as u64 - done.rows_affected().min(n as u64))
    }

    async fn get(&self, source: &str, id: Uuid) -> Result<Option<StoredEntry>> {
        let sql = format!("{SELECT} WHERE id = $1 AND source = $2");
        let row = self
            .run(
                sqlx::query(&sql)
                    .bind(id)
                    .bind(source)
                    .fetch_optional(&self.pool),
            )
            .await?;
        Ok(row.map(|r| self.row(&r)))
    }

    async fn known(&self, source: &str, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        self.run(
            sqlx::query_scalar("SELECT id FROM spool_entries WHERE source = $1 AND id = ANY($2)")
                .bind(source)
                .bind(ids)
                .fetch_all(&self.pool),
        )
        .await
    }

    async fn query(&self, q: &Query) -> Result<Page> {
        let (limit, cursor) = q.checked()?;
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
            "SELECT id, (extract(epoch from created_at) * 1000000)::int8, \
                    octet_length(payload::text)::int8 FROM spool_entries WHERE source = ",
        );
        qb.push_bind(q.source.as_str());
        push_bounds(&mut qb, q.subject.as_deref(), q.since_us, q.until_us);
        if let Some(c) = cursor {
            qb.push(" AND (created_at, id) < (")
                .push(TS)
                .push_bind(c.created_us)
                .push(TS_END)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        if let Some(text) = q.q.as_deref().filter(|t| !t.trim().is_empty()) {
            let w = query_words(text);
            if w.is_empty() {
                return Ok(Page::default());
            }
            qb.push(" AND words @@ ")
                .push_bind(tsquery(&w))
                .push("::tsquery");
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(limit as i64);
        // The candidates' sizes first, then the payloads of those that fit.
        let candidates: Candidates = self.run(qb.build_query_as().fetch_all(&self.pool)).await?;
        let lens: Vec<i64> = candidates.iter().map(|c| c.2).collect();
        let n = fitting(&lens, q.max_bytes);
        let ids: Vec<Uuid> = candidates[..n].iter().map(|c| c.0).collect();
        let sql = format!("{SELECT} WHERE id = ANY($1)");
        let entries = if n == 0 {
            Vec::new()
        } else {
            self.run(async {
                let mut rows = sqlx::query(&sql).bind(&ids).fetch(&self.pool);
                let mut entries = Vec::with_capacity(n);
                while let Some(r) = rows.try_next().await? {
                    entries.push(self.row(&r));
                }
                Ok(entries)
            })
            .await?
        };
        Ok(page(&candidates, n, limit, entries))
    }

    async fn search(&self, s: &Search) -> Result<Vec<Hit>> {
        s.check()?;
        let n = recall::candidates(s.k) as i64;
        let mut text = Vec::new();
        if let Some(w) = s.words() {
            let tsq = tsquery(&w);
            let mut qb: QueryBuilder<Postgres> =
                QueryBuilder::new("SELECT id FROM spool_entries WHERE source = ");
            qb.push_bind(s.source.as_str());
            push_filters(&mut qb, s);
            qb.push(" AND words @@ ")
                .push_bind(tsq.clone())
                .push("::tsquery ORDER BY ts_rank(words, ")
                .push_bind(tsq)
                .push("::tsquery) DESC, created_at DESC, id DESC LIMIT ")
                .push_bind(n);
            text = self
                .run(qb.build_query_scalar().fetch_all(&self.pool))
                .await?;
        }
        let mut vector = Vec::new();
        if let Some(v) = &s.embedding {
            vector = self.nearest(s, v, n).await?;
        }
        let fused = recall::fuse(&text, &vector, s.k);
        if fused.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = fused.iter().map(|f| f.0).collect();
        let sql = format!("{SELECT} WHERE id = ANY($1)");
        let rows = self
            .run(sqlx::query(&sql).bind(&ids).fetch_all(&self.pool))
            .await?;
        let entries = rows.iter().map(|r| self.row(r)).collect();
        Ok(recall::hits(fused, entries))
    }

    async fn forget(&self, t: &Tombstone) -> Result<u64> {
        let sql = format!(
            "DELETE FROM spool_entries WHERE source = $1 AND (id = ANY($2) \
             OR ($3::text IS NOT NULL AND subject = $3 AND created_at <= {TS}$4{TS_END}))"
        );
        let done = self
            .run(
                sqlx::query(&sql)
                    .bind(t.source.as_str())
                    .bind(&t.ids)
                    .bind(t.subject.as_deref())
                    .bind(t.at_us)
                    .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// Reachable, migrated, and writable: a server in recovery (a standby after
    /// failover) or one with `default_transaction_read_only` is down for spool.
    async fn health(&self) -> Result<()> {
        let read_only: bool = self
            .run(
                sqlx::query_scalar(
                    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool",
                )
                .fetch_one(&self.pool),
            )
            .await?;
        if read_only {
            return Err(DestinationError::Unavailable {
                destination: self.name.clone(),
                message: "the server is read-only (in recovery or default_transaction_read_only)"
                    .into(),
            });
        }
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
