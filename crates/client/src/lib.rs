//! # spool-client — completion-aware ingest into spool
//!
//! Entries are buffered and sent in batches by a background task: by count
//! (`max_batch_entries`), by bytes (`max_batch_bytes`; an entry that would overflow
//! the batch flushes the current one first) and by time (`max_delay`, default 0).
//! A batch goes out once `max_delay` passed and one of the `max_in_flight`
//! request slots is free; until a slot frees it keeps growing, so a lone entry
//! is sent at once and a busy client sends full batches. Three ways to call it:
//!
//! - [`Client::ingest`]: fire and forget; problems go to the `on_reject` /
//!   `on_drop` callbacks.
//! - [`Client::ingest_sync`]: wait until the server answered durable (or delivered)
//!   for every entry, or the deadline passed.
//! - [`Client::ingest_batch`]: enqueue now, [`Receipts::wait`] later.
//!
//! ## Invariants
//! - **Every tracked entry settles exactly once**: `Ok(Receipt)`, or an
//!   [`IngestError`] for a terminal outcome. A deadline that passes first is
//!   [`WaitError::NotConfirmed`] — *not* an `IngestError`: the entry may still land.
//! - **Retries never duplicate**: every entry carries an `idempotency_key` (the
//!   caller's, or one generated once per entry), so a resend is answered with the
//!   original.
//! - 429/503 honour `Retry-After` (capped); 5xx and connection errors retry with
//!   capped, jittered backoff; 413 splits the batch in order, each part settling
//!   its own entries; other 4xx settle `Rejected`.
//! - [`Client::close`] is idempotent: it flushes what is buffered; what cannot be
//!   delivered by its deadline settles `Closed`; no send is accepted after it began.
//!
//! ## The pub/sub ack pattern
//! ```no_run
//! # async fn demo(msg_payload: serde_json::Value) {
//! use spool_client::{Client, Wait, WaitError};
//! use std::time::{Duration, Instant};
//! let client = Client::builder("http://127.0.0.1:7070").source("default").build().unwrap();
//! match client.ingest_sync(vec![msg_payload], Wait::Durable, Instant::now() + Duration::from_secs(5)).await {
//!     Ok(_receipts) => { /* ack the broker message: spool has it on disk */ }
//!     Err(WaitError::NotConfirmed) => { /* nack: redelivery is safe, the key dedupes */ }
//!     Err(WaitError::Ingest(e)) => { /* dead-letter the message: spool refused it ({e}) */ }
//! }
//! client.close(Instant::now() + Duration::from_secs(5)).await;
//! # }
//! ```

use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How far an answer must go: `Durable` (in the server's WAL, fsynced) or
/// `Delivered` (in the destination).
pub use spool_wire::Wait;
use spool_wire::{EntryAnswer, EntryState, ErrorBody, WriteAnswer, WriteParams};

/// The server's answer for one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Entry id (the original's when the key was seen before).
    pub id: Uuid,
    /// LSN of its WAL record.
    pub lsn: u64,
    /// `durable` or `delivered` (`unknown`: a state a newer server named that
    /// this client does not know; never under `Wait::Delivered`).
    pub status: String,
}

/// A terminal outcome: the entry will not be stored by this client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The entry could not be encoded as a JSON object (nothing was sent).
    #[error("entry cannot be encoded: {0}")]
    Encode(String),
    /// The buffer was full (drop policy, or the wait ran out).
    #[error("client buffer full")]
    BufferFull,
    /// The client is closed, or closed before the entry could be sent.
    #[error("client closed")]
    Closed,
    /// The server refused it (a 4xx other than 429).
    #[error("rejected by the server: {status} {error}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The error code of the body.
        error: String,
        /// Its message.
        message: String,
    },
    /// Dead-lettered by the server (with `Wait::Delivered`).
    #[error("failed in the destination: {reason}")]
    Failed {
        /// The server's reason.
        reason: String,
    },
}

