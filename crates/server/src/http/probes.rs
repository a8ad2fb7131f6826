//! `/healthz`, `/readyz`, `/metrics`.

use super::*;

pub(crate) async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Readiness. Every check is named; the reason of a failing one (raw errors
/// may name hosts, files or SQL) only for the admin (its token, or an open admin
/// API on loopback) — others read "failing".
pub(crate) async fn readyz(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let detailed = app.authorize_admin(&headers).is_ok();
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let mut check = |name: String, result: Result<(), String>| {
        ready &= result.is_ok();
        let said = match result {
            Ok(()) => "ok".to_owned(),
            Err(why) if detailed => why,
            Err(_) => "failing".to_owned(),
        };
        checks.insert(name, json!(said));
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

/// Metrics: OpenMetrics to a scraper that asks for it (`Accept:
/// application/openmetrics-text`), else the Prometheus text format 0.0.4.
pub(crate) async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let body = app.metrics.render(&app.engine);
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::to_prometheus_text(&body),
        )
            .into_response()
    }
}
