//! The client against a small scripted HTTP server: batching, retries, splits,
//! deadlines, close, callbacks.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{json, Value};
use spool_client::{Client, FullPolicy, IngestError, Wait, WaitError};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the next request gets (then the default: 202 echo).
#[derive(Clone)]
enum Step {
    Status(u16, Option<u64>),
    /// 413 for any request with more than this many entries.
    TooLargeAbove(usize),
    Hang,
    FailEntry(String),
    /// Hold each request until the semaphore has a permit (the test opens it).
    Gate(Arc<tokio::sync::Semaphore>),
}

#[derive(Default)]
struct Script {
    steps: VecDeque<Step>,
    sticky: Option<Step>,
    requests: Vec<Vec<Value>>,
    /// Whether each request came gzip-encoded.
    gzipped: Vec<bool>,
    ids: HashMap<String, uuid::Uuid>,
}

type Shared = Arc<Mutex<Script>>;

async fn handle(State(s): State<Shared>, h: HeaderMap, body: axum::body::Bytes) -> Response {
    let gz = h.get("content-encoding").is_some_and(|v| v == "gzip");
    let body = if gz {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out).unwrap();
        out
    } else {
        body.to_vec()
    };
    let entries: Vec<Value> = serde_json::from_slice(&body).unwrap();
    let step = {
        let mut sc = s.lock().unwrap();
        sc.requests.push(entries.clone());
        sc.gzipped.push(gz);
        sc.steps.pop_front().or(sc.sticky.clone())
    };
    match step {
        Some(Step::Status(code, retry)) => {
            let mut r = (
                StatusCode::from_u16(code).unwrap(),
                axum::Json(json!({"error":"scripted","message":"scripted"})),
            )
                .into_response();
            if let Some(s) = retry {
                r.headers_mut().insert("retry-after", s.into());
            }
            return r;
        }
        Some(Step::TooLargeAbove(n)) if entries.len() > n => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(json!({"error":"payload_too_large","message":"x"})),
            )
                .into_response();
        }
        Some(Step::Hang) => std::future::pending::<()>().await,
        Some(Step::Gate(g)) => drop(g.acquire().await.unwrap()),
        _ => {}
    }
    let fail = match s.lock().unwrap().sticky.clone() {
        Some(Step::FailEntry(k)) => Some(k),
        _ => None,
    };
    let mut sc = s.lock().unwrap();
    let answers: Vec<Value> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let key = e["idempotency_key"].as_str().unwrap().to_owned();
            let id = *sc.ids.entry(key.clone()).or_insert_with(uuid::Uuid::now_v7);
            if fail.as_deref() == Some(key.as_str()) {
                json!({"id": id, "lsn": i + 1, "status": "failed", "reason": "constraint"})
            } else {
                json!({"id": id, "lsn": i + 1, "status": "durable"})
            }
        })
        .collect();
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "entries": answers })),
    )
        .into_response()
}

async fn server(script: Script) -> (String, Shared) {
    let shared: Shared = Arc::new(Mutex::new(script));
    let app = axum::Router::new()
        .route("/v1/default/entries", post(handle))
        .with_state(shared.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, shared)
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sync_calls_share_batches_and_all_succeed() {
    let (url, s) = server(Script::default()).await;
    let c = Client::builder(&url)
        .max_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..50 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.ingest_sync(vec![json!({"n": n})], Wait::Durable, soon(10_000))
                .await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.len(), 1);
    }
    let sc = s.lock().unwrap();
    assert!(
        sc.requests.len() < 50,
        "{} requests for 50 calls",
        sc.requests.len()
    );
    assert_eq!(sc.requests.iter().map(Vec::len).sum::<usize>(), 50);
}

#[tokio::test]
async fn encode_failures_send_nothing_and_empty_or_expired_calls_end_at_once() {
    let (url, s) = server(Script::default()).await;
    let c = Client::builder(&url).build().unwrap();
    assert!(matches!(c.ingest(42).await, Err(IngestError::Encode(_))));
    let r = c
        .ingest_sync(vec![json!([1, 2])], Wait::Durable, soon(5000))
        .await;
    assert!(
        matches!(r, Err(WaitError::Ingest(IngestError::Encode(_)))),
        "{r:?}"
    );
    assert_eq!(
        c.ingest_sync(Vec::<Value>::new(), Wait::Durable, soon(5000))
            .await
            .unwrap(),
        vec![]
    );
    let r = c
        .ingest_sync(
            vec![json!({"a":1})],
            Wait::Durable,
            Instant::now() - Duration::from_millis(1),
        )
        .await;
    assert_eq!(r, Err(WaitError::NotConfirmed));
    assert!(s.lock().unwrap().requests.is_empty());
}

