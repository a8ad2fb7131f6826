//! Regression tests of the WAL under faults: routine retention, failed syncs and
//! writes, power loss. Each test is named after the scenario it reproduces.

mod common;

use common::*;
use spool_wal::{Tracked, Wal, WalConfig};
use std::time::Duration;

fn no_retention() -> WalConfig {
    WalConfig {
        retention: Duration::ZERO,
        ..WalConfig::default()
    }
}

/// Defect 1: a checkpoint-listed entry whose own segment retention deleted was
/// read at a wrong offset of an older segment and stopped startup as "corrupt".
#[tokio::test]
async fn restart_after_retention_with_a_dead_letter_in_a_deleted_segment_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), no_retention()).unwrap();
    let a = wal.append(&[entry(1)]).await.unwrap()[0]; // stays pending
    wal.rotate().await.unwrap();
    let d = wal.append(&[entry(2)]).await.unwrap()[0];
    wal.mark_failed(d, 3, "rejected").await.unwrap();
    wal.rotate().await.unwrap();
    wal.run_retention().await.unwrap();
    wal.close();
    drop(wal);

    let wal = Wal::open(dir.path(), no_retention()).expect("restart refused after retention");
    assert_eq!(wal.status_of(a), Some(Tracked::Pending));
    assert_eq!(
        wal.status_of(d),
        Some(Tracked::Dead {
            attempts: 3,
            reason: "rejected".into()
        }),
        "the dead letter must survive retention"
    );
    let read = wal.read_entries(&[a, d]).unwrap();
    let ns: Vec<u64> = read.iter().map(|e| payload_n(&e.entry.payload)).collect();
    assert_eq!(ns, vec![1, 2]);
    wal.close();
}

// ---- through the fault seam ----------------------------------------------

use spool_wal::fault::{Fault, FaultIo, FaultOp, Unsynced};
use spool_wal::{Entry, WalError, WalHooks};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

type Pending = Pin<Box<dyn Future<Output = spool_wal::Result<Vec<u64>>> + Send>>;

fn open_faulty(dir: &std::path::Path, config: WalConfig) -> (Wal, FaultIo) {
    let io = FaultIo::new();
    let hooks = WalHooks {
        io: Arc::new(io.clone()),
        ..WalHooks::default()
    };
    (Wal::open_with(dir, config, hooks).unwrap(), io)
}

fn small_segments() -> WalConfig {
    WalConfig {
        segment_bytes: 4096,
        ..WalConfig::default()
    }
}

/// An entry of about `bytes` bytes of payload.
fn sized(n: u64, bytes: usize) -> Entry {
    let mut e = entry(n);
    e.payload = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(bytes)).into_bytes();
    e
}

/// Start an append and return once it sits in the writer's inbox (its first poll
/// encodes and submits it), without waiting for the answer.
async fn submit(wal: &Wal, e: Entry) -> Pending {
    let wal = wal.clone();
    let mut f: Pending = Box::pin(async move { wal.append(&[e]).await });
    std::future::poll_fn(|cx| {
        assert!(
            f.as_mut().poll(cx).is_pending(),
            "answered while the writer is held"
        );
        Poll::Ready(())
    })
    .await;
    f
}

/// Append A0 and hold the writer in A0's fdatasync; then queue A1, a large A2 that
/// does not fit the segment (it forces a rotation) and A3, so that the three form
/// the writer's next group. Returns A0's and the group's futures.
async fn group_with_rotation(wal: &Wal, io: &FaultIo) -> (Pending, [Pending; 3]) {
    io.hold(FaultOp::Sync);
    let a0 = submit(wal, entry(0)).await;
    io.wait_held();
    // 4 KiB segments: [A0, A1] leave too little room for A2; the new segment
    // (header, checkpoint) then holds A2 and A3.
    let a1 = submit(wal, sized(1, 1000)).await;
    let a2 = submit(wal, sized(2, 3300)).await;
    let a3 = submit(wal, entry(3)).await;
    (a0, [a1, a2, a3])
}

/// Defect 2: the rotation's fdatasync fails inside a group. Linux reports such an
/// error once, so nothing of the group — nor anything later — may be acknowledged.
#[tokio::test]
async fn a_failed_rotation_sync_fails_the_whole_group_and_poisons_the_handle() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, io) = open_faulty(dir.path(), small_segments());
    let (a0, group) = group_with_rotation(&wal, &io).await;
    io.fail(FaultOp::Sync, 0, Fault::Eio); // the next fdatasync: the rotation's seal
    io.release();
    assert!(a0.await.is_ok());
    for (i, a) in group.into_iter().enumerate() {
        let r = a.await;
        assert!(
            matches!(r, Err(WalError::Poisoned(_))),
            "append {} of the group: {r:?}",
            i + 1
        );
    }
    let later = wal.append(&[entry(4)]).await;
    assert!(matches!(later, Err(WalError::Poisoned(_))), "{later:?}");
    assert!(matches!(wal.sync().await, Err(WalError::Poisoned(_))));
    assert_eq!(pending_ns(&wal), vec![0], "a refused entry took effect");
    wal.close();
    drop(wal);

    let wal = Wal::open(dir.path(), small_segments()).unwrap();
    assert_eq!(pending_ns(&wal), vec![0], "a refused entry came back");
    let next = wal.append(&[entry(5)]).await.unwrap()[0];
    assert!(next > 1, "an acknowledged LSN was handed out again");
}

