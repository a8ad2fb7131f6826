//! Idempotency keys: replays write nothing, concurrent duplicates write once,
//! the index survives restarts and is rebuilt from the WAL when lost or damaged.

mod common;

use common::*;
use spool_queue::{Engine, EngineConfig, Outcome};
use spool_wal::{Entry, Wal, WalConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn keyed(source: &str, key: &str, n: u64) -> Entry {
    let mut e = entry(n);
    e.source = source.into();
    e.idempotency_key = Some(key.into());
    e
}

fn cfg(index: Option<&Path>) -> EngineConfig {
    EngineConfig {
        capacity: 1000,
        workers: 2,
        batch_max: 100,
        batch_linger: Duration::from_millis(1),
        key_index: index.map(Path::to_owned),
        ..EngineConfig::default()
    }
}

fn start(dir: &Path, dest: &Arc<Faulty>, index: bool) -> Engine {
    let wal = Wal::open(dir.join("wal"), WalConfig::default()).unwrap();
    let idx = dir.join("keys");
    Engine::start(wal, vec![dest.clone()], cfg(index.then_some(idx.as_path()))).unwrap()
}

#[tokio::test]
async fn a_repeated_key_answers_the_original_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let engine = start(dir.path(), &dest, false);
    let first = engine
        .ingest(vec![keyed("agents", "k1", 1)], true)
        .await
        .unwrap();
    assert!(!first.any_replayed());
    let original = first.accepted[0].clone();
    assert_eq!(first.outcomes().await, vec![Outcome::Delivered]);
    let lsn_before = engine.wal_status().visible_lsn;

    let again = engine
        .ingest(vec![keyed("agents", "k1", 2)], true)
        .await
        .unwrap();
    assert!(again.any_replayed());
    assert_eq!(
        (again.accepted[0].id, again.accepted[0].lsn),
        (original.id, original.lsn)
    );
    assert_eq!(
        again.outcomes().await,
        vec![Outcome::Delivered],
        "current status of the original"
    );
    assert_eq!(
        engine.wal_status().visible_lsn,
        lsn_before,
        "a replay reached the WAL"
    );
    assert_eq!(dest.row_count(), 1);

    // The same key of another source is another entry; a key twice in one call is written once.
    let other = engine
        .ingest(vec![keyed("robots", "k1", 3)], false)
        .await
        .unwrap();
    assert!(!other.any_replayed());
    assert_ne!(other.accepted[0].id, original.id);
    let twice = engine
        .ingest(
            vec![keyed("agents", "k2", 4), entry(5), keyed("agents", "k2", 6)],
            true,
        )
        .await
        .unwrap();
    let a = &twice.accepted;
    assert_eq!(
        (a[0].replayed, a[1].replayed, a[2].replayed),
        (false, false, true)
    );
    assert_eq!(a[0].id, a[2].id);
    assert_eq!(twice.outcomes().await, vec![Outcome::Delivered; 3]);
    assert_eq!(dest.row_count(), 4);
}

#[tokio::test]
async fn a_replay_of_a_dead_letter_reports_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let engine = start(dir.path(), &dest, false);
    let mut e = poison(1);
    e.idempotency_key = Some("bad".into());
    let mut e2 = e.clone();
    e2.id = uuid::Uuid::now_v7();
    assert!(matches!(
        engine.ingest(vec![e], true).await.unwrap().outcomes().await[0],
        Outcome::Failed { .. }
    ));
    let again = engine.ingest(vec![e2], true).await.unwrap();
    assert!(again.any_replayed());
    assert!(
        matches!(&again.wait(Duration::ZERO).await[0], Outcome::Failed { reason } if reason.contains("constraint"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_write_exactly_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let engine = start(dir.path(), &dest, true);
    for round in 0..20 {
        let key = format!("race-{round}");
        let mut tasks = Vec::new();
        for n in 0..16 {
            let (engine, key) = (engine.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                // Half the calls carry the key alongside an unkeyed entry.
                let mut batch = vec![keyed("agents", &key, n)];
                if n % 2 == 0 {
                    batch.push(entry(1000 + n));
                }
                engine.ingest(batch, false).await.unwrap().accepted[0].clone()
            }));
        }
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        assert_eq!(
            answers.iter().filter(|a| !a.replayed).count(),
            1,
            "round {round}: {answers:?}"
        );
        assert!(answers
            .windows(2)
            .all(|w| (w[0].id, w[0].lsn) == (w[1].id, w[1].lsn)));
    }
    engine.shutdown(Duration::from_secs(5)).await;
    // 20 keyed entries and 8 × 20 unkeyed ones, nothing more.
    let wal =
        spool_wal::Wal::open(dir.path().join("wal"), spool_wal::WalConfig::default()).unwrap();
    let wal_entries = wal
        .reader(1)
        .filter(|r| matches!(r, Ok((_, spool_wal::Record::Entry(_)))))
        .count();
    assert_eq!(wal_entries, 20 + 8 * 20);
}

