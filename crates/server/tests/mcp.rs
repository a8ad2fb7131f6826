//! MCP at `/mcp` with the official Rust SDK's client (rmcp) against the real
//! router on a real socket, a real engine and SQLite: an agent remembers,
//! recalls (text, vector, hybrid, newest), gets and forgets; errors are tool
//! errors carrying the HTTP API's codes.

use rmcp::model::{CallToolRequestParams, CallToolResult, ClientConfig};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};
use spool_server::config::Config;

struct Served {
    base: String,
    _dir: tempfile::TempDir,
}

async fn serve(tail: &str) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::parse(&format!(
        "[server]\nlisten = \"{addr}\"\nadmin_token = \"adm\"\n[wal]\ndir = \"{}\"\nmin_free_bytes = 0\n{tail}",
        dir.path().join("wal").display()
    ))
    .unwrap();
    let app = spool_server::wire(cfg).unwrap();
    let router = spool_server::http::router(app);
    tokio::spawn(async move { axum::serve(listener, router).await });
    Served {
        base: format!("http://{addr}"),
        _dir: dir,
    }
}

const SOURCES: &str = "[[source]]\nname = \"agents\"\ntoken = \"tok-a\"\nembedding_dims = 3\n\
                       [[source]]\nname = \"other\"\ntoken = \"tok-b\"\nrate_limit = 1\n";

async fn connect(
    url: &str,
    token: Option<&str>,
) -> Result<RunningService<RoleClient, ClientConfig>, String> {
    let mut cfg = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    if let Some(t) = token {
        cfg = cfg.auth_header(t.to_owned());
    }
    ClientConfig::default()
        .serve(StreamableHttpClientTransport::from_config(cfg))
        .await
        .map_err(|e| e.to_string())
}

async fn call(
    c: &RunningService<RoleClient, ClientConfig>,
    tool: &'static str,
    args: Value,
) -> CallToolResult {
    c.call_tool(CallToolRequestParams::new(tool).with_arguments(args.as_object().unwrap().clone()))
        .await
        .unwrap()
}

fn ok(r: CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "{r:?}");
    r.structured_content.expect("structured content")
}

fn err(r: CallToolResult) -> Value {
    assert_eq!(r.is_error, Some(true), "{r:?}");
    r.structured_content.expect("structured error")
}

