//! The HTTP API of the real binary: every status code of SPEC, provoked for real.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

const SOURCES: &str = r#"
[queue]
capacity = 50
[limits]
max_entry_bytes = "1KiB"
max_entries_per_request = 50
[[source]]
name = "agents"
token = "agents-secret"
[[source]]
name = "robots"
token = "robots-secret"
rate_limit = 5
"#;

fn start() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        dir.path(),
        "admin_token = \"admin-secret\"\nmax_body_bytes = \"64KiB\"",
        "",
        SOURCES,
    );
    (dir, s)
}

fn post_as(
    s: &Server,
    source: &str,
    token: Option<&str>,
    query: &str,
    ct: &str,
    body: &[u8],
) -> Resp {
    let mut r = ureq::post(&s.url(&format!("/v1/{source}/entries{query}"))).set("Content-Type", ct);
    if let Some(t) = token {
        r = r.set("Authorization", &format!("Bearer {t}"));
    }
    call(r, Some(body))
}

fn agents(s: &Server, query: &str, body: &str) -> Resp {
    post_as(
        s,
        "agents",
        Some("agents-secret"),
        query,
        "application/json",
        body.as_bytes(),
    )
}

fn get_as(s: &Server, path: &str, token: &str) -> Resp {
    call(
        ureq::get(&s.url(path)).set("Authorization", &format!("Bearer {token}")),
        None,
    )
}

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.body["error"], code, "{r:?}");
    assert!(
        r.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{r:?}"
    );
}

