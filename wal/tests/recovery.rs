//! Torn tails and corruption: damage real segment files, reopen, check.

mod common;

use common::*;
use spool_wal::{Kind, OnCorruption, Wal, WalConfig, WalError};
use std::path::Path;

/// Write `n` entries (sync = always) into a fresh WAL; return its dir and their LSNs.
fn written(n: u64, cfg: WalConfig) -> (tempfile::TempDir, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg).unwrap();
    let lsns = (0..n)
        .map(|i| wal.append_blocking(&[entry(i)]).unwrap()[0])
        .collect();
    wal.close();
    (dir, lsns)
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for p in segments(from) {
        std::fs::copy(&p, to.path().join(p.file_name().unwrap())).unwrap();
    }
    to
}

#[test]
fn truncating_the_last_record_at_every_byte_recovers_the_rest_with_fresh_lsns() {
    let (dir, lsns) = written(5, WalConfig::default());
    let seg = segments(dir.path()).pop().unwrap();
    let image = std::fs::read(&seg).unwrap();
    let (last_off, last_lsn, _) = *frames(&image).last().unwrap();
    assert_eq!(last_lsn, lsns[4]);
    for cut in last_off + 1..image.len() {
        let d = copy_dir(dir.path());
        let path = d.path().join(seg.file_name().unwrap());
        std::fs::write(&path, &image[..cut]).unwrap();

        let v = spool_wal::inspect::verify(d.path()).unwrap();
        assert!(v.is_ok(), "cut {cut}: torn tail reported as damage");
        assert_eq!(v.torn_tail.as_ref().unwrap().offset, last_off as u64);

        let wal = Wal::open(d.path(), WalConfig::default()).unwrap();
        let rep = wal.recovery_report();
        let torn = rep
            .torn_tail
            .as_ref()
            .unwrap_or_else(|| panic!("cut {cut}: no torn tail"));
        assert_eq!(
            (torn.offset, torn.bytes),
            (last_off as u64, (cut - last_off) as u64)
        );
        assert_eq!(pending_ns(&wal), vec![0, 1, 2, 3], "cut {cut}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            last_off as u64,
            "not truncated"
        );
        let fresh = wal.append_blocking(&[entry(9)]).unwrap()[0];
        assert!(
            fresh > last_lsn,
            "cut {cut}: LSN {fresh} reused (torn record had {last_lsn})"
        );
        wal.close();
        drop(wal);
        let wal = Wal::open(d.path(), WalConfig::default()).unwrap();
        assert!(wal.recovery_report().torn_tail.is_none());
        assert_eq!(pending_ns(&wal), vec![0, 1, 2, 3, 9]);
    }
}

#[test]
fn a_bit_flip_in_the_last_record_is_a_torn_tail() {
    let (dir, _) = written(5, WalConfig::default());
    let seg = segments(dir.path()).pop().unwrap();
    let image = std::fs::read(&seg).unwrap();
    let (last_off, ..) = *frames(&image).last().unwrap();
    for at in [last_off + 2, last_off + 6, last_off + 12, image.len() - 3] {
        let mut bad = image.clone();
        bad[at] ^= 0x40;
        std::fs::write(&seg, &bad).unwrap();
        let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
        assert!(wal.recovery_report().torn_tail.is_some(), "flip at {at}");
        assert_eq!(pending_ns(&wal), vec![0, 1, 2, 3]);
        wal.close();
        drop(wal);
        std::fs::write(&seg, &image).unwrap();
    }
}

