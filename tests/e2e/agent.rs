//! The agent on a machine: GPUs shared out one job per GPU, cancel and
//! timeout kill the whole process tree, outages and shutdowns lose nothing,
//! and a loud job does not grow the agent's memory.

use crate::harness::*;
use serde_json::json;
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The agent's heartbeats ride on its parked claims: an idle agent holds
/// one connection to the coordinator, and a job that outlives its lease
/// several times over runs once, renewed through the claims.
#[test]
fn heartbeats_ride_on_claims_over_one_connection() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let agent = Agent::start(&coord.url, dir.path(), "one-conn", &[])?;
    let job = api.submit(&json!({"command": ["sleep", "5"]}))?;
    wait_for("the long job to succeed", Duration::from_secs(30), || {
        Ok((api.job(job)?["status"] == "succeeded").then_some(()))
    })?;
    assert_eq!(api.job(job)?["attempt"], 1, "renewed, never expired");
    let worker = agent.worker_id()?;
    let seen = |api: &Api| -> TestResult<Value> {
        Ok(api
            .admin("GET", &format!("/api/v1/workers/{worker}"), None)?
            .body["last_seen_at"]
            .clone())
    };
    // The report went over a second connection while the claim was parked;
    // the next claim's return retires one of the two (ureq keeps one idle
    // connection per host).
    std::thread::sleep(Duration::from_millis(2500));
    let before = seen(&api)?;
    // Idle for more than three heartbeat intervals (1 s each): at most one
    // connection at any moment.
    let (mut most, mut samples) = (0, 0);
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        most = most.max(connections_to(agent.pid(), coord.port));
        samples += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        most, 1,
        "connections from the idle agent over {samples} samples"
    );
    assert_ne!(seen(&api)?, before, "heartbeats kept coming");
    let w = api.admin("GET", &format!("/api/v1/workers/{worker}"), None)?;
    assert_eq!(w.body["state"], "idle", "{}", w.text);
    Ok(())
}

