//! The destination suite against real SQLite files.

mod suite;

use spool_destination::{open, DestinationConfig, DestinationError, Kind, SqliteDestination};
use suite::*;

async fn fresh() -> (tempfile::TempDir, Dest) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DestinationConfig {
        name: "main".into(),
        kind: Kind::Sqlite,
        path: Some(dir.path().join("db/spool.db").to_str().unwrap().into()),
        url: None,
        pool_size: None,
        timeout: None,
    };
    let d = open(&cfg).unwrap();
    (dir, d)
}

#[tokio::test]
async fn redelivery() {
    let (_t, d) = fresh().await;
    redelivery_is_idempotent_and_first_write_wins(d).await;
}

#[tokio::test]
async fn poison() {
    let (_t, d) = fresh().await;
    a_poison_entry_is_named_and_the_rest_can_be_written(d, "{not json").await;
}

#[tokio::test]
async fn keyed_entries_are_unique_per_source() {
    let (_t, d) = fresh().await;
    keyed_entries_are_unique_per_source_and_copies_are_counted(d).await;
}

#[tokio::test]
async fn queries() {
    let (_t, d) = fresh().await;
    queries_filter_order_and_search(d).await;
}

#[tokio::test]
async fn cursors() {
    let (_t, d) = fresh().await;
    cursors_neither_skip_nor_repeat_under_concurrent_inserts(d).await;
}

#[tokio::test]
async fn unicode_and_large() {
    let (_t, d) = fresh().await;
    unicode_and_large_payloads_round_trip(d).await;
}

#[tokio::test]
async fn injection() {
    let (_t, d) = fresh().await;
    injection_strings_are_data(d).await;
}

