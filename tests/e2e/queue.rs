//! Jobs flow through real agents; claims never hand one job out twice.

use crate::harness::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn three_agents_run_200_jobs_exactly_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let agents: Vec<Agent> = (0..3)
        .map(|i| Agent::start(&coord.url, dir.path(), &format!("w{i}"), &[]))
        .collect::<TestResult<_>>()?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(api.submit(&json!({
            "command": ["sh", "-c", "echo \"$DROVER_JOB_ID\" >> \"$RUNS\"; echo \"{\\\"i\\\": $I}\" > \"$DROVER_RESULT_FILE\"; echo out-$I"],
            "env": {"RUNS": runs.to_string_lossy(), "I": i.to_string()},
        }))?);
    }
    let done = wait_for("200 jobs to succeed", Duration::from_secs(120), || {
        let failed = api.jobs("failed")?;
        if !failed.is_empty() {
            return Err(format!("a job failed: {}", failed[0]).into());
        }
        let ok = api.jobs("succeeded")?;
        Ok((ok.len() == 200).then_some(ok))
    })?;
    // Each job ran exactly once: its id is in the runs file once.
    let lines = read_lines(&runs);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for l in &lines {
        *counts.entry(l.clone()).or_default() += 1;
    }
    assert_eq!(lines.len(), 200, "200 runs for 200 jobs");
    for id in &ids {
        assert_eq!(counts.get(&id.to_string()), Some(&1), "job {id} ran once");
    }
    let mut per_worker: HashMap<i64, usize> = HashMap::new();
    for j in &done {
        assert_eq!(j["attempt"], 1, "{j}");
        assert_eq!(j["exit_code"], 0);
        *per_worker
            .entry(j["worker_id"].as_i64().unwrap_or(0))
            .or_default() += 1;
    }
    for a in &agents {
        assert!(
            per_worker.get(&a.worker_id()?).copied().unwrap_or(0) > 0,
            "every agent ran jobs: {per_worker:?}"
        );
    }
    // Result documents and logs arrived with the job.
    let j = api.job(ids[7])?;
    assert_eq!(j["result"], json!({"i": 7}));
    let log = api.admin("GET", &format!("/api/v1/jobs/{}/logs", ids[7]), None)?;
    assert_eq!(log.status, 200);
    assert_eq!(log.text, "out-7\n");
    Ok(())
}

