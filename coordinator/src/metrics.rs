//! Counters and histograms for `GET /metrics` (Prometheus text format),
//! lock-free on the hot paths.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Attempts that ended with their job back in the queue (for /metrics; a
/// transaction that fails to commit after deciding one still counts it).
pub static REQUEUES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A histogram with fixed bucket bounds, in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Bounds for request- and commit-sized durations.
pub const FAST: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Bounds for queue waits.
pub const SLOW: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The coordinator's own measurements (gauges come from the database).
pub struct Metrics {
    pub dispatched: AtomicU64,
    pub leases_expired: AtomicU64,
    pub registrations_refused: AtomicU64,
    pub dispatch_round: Histogram,
    pub queue_wait: Histogram,
    http: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            dispatched: AtomicU64::new(0),
            leases_expired: AtomicU64::new(0),
            registrations_refused: AtomicU64::new(0),
            dispatch_round: Histogram::new(FAST),
            queue_wait: Histogram::new(SLOW),
            http: Mutex::new(BTreeMap::new()),
        }
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

impl Metrics {
    /// Counts a request by its route pattern (never the raw path: ids would
    /// make the label set unbounded).
    pub fn http(&self, route: &str, code: u16) {
        let mut m = self.http.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route.to_string(), code)).or_default() += 1;
    }

    pub fn render(&self, out: &mut String, db_write: &Histogram) {
        counter(
            out,
            "drover_jobs_dispatched_total",
            "Jobs handed to agents (leases granted).",
            self.dispatched.load(Ordering::Relaxed),
        );
        counter(
            out,
            "drover_leases_expired_total",
            "Leases that expired without a heartbeat.",
            self.leases_expired.load(Ordering::Relaxed),
        );
        counter(
            out,
            "drover_jobs_requeued_total",
            "Attempts that ended with their job back in the queue (lease lost, retry, hand-back).",
            REQUEUES.load(Ordering::Relaxed),
        );
        counter(
            out,
            "drover_registrations_refused_total",
            "Registrations refused (wrong secret or rate limited).",
            self.registrations_refused.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP drover_http_requests_total HTTP requests by route and status.\n# TYPE drover_http_requests_total counter"
        );
        for ((route, code), n) in self.http.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let route = route.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "drover_http_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
            );
        }
        self.dispatch_round.render(
            out,
            "drover_dispatch_round_seconds",
            "Time of one dispatch round, commit included.",
        );
        self.queue_wait.render(
            out,
            "drover_queue_wait_seconds",
            "Time from claimable to dispatched, per job.",
        );
        db_write.render(
            out,
            "drover_sqlite_write_seconds",
            "Time from a write request to its durable commit.",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_text() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "test");
        assert!(out.contains("x_seconds_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 5.55\n"), "{out}");
    }
}
