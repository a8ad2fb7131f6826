//! The reliability suite (issue 7): crash loops, a destination outage, poison
//! entries, overload — against the real binary, with SQLite and Postgres.
//! `make test` runs it CI-sized; `make chaos` (SPOOL_CHAOS=full) runs it long and
//! writes the rows of docs/reliability.md.
//!
//! Every entry carries a unique tag `t`; the load records, per tag, the id a 2xx
//! answered or that the request was refused (4xx/429/503). The checks then read
//! the destination back: every acknowledged tag once with its id, no refused tag.

mod common;

use common::*;
use serde_json::{json, Value};
use spool_testkit::PgServer;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn wal_verify(dir: &std::path::Path) {
    let (code, out, err) = spool(&["wal", "verify", "--dir", dir.join("wal").to_str().unwrap()]);
    assert_eq!(code, 0, "wal verify after SIGKILL: {out}{err}");
}

/// A Postgres destination at `pg` (its URL inline: these tests run in parallel,
/// each with its own server, so a shared environment variable would cross them).
fn pg_dest(pg: &PgServer) -> String {
    format!(
        "[[destination]]\nname = \"pg\"\nkind = \"postgres\"\nurl = \"{}\"\npool_size = 4\n",
        pg.url()
    )
}

/// SIGKILL at a random moment under mixed load, restart, check — `cycles` times.
fn crash_loop(name: &str, extra: &str) {
    let cycles = if full_chaos() { 20 } else { 3 };
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[queue]\ncapacity = 2000\n{extra}");
    let mut s = Server::start(dir.path(), &extra);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let started = Instant::now();
    for round in 0..cycles {
        let load = Load::start(&s, round, 6, true, seen.clone());
        let floor = load.acked() + 200;
        eventually(Duration::from_secs(60), "acknowledgements", || {
            load.acked() >= floor
        });
        std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 300));
        s.kill();
        load.finish();
        wal_verify(dir.path());
        s.launch(); // panics unless it comes up unaided within 30 s
        check(&s, &seen.lock().unwrap());
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.fivexx(), 0, "5xx answers: {:?}", seen.codes);
    report(json!({
        "scenario": format!("crash loop, {name}"),
        "load": "6 writers: 5-entry batches, keyed and unkeyed singles, invalid batches (400)",
        "cycles": format!("{cycles} × SIGKILL ({:.0} s)", started.elapsed().as_secs_f64()),
        "acknowledged": seen.acked.len(),
        "refused": seen.refused.len(),
        "lost": 0, "duplicates": 0, "5xx": seen.fivexx(),
        "codes": seen.codes,
        "result": "pass",
    }));
    assert!(s.terminate().success());
}

#[test]
fn crash_loop_sqlite_loses_nothing_acknowledged_and_stores_nothing_refused() {
    crash_loop("SQLite", "");
}

#[test]
fn crash_loop_postgres_loses_nothing_acknowledged_and_stores_nothing_refused() {
    let pg = PgServer::start();
    crash_loop("Postgres", &pg_dest(&pg));
}

/// A probe: one entry with wait=delivered; (status, latency).
fn probe(s: &Server) -> (u16, Duration) {
    let t = Instant::now();
    let r = s.post(
        "/v1/default/entries?wait=delivered&timeout_ms=1000",
        r#"{"probe":true}"#,
    );
    (r.status, t.elapsed())
}

