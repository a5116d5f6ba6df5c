//! Agents and the coordinator die; jobs still finish, once, and stale
//! reports are refused.

use crate::harness::*;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn killed_agent_job_runs_again_elsewhere_and_old_lease_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ttl = 3;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let mut a = Agent::start(&coord.url, dir.path(), "a", &[])?;
    wait_for("agent a to register", Duration::from_secs(20), || {
        Ok(a.worker_id().ok())
    })?;
    let id = api.submit(&json!({
        "command": ["sh", "-c",
            "echo \"$DROVER_ATTEMPT\" >> \"$RUNS\"; echo \"{\\\"attempt\\\": $DROVER_ATTEMPT}\" > \"$DROVER_RESULT_FILE\"; \
             if [ \"$DROVER_ATTEMPT\" = 1 ]; then exec sleep 600; fi"],
        "env": {"RUNS": runs.to_string_lossy()},
    }))?;
    wait_for("the job to run on a", Duration::from_secs(20), || {
        Ok((read_lines(&runs).len() == 1).then_some(()))
    })?;
    let a_id = a.worker_id()?;
    let a_token = a.token()?;
    assert_eq!(api.job(id)?["worker_id"], a_id);
    let b = Agent::start(&coord.url, dir.path(), "b", &[])?;
    wait_for("agent b to be idle", Duration::from_secs(20), || {
        let Ok(b_id) = b.worker_id() else {
            return Ok(None);
        };
        let w = api.admin("GET", &format!("/api/v1/workers/{b_id}"), None)?;
        Ok((w.body["state"] == "idle").then_some(()))
    })?;

    a.kill9();
    let killed = Instant::now();
    let rerun = wait_for("attempt 2 to start", Duration::from_secs(ttl + 10), || {
        Ok((read_lines(&runs).len() >= 2).then(|| killed.elapsed()))
    })?;
    println!(
        "re-dispatch after kill -9: {:.2}s (lease TTL {ttl}s)",
        rerun.as_secs_f64()
    );
    assert!(
        rerun <= Duration::from_secs(ttl + 3),
        "re-run within TTL + 3 s, took {rerun:?}"
    );

    let job = wait_for("the job to succeed", Duration::from_secs(20), || {
        let j = api.job(id)?;
        Ok((j["status"] == "succeeded").then_some(j))
    })?;
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["worker_id"], b.worker_id()?);
    assert_eq!(job["result"], json!({"attempt": 2}));
    assert_eq!(job["attempts"][0]["outcome"], "lease_lost");
    assert_eq!(job["attempts"][1]["outcome"], "succeeded");

    // The dead agent's lease is stale: its report is refused and changes nothing.
    let late =
        json!({"attempt": 1, "outcome": "succeeded", "exit_code": 0, "result": {"attempt": 1}});
    let r = api.call(
        "POST",
        &format!("/api/v1/jobs/{id}/complete"),
        Some(&a_token),
        Some(late.to_string().as_bytes()),
    )?;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.code(), "stale_lease");
    let log = api.call(
        "POST",
        &format!("/api/v1/jobs/{id}/logs?attempt=1"),
        Some(&a_token),
        Some(b"late output"),
    )?;
    assert_eq!(log.status, 409, "{}", log.text);
    let after = api.job(id)?;
    assert_eq!(after["result"], json!({"attempt": 2}));
    assert_eq!(after["attempt"], 2);
    assert_eq!(read_lines(&runs), vec!["1", "2"]);
    let offline = wait_for(
        "agent a to be marked offline",
        Duration::from_secs(ttl + 10),
        || {
            let w = api.admin("GET", &format!("/api/v1/workers/{a_id}"), None)?;
            Ok((w.body["state"] == "offline").then_some(w.body))
        },
    )?;
    // ...with how to bring it back from the address it registered from.
    let restore = offline["restore"].as_str().unwrap_or("");
    assert!(
        restore.starts_with("drover-agent deploy root@127.0.0.1 --name a --coordinator"),
        "{offline}"
    );
    Ok(())
}

#[test]
fn coordinator_kill9_loses_nothing_and_runs_nothing_twice() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let _agents: Vec<Agent> = (0..3)
        .map(|i| Agent::start(&coord.url, dir.path(), &format!("k{i}"), &[]))
        .collect::<TestResult<_>>()?;
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(api.submit(&json!({
            "command": crate::checker::recorded(&runs, "sleep 0.05"),
        }))?);
    }
    wait_for("some jobs to finish", Duration::from_secs(60), || {
        Ok((api.jobs("succeeded")?.len() >= 20).then_some(()))
    })?;
    let running = api.jobs("running")?.len();
    coord.kill9();
    std::thread::sleep(Duration::from_millis(500));
    coord.restart()?;
    let api = coord.api();
    println!("killed the coordinator with {running} jobs running");
    wait_for("all 300 jobs to succeed", Duration::from_secs(180), || {
        let failed = api.jobs("failed")?;
        if !failed.is_empty() {
            return Err(format!("a job failed: {}", failed[0]).into());
        }
        Ok((api.jobs("succeeded")?.len() == 300).then_some(()))
    })?;
    coord.kill9();
    let report = crate::checker::assert_clean(&coord.db_path(), &runs, &ids)?;
    // No agent died: every job's process started exactly once. Usually as
    // attempt 1; a later attempt only where the kill fell between a claim's
    // commit and its reply (F4): that lease was never run, the next
    // heartbeat's reconciliation released it, and it counts as lost.
    let mut starts: HashMap<i64, Vec<i64>> = HashMap::new();
    for l in read_lines(&runs) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let ["start", job, attempt] = f[..] {
            starts
                .entry(job.parse()?)
                .or_default()
                .push(attempt.parse()?);
        }
    }
    let mut retried = 0;
    for id in &ids {
        let attempts = starts.get(id).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            attempts.len(),
            1,
            "job {id} started once, got attempts {attempts:?}"
        );
        retried += usize::from(attempts[0] != 1);
    }
    assert!(
        retried <= report.lost_leases,
        "{retried} jobs first ran after attempt 1, but only {} leases were lost",
        report.lost_leases
    );
    Ok(())
}

