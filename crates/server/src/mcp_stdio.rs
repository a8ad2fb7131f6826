//! `spool mcp`: an MCP server on stdin/stdout for desktop agents that only
//! speak stdio, forwarding every tool list and call to a running spool's
//! `/mcp` (so the tools are defined once, by the server). Logs go to stderr:
//! stdout belongs to the protocol.

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ClientConfig, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{stdio, StreamableHttpClientTransport};
use rmcp::{ErrorData, RoleClient, RoleServer, ServerHandler, ServiceError, ServiceExt};
use std::sync::Arc;

/// The stdio side: each request is passed to the upstream client.
#[derive(Clone)]
struct Proxy {
    upstream: Arc<RunningService<RoleClient, ClientConfig>>,
}

fn upstream_error(e: ServiceError) -> ErrorData {
    match e {
        ServiceError::McpError(e) => e,
        other => ErrorData::internal_error(format!("spool did not answer: {other}"), None),
    }
}

impl ServerHandler for Proxy {
    fn get_info(&self) -> ServerConfig {
        let upstream = self.upstream.peer_info();
        let mut cfg = ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("spool", env!("CARGO_PKG_VERSION")));
        if let Some(text) = upstream.and_then(|i| i.instructions.clone()) {
            cfg = cfg.with_instructions(text);
        }
        cfg
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let tools = self
            .upstream
            .list_all_tools()
            .await
            .map_err(upstream_error)?;
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        // The caller's protocol metadata stays on this side.
        let mut call = CallToolRequestParams::new(request.name);
        if let Some(args) = request.arguments {
            call = call.with_arguments(args);
        }
        self.upstream
            .call_tool(call)
            .await
            .map(Into::into)
            .map_err(upstream_error)
    }
}

/// The `/mcp` URL of the spool at `url` for `source`.
pub fn endpoint(url: &str, source: &str) -> String {
    let base = url.trim_end_matches('/');
    let base = base.strip_suffix("/mcp").unwrap_or(base);
    let mut source_q = String::new();
    for b in source.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                source_q.push(b as char)
            }
            _ => source_q.push_str(&format!("%{b:02X}")),
        }
    }
    format!("{base}/mcp?source={source_q}")
}

/// Serve MCP on stdio until stdin closes, forwarding to the spool at `url`
/// as `source` (with its `token`, if it has one). Fails at once, naming the
/// cause, when that spool cannot be reached or refuses the token.
pub async fn serve(url: &str, source: &str, token: Option<String>) -> anyhow::Result<()> {
    let mut cfg = StreamableHttpClientTransportConfig::with_uri(endpoint(url, source));
    if let Some(t) = token {
        cfg = cfg.auth_header(t);
    }
    let upstream = ClientConfig::default()
        .serve(StreamableHttpClientTransport::from_config(cfg))
        .await
        .map_err(|e| {
            anyhow::anyhow!("cannot reach spool's MCP at {}: {e}", endpoint(url, source))
        })?;
    let proxy = Proxy {
        upstream: Arc::new(upstream),
    };
    proxy.serve(stdio()).await?.waiting().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_endpoint_is_the_servers_mcp_with_the_source_escaped() {
        for url in [
            "http://127.0.0.1:7070",
            "http://127.0.0.1:7070/",
            "http://127.0.0.1:7070/mcp",
        ] {
            assert_eq!(
                super::endpoint(url, "a b&c"),
                "http://127.0.0.1:7070/mcp?source=a%20b%26c"
            );
        }
    }
}
