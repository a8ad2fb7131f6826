//! Vector recall on PostgreSQL: with pgvector when the server has it, else an
//! exact scan in spool.
//!
//! Embeddings are stored as `real[]` either way (schema 4), so the extension can
//! be installed (or removed) later without touching a row. At the first contact,
//! after the migrations, [`probe`] looks for the `vector` extension and, if it is
//! missing, tries `CREATE EXTENSION IF NOT EXISTS vector` (which needs the
//! extension's files on the server and the right to create it); a failure only
//! means the exact path.
//!
//! - **pgvector**: a search of D dims ranks by `embedding::vector(D) <=> q`
//!   (cosine distance) in the server. The first such search starts building an
//!   HNSW index on exactly that expression, for rows of D dims
//!   (`spool_entries_vec<D>`, `CREATE INDEX CONCURRENTLY` on a connection of its
//!   own: writes go on meanwhile); until it is valid the same query is an exact
//!   scan in the server. With the index, results are approximate (HNSW); filters
//!   (source, subject, time) use pgvector's iterative scan (0.8+) so a filtered
//!   search still fills its `k`.
//! - **exact**: every row of the source with D dims is streamed to spool and
//!   ranked there ([`TopK`]). Also used for D beyond pgvector's 16,000.

use super::{push_filters, PostgresDestination};
use crate::recall::{Search, TopK};
use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Connection, Executor, Postgres, QueryBuilder};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Most dimensions pgvector's `vector` type holds.
const MAX_VECTOR_DIMS: usize = 16_000;
/// Most dimensions an HNSW index over `vector` takes.
const MAX_INDEX_DIMS: usize = 2_000;
/// How long after a failed (or someone else's unfinished) index build a
/// search looks at the index again.
const INDEX_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// The `vector` extension as found in the server.
#[derive(Debug)]
pub(super) struct Pgvector {
    /// Its version has iterative index scans (0.8.0 and later).
    iterative: bool,
    /// Dimensions whose index this process is building or has built.
    indexing: Arc<Mutex<HashSet<usize>>>,
}

/// Find (or create) the `vector` extension. `Ok(None)`: the server cannot have
/// it (no extension files, no right to create it) — the exact path. An error
/// (connection lost, timeout) is an outage: the probe runs again at the next
/// contact rather than settling on the slow path.
pub(super) async fn probe(pool: &PgPool, name: &str) -> sqlx::Result<Option<Pgvector>> {
    let installed = || {
        sqlx::query_scalar::<_, String>(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'",
        )
        .fetch_optional(pool)
    };
    let mut version = installed().await?;
    if version.is_none() {
        match pool.execute("CREATE EXTENSION IF NOT EXISTS vector").await {
            Ok(_) => version = installed().await?,
            Err(e) => match sqlstate(&e).as_deref() {
                // Another node created it meanwhile.
                Some("23505" | "42710") => version = installed().await?,
                // No extension files (58P01), not allowed (42501), not
                // supported (0A000): the exact path.
                Some("58P01" | "42501" | "0A000") => {
                    tracing::info!(destination = %name, reason = %e, "pgvector not available: vector recall scans exactly in spool");
                    return Ok(None);
                }
                _ => return Err(e),
            },
        }
    }
    Ok(version.map(|v| {
        tracing::info!(destination = %name, version = %v, "vector recall uses pgvector");
        Pgvector {
            iterative: at_least(&v, (0, 8)),
            indexing: Arc::default(),
        }
    }))
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned())
}

/// Whether a version string `major.minor[.patch]` is at least `want`.
fn at_least(version: &str, want: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= want
}

/// The HNSW index for `dims` dimensions.
pub(super) fn index_name(dims: usize) -> String {
    format!("spool_entries_vec{dims}")
}

impl PostgresDestination {
    /// The `n` nearest of `s.embedding` among the source's rows, with their
    /// cosine similarity, nearest first.
    pub(super) async fn nearest(
        &self,
        s: &Search,
        v: &[f32],
        n: i64,
    ) -> crate::Result<Vec<(Uuid, f32)>> {
        let dims = v.len();
        let Some(pv) = self.pgvector().await?.filter(|_| dims <= MAX_VECTOR_DIMS) else {
            return self.run(exact(&self.pool, s, v, n)).await;
        };
        if dims <= MAX_INDEX_DIMS && pv.indexing.lock().unwrap().insert(dims) {
            let (pool, name) = (self.pool.clone(), self.name.clone());
            let indexing = pv.indexing.clone();
            tokio::spawn(async move {
                if !build_index(pool, &name, dims).await {
                    // Not built (failed, or another session is building it):
                    // a search a minute from now looks again.
                    tokio::time::sleep(INDEX_RETRY).await;
                    indexing.lock().unwrap().remove(&dims);
                }
            });
        }
        let (pool, name) = (&self.pool, &self.name);
        self.run(async move {
            let hits = match in_server(pool, pv, s, v, n, true).await {
                // The extension is there but its type or operator is not
                // reachable (a schema off the search_path, dropped since).
                Err(e) if matches!(sqlstate(&e).as_deref(), Some("42704" | "42883")) => {
                    tracing::warn!(destination = %name, error = %e, "pgvector is not usable here; scanning exactly in spool");
                    return exact(pool, s, v, n).await;
                }
                r => r?,
            };
            // The index scan stops early (pgvector < 0.8 at ef_search, 0.8 at
            // max_scan_tuples): a source that is a small part of the rows can
            // come back short. Short means "ask again, exactly".
            if (hits.len() as i64) < n {
                return in_server(pool, pv, s, v, n, false).await;
            }
            Ok(hits)
        })
        .await
    }
}

