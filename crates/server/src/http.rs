//! The HTTP API of SPEC "HTTP API (v1)": write, read, operations, admin.
//!
//! Invariants:
//! - A write is all-or-nothing: the whole body is read (bounded), decoded,
//!   parsed and every entry validated before the engine sees any of it.
//! - Errors are `{"error","message"}` (+ `retry_after_seconds` and `Retry-After`
//!   for 429/503). A WAL that cannot write is a 503, never a 500.
//! - A source's data is only reachable with that source's token; tokens are
//!   compared in constant time.

use crate::config::Config;
use crate::metrics::Metrics;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use spool_destination::{DestinationError, Query as DestQuery};
use spool_queue::{DlqOutcome, Engine, EntryStatus, IngestError, Outcome, Select};
use spool_wal::Entry;
use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// Longest a client may take to send a request body (slow-body guard).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest `subject` / `idempotency_key` accepted, bytes.
const MAX_FIELD_BYTES: usize = 1024;

pub struct App {
    pub engine: Engine,
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    sources: HashMap<String, Source>,
    /// Shutdown began: new requests get 503.
    pub closing: AtomicBool,
    started: Instant,
}

struct Source {
    token: Option<String>,
    destination: String,
    limiter: Option<Mutex<Bucket>>,
}

/// Token bucket: `rate` entries/s, bursts of one second's worth; a call larger
/// than the burst may go into debt once the bucket is full.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, n: usize) -> Result<(), u64> {
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

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    fn retry(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs.max(1));
        self
    }
    fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    fn too_large(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    fn unavailable(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry(5)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some(s) = self.retry_after {
            body["retry_after_seconds"] = json!(s);
        }
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl App {
    pub fn new(engine: Engine, cfg: Config, metrics: Arc<Metrics>) -> App {
        let sources = cfg
            .sources
            .iter()
            .map(|s| {
                let src = Source {
                    token: s.token.clone(),
                    destination: s.destination.clone().unwrap_or_default(),
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
            cfg,
            metrics,
            sources,
            closing: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    fn source(&self, name: &str) -> ApiResult<&Source> {
        self.sources.get(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_source",
                format!("no source named {name:?}"),
            )
        })
    }

    /// The caller may use `src`: its token, or any caller when it has none.
    fn authorize(&self, src: &Source, headers: &HeaderMap) -> ApiResult<()> {
        let Some(expected) = &src.token else {
            return Ok(());
        };
        let Some(given) = bearer(headers) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this source needs `Authorization: Bearer <token>`",
            ));
        };
        if ct_eq(given, expected) {
            return Ok(());
        }
        let other = self
            .sources
            .values()
            .filter_map(|s| s.token.as_deref())
            .any(|t| ct_eq(given, t));
        if other {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token belongs to another source",
            ))
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "invalid token",
            ))
        }
    }

    fn authorize_admin(&self, headers: &HeaderMap) -> ApiResult<()> {
        match &self.cfg.server.admin_token {
            None if self.cfg.server.listen.ip().is_loopback() => Ok(()),
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the admin API needs server.admin_token when listening beyond loopback",
            )),
            Some(t) => match bearer(headers) {
                Some(g) if ct_eq(g, t) => Ok(()),
                Some(_) => Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "not the admin token",
                )),
                None => Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the admin API needs `Authorization: Bearer <admin token>`",
                )),
            },
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/{source}/entries", post(write).get(read))
        .route("/v1/{source}/entries/{id}", get(get_one))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/admin/dead-letters", get(dead_letters))
        .route("/v1/admin/dead-letters/requeue", post(requeue))
        .route("/v1/admin/dead-letters/purge", post(purge))
        .route("/v1/admin/stats", get(stats))
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
/// shutting down.
async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let (start, method) = (Instant::now(), req.method().clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let ops = matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics");
    let resp = if app.closing.load(Ordering::SeqCst) && !ops {
        ApiError::unavailable("shutting down").into_response()
    } else {
        next.run(req).await
    };
    let code = resp.status().as_u16();
    app.metrics.http_request(&route, code);
    tracing::debug!(%method, route, code, latency_us = start.elapsed().as_micros() as u64, "request");
    resp
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    subject: Option<Value>,
    #[serde(default)]
    idempotency_key: Option<Value>,
}

