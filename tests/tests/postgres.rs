//! The binary with a Postgres destination (the throwaway-server harness), and
//! wait=delivered while that destination is down.

mod common;

use common::*;
use spool_testkit::PgServer;
use std::time::Duration;

#[test]
fn postgres_end_to_end_and_wait_delivered_during_an_outage() {
    let mut pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = "[queue]\nbackoff_initial = \"20ms\"\nbackoff_max = \"200ms\"\nmax_attempts = 2\n[[destination]]\nname = \"pg\"\nkind = \"postgres\"\nurl = \"env:SPOOL_E2E_PG_URL\"\npool_size = 2\n";
    std::env::set_var("SPOOL_E2E_PG_URL", pg.url());
    let s = Server::start(dir.path(), extra);
    let r = s.post(
        "/v1/default/entries?wait=delivered",
        r#"{"text":"stored in postgres","subject":"pg"}"#,
    );
    assert_eq!(
        (r.status, r.body["entries"][0]["status"].as_str()),
        (200, Some("delivered")),
        "{r:?}"
    );
    let id = r.body["entries"][0]["id"].as_str().unwrap().to_owned();
    let got = s.get(&format!("/v1/default/entries/{id}")).body;
    assert_eq!(
        (got["status"].as_str(), got["payload"]["text"].as_str()),
        (Some("delivered"), Some("stored in postgres"))
    );
    assert_eq!(
        s.get("/v1/default/entries?q=postgres").body["entries"][0]["id"],
        id.as_str()
    );

    pg.stop();
    let r = s.post(
        "/v1/default/entries?wait=delivered&timeout_ms=1500",
        r#"{"text":"during the outage"}"#,
    );
    assert_eq!(
        (r.status, r.body["entries"][0]["status"].as_str()),
        (202, Some("durable")),
        "{r:?}"
    );
    let late = r.body["entries"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        s.get(&format!("/v1/default/entries/{late}")).body["status"],
        "pending"
    );
    assert_eq!(s.get("/readyz").status, 503);
    pg.restart();
    eventually(Duration::from_secs(30), "delivery after the outage", || {
        s.get(&format!("/v1/default/entries/{late}")).body["status"] == "delivered"
    });
    let dead = s.get("/v1/admin/dead-letters").body;
    assert_eq!(
        dead["dead_letters"].as_array().unwrap().len(),
        0,
        "an outage made dead letters: {dead}"
    );
}

/// A Postgres destination "pg" at `pg`'s URL (inline: the tests of this binary
/// run in parallel, and one of them sets SPOOL_E2E_PG_URL to its own server).
fn pg_dest(pg: &PgServer) -> String {
    format!(
        "[queue]\nbackoff_initial = \"20ms\"\nbackoff_max = \"200ms\"\nmax_attempts = 2\n[[destination]]\nname = \"pg\"\nkind = \"postgres\"\nurl = \"{}\"\npool_size = 2\ntimeout = \"5s\"\n",
        pg.url()
    )
}

