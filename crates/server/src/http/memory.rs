//! Agent memory: `DELETE /v1/{source}/entries/{id}`, `POST /v1/{source}/forget`
//! and `POST /v1/{source}/search`.
//!
//! A forget answers once its TOMBSTONE is durable in the WAL (like a write);
//! `applied` says whether the destination has deleted the rows yet. Bodies are
//! JSON (415 otherwise), bounded, and refused whole on any bad field.

use super::*;
use spool_destination::Search;
use spool_queue::{Forget, ForgetError, Forgotten};
use spool_wire::{Hit as WireHit, Signals, TextSignal, VectorSignal};

/// Most ids one forget may name.
pub(crate) const MAX_FORGET_IDS: usize = 1000;
/// Largest forget or search body.
const MAX_BODY: u64 = 1 << 20;

impl From<ForgetError> for ApiError {
    fn from(e: ForgetError) -> ApiError {
        match e {
            ForgetError::NotFound => ApiError::not_found(e.to_string()),
            ForgetError::Ingest(e) => e.into(),
        }
    }
}

fn answer(f: Forgotten, forgotten: Vec<Uuid>, subject: Option<String>) -> Response {
    Json(ForgetAnswer {
        lsn: f.lsn,
        forgotten: forgotten
            .into_iter()
            .filter(|id| !f.unknown.contains(id))
            .collect(),
        unknown: f.unknown,
        subject,
        applied: f.applied,
        deleted: f.deleted,
    })
    .into_response()
}

/// Read a JSON body of type `T` (bounded, JSON `Content-Type`).
async fn json_body<T: serde::de::DeserializeOwned>(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    shape: &str,
) -> ApiResult<T> {
    json_content_type(headers, false)?;
    let raw = read_body(headers, body, MAX_BODY, app.cfg.server.body_timeout).await?;
    serde_json::from_slice(&raw)
        .map_err(|e| ApiError::bad("invalid_request", format!("body must be {shape}: {e}")))
}

pub(crate) async fn forget_one(
    State(app): State<Arc<App>>,
    Path((source, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let src = app.source(&source)?;
    app.authorize(src, &headers)?;
    let uuid = Uuid::parse_str(&id)
        .map_err(|_| ApiError::not_found(format!("no entry {id} in source {source:?}")))?;
    forget_as(&app, &source, src, Forget::Ids(vec![uuid])).await
}

/// A checked forget: counted by the source's rate limit, then the engine's
/// (durable before this answers).
async fn forget_as(app: &App, source: &str, src: &Source, what: Forget) -> ApiResult<Response> {
    let (ids, subject) = match &what {
        Forget::Ids(ids) => (ids.clone(), None),
        Forget::Subject(s) => (Vec::new(), Some(s.clone())),
    };
    take_rate(app, source, src, 1)?;
    let f = app.engine.forget(source, &src.destination, what).await?;
    Ok(answer(f, ids, subject))
}

pub(crate) async fn forget(
    State(app): State<Arc<App>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let src = app.source(&source)?;
    app.authorize(src, &headers)?;
    let req: ForgetRequest = json_body(
        &app,
        &headers,
        body,
        r#"{"ids":[...]} or {"subject":"..."}"#,
    )
    .await?;
    let what = match (req.ids, req.subject) {
        (Some(ids), None) if !ids.is_empty() && ids.len() <= MAX_FORGET_IDS => Forget::Ids(ids),
        (Some(_), None) => {
            return Err(ApiError::bad(
                "invalid_request",
                format!("`ids` must hold 1-{MAX_FORGET_IDS} ids"),
            ))
        }
        (None, Some(s)) if !s.is_empty() && s.len() <= MAX_FIELD_BYTES => {
            spool_destination::check_text("subject", Some(&s), src.no_nul)
                .map_err(|e| ApiError::bad("invalid_request", e.to_string()))?;
            Forget::Subject(s)
        }
        (None, Some(_)) => {
            return Err(ApiError::bad(
                "invalid_request",
                format!("`subject` must be 1-{MAX_FIELD_BYTES} bytes"),
            ))
        }
        _ => {
            return Err(ApiError::bad(
                "invalid_request",
                "give exactly one of `ids` or `subject`",
            ))
        }
    };
    forget_as(&app, &source, src, what).await
}

pub(crate) async fn search(
    State(app): State<Arc<App>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let src = app.source(&source)?;
    app.authorize(src, &headers)?;
    let req: SearchRequest = json_body(
        &app,
        &headers,
        body,
        r#"{"q":"...","embedding":[...],"subject":"...","since":"...","until":"...","k":10}"#,
    )
    .await?;
    spool_destination::check_text("subject", req.subject.as_deref(), src.no_nul)
        .map_err(|e| ApiError::bad("invalid_request", e.to_string()))?;
    if let Some(v) = &req.embedding {
        match src.embedding_dims {
            None => {
                return Err(ApiError::bad(
                    "invalid_request",
                    format!("source {source:?} has no embedding_dims: it stores no embeddings"),
                ))
            }
            Some(d) if v.len() != d => {
                return Err(ApiError::bad(
                    "invalid_request",
                    format!(
                        "`embedding` has {} numbers; this source's embedding_dims is {d}",
                        v.len()
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    let s = Search {
        source: source.clone(),
        q: req.q,
        embedding: req.embedding,
        subject: req.subject,
        since_us: req.since.map(|v| parse_time("since", &v)).transpose()?,
        until_us: req.until.map(|v| parse_time("until", &v)).transpose()?,
        k: req.k.unwrap_or(spool_destination::DEFAULT_K),
    };
    let hits = app.engine.search(&src.destination, &s).await?;
    let mut texts: Vec<Option<Box<RawValue>>> = vec![None; hits.len()];
    let bytes: usize = hits.iter().map(|h| h.entry.entry.payload.len()).sum();
    let out: Vec<WireHit<&RawValue>> = hits
        .iter()
        .zip(texts.iter_mut())
        .map(|(h, t)| {
            let e = wire_entry(&h.entry, t);
            WireHit {
                id: e.id,
                lsn: e.lsn,
                subject: e.subject,
                payload: e.payload,
                created_at: e.created_at,
                score: h.score,
                signals: Signals {
                    text: h.text_rank.map(|rank| TextSignal { rank }),
                    vector: h.vector_rank.map(|rank| VectorSignal {
                        rank,
                        similarity: h.similarity.unwrap_or_default(),
                    }),
                },
            }
        })
        .collect();
    let n = out.len();
    json_response(&SearchAnswer { hits: out }, bytes, n)
}
