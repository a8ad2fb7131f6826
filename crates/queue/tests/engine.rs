//! The engine against a fault-injecting destination (retry, backoff, breaker,
//! poison, drain, redrive) and against real SQLite.

mod common;

use common::*;
use spool_destination::{Destination, Query};
use spool_queue::{backoff_delay, Engine, EngineConfig, IngestError, Outcome, Select};
use spool_wal::{Wal, WalConfig};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn cfg() -> EngineConfig {
    EngineConfig {
        capacity: 1000,
        workers: 2,
        batch_max: 100,
        batch_linger: Duration::from_millis(2),
        max_attempts: 5,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        ..EngineConfig::default()
    }
}

fn wal(dir: &std::path::Path) -> Wal {
    Wal::open(dir, WalConfig::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_are_delivered_to_sqlite_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_in(dir.path());
    let engine = Engine::start(wal(&dir.path().join("wal")), vec![db.clone()], cfg()).unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25u64 {
                let batch: Vec<_> = (0..4).map(|k| entry(t * 1000 + i * 4 + k)).collect();
                let r = engine.ingest(batch, true).await.unwrap();
                ids.extend(r.accepted.iter().map(|a| a.id));
                assert!(r.outcomes().await.iter().all(|o| *o == Outcome::Delivered));
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1600);
    let page = db
        .query(&Query {
            source: "agents".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 1000);
    for id in &ids[..50] {
        assert!(db.get("agents", *id).await.unwrap().is_some());
    }
    assert_eq!(engine.wal_status().pending, 0);
    let r = engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(r.left_pending, 0);
}

#[tokio::test]
async fn a_full_queue_refuses_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.hang.store(true, Ordering::SeqCst);
    let engine = Engine::start(
        wal(dir.path()),
        vec![dest.clone()],
        EngineConfig {
            capacity: 10,
            ..cfg()
        },
    )
    .unwrap();
    engine
        .ingest((0..6).map(entry).collect(), false)
        .await
        .unwrap();
    engine
        .ingest((6..10).map(entry).collect(), false)
        .await
        .unwrap();
    let before = engine.wal_status();
    match engine.ingest(vec![entry(10)], false).await {
        Err(IngestError::Full {
            destination,
            retry_after,
        }) => {
            assert_eq!(destination, "main");
            assert!(retry_after >= Duration::from_secs(1));
        }
        other => panic!("expected Full, got {other:?}"),
    }
    // All or nothing: a call that needs 2 slots when 0 are free writes none.
    assert!(engine
        .ingest(vec![entry(11), entry(12)], false)
        .await
        .is_err());
    let after = engine.wal_status();
    assert_eq!(
        after.visible_lsn, before.visible_lsn,
        "a refused call reached the WAL"
    );
    assert_eq!(after.pending, 10);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_retry_with_capped_jittered_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.fail_next.store(3, Ordering::SeqCst);
    let engine = Engine::start(wal(dir.path()), vec![dest.clone()], cfg()).unwrap();
    let r = engine.ingest(vec![entry(1)], true).await.unwrap();
    assert_eq!(r.outcomes().await, vec![Outcome::Delivered]);
    let times = dest.attempts.lock().unwrap().clone();
    assert_eq!(times.len(), 4, "3 failures then a success");
    for (k, w) in times.windows(2).enumerate() {
        let gap = w[1] - w[0];
        let ceiling = backoff_delay(k as u32 + 1, cfg().backoff_initial, cfg().backoff_max, 1.0);
        assert!(
            gap <= ceiling + Duration::from_millis(5),
            "retry {k}: waited {gap:?} > {ceiling:?}"
        );
    }
    assert!(engine.dead_letters(None, 10).is_empty());
}

#[tokio::test(start_paused = true)]
async fn max_attempts_make_a_dead_letter_that_requeue_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.fail_always.store(true, Ordering::SeqCst);
    let engine = Engine::start(wal(dir.path()), vec![dest.clone()], cfg()).unwrap();
    let r = engine.ingest(vec![entry(1)], true).await.unwrap();
    let id = r.accepted[0].id;
    match &r.outcomes().await[0] {
        Outcome::Failed { reason } => assert!(reason.contains("internal error"), "{reason}"),
        o => panic!("expected failure, got {o:?}"),
    }
    assert_eq!(dest.attempts.lock().unwrap().len(), 5);
    let dead = engine.dead_letters(None, 10);
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].attempts), (id, 5));
    let lsn = dead[0].lsn;
    assert!(matches!(
        engine.status(lsn),
        Some(spool_queue::EntryStatus::Failed { attempts: 5, .. })
    ));
    // Capacity was released with the failure.
    assert_eq!(engine.lanes()[0].in_flight, 0);

    dest.fail_always.store(false, Ordering::SeqCst);
    let out = engine.requeue(Select::Ids(&[id])).await.unwrap();
    assert_eq!(out.done.iter().map(|d| d.id).collect::<Vec<_>>(), vec![id]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while dest.row_count() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requeued entry never delivered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while engine.status(lsn).is_some() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(engine.dead_letters(None, 10).is_empty());
}