#[test]
fn reports_ride_on_the_claim_and_each_gets_its_own_answer() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let agent = FakeAgent::register(&api, "batch")?;
    let ok =
        |job: i64| json!({"job_id": job, "attempt": 1, "outcome": "succeeded", "exit_code": 0});
    let state = || -> TestResult<String> {
        let w = api.admin("GET", "/api/v1/workers", None)?;
        Ok(w.body["workers"][0]["state"]
            .as_str()
            .unwrap_or("")
            .to_string())
    };
    assert_eq!(state()?, "idle");
    let a = api.submit(&json!({"command": ["true"]}))?;
    let r = agent.claim(&api, 5)?;
    assert_eq!(r.body["jobs"][0]["job_id"], a, "{}", r.text);
    assert_eq!(state()?, "busy", "a claim makes an idle worker busy");
    let b = api.submit(&json!({"command": ["true"]}))?;
    // Done with a, and b comes back in the same reply (one slot: the report
    // freed it). A stale and an unknown report each get their own refusal.
    let r = agent.claim_reporting(
        &api,
        5,
        json!([ok(a), {"job_id": a, "attempt": 7, "outcome": "failed"}, ok(999_999)]),
    )?;
    assert_eq!(r.status, 200, "{}", r.text);
    let answers = &r.body["completed"];
    assert_eq!(answers[0]["status"], "succeeded", "{}", r.text);
    assert_eq!(answers[0]["replay"], false);
    assert_eq!(answers[1]["error"]["code"], "stale_lease", "{}", r.text);
    assert_eq!(answers[2]["error"]["code"], "not_found", "{}", r.text);
    assert_eq!(r.body["jobs"][0]["job_id"], b, "{}", r.text);
    assert_eq!(api.job(a)?["status"], "succeeded");
    // One bad report refuses the whole claim, naming it; nothing is recorded.
    let bad = json!([ok(b), {"job_id": b, "attempt": 0, "outcome": "succeeded"}]);
    let r = agent.claim_reporting(&api, 0, bad)?;
    assert_eq!(
        (r.status, r.field()),
        (422, "completed[1].attempt"),
        "{}",
        r.text
    );
    assert_eq!(api.job(b)?["status"], "running");
    // Nothing to hand out: the answers still come (200, not 204).
    let r = agent.claim_reporting(&api, 1, json!([ok(b)]))?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["jobs"], json!([]));
    assert_eq!(r.body["completed"][0]["status"], "succeeded");
    assert_eq!(state()?, "idle", "its last job's end makes it idle");
    // The same report again (its reply was lost): a replay.
    let r = agent.claim_reporting(&api, 0, json!([ok(b)]))?;
    assert_eq!(r.body["completed"][0]["replay"], true, "{}", r.text);
    // From a process the coordinator does not know: the claim is refused,
    // the report is kept, and sending it again replays. A job the freed
    // slot could take meanwhile goes back to the queue: at once when the
    // claim saw the grant, else as soon as the round finds the claim gone
    // (well before the next heartbeat could release it).
    let c = api.submit(&json!({"command": ["true"]}))?;
    assert_eq!(agent.claim(&api, 5)?.body["jobs"][0]["job_id"], c);
    let d = api.submit(&json!({"command": ["true"]}))?;
    let stranger = json!({"incarnation": "not-this-one", "completed": [ok(c)]});
    let r = agent.claim_with(&api, 0, stranger)?;
    assert_eq!(
        (r.status, r.code()),
        (409, "unknown_incarnation"),
        "{}",
        r.text
    );
    assert_eq!(api.job(c)?["status"], "succeeded");
    wait_for(
        "the refused claim's grant to be re-queued",
        Duration::from_secs(3),
        || Ok((api.job(d)?["status"] == "queued").then_some(())),
    )?;
    let r = agent.claim_reporting(&api, 5, json!([ok(c)]))?;
    assert_eq!(r.body["completed"][0]["replay"], true, "{}", r.text);
    assert_eq!(r.body["jobs"][0]["job_id"], d, "{}", r.text);
    Ok(())
}

