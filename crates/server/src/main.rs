//! # spool — the server and the operator CLI
//!
//! `spool serve` wires configuration → WAL → destinations → engine → HTTP; the
//! data path itself lives in the libraries (spool-wal, spool-destination,
//! spool-queue). The other subcommands are offline operator tools.
//!
//! ## Invariants
//! - Exit codes: 0 ok, 1 a failure found or an operation failed, 2 usage or
//!   configuration error (the message names the key or flag).
//! - Offline tools take the WAL directory's lock: they refuse to run against a
//!   directory a live server holds.
//! - Shutdown (SIGTERM/SIGINT) drains once: new requests get 503, in-flight ones
//!   finish, the engine drains within `server.shutdown_timeout`, exit 0.

mod ops;

use anyhow::{Context, Result};

/// mimalloc instead of glibc malloc: the request path allocates per entry, and
/// glibc's malloc/free were ~15% of the server's CPU (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc asks for transparent huge pages on its arenas (madvise), so each
/// thread's first allocations fault in whole 2 MiB pages: ~45 MiB of RSS at
/// idle and ~80 MiB more under load, for no measured speed (docs/benchmarks.md,
/// "Memory"). Off for the whole process, before any thread starts.
#[allow(unsafe_code)] // one prctl(2); see below.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes integers only and touches no memory
    // of ours; a kernel without it answers EINVAL, which changes nothing.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