#[tokio::test]
async fn a_poison_entry_is_isolated_and_the_rest_delivered() {
    for with_index in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let dest = Faulty::new("main");
        dest.reject_with_index.store(with_index, Ordering::SeqCst);
        let engine = Engine::start(wal(dir.path()), vec![dest.clone()], cfg()).unwrap();
        let mut batch: Vec<_> = (0..10).map(entry).collect();
        batch[6] = poison(6);
        let r = engine.ingest(batch, true).await.unwrap();
        let out = r.outcomes().await;
        for (i, o) in out.iter().enumerate() {
            if i == 6 {
                assert!(
                    matches!(o, Outcome::Failed { reason } if reason.contains("constraint")),
                    "{o:?}"
                );
            } else {
                assert_eq!(
                    *o,
                    Outcome::Delivered,
                    "entry {i} (with_index {with_index})"
                );
            }
        }
        assert_eq!(dest.row_count(), 9);
        let dead = engine.dead_letters(None, 10);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].attempts, 1, "a rejection is final at once");
    }
}

#[tokio::test]
async fn an_outage_fills_the_queue_without_dead_letters_and_everything_is_delivered_after() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.down.store(true, Ordering::SeqCst);
    let fast = EngineConfig {
        capacity: 50,
        max_attempts: 2,
        backoff_initial: Duration::from_millis(2),
        backoff_max: Duration::from_millis(20),
        ..cfg()
    };
    let engine = Engine::start(wal(dir.path()), vec![dest.clone()], fast).unwrap();
    let mut receipts = Vec::new();
    let mut n = 0;
    loop {
        match engine.ingest(vec![entry(n)], true).await {
            Ok(r) => receipts.push(r),
            Err(IngestError::Full { .. }) => break,
            Err(e) => panic!("{e}"),
        }
        n += 1;
        assert!(n <= 50, "capacity not enforced");
    }
    assert_eq!(receipts.len(), 50);
    // Plenty of write attempts and probes happen during the outage...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dest.attempts.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...but an outage burns no attempts: no dead letters although max_attempts = 2.
    assert!(engine.dead_letters(None, 100).is_empty());
    assert!(!engine.lanes()[0].up);
    dest.down.store(false, Ordering::SeqCst);
    for r in receipts {
        assert_eq!(r.outcomes().await, vec![Outcome::Delivered]);
    }
    assert_eq!(dest.row_count(), 50);
    assert!(engine.lanes()[0].up);
    engine.ingest(vec![entry(999)], false).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn drain_runs_once_for_concurrent_callers_and_honours_its_deadline_during_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.fail_always.store(true, Ordering::SeqCst);
    let slow = EngineConfig {
        max_attempts: 100,
        backoff_initial: Duration::from_secs(30),
        backoff_max: Duration::from_secs(30),
        ..cfg()
    };
    let engine = Engine::start(wal(dir.path()), vec![dest.clone()], slow).unwrap();
    let r = engine
        .ingest((0..5).map(entry).collect(), true)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        engine.shutdown(Duration::from_millis(200)),
        engine.shutdown(Duration::from_millis(200))
    );
    assert_eq!(a, b);
    assert!(a.deadline_passed);
    assert_eq!(a.left_pending, 5);
    assert_eq!(
        r.outcomes().await,
        vec![Outcome::Pending; 5],
        "receipts settle at shutdown"
    );
    assert!(matches!(
        engine.ingest(vec![entry(9)], false).await,
        Err(IngestError::Closed)
    ));
    assert_eq!(
        engine.shutdown(Duration::ZERO).await,
        a,
        "a third call gets the same report"
    );
    // What was not delivered is still pending for the next start.
    drop(engine);
    let w = wal(dir.path());
    assert_eq!(w.status().pending, 5);
}