/// F1 as a loop: two real agents; a job runs on one, that agent is
/// SIGKILLed (its job dies with it), the job runs again on the other once
/// the lease expires, then the dead agent comes back for the next round.
/// Re-dispatch times are printed against TTL + sweep + 2 s; the checker
/// reads every job's history. `DROVER_F1_KILLS` (3; 100 for the nightly
/// scale).
#[test]
fn agents_killed_mid_job_again_and_again_lose_no_job() -> TestResult {
    let kills = env_or("DROVER_F1_KILLS", 3);
    let ttl = 3;
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let history = dir.path().join("history.txt");
    let mut agents: Vec<Option<Agent>> = ["a", "b"]
        .iter()
        .map(|n| Agent::start(&coord.url, dir.path(), n, &[]).map(Some))
        .collect::<TestResult<_>>()?;
    let (mut ids, mut moved) = (Vec::new(), Vec::new());
    for round in 0..kills {
        wait_for(
            "both agents to wait for work",
            Duration::from_secs(20),
            || Ok((api.agents_waiting()? == Some(2)).then_some(())),
        )?;
        // Only the job's first run lasts; later ones end at once. (Not
        // "attempt 1": a grant can go to the parked claim a killed agent
        // left, and its restart hands that attempt back unrun.)
        let marker = dir.path().join("ran-$DROVER_JOB_ID");
        let work = format!(
            "if [ ! -e \"{0}\" ]; then touch \"{0}\"; sleep 600; fi",
            marker.display()
        );
        let id = api.submit(&json!({
            "command": crate::checker::recorded(&history, &work),
            "max_attempts": 5,
        }))?;
        ids.push(id);
        // Mid-job: its process has started, and the coordinator says where.
        let prefix = format!("start {id} ");
        let first = wait_for(
            "the job's process to start",
            Duration::from_secs(20),
            || {
                let Some(attempt) = read_lines(&history)
                    .iter()
                    .find_map(|l| l.strip_prefix(&prefix)?.parse::<i64>().ok())
                else {
                    return Ok(None);
                };
                let j = api.job(id)?;
                Ok(
                    (j["status"] == "running" && j["attempt"].as_i64() == Some(attempt))
                        .then(|| j["worker_id"].as_i64())
                        .flatten(),
                )
            },
        )?;
        let mut victim = None;
        for slot in agents.iter_mut() {
            if slot.as_ref().and_then(|a| a.worker_id().ok()) == Some(first) {
                victim = slot.take();
            }
        }
        let mut victim = victim.ok_or("no agent runs the job")?;
        let name = victim
            .state_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("agent-"))
            .ok_or("agent name")?
            .to_string();
        victim.kill9();
        let killed = Instant::now();
        let job = wait_for(
            "the job to finish elsewhere",
            Duration::from_secs(ttl + 20),
            || {
                let j = api.job(id)?;
                Ok((j["status"] == "succeeded").then_some(j))
            },
        )?;
        let rerun = killed.elapsed().as_secs_f64();
        assert_ne!(
            job["worker_id"].as_i64(),
            Some(first),
            "round {round}: {job}"
        );
        moved.push(rerun);
        let slot = agents.iter_mut().find(|a| a.is_none()).ok_or("slot")?;
        *slot = Some(Agent::start(&coord.url, dir.path(), &name, &[])?);
    }
    moved.sort_by(f64::total_cmp);
    println!(
        "F1: {kills} agents killed mid-job; kill -> the job done on the other agent p50 {:.2} s, p99 {:.2} s, max {:.2} s (target TTL {ttl} + sweep 1 + 2 = {} s)",
        pct(&moved, 0.5),
        pct(&moved, 0.99),
        pct(&moved, 1.0),
        ttl + 3
    );
    let report = crate::checker::assert_clean(&coord.db_path(), &history, &ids)?;
    assert_eq!(report.succeeded, ids.len());
    assert!(report.lost_leases >= ids.len(), "a lost lease per kill");
    assert_eq!(report.superseded_runs, ids.len(), "one killed run per kill");
    assert!(
        pct(&moved, 1.0) <= (ttl + 3) as f64,
        "re-dispatch took {:.2} s",
        pct(&moved, 1.0)
    );
    Ok(())
}

/// Builds `tests/e2e/fixtures/NAME.c` into a library to preload, in `dir`.
/// None (the test says it is skipped) where there is no C compiler; a
/// fixture that does not compile is an error.
fn preload_fixture(dir: &Path, name: &str) -> TestResult<Option<std::path::PathBuf>> {
    let lib = dir.join(format!("lib{name}.so"));
    let source =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/e2e/fixtures/{name}.c"));
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&source)
        .args(["-ldl", "-lpthread"])
        .output();
    match built {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("skipped: no C compiler (cc) to build {name}.c");
            Ok(None)
        }
        Err(e) => Err(format!("running cc: {e}").into()),
        Ok(o) if !o.status.success() => Err(format!(
            "{name}.c does not compile: {}",
            String::from_utf8_lossy(&o.stderr)
        )
        .into()),
        Ok(_) => Ok(Some(lib)),
    }
}

