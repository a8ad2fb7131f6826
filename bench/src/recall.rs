//! `spool-bench recall`: search latency over N memories with D-dimensional
//! embeddings, per mode (text, vector, hybrid), written straight into a
//! destination, and recall@10 of the vector path against an exact top 10
//! computed here (1.0 where the destination scans exactly; below with
//! pgvector's HNSW index, whose build this waits for and reports — run against
//! a PostgreSQL with pgvector with `SPOOL_PG_BINDIR=/tmp/spool-pgvector/pgserver/pginstall/bin`
//! after `make pgvector`).

use crate::{bench_destination, percentile, round2};
use anyhow::Result;
use serde_json::json;
use spool_destination::Search;
use spool_wal::{Entry, LoggedEntry};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

/// Words of the generated texts (each memory holds 12 of them).
const VOCABULARY: usize = 5000;
/// Intrinsic dimension of the generated embeddings.
const LATENT: usize = 16;
/// Noise added to each embedding, per dimension, against a basis entry.
const NOISE: f32 = 0.05;

/// A small deterministic generator (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vector(&mut self, dims: usize) -> Vec<f32> {
        (0..dims).map(|_| self.unit()).collect()
    }
    /// A vector like a real embedding: a point of a low-dimensional manifold
    /// (a fixed random projection of `LATENT` latent numbers) plus a little
    /// noise — uniformly random vectors in 384 dims have no neighbourhoods at
    /// all, so no approximate index finds them (recall@10 of pgvector's HNSW on
    /// them: 0.09), while real embeddings' intrinsic dimension is low.
    fn embedding(&mut self, basis: &[Vec<f32>]) -> Vec<f32> {
        let dims = basis[0].len();
        let mut v: Vec<f32> = self.vector(dims).iter().map(|x| x * NOISE).collect();
        for b in basis {
            let z = self.unit();
            for (x, y) in v.iter_mut().zip(b) {
                *x += z * y;
            }
        }
        v
    }
    fn text(&mut self) -> String {
        (0..12)
            .map(|_| format!("w{}", self.next() % VOCABULARY as u64))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut d, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        d += x * y;
        na += x * x;
        nb += y * y;
    }
    d / (na.sqrt() * nb.sqrt())
}

pub async fn recall(
    kind: &str,
    url: Option<String>,
    path: Option<PathBuf>,
    memories: usize,
    dims: usize,
    queries: usize,
) -> Result<Vec<serde_json::Value>> {
    let tmp = tempfile::tempdir()?;
    let path = path.unwrap_or_else(|| tmp.path().join("recall.db"));
    let (dest, server) = bench_destination(kind, url.clone(), &path, 4).await?;
    let pg_url = url.or_else(|| server.as_ref().map(|s| s.url().to_owned()));
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let basis: Vec<Vec<f32>> = (0..LATENT).map(|_| rng.vector(dims)).collect();
    let mut vectors: Vec<(uuid::Uuid, Vec<f32>)> = Vec::with_capacity(memories);
    let load = Instant::now();
    let mut batch = Vec::with_capacity(1000);
    for i in 0..memories {
        let mut e = Entry::new(
            "bench",
            "bench",
            json!({ "text": rng.text() }).to_string().into_bytes(),
        );
        let v = rng.embedding(&basis);
        e.embedding = Some(v.clone());
        vectors.push((e.id, v));
        batch.push(LoggedEntry {
            lsn: i as u64 + 1,
            entry: e,
        });
        if batch.len() == 1000 || i + 1 == memories {
            dest.write_batch(&batch).await?;
            batch.clear();
        }
    }
    let load_secs = load.elapsed().as_secs_f64();
    let index_secs = match &pg_url {
        Some(u) => {
            let first = Search {
                source: "bench".into(),
                embedding: Some(rng.embedding(&basis)),
                k: 10,
                ..Search::default()
            };
            vector_index(u, dims, dest.search(&first)).await?
        }
        None => None,
    };
    let mut out = Vec::new();
    for mode in ["text", "vector", "hybrid"] {
        // The first search of a mode is timed apart: SQLite's first vector
        // search loads the source's embeddings into memory.
        let cold = Instant::now();
        dest.search(&Search {
            source: "bench".into(),
            q: (mode != "vector").then(|| "w1".to_owned()),
            embedding: (mode != "text").then(|| rng.embedding(&basis)),
            k: 10,
            ..Search::default()
        })
        .await?;
        let cold_ms = round2(cold.elapsed().as_secs_f64() * 1000.0);
        let mut lat = Vec::with_capacity(queries);
        let mut found = 0usize;
        let mut wanted = 0usize;
        for _ in 0..queries {
            let q: Vec<f32> = rng.embedding(&basis);
            let words = format!("w{} w{}", rng.next() % 50, rng.next() % 50);
            let s = Search {
                source: "bench".into(),
                q: (mode != "vector").then(|| words.clone()),
                embedding: (mode != "text").then(|| q.clone()),
                k: 10,
                ..Search::default()
            };
            let t = Instant::now();
            let hits = dest.search(&s).await?;
            lat.push(t.elapsed().as_micros() as u32);
            if mode == "vector" {
                let mut exact: Vec<(f32, uuid::Uuid)> =
                    vectors.iter().map(|(id, v)| (cosine(&q, v), *id)).collect();
                exact.sort_by(|a, b| b.0.total_cmp(&a.0));
                let truth: HashSet<uuid::Uuid> = exact.iter().take(10).map(|e| e.1).collect();
                wanted += truth.len();
                found += hits
                    .iter()
                    .filter(|h| truth.contains(&h.entry.entry.id))
                    .count();
            }
        }
        lat.sort_unstable();
        out.push(json!({
            "bench": "recall",
            "destination": kind,
            "mode": mode,
            "memories": memories,
            "dims": dims,
            "queries": queries,
            "p50_ms": round2(percentile(&lat, 0.5) as f64 / 1000.0),
            "p99_ms": round2(percentile(&lat, 0.99) as f64 / 1000.0),
            "recall_at_10": (wanted > 0).then(|| round2(found as f64 / wanted as f64)),
            "first_ms": cold_ms,
            "load_secs": round2(load_secs),
            "index_secs": index_secs.map(round2),
        }));
    }
    dest.close().await;
    Ok(out)
}

/// On Postgres: ANALYZE (as autovacuum would after the load), then `first` (a
/// vector search, which starts pgvector's index build) and the build's time, or
/// `None` without pgvector.
async fn vector_index(
    url: &str,
    dims: usize,
    first: impl std::future::Future<Output = spool_destination::Result<Vec<spool_destination::Hit>>>,
) -> Result<Option<f64>> {
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::query("ANALYZE spool_entries").execute(&pool).await?;
    let started = Instant::now();
    first.await?;
    let has: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')")
            .fetch_one(&pool)
            .await?;
    // pgvector indexes at most 2,000 dimensions: beyond, no index is built.
    if !has || dims > 2000 {
        return Ok(None);
    }
    let index = format!("spool_entries_vec{dims}");
    loop {
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
        )
        .bind(&index)
        .fetch_optional(&pool)
        .await?;
        if valid == Some(true) {
            return Ok(Some(started.elapsed().as_secs_f64()));
        }
        anyhow::ensure!(
            started.elapsed() < std::time::Duration::from_secs(3600),
            "{index} was not built within an hour (see the server's log)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
