//! Heap bytes per queued entry, counted by the allocator: RSS moves by tens of
//! bytes per entry with allocator and checkpoint transients, too coarse to see
//! a structure shrink; live heap bytes (requested, so without the allocator's
//! own overhead) do not.
//!
//! The counter is on for this benchmark only ([`COUNTING`]); the other
//! benchmarks pay one relaxed load per allocation.

use anyhow::{bail, Result};
use serde_json::json;
use spool_wal::{Entry, Wal, WalConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::{Duration, Instant};

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting live bytes while [`COUNTING`] is on.
/// Written here rather than taken from a crate (stats_alloc, cap) because those
/// count always, with contended atomics in the HTTP load generator too.
pub struct Counting;

// A `GlobalAlloc` is an unsafe trait; each method forwards to `System` unchanged.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        }
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() && COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        q
    }
}

/// Live heap bytes counted since counting began (frees of blocks allocated
/// before it began make this an underestimate by at most those blocks).
fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Queue `entries` entries for a destination that is down (nothing is
/// delivered) and answer the heap bytes each costs: in the WAL's index alone
/// (appended straight to a WAL), and in the whole engine (WAL index, queue,
/// held set), after every entry is queued.
pub async fn queued_memory(
    base: &Path,
    entries: usize,
    record_bytes: usize,
) -> Result<serde_json::Value> {
    use spool_queue::{Engine, EngineConfig};
    if entries == 0 {
        bail!("--entries must be positive");
    }
    let dir = crate::fresh_dir(base, "queued-memory")?;
    let payload = crate::payload(record_bytes);
    let batch = |n: usize| -> Vec<Entry> {
        (0..n)
            .map(|_| Entry::new("bench", "main", payload.clone()))
            .collect()
    };
    let cfg = || WalConfig {
        sync: "never".parse().expect("a sync mode"),
        ..WalConfig::default()
    };

    // The WAL alone.
    let wal = Wal::open(dir.join("wal-only"), cfg())?;
    COUNTING.store(true, Ordering::SeqCst);
    let before = live();
    let mut left = entries;
    let mut ids = Vec::new();
    while left > 0 {
        let n = left.min(1000);
        let b = batch(n);
        ids.push(b[n / 2].id);
        wal.append(&b).await?;
        left -= n;
    }
    let wal_bytes = live() - before;
    COUNTING.store(false, Ordering::SeqCst);
    // Finding a queued entry by id (GET while pending), and an id not queued.
    let timed = |ids: &[uuid::Uuid], want: bool| -> Result<f64> {
        let start = Instant::now();
        for id in ids {
            if wal.lookup(*id).is_some() != want {
                bail!("lookup of {id} answered {}", !want);
            }
        }
        Ok(start.elapsed().as_secs_f64() * 1e6 / ids.len() as f64)
    };
    let lookup_us = timed(&ids, true)?;
    let absent: Vec<uuid::Uuid> = ids.iter().map(|_| uuid::Uuid::now_v7()).collect();
    let absent_lookup_us = timed(&absent, false)?;
    wal.close();

    // The engine, its one destination down (a closed port).
    let down = spool_destination::PostgresDestination::open(
        "main",
        "postgres://nobody@127.0.0.1:1/none",
        Some(1),
        Duration::from_millis(100),
    )?;
    let wal = Wal::open(dir.join("wal"), cfg())?;
    let engine = Engine::start(
        wal,
        vec![std::sync::Arc::new(down)],
        EngineConfig {
            capacity: entries + 1000,
            ..EngineConfig::default()
        },
    )?;
    COUNTING.store(true, Ordering::SeqCst);
    let before = live();
    let start = Instant::now();
    let mut left = entries;
    while left > 0 {
        let n = left.min(1000);
        engine.ingest(batch(n), false).await?;
        left -= n;
    }
    let ingest_secs = start.elapsed().as_secs_f64();
    let engine_bytes = live() - before;
    COUNTING.store(false, Ordering::SeqCst);
    let in_flight = engine.lanes()[0].in_flight;
    engine.shutdown(Duration::from_secs(5)).await;
    if in_flight != entries {
        bail!("{in_flight} of {entries} entries queued");
    }
    let per = |b: isize| (b as f64 / entries as f64 * 10.0).round() / 10.0;
    Ok(json!({
        "bench": "queued-memory",
        "entries": entries,
        "record_bytes": record_bytes,
        "wal_index_bytes_per_entry": per(wal_bytes),
        "engine_bytes_per_entry": per(engine_bytes),
        "lookup_us": crate::round2(lookup_us),
        "absent_lookup_us": crate::round2(absent_lookup_us),
        "ingest_secs": crate::round2(ingest_secs),
    }))
}
