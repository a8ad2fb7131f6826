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
        PostgresDestination::open("main", &url, Some(4))
            .await
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
    let d = PostgresDestination::open("main", &url, Some(2))
        .await
        .unwrap();
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
    let d = PostgresDestination::open("main", &url, Some(2))
        .await
        .unwrap();
    d.write_batch(&[logged(1, "m", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap();
    d.close().await;
    let d = PostgresDestination::open("main", &url, Some(2))
        .await
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
    match PostgresDestination::open("main", &url, Some(2)).await {
        Err(DestinationError::SchemaTooNew {
            found: 99,
            known: 1,
            ..
        }) => {}
        Err(e) => panic!("expected SchemaTooNew, got {e}"),
        Ok(_) => panic!("expected SchemaTooNew, opened"),
    }
}

#[tokio::test]
async fn concurrent_opens_migrate_once() {
    let url = PgServer::shared().fresh_database();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresDestination::open("main", &url, Some(2)).await })
        })
        .collect();
    for o in opens {
        o.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_stopped_server_is_transient_and_writes_resume_after_restart() {
    let mut pg = PgServer::start();
    let d = PostgresDestination::open("main", pg.url(), Some(2))
        .await
        .unwrap();
    d.write_batch(&[logged(1, "t", None, r#"{"a":1}"#, 1)])
        .await
        .unwrap();
    pg.stop();
    let err = d
        .write_batch(&[logged(2, "t", None, r#"{"a":2}"#, 2)])
        .await
        .unwrap_err();
    assert!(err.is_transient(), "outage classified as {err}");
    assert!(d.health().await.unwrap_err().is_transient());
    pg.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match d
            .write_batch(&[logged(2, "t", None, r#"{"a":2}"#, 2)])
            .await
        {
            Ok(()) => break,
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
