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

    // Concurrent sync callers share requests; a large batch goes gzipped.
    let before = entries_requests(&s).await;
    let mut calls = Vec::new();
    for n in 0..40 {
        let c = c.clone();
        calls.push(tokio::spawn(async move {
            c.ingest_sync(vec![json!({"conc": n})], Wait::Durable, deadline())
                .await
        }));
    }
    for t in calls {
        assert_eq!(t.await.unwrap().unwrap().len(), 1);
    }
    let used = entries_requests(&s).await - before;
    assert!(used < 40, "{used} requests for 40 concurrent calls");
    let big: Vec<_> = (0..100)
        .map(|n| json!({"big": n, "pad": "z".repeat(300)}))
        .collect();
    let r = c.ingest_sync(big, Wait::Durable, deadline()).await.unwrap();
    assert_eq!(r.len(), 100);

    // A receipt handle: enqueue now, it becomes done, wait gives the receipts.
    let mut handle = c
        .ingest_batch(vec![json!({"r": 1}), json!({"r": 2})], Wait::Delivered)
        .await;
    let until = Instant::now() + Duration::from_secs(10);
    while !handle.is_done() {
        assert!(Instant::now() < until, "the receipts never settled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = handle.wait(deadline()).await.unwrap();
    assert!(r.iter().all(|x| x.status == "delivered"), "{r:?}");

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
                n >= 446
            },
        );
        n
    })
    .await
    .unwrap();
    assert_eq!(
        count, 446,
        "2 + 1 + 1 + 40 + 100 + 2 + 300 entries, each once"
    );
    drop(s);
}

/// Requests the server counted on the entries route (from /metrics).
async fn entries_requests(s: &Server) -> u64 {
    let url = s.url("/metrics");
    let body = tokio::task::spawn_blocking(move || call(ureq::get(&url), None).body)
        .await
        .unwrap();
    let text = body.as_str().expect("metrics are text");
    text.lines()
        .filter(|l| l.starts_with("spool_http_requests_total{route=\"/v1/{source}/entries\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
