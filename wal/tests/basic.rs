//! Appends, markers, rotation, reopen, readers, limits — on a real filesystem.

mod common;

use common::*;
use spool_wal::{Kind, Record, Tracked, Wal, WalConfig, WalError};
use std::collections::BTreeSet;

#[tokio::test]
async fn appended_entries_survive_reopen_with_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let mut lsns = Vec::new();
    for n in 0..10 {
        lsns.extend(wal.append(&[entry(n)]).await.unwrap());
    }
    wal.mark_delivered(&lsns[0..4]).await.unwrap();
    wal.mark_failed(lsns[4], 7, "constraint violated")
        .await
        .unwrap();
    assert_eq!(wal.status().pending, 5);
    assert_eq!(wal.status().dead, 1);
    wal.close();
    drop(wal);

    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let st = wal.status();
    assert_eq!((st.pending, st.dead), (5, 1));
    assert_eq!(st.oldest_pending_lsn, Some(lsns[5]));
    let dead = wal.dead_letters(None, 10);
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].lsn, dead[0].attempts), (lsns[4], 7));
    assert_eq!(dead[0].reason, "constraint violated");
    let pending = wal.pending_after(0, 100).unwrap();
    let got: Vec<u64> = pending
        .iter()
        .map(|e| payload_n(&e.entry.payload))
        .collect();
    assert_eq!(got, vec![5, 6, 7, 8, 9]);
    // New LSNs continue above the old ones.
    let next = wal.append(&[entry(10)]).await.unwrap()[0];
    assert!(next > *lsns.last().unwrap());
}

#[tokio::test]
async fn lookup_by_id_and_requeue_of_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let e = entry(1);
    let lsn = wal.append(std::slice::from_ref(&e)).await.unwrap()[0];
    assert_eq!(wal.lookup(e.id).unwrap().status, Tracked::Pending);
    wal.mark_failed(lsn, 3, "bad").await.unwrap();
    assert!(matches!(
        wal.lookup(e.id).unwrap().status,
        Tracked::Dead { attempts: 3, .. }
    ));
    // Requeue ignores LSNs that are not dead letters.
    assert_eq!(wal.requeue(&[lsn, lsn + 100]).await.unwrap(), vec![lsn]);
    assert_eq!(wal.status_of(lsn), Some(Tracked::Pending));
    assert!(wal.requeue(&[lsn]).await.unwrap().is_empty());
    wal.mark_delivered(&[lsn]).await.unwrap();
    assert_eq!(wal.lookup(e.id), None);
    wal.close();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    assert_eq!((wal.status().pending, wal.status().dead), (0, 0));
}

#[tokio::test]
async fn rotation_starts_segments_with_a_checkpoint_and_recovery_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    let mut lsns = Vec::new();
    for n in 0..200 {
        lsns.extend(wal.append(&[entry(n)]).await.unwrap());
        if n < 190 && n != 3 {
            wal.mark_delivered(&[*lsns.last().unwrap()]).await.unwrap();
        }
    }
    wal.close();
    let segs = segments(dir.path());
    assert!(
        segs.len() > 3,
        "expected rotation, got {} segments",
        segs.len()
    );
    for s in &segs[1..] {
        let buf = std::fs::read(s).unwrap();
        let first = frames(&buf)[0];
        assert_eq!(
            first.2,
            Kind::Checkpoint,
            "{} does not start with a checkpoint",
            s.display()
        );
    }
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    let rep = wal.recovery_report().clone();
    assert!(rep.checkpoint_lsn.is_some());
    assert!(
        rep.bytes_scanned
            < segs
                .iter()
                .map(|s| s.metadata().unwrap().len())
                .sum::<u64>(),
        "recovery read every segment"
    );
    let pending: Vec<u64> = wal
        .pending_after(0, 1000)
        .unwrap()
        .iter()
        .map(|e| payload_n(&e.entry.payload))
        .collect();
    let want: Vec<u64> = std::iter::once(3).chain(190..200).collect();
    assert_eq!(pending, want);
}

