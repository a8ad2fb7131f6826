//! The HTTP router in process, on a real engine and real destinations.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use spool_server::config::Config;
use std::sync::Arc;
use tower::ServiceExt;

pub struct Door {
    pub app: Arc<spool_server::http::App>,
    pub router: axum::Router,
    _dir: tempfile::TempDir,
}

impl Door {
    /// A server on the embedded SQLite default, or on Postgres at `pg`.
    pub fn start(pg: Option<&str>) -> Door {
        let dest = match pg {
            Some(url) => {
                format!("[[destination]]\nname = \"main\"\nkind = \"postgres\"\nurl = \"{url}\"\n")
            }
            None => String::new(),
        };
        Door::with_config("", &dest)
    }

    /// A server whose config has `head` before its `[wal]` table and `tail` after.
    pub fn with_config(head: &str, tail: &str) -> Door {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(&format!(
            "{head}[wal]\ndir = \"{}\"\nmin_free_bytes = 0\n{tail}",
            dir.path().join("wal").display()
        ))
        .unwrap();
        let app = spool_server::wire(cfg).unwrap();
        let router = spool_server::http::router(app.clone());
        Door {
            app,
            router,
            _dir: dir,
        }
    }

    pub async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn post(&self, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        let req = Request::post(path)
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        self.send(req).await
    }

    pub fn last_lsn(&self) -> u64 {
        self.app.engine.wal_status().visible_lsn
    }
}

pub async fn get(door: &Door, path: &str) -> (StatusCode, Value) {
    door.send(Request::get(path).body(Body::empty()).unwrap())
        .await
}
