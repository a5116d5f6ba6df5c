//! Issue 16: what a new user and an attacker found. Each test fails on the
//! code before its fix.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn register(api: &Api, bearer: &str, name: &str, machine: &str) -> TestResult<Reply> {
    let body = json!({"name": name, "machine_id": machine,
                      "inventory": {"hostname": name, "cpu_cores": 1, "memory_mb": 1024}});
    api.call(
        "POST",
        "/api/v1/agents/register",
        Some(bearer),
        Some(body.to_string().as_bytes()),
    )
}

/// Runs a coordinator that is expected to refuse to start: its exit status
/// (None when it was still running after 10 s, then killed) and stderr.
fn refused_start(
    dir: &std::path::Path,
    db: &std::path::Path,
    admin: &str,
    secret: &str,
) -> TestResult<(Option<i32>, String)> {
    let err_path = dir.join(format!("refused-{}.err", std::process::id()));
    let mut child = Command::new(coordinator_bin())
        .arg("--db")
        .arg(db)
        .args(["--listen", "127.0.0.1:0", "--admin-token", admin])
        .args(["--registration-secret", secret])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()?;
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((code, std::fs::read_to_string(&err_path)?))
}

/// 1: the registration secret alone never takes a live worker's identity.
#[test]
fn the_secret_cannot_take_over_a_live_worker() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--lease-ttl", "3"])?;
    let api = coord.api();
    let agent = Agent::start(&coord.url, dir.path(), "real", &[])?;
    let id = wait_for("the agent to register", Duration::from_secs(20), || {
        Ok(agent.worker_id().ok())
    })?;
    api.admin("POST", &format!("/api/v1/workers/{id}/approve"), None)?;
    let job = api.submit(&json!({"command": ["sleep", "30"], "env": {"API_KEY": "s3cret"}}))?;
    let running = wait_for("the job to run", Duration::from_secs(20), || {
        let j = api.job(job)?;
        Ok((j["status"] == "running").then_some(j["attempt"].clone()))
    })?;
    let machine: String = rusqlite::Connection::open(coord.db_path())?.query_row(
        "SELECT machine_id FROM workers WHERE id = ?1",
        [id],
        |r| r.get(0),
    )?;

    // The attacker presents the secret with the live worker's machine and name.
    let r = register(&api, SECRET, "real", machine.trim())?;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.code(), "worker_alive", "{}", r.text);
    assert!(r.body.get("token").is_none());
    let j = api.job(job)?;
    assert_eq!(
        (j["status"].as_str(), &j["attempt"]),
        (Some("running"), &running),
        "the real agent keeps its job: {j}"
    );
    let hb = json!({"incarnation": "probe"}).to_string();
    let r = api.call(
        "POST",
        "/api/v1/agents/claim?wait=0",
        Some(&agent.token()?),
        Some(hb.as_bytes()),
    )?;
    assert_ne!(
        r.status, 401,
        "the real agent's token still works: {}",
        r.text
    );

    // An agent re-registering with its own token under another worker's
    // name: a clear 409, not a 500.
    let other = register(&api, SECRET, "other", "m-other")?;
    assert_eq!(other.status, 200, "{}", other.text);
    let token = other.body["token"].as_str().ok_or("no token")?;
    let r = register(&api, token, "real", machine.trim())?;
    assert_eq!((r.status, r.code()), (409, "name_taken"), "{}", r.text);

    // Once the worker is gone (offline), the secret may register the
    // machine again, but it waits for approval: nothing is inherited.
    drop(agent);
    wait_for("the worker to go offline", Duration::from_secs(20), || {
        let w = api.admin("GET", &format!("/api/v1/workers/{id}"), None)?;
        Ok((w.body["state"] == "offline").then_some(()))
    })?;
    let r = register(&api, SECRET, "real", machine.trim())?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["worker_id"], id);
    assert_eq!(r.body["state"], "pending", "back to pending: {}", r.text);
    Ok(())
}

