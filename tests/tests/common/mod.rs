//! Start the real `spool` binary on a free port with a config in a temp dir, and
//! talk HTTP to it.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `spool` binary of this build (target/<profile>/spool, next to deps/).
/// `cargo test` does not build another package's binary: `make test` builds it
/// first (`cargo build -p spool-server --bin spool`).
pub fn spool_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("spool");
    assert!(
        bin.exists(),
        "{} missing: `cargo build -p spool-server` (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
}

impl Server {
    /// Write `spool.toml` in `dir` (listen on a free port, WAL in `dir/wal`, SQLite
    /// in `dir/spool.db` unless `extra` declares destinations) and start serving.
    pub fn start(dir: &Path, extra: &str) -> Server {
        Self::start_with(dir, "", "", extra)
    }

    /// [`Server::start`] with more keys for the `[server]` and `[wal]` tables.
    pub fn start_with(dir: &Path, server_keys: &str, wal_keys: &str, extra: &str) -> Server {
        let port = free_port();
        let config = dir.join("spool.toml");
        let wal = dir.join("wal");
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"10s\"\n{server_keys}\n[wal]\ndir = \"{}\"\nmin_free_bytes = 0\n{wal_keys}\n",
            wal.display()
        );
        text.push_str(extra);
        if !extra.contains("[[destination]]") {
            text.push_str(&format!(
                "\n[[destination]]\nname = \"main\"\nkind = \"sqlite\"\npath = \"{}\"\n",
                dir.join("spool.db").display()
            ));
        }
        std::fs::write(&config, text).unwrap();
        let mut s = Server {
            dir: dir.to_owned(),
            config,
            port,
            child: None,
        };
        s.launch();
        s
    }

    /// Start (again) with the same config and port.
    pub fn launch(&mut self) {
        self.launch_with(Stdio::inherit())
    }

    /// [`Server::launch`] with its log (stderr) appended to `log`.
    pub fn launch_logged(&mut self, log: &Path) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        self.launch_with(f.into())
    }

    fn launch_with(&mut self, stderr: Stdio) {
        let child = Command::new(spool_bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = ureq::get(&self.url("/healthz"))
                .timeout(Duration::from_secs(1))
                .call()
            {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("spool serve exited at start: {st}");
            }
            assert!(Instant::now() < deadline, "spool serve did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -TERM failed");
        wait_bounded(&mut child, Duration::from_secs(30))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn post(&self, path: &str, body: &str) -> Resp {
        call(
            ureq::post(&self.url(path)).set("Content-Type", "application/json"),
            Some(body.as_bytes()),
        )
    }

    pub fn get(&self, path: &str) -> Resp {
        call(ureq::get(&self.url(path)), None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send a request; any status is an answer (not an error).
pub fn call(req: ureq::Request, body: Option<&[u8]>) -> Resp {
    let req = req.timeout(Duration::from_secs(70));
    let r = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = resp.header(&n).unwrap_or_default().to_owned();
            (n, v)
        })
        .collect();
    let text = resp.into_string().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Resp {
        status,
        headers,
        body,
    }
}

/// Run `spool` with arguments; (exit code, stdout, stderr).
pub fn spool(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(spool_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Poll `f` until it holds, or panic after `limit`.
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `make chaos` sets `SPOOL_CHAOS=full`: the long scenarios (20 crash cycles, a
/// 30 s outage, minutes of overload); `make test` runs the CI-sized subset.
pub fn full_chaos() -> bool {
    std::env::var("SPOOL_CHAOS").as_deref() == Ok("full")
}

/// One row of docs/reliability.md: printed, and appended as a JSON line to
/// `$SPOOL_CHAOS_REPORT` when set (`make chaos` renders the table from it).
pub fn report(row: Value) {
    println!("CHAOS {row}");
    if let Ok(path) = std::env::var("SPOOL_CHAOS_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{row}").unwrap();
    }
}

/// Every row the source's destination holds, through the read API (paginated).
pub fn all_rows(s: &Server, source: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = s
            .get(&format!("/v1/{source}/entries?limit=1000{cursor}"))
            .body;
        rows.extend(page["entries"].as_array().expect("a page").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return rows,
        }
    }
}

/// A value of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM` = peak RSS).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Wait until every accepted entry is delivered or dead (WAL pending = 0).
pub fn drained(s: &Server, limit: Duration) {
    eventually(limit, "the WAL has no pending entries", || {
        s.get("/v1/admin/stats").body["wal"]["pending"] == 0
    });
}

// The reliability suite's load: tagged entries, what the producers saw, and the
// read-back check (used by chaos.rs and disk_full.rs).

use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What the producers saw.
#[derive(Default)]
pub struct Seen {
    /// tag → id, for every entry a 2xx acknowledged.
    pub acked: HashMap<String, String>,
    /// Tags of entries in refused requests (4xx, 429, 503): must never appear.
    pub refused: HashSet<String>,
    /// Answers by status code.
    pub codes: BTreeMap<u16, u64>,
}

impl Seen {
    pub fn fivexx(&self) -> u64 {
        self.codes.range(500..).map(|(_, n)| n).sum()
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// `writers` threads post, in turn: a 5-entry batch, a keyed single entry, an
    /// unkeyed single entry and (with `invalid`) a batch whose last element is not
    /// an object — refused whole with 400. Each writer stops at `stop` or when the
    /// server goes away.
    pub fn start(
        s: &Server,
        round: usize,
        writers: usize,
        invalid: bool,
        seen: Arc<Mutex<Seen>>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for w in 0..writers {
            let (url, stop, seen) = (s.url("/v1/default/entries"), stop.clone(), seen.clone());
            threads.push(std::thread::spawn(move || {
                for i in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let tag = |k: u64| format!("r{round}-w{w}-{i}-{k}");
                    let (tags, body): (Vec<String>, String) = match i % 4 {
                        0 => {
                            let tags: Vec<_> = (0..5).map(tag).collect();
                            let es: Vec<_> = tags.iter().map(|t| json!({ "t": t })).collect();
                            (tags, Value::Array(es).to_string())
                        }
                        1 => {
                            let t = tag(0);
                            let body = json!({"t": t, "idempotency_key": format!("k-{t}")});
                            (vec![t], body.to_string())
                        }
                        2 if invalid => {
                            let tags: Vec<_> = (0..3).map(tag).collect();
                            let mut es: Vec<_> = tags.iter().map(|t| json!({ "t": t })).collect();
                            es.push(json!("not an object"));
                            (tags, Value::Array(es).to_string())
                        }
                        _ => {
                            let t = tag(0);
                            (vec![t.clone()], json!({ "t": t }).to_string())
                        }
                    };
                    let r = ureq::post(&url)
                        .set("Content-Type", "application/json")
                        .timeout(Duration::from_secs(10))
                        .send_string(&body);
                    let (code, resp) = match r {
                        Ok(r) => (r.status(), r),
                        Err(ureq::Error::Status(c, r)) => (c, r),
                        Err(_) => return, // the server went away
                    };
                    let answer: Value = resp.into_json().unwrap_or(Value::Null);
                    let mut seen = seen.lock().unwrap();
                    *seen.codes.entry(code).or_default() += 1;
                    match code {
                        200 | 202 => {
                            let ids = answer["entries"].as_array().expect("entries");
                            for (t, e) in tags.into_iter().zip(ids) {
                                seen.acked.insert(t, e["id"].as_str().unwrap().to_owned());
                            }
                        }
                        400..=499 | 503 => seen.refused.extend(tags),
                        _ => {}
                    }
                    if code == 429 || code == 503 {
                        drop(seen);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }));
        }
        Load {
            stop,
            seen,
            threads,
        }
    }

    pub fn acked(&self) -> usize {
        self.seen.lock().unwrap().acked.len()
    }

    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

/// Once everything is delivered: (lost, duplicates). Panics naming the first
/// acknowledged entry missing, duplicated, or with another id, and any refused
/// entry that is present.
pub fn check(s: &Server, seen: &Seen) -> (usize, usize) {
    drained(s, Duration::from_secs(120));
    let mut by_tag: HashMap<String, Vec<String>> = HashMap::new();
    for row in all_rows(s, "default") {
        if let Some(t) = row["payload"]["t"].as_str() {
            by_tag
                .entry(t.to_owned())
                .or_default()
                .push(row["id"].as_str().unwrap().to_owned());
        }
    }
    let dups = by_tag.values().filter(|ids| ids.len() > 1).count();
    let lost = seen
        .acked
        .iter()
        .filter(|(t, id)| by_tag.get(*t).is_none_or(|ids| !ids.contains(id)))
        .count();
    let refused_present: Vec<_> = seen
        .refused
        .iter()
        .filter(|t| by_tag.contains_key(*t))
        .collect();
    assert_eq!(lost, 0, "acknowledged entries lost");
    assert_eq!(dups, 0, "entries stored more than once");
    assert!(
        refused_present.is_empty(),
        "refused entries stored: {refused_present:?}"
    );
    (lost, dups)
}

pub fn psql(pg: &spool_testkit::PgServer, sql: &str) {
    let bin = spool_testkit::pg_bindir()
        .expect("PostgreSQL binaries")
        .join("psql");
    let out = std::process::Command::new(bin)
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            pg.url(),
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
