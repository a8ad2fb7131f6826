//! Forgetting through the engine: a forgotten entry never reaches the
//! destination, whether it was pending, delivered or being written at the time.

mod common;

use async_trait::async_trait;
use common::{entry, sqlite_in, Faulty};
use spool_destination::{
    Destination, DestinationError, Hit, Page, Query, Search, StoredEntry, Tombstone,
};
use spool_queue::{Engine, EngineConfig, Forget, ForgetError, Outcome, FORGOTTEN};
use spool_wal::{Entry, LoggedEntry, Wal, WalConfig};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

fn cfg() -> EngineConfig {
    EngineConfig {
        capacity: 100,
        workers: 1,
        batch_max: 50,
        batch_linger: Duration::from_millis(2),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..EngineConfig::default()
    }
}

fn about(n: u64, subject: Option<&str>) -> Entry {
    let mut e = entry(n);
    e.subject = subject.map(str::to_owned);
    e
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_forgotten_while_the_destination_is_down_never_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    dest.down.store(true, Ordering::SeqCst);
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![dest.clone()], cfg()).unwrap();
    let (a, b, kept) = (
        about(1, Some("alice")),
        about(2, None),
        about(3, Some("bob")),
    );
    let receipt = engine
        .ingest(vec![a.clone(), b.clone(), kept.clone()], true)
        .await
        .unwrap();
    let by_id = engine
        .forget(entry_source(), "main", Forget::Ids(vec![b.id]))
        .await
        .unwrap();
    assert!(!by_id.applied && by_id.unknown.is_empty());
    let by_subject = engine
        .forget(entry_source(), "main", Forget::Subject("alice".into()))
        .await
        .unwrap();
    assert!(!by_subject.applied);
    dest.down.store(false, Ordering::SeqCst);
    let outcomes = receipt.wait(Duration::from_secs(10)).await;
    assert_eq!(outcomes[2], Outcome::Delivered);
    // a: read back as forgotten (by subject); b: ended by its tombstone (by
    // id). Neither was delivered, and neither receipt says so.
    for o in &outcomes[..2] {
        assert!(
            matches!(o, Outcome::Failed { reason } if reason == FORGOTTEN),
            "{o:?}"
        );
    }
    until("the queue to settle", || engine.wal_status().pending == 0).await;
    assert_eq!(
        *dest.inserted.lock().unwrap(),
        vec![kept.id],
        "a forgotten entry reached the destination"
    );
    assert!(engine
        .get(entry_source(), "main", a.id)
        .await
        .unwrap()
        .is_none());
    assert!(engine
        .get(entry_source(), "main", b.id)
        .await
        .unwrap()
        .is_none());
    engine.shutdown(Duration::from_secs(5)).await;
}

fn entry_source() -> &'static str {
    "agents"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_of_ids_never_seen_is_not_found_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![dest.clone()], cfg()).unwrap();
    let before = engine.wal_status().visible_lsn;
    let r = engine
        .forget("agents", "main", Forget::Ids(vec![uuid::Uuid::now_v7()]))
        .await;
    assert!(matches!(r, Err(ForgetError::NotFound)), "{r:?}");
    assert_eq!(
        engine.wal_status().visible_lsn,
        before,
        "a record was written"
    );
    // Another source's id is not this source's to forget.
    let e = entry(1);
    engine
        .ingest(vec![e.clone()], true)
        .await
        .unwrap()
        .wait(Duration::from_secs(5))
        .await;
    let r = engine
        .forget("others", "main", Forget::Ids(vec![e.id]))
        .await;
    assert!(matches!(r, Err(ForgetError::NotFound)), "{r:?}");
    assert_eq!(dest.row_count(), 1);
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_forgotten_before_a_restart_is_not_delivered_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let down = Faulty::new("main");
    down.down.store(true, Ordering::SeqCst);
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![down.clone()], cfg()).unwrap();
    let (a, b) = (about(1, Some("alice")), about(2, None));
    engine
        .ingest(vec![a.clone(), b.clone()], false)
        .await
        .unwrap();
    engine
        .forget("agents", "main", Forget::Subject("alice".into()))
        .await
        .unwrap();
    engine.shutdown(Duration::from_millis(200)).await;

    let up = Faulty::new("main");
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![up.clone()], cfg()).unwrap();
    until("the backlog to drain", || engine.wal_status().pending == 0).await;
    assert_eq!(*up.inserted.lock().unwrap(), vec![b.id]);
    engine.shutdown(Duration::from_secs(5)).await;
}

