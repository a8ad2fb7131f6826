//! kill -9 of a process running the engine under load: every entry it
//! acknowledged ends up in the destination exactly once, and idempotency keys
//! keep answering the one entry written for them across crashes.

mod common;

use common::entry;
use rand::Rng;
use spool_destination::{Destination, SqliteDestination};
use spool_queue::{Engine, EngineConfig};
use spool_wal::{Wal, WalConfig};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const CHILD_ENV: &str = "SPOOL_QUEUE_CRASH_CHILD_DIR";

async fn engine(dir: &Path) -> (Engine, Arc<SqliteDestination>) {
    let db = Arc::new(
        SqliteDestination::open(
            "main",
            &dir.join("spool.db"),
            None,
            spool_destination::DEFAULT_SQLITE_TIMEOUT,
        )
        .unwrap(),
    );
    let wal = Wal::open(dir.join("wal"), WalConfig::default()).unwrap();
    let cfg = EngineConfig {
        capacity: 2000,
        workers: 2,
        batch_max: 200,
        batch_linger: Duration::from_millis(2),
        key_index: Some(dir.join("keys")),
        ..EngineConfig::default()
    };
    (Engine::start(wal, vec![db.clone()], cfg).unwrap(), db)
}

/// Runs only as the child: ingests until killed, printing `ACK <id> <key|->` for
/// every entry of every call that returned Ok.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (engine, _db) = engine(Path::new(&dir)).await;
        let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let (engine, out) = (engine.clone(), out.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let n = rand::random::<u32>() as u64;
                    let mut batch = vec![entry(n)];
                    if i % 3 == 0 {
                        // Keys repeat within and across runs: replays, like producer retries.
                        batch[0].idempotency_key = Some(format!("k-{t}-{}", i % 40));
                        batch.push(entry(n + 1));
                    }
                    let Ok(r) = engine.ingest(batch.clone(), false).await else {
                        continue;
                    };
                    let mut o = out.lock().unwrap();
                    for (a, e) in r.accepted.iter().zip(&batch) {
                        writeln!(
                            o,
                            "ACK {} {}",
                            a.id,
                            e.idempotency_key.as_deref().unwrap_or("-")
                        )
                        .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_are_delivered_exactly_once_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: Vec<(Uuid, String)> = Vec::new();
    for round in 0..3 {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut it = line.strip_prefix("ACK ").unwrap_or_default().split(' ');
                if let (Some(id), Some(key)) = (it.next(), it.next()) {
                    if tx
                        .send((id.parse::<Uuid>().unwrap(), key.to_owned()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child acknowledged nothing");
        acked.push(first);
        let kill_at =
            Instant::now() + Duration::from_millis(rand::thread_rng().gen_range(100..600));
        while Instant::now() < kill_at {
            if let Ok(a) = rx.recv_timeout(Duration::from_millis(5)) {
                acked.push(a);
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());
        assert!(
            acked.len() > 10 * (round + 1),
            "round {round}: too few acks to mean anything"
        );
    }

    // Restart once more and let the engine finish the backlog.
    let (engine, db) = engine(dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while engine.wal_status().pending > 0 {
        assert!(
            Instant::now() < deadline,
            "backlog not delivered: {:?}",
            engine.wal_status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (id, _) in &acked {
        assert!(
            db.get("agents", *id).await.unwrap().is_some(),
            "acknowledged entry {id} lost"
        );
    }
    // One row per key, and it is the entry every acknowledgement of that key named.
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("spool.db").display()
    ))
    .await
    .unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT idempotency_key, id FROM spool_entries WHERE idempotency_key IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut by_key: HashMap<String, String> = HashMap::new();
    for (k, id) in rows {
        assert!(
            by_key.insert(k.clone(), id).is_none(),
            "key {k} written twice"
        );
    }
    for (id, key) in acked.iter().filter(|(_, k)| k != "-") {
        assert_eq!(
            by_key.get(key),
            Some(&id.to_string()),
            "key {key} answered {id}"
        );
    }
    assert_eq!(
        engine.shutdown(Duration::from_secs(10)).await.left_pending,
        0
    );
}