/// `Some(string)` / `None` for a JSON string / null-or-absent field, else an error.
fn string_field(v: Option<Value>, name: &str, at: &str) -> ApiResult<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_FIELD_BYTES => Ok(Some(s)),
        Some(Value::String(_)) => Err(ApiError::bad(
            "invalid_entry",
            format!("{at}: `{name}` is longer than {MAX_FIELD_BYTES} bytes"),
        )),
        Some(_) => Err(ApiError::bad(
            "invalid_entry",
            format!("{at}: `{name}` must be a string"),
        )),
    }
}

fn json_error(e: &serde_json::Error, line_offset: usize) -> ApiError {
    let line = e.line() + line_offset;
    ApiError::bad(
        "invalid_json",
        format!("invalid JSON at line {line}, column {}: {e}", e.column()),
    )
}

/// Deepest JSON nesting accepted (the array around entries counts).
const MAX_DEPTH: usize = 64;

/// One linear pass before any parser sees the body: refuse nesting deeper than
/// [`MAX_DEPTH`] (a recursive parser would overflow its stack) and more than
/// `max_entries` entries (parsing a million tiny entries only to refuse them costs
/// memory in proportion). Entries are counted as top-level array elements (commas
/// at depth 1) or non-blank NDJSON lines.
fn prescan(body: &[u8], ndjson: bool, max_entries: usize) -> ApiResult<()> {
    let (mut depth, mut in_str, mut esc, mut line) = (0usize, false, false, 1usize);
    let mut entries = 0usize;
    let mut line_counted = false;
    let mut top_array = false;
    let too_many = || {
        ApiError::too_large(format!(
            "more than {max_entries} entries in one request; limits.max_entries_per_request is {max_entries}"
        ))
    };
    for &b in body {
        if ndjson && !line_counted && !b.is_ascii_whitespace() {
            line_counted = true;
            entries += 1;
            if entries > max_entries {
                return Err(too_many());
            }
        }
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                if depth == 0 {
                    top_array = b == b'[';
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(ApiError::bad(
                        "invalid_json",
                        format!(
                            "invalid JSON at line {line}: nesting deeper than {MAX_DEPTH} levels"
                        ),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if !ndjson && depth == 1 && top_array => {
                // A separator of the top-level array: one more entry.
                entries += 1;
                if entries + 1 > max_entries {
                    return Err(too_many());
                }
            }
            b'\n' => {
                line += 1;
                if ndjson {
                    depth = 0; // every NDJSON line is a document of its own
                    line_counted = false;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Decode the body into the raw JSON text of each entry.
fn split_entries(
    body: &[u8],
    ndjson: bool,
    max_entries: usize,
) -> ApiResult<Vec<(&RawValue, String)>> {
    prescan(body, ndjson, max_entries)?;
    if ndjson {
        let mut out = Vec::new();
        for (i, line) in body.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let raw: &RawValue = serde_json::from_slice(line).map_err(|e| json_error(&e, i))?;
            out.push((raw, format!("line {}", i + 1)));
        }
        return Ok(out);
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| json_error(&e, 0))?;
        Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, r)| (r, format!("entry {i}")))
            .collect())
    } else {
        let raw: &RawValue = serde_json::from_slice(body).map_err(|e| json_error(&e, 0))?;
        Ok(vec![(raw, "entry 0".to_owned())])
    }
}

/// Read the request body, bounded by `limit` before and after gzip.
async fn read_body(headers: &HeaderMap, body: Body, limit: u64) -> ApiResult<Vec<u8>> {
    let too_large = || {
        ApiError::too_large(format!(
            "request body exceeds server.max_body_bytes ({limit} bytes)"
        ))
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    let read = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, limit as usize),
    );
    let raw = read
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the body did not arrive within {}s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::bad("invalid_request", format!("could not read the body: {e}"))
            }
        })?;
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity") | Some("") => Ok(raw.to_vec()),
        Some("gzip") | Some("x-gzip") => {
            let mut out = Vec::new();
            let mut dec = flate2::read::GzDecoder::new(&raw[..]).take(limit + 1);
            dec.read_to_end(&mut out).map_err(|e| {
                ApiError::bad("invalid_request", format!("body is not valid gzip: {e}"))
            })?;
            if out.len() as u64 > limit {
                return Err(ApiError::too_large(format!(
                    "decompressed body exceeds server.max_body_bytes ({limit} bytes)"
                )));
            }
            Ok(out)
        }
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Encoding {other:?} is not supported (use gzip or none)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_with_offsets_and_as_unix_seconds() {
        let z = parse_time("since", "2026-01-02T03:04:05Z").unwrap();
        assert_eq!(parse_time("since", "2026-01-02T05:04:05+02:00").unwrap(), z);
        assert_eq!(parse_time("since", "1767323045").unwrap(), z);
        assert_eq!(
            parse_time("since", "2026-01-02T03:04:05.5Z").unwrap(),
            z + 500_000
        );
        assert!(parse_time("since", "yesterday").is_err());
    }

    #[test]
    fn nesting_is_bounded_whatever_the_layout() {
        let deep = |n: usize, sep: &str| {
            format!("{}{}", "[".repeat(n), "]".repeat(n)).replace('[', &format!("[{sep}"))
        };
        let check_depth = |b: &[u8], nd: bool| prescan(b, nd, usize::MAX);
        assert!(check_depth(deep(MAX_DEPTH, "").as_bytes(), false).is_ok());
        assert!(check_depth(deep(MAX_DEPTH + 1, "").as_bytes(), false).is_err());
        assert!(
            check_depth(deep(MAX_DEPTH + 1, "\n").as_bytes(), false).is_err(),
            "newlines must not reset depth"
        );
        assert!(check_depth(br#"{"s":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}"#, false).is_ok());
        let lines = format!("{}\n", deep(MAX_DEPTH, "")).repeat(3);
        assert!(check_depth(lines.as_bytes(), true).is_ok());
    }

    #[test]
    fn too_many_entries_are_refused_by_the_prescan_exactly_at_the_limit() {
        let array = |n: usize| format!("[{}]", vec![r#"{"a":[1,2],"s":","}"#; n].join(","));
        assert!(prescan(array(3).as_bytes(), false, 3).is_ok());
        assert_eq!(
            prescan(array(4).as_bytes(), false, 3)
                .unwrap_err()
                .status
                .as_u16(),
            413
        );
        assert!(prescan(br#"{"a":1,"b":2,"c":3,"d":4}"#, false, 1).is_ok());
        let nd = |n: usize| format!("\n{}\n  \n", vec![r#"{"a":1,"b":2}"#; n].join("\n"));
        assert!(prescan(nd(3).as_bytes(), true, 3).is_ok());
        assert_eq!(
            prescan(nd(4).as_bytes(), true, 3)
                .unwrap_err()
                .status
                .as_u16(),
            413
        );
    }
}

#[derive(Serialize)]
struct EntryAnswer {
    id: Uuid,
    lsn: u64,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

fn query_params(
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<HashMap<String, String>> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::bad("invalid_request", format!("bad query string: {e}")))
}

async fn write(
    State(app): State<Arc<App>>,
    Path(source): Path<String>,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let src = app.source(&source)?;
    app.authorize(src, &headers)?;
    let params = query_params(q)?;
    let wait_delivered = match params.get("wait").map(String::as_str) {
        None | Some("durable") => false,
        Some("delivered") => true,
        Some(w) => {
            return Err(ApiError::bad(
                "invalid_request",
                format!("wait must be durable or delivered, got {w:?}"),
            ))
        }
    };
    let timeout = match params.get("timeout_ms") {
        None => Duration::from_millis(5000),
        Some(t) => Duration::from_millis(
            t.parse::<u64>()
                .map_err(|_| {
                    ApiError::bad(
                        "invalid_request",
                        format!("timeout_ms must be a number of milliseconds, got {t:?}"),
                    )
                })?
                .min(60_000),
        ),
    };
    let ndjson = match headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?"))
    {
        None => false,
        Some(ct) => {
            let mime = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            match mime.as_str() {
                "application/json" => false,
                "application/x-ndjson" | "application/ndjson" | "application/jsonl" => true,
                _ => {
                    return Err(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported_media_type",
                        format!("Content-Type {ct:?} is not supported (use application/json or application/x-ndjson)"),
                    ))
                }
            }
        }
    };
    let body = read_body(&headers, body, app.cfg.server.max_body_bytes).await?;
    let limits = &app.cfg.limits;
    let raws = split_entries(&body, ndjson, limits.max_entries_per_request)?;
    if raws.is_empty() {
        return Err(ApiError::bad(
            "invalid_entry",
            "the request holds no entries",
        ));
    }
    let header_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str().map(str::to_owned).map_err(|_| {
                ApiError::bad("invalid_request", "Idempotency-Key must be visible ASCII")
            })
        })
        .transpose()?;
    if header_key.is_some() && raws.len() != 1 {
        return Err(ApiError::bad(
            "invalid_request",
            "the Idempotency-Key header is for one-entry requests; put `idempotency_key` in each entry",
        ));
    }
    if header_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > MAX_FIELD_BYTES)
    {
        return Err(ApiError::bad(
            "invalid_request",
            format!("Idempotency-Key must be 1-{MAX_FIELD_BYTES} bytes"),
        ));
    }
    let now = spool_wal::now_us();
    let mut entries = Vec::with_capacity(raws.len());
    for (raw, at) in raws {
        let text = raw.get();
        if text.len() as u64 > limits.max_entry_bytes {
            return Err(ApiError::too_large(format!(
                "{at} is {} bytes; limits.max_entry_bytes is {}",
                text.len(),
                limits.max_entry_bytes
            )));
        }
        if !text.starts_with('{') {
            return Err(ApiError::bad(
                "invalid_entry",
                format!("{at}: an entry must be a JSON object"),
            ));
        }
        let probe: Probe = serde_json::from_str(text)
            .map_err(|e| ApiError::bad("invalid_entry", format!("{at}: {e}")))?;
        let subject = string_field(probe.subject, "subject", &at)?;
        let key =
            string_field(probe.idempotency_key, "idempotency_key", &at)?.or(header_key.clone());
        if key.as_deref() == Some("") {
            return Err(ApiError::bad(
                "invalid_entry",
                format!("{at}: `idempotency_key` must not be empty"),
            ));
        }
        entries.push(Entry {
            id: Uuid::now_v7(),
            source: source.clone(),
            destination: src.destination.clone(),
            subject,
            idempotency_key: key,
            accepted_at_us: now,
            payload: text.as_bytes().to_vec(),
        });
    }
    if let Some(l) = &src.limiter {
        l.lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(entries.len())
            .map_err(|secs| {
                spool_queue::EngineObserver::shed(&*app.metrics, &source, entries.len() as u64);
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("source {source:?} is over its rate_limit"),
                )
                .retry(secs)
            })?;
    }
    let receipt =
        match app.engine.ingest(entries, wait_delivered).await {
            Ok(r) => r,
            Err(IngestError::Full { retry_after, .. }) => {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    "the delivery queue is full; nothing was written",
                )
                .retry(retry_after.as_secs()))
            }
            Err(IngestError::Closed) => return Err(ApiError::unavailable("shutting down")),
            Err(IngestError::LowDisk { .. }) => return Err(ApiError::unavailable(
                "free disk space under the WAL is below wal.min_free_bytes; nothing was written",
            )),
            Err(IngestError::Wal(e)) => {
                tracing::error!(error = %e, "WAL append failed");
                let msg = if e.is_out_of_space() {
                    "the WAL's disk is full; nothing was written".to_owned()
                } else {
                    format!("the WAL cannot write; nothing was written ({e})")
                };
                return Err(ApiError::unavailable(msg));
            }
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    e.to_string(),
                ));
            }
        };
    let replayed = receipt.any_replayed();
    let accepted = receipt.accepted.clone();
    let (status, answers) = if wait_delivered {
        let outcomes = receipt.wait(timeout).await;
        let done = outcomes.iter().all(|o| *o != Outcome::Pending);
        let answers = accepted
            .iter()
            .zip(outcomes)
            .map(|(a, o)| {
                let (status, reason) = match o {
                    Outcome::Delivered => ("delivered", None),
                    Outcome::Failed { reason } => ("failed", Some(reason)),
                    Outcome::Pending => ("durable", None),
                };
                EntryAnswer {
                    id: a.id,
                    lsn: a.lsn,
                    status,
                    reason,
                }
            })
            .collect::<Vec<_>>();
        (
            if done {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            },
            answers,
        )
    } else {
        let answers = accepted
            .iter()
            .map(|a| {
                let (status, reason) = if a.replayed {
                    current_status(&app.engine, a.lsn)
                } else {
                    ("durable", None)
                };
                EntryAnswer {
                    id: a.id,
                    lsn: a.lsn,
                    status,
                    reason,
                }
            })
            .collect();
        (StatusCode::ACCEPTED, answers)
    };
    let mut resp = (status, Json(json!({ "entries": answers }))).into_response();
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Status of an accepted entry: tracked by the WAL (pending, dead, purged) or delivered.
fn current_status(engine: &Engine, lsn: u64) -> (&'static str, Option<String>) {
    match engine.status(lsn) {
        Some(EntryStatus::Failed { reason, .. }) => ("failed", Some(reason)),
        Some(EntryStatus::Purged) => ("failed", Some(spool_queue::PURGED.to_owned())),
        Some(EntryStatus::Pending) => ("durable", None),
        Some(EntryStatus::Delivered { .. }) | None => ("delivered", None),
    }
}

