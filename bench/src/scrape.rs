//! Read a running server's `/metrics` (for `spool-bench http --delivery`):
//! delivered entries, queue depth and the accept → delivered histogram, summed
//! over destinations.

use anyhow::{Context, Result};

/// One reading of the server's delivery metrics.
#[derive(Default, Clone)]
pub struct Snapshot {
    pub delivered: f64,
    pub depth: f64,
    /// `spool_delivery_seconds` buckets: (upper bound, cumulative count).
    pub buckets: Vec<(f64, f64)>,
}

fn value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

/// The `le` label of a bucket line.
fn le(line: &str) -> Option<f64> {
    let at = line.find("le=\"")? + 4;
    let end = line[at..].find('"')? + at;
    match &line[at..end] {
        "+Inf" => Some(f64::INFINITY),
        v => v.parse().ok(),
    }
}

pub fn parse(text: &str) -> Snapshot {
    let mut s = Snapshot::default();
    for line in text.lines() {
        if line.starts_with("spool_entries_delivered_total{") {
            s.delivered += value(line).unwrap_or(0.0);
        } else if line.starts_with("spool_queue_depth{") {
            s.depth += value(line).unwrap_or(0.0);
        } else if line.starts_with("spool_delivery_seconds_bucket{") {
            if let (Some(le), Some(n)) = (le(line), value(line)) {
                match s.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, c)) => *c += n,
                    None => s.buckets.push((le, n)),
                }
            }
        }
    }
    s.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    s
}

pub async fn scrape(host: &str, port: u16) -> Result<Snapshot> {
    let stream = tokio::net::TcpStream::connect((host, port)).await?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics")
        // With the port: spool refuses a Host that is not its listen address.
        .header("host", format!("{host}:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await?
        .to_bytes();
    Ok(parse(
        std::str::from_utf8(&body).context("metrics are not UTF-8")?,
    ))
}

/// The bucket bound (seconds) under which a fraction `p` of the deliveries
/// between two readings fell: a 2× resolution, from the server's buckets.
pub fn percentile(before: &Snapshot, after: &Snapshot, p: f64) -> Option<f64> {
    let count = |s: &Snapshot, le: f64| {
        s.buckets
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0.0, |(_, c)| *c)
    };
    let delta: Vec<(f64, f64)> = after
        .buckets
        .iter()
        .map(|(le, c)| (*le, c - count(before, *le)))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, c)| *c >= p * total)
        .map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_delivery_metrics_and_bucket_percentiles() {
        let text = "spool_entries_delivered_total{destination=\"a\"} 10\n\
                    spool_queue_depth{destination=\"a\"} 3\n\
                    spool_delivery_seconds_bucket{destination=\"a\",le=\"0.001\"} 2\n\
                    spool_delivery_seconds_bucket{destination=\"a\",le=\"0.002\"} 9\n\
                    spool_delivery_seconds_bucket{destination=\"a\",le=\"+Inf\"} 10\n";
        let s = parse(text);
        assert_eq!((s.delivered, s.depth), (10.0, 3.0));
        let zero = Snapshot::default();
        assert_eq!(percentile(&zero, &s, 0.5), Some(0.002));
        assert_eq!(percentile(&zero, &s, 0.95), Some(f64::INFINITY));
        assert_eq!(percentile(&s, &s, 0.5), None);
    }
}
