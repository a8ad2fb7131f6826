//! Agent memory over HTTP, in process, on real SQLite and Postgres: entries
//! with embeddings, search (text, vector, hybrid), forget by id and by subject.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::{json, Value};
use spool_testkit::PgServer;

fn door(pg: bool) -> Door {
    let dest = if pg {
        format!(
            "[[destination]]\nname = \"main\"\nkind = \"postgres\"\nurl = \"{}\"\n",
            PgServer::shared().fresh_database()
        )
    } else {
        String::new()
    };
    Door::with_config(
        "",
        &format!("{dest}[[source]]\nname = \"agents\"\nembedding_dims = 3\n"),
    )
}

async fn remember(d: &Door, body: Value) -> (StatusCode, Value) {
    d.post(
        "/v1/agents/entries?wait=delivered&timeout_ms=10000",
        body.to_string(),
    )
    .await
}

async fn search(d: &Door, body: Value) -> (StatusCode, Value) {
    d.post("/v1/agents/search", body.to_string()).await
}

fn hit_texts(v: &Value) -> Vec<String> {
    v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["payload"]["text"].as_str().unwrap().to_owned())
        .collect()
}

async fn memory_round_trip(d: &Door, postgres: bool) {
    let (status, v) = remember(
        d,
        json!([
            {"text": "the cellar key is under the mat", "subject": "house", "embedding": [1, 0, 0]},
            {"text": "alice likes green tea", "subject": "alice", "embedding": [0, 1, 0]},
            {"text": "alice lives in Lisbon", "subject": "alice", "embedding": [0, 0.9, 0.1]},
            {"text": "no vector here about tea"}
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let ids: Vec<String> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();

    // A wrong length, or a non-number, refuses the whole request; nothing written.
    let before = d.last_lsn();
    for bad in [
        json!({"text": "x", "embedding": [1, 2]}),
        json!({"text": "x", "embedding": [1, "2", 3]}),
        json!({"text": "x", "embedding": "1,2,3"}),
        json!({"text": "x", "embedding": [0, 0, 0]}),
        json!({"text": "x", "embedding": [3e38, 3e38, 1]}),
    ] {
        let (status, v) = remember(d, json!([{"text": "fine"}, bad])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"], "invalid_entry", "{v}");
        assert!(v["message"].as_str().unwrap().contains("embedding"), "{v}");
    }
    assert_eq!(d.last_lsn(), before);

    let (status, v) = search(d, json!({"embedding": [0, 1, 0], "k": 2})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        hit_texts(&v),
        vec!["alice likes green tea", "alice lives in Lisbon"]
    );
    let top = &v["hits"][0];
    assert_eq!(top["signals"]["vector"]["rank"], 1);
    assert!((top["signals"]["vector"]["similarity"].as_f64().unwrap() - 1.0).abs() < 1e-6);
    assert!(top["signals"]["text"].is_null() && top["score"].as_f64().unwrap() > 0.0);

    let (_, v) = search(d, json!({"q": "tea"})).await;
    let mut texts = hit_texts(&v);
    texts.sort();
    assert_eq!(
        texts,
        vec!["alice likes green tea", "no vector here about tea"]
    );

    // Hybrid: the one both signals rank first comes first.
    let (_, v) = search(d, json!({"q": "tea", "embedding": [0, 1, 0], "k": 3})).await;
    assert_eq!(hit_texts(&v)[0], "alice likes green tea");
    assert!(v["hits"][0]["signals"]["text"]["rank"].is_u64());

    for (bad, code) in [
        (json!({"embedding": [1, 0]}), "invalid_request"),
        (json!({}), "invalid_request"),
        (json!({"q": "tea", "k": 0}), "invalid_request"),
        (json!({"q": "tea", "k": 101}), "invalid_request"),
        (json!({"q": "tea", "since": "yesterday"}), "invalid_request"),
        (json!({"q": "tea", "limit": 5}), "invalid_request"),
    ] {
        let (status, v) = search(d, bad.clone()).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{bad}: {v}"
        );
    }
    // NUL in a subject: Postgres cannot compare it; a 400, never a 5xx.
    let (status, v) = search(d, json!({"q": "tea", "subject": "a\u{0}b"})).await;
    let want = if postgres {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    assert_eq!(status, want, "{v}");
    let no_type = Request::post("/v1/agents/search")
        .body(Body::from(json!({"q": "tea"}).to_string()))
        .unwrap();
    assert_eq!(d.send(no_type).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Forget one by id: gone from reads and searches at once.
    let del = Request::delete(format!("/v1/agents/entries/{}", ids[0]))
        .body(Body::empty())
        .unwrap();
    let (status, v) = d.send(del).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (v["applied"].as_bool(), v["deleted"].as_u64()),
        (Some(true), Some(1)),
        "{v}"
    );
    assert_eq!(v["forgotten"], json!([ids[0]]));
    assert_eq!(
        get(d, &format!("/v1/agents/entries/{}", ids[0])).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, v) = search(d, json!({"q": "cellar"})).await;
    assert!(hit_texts(&v).is_empty(), "{v}");

    // Forget by subject.
    let (status, v) = d
        .post("/v1/agents/forget", json!({"subject": "alice"}).to_string())
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["deleted"], 2, "{v}");
    let (_, v) = search(d, json!({"q": "tea"})).await;
    assert_eq!(hit_texts(&v), vec!["no vector here about tea"]);

    // Never-seen ids are 404; malformed bodies 400; nothing written for either.
    let before = d.last_lsn();
    let (status, v) = d
        .post(
            "/v1/agents/forget",
            json!({"ids": [uuid::Uuid::now_v7()]}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    for bad in [
        json!({"ids": [], "subject": "x"}),
        json!({"ids": []}),
        json!({"subject": ""}),
        json!({"ids": ["not-a-uuid"]}),
        json!({"all": true}),
    ] {
        let (status, v) = d.post("/v1/agents/forget", bad.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    assert_eq!(d.last_lsn(), before);
    // Forgetting again is fine (idempotent): known, nothing left to delete.
    let again = Request::delete(format!("/v1/agents/entries/{}", ids[0]))
        .body(Body::empty())
        .unwrap();
    let (status, v) = d.send(again).await;
    assert_eq!(
        (status, v["deleted"].as_u64()),
        (StatusCode::OK, Some(0)),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remember_search_and_forget_sqlite() {
    memory_round_trip(&door(false), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remember_search_and_forget_postgres() {
    memory_round_trip(&door(true), true).await;
}
