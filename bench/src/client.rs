//! `spool-bench client`: spool-client against a running server.
//!
//! - `fire`: producers call [`Client::ingest`] as fast as the client lets them
//!   (its buffer pushes back), then `close` flushes; entries/s counts only entries
//!   that were neither dropped nor rejected, over the time including the flush.
//! - `sync`: producers call [`Client::ingest_sync`] with one entry each, in a
//!   loop; p50/p99 of the call.
//!
//! CPU is read from `/proc/<pid>/stat` (user + system, all threads) for this
//! process (only the client runs here) and, with `--server-pid`, for the server,
//! so the client's cost per entry is shown as a ratio of the server's.

use anyhow::{bail, Context, Result};
use serde_json::json;
use spool_client::{Client, FullPolicy, Wait};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run.
pub struct ClientBench {
    pub target: crate::Target,
    pub mode: String,
    pub producers: usize,
    pub seconds: Duration,
    pub record_bytes: usize,
    pub server_pid: Option<u32>,
    pub max_delay: Option<Duration>,
    pub in_flight: Option<usize>,
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").context("malformed stat")?.1;
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 (1-based), in USER_HZ = 100 ticks.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

struct Cpu {
    server: Option<String>,
    at: (f64, Option<f64>),
}

impl Cpu {
    fn start(server_pid: Option<u32>) -> Result<Cpu> {
        let server = server_pid.map(|p| p.to_string());
        let at = (
            cpu_seconds("self")?,
            server.as_deref().map(cpu_seconds).transpose()?,
        );
        Ok(Cpu { server, at })
    }

    /// (client, server) CPU seconds since `start`.
    fn used(&self) -> Result<(f64, Option<f64>)> {
        let client = cpu_seconds("self")? - self.at.0;
        let server = match (&self.server, self.at.1) {
            (Some(p), Some(s0)) => Some(cpu_seconds(p)? - s0),
            _ => None,
        };
        Ok((client, server))
    }
}

pub async fn client_bench(b: ClientBench) -> Result<serde_json::Value> {
    let lost = Arc::new(AtomicU64::new(0));
    let (l1, l2) = (lost.clone(), lost.clone());
    let mut builder = Client::builder(&b.target.url)
        .source(&b.target.source)
        .on_full(FullPolicy::Wait(Duration::from_secs(60)))
        .on_drop(move |_, _| {
            l1.fetch_add(1, Ordering::Relaxed);
        })
        .on_reject(move |_, _| {
            l2.fetch_add(1, Ordering::Relaxed);
        });
    if let Some(d) = b.max_delay {
        builder = builder.max_delay(d);
    }
    if let Some(n) = b.in_flight {
        builder = builder.max_in_flight(n);
    }
    if let Some(t) = &b.target.token {
        builder = builder.token(t);
    }
    let client = builder.build().map_err(anyhow::Error::msg)?;
    let entry = json!({ "pad": "x".repeat(b.record_bytes.saturating_sub(10)) });
    let cpu = Cpu::start(b.server_pid)?;
    let start = Instant::now();
    let end = start + b.seconds;
    let mut tasks = Vec::new();
    for _ in 0..b.producers {
        let (c, e, mode) = (client.clone(), entry.clone(), b.mode.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let mut lat_us = Vec::new();
            while Instant::now() < end {
                if mode == "fire" {
                    c.ingest(&e).await?;
                } else {
                    let t = Instant::now();
                    c.ingest_sync(vec![&e], Wait::Durable, t + Duration::from_secs(30))
                        .await?;
                    lat_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                sent += 1;
            }
            anyhow::Ok((sent, lat_us))
        }));
    }
    let (mut sent, mut lat_us) = (0u64, Vec::new());
    for t in tasks {
        let (s, l) = t.await??;
        sent += s;
        lat_us.extend(l);
    }
    client.close(Instant::now() + Duration::from_secs(60)).await;
    let secs = start.elapsed().as_secs_f64();
    let (client_cpu, server_cpu) = cpu.used()?;
    let lost = lost.load(Ordering::Relaxed);
    if lost > 0 {
        bail!("{lost} of {sent} entries were dropped or rejected");
    }
    lat_us.sort_unstable();
    let per_entry_us = |cpu: f64| crate::round2(cpu * 1e6 / sent.max(1) as f64);
    Ok(json!({
        "bench": "client",
        "mode": b.mode,
        "producers": b.producers,
        "max_delay_ms": b.max_delay.map(|d| d.as_secs_f64() * 1000.0),
        "in_flight": b.in_flight,
        "entries_per_sec": (sent as f64 / secs).round(),
        "p50_ms": crate::round2(crate::percentile(&lat_us, 0.5) as f64 / 1000.0),
        "p99_ms": crate::round2(crate::percentile(&lat_us, 0.99) as f64 / 1000.0),
        "client_cpu_us_per_entry": per_entry_us(client_cpu),
        "server_cpu_us_per_entry": server_cpu.map(per_entry_us),
        "client_to_server_cpu": server_cpu.map(|s| crate::round2(client_cpu / s.max(1e-9))),
    }))
}