/// F5: duplicate, conflicting, late and handed-back reports in random
/// orders (`DROVER_F5_TRIALS`, 200; the nightly 1,000): a repeat of an
/// accepted report replays, a different one is 409, a report for an attempt
/// handed back and claimed again is 409 whenever it comes; every job ends
/// once, with the outcome of the one report that was accepted.
#[test]
fn a_heartbeat_rides_on_the_claim_and_is_answered_in_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "30"])?;
    let api = coord.api();
    let agent = FakeAgent::register(&api, "rider")?;
    let inc = agent.incarnation.clone();
    let beat = |leases: Value| json!({"incarnation": inc, "leases": leases});
    let job = api.submit(&json!({"command": ["true"]}))?;
    assert_eq!(agent.claim(&api, 5)?.body["jobs"][0]["job_id"], job);
    std::thread::sleep(Duration::from_millis(2500));
    let left = |api: &Api| -> TestResult<f64> {
        Ok(api.job(job)?["lease_expires_in_s"]
            .as_f64()
            .ok_or("no lease")?)
    };
    let before = left(&api)?;
    // Nothing to hand out: 200 (not 204) with the heartbeat's answer, and
    // the lease it lists is renewed.
    let leases = json!([{"job_id": job, "attempt": 1}]);
    let r = agent.claim_with(
        &api,
        1,
        json!({"incarnation": inc, "beat": beat(leases.clone())}),
    )?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["jobs"], json!([]));
    assert_eq!(r.body["beat"]["heartbeat_interval_s"], 10, "{}", r.text);
    assert_eq!(r.body["beat"]["orders"], json!([]));
    assert!(r.body["beat"]["now_ms"].as_i64() > Some(0), "{}", r.text);
    assert!(
        left(&api)? > before + 1.0,
        "the lease was renewed: {before} s left before"
    );
    // Its incarnation must be the claim's, and a stopping agent claims nothing.
    let mut other = beat(leases.clone());
    other["incarnation"] = json!("another-process");
    let r = agent.claim_with(&api, 0, json!({"incarnation": inc, "beat": other}))?;
    assert_eq!(
        (r.status, r.field()),
        (422, "beat.incarnation"),
        "{}",
        r.text
    );
    let mut stopping = beat(leases.clone());
    stopping["stopping"] = json!(true);
    let r = agent.claim_with(&api, 0, json!({"incarnation": inc, "beat": stopping}))?;
    assert_eq!((r.status, r.field()), (422, "beat.stopping"), "{}", r.text);
    // A cancel in the heartbeat's answer does not wait out the park.
    let r = api.admin("POST", &format!("/api/v1/jobs/{job}/cancel"), None)?;
    assert_eq!(r.status, 200, "{}", r.text);
    let t0 = Instant::now();
    let r = agent.claim_with(&api, 30, json!({"incarnation": inc, "beat": beat(leases)}))?;
    assert_eq!(r.body["beat"]["orders"][0]["kind"], "cancel", "{}", r.text);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "answered at once, not after the 30 s wait: {:?}",
        t0.elapsed()
    );
    // A new process introduces itself with the heartbeat on its first claim
    // (no separate heartbeat first); the old process's lease is released.
    let fresh = json!({"incarnation": "rider-2", "beat": {"incarnation": "rider-2"}});
    let r = agent.claim_with(&api, 0, fresh)?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(api.job(job)?["status"], "cancelled");
    Ok(())
}

#[test]
fn duplicate_late_and_handed_back_reports_in_random_orders() -> TestResult {
    let trials = env_or("DROVER_F5_TRIALS", 200);
    let seed = seed_from("DROVER_F5_SEED");
    println!("F5: {trials} trials, seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let (a, b) = (
        FakeAgent::register(&api, "a")?,
        FakeAgent::register(&api, "b")?,
    );
    let outcomes = ["succeeded", "failed"];
    let mut ended: Vec<(i64, &str)> = Vec::new();
    for _ in 0..trials {
        let id = api.submit(&json!({"command": ["true"], "max_attempts": 1}))?;
        assert_eq!(a.claim(&api, 5)?.body["jobs"][0]["job_id"], id);
        let x = outcomes[rng.below(2) as usize];
        let y = outcomes[1 - rng.below(2) as usize];
        match rng.below(3) {
            // The same report several times: one acceptance, then replays.
            0 => {
                for n in 0..2 + rng.below(3) {
                    let r = a.complete(&api, id, 1, x)?;
                    assert_eq!(r.status, 200, "{}", r.text);
                    assert_eq!(r.body["replay"], n > 0, "{}", r.text);
                }
                ended.push((id, x));
            }
            // A second, different report for the same attempt.
            1 => {
                assert_eq!(a.complete(&api, id, 1, x)?.status, 200);
                let r = a.complete(
                    &api,
                    id,
                    1,
                    if x == "failed" { "succeeded" } else { "failed" },
                )?;
                assert_eq!(r.status, 409, "{}", r.text);
                ended.push((id, x));
            }
            // Handed back, claimed by b; a's late reports and b's report in
            // a random order.
            _ => {
                assert_eq!(a.complete(&api, id, 1, "released")?.status, 200);
                let r = b.claim(&api, 5)?;
                assert_eq!(r.body["jobs"][0]["attempt"], 2, "{}", r.text);
                let mut steps = vec![0, 1, 2];
                for i in (1..steps.len()).rev() {
                    steps.swap(i, rng.below(i as u64 + 1) as usize);
                }
                for step in steps {
                    let (r, want) = match step {
                        0 => (a.complete(&api, id, 1, x)?, 409),
                        1 => (a.complete(&api, id, 1, "released")?, 200),
                        _ => (b.complete(&api, id, 2, y)?, 200),
                    };
                    assert_eq!(r.status, want, "step {step}: {}", r.text);
                }
                ended.push((id, y));
            }
        }
    }
    let ids: Vec<i64> = ended.iter().map(|(id, _)| *id).collect();
    for ((id, outcome), now) in ended.iter().zip(ended_once(&coord, &ids)?) {
        assert_eq!(&now, outcome, "job {id}");
    }
    Ok(())
}