#[tokio::test]
async fn a_wal_backlog_larger_than_the_queue_is_fed_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let w = wal(dir.path());
        for n in 0..300 {
            w.append(&[entry(n)]).await.unwrap();
        }
        w.close();
    }
    let dest = Faulty::new("main");
    let engine = Engine::start(
        wal(dir.path()),
        vec![dest.clone()],
        EngineConfig {
            capacity: 7,
            ..cfg()
        },
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while dest.row_count() < 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "backlog stuck at {}",
            dest.row_count()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while engine.wal_status().pending > 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // New ingests still work alongside.
    let r = engine.ingest(vec![entry(1000)], true).await.unwrap();
    assert_eq!(r.outcomes().await, vec![Outcome::Delivered]);
    assert_eq!(
        engine.shutdown(Duration::from_secs(5)).await.left_pending,
        0
    );
}

#[tokio::test]
async fn an_unknown_destination_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(
        wal(dir.path()),
        vec![Faulty::new("main") as Arc<dyn Destination>],
        cfg(),
    )
    .unwrap();
    let mut e = entry(1);
    e.destination = "nope".into();
    assert!(matches!(
        engine.ingest(vec![entry(0), e], false).await,
        Err(IngestError::UnknownDestination(_))
    ));
    assert_eq!(engine.wal_status().visible_lsn, 0);
}

/// A write refused as an outage while the health check passes (a read-only or
/// locked database) is still an outage: no attempt burned, no dead letter.
#[tokio::test]
async fn an_outage_the_health_check_does_not_see_makes_no_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.refuse_writes.store(true, Ordering::SeqCst);
    let engine = Engine::start(
        wal(dir.path()),
        vec![dest.clone()],
        EngineConfig {
            max_attempts: 1,
            backoff_initial: Duration::from_millis(2),
            backoff_max: Duration::from_millis(10),
            ..cfg()
        },
    )
    .unwrap();
    let r = engine
        .ingest((0..3).map(entry).collect(), true)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dest.attempts.lock().unwrap().len() < 5 {
        assert!(std::time::Instant::now() < deadline, "no retries");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(engine.dead_letters(None, 10).is_empty());
    assert!(!engine.lanes()[0].up);
    dest.refuse_writes.store(false, Ordering::SeqCst);
    assert_eq!(r.outcomes().await, vec![Outcome::Delivered; 3]);
    assert!(engine.lanes()[0].up);
}

