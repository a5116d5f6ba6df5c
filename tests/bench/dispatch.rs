//! Dispatch benchmark of the real binaries. Prints figures; asserts nothing
//! about speed (the machines are shared and noisy).
//!
//!   cargo build --release --workspace && cargo bench -p coordinator --bench dispatch
//!
//! 1. latency: one idle agent parked on a claim; 500 sequential jobs; for each,
//!    submit -> the job's own process running, and submit -> success visible
//!    to a client. Baseline in the same process: spawning the same job
//!    program directly.
//!    Once with this binary as the job (`--stamp`), once with a small C
//!    program (when `cc` is at hand); then the coordinator's share alone: a
//!    stand-in agent's parked claim, submit -> claim reply.
//! 2. throughput: N no-op (`true`) jobs queued, then 4 agents drain them;
//!    jobs/s from the first claim to the last completion.
//! 3. the coordinator's own throughput: 20,000 no-op jobs queued, then
//!    1/4/16 simulated agents x 4 slots and 4 x 64 slots (`drover-agent
//!    simulate`: jobs complete at once, no processes, each batch reported
//!    with the next claim) drain them, with `synchronous=FULL` (the
//!    default) and `NORMAL`.
//! 4. PostgreSQL beside SQLite (`-- postgres`; needs root and PostgreSQL's
//!    binaries): the coordinator's share of dispatch (p50/p99) and the
//!    simulated agents' durable throughput on SQLite (FULL), on PostgreSQL
//!    with one coordinator, and with three on one database (each with a
//!    third of the simulated agents).

#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../e2e/pgserver.rs"]
mod pgserver;

use harness::*;
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn summary(name: &str, mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "  {name:<34} p50 {:>7.3} ms  p90 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  (n={})",
        pct(&v, 0.5),
        pct(&v, 0.9),
        pct(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN),
        v.len()
    );
    pct(&v, 0.5)
}

/// A C program that stamps the time it started running (as `--stamp`
/// does), when a C compiler is at hand: a few KB, so that the figure is
/// Drover's path more than the start-up of a 10 MB Rust test binary.
fn c_stamp(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let src = dir.join("stamp.c");
    let bin = dir.join("stamp");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    const char *path = getenv("DROVER_RESULT_FILE");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (!f) return 2;
    fprintf(f, "{\"ns\": \"%lld%09ld\"}", (long long)t.tv_sec, t.tv_nsec);
    return fclose(f) ? 3 : 0;
}
"#,
    )
    .ok()?;
    let ok = std::process::Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bin)
}

fn latency(n: usize, label: &str, me: &std::path::Path) -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let _agent = Agent::start(&coord.url, dir.path(), "lat", &[])?;
    let stamp = |id: i64| -> TestResult<Option<u128>> {
        let j = api.job(id)?;
        Ok(j["result"]["ns"].as_str().and_then(|s| s.parse().ok()))
    };
    // Warm up: the agent registered, approved, parked.
    let id = api.submit(&json!({"command": [me, "--stamp"]}))?;
    wait_for("warm-up job", Duration::from_secs(30), || {
        Ok((api.job(id)?["status"] == "succeeded").then_some(()))
    })?;

    let (mut to_start, mut to_done) = (Vec::new(), Vec::new());
    for _ in 0..n {
        // Let the agent park its next claim before submitting.
        std::thread::sleep(Duration::from_millis(2));
        let t0 = now_ns();
        let id = api.submit(&json!({"command": [me, "--stamp"]}))?;
        let started = Instant::now();
        loop {
            let j = api.job(id)?;
            if j["status"] == "succeeded" {
                to_done.push(started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("job {id} did not finish: {j}").into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let s = stamp(id)?.ok_or("no stamp")?;
        to_start.push((s.saturating_sub(t0)) as f64 / 1e6);
    }
    let mut direct = Vec::new();
    for _ in 0..100 {
        let d = tempfile::tempdir()?;
        let f = d.path().join("r.json");
        let t0 = now_ns();
        std::process::Command::new(me)
            .arg("--stamp")
            .env("DROVER_RESULT_FILE", &f)
            .status()?;
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f)?)?;
        let s: u128 = v["ns"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("no stamp")?;
        direct.push(s.saturating_sub(t0) as f64 / 1e6);
    }
    println!("dispatch latency, one idle agent, {n} sequential jobs of {label}:");
    to_start.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (pct(&to_start, 0.5), pct(&to_start, 0.99));
    summary("submit -> job process running", to_start);
    summary("submit -> success visible (poll)", to_done);
    let base = summary("baseline: spawn -> process running", direct);
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "  ratio p50 dispatch / p50 direct spawn: {:.1}x; target p50 <= 1.2 ms {}, p99 <= 5 ms {}",
        p50 / base,
        verdict(p50 <= 1.2),
        verdict(p99 <= 5.0)
    );
    Ok(())
}

