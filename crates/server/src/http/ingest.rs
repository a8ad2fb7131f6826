//! `POST /v1/{source}/entries`.

use super::*;

/// A query string that does not fit its typed struct.
pub(crate) fn bad_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::bad(
        "invalid_request",
        format!("bad query string: {}", e.body_text()),
    )
}

/// A body's `Content-Type` must be JSON (or, where `ndjson` is allowed,
/// NDJSON: answered `true`); anything else, or none, is 415 — so no browser
/// "simple request" reaches a route that changes anything.
pub(crate) fn json_content_type(headers: &HeaderMap, ndjson: bool) -> ApiResult<bool> {
    let allowed = if ndjson {
        "application/json or application/x-ndjson"
    } else {
        "application/json"
    };
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("this request needs Content-Type: {allowed}"),
        ));
    };
    let ct = ct.to_str().unwrap_or("?");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(false),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" if ndjson => Ok(true),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type {ct:?} is not supported (use {allowed})"),
        )),
    }
}

pub(crate) async fn write(
    State(app): State<Arc<App>>,
    Path(source): Path<String>,
    q: Result<Query<WriteParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let src = app.source(&source)?;
    app.authorize(src, &headers)?;
    let Query(params) = q.map_err(bad_query)?;
    let wait_delivered = params.wait == Wait::Delivered;
    let timeout = Duration::from_millis(params.timeout_ms.unwrap_or(5000).min(60_000));
    let ndjson = json_content_type(&headers, true)?;
    let body = read_body(
        &headers,
        body,
        app.cfg.server.max_body_bytes,
        app.cfg.server.body_timeout,
    )
    .await?;
    let header_key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str().map(str::to_owned).map_err(|_| {
                ApiError::bad("invalid_request", "Idempotency-Key must be visible ASCII")
            })
        })
        .transpose()?;
    let parsed = parse_entries(&body, &app.rules(src, ndjson, header_key))?;
    drop(body);
    let receipt = accept(&app, &source, src, parsed, wait_delivered).await?;
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
                    Outcome::Delivered => (EntryState::Delivered, None),
                    Outcome::Failed { reason } => (EntryState::Failed, Some(reason)),
                    Outcome::Pending => (EntryState::Durable, None),
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
                let (status, reason) = if a.replayed && app.engine.is_forgotten(&source, a.id) {
                    (EntryState::Failed, Some(spool_queue::FORGOTTEN.to_owned()))
                } else if a.replayed {
                    current_status(&app.engine, a.lsn)
                } else {
                    (EntryState::Durable, None)
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
    let mut resp = (status, Json(WriteAnswer { entries: answers })).into_response();
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

impl App {
    /// The rules a write body for `src` must satisfy.
    pub(crate) fn rules(
        &self,
        src: &Source,
        ndjson: bool,
        header_key: Option<String>,
    ) -> BodyRules {
        BodyRules {
            ndjson,
            max_entries: self.cfg.limits.max_entries_per_request,
            max_entry_bytes: self.cfg.limits.max_entry_bytes,
            no_nul: src.no_nul,
            header_key,
            embedding_dims: src.embedding_dims,
        }
    }
}

/// Accept checked entries for `source`: ids and accept time, its rate
/// limit, then the engine (answered once durable). With `track`, the receipt
/// can wait for each entry's outcome.
pub(crate) async fn accept(
    app: &App,
    source: &str,
    src: &Source,
    parsed: Vec<ParsedEntry>,
    track: bool,
) -> ApiResult<spool_queue::Receipt> {
    let now = spool_wal::now_us();
    let entries: Vec<Entry> = parsed
        .into_iter()
        .map(|p| Entry {
            id: Uuid::now_v7(),
            source: source.to_owned(),
            destination: src.destination.clone(),
            subject: p.subject,
            idempotency_key: p.idempotency_key,
            accepted_at_us: now,
            payload: p.payload,
            embedding: p.embedding,
        })
        .collect();
    take_rate(app, source, src, entries.len())?;
    Ok(app.engine.ingest(entries, track).await?)
}

/// Take `n` from the source's `rate_limit` (a forget counts one), or 429.
pub(crate) fn take_rate(app: &App, source: &str, src: &Source, n: usize) -> ApiResult<()> {
    let Some(l) = &src.limiter else {
        return Ok(());
    };
    l.lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(n)
        .map_err(|secs| {
            spool_queue::EngineObserver::shed(&*app.metrics, source, n as u64);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("source {source:?} is over its rate_limit"),
            )
            .retry(secs)
        })
}

/// Status of an accepted entry: tracked by the WAL (pending, dead, purged) or delivered.
pub(crate) fn current_status(engine: &Engine, lsn: u64) -> (EntryState, Option<String>) {
    match engine.status(lsn) {
        Some(EntryStatus::Failed { reason, .. }) => (EntryState::Failed, Some(reason)),
        Some(EntryStatus::Purged) => (EntryState::Failed, Some(spool_queue::PURGED.to_owned())),
        Some(EntryStatus::Pending) => (EntryState::Durable, None),
        Some(EntryStatus::Delivered { .. }) | None => (EntryState::Delivered, None),
    }
}