#[test]
fn a_bit_flip_mid_segment_names_segment_and_offset_and_skip_counts_the_loss() {
    let (dir, _) = written(10, WalConfig::default());
    let seg = segments(dir.path()).pop().unwrap();
    let name = seg.file_name().unwrap().to_str().unwrap().to_owned();
    let mut image = std::fs::read(&seg).unwrap();
    let (off, ..) = frames(&image)[4];
    image[off + 30] ^= 0x01;
    std::fs::write(&seg, &image).unwrap();

    let err = Wal::open(dir.path(), WalConfig::default()).unwrap_err();
    match &err {
        WalError::Corrupt {
            segment, offset, ..
        } => {
            assert_eq!((segment.as_str(), *offset), (name.as_str(), off as u64));
        }
        other => panic!("expected corruption, got {other}"),
    }
    assert!(err.to_string().contains(&name) && err.to_string().contains(&off.to_string()));
    let v = spool_wal::inspect::verify(dir.path()).unwrap();
    assert_eq!(v.damage.as_ref().map(|d| d.offset), Some(off as u64));
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        image,
        "a failed open changed the file"
    );

    let skip = WalConfig {
        on_corruption: OnCorruption::Skip,
        ..WalConfig::default()
    };
    let wal = Wal::open(dir.path(), skip).unwrap();
    let rep = wal.recovery_report();
    assert_eq!((rep.skipped_regions, rep.skipped_records), (1, 1));
    assert_eq!(pending_ns(&wal), vec![0, 1, 2, 3, 5, 6, 7, 8, 9]);
}

#[test]
fn damage_in_a_sealed_segment_is_corruption_even_at_its_end() {
    let (dir, _) = written(120, small(4096));
    let segs = segments(dir.path());
    assert!(segs.len() >= 2);
    let sealed = &segs[0];
    let mut image = std::fs::read(sealed).unwrap();
    let (last_off, ..) = *frames(&image).last().unwrap();
    image[last_off + 20] ^= 0x02;
    std::fs::write(sealed, &image).unwrap();
    // Recovery starts from the newest checkpoint, which names entries in the
    // sealed segment, so it reads the damaged frame and must refuse.
    let err = Wal::open(dir.path(), small(4096)).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    let v = spool_wal::inspect::verify(dir.path()).unwrap();
    let d = v.damage.unwrap();
    assert_eq!(
        (d.segment.as_str(), d.offset),
        (
            sealed.file_name().unwrap().to_str().unwrap(),
            last_off as u64
        )
    );
}

#[test]
fn a_damaged_segment_header_is_reported_at_offset_zero() {
    let (dir, _) = written(3, WalConfig::default());
    let seg = segments(dir.path()).pop().unwrap();
    let mut image = std::fs::read(&seg).unwrap();
    image[3] ^= 0xff;
    std::fs::write(&seg, &image).unwrap();
    match Wal::open(dir.path(), WalConfig::default()).unwrap_err() {
        WalError::Corrupt { offset: 0, .. } => {}
        other => panic!("{other}"),
    }
    let skip = WalConfig {
        on_corruption: OnCorruption::Skip,
        ..WalConfig::default()
    };
    let wal = Wal::open(dir.path(), skip).unwrap();
    assert_eq!(pending_ns(&wal), vec![0, 1, 2]);
}

#[test]
fn a_segment_cut_inside_its_header_is_removed_as_torn() {
    let (dir, lsns) = written(30, small(4096));
    let segs = segments(dir.path());
    let newest = segs.last().unwrap();
    // Simulate a crash during creation of the next segment.
    let next = dir
        .path()
        .join(spool_wal::format::segment_file_name(lsns[29] + 1));
    std::fs::write(&next, &std::fs::read(newest).unwrap()[..10]).unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    assert!(wal.recovery_report().torn_tail.is_some());
    assert!(!next.exists() || std::fs::metadata(&next).unwrap().len() > 10);
    assert_eq!(pending_ns(&wal), (0..30).collect::<Vec<_>>());
}

#[tokio::test]
async fn checkpoint_kind_is_first_of_rotated_segments() {
    // A small backlog (one entry in four stays pending): every checkpoint is
    // under a quarter of a segment, so every rotation writes one.
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small(4096)).unwrap();
    for i in 0..100 {
        let l = wal.append(&[entry(i)]).await.unwrap();
        if i % 4 != 0 {
            wal.mark_delivered(&l).await.unwrap();
        }
    }
    wal.close();
    let segs = segments(dir.path());
    assert!(segs.len() > 2, "{} segments", segs.len());
    for s in &segs[1..] {
        assert_eq!(frames(&std::fs::read(s).unwrap())[0].2, Kind::Checkpoint);
    }
}