/// Why a wait ended without receipts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// The deadline passed first: not confirmed, maybe stored — nack and rely on
    /// the idempotency key.
    #[error("not confirmed before the deadline")]
    NotConfirmed,
    /// A terminal outcome for (at least) one entry.
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

/// What happens when the buffer is full.
#[derive(Debug, Clone, Copy)]
pub enum FullPolicy {
    /// Wait up to this long for room (or the caller's deadline), then `BufferFull`.
    Wait(Duration),
    /// Drop the entry at once (`on_drop`).
    Drop,
}

type Callback = Arc<dyn Fn(&Value, &IngestError) + Send + Sync>;

/// Builds a [`Client`].
pub struct ClientBuilder {
    base: String,
    source: String,
    token: Option<String>,
    max_batch_entries: usize,
    max_batch_bytes: usize,
    max_delay: Duration,
    buffer_entries: usize,
    full: FullPolicy,
    request_timeout: Duration,
    gzip_min_bytes: usize,
    retry_after_cap: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    in_flight: usize,
    on_reject: Option<Callback>,
    on_drop: Option<Callback>,
}

impl ClientBuilder {
    /// Source to write to (default `default`).
    pub fn source(mut self, s: &str) -> Self {
        self.source = s.into();
        self
    }
    /// Bearer token of the source.
    pub fn token(mut self, t: &str) -> Self {
        self.token = Some(t.into());
        self
    }
    /// Most entries per request (default 500).
    pub fn max_batch_entries(mut self, n: usize) -> Self {
        self.max_batch_entries = n.max(1);
        self
    }
    /// Most body bytes per request before compression (default 1 MiB).
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = n.max(2);
        self
    }
    /// How long a batch waits for more entries before it may go out (default 0).
    /// Batching happens anyway: while every request slot is busy the next batch
    /// keeps growing, so batches are small when the server keeps up and large
    /// when it does not. A positive delay trades latency for fuller batches.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }
    /// Entries the buffer holds (default 10,000).
    pub fn buffer_entries(mut self, n: usize) -> Self {
        self.buffer_entries = n.max(1);
        self
    }
    /// Full-buffer policy (default: wait up to 1 s).
    pub fn on_full(mut self, p: FullPolicy) -> Self {
        self.full = p;
        self
    }
    /// Per-request timeout (default 30 s).
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d;
        self
    }
    /// Longest `Retry-After` honoured (default 5 s).
    pub fn retry_after_cap(mut self, d: Duration) -> Self {
        self.retry_after_cap = d;
        self
    }
    /// Backoff for 5xx and connection errors (default 50 ms … 2 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }
    /// Most requests in flight at once (default 4).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.in_flight = n.max(1);
        self
    }
    /// Called for an entry refused before sending (larger than `max_batch_bytes`)
    /// or by the server, in fire-and-forget mode.
    pub fn on_reject(mut self, f: impl Fn(&Value, &IngestError) + Send + Sync + 'static) -> Self {
        self.on_reject = Some(Arc::new(f));
        self
    }
    /// Called for an entry dropped because the buffer was full or the client closed.
    pub fn on_drop(mut self, f: impl Fn(&Value, &IngestError) + Send + Sync + 'static) -> Self {
        self.on_drop = Some(Arc::new(f));
        self
    }

    /// Start the client (spawns its batching task: call inside a tokio runtime).
    pub fn build(self) -> Result<Client, String> {
        let http = reqwest::Client::builder()
            .timeout(self.request_timeout)
            .pool_max_idle_per_host(self.in_flight * 2)
            .build()
            .map_err(|e| e.to_string())?;
        let url = format!(
            "{}/v1/{}/entries",
            self.base.trim_end_matches('/'),
            self.source
        );
        let (tx, rx) = mpsc::channel(self.buffer_entries);
        let inner = Arc::new(Inner {
            http,
            url,
            cfg: self,
            tx: Mutex::new(Some(tx)),
            closed: AtomicBool::new(false),
            stop: CancellationToken::new(),
            closing: OnceCell::new(),
            flusher: Mutex::new(None),
        });
        let h = tokio::spawn(inner.clone().flusher(rx));
        *inner.flusher.lock().unwrap() = Some(h);
        Ok(Client { inner })
    }
}

