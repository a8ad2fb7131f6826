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