/// 2: names are validated at registration, and the restore hint quotes what
/// it interpolates.
#[test]
fn hostile_worker_names_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    let long = "x".repeat(65);
    for name in ["gpu-7' ; touch X ; echo '", "a b", "$(id)", "-rf", &long] {
        let r = register(&api, SECRET, name, "m1")?;
        assert_eq!((r.status, r.field()), (422, "name"), "{name:?}: {}", r.text);
        let r = api.admin("POST", "/api/v1/workers", Some(&json!({"name": name})))?;
        assert_eq!((r.status, r.field()), (422, "name"), "{name:?}: {}", r.text);
    }
    let r = register(&api, SECRET, "gpu-7.lab_1", "m;reboot")?;
    assert_eq!((r.status, r.field()), (422, "machine_id"), "{}", r.text);
    let r = register(&api, SECRET, "gpu-7.lab_1", "0123abcd")?;
    assert_eq!(r.status, 200, "{}", r.text);
    Ok(())
}

/// 4: one coordinator per database file; a kill -9 leaves no stale lock.
#[test]
fn a_second_coordinator_on_the_same_file_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(dir.path(), &[])?;
    let (code, err) = refused_start(dir.path(), &coord.db_path(), ADMIN, SECRET)?;
    assert!(
        code.is_some_and(|c| c != 0),
        "the second one must not start: {code:?} {err}"
    );
    assert!(
        err.contains("another drover-coordinator") && err.contains(&format!("pid={}", coord.pid())),
        "names the holder: {err}"
    );
    assert!(coord.api().healthy(), "the first one still serves");
    coord.kill9();
    coord.restart()?;
    assert!(coord.api().healthy(), "a kill -9 left no lock behind");
    Ok(())
}

/// 5: one agent per state dir.
#[test]
fn a_second_agent_on_the_same_state_dir_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let first = Agent::start(&coord.url, dir.path(), "one", &[])?;
    let id = wait_for("the first agent", Duration::from_secs(20), || {
        Ok(first.worker_id().ok())
    })?;
    let mut second = Agent::start(&coord.url, dir.path(), "one", &[])?;
    let status = second.wait_exit(Duration::from_secs(20))?;
    assert_eq!(status.code(), Some(3), "refused for good");
    let log = std::fs::read_to_string(dir.path().join("agent-one.log"))?;
    assert!(
        log.contains("another drover-agent already uses the state dir")
            && log.contains(&format!("pid={}", first.pid())),
        "{log}"
    );
    assert_eq!(first.worker_id()?, id, "the identity file is intact");
    let job = api.submit(&json!({"command": ["true"]}))?;
    let j = finished(&api, job)?;
    assert_eq!(
        (j["status"].as_str(), j["worker_id"].as_i64()),
        (Some("succeeded"), Some(id))
    );
    Ok(())
}

/// 6: a database deleted (or replaced) under the coordinator stops writes.
#[test]
fn a_deleted_database_refuses_writes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    api.submit(&json!({"command": ["true"]}))?;
    std::fs::remove_file(coord.db_path())?;
    let r = wait_for("writes to be refused", Duration::from_secs(5), || {
        let r = api.admin("POST", "/api/v1/jobs", Some(&json!({"command": ["true"]})))?;
        Ok((r.status != 201).then_some(r))
    })?;
    assert_eq!((r.status, r.code()), (503, "database_gone"), "{}", r.text);
    assert!(r.text.contains("deleted or replaced"), "{}", r.text);
    let h = api.call("GET", "/healthz", None, None)?;
    assert_eq!(h.status, 503, "health says so: {}", h.text);
    let log = std::fs::read_to_string(dir.path().join("coordinator-1.log"))?;
    assert!(log.contains("refusing every write"), "{log}");
    Ok(())
}

/// 7: time the coordinator could not record heartbeats (a write lock held
/// from outside) does not count against the agents' leases.
#[test]
fn a_write_lock_held_past_the_lease_costs_no_lease() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    // Four agents: the sweep's write, queued behind the lock, lands ahead
    // of some of their heartbeats when the lock goes.
    let _agents: Vec<Agent> = (0..4)
        .map(|i| Agent::start(&coord.url, dir.path(), &format!("w{i}"), &[]))
        .collect::<TestResult<_>>()?;
    let ids: Vec<i64> = (0..4)
        .map(|_| api.submit(&json!({"command": ["sleep", "20"], "max_attempts": 1})))
        .collect::<TestResult<_>>()?;
    wait_for("all jobs to run", Duration::from_secs(20), || {
        Ok((api.jobs("running")?.len() == 4).then_some(()))
    })?;
    let holder = hold_write_lock(coord.db_path(), Duration::from_secs(8))?;
    holder.join().map_err(|_| "holder panicked")??;
    for id in ids {
        let j = finished(&api, id)?;
        let lost = j["attempts"]
            .as_array()
            .map(|a| a.iter().filter(|a| a["outcome"] == "lease_lost").count());
        assert_eq!(
            (j["status"].as_str(), lost),
            (Some("succeeded"), Some(0)),
            "the lock cost the live agent its lease: {j}"
        );
    }
    Ok(())
}