#[test]
fn writes_and_reads_back() {
    let (_d, s) = start();
    let r = agents(
        &s,
        "",
        r#"{"text":"the quick brown fox","subject":"animals"}"#,
    );
    assert_eq!(r.status, 202, "{r:?}");
    let e = &r.body["entries"][0];
    assert_eq!(e["status"], "durable");
    let id = e["id"].as_str().unwrap().to_owned();
    assert!(e["lsn"].as_u64().unwrap() >= 1);

    let r = agents(
        &s,
        "?wait=delivered&timeout_ms=10000",
        r#"[{"text":"lazy dog"},{"text":"sleeps","subject":"animals"}]"#,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["status"] == "delivered"));

    let nd = b"{\"text\":\"one\"}\n\n{\"text\":\"two\"}\n";
    let r = post_as(
        &s,
        "agents",
        Some("agents-secret"),
        "?wait=delivered",
        "application/x-ndjson",
        nd,
    );
    assert_eq!(
        (r.status, r.body["entries"].as_array().unwrap().len()),
        (200, 2),
        "{r:?}"
    );

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(br#"{"text":"compressed"}"#).unwrap();
    let r = call(
        ureq::post(&s.url("/v1/agents/entries?wait=delivered"))
            .set("Authorization", "Bearer agents-secret")
            .set("Content-Type", "application/json")
            .set("Content-Encoding", "gzip"),
        Some(&gz.finish().unwrap()),
    );
    assert_eq!(r.status, 200, "{r:?}");

    eventually(Duration::from_secs(10), "first entry delivered", || {
        get_as(&s, &format!("/v1/agents/entries/{id}"), "agents-secret").body["status"]
            == "delivered"
    });
    let one = get_as(&s, &format!("/v1/agents/entries/{id}"), "agents-secret").body;
    assert_eq!(one["payload"]["text"], "the quick brown fox");
    assert_eq!(one["subject"], "animals");
    let page = get_as(&s, "/v1/agents/entries?subject=animals", "agents-secret").body;
    assert_eq!(page["entries"].as_array().unwrap().len(), 2, "{page}");
    let hits = get_as(&s, "/v1/agents/entries?q=fox", "agents-secret").body;
    assert_eq!(hits["entries"][0]["id"], id.as_str());
    let all = get_as(&s, "/v1/agents/entries?limit=2", "agents-secret").body;
    assert_eq!(all["entries"].as_array().unwrap().len(), 2);
    let next = all["next_cursor"].as_str().expect("a next page");
    let rest = get_as(
        &s,
        &format!("/v1/agents/entries?limit=100&cursor={next}"),
        "agents-secret",
    )
    .body;
    assert_eq!(
        rest["entries"].as_array().unwrap().len(),
        4,
        "6 entries in all"
    );
    // Another source's token reads nothing of this one.
    assert_error(
        &get_as(&s, &format!("/v1/agents/entries/{id}"), "robots-secret"),
        403,
        "forbidden",
    );
    assert_error(
        &get_as(&s, &format!("/v1/robots/entries/{id}"), "robots-secret"),
        404,
        "not_found",
    );
    assert_eq!(
        get_as(&s, "/v1/robots/entries?q=fox", "robots-secret").body["entries"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn every_error_answers_with_its_code_and_writes_nothing() {
    let (dir, mut s) = start();
    assert_eq!(agents(&s, "", r#"{"warm":"up"}"#).status, 202);

    let r = agents(&s, "", "{\"a\":\n  nope}");
    assert_error(&r, 400, "invalid_json");
    assert!(
        r.body["message"].as_str().unwrap().contains("line 2"),
        "{r:?}"
    );
    assert_error(&agents(&s, "", r#"[{"ok":1}, 42]"#), 400, "invalid_entry");
    assert_error(&agents(&s, "", r#"{"subject": 7}"#), 400, "invalid_entry");
    assert_error(&agents(&s, "", "[]"), 400, "invalid_entry");
    assert_error(
        &agents(
            &s,
            "",
            &format!("{}{}", "[".repeat(20_000), "]".repeat(20_000)),
        ),
        400,
        "invalid_json",
    );
    assert_error(
        &post_as(
            &s,
            "agents",
            Some("agents-secret"),
            "",
            "application/json",
            b"{\"a\":\"\xff\"}",
        ),
        400,
        "invalid_json",
    );
    assert_error(&agents(&s, "?wait=sometimes", "{}"), 400, "invalid_request");
    assert_error(
        &post_as(&s, "agents", None, "", "application/json", b"{}"),
        401,
        "unauthorized",
    );
    assert_error(
        &post_as(&s, "agents", Some("wrong"), "", "application/json", b"{}"),
        401,
        "unauthorized",
    );
    assert_error(
        &post_as(
            &s,
            "agents",
            Some("robots-secret"),
            "",
            "application/json",
            b"{}",
        ),
        403,
        "forbidden",
    );
    assert_error(
        &post_as(
            &s,
            "nobody",
            Some("agents-secret"),
            "",
            "application/json",
            b"{}",
        ),
        404,
        "unknown_source",
    );
    assert_error(
        &post_as(
            &s,
            "..%2Fagents",
            Some("agents-secret"),
            "",
            "application/json",
            b"{}",
        ),
        404,
        "unknown_source",
    );
    let big_entry = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    assert_error(&agents(&s, "", &big_entry), 413, "payload_too_large");
    let big_body = format!("[{}]", vec![r#"{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#; 1000].join(","));
    assert_error(&agents(&s, "", &big_body), 413, "payload_too_large");
    let many = format!("[{}]", vec!["{}"; 101].join(","));
    assert_error(&agents(&s, "", &many), 413, "payload_too_large");
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b' '; 10 << 20]).unwrap();
    let r = call(
        ureq::post(&s.url("/v1/agents/entries"))
            .set("Authorization", "Bearer agents-secret")
            .set("Content-Type", "application/json")
            .set("Content-Encoding", "gzip"),
        Some(&bomb.finish().unwrap()),
    );
    assert_error(&r, 413, "payload_too_large");
    assert_error(
        &post_as(&s, "agents", Some("agents-secret"), "", "text/plain", b"{}"),
        415,
        "unsupported_media_type",
    );
    // 60 entries are more than a request may carry (max_entries_per_request =
    // queue.capacity = 50; a larger request could never fit): refused whole.
    let r = agents(&s, "", &format!("[{}]", vec!["{}"; 60].join(",")));
    assert_error(&r, 413, "payload_too_large");
    // rate_limit = 5/s for robots: a burst of 6 single entries meets a 429.
    let codes: Vec<u16> = (0..6)
        .map(|_| {
            post_as(
                &s,
                "robots",
                Some("robots-secret"),
                "",
                "application/json",
                b"{}",
            )
            .status
        })
        .collect();
    assert!(codes.contains(&429), "{codes:?}");
    let robots_written = codes.iter().filter(|c| **c == 202).count() as u64;

    assert_error(&s.get("/v1/admin/stats"), 401, "unauthorized");
    assert_error(
        &get_as(&s, "/v1/admin/stats", "agents-secret"),
        403,
        "forbidden",
    );
    assert_error(&s.get("/no/such/route"), 404, "not_found");
    // The WAL holds exactly the entries that got a 2xx.
    assert!(s.terminate().success());
    let (code, out, err) = spool(&[
        "wal",
        "stats",
        "--dir",
        dir.path().join("wal").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        stats["entries"].as_u64(),
        Some(1 + robots_written),
        "a refused request reached the WAL: {stats}"
    );
}

#[test]
fn idempotency_keys_replay_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), "");
    let first = call(
        ureq::post(&s.url("/v1/default/entries"))
            .set("Idempotency-Key", "order-17")
            .set("Content-Type", "application/json"),
        Some(br#"{"order":17}"#),
    );
    assert_eq!(first.status, 202);
    assert!(first.header("idempotent-replayed").is_none());
    let id = first.body["entries"][0]["id"].clone();
    let again = s.post(
        "/v1/default/entries",
        r#"{"order":17,"idempotency_key":"order-17"}"#,
    );
    assert_eq!(
        (again.status, again.header("idempotent-replayed")),
        (202, Some("true"))
    );
    assert_eq!(again.body["entries"][0]["id"], id);
    assert!(s.terminate().success());
    s.launch();
    let after = s.post(
        "/v1/default/entries",
        r#"{"order":17,"idempotency_key":"order-17"}"#,
    );
    assert_eq!(
        after.header("idempotent-replayed"),
        Some("true"),
        "{after:?}"
    );
    assert_eq!(after.body["entries"][0]["id"], id);
    assert_eq!(after.body["entries"][0]["status"], "delivered");
}

#[test]
fn admin_lists_and_requeues_dead_letters_and_metrics_render() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), "admin_token = \"adm\"", "", "");
    // SQLite rejects a payload that is not JSON text... but the API only accepts JSON;
    // so no dead letter can be made through it here: the list is empty and requeue is a no-op.
    let list = get_as(&s, "/v1/admin/dead-letters", "adm");
    assert_eq!(
        (
            list.status,
            list.body["dead_letters"].as_array().unwrap().len()
        ),
        (200, 0)
    );
    let rq = call(
        ureq::post(&s.url("/v1/admin/dead-letters/requeue")).set("Authorization", "Bearer adm"),
        Some(br#"{"all":true}"#),
    );
    assert_eq!(
        (rq.status, rq.body["requeued"].as_u64()),
        (200, Some(0)),
        "{rq:?}"
    );
    let bad = call(
        ureq::post(&s.url("/v1/admin/dead-letters/requeue")).set("Authorization", "Bearer adm"),
        Some(br#"{"all":true,"ids":[]}"#),
    );
    assert_error(&bad, 400, "invalid_request");
    s.post("/v1/default/entries?wait=delivered", r#"{"m":1}"#);
    let text = match s.get("/metrics").body {
        serde_json::Value::String(t) => t,
        other => panic!("{other}"),
    };
    for name in [
        "spool_entries_accepted_total{source=\"default\"} 1",
        "spool_entries_delivered_total{destination=\"main\"} 1",
        "spool_queue_capacity{destination=\"main\"} 10000",
        "spool_destination_up{destination=\"main\"} 1",
        "spool_wal_segments",
        "spool_wal_bytes",
        "spool_wal_pending_entries",
        "spool_wal_fsync_seconds_count",
        "spool_wal_group_size_count",
        "spool_delivery_seconds_count{destination=\"main\"} 1",
        "spool_http_requests_total{route=\"/v1/{source}/entries\",code=\"200\"} 1",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    let ready = s.get("/readyz");
    assert_eq!(
        (ready.status, ready.body["status"].as_str()),
        (200, Some("ready")),
        "{ready:?}"
    );
}

/// The README's curl examples, run as written against a server with the
/// embedded default's source (only the port differs).
#[test]
fn readme_curl_examples_work() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in readme.lines() {
        let l = line.trim();
        if current.is_empty() && !l.starts_with("curl ") {
            continue;
        }
        current.push_str(l.trim_end_matches('\\'));
        current.push(' ');
        if !l.ends_with('\\') {
            commands.push(std::mem::take(&mut current));
        }
    }
    assert!(
        commands.len() >= 4,
        "README lost its curl examples: {commands:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), "");
    let run = |cmd: &str| -> serde_json::Value {
        let out = std::process::Command::new("bash")
            .args(["-c", cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{cmd}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    for cmd in &commands {
        let cmd = cmd.replace("localhost:7070", &format!("127.0.0.1:{}", s.port));
        if cmd.contains("/search") {
            let v = run(&cmd);
            assert!(
                v["hits"].as_array().is_some_and(|h| !h.is_empty()),
                "{cmd}: {v}"
            );
            continue;
        }
        if cmd.contains("/forget") {
            let v = run(&cmd);
            assert!(v["deleted"].as_u64().is_some_and(|n| n >= 1), "{cmd}: {v}");
            continue;
        }
        let v = if cmd.contains("-X POST") {
            run(&cmd)
        } else {
            // Reads see what earlier (durable-only) writes delivered, once delivered.
            let mut v = serde_json::Value::Null;
            eventually(Duration::from_secs(10), "the read finds its entry", || {
                v = run(&cmd);
                v["entries"].as_array().is_some_and(|a| !a.is_empty())
            });
            v
        };
        let entries = v["entries"]
            .as_array()
            .unwrap_or_else(|| panic!("{cmd}: {v}"));
        assert!(!entries.is_empty(), "{cmd}: {v}");
        if cmd.contains("wait=delivered") {
            assert!(
                entries.iter().all(|e| e["status"] == "delivered"),
                "{cmd}: {v}"
            );
        }
    }
}

/// A client that never finishes its headers is cut off (header-read timeout)
/// while the server keeps answering everybody else.
#[test]
fn a_slow_client_is_cut_off_and_others_are_served() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), "");
    let mut idle = Vec::new();
    for _ in 0..50 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        c.write_all(b"POST /v1/default/entries HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        idle.push(c);
    }
    assert_eq!(
        s.post("/v1/default/entries", r#"{"still":"served"}"#)
            .status,
        202
    );
    let mut c = idle.pop().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf); // EOF (or a 408) once the server gives up
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the slow client was never cut off"
    );
}