#[tokio::test]
async fn a_413_splits_the_batch_in_order_and_settles_each_entry_once() {
    let (url, s) = server(Script {
        sticky: Some(Step::TooLargeAbove(2)),
        ..Script::default()
    })
    .await;
    let c = Client::builder(&url)
        .max_delay(Duration::from_millis(50))
        .build()
        .unwrap();
    let entries: Vec<Value> = (0..9)
        .map(|n| json!({"n": n, "idempotency_key": format!("k{n}")}))
        .collect();
    let r = c
        .ingest_sync(entries, Wait::Durable, soon(10_000))
        .await
        .unwrap();
    assert_eq!(r.len(), 9);
    let sc = s.lock().unwrap();
    let sent_in_order: Vec<String> = sc
        .requests
        .iter()
        .filter(|b| b.len() <= 2)
        .flatten()
        .map(|e| e["idempotency_key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        sent_in_order,
        (0..9).map(|n| format!("k{n}")).collect::<Vec<_>>()
    );
    for (n, rc) in r.iter().enumerate() {
        assert_eq!(
            rc.id,
            sc.ids[&format!("k{n}")],
            "receipt {n} is its own entry's"
        );
    }
}

#[tokio::test]
async fn retry_after_is_honoured_and_5xx_retried_with_the_same_keys() {
    let steps = VecDeque::from([
        Step::Status(429, Some(1)),
        Step::Status(500, None),
        Step::Status(503, Some(0)),
    ]);
    let (url, s) = server(Script {
        steps,
        ..Script::default()
    })
    .await;
    let c = Client::builder(&url)
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let r = c
        .ingest_sync(vec![json!({"a": 1})], Wait::Durable, soon(10_000))
        .await
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 not honoured"
    );
    let sc = s.lock().unwrap();
    assert_eq!(sc.requests.len(), 4);
    let keys: Vec<_> = sc
        .requests
        .iter()
        .map(|b| b[0]["idempotency_key"].clone())
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] == w[1]),
        "a retry changed the key: {keys:?}"
    );
    assert_eq!(r[0].id, sc.ids[keys[0].as_str().unwrap()]);
}

#[tokio::test]
async fn a_failing_server_means_not_confirmed_and_close_settles_closed() {
    let (url, _s) = server(Script {
        sticky: Some(Step::Status(500, None)),
        ..Script::default()
    })
    .await;
    let c = Client::builder(&url)
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
        .build()
        .unwrap();
    assert_eq!(
        c.ingest_sync(vec![json!({"a": 1})], Wait::Durable, soon(300))
            .await,
        Err(WaitError::NotConfirmed)
    );
    let pending = c.ingest_batch(vec![json!({"b": 2})], Wait::Durable).await;
    c.close(soon(200)).await;
    c.close(soon(200)).await; // idempotent
    assert_eq!(
        pending.wait(soon(5000)).await,
        Err(WaitError::Ingest(IngestError::Closed))
    );
    assert_eq!(c.ingest(json!({"c": 3})).await, Err(IngestError::Closed));
    let r = c
        .ingest_sync(vec![json!({"d": 4})], Wait::Durable, soon(1000))
        .await;
    assert_eq!(r, Err(WaitError::Ingest(IngestError::Closed)));
}

#[tokio::test]
async fn client_errors_reject_and_dead_letters_fail_with_their_reason() {
    let (url, s) = server(Script {
        steps: VecDeque::from([Step::Status(400, None)]),
        ..Script::default()
    })
    .await;
    let c = Client::builder(&url).build().unwrap();
    let r = c
        .ingest_sync(vec![json!({"a": 1})], Wait::Durable, soon(5000))
        .await;
    assert!(
        matches!(
            r,
            Err(WaitError::Ingest(IngestError::Rejected { status: 400, .. }))
        ),
        "{r:?}"
    );
    s.lock().unwrap().sticky = Some(Step::FailEntry("bad".into()));
    let r = c
        .ingest_sync(
            vec![json!({"idempotency_key": "bad"})],
            Wait::Delivered,
            soon(5000),
        )
        .await;
    assert_eq!(
        r,
        Err(WaitError::Ingest(IngestError::Failed {
            reason: "constraint".into()
        }))
    );
}

#[tokio::test]
async fn callbacks_get_oversized_and_dropped_entries_and_a_lone_entry_flushes_by_time() {
    let (url, s) = server(Script::default()).await;
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let dropped = Arc::new(Mutex::new(Vec::new()));
    let (r2, d2) = (rejected.clone(), dropped.clone());
    let c = Client::builder(&url)
        .max_batch_bytes(200)
        .max_batch_entries(1000)
        .max_delay(Duration::from_millis(30))
        .buffer_entries(1)
        .on_full(FullPolicy::Drop)
        .on_reject(move |e, err| r2.lock().unwrap().push((e.clone(), err.clone())))
        .on_drop(move |e, err| d2.lock().unwrap().push((e.clone(), err.clone())))
        .build()
        .unwrap();
    c.ingest(json!({"pad": "x".repeat(300)})).await.unwrap();
    assert_eq!(rejected.lock().unwrap().len(), 1);
    assert!(matches!(
        rejected.lock().unwrap()[0].1,
        IngestError::Rejected { status: 413, .. }
    ));
    // A lone entry goes out after max_delay although the batch is far from full.
    let t0 = Instant::now();
    c.ingest_sync(vec![json!({"lone": 1})], Wait::Durable, soon(5000))
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    // Stall the server; a buffer of 1 then drops.
    s.lock().unwrap().sticky = Some(Step::Hang);
    for n in 0..20 {
        c.ingest(json!({"n": n})).await.unwrap();
    }
    assert!(dropped
        .lock()
        .unwrap()
        .iter()
        .any(|(_, e)| *e == IngestError::BufferFull));
}

