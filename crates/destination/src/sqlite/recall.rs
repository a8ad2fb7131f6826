//! SQLite's recall and forgetting: searches (text from the FTS5 index, vectors
//! from the in-memory index, fused), deletes of what a tombstone covers, and
//! which ids it holds.

use super::{SqliteDestination, COLUMNS, ROWS_PER_STATEMENT};
use crate::recall::{self, Hit, Search};
use crate::vectors::Shelf;
use crate::words::{fts5_query, payload_words};
use crate::Result;
use futures_util::TryStreamExt;
use spool_wal::Tombstone;
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

/// ` AND …` for a search's subject and time bounds.
fn push_filters(qb: &mut QueryBuilder<'_, Sqlite>, s: &Search) {
    if let Some(subject) = &s.subject {
        qb.push(" AND subject = ").push_bind(subject.clone());
    }
    if let Some(t) = s.since_us {
        qb.push(" AND created_at >= ").push_bind(t);
    }
    if let Some(t) = s.until_us {
        qb.push(" AND created_at < ").push_bind(t);
    }
}

/// Delete, in one transaction, the rows a tombstone covers and their words;
/// answers their ids.
async fn delete_forgotten(
    conn: &mut sqlx::SqliteConnection,
    t: &Tombstone,
) -> sqlx::Result<Vec<String>> {
    use sqlx::Connection;
    // IMMEDIATE: it reads, then deletes; the busy timeout applies to the lock.
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut deleted = Vec::new();
    loop {
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("SELECT rowid, payload, id FROM spool_entries WHERE source = ");
        qb.push_bind(t.source.as_str()).push(" AND (0");
        if !t.ids.is_empty() {
            qb.push(" OR id IN (");
            let mut list = qb.separated(", ");
            for id in &t.ids {
                list.push_bind(id.hyphenated().to_string());
            }
            qb.push(")");
        }
        if let Some(subject) = &t.subject {
            qb.push(" OR (subject = ")
                .push_bind(subject.as_str())
                .push(" AND created_at <= ")
                .push_bind(t.at_us)
                .push(")");
        }
        qb.push(") LIMIT ").push_bind(ROWS_PER_STATEMENT as i64);
        let rows: Vec<(i64, String, String)> = qb.build_query_as().fetch_all(&mut *tx).await?;
        if rows.is_empty() {
            break;
        }
        // A contentless index forgets a row only when told its words.
        for (rowid, payload, _) in &rows {
            let words = payload_words(payload.as_bytes());
            if !words.is_empty() {
                sqlx::query(
                    "INSERT INTO spool_entries_words (spool_entries_words, rowid, words) \
                     VALUES ('delete', ?, ?)",
                )
                .bind(rowid)
                .bind(words)
                .execute(&mut *tx)
                .await?;
            }
        }
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new("DELETE FROM spool_entries WHERE rowid IN (");
        let mut list = qb.separated(", ");
        for (rowid, _, _) in &rows {
            list.push_bind(*rowid);
        }
        qb.push(")");
        qb.build().execute(&mut *tx).await?;
        deleted.extend(rows.into_iter().map(|r| r.2));
    }
    tx.commit().await?;
    Ok(deleted)
}

impl SqliteDestination {
    /// Read every embedding of `source` with `dims` numbers into a new shelf
    /// (its registered one gets what writers commit meanwhile; see `vectors`).
    async fn read_shelf(&self, source: &str, dims: usize) -> Result<Shelf> {
        let mut shelf = Shelf::default();
        let mut rows = sqlx::query_as::<_, (String, i64, Option<String>, Vec<u8>)>(
            "SELECT id, created_at, subject, embedding FROM spool_entries \
             WHERE source = ? AND length(embedding) = ?",
        )
        .bind(source)
        .bind((dims * 4) as i64)
        .fetch(&self.readers);
        let mut v = Vec::with_capacity(dims);
        while let Some(row) = rows.try_next().await.map_err(|e| self.err(e))? {
            let (id, at, subject, blob) = row;
            v.clear();
            v.extend(
                blob.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
            );
            shelf.add(self.uuid(&id)?, at, subject.as_deref(), &v, dims);
        }
        Ok(shelf)
    }

    pub(super) async fn known_ids(&self, source: &str, ids: &[Uuid]) -> Result<Vec<Uuid>> {
        self.ready().await?;
        let mut found = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT id FROM spool_entries WHERE source = ");
            qb.push_bind(source).push(" AND id IN (");
            let mut list = qb.separated(", ");
            for id in chunk {
                list.push_bind(id.hyphenated().to_string());
            }
            qb.push(")");
            let rows: Vec<String> = qb
                .build_query_scalar()
                .fetch_all(&self.readers)
                .await
                .map_err(|e| self.err(e))?;
            for id in rows {
                found.push(self.uuid(&id)?);
            }
        }
        Ok(found)
    }

    pub(super) async fn search_hits(&self, s: &Search) -> Result<Vec<Hit>> {
        s.check()?;
        self.ready().await?;
        let n = recall::candidates(s.k);
        let mut text = Vec::new();
        if let Some(w) = s.words() {
            // Matches newest first: the contentless index keeps no term statistics.
            let mut qb: QueryBuilder<Sqlite> =
                QueryBuilder::new("SELECT id FROM spool_entries WHERE source = ");
            qb.push_bind(s.source.as_str());
            push_filters(&mut qb, s);
            qb.push(
                " AND rowid IN (SELECT rowid FROM spool_entries_words WHERE spool_entries_words MATCH ",
            )
            .push_bind(fts5_query(&w))
            .push(") ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(n as i64);
            let ids: Vec<String> = qb
                .build_query_scalar()
                .fetch_all(&self.readers)
                .await
                .map_err(|e| self.err(e))?;
            text = ids.iter().map(|id| self.uuid(id)).collect::<Result<_>>()?;
        }
        let mut vector = Vec::new();
        if let Some(v) = &s.embedding {
            let shelf = self.vectors.shelf(&s.source, v.len());
            if !shelf.read().await.loaded {
                let _one = self.vectors.loading.lock().await;
                if !shelf.read().await.loaded {
                    let read = self.read_shelf(&s.source, v.len()).await?;
                    shelf.write().await.finish_load(read, v.len());
                }
            }
            vector = shelf.read().await.search(s, v, n);
        }
        let fused = recall::fuse(&text, &vector, s.k);
        if fused.is_empty() {
            return Ok(Vec::new());
        }
        let mut qb: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {COLUMNS} FROM spool_entries WHERE id IN ("));
        let mut list = qb.separated(", ");
        for f in &fused {
            list.push_bind(f.0.hyphenated().to_string());
        }
        qb.push(")");
        let rows = qb
            .build()
            .fetch_all(&self.readers)
            .await
            .map_err(|e| self.err(e))?;
        let entries = rows.iter().map(|r| self.row(r)).collect::<Result<_>>()?;
        Ok(recall::hits(fused, entries))
    }

    pub(super) async fn forget_rows(&self, t: &Tombstone) -> Result<u64> {
        self.ready().await?;
        let mut conn = self.writer.acquire().await.map_err(|e| self.err(e))?;
        let ids = delete_forgotten(&mut conn, t).await.map_err(|e| {
            conn.close_on_drop();
            self.err(e)
        })?;
        let ids: Vec<Uuid> = ids
            .iter()
            .filter_map(|id| Uuid::try_parse(id).ok())
            .collect();
        // Under the writer, like adds: index updates follow commit order.
        self.vectors.removed(&t.source, &ids).await;
        drop(conn);
        Ok(ids.len() as u64)
    }
}
