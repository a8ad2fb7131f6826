//! The PostgreSQL destination.
//!
//! A batch is one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT (id) DO NOTHING`
//! (one statement per batch, arrays bound per column — never one INSERT per row).
//! The payload is `jsonb`; full-text search uses a GIN index over
//! `jsonb_to_tsvector('simple', payload, '["string"]')`, the same words SQLite's
//! FTS5 index sees.

use crate::error::classify;
use crate::query::{words, Query};
use crate::{next_cursor, screen, Destination, DestinationError, Page, Result, StoredEntry};
use async_trait::async_trait;
use spool_wal::{Entry, LoggedEntry};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Postgres, QueryBuilder, Row};
use std::time::Duration;
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
];

/// Advisory lock key serializing migrations of several spool nodes.
const MIGRATION_LOCK: i64 = 0x5350_4f4f_4c00_0001;

const SELECT: &str = "SELECT id, lsn, source, subject, idempotency_key, payload::text, \
     (extract(epoch from created_at) * 1000000)::int8, \
     (extract(epoch from delivered_at) * 1000000)::int8 FROM spool_entries";

/// Micros since the epoch as timestamptz, in SQL.
const TS: &str = "(timestamptz 'epoch' + ";
const TS_END: &str = " * interval '1 microsecond')";

/// The PostgreSQL destination.
pub struct PostgresDestination {
    name: String,
    pool: PgPool,
}

impl PostgresDestination {
    /// Connect (pool of `pool_size`, default 8) and migrate.
    pub async fn open(name: &str, url: &str, pool_size: Option<u32>) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.unwrap_or(8).max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|e| match e {
                sqlx::Error::Configuration(c) => {
                    DestinationError::Config(format!("destination {name}: bad url: {c}"))
                }
                other => classify(name, other),
            })?;
        let d = PostgresDestination {
            name: name.to_owned(),
            pool,
        };
        d.migrate().await?;
        Ok(d)
    }

    fn err(&self, e: sqlx::Error) -> DestinationError {
        classify(&self.name, e)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
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
            sqlx::query("INSERT INTO spool_schema (version) VALUES ($1)")
                .bind(i as i32 + 1)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
            tracing::info!(destination = %self.name, version = i + 1, "migrated Postgres schema");
        }
        tx.commit().await.map_err(|e| self.err(e))
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
            },
            delivered_at_us: r.get(7),
        }
    }
}

#[async_trait]
impl Destination for PostgresDestination {
    fn name(&self) -> &str {
        &self.name
    }

    async fn write_batch(&self, batch: &[LoggedEntry]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        screen(&self.name, batch, true)?;
        let n = batch.len();
        let (mut ids, mut lsns, mut sources) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut subjects, mut keys, mut payloads, mut created) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
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
        }
        sqlx::query(
            "INSERT INTO spool_entries (id, lsn, source, subject, idempotency_key, payload, created_at) \
             SELECT id, lsn, source, subject, ikey, payload::jsonb, \
                    timestamptz 'epoch' + created * interval '1 microsecond' \
             FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[]) \
                  AS t(id, lsn, source, subject, ikey, payload, created) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&lsns)
        .bind(&sources)
        .bind(&subjects)
        .bind(&keys)
        .bind(&payloads)
        .bind(&created)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(|e| self.err(e))
    }

    async fn get(&self, source: &str, id: Uuid) -> Result<Option<StoredEntry>> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1 AND source = $2"))
            .bind(id)
            .bind(source)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.map(|r| self.row(&r)))
    }

    async fn query(&self, q: &Query) -> Result<Page> {
        let (limit, cursor) = q.checked()?;
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(format!("{SELECT} WHERE source = "));
        qb.push_bind(q.source.as_str());
        if let Some(s) = &q.subject {
            qb.push(" AND subject = ").push_bind(s.as_str());
        }
        if let Some(t) = q.since_us {
            qb.push(" AND created_at >= ")
                .push(TS)
                .push_bind(t)
                .push(TS_END);
        }
        if let Some(t) = q.until_us {
            qb.push(" AND created_at < ")
                .push(TS)
                .push_bind(t)
                .push(TS_END);
        }
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
            let w = words(text);
            if w.is_empty() {
                return Ok(Page::default());
            }
            qb.push(" AND jsonb_to_tsvector('simple', payload, '[\"string\"]') @@ plainto_tsquery('simple', ")
                .push_bind(w.join(" "))
                .push(")");
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(limit as i64);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let entries: Vec<StoredEntry> = rows.iter().map(|r| self.row(r)).collect();
        Ok(Page {
            next_cursor: next_cursor(&entries, limit),
            entries,
        })
    }

    async fn health(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(|e| self.err(e))
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