#[tokio::test]
async fn byte_overflow_flushes_the_current_batch_first() {
    let (url, s) = server(Script::default()).await;
    let c = Client::builder(&url)
        .max_batch_bytes(120)
        .max_delay(Duration::from_millis(50))
        .build()
        .unwrap();
    let entries: Vec<Value> = (0..4)
        .map(|n| json!({"n": n, "pad": "xxxxxxxxxx"}))
        .collect();
    c.ingest_sync(entries, Wait::Durable, soon(5000))
        .await
        .unwrap();
    let sc = s.lock().unwrap();
    assert!(
        sc.requests.len() >= 2,
        "one request over max_batch_bytes: {:?}",
        sc.requests
    );
    assert!(sc
        .requests
        .iter()
        .all(|b| serde_json::to_vec(b).unwrap().len() <= 120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_in_wait_mode_blocks_the_caller_until_room_then_gives_buffer_full() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (url, s) = server(Script {
        sticky: Some(Step::Gate(gate.clone())),
        ..Script::default()
    })
    .await;
    let dropped = Arc::new(Mutex::new(0usize));
    let d2 = dropped.clone();
    let c = Client::builder(&url)
        .max_batch_entries(1)
        .max_delay(Duration::ZERO)
        .buffer_entries(2)
        .on_full(FullPolicy::Wait(Duration::from_secs(60)))
        .on_drop(move |_, _| *d2.lock().unwrap() += 1)
        .build()
        .unwrap();
    // Fill everything: requests held at the gate, one batch waiting for a
    // request slot, two entries in the buffer.
    let mut n = 0;
    loop {
        let fits = tokio::time::timeout(Duration::from_millis(300), c.ingest(json!({"n": n})));
        match fits.await {
            Ok(r) => r.unwrap(),
            Err(_) => break, // the caller is held: the buffer is full
        }
        n += 1;
        assert!(n < 100, "the buffer never filled");
    }
    // That timed-out call was cancelled before it enqueued; a held caller
    // proceeds once the server lets requests through.
    let held = tokio::spawn({
        let c = c.clone();
        async move { c.ingest(json!({"n": "held"})).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!held.is_finished(), "the caller waits for room");
    gate.add_permits(1_000_000);
    held.await.unwrap().unwrap();
    // With a short wait the call gives BufferFull (tracked: as the error).
    let short = Client::builder(&url)
        .max_batch_entries(1)
        .max_delay(Duration::ZERO)
        .buffer_entries(1)
        .on_full(FullPolicy::Wait(Duration::from_millis(50)))
        .build()
        .unwrap();
    let gate2 = Arc::new(tokio::sync::Semaphore::new(0));
    s.lock().unwrap().sticky = Some(Step::Gate(gate2.clone()));
    let batch = short
        .ingest_batch((0..10).map(|n| json!({"m": n})).collect(), Wait::Durable)
        .await;
    gate2.add_permits(1_000_000);
    let err = batch.wait(soon(10_000)).await.unwrap_err();
    assert_eq!(err, WaitError::Ingest(IngestError::BufferFull));
    c.close(soon(10_000)).await;
    short.close(soon(10_000)).await;
    // Every entry of the first client that was accepted arrived exactly once.
    assert_eq!(*dropped.lock().unwrap(), 0);
    let sc = s.lock().unwrap();
    let mut seen: Vec<String> = sc
        .requests
        .iter()
        .flatten()
        .filter_map(|e| Some(e.get("n")?.to_string()))
        .collect();
    let total = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "no entry sent twice");
    assert_eq!(total, n + 1, "{n} buffered entries and the held one");
}

#[tokio::test]
async fn large_batches_are_gzipped_and_small_ones_are_not() {
    let (url, s) = server(Script::default()).await;
    let c = Client::builder(&url).build().unwrap();
    c.ingest_sync(vec![json!({"small": 1})], Wait::Durable, soon(5000))
        .await
        .unwrap();
    let big: Vec<Value> = (0..100)
        .map(|n| json!({"n": n, "pad": "y".repeat(300)}))
        .collect();
    c.ingest_sync(big.clone(), Wait::Durable, soon(5000))
        .await
        .unwrap();
    let sc = s.lock().unwrap();
    assert_eq!(sc.gzipped, vec![false, true]);
    let got: Vec<&Value> = sc.requests[1].iter().map(|e| &e["pad"]).collect();
    assert_eq!(got, big.iter().map(|e| &e["pad"]).collect::<Vec<_>>());
}
