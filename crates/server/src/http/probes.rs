//! `/healthz`, `/readyz`, `/metrics`.

use super::*;

pub(crate) async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub(crate) async fn readyz(State(app): State<Arc<App>>) -> Response {
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

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
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
