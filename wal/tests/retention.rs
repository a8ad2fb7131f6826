//! Retention and quota: never a pending entry; recovery stays right after deletion.

mod common;

use common::*;
use spool_wal::{Wal, WalConfig, WalError};
use std::time::Duration;

fn cfg(retention: Duration, max_bytes: Option<u64>) -> WalConfig {
    WalConfig {
        segment_bytes: 4096,
        retention,
        max_bytes,
        ..WalConfig::default()
    }
}

#[tokio::test]
async fn retention_keeps_segments_with_pending_entries_and_deletes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(Duration::ZERO, None)).unwrap();
    let mut lsns = Vec::new();
    for n in 0..150 {
        lsns.extend(wal.append(&[entry(n)]).await.unwrap());
    }
    // Everything delivered but entry 0, which pins the first segment.
    wal.mark_delivered(&lsns[1..]).await.unwrap();
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    let left = segments(dir.path());
    assert_eq!(
        left.len(),
        2,
        "expected the pinned first and the active segment: {left:?}"
    );
    assert_eq!(left[0].file_name().unwrap(), "00000000000000000001.wal");
    assert_eq!(pending_ns(&wal), vec![0]);
    wal.close();
    drop(wal);

    let wal = Wal::open(dir.path(), cfg(Duration::ZERO, None)).unwrap();
    assert_eq!(pending_ns(&wal), vec![0]);
    wal.mark_delivered(&lsns[..1]).await.unwrap();
    // Rotation runs retention itself; an explicit pass finds nothing more.
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    assert_eq!(segments(dir.path()).len(), 1);
    wal.close();
    let v = spool_wal::inspect::verify(dir.path()).unwrap();
    assert!(v.is_ok());
}

#[tokio::test]
async fn a_marker_deleted_with_its_segment_does_not_bring_an_entry_back() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(Duration::ZERO, None)).unwrap();
    let a = wal.append(&[entry(1)]).await.unwrap()[0];
    let b = wal.append(&[entry(2)]).await.unwrap()[0];
    wal.rotate().await.unwrap(); // segment 1: A (pending), B
    let c = wal.append(&[entry(3)]).await.unwrap()[0];
    wal.mark_delivered(&[b, c]).await.unwrap(); // segment 2: C and the markers
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    let names: Vec<_> = segments(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 2, "segment 2 should be gone: {names:?}");
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(Duration::ZERO, None)).unwrap();
    assert_eq!(pending_ns(&wal), vec![1], "B came back although delivered");
    assert_eq!(wal.status().oldest_pending_lsn, Some(a));
}

#[tokio::test]
async fn young_segments_stay_until_the_retention_passes() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(Duration::from_secs(3600), None)).unwrap();
    let lsns: Vec<u64> = {
        let mut v = Vec::new();
        for n in 0..100 {
            v.extend(wal.append(&[entry(n)]).await.unwrap());
        }
        v
    };
    wal.mark_delivered(&lsns).await.unwrap();
    wal.rotate().await.unwrap();
    let before = segments(dir.path()).len();
    assert_eq!(wal.run_retention().await.unwrap().segments_deleted, 0);
    assert_eq!(segments(dir.path()).len(), before);
}

#[tokio::test]
async fn quota_refuses_entries_but_not_markers_and_recovers_once_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(Duration::from_secs(3600), Some(16 * 1024))).unwrap();
    let mut lsns = Vec::new();
    let err = loop {
        match wal.append(&[entry(lsns.len() as u64)]).await {
            Ok(l) => lsns.extend(l),
            Err(e) => break e,
        }
        assert!(lsns.len() < 10_000, "quota never enforced");
    };
    assert!(
        matches!(err, WalError::QuotaExceeded { limit: 16384, .. }),
        "{err}"
    );
    assert!(err.is_out_of_space());
    // Nothing pending may be deleted to make room.
    assert_eq!(wal.status().pending, lsns.len() as u64);
    // Markers still go through, and delivering frees old segments for the quota.
    wal.mark_delivered(&lsns).await.unwrap();
    wal.append(&[entry(99_999)]).await.unwrap();
    assert_eq!(wal.status().pending, 1);
}

/// A dead letter waits for an operator: neither the retention nor the quota
/// deletes its segment, and it survives a restart.
#[tokio::test]
async fn dead_letters_survive_retention_and_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let config = cfg(Duration::ZERO, Some(8 * 1024));
    let wal = Wal::open(dir.path(), config.clone()).unwrap();
    let l = wal.append(&[entry(1)]).await.unwrap()[0];
    wal.mark_failed(l, 10, "rejected").await.unwrap();
    // Fill past the quota with delivered entries: forced retention runs.
    for n in 2..200 {
        match wal.append(&[entry(n)]).await {
            Ok(ls) => wal.mark_delivered(&ls).await.unwrap(),
            Err(e) => assert!(e.is_out_of_space(), "{e}"),
        }
    }
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    assert_eq!(wal.dead_letters(None, 10).len(), 1);
    assert!(
        segments(dir.path())[0].ends_with("00000000000000000001.wal"),
        "the dead letter's segment was deleted"
    );
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), config).unwrap();
    let dead = wal.dead_letters(None, 10);
    assert_eq!((dead.len(), dead[0].lsn), (1, l));
    assert_eq!(
        payload_n(&wal.read_entries(&[l]).unwrap()[0].entry.payload),
        1
    );
}