fn rfc3339(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// RFC 3339 time, or a number of seconds since the Unix epoch, to µs.
fn parse_time(name: &str, v: &str) -> ApiResult<i64> {
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs.abs() < 1e13 {
            return Ok((secs * 1e6) as i64);
        }
    }
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).map_err(|_| {
        ApiError::bad(
            "invalid_request",
            format!("{name} must be an RFC 3339 time (like 2026-01-02T03:04:05Z or +02:00) or Unix seconds, got {v:?}"),
        )
    })?;
    Ok(i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX))
}

fn stored_json(e: &spool_destination::StoredEntry) -> Value {
    let payload: Value = serde_json::from_slice(&e.entry.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.entry.payload).into_owned()));
    json!({
        "id": e.entry.id,
        "lsn": e.lsn,
        "subject": e.entry.subject,
        "payload": payload,
        "created_at": rfc3339(e.entry.accepted_at_us),
    })
}

fn dest_error(e: DestinationError) -> ApiError {
    match e {
        DestinationError::InvalidQuery(m) => ApiError::bad("invalid_request", m),
        e if e.is_transient() => ApiError::unavailable(format!("destination unavailable: {e}")),
        e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

async fn read(
    State(app): State<Arc<App>>,
    Path(source): Path<String>,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let src = app.source(&source)?;
    app.authorize(src, &headers)?;
    let p = query_params(q)?;
    let limit = match p.get("limit") {
        None => 50,
        Some(l) => match l.parse::<u32>() {
            Ok(n) if n >= 1 => n.min(1000),
            _ => {
                return Err(ApiError::bad(
                    "invalid_request",
                    format!("limit must be 1-1000, got {l:?}"),
                ))
            }
        },
    };
    let query = DestQuery {
        source: source.clone(),
        subject: p.get("subject").cloned(),
        q: p.get("q").filter(|s| !s.trim().is_empty()).cloned(),
        since_us: p.get("since").map(|v| parse_time("since", v)).transpose()?,
        until_us: p.get("until").map(|v| parse_time("until", v)).transpose()?,
        limit,
        cursor: p.get("cursor").filter(|s| !s.is_empty()).cloned(),
    };
    let page = app
        .engine
        .query(&src.destination, &query)
        .await
        .map_err(dest_error)?;
    let entries: Vec<Value> = page.entries.iter().map(stored_json).collect();
    Ok(Json(json!({"entries": entries, "next_cursor": page.next_cursor})).into_response())
}

async fn get_one(
    State(app): State<Arc<App>>,
    Path((source, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let src = app.source(&source)?;
    app.authorize(src, &headers)?;
    let missing = || ApiError::not_found(format!("no entry {id} in source {source:?}"));
    let uuid = Uuid::parse_str(&id).map_err(|_| missing())?;
    let found = app
        .engine
        .get(&source, &src.destination, uuid)
        .await
        .map_err(dest_error)?
        .ok_or_else(missing)?;
    let stored = spool_destination::StoredEntry {
        lsn: found.lsn,
        entry: found.entry,
        delivered_at_us: 0,
    };
    let mut out = stored_json(&stored);
    match found.status {
        EntryStatus::Pending => out["status"] = json!("pending"),
        EntryStatus::Failed { attempts, reason } => {
            out["status"] = json!("failed");
            out["reason"] = json!(reason);
            out["attempts"] = json!(attempts);
        }
        EntryStatus::Delivered { delivered_at_us } => {
            out["status"] = json!("delivered");
            out["delivered_at"] = json!(rfc3339(delivered_at_us));
        }
        // `get` finds a purged entry in neither place.
        EntryStatus::Purged => return Err(missing()),
    }
    Ok(Json(out).into_response())
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let mut check = |name: String, result: Result<(), String>| {
        ready &= result.is_ok();
        checks.insert(name, json!(result.err().unwrap_or_else(|| "ok".into())));
    };
    check(
        "shutdown".into(),
        if app.closing.load(Ordering::SeqCst) {
            Err("shutting down".into())
        } else {
            Ok(())
        },
    );
    for (name, result) in app.engine.readiness().await {
        check(name, result);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if ready {"ready"} else {"unready"}, "checks": checks})),
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let body = app.metrics.render(&app.engine);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn dead_letters(
    State(app): State<Arc<App>>,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    app.authorize_admin(&headers)?;
    let p = query_params(q)?;
    let limit = match p.get("limit") {
        None => 100,
        Some(l) => l.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::bad(
                "invalid_request",
                format!("limit must be a positive number, got {l:?}"),
            )
        })?,
    };
    let list: Vec<Value> = app
        .engine
        .dead_letters(p.get("source").map(String::as_str), limit)
        .into_iter()
        .map(|d| {
            json!({"id": d.id, "lsn": d.lsn, "source": d.source, "destination": d.destination,
                   "attempts": d.attempts, "reason": d.reason})
        })
        .collect();
    Ok(Json(json!({"dead_letters": list})).into_response())
}

/// Body of requeue and purge: `{"ids":[...]}` or `{"all":true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqBody {
    #[serde(default)]
    ids: Option<Vec<Uuid>>,
    #[serde(default)]
    all: bool,
}