/// Rank in the server with pgvector: through the index when `indexed` (once
/// it is valid), else exactly (ordering by an expression the index does not
/// have).
async fn in_server(
    pool: &PgPool,
    pv: &Pgvector,
    s: &Search,
    v: &[f32],
    n: i64,
    indexed: bool,
) -> sqlx::Result<Vec<(Uuid, f32)>> {
    let d = v.len();
    let mut tx = pool.begin().await?;
    // ef_search bounds what one index scan can return.
    tx.execute(format!("SET LOCAL hnsw.ef_search = {}", n.clamp(40, 1000)).as_str())
        .await?;
    if pv.iterative {
        tx.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            .await?;
    }
    // The expression and the predicate must read exactly as in the index, with
    // D a literal, for the planner to use it.
    let distance = format!("embedding::vector({d}) <=> ");
    let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT id, (1 - (");
    qb.push(&distance)
        .push_bind(v.to_vec())
        .push(format!("::real[]::vector({d})))::real FROM spool_entries WHERE cardinality(embedding) = {d} AND source = "))
        .push_bind(s.source.as_str());
    push_filters(&mut qb, s);
    // `(…) + 0` is not the index's expression: an exact scan in the server.
    let (open, close) = if indexed { ("", "") } else { ("(", ") + 0") };
    qb.push(" ORDER BY ")
        .push(open)
        .push(&distance)
        .push_bind(v.to_vec())
        .push(format!("::real[]::vector({d}){close} LIMIT "))
        .push_bind(n);
    let hits = qb.build_query_as().fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(hits)
}

/// Stream the source's rows of this many dims and rank them here.
async fn exact(pool: &PgPool, s: &Search, v: &[f32], n: i64) -> sqlx::Result<Vec<(Uuid, f32)>> {
    let mut qb: QueryBuilder<Postgres> =
        QueryBuilder::new("SELECT id, embedding FROM spool_entries WHERE source = ");
    qb.push_bind(s.source.as_str())
        .push(" AND cardinality(embedding) = ")
        .push_bind(v.len() as i32);
    push_filters(&mut qb, s);
    let mut top = TopK::new(v, n as usize);
    let mut rows = qb.build_query_as::<(Uuid, Vec<f32>)>().fetch(pool);
    while let Some((id, e)) = rows.try_next().await? {
        top.offer(id, &e);
    }
    Ok(top.into_sorted())
}

/// Build the HNSW index for `dims`, on a connection of its own without a
/// statement timeout (a build over many rows takes long). An invalid index an
/// interrupted build left is dropped and built again (not one another session
/// is still building). Answers whether the index is there and valid; a failure
/// (a deadlock with a concurrent ANALYZE, the server going away) is logged.
async fn build_index(pool: PgPool, name: &str, dims: usize) -> bool {
    let index = index_name(dims);
    let build = async {
        let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
        // Whatever the role, database or URL set: a build takes long.
        conn.execute("SET statement_timeout = 0").await?;
        match index_valid(&mut conn, &index).await? {
            Some(true) => return Ok(true),
            Some(false) => {
                // Another session (another node, or this one's build that
                // outlived its connection) may still be building it.
                let building: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index \
                     WHERE index_relid = to_regclass($1))",
                )
                .bind(&index)
                .fetch_one(&mut conn)
                .await?;
                if building {
                    return Ok(false);
                }
                // What an interrupted build left: drop it, build again.
                conn.execute(format!("DROP INDEX CONCURRENTLY IF EXISTS {index}").as_str())
                    .await?;
            }
            None => {}
        }
        let started = std::time::Instant::now();
        conn.execute(
            format!(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON spool_entries \
                 USING hnsw ((embedding::vector({dims})) vector_cosine_ops) \
                 WHERE cardinality(embedding) = {dims}"
            )
            .as_str(),
        )
        .await?;
        // IF NOT EXISTS succeeds, doing nothing, while another session builds it.
        let built = index_valid(&mut conn, &index).await? == Some(true);
        if built {
            tracing::info!(destination = %name, %index, elapsed_ms = started.elapsed().as_millis() as u64, "built the vector index");
        }
        conn.close().await?;
        Ok::<_, sqlx::Error>(built)
    };
    match build.await {
        Ok(built) => built,
        Err(e) => {
            tracing::warn!(destination = %name, %index, error = %e, "building the vector index failed; searches scan exactly in the server, and one a minute from now tries again");
            false
        }
    }
}

/// Whether `index` is valid; `None` if there is no such index.
async fn index_valid(conn: &mut PgConnection, index: &str) -> sqlx::Result<Option<bool>> {
    sqlx::query_scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)")
        .bind(index)
        .fetch_optional(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::at_least;

    #[test]
    fn versions_compare_by_major_then_minor() {
        assert!(at_least("0.8.0", (0, 8)));
        assert!(at_least("0.10.1", (0, 8)));
        assert!(at_least("1.0", (0, 8)));
        assert!(!at_least("0.7.4", (0, 8)));
        assert!(!at_least("garbage", (0, 8)));
    }
}