/// C3: a fake 8-GPU agent, one-GPU and four-GPU jobs mixed (100 + 10 in
/// CI; `DROVER_C3_JOBS=1000` gives the checklist's 1,000 + 100). Each run
/// records the devices it was given and when it held them: no GPU is
/// held by two runs at once, every index is one of the 8, and each run saw
/// exactly the indices the coordinator assigned to its attempt.
#[test]
fn gpu_jobs_never_share_a_gpu() -> TestResult {
    let ones = env_or("DROVER_C3_JOBS", 100);
    let fours = ones / 10;
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let _agent = Agent::start(
        &coord.url,
        dir.path(),
        "gpu8",
        &["--fake-gpus", "8xH100:81920", "--slots", "8"],
    )?;
    let record = dir.path().join("gpus.txt");
    let script = "s=$(date +%s%N); sleep 0.05; \
                  echo \"$DROVER_JOB_ID $DROVER_ATTEMPT $CUDA_VISIBLE_DEVICES $s $(date +%s%N)\" >> \"$REC\"";
    let specs: Vec<_> = (0..ones + fours)
        .map(|i| {
            // Every eleventh job wants four GPUs.
            let gpus = if i % 11 == 10 { 4 } else { 1 };
            json!({"command": ["sh", "-c", script], "gpus": gpus,
                   "env": {"REC": record.to_string_lossy()}})
        })
        .collect();
    let t0 = Instant::now();
    for chunk in specs.chunks(500) {
        let r = api.admin("POST", "/api/v1/jobs", Some(&json!(chunk)))?;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let total = (ones + fours) as i64;
    let db = coord.db_path();
    let count = |sql: &str| -> TestResult<i64> {
        let c =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        Ok(c.query_row(sql, [], |r| r.get(0))?)
    };
    wait_for("every GPU job to succeed", Duration::from_secs(300), || {
        Ok((count("SELECT count(*) FROM jobs WHERE status = 'succeeded'")? == total).then_some(()))
    })?;
    let wall = t0.elapsed().as_secs_f64();
    // What the coordinator assigned, per (job, attempt).
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut assigned: HashMap<(i64, i64), String> = HashMap::new();
    let mut stmt = conn.prepare("SELECT id, attempt, gpu_indices FROM jobs")?;
    for row in stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?)))? {
        let (id, attempt, gpus) = row?;
        let gpus: Vec<u32> = serde_json::from_str(&gpus)?;
        let gpus: Vec<String> = gpus.iter().map(u32::to_string).collect();
        assigned.insert((id, attempt), gpus.join(","));
    }
    let mut spans: Vec<(u32, u128, u128)> = Vec::new();
    let (mut runs, mut mismatched) = (0, Vec::new());
    for line in read_lines(&record) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (id, attempt): (i64, i64) = (f[0].parse()?, f[1].parse()?);
        let (start, end) = (f[3].parse::<u128>()?, f[4].parse::<u128>()?);
        runs += 1;
        if assigned.get(&(id, attempt)).map(String::as_str) != Some(f[2]) {
            mismatched.push(line.clone());
        }
        for d in f[2].split(',') {
            spans.push((d.parse()?, start, end));
        }
    }
    spans.sort();
    let shared = spans
        .windows(2)
        .filter(|w| w[0].0 == w[1].0 && w[1].1 < w[0].2)
        .count();
    let held: u128 = spans.iter().map(|s| s.2 - s.1).sum();
    println!(
        "C3: {ones} one-GPU + {fours} four-GPU jobs on 8 fake GPUs in {wall:.1} s: {runs} runs, \
         GPU double-assignments {shared}, devices not as assigned {}, GPUs busy {:.0} % of the wall time",
        mismatched.len(),
        held as f64 / 1e9 / (8.0 * wall) * 100.0
    );
    assert_eq!(runs, total, "one run per job");
    assert!(
        mismatched.is_empty(),
        "CUDA_VISIBLE_DEVICES not as assigned: {mismatched:?}"
    );
    assert_eq!(shared, 0, "a GPU held by two runs at once");
    assert!(spans.iter().all(|s| s.0 < 8), "an index beyond the 8 GPUs");
    Ok(())
}

#[test]
fn four_gpus_are_shared_one_job_per_gpu() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let _agent = Agent::start(
        &coord.url,
        dir.path(),
        "gpu",
        &["--fake-gpus", "4xA100:81920"],
    )?;
    let record = dir.path().join("gpus.txt");
    let script = "s=$(date +%s%N); sleep 0.7; echo \"$DROVER_JOB_ID $CUDA_VISIBLE_DEVICES $s $(date +%s%N)\" >> \"$REC\"";
    let mut ids = Vec::new();
    for i in 0..10 {
        let gpus = if i < 8 { 1 } else { 2 };
        ids.push(api.submit(&json!({
            "command": ["sh", "-c", script], "gpus": gpus,
            "env": {"REC": record.to_string_lossy()},
        }))?);
    }
    wait_for("10 GPU jobs to succeed", Duration::from_secs(60), || {
        Ok((api.jobs("succeeded")?.len() == 10).then_some(()))
    })?;
    // (gpu, start, end) for every job's every GPU.
    let mut spans: Vec<(u32, u128, u128)> = Vec::new();
    for line in read_lines(&record) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (devices, start, end) = (f[1], f[2].parse::<u128>()?, f[3].parse::<u128>()?);
        for d in devices.split(',') {
            spans.push((d.parse()?, start, end));
        }
    }
    assert_eq!(
        spans.len(),
        8 + 2 * 2,
        "each job saw its own GPUs: {spans:?}"
    );
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            let overlap = a.1 < b.2 && b.1 < a.2;
            assert!(
                !(a.0 == b.0 && overlap),
                "two jobs on GPU {} at once: {a:?} {b:?}",
                a.0
            );
        }
    }
    let peak = spans
        .iter()
        .map(|s| spans.iter().filter(|o| o.1 <= s.1 && s.1 < o.2).count())
        .max()
        .unwrap_or(0);
    println!("peak GPUs in use at once: {peak} of 4");
    assert_eq!(peak, 4, "all four GPUs in use at the peak");
    // The coordinator keeps each GPU's metrics history for the dashboard.
    let w = api.admin("GET", "/api/v1/workers", None)?;
    let wid = w.body["workers"][0]["id"].as_i64().ok_or("no worker")?;
    let detail = api.admin("GET", &format!("/api/v1/workers/{wid}"), None)?;
    let history = detail.body["gpu_history"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for gpu in 0..4 {
        assert!(
            history.iter().any(|h| h["gpu"] == gpu),
            "history for GPU {gpu}: {}",
            detail.text
        );
    }
    assert!(
        history
            .iter()
            .any(|h| h["utilization_pct"].as_f64().unwrap_or(0.0) > 50.0),
        "busy samples recorded"
    );
    for id in ids.iter().skip(8) {
        let j = api.job(*id)?;
        assert_eq!(j["gpu_indices"].as_array().map(|a| a.len()), Some(2), "{j}");
    }
    Ok(())
}

