//! The HTTP API of SPEC "HTTP API (v1)": write, read, operations, admin.
//!
//! `error` (the one error answer), `auth` (tokens), `body` (bounded reading,
//! gzip, prescan, splitting), `ingest` (the write route), `read` (reads),
//! `probes` (health, readiness, metrics), `admin` (dead letters, stats).
//!
//! Invariants:
//! - A write is all-or-nothing: the whole body is read (bounded), decoded,
//!   parsed and every entry validated before the engine sees any of it.
//! - Errors are `{"error","message"}` (+ `retry_after_seconds` and `Retry-After`
//!   for 429/503). A WAL that cannot write is a 503, never a 500.
//! - A source's data is only reachable with that source's token; tokens are
//!   compared in constant time.

mod admin;
mod auth;
mod body;
mod error;
mod guard;
mod ingest;
pub mod mcp;
mod memory;
mod probes;
mod read;

pub use body::{gunzip, parse_entries, BodyRules, ParsedEntry};
pub use error::ApiError;

use crate::config::Config;
use crate::metrics::Metrics;
use admin::*;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use body::*;
use error::*;
use guard::HostGuard;
use ingest::*;
use memory::*;
use probes::*;
use read::*;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use spool_destination::{DestinationError, Embedding, Field, Query as DestQuery};
use spool_queue::{DlqOutcome, Engine, EntryStatus, IngestError, Outcome, Select};
use spool_wal::Entry;
use spool_wire::{
    DeadLetterAnswer, DeadLetterParams, DeadLetterSelect, DeadLetters, EntryAnswer, EntryState,
    ErrorBody, ForgetAnswer, ForgetRequest, SearchAnswer, SearchRequest, Wait, WriteAnswer,
    WriteParams,
};
use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// Longest `subject` / `idempotency_key` accepted, bytes.
const MAX_FIELD_BYTES: usize = 1024;

/// What every handler shares: the engine (the one door to the WAL and the
/// destinations), the configuration, metrics and the sources' tokens and limits.
pub struct App {
    /// The delivery engine.
    pub engine: Engine,
    /// The configuration served.
    pub cfg: Config,
    /// Metrics (also the engine's observer).
    pub metrics: Arc<Metrics>,
    sources: HashMap<String, Source>,
    /// Shutdown began: new requests get 503.
    pub closing: AtomicBool,
    started: Instant,
    /// Browser safety, while anything is reachable without a token.
    guard: Option<HostGuard>,
    /// Requests being handled (`server.max_in_flight`).
    in_flight: Arc<tokio::sync::Semaphore>,
}

pub(crate) struct Source {
    token: Option<String>,
    destination: String,
    /// Its destination refuses NUL in text (Postgres).
    no_nul: bool,
    limiter: Option<Mutex<Bucket>>,
    /// Length of its embeddings, if it takes them.
    embedding_dims: Option<usize>,
}

/// Token bucket: `rate` entries/s, bursts of one second's worth; a call larger
/// than the burst may go into debt once the bucket is full.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn take(&mut self, n: usize) -> Result<(), u64> {
        let now = Instant::now();
        let cap = self.rate.max(1.0);
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(cap);
        self.last = now;
        let need = (n as f64).min(cap);
        if self.tokens >= need {
            self.tokens -= n as f64;
            Ok(())
        } else {
            Err(((need - self.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

impl App {
    /// The shared state of a router over `engine`.
    pub fn new(engine: Engine, cfg: Config, metrics: Arc<Metrics>) -> App {
        let sources =
            cfg.sources
                .iter()
                .map(|s| {
                    let destination = s.destination.clone().unwrap_or_default();
                    let no_nul = cfg.destinations.iter().any(|d| {
                        d.name == destination && d.kind == spool_destination::Kind::Postgres
                    });
                    let src = Source {
                        token: s.token.clone(),
                        destination,
                        no_nul,
                        embedding_dims: s.embedding_dims,
                        limiter: s.rate_limit.map(|rate| {
                            Mutex::new(Bucket {
                                rate,
                                tokens: rate.max(1.0),
                                last: Instant::now(),
                            })
                        }),
                    };
                    (s.name.clone(), src)
                })
                .collect();
        App {
            engine,
            guard: HostGuard::new(&cfg),
            in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.server.max_in_flight)),
            cfg,
            metrics,
            sources,
            closing: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// Requests being handled now (probes past `server.max_in_flight` aside).
    pub fn in_flight(&self) -> usize {
        self.cfg.server.max_in_flight - self.in_flight.available_permits()
    }
}

/// The whole HTTP API as an axum router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/{source}/entries", post(write).get(read))
        .route("/v1/{source}/entries/{id}", get(get_one).delete(forget_one))
        .route("/v1/{source}/forget", post(forget))
        .route("/v1/{source}/search", post(search))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/admin/dead-letters", get(dead_letters))
        .route("/v1/admin/dead-letters/requeue", post(requeue))
        .route("/v1/admin/dead-letters/purge", post(purge))
        .route("/v1/admin/stats", get(stats))
        .nest_service(
            "/mcp",
            tower::ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(app.clone(), mcp::admit))
                .service(mcp::service(app.clone())),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(middleware::from_fn_with_state(app.clone(), track))
        .with_state(app)
}

/// Count and log (debug) every request by route and code; refuse new work while
/// shutting down, past `server.max_in_flight`, and — while anything is reachable
/// without a token — from a foreign `Host` or a cross-site `Origin`.
async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let (start, method) = (Instant::now(), req.method().clone());
    let route = if req.uri().path().starts_with("/mcp") {
        // A nested service's tail has no matched path of its own.
        "/mcp".to_owned()
    } else {
        req.extensions()
            .get::<MatchedPath>()
            .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned())
    };
    let ops = matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics");
    // Everything but reads: writes, forgets, searches (a POST too) and admin.
    let guarded_route = route.starts_with("/v1/admin/")
        || route.starts_with("/mcp")
        || (route.starts_with("/v1/{source}/") && method != axum::http::Method::GET);
    let resp = if app.closing.load(Ordering::SeqCst) && !ops {
        ApiError::unavailable("shutting down").into_response()
    } else if let Some(Err(e)) = app
        .guard
        .as_ref()
        .map(|g| g.check(req.headers(), guarded_route))
    {
        e.into_response()
    } else {
        match app.in_flight.clone().try_acquire_owned() {
            Ok(_permit) => next.run(req).await,
            Err(_) if ops => next.run(req).await,
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "{} requests are in flight (server.max_in_flight); retry shortly",
                    app.cfg.server.max_in_flight
                ),
            )
            .retry(1)
            .into_response(),
        }
    };
    let code = resp.status().as_u16();
    app.metrics.http_request(&route, code);
    tracing::debug!(%method, route, code, latency_us = start.elapsed().as_micros() as u64, "request");
    resp
}
