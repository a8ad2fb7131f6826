//! Outages of every kind against real destinations never make dead letters, and
//! errors one entry causes isolate that entry (issue 14, scenarios 1–3). Each
//! test fails on cbb1775, where a transient-looking error with a passing
//! `SELECT 1` burned an attempt for the whole batch.

mod common;

use async_trait::async_trait;
use common::entry;
use spool_destination::{
    Destination, DestinationError, Hit, Page, PostgresDestination, Query, Search,
    SqliteDestination, StoredEntry, Tombstone,
};
use spool_queue::{Engine, EngineConfig, Outcome};
use spool_testkit::PgServer;
use spool_wal::{Entry, LoggedEntry, Wal, WalConfig};
use sqlx::Connection;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One attempt and a dead letter follows: any attempt an outage burned shows.
fn cfg() -> EngineConfig {
    EngineConfig {
        capacity: 100,
        workers: 1,
        batch_max: 50,
        batch_linger: Duration::from_millis(2),
        max_attempts: 1,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..EngineConfig::default()
    }
}

/// A real destination, counting write attempts.
struct Counting {
    inner: Arc<dyn Destination>,
    writes: AtomicU64,
}

#[async_trait]
impl Destination for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn write_batch(&self, b: &[LoggedEntry]) -> Result<u64, DestinationError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_batch(b).await
    }
    async fn get(&self, s: &str, id: uuid::Uuid) -> Result<Option<StoredEntry>, DestinationError> {
        self.inner.get(s, id).await
    }
    async fn query(&self, q: &Query) -> Result<Page, DestinationError> {
        self.inner.query(q).await
    }
    async fn health(&self) -> Result<(), DestinationError> {
        self.inner.health().await
    }
    async fn search(&self, s: &Search) -> Result<Vec<Hit>, DestinationError> {
        self.inner.search(s).await
    }
    async fn forget(&self, t: &Tombstone) -> Result<u64, DestinationError> {
        self.inner.forget(t).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

/// Poll `f` every 10 ms until true or `limit` passes (then panic naming `what`).
async fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Start an engine on `dest`, accept 5 entries while `outage` is in force, see
/// several write attempts fail with no dead letter (max_attempts = 1), end the
/// outage with `heal`, and see all 5 delivered once.
async fn outage_makes_no_dead_letters<H, F, T>(dest: Arc<dyn Destination>, heal: H)
where
    H: FnOnce() -> F,
    F: std::future::Future<Output = T>,
{
    let dir = tempfile::tempdir().unwrap();
    let counting = Arc::new(Counting {
        inner: dest.clone(),
        writes: AtomicU64::new(0),
    });
    let engine = Engine::start(
        Wal::open(dir.path(), WalConfig::default()).unwrap(),
        vec![counting.clone()],
        cfg(),
    )
    .unwrap();
    let r = engine
        .ingest((0..5).map(entry).collect(), true)
        .await
        .unwrap();
    let ids: Vec<_> = r.accepted.iter().map(|a| a.id).collect();
    until(
        Duration::from_secs(30),
        "three failed write attempts and the outage reported",
        || counting.writes.load(Ordering::SeqCst) >= 3 && !engine.lanes()[0].up,
    )
    .await;
    assert!(
        engine.dead_letters(None, 10).is_empty(),
        "an outage made dead letters"
    );
    let lane = &engine.lanes()[0];
    assert!(!lane.up, "the outage is reported");
    assert!(lane.down_reason.is_some());
    let _healed = heal().await;
    assert_eq!(
        r.wait(Duration::from_secs(30)).await,
        vec![Outcome::Delivered; 5]
    );
    for id in ids {
        assert!(dest.get("agents", id).await.unwrap().is_some());
    }
    assert!(engine.lanes()[0].up);
    assert!(engine.dead_letters(None, 10).is_empty());
    engine.shutdown(Duration::from_secs(5)).await;
}

async fn sqlite(path: &Path, busy: Duration) -> Arc<SqliteDestination> {
    let d = SqliteDestination::open("main", path, None, busy).unwrap();
    d.health().await.unwrap(); // creates and migrates the file
    Arc::new(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_writer_makes_no_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let db = sqlite(&path, Duration::from_millis(100)).await;
    let mut other = spool_testkit::hold_sqlite_write_lock(&path).await;
    outage_makes_no_dead_letters(db, || async move {
        sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    })
    .await;
}

/// Makes a file read-only for this process — `chattr +i` as root (root ignores
/// mode bits), mode 0444 otherwise — and undoes it when dropped.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn make(path: &Path) -> ReadOnly {
        use std::os::unix::fs::PermissionsExt;
        let root = unsafe_free_is_root();
        if root {
            let ok = std::process::Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chattr +i {} failed (needs ext4/xfs)", path.display());
        } else {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
        }
        ReadOnly(path.to_owned())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o644));
    }
}

fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_sqlite_file_makes_no_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let first = sqlite(&path, Duration::from_millis(100)).await;
    first.close().await;
    let guard = ReadOnly::make(&path);
    let db =
        Arc::new(SqliteDestination::open("main", &path, None, Duration::from_millis(100)).unwrap());
    outage_makes_no_dead_letters(db, || async move { drop(guard) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_postgres_makes_no_dead_letters() {
    let url = PgServer::shared().fresh_database();
    let db_name = url.rsplit('/').next().unwrap().to_owned();
    let admin = url.clone();
    let mut c = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {db_name} SET default_transaction_read_only = on"
    ))
    .execute(&mut c)
    .await
    .unwrap();
    let dest = Arc::new(
        PostgresDestination::open("main", &url, Some(1), spool_destination::DEFAULT_TIMEOUT)
            .unwrap(),
    );
    outage_makes_no_dead_letters(dest, || async move {
        sqlx::raw_sql("SET default_transaction_read_only = off")
            .execute(&mut c)
            .await
            .unwrap();
        sqlx::raw_sql(&format!(
            "ALTER DATABASE {db_name} SET default_transaction_read_only = off"
        ))
        .execute(&mut c)
        .await
        .unwrap();
        // Sessions opened while read-only keep their setting: end them.
        sqlx::raw_sql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{db_name}' AND pid <> pg_backend_pid()"
        ))
        .execute(&mut c)
        .await
        .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_lock_held_past_the_statement_timeout_makes_no_dead_letters() {
    let url = PgServer::shared().fresh_database();
    let d = PostgresDestination::open("main", &url, Some(1), Duration::from_millis(200)).unwrap();
    d.health().await.unwrap();
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE spool_entries IN ACCESS EXCLUSIVE MODE")
        .execute(&mut c)
        .await
        .unwrap();
    outage_makes_no_dead_letters(Arc::new(d), || async move {
        sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_starts_while_postgres_is_down_and_delivers_once_it_is_up() {
    let mut pg = PgServer::start();
    pg.stop();
    let dest = Arc::new(
        PostgresDestination::open("main", pg.url(), Some(2), Duration::from_secs(5)).unwrap(),
    );
    outage_makes_no_dead_letters(dest, || async move {
        pg.restart();
        pg
    })
    .await;
}

/// Errors one entry causes isolate that entry: it alone becomes a dead letter.
async fn one_entry_is_isolated(dest: Arc<dyn Destination>, bad: Entry) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(
        Wal::open(dir.path(), WalConfig::default()).unwrap(),
        vec![dest.clone()],
        EngineConfig {
            max_attempts: 2,
            ..cfg()
        },
    )
    .unwrap();
    let mut batch: Vec<Entry> = (0..8).map(entry).collect();
    batch[5] = bad;
    let r = engine.ingest(batch, true).await.unwrap();
    let ids: Vec<_> = r.accepted.iter().map(|a| a.id).collect();
    let out = r.wait(Duration::from_secs(30)).await;
    for (i, o) in out.iter().enumerate() {
        if i == 5 {
            assert!(matches!(o, Outcome::Failed { .. }), "{o:?}");
        } else {
            assert_eq!(*o, Outcome::Delivered, "entry {i}");
            assert!(dest.get("agents", ids[i]).await.unwrap().is_some());
        }
    }
    let dead = engine.dead_letters(None, 10);
    assert_eq!((dead.len(), dead[0].id), (1, ids[5]));
    engine.shutdown(Duration::from_secs(5)).await;
}

fn with_payload(n: u64, payload: String) -> Entry {
    let mut e = entry(n);
    e.payload = payload.into_bytes();
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_raised_by_a_sqlite_trigger_isolates_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let db = sqlite(&path, Duration::from_secs(5)).await;
    // A trigger that fails (SQLITE_ERROR, "malformed JSON") for one entry only,
    // as the full-text trigger would on a payload it cannot index.
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TRIGGER poison_check BEFORE INSERT ON spool_entries \
         WHEN new.payload LIKE '%poison%' BEGIN SELECT json('{bad'); END",
    )
    .execute(&mut c)
    .await
    .unwrap();
    c.close().await.unwrap();
    one_entry_is_isolated(db, with_payload(5, r#"{"x":"poison"}"#.into())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_raised_by_a_postgres_trigger_isolates_the_entry() {
    let url = PgServer::shared().fresh_database();
    let dest = Arc::new(
        PostgresDestination::open("main", &url, Some(2), spool_destination::DEFAULT_TIMEOUT)
            .unwrap(),
    );
    dest.health().await.unwrap();
    // A data exception (class 22) for one entry only: the entry's fault.
    let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
    for stmt in [
        "CREATE FUNCTION poison_check() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.payload::text LIKE '%poison%' THEN \
             RAISE EXCEPTION 'poison' USING ERRCODE = '22023'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER poison_check BEFORE INSERT ON spool_entries \
           FOR EACH ROW EXECUTE FUNCTION poison_check()",
    ] {
        sqlx::raw_sql(stmt).execute(&mut c).await.unwrap();
    }
    c.close().await.unwrap();
    one_entry_is_isolated(dest, with_payload(5, r#"{"x":"poison"}"#.into())).await;
}