/// The coordinator's share of dispatch: a stand-in agent (plain HTTP, no
/// process) parked on a claim; submit -> the claim's reply read, and
/// submit -> its 201.
fn coordinator_share(n: usize, synchronous: &str) -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(
        dir.path(),
        &["--auto-approve", "--sqlite-synchronous", synchronous],
    )?;
    share_on(&coord, n, &format!("synchronous={synchronous}"))?;
    Ok(())
}

/// The coordinator's share on `coord`; returns (p50, p99) of submit ->
/// claim reply, in ms.
fn share_on(coord: &Coordinator, n: usize, label: &str) -> TestResult<(f64, f64)> {
    let api = coord.api();
    let agent = FakeAgent::register(&api, "share")?;
    let claims = Api::new(&coord.url);
    let (mut to_reply, mut to_created) = (Vec::new(), Vec::new());
    let mut done = json!([]);
    for _ in 0..n {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| -> TestResult {
            let (agent, claims, report) = (&agent, &claims, done.clone());
            s.spawn(move || {
                let r = agent.claim_reporting(claims, 10, report);
                let _ = tx.send((Instant::now(), r.map_err(|e| e.to_string())));
            });
            // Let the claim park (and its report commit) first.
            std::thread::sleep(Duration::from_millis(3));
            let t0 = Instant::now();
            api.submit(&json!({"command": ["true"]}))?;
            to_created.push(t0.elapsed().as_secs_f64() * 1000.0);
            let (at, r) = rx.recv()?;
            let r = r?;
            let job = &r.body["jobs"][0];
            if job.is_null() {
                return Err(format!("the claim got no job: {}", r.text).into());
            }
            to_reply.push(at.duration_since(t0).as_secs_f64() * 1000.0);
            done = json!([{"job_id": job["job_id"], "attempt": job["attempt"], "outcome": "succeeded", "exit_code": 0}]);
            Ok(())
        })?;
    }
    println!(
        "the coordinator's share, a stand-in agent parked on a claim, {n} sequential jobs, {label}:"
    );
    to_reply.sort_by(|a, b| a.total_cmp(b));
    let p = (pct(&to_reply, 0.5), pct(&to_reply, 0.99));
    summary("submit -> claim reply read", to_reply);
    summary("submit -> 201 read", to_created);
    Ok(p)
}

fn throughput(n: usize, agents: usize) -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let t_submit = Instant::now();
    for _ in 0..n {
        api.submit(&json!({"command": ["true"]}))?;
    }
    let submit_s = t_submit.elapsed().as_secs_f64();
    let _agents: Vec<Agent> = (0..agents)
        .map(|i| Agent::start(&coord.url, dir.path(), &format!("t{i}"), &[]))
        .collect::<TestResult<_>>()?;
    wait_for("all jobs to finish", Duration::from_secs(600), || {
        let r = api.admin("GET", "/api/v1/jobs?status=queued&limit=1", None)?;
        let q = r.body["jobs"].as_array().map(|a| a.len()).unwrap_or(1);
        let r = api.admin("GET", "/api/v1/jobs?status=running&limit=1", None)?;
        let run = r.body["jobs"].as_array().map(|a| a.len()).unwrap_or(1);
        Ok((q == 0 && run == 0).then_some(()))
    })?;
    drop(_agents);
    let span = claim_to_completion_span(&coord.db_path())?;
    println!(
        "throughput: {n} no-op jobs, {agents} agents: {:.0} jobs/s from first claim to last completion ({:.2}s); \
         submissions: {:.0}/s sequential on one connection",
        n as f64 / span,
        span,
        n as f64 / submit_s
    );
    Ok(())
}

