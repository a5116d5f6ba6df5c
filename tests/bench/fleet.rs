//! Fleet scale: N simulated agents (`drover-agent simulate`) heartbeating
//! every 10 s with parked claims against a release coordinator, for
//! DROVER_FLEET_SECS (120) seconds each, N = 1,000 and 10,000. Prints the
//! coordinator's CPU, RSS, threads and open fds, and heartbeat latency: from
//! a virtual agent sending a heartbeat (on its claim, as the real agent
//! does) to the coordinator having recorded it, by the coordinator's clock
//! in the answer (same machine; 1 ms resolution). Figures only; nothing
//! asserted about speed.
//!
//!   cargo build --release --workspace && cargo bench -p coordinator --bench fleet

#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;

use harness::*;
use std::process::Command;
use std::time::Instant;

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    rest.get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + rest
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

fn run(agents: usize, secs: u64) -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(
        dir.path(),
        &["--auto-approve", "--max-connections", "30000"],
    )?;
    let pid = coord.pid();
    let t0 = Instant::now();
    let c0 = cpu_ticks(pid);
    let out = Command::new(agent_bin())
        .args([
            "simulate",
            "--agents",
            &agents.to_string(),
            "--duration",
            &secs.to_string(),
        ])
        .args(["--coordinator", &coord.url, "--registration-secret", SECRET])
        .env("RUST_LOG", "warn")
        .output()?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - c0) as f64 / 100.0;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or(format!(
            "no summary from simulate: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        ))?;
    println!(
        "{agents} agents, {secs} s: coordinator CPU {:.1}% of one core (target <= 25% at 10,000), RSS {} MB (peak {} MB; target <= 256), \
         threads {}, open fds {fds}; heartbeats (send -> recorded) {} p50 {:.1} ms p99 {:.1} ms max {:.1} ms (target p99 <= 50), \
         after the first 30 s: {} p50 {:.1} ms p99 {:.1} ms max {:.1} ms; agents registered {}, errors {}",
        cpu / wall * 100.0,
        proc_field(pid, "VmRSS:") / 1024,
        proc_field(pid, "VmHWM:") / 1024,
        proc_field(pid, "Threads:"),
        summary["heartbeats"],
        summary["heartbeat_p50_ms"].as_f64().unwrap_or(0.0),
        summary["heartbeat_p99_ms"].as_f64().unwrap_or(0.0),
        summary["heartbeat_max_ms"].as_f64().unwrap_or(0.0),
        summary["steady_heartbeats"],
        summary["steady_heartbeat_p50_ms"].as_f64().unwrap_or(0.0),
        summary["steady_heartbeat_p99_ms"].as_f64().unwrap_or(0.0),
        summary["steady_heartbeat_max_ms"].as_f64().unwrap_or(0.0),
        summary["agents"],
        summary["errors"],
    );
    Ok(())
}

fn main() -> TestResult {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let secs = std::env::var("DROVER_FLEET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    println!("(needs release builds of both binaries: cargo build --release --workspace)");
    for agents in [1_000, 10_000] {
        run(agents, secs)?;
    }
    Ok(())
}
