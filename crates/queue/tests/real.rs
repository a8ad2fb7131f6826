//! The engine's key scenarios against real destinations: a real SQLite file and
//! a real PostgreSQL server the harness starts (poison isolation, an outage).

mod common;

use common::entry;
use spool_destination::{Destination, PostgresDestination, SqliteDestination};
use spool_queue::{Engine, EngineConfig, IngestError, Outcome};
use spool_testkit::PgServer;
use spool_wal::{Entry, Wal, WalConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cfg() -> EngineConfig {
    EngineConfig {
        capacity: 40,
        workers: 2,
        batch_max: 50,
        batch_linger: Duration::from_millis(2),
        max_attempts: 2,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..EngineConfig::default()
    }
}

fn raw(n: u64, payload: &str) -> Entry {
    let mut e = entry(n);
    e.payload = payload.as_bytes().to_vec();
    e
}

/// A batch with one entry the destination refuses: it alone is a dead letter.
async fn poison_is_isolated(dest: Arc<dyn Destination>, bad: &str) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(
        Wal::open(dir.path(), WalConfig::default()).unwrap(),
        vec![dest.clone()],
        cfg(),
    )
    .unwrap();
    let mut batch: Vec<Entry> = (0..8).map(entry).collect();
    batch[3] = raw(3, bad);
    let r = engine.ingest(batch, true).await.unwrap();
    let ids: Vec<_> = r.accepted.iter().map(|a| a.id).collect();
    let out = r.outcomes().await;
    for (i, o) in out.iter().enumerate() {
        if i == 3 {
            assert!(matches!(o, Outcome::Failed { .. }), "{o:?}");
        } else {
            assert_eq!(*o, Outcome::Delivered, "entry {i}");
            assert!(dest.get("agents", ids[i]).await.unwrap().is_some());
        }
    }
    assert!(dest.get("agents", ids[3]).await.unwrap().is_none());
    let dead = engine.dead_letters(None, 10);
    assert_eq!((dead.len(), dead[0].id), (1, ids[3]));
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn sqlite_poison_entry_is_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDestination::open(
        "main",
        &dir.path().join("spool.db"),
        None,
        spool_destination::DEFAULT_SQLITE_TIMEOUT,
    )
    .unwrap();
    poison_is_isolated(Arc::new(db), "{not json").await;
}

#[tokio::test]
async fn postgres_poison_entry_is_isolated() {
    let url = PgServer::shared().fresh_database();
    let db = PostgresDestination::open("main", &url, Some(2), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    poison_is_isolated(Arc::new(db), r#"{"a":"x\u0000y"}"#).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_sheds_without_dead_letters_and_delivers_after_recovery() {
    let mut pg = PgServer::start();
    let dest = Arc::new(
        PostgresDestination::open(
            "main",
            pg.url(),
            Some(2),
            spool_destination::DEFAULT_TIMEOUT,
        )
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(
        Wal::open(dir.path(), WalConfig::default()).unwrap(),
        vec![dest.clone()],
        cfg(),
    )
    .unwrap();
    let before = engine.ingest(vec![entry(0)], true).await.unwrap();
    assert_eq!(before.outcomes().await, vec![Outcome::Delivered]);

    pg.stop();
    let mut receipts = Vec::new();
    let mut n = 1;
    let full = loop {
        match engine.ingest(vec![entry(n)], true).await {
            Ok(r) => receipts.push(r),
            Err(IngestError::Full { retry_after, .. }) => break retry_after,
            Err(e) => panic!("{e}"),
        }
        n += 1;
        assert!(n < 100, "capacity not enforced");
    };
    assert!(full >= Duration::from_secs(1));
    assert_eq!(receipts.len(), 40);
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.lanes()[0].up {
        assert!(Instant::now() < deadline, "the outage was never detected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Keep it down across several probe rounds: still no dead letters (max_attempts = 2).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(engine.dead_letters(None, 100).is_empty());
    assert!(matches!(
        engine.ingest(vec![entry(500)], false).await,
        Err(IngestError::Full { .. })
    ));

    pg.restart();
    let mut ids = Vec::new();
    for r in receipts {
        ids.push(r.accepted[0].id);
        assert_eq!(
            r.wait(Duration::from_secs(30)).await,
            vec![Outcome::Delivered]
        );
    }
    for id in ids {
        assert!(dest.get("agents", id).await.unwrap().is_some());
    }
    assert!(engine.lanes()[0].up);
    assert!(engine.dead_letters(None, 100).is_empty());
    engine.ingest(vec![entry(999)], false).await.unwrap();
    engine.shutdown(Duration::from_secs(5)).await;
}
