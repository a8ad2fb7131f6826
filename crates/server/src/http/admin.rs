//! `/v1/admin/*`: dead letters (list, requeue, purge) and stats.

use super::*;

pub(crate) async fn dead_letters(
    State(app): State<Arc<App>>,
    q: Result<Query<DeadLetterParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    app.authorize_admin(&headers)?;
    let Query(p) = q.map_err(bad_query)?;
    let limit = match p.limit {
        None => 100,
        Some(0) => {
            return Err(ApiError::bad(
                "invalid_request",
                "limit must be a positive number, got 0",
            ))
        }
        Some(n) => n,
    };
    let dead_letters = app
        .engine
        .dead_letters(p.source.as_deref(), limit)
        .into_iter()
        .map(|d| spool_wire::DeadLetter {
            id: d.id,
            lsn: d.lsn,
            source: d.source,
            destination: d.destination,
            attempts: d.attempts,
            reason: d.reason,
        })
        .collect();
    Ok(Json(DeadLetters { dead_letters }).into_response())
}

pub(crate) async fn dlq_op<F, Fut>(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    op: F,
) -> ApiResult<DlqOutcome>
where
    F: FnOnce(Engine, Option<Vec<Uuid>>) -> Fut,
    Fut: std::future::Future<Output = Result<DlqOutcome, spool_wal::WalError>>,
{
    app.authorize_admin(headers)?;
    let raw = read_body(headers, body, 16 << 20, app.cfg.server.body_timeout).await?;
    let b: DeadLetterSelect = serde_json::from_slice(&raw).map_err(|e| {
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
    Ok(op(app.engine.clone(), ids).await?)
}

pub(crate) fn select(ids: &Option<Vec<Uuid>>) -> Select<'_> {
    ids.as_deref().map_or(Select::All, Select::Ids)
}

/// The answer of requeue and purge: the count under `verb`, the ids, and the
/// ids asked for that were not dead letters.
fn dlq_answer(requeued: bool, out: DlqOutcome) -> Response {
    let ids: Vec<Uuid> = out.done.iter().map(|d| d.id).collect();
    let n = Some(ids.len());
    Json(DeadLetterAnswer {
        requeued: n.filter(|_| requeued),
        purged: n.filter(|_| !requeued),
        ids,
        not_dead_letters: out.not_dead_letters,
    })
    .into_response()
}

pub(crate) async fn requeue(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let out = dlq_op(&app, &headers, body, |engine, ids| async move {
        engine.requeue(select(&ids)).await
    })
    .await?;
    Ok(dlq_answer(true, out))
}

pub(crate) async fn purge(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let out = dlq_op(&app, &headers, body, |engine, ids| async move {
        engine.purge(select(&ids)).await
    })
    .await?;
    Ok(dlq_answer(false, out))
}
pub(crate) async fn stats(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult<Response> {
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