/// Read a requeue/purge body and run `op` on the dead letters it selects.
async fn dlq_op<F, Fut>(app: &App, headers: &HeaderMap, body: Body, op: F) -> ApiResult<DlqOutcome>
where
    F: FnOnce(Engine, Option<Vec<Uuid>>) -> Fut,
    Fut: std::future::Future<Output = Result<DlqOutcome, spool_wal::WalError>>,
{
    app.authorize_admin(headers)?;
    let raw = read_body(headers, body, 16 << 20).await?;
    let b: DlqBody = serde_json::from_slice(&raw).map_err(|e| {
        ApiError::bad(
            "invalid_request",
            format!("body must be {{\"ids\":[...]}} or {{\"all\":true}}: {e}"),
        )
    })?;
    let ids = match (b.all, b.ids) {
        (true, None) => None,
        (false, Some(ids)) => Some(ids),
        _ => {
            return Err(ApiError::bad(
                "invalid_request",
                "give exactly one of `ids` or `all: true`",
            ))
        }
    };
    op(app.engine.clone(), ids)
        .await
        .map_err(|e| ApiError::unavailable(format!("the WAL cannot write: {e}")))
}

fn select(ids: &Option<Vec<Uuid>>) -> Select<'_> {
    ids.as_deref().map_or(Select::All, Select::Ids)
}