/// F7c: an admin's cancel races the agent's report of a natural exit, 200
/// times (`DROVER_F7_RACES`): every cancel and report is answered without a
/// 5xx, and every job reaches exactly one terminal state.
#[test]
fn cancel_racing_a_natural_exit_ends_each_job_once() -> TestResult {
    let races = env_or("DROVER_F7_RACES", 200);
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let agent = FakeAgent::register(&api, "racer")?;
    let mut ids = Vec::new();
    for _ in 0..races {
        let id = api.submit(&json!({"command": ["true"], "max_attempts": 1}))?;
        assert_eq!(agent.claim(&api, 5)?.body["jobs"][0]["job_id"], id);
        let (cancel, report) = std::thread::scope(|s| {
            let url = coord.url.clone();
            let cancel = s.spawn(move || {
                Api::new(&url)
                    .admin("POST", &format!("/api/v1/jobs/{id}/cancel"), None)
                    .map_err(|e| e.to_string())
            });
            let report = agent.complete(&api, id, 1, "succeeded");
            (cancel.join(), report)
        });
        let cancel = cancel.map_err(|_| "cancel thread panicked")??;
        let report = report?;
        assert!(
            cancel.status < 500 && report.status < 500,
            "{} / {}",
            cancel.text,
            report.text
        );
        assert_eq!(
            report.status, 200,
            "a report of the live lease is accepted: {}",
            report.text
        );
        ids.push((id, cancel.status));
    }
    let mut states: HashMap<String, usize> = HashMap::new();
    let jobs: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
    for ((id, cancel), status) in ids.iter().zip(ended_once(&coord, &jobs)?) {
        assert!(
            status == "succeeded" || status == "cancelled",
            "job {id}: {status}"
        );
        *states
            .entry(format!("{status}, cancel answered {cancel}"))
            .or_default() += 1;
    }
    println!("{races} cancel/exit races: {states:?}");
    Ok(())
}

/// F4: the coordinator granted a lease, but its claim reply never reached
/// the agent. The agent's heartbeats do not list it; one heartbeat interval
/// after the grant the coordinator releases it (reconciliation), well before
/// the lease would have expired, without spending an attempt.
#[test]
fn a_lease_whose_claim_reply_was_lost_is_released_by_the_next_heartbeats() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ttl = 9;
    let coord = Coordinator::start(
        dir.path(),
        &["--auto-approve", "--lease-ttl", &ttl.to_string()],
    )?;
    let api = coord.api();
    let agent = FakeAgent::register(&api, "deaf")?;
    let id = api.submit(&json!({"command": ["true"], "max_attempts": 1}))?;
    let r = agent.claim(&api, 5)?;
    assert_eq!(r.body["jobs"][0]["job_id"], id, "{}", r.text);
    let granted = std::time::Instant::now();
    // The reply is "lost": the agent keeps heartbeating without the lease.
    let released = wait_for(
        "the unreported lease to be released",
        Duration::from_secs(3 * ttl),
        || {
            let hb = agent.heartbeat(&api, &[])?;
            assert_eq!(hb.status, 200, "{}", hb.text);
            std::thread::sleep(Duration::from_millis(250));
            let job = api.job(id)?;
            Ok((job["status"] == "queued").then_some(job))
        },
    )?;
    let after = granted.elapsed().as_secs_f64();
    println!(
        "released {after:.1}s after the grant (heartbeat interval {}s, TTL {ttl}s)",
        ttl / 3
    );
    let attempt = &released["attempts"][0];
    assert_eq!(attempt["outcome"], "not_reported", "{released}");
    // By reconciliation, not by waiting out the lease (3 s against 9 s).
    assert!(after < ttl as f64, "released {after:.1}s after the grant");
    // Not the lease's expiry (that would say lease_lost), and not spent:
    // with max_attempts 1 it runs again, and succeeds.
    assert_eq!(released["attempts_used"], 0, "{released}");
    let r = agent.claim(&api, 5)?;
    assert_eq!(r.body["jobs"][0]["attempt"], 2, "{}", r.text);
    let c = agent.complete(&api, id, 2, "succeeded")?;
    assert_eq!(c.status, 200, "{}", c.text);
    assert_eq!(api.job(id)?["status"], "succeeded");
    Ok(())
}