#[test]
fn cancel_and_timeout_stop_the_whole_process_tree() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "30"])?;
    let api = coord.api();
    let _agent = Agent::start(
        &coord.url,
        dir.path(),
        "k",
        &["--slots", "2", "--kill-grace", "2"],
    )?;
    let pids = dir.path().join("pids.txt");
    // The shell starts a child that ignores SIGTERM, so only the KILL after
    // the grace ends it.
    let tree = "(trap '' TERM; exec sleep 1000) & echo \"$$ $!\" >> \"$PIDS\"; echo '{\"progress\": 0.42}' > \"$DROVER_PROGRESS_FILE\"; wait";
    let cancel_me = api
        .submit(&json!({"command": ["sh", "-c", tree], "env": {"PIDS": pids.to_string_lossy()}}))?;
    let time_me = api.submit(
        &json!({"command": ["sh", "-c", tree], "env": {"PIDS": pids.to_string_lossy()},
                                     "timeout_s": 2, "max_attempts": 1}),
    )?;
    let all_pids = wait_for("both jobs to start", Duration::from_secs(20), || {
        let lines = read_lines(&pids);
        Ok((lines.len() == 2).then(|| {
            lines
                .iter()
                .flat_map(|l| {
                    l.split_whitespace()
                        .map(|p| p.parse::<i32>().unwrap_or(0))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<i32>>()
        }))
    })?;
    assert!(all_pids.iter().all(|p| *p > 0 && alive(*p)));

    let cancelled_at = Instant::now();
    let r = api.admin("POST", &format!("/api/v1/jobs/{cancel_me}/cancel"), None)?;
    assert_eq!(r.status, 200, "{}", r.text);
    let job = wait_for("the cancel to finish", Duration::from_secs(15), || {
        let j = api.job(cancel_me)?;
        Ok((j["status"] == "cancelled").then_some(j))
    })?;
    println!(
        "cancel -> cancelled: {:.2}s (kill grace 2s)",
        cancelled_at.elapsed().as_secs_f64()
    );
    assert_eq!(job["attempts"][0]["outcome"], "cancelled");
    let job = wait_for("the timeout", Duration::from_secs(15), || {
        let j = api.job(time_me)?;
        Ok((j["status"] == "failed").then_some(j))
    })?;
    assert_eq!(job["error"], "timeout");
    assert_eq!(job["attempts"][0]["outcome"], "timed_out");
    wait_for(
        "every process of both jobs to be gone",
        Duration::from_secs(5),
        || Ok(all_pids.iter().all(|p| !alive(*p)).then_some(())),
    )?;
    // Cancelling a finished job is refused and changes nothing.
    let again = api.admin("POST", &format!("/api/v1/jobs/{cancel_me}/cancel"), None)?;
    assert_eq!(again.status, 409);
    assert_eq!(again.code(), "already_finished");
    Ok(())
}

#[test]
fn progress_file_is_shown_on_the_job() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let _agent = Agent::start(&coord.url, dir.path(), "p", &[])?;
    let id = api.submit(&json!({"command": ["sh", "-c",
        "echo '{\"progress\": 0.42, \"step\": 420}' > \"$DROVER_PROGRESS_FILE\"; sleep 30"]}))?;
    let job = wait_for("progress to show", Duration::from_secs(15), || {
        let j = api.job(id)?;
        Ok((!j["progress"].is_null()).then_some(j))
    })?;
    assert_eq!(job["progress"], json!({"progress": 0.42, "step": 420}));
    Ok(())
}