/// A spool client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    url: String,
    cfg: ClientBuilder,
    tx: Mutex<Option<mpsc::Sender<Item>>>,
    closed: AtomicBool,
    /// Cancelled at the close deadline: unsent and unanswered entries settle Closed.
    stop: CancellationToken,
    closing: OnceCell<()>,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Where an entry's outcome arrives.
type Settled = oneshot::Receiver<Result<Receipt, IngestError>>;

/// One buffered entry.
struct Item {
    entry: Value,
    bytes: Vec<u8>,
    wait: Wait,
    done: Option<oneshot::Sender<Result<Receipt, IngestError>>>,
}

impl Item {
    fn settle(self, inner: &Inner, r: Result<Receipt, IngestError>) {
        match self.done {
            Some(tx) => {
                let _ = tx.send(r);
            }
            None => {
                if let Err(e) = r {
                    let cb = match e {
                        IngestError::BufferFull | IngestError::Closed => &inner.cfg.on_drop,
                        _ => &inner.cfg.on_reject,
                    };
                    if let Some(cb) = cb {
                        cb(&self.entry, &e);
                    }
                }
            }
        }
    }
}

/// Handles of an [`Client::ingest_batch`] call.
pub struct Receipts {
    rx: Vec<Settled>,
    got: Vec<Option<Result<Receipt, IngestError>>>,
}