/// Holds each write until released, to forget an entry while it is being written.
struct Gated {
    inner: Arc<Faulty>,
    entered: Notify,
    release: Notify,
}

#[async_trait]
impl Destination for Gated {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn write_batch(&self, b: &[LoggedEntry]) -> Result<u64, DestinationError> {
        self.entered.notify_one();
        self.release.notified().await;
        self.inner.write_batch(b).await
    }
    async fn get(&self, s: &str, id: uuid::Uuid) -> Result<Option<StoredEntry>, DestinationError> {
        self.inner.get(s, id).await
    }
    async fn query(&self, q: &Query) -> Result<Page, DestinationError> {
        self.inner.query(q).await
    }
    async fn search(&self, s: &Search) -> Result<Vec<Hit>, DestinationError> {
        self.inner.search(s).await
    }
    async fn forget(&self, t: &Tombstone) -> Result<u64, DestinationError> {
        self.inner.forget(t).await
    }
    async fn health(&self) -> Result<(), DestinationError> {
        self.inner.health().await
    }
    async fn close(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_forgotten_while_it_is_being_written_is_deleted_after_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new("main");
    let gated = Arc::new(Gated {
        inner: faulty.clone(),
        entered: Notify::new(),
        release: Notify::new(),
    });
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![gated.clone()], cfg()).unwrap();
    let a = about(1, Some("alice"));
    engine.ingest(vec![a.clone()], false).await.unwrap();
    gated.entered.notified().await;
    // The delete runs now, before the row exists: it deletes nothing.
    let f = engine
        .forget("agents", "main", Forget::Subject("alice".into()))
        .await
        .unwrap();
    assert_eq!((f.applied, f.deleted), (true, 0));
    gated.release.notify_one();
    until("the late row to be deleted", || {
        faulty.inserted.lock().unwrap().len() == 1 && faulty.row_count() == 0
    })
    .await;
    until("the queue to settle", || engine.wal_status().pending == 0).await;
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_entry_is_deleted_from_sqlite_and_search_no_longer_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = sqlite_in(dir.path());
    let wal = Wal::open(dir.path().join("wal"), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![sqlite], cfg()).unwrap();
    let mut a = Entry::new(
        "agents",
        "main",
        br#"{"text":"the cellar key is under the mat"}"#.to_vec(),
    );
    a.embedding = Some(vec![1.0, 0.0]);
    let outcomes = engine
        .ingest(vec![a.clone()], true)
        .await
        .unwrap()
        .wait(Duration::from_secs(5))
        .await;
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let search = Search {
        source: "agents".into(),
        q: Some("cellar".into()),
        embedding: Some(vec![1.0, 0.0]),
        k: 5,
        ..Search::default()
    };
    assert_eq!(engine.search("main", &search).await.unwrap().len(), 1);
    let f = engine
        .forget("agents", "main", Forget::Ids(vec![a.id]))
        .await
        .unwrap();
    assert_eq!((f.applied, f.deleted), (true, 1));
    assert!(engine.search("main", &search).await.unwrap().is_empty());
    assert!(engine.get("agents", "main", a.id).await.unwrap().is_none());
    // Forgetting again is idempotent: known (forgotten), nothing left to delete.
    let again = engine
        .forget("agents", "main", Forget::Ids(vec![a.id]))
        .await
        .unwrap();
    assert_eq!((again.applied, again.deleted), (true, 0));
    engine.shutdown(Duration::from_secs(5)).await;
}

