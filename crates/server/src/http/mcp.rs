//! MCP (Model Context Protocol) at `/mcp`: the tools `remember`, `recall`,
//! `get` and `forget`, over Streamable HTTP on the API's own listener, with the
//! official SDK (`rmcp`), stateless, answering plain JSON.
//!
//! Invariants:
//! - **One definition of each operation.** A tool is the HTTP route it names,
//!   called in process with the caller's own headers: the same checks, limits,
//!   durability and answers (`remember` answers once durable, with ids). An
//!   HTTP error becomes a tool error whose structured content is the API's
//!   error body (`error`, `message`, `retry_after_seconds`) — a 429 stays
//!   retryable with its delay.
//! - **A token selects its source.** Every request to `/mcp` carries a
//!   source's bearer token (the admin token is refused). Without one, the
//!   source is a tokenless one: named by `?source=`, or the only one there is.
//!   Spool's own Host/Origin guard covers `/mcp`; rmcp's host list is off.

use super::auth::{bearer, ct_eq};
use super::*;
use axum::http::request::Parts;
use rmcp::handler::server::{router::tool::ToolRouter, wrapper::Parameters};
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::{
    session::never::NeverSessionManager, StreamableHttpServerConfig, StreamableHttpService,
};
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use spool_wire::ReadParams;

/// The source an `/mcp` request acts for (set by [`admit`]).
#[derive(Debug, Clone)]
struct McpSource(String);

/// One memory to remember.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// The memory, as text.
    pub text: String,
    /// What it is about (filters recall and forget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Any JSON object stored with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, Value>>,
    /// Its embedding: exactly the source's `embedding_dims` numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
    /// A retry with the same key is stored once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// `remember`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RememberArgs {
    /// The memories (all or none are stored).
    pub memories: Vec<Memory>,
    /// Answer once they are delivered (searchable), not only durable (up to 5 s).
    #[serde(default)]
    pub wait_until_delivered: bool,
}

/// Newest first, or by relevance to `query`/`embedding`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// By relevance (text and/or vector, fused), when there is a query.
    #[default]
    Relevance,
    /// Newest first (text only filters).
    Newest,
}

/// `recall`'s arguments.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecallArgs {
    /// Words the memories must hold.
    #[serde(default)]
    pub query: Option<String>,
    /// A query vector (the source's `embedding_dims` numbers): nearest by cosine similarity.
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
    /// Only memories with this subject.
    #[serde(default)]
    pub subject: Option<String>,
    /// Accepted at or after (RFC 3339 or Unix seconds).
    #[serde(default)]
    pub since: Option<String>,
    /// Accepted before (RFC 3339 or Unix seconds).
    #[serde(default)]
    pub until: Option<String>,
    /// At most this many (default 10).
    #[serde(default)]
    pub limit: Option<u32>,
    /// `relevance` (default when there is a query or embedding) or `newest`.
    #[serde(default)]
    pub order: Option<Order>,
}

/// `get`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetArgs {
    /// The memory's id.
    pub id: String,
}

/// `forget`'s arguments: exactly one of the two.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgetArgs {
    /// These memories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
    /// Every memory with this subject, until now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// The MCP server: one per request (stateless); cheap.
#[derive(Clone)]
pub struct SpoolMcp {
    app: Arc<App>,
    tool_router: ToolRouter<SpoolMcp>,
}

type ToolResult = Result<CallToolResult, ErrorData>;

/// An answer of an HTTP route as a tool result: its JSON as structured
/// content; an error status as a tool error carrying the error body.
async fn tool_result(r: ApiResult<Response>) -> ToolResult {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    let ok = resp.status().is_success();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
    Ok(if ok {
        CallToolResult::structured(v)
    } else {
        CallToolResult::structured_error(v)
    })
}

impl SpoolMcp {
    /// The caller's source and headers (its token), as the HTTP routes want them.
    fn caller(ctx: &RequestContext<RoleServer>) -> Result<(String, HeaderMap), ErrorData> {
        let parts = ctx
            .extensions
            .get::<Parts>()
            .ok_or_else(|| ErrorData::invalid_request("no HTTP request", None))?;
        let source = parts
            .extensions
            .get::<McpSource>()
            .ok_or_else(|| ErrorData::invalid_request("no source for this request", None))?;
        // Only what the route needs: the caller's token and the body's type
        // (never the MCP request's own Content-Length, -Encoding or
        // Idempotency-Key, which describe another body).
        let mut headers = HeaderMap::new();
        if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok((source.0.clone(), headers))
    }

    fn json_body<T: Serialize>(v: &T) -> Body {
        Body::from(serde_json::to_vec(v).unwrap_or_default())
    }
}

#[tool_router]
impl SpoolMcp {
    /// A new handler over the shared state.
    pub fn new(app: Arc<App>) -> SpoolMcp {
        SpoolMcp {
            app,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        description = "Store memories durably (fsynced to spool's write-ahead log before this answers). Answers each memory's id."
    )]
    async fn remember(
        &self,
        Parameters(args): Parameters<RememberArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let (source, headers) = Self::caller(&ctx)?;
        let params = WriteParams {
            wait: if args.wait_until_delivered {
                Wait::Delivered
            } else {
                Wait::Durable
            },
            timeout_ms: Some(5000),
        };
        let body = Self::json_body(&args.memories);
        tool_result(
            write(
                State(self.app.clone()),
                Path(source),
                Ok(Query(params)),
                headers,
                body,
            )
            .await,
        )
        .await
    }

