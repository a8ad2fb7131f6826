//! `GET /v1/{source}/entries` and `GET /v1/{source}/entries/{id}`.

use super::*;

pub(crate) fn rfc3339(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// RFC 3339 time, or a number of seconds since the Unix epoch, to µs.
pub(crate) fn parse_time(name: &str, v: &str) -> ApiResult<i64> {
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

pub(crate) fn stored_json(e: &spool_destination::StoredEntry) -> Value {
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

pub(crate) async fn read(
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
    let page = app.engine.query(&src.destination, &query).await?;
    let entries: Vec<Value> = page.entries.iter().map(stored_json).collect();
    Ok(Json(json!({"entries": entries, "next_cursor": page.next_cursor})).into_response())
}

pub(crate) async fn get_one(
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
        .await?
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