#[tokio::test]
async fn migrations_on_existing_database_and_newer_schema_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let d = SqliteDestination::open(
        "main",
        &path,
        None,
        spool_destination::DEFAULT_SQLITE_TIMEOUT,
    )
    .unwrap();
    use spool_destination::Destination;
    d.write_batch(&[logged(1, "m", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap();
    d.close().await;
    // Reopen: nothing re-applied, data intact.
    let d = SqliteDestination::open(
        "main",
        &path,
        None,
        spool_destination::DEFAULT_SQLITE_TIMEOUT,
    )
    .unwrap();
    let page = d
        .query(&spool_destination::Query {
            source: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 1);
    d.close().await;
    // A schema from the future is refused with a clear error.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("INSERT INTO spool_schema (version) VALUES (99)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    // Opening needs no database; the first contact refuses the newer schema.
    let d = SqliteDestination::open(
        "main",
        &path,
        None,
        spool_destination::DEFAULT_SQLITE_TIMEOUT,
    )
    .unwrap();
    match d.health().await {
        Err(DestinationError::SchemaTooNew { found: 99, .. }) => {}
        Err(e) => panic!("expected SchemaTooNew, got {e}"),
        Ok(()) => panic!("expected SchemaTooNew, opened"),
    }
}

#[tokio::test]
async fn the_database_file_is_in_wal_journal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let d = SqliteDestination::open(
        "main",
        &path,
        None,
        spool_destination::DEFAULT_SQLITE_TIMEOUT,
    )
    .unwrap();
    use spool_destination::Destination;
    d.health().await.unwrap();
    // journal_mode=WAL is persistent in the file: a fresh connection sees it.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

/// A version-1 file (full-text by trigger) that already holds copies of a key,
/// migrated: the first accepted stays, the copy moves to spool_entries_displaced,
/// and the rows stored before are found by their words (migration 3 indexes them).
#[tokio::test]
async fn the_key_and_words_migrations_keep_the_first_copy_and_index_old_rows() {
    use spool_destination::{Destination, Query};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let d = SqliteDestination::open(
        "main",
        &path,
        None,
        spool_destination::DEFAULT_SQLITE_TIMEOUT,
    )
    .unwrap();
    d.health().await.unwrap();
    d.close().await;
    let url = format!("sqlite://{}", path.display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    // Back to the version-1 schema, then rows as version 1 stored them; the
    // later-accepted copy was inserted first.
    let later = logged(2, "s", None, r#"{"t":"zebra"}"#, 2_000);
    let first = logged(1, "s", None, r#"{"t":"aardvark नमस्ते"}"#, 1_000);
    sqlx::raw_sql(
        "DROP INDEX spool_entries_by_key; DROP TABLE spool_entries_displaced; \
         DROP TABLE spool_entries_words; DELETE FROM spool_schema WHERE version > 1; \
         ALTER TABLE spool_entries DROP COLUMN embedding; \
         CREATE VIRTUAL TABLE spool_entries_fts USING fts5(body, content='', detail=none, columnsize=0); \
         CREATE TRIGGER spool_entries_fts_insert AFTER INSERT ON spool_entries BEGIN \
             INSERT INTO spool_entries_fts (rowid, body) \
             SELECT new.rowid, group_concat(value, ' ') FROM json_tree(new.payload) WHERE type = 'text'; \
         END;",
    )
    .execute(&pool)
    .await
    .unwrap();
    for le in [&later, &first] {
        sqlx::query(
            "INSERT INTO spool_entries (id, lsn, source, subject, idempotency_key, payload, created_at, delivered_at) \
             VALUES (?, ?, 's', NULL, 'k', ?, ?, 0)",
        )
        .bind(le.entry.id.hyphenated().to_string())
        .bind(le.lsn as i64)
        .bind(std::str::from_utf8(&le.entry.payload).unwrap())
        .bind(le.entry.accepted_at_us)
        .execute(&pool)
        .await
        .unwrap();
    }
    // More rows than one backfill batch, and one with no strings at all.
    sqlx::raw_sql(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500) \
         INSERT INTO spool_entries (id, lsn, source, payload, created_at, delivered_at) \
         SELECT lower(hex(randomblob(16))), 100 + i, 'bulk', json_object('t', 'bulk' || i), i, 0 \
           FROM n; \
         INSERT INTO spool_entries (id, lsn, source, payload, created_at, delivered_at) \
         VALUES (lower(hex(randomblob(16))), 99, 'bulk', '{\"n\": 1}', 0, 0);",
    )
    .execute(&pool)
    .await
    .unwrap();
    let again = SqliteDestination::open(
        "main",
        &path,
        None,
        spool_destination::DEFAULT_SQLITE_TIMEOUT,
    )
    .unwrap();
    again.health().await.unwrap();
    for word in ["bulk1", "bulk1001", "bulk2500"] {
        let found = again
            .query(&Query {
                source: "bulk".into(),
                q: Some(word.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(found.entries.len(), 1, "{word}");
    }
    assert!(again.get("s", first.entry.id).await.unwrap().is_some());
    assert!(again.get("s", later.entry.id).await.unwrap().is_none());
    let displaced: Vec<String> = sqlx::query_scalar("SELECT id FROM spool_entries_displaced")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(displaced, vec![later.entry.id.hyphenated().to_string()]);
    let search = |w: &str| Query {
        source: "s".into(),
        q: Some(w.into()),
        ..Default::default()
    };
    for word in ["aardvark", "नमस्ते"] {
        assert_eq!(
            again.query(&search(word)).await.unwrap().entries.len(),
            1,
            "{word}"
        );
    }
    assert!(again
        .query(&search("zebra"))
        .await
        .unwrap()
        .entries
        .is_empty());
}

#[tokio::test]
async fn words_of_any_script() {
    let (_t, d) = fresh().await;
    every_word_of_any_script_is_found(d).await;
}

#[tokio::test]
async fn crafted_queries() {
    let (_t, d) = fresh().await;
    crafted_queries_are_invalid_not_outages(d).await;
}

#[tokio::test]
async fn pages_bounded_by_bytes() {
    let (_t, d) = fresh().await;
    pages_are_bounded_by_bytes(d).await;
}

#[tokio::test]
async fn a_redelivered_mixed_batch_indexes_new_rows_by_their_own_words() {
    let (_t, d) = fresh().await;
    a_batch_of_old_and_new_rows_indexes_each_new_row_by_its_own_words(d).await;
}

#[tokio::test]
async fn forgetting() {
    let (_t, d) = fresh().await;
    forgetting_deletes_by_id_and_by_subject_up_to_its_time(d).await;
}

#[tokio::test]
async fn recall() {
    let (_t, d) = fresh().await;
    search_ranks_by_vector_text_and_both(d).await;
}

/// Runs `op` on a migrated destination holding one entry (id `first`) while
/// another connection holds the write lock: `op` must still be waiting after
/// half a second (a refusal comes at once), then finish once the lock is given
/// back; answers its result, the destination and its directory.
async fn while_another_writer_holds_the_lock<T: std::fmt::Debug + Send + 'static>(
    op: impl FnOnce(Dest, uuid::Uuid) -> tokio::task::JoinHandle<T>,
) -> (T, Dest, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let d: Dest = std::sync::Arc::new(
        SqliteDestination::open("main", &path, None, std::time::Duration::from_secs(30)).unwrap(),
    );
    let first = logged(1, "s", None, r#"{"n":1}"#, 1);
    let id = first.entry.id;
    d.write_batch(&[first]).await.unwrap();
    let mut other = spool_testkit::hold_sqlite_write_lock(&path).await;
    let mut task = op(d.clone(), id);
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), &mut task).await;
    assert!(early.is_err(), "did not wait for the lock: {early:?}");
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    (task.await.unwrap(), d, dir)
}

/// Another writer on the file (the sqlite3 CLI, `spool replay`) holding the
/// write lock for less than the busy timeout is waited for, not refused at once
/// as an outage: the highest rowid is read under `BEGIN IMMEDIATE`, so the busy
/// timeout applies (a deferred transaction that reads first gets SQLITE_BUSY
/// without waiting when it then tries to write).
#[tokio::test]
async fn a_write_lock_held_briefly_by_another_writer_is_waited_for() {
    let (written, d, _dir) = while_another_writer_holds_the_lock(|d, _| {
        tokio::spawn(async move {
            d.write_batch(&[logged(2, "s", None, r#"{"n":2}"#, 2)])
                .await
        })
    })
    .await;
    assert_eq!(written.unwrap(), 0, "written, no duplicate");
    assert_eq!(all(&d, "s").await.len(), 2);
}

/// The same for a forget (it reads the rows, then deletes them).
#[tokio::test]
async fn a_forget_waits_for_a_write_lock_held_briefly_by_another_writer() {
    let (deleted, d, _dir) = while_another_writer_holds_the_lock(|d, id| {
        tokio::spawn(async move {
            let t = spool_wal::Tombstone {
                at_us: 10,
                source: "s".into(),
                destination: "main".into(),
                ids: vec![id],
                subject: None,
            };
            d.forget(&t).await
        })
    })
    .await;
    assert_eq!(deleted.unwrap(), 1);
    assert!(all(&d, "s").await.is_empty());
}