#[test]
fn result_survives_a_coordinator_outage() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let _agent = Agent::start(&coord.url, dir.path(), "o", &[])?;
    let id = api.submit(&json!({"command": ["sh", "-c",
        "echo run >> \"$RUNS\"; sleep 1; echo 'printed during the outage'; echo '{\"ok\": true}' > \"$DROVER_RESULT_FILE\""],
        "env": {"RUNS": runs.to_string_lossy()}}))?;
    wait_for("the job to start", Duration::from_secs(20), || {
        Ok((read_lines(&runs).len() == 1).then_some(()))
    })?;
    coord.kill9();
    // The job ends while the coordinator is down; its report waits in the spool.
    std::thread::sleep(Duration::from_secs(3));
    let spool = dir.path().join("agent-o").join("spool");
    let agent_log = std::fs::read_to_string(dir.path().join("agent-o.log"))?;
    assert_eq!(
        std::fs::read_dir(&spool)?.count(),
        1,
        "the report is spooled on disk: {agent_log}"
    );
    coord.restart()?;
    let api = coord.api();
    let job = wait_for("the result to arrive", Duration::from_secs(30), || {
        let j = api.job(id)?;
        Ok((j["status"] == "succeeded").then_some(j))
    })?;
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["result"], json!({"ok": true}));
    assert_eq!(read_lines(&runs).len(), 1, "the job ran once");
    let log = api.admin("GET", &format!("/api/v1/jobs/{id}/logs"), None)?;
    assert_eq!(log.text, "printed during the outage\n");
    wait_for("the spool to empty", Duration::from_secs(5), || {
        Ok((std::fs::read_dir(&spool)?.count() == 0).then_some(()))
    })?;
    Ok(())
}

/// U2: the coordinator is down while jobs finish on two agents, and one
/// agent is SIGKILLed during the outage and restarted while it lasts. When
/// the coordinator is back every result arrives: each job succeeded with
/// the one attempt that ran, ran once, and both spools are empty.
#[test]
fn results_survive_an_outage_and_an_agent_killed_during_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let _stays = Agent::start(&coord.url, dir.path(), "stays", &["--slots", "3"])?;
    let mut killed = Agent::start(&coord.url, dir.path(), "killed", &["--slots", "3"])?;
    let ids: Vec<i64> = (0..6)
        .map(|_| api.submit(&json!({"command": crate::checker::recorded(&runs, "sleep 1")})))
        .collect::<TestResult<_>>()?;
    wait_for("6 jobs running", Duration::from_secs(30), || {
        Ok((api.jobs("running")?.len() == 6).then_some(()))
    })?;
    coord.kill9();
    // The jobs end during the outage; their reports wait in the spools.
    let spool = |name: &str| dir.path().join(format!("agent-{name}")).join("spool");
    // Spooled reports, not one still being written (under a temporary name
    // until it is synced).
    let spooled = |name: &str| -> TestResult<usize> {
        Ok(std::fs::read_dir(spool(name))?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .count())
    };
    wait_for("3 reports in the spool", Duration::from_secs(20), || {
        Ok((spooled("killed")? == 3).then_some(()))
    })?;
    killed.kill9();
    let _restarted = Agent::start(&coord.url, dir.path(), "killed", &["--slots", "3"])?;
    std::thread::sleep(Duration::from_secs(1));
    coord.restart()?;
    let api = coord.api();
    wait_for("all 6 results", Duration::from_secs(30), || {
        Ok((api.jobs("succeeded")?.len() == 6).then_some(()))
    })?;
    for id in &ids {
        // One attempt ran (a grant handed back unrun as `not_reported`
        // spends nothing and runs nothing).
        let job = api.job(*id)?;
        let ran = job["attempts"]
            .as_array()
            .map(|a| a.iter().filter(|a| a["outcome"] != "not_reported").count());
        assert_eq!(ran, Some(1), "job {id}: {job}");
    }
    wait_for("both spools empty", Duration::from_secs(10), || {
        let left = std::fs::read_dir(spool("killed"))?.count()
            + std::fs::read_dir(spool("stays"))?.count();
        Ok((left == 0).then_some(()))
    })?;
    coord.kill9();
    crate::checker::assert_clean(&coord.db_path(), &runs, &ids)?;
    let starts = read_lines(&runs)
        .iter()
        .filter(|l| l.starts_with("start "))
        .count();
    assert_eq!(starts, 6, "every job ran once");
    Ok(())
}