fn simulated_throughput(
    n: usize,
    agents: usize,
    slots: usize,
    synchronous: &str,
) -> TestResult<f64> {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(
        dir.path(),
        &["--auto-approve", "--sqlite-synchronous", synchronous],
    )?;
    let span = drain(n, agents, slots, &[coord], dir.path(), || {
        claim_to_completion_span(&dir.path().join("drover.db"))
    })?;
    let rate = n as f64 / span;
    println!(
        "  {agents:>2} simulated agents x {slots:>2} slots, synchronous={synchronous:<6} {rate:>7.0} jobs/s ({span:.2}s)"
    );
    Ok(rate)
}

/// Queues `n` no-op jobs, then `agents` simulated agents x `slots` drain
/// them, split evenly over `coords` (each simulator with its own first
/// coordinator); returns the seconds from the first claim to the last
/// completion (`span` reads them from the store).
fn drain(
    n: usize,
    agents: usize,
    slots: usize,
    coords: &[Coordinator],
    dir: &std::path::Path,
    span: impl Fn() -> TestResult<f64>,
) -> TestResult<f64> {
    let api = coords[0].api();
    let batch: Vec<_> = (0..5000).map(|_| json!({"command": ["true"]})).collect();
    for _ in 0..n / 5000 {
        let r = api.admin("POST", "/api/v1/jobs", Some(&json!(batch)))?;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let mut sims = Vec::new();
    for (i, coord) in coords.iter().enumerate() {
        let share = agents / coords.len() + usize::from(i < agents % coords.len());
        sims.push(
            std::process::Command::new(agent_bin())
                .args(["simulate", "--agents", &share.to_string()])
                .args(["--slots", &slots.to_string()])
                .args(["--duration", "300", "--coordinator", &coord.url])
                .args(["--registration-secret", SECRET, "--state-dir"])
                .arg(dir.join(format!("sim-{i}")))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
    }
    let done = wait_for(
        "the simulated agents to drain the queue",
        Duration::from_secs(300),
        || {
            let r = api.admin("GET", "/api/v1/stats", None)?;
            Ok((r.body["jobs"]["succeeded"].as_u64() == Some(n as u64)).then_some(()))
        },
    );
    for mut sim in sims {
        let _ = sim.kill();
        let _ = sim.wait();
    }
    done?;
    span()
}

/// PostgreSQL beside SQLite, in one run: the coordinator's share of
/// dispatch, and the durable throughput of simulated agents with one and
/// with three coordinators on one database.
fn postgres() -> TestResult {
    if let Some(why) = pgserver::missing() {
        println!("(PostgreSQL part skipped: {why})");
        return Ok(());
    }
    let (n, agents, slots) = (5_000, 4, 64);
    println!("PostgreSQL beside SQLite ({n} no-op jobs, {agents} simulated agents x {slots} slots for throughput):");
    let dir = tempfile::tempdir()?;
    let lite = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let lite_share = share_on(&lite, 500, "SQLite (FULL)")?;
    drop(lite);
    let lite_rate = simulated_throughput(n, agents, slots, "full")?;
    let mut rows = vec![("SQLite, 1 coordinator", lite_share, lite_rate)];
    for coordinators in [1, 3] {
        let server = pgserver::PgServer::start()?;
        let dir = tempfile::tempdir()?;
        // Each measure on a database of its own: the throughput counts
        // and times every job of its database.
        let start = |db: &str| -> TestResult<Vec<Coordinator>> {
            server.create_db(db)?;
            (0..coordinators)
                .map(|i| {
                    let d = dir.path().join(format!("{db}-{i}"));
                    std::fs::create_dir_all(&d)?;
                    Coordinator::start(&d, &["--db", &server.url(db), "--auto-approve"])
                })
                .collect()
        };
        let label = format!("PostgreSQL, {coordinators} coordinator(s)");
        let share = share_on(&start("share")?[0], 500, &label)?;
        let url = server.url("throughput");
        let coords = start("throughput")?;
        let span = drain(n, agents, slots, &coords, dir.path(), || pg_span(&url))?;
        println!("  {label}: {:.0} jobs/s ({span:.2}s)", n as f64 / span);
        rows.push((
            if coordinators == 1 {
                "PostgreSQL, 1 coordinator"
            } else {
                "PostgreSQL, 3 coordinators"
            },
            share,
            n as f64 / span,
        ));
    }
    println!(
        "  {:<28} {:>10} {:>10} {:>10} {:>12}",
        "", "p50 ms", "p99 ms", "jobs/s", "vs SQLite"
    );
    for (label, (p50, p99), rate) in &rows {
        println!(
            "  {label:<28} {p50:>10.2} {p99:>10.2} {rate:>10.0} {:>11.2}x",
            rate / lite_rate
        );
    }
    let pg1 = rows[1].2;
    println!(
        "  goal: PostgreSQL within 2x of SQLite on one coordinator (throughput {:.2}x, p50 {:.2}x): {}",
        lite_rate / pg1,
        rows[1].1 .0 / lite_share.0,
        if lite_rate / pg1 <= 2.0 && rows[1].1 .0 / lite_share.0 <= 2.0 { "met" } else { "MISSED" }
    );
    Ok(())
}

/// Seconds from the first claim to the last completion, on PostgreSQL.
fn pg_span(url: &str) -> TestResult<f64> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let span: i64 = client
        .query_one(
            "SELECT max(ended_at) - min(started_at) FROM job_attempts",
            &[],
        )?
        .try_get(0)?;
    Ok(span as f64 / 1000.0)
}

/// Seconds from the first claim to the last completion, from the database.
fn claim_to_completion_span(db: &std::path::Path) -> TestResult<f64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row(
        "SELECT (max(ended_at) - min(started_at)) / 1000.0 FROM job_attempts",
        [],
        |r| r.get(0),
    )?)
}

