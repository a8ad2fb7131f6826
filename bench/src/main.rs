//! `spool-bench`: spool's benchmark driver. Every result is one JSON object on
//! its own line, so runs can be compared (see docs/benchmarks.md).

mod client;
mod memory;
mod recall;
mod scrape;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use spool_wal::{Entry, Wal, WalConfig, WalObserver};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts live heap bytes for `queued-memory` (off otherwise).
#[global_allocator]
static ALLOC: memory::Counting = memory::Counting;

#[derive(Parser)]
#[command(
    name = "spool-bench",
    about = "spool benchmarks; one JSON object per result line"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The running server a load goes to.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// Server base URL, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    pub url: String,
    /// Source to post to.
    #[arg(long, default_value = "default")]
    pub source: String,
    /// Bearer token of the source.
    #[arg(long)]
    pub token: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Concurrent durable appends to the WAL (group commit), per appender count.
    Wal {
        /// Directory for the WAL (a fresh subdirectory per run is made in it).
        #[arg(long)]
        dir: PathBuf,
        /// Comma-separated appender counts.
        #[arg(long, default_value = "1,16,256", value_delimiter = ',')]
        appenders: Vec<usize>,
        /// Payload bytes per record.
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
        /// Seconds per appender count.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// WAL sync mode.
        #[arg(long, default_value = "always")]
        sync: String,
        /// Also measure raw write+fdatasync at the same group sizes.
        #[arg(long)]
        baseline: bool,
    },
    /// Reopen time of a WAL holding N pending entries, and scan speed.
    WalRecovery {
        /// Directory for the WAL.
        #[arg(long)]
        dir: PathBuf,
        /// Pending entries to write before reopening.
        #[arg(long, default_value_t = 1_000_000)]
        entries: usize,
        /// Payload bytes per record.
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
        /// Mark every entry delivered before reopening: measures the pure scan.
        #[arg(long)]
        delivered: bool,
    },
    /// Batched writes straight into a destination.
    Sink {
        /// `sqlite` or `postgres`.
        #[arg(long)]
        destination: String,
        /// Postgres URL; without it a throwaway local server is started (fsync on).
        #[arg(long)]
        url: Option<String>,
        /// SQLite file; without it a temp file.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Rows to write.
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        /// Rows per batch (one transaction each).
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Payload bytes per row.
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
        /// Batches written concurrently.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Search latency (text, vector, hybrid) over N memories of D dims, and recall@10.
    Recall {
        /// `sqlite` or `postgres`.
        #[arg(long)]
        destination: String,
        /// Postgres URL; without it a throwaway local server is started.
        #[arg(long)]
        url: Option<String>,
        /// SQLite file; without it a temp file.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Memories stored before searching.
        #[arg(long, default_value_t = 100_000)]
        memories: usize,
        /// Embedding dimensions.
        #[arg(long, default_value_t = 384)]
        dims: usize,
        /// Searches per mode.
        #[arg(long, default_value_t = 50)]
        queries: usize,
    },
    /// HTTP ingest against a running server: closed loop, or open loop with --rate.
    Http {
        #[command(flatten)]
        target: Target,
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Entries per request.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Requests per second across all connections (open loop); latency is
        /// measured from each request's scheduled time (no coordinated omission).
        #[arg(long)]
        rate: Option<f64>,
        /// Payload bytes per entry.
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
        /// Also read the server's /metrics: delivered entries/s, queue depth over
        /// the run, and accept → delivered latency (bucket bounds).
        #[arg(long)]
        delivery: bool,
    },
    /// spool-client against a running server: fire-and-forget entries/s, or
    /// ingest_sync latency; with --server-pid, client CPU per entry ÷ server's.
    Client {
        #[command(flatten)]
        target: Target,
        /// `fire` (ingest, then close) or `sync` (ingest_sync of one entry per call).
        #[arg(long, default_value = "fire", value_parser = ["fire", "sync"])]
        mode: String,
        /// Concurrent producer tasks sharing one client.
        #[arg(long, default_value_t = 64)]
        producers: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Payload bytes per entry.
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
        /// The server's process id, to read its CPU time.
        #[arg(long)]
        server_pid: Option<u32>,
        /// The client's `max_delay` in ms (default: the client's default).
        #[arg(long)]
        max_delay_ms: Option<f64>,
        /// The client's `max_in_flight` (default: the client's default).
        #[arg(long)]
        in_flight: Option<usize>,
    },
    /// Heap bytes per queued entry (destination down), counted by the allocator.
    QueuedMemory {
        /// Directory for the WALs.
        #[arg(long)]
        dir: PathBuf,
        /// Entries to queue.
        #[arg(long, default_value_t = 1_000_000)]
        entries: usize,
        /// Payload bytes per entry.
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
    },
    /// The in-process engine, sustained: ingest → WAL → queue → destination.
    Engine {
        /// Directory for the WAL (and the SQLite file).
        #[arg(long)]
        dir: PathBuf,
        /// Concurrent producer tasks.
        #[arg(long, default_value_t = 64)]
        producers: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// `sqlite` or `postgres` (a throwaway local server, fsync on).
        #[arg(long, default_value = "sqlite")]
        destination: String,
        /// Entries per ingest call.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Payload bytes per entry.
        #[arg(long, default_value_t = 256)]
        record_bytes: usize,
        /// WAL sync mode.
        #[arg(long, default_value = "always")]
        sync: String,
        /// Worker tasks of the destination.
        #[arg(long, default_value_t = 4)]
        workers: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Wal {
            dir,
            appenders,
            record_bytes,
            seconds,
            sync,
            baseline,
        } => {
            let cfg = WalConfig {
                sync: sync.parse().context("--sync")?,
                ..WalConfig::default()
            };
            if appenders.is_empty() || appenders.contains(&0) {
                bail!("--appenders needs positive counts");
            }
            let secs = Duration::from_secs_f64(seconds);
            for n in appenders {
                let raw = if baseline {
                    let r = raw_fdatasync(&dir, n, record_bytes, secs)?;
                    println!("{}", r);
                    r["records_per_sec"].as_f64()
                } else {
                    None
                };
                let mut r = wal_bench(&dir, &cfg, n, record_bytes, secs)?;
                if let Some(raw) = raw {
                    r["efficiency"] = json!(round2(r["records_per_sec"].as_f64().unwrap() / raw));
                }
                println!("{r}");
            }
            Ok(())
        }
        Cmd::WalRecovery {
            dir,
            entries,
            record_bytes,
            delivered,
        } => {
            println!("{}", wal_recovery(&dir, entries, record_bytes, delivered)?);
            Ok(())
        }
        Cmd::Recall {
            destination,
            url,
            path,
            memories,
            dims,
            queries,
        } => {
            if memories == 0 || dims == 0 || queries == 0 {
                bail!("--memories, --dims and --queries must be positive");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let lines = rt.block_on(recall::recall(
                &destination,
                url,
                path,
                memories,
                dims,
                queries,
            ))?;
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }
        Cmd::Sink {
            destination,
            url,
            path,
            rows,
            batch,
            record_bytes,
            concurrency,
        } => {
            if batch == 0 || rows == 0 || concurrency == 0 {
                bail!("--rows, --batch and --concurrency must be positive");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let r = rt.block_on(sink(
                &destination,
                url,
                path,
                rows,
                batch,
                record_bytes,
                concurrency,
            ))?;
            println!("{r}");
            Ok(())
        }
        Cmd::Http {
            target,
            connections,
            batch,
            seconds,
            rate,
            record_bytes,
            delivery,
        } => {
            if connections == 0 || batch == 0 || seconds <= 0.0 || rate.is_some_and(|r| r <= 0.0) {
                bail!("--connections, --batch, --seconds and --rate must be positive");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let spec = HttpBench {
                target,
                connections,
                batch,
                seconds: Duration::from_secs_f64(seconds),
                rate,
                record_bytes,
                delivery,
            };
            println!("{}", rt.block_on(http_bench(spec))?);
            Ok(())
        }
        Cmd::Client {
            target,
            mode,
            producers,
            seconds,
            record_bytes,
            server_pid,
            max_delay_ms,
            in_flight,
        } => {
            if producers == 0 || seconds <= 0.0 {
                bail!("--producers and --seconds must be positive");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let spec = client::ClientBench {
                target,
                mode,
                producers,
                seconds: Duration::from_secs_f64(seconds),
                record_bytes,
                server_pid,
                max_delay: max_delay_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
                in_flight,
            };
            println!("{}", rt.block_on(client::client_bench(spec))?);
            Ok(())
        }
        Cmd::QueuedMemory {
            dir,
            entries,
            record_bytes,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            println!(
                "{}",
                rt.block_on(memory::queued_memory(&dir, entries, record_bytes))?
            );
            Ok(())
        }
        Cmd::Engine {
            dir,
            producers,
            seconds,
            destination,
            batch,
            record_bytes,
            sync,
            workers,
        } => {
            if producers == 0 || batch == 0 || workers == 0 || seconds <= 0.0 {
                bail!("--producers, --batch, --workers and --seconds must be positive");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let spec = EngineBench {
                producers,
                seconds: Duration::from_secs_f64(seconds),
                batch,
                record_bytes,
                sync: sync.parse().context("--sync")?,
                workers,
            };
            let r = rt.block_on(engine_bench(&dir, &destination, spec))?;
            println!("{r}");
            Ok(())
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn payload(bytes: usize) -> Vec<u8> {
    let mut p = br#"{"pad":""#.to_vec();
    p.resize(bytes.saturating_sub(2).max(p.len()), b'x');
    p.extend_from_slice(br#""}"#);
    p
}

fn fresh_dir(base: &Path, name: &str) -> Result<PathBuf> {
    let d = base.join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d)?;
    }
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[derive(Default)]
struct Counts {
    fsyncs: AtomicU64,
}

impl WalObserver for Counts {
    fn fsync(&self, _: Duration) {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
    }
}

fn wal_bench(
    base: &Path,
    cfg: &WalConfig,
    appenders: usize,
    record_bytes: usize,
    secs: Duration,
) -> Result<serde_json::Value> {
    let dir = fresh_dir(base, &format!("wal-{appenders}"))?;
    let counts = Arc::new(Counts::default());
    let hooks = spool_wal::WalHooks {
        observer: counts.clone(),
        ..Default::default()
    };
    let wal = Wal::open_with(&dir, cfg.clone(), hooks)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let payload = payload(record_bytes);
    let (lat, elapsed) = rt.block_on(async {
        let start = Instant::now();
        let deadline = start + secs;
        let mut tasks = Vec::new();
        for _ in 0..appenders {
            let (wal, payload) = (wal.clone(), payload.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let e = Entry::new("bench", "main", payload.clone());
                    let t = Instant::now();
                    wal.append(std::slice::from_ref(&e)).await?;
                    lat.push(t.elapsed().as_micros() as u32);
                }
                anyhow::Ok(lat)
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        anyhow::Ok((all, start.elapsed()))
    })?;
    wal.close();
    drop(wal);
    std::fs::remove_dir_all(&dir)?;
    let mut lat = lat;
    lat.sort_unstable();
    let s = elapsed.as_secs_f64();
    Ok(json!({
        "bench": "wal",
        "appenders": appenders,
        "record_bytes": record_bytes,
        "records_per_sec": (lat.len() as f64 / s).round(),
        "fsyncs_per_sec": (counts.fsyncs.load(Ordering::Relaxed) as f64 / s).round(),
        "p50_us": percentile(&lat, 0.50),
        "p99_us": percentile(&lat, 0.99),
    }))
}

/// The disk's own figure: one thread appends `group` records of the WAL's frame
/// size with one `write`, then one `fdatasync`, in a loop.
fn raw_fdatasync(
    base: &Path,
    group: usize,
    record_bytes: usize,
    secs: Duration,
) -> Result<serde_json::Value> {
    let dir = fresh_dir(base, &format!("raw-{group}"))?;
    let path = dir.join("raw.dat");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    // Same bytes per record as a WAL frame of an Entry with this payload.
    let frame = spool_wal::format::FRAME_HEADER_LEN
        + Entry::new("bench", "main", payload(record_bytes)).encoded_len();
    let buf = vec![0xA5u8; frame * group];
    let start = Instant::now();
    let (mut off, mut syncs, mut lat) = (0u64, 0u64, Vec::new());
    while start.elapsed() < secs {
        let t = Instant::now();
        f.write_all_at(&buf, off)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_micros() as u32);
        off += buf.len() as u64;
        syncs += 1;
    }
    let s = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_dir_all(&dir)?;
    lat.sort_unstable();
    Ok(json!({
        "bench": "raw_fdatasync",
        "group": group,
        "record_bytes": record_bytes,
        "records_per_sec": ((syncs as usize * group) as f64 / s).round(),
        "fsyncs_per_sec": (syncs as f64 / s).round(),
        "p50_us": percentile(&lat, 0.50),
        "p99_us": percentile(&lat, 0.99),
    }))
}

fn wal_recovery(
    base: &Path,
    entries: usize,
    record_bytes: usize,
    delivered: bool,
) -> Result<serde_json::Value> {
    let dir = fresh_dir(base, "wal-recovery")?;
    let cfg = WalConfig {
        sync: spool_wal::SyncMode::Never,
        ..WalConfig::default()
    };
    let wal = Wal::open(&dir, cfg.clone())?;
    let payload = payload(record_bytes);
    let batch = 1000;
    let mut written = 0;
    while written < entries {
        let n = batch.min(entries - written);
        let es: Vec<Entry> = (0..n)
            .map(|_| Entry::new("bench", "main", payload.clone()))
            .collect();
        let lsns = wal.append_blocking(&es)?;
        if delivered {
            let rt = tokio::runtime::Builder::new_current_thread().build()?;
            rt.block_on(wal.mark_delivered(&lsns))?;
        }
        written += n;
    }
    wal.close();
    drop(wal);
    let t = Instant::now();
    let wal = Wal::open(&dir, cfg)?;
    let open = t.elapsed().as_secs_f64();
    let rep = wal.recovery_report().clone();
    let pending = wal.status().pending;
    wal.close();
    drop(wal);
    std::fs::remove_dir_all(&dir)?;
    Ok(json!({
        "bench": "wal_recovery",
        "entries": entries,
        "delivered": delivered,
        "pending": pending,
        "bytes_scanned": rep.bytes_scanned,
        "open_seconds": (open * 1000.0).round() / 1000.0,
        "scan_bytes_per_sec": (rep.bytes_scanned as f64 / open).round(),
    }))
}

/// Destination for a bench: SQLite at `sqlite_path`, or Postgres at `url` (or a
/// throwaway durable local server, returned to keep it alive).
async fn bench_destination(
    kind: &str,
    url: Option<String>,
    sqlite_path: &Path,
    pool: u32,
) -> Result<(
    Arc<dyn spool_destination::Destination>,
    Option<spool_testkit::PgServer>,
)> {
    use spool_destination::{PostgresDestination, SqliteDestination};
    Ok(match kind {
        "sqlite" => (
            Arc::new(SqliteDestination::open(
                "bench",
                sqlite_path,
                None,
                spool_destination::DEFAULT_SQLITE_TIMEOUT,
            )?),
            None,
        ),
        "postgres" => {
            let (url, server) = match url {
                Some(u) => (u, None),
                None => {
                    let s = spool_testkit::PgServer::start_with(true);
                    (s.url().to_owned(), Some(s))
                }
            };
            (
                Arc::new(PostgresDestination::open(
                    "bench",
                    &url,
                    Some(pool),
                    spool_destination::DEFAULT_TIMEOUT,
                )?),
                server,
            )
        }
        other => bail!("--destination must be sqlite or postgres, got {other:?}"),
    })
}

struct HttpBench {
    target: Target,
    connections: usize,
    batch: usize,
    seconds: Duration,
    rate: Option<f64>,
    record_bytes: usize,
    delivery: bool,
}

#[derive(Default)]
struct HttpCounts {
    accepted: u64,
    shed: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

/// One keep-alive HTTP/1.1 connection per task (hyper's connection API: no pool,
/// so the client adds as little as possible to what is measured).
async fn http_bench(b: HttpBench) -> Result<serde_json::Value> {
    let uri: hyper::Uri = b.target.url.parse().context("--url")?;
    let host = uri.host().context("--url needs a host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let path = format!("/v1/{}/entries", b.target.source);
    let entry = String::from_utf8(payload(b.record_bytes))?;
    let body = bytes::Bytes::from(if b.batch == 1 {
        entry
    } else {
        format!("[{}]", vec![entry; b.batch].join(","))
    });
    let before = match b.delivery {
        true => Some(scrape::scrape(&host, port).await?),
        false => None,
    };
    let start = tokio::time::Instant::now();
    let end = start + b.seconds;
    // Queue depth over the run, every 500 ms.
    let sampler = b.delivery.then(|| {
        let host = host.clone();
        tokio::spawn(async move {
            let mut depths = Vec::new();
            while tokio::time::Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(500)).await;
                depths.push(scrape::scrape(&host, port).await?.depth);
            }
            anyhow::Ok(depths)
        })
    });
    let mut tasks = Vec::new();
    for c in 0..b.connections {
        let (host, path, body, token) = (
            host.clone(),
            path.clone(),
            body.clone(),
            b.target.token.clone(),
        );
        let per_conn = b.rate.map(|r| r / b.connections as f64);
        let batch = b.batch as u64;
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut counts = HttpCounts::default();
            // Open loop: request k of this connection is due at start + (k + c/N)/rate.
            let offset = c as f64 / b.connections as f64;
            for k in 0u64.. {
                let due = match per_conn {
                    Some(r) => start + Duration::from_secs_f64((k as f64 + offset) / r),
                    None => tokio::time::Instant::now(),
                };
                if due >= end {
                    break;
                }
                // Closed loop: no sleep at all — tokio's timer has a 1 ms tick, and
                // `sleep_until(now)` cost every request up to a millisecond.
                if per_conn.is_some() && due > tokio::time::Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                let mut req = hyper::Request::post(path.as_str())
                    .header("host", format!("{host}:{port}"))
                    .header("content-type", "application/json");
                if let Some(t) = &token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let req = req.body(http_body_util::Full::new(body.clone()))?;
                send.ready().await?;
                let resp = send.send_request(req).await?;
                let status = resp.status().as_u16();
                http_body_util::BodyExt::collect(resp.into_body()).await?;
                counts
                    .latencies_us
                    .push(due.elapsed().as_micros().min(u32::MAX as u128) as u32);
                match status {
                    200 | 202 => counts.accepted += batch,
                    429 => counts.shed += batch,
                    _ => counts.errors += 1,
                }
            }
            anyhow::Ok(counts)
        }));
    }
    let mut all = HttpCounts::default();
    for t in tasks {
        let c = t.await??;
        all.accepted += c.accepted;
        all.shed += c.shed;
        all.errors += c.errors;
        all.latencies_us.extend(c.latencies_us);
    }
    let secs = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let mut out = json!({
        "bench": "http",
        "connections": b.connections,
        "batch": b.batch,
        "rate": b.rate,
        "accepted_per_sec": (all.accepted as f64 / secs).round(),
        "shed": all.shed,
        "errors": all.errors,
        "p50_ms": round2(percentile(&all.latencies_us, 0.5) as f64 / 1000.0),
        "p99_ms": round2(percentile(&all.latencies_us, 0.99) as f64 / 1000.0),
    });
    if let (Some(before), Some(sampler)) = (before, sampler) {
        let after = scrape::scrape(&host, port).await?;
        let depths = sampler.await??;
        let half = depths.len() / 2;
        let max = |d: &[f64]| d.iter().copied().fold(0.0, f64::max);
        let ms = |p| scrape::percentile(&before, &after, p).map(|s| round2(s * 1000.0));
        out["delivered_per_sec"] = json!(((after.delivered - before.delivered) / secs).round());
        out["queue_depth_max_first_half"] = json!(max(&depths[..half]));
        out["queue_depth_max_second_half"] = json!(max(&depths[half..]));
        out["queue_depth_end"] = json!(after.depth);
        out["delivery_p50_ms_at_most"] = json!(ms(0.5));
        out["delivery_p99_ms_at_most"] = json!(ms(0.99));
    }
    Ok(out)
}

struct EngineBench {
    producers: usize,
    seconds: Duration,
    batch: usize,
    record_bytes: usize,
    sync: spool_wal::SyncMode,
    workers: usize,
}

/// Delivered entries and their accept→delivered latencies (µs).
#[derive(Default)]
struct Deliveries {
    count: AtomicU64,
    latencies_us: std::sync::Mutex<Vec<u32>>,
}

impl spool_queue::EngineObserver for Deliveries {
    fn delivered(&self, _: &str, accepted_at_us: &[i64]) {
        let now = spool_wal::now_us();
        self.count
            .fetch_add(accepted_at_us.len() as u64, Ordering::Relaxed);
        let mut l = self.latencies_us.lock().unwrap();
        l.extend(
            accepted_at_us
                .iter()
                .map(|a| (now - a).clamp(0, u32::MAX as i64) as u32),
        );
    }
}

async fn engine_bench(base: &Path, kind: &str, b: EngineBench) -> Result<serde_json::Value> {
    use spool_queue::{Engine, EngineConfig, IngestError};
    let dir = fresh_dir(base, "engine")?;
    let (dest, _server) =
        bench_destination(kind, None, &dir.join("bench.db"), b.workers as u32 + 1).await?;
    let wal = Wal::open(
        dir.join("wal"),
        WalConfig {
            sync: b.sync,
            ..WalConfig::default()
        },
    )?;
    let seen = Arc::new(Deliveries::default());
    let cfg = EngineConfig {
        workers: b.workers,
        ..EngineConfig::default()
    };
    let engine = Engine::start_with_observer(wal, vec![dest], cfg, seen.clone())?;
    let payload = payload(b.record_bytes);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (accepted, shed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..b.producers {
        let (engine, stop, payload) = (engine.clone(), stop.clone(), payload.clone());
        let (accepted, shed) = (accepted.clone(), shed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let entries = (0..b.batch)
                    .map(|_| Entry::new("bench", "bench", payload.clone()))
                    .collect();
                match engine.ingest(entries, false).await {
                    Ok(_) => accepted.fetch_add(b.batch as u64, Ordering::Relaxed),
                    Err(IngestError::Full { .. }) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        shed.fetch_add(b.batch as u64, Ordering::Relaxed)
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                };
            }
            Ok(())
        }));
    }
    let start = Instant::now();
    let mut max_depth = 0;
    let mut depth_samples = Vec::new();
    while start.elapsed() < b.seconds {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let d = engine.lanes()[0].in_flight;
        max_depth = max_depth.max(d);
        depth_samples.push(d);
    }
    let delivered_in_window = seen.count.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let accepted = accepted.load(Ordering::Relaxed);
    engine.shutdown(Duration::from_secs(60)).await;
    let mut lat = std::mem::take(&mut *seen.latencies_us.lock().unwrap());
    lat.sort_unstable();
    // Flat queue: the depth in the last quarter is not above the first quarter's peak.
    let q = depth_samples.len() / 4;
    let early = depth_samples[..q.max(1)].iter().max().copied().unwrap_or(0);
    let late = depth_samples[depth_samples.len() - q.max(1)..]
        .iter()
        .max()
        .copied()
        .unwrap_or(0);
    Ok(json!({
        "bench": "engine",
        "destination": kind,
        "producers": b.producers,
        "batch": b.batch,
        "sync": format!("{:?}", b.sync),
        "accepted_per_sec": (accepted as f64 / elapsed).round(),
        "delivered_per_sec": (delivered_in_window as f64 / elapsed).round(),
        "shed": shed.load(Ordering::Relaxed),
        "max_queue_depth": max_depth,
        "queue_depth_early_late": [early, late],
        "p50_delivery_ms": round2(percentile(&lat, 0.5) as f64 / 1000.0),
        "p99_delivery_ms": round2(percentile(&lat, 0.99) as f64 / 1000.0),
    }))
}

async fn sink(
    kind: &str,
    url: Option<String>,
    path: Option<PathBuf>,
    rows: usize,
    batch: usize,
    record_bytes: usize,
    concurrency: usize,
) -> Result<serde_json::Value> {
    let tmp = tempfile::tempdir()?;
    let path = path.unwrap_or_else(|| tmp.path().join("sink.db"));
    let (dest, _server) = bench_destination(kind, url, &path, concurrency as u32 + 1).await?;
    let payload = payload(record_bytes);
    let batches: Vec<Vec<spool_wal::LoggedEntry>> = (0..rows)
        .map(|i| spool_wal::LoggedEntry {
            lsn: i as u64 + 1,
            entry: Entry::new("bench", "bench", payload.clone()),
        })
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(<[_]>::to_vec)
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (dest, queue) = (dest.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(b) = queue.lock().unwrap().pop() else {
                    return anyhow::Ok(());
                };
                dest.write_batch(&b).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    dest.close().await;
    Ok(json!({
        "bench": "sink",
        "destination": kind,
        "rows": rows,
        "batch": batch,
        "concurrency": concurrency,
        "record_bytes": record_bytes,
        "rows_per_sec": (rows as f64 / secs).round(),
    }))
}