#[test]
fn sigterm_hands_running_jobs_back_without_spending_an_attempt() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "30"])?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let mut a = Agent::start(
        &coord.url,
        dir.path(),
        "leaving",
        &["--shutdown-grace", "1", "--kill-grace", "2"],
    )?;
    let id = api.submit(&json!({"command": ["sh", "-c",
        "echo \"$DROVER_ATTEMPT $NAME\" >> \"$RUNS\"; if [ \"$DROVER_ATTEMPT\" = 1 ]; then exec sleep 1000; fi",
        ], "env": {"RUNS": runs.to_string_lossy()}, "max_attempts": 1}))?;
    wait_for(
        "the job to start on the first agent",
        Duration::from_secs(20),
        || Ok((read_lines(&runs).len() == 1).then_some(())),
    )?;
    let b = Agent::start(&coord.url, dir.path(), "staying", &[])?;
    wait_for("the second agent", Duration::from_secs(20), || {
        Ok(b.worker_id().ok())
    })?;
    let stopped = Instant::now();
    a.terminate();
    let job = wait_for(
        "the job to run elsewhere and succeed",
        Duration::from_secs(20),
        || {
            let j = api.job(id)?;
            Ok((j["status"] == "succeeded").then_some(j))
        },
    )?;
    println!(
        "SIGTERM -> job done elsewhere: {:.2}s (shutdown grace 1s)",
        stopped.elapsed().as_secs_f64()
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "re-queued at once, not after the 30 s TTL"
    );
    assert_eq!(job["attempts"][0]["outcome"], "released");
    assert_eq!(job["attempts"][1]["outcome"], "succeeded");
    assert_eq!(job["worker_id"], b.worker_id()?);
    // max_attempts is 1: the hand-back did not spend it.
    assert_eq!(job["attempts_used"], 1);
    let status = a.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "the agent exits cleanly: {status}");
    Ok(())
}

#[test]
fn a_loud_job_does_not_grow_the_agent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let agent = Agent::start(&coord.url, dir.path(), "loud", &[])?;
    let id = api.submit(&json!({"command": ["sh", "-c", "head -c 200000000 /dev/zero | tr '\\0' 'x'; echo; echo done >&2"]}))?;
    let job = wait_for("the loud job to finish", Duration::from_secs(120), || {
        let j = api.job(id)?;
        Ok((j["status"] == "succeeded").then_some(j))
    })?;
    let rss = peak_rss_kib(agent.pid()).ok_or("no /proc status for the agent")?;
    println!("agent peak RSS while a job printed 200 MB: {} KiB", rss);
    let kept = job["attempts"][0]["log_bytes"].as_i64().unwrap_or(0);
    assert_eq!(
        kept,
        16 * 1024 * 1024,
        "the coordinator keeps the 16 MiB cap"
    );
    assert!(rss < 64 * 1024, "agent peak RSS {rss} KiB stays bounded");
    let mut per_stream: HashMap<&str, usize> = HashMap::new();
    let log = api.admin("GET", &format!("/api/v1/jobs/{id}/logs"), None)?;
    *per_stream.entry("all").or_default() += log.text.len();
    assert!(
        log.text.contains("[drover] log cap"),
        "the log says it was capped"
    );
    Ok(())
}

