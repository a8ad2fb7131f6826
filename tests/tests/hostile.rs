//! Hostile input by hand (issue 7): each gets a 4xx in bounded time and memory,
//! the server stays up, and nothing is written. And access control between
//! sources and the admin API.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[[source]]
name = "agents"
token = "agents-secret"
[[source]]
name = "robots"
token = "robots-secret"
"#;

fn start(dir: &std::path::Path) -> Server {
    Server::start_with(dir, "admin_token = \"admin-secret\"", "", CONFIG)
}

/// Send `head` and then `body_len` bytes of body in 64 KiB chunks (chunked
/// transfer encoding when `chunked`), stopping when the server stops reading;
/// the status code of the answer and the bytes the server took.
fn stream(s: &Server, head: &str, body_len: u64, chunked: bool) -> (u16, u64) {
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b' '; 64 << 10];
        let mut sent = 0u64;
        while sent < body_len {
            let n = chunk.len().min((body_len - sent) as usize);
            let ok = if chunked {
                write!(w, "{n:x}\r\n")
                    .and_then(|_| w.write_all(&chunk[..n]))
                    .and_then(|_| w.write_all(b"\r\n"))
            } else {
                w.write_all(&chunk[..n])
            };
            if ok.is_err() {
                break; // the server answered and closed
            }
            sent += n as u64;
        }
        if chunked && sent == body_len {
            let _ = w.write_all(b"0\r\n\r\n");
        }
        sent
    });
    let status = read_status(&mut c);
    let _ = c.shutdown(std::net::Shutdown::Both);
    (status, writer.join().unwrap())
}

/// The status code of the answer on `c` (0 if the server closed without one).
fn read_status(c: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        match c.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let line = String::from_utf8_lossy(&head);
    line.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn post(s: &Server, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut r = ureq::post(&s.url(path)).set("Authorization", "Bearer agents-secret");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        r = r.set("Content-Type", "application/json");
    }
    for (k, v) in headers {
        r = r.set(k, v);
    }
    call(r, Some(body))
}

/// The WAL's last LSN once nothing is pending (so delivery markers are in).
fn last_lsn(s: &Server) -> serde_json::Value {
    let stats = || {
        call(
            ureq::get(&s.url("/v1/admin/stats")).set("Authorization", "Bearer admin-secret"),
            None,
        )
        .body
    };
    eventually(Duration::from_secs(30), "nothing pending", || {
        stats()["wal"]["pending"] == 0
    });
    stats()["wal"]["last_lsn"].clone()
}

fn is_4xx(code: u16) -> bool {
    (400..500).contains(&code)
}

