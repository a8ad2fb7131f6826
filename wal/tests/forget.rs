//! Forgetting: a TOMBSTONE ends what it names, survives restarts and
//! checkpoints, and is retained while anything it forgot may be.

mod common;

use common::*;
use spool_wal::{Entry, LoggedEntry, ReadBack, Tombstone, Wal, WalConfig};
use std::time::Duration;
use uuid::Uuid;

fn by_ids(ids: &[Uuid]) -> Tombstone {
    Tombstone {
        at_us: spool_wal::now_us(),
        source: "agents".into(),
        destination: "main".into(),
        ids: ids.to_vec(),
        subject: None,
    }
}

fn by_subject(subject: &str) -> Tombstone {
    Tombstone {
        subject: Some(subject.into()),
        ..by_ids(&[])
    }
}

fn with_subject(n: u64, subject: &str) -> Entry {
    let mut e = entry(n);
    e.subject = Some(subject.into());
    e
}

fn at(lsn: u64, e: &Entry) -> LoggedEntry {
    LoggedEntry {
        lsn,
        entry: e.clone(),
    }
}

fn read_one(wal: &Wal, lsn: u64) -> ReadBack {
    wal.read_queued(&[lsn]).pop().unwrap().1
}

#[tokio::test]
async fn a_pending_entry_forgotten_by_id_is_never_read_for_delivery_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let (a, b) = (entry(1), entry(2));
    let lsns = wal.append(&[a.clone(), b.clone()]).await.unwrap();
    let t = wal.forget(&mut by_ids(&[a.id])).await.unwrap();
    assert!(t > lsns[1]);
    assert_eq!(pending_ns(&wal), vec![2]);
    assert!(matches!(read_one(&wal, lsns[0]), ReadBack::Gone));
    assert!(matches!(read_one(&wal, lsns[1]), ReadBack::Entry(_)));
    assert_eq!(wal.pending_tombstones().len(), 1);
    wal.close();
    drop(wal);

    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    assert_eq!(pending_ns(&wal), vec![2], "the forgotten entry came back");
    assert!(wal.forgets(&at(lsns[0], &a)) && !wal.forgets(&at(lsns[1], &b)));
    assert_eq!(wal.forgot_id("agents", a.id), Some(t));
    assert_eq!(wal.forgot_id("other", a.id), None);
    assert_eq!(wal.pending_tombstones()[0].0, t);
    wal.mark_delivered(&[t]).await.unwrap();
    assert!(wal.pending_tombstones().is_empty());
}

#[tokio::test]
async fn an_id_of_another_source_is_not_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let a = entry(1);
    let l = wal.append(std::slice::from_ref(&a)).await.unwrap()[0];
    let mut t = by_ids(&[a.id]);
    t.source = "intruder".into();
    wal.forget(&mut t).await.unwrap();
    assert!(matches!(read_one(&wal, l), ReadBack::Entry(_)));
    assert!(!wal.forgets(&at(l, &a)));
    // Forgotten by its own source, then named by another: still forgotten.
    wal.forget(&mut by_ids(&[a.id])).await.unwrap();
    wal.forget(&mut t).await.unwrap();
    assert!(
        wal.forgets(&at(l, &a)),
        "another source's tombstone cancelled a forget"
    );
}

#[tokio::test]
async fn a_subject_forgets_what_was_accepted_before_it_not_after() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let before = with_subject(1, "alice");
    let other = with_subject(2, "bob");
    let lsns = wal.append(&[before.clone(), other.clone()]).await.unwrap();
    let mut t = by_subject("alice");
    wal.forget(&mut t).await.unwrap();
    let mut after = with_subject(3, "alice");
    after.accepted_at_us = spool_wal::now_us() + 1;
    let l3 = wal.append(std::slice::from_ref(&after)).await.unwrap()[0];
    // Stamped before the forget but written after it (a slow request): not
    // covered — it was acknowledged after the forget was.
    let mut raced = with_subject(4, "alice");
    raced.accepted_at_us = 0;
    let l4 = wal.append(std::slice::from_ref(&raced)).await.unwrap()[0];
    assert!(matches!(read_one(&wal, lsns[0]), ReadBack::Forgotten));
    assert!(matches!(read_one(&wal, lsns[1]), ReadBack::Entry(_)));
    assert!(matches!(read_one(&wal, l3), ReadBack::Entry(_)));
    // ... and its stored accept time says so: a destination deleting by
    // `created_at <= at_us` keeps it too.
    let ReadBack::Entry(stored) = read_one(&wal, l4) else {
        panic!("the raced entry is not readable")
    };
    assert!(
        stored.accepted_at_us > t.at_us,
        "an entry written after a forget is stamped before it"
    );
    raced.accepted_at_us = stored.accepted_at_us;
    let all = [
        at(lsns[0], &before),
        at(lsns[1], &other),
        at(l3, &after),
        at(l4, &raced),
    ];
    assert_eq!(wal.forgotten_among(all.iter()), vec![before.id]);
}