/// Purge ends dead letters for good: never written to the destination again
/// (not by a requeue of everything, not after a restart), reported as purged,
/// and ids that are not dead letters are reported, not purged.
#[tokio::test]
async fn purged_dead_letters_are_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let engine = Engine::start(wal(dir.path()), vec![dest.clone()], cfg()).unwrap();
    let r = engine
        .ingest(vec![poison(1), poison(2), entry(3)], true)
        .await
        .unwrap();
    let (ids, lsns): (Vec<_>, Vec<_>) = r.accepted.iter().map(|a| (a.id, a.lsn)).unzip();
    r.outcomes().await;
    assert_eq!(engine.dead_letters(None, 10).len(), 2);
    let out = engine.purge(Select::Ids(&[ids[0], ids[2]])).await.unwrap();
    assert_eq!(
        out.done.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    assert_eq!(out.not_dead_letters, vec![ids[2]], "delivered: not purged");
    assert_eq!(
        engine.status(lsns[0]),
        Some(spool_queue::EntryStatus::Purged)
    );
    let since_purge = dest.written.lock().unwrap().len();
    let tries_of = |lsn: u64| {
        dest.written.lock().unwrap()[since_purge..]
            .iter()
            .filter(|l| **l == lsn)
            .count()
    };
    // Requeue everything: only the other dead letter is written again.
    let all = engine.requeue(Select::All).await.unwrap();
    assert_eq!(
        all.done.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![ids[1]]
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tries_of(lsns[1]) == 0 || engine.dead_letters(None, 10).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "requeued entry not retried"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.shutdown(Duration::from_secs(5)).await;
    // After a restart (the WAL backlog is fed again): still never written.
    let engine = Engine::start(wal(dir.path()), vec![dest.clone()], cfg()).unwrap();
    assert_eq!(
        engine.status(lsns[0]),
        Some(spool_queue::EntryStatus::Purged)
    );
    engine.requeue(Select::All).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tries_of(lsns[1]) < 2 || engine.dead_letters(None, 10).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "requeued entry not retried"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(tries_of(lsns[0]), 0, "a purged entry was written again");
    assert_eq!(engine.purge(Select::All).await.unwrap().done.len(), 1);
    assert!(engine.dead_letters(None, 10).is_empty());
}

/// The queue holds LSNs and workers read records back from the WAL. A queued
/// entry whose record was damaged on disk before a worker took it becomes a
/// dead letter naming the segment (never delivered, never marked delivered);
/// the rest of its batch is delivered byte for byte from the WAL.
#[tokio::test]
async fn a_queued_entry_whose_record_is_damaged_is_a_dead_letter_and_the_rest_are_delivered() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.down.store(true, Ordering::SeqCst);
    let one_worker = EngineConfig {
        workers: 1,
        ..cfg()
    };
    let engine = Engine::start(wal(dir.path()), vec![dest.clone()], one_worker).unwrap();
    // The only worker takes this one and retries it while the destination is down.
    let first = engine.ingest(vec![entry(0)], true).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dest.attempts.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never attempted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // These wait in the queue, as LSNs.
    let mut marked = entry(2);
    marked.payload = br#"{"n":2,"mark":"DAMAGE-ME"}"#.to_vec();
    let originals = vec![entry(1), marked, entry(3)];
    let r = engine.ingest(originals.clone(), true).await.unwrap();
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .unwrap();
    let bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(9).position(|w| w == b"DAMAGE-ME").unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(b"X", at as u64).unwrap();
    dest.down.store(false, Ordering::SeqCst);
    assert_eq!(first.outcomes().await, vec![Outcome::Delivered]);
    let accepted = r.accepted.clone();
    let outcomes = r.outcomes().await;
    assert_eq!(outcomes[0], Outcome::Delivered);
    assert_eq!(outcomes[2], Outcome::Delivered);
    match &outcomes[1] {
        Outcome::Failed { reason } => assert!(
            reason.contains("WAL record unreadable") && reason.contains("corrupt WAL: segment"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    let rows = dest.rows.lock().unwrap().clone();
    for (i, a) in accepted.iter().enumerate() {
        match rows.get(&a.id) {
            Some(row) => {
                // As accepted, but for the stamp: the WAL may raise it to keep
                // stamps rising with the LSN (entries made in one microsecond).
                let mut want = originals[i].clone();
                assert!(row.entry.accepted_at_us >= want.accepted_at_us);
                want.accepted_at_us = row.entry.accepted_at_us;
                assert_eq!(row.entry, want, "entry {i} as accepted");
            }
            None => assert_eq!(i, 1, "entry {i} not delivered"),
        }
    }
    let dead = engine.dead_letters(None, 10);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].lsn, accepted[1].lsn);
    engine.shutdown(Duration::from_secs(5)).await;
}

/// `wal.max_bytes` bounds the backlog an outage leaves on disk: at the quota
/// a write is refused as a full queue (429, with a retry hint), nothing is
/// written, the WAL is not "failing" (ready stays up); once deliveries resume
/// and free space, writes go through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_at_its_quota_refuses_like_a_full_queue_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.down.store(true, Ordering::SeqCst);
    let config = WalConfig {
        segment_bytes: 4096,
        max_bytes: Some(16 * 1024),
        ..WalConfig::default()
    };
    let engine = Engine::start(
        Wal::open(dir.path(), config).unwrap(),
        vec![dest.clone()],
        cfg(),
    )
    .unwrap();
    let mut n = 0;
    let refused = loop {
        n += 1;
        assert!(n < 10_000, "the quota never refused a write");
        match engine.ingest(vec![entry(n)], false).await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    let IngestError::WalFull { limit, .. } = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(limit, 16 * 1024);
    let before = engine.wal_status();
    assert!(matches!(
        engine.ingest(vec![entry(0)], false).await,
        Err(IngestError::WalFull { .. })
    ));
    assert_eq!(
        engine.wal_status().pending,
        before.pending,
        "a refused write was written"
    );
    let checks = engine.readiness().await;
    let wal_check = checks.iter().find(|(name, _)| name == "wal").unwrap();
    assert!(wal_check.1.is_ok(), "the quota made the WAL look failing");
    // The destination is back: deliveries free segments, writes go through.
    dest.down.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match engine.ingest(vec![entry(0)], false).await {
            Ok(_) => break,
            Err(IngestError::WalFull { .. }) => {
                assert!(std::time::Instant::now() < deadline, "writes never resumed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    engine.shutdown(Duration::from_secs(5)).await;
}
