//! A real full disk: the WAL on a 1 MiB tmpfs. Appends fail with `NoSpace` and
//! leave no partial record; once space returns, appends work again without a
//! restart; everything acknowledged survives.
//!
//! Needs root to mount (CI and the dev machines run as root). Where mounting is
//! impossible the test says so and, under `CI=true`, fails rather than skip.

mod common;

use common::*;
use spool_testkit::Tmpfs;
use spool_wal::{Wal, WalConfig, WalError};
use std::path::Path;

fn fill(path: &Path, bytes: usize) {
    std::fs::write(path, vec![0u8; bytes]).unwrap();
}

#[tokio::test]
async fn a_full_disk_fails_appends_cleanly_and_they_resume_when_space_returns() {
    let Some(dir) = Tmpfs::mount_or_skip("1m") else {
        return;
    };
    let waldir = dir.path().join("wal");
    let ballast = dir.path().join("ballast");
    fill(&ballast, 256 * 1024);
    let cfg = WalConfig {
        segment_bytes: 64 << 20,
        ..WalConfig::default()
    };
    let wal = Wal::open(&waldir, cfg.clone()).unwrap();
    let mut acked = Vec::new();
    let mut n = 0u64;
    let big = |n: u64| {
        let mut e = entry(n);
        e.payload = format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(3000)).into_bytes();
        e
    };
    let err = loop {
        match wal.append(&[big(n)]).await {
            Ok(l) => acked.push((l[0], n)),
            Err(e) => break e,
        }
        n += 1;
        assert!(n < 10_000, "the disk never filled");
    };
    assert!(matches!(err, WalError::NoSpace { .. }), "{err}");
    assert!(err.is_out_of_space());
    // Still full: still a clean, typed refusal, and the WAL stays up.
    assert!(matches!(
        wal.append(&[big(n)]).await,
        Err(WalError::NoSpace { .. })
    ));
    let seg = segments(&waldir).pop().unwrap();
    let image = std::fs::read(&seg).unwrap();
    assert_eq!(
        frames(&image).len(),
        acked.len(),
        "a partial record was left behind"
    );

    // Space returns: appends resume without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let l = wal.append(&[entry(777_777)]).await.unwrap()[0];
    assert!(l > acked.last().unwrap().0);
    acked.push((l, 777_777));
    wal.close();
    drop(wal);

    let wal = Wal::open(&waldir, cfg).unwrap();
    assert!(wal.recovery_report().torn_tail.is_none());
    let got: Vec<(u64, u64)> = wal
        .pending_after(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| (e.lsn, payload_n(&e.entry.payload)))
        .collect();
    assert_eq!(got, acked);
}
