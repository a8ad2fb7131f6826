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