#[tokio::test]
async fn tombstones_are_carried_by_checkpoints_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || WalConfig {
        retention: Duration::from_secs(3600),
        ..small(4096)
    };
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    let a = with_subject(1, "alice");
    let la = wal.append(std::slice::from_ref(&a)).await.unwrap()[0];
    let t = wal.forget(&mut by_subject("alice")).await.unwrap();
    for _ in 0..3 {
        wal.rotate().await.unwrap();
    }
    wal.mark_delivered(&[t]).await.unwrap();
    wal.rotate().await.unwrap();
    wal.close();
    drop(wal);
    // Recovery starts at the newest checkpoint and reads the tombstone at its offset.
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    assert!(wal.recovery_report().checkpoint_lsn.is_some());
    assert!(
        wal.forgets(&at(la, &a)),
        "the tombstone was lost by the checkpoint"
    );
    assert!(wal.pending_tombstones().is_empty(), "its delivery was lost");
}

#[tokio::test]
async fn retention_keeps_a_tombstone_while_an_older_segment_holds_what_it_forgot() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || WalConfig {
        retention: Duration::ZERO,
        ..small(4096)
    };
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    // Segment 1: a dead letter (pins it) and an entry to forget.
    let dead = wal.append(&[entry(1)]).await.unwrap()[0];
    let forgotten = with_subject(2, "alice");
    let f = wal.append(std::slice::from_ref(&forgotten)).await.unwrap()[0];
    wal.mark_failed(dead, 3, "constraint").await.unwrap();
    wal.mark_delivered(&[f]).await.unwrap();
    wal.rotate().await.unwrap();
    // Segment 2: the tombstone, delivered.
    let t = wal.forget(&mut by_subject("alice")).await.unwrap();
    wal.mark_delivered(&[t]).await.unwrap();
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    assert_eq!(
        segments(dir.path()).len(),
        3,
        "the tombstone's segment went first"
    );
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    assert!(wal.forgets(&at(f, &forgotten)));
    // Once the dead letter is purged, the oldest segment goes, then the tombstone's.
    wal.purge(&[dead]).await.unwrap();
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    assert_eq!(segments(dir.path()).len(), 1);
    assert!(
        !wal.forgets(&at(f, &forgotten)),
        "a retired tombstone is dropped"
    );
}

#[tokio::test]
async fn an_embedding_is_stored_with_its_entry() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let mut e = entry(1);
    e.embedding = Some(vec![0.25, -1.5, 3.0e-8, 1.0e30]);
    let l = wal.append(std::slice::from_ref(&e)).await.unwrap()[0];
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    match read_one(&wal, l) {
        ReadBack::Entry(back) => assert_eq!(back, e),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn compaction_erases_forgotten_payloads_from_sealed_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || WalConfig {
        retention: Duration::from_secs(3600),
        ..small(4096)
    };
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    let secret = |n: u64, subject: &str| {
        let mut e = Entry::new(
            "agents",
            "main",
            format!(r#"{{"secret":"hunter{n}"}}"#).into_bytes(),
        );
        e.subject = Some(subject.into());
        e
    };
    let (gone, kept, pending) = (secret(1, "alice"), secret(2, "bob"), secret(3, "carol"));
    let lsns = wal
        .append(&[gone.clone(), kept.clone(), pending.clone()])
        .await
        .unwrap();
    wal.mark_delivered(&lsns[..2]).await.unwrap();
    wal.forget(&mut by_subject("alice")).await.unwrap();
    // Forgotten but still pending: left for its worker, not erased.
    wal.forget(&mut by_ids(&[pending.id])).await.unwrap();
    wal.rotate().await.unwrap();
    // In the active segment (and still pending): never touched.
    let mut late = secret(4, "alice");
    late.accepted_at_us = 0;
    wal.append(std::slice::from_ref(&late)).await.unwrap();
    wal.forget(&mut by_subject("alice")).await.unwrap();

    let contains = |needle: &str| {
        segments(dir.path()).iter().any(|p| {
            std::fs::read(p)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        })
    };
    assert!(contains("hunter1") && contains("hunter4"));
    let report = wal.compact().unwrap();
    assert_eq!(
        (report.segments_rewritten, report.entries_erased),
        (1, 2),
        "{report:?}"
    );
    assert!(
        !contains("hunter1"),
        "the forgotten payload is still on disk"
    );
    assert!(
        !contains("hunter3"),
        "a forgotten id is gone from tracking: erased too"
    );
    assert!(contains("hunter2") && contains("hunter4"));
    assert_eq!(wal.compact().unwrap().entries_erased, 0, "idempotent");
    wal.close();
    drop(wal);

    assert!(spool_wal::inspect::verify(dir.path()).unwrap().is_ok());
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    assert!(wal.forgets(&at(lsns[0], &gone)) && !wal.forgets(&at(lsns[1], &kept)));
    assert_eq!(wal.status().pending, 1, "only the late entry is pending");
    drop(wal);
    let records = spool_wal::inspect::inspect(dir.path(), 0, 100).unwrap();
    assert_eq!(
        records
            .iter()
            .filter(|r| r.kind == spool_wal::Kind::Erased)
            .count(),
        2
    );
}

/// A checkpoint written while an entry was pending names its offset; once it
/// is delivered, forgotten and erased by compaction, recovery from that
/// checkpoint must not take the ERASED frame for corruption.
#[tokio::test]
async fn recovery_from_a_checkpoint_naming_an_erased_entry_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || WalConfig {
        retention: Duration::from_secs(3600),
        ..small(4096)
    };
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    let e = with_subject(1, "alice");
    let l = wal.append(std::slice::from_ref(&e)).await.unwrap()[0];
    wal.rotate().await.unwrap(); // the new segment's checkpoint lists it as pending
                                 // Delivered and forgotten in the active segment: no newer checkpoint.
    wal.mark_delivered(&[l]).await.unwrap();
    wal.forget(&mut by_ids(&[e.id])).await.unwrap();
    assert_eq!(wal.compact().unwrap().entries_erased, 1);
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg()).expect("recovery refused an erased entry");
    assert_eq!(wal.status().pending, 0);
    assert!(wal.forgets(&at(l, &e)));
}