/// 8: an agent frozen past its lease runs each job's new attempt once,
/// beside the old one it is told to stop (tracked by job and attempt).
#[test]
fn a_frozen_agent_does_not_loop_on_its_own_jobs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let agent = Agent::start(
        &coord.url,
        dir.path(),
        "frozen",
        &["--slots", "2", "--kill-grace", "1"],
    )?;
    let spec = json!({"command": ["sh", "-c", "echo \"$DROVER_JOB_ID $DROVER_ATTEMPT\" >> \"$RUNS\"; sleep 10"],
                      "env": {"RUNS": runs.to_string_lossy()}, "max_attempts": 5});
    let ids = [api.submit(&spec)?, api.submit(&spec)?];
    wait_for("both to start", Duration::from_secs(20), || {
        Ok((read_lines(&runs).len() == 2).then_some(()))
    })?;
    agent.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(6));
    agent.signal(libc::SIGCONT);
    for id in ids {
        let j = finished(&api, id)?;
        assert_eq!(j["status"], "succeeded", "{j}");
    }
    let starts = read_lines(&runs);
    println!("process starts after a 6 s freeze under a 3 s lease: {starts:?}");
    assert!(
        starts.len() <= 4,
        "at most one new attempt per job: {starts:?}"
    );
    Ok(())
}

/// 10: one agent token cannot grow the database without bound.
#[test]
fn an_agent_token_cannot_flood_the_database() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let fake = FakeAgent::register(&api, "cpu-only")?;
    // GPU metrics for GPUs it never registered.
    let beat = json!({"incarnation": fake.incarnation,
                      "gpus": [{"index": 0, "utilization_pct": 50.0}]})
    .to_string();
    let r = api.call(
        "POST",
        "/api/v1/agents/heartbeat",
        Some(&fake.token),
        Some(beat.as_bytes()),
    )?;
    assert_eq!((r.status, r.field()), (422, "gpus[0].index"), "{}", r.text);
    // Empty log chunks.
    let job = api.submit(&json!({"command": ["true"]}))?;
    let claim = fake.claim(&api, 5)?;
    let attempt = claim.body["jobs"][0]["attempt"]
        .as_i64()
        .ok_or("no grant")?;
    let path = format!("/api/v1/jobs/{job}/logs?attempt={attempt}");
    let r = api.call("POST", &path, Some(&fake.token), Some(b""))?;
    assert_eq!((r.status, r.code()), (400, "empty_chunk"), "{}", r.text);
    // Tiny chunks count their storage: a flood of them hits the cap.
    let cap: u64 = 64 * 1024;
    drop(coord);
    let dir2 = tempfile::tempdir()?;
    let coord = Coordinator::start(
        dir2.path(),
        &["--auto-approve", "--log-cap", &cap.to_string()],
    )?;
    let api = coord.api();
    let fake = FakeAgent::register(&api, "chatty")?;
    let job = api.submit(&json!({"command": ["true"]}))?;
    let claim = fake.claim(&api, 5)?;
    let attempt = claim.body["jobs"][0]["attempt"]
        .as_i64()
        .ok_or("no grant")?;
    let path = format!("/api/v1/jobs/{job}/logs?attempt={attempt}");
    let mut truncated_at = None;
    for i in 0..5000u64 {
        let r = api.call("POST", &path, Some(&fake.token), Some(b"x"))?;
        if r.body["truncated"] == true {
            truncated_at = Some(i);
            break;
        }
    }
    println!("1-byte chunks accepted under a {cap}-byte cap: {truncated_at:?}");
    let expected = cap / 65;
    assert!(
        truncated_at.is_some_and(|n| n.abs_diff(expected) <= 1),
        "each chunk costs its row: {truncated_at:?}, about {expected} expected"
    );
    // GPU history keeps a sample per half heartbeat interval at most.
    let gpu = FakeAgent::register(&api, "gpu-box")?;
    let inv = json!({"name": "gpu-box", "machine_id": "fake-gpu-box",
                     "inventory": {"hostname": "g", "gpus": [{"index": 0, "uuid": "GPU-1", "model": "T", "vram_mb": 1}]}});
    let r = api.call(
        "POST",
        "/api/v1/agents/register",
        Some(&gpu.token),
        Some(inv.to_string().as_bytes()),
    )?;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.body["worker_id"].as_i64().ok_or("no id")?;
    let beat =
        json!({"incarnation": "g1", "gpus": [{"index": 0, "utilization_pct": 5.0}]}).to_string();
    for _ in 0..200 {
        let r = api.call(
            "POST",
            "/api/v1/agents/heartbeat",
            Some(&gpu.token),
            Some(beat.as_bytes()),
        )?;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let conn = rusqlite::Connection::open(coord.db_path())?;
    let rows: i64 = conn.query_row(
        "SELECT count(*) FROM gpu_metrics WHERE worker_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    assert!(rows <= 2, "200 quick heartbeats stored {rows} GPU samples");
    Ok(())
}

/// 11: half-open connections cannot keep a new agent from registering.
#[test]
fn half_open_connections_do_not_lock_out_new_agents() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--max-connections", "64"])?;
    let api = coord.api();
    let addr = format!("127.0.0.1:{}", coord.port);
    let mut held = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(&addr)?;
        // A request head that never ends.
        let _ = s.write_all(b"POST /api/v1/agents/register HTTP/1.1\r\nHost: x\r\n");
        held.push(s);
    }
    for i in 0..5 {
        let start = Instant::now();
        let r = register(&api, SECRET, &format!("new-{i}"), &format!("m-new-{i}"))?;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(api.healthy());
        println!(
            "registered past 300 half-open connections in {:?}",
            start.elapsed()
        );
    }
    Ok(())
}