/// The `spool_destination_up` sample for `name` in a /metrics body.
fn destination_up(s: &Server, name: &str) -> Option<String> {
    let text = s.get("/metrics").body;
    let text = text.as_str().unwrap_or_default().to_owned();
    let prefix = format!("spool_destination_up{{destination=\"{name}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_owned))
}

/// Issue 14, scenario 1. Before: `spool serve` exited ("opening destination …:
/// pool timed out"). Now it starts, reports the destination down, answers writes
/// 202 (durable), migrates at the first contact and delivers everything once.
#[test]
fn serve_starts_while_postgres_is_down_and_delivers_everything_once_it_is_up() {
    let mut pg = PgServer::start();
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &pg_dest(&pg));
    eventually(
        Duration::from_secs(10),
        "the destination reported down",
        || destination_up(&s, "pg").as_deref() == Some("0"),
    );
    let ready = s.get("/readyz");
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert!(
        ready.body["checks"]["destination:pg"]
            .as_str()
            .is_some_and(|c| c != "ok"),
        "{}",
        ready.body
    );
    let mut ids = Vec::new();
    for i in 0..10 {
        let r = s.post(
            "/v1/default/entries",
            &format!(r#"[{{"n":{i},"text":"while down"}},{{"n":{i},"text":"second"}}]"#),
        );
        assert_eq!(r.status, 202, "{:?}", r.body);
        for e in r.body["entries"].as_array().unwrap() {
            ids.push(e["id"].as_str().unwrap().to_owned());
        }
    }
    pg.restart();
    eventually(Duration::from_secs(60), "everything delivered", || {
        ids.iter()
            .all(|id| s.get(&format!("/v1/default/entries/{id}")).body["status"] == "delivered")
    });
    let rows = all_rows(&s, "default");
    let distinct: std::collections::HashSet<_> = rows
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        (rows.len(), distinct.len()),
        (20, 20),
        "delivered once each"
    );
    eventually(
        Duration::from_secs(10),
        "ready once the destination is up",
        || s.get("/readyz").status == 200,
    );
    assert_eq!(destination_up(&s, "pg").as_deref(), Some("1"));
    assert_eq!(
        s.get("/v1/admin/dead-letters").body["dead_letters"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

/// Issue 14, scenario 4 (purge) and 5 (replay semantics), with a Postgres that
/// rejects entries of subject "poison" (a CHECK constraint) and a second SQLite
/// destination to copy into.
#[test]
fn dead_letters_are_purged_and_replay_never_marks_another_destinations_entries() {
    let mut pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "{}[[destination]]\nname = \"copy\"\nkind = \"sqlite\"\npath = \"{}\"\n[[source]]\nname = \"default\"\ndestination = \"pg\"\n",
        pg_dest(&pg),
        dir.path().join("copy.db").display()
    );
    let mut s = Server::start(dir.path(), &extra);
    let r = s.post("/v1/default/entries?wait=delivered", r#"{"text":"first"}"#);
    assert_eq!(r.status, 200, "{:?}", r.body);
    psql(
        &pg,
        "ALTER TABLE spool_entries ADD CONSTRAINT no_poison CHECK (subject IS DISTINCT FROM 'poison')",
    );
    let dead: Vec<String> = (0..3)
        .map(|i| {
            let r = s.post(
                "/v1/default/entries?wait=delivered",
                &format!(r#"{{"text":"bad {i}","subject":"poison"}}"#),
            );
            assert_eq!(r.body["entries"][0]["status"], "failed", "{:?}", r.body);
            r.body["entries"][0]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    // Over HTTP, by id: the count and the ids; an id that is not a dead letter is named.
    let r = s.post(
        "/v1/admin/dead-letters/purge",
        &format!(
            r#"{{"ids":["{}","00000000-0000-7000-8000-000000000000"]}}"#,
            dead[0]
        ),
    );
    assert_eq!(
        (r.status, r.body["purged"].as_u64()),
        (200, Some(1)),
        "{:?}",
        r.body
    );
    assert_eq!(r.body["not_dead_letters"].as_array().unwrap().len(), 1);
    assert_eq!(
        s.get(&format!("/v1/default/entries/{}", dead[0])).status,
        404
    );
    let r = s.post("/v1/admin/dead-letters/purge", r#"{"ids":[],"all":true}"#);
    assert_eq!(r.status, 400, "ids and all together: {:?}", r.body);
    // Offline, all: the server stopped, `spool dlq purge --all`.
    assert!(s.terminate().success());
    let cfg = s.config.to_str().unwrap().to_owned();
    let (code, out, err) = spool(&["dlq", "purge", "--all", "--config", &cfg, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["purged"], 2, "{v}");
    let (_, out, _) = spool(&["dlq", "list", "--config", &cfg, "--json"]);
    assert!(out.contains(r#""dead_letters":[]"#), "{out}");

    // Replay: entries pending for pg (down) copied to "copy" keep their status.
    pg.stop();
    s.launch();
    for i in 0..3 {
        let r = s.post(
            "/v1/default/entries",
            &format!(r#"{{"text":"pending {i}"}}"#),
        );
        assert_eq!(r.status, 202);
    }
    assert!(s.terminate().success());
    let replay = |dest: &str, source: Option<&str>| {
        let mut args = vec!["replay", "--config", &cfg, "--destination", dest, "--json"];
        if let Some(src) = source {
            args.extend(["--source", src]);
        }
        let (code, out, err) = spool(&args);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let stats = |cfg_dir: &std::path::Path| {
        let (_, out, _) = spool(&["wal", "stats", "--dir", cfg_dir.to_str().unwrap(), "--json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["pending"].clone()
    };
    let v = replay("copy", Some("default"));
    assert_eq!(
        (
            v["pending"].as_u64(),
            v["delivered"].as_u64(),
            v["copied_from_other_destinations"].as_u64(),
            v["purged_skipped"].as_u64()
        ),
        (Some(3), Some(1), Some(4), Some(3)),
        "purged dead letters are never replayed: {v}"
    );
    assert_eq!(stats(&dir.path().join("wal")), 3, "still pending for pg");
    // Replayed to their own destination, they are delivered.
    pg.restart();
    let v = replay("pg", None);
    assert_eq!(v["pending"], 3, "{v}");
    assert_eq!(stats(&dir.path().join("wal")), 0);
    s.launch();
    assert_eq!(all_rows(&s, "default").len(), 4);
}