#[test]
fn a_postgres_outage_under_load_sheds_with_429_and_delivers_everything_after() {
    let outage = Duration::from_secs(if full_chaos() { 30 } else { 5 });
    let mut pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[queue]\ncapacity = 1000\nbackoff_initial = \"50ms\"\nbackoff_max = \"500ms\"\nmax_attempts = 3\n{}",
        pg_dest(&pg)
    );
    let s = Server::start(dir.path(), &extra);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let load = Load::start(&s, 0, 6, false, seen.clone());
    let before: Vec<_> = (0..10).map(|_| probe(&s)).collect();
    assert!(before.iter().all(|(c, _)| *c == 200), "{before:?}");

    pg.stop();
    let t0 = Instant::now();
    let mut during = BTreeMap::<u16, u64>::new();
    while t0.elapsed() < outage {
        *during.entry(probe(&s).0).or_default() += 1;
    }
    let shed_during = seen.lock().unwrap().codes.get(&429).copied().unwrap_or(0);
    pg.restart();
    // Delivery latency recovers: a probe is delivered (200) within its 1 s again.
    let t1 = Instant::now();
    let mut recovered = None;
    while t1.elapsed() < Duration::from_secs(120) {
        let (code, took) = probe(&s);
        if code == 200 {
            recovered = Some(t1.elapsed());
            break;
        }
        assert!(
            matches!(code, 202 | 429),
            "a probe after the outage: {code} in {took:?}"
        );
    }
    let recovered = recovered.expect("delivery did not recover within 120 s");
    load.finish();
    let after: Vec<_> = (0..10).map(|_| probe(&s)).collect();
    assert!(after.iter().all(|(c, _)| *c == 200), "{after:?}");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.fivexx(), 0, "5xx during the outage: {:?}", seen.codes);
    assert!(shed_during > 0, "the queue never filled: {:?}", seen.codes);
    assert!(
        during.keys().all(|c| matches!(c, 202 | 429)),
        "probes during the outage: {during:?}"
    );
    check(&s, &seen);
    let dead = s.get("/v1/admin/dead-letters").body;
    assert_eq!(
        dead["dead_letters"],
        json!([]),
        "no dead letters from an outage"
    );
    let ms = |v: &[(u16, Duration)]| {
        let mut l: Vec<_> = v.iter().map(|(_, d)| d.as_secs_f64() * 1000.0).collect();
        l.sort_by(f64::total_cmp);
        (l[l.len() / 2] * 10.0).round() / 10.0
    };
    report(json!({
        "scenario": "Postgres stopped under load, then started",
        "load": "6 writers (mixed) + wait=delivered probes; queue capacity 1000",
        "cycles": format!("{} s outage; delivery back {:.1} s after restart", outage.as_secs(), recovered.as_secs_f64()),
        "acknowledged": seen.acked.len(),
        "lost": 0, "duplicates": 0, "5xx": seen.fivexx(),
        "codes": seen.codes,
        "probe_p50_ms_before": ms(&before), "probe_p50_ms_after": ms(&after),
        "dead_letters": 0,
        "result": "pass",
    }));
}