fn texts(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["payload"]["text"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_remembers_recalls_gets_and_forgets_over_mcp() {
    let s = serve(SOURCES).await;
    let url = format!("{}/mcp", s.base);
    let c = connect(&url, Some("tok-a")).await.unwrap();

    let mut tools: Vec<String> = c
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| {
            assert!(t.input_schema.get("properties").is_some(), "{t:?}");
            t.name.to_string()
        })
        .collect();
    tools.sort();
    assert_eq!(tools, ["forget", "get", "recall", "remember"]);

    let v = ok(call(
        &c,
        "remember",
        json!({"memories": [
            {"text": "alice likes green tea", "subject": "alice", "embedding": [0, 1, 0]},
            {"text": "the cellar key is under the mat", "subject": "house", "embedding": [1, 0, 0],
             "metadata": {"room": "cellar"}},
            {"text": "bob drinks tea too", "subject": "bob", "embedding": [0.1, 0.9, 0]}
        ], "wait_until_delivered": true}),
    )
    .await);
    let entries = v["entries"].as_array().unwrap();
    assert!(entries.iter().all(|e| e["status"] == "delivered"), "{v}");
    let alice = entries[0]["id"].as_str().unwrap().to_owned();

    let v = ok(call(
        &c,
        "recall",
        json!({"query": "tea", "embedding": [0, 1, 0], "limit": 2}),
    )
    .await);
    assert_eq!(
        texts(&v, "hits"),
        ["alice likes green tea", "bob drinks tea too"]
    );
    assert!(v["hits"][0]["signals"]["text"]["rank"].is_u64());
    let v = ok(call(&c, "recall", json!({"embedding": [1, 0, 0], "limit": 1})).await);
    assert_eq!(texts(&v, "hits"), ["the cellar key is under the mat"]);
    assert_eq!(v["hits"][0]["payload"]["metadata"]["room"], "cellar");
    let v = ok(call(&c, "recall", json!({"subject": "bob", "order": "newest"})).await);
    assert_eq!(texts(&v, "entries"), ["bob drinks tea too"]);

    let v = ok(call(&c, "get", json!({"id": alice})).await);
    assert_eq!(
        (v["status"].as_str(), v["payload"]["subject"].as_str()),
        (Some("delivered"), Some("alice"))
    );

    let v = ok(call(&c, "forget", json!({"ids": [alice]})).await);
    assert_eq!(
        (v["applied"].as_bool(), v["deleted"].as_u64()),
        (Some(true), Some(1)),
        "{v}"
    );
    assert_eq!(
        err(call(&c, "get", json!({"id": alice})).await)["error"],
        "not_found"
    );
    let v = ok(call(&c, "recall", json!({"query": "tea"})).await);
    assert_eq!(texts(&v, "hits"), ["bob drinks tea too"]);
    let v = ok(call(&c, "forget", json!({"subject": "bob"})).await);
    assert_eq!(v["deleted"], 1, "{v}");

    // Refusals are tool errors with the API's codes; nothing is stored.
    let e = err(call(
        &c,
        "remember",
        json!({"memories": [{"text": "x", "embedding": [1, 2]}]}),
    )
    .await);
    assert_eq!(e["error"], "invalid_entry", "{e}");
    let e = err(call(
        &c,
        "recall",
        json!({"embedding": [1, 0, 0], "order": "newest"}),
    )
    .await);
    assert_eq!(e["error"], "invalid_request", "{e}");
    let bad_args = call(&c, "remember", json!({"memories": "not a list"})).await;
    assert_eq!(bad_args.is_error, Some(true), "{bad_args:?}");
    c.cancel().await.unwrap();

    // Another source is isolated; over its rate limit it gets a retryable error.
    let b = connect(&url, Some("tok-b")).await.unwrap();
    let v = ok(call(&b, "recall", json!({"query": "cellar", "order": "newest"})).await);
    assert!(v["entries"].as_array().unwrap().is_empty(), "{v}");
    // rate_limit = 1: a full bucket lends a burst once, the next call is refused.
    let many: Vec<Value> = (0..5).map(|i| json!({"text": format!("m{i}")})).collect();
    ok(call(&b, "remember", json!({"memories": many})).await);
    let e = err(call(&b, "remember", json!({"memories": [{"text": "one more"}]})).await);
    assert_eq!(e["error"], "rate_limited", "{e}");
    assert!(e["retry_after_seconds"].as_u64().unwrap() >= 1, "{e}");
    b.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_needs_a_sources_token() {
    let s = serve(SOURCES).await;
    let url = format!("{}/mcp", s.base);
    for token in [None, Some("adm"), Some("wrong")] {
        assert!(connect(&url, token).await.is_err(), "{token:?} was let in");
    }
    // A token names its own source only.
    assert!(connect(&format!("{url}?source=agents"), Some("tok-b"))
        .await
        .is_err());
    assert!(connect(&format!("{url}?source=agents"), Some("tok-a"))
        .await
        .is_ok());
    let http = status_without_a_token(&url).await;
    assert_eq!(http, 401);
}

/// The status of a bare tools/list POST without a token.
async fn status_without_a_token(url: &str) -> u16 {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Accept: application/json, text/event-stream",
            "--data",
            body,
            url,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_default_takes_mcp_without_a_token_from_its_own_host_only() {
    let s = serve("").await;
    let url = format!("{}/mcp", s.base);
    let c = connect(&url, None).await.unwrap();
    let v = ok(call(&c, "remember", json!({"memories": [{"text": "hello"}]})).await);
    assert_eq!(v["entries"][0]["status"], "durable");
    c.cancel().await.unwrap();
    // DNS rebinding: a foreign Host is refused before MCP sees the request.
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Host: evil.example",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Accept: application/json, text/event-stream",
            "--data",
            body,
            &url,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_mcp_serves_stdio_forwarding_to_a_running_spool() {
    use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
    let s = serve(SOURCES).await;
    let base = s.base.clone();
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_spool")).configure(|c| {
        c.args([
            "mcp", "--url", &base, "--source", "agents", "--token", "tok-a",
        ]);
    });
    let c = ClientConfig::default()
        .serve(TokioChildProcess::new(cmd).unwrap())
        .await
        .unwrap();
    assert_eq!(c.list_all_tools().await.unwrap().len(), 4);
    let v = ok(call(
        &c,
        "remember",
        json!({"memories": [{"text": "stdio works", "embedding": [0, 0, 1]}], "wait_until_delivered": true}),
    )
    .await);
    assert_eq!(v["entries"][0]["status"], "delivered", "{v}");
    let v = ok(call(&c, "recall", json!({"embedding": [0, 0, 1]})).await);
    assert_eq!(texts(&v, "hits"), ["stdio works"]);
    let e = err(call(&c, "get", json!({"id": "nope"})).await);
    assert_eq!(e["error"], "not_found");
    c.cancel().await.unwrap();

    // A refused token: `spool mcp` exits 1 naming the cause, before serving.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spool"))
        .args([
            "mcp", "--url", &base, "--source", "agents", "--token", "wrong",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach spool's MCP"));
}

/// The MCP request's own headers describe the JSON-RPC body, not a tool's:
/// an `Idempotency-Key` on it must not reach `remember`'s write (it would make
/// a two-memory call a 400, or key a memory the agent never keyed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_requests_own_headers_do_not_reach_the_tools() {
    let s = serve(SOURCES).await;
    let headers = std::collections::HashMap::from([(
        axum::http::HeaderName::from_static("idempotency-key"),
        axum::http::HeaderValue::from_static("k1"),
    )]);
    let cfg = StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", s.base))
        .auth_header("tok-a".to_owned())
        .custom_headers(headers);
    let c = ClientConfig::default()
        .serve(StreamableHttpClientTransport::from_config(cfg))
        .await
        .unwrap();
    let v = ok(call(
        &c,
        "remember",
        json!({"memories": [{"text": "a"}, {"text": "b"}]}),
    )
    .await);
    assert_eq!(v["entries"].as_array().unwrap().len(), 2, "{v}");
    c.cancel().await.unwrap();
}