/// A row committed just after a forget's delete ran, whose own late
/// tombstone a crash kept out of the WAL: the next start applies every
/// retained tombstone again, so it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_applies_retained_tombstones_again() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![dest.clone()], cfg()).unwrap();
    let a = about(1, Some("alice"));
    engine
        .ingest(vec![a.clone()], true)
        .await
        .unwrap()
        .wait(Duration::from_secs(5))
        .await;
    let f = engine
        .forget("agents", "main", Forget::Ids(vec![a.id]))
        .await
        .unwrap();
    assert!(f.applied);
    engine.shutdown(Duration::from_secs(5)).await;
    // The row is back, as a write that raced the delete would have left it.
    dest.write_batch(&[LoggedEntry {
        lsn: 1,
        entry: a.clone(),
    }])
    .await
    .unwrap();
    assert_eq!(dest.row_count(), 1);
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![dest.clone()], cfg()).unwrap();
    until("the tombstone to be applied again", || {
        dest.row_count() == 0
    })
    .await;
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_forgotten_id_again_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Faulty::new("main");
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![dest.clone()], cfg()).unwrap();
    let a = entry(1);
    engine
        .ingest(vec![a.clone()], true)
        .await
        .unwrap()
        .wait(Duration::from_secs(5))
        .await;
    let first = engine
        .forget("agents", "main", Forget::Ids(vec![a.id]))
        .await
        .unwrap();
    let before = engine.wal_status().visible_lsn;
    for _ in 0..3 {
        let again = engine
            .forget("agents", "main", Forget::Ids(vec![a.id, a.id]))
            .await
            .unwrap();
        assert_eq!(
            (again.lsn, again.applied, again.deleted),
            (first.lsn, true, 0)
        );
    }
    assert_eq!(
        engine.wal_status().visible_lsn,
        before,
        "a repeated forget wrote a record"
    );
    engine.shutdown(Duration::from_secs(5)).await;
}

/// A write accepted (stamped) just before a subject forget but logged just
/// after it — two requests racing — was acknowledged after the forget, so it
/// is not forgotten: not by the WAL, and not by the destination's
/// `created_at <= at_us` delete when the tombstone is applied again (at every
/// start, by replay). The WAL stamps both in log order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_racing_a_subject_forget_is_not_deleted_when_the_tombstone_is_applied_again() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = sqlite_in(dir.path());
    let wal = Wal::open(dir.path().join("wal"), WalConfig::default()).unwrap();
    let engine = Engine::start(wal.clone(), vec![sqlite.clone()], cfg()).unwrap();
    // Stamped by its request before the forget's...
    let raced = about(1, Some("alice"));
    engine
        .forget("agents", "main", Forget::Subject("alice".into()))
        .await
        .unwrap();
    // ... but appended after it.
    let outcomes = engine
        .ingest(vec![raced.clone()], true)
        .await
        .unwrap()
        .wait(Duration::from_secs(5))
        .await;
    assert_eq!(outcomes, vec![Outcome::Delivered]);
    let tombstones = wal.tombstones();
    assert_eq!(tombstones.len(), 1);
    for (_, t, _) in &tombstones {
        sqlite.forget(t).await.unwrap();
    }
    assert!(
        sqlite.get("agents", raced.id).await.unwrap().is_some(),
        "an entry acknowledged after the forget was deleted by it"
    );
    engine.shutdown(Duration::from_secs(5)).await;
}

/// A keyed entry forgotten by id while pending, then a restart: a retry of
/// the same key (answered from the persisted key index) is told the entry
/// was forgotten, not that it was delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_restart_of_an_entry_forgotten_by_id_says_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let config = || EngineConfig {
        key_index: Some(dir.path().join("keys")),
        ..cfg()
    };
    let down = Faulty::new("main");
    down.down.store(true, Ordering::SeqCst);
    let keyed = || {
        let mut e = about(1, None);
        e.idempotency_key = Some("k-1".into());
        e
    };
    let wal = Wal::open(dir.path().join("wal"), WalConfig::default()).unwrap();
    let engine = Engine::start(wal.clone(), vec![down.clone()], config()).unwrap();
    let id = engine.ingest(vec![keyed()], false).await.unwrap().accepted[0].id;
    engine
        .forget("agents", "main", Forget::Ids(vec![id]))
        .await
        .unwrap();
    // Recovery then starts from a checkpoint that no longer lists the entry.
    wal.rotate().await.unwrap();
    engine.shutdown(Duration::from_millis(200)).await;
    drop(wal);

    let wal = Wal::open(dir.path().join("wal"), WalConfig::default()).unwrap();
    let engine = Engine::start(wal, vec![Faulty::new("main")], config()).unwrap();
    let retry = engine.ingest(vec![keyed()], true).await.unwrap();
    assert!(retry.accepted[0].replayed && retry.accepted[0].id == id);
    assert_eq!(
        retry.wait(Duration::from_secs(5)).await,
        vec![Outcome::Failed {
            reason: FORGOTTEN.into()
        }]
    );
    engine.shutdown(Duration::from_secs(5)).await;
}
