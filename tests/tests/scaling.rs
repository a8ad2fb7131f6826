//! Two spool nodes in front of one Postgres (docs/scaling.md): each node owns its
//! WAL, ids are global, destination writes are idempotent. One node is killed
//! under load and restarted; every entry either node acknowledged is in Postgres
//! exactly once.

mod common;

use common::*;
use serde_json::json;
use spool_testkit::PgServer;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn two_nodes_share_one_postgres_and_a_killed_node_loses_nothing() {
    let pg = PgServer::start();
    std::env::set_var("SPOOL_E2E_PG_URL", pg.url());
    let dest = "[[destination]]\nname = \"pg\"\nkind = \"postgres\"\nurl = \"env:SPOOL_E2E_PG_URL\"\npool_size = 2\n";
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Server::start(da.path(), dest);
    let b = Server::start(db.path(), dest);
    let seen = Arc::new(Mutex::new(Seen::default()));

    let la = Load::start(&a, 0, 4, false, seen.clone());
    let lb = Load::start(&b, 1, 4, false, seen.clone());
    eventually(Duration::from_secs(60), "both nodes acknowledge", || {
        la.acked() >= 300
    });
    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 200));
    a.kill();
    la.finish();
    // Node B keeps serving while A is down; A restarts on its own WAL.
    let floor = lb.acked() + 100;
    eventually(Duration::from_secs(60), "node B serves on", || {
        lb.acked() >= floor
    });
    a.launch();
    let la = Load::start(&a, 2, 4, false, seen.clone());
    let floor = la.acked() + 100;
    eventually(Duration::from_secs(60), "node A serves again", || {
        la.acked() >= floor
    });
    la.finish();
    lb.finish();

    drained(&a, Duration::from_secs(60));
    let seen = seen.lock().unwrap();
    // check() drains the node it is given and reads the shared table back.
    check(&b, &seen);
    // Both nodes read the same rows.
    assert_eq!(all_rows(&a, "default").len(), all_rows(&b, "default").len());
    report(json!({
        "scenario": "two nodes, one Postgres; node A SIGKILLed under load and restarted",
        "load": "4 writers per node (mixed)",
        "cycles": "1",
        "acknowledged": seen.acked.len(),
        "lost": 0, "duplicates": 0, "5xx": seen.fivexx(),
        "result": "pass",
    }));
}

/// Issue 14, scenario 7: a keyed retry that reaches the other node (each node
/// has its own key index) is stored once: the destination drops the copy and
/// the node that delivered it counts it.
#[test]
fn a_keyed_retry_on_another_node_is_stored_once() {
    let pg = PgServer::start();
    // The URL inline: tests of this binary run in parallel, and the other one
    // sets SPOOL_E2E_PG_URL to its own server.
    let dest = &format!(
        "[[destination]]\nname = \"pg\"\nkind = \"postgres\"\nurl = \"{}\"\npool_size = 2\n",
        pg.url()
    );
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(da.path(), dest);
    let b = Server::start(db.path(), dest);
    let post = |s: &Server| {
        let r = call(
            ureq::post(&s.url("/v1/default/entries?wait=delivered"))
                .set("Content-Type", "application/json")
                .set("Idempotency-Key", "order-42"),
            Some(br#"{"text":"charge once"}"#),
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["entries"][0]["id"].as_str().unwrap().to_owned()
    };
    let first = post(&a);
    let retry = post(&b);
    assert_ne!(first, retry, "each node has its own key index");
    let rows: Vec<_> = all_rows(&a, "default")
        .into_iter()
        .filter(|r| r["payload"]["text"] == "charge once")
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"].as_str(), Some(first.as_str()));
    let metrics = b.get("/metrics").body;
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("spool_destination_duplicates_total{destination=\"pg\"} 1"),
        "{metrics}"
    );
}