/// What a run of coordinator kills left standing.
struct Kills {
    submitted: usize,
    reported: usize,
    /// Acknowledged submissions gone (or another job under their id).
    lost: Vec<i64>,
    /// Acknowledged reports whose job is not terminal with that outcome.
    wrong: Vec<(i64, &'static str, Option<String>)>,
    /// integrity_check of the files as each kill left them.
    integrity: Vec<String>,
    /// kill -> /healthz again, seconds.
    back_in: Vec<f64>,
}

/// The coordinator (with `extra` flags and `env`) is SIGKILLed `kills`
/// times at random moments (0-500 ms after it is back) while 4 clients
/// submit and 4 stand-in agents claim and report (with their claims).
/// Each submission carries a token in its command, so that a job under a
/// lost one's reused id does not count as the lost one.
fn kill_loop(kills: u64, seed: u64, extra: &[&str], env: &[(&str, &str)]) -> TestResult<Kills> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir()?;
    let flags: Vec<&str> = ["--auto-approve", "--lease-ttl", "3"]
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect();
    let mut coord = Coordinator::start_with_env(dir.path(), &flags, env)?;
    let agents: Vec<FakeAgent> = (0..4)
        .map(|i| FakeAgent::register(&coord.api(), &format!("d1-{i}")))
        .collect::<TestResult<_>>()?;
    // The registrations on disk (a clean exit hands everything over), so a
    // power cut below cannot lose the fleet itself.
    coord.stop()?;
    coord.restart()?;
    let url = coord.url.clone();
    let stop = AtomicBool::new(false);
    let tokens = AtomicUsize::new(0);
    let submitted: Mutex<Vec<(i64, String)>> = Mutex::default();
    let reported: Mutex<Vec<(i64, String, &'static str)>> = Mutex::default();
    let (mut back_in, mut integrity) = (Vec::new(), Vec::new());
    std::thread::scope(|s| -> TestResult {
        for _ in 0..4 {
            s.spawn(|| {
                let api = Api::new(&url);
                while !stop.load(Ordering::Relaxed) {
                    let token = format!("t{}", tokens.fetch_add(1, Ordering::Relaxed));
                    let spec = json!({"command": ["true", token], "max_attempts": 1});
                    match api.admin("POST", "/api/v1/jobs", Some(&spec)) {
                        Ok(r) if r.status == 201 => {
                            if let (Some(id), Ok(mut v)) = (r.body["id"].as_i64(), submitted.lock())
                            {
                                v.push((id, token));
                            }
                        }
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        for agent in &agents {
            let (stop, reported, url) = (&stop, &reported, &url);
            s.spawn(move || {
                let api = Api::new(url);
                let outcome = |job: i64| if job % 2 == 0 { "succeeded" } else { "failed" };
                // Claimed and not yet answered (job, attempt, token); reports
                // ride on the next claim.
                let mut held: Vec<(i64, i64, String)> = Vec::new();
                let mut beat = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if beat.elapsed() > Duration::from_millis(500) {
                        let leases: Vec<(i64, i64)> = held.iter().map(|(j, a, _)| (*j, *a)).collect();
                        let _ = agent.heartbeat(&api, &leases);
                        beat = Instant::now();
                    }
                    let reports: Vec<_> = held
                        .iter()
                        .map(|(j, a, _)| json!({"job_id": j, "attempt": a, "outcome": outcome(*j),
                                              "exit_code": if outcome(*j) == "failed" { 1 } else { 0 }}))
                        .collect();
                    match agent.claim_reporting(&api, 1, json!(reports)) {
                        Ok(r) if r.status == 200 => {
                            for answer in r.body["completed"].as_array().into_iter().flatten() {
                                let job = answer["job_id"].as_i64().unwrap_or(0);
                                let token = held.iter().find(|h| h.0 == job).map(|h| h.2.clone());
                                if let (true, Some(token), Ok(mut v)) =
                                    (answer["error"].is_null(), token, reported.lock())
                                {
                                    v.push((job, token, outcome(job)));
                                }
                            }
                            held.clear();
                            for j in r.body["jobs"].as_array().into_iter().flatten() {
                                held.push((
                                    j["job_id"].as_i64().unwrap_or(0),
                                    j["attempt"].as_i64().unwrap_or(0),
                                    j["command"][1].as_str().unwrap_or_default().to_string(),
                                ));
                            }
                        }
                        Ok(r) if r.status == 204 => {}
                        // Down, restarting, or refused: keep the reports.
                        _ => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            });
        }
        let result = (|| -> TestResult {
            for _ in 0..kills {
                std::thread::sleep(Duration::from_millis(rng.below(500)));
                coord.kill9();
                let t = Instant::now();
                let files = rusqlite::Connection::open_with_flags(
                    coord.db_path(),
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                integrity.push(files.query_row("PRAGMA integrity_check", [], |r| r.get(0))?);
                drop(files);
                coord.restart()?;
                wait_for("/healthz", Duration::from_secs(20), || {
                    Ok(coord.api().healthy().then_some(()))
                })?;
                back_in.push(t.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_secs(1));
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    coord.kill9();
    let submitted = submitted.into_inner().map_err(|e| e.to_string())?;
    let reported = reported.into_inner().map_err(|e| e.to_string())?;
    let conn = rusqlite::Connection::open(coord.db_path())?;
    integrity.push(conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?);
    let mut row = conn.prepare("SELECT status, command FROM jobs WHERE id = ?1")?;
    let mut status_of = |id: i64, token: &str| -> Option<String> {
        let (status, command): (String, String) =
            row.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).ok()?;
        command.contains(&format!("\"{token}\"")).then_some(status)
    };
    let lost = submitted
        .iter()
        .filter(|(id, token)| status_of(*id, token).is_none())
        .map(|(id, _)| *id)
        .collect();
    let wrong = reported
        .iter()
        .map(|(id, token, outcome)| (*id, *outcome, status_of(*id, token)))
        .filter(|(_, outcome, now)| now.as_deref() != Some(*outcome))
        .collect();
    back_in.sort_by(f64::total_cmp);
    Ok(Kills {
        submitted: submitted.len(),
        reported: reported.len(),
        lost,
        wrong,
        integrity,
        back_in,
    })
}

impl Kills {
    fn print(&self, what: &str) {
        println!(
            "{what}: {} submissions acknowledged, {} reports acknowledged; kill -> /healthz again p50 {:.2} s, max {:.2} s; \
             lost {}, reports not standing {}, integrity ok {}/{}",
            self.submitted,
            self.reported,
            pct(&self.back_in, 0.5),
            pct(&self.back_in, 1.0),
            self.lost.len(),
            self.wrong.len(),
            self.integrity.iter().filter(|i| *i == "ok").count(),
            self.integrity.len()
        );
    }

    /// Nothing acknowledged is lost, the files are sound after every kill.
    fn check_durable(&self) {
        assert!(
            self.lost.is_empty(),
            "acknowledged submissions lost: {:?}",
            self.lost
        );
        assert!(
            self.wrong.is_empty(),
            "acknowledged reports not standing: {:?}",
            self.wrong
        );
        assert!(
            self.integrity.iter().all(|i| i == "ok"),
            "integrity: {:?}",
            self.integrity
        );
        assert!(self.reported > 0, "the agents reported jobs");
    }
}

/// D1: the coordinator is SIGKILLed at random moments while clients submit
/// and stand-in agents report (`kill_loop`). Every submission answered 201
/// exists afterwards; every report answered without error left its job
/// terminal with that outcome; integrity_check is ok. `DROVER_D1_KILLS` (5)
/// sets the number of kills (100 for the nightly scale); `DROVER_D1_SEED`
/// replays the moments.
#[test]
fn coordinator_killed_at_random_moments_keeps_every_acknowledged_write() -> TestResult {
    let kills = env_or("DROVER_D1_KILLS", 5);
    let seed = seed_from("DROVER_D1_SEED");
    println!("D1: {kills} kills, seed {seed}");
    let run = kill_loop(kills, seed, &[], &[])?;
    run.print("D1");
    run.check_durable();
    Ok(())
}

/// D3: the same kills as power cuts: a fixture preloaded into the
/// coordinator (`tests/e2e/fixtures/lazywrite.c`) keeps the database's
/// writes in the process until they are fsync'd, so each SIGKILL loses
/// every write not yet synced (what LazyFS's clear-cache does). With
/// `synchronous=FULL` (the default) nothing acknowledged is lost; with
/// `NORMAL` the files stay sound and recent commits may be lost (printed:
/// the trade-off), and some are, which shows the fixture bites.
/// `DROVER_D3_KILLS` (5 each; 50 for the nightly scale), `DROVER_D3_SEED`.
#[test]
fn power_cuts_lose_nothing_acknowledged_with_full_sync() -> TestResult {
    let dir = tempfile::tempdir()?;
    let Some(lib) = preload_fixture(dir.path(), "lazywrite")? else {
        return Ok(());
    };
    let kills = env_or("DROVER_D3_KILLS", 5);
    let seed = seed_from("DROVER_D3_SEED");
    println!("D3: {kills} power cuts per mode, seed {seed}");
    let lib = lib.to_string_lossy();
    // The harness names the database drover.db (its -wal and -shm follow).
    let run = |sync: &str| {
        kill_loop(
            kills,
            seed,
            &["--sqlite-synchronous", sync],
            &[("LD_PRELOAD", &lib), ("DROVER_LAZY_DB", "drover.db")],
        )
    };
    let full = run("full")?;
    full.print("D3 synchronous=FULL");
    full.check_durable();
    let normal = run("normal")?;
    normal.print("D3 synchronous=NORMAL");
    assert!(
        normal.integrity.iter().all(|i| i == "ok"),
        "integrity: {:?}",
        normal.integrity
    );
    assert!(
        !normal.lost.is_empty() || !normal.wrong.is_empty(),
        "NORMAL lost nothing to {kills} power cuts: the fixture did not bite"
    );
    Ok(())
}

/// U1: the coordinator is SIGKILLed with 10 jobs running on 5 agents, and 2
/// of the agents die with it for good. At start every lease is re-based to
/// now + grace: the 3 live agents re-attach and none of their jobs is
/// re-queued; the dead agents' jobs are re-queued once the grace is over,
/// not before, and run again on the live ones.
#[test]
fn a_restarted_coordinator_keeps_live_agents_jobs_and_requeues_dead_ones_after_grace() -> TestResult
{
    let dir = tempfile::tempdir()?;
    let grace = 6.0;
    let mut coord = Coordinator::start(
        dir.path(),
        &["--auto-approve", "--lease-ttl", "3", "--restart-grace", "6"],
    )?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let mut agents: Vec<Agent> = (0..5)
        .map(|i| Agent::start(&coord.url, dir.path(), &format!("u{i}"), &["--slots", "2"]))
        .collect::<TestResult<_>>()?;
    let ids: Vec<i64> = (0..10)
        .map(|_| api.submit(&json!({"command": crate::checker::recorded(&runs, "sleep 8")})))
        .collect::<TestResult<_>>()?;
    let running = wait_for("10 jobs running", Duration::from_secs(30), || {
        let r = api.jobs("running")?;
        Ok((r.len() == 10).then_some(r))
    })?;
    let dead: Vec<i64> = agents[3..]
        .iter()
        .map(|a| a.worker_id())
        .collect::<TestResult<_>>()?;
    let on_dead: Vec<i64> = running
        .iter()
        .filter(|j| dead.contains(&j["worker_id"].as_i64().unwrap_or(0)))
        .filter_map(|j| j["id"].as_i64())
        .collect();
    assert_eq!(on_dead.len(), 4, "2 slots on each dead agent");
    agents[3].kill9();
    agents[4].kill9();
    coord.kill9();
    coord.restart()?;
    let restarted = Instant::now();
    let api = coord.api();
    // When each dead agent's job is given up (its attempt 1 ends).
    let mut released: HashMap<i64, f64> = HashMap::new();
    wait_for("all 10 jobs to succeed", Duration::from_secs(60), || {
        for id in &on_dead {
            let job = api.job(*id)?;
            if !released.contains_key(id)
                && (job["status"] == "queued" || job["attempt"].as_i64() != Some(1))
            {
                released.insert(*id, restarted.elapsed().as_secs_f64());
            }
        }
        let failed = api.jobs("failed")?;
        if !failed.is_empty() {
            return Err(format!("a job failed: {}", failed[0]).into());
        }
        std::thread::sleep(Duration::from_millis(100));
        Ok((api.jobs("succeeded")?.len() == 10).then_some(()))
    })?;
    coord.kill9();
    crate::checker::assert_clean(&coord.db_path(), &runs, &ids)?;
    let times: Vec<f64> = on_dead
        .iter()
        .filter_map(|id| released.get(id))
        .copied()
        .collect();
    println!("dead agents' jobs re-queued {times:.1?} s after the restart (grace {grace} s)");
    assert_eq!(times.len(), 4);
    assert!(
        times.iter().all(|t| *t >= grace - 0.5),
        "re-queued before the grace ended: {times:?}"
    );
    // The live agents' jobs ran once, as attempt 1: nothing spurious.
    let starts = read_lines(&runs);
    for id in ids.iter().filter(|id| !on_dead.contains(id)) {
        let theirs: Vec<&String> = starts
            .iter()
            .filter(|l| l.starts_with(&format!("start {id} ")))
            .collect();
        assert_eq!(theirs, vec![&format!("start {id} 1")], "job {id}");
    }
    Ok(())
}

#[test]
fn a_paused_agent_loses_its_lease_and_its_late_report_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    cut_off_agent_loses_its_lease(
        &coord,
        dir.path(),
        &coord.url,
        |a| a.signal(libc::SIGSTOP),
        |a| a.signal(libc::SIGCONT),
    )
}

/// F3a: the network between an agent and the coordinator blackholes for
/// longer than the lease (its requests wait in the partition, as TCP
/// retransmits would): as a pause.
#[test]
fn a_partition_longer_than_the_lease_moves_the_job_and_stops_the_stale_copy() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let net = Partition::to(coord.port)?;
    cut_off_agent_loses_its_lease(
        &coord,
        dir.path(),
        &net.url,
        |_| net.set(true),
        |_| net.set(false),
    )
}

/// Agent A, reached at `a_url`, is cut off (`cut`) longer than its lease
/// while it runs a job: the job runs again on B; once A is back (`heal`) it
/// learns the lease is gone and stops its stale copy, and its late report
/// is refused.
fn cut_off_agent_loses_its_lease(
    coord: &Coordinator,
    dir: &Path,
    a_url: &str,
    cut: impl Fn(&Agent),
    heal: impl Fn(&Agent),
) -> TestResult {
    let api = coord.api();
    let runs = dir.join("runs.txt");
    let a = Agent::start(a_url, dir, "cut-off", &["--kill-grace", "1"])?;
    wait_for("agent a", Duration::from_secs(20), || {
        Ok(a.worker_id().ok())
    })?;
    // Attempt 1 runs long (and records its pid); attempt 2 is quick.
    let id = api.submit(&json!({
        "command": ["sh", "-c", "echo \"$DROVER_ATTEMPT $$\" >> \"$RUNS\"; if [ \"$DROVER_ATTEMPT\" = 1 ]; then exec sleep 600; fi"],
        "env": {"RUNS": runs.to_string_lossy()},
    }))?;
    let first = wait_for("attempt 1 to run", Duration::from_secs(20), || {
        Ok(read_lines(&runs).first().cloned())
    })?;
    let stale_pid: i32 = first.split_whitespace().nth(1).ok_or("no pid")?.parse()?;
    let b = Agent::start(&coord.url, dir, "awake", &[])?;
    wait_for("agent b", Duration::from_secs(20), || {
        Ok(b.worker_id().ok())
    })?;

    // A GC-like pause, or a partition, longer than the lease.
    cut(&a);
    let job = wait_for("the job to run elsewhere", Duration::from_secs(20), || {
        let j = api.job(id)?;
        Ok((j["status"] == "succeeded").then_some(j))
    })?;
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["worker_id"], b.worker_id()?);
    assert_eq!(job["attempts"][0]["outcome"], "lease_lost");
    assert!(
        alive(stale_pid),
        "the cut-off agent's job still runs while it is cut off"
    );
    heal(&a);
    let resumed = std::time::Instant::now();
    // A learns at its next heartbeat that the lease is gone and stops the
    // stale process; its report is refused, the stored result stays B's.
    wait_for(
        "the stale process to be stopped",
        Duration::from_secs(15),
        || Ok((!alive(stale_pid)).then_some(())),
    )?;
    println!(
        "stale process gone {:.1}s after the agent was back",
        resumed.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    let after = api.job(id)?;
    assert_eq!(after["attempt"], 2);
    assert_eq!(after["status"], "succeeded");
    assert_eq!(
        after["attempts"].as_array().map(|a| a.len()),
        Some(2),
        "no third attempt: {after}"
    );
    Ok(())
}

/// D5a: an operator's `sqlite3` holds a read transaction open for longer
/// than a maintenance tick (30 s) while clients submit: every submission is
/// served, the WAL grows (`drover_sqlite_wal_bytes`, a warning that the
/// checkpoint could not finish), and once the reader leaves, a maintenance
/// checkpoint truncates it within two ticks. `DROVER_D5_HOLD_S` (33; 300
/// for the checklist's 5 minutes).
#[test]
fn a_long_reader_grows_the_wal_and_the_checkpoint_shrinks_it_after() -> TestResult {
    let hold = env_or("DROVER_D5_HOLD_S", 33);
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    let wal = |api: &Api| -> TestResult<u64> {
        api.metric("drover_sqlite_wal_bytes")?
            .ok_or_else(|| "no drover_sqlite_wal_bytes in /metrics".into())
    };
    api.submit(&json!({"command": ["true"]}))?;
    let reader = rusqlite::Connection::open_with_flags(
        coord.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    reader.execute_batch("BEGIN")?;
    let seen: i64 = reader.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))?;
    let held = Instant::now();
    let batch: Vec<_> = (0..50).map(|_| json!({"command": ["true"]})).collect();
    let (mut submitted, mut peak) = (0, 0);
    while held.elapsed() < Duration::from_secs(hold) {
        let r = api.admin("POST", "/api/v1/jobs", Some(&json!(batch)))?;
        assert_eq!(
            r.status, 201,
            "served while the reader holds its snapshot: {}",
            r.text
        );
        submitted += batch.len();
        peak = peak.max(wal(&api)?);
        std::thread::sleep(Duration::from_millis(250));
    }
    // The reader's snapshot still says what it said.
    let still: i64 = reader.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))?;
    assert_eq!(still, seen);
    reader.execute_batch("COMMIT")?;
    drop(reader);
    let left = Instant::now();
    let log = std::fs::read_to_string(dir.path().join("coordinator-1.log"))?;
    assert!(
        log.contains("WAL checkpoint incomplete"),
        "the starved checkpoint is warned about"
    );
    let shrunk = wait_for("the WAL to be truncated", Duration::from_secs(65), || {
        Ok((wal(&api)? < peak / 4).then(|| left.elapsed()))
    })?;
    println!(
        "{submitted} jobs submitted under a {hold} s reader: WAL peak {:.1} MiB, {} bytes {:.1} s after the reader left",
        peak as f64 / 1048576.0,
        wal(&api)?,
        shrunk.as_secs_f64()
    );
    assert!(peak > 1 << 20, "the WAL grew past 1 MiB: {peak}");
    Ok(())
}

#[test]
fn a_database_locked_from_outside_answers_503_then_recovers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    let before = api.submit(&json!({"command": ["true"]}))?;
    // An operator's sqlite3 holding the write lock past busy_timeout (5 s).
    let holder = hold_write_lock(coord.db_path(), Duration::from_secs(7))?;
    let r = api.admin("POST", "/api/v1/jobs", Some(&json!({"command": ["true"]})))?;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.code(), "database_busy");
    // Reads keep working meanwhile (WAL).
    assert!(api.healthy());
    assert_eq!(api.job(before)?["status"], "queued");
    holder.join().map_err(|_| "holder panicked")??;
    let after = api.submit(&json!({"command": ["true"]}))?;
    assert_eq!(
        api.job(after)?["status"],
        "queued",
        "writes resume once the lock is gone"
    );
    let all = api.admin("GET", "/api/v1/jobs", None)?;
    assert_eq!(
        all.body["jobs"].as_array().map(|a| a.len()),
        Some(2),
        "the refused submission left nothing"
    );
    Ok(())
}

/// D6: an online backup (`drover-coordinator backup`, SQLite's backup API)
/// taken while jobs are submitted and run holds every job acknowledged
/// before it began, passes integrity_check, and a fresh coordinator started
/// on it re-queues the jobs it finds running once the restart grace is over.
#[test]
fn an_online_backup_under_load_holds_every_acknowledged_job_and_restores() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let _agent = Agent::start(&coord.url, dir.path(), "b", &["--slots", "4"])?;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let submitter = {
        let (acked, stop, url) = (acked.clone(), stop.clone(), coord.url.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let api = Api::new(&url);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = api
                    .submit(&json!({"command": ["sleep", "0.3"]}))
                    .map_err(|e| e.to_string())?;
                acked.lock().map_err(|e| e.to_string())?.push(id);
            }
            Ok(())
        })
    };
    let api = coord.api();
    wait_for("jobs running", Duration::from_secs(20), || {
        Ok((api.jobs("running")?.len() >= 2).then_some(()))
    })?;
    let before: Vec<i64> = acked.lock().map_err(|e| e.to_string())?.clone();
    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored)?;
    let backup = restored.join("drover.db");
    let t = Instant::now();
    let out = std::process::Command::new(coordinator_bin())
        .arg("backup")
        .arg(&backup)
        .arg("--db")
        .arg(coord.db_path())
        .output()?;
    let took = t.elapsed();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.starts_with("copied "), "{said}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    submitter.join().map_err(|_| "submitter panicked")??;
    let total = acked.lock().map_err(|e| e.to_string())?.len();
    let conn = rusqlite::Connection::open(&backup)?;
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    assert_eq!(integrity, "ok");
    let mut stmt = conn.prepare("SELECT count(*) FROM jobs WHERE id = ?1")?;
    let missing: Vec<i64> = before
        .iter()
        .copied()
        .filter(|id| stmt.query_row([id], |r| r.get::<_, i64>(0)).ok() != Some(1))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged before the backup, missing: {missing:?}"
    );
    let running: i64 = conn.query_row(
        "SELECT count(*) FROM jobs WHERE status = 'running'",
        [],
        |r| r.get(0),
    )?;
    drop(stmt);
    drop(conn);
    println!(
        "backup in {:.0} ms under load: {} jobs acknowledged before it, {total} in all; {running} running in the copy",
        took.as_secs_f64() * 1000.0,
        before.len()
    );
    assert!(running > 0, "the backup was taken while jobs ran");
    // The restored coordinator has no agent: after its grace, the jobs it
    // found running are queued again, nothing is lost.
    let second = Coordinator::start(&restored, &["--lease-ttl", "3", "--restart-grace", "1"])?;
    let api2 = second.api();
    wait_for("running jobs re-queued", Duration::from_secs(20), || {
        Ok(api2.jobs("running")?.is_empty().then_some(()))
    })?;
    let stats = api2.admin("GET", "/api/v1/stats", None)?;
    let jobs = &stats.body["jobs"];
    let sum: u64 = ["queued", "running", "succeeded", "failed", "cancelled"]
        .iter()
        .filter_map(|s| jobs[*s].as_u64())
        .sum();
    assert!(sum as usize >= before.len(), "{}", stats.text);
    assert!(
        jobs["queued"].as_u64().unwrap_or(0) >= running as u64,
        "{}",
        stats.text
    );
    Ok(())
}