impl Receipts {
    /// Whether every entry has settled.
    pub fn is_done(&mut self) -> bool {
        for (rx, slot) in self.rx.iter_mut().zip(self.got.iter_mut()) {
            if slot.is_none() {
                match rx.try_recv() {
                    Ok(r) => *slot = Some(r),
                    Err(oneshot::error::TryRecvError::Closed) => {
                        *slot = Some(Err(IngestError::Closed))
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
            }
        }
        self.got.iter().all(Option::is_some)
    }

    /// Wait until every entry settled or `deadline`: all receipts, the first
    /// terminal error, or `NotConfirmed`.
    pub async fn wait(mut self, deadline: Instant) -> Result<Vec<Receipt>, WaitError> {
        let dl = tokio::time::Instant::from_std(deadline);
        for (rx, slot) in self.rx.iter_mut().zip(self.got.iter_mut()) {
            if slot.is_none() {
                *slot = Some(match tokio::time::timeout_at(dl, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(IngestError::Closed),
                    Err(_) => return Err(WaitError::NotConfirmed),
                });
            }
        }
        self.got
            .into_iter()
            .map(|r| r.expect("filled above").map_err(WaitError::Ingest))
            .collect()
    }
}

impl Client {
    /// A builder for the server at `base_url` (e.g. `http://127.0.0.1:7070`).
    pub fn builder(base_url: &str) -> ClientBuilder {
        ClientBuilder {
            base: base_url.into(),
            source: "default".into(),
            token: None,
            max_batch_entries: 500,
            max_batch_bytes: 1 << 20,
            max_delay: Duration::ZERO,
            buffer_entries: 10_000,
            full: FullPolicy::Wait(Duration::from_secs(1)),
            request_timeout: Duration::from_secs(30),
            gzip_min_bytes: 16 << 10,
            retry_after_cap: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            in_flight: 4,
            on_reject: None,
            on_drop: None,
        }
    }

    /// Encode an entry (a JSON object) and give it an idempotency key.
    fn prepare(
        &self,
        entry: impl serde::Serialize,
        wait: Wait,
        track: bool,
    ) -> Result<(Item, Option<Settled>), IngestError> {
        let mut v = serde_json::to_value(entry).map_err(|e| IngestError::Encode(e.to_string()))?;
        let Value::Object(map) = &mut v else {
            return Err(IngestError::Encode("an entry must be a JSON object".into()));
        };
        if !map.get("idempotency_key").is_some_and(Value::is_string) {
            map.insert(
                "idempotency_key".into(),
                Value::String(Uuid::now_v7().to_string()),
            );
        }
        let bytes = serde_json::to_vec(&v).map_err(|e| IngestError::Encode(e.to_string()))?;
        let (tx, rx) = if track {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Ok((
            Item {
                entry: v,
                bytes,
                wait,
                done: tx,
            },
            rx,
        ))
    }

    async fn enqueue(&self, item: Item, deadline: Option<Instant>) {
        let inner = &self.inner;
        if item.bytes.len() + 2 > inner.cfg.max_batch_bytes {
            let e = IngestError::Rejected {
                status: 413,
                error: "payload_too_large".into(),
                message: format!(
                    "entry of {} bytes exceeds max_batch_bytes",
                    item.bytes.len()
                ),
            };
            return item.settle(inner, Err(e));
        }
        let Some(tx) = inner.tx.lock().unwrap().clone() else {
            return item.settle(inner, Err(IngestError::Closed));
        };
        let item = match tx.try_send(item) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(item)) => {
                return item.settle(inner, Err(IngestError::Closed))
            }
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        let FullPolicy::Wait(max) = inner.cfg.full else {
            return item.settle(inner, Err(IngestError::BufferFull));
        };
        let mut until = tokio::time::Instant::now() + max;
        if let Some(d) = deadline {
            until = until.min(tokio::time::Instant::from_std(d));
        }
        let reserved = tokio::time::timeout_at(until, tx.reserve()).await;
        match reserved {
            Ok(Ok(permit)) => permit.send(item),
            Ok(Err(_)) => item.settle(inner, Err(IngestError::Closed)),
            Err(_) => item.settle(inner, Err(IngestError::BufferFull)),
        }
    }

    /// Fire and forget: buffer the entry and return. An entry that cannot be
    /// encoded is an error now (nothing is sent); later problems go to the
    /// `on_reject` / `on_drop` callbacks.
    pub async fn ingest(&self, entry: impl serde::Serialize) -> Result<(), IngestError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(IngestError::Closed);
        }
        let (item, _) = self.prepare(entry, Wait::Durable, false)?;
        self.enqueue(item, None).await;
        Ok(())
    }

    /// Enqueue entries now; wait for them later with [`Receipts::wait`].
    pub async fn ingest_batch(&self, entries: Vec<impl serde::Serialize>, wait: Wait) -> Receipts {
        self.track(entries, wait, None).await
    }

    async fn track(
        &self,
        entries: Vec<impl serde::Serialize>,
        wait: Wait,
        deadline: Option<Instant>,
    ) -> Receipts {
        let mut rx = Vec::with_capacity(entries.len());
        let mut got = Vec::with_capacity(entries.len());
        let mut items = Vec::with_capacity(entries.len());
        for e in entries {
            match self.prepare(e, wait, true) {
                Ok((item, r)) => {
                    items.push(item);
                    rx.push(r.expect("tracked"));
                    got.push(None);
                }
                Err(err) => {
                    // Settled now; nothing of it is sent.
                    let (tx, r) = oneshot::channel();
                    let _ = tx.send(Err(err));
                    rx.push(r);
                    got.push(None);
                }
            }
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            for i in items {
                i.settle(&self.inner, Err(IngestError::Closed));
            }
        } else {
            for i in items {
                self.enqueue(i, deadline).await;
            }
        }
        Receipts { rx, got }
    }

    /// Send entries and wait until the server answered `wait` for every one, or
    /// `deadline` passed (`NotConfirmed`). Concurrent callers share batches.
    pub async fn ingest_sync(
        &self,
        entries: Vec<impl serde::Serialize>,
        wait: Wait,
        deadline: Instant,
    ) -> Result<Vec<Receipt>, WaitError> {
        if Instant::now() >= deadline {
            return Err(WaitError::NotConfirmed);
        }
        self.track(entries, wait, Some(deadline))
            .await
            .wait(deadline)
            .await
    }