use clap::{Parser, Subcommand, ValueEnum};
use spool_server::config::{Config, ConfigError};
use spool_server::http;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "spool",
    version,
    about = "WAL-fronted ingest queue: serve, and operate the WAL"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the HTTP API (no config: ./spool-data, SQLite, 127.0.0.1:7070).
    Serve {
        /// spool.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Inspect a WAL directory (offline).
    Wal {
        #[command(subcommand)]
        cmd: WalCmd,
    },
    /// Re-deliver WAL entries to a destination (rebuild or fill it). Idempotent.
    Replay {
        /// spool.toml naming the WAL directory and the destination.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Destination name.
        #[arg(long)]
        destination: String,
        /// Only entries of this source.
        #[arg(long)]
        source: Option<String>,
        /// First LSN.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Last LSN.
        #[arg(long)]
        to: Option<u64>,
        /// Statuses to replay.
        #[arg(long, value_delimiter = ',', default_value = "pending,delivered")]
        status: Vec<ops::Status>,
        /// Count what would be replayed, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// An MCP server on stdin/stdout forwarding to a running spool's /mcp
    /// (for agents that only speak stdio).
    Mcp {
        /// The running spool, e.g. http://127.0.0.1:7070.
        #[arg(long)]
        url: String,
        /// The source the agent's memories belong to.
        #[arg(long)]
        source: String,
        /// The source's bearer token (or SPOOL_TOKEN in the environment).
        #[arg(long)]
        token: Option<String>,
    },
    /// Dead letters (offline; with a server running use the admin API).
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
}

#[derive(Subcommand)]
enum WalCmd {
    /// Check every record; exit 1 naming the first bad one.
    Verify {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One line per record: lsn, kind, source, id, status, bytes.
    Inspect {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Segments, bytes, records, pending, delivered, failed, oldest pending LSN.
    Stats {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Rewrite sealed segments without forgotten entries' records (each
    /// segment copied, fsynced and renamed over the old one; never in place).
    Compact {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// List dead letters.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        source: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Requeue dead letters (delivered by the next `spool serve`).
    Requeue(DlqSelect),
    /// Purge dead letters: discarded for good, never delivered.
    Purge(DlqSelect),
}

#[derive(clap::Args)]
struct DlqSelect {
    #[arg(long)]
    config: Option<PathBuf>,
    /// All dead letters.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
    /// Entry ids.
    #[arg(required_unless_present = "all")]
    ids: Vec<uuid::Uuid>,
    #[arg(long)]
    json: bool,
}

/// An error with its exit code.
pub enum Failure {
    /// Exit 2.
    Usage(String),
    /// Exit 1.
    Failed(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Usage(e.0)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Failed(e)
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, Failure> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::embedded(),
    })
}

fn init_logs(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    // `spool mcp` runs under an agent that shows stderr to people: quiet.
    let quiet = matches!(cli.cmd, Cmd::Mcp { .. });
    init_logs(
        cli.log_format,
        if quiet { "warn" } else { "info,sqlx=warn" },
    );
    let result = match cli.cmd {
        Cmd::Serve { config } => {
            load_config(config.as_ref()).and_then(|c| serve(c).map_err(Failure::from))
        }
        Cmd::Wal { cmd } => match cmd {
            WalCmd::Verify { dir, json } => ops::verify(&dir, json),
            WalCmd::Inspect {
                dir,
                from,
                limit,
                json,
            } => ops::inspect(&dir, from, limit, json),
            WalCmd::Stats { dir, json } => ops::stats(&dir, json),
            WalCmd::Compact { dir, json } => ops::compact(&dir, json),
        },
        Cmd::Replay {
            config,
            destination,
            source,
            from,
            to,
            status,
            dry_run,
            json,
        } => load_config(config.as_ref()).and_then(|c| {
            let r = ops::Replay {
                destination,
                source,
                from,
                to: to.unwrap_or(u64::MAX),
                status,
                dry_run,
                json,
            };
            runtime()?.block_on(ops::replay(&c, r))
        }),
        Cmd::Mcp { url, source, token } => runtime().and_then(|rt| {
            let token = token.or_else(|| std::env::var("SPOOL_TOKEN").ok());
            rt.block_on(spool_server::mcp_stdio::serve(&url, &source, token))
                .map(|()| ExitCode::SUCCESS)
                .map_err(Failure::Failed)
        }),
        Cmd::Dlq { cmd } => match cmd {
            DlqCmd::List {
                config,
                source,
                limit,
                json,
            } => load_config(config.as_ref())
                .and_then(|c| ops::dlq_list(&c, source.as_deref(), limit, json)),
            DlqCmd::Requeue(s) => load_config(s.config.as_ref()).and_then(|c| {
                runtime()?.block_on(ops::dlq(
                    &c,
                    ops::DlqOp::Requeue,
                    (!s.all).then_some(s.ids),
                    s.json,
                ))
            }),
            DlqCmd::Purge(s) => load_config(s.config.as_ref()).and_then(|c| {
                runtime()?.block_on(ops::dlq(
                    &c,
                    ops::DlqOp::Purge,
                    (!s.all).then_some(s.ids),
                    s.json,
                ))
            }),
        },
    };
    match result {
        Ok(code) => code,
        Err(Failure::Usage(m)) => {
            eprintln!("spool: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("spool: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Failed(e.into()))
}

fn serve(cfg: Config) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve_async(cfg))
}

async fn serve_async(cfg: Config) -> Result<ExitCode> {
    let started = Instant::now();
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("binding {}", cfg.server.listen))?;
    let addr = listener.local_addr()?;
    let shutdown_timeout = cfg.server.shutdown_timeout;
    let limits = (cfg.server.max_connections, cfg.server.header_timeout);
    let app = spool_server::wire(cfg)?;
    let engine = app.engine.clone();
    tracing::info!(listen = %addr, startup_ms = started.elapsed().as_millis() as u64, "spool serving");

    let stop = Arc::new(tokio::sync::Notify::new());
    let server = {
        let stop = stop.clone();
        let router = http::router(app.clone());
        tokio::spawn(accept_loop(listener, router, stop, limits))
    };
    shutdown_signal().await;
    let deadline = tokio::time::Instant::now() + shutdown_timeout;
    tracing::info!(
        timeout_ms = shutdown_timeout.as_millis() as u64,
        "shutting down: no new requests; draining"
    );
    app.closing.store(true, Ordering::SeqCst);
    stop.notify_one();
    // In-flight requests get half of the shutdown timeout at most: slow clients
    // cannot eat the engine's drain.
    let requests_until = tokio::time::Instant::now() + shutdown_timeout / 2;
    if tokio::time::timeout_at(requests_until, server)
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within half of server.shutdown_timeout");
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let report = engine.shutdown(left.max(Duration::from_millis(100))).await;
    tracing::info!(
        left_pending = report.left_pending,
        deadline_passed = report.deadline_passed,
        "spool stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// Serve HTTP/1.1 connections until `stop`, then let in-flight requests finish
/// (the caller bounds that wait). hyper's connection builder instead of
/// `axum::serve` for its header-read timeout.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stop: Arc<tokio::sync::Notify>,
    (max_connections, header_timeout): (usize, Duration),
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    // server.max_connections: at the limit, new connections wait in the
    // kernel's accept queue until one closes.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            _ = stop.notified() => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.notified() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