    #[tool(
        description = "Recall memories: by relevance to a text query and/or an embedding (fused), or newest first; filter by subject and time."
    )]
    async fn recall(
        &self,
        Parameters(args): Parameters<RecallArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let (source, headers) = Self::caller(&ctx)?;
        let relevant = args.query.is_some() || args.embedding.is_some();
        if relevant && args.order.unwrap_or_default() == Order::Relevance {
            let req = SearchRequest {
                q: args.query,
                embedding: args.embedding,
                subject: args.subject,
                since: args.since,
                until: args.until,
                k: args.limit,
            };
            let body = Self::json_body(&req);
            return tool_result(search(State(self.app.clone()), Path(source), headers, body).await)
                .await;
        }
        if args.embedding.is_some() {
            return tool_result(Err(ApiError::bad(
                "invalid_request",
                "an embedding ranks by relevance; leave out order or set it to relevance",
            )))
            .await;
        }
        let params = ReadParams {
            subject: args.subject,
            q: args.query,
            since: args.since,
            until: args.until,
            limit: Some(args.limit.unwrap_or(spool_destination::DEFAULT_K)),
            cursor: None,
        };
        tool_result(
            read(
                State(self.app.clone()),
                Path(source),
                Ok(Query(params)),
                headers,
            )
            .await,
        )
        .await
    }

    #[tool(
        description = "One memory by id, with its status: pending (durable, not yet searchable), delivered or failed."
    )]
    async fn get(
        &self,
        Parameters(args): Parameters<GetArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let (source, headers) = Self::caller(&ctx)?;
        tool_result(get_one(State(self.app.clone()), Path((source, args.id)), headers).await).await
    }

    #[tool(
        description = "Forget memories by ids or by subject: durable before this answers; never delivered or replayed again."
    )]
    async fn forget(
        &self,
        Parameters(args): Parameters<ForgetArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let (source, headers) = Self::caller(&ctx)?;
        let body = Self::json_body(&args);
        tool_result(forget(State(self.app.clone()), Path(source), headers, body).await).await
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SpoolMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("spool", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Long-term memory: remember stores memories durably, recall finds them \
                 (words, embedding, subject, time), get reads one, forget removes them for good.",
            )
    }
}

/// The `/mcp` service: stateless Streamable HTTP, plain JSON answers.
pub(crate) fn service(app: Arc<App>) -> StreamableHttpService<SpoolMcp, NeverSessionManager> {
    let max_body = usize::try_from(app.cfg.server.max_body_bytes).unwrap_or(usize::MAX);
    StreamableHttpService::new(
        move || Ok(SpoolMcp::new(app.clone())),
        Arc::new(NeverSessionManager::default()),
        StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_max_request_body_bytes(max_body)
            .disable_allowed_hosts(),
    )
}

/// Choose the source an `/mcp` request acts for, or answer 401/403; then read
/// its body as every route does (`server.max_body_bytes` → 413,
/// `server.body_timeout` → 408), so a slow client holds nothing for long.
pub(crate) async fn admit(
    State(app): State<Arc<App>>,
    q: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    req: Request,
    next: Next,
) -> Response {
    let named = q.ok().and_then(|Query(mut m)| m.remove("source"));
    match app.mcp_source(req.headers(), named.as_deref()) {
        Ok(source) => {
            let (mut parts, body) = req.into_parts();
            let server = &app.cfg.server;
            let raw = match read_body(
                &parts.headers,
                body,
                server.max_body_bytes,
                server.body_timeout,
            )
            .await
            {
                Ok(raw) => raw,
                Err(e) => return e.into_response(),
            };
            // The body is decoded now: say so to what reads it next.
            parts.headers.remove(header::CONTENT_ENCODING);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(raw.len()));
            parts.extensions.insert(McpSource(source));
            next.run(Request::from_parts(parts, Body::from(raw))).await
        }
        Err(e) => {
            let mut r = e.into_response();
            if r.status() == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            r
        }
    }
}

impl App {
    /// The source a token (or, without one, `named` or the only tokenless
    /// source) selects for MCP.
    fn mcp_source(&self, headers: &HeaderMap, named: Option<&str>) -> ApiResult<String> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        let chosen = match bearer(headers) {
            Some(given) => {
                let found = self
                    .sources
                    .iter()
                    .find(|(_, s)| s.token.as_deref().is_some_and(|t| ct_eq(given, t)));
                match found {
                    Some((name, _)) => name.clone(),
                    None => return Err(unauthorized("invalid token (MCP takes a source's token)")),
                }
            }
            None => {
                let mut open = self.sources.iter().filter(|(_, s)| s.token.is_none());
                match (named, open.next(), open.next()) {
                    (Some(n), _, _) => {
                        let src = self.source(n)?;
                        if src.token.is_some() {
                            return Err(unauthorized(
                                "this source needs `Authorization: Bearer <token>`",
                            ));
                        }
                        n.to_owned()
                    }
                    (None, Some((name, _)), None) => name.clone(),
                    _ => {
                        return Err(unauthorized(
                            "MCP needs a source's token (`Authorization: Bearer <token>`), or `?source=` naming a tokenless source",
                        ))
                    }
                }
            }
        };
        if named.is_some_and(|n| n != chosen) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this token belongs to another source",
            ));
        }
        Ok(chosen)
    }
}
