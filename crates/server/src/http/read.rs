//! `GET /v1/{source}/entries` and `GET /v1/{source}/entries/{id}`.
//!
//! A page holds at most `limits.max_read_bytes` of payloads (then
//! `next_cursor`), and payloads go out as the raw JSON the destination holds,
//! written into one buffer sized up front: a read's memory is about twice its
//! response, whatever `limit` asks.

use super::*;
use spool_wire::{Page, ReadParams, StoredEntry as WireEntry};

pub(crate) fn rfc3339(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// RFC 3339 time, or a number of seconds since the Unix epoch, to µs; within
/// the years 1-9999.
pub(crate) fn parse_time(name: &str, v: &str) -> ApiResult<i64> {
    let us = match v.parse::<f64>() {
        Ok(secs) if secs.is_finite() => secs * 1e6,
        _ => {
            let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    ApiError::bad(
                        "invalid_request",
                        format!("{name} must be an RFC 3339 time (like 2026-01-02T03:04:05Z or +02:00) or Unix seconds, got {v:?}"),
                    )
                })?;
            (t.unix_timestamp_nanos() / 1000) as f64
        }
    };
    let range = spool_destination::MIN_TIME_US as f64..=spool_destination::MAX_TIME_US as f64;
    if !range.contains(&us) {
        return Err(ApiError::bad(
            "invalid_request",
            format!("{name} {v:?} is outside the years 1-9999"),
        ));
    }
    Ok(us as i64)
}

/// A stored entry as the wire carries it; a payload that is somehow not JSON
/// (written into the database by hand) goes out as a JSON string.
pub(crate) fn wire_entry<'a>(
    e: &'a spool_destination::StoredEntry,
    text: &'a mut Option<Box<RawValue>>,
) -> WireEntry<&'a RawValue> {
    let payload = match std::str::from_utf8(&e.entry.payload)
        .ok()
        .and_then(|s| serde_json::from_str::<&RawValue>(s).ok())
    {
        Some(raw) => raw,
        None => {
            let s = String::from_utf8_lossy(&e.entry.payload);
            let raw =
                serde_json::value::to_raw_value(&s).unwrap_or_else(|_| RawValue::NULL.to_owned());
            &**text.insert(raw)
        }
    };
    WireEntry {
        id: e.entry.id,
        lsn: e.lsn,
        subject: e.entry.subject.clone(),
        payload,
        created_at: rfc3339(e.entry.accepted_at_us),
        status: None,
        reason: None,
        attempts: None,
        delivered_at: None,
    }
}

/// Serialize into a buffer sized for the payloads up front (no doubling).
pub(crate) fn json_response<T: Serialize>(
    value: &T,
    payload_bytes: usize,
    entries: usize,
) -> ApiResult<Response> {
    let mut buf = Vec::with_capacity(payload_bytes + entries * 256 + 64);
    serde_json::to_writer(&mut buf, value).map_err(|e| {
        tracing::error!(error = %e, "serializing a read");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not write the answer",
        )
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        buf,
    )
        .into_response())
}

pub(crate) async fn read(
    State(app): State<Arc<App>>,
    Path(source): Path<String>,
    q: Result<Query<ReadParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let src = app.source(&source)?;
    app.authorize(src, &headers)?;
    let Query(p) = q.map_err(bad_query)?;
    let limit = match p.limit {
        None => spool_destination::DEFAULT_LIMIT,
        Some(0) => {
            return Err(ApiError::bad(
                "invalid_request",
                format!("limit must be 1-{}, got 0", spool_destination::MAX_LIMIT),
            ))
        }
        Some(n) => n.min(spool_destination::MAX_LIMIT),
    };
    let query = DestQuery {
        source: source.clone(),
        subject: p.subject,
        q: p.q.filter(|s| !s.trim().is_empty()),
        since_us: p.since.map(|v| parse_time("since", &v)).transpose()?,
        until_us: p.until.map(|v| parse_time("until", &v)).transpose()?,
        limit,
        cursor: p.cursor.filter(|s| !s.is_empty()),
        max_bytes: app.cfg.limits.max_read_bytes as usize,
    };
    let page = app.engine.query(&src.destination, &query).await?;
    let bytes: usize = page.entries.iter().map(|e| e.entry.payload.len()).sum();
    let mut texts: Vec<Option<Box<RawValue>>> = vec![None; page.entries.len()];
    let entries = page
        .entries
        .iter()
        .zip(texts.iter_mut())
        .map(|(e, t)| wire_entry(e, t))
        .collect();
    let n = page.entries.len();
    json_response(
        &Page {
            entries,
            next_cursor: page.next_cursor.clone(),
        },
        bytes,
        n,
    )
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
    let mut text = None;
    let mut out = wire_entry(&stored, &mut text);
    match found.status {
        EntryStatus::Pending => out.status = Some("pending".into()),
        EntryStatus::Failed { attempts, reason } => {
            out.status = Some("failed".into());
            out.reason = Some(reason);
            out.attempts = Some(attempts);
        }
        EntryStatus::Delivered { delivered_at_us } => {
            out.status = Some("delivered".into());
            out.delivered_at = Some(rfc3339(delivered_at_us));
        }
        // `get` finds a purged entry in neither place.
        EntryStatus::Purged => return Err(missing()),
    }
    json_response(&out, stored.entry.payload.len(), 1)
}