#[tokio::test]
async fn reader_sees_every_record_in_order_while_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(8192)).unwrap();
    for n in 0..100 {
        wal.append(&[entry(n)]).await.unwrap();
    }
    let writer = {
        let wal = wal.clone();
        tokio::spawn(async move {
            for n in 100..200 {
                wal.append(&[entry(n)]).await.unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    let mut last = 0;
    for item in wal.reader(1) {
        let (lsn, rec) = item.unwrap();
        assert!(lsn > last);
        last = lsn;
        if let Record::Entry(e) = rec {
            seen.push(payload_n(&e.payload));
        }
    }
    assert!(seen.len() >= 100);
    assert_eq!(seen, (0..seen.len() as u64).collect::<Vec<_>>());
    writer.await.unwrap();
    // A reader from a middle LSN starts there.
    let from = wal.reader(50).next().unwrap().unwrap().0;
    assert_eq!(from, 50);
}

#[tokio::test]
async fn oversized_records_and_names_are_refused_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WalConfig {
        max_record_bytes: 1024,
        ..WalConfig::default()
    };
    let wal = Wal::open(dir.path(), cfg).unwrap();
    let mut big = entry(1);
    big.payload = vec![b'x'; 2000];
    let err = wal.append(&[entry(0), big]).await.unwrap_err();
    assert!(
        matches!(err, WalError::RecordTooLarge { limit: 1024, .. }),
        "{err}"
    );
    let mut long = entry(2);
    long.source = "s".repeat(70_000);
    assert!(matches!(
        wal.append(&[long]).await,
        Err(WalError::InvalidRecord(_))
    ));
    // All or nothing: the valid entry of the refused call was not written.
    assert_eq!(wal.status().pending, 0);
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let err = Wal::open(dir.path(), WalConfig::default()).unwrap_err();
    assert!(matches!(err, WalError::Locked { .. }), "{err}");
    assert!(matches!(
        spool_wal::inspect::verify(dir.path()),
        Err(WalError::Locked { .. })
    ));
    wal.close();
    drop(wal);
    Wal::open(dir.path(), WalConfig::default()).unwrap();
}

#[tokio::test]
async fn closed_wal_refuses_appends() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    wal.close();
    wal.close();
    assert!(matches!(
        wal.append(&[entry(0)]).await,
        Err(WalError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_get_unique_increasing_lsns_all_readable_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(64 * 1024)).unwrap();
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..40u64 {
                let n = t * 1000 + i;
                let lsns = if i % 5 == 0 {
                    wal.append(&[entry(n), entry(n + 500)]).await.unwrap()
                } else {
                    wal.append(&[entry(n)]).await.unwrap()
                };
                mine.extend(lsns);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "a task saw LSNs go backwards"
        );
        all.extend(mine);
    }
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "an LSN was handed out twice");
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), small(64 * 1024)).unwrap();
    let found: BTreeSet<u64> = wal
        .pending_after(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.lsn)
        .collect();
    assert_eq!(found, unique);
}

#[tokio::test]
async fn interval_and_never_sync_modes_store_the_same_records() {
    for sync in ["interval:5ms", "never"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig {
            sync: sync.parse().unwrap(),
            ..WalConfig::default()
        };
        let wal = Wal::open(dir.path(), cfg.clone()).unwrap();
        for n in 0..20 {
            wal.append(&[entry(n)]).await.unwrap();
        }
        wal.sync().await.unwrap();
        wal.close();
        drop(wal);
        let wal = Wal::open(dir.path(), cfg).unwrap();
        assert_eq!(wal.status().pending, 20, "sync mode {sync}");
    }
}

#[test]
fn offline_inspection_reports_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    let lsns: Vec<u64> = rt.block_on(async {
        let mut v = Vec::new();
        for n in 0..60 {
            v.extend(wal.append(&[entry(n)]).await.unwrap());
        }
        wal.mark_delivered(&v[..30]).await.unwrap();
        wal.mark_failed(v[30], 2, "nope").await.unwrap();
        v
    });
    wal.close();
    drop(wal);
    let stats = spool_wal::inspect::stats(dir.path()).unwrap();
    assert_eq!(stats.entries, 60);
    assert_eq!(stats.delivered, 30);
    assert_eq!(stats.failed, 1);
    assert_eq!(stats.pending, 29);
    assert_eq!(stats.oldest_pending_lsn, Some(lsns[31]));
    let v = spool_wal::inspect::verify(dir.path()).unwrap();
    assert!(v.is_ok() && v.torn_tail.is_none());
    assert_eq!(v.records, stats.records);
    let recs = spool_wal::inspect::inspect(dir.path(), lsns[29], 3).unwrap();
    let st: Vec<_> = recs
        .iter()
        .filter(|r| r.kind == Kind::Entry)
        .map(|r| r.status.unwrap())
        .collect();
    assert_eq!(recs[0].lsn, lsns[29]);
    assert_eq!(&st[..2], &["delivered", "failed"][..]);
}