#[test]
fn hostile_input_gets_a_4xx_in_bounded_time_and_memory_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spool.log");
    let mut s = start(dir.path());
    s.kill();
    s.launch_logged(&log);
    // One real entry, so reads have something to return.
    let ok = post(
        &s,
        "/v1/agents/entries",
        &[],
        br#"{"subject":"s","text":"kept"}"#,
    );
    assert_eq!(ok.status, 202, "{ok:?}");
    let lsn = last_lsn(&s);
    let json = [("Content-Type", "application/json")];
    let mut rows = Vec::new();
    let mut check = |what: &str, code: u16, started: Instant| {
        assert!(is_4xx(code), "{what}: answered {code}");
        rows.push(json!({"input": what, "status": code, "ms": started.elapsed().as_millis()}));
    };

    let t = Instant::now();
    check(
        "malformed JSON",
        post(&s, "/v1/agents/entries", &json, br#"{"a": [1, 2"#).status,
        t,
    );
    let t = Instant::now();
    check(
        "invalid UTF-8",
        post(&s, "/v1/agents/entries", &json, b"{\"a\":\"\xff\xfe\"}").status,
        t,
    );
    let t = Instant::now();
    let deep = "[".repeat(100_000);
    check(
        "100k nested [",
        post(&s, "/v1/agents/entries", &json, deep.as_bytes()).status,
        t,
    );

    let t = Instant::now();
    let head = "POST /v1/agents/entries HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer agents-secret\r\nContent-Type: application/json\r\n";
    let (code, took) = stream(
        &s,
        &format!("{head}Content-Length: {}\r\n\r\n", 1u64 << 30),
        1 << 30,
        false,
    );
    assert!(took < 1 << 30, "the server read the whole 1 GiB body");
    check("1 GiB body with Content-Length", code, t);
    let t = Instant::now();
    let (code, took) = stream(
        &s,
        &format!("{head}Transfer-Encoding: chunked\r\n\r\n"),
        1 << 30,
        true,
    );
    assert!(
        took < 1 << 30,
        "the server read the whole chunked 1 GiB body"
    );
    check("1 GiB chunked body (no Content-Length)", code, t);

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![b' '; 1 << 20];
    for _ in 0..1024 {
        gz.write_all(&zeros).unwrap();
    }
    let bomb = gz.finish().unwrap();
    let t = Instant::now();
    let r = post(
        &s,
        "/v1/agents/entries",
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
        ],
        &bomb,
    );
    check(
        &format!("gzip bomb ({} KiB → 1 GiB)", bomb.len() >> 10),
        r.status,
        t,
    );

    let t = Instant::now();
    let tiny = format!("[{}{{}}]", "{},".repeat(999_999));
    check(
        "1M tiny entries in one request",
        post(&s, "/v1/agents/entries", &json, tiny.as_bytes()).status,
        t,
    );

    let t = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let big = "a".repeat(1 << 20);
    let _ = write!(
        c,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"
    );
    check("1 MiB header", read_status(&mut c), t);
    let t = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let many: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let _ = write!(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    check("10,000 headers", read_status(&mut c), t);

    for path in [
        "/v1/../entries",
        "/v1/%2E%2E/entries",
        "/v1/agents%2F..%2Fadmin/entries",
        "/v1/agents%2Fentries/entries",
        "/v1/%E2%80%AEagents/entries",
        "/v1/agents%00/entries",
        "/v1/AGENTS/entries",
    ] {
        let t = Instant::now();
        check(
            &format!("path {path}"),
            post(&s, path, &json, b"{}").status,
            t,
        );
    }

    // SQL injection strings in every query parameter of a read: a 4xx, or a
    // 200 that finds nothing — and the table is intact afterwards.
    let evil = [
        "' OR '1'='1",
        "1; DROP TABLE spool_entries; --",
        "\" OR \"\"=\"",
        "%' UNION SELECT * FROM sqlite_master --",
        "*) OR (1=1",
        "NEAR(a b, -1) OR \"",
    ];
    for param in ["subject", "q", "since", "until", "cursor", "limit"] {
        for v in evil {
            let r = call(
                ureq::get(&s.url("/v1/agents/entries"))
                    .set("Authorization", "Bearer agents-secret")
                    .query(param, v),
                None,
            );
            assert!(
                is_4xx(r.status) || (r.status == 200 && r.body["entries"] == json!([])),
                "{param}={v}: {r:?}"
            );
        }
    }
    let all = call(
        ureq::get(&s.url("/v1/agents/entries")).set("Authorization", "Bearer agents-secret"),
        None,
    );
    assert_eq!(all.body["entries"][0]["payload"]["text"], "kept", "{all:?}");

    // Log injection: newlines in fields and in the path never start a log line.
    let t = Instant::now();
    let r = post(
        &s,
        "/v1/agents%0AINJECTED%20log%20line/entries",
        &json,
        b"{}",
    );
    check("newline in the source path", r.status, t);
    let t = Instant::now();
    let r = post(
        &s,
        "/v1/agents/entries",
        &json,
        b"{\"subject\": 5, \"text\": \"a\\nINJECTED log line\"}",
    );
    check("newline in a field (invalid entry)", r.status, t);

    // The server is up, wrote nothing, and its memory stayed bounded.
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(last_lsn(&s), lsn, "a refused request wrote to the WAL");
    let peak_mib = proc_kib(s.pid(), "VmHWM") / 1024;
    assert!(peak_mib < 512, "peak RSS {peak_mib} MiB");
    assert!(s.terminate().success());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        !logged.lines().any(|l| l.starts_with("INJECTED")),
        "a log line was injected:\n{logged}"
    );
    report(json!({
        "scenario": "hostile input by hand (table below)",
        "load": format!("{} inputs + 36 SQL-injection reads, one server", rows.len()),
        "cycles": "1",
        "acknowledged": 0, "lost": 0, "duplicates": 0, "5xx": 0,
        "peak_rss_mib": peak_mib,
        "inputs": rows,
        "result": format!("pass: every input a 4xx, nothing written, peak RSS {peak_mib} MiB"),
    }));
}