#[test]
fn poison_entries_are_dead_lettered_with_a_reason_and_requeue_after_the_fix() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[queue]\nbackoff_initial = \"20ms\"\nbackoff_max = \"100ms\"\n{}",
        pg_dest(&pg)
    );
    let s = Server::start(dir.path(), &extra);
    // The table exists once the destination has answered (the first contact
    // migrates it: /readyz says so); a constraint makes some entries poison.
    eventually(Duration::from_secs(30), "the destination migrated", || {
        s.get("/readyz").status == 200
    });
    psql(
        &pg,
        "ALTER TABLE spool_entries ADD CONSTRAINT no_poison CHECK (NOT (payload ? 'poison'))",
    );
    let mut good = Vec::new();
    let mut poison = Vec::new();
    for i in 0..20 {
        let body: Vec<Value> = (0..10)
            .map(|k| match k {
                3 if i % 4 == 0 => json!({"poison": true, "i": i}),
                _ => json!({"i": i, "k": k}),
            })
            .collect();
        let r = s.post(
            "/v1/default/entries",
            &Value::Array(body.clone()).to_string(),
        );
        assert_eq!(r.status, 202, "{r:?}");
        for (e, a) in body.iter().zip(r.body["entries"].as_array().unwrap()) {
            let id = a["id"].as_str().unwrap().to_owned();
            if e.get("poison").is_some() {
                poison.push(id)
            } else {
                good.push(id)
            }
        }
    }
    // The rest is not stalled: every good entry is delivered, each poison one dead.
    drained(&s, Duration::from_secs(60));
    for id in &good {
        assert_eq!(
            s.get(&format!("/v1/default/entries/{id}")).body["status"],
            "delivered"
        );
    }
    let dead = s.get("/v1/admin/dead-letters").body["dead_letters"]
        .as_array()
        .unwrap()
        .clone();
    let dead_ids: HashSet<_> = dead
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(dead_ids, poison.iter().cloned().collect::<HashSet<_>>());
    assert!(
        dead.iter()
            .all(|d| d["reason"].as_str().unwrap().contains("no_poison")),
        "reasons name the constraint: {dead:?}"
    );
    // Fix the destination, requeue: all delivered, no dead letters left.
    psql(&pg, "ALTER TABLE spool_entries DROP CONSTRAINT no_poison");
    let r = s.post("/v1/admin/dead-letters/requeue", r#"{"all":true}"#);
    assert_eq!(
        (r.status, r.body["requeued"].as_u64()),
        (200, Some(poison.len() as u64))
    );
    drained(&s, Duration::from_secs(60));
    for id in &poison {
        assert_eq!(
            s.get(&format!("/v1/default/entries/{id}")).body["status"],
            "delivered"
        );
    }
    assert_eq!(
        s.get("/v1/admin/dead-letters").body["dead_letters"],
        json!([])
    );
    report(json!({
        "scenario": "poison entries (a CHECK constraint in Postgres), then fixed and requeued",
        "load": "20 batches of 10, one poison entry in every 4th",
        "cycles": "1",
        "acknowledged": good.len() + poison.len(),
        "lost": 0, "duplicates": 0, "5xx": 0,
        "dead_letters": poison.len(),
        "result": "pass: poison isolated with its reason, the rest delivered, requeue delivered all",
    }));
}

#[test]
fn sustained_overload_keeps_memory_bounded() {
    let secs = if full_chaos() { 120 } else { 5 };
    let mut pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let capacity = if full_chaos() { 20_000 } else { 2_000 };
    let extra = format!(
        "[queue]\ncapacity = {capacity}\nbackoff_initial = \"50ms\"\nbackoff_max = \"500ms\"\n{}",
        pg_dest(&pg)
    );
    let s = Server::start(dir.path(), &extra);
    pg.stop(); // nothing drains: the queue fills and stays full
    let seen = Arc::new(Mutex::new(Seen::default()));
    let load = Load::start(&s, 0, 16, true, seen.clone());
    let rss0 = proc_kib(s.pid(), "VmRSS");
    // The measured window starts once the queue is full (the first 429).
    eventually(Duration::from_secs(120), "the queue fills", || {
        seen.lock().unwrap().codes.contains_key(&429)
    });
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        // wait=delivered callers pile up too: each is bounded by its timeout.
        let r = s.post(
            "/v1/default/entries?wait=delivered&timeout_ms=500",
            r#"{"w":1}"#,
        );
        assert!(matches!(r.status, 202 | 429), "{r:?}");
        samples.push(proc_kib(s.pid(), "VmRSS"));
        std::thread::sleep(Duration::from_millis(50)); // pacing of the sampler, not a wait
    }
    let peak = proc_kib(s.pid(), "VmHWM");
    load.finish();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.fivexx(), 0, "{:?}", seen.codes);
    // A bound with room: the queue holds up to 20,000 small entries; the server
    // must not grow with time under overload.
    let second_half_max = samples[samples.len() / 2..]
        .iter()
        .max()
        .copied()
        .unwrap_or(0);
    let first_half_max = samples[..samples.len() / 2]
        .iter()
        .max()
        .copied()
        .unwrap_or(0);
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB");
    assert!(
        second_half_max <= first_half_max + 32 * 1024,
        "RSS still growing: {first_half_max} KiB then {second_half_max} KiB"
    );
    report(json!({
        "scenario": "sustained overload (Postgres down, queue full)",
        "load": format!("16 writers (mixed, incl. invalid) + wait=delivered callers; queue capacity {capacity}"),
        "cycles": format!("{secs} s"),
        "acknowledged": seen.acked.len(),
        "lost": "—", "duplicates": "—", "5xx": seen.fivexx(),
        "codes": seen.codes,
        "rss_start_mib": rss0 / 1024, "rss_peak_mib": peak / 1024,
        "result": format!("pass: peak RSS {} MiB", peak / 1024),
    }));
}