#[tokio::test]
async fn keys_outside_the_window_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let cfg = EngineConfig {
        idempotency_window: Duration::from_secs(3600),
        ..cfg(None)
    };
    let engine = Engine::start(wal, vec![dest.clone()], cfg).unwrap();
    let mut old = keyed("agents", "k", 1);
    old.accepted_at_us -= 2 * 3600 * 1_000_000;
    let first = engine.ingest(vec![old], false).await.unwrap();
    let second = engine
        .ingest(vec![keyed("agents", "k", 2)], false)
        .await
        .unwrap();
    assert!(
        !second.any_replayed(),
        "a key older than the window must not replay"
    );
    assert_ne!(first.accepted[0].id, second.accepted[0].id);
    // The fresh one is remembered.
    assert!(engine
        .ingest(vec![keyed("agents", "k", 3)], false)
        .await
        .unwrap()
        .any_replayed());
}

#[tokio::test]
async fn the_index_survives_restarts_and_is_rebuilt_when_lost_or_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let engine = start(dir.path(), &dest, true);
    let original = engine
        .ingest(vec![keyed("agents", "persist", 1)], false)
        .await
        .unwrap()
        .accepted[0]
        .clone();
    engine.shutdown(Duration::from_secs(5)).await;
    drop(engine);

    let replays = |engine: Engine| async move {
        let r = engine
            .ingest(vec![keyed("agents", "persist", 2)], false)
            .await
            .unwrap();
        let a = r.accepted[0].clone();
        engine.shutdown(Duration::from_secs(5)).await;
        a
    };
    // Restart with the index as left.
    let a = replays(start(dir.path(), &dest, true)).await;
    assert!(a.replayed && a.id == original.id, "after restart: {a:?}");
    // Index deleted: rebuilt from the WAL.
    std::fs::remove_dir_all(dir.path().join("keys")).unwrap();
    let a = replays(start(dir.path(), &dest, true)).await;
    assert!(a.replayed && a.id == original.id, "after deletion: {a:?}");
    // Index damaged: every file overwritten with garbage → discarded and rebuilt.
    for f in walk(&dir.path().join("keys")) {
        std::fs::write(&f, b"garbage, not a sled file").unwrap();
    }
    let a = replays(start(dir.path(), &dest, true)).await;
    assert!(a.replayed && a.id == original.id, "after damage: {a:?}");
    assert_eq!(dest.row_count(), 1);
}

#[tokio::test]
async fn keys_appended_after_the_last_mark_are_recovered_from_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let engine = start(dir.path(), &dest, true);
    engine
        .ingest(vec![keyed("agents", "early", 0)], false)
        .await
        .unwrap();
    engine.shutdown(Duration::from_secs(5)).await;
    drop(engine);
    // Entries whose index insert was lost (a crash between append and index):
    // in the WAL, past the index's mark, absent from the index.
    let late: Vec<Entry> = (0..5)
        .map(|n| keyed("agents", &format!("late-{n}"), n))
        .collect();
    {
        let wal = Wal::open(dir.path().join("wal"), WalConfig::default()).unwrap();
        wal.append(&late).await.unwrap();
        wal.close();
    }
    let engine = start(dir.path(), &dest, true);
    for (n, e) in late.iter().enumerate() {
        let r = engine
            .ingest(
                vec![keyed("agents", &format!("late-{n}"), 100 + n as u64)],
                false,
            )
            .await
            .unwrap();
        assert!(
            r.any_replayed() && r.accepted[0].id == e.id,
            "key late-{n}: {:?}",
            r.accepted
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `wait=delivered` replays of a still-pending entry whose callers gave up must
/// not pile up receipt senders (before: one per replay, kept until delivery).
#[tokio::test]
async fn replays_of_a_pending_entry_do_not_grow_the_waiter_list() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let engine = start(dir.path(), &dest, false);
    let first = engine
        .ingest(vec![keyed("agents", "k", 1)], true)
        .await
        .unwrap();
    for n in 0..1000 {
        let again = engine
            .ingest(vec![keyed("agents", "k", n + 2)], true)
            .await
            .unwrap();
        assert!(again.any_replayed());
        // The caller's deadline passes: its receipt is dropped.
        assert_eq!(again.wait(Duration::ZERO).await, vec![Outcome::Pending]);
    }
    assert!(
        engine.waiting() <= 2,
        "{} receipt senders kept for one pending entry",
        engine.waiting()
    );
    dest.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(first.outcomes().await, vec![Outcome::Delivered]);
}
