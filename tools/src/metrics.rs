//! `--metrics ADDR`: the process's metrics in Prometheus text format at `http://ADDR/metrics`.
//!
//! The engine and transport record through the `metrics` facade (see `tessera_engine::metrics`
//! for the list); this installs the Prometheus recorder and serves what it renders from one
//! thread, adding the process's resident memory and open descriptors at each scrape.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Histogram buckets for every `*_seconds` metric: 1 µs to 10 s, three per decade.
const BUCKETS_SECONDS: [f64; 22] =
    [1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0];
/// Longest request a scraper may send, and how long it may take.
const REQUEST_BYTES_MAX: usize = 8 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where to serve metrics.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100): per shard and
    /// table, pushes, pulls, bytes and service-time histograms; connections, RDMA slot stalls,
    /// log fsync latency, checkpoint age, replication lag, refused peers; resident memory and
    /// open descriptors. tools/prometheus.yml and tools/grafana-dashboard.json use them.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

impl MetricsArgs {
    /// Starts the endpoint if asked for; returns where it listens.
    pub fn start(&self) -> Result<Option<SocketAddr>> {
        self.metrics.as_deref().map(serve).transpose()
    }
}

/// Installs the recorder and serves it at `addr` from a thread of its own.
pub fn serve(addr: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding the metrics address {addr}"))?;
    let local = listener.local_addr()?;
    let recorder = PrometheusBuilder::new().set_buckets(&BUCKETS_SECONDS).context("histogram buckets")?.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
    tessera_engine::metrics::enable();
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Err(e) = answer(stream, &handle) {
                tracing::debug!(error = %e, "metrics request failed");
            }
        }
    })?;
    tracing::info!(%local, "serving metrics at /metrics");
    Ok(local)
}

/// Answers one HTTP request: the metrics for `GET /metrics` (or `/`), 404 otherwise.
fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < REQUEST_BYTES_MAX {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(request.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        process_gauges();
        handle.run_upkeep();
        ("200 OK", handle.render())
    } else {
        ("404 Not Found", "try GET /metrics\n".to_string())
    };
    write!(stream, "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

/// The process's resident memory and open descriptors, read from /proc at each scrape, and
/// (in an RDMA build) the memory regions and queue pairs it holds.
fn process_gauges() {
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(pages) = statm.split_whitespace().nth(1).and_then(|p| p.parse::<f64>().ok()) {
            let page = rustix::param::page_size() as f64;
            metrics::gauge!("tessera_process_resident_bytes").set(pages * page);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!("tessera_process_open_fds").set(fds.count() as f64);
    }
    #[cfg(feature = "rdma")]
    {
        let (mrs, qps) = tessera_transport::rdma::verbs::live_counts();
        metrics::gauge!("tessera_rdma_memory_regions").set(mrs as f64);
        metrics::gauge!("tessera_rdma_queue_pairs").set(qps as f64);
    }
}

/// Every series name the process can export (histograms add `_bucket`, `_sum`, `_count`).
#[cfg(test)]
const NAMES: &[&str] = &[
    tessera_engine::metrics::PUSHES,
    tessera_engine::metrics::PULLS,
    tessera_engine::metrics::RECEIVED_BYTES,
    tessera_engine::metrics::SENT_BYTES,
    tessera_engine::metrics::REQUEST_SECONDS,
    tessera_engine::metrics::REQUEST_ERRORS,
    tessera_engine::metrics::CONNECTIONS,
    tessera_engine::metrics::WAL_FSYNC_SECONDS,
    tessera_engine::metrics::CHECKPOINT_AGE_SECONDS,
    tessera_engine::metrics::REPLICATION_LAG_TICKS,
    tessera_transport::metrics::AUTH_REFUSALS,
    tessera_transport::metrics::SLOT_STALLS,
    tessera_transport::metrics::CONNECTIONS_REFUSED,
    tessera_transport::metrics::SLOW_CLIENTS_CLOSED,
    "tessera_process_resident_bytes",
    "tessera_process_open_fds",
    "tessera_rdma_memory_regions",
    "tessera_rdma_queue_pairs",
];

#[cfg(test)]
mod tests {
    use super::NAMES;

    /// The dashboard shipped in tools/ must only chart series the servers export.
    #[test]
    fn the_grafana_dashboard_charts_only_exported_series() {
        let text = include_str!("../grafana-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(text).expect("the dashboard is JSON");
        let mut charted = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("an expression");
                let names = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("tessera_"));
                for name in names {
                    let base = name.trim_end_matches("_bucket");
                    assert!(NAMES.contains(&base), "the dashboard charts {name}, which no server exports");
                    charted += 1;
                }
            }
        }
        assert!(charted >= NAMES.len(), "the dashboard leaves series out: {charted} charted");
    }
}