/// 12: the example env file's placeholders are refused, naming the file.
#[test]
fn placeholder_secrets_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("p.db");
    let run = |admin: &str, secret: &str| -> TestResult<String> {
        let (code, err) = refused_start(dir.path(), &db, admin, secret)?;
        assert!(code.is_some_and(|c| c != 0), "it started: {code:?} {err}");
        Ok(err)
    };
    let err = run(ADMIN, "change-me-registration-secret")?;
    assert!(
        err.contains("placeholder") && err.contains("/etc/drover/coordinator.env"),
        "{err}"
    );
    let err = run("change-me-admin-token-0123456789abcdef", SECRET)?;
    assert!(
        err.contains("placeholder") && err.contains("DROVER_ADMIN_TOKEN"),
        "{err}"
    );
    let err = run("short", SECRET)?;
    assert!(err.contains("at least 16"), "{err}");
    Ok(())
}

/// 17: a queued job says why it waits in listings and in the submit reply.
#[test]
fn waiting_reason_is_everywhere_a_queued_job_is_shown() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let _cpu = FakeAgent::register(&api, "cpu")?;
    let r = api.admin(
        "POST",
        "/api/v1/jobs",
        Some(&json!({"command": ["true"], "gpus": 2})),
    )?;
    assert_eq!(r.status, 201, "{}", r.text);
    let reason = |v: &Value| v["waiting_reason"].as_str().unwrap_or("").to_string();
    assert!(reason(&r.body).contains("GPU"), "submit reply: {}", r.text);
    let listed = api.jobs("queued")?;
    assert!(reason(&listed[0]).contains("GPU"), "listing: {}", listed[0]);
    let all = api.admin("GET", "/api/v1/jobs", None)?;
    assert!(reason(&all.body["jobs"][0]).contains("GPU"), "{}", all.text);
    let conn = rusqlite::Connection::open(coord.db_path())?;
    let view: String = conn.query_row("SELECT waiting_reason FROM queue", [], |r| r.get(0))?;
    assert!(view.contains("no live approved worker fits"), "{view}");
    Ok(())
}

