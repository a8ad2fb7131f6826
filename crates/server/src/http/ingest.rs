//! `POST /v1/{source}/entries`.

use super::*;

/// A query string that does not fit its typed struct.
pub(crate) fn bad_query(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::bad(
        "invalid_request",
        format!("bad query string: {}", e.body_text()),
    )
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
    let ndjson = match headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?"))
    {
        None => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a write needs Content-Type: application/json or application/x-ndjson",
            ))
        }
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
    let body = read_body(
        &headers,
        body,
        app.cfg.server.max_body_bytes,
        app.cfg.server.body_timeout,
    )
    .await?;
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
        // One pass: what the destination can store (nothing answered 202 can
        // become a dead letter for its content), and the fields we read.
        let invalid = |e: spool_destination::InvalidEntry| {
            ApiError::bad("invalid_entry", format!("{at}: {e}"))
        };
        let fields =
            spool_destination::check_payload(text.as_bytes(), src.no_nul).map_err(invalid)?;
        let subject = string_field(fields.subject, "subject", &at)?;
        let key =
            string_field(fields.idempotency_key, "idempotency_key", &at)?.or(header_key.clone());
        if key.as_deref() == Some("") {
            return Err(ApiError::bad(
                "invalid_entry",
                format!("{at}: `idempotency_key` must not be empty"),
            ));
        }
        spool_destination::check_text("subject", subject.as_deref(), src.no_nul)
            .and_then(|()| {
                spool_destination::check_text("idempotency_key", key.as_deref(), src.no_nul)
            })
            .map_err(invalid)?;
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
    // The entries own copies of their text: the body goes before any waiting
    // (wait=delivered may hold this request for up to a minute).
    drop(body);
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
    let receipt = app.engine.ingest(entries, wait_delivered).await?;
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
                let (status, reason) = if a.replayed {
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

/// Status of an accepted entry: tracked by the WAL (pending, dead, purged) or delivered.
pub(crate) fn current_status(engine: &Engine, lsn: u64) -> (EntryState, Option<String>) {
    match engine.status(lsn) {
        Some(EntryStatus::Failed { reason, .. }) => (EntryState::Failed, Some(reason)),
        Some(EntryStatus::Purged) => (EntryState::Failed, Some(spool_queue::PURGED.to_owned())),
        Some(EntryStatus::Pending) => (EntryState::Durable, None),
        Some(EntryStatus::Delivered { .. }) | None => (EntryState::Delivered, None),
    }
}