/// D4: the disk holding the database fills up. A failpoint preloaded into
/// the coordinator (`tests/e2e/fixtures/enospc.c`) fails every write to the
/// database files with ENOSPC while a flag file exists. Writes answer 503
/// `storage_full`, nothing is half-written, reads keep working, and the first
/// write after space is back succeeds, without a restart.
#[test]
fn a_full_disk_answers_503_keeps_reads_and_recovers_without_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let Some(lib) = preload_fixture(dir.path(), "enospc")? else {
        return Ok(());
    };
    let flag = dir.path().join("disk-full");
    let db = dir.path().join("drover.db");
    let coord = Coordinator::start_with_env(
        dir.path(),
        &[],
        &[
            ("LD_PRELOAD", &lib.to_string_lossy()),
            ("DROVER_ENOSPC_FLAG", &flag.to_string_lossy()),
            ("DROVER_ENOSPC_PATH", &db.to_string_lossy()),
        ],
    )?;
    let api = coord.api();
    let before = api.submit(&json!({"command": ["true"]}))?;
    std::fs::write(&flag, "")?;
    let one = api.admin("POST", "/api/v1/jobs", Some(&json!({"command": ["true"]})))?;
    assert_eq!(
        (one.status, one.code()),
        (503, "storage_full"),
        "{}",
        one.text
    );
    let batch: Vec<_> = (0..50).map(|_| json!({"command": ["true"]})).collect();
    let many = api.admin("POST", "/api/v1/jobs", Some(&json!(batch)))?;
    assert_eq!(
        (many.status, many.code()),
        (503, "storage_full"),
        "{}",
        many.text
    );
    // Reads keep working, and the refused writes left nothing.
    assert!(api.healthy());
    assert_eq!(api.job(before)?["status"], "queued");
    assert_eq!(api.jobs("queued")?.len(), 1, "nothing half-written");
    std::fs::remove_file(&flag)?;
    let after = api.submit(&json!({"command": ["true"]}))?;
    assert_eq!(api.job(after)?["status"], "queued");
    assert_eq!(api.jobs("queued")?.len(), 2);
    let conn = rusqlite::Connection::open(&db)?;
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    assert_eq!(integrity, "ok");
    Ok(())
}

