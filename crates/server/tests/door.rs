//! The HTTP door in process (`tower::ServiceExt::oneshot` on the router, a real
//! engine, real SQLite and Postgres): what is answered 202 can be delivered.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use spool_testkit::PgServer;

use tower::ServiceExt;

mod common;
use common::*;

/// Entries no destination can store (or, `pg_only`, Postgres cannot): each is
/// refused with 400 `invalid_entry` naming the entry and the field; the whole
/// request is refused and nothing is written. Before (cbb1775) each was answered
/// 202 and became a dead letter at delivery.
const HOSTILE: &[(&str, &str, bool)] = &[
    (r#"{"text":"\ud800"}"#, "payload", false),
    (r#"{"text":"ok","n":1e400}"#, "payload", false),
    (r#"{"text":"nul \u0000 inside"}"#, "payload", true),
    (r#"{"k\u0000":1}"#, "payload", true),
    (r#"{"text":"x","subject":"a\u0000b"}"#, "payload", true),
    (
        r#"{"text":"x","idempotency_key":"k\u0000"}"#,
        "payload",
        true,
    ),
];

async fn hostile_entries(door: &Door, postgres: bool) {
    for (bad, field, pg_only) in HOSTILE {
        let before = door.last_lsn();
        let body = format!(r#"[{{"text":"fine"}},{bad}]"#);
        let (status, v) = door.post("/v1/default/entries?wait=delivered", body).await;
        if *pg_only && !postgres {
            // SQLite stores it: then it must really be delivered.
            assert_eq!(status, StatusCode::OK, "{bad}: {v}");
            for e in v["entries"].as_array().unwrap() {
                assert_eq!(e["status"], "delivered", "{bad}: {v}");
            }
            continue;
        }
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"], "invalid_entry", "{bad}: {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains("entry 1") && msg.contains(field),
            "{bad}: {msg}"
        );
        assert_eq!(door.last_lsn(), before, "{bad}: something was written");
    }
    assert!(door.app.engine.dead_letters(None, 10).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_refused_at_the_door_sqlite() {
    hostile_entries(&Door::start(None), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_refused_at_the_door_postgres() {
    let url = PgServer::shared().fresh_database();
    hostile_entries(&Door::start(Some(&url)), true).await;
}

fn gz(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn post_gzip(door: &Door, body: Vec<u8>) -> (StatusCode, Value) {
    let req = Request::post("/v1/default/entries")
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(Body::from(body))
        .unwrap();
    door.send(req).await
}

/// `cat a.gz b.gz` is valid gzip: every member's entries are stored. Before,
/// the second member was dropped and the answer was still 202.
#[tokio::test]
async fn a_multi_member_gzip_body_stores_every_entry() {
    let door = Door::start(None);
    let mut body = gz(b"{\"n\":1}\n{\"n\":2}\n");
    body.extend(gz(b"{\"n\":3}\n"));
    let (status, v) = post_gzip(&door, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["entries"].as_array().unwrap().len(), 3);
}

/// Garbage after the gzip member: 400 and nothing written (before: 202 with the
/// first member's entries).
#[tokio::test]
async fn trailing_garbage_after_gzip_is_refused_and_nothing_written() {
    let door = Door::start(None);
    let mut body = gz(b"{\"n\":1}\n");
    body.extend(b"\x00\x01garbage");
    let before = door.last_lsn();
    let (status, v) = post_gzip(&door, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(door.last_lsn(), before);
}

/// Query strings a client may craft are 400 with a message, never a 5xx, on
/// either destination; before, an out-of-range time or cursor reached Postgres
/// as a 500/503 and a NUL subject was a database error.
async fn crafted_reads(door: &Door) {
    let e = "/v1/default/entries";
    for q in [
        "since=1e300",
        "since=-99999999999999",
        "until=99999999999999",
        "since=10000-01-01T00:00:00Z",
        "since=yesterday",
        "cursor=7fffffffffffffff.0190a1b2c3d4e5f60718293a4b5c6d7e",
        "cursor=-8000000000000000.0190a1b2c3d4e5f60718293a4b5c6d7e",
        "cursor=%27%3B%20DROP%20TABLE%20spool_entries",
        "subject=a%00b",
        "limit=0",
        "limit=abc",
        "limit=99999999999999999999",
    ] {
        let (status, v) = get(door, &format!("{e}?{q}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert_eq!(v["error"], "invalid_request", "{q}: {v}");
        let msg = v["message"].as_str().unwrap();
        assert!(!msg.contains("SELECT") && !msg.contains('/'), "{q}: {msg}");
    }
    for q in ["wait=forever", "timeout_ms=-1"] {
        let (status, v) = door.post(&format!("{e}?{q}"), r#"{"a":1}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}: {v}");
    }
    // Strange but valid text is a query like any other.
    for q in [
        "q=%22%2A%28",
        "q=%F0%9F%98%80",
        "q=%00",
        "q=NEAR%28a%20b%29%20OR%20%2A",
    ] {
        let (status, v) = get(door, &format!("{e}?{q}")).await;
        assert_eq!(status, StatusCode::OK, "{q}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_reads_are_400_never_5xx_sqlite() {
    crafted_reads(&Door::start(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_reads_are_400_never_5xx_postgres() {
    let url = PgServer::shared().fresh_database();
    crafted_reads(&Door::start(Some(&url))).await;
}

/// Words of any script are found through `q` exactly as written (before: emoji
/// were never indexed, Devanagari words split at their marks).
async fn any_script_is_searchable(door: &Door) {
    let texts = [
        "नमस्ते दुनिया",
        "مرحبا بالعالم",
        "東京タワー",
        "party 🎉 time",
        "Grüße aus Köln, café",
    ];
    let body: Vec<String> = texts
        .iter()
        .map(|t| format!(r#"{{"text":"{t}"}}"#))
        .collect();
    let (status, v) = door
        .post(
            "/v1/default/entries?wait=delivered",
            format!("[{}]", body.join(",")),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for (word, text) in [
        ("नमस्ते", 0),
        ("بالعالم", 1),
        ("東", 2),
        ("タワー", 2),
        ("🎉", 3),
        ("köln", 4),
        ("CAFÉ", 4),
    ] {
        let q: String = url_escape(word);
        let (status, v) = get(door, &format!("/v1/default/entries?q={q}")).await;
        assert_eq!(status, StatusCode::OK, "{word}: {v}");
        let found: Vec<&str> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["payload"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(found, [texts[text]], "{word}");
    }
}

fn url_escape(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_script_is_searchable_sqlite() {
    any_script_is_searchable(&Door::start(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_script_is_searchable_postgres() {
    let url = PgServer::shared().fresh_database();
    any_script_is_searchable(&Door::start(Some(&url))).await;
}

/// What a web page can send cannot write, and a foreign Host (DNS rebinding) or
/// a cross-site Origin is refused while the default is open.
#[tokio::test]
async fn browser_requests_cannot_write_the_open_default() {
    let door = Door::start(None);
    let before = door.last_lsn();
    let send = |ct: Option<&str>, host: Option<&str>, origin: Option<&str>| {
        let mut r = Request::post("/v1/default/entries");
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        if let Some(h) = host {
            r = r.header("host", h);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.body(Body::from(r#"{"a":1}"#)).unwrap()
    };
    for (req, status, code) in [
        (send(None, None, None), 415, "unsupported_media_type"),
        (
            send(Some("text/plain"), None, None),
            415,
            "unsupported_media_type",
        ),
        (
            send(Some("application/x-www-form-urlencoded"), None, None),
            415,
            "unsupported_media_type",
        ),
        (
            send(Some("application/json"), Some("evil.example"), None),
            403,
            "forbidden_host",
        ),
        (
            send(
                Some("application/json"),
                Some("127.0.0.1:7070"),
                Some("https://evil.example"),
            ),
            403,
            "forbidden_origin",
        ),
    ] {
        let (got, v) = door.send(req).await;
        assert_eq!(
            (got.as_u16(), v["error"].as_str()),
            (status, Some(code)),
            "{v}"
        );
    }
    assert_eq!(door.last_lsn(), before, "a refused request wrote");
    let (status, _) = door
        .send(send(
            Some("application/json"),
            Some("localhost:7070"),
            Some("http://localhost:7070"),
        ))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // The listen address is ours with its port only: a Host without one (as
    // spool-bench once sent) is another origin's, and refused.
    for host in ["127.0.0.1", "localhost", "127.0.0.1:9"] {
        let (got, v) = door
            .send(send(Some("application/json"), Some(host), None))
            .await;
        assert_eq!(got, StatusCode::FORBIDDEN, "{host}: {v}");
    }
}

/// A door whose config adds `server` keys.
fn door_with(server_keys: &str) -> Door {
    Door::with_config(&format!("[server]\n{server_keys}\n"), "")
}

type Trickle = tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>;

/// A write whose body arrives only when the returned sender says so.
fn trickling_write() -> (Request<Body>, Trickle) {
    trickling("/v1/default/entries")
}

/// A POST to `path` whose body arrives only when the returned sender says so.
fn trickling(path: &str) -> (Request<Body>, Trickle) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let req = Request::post(path)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap();
    (req, tx)
}

/// `/mcp` reads its body like every route: a slow one is 408 at
/// `server.body_timeout`, not held for as long as the client likes.
#[tokio::test(start_paused = true)]
async fn an_mcp_body_slower_than_body_timeout_is_408() {
    let door = door_with("body_timeout = \"2s\"");
    let (req, tx) = trickling("/mcp");
    tx.send(Ok(br#"{"jsonrpc":"2.0","#.to_vec())).await.unwrap();
    let started = tokio::time::Instant::now();
    let (status, v) = door.send(req).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{v}");
    assert_eq!(v["error"], "request_timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    drop(tx);
}

/// `server.max_in_flight` requests at once; the next gets 503 `overloaded`
/// with Retry-After, while probes still answer.
#[tokio::test]
async fn requests_past_max_in_flight_are_overloaded() {
    let door = door_with("max_in_flight = 1");
    let (req, tx) = trickling_write();
    let slow = tokio::spawn(door.router.clone().oneshot(req));
    // Wait until the slow request holds the only slot.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while door.app.in_flight() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow write never started"
        );
        tokio::task::yield_now().await;
    }
    let (status, v) = door.post("/v1/default/entries", r#"{"a":1}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"], "overloaded");
    assert_eq!(v["retry_after_seconds"], 1);
    assert_eq!(get(&door, "/healthz").await.0, StatusCode::OK);
    tx.send(Ok(br#"{"slow":true}"#.to_vec())).await.unwrap();
    drop(tx);
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::ACCEPTED);
}

/// A body that does not arrive within `server.body_timeout` is 408
/// `request_timeout`, and nothing is written.
#[tokio::test(start_paused = true)]
async fn a_body_slower_than_body_timeout_is_408() {
    let door = door_with("body_timeout = \"2s\"");
    let before = door.last_lsn();
    let (req, tx) = trickling_write();
    tx.send(Ok(b"[{\"a\":1},".to_vec())).await.unwrap();
    let started = tokio::time::Instant::now();
    let (status, v) = door.send(req).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{v}");
    assert_eq!(v["error"], "request_timeout");
    assert!(
        took >= std::time::Duration::from_secs(2) && took < std::time::Duration::from_secs(3),
        "answered after {took:?}, not at body_timeout"
    );
    assert_eq!(door.last_lsn(), before);
    drop(tx);
    // The control: the rest arriving at 1.5 s is in time.
    let (req, tx) = trickling_write();
    tx.send(Ok(b"[{\"a\":1},".to_vec())).await.unwrap();
    let late = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        tx.send(Ok(b"{\"b\":2}]".to_vec())).await.unwrap();
    });
    let (status, v) = door.send(req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    late.await.unwrap();
}

/// A scraper that asks for `text/plain` (Prometheus) gets format 0.0.4; one
/// that asks for OpenMetrics gets OpenMetrics (with its `# EOF`).
#[tokio::test]
async fn metrics_answer_the_format_the_scraper_asks_for() {
    let door = Door::start(None);
    let scrape = |accept: &'static str| {
        let router = door.router.clone();
        async move {
            let req = Request::get("/metrics")
                .header("accept", accept)
                .body(Body::empty())
                .unwrap();
            let resp = router.oneshot(req).await.unwrap();
            let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (ct, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let (ct, text) = scrape("text/plain;version=0.0.4;q=0.5,*/*;q=0.1").await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    assert!(!text.contains("# EOF") && text.contains("spool_wal_bytes"));
    let (ct, text) = scrape("application/openmetrics-text;version=1.0.0").await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(text.trim_end().ends_with("# EOF"));
}

/// The WAL at `wal.max_bytes` with nothing deliverable (its Postgres is
/// unreachable): a write is 429 `queue_full` with Retry-After — the backlog's
/// bound, like a full queue — and nothing is written.
#[tokio::test]
async fn a_wal_at_its_quota_is_429_queue_full_and_writes_nothing() {
    let door = Door::with_config(
        "",
        "segment_bytes = \"16KiB\"\nmax_bytes = \"64KiB\"\n\
         [[destination]]\nname = \"pg\"\nkind = \"postgres\"\n\
         url = \"postgres://spool@127.0.0.1:1/unreachable\"\n",
    );
    let entry = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    let mut refused = None;
    for _ in 0..200 {
        let (status, v) = door.post("/v1/default/entries", entry.clone()).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(v);
            break;
        }
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    }
    let v = refused.expect("the quota never refused a write");
    assert_eq!(v["error"], "queue_full", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("wal.max_bytes"),
        "{v}"
    );
    assert!(v["retry_after_seconds"].as_u64().unwrap() >= 1, "{v}");
    let before = door.last_lsn();
    let (status, _) = door.post("/v1/default/entries", entry).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(door.last_lsn(), before, "a refused write was written");
}