#[test]
fn a_token_opens_only_its_own_source_and_admin_needs_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let as_ = |token: Option<&str>, req: ureq::Request| match token {
        Some(t) => req.set("Authorization", &format!("Bearer {t}")),
        None => req,
    };
    let w = s.url("/v1/robots/entries");
    let mine = call(
        as_(Some("robots-secret"), ureq::post(&w)).set("Content-Type", "application/json"),
        Some(br#"{"text":"s3cr3t-payload","subject":"s3cr3t-subject"}"#),
    );
    assert_eq!(mine.status, 202);
    let id = mine.body["entries"][0]["id"].as_str().unwrap().to_owned();
    let one = s.url(&format!("/v1/robots/entries/{id}"));
    let lsn = last_lsn(&s);

    let cases: Vec<(&str, Option<&str>, ureq::Request, u16)> = vec![
        (
            "another source's token writes",
            Some("agents-secret"),
            ureq::post(&w),
            403,
        ),
        (
            "another source's token lists",
            Some("agents-secret"),
            ureq::get(&w),
            403,
        ),
        (
            "another source's token reads by id",
            Some("agents-secret"),
            ureq::get(&one),
            403,
        ),
        ("no token writes", None, ureq::post(&w), 401),
        ("no token reads", None, ureq::get(&one), 401),
        ("a wrong token writes", Some("guess"), ureq::post(&w), 401),
        (
            "the admin token writes a source",
            Some("admin-secret"),
            ureq::post(&w),
            401,
        ),
        (
            "no token on dead letters",
            None,
            ureq::get(&s.url("/v1/admin/dead-letters")),
            401,
        ),
        (
            "a source token on dead letters",
            Some("robots-secret"),
            ureq::get(&s.url("/v1/admin/dead-letters")),
            403,
        ),
        (
            "a source token requeues",
            Some("robots-secret"),
            ureq::post(&s.url("/v1/admin/dead-letters/requeue")),
            403,
        ),
        (
            "a source token on stats",
            Some("agents-secret"),
            ureq::get(&s.url("/v1/admin/stats")),
            403,
        ),
    ];
    for (what, token, req, want) in cases {
        let body: Option<&[u8]> = (req.method() == "POST").then_some(br#"{"all":true}"#);
        let r = call(as_(token, req), body);
        assert_eq!(r.status, want, "{what}: {r:?}");
    }
    let admin = call(
        as_(
            Some("admin-secret"),
            ureq::get(&s.url("/v1/admin/dead-letters")),
        ),
        None,
    );
    assert_eq!(admin.status, 200, "the admin token lists dead letters");
    assert_eq!(last_lsn(&s), lsn, "a refused request wrote");
    let metrics = s.get("/metrics").body;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("spool_entries_accepted_total"));
    assert!(!metrics.contains("s3cr3t"), "/metrics leaks payload data");
}

#[test]
fn concurrent_million_entry_requests_do_not_grow_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let before = proc_kib(s.pid(), "VmHWM");
    let tiny = std::sync::Arc::new(format!("[{}{{}}]", "{},".repeat(999_999)));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (url, tiny) = (s.url("/v1/agents/entries"), tiny.clone());
            std::thread::spawn(move || {
                let r = ureq::post(&url)
                    .set("Authorization", "Bearer agents-secret")
                    .set("Content-Type", "application/json")
                    .send_string(&tiny);
                match r {
                    Err(ureq::Error::Status(code, _)) => code,
                    Ok(r) => r.status(),
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 413);
    }
    // Eight 3 MB bodies are held at once at most; parsed into a million values
    // each they took over 100 MiB apiece.
    let grown_mib = (proc_kib(s.pid(), "VmHWM") - before) / 1024;
    assert!(grown_mib < 96, "peak RSS grew by {grown_mib} MiB");
}

/// Fifty entries of ~1 MiB read with `limit=1000`: a page holds at most
/// `limits.max_read_bytes` (then `next_cursor`), the server's peak RSS during
/// the read grows by at most about twice the response, and the cursor walks all
/// fifty exactly once. Before (cbb1775) one answer held all 50 MiB, re-parsed
/// into values: ~34× the response in memory.
#[test]
fn a_read_of_fifty_one_mib_entries_is_bounded_by_its_response() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let blob = "x".repeat((1 << 20) - 200);
    for batch in 0..10 {
        let entries: Vec<String> = (0..5)
            .map(|i| format!(r#"{{"n":{},"blob":"{blob}"}}"#, batch * 5 + i))
            .collect();
        let r = post(
            &s,
            "/v1/agents/entries",
            &[("Authorization", "Bearer agents-secret")],
            format!("[{}]", entries.join(",")).as_bytes(),
        );
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    last_lsn(&s); // waits until nothing is pending
    let read = |cursor: &str| {
        let url = s.url(&format!("/v1/agents/entries?limit=1000{cursor}"));
        let resp = ureq::get(&url)
            .set("Authorization", "Bearer agents-secret")
            .call()
            .unwrap();
        let text = resp.into_string().unwrap();
        let page: serde_json::Value = serde_json::from_str(&text).unwrap();
        (text.len() as u64, page)
    };
    // Reset the peak (VmHWM) to the current RSS, then read the first page.
    std::fs::write(format!("/proc/{}/clear_refs", s.pid()), "5").unwrap();
    let before = proc_kib(s.pid(), "VmRSS");
    let (len, first) = read("");
    let grown = (proc_kib(s.pid(), "VmHWM").saturating_sub(before)) * 1024;
    let n = first["entries"].as_array().unwrap().len();
    eprintln!("first page: {n} entries, {len} bytes; peak RSS grew {grown} bytes");
    assert!(
        (1..50).contains(&n) && len <= (9 << 20),
        "{n} entries, {len} bytes"
    );
    assert!(
        grown <= 2 * len + (4 << 20),
        "peak RSS grew by {} MiB for a {} MiB answer",
        grown >> 20,
        len >> 20
    );
    let mut seen: Vec<u64> = Vec::new();
    let mut page = first;
    loop {
        seen.extend(
            page["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["payload"]["n"].as_u64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => page = read(&format!("&cursor={c}")).1,
            None => break,
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..50).collect::<Vec<u64>>());
}