#[test]
fn a_job_that_kills_its_agent_is_failed_after_max_attempts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    // The poison pill: kills the agent that runs it.
    let id = api.submit(&json!({
        "command": ["sh", "-c", "echo \"$DROVER_ATTEMPT\" >> \"$RUNS\"; kill -9 $PPID; sleep 60"],
        "env": {"RUNS": runs.to_string_lossy()}, "max_attempts": 3,
    }))?;
    let job = wait_for(
        "the poison pill to be failed",
        Duration::from_secs(90),
        || {
            let j = api.job(id)?;
            if j["status"] == "failed" {
                return Ok(Some(j));
            }
            // Like systemd's Restart=: bring the agent back whenever it died.
            let mut agent = Agent::start(&coord.url, dir.path(), "victim", &[])?;
            wait_for(
                "the agent to die or the job to fail",
                Duration::from_secs(30),
                || Ok((agent.exited()? || api.job(id)?["status"] == "failed").then_some(())),
            )?;
            Ok(None)
        },
    )?;
    assert_eq!(job["error"], "agent_restarted", "{job}");
    assert_eq!(job["attempts_used"], 3);
    // Grants that never reached a live agent (a dead agent's parked claim)
    // are released without spending an attempt; three attempts ran.
    let charged = job["attempts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["outcome"] == "agent_restarted")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(charged, 3, "{job}");
    assert_eq!(read_lines(&runs).len(), 3, "exactly three attempts ran");
    // Nothing runs it again.
    let _agent = Agent::start(&coord.url, dir.path(), "victim", &[])?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(read_lines(&runs).len(), 3);
    assert_eq!(api.job(id)?["status"], "failed");
    Ok(())
}

