//! Fleet scale: N simulated agents (`drover-agent simulate`) heartbeating
//! every 10 s with parked claims against a release coordinator, for
//! DROVER_FLEET_SECS (120) seconds each, N = 1,000 and 10,000. Prints the
//! coordinator's CPU, RSS, threads and open fds, and heartbeat latency: from
//! a virtual agent sending a heartbeat (on its claim, as the real agent
//! does) to the coordinator having recorded it, by the coordinator's clock
//! in the answer (same machine; 1 ms resolution). Then the real agent's
//! footprint: idle RSS and CPU over DROVER_IDLE_SECS (60), and its peak RSS
//! while a job prints 1 GiB at full speed. Figures only; nothing asserted
//! about speed. `-- agent` runs the footprint part alone.
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

/// The real agent: idle RSS and CPU, then its peak RSS while a job prints
/// 1 GiB as fast as it can.
fn footprint(idle_secs: u64) -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let agent = Agent::start(&coord.url, dir.path(), "footprint", &[])?;
    wait_for(
        "the agent to wait for work",
        std::time::Duration::from_secs(20),
        || Ok((api.agents_waiting()? == Some(1)).then_some(())),
    )?;
    let pid = agent.pid();
    // Past start-up: measure the steady idle state.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let c0 = cpu_ticks(pid);
    std::thread::sleep(std::time::Duration::from_secs(idle_secs));
    let ticks = cpu_ticks(pid) - c0;
    println!(
        "idle agent, {idle_secs} s: RSS {:.1} MB (target <= 10), threads {}, {ticks} CPU ticks = {:.1} CPU-s per hour",
        proc_field(pid, "VmRSS:") as f64 / 1024.0,
        proc_field(pid, "Threads:"),
        ticks as f64 / 100.0 * 3600.0 / idle_secs as f64
    );
    let t0 = Instant::now();
    let id = api.submit(&serde_json::json!({
        "command": ["sh", "-c", "yes drover-output-line | head -c 1073741824"]
    }))?;
    let job = wait_for(
        "the 1 GiB job to finish",
        std::time::Duration::from_secs(300),
        || {
            let j = api.job(id)?;
            Ok((j["status"] == "succeeded" || j["status"] == "failed").then_some(j))
        },
    )?;
    println!(
        "a job printing 1 GiB ({}, {:.1} s): agent peak RSS {:.1} MB, stored log {} bytes",
        job["status"],
        t0.elapsed().as_secs_f64(),
        proc_field(pid, "VmHWM:") as f64 / 1024.0,
        job["attempts"][0]["log_bytes"]
    );
    Ok(())
}

fn main() -> TestResult {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let idle = std::env::var("DROVER_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    if std::env::args().any(|a| a == "agent") {
        return footprint(idle);
    }
    let secs = std::env::var("DROVER_FLEET_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    println!("(needs release builds of both binaries: cargo build --release --workspace)");
    for agents in [1_000, 10_000] {
        run(agents, secs)?;
    }
    footprint(idle)
}