/// C2: many agents long-poll, one job at a time is submitted: exactly one
/// agent gets each job, as attempt 1. 100 agents and 100 jobs by default
/// (`DROVER_C2_AGENTS`, `DROVER_C2_JOBS` for the nightly 200); prints the
/// submit -> claim reply latency.
#[test]
fn parked_agents_race_for_each_job_and_one_wins() -> TestResult {
    let n_agents = env_or("DROVER_C2_AGENTS", 100) as usize;
    let n_jobs = env_or("DROVER_C2_JOBS", 100) as usize;
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let racers: Vec<FakeAgent> = (0..n_agents)
        .map(|i| FakeAgent::register(&api, &format!("r{i}")))
        .collect::<TestResult<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    // (agent, job, attempt, when the claim reply arrived)
    type Grant = (usize, i64, i64, Instant);
    let grants: Arc<Mutex<Vec<Grant>>> = Arc::default();
    let mut submitted: HashMap<i64, Instant> = HashMap::new();
    std::thread::scope(|s| -> TestResult {
        let mut handles = Vec::new();
        for (n, agent) in racers.iter().enumerate() {
            let (stop, grants, url) = (stop.clone(), grants.clone(), coord.url.clone());
            handles.push(s.spawn(move || -> Result<(), String> {
                let api = Api::new(&url);
                while !stop.load(Ordering::Relaxed) {
                    let r = agent.claim(&api, 2).map_err(|e| e.to_string())?;
                    let at = Instant::now();
                    match r.status {
                        204 => continue,
                        200 => {
                            let jobs = r.body["jobs"].as_array().cloned().unwrap_or_default();
                            if jobs.len() != 1 {
                                return Err(format!("one slot, one job: {}", r.text));
                            }
                            let job = jobs[0]["job_id"].as_i64().unwrap_or(0);
                            let attempt = jobs[0]["attempt"].as_i64().unwrap_or(0);
                            grants
                                .lock()
                                .map_err(|e| e.to_string())?
                                .push((n, job, attempt, at));
                            let c = agent
                                .complete(&api, job, attempt, "succeeded")
                                .map_err(|e| e.to_string())?;
                            if c.status != 200 {
                                return Err(format!("complete answered {}: {}", c.status, c.text));
                            }
                        }
                        other => return Err(format!("claim answered {other}: {}", r.text)),
                    }
                }
                Ok(())
            }));
        }
        let result = (|| -> TestResult {
            // Every racer parked before the first job.
            wait_for("all racers parked", Duration::from_secs(30), || {
                let waiting = api.agents_waiting()?;
                Ok((waiting == Some(n_agents as u64)).then_some(()))
            })?;
            for _ in 0..n_jobs {
                let t = Instant::now();
                let id = api.submit(&json!({"command": ["true"]}))?;
                submitted.insert(id, t);
                wait_for(
                    "the job to be taken and finished",
                    Duration::from_secs(10),
                    || Ok((api.job(id)?["status"] == "succeeded").then_some(())),
                )?;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().map_err(|_| "racer panicked")??;
        }
        result
    })?;
    let grants = grants.lock().map_err(|e| e.to_string())?;
    assert_eq!(grants.len(), n_jobs, "one grant per job");
    let jobs: HashSet<i64> = grants.iter().map(|g| g.1).collect();
    assert_eq!(jobs.len(), n_jobs, "no job granted twice");
    assert!(
        grants.iter().all(|g| g.2 == 1),
        "every grant is the first attempt"
    );
    let mut waits: Vec<f64> = grants
        .iter()
        .filter_map(|g| {
            submitted
                .get(&g.1)
                .map(|t| (g.3 - *t).as_secs_f64() * 1000.0)
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    let winners: HashSet<usize> = grants.iter().map(|g| g.0).collect();
    println!(
        "{n_agents} parked agents, {n_jobs} jobs: {} distinct winners; submit -> claim reply p50 {:.1} ms, p99 {:.1} ms",
        winners.len(),
        pct(&waits, 0.5),
        pct(&waits, 0.99)
    );
    Ok(())
}

/// C4: 1,000 simulated agents (`drover-agent simulate`) keep claims parked
/// and heartbeat while an admin reads and submits: long-polls starve
/// nothing and nothing answers 5xx. `DROVER_C4_AGENTS` sets the count.
#[test]
fn a_thousand_parked_claims_starve_nothing() -> TestResult {
    let n = env_or("DROVER_C4_AGENTS", 1000);
    // Two connections per agent in the simulator: more files than the usual
    // soft limit of 1,024 (the coordinator raises its own).
    coordinator::raise_open_files_limit();
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--max-connections", "8000"])?;
    let api = coord.api();
    let sim = std::process::Command::new(agent_bin())
        .args(["simulate", "--agents", &n.to_string(), "--duration", "20"])
        .args(["--coordinator", &coord.url, "--registration-secret", SECRET])
        .arg("--state-dir")
        .arg(dir.path().join("sim"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_for(
        "every simulated agent parked",
        Duration::from_secs(60),
        || {
            let waiting = api.agents_waiting()?;
            Ok((waiting >= Some(n)).then_some(()))
        },
    )?;
    let mut latency: Vec<f64> = Vec::new();
    let mut server_errors = Vec::new();
    let job = json!({"command": ["true"]});
    for _ in 0..100 {
        for (method, path, body) in [
            ("GET", "/healthz", None),
            ("GET", "/api/v1/jobs?limit=20", None),
            ("GET", "/api/v1/stats", None),
            ("POST", "/api/v1/jobs", Some(&job)),
        ] {
            let t = Instant::now();
            let r = api.admin(method, path, body)?;
            latency.push(t.elapsed().as_secs_f64() * 1000.0);
            if r.status >= 500 {
                server_errors.push(format!("{method} {path}: {} {}", r.status, r.text));
            }
        }
    }
    let out = sim.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or(format!("no summary from simulate: {stdout}"))?;
    latency.sort_by(f64::total_cmp);
    println!(
        "{n} parked claims: admin requests p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; heartbeats {} p99 {:.1} ms; simulator errors {}",
        pct(&latency, 0.5),
        pct(&latency, 0.99),
        pct(&latency, 1.0),
        summary["heartbeats"],
        summary["heartbeat_p99_ms"].as_f64().unwrap_or(f64::NAN),
        summary["errors"]
    );
    assert!(server_errors.is_empty(), "{server_errors:?}");
    assert_eq!(summary["agents"], n, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    Ok(())
}

/// Asserts that each job reached exactly one terminal state (one ending
/// event); returns their statuses, in order.
fn ended_once(coord: &Coordinator, ids: &[i64]) -> TestResult<Vec<String>> {
    let conn = rusqlite::Connection::open(coord.db_path())?;
    let mut endings = conn.prepare(
        "SELECT count(*) FROM events WHERE job_id = ?1 AND kind IN ('job.succeeded', 'job.failed', 'job.cancelled')",
    )?;
    let mut status = conn.prepare("SELECT status FROM jobs WHERE id = ?1")?;
    ids.iter()
        .map(|id| {
            let n: i64 = endings.query_row([id], |r| r.get(0))?;
            assert_eq!(n, 1, "job {id} ended {n} times");
            Ok(status.query_row([id], |r| r.get(0))?)
        })
        .collect()
}