/// RELIABILITY C5: 200 agents holding 1,000 leases vanish at once. The
/// sweep ends the leases in batches (500 per transaction) and every job is
/// queued again within a few sweeps of the expiry; claims are still served.
#[test]
fn mass_expiry_requeues_every_lease_in_batches() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ttl = 3;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let (agents, slots) = (200, 5);
    let batch: Vec<_> = (0..agents * slots)
        .map(|_| json!({"command": ["true"]}))
        .collect();
    let r = api.admin("POST", "/api/v1/jobs", Some(&json!(batch)))?;
    assert_eq!(r.status, 201, "{}", r.text);
    // Stand-in agents: register, heartbeat once, claim, then fall silent.
    let url = coord.url.clone();
    let granted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..agents)
            .map(|i| {
                let url = url.clone();
                s.spawn(move || -> Result<usize, String> {
                    let api = Api::new(&url);
                    let agent =
                        FakeAgent::register_with_slots(&api, &format!("m{i}"), Some(slots as u32))
                            .map_err(|e| e.to_string())?;
                    let mut jobs = 0;
                    while jobs < slots {
                        let r = agent.claim(&api, 5).map_err(|e| e.to_string())?;
                        match r.status {
                            200 => jobs += r.body["jobs"].as_array().map_or(0, Vec::len),
                            204 => break,
                            _ => return Err(format!("claim: {}", r.text)),
                        }
                    }
                    Ok(jobs)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a stand-in agent panicked".to_string())?
            })
            .sum::<Result<usize, String>>()
    })?;
    assert_eq!(granted, agents * slots, "every job leased");
    // One more agent, with no job, goes on heartbeating: the coordinator
    // hears the fleet, so it is the silent agents that are gone (a
    // coordinator that hears nobody holds every lease instead).
    let witness = FakeAgent::register(&api, "witness")?;
    let silent = Instant::now();
    // All leases lapse together; the sweep re-queues them in batches.
    let requeued = wait_for(
        "every lease to be re-queued",
        Duration::from_secs(3 * (ttl + 3)),
        || {
            witness.heartbeat(&api, &[])?;
            let r = api.admin("GET", "/api/v1/stats", None)?;
            Ok(
                (r.body["jobs"]["queued"].as_u64() == Some((agents * slots) as u64))
                    .then(|| silent.elapsed()),
            )
        },
    )?;
    // Claims and submissions are served meanwhile and after.
    assert_eq!(api.admin("GET", "/healthz", None)?.status, 200);
    let sweeps: Vec<String> = read_lines(&dir.path().join("coordinator-1.log"))
        .into_iter()
        .filter(|l| l.contains("sweep expired_leases="))
        .collect();
    let longest = sweeps
        .iter()
        .filter_map(|l| l.split("took_ms=").nth(1)?.trim().parse::<f64>().ok())
        .fold(0.0, f64::max);
    println!(
        "mass expiry: {} leases of {agents} silent agents re-queued {:.2}s after their last heartbeat (TTL {ttl}s), \
         in {} sweeps, the longest sweep write {longest:.1} ms (target < 100 ms): {:?}",
        agents * slots,
        requeued.as_secs_f64(),
        sweeps.len(),
        sweeps
            .iter()
            .filter_map(|l| l.split("sweep ").nth(1))
            .collect::<Vec<_>>()
    );
    assert!(
        sweeps.len() >= 2,
        "1,000 leases take at least two sweeps of 500"
    );
    Ok(())
}