/// `purge` ends dead letters (never pending entries), durably: after a restart the
/// purged entry is gone, the other dead letter stays, the pending one stays pending.
#[tokio::test]
async fn purge_ends_dead_letters_only_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let lsns = wal.append(&[entry(1), entry(2), entry(3)]).await.unwrap();
    wal.mark_failed(lsns[0], 3, "bad").await.unwrap();
    wal.mark_failed(lsns[1], 3, "bad").await.unwrap();
    assert_eq!(
        wal.purge(&[lsns[0], lsns[2], 999]).await.unwrap(),
        vec![lsns[0]],
        "only the dead letter is purged"
    );
    assert!(wal.purge(&[lsns[0]]).await.unwrap().is_empty());
    assert!(wal.is_purged(lsns[0]) && !wal.is_purged(lsns[1]));
    // Through a checkpoint (rotation) and a restart, replay still knows it.
    wal.rotate().await.unwrap();
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let dead: Vec<u64> = wal.dead_letters(None, 10).iter().map(|d| d.lsn).collect();
    assert_eq!(dead, vec![lsns[1]]);
    assert_eq!(wal.status_of(lsns[0]), None);
    assert!(
        wal.is_purged(lsns[0]),
        "a purged entry must never be replayed"
    );
    assert_eq!(wal.status_of(lsns[2]), Some(Tracked::Pending));
}

/// Flip one byte of the first occurrence of `marker` in the WAL's segments.
fn damage(dir: &std::path::Path, marker: &[u8]) -> (String, usize) {
    use std::os::unix::fs::FileExt;
    for seg in segments(dir) {
        let bytes = std::fs::read(&seg).unwrap();
        if let Some(at) = bytes.windows(marker.len()).position(|w| w == marker) {
            let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
            f.write_all_at(&[bytes[at] ^ 0x20], at as u64).unwrap();
            return (seg.file_name().unwrap().to_string_lossy().into(), at);
        }
    }
    panic!("marker not in the WAL");
}

/// The delivery queue holds LSNs and reads records back: every LSN asked gets
/// an answer, in the order asked — the entry byte for byte, `Gone` once it is
/// no longer pending (or never was), and a damaged record `Corrupt`, naming its
/// segment, without hiding the records around it.
#[tokio::test]
async fn read_queued_answers_each_lsn_and_a_damaged_record_hides_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let mut marked = entry(2);
    marked.payload = br#"{"n":2,"mark":"DAMAGE-ME"}"#.to_vec();
    let mut originals = vec![entry(1), marked, entry(3), entry(4)];
    let lsns = wal.append_stamped(&mut originals).await.unwrap();
    wal.mark_delivered(&lsns[3..]).await.unwrap();
    let (segment, _) = damage(dir.path(), b"DAMAGE-ME");
    let asked = [lsns[2], lsns[1], lsns[0], lsns[3], 9_999];
    let got = wal.read_queued(&asked);
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), asked);
    match &got[0].1 {
        spool_wal::ReadBack::Entry(e) => assert_eq!(e, &originals[2]),
        other => panic!("{other:?}"),
    }
    match &got[1].1 {
        spool_wal::ReadBack::Failed(WalError::Corrupt { segment: s, .. }) => {
            assert_eq!(s, &segment)
        }
        other => panic!("{other:?}"),
    }
    match &got[2].1 {
        spool_wal::ReadBack::Entry(e) => assert_eq!(e, &originals[0]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(got[3].1, spool_wal::ReadBack::Gone), "delivered");
    assert!(
        matches!(got[4].1, spool_wal::ReadBack::Gone),
        "never written"
    );
}

