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

/// The `vector` extension as found in the server.
#[derive(Debug)]
pub(super) struct Pgvector {
    /// Its version has iterative index scans (0.8.0 and later).
    iterative: bool,
    /// Dimensions whose index this process is building or has built.
    indexing: Arc<Mutex<HashSet<usize>>>,
}

/// Find (or create) the `vector` extension. `None`: the exact path.
pub(super) async fn probe(pool: &PgPool, name: &str) -> Option<Pgvector> {
    let version = async {
        let found: Option<String> =
            sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                .fetch_optional(pool)
                .await?;
        match found {
            Some(v) => Ok(v),
            None => {
                pool.execute("CREATE EXTENSION IF NOT EXISTS vector")
                    .await?;
                sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                    .fetch_one(pool)
                    .await
            }
        }
    };
    match version.await {
        Ok(v) => {
            tracing::info!(destination = %name, version = %v, "vector recall uses pgvector");
            Some(Pgvector {
                iterative: at_least(&v, (0, 8)),
                indexing: Arc::default(),
            })
        }
        Err(e) => {
            tracing::info!(destination = %name, reason = %e, "pgvector not available: vector recall scans exactly in spool");
            None
        }
    }
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
        match self.pgvector().await? {
            Some(pv) if dims <= MAX_VECTOR_DIMS => {
                if dims <= MAX_INDEX_DIMS && pv.indexing.lock().unwrap().insert(dims) {
                    let (pool, name) = (self.pool.clone(), self.name.clone());
                    let indexing = pv.indexing.clone();
                    tokio::spawn(async move {
                        if !build_index(pool, &name, dims).await {
                            // The next search tries again.
                            indexing.lock().unwrap().remove(&dims);
                        }
                    });
                }
                self.run(in_server(&self.pool, pv, s, v, n)).await
            }
            _ => self.run(exact(&self.pool, s, v, n)).await,
        }
    }
}

/// Rank in the server with pgvector (through the index once it is valid).
async fn in_server(
    pool: &PgPool,
    pv: &Pgvector,
    s: &Search,
    v: &[f32],
    n: i64,
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
    qb.push(" ORDER BY ")
        .push(&distance)
        .push_bind(v.to_vec())
        .push(format!("::real[]::vector({d}) LIMIT "))
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
/// interrupted build left is dropped and built again. Answers whether the index
/// is there; a failure (a deadlock with a concurrent ANALYZE, another node's
/// build racing this one, the server going away) is logged.
async fn build_index(pool: PgPool, name: &str, dims: usize) -> bool {
    let index = index_name(dims);
    let build = async {
        let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
        )
        .bind(&index)
        .fetch_optional(&mut conn)
        .await?;
        match valid {
            Some(true) => return Ok(()),
            Some(false) => {
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
        tracing::info!(destination = %name, %index, elapsed_ms = started.elapsed().as_millis() as u64, "built the vector index");
        conn.close().await?;
        Ok::<_, sqlx::Error>(())
    };
    match build.await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(destination = %name, %index, error = %e, "building the vector index failed; searches scan exactly in the server, and the next one tries again");
            false
        }
    }
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
