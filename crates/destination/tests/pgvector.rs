//! The Postgres destination's pgvector path, against a real PostgreSQL 18 with
//! pgvector 0.8 (`make pgvector` unpacks it; spool-testkit starts it): the
//! suite's recall and forgetting, and the HNSW index built, used, filtered and
//! close to the exact answer. (`tests/postgres.rs` runs the same suite on
//! Debian's PostgreSQL 15, which has no pgvector: the exact path.)

mod suite;

use spool_destination::{PostgresDestination, Search};
use spool_testkit::PgServer;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use suite::*;
use uuid::Uuid;

async fn fresh() -> (Dest, String) {
    let url = PgServer::shared_pgvector().fresh_database();
    let d = PostgresDestination::open("main", &url, Some(4), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    (Arc::new(d), url)
}

/// Another destination on the same database (new connections: new settings).
fn reopen(url: &str) -> (Dest, String) {
    let d = PostgresDestination::open("main", url, Some(4), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    (Arc::new(d), url.to_owned())
}

#[tokio::test]
async fn recall() {
    search_ranks_by_vector_text_and_both(fresh().await.0).await;
}

#[tokio::test]
async fn forgetting() {
    forgetting_deletes_by_id_and_by_subject_up_to_its_time(fresh().await.0).await;
}

/// Deterministic pseudo-random unit vectors.
fn vectors(n: usize, dims: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            let v: Vec<f32> = (0..dims)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect();
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            v.into_iter().map(|a| a / norm).collect()
        })
        .collect()
}

fn exact_top(rows: &[(Uuid, Vec<f32>)], q: &[f32], k: usize) -> Vec<Uuid> {
    let mut scored: Vec<(f32, Uuid)> = rows
        .iter()
        .map(|(id, v)| (v.iter().zip(q).map(|(a, b)| a * b).sum(), *id))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, id)| id).collect()
}

async fn poll<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_hnsw_index_is_built_used_filtered_and_close_to_exact() {
    const DIMS: usize = 16;
    let (d, url) = fresh().await;
    let vs = vectors(3000, DIMS, 7);
    let (mut rows, mut tiny) = (Vec::new(), Vec::new());
    let mut batch = Vec::new();
    for (i, v) in vs.iter().enumerate() {
        // Five rare ones among many, and another source's rows mixed in.
        let (source, subject) = match i {
            _ if i % 50 == 49 => ("tiny", None),
            _ if i % 10 == 9 => ("others", None),
            _ if i % 600 == 0 => ("agents", Some("rare")),
            _ => ("agents", None),
        };
        let mut le = logged(i as u64 + 1, source, subject, r#"{"t":"x"}"#, i as i64);
        le.entry.embedding = Some(v.clone());
        match source {
            "agents" => rows.push((le.entry.id, v.clone())),
            "tiny" => tiny.push((le.entry.id, v.clone())),
            _ => {}
        }
        batch.push(le);
    }
    for chunk in batch.chunks(500) {
        d.write_batch(chunk).await.unwrap();
    }
    let search = |q: &[f32], k: u32| Search {
        source: "agents".into(),
        embedding: Some(q.to_vec()),
        k,
        ..Search::default()
    };
    let queries = vectors(20, DIMS, 11);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    // What autovacuum does once a table has grown: without statistics the
    // planner takes the table for a few rows and sorts them instead.
    sqlx::query("ANALYZE spool_entries")
        .execute(&pool)
        .await
        .unwrap();
    // The first vector search starts the index build.
    d.search(&search(&queries[0], 10)).await.unwrap();
    poll("the HNSW index to be valid", async || {
        let valid: Option<bool> = sqlx::query_scalar(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('spool_entries_vec16')",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        valid.filter(|v| *v)
    })
    .await;
    let scans = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'spool_entries_vec16'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = scans().await;

    let mut found = 0;
    for q in &queries {
        let hits = d.search(&search(q, 10)).await.unwrap();
        let got: HashSet<Uuid> = hits.iter().map(|h| h.entry.entry.id).collect();
        assert_eq!(got.len(), 10);
        assert!(hits.iter().all(|h| h.entry.entry.source == "agents"));
        found += exact_top(&rows, q, 10)
            .iter()
            .filter(|id| got.contains(id))
            .count();
    }
    let recall = found as f64 / (10 * queries.len()) as f64;
    assert!(recall >= 0.9, "recall@10 of the HNSW path is {recall}");

    // A filter the index cannot see still fills k (iterative scan): all five.
    let mut rare = search(&queries[0], 10);
    rare.subject = Some("rare".into());
    assert_eq!(d.search(&rare).await.unwrap().len(), 5);

    // An index scan that stops early comes back short for a source that is a
    // small part of the rows (here 2%, with pgvector's hnsw.max_scan_tuples set
    // low for the database, and sorting made costly so the planner takes the
    // index): the search asks again exactly in the server, so k is filled
    // with the true nearest.
    let db = url.rsplit('/').next().unwrap();
    for setting in ["hnsw.max_scan_tuples = 5", "enable_sort = off"] {
        sqlx::query(&format!("ALTER DATABASE {db} SET {setting}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let (d2, _) = reopen(&url);
    for q in &queries[..3] {
        let mut few = search(q, 10);
        few.source = "tiny".into();
        let hits = d2.search(&few).await.unwrap();
        let got: Vec<Uuid> = hits.iter().map(|h| h.entry.entry.id).collect();
        assert_eq!(
            got,
            exact_top(&tiny, q, 10),
            "a short index scan was answered short"
        );
    }

    // Statistics reach the view within a second or so.
    poll("the index to be scanned", async || {
        (scans().await > before).then_some(())
    })
    .await;
}
