//! Forgetting, end to end on the built binary: what a producer forgot stays
//! forgotten across kill -9, restart, and `spool replay` into a lost destination.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

fn ids_of(rows: &[Value]) -> HashSet<String> {
    rows.iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn forgotten_entries_stay_forgotten_after_kill_restart_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so forgotten entries lie in sealed ones for `wal compact`.
    let mut s = Server::start_with(dir.path(), "", "segment_bytes = \"4KiB\"", "");
    let pad = "x".repeat(600);
    let mut ids = Vec::new();
    for i in 0..10 {
        let subject = if i % 4 == 0 { "alice" } else { "bob" };
        let r = s.post(
            "/v1/default/entries?wait=delivered",
            &format!(
                r#"{{"i":{i},"text":"memory {i} secret{i}z","pad":"{pad}","subject":"{subject}"}}"#
            ),
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
        ids.push(r.body["entries"][0]["id"].as_str().unwrap().to_owned());
    }
    // Forget entry 1 by id, and alice's entries (0, 4, 8) by subject.
    let r = call(
        ureq::delete(&s.url(&format!("/v1/default/entries/{}", ids[1]))),
        None,
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = s.post("/v1/default/forget", r#"{"subject":"alice"}"#);
    assert_eq!(
        (r.status, r.body["deleted"].as_u64()),
        (200, Some(3)),
        "{:?}",
        r.body
    );
    let forgotten: HashSet<String> = [0, 1, 4, 8].iter().map(|&i| ids[i].clone()).collect();
    let kept = |rows: &[Value]| {
        let got = ids_of(rows);
        assert_eq!(got.len(), 6, "{got:?}");
        assert!(
            got.is_disjoint(&forgotten),
            "a forgotten entry is back: {got:?}"
        );
    };
    kept(&all_rows(&s, "default"));

    // kill -9 and restart: the tombstones are in the WAL, nothing comes back.
    s.kill();
    s.launch();
    kept(&all_rows(&s, "default"));
    for id in &forgotten {
        assert_eq!(s.get(&format!("/v1/default/entries/{id}")).status, 404);
    }
    assert!(s.terminate().success());

    // The destination is lost; replay rebuilds it without the forgotten entries.
    for f in ["spool.db", "spool.db-wal", "spool.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    let cfg = s.config.to_str().unwrap().to_owned();
    let (code, out, err) = spool(&[
        "replay",
        "--config",
        &cfg,
        "--destination",
        "main",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["replayed"].as_u64(), v["forgotten_skipped"].as_u64()),
        (Some(6), Some(4)),
        "{v}"
    );
    assert_eq!(v["tombstones_applied"], 2, "{v}");
    s.launch();
    eventually(Duration::from_secs(10), "the server to answer", || {
        s.get("/healthz").status == 200
    });
    kept(&all_rows(&s, "default"));

    // The WAL itself says which entries were forgotten.
    let wal = dir.path().join("wal");
    assert!(s.terminate().success());
    let (code, out, err) = spool(&["wal", "inspect", "--dir", wal.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let forgotten_records = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["status"] == "forgotten")
        .count();
    assert_eq!(forgotten_records, 4, "{out}");

    // Compaction erases them from the sealed segments (offline only).
    s.launch();
    let (code, _, err) = spool(&["wal", "compact", "--dir", wal.to_str().unwrap()]);
    assert_eq!(code, 1, "compact ran against a live server's WAL: {err}");
    assert!(s.terminate().success());
    let (code, out, err) = spool(&["wal", "compact", "--dir", wal.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["entries_erased"].as_u64().unwrap() >= 2, "{v}");
    let on_disk = |needle: &str| {
        std::fs::read_dir(&wal)
            .unwrap()
            .map(|f| f.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .any(|p| {
                let bytes = std::fs::read(p).unwrap();
                bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            })
    };
    assert!(
        !on_disk("secret0z") && !on_disk("secret1z"),
        "forgotten payloads left: {v}"
    );
    assert!(on_disk("secret2z"), "a kept entry was erased");
    let (code, out, err) = spool(&["wal", "verify", "--dir", wal.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    s.launch();
    eventually(Duration::from_secs(10), "the server to answer", || {
        s.get("/healthz").status == 200
    });
    kept(&all_rows(&s, "default"));
}