/// 21: a kill -9 of the agent leaves the job's grandchildren running; the
/// next agent on that state dir stops them before it runs anything.
#[test]
fn a_restarted_agent_stops_what_its_killed_predecessor_left() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let pid_file = dir.path().join("grandchild.pid");
    let mut agent = Agent::start(&coord.url, dir.path(), "k", &[])?;
    let script = format!("sleep 300 & echo $! > {}; wait", pid_file.display());
    api.submit(&json!({"command": ["sh", "-c", script], "max_attempts": 1}))?;
    let pid: i32 = wait_for("the grandchild", Duration::from_secs(20), || {
        Ok(std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok()))
    })?;
    agent.kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        alive(pid),
        "the grandchild outlives a killed agent (only its parent gets PDEATHSIG)"
    );
    let _again = Agent::start(&coord.url, dir.path(), "k", &[])?;
    wait_for("the leftover to be killed", Duration::from_secs(10), || {
        Ok((!alive(pid)).then_some(()))
    })?;
    let log = std::fs::read_to_string(dir.path().join("agent-k.log"))?;
    assert!(log.contains("the previous agent left running"), "{log}");
    Ok(())
}

/// 9: a retry and a not_before computed under a clock an hour ahead come
/// due at sane times after the coordinator restarts on a clock stepped
/// back: the retry within its backoff, the planned job at its wall time.
#[test]
fn a_clock_stepped_back_across_a_restart_strands_no_job() -> TestResult {
    let Some(lib) = crate::failover::libfaketime() else {
        if std::env::var_os("DROVER_REQUIRE_FAKETIME").is_some() {
            return Err("libfaketime is required (DROVER_REQUIRE_FAKETIME) but missing".into());
        }
        println!("libfaketime missing (apt install faketime): skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+3600\n")?;
    let offset_s = offset.to_string_lossy().to_string();
    let mut coord = Coordinator::start_with_env(
        dir.path(),
        &["--auto-approve", "--retry-backoff", "2"],
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", &offset_s),
            ("FAKETIME_NO_CACHE", "1"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    )?;
    let api = coord.api();
    let fake = FakeAgent::register(&api, "f")?;
    let retried = api.submit(&json!({"command": ["true"], "max_attempts": 3}))?;
    let claim = fake.claim(&api, 5)?;
    assert_eq!(claim.body["jobs"][0]["job_id"], retried, "{}", claim.text);
    let r = fake.complete(&api, retried, 1, "failed")?;
    assert_eq!(r.status, 200, "{}", r.text);
    // Planned for 20 minutes from now (real wall time).
    let planned_at = std::time::SystemTime::now() + Duration::from_secs(20 * 60);
    let not_before = humantime::format_rfc3339_seconds(planned_at).to_string();
    let planned = api.submit(&json!({"command": ["true"], "not_before": not_before}))?;
    coord.stop()?;
    std::fs::write(&offset, "+0\n")?;
    coord.restart()?;
    let api = coord.api();
    // The fake agent's token and process identity survive the restart.
    let start = Instant::now();
    let claim = wait_for("the retry", Duration::from_secs(30), || {
        let c = fake.claim(&api, 1)?;
        Ok(
            (c.status == 200 && !c.body["jobs"].as_array().is_none_or(|j| j.is_empty()))
                .then_some(c),
        )
    })?;
    println!(
        "retry claimed {:.1} s after the restart",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(claim.body["jobs"][0]["job_id"], retried, "{}", claim.text);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the retry waited past its backoff"
    );
    let j = api.job(planned)?;
    assert_eq!(j["status"], "queued", "{j}");
    let why = j["waiting_reason"].as_str().unwrap_or("");
    assert!(
        why.contains(&not_before[..16]),
        "still waits for its wall time {not_before}: {why}"
    );
    Ok(())
}

/// 10 (the secret's side): registrations waiting for approval are bounded.
#[test]
fn the_secret_cannot_grow_the_registry_without_bound() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    for i in 0..1000 {
        let r = register(&api, SECRET, &format!("w{i}"), &format!("m{i}"))?;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = register(&api, SECRET, "one-more", "m-more")?;
    assert_eq!(
        (r.status, r.code()),
        (429, "too_many_pending"),
        "{}",
        r.text
    );
    Ok(())
}