async fn requeue(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let out = dlq_op(&app, &headers, body, |engine, ids| async move {
        engine.requeue(select(&ids)).await
    })
    .await?;
    let ids: Vec<Uuid> = out.done.iter().map(|d| d.id).collect();
    Ok(
        Json(json!({"requeued": ids.len(), "ids": ids, "not_dead_letters": out.not_dead_letters}))
            .into_response(),
    )
}

async fn purge(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let out = dlq_op(&app, &headers, body, |engine, ids| async move {
        engine.purge(select(&ids)).await
    })
    .await?;
    let ids: Vec<Uuid> = out.done.iter().map(|d| d.id).collect();
    Ok(
        Json(json!({"purged": ids.len(), "ids": ids, "not_dead_letters": out.not_dead_letters}))
            .into_response(),
    )
}

async fn stats(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Response> {
    app.authorize_admin(&headers)?;
    let st = app.engine.wal_status();
    let lanes: Vec<Value> = app
        .engine
        .lanes()
        .into_iter()
        .map(|l| {
            json!({"name": l.destination, "queue_depth": l.in_flight, "waiting": l.depth,
                   "capacity": l.capacity, "up": l.up})
        })
        .collect();
    Ok(Json(json!({
        "uptime_seconds": app.started.elapsed().as_secs(),
        "wal": {
            "segments": st.segments, "bytes": st.bytes, "pending": st.pending, "dead": st.dead,
            "oldest_pending_lsn": st.oldest_pending_lsn, "last_lsn": st.visible_lsn,
        },
        "destinations": lanes,
        "now": rfc3339(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)),
    }))
    .into_response())
}
