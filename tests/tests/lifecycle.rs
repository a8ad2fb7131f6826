//! The binary's life: kill -9 and SIGTERM under load, replay into a lost
//! destination, config errors, the offline WAL tools.

mod common;

use common::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Writers post single entries and 5-entry batches (some with idempotency keys)
/// until `stop`; every id answered 2xx is collected.
fn load(
    s: &Server,
    writers: usize,
    stop: Arc<AtomicBool>,
) -> (Vec<std::thread::JoinHandle<()>>, Arc<Mutex<Vec<String>>>) {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut hs = Vec::new();
    for w in 0..writers {
        let (url, stop, acked) = (s.url("/v1/default/entries"), stop.clone(), acked.clone());
        hs.push(std::thread::spawn(move || {
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let body = if i % 3 == 0 {
                    format!(
                        "[{}]",
                        (0..5)
                            .map(|k| format!(r#"{{"w":{w},"i":{i},"k":{k}}}"#))
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                } else {
                    format!(r#"{{"w":{w},"i":{i},"idempotency_key":"w{w}-{i}"}}"#)
                };
                let r = ureq::post(&url)
                    .set("Content-Type", "application/json")
                    .timeout(Duration::from_secs(5))
                    .send_string(&body);
                match r {
                    Ok(resp) if resp.status() / 100 == 2 => {
                        let v: serde_json::Value = resp.into_json().unwrap();
                        let mut a = acked.lock().unwrap();
                        for e in v["entries"].as_array().unwrap() {
                            a.push(e["id"].as_str().unwrap().to_owned());
                        }
                    }
                    Ok(_) | Err(ureq::Error::Status(..)) => {}
                    Err(_) => return, // the server went away
                }
            }
        }));
    }
    (hs, acked)
}

fn all_delivered(s: &Server, ids: &[String]) {
    for id in ids {
        eventually(
            Duration::from_secs(30),
            "acknowledged entry delivered",
            || {
                let r = s.get(&format!("/v1/default/entries/{id}"));
                assert_ne!(r.status, 404, "acknowledged entry {id} lost");
                r.body["status"] == "delivered"
            },
        );
    }
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), "");
    let mut acked = Vec::new();
    for _round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let (hs, ids) = load(&s, 8, stop.clone());
        eventually(Duration::from_secs(30), "some acknowledgements", || {
            ids.lock().unwrap().len() > 50
        });
        std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 300));
        s.kill();
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join().unwrap();
        }
        acked.extend(ids.lock().unwrap().drain(..));
        s.launch();
    }
    let unique: HashSet<_> = acked.iter().collect();
    all_delivered(&s, &acked);
    // Exactly once: the destination holds each acknowledged id once (ids are its
    // primary key) and nothing else beyond what was acknowledged or in flight.
    let mut seen = HashSet::new();
    let mut cursor = String::new();
    loop {
        let page = s
            .get(&format!("/v1/default/entries?limit=1000{cursor}"))
            .body;
        for e in page["entries"].as_array().unwrap() {
            assert!(
                seen.insert(e["id"].as_str().unwrap().to_owned()),
                "duplicate row {e}"
            );
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert!(unique.iter().all(|id| seen.contains(*id)));
    assert!(s.terminate().success());
    let (code, out, err) = spool(&[
        "wal",
        "verify",
        "--dir",
        dir.path().join("wal").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn sigterm_under_load_exits_0_and_keeps_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), "");
    let stop = Arc::new(AtomicBool::new(false));
    let (hs, ids) = load(&s, 8, stop.clone());
    eventually(Duration::from_secs(30), "some acknowledgements", || {
        ids.lock().unwrap().len() > 100
    });
    let status = s.terminate();
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    assert!(status.success(), "{status}");
    let acked = ids.lock().unwrap().clone();
    s.launch();
    all_delivered(&s, &acked);
}

#[test]
fn replay_rebuilds_a_lost_destination() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), "");
    let mut ids = Vec::new();
    for i in 0..30 {
        let r = s.post(
            "/v1/default/entries?wait=delivered",
            &format!(r#"{{"i":{i},"text":"memory {i}"}}"#),
        );
        assert_eq!(r.status, 200);
        ids.push(r.body["entries"][0]["id"].as_str().unwrap().to_owned());
    }
    assert!(s.terminate().success());
    let cfg = s.config.to_str().unwrap().to_owned();
    // A live server holds the WAL: the offline tools refuse.
    s.launch();
    let (code, _, err) = spool(&["replay", "--config", &cfg, "--destination", "main"]);
    assert_eq!(code, 1, "replay ran against a live server's WAL: {err}");
    assert!(err.contains("running"), "{err}");
    assert!(s.terminate().success());

    for f in ["spool.db", "spool.db-wal", "spool.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let (code, out, err) = spool(&[
        "replay",
        "--config",
        &cfg,
        "--destination",
        "main",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let dry: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dry["replayed"], 30, "{dry}");
    for _ in 0..2 {
        // Twice: idempotent.
        let (code, out, err) = spool(&[
            "replay",
            "--config",
            &cfg,
            "--destination",
            "main",
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (v["replayed"].as_u64(), v["delivered"].as_u64()),
            (Some(30), Some(30)),
            "{v}"
        );
    }
    s.launch();
    let page = s.get("/v1/default/entries?limit=1000").body;
    let got: HashSet<_> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.len(), 30);
    assert!(ids.iter().all(|id| got.contains(id)));
}

#[test]
fn config_errors_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, needle) in [
        (
            "[server]\nlisten_address = \"127.0.0.1:1\"\n",
            "listen_address",
        ),
        ("[queue]\ncapacity = -5\n", "capacity"),
        ("[wal]\nsync = \"sometimes\"\n", "wal.sync"),
        ("[server]\nlisten = \"0.0.0.0:7999\"\n", "token"),
    ] {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let (code, _, err) = spool(&["serve", "--config", p.to_str().unwrap()]);
        assert_eq!(code, 2, "{text:?}: {err}");
        assert!(err.contains(needle), "{text:?}: {err}");
    }
    let (code, _, _) = spool(&["serve", "--no-such-flag"]);
    assert_eq!(code, 2);
    let (code, _, err) = spool(&[
        "wal",
        "verify",
        "--dir",
        dir.path().join("missing").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn wal_tools_report_and_find_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), "");
    for i in 0..20 {
        assert_eq!(
            s.post(
                "/v1/default/entries?wait=delivered",
                &format!(r#"{{"i":{i}}}"#)
            )
            .status,
            200
        );
    }
    assert!(s.terminate().success());
    let wal = dir.path().join("wal");
    let w = wal.to_str().unwrap();
    let (code, out, _) = spool(&["wal", "verify", "--dir", w, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["ok"],
        true
    );
    let (code, out, _) = spool(&["wal", "stats", "--dir", w, "--json"]);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (code, st["entries"].as_u64(), st["pending"].as_u64()),
        (0, Some(20), Some(0)),
        "{st}"
    );
    let (code, out, _) = spool(&["wal", "inspect", "--dir", w, "--limit", "5"]);
    assert_eq!((code, out.lines().count()), (0, 5), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("entry") && l.contains("default")),
        "{out}"
    );
    // Flip a byte in the middle of the segment: verify names segment and offset, exit 1.
    let seg = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    let (code, out, _) = spool(&["wal", "verify", "--dir", w]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(seg.file_name().unwrap().to_str().unwrap()) && out.contains("offset"),
        "{out}"
    );
}
