//! # spool-server — configuration, metrics and the HTTP API as a library
//!
//! The `spool` binary (src/main.rs) parses flags and wires
//! [`config::Config`] → WAL → destinations → [`spool_queue::Engine`] →
//! [`http::router`]; tests drive the same router in process
//! (`tower::ServiceExt::oneshot`) and spawn the binary only for process-level
//! behaviour (signals, kill -9, a full disk, exit codes).
//!
//! ## Invariants
//! - The HTTP layer reaches the WAL and destinations only through the engine.
//! - A write is all-or-nothing: the whole body is read (bounded), decoded,
//!   parsed and every entry validated before the engine sees any of it.
//! - Configuration errors exit 2 naming the key.

pub mod config;
pub mod http;
pub mod mcp_stdio;
pub mod metrics;

use anyhow::Context;
use std::sync::Arc;

/// Open the WAL, make the destinations (configuration only: one that is down
/// is probed by the engine while writes are accepted), start the engine, and
/// give the HTTP layer's shared state ([`http::router`] serves it). Must run
/// inside a tokio runtime.
pub fn wire(cfg: config::Config) -> anyhow::Result<Arc<http::App>> {
    let metrics = Arc::new(metrics::Metrics::default());
    std::fs::create_dir_all(&cfg.wal.dir)
        .with_context(|| format!("creating {}", cfg.wal.dir.display()))?;
    let hooks = spool_wal::WalHooks {
        observer: metrics.clone(),
        ..Default::default()
    };
    let wal = spool_wal::Wal::open_with(&cfg.wal.dir, cfg.wal_config()?, hooks)
        .with_context(|| format!("opening the WAL in {}", cfg.wal.dir.display()))?;
    let dests = cfg
        .destinations
        .iter()
        .map(|d| spool_destination::open(d).with_context(|| format!("destination {:?}", d.name)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let engine =
        spool_queue::Engine::start_with_observer(wal, dests, cfg.engine_config(), metrics.clone())
            .context("starting the delivery engine")?;
    Ok(Arc::new(http::App::new(engine, cfg, metrics)))
}