#[tokio::test]
async fn stamps_rise_with_the_lsn_whatever_the_clock_and_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || WalConfig {
        retention: Duration::ZERO,
        ..small(4096)
    };
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    // Accepted an hour ahead (the clock then stepped back), then delivered.
    let mut ahead = entry(1);
    ahead.accepted_at_us = spool_wal::now_us() + 3_600_000_000;
    let mut stamped = [ahead.clone(), entry(2)];
    let lsns = wal.append_stamped(&mut stamped).await.unwrap();
    assert_eq!(
        stamped[0].accepted_at_us, ahead.accepted_at_us,
        "a rising stamp is kept"
    );
    assert!(stamped[1].accepted_at_us > ahead.accepted_at_us);
    let mut t = by_ids(&[]);
    t.subject = Some("alice".into());
    wal.forget(&mut t).await.unwrap();
    assert!(t.at_us > stamped[1].accepted_at_us);
    wal.mark_delivered(&lsns).await.unwrap();
    wal.mark_delivered(&[wal.pending_tombstones()[0].0])
        .await
        .unwrap();
    // Its segment goes; only the newest checkpoint still knows its stamp.
    let first = segments(dir.path())[0].clone();
    wal.rotate().await.unwrap();
    let l4 = wal.append(&[entry(4)]).await.unwrap();
    wal.mark_delivered(&l4).await.unwrap();
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    assert!(!first.exists(), "retention kept the segment");
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg()).unwrap();
    assert!(wal.recovery_report().checkpoint_lsn.is_some());
    let mut next = [entry(3)];
    wal.append_stamped(&mut next).await.unwrap();
    assert!(
        next[0].accepted_at_us > t.at_us,
        "a stamp after a restart went back below one before it"
    );
}

/// `spool wal compact` killed midway — the copy's creation, its write or its
/// fdatasync failing (what a crash before the rename leaves) — changes
/// nothing: the old segment is whole and verifies, and the next run erases.
#[tokio::test]
async fn a_compaction_that_fails_before_its_rename_leaves_the_segment_whole() {
    use spool_wal::fault::{Fault, FaultIo, FaultOp};
    for op in [FaultOp::Create, FaultOp::Write, FaultOp::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = || WalConfig {
            retention: Duration::from_secs(3600),
            ..small(4096)
        };
        let wal = Wal::open(dir.path(), cfg()).unwrap();
        let mut secret = with_subject(1, "alice");
        secret.payload = br#"{"secret":"hunter1"}"#.to_vec();
        let l = wal.append(&[secret]).await.unwrap();
        wal.mark_delivered(&l).await.unwrap();
        wal.forget(&mut by_subject("alice")).await.unwrap();
        wal.rotate().await.unwrap();
        wal.close();
        drop(wal);
        let on_disk = || {
            segments(dir.path()).iter().any(|p| {
                std::fs::read(p)
                    .unwrap()
                    .windows(7)
                    .any(|w| w == b"hunter1")
            })
        };

        let io = FaultIo::new();
        let hooks = spool_wal::WalHooks {
            io: std::sync::Arc::new(io.clone()),
            ..spool_wal::WalHooks::default()
        };
        let wal = Wal::open_with(dir.path(), cfg(), hooks).unwrap();
        io.fail(op, 0, Fault::Eio);
        assert!(wal.compact().is_err(), "{op:?}: the fault was not hit");
        wal.close();
        drop(wal);
        assert!(on_disk(), "{op:?}: the segment changed before the rename");
        assert!(spool_wal::inspect::verify(dir.path()).unwrap().is_ok());

        let wal = Wal::open(dir.path(), cfg()).unwrap();
        assert_eq!(wal.compact().unwrap().entries_erased, 1, "{op:?}");
        assert!(!on_disk(), "{op:?}");
        let stray = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "compact")
            })
            .count();
        assert_eq!(stray, 0, "{op:?}: a .wal.compact file was left");
    }
}