/// Defect 3: a write fails after a rotation in the same group. The append that
/// the rotation's seal made durable is acknowledged; only the appends of the
/// failed write are refused, are truly not on disk, and the WAL goes on.
#[tokio::test]
async fn a_write_failure_after_a_mid_group_rotation_refuses_only_the_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, io) = open_faulty(dir.path(), small_segments());
    let (a0, [a1, a2, a3]) = group_with_rotation(&wal, &io).await;
    // Writes from here: A1 (sealed into the old segment), the new segment's
    // header and checkpoint, then [A2, A3].
    io.fail(FaultOp::Write, 2, Fault::NoSpace);
    io.release();
    assert!(a0.await.is_ok());
    assert!(a1.await.is_ok(), "a durable entry was refused");
    let r2 = a2.await;
    assert!(matches!(r2, Err(WalError::NoSpace { .. })), "{r2:?}");
    assert!(matches!(a3.await, Err(WalError::NoSpace { .. })));
    assert_eq!(pending_ns(&wal), vec![0, 1]);
    // Not poisoned: space is back, the producer retries.
    wal.append(&[entry(3)]).await.unwrap();
    wal.close();
    drop(wal);

    let wal = Wal::open(dir.path(), small_segments()).unwrap();
    assert!(wal.recovery_report().torn_tail.is_none());
    assert_eq!(
        pending_ns(&wal),
        vec![0, 1, 3],
        "refused and durable, or lost"
    );
}

/// A failed write's cut-back is fdatasynced before the appender hears "refused":
/// a power loss right after must not bring the half-written record back.
#[tokio::test]
async fn a_refused_write_does_not_come_back_after_a_power_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, io) = open_faulty(dir.path(), WalConfig::default());
    wal.append(&[entry(0)]).await.unwrap();
    io.fail(FaultOp::Write, 0, Fault::NoSpace); // leaves half of its bytes behind
    let r = wal.append(&[sized(1, 2000), sized(2, 2000)]).await;
    assert!(matches!(r, Err(WalError::NoSpace { .. })), "{r:?}");
    // Keep every unsynced write, drop every unsynced truncation.
    io.power_loss(|c: Unsynced| !c.truncation).unwrap();
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    assert_eq!(pending_ns(&wal), vec![0]);
    assert!(
        wal.recovery_report().torn_tail.is_none(),
        "the cut was not durable"
    );
}

/// Defect 4: a power loss during the last group's fdatasync leaves a hole in it
/// with valid-looking records after the hole. That is a torn tail, not corruption.
#[tokio::test]
async fn a_power_loss_that_holes_the_last_unsynced_group_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, io) = open_faulty(dir.path(), WalConfig::default());
    wal.append(&[entry(0)]).await.unwrap();
    io.hold(FaultOp::Sync);
    let group = submit(&wal, sized(1, 1500)).await;
    let rest = wal.clone();
    let rest = tokio::spawn(async move { rest.append(&[sized(2, 1500), sized(3, 1500)]).await });
    io.wait_held(); // [1] is written; its fdatasync has not returned
                    // The writer may have taken [2, 3] into the same group or not: either way
                    // nothing after [0] is synced. Lose the second 512-byte piece, keep the rest.
    io.power_loss(|c: Unsynced| c.n != 1).unwrap();
    assert!(group.await.is_err());
    assert!(rest.await.unwrap().is_err());
    wal.close();
    drop(wal);

    let wal = Wal::open(dir.path(), WalConfig::default()).expect("a power loss stopped startup");
    let torn = wal
        .recovery_report()
        .torn_tail
        .clone()
        .expect("torn tail reported");
    assert!(
        torn.bytes > 1500,
        "the valid-looking records after the hole stay: {torn:?}"
    );
    assert_eq!(pending_ns(&wal), vec![0]);
    let v = wal.append(&[entry(9)]).await.unwrap()[0];
    assert!(v > 4, "an LSN of the torn group was handed out again");
}

/// The other side of defect 4: damage that a later frame vouches for as synced
/// history still stops startup, naming segment and offset.
#[tokio::test]
async fn damage_in_synced_history_of_the_newest_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    wal.append(&[entry(1)]).await.unwrap();
    wal.append(&[entry(2)]).await.unwrap(); // written after [1] was synced: flagged
    wal.close();
    drop(wal);
    let seg = segments(dir.path()).pop().unwrap();
    let mut image = std::fs::read(&seg).unwrap();
    let (off, _, _) = frames(&image)[0];
    image[off + 20] ^= 0xff;
    std::fs::write(&seg, image).unwrap();
    match Wal::open(dir.path(), WalConfig::default()) {
        Err(WalError::Corrupt {
            segment, offset, ..
        }) => {
            assert_eq!(offset, off as u64);
            assert!(seg.ends_with(&segment));
        }
        other => panic!("damage in synced history was not corruption: {other:?}"),
    }
}