/// A pending entry whose sealed segment was deleted behind the WAL's back is
/// reported `Corrupt` (missing), never skipped as if it were gone.
#[tokio::test]
async fn read_queued_reports_a_missing_segment_of_a_pending_entry() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let lsn = wal.append(&[entry(1)]).await.unwrap()[0];
    wal.rotate().await.unwrap();
    let first = segments(dir.path()).remove(0);
    std::fs::remove_file(&first).unwrap();
    match &wal.read_queued(&[lsn])[0].1 {
        spool_wal::ReadBack::Failed(WalError::Corrupt { reason, .. }) => {
            assert!(reason.contains("missing"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// A checkpoint lists every pending entry: with a big backlog, writing one at
/// each rotation costs more than the records (at 5M queued, 80 MB fsynced per
/// 64 MiB segment, built under the state lock). Past a quarter of
/// `segment_bytes` a rotation writes none; the records still fill a segment
/// before the next, and recovery walks on from the last checkpoint to the same
/// state.
#[tokio::test]
async fn a_backlog_too_big_for_a_checkpoint_rotates_without_one_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    let mut lsns = Vec::new();
    for chunk in 0..8 {
        let batch: Vec<_> = (0..50).map(|n| entry(chunk * 50 + n)).collect();
        lsns.extend(wal.append(&batch).await.unwrap());
    }
    wal.rotate().await.unwrap();
    let newest = segments(dir.path()).last().unwrap().clone();
    let before = segments(dir.path()).len();
    for n in 0..20 {
        wal.append(&[entry(1000 + n)]).await.unwrap();
    }
    assert_eq!(
        frames(&std::fs::read(&newest).unwrap())[0].2,
        Kind::Entry,
        "no checkpoint of 400 pending (6,400 bytes) heads a 4 KiB segment"
    );
    let added = segments(dir.path()).len() - before;
    assert!(added <= 1, "20 small appends made {added} segments");
    wal.mark_delivered(&lsns[..100]).await.unwrap();
    wal.mark_failed(lsns[100], 3, "bad").await.unwrap();
    let want = (pending_ns(&wal), wal.status().dead);
    drop(wal);
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    assert_eq!((pending_ns(&wal), wal.status().dead), want);
    assert_eq!(wal.status().pending, 319);
}

/// 4 KiB segments that retention deletes as soon as nothing holds them.
fn small_at_once() -> WalConfig {
    WalConfig {
        retention: std::time::Duration::ZERO,
        ..small(4096)
    }
}

/// Retention may delete only segments before the one recovery starts from:
/// after rotations without a checkpoint, a segment whose own entries are all
/// delivered may still hold the markers of older entries. Deleted, those
/// entries came back pending at the next start.
#[tokio::test]
async fn retention_keeps_the_segments_recovery_walks_after_a_checkpoint_was_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small_at_once()).unwrap();
    let mut old = Vec::new();
    for n in 0..150 {
        old.extend(wal.append(&[entry(n)]).await.unwrap());
    }
    // A segment of its own for the markers of ten old entries, then entries of
    // its own, all delivered.
    wal.rotate().await.unwrap();
    wal.mark_delivered(&old[..10]).await.unwrap();
    let mut new = Vec::new();
    for n in 0..40 {
        new.extend(wal.append(&[entry(1000 + n)]).await.unwrap());
    }
    wal.mark_delivered(&new).await.unwrap();
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    assert_eq!(wal.status().pending, 140);
    drop(wal);
    let wal = Wal::open(dir.path(), small_at_once()).unwrap();
    assert_eq!(
        wal.status().pending,
        140,
        "delivered entries came back pending"
    );
    for l in &old[..10] {
        assert_eq!(wal.status_of(*l), None, "LSN {l} was delivered");
    }
}

/// Once a backlog drains, the segments walked since the last checkpoint go at
/// the next retention, without waiting for the current segment to fill: it
/// starts a segment with a (small again) checkpoint first.
#[tokio::test]
async fn a_drained_backlog_frees_its_segments_at_the_next_retention() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small_at_once()).unwrap();
    let mut lsns = Vec::new();
    for n in 0..300 {
        lsns.extend(wal.append(&[entry(n)]).await.unwrap());
    }
    let full = segments(dir.path()).len();
    assert!(full > 4, "{full} segments");
    wal.mark_delivered(&lsns).await.unwrap();
    let report = wal.run_retention().await.unwrap();
    let left = segments(dir.path()).len();
    assert!(left <= 2, "{left} of {full} segments left ({report:?})");
    drop(wal);
    let wal = Wal::open(dir.path(), small_at_once()).unwrap();
    assert_eq!(wal.status().pending, 0);
}

/// Dead letters stay until an operator acts, and each is in every checkpoint:
/// with enough of them a checkpoint never fits a quarter segment. Checkpoints
/// are still written once an eighth of what was written since the last would
/// hold one — before, none was ever written again, so retention kept every
/// segment after the last (the disk filled with delivered records).
#[tokio::test]
async fn dead_letters_that_stay_do_not_stop_retention() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small_at_once()).unwrap();
    for n in 0..60 {
        let l = wal.append(&[entry(n)]).await.unwrap();
        wal.mark_failed(l[0], 5, &"x".repeat(100)).await.unwrap();
    }
    for chunk in 0..40 {
        let batch: Vec<_> = (0..100).map(|n| entry(1000 + chunk * 100 + n)).collect();
        let lsns = wal.append(&batch).await.unwrap();
        wal.mark_delivered(&lsns).await.unwrap();
    }
    wal.run_retention().await.unwrap();
    let left = segments(dir.path()).len();
    assert!(left < 40, "{left} segments kept for 60 dead letters");
    drop(wal);
    let wal = Wal::open(dir.path(), small_at_once()).unwrap();
    assert_eq!((wal.status().pending, wal.status().dead), (0, 60));
}
