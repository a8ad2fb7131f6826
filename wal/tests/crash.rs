//! kill -9: a child process appends in a loop and reports every acknowledged LSN
//! over a pipe; the parent SIGKILLs it at random moments, reopens the WAL and
//! checks that every acknowledged record is there and intact.

mod common;

use common::*;
use rand::Rng;
use spool_wal::{Record, Wal};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "SPOOL_WAL_CRASH_CHILD_DIR";

/// Runs only as the child (the env var names its WAL dir): appends until killed,
/// printing `ACK <lsn> <n>` after each append resolves.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let base: u64 = std::env::var("SPOOL_WAL_CRASH_BASE")
        .unwrap()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async move {
        let wal = Wal::open(&dir, small(256 * 1024)).unwrap();
        let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let (wal, out) = (wal.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let n = base + t * 1_000_000 + i * 3;
                    let batch: Vec<_> = if i % 4 == 0 {
                        (0..3).map(|k| entry(n + k)).collect()
                    } else {
                        vec![entry(n)]
                    };
                    let lsns = wal.append(&batch).await.unwrap();
                    if i % 7 == 0 {
                        wal.mark_delivered(&lsns[..1]).await.unwrap();
                    }
                    let mut o = out.lock().unwrap();
                    for (l, e) in lsns.iter().zip(&batch) {
                        writeln!(o, "ACK {l} {}", payload_n(&e.payload)).unwrap();
                    }
                    o.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..5u64 {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env("SPOOL_WAL_CRASH_BASE", (round * 100_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut it = rest.split(' ');
                    let l: u64 = it.next().unwrap().parse().unwrap();
                    let n: u64 = it.next().unwrap().parse().unwrap();
                    if tx.send((l, n)).is_err() {
                        break;
                    }
                }
            }
        });
        // Wait for the child to be busy (some acks), then kill it at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child acknowledged nothing");
        let mut round_acks = vec![first];
        let kill_at = Instant::now() + Duration::from_millis(rng.gen_range(20..400));
        while Instant::now() < kill_at {
            if let Ok(a) = rx.recv_timeout(Duration::from_millis(5)) {
                round_acks.push(a);
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        round_acks.extend(rx.try_iter());
        assert!(
            round_acks.len() > 1,
            "round {round}: too few acks to mean anything"
        );
        for (l, n) in round_acks {
            assert!(acked.insert(l, n).is_none(), "LSN {l} acknowledged twice");
        }

        // Every acknowledged LSN is present with its payload, after recovery.
        let wal = Wal::open(dir.path(), small(256 * 1024)).unwrap();
        let mut found = BTreeMap::new();
        for item in wal.reader(1) {
            if let (l, Record::Entry(e)) = item.unwrap() {
                found.insert(l, payload_n(&e.payload));
            }
        }
        for (l, n) in &acked {
            assert_eq!(
                found.get(l),
                Some(n),
                "round {round}: acknowledged LSN {l} lost or changed"
            );
        }
        wal.close();
        drop(wal);
        let v = spool_wal::inspect::verify(dir.path()).unwrap();
        assert!(v.is_ok(), "round {round}: {:?}", v.damage);
    }
}