/// A TCP proxy that can blackhole its connections: while `blocked`, no
/// byte moves either way (they wait in the kernel's buffers, as across a
/// partition) and new connections are accepted but go nowhere; when it
/// heals, everything flows on. `delay` holds every chunk going to the
/// coordinator that long (a slow link).
struct Partition {
    url: String,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Partition {
    fn to(upstream: u16) -> TestResult<Partition> {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let blocked = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (flag, delay) = (blocked.clone(), delay_ms.clone());
        let wait = move |f: &AtomicBool| {
            while f.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                for (upward, (mut from, mut to)) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                .enumerate()
                .map(|(i, pair)| (i == 0, pair))
                {
                    let (flag, delay) = (flag.clone(), delay.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            wait(&flag);
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if upward {
                                let ms = delay.load(Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(ms));
                            }
                            wait(&flag);
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(Partition {
            url,
            blocked,
            delay_ms,
        })
    }

    fn set(&self, blocked: bool) {
        self.blocked
            .store(blocked, std::sync::atomic::Ordering::SeqCst);
    }

    fn slow(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

/// F3c: every request from an agent reaches the coordinator a sixth of the
/// lease TTL late (5 s of a 30 s TTL, scaled: 1.5 s of 9 s) while its job
/// runs through several heartbeats: no lease is lost. `DROVER_F3C_SECS`
/// (15; 600 for the checklist's 10 minutes) sets the job's length.
#[test]
fn a_slow_link_loses_no_lease() -> TestResult {
    let secs = env_or("DROVER_F3C_SECS", 15);
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "9"])?;
    let api = coord.api();
    let net = Partition::to(coord.port)?;
    let _agent = Agent::start(&net.url, dir.path(), "slow", &[])?;
    let id = api.submit(&json!({"command": ["sleep", secs.to_string()]}))?;
    wait_for("the job to start", Duration::from_secs(20), || {
        Ok((api.job(id)?["status"] == "running").then_some(()))
    })?;
    net.slow(Duration::from_millis(1500));
    let j = wait_for("the job to end", Duration::from_secs(secs + 30), || {
        let j = api.job(id)?;
        Ok((j["status"] != "running" && j["status"] != "queued").then_some(j))
    })?;
    assert_eq!(j["status"], "succeeded", "{j}");
    assert_eq!(
        j["attempts"].as_array().map(Vec::len),
        Some(1),
        "one attempt, no lease lost: {j}"
    );
    Ok(())
}

/// F3b: the network between an agent and the coordinator blackholes for
/// less than the lease TTL while a job runs: nothing is re-queued, the job
/// completes on its agent as attempt 1 (DROVER_F3_TRIALS, 2 in CI).
#[test]
fn a_partition_shorter_than_the_lease_requeues_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    // TTL 9 s: heartbeats every 3 s; the partition lasts 5 s.
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "9"])?;
    let api = coord.api();
    let net = Partition::to(coord.port)?;
    let _agent = Agent::start(&net.url, dir.path(), "behind", &[])?;
    let trials = env_or("DROVER_F3_TRIALS", 2);
    for trial in 0..trials {
        let id = api.submit(&json!({"command": ["sleep", "7"]}))?;
        wait_for("the job to start", Duration::from_secs(20), || {
            Ok((api.job(id)?["status"] == "running").then_some(()))
        })?;
        std::thread::sleep(Duration::from_millis(500));
        net.set(true);
        std::thread::sleep(Duration::from_secs(5));
        net.set(false);
        let j = finished(&api, id)?;
        assert_eq!(j["status"], "succeeded", "trial {trial}: {j}");
        assert_eq!(
            j["attempts"].as_array().map(Vec::len),
            Some(1),
            "trial {trial}: one attempt, no lease lost: {j}"
        );
    }
    println!("{trials} partitions of 5 s under a 9 s lease: 0 re-queues");
    Ok(())
}

/// libfaketime, where installed (Debian's `faketime` package).
pub(crate) fn libfaketime() -> Option<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

/// The wall time of the coordinator's log line that mentions `needle`
/// (env_logger stamps lines with the wall clock, faked or not).
fn logged_at(dir: &Path, needle: &str) -> TestResult<Option<std::time::SystemTime>> {
    let log = std::fs::read_to_string(dir.join("coordinator-1.log"))?;
    let Some(line) = log.lines().find(|l| l.contains(needle)) else {
        return Ok(None);
    };
    let stamp = line
        .strip_prefix('[')
        .and_then(|l| l.split_whitespace().next())
        .ok_or_else(|| format!("no time stamp in {line:?}"))?;
    Ok(Some(humantime::parse_rfc3339(stamp)?))
}

/// F8: the coordinator's wall clock stepped +1 h, then -1 h (libfaketime
/// re-reading an offset file; monotonic time untouched) while jobs run.
/// Leases run on the coordinator's clock (wall time at start + monotonic
/// time since), so +1 h expires nothing and after -1 h a killed agent's
/// job still moves within TTL + a sweep. Skipped without libfaketime unless
/// DROVER_REQUIRE_FAKETIME is set (CI installs it).
#[test]
fn wall_clock_steps_move_no_lease() -> TestResult {
    let Some(lib) = libfaketime() else {
        if std::env::var_os("DROVER_REQUIRE_FAKETIME").is_some() {
            return Err("libfaketime is required (DROVER_REQUIRE_FAKETIME) but missing".into());
        }
        println!("libfaketime missing (apt install faketime): F8 skipped");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0\n")?;
    let ttl = 3;
    let offset_s = offset.to_string_lossy().to_string();
    let coord = Coordinator::start_with_env(
        dir.path(),
        &["--auto-approve", "--lease-ttl", "3"],
        &[
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", &offset_s),
            ("FAKETIME_NO_CACHE", "1"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    )?;
    let api = coord.api();
    let mut agents = HashMap::new();
    for name in ["a", "b"] {
        agents.insert(name, Agent::start(&coord.url, dir.path(), name, &[])?);
    }
    wait_for(
        "both agents to wait for work",
        Duration::from_secs(20),
        || Ok((api.agents_waiting()? == Some(2)).then_some(())),
    )?;
    // Steps the coordinator's wall clock and checks, from the time stamp of
    // a job's log line, that the step took.
    let step = |to: &str, by_s: f64| -> TestResult {
        std::fs::write(&offset, format!("{to}\n"))?;
        let id = api.submit(&json!({"command": ["true"]}))?;
        let needle = format!("job started job_id={id} ");
        let at = wait_for("the marker job's log line", Duration::from_secs(10), || {
            logged_at(dir.path(), &needle)
        })?;
        let skew = match at.duration_since(std::time::SystemTime::now()) {
            Ok(ahead) => ahead.as_secs_f64(),
            Err(behind) => -behind.duration().as_secs_f64(),
        };
        println!("wall clock stepped to {to}: the coordinator logs {skew:+.0} s off");
        assert!(
            (skew - by_s).abs() < 120.0,
            "the step to {to} did not take: {skew:+.0} s"
        );
        Ok(())
    };
    // A wall time `secs` from now as the coordinator's clock has it, with
    // the wall clock `ahead_s` stepped.
    let wall = |ahead_s: u64, secs: u64| {
        let t = std::time::SystemTime::now() + Duration::from_secs(ahead_s + secs);
        humantime::format_rfc3339_seconds(t).to_string()
    };
    let sleeper = api.submit(&json!({"command": ["sleep", "7"]}))?;
    wait_for("the sleeper to run", Duration::from_secs(10), || {
        Ok((api.job(sleeper)?["status"] == "running").then_some(()))
    })?;
    let early = api.submit(&json!({"command": ["true"], "not_before": wall(0, 1800)}))?;
    step("+1h", 3600.0)?;
    // +1 h: more than two TTLs pass, nothing expires.
    let job = finished(&api, sleeper)?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1, "a spurious expiry after +1 h: {job}");
    // not_before follows the wall clock: half an hour away before the step,
    // half an hour ago after it.
    let job = finished(&api, early)?;
    assert_eq!(
        job["status"], "succeeded",
        "not_before 30 min ahead, +1 h: {job}"
    );
    // 20 s ahead of the stepped clock, so 1 h 20 s ahead once it goes back.
    let late = api.submit(&json!({"command": ["true"], "not_before": wall(3600, 20)}))?;
    let late_at = Instant::now();
    step("-1h", -3600.0)?;
    // -1 h: a dead agent's lease still expires on schedule.
    let held = api.submit(&json!({"command": ["sleep", "600"]}))?;
    let first = wait_for("the held job to run", Duration::from_secs(10), || {
        let j = api.job(held)?;
        Ok((j["status"] == "running")
            .then(|| j["worker_id"].as_i64())
            .flatten())
    })?;
    let victim = agents
        .iter()
        .find(|(_, a)| a.worker_id().ok() == Some(first))
        .map(|(n, _)| *n)
        .ok_or("no agent runs the held job")?;
    agents.get_mut(victim).ok_or("victim")?.kill9();
    let killed = Instant::now();
    let moved = wait_for(
        "the held job to move",
        Duration::from_secs(ttl + 20),
        || {
            let j = api.job(held)?;
            Ok((j["status"] == "running" && j["attempt"] == 2).then(|| killed.elapsed()))
        },
    )?;
    println!(
        "after -1 h: the killed agent's job ran again {:.2} s later (TTL {ttl} s)",
        moved.as_secs_f64()
    );
    assert!(
        moved <= Duration::from_secs(ttl + 3),
        "re-queue after -1 h took {moved:?}"
    );
    assert_eq!(
        api.metric("drover_leases_expired_total")?,
        Some(1),
        "only the dead agent's lease expired"
    );
    // A free agent, and the late job's 20 s on the coordinator's own clock
    // over: it still waits, for the wall clock.
    api.admin("POST", &format!("/api/v1/jobs/{held}/cancel"), None)?;
    finished(&api, held)?;
    std::thread::sleep(Duration::from_secs(25).saturating_sub(late_at.elapsed()));
    let job = api.job(late)?;
    assert_eq!(job["status"], "queued", "not_before 1 h ahead ran: {job}");
    println!(
        "after -1 h: a job with not_before 1 h ahead still waits: run_after {}",
        job["run_after"]
    );
    let at = |k: &str| -> TestResult<std::time::SystemTime> {
        Ok(humantime::parse_rfc3339(
            job[k].as_str().ok_or(k.to_string())?,
        )?)
    };
    let gap = match at("run_after")?.duration_since(at("not_before")?) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(
        gap < Duration::from_secs(2),
        "run_after is not not_before: {job}"
    );
    Ok(())
}

/// A coordinator that hears from no agent for a whole lease may be the one
/// cut off (its own cable out): it holds every lease, so no job moves. The
/// first agent heard again gives every lease a fresh TTL: an agent that
/// comes back keeps its job, one that does not loses it a TTL later.
#[test]
fn a_coordinator_that_hears_no_agent_holds_every_lease() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ttl = 3;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let (a, b) = (
        FakeAgent::register(&api, "a")?,
        FakeAgent::register(&api, "b")?,
    );
    for _ in 0..2 {
        api.submit(&json!({"command": ["true"]}))?;
    }
    let claim = |agent: &FakeAgent| -> TestResult<(i64, i64)> {
        let r = agent.claim(&api, 5)?;
        let job = &r.body["jobs"][0];
        let id = job["job_id"]
            .as_i64()
            .ok_or_else(|| format!("no job: {}", r.text))?;
        Ok((id, job["attempt"].as_i64().ok_or("no attempt")?))
    };
    let (la, lb) = (claim(&a)?, claim(&b)?);
    // Every agent silent for three leases: nothing moves.
    std::thread::sleep(Duration::from_secs(3 * ttl));
    for (id, _) in [la, lb] {
        let j = api.job(id)?;
        assert_eq!(j["status"], "running", "held: {j}");
    }
    let log = dir.path().join("coordinator-1.log");
    assert!(
        read_lines(&log)
            .iter()
            .any(|l| l.contains("may be the one cut off")),
        "the coordinator says why it holds the leases"
    );
    // A is heard again: b's lease gets a fresh TTL from then, not none.
    let heard = Instant::now();
    assert_eq!(a.heartbeat(&api, &[la])?.status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    let j = api.job(lb.0)?;
    assert_eq!(j["status"], "running", "a fresh TTL after hearing a: {j}");
    let requeued = wait_for(
        "b's job to be re-queued",
        Duration::from_secs(4 * ttl),
        || {
            a.heartbeat(&api, &[la])?;
            let j = api.job(lb.0)?;
            Ok((j["status"] == "queued").then(|| heard.elapsed()))
        },
    )?;
    let j = api.job(la.0)?;
    assert_eq!(j["status"], "running", "a kept its job: {j}");
    assert_eq!(j["attempt"], la.1, "{j}");
    println!(
        "deaf for {}s: 0 leases expired; after hearing a, b's job re-queued {:.1}s later (TTL {ttl}s), a's kept",
        3 * ttl,
        requeued.as_secs_f64()
    );
    Ok(())
}
