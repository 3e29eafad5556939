//! `tessera demo --metrics ADDR`: a scrape during training returns real figures that change.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::{free_port, metric, tessera_bin, ChildGuard};

const SCRAPE_WITHIN: Duration = Duration::from_secs(60);

/// Scrapes until `pushes_total` over every shard is above `above`, or panics after the deadline.
fn pushes_above(addr: &str, above: f64) -> f64 {
    let deadline = Instant::now() + SCRAPE_WITHIN;
    loop {
        // The endpoint comes up before the server does; until then a scrape may not connect.
        let text = tessera_tests::try_scrape(addr).unwrap_or_default();
        if let Some(pushes) = metric(&text, "tessera_pushes_total", &[]).filter(|p| *p > above) {
            assert!(metric(&text, "tessera_pulls_total", &[]).unwrap_or(0.0) > 0.0, "pushes but no pulls:\n{text}");
            assert!(metric(&text, "tessera_request_seconds_count", &["op=\"push\""]).unwrap_or(0.0) > 0.0, "{text}");
            assert!(metric(&text, "tessera_connections", &[]).unwrap_or(0.0) >= 2.0, "the workers' connections:\n{text}");
            assert!(metric(&text, "tessera_process_resident_bytes", &[]).unwrap_or(0.0) > 1e6, "{text}");
            return pushes;
        }
        assert!(Instant::now() < deadline, "no pushes above {above} in the metrics within {SCRAPE_WITHIN:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_demos_metrics_endpoint_serves_changing_figures_while_it_trains() {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(tessera_bin())
        .args(["demo", "--epochs", "50", "--examples", "20000", "--features", "100000", "--metrics", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let _demo = ChildGuard::new(child);
    let first = pushes_above(&addr, 0.0);
    let later = pushes_above(&addr, first);
    assert!(later > first);
}