/// The metric's value in /metrics (0 when absent).
fn metric(s: &Server, name: &str) -> u64 {
    let text = s.get("/metrics").body;
    text.as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn newest_segment(wal: &std::path::Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    segs.pop().expect("a segment")
}

#[test]
fn corruption_at_rest_a_torn_tail_is_cut_mid_log_damage_stops_and_skip_counts_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let log = dir.path().join("spool.log");
    let mut s = Server::start(dir.path(), "");
    // Entries with a findable mark, delivered, then a clean stop.
    let write_and_stop = |s: &mut Server, range: std::ops::Range<usize>| {
        for i in range {
            let r = s.post(
                "/v1/default/entries",
                &format!(r#"{{"i":{i},"mark":"entry-{i:04}-{}"}}"#, "p".repeat(500)),
            );
            assert_eq!(r.status, 202);
        }
        drained(s, Duration::from_secs(30));
        assert!(s.terminate().success());
    };
    write_and_stop(&mut s, 0..50);

    // 1. A torn tail (the newest segment cut mid-record): restarts unaided, cut and counted.
    let seg = newest_segment(&wal);
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    s.launch_logged(&log);
    let torn = metric(&s, "spool_wal_torn_tail_bytes");
    assert!(torn > 0, "torn tail not counted");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("truncating torn WAL tail"));
    assert_eq!(
        all_rows(&s, "default").len(),
        50,
        "delivered entries stay readable"
    );
    // New writes after the cut.
    write_and_stop(&mut s, 50..60);

    // 2. A flipped byte inside an entry in the middle of the log: startup stops,
    //    naming segment and offset; the file is untouched.
    let seg = newest_segment(&wal);
    let mut image = std::fs::read(&seg).unwrap();
    let at = image
        .windows(15)
        .position(|w| w == b"entry-0025-pppp")
        .expect("entry 25 in the segment");
    image[at + 12] ^= 0x20;
    std::fs::write(&seg, &image).unwrap();
    let out = std::process::Command::new(spool_bin())
        .args(["serve", "--config"])
        .arg(&s.config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let name = seg.file_name().unwrap().to_str().unwrap();
    assert!(!out.status.success(), "served over mid-log damage");
    assert!(err.contains(name) && err.contains("offset"), "{err}");
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        image,
        "a refused start changed the WAL"
    );

    // 3. on_corruption = "skip": starts, the loss counted in metrics and logged.
    let cfg = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        cfg.replace("[wal]\n", "[wal]\non_corruption = \"skip\"\n"),
    )
    .unwrap();
    s.launch_logged(&log);
    let skipped = metric(&s, "spool_wal_records_skipped");
    assert!(skipped >= 1, "skipped records not counted");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("skipping damaged record"));
    assert_eq!(
        s.post("/v1/default/entries", r#"{"after":"skip"}"#).status,
        202
    );
    assert!(s.terminate().success());
    report(json!({
        "scenario": "corruption at rest: torn tail; flipped byte mid-log (stop, then skip)",
        "load": "60 entries of 0.5 KiB, server stopped",
        "cycles": "1 each",
        "acknowledged": 60,
        "lost": "0 (torn tail); skip: counted",
        "duplicates": 0, "5xx": 0,
        "torn_tail_bytes": torn, "records_skipped": skipped,
        "result": "pass: torn tail cut on restart; mid-log damage refused with segment+offset; skip recovers and counts",
    }));
}