/// The visible LSN and the pending set never run ahead of the fdatasync.
#[tokio::test]
async fn nothing_takes_effect_before_its_fdatasync_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, io) = open_faulty(dir.path(), WalConfig::default());
    let first = wal.append(&[entry(0)]).await.unwrap()[0];
    io.hold(FaultOp::Sync);
    let a = submit(&wal, entry(1)).await;
    io.wait_held();
    assert_eq!(wal.status().visible_lsn, first);
    assert_eq!(pending_ns(&wal), vec![0]);
    io.release();
    let l = a.await.unwrap()[0];
    assert_eq!(wal.status().visible_lsn, l);
    assert_eq!(pending_ns(&wal), vec![0, 1]);
}

/// A version-1 directory (no frame flags, no checkpoint segment list) opens: its
/// newest segment is sealed, the current version is written from then on,
/// nothing is lost.
#[tokio::test]
async fn a_version_1_wal_opens_and_continues_in_the_current_version() {
    use spool_wal::format::{self, FrameParse, Kind, SEGMENT_HEADER_LEN};
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let a = wal.append(&[entry(1)]).await.unwrap()[0];
    wal.append(&[entry(2)]).await.unwrap();
    wal.close();
    drop(wal);
    // Rewrite the segment as version 1 wrote it.
    let seg = segments(dir.path()).pop().unwrap();
    let image = std::fs::read(&seg).unwrap();
    let mut v1 = format::encode_segment_header(1).to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32fast::hash(&v1[..28]);
    v1[28..32].copy_from_slice(&crc.to_le_bytes());
    let mut pos = SEGMENT_HEADER_LEN;
    while let FrameParse::Ok(f) = format::parse_frame(&image[pos..]) {
        format::encode_frame(&mut v1, f.kind, f.lsn, f.body);
        pos += f.len();
    }
    std::fs::write(&seg, v1).unwrap();

    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    assert_eq!(pending_ns(&wal), vec![1, 2]);
    wal.mark_delivered(&[a]).await.unwrap();
    wal.append(&[entry(3)]).await.unwrap();
    wal.close();
    drop(wal);
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 2, "the version-1 segment was not sealed");
    let newest = std::fs::read(&segs[1]).unwrap();
    assert_eq!(
        format::segment_header_version(&newest),
        format::FORMAT_VERSION
    );
    assert!(matches!(
        format::parse_frame(&newest[SEGMENT_HEADER_LEN..]),
        FrameParse::Ok(f) if f.kind == Kind::Checkpoint
    ));
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    assert_eq!(pending_ns(&wal), vec![2, 3]);
}

/// Under `interval`/`never` an append is answered after its write. A later failed
/// fdatasync poisons the handle but must not cut off what was already answered.
#[tokio::test]
async fn a_failed_sync_under_interval_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig {
        sync: "interval:1h".parse().unwrap(),
        ..WalConfig::default()
    };
    let (wal, io) = open_faulty(dir.path(), config.clone());
    wal.append(&[entry(1)]).await.unwrap();
    io.fail(FaultOp::Sync, 0, Fault::Eio);
    assert!(matches!(wal.sync().await, Err(WalError::Poisoned(_))));
    wal.close();
    drop(wal);
    let wal = Wal::open(dir.path(), config).unwrap();
    assert_eq!(
        pending_ns(&wal),
        vec![1],
        "an acknowledged entry was cut off"
    );
    let l = wal.append(&[entry(2)]).await.unwrap()[0];
    assert!(l > 1, "an acknowledged LSN was handed out again");
}

/// Retention first deletes what it can, then (best effort) starts a segment
/// with a checkpoint to free the segments recovery would walk. Before, a
/// failure to create that segment (a full disk) failed retention before it
/// deleted anything, although deleting is what frees the disk.
#[tokio::test]
async fn a_failed_checkpoint_segment_at_retention_still_deletes_what_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WalConfig {
        retention: Duration::ZERO,
        ..small_segments()
    };
    let (wal, io) = open_faulty(dir.path(), cfg);
    let mut lsns = Vec::new();
    for n in 0..30 {
        lsns.extend(wal.append(&[sized(n, 20)]).await.unwrap());
    }
    // A small checkpoint heads the next segment; the 30 stay pending before it.
    wal.rotate().await.unwrap();
    for n in 30..180 {
        lsns.extend(wal.append(&[sized(n, 20)]).await.unwrap());
    }
    wal.mark_delivered(&lsns).await.unwrap();
    let before = wal.status().segments;
    io.fail(FaultOp::Create, 0, Fault::NoSpace);
    let report = wal.run_retention().await.unwrap();
    assert!(
        report.segments_deleted >= 1,
        "the segment before the checkpoint goes: {report:?}"
    );
    // With the disk back, the segments walked since the checkpoint go too.
    let report = wal.run_retention().await.unwrap();
    assert!(report.segments_deleted >= 1, "{report:?}");
    assert!(
        wal.status().segments <= 2,
        "{} of {before} segments left",
        wal.status().segments
    );
}
