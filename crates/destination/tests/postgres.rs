//! The destination suite against a real PostgreSQL server started by the test
//! harness (spool-testkit), plus outage classification.

mod suite;

use spool_destination::{Destination, DestinationError, PostgresDestination, Query};
use spool_testkit::PgServer;
use std::sync::Arc;
use suite::*;

async fn fresh() -> Dest {
    let url = PgServer::shared().fresh_database();
    Arc::new(
        PostgresDestination::open("main", &url, Some(4), spool_destination::DEFAULT_TIMEOUT)
            .unwrap(),
    )
}

#[tokio::test]
async fn redelivery() {
    redelivery_is_idempotent_and_first_write_wins(fresh().await).await;
}

#[tokio::test]
async fn poison_invalid_json() {
    a_poison_entry_is_named_and_the_rest_can_be_written(fresh().await, "{not json").await;
}

#[tokio::test]
async fn poison_nul_in_jsonb() {
    a_poison_entry_is_named_and_the_rest_can_be_written(fresh().await, r#"{"a":"x\u0000y"}"#).await;
}

#[tokio::test]
async fn queries() {
    queries_filter_order_and_search(fresh().await).await;
}

#[tokio::test]
async fn cursors() {
    cursors_neither_skip_nor_repeat_under_concurrent_inserts(fresh().await).await;
}

#[tokio::test]
async fn unicode_and_large() {
    unicode_and_large_payloads_round_trip(fresh().await).await;
}

#[tokio::test]
async fn injection() {
    injection_strings_are_data(fresh().await).await;
}

#[tokio::test]
async fn a_constraint_the_screen_cannot_see_is_a_rejection_without_index() {
    let url = PgServer::shared().fresh_database();
    let d = PostgresDestination::open("main", &url, Some(2), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    d.health().await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(
        "ALTER TABLE spool_entries ADD CONSTRAINT short_subject CHECK (length(subject) < 10)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let batch = vec![
        logged(1, "s", Some("ok"), r#"{"a":1}"#, 1),
        logged(2, "s", Some("far too long a subject"), r#"{"a":2}"#, 2),
    ];
    let err = d.write_batch(&batch).await.unwrap_err();
    assert!(
        matches!(err, DestinationError::Rejected { index: None, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    // Split, the good one goes in and the bad one is identified alone.
    d.write_batch(&batch[..1]).await.unwrap();
    assert!(d.write_batch(&batch[1..]).await.unwrap_err().is_rejection());
}

#[tokio::test]
async fn migrations_on_existing_database_and_newer_schema_refused() {
    let url = PgServer::shared().fresh_database();
    let d = PostgresDestination::open("main", &url, Some(2), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    d.write_batch(&[logged(1, "m", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap();
    d.close().await;
    let d = PostgresDestination::open("main", &url, Some(2), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    let page = d
        .query(&Query {
            source: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 1);
    d.close().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("INSERT INTO spool_schema (version) VALUES (99)")
        .execute(&pool)
        .await
        .unwrap();
    // Opening needs no database; the first contact refuses the newer schema.
    let d = PostgresDestination::open("main", &url, Some(2), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    match d.health().await {
        Err(DestinationError::SchemaTooNew { found: 99, .. }) => {}
        Err(e) => panic!("expected SchemaTooNew, got {e}"),
        Ok(()) => panic!("expected SchemaTooNew, opened"),
    }
}

#[tokio::test]
async fn concurrent_opens_migrate_once() {
    let url = PgServer::shared().fresh_database();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let d = PostgresDestination::open(
                    "main",
                    &url,
                    Some(2),
                    spool_destination::DEFAULT_TIMEOUT,
                )
                .unwrap();
                d.health().await
            })
        })
        .collect();
    for o in opens {
        o.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_stopped_server_is_transient_and_writes_resume_after_restart() {
    let mut pg = PgServer::start();
    let d = PostgresDestination::open(
        "main",
        pg.url(),
        Some(2),
        spool_destination::DEFAULT_TIMEOUT,
    )
    .unwrap();
    d.write_batch(&[logged(1, "t", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap();
    pg.stop();
    let err = d
        .write_batch(&[logged(2, "t", None, r#"{"a":2}"#, 2)])
        .await
        .unwrap_err();
    assert!(err.is_outage(), "outage classified as {err}");
    assert!(d.health().await.unwrap_err().is_outage());
    pg.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match d
            .write_batch(&[logged(2, "t", None, r#"{"a":2}"#, 2)])
            .await
        {
            Ok(_) => break,
            Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => panic!("write after restart failed: {e}"),
        }
    }
    let page = d
        .query(&Query {
            source: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 2);
}

/// `url` with its host:port replaced by `addr`, and the socket address it named.
fn via(url: &str, addr: std::net::SocketAddr) -> (String, std::net::SocketAddr) {
    let (scheme_user, rest) = url.split_once('@').unwrap();
    let (hostport, db) = rest.split_once('/').unwrap();
    (
        format!("{scheme_user}@{addr}/{db}"),
        hostport.parse().unwrap(),
    )
}

/// Run `;`-separated statements one by one on one connection.
async fn exec(url: &str, sql: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    for stmt in sql.split(';').filter(|s| !s.trim().is_empty()) {
        sqlx::raw_sql(stmt).execute(&mut c).await.unwrap();
    }
    c.close().await.unwrap();
}

/// Opening never needs the server: a destination made while Postgres is down
/// reports an outage, then migrates and writes at the first contact once it is up.
#[tokio::test]
async fn a_destination_opened_while_the_server_is_down_migrates_at_first_contact() {
    let mut pg = PgServer::start();
    pg.stop();
    let d = PostgresDestination::open("main", pg.url(), Some(2), std::time::Duration::from_secs(5))
        .expect("open needs no server");
    let err = d.health().await.unwrap_err();
    assert!(err.is_outage(), "{err}");
    let one = logged(1, "t", None, r#"{"a":1}"#, 1);
    let err = d.write_batch(std::slice::from_ref(&one)).await.unwrap_err();
    assert!(err.is_outage(), "{err}");
    pg.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Err(e) = d.health().await {
        assert!(e.is_outage() && std::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    d.write_batch(std::slice::from_ref(&one)).await.unwrap();
    assert!(d.get("t", one.entry.id).await.unwrap().is_some());
}

/// A server that went read-only (a standby after failover, or
/// `default_transaction_read_only`) is an outage: writes and the health check
/// say unavailable, never "rejected".
#[tokio::test]
async fn a_read_only_server_is_an_outage_not_a_rejection() {
    let url = PgServer::shared().fresh_database();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let d = PostgresDestination::open("main", &url, Some(1), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    d.health().await.unwrap();
    exec(
        &url,
        &format!("ALTER DATABASE {db} SET default_transaction_read_only = on"),
    )
    .await;
    // The setting applies to new sessions: a fresh destination (pool) sees it.
    let ro = PostgresDestination::open("main", &url, Some(1), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    let err = ro
        .write_batch(&[logged(1, "t", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap_err();
    assert!(err.is_outage(), "read-only write classified as {err}");
    let err = ro.health().await.unwrap_err();
    assert!(
        err.is_outage() && err.to_string().contains("read-only"),
        "{err}"
    );
    exec(
        &url,
        &format!(
            "SET default_transaction_read_only = off; \
             ALTER DATABASE {db} SET default_transaction_read_only = off"
        ),
    )
    .await;
    let rw = PostgresDestination::open("main", &url, Some(1), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    rw.write_batch(&[logged(1, "t", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap();
}

/// A lock held by someone else past the statement timeout is an outage
/// (57014 / 55P03), never an attempt against the entries.
#[tokio::test]
async fn a_lock_held_past_the_statement_timeout_is_an_outage() {
    let url = PgServer::shared().fresh_database();
    let d = PostgresDestination::open("main", &url, Some(1), std::time::Duration::from_millis(500))
        .unwrap();
    d.health().await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE spool_entries IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = d
        .write_batch(&[logged(1, "t", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap_err();
    assert!(err.is_outage(), "lock timeout classified as {err}");
    assert!(
        err.to_string().contains("57014"),
        "the server's statement_timeout ends it, not the client deadline: {err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    tx.rollback().await.unwrap();
    d.write_batch(&[logged(1, "t", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap();
}

/// A connection that stops answering (no RST, no FIN) is an outage within the
/// destination's timeout, not a worker hung forever; writes resume after.
#[tokio::test]
async fn a_black_holed_connection_times_out_as_an_outage() {
    let url = PgServer::shared().fresh_database();
    let (_, upstream) = via(&url, "127.0.0.1:1".parse().unwrap());
    let hole = spool_testkit::BlackHole::start(upstream);
    let (proxied, _) = via(&url, hole.addr());
    let d = PostgresDestination::open("main", &proxied, Some(1), std::time::Duration::from_secs(1))
        .unwrap();
    d.write_batch(&[logged(1, "t", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap();
    hole.freeze();
    let started = std::time::Instant::now();
    let err = d
        .write_batch(&[logged(2, "t", None, r#"{"a":2}"#, 2)])
        .await
        .unwrap_err();
    assert!(err.is_outage(), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    hole.thaw();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Err(e) = d
        .write_batch(&[logged(2, "t", None, r#"{"a":2}"#, 2)])
        .await
    {
        assert!(e.is_outage() && std::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An entry whose words would overflow a tsvector (1 MiB) was once a dead
/// letter for its content (54000); an accepted entry must stay deliverable: its
/// first MAX_INDEXED_BYTES of distinct words are indexed, the rest not.
#[tokio::test]
async fn a_payload_with_more_words_than_a_tsvector_holds_is_delivered() {
    let d = fresh().await;
    // ~1.3 MB of distinct words: past tsvector's 1 MiB limit.
    let words: Vec<String> = (0..120_000).map(|i| format!("w{i:08x}")).collect();
    let payload = serde_json::json!({ "text": words.join(" ") }).to_string();
    let batch = vec![
        logged(1, "t", None, r#"{"a":1}"#, 1),
        logged(2, "t", None, &payload, 2),
    ];
    assert_eq!(d.write_batch(&batch).await.unwrap(), 0);
    let search = |w: &str| Query {
        source: "t".into(),
        q: Some(w.into()),
        ..Default::default()
    };
    assert_eq!(
        d.query(&search("w00000000")).await.unwrap().entries.len(),
        1
    );
    assert!(d
        .query(&search(&words[119_999]))
        .await
        .unwrap()
        .entries
        .is_empty());
}

/// Keyed entries are unique by (source, idempotency_key): a copy under another
/// id (a retry another node took) is dropped and counted; another source may
/// use the same key.
#[tokio::test]
async fn keyed_entries_are_unique_per_source() {
    keyed_entries_are_unique_per_source_and_copies_are_counted(fresh().await).await;
}

/// A version-1 database that already holds copies of a key, migrated: the
/// first accepted stays, the copy is kept aside, and rows stored before are
/// found by their words (migration 3 computes and indexes them).
#[tokio::test]
async fn the_key_and_words_migrations_keep_the_first_copy_and_index_old_rows() {
    let url = PgServer::shared().fresh_database();
    let d = PostgresDestination::open("main", &url, Some(1), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    d.health().await.unwrap();
    d.close().await;
    // Back to the version-1 schema, with two copies of one key as it stored them.
    exec(
        &url,
        "DROP INDEX spool_entries_by_key; DROP TABLE spool_entries_displaced; \
         DROP INDEX spool_entries_words; ALTER TABLE spool_entries DROP COLUMN words; \
         ALTER TABLE spool_entries DROP COLUMN embedding; \
         CREATE INDEX spool_entries_fts ON spool_entries \
             USING gin (jsonb_to_tsvector('simple', payload, '[\"string\"]')); \
         DELETE FROM spool_schema WHERE version > 1;",
    )
    .await;
    let a = logged(1, "s", None, r#"{"a":"aardvark नमस्ते"}"#, 1);
    let b = logged(2, "s", None, r#"{"a":"zebra"}"#, 2);
    for le in [&a, &b] {
        exec(
            &url,
            &format!(
                "INSERT INTO spool_entries (id, lsn, source, idempotency_key, payload, created_at) \
                 VALUES ('{}', {}, 's', 'k', '{}', timestamptz 'epoch' + {} * interval '1 microsecond')",
                le.entry.id,
                le.lsn,
                std::str::from_utf8(&le.entry.payload).unwrap(),
                le.entry.accepted_at_us
            ),
        )
        .await;
    }
    // More rows than one backfill batch, and one with no strings at all.
    exec(
        &url,
        "INSERT INTO spool_entries (id, lsn, source, payload, created_at) \
         SELECT gen_random_uuid(), 100 + i, 'bulk', jsonb_build_object('t', 'bulk' || i), \
                timestamptz 'epoch' + i * interval '1 microsecond' \
           FROM generate_series(1, 2500) i; \
         INSERT INTO spool_entries (id, lsn, source, payload, created_at) \
         VALUES (gen_random_uuid(), 99, 'bulk', '{\"n\": 1}', now())",
    )
    .await;
    let again =
        PostgresDestination::open("main", &url, Some(1), spool_destination::DEFAULT_TIMEOUT)
            .unwrap();
    again.health().await.unwrap();
    assert!(again.get("s", a.entry.id).await.unwrap().is_some());
    assert!(again.get("s", b.entry.id).await.unwrap().is_none());
    // The copy is kept aside, not deleted.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let displaced: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM spool_entries_displaced")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(displaced, vec![b.entry.id]);
    for word in ["aardvark", "नमस्ते"] {
        let found = again
            .query(&Query {
                source: "s".into(),
                q: Some(word.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(found.entries.len(), 1, "{word}");
    }
    let search = |source: &str, w: &str| Query {
        source: source.into(),
        q: Some(w.into()),
        ..Default::default()
    };
    for word in ["bulk1", "bulk1001", "bulk2500"] {
        let found = again.query(&search("bulk", word)).await.unwrap();
        assert_eq!(found.entries.len(), 1, "{word}");
    }
    let unworded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM spool_entries WHERE words IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unworded, 0);
    // A node of the previous version, still running, stores a row without
    // words: the next start of this version indexes it.
    again.close().await;
    exec(
        &url,
        "INSERT INTO spool_entries (id, lsn, source, payload, created_at) \
         VALUES (gen_random_uuid(), 5000, 'old', '{\"t\": \"straggler\"}', now())",
    )
    .await;
    let third =
        PostgresDestination::open("main", &url, Some(1), spool_destination::DEFAULT_TIMEOUT)
            .unwrap();
    third.health().await.unwrap();
    // Indexed in the background, after the start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while third
        .query(&search("old", "straggler"))
        .await
        .unwrap()
        .entries
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the straggler was never indexed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn words_of_any_script() {
    every_word_of_any_script_is_found(fresh().await).await;
}

#[tokio::test]
async fn crafted_queries() {
    crafted_queries_are_invalid_not_outages(fresh().await).await;
}

#[tokio::test]
async fn pages_bounded_by_bytes() {
    pages_are_bounded_by_bytes(fresh().await).await;
}

#[tokio::test]
async fn a_redelivered_mixed_batch_indexes_new_rows_by_their_own_words() {
    a_batch_of_old_and_new_rows_indexes_each_new_row_by_its_own_words(fresh().await).await;
}

#[tokio::test]
async fn forgetting() {
    forgetting_deletes_by_id_and_by_subject_up_to_its_time(fresh().await).await;
}

/// Debian's PostgreSQL 15 has no pgvector: the same suite passes on the exact
/// path (tests/pgvector.rs runs it with pgvector).
#[tokio::test]
async fn recall_without_pgvector_scans_exactly() {
    let url = PgServer::shared().fresh_database();
    let d = PostgresDestination::open("main", &url, Some(4), spool_destination::DEFAULT_TIMEOUT)
        .unwrap();
    search_ranks_by_vector_text_and_both(Arc::new(d)).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let found: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'), \
                to_regclass('spool_entries_vec3')::text",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(found, (None, None), "this server has pgvector after all");
}
