//! `spool-bench`: spool's benchmark driver. Every result is one JSON object on
//! its own line, so runs can be compared (see docs/benchmarks.md).

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

#[derive(Parser)]
#[command(
    name = "spool-bench",
    about = "spool benchmarks; one JSON object per result line"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    let wal = Wal::open_with_observer(&dir, cfg.clone(), counts.clone())?;
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

async fn sink(
    kind: &str,
    url: Option<String>,
    path: Option<PathBuf>,
    rows: usize,
    batch: usize,
    record_bytes: usize,
    concurrency: usize,
) -> Result<serde_json::Value> {
    use spool_destination::{Destination, PostgresDestination, SqliteDestination};
    let tmp = tempfile::tempdir()?;
    let mut _server = None;
    let dest: Arc<dyn Destination> = match kind {
        "sqlite" => {
            let p = path.unwrap_or_else(|| tmp.path().join("sink.db"));
            Arc::new(SqliteDestination::open("bench", &p, None).await?)
        }
        "postgres" => {
            let url = match url {
                Some(u) => u,
                None => {
                    let s = spool_testkit::PgServer::start_with(true);
                    let u = s.url().to_owned();
                    _server = Some(s);
                    u
                }
            };
            Arc::new(PostgresDestination::open("bench", &url, Some(concurrency as u32 + 1)).await?)
        }
        other => bail!("--destination must be sqlite or postgres, got {other:?}"),
    };
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
