//! spool-client against the real server.

mod common;

use common::*;
use serde_json::json;
use spool_client::{Client, Wait};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_against_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = tokio::task::spawn_blocking({
        let d = dir.path().to_owned();
        move || Server::start(&d, "")
    })
    .await
    .unwrap();
    let c = Client::builder(&s.url("")).build().unwrap();
    let deadline = || Instant::now() + Duration::from_secs(10);

    let r = c
        .ingest_sync(
            vec![json!({"a": 1}), json!({"a": 2})],
            Wait::Durable,
            deadline(),
        )
        .await
        .unwrap();
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|x| x.status == "durable"));
    let d = c
        .ingest_sync(vec![json!({"b": 1})], Wait::Delivered, deadline())
        .await
        .unwrap();
    assert_eq!(d[0].status, "delivered");

    // A resend with the same key is the same entry.
    let k = json!({"c": 1, "idempotency_key": "once"});
    let first = c
        .ingest_sync(vec![k.clone()], Wait::Durable, deadline())
        .await
        .unwrap();
    let again = c
        .ingest_sync(vec![k], Wait::Durable, deadline())
        .await
        .unwrap();
    assert_eq!(first[0].id, again[0].id);

    // Fire and forget, then close: everything buffered is flushed.
    for n in 0..300 {
        c.ingest(json!({"n": n})).await.unwrap();
    }
    c.close(deadline()).await;
    let url = s.url("/v1/default/entries?limit=1000");
    let count = tokio::task::spawn_blocking(move || {
        let mut n = 0;
        eventually(
            Duration::from_secs(30),
            "fire-and-forget entries delivered",
            || {
                n = call(ureq::get(&url), None).body["entries"]
                    .as_array()
                    .map_or(0, Vec::len);
                n >= 304
            },
        );
        n
    })
    .await
    .unwrap();
    assert_eq!(count, 304, "2 + 1 + 1 + 300 entries");
    drop(s);
}