fn main() -> TestResult {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--stamp") {
        let path = std::env::var("DROVER_RESULT_FILE")?;
        std::fs::write(path, format!("{{\"ns\": \"{}\"}}", now_ns()))?;
        return Ok(());
    }
    if args.iter().any(|a| a == "--list") {
        return Ok(());
    }
    // `-- latency`, `-- share`, `-- throughput` or `-- postgres` runs that
    // part alone.
    let parts = ["latency", "share", "throughput", "postgres"];
    let named: Vec<&str> = parts
        .into_iter()
        .filter(|p| args.iter().any(|a| a == p))
        .collect();
    let part = |p: &str| named.is_empty() || named.contains(&p);
    println!("(the agent binary must be a release build: cargo build --release --workspace)");
    if part("latency") {
        let me = std::env::current_exe()?;
        latency(500, "this bench binary --stamp (Rust)", &me)?;
        let stamps = tempfile::tempdir()?;
        match c_stamp(stamps.path()) {
            Some(c) => latency(500, "a C stamp program", &c)?,
            None => println!("(no C compiler: the C stamp run is skipped)"),
        }
    }
    if part("share") {
        coordinator_share(500, "full")?;
        coordinator_share(500, "normal")?;
    }
    if part("postgres") {
        postgres()?;
    }
    if !part("throughput") {
        return Ok(());
    }
    throughput(5000, 4)?;
    println!("coordinator throughput, 20,000 no-op jobs queued, simulated agents:");
    let mut best_four = 0.0f64;
    for sync in ["full", "normal"] {
        for (agents, slots) in [(1, 4), (4, 4), (16, 4), (4, 64)] {
            let rate = simulated_throughput(20_000, agents, slots, sync)?;
            if agents == 4 && sync == "full" {
                best_four = best_four.max(rate);
            }
        }
    }
    println!(
        "  target >= 15,000 jobs/s with 4 agents, durable (FULL): {} ({best_four:.0}, the better of 4 and 64 slots)",
        if best_four >= 15_000.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}
