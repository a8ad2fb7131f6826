//! The binary's life: SIGTERM under load, replay into a lost destination, config
//! errors, the offline WAL tools. (kill -9 under load is chaos.rs's crash loop.)

mod common;

use common::*;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn sigterm_under_load_exits_0_and_keeps_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), "");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let load = Load::start(&s, 0, 8, false, seen.clone());
    eventually(Duration::from_secs(30), "some acknowledgements", || {
        load.acked() > 100
    });
    let status = s.terminate();
    load.finish();
    assert!(status.success(), "{status}");
    s.launch();
    // Every acknowledged entry once; nothing answered 503 while draining is stored.
    check(&s, &seen.lock().unwrap());
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