    /// Stop accepting, flush what is buffered and wait for answers until
    /// `deadline`; what is still unsettled then settles `Closed`. Idempotent.
    pub async fn close(&self, deadline: Instant) {
        let inner = self.inner.clone();
        self.inner
            .closing
            .get_or_init(|| async move {
                inner.closed.store(true, Ordering::SeqCst);
                inner.tx.lock().unwrap().take(); // the flusher drains, then ends
                let h = inner.flusher.lock().unwrap().take();
                if let Some(mut h) = h {
                    let dl = tokio::time::Instant::from_std(deadline);
                    if tokio::time::timeout_at(dl, &mut h).await.is_err() {
                        inner.stop.cancel();
                        let _ = h.await;
                    }
                }
            })
            .await;
    }
}

impl Inner {
    /// Gather items into batches (count, bytes, time, one wait mode per batch)
    /// and send them, up to `in_flight` requests at once.
    async fn flusher(self: Arc<Self>, mut rx: mpsc::Receiver<Item>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.cfg.in_flight));
        let mut sends = tokio::task::JoinSet::new();
        let mut carry: Option<Item> = None;
        loop {
            let first = match carry.take() {
                Some(i) => i,
                None => match rx.recv().await {
                    Some(i) => i,
                    None => break,
                },
            };
            let mode = first.wait;
            let mut size = first.bytes.len() + 2;
            let mut batch = vec![first];
            let until = tokio::time::Instant::now() + self.cfg.max_delay;
            // Gather until the batch is full, or `max_delay` has passed and a
            // request slot is free. While every slot is busy the batch keeps
            // growing, so batches are small when the server keeps up and large
            // when it does not.
            let mut permit = None;
            while batch.len() < self.cfg.max_batch_entries {
                let lingering = tokio::time::Instant::now() < until;
                let next = tokio::select! {
                    biased;
                    i = rx.recv() => i,
                    p = slots.clone().acquire_owned(), if !lingering => {
                        permit = Some(p.expect("never closed"));
                        break;
                    }
                    _ = tokio::time::sleep_until(until), if lingering => continue,
                };
                let Some(i) = next else { break };
                if i.wait != mode || size + i.bytes.len() + 1 > self.cfg.max_batch_bytes {
                    carry = Some(i);
                    break;
                }
                size += i.bytes.len() + 1;
                batch.push(i);
            }
            let permit = match permit {
                Some(p) => p,
                None => slots.clone().acquire_owned().await.expect("never closed"),
            };
            let me = self.clone();
            sends.spawn(async move {
                me.send(batch, mode).await;
                drop(permit);
            });
            while sends.try_join_next().is_some() {}
        }
        while sends.join_next().await.is_some() {}
    }

    fn body(&self, batch: &[Item]) -> (Vec<u8>, bool) {
        let mut body =
            Vec::with_capacity(batch.iter().map(|i| i.bytes.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (k, i) in batch.iter().enumerate() {
            if k > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&i.bytes);
        }
        body.push(b']');
        if body.len() < self.cfg.gzip_min_bytes {
            return (body, false);
        }
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        match gz.write_all(&body).and_then(|_| gz.finish()) {
            Ok(z) => (z, true),
            Err(_) => (body, false),
        }
    }

    /// Send one batch until every item settled (or the client stops).
    async fn send(&self, batch: Vec<Item>, mode: Wait) {
        let mut work = vec![batch];
        while let Some(batch) = work.pop() {
            let mut attempt = 0u32;
            loop {
                if self.stop.is_cancelled() {
                    for i in batch {
                        i.settle(self, Err(IngestError::Closed));
                    }
                    break;
                }
                let (body, gz) = self.body(&batch);
                let mut req = self
                    .http
                    .post(&self.url)
                    .header("content-type", "application/json")
                    .body(body);
                if gz {
                    req = req.header("content-encoding", "gzip");
                }
                if mode == Wait::Delivered {
                    req = req.query(&WriteParams {
                        wait: mode,
                        timeout_ms: Some(5000),
                    });
                }
                if let Some(t) = &self.cfg.token {
                    req = req.bearer_auth(t);
                }
                // The whole exchange (answer and body) races the close deadline.
                let exchange = async {
                    let resp = req.send().await.ok()?;
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let bytes = resp.bytes().await.ok()?;
                    Some((status, retry_after, bytes))
                };
                let answer = tokio::select! {
                    a = exchange => a,
                    _ = self.stop.cancelled() => continue,
                };
                let delay = match answer {
                    // Connection error, timeout, or a body cut short: resend (the keys dedupe).
                    None => self.backoff(attempt),
                    Some((status, retry_after, bytes)) => {
                        match status {
                            200 | 202 => match self.settle_answers(batch, mode, &bytes) {
                                None => break,
                                Some(rest) => {
                                    // wait=delivered timed out server-side: ask again (the keys dedupe).
                                    work.push(rest);
                                    break;
                                }
                            },
                            413 if batch.len() > 1 => {
                                let mut left = batch;
                                let right = left.split_off(left.len() / 2);
                                work.push(right);
                                work.push(left);
                                break;
                            }
                            429 | 503 => retry_after
                                .unwrap_or(Duration::from_secs(1))
                                .min(self.cfg.retry_after_cap),
                            400..=499 => {
                                let body = serde_json::from_slice::<ErrorBody>(&bytes).ok();
                                let e = IngestError::Rejected {
                                    status,
                                    error: body.as_ref().map_or("", |b| &b.error).into(),
                                    message: body.as_ref().map_or("", |b| &b.message).into(),
                                };
                                for i in batch {
                                    i.settle(self, Err(e.clone()));
                                }
                                break;
                            }
                            _ => self.backoff(attempt),
                        }
                    }
                };
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.stop.cancelled() => {}
                }
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .cfg
            .backoff_initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cfg.backoff_max);
        ceiling.mul_f64(rand::random::<f64>())
    }

    /// Settle items from a 200/202 answer; returns the items still in flight
    /// (wait=delivered answered "durable") to ask about again.
    fn settle_answers(&self, batch: Vec<Item>, mode: Wait, body: &[u8]) -> Option<Vec<Item>> {
        let answers = serde_json::from_slice::<WriteAnswer>(body)
            .map(|a| a.entries)
            .unwrap_or_default();
        let mut again = Vec::new();
        for (k, item) in batch.into_iter().enumerate() {
            match answers.get(k) {
                Some(EntryAnswer {
                    status: EntryState::Failed,
                    reason,
                    ..
                }) => {
                    let reason = reason.clone().unwrap_or_else(|| "failed".into());
                    item.settle(self, Err(IngestError::Failed { reason }));
                }
                // Not confirmed delivered (a state this client does not know
                // is not a confirmation): ask again.
                Some(EntryAnswer {
                    status: EntryState::Durable | EntryState::Unknown,
                    ..
                }) if mode == Wait::Delivered => again.push(item),
                Some(a) => {
                    let status = match a.status {
                        EntryState::Durable => "durable",
                        EntryState::Delivered => "delivered",
                        EntryState::Failed => "failed",
                        EntryState::Unknown => "unknown",
                    };
                    item.settle(
                        self,
                        Ok(Receipt {
                            id: a.id,
                            lsn: a.lsn,
                            status: status.into(),
                        }),
                    );
                }
                None => item.settle(
                    self,
                    Err(IngestError::Rejected {
                        status: 200,
                        error: "bad_answer".into(),
                        message: format!("the server's answer has no entry {k}"),
                    }),
                ),
            }
        }
        (!again.is_empty()).then_some(again)
    }
}
