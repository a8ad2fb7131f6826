//! Prometheus metrics of SPEC "Metrics", fed by the engine's and the WAL's
//! observer hooks and, for gauges, read at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use spool_queue::Engine;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceL {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestL {
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailedL {
    destination: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpL {
    route: String,
    code: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

fn group_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

/// spool's Prometheus registry: the engine's and the WAL's observer, and the
/// HTTP layer's request counter.
pub struct Metrics {
    registry: Registry,
    accepted: Family<SourceL, Counter>,
    shed: Family<SourceL, Counter>,
    delivered: Family<DestL, Counter>,
    retries: Family<DestL, Counter>,
    duplicates: Family<DestL, Counter>,
    failed: Family<FailedL, Counter>,
    depth: Family<DestL, Gauge>,
    capacity: Family<DestL, Gauge>,
    up: Family<DestL, Gauge>,
    delivery_seconds: Family<DestL, Histogram, fn() -> Histogram>,
    wal_bytes: Gauge,
    wal_segments: Gauge,
    wal_pending: Gauge,
    wal_fsync: Histogram,
    wal_group: Histogram,
    http: Family<HttpL, Counter>,
    /// Entries lost to corruption skipped at recovery (on_corruption = "skip").
    wal_lost: Gauge,
    wal_skipped: Gauge,
    wal_torn: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            accepted: Family::default(),
            shed: Family::default(),
            delivered: Family::default(),
            retries: Family::default(),
            duplicates: Family::default(),
            failed: Family::default(),
            depth: Family::default(),
            capacity: Family::default(),
            up: Family::default(),
            delivery_seconds: Family::new_with_constructor(latency_histogram),
            wal_bytes: Gauge::default(),
            wal_segments: Gauge::default(),
            wal_pending: Gauge::default(),
            wal_fsync: latency_histogram(),
            wal_group: group_histogram(),
            http: Family::default(),
            wal_lost: Gauge::default(),
            wal_skipped: Gauge::default(),
            wal_torn: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "spool_entries_accepted",
            "Entries accepted (durable in the WAL)",
            m.accepted.clone(),
        );
        r.register(
            "spool_entries_shed",
            "Entries refused with 429 (nothing written)",
            m.shed.clone(),
        );
        r.register(
            "spool_entries_delivered",
            "Entries delivered to a destination",
            m.delivered.clone(),
        );
        r.register(
            "spool_delivery_retries",
            "Batch deliveries retried",
            m.retries.clone(),
        );
        r.register(
            "spool_destination_duplicates",
            "Delivered entries the destination already held (a redelivery, or a keyed entry another node stored first): dropped there",
            m.duplicates.clone(),
        );
        r.register(
            "spool_entries_failed",
            "Entries that became dead letters, by reason",
            m.failed.clone(),
        );
        r.register(
            "spool_queue_depth",
            "Entries accepted and not yet delivered or failed",
            m.depth.clone(),
        );
        r.register(
            "spool_queue_capacity",
            "Queue capacity in entries",
            m.capacity.clone(),
        );
        r.register(
            "spool_destination_up",
            "1 while the destination is reachable",
            m.up.clone(),
        );
        r.register(
            "spool_delivery_seconds",
            "Accept to delivered, seconds",
            m.delivery_seconds.clone(),
        );
        r.register(
            "spool_wal_bytes",
            "Bytes of all WAL segments",
            m.wal_bytes.clone(),
        );
        r.register(
            "spool_wal_segments",
            "WAL segment files",
            m.wal_segments.clone(),
        );
        r.register(
            "spool_wal_pending_entries",
            "Entries pending delivery in the WAL",
            m.wal_pending.clone(),
        );
        r.register(
            "spool_wal_fsync_seconds",
            "Duration of WAL fdatasyncs",
            m.wal_fsync.clone(),
        );
        r.register(
            "spool_wal_group_size",
            "Appends sharing one WAL write and fdatasync",
            m.wal_group.clone(),
        );
        r.register(
            "spool_http_requests",
            "HTTP requests by route and status code",
            m.http.clone(),
        );
        r.register(
            "spool_wal_entries_lost",
            "Entries lost to corruption skipped at the last recovery (on_corruption = skip)",
            m.wal_lost.clone(),
        );
        r.register(
            "spool_wal_records_skipped",
            "Records (entries or markers) skipped as damaged at the last recovery (on_corruption = skip; at most, from the LSN gap)",
            m.wal_skipped.clone(),
        );
        r.register(
            "spool_wal_torn_tail_bytes",
            "Bytes of a torn tail cut off at the last recovery",
            m.wal_torn.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    /// The text exposition, with gauges read from the engine now.
    pub fn render(&self, engine: &Engine) -> String {
        for l in engine.lanes() {
            let d = DestL {
                destination: l.destination.clone(),
            };
            self.depth.get_or_create(&d).set(l.in_flight as i64);
            self.capacity.get_or_create(&d).set(l.capacity as i64);
            self.up.get_or_create(&d).set(i64::from(l.up));
        }
        let st = engine.wal_status();
        self.wal_bytes.set(st.bytes as i64);
        self.wal_segments.set(st.segments as i64);
        self.wal_pending.set(st.pending as i64);
        let rep = engine.recovery_report();
        self.wal_lost.set(rep.lost_entries as i64);
        self.wal_skipped.set(rep.skipped_records as i64);
        self.wal_torn
            .set(rep.torn_tail.as_ref().map_or(0, |t| t.bytes) as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// One HTTP request answered.
    pub fn http_request(&self, route: &str, code: u16) {
        self.http
            .get_or_create(&HttpL {
                route: route.to_owned(),
                code: code.to_string(),
            })
            .inc();
    }
}

impl spool_queue::EngineObserver for Metrics {
    fn accepted(&self, source: &str, n: u64) {
        self.accepted
            .get_or_create(&SourceL {
                source: source.into(),
            })
            .inc_by(n);
    }
    fn shed(&self, source: &str, n: u64) {
        self.shed
            .get_or_create(&SourceL {
                source: source.into(),
            })
            .inc_by(n);
    }
    fn delivered(&self, destination: &str, accepted_at_us: &[i64]) {
        let d = DestL {
            destination: destination.into(),
        };
        self.delivered
            .get_or_create(&d)
            .inc_by(accepted_at_us.len() as u64);
        let now = spool_wal::now_us();
        let h = self.delivery_seconds.get_or_create(&d);
        for a in accepted_at_us {
            h.observe((now - a).max(0) as f64 / 1e6);
        }
    }
    fn duplicates(&self, destination: &str, n: u64) {
        self.duplicates
            .get_or_create(&DestL {
                destination: destination.into(),
            })
            .inc_by(n);
    }

    fn retry(&self, destination: &str) {
        self.retries
            .get_or_create(&DestL {
                destination: destination.into(),
            })
            .inc();
    }
    fn failed(&self, destination: &str, reason: &'static str, n: u64) {
        self.failed
            .get_or_create(&FailedL {
                destination: destination.into(),
                reason: reason.into(),
            })
            .inc_by(n);
    }
    fn destination_up(&self, destination: &str, up: bool) {
        self.up
            .get_or_create(&DestL {
                destination: destination.into(),
            })
            .set(i64::from(up));
    }
}

impl spool_wal::WalObserver for Metrics {
    fn fsync(&self, d: Duration) {
        self.wal_fsync.observe(d.as_secs_f64());
    }
    fn group(&self, appends: usize, _records: usize) {
        self.wal_group.observe(appends as f64);
    }
}

/// OpenMetrics text → Prometheus text format 0.0.4: counters are declared by
/// their sample name (`…_total`), `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for l in openmetrics.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for l in openmetrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = l
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| l.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{kind}{name}_total {tail}\n"));
                } else {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_declares_counters_by_their_sample_name() {
        let om = "# HELP spool_x Things.\n# TYPE spool_x counter\nspool_x_total{a=\"b\"} 3\n# TYPE spool_g gauge\nspool_g 1\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP spool_x_total Things.\n# TYPE spool_x_total counter\nspool_x_total{a=\"b\"} 3\n# TYPE spool_g gauge\nspool_g 1\n"
        );
    }
}