/// U4: the agent is SIGKILLed with jobs running and restarted, again and
/// again (`DROVER_U4_KILLS`, 5 in CI, 20 nightly). Each time its jobs die
/// with it (PDEATHSIG: no orphan runs unsupervised), the restarted agent's
/// registration re-queues them at once (not after the 30 s lease) and they
/// run again, and its worker id never changes. Each round runs fresh jobs:
/// a job's second loss in a row backs off (10 s x 2^n), a crash loop's
/// defence tested elsewhere.
#[test]
fn an_agent_killed_again_and_again_orphans_nothing_and_keeps_its_id() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "30"])?;
    let api = coord.api();
    let runs = dir.path().join("runs.txt");
    let start = || Agent::start(&coord.url, dir.path(), "u4", &["--slots", "2"]);
    let mut agent = start()?;
    let worker = wait_for("the agent to register", Duration::from_secs(20), || {
        Ok(agent.worker_id().ok())
    })?;
    // The pid of each job's attempt, from the line each run appends.
    let pids = |ids: &[i64], attempt: i64| -> TestResult<Option<Vec<i32>>> {
        let lines = read_lines(&runs);
        Ok(ids
            .iter()
            .map(|id| {
                lines.iter().find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() == 3 && f[0] == id.to_string() && f[1] == attempt.to_string())
                        .then(|| f[2].parse().ok())
                        .flatten()
                })
            })
            .collect())
    };
    let kills = env_or("DROVER_U4_KILLS", 5);
    let mut stuck = Vec::new();
    for k in 0..kills {
        let ids: Vec<i64> = (0..2)
            .map(|_| {
                api.submit(&json!({
                    "command": ["sh", "-c", "echo \"$DROVER_JOB_ID $DROVER_ATTEMPT $$\" >> \"$RUNS\"; exec sleep 600"],
                    "env": {"RUNS": runs.to_string_lossy()},
                }))
            })
            .collect::<TestResult<_>>()?;
        let first = wait_for("both jobs to run", Duration::from_secs(30), || {
            pids(&ids, 1)
        })?;
        assert!(first.iter().all(|p| alive(*p)), "kill {k}: {first:?}");
        agent.signal(libc::SIGKILL);
        agent.wait_exit(Duration::from_secs(10))?;
        wait_for(
            "the jobs to die with the agent",
            Duration::from_secs(5),
            || Ok(first.iter().all(|p| !alive(*p)).then_some(())),
        )?;
        let restarted = Instant::now();
        agent = start()?;
        let again = wait_for("both jobs to run again", Duration::from_secs(25), || {
            pids(&ids, 2)
        })?;
        stuck.push(restarted.elapsed().as_secs_f64());
        assert_eq!(
            agent.worker_id()?,
            worker,
            "kill {k}: the worker id is kept"
        );
        for id in &ids {
            api.admin("POST", &format!("/api/v1/jobs/{id}/cancel"), None)?;
        }
        wait_for(
            "the cancelled jobs to stop",
            Duration::from_secs(15),
            || Ok(again.iter().all(|p| !alive(*p)).then_some(())),
        )?;
    }
    stuck.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{kills} kills: 0 orphans, worker id kept, jobs running again {:.2}-{:.2} s after each restart (lease 30 s)",
        stuck[0],
        stuck[stuck.len() - 1]
    );
    assert!(
        stuck.iter().all(|s| *s < 15.0),
        "re-run well before the 30 s lease could expire: {stuck:?}"
    );
    Ok(())
}
