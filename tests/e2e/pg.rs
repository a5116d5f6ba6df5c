//! Coordinators on PostgreSQL (`pgserver` starts the server): several at
//! once on one database, killed, restarted, and failing over to a
//! promoted standby.

use super::checker;
use super::harness::{env_or, wait_for, Agent, Api, Coordinator, TestResult};
use super::pgserver::{skip, PgServer};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// Coordinators on one database: each in its own directory (logs), all
/// with `--db url` and `flags`.
fn coordinators(dir: &Path, url: &str, n: usize, flags: &[&str]) -> TestResult<Vec<Coordinator>> {
    (0..n)
        .map(|i| {
            let d = dir.join(format!("coordinator-{i}"));
            std::fs::create_dir_all(&d)?;
            let mut args = vec!["--db", url, "--auto-approve"];
            args.extend_from_slice(flags);
            Coordinator::start(&d, &args)
        })
        .collect()
}

/// The coordinators' URLs starting at the `first`th: an agent's list.
fn url_list(coords: &[Coordinator], first: usize) -> String {
    (0..coords.len())
        .map(|k| coords[(first + k) % coords.len()].url.clone())
        .collect::<Vec<_>>()
        .join(",")
}

/// A job submitted to one coordinator reaches an agent whose claim is
/// parked on another at once: the submission's commit notifies the other
/// coordinators (LISTEN/NOTIFY), which run a dispatch round. Without it the
/// claim would wait for something to happen on its own coordinator.
#[test]
fn a_submission_on_one_coordinator_wakes_a_claim_parked_on_another() -> TestResult {
    if skip() {
        return Ok(());
    }
    let server = PgServer::start()?;
    let url = server.url("drover");
    let dir = tempfile::tempdir()?;
    let coords = coordinators(dir.path(), &url, 2, &[])?;
    let _agent = Agent::start(&coords[1].url, dir.path(), "parked", &[])?;
    let api = coords[0].api();
    wait_for("the agent to register", Duration::from_secs(20), || {
        let r = api.admin("GET", "/api/v1/workers?state=idle", None)?;
        Ok((r.body["workers"].as_array().map_or(0, Vec::len) == 1).then_some(()))
    })?;
    // Let the claim park on coordinator 1.
    std::thread::sleep(Duration::from_millis(500));
    let mut waits = Vec::new();
    for _ in 0..5 {
        let id = api.submit(&json!({"command": ["true"]}))?;
        let job = wait_for("the job to finish", Duration::from_secs(20), || {
            let job = api.job(id)?;
            Ok((job["status"] == "succeeded").then_some(job))
        })?;
        let started = ms_of(&job["started_at"])?;
        let created = ms_of(&job["created_at"])?;
        waits.push(started - created);
        std::thread::sleep(Duration::from_millis(300));
    }
    println!("submitted on coordinator 0, granted through coordinator 1 after (ms): {waits:?}");
    assert!(
        waits.iter().all(|w| *w < 2_000),
        "a claim parked on another coordinator waited for its own poll: {waits:?} ms"
    );
    Ok(())
}

/// Reservations are rows every coordinator reads: two 4-GPU workers, each
/// parked on its own coordinator and kept busy by a stream of 1-GPU jobs,
/// and one 4-GPU job. Exactly one worker is held free for it, both
/// coordinators name the same one, and the job runs. (Held in each
/// coordinator's memory, each would hold its own worker, or none would
/// know the other's.)
#[test]
fn coordinators_share_one_reservation_for_a_big_job() -> TestResult {
    if skip() {
        return Ok(());
    }
    let server = PgServer::start()?;
    let url = server.url("drover");
    let dir = tempfile::tempdir()?;
    let flags = ["--lease-ttl", "3", "--reserve-after", "2"];
    let coords = coordinators(dir.path(), &url, 2, &flags)?;
    let gpus = ["--fake-gpus", "4xA100:81920"];
    let _quads: Vec<Agent> = (0..2)
        .map(|i| Agent::start(&coords[i].url, dir.path(), &format!("quad{i}"), &gpus))
        .collect::<TestResult<_>>()?;
    let apis: Vec<Api> = coords.iter().map(Coordinator::api).collect();
    wait_for("both agents to register", Duration::from_secs(20), || {
        let r = apis[0].admin("GET", "/api/v1/workers?state=idle", None)?;
        Ok((r.body["workers"].as_array().map_or(0, Vec::len) == 2).then_some(()))
    })?;
    // Durations vary, so a worker's GPUs free one at a time, each taken
    // by the next 1-GPU job unless the worker is held.
    let small = |i: u128| json!({"command": ["sleep", format!("0.{}", 3 + i % 7)], "gpus": 1});
    // Enough queued that every freed GPU is taken at once (topped up below).
    let top_up = |api: &Api, seed: u128| -> TestResult {
        let queued = api.jobs("queued")?.len();
        let batch: Vec<Value> = (0..24usize.saturating_sub(queued))
            .map(|i| small(seed + i as u128))
            .collect();
        if !batch.is_empty() {
            api.admin("POST", "/api/v1/jobs", Some(&json!(batch)))?;
        }
        Ok(())
    };
    top_up(&apis[1], 0)?;
    // Behind the 1-GPU jobs (a lower priority), so only a reservation lets
    // it run: a worker never has 4 GPUs free while 1-GPU jobs wait.
    let big = apis[0].submit(&json!({"command": ["true"], "gpus": 4, "priority": -1}))?;
    let kept = |api: &Api| -> TestResult<Option<String>> {
        let reason = api.job(big)?["waiting_reason"].as_str().map(str::to_owned);
        Ok(reason.and_then(|r| {
            r.split("; ")
                .find(|p| p.contains("kept free"))
                .map(str::to_owned)
        }))
    };
    let started = Instant::now();
    let (mut agreed, mut most_held) = (0, 0);
    while apis[1].job(big)?["status"] != "succeeded" {
        if started.elapsed() > Duration::from_secs(40) {
            return Err(format!("the 4-GPU job starved: {}", apis[1].job(big)?).into());
        }
        let held = server.query(
            "drover",
            "SELECT count(*) FROM workers WHERE reserved_for IS NOT NULL",
        )?;
        most_held = most_held.max(held.first().and_then(|n| n.parse().ok()).unwrap_or(0));
        if let (Some(a), Some(b)) = (kept(&apis[0])?, kept(&apis[1])?) {
            assert_eq!(a, b, "the coordinators hold different workers for one job");
            agreed += 1;
        }
        let n = started.elapsed().as_millis();
        top_up(&apis[n as usize % 2], n / 100)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "4-GPU job done after {:.1}s; workers held at once: at most {most_held}; both coordinators named the same held worker {agreed} times",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(most_held, 1, "one worker held for one job");
    assert!(
        agreed > 0,
        "no coordinator said a worker was kept free for the job"
    );
    Ok(())
}

/// 3 coordinators on one PostgreSQL database, 6 agents (4 real, 2
/// simulated; each with the three URLs, in its own order), 5,000 jobs submitted across them while
/// one coordinator after another is killed (-9) and restarted every few
/// seconds, and PostgreSQL itself restarted (fast shutdown) half way: no
/// acknowledged job lost, none run twice at once, no stale report
/// accepted (the chaos checker, on the PostgreSQL tables).
#[test]
fn three_coordinators_on_postgres_survive_kills_and_a_server_restart() -> TestResult {
    if skip() {
        return Ok(());
    }
    let n_jobs = env_or("DROVER_PG_CHAOS_JOBS", 5000) as usize;
    let server = PgServer::start()?;
    let url = server.url("drover");
    let dir = tempfile::tempdir()?;
    let history = dir.path().join("history.txt");
    let flags = ["--lease-ttl", "3", "--retry-backoff", "0"];
    let mut coords = coordinators(dir.path(), &url, 3, &flags)?;
    // 4 real agents (tag "real": their jobs are processes that record
    // their runs) and 2 virtual ones (tag "sim", one `simulate` process:
    // their jobs succeed without running, so only the store's record of
    // them is checked). Each with the three URLs, in its own order.
    let mut agents: Vec<Agent> = (0..4)
        .map(|i| {
            let list = url_list(&coords, i);
            let flags = ["--slots", "4", "--kill-grace", "1", "--tags", "real"];
            Agent::start(&list, dir.path(), &format!("a{i}"), &flags)
        })
        .collect::<TestResult<_>>()?;
    let flags = ["--slots", "4", "--tags", "sim"];
    agents.push(Agent::simulate(
        &url_list(&coords, 1),
        dir.path(),
        "sim",
        2,
        &flags,
    )?);
    let apis: Vec<Api> = coords.iter().map(Coordinator::api).collect();
    let simulated = |i: usize| i % 4 == 3;
    let specs: Vec<Value> = (0..n_jobs)
        .map(|i| {
            json!({
                "command": checker::recorded(&history, "true"),
                "required_tags": [if simulated(i) { "sim" } else { "real" }],
                "max_attempts": 50,
                "idempotency_key": format!("job-{i}"),
            })
        })
        .collect();
    let started = Instant::now();
    let (mut kills, mut pg_restarts) = (0, 0);
    let submitted = std::thread::scope(|scope| -> TestResult<BTreeSet<i64>> {
        let submitter = scope.spawn(|| submit_anywhere(&apis, &specs).map_err(|e| e.to_string()));
        let limit = Duration::from_secs(300 + n_jobs as u64 / 10);
        let mut next_kill = Instant::now() + Duration::from_secs(2);
        loop {
            let done = finished(&apis);
            if submitter.is_finished() && done >= n_jobs {
                break;
            }
            assert!(
                started.elapsed() < limit,
                "not done in {limit:?}: {done} of {n_jobs} finished"
            );
            if pg_restarts == 0 && done >= n_jobs / 2 {
                server.restart()?;
                pg_restarts += 1;
                println!("postgres restarted (fast shutdown) at {done}/{n_jobs}");
            }
            if Instant::now() >= next_kill {
                let victim = &mut coords[kills % 3];
                victim.kill9();
                std::thread::sleep(Duration::from_millis(500));
                victim.restart()?;
                kills += 1;
                next_kill = Instant::now() + Duration::from_secs(3);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(submitter.join().map_err(|_| "the submitter panicked")??)
    })?;
    let elapsed = started.elapsed();
    drop(agents);
    for c in &mut coords {
        c.kill9();
    }
    let mut report =
        checker::check_recorded(checker::Recorded::postgres(&url)?, &history, &submitted)?;
    let virtual_jobs: BTreeSet<i64> = server
        .query(
            "drover",
            "SELECT id FROM jobs WHERE required_tags = '[\"sim\"]'",
        )?
        .iter()
        .map(|id| id.parse::<i64>())
        .collect::<Result<_, _>>()?;
    assert_eq!(
        virtual_jobs.len(),
        (0..n_jobs).filter(|i| simulated(*i)).count()
    );
    let before = report.success_without_run.len();
    report
        .success_without_run
        .retain(|id| !virtual_jobs.contains(id));
    assert_eq!(
        before - report.success_without_run.len(),
        virtual_jobs.len(),
        "every job of a virtual agent succeeded without running, and only those"
    );
    println!(
        "postgres chaos: {} jobs acknowledged, all finished in {:.1}s ({:.0} jobs/s) with {kills} coordinator kills and {pg_restarts} PostgreSQL restart\n{report}",
        submitted.len(),
        elapsed.as_secs_f64(),
        submitted.len() as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(
        submitted.len(),
        n_jobs,
        "every submission acknowledged in the end"
    );
    report.assert_valid();
    Ok(())
}

/// Submits `specs` in batches, each to the next coordinator that answers
/// (a killed one refuses; its idempotency keys make a retry safe).
/// Returns the acknowledged ids.
fn submit_anywhere(apis: &[Api], specs: &[Value]) -> TestResult<BTreeSet<i64>> {
    let mut ids = BTreeSet::new();
    for (n, chunk) in specs.chunks(250).enumerate() {
        let body = json!(chunk);
        let mut tries = 0;
        loop {
            let api = &apis[(n + tries) % apis.len()];
            match api.admin("POST", "/api/v1/jobs", Some(&body)) {
                Ok(r) if r.status == 201 || r.status == 200 => {
                    for j in r.body["jobs"].as_array().ok_or("no jobs")? {
                        ids.insert(j["id"].as_i64().ok_or("no id")?);
                    }
                    break;
                }
                _ => {
                    tries += 1;
                    assert!(tries < 200, "no coordinator took batch {n}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    Ok(ids)
}

/// Jobs finished, as the first coordinator that answers counts them.
fn finished(apis: &[Api]) -> usize {
    apis.iter()
        .find_map(|api| match api.admin("GET", "/api/v1/stats", None) {
            Ok(r) if r.status == 200 => Some(
                ["succeeded", "failed", "cancelled"]
                    .iter()
                    .map(|s| r.body["jobs"][s].as_u64().unwrap_or(0))
                    .sum::<u64>() as usize,
            ),
            _ => None,
        })
        .unwrap_or(0)
}

/// Milliseconds since the epoch of an RFC 3339 time in the API's JSON.
fn ms_of(v: &Value) -> TestResult<i64> {
    let t = humantime::parse_rfc3339(v.as_str().ok_or("not a time")?)?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}

/// Coordinators with a two-host URL (`target_session_attrs=read-write`)
/// follow a promoted standby: the primary is killed under load, the
/// standby promoted, and every job acknowledged before finishes. The
/// standby is synchronous (`synchronous_standby_names = '*'`): a commit
/// is acknowledged once the standby has it, so none is lost with the
/// primary. (With asynchronous replication the commits of the last
/// moments before the primary died are lost, as PostgreSQL documents.)
#[test]
fn coordinators_follow_a_promoted_standby() -> TestResult {
    if skip() {
        return Ok(());
    }
    let primary = PgServer::start()?;
    let standby = primary.standby(true)?;
    assert_eq!(
        standby.query("postgres", "SELECT pg_is_in_recovery()")?,
        ["t"]
    );
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/drover?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let dir = tempfile::tempdir()?;
    let history = dir.path().join("history.txt");
    let coords = coordinators(dir.path(), &url, 2, &["--lease-ttl", "6"])?;
    let _agents: Vec<Agent> = (0..2)
        .map(|i| {
            Agent::start(
                &url_list(&coords, i),
                dir.path(),
                &format!("s{i}"),
                &["--slots", "4"],
            )
        })
        .collect::<TestResult<_>>()?;
    let apis: Vec<Api> = coords.iter().map(Coordinator::api).collect();
    let spec = |i: usize| {
        json!({
            "command": checker::recorded(&history, "sleep 0.05"),
            "max_attempts": 50,
            "idempotency_key": format!("s-{i}"),
        })
    };
    let before: Vec<Value> = (0..300).map(spec).collect();
    let mut submitted = submit_anywhere(&apis, &before)?;
    primary.kill()?;
    let killed = Instant::now();
    standby.promote()?;
    let promoted = killed.elapsed();
    let after: Vec<Value> = (300..400).map(spec).collect();
    submitted.extend(submit_anywhere(&apis, &after)?);
    let first_after = killed.elapsed();
    wait_for("every job to finish", Duration::from_secs(120), || {
        Ok((finished(&apis) >= submitted.len()).then_some(()))
    })?;
    let report = checker::check_recorded(
        checker::Recorded::postgres(&standby.url("drover"))?,
        &history,
        &submitted,
    )?;
    println!(
        "standby promoted {:.1}s after the primary died; the next submissions were taken {:.1}s after it died\n{report}",
        promoted.as_secs_f64(),
        first_after.as_secs_f64()
    );
    assert_eq!(submitted.len(), 400);
    report.assert_valid();
    Ok(())
}

/// The coordinator whose log says it leads (runs the sweep), if any.
fn leader(coords: &[Coordinator]) -> Option<usize> {
    coords.iter().position(|c| {
        let logs = std::fs::read_dir(&c.dir).into_iter().flatten().flatten();
        logs.filter(|e| e.file_name().to_string_lossy().starts_with("coordinator-"))
            .any(|e| {
                std::fs::read_to_string(e.path())
                    .is_ok_and(|t| t.contains("this coordinator now leads"))
            })
    })
}

/// The lease sweep runs on one coordinator; when that one dies, another
/// takes the leader lock and expires the leases of a dead agent.
#[test]
fn the_sweep_moves_to_another_coordinator_when_its_leader_dies() -> TestResult {
    if skip() {
        return Ok(());
    }
    let server = PgServer::start()?;
    let url = server.url("drover");
    let dir = tempfile::tempdir()?;
    let mut coords = coordinators(dir.path(), &url, 2, &["--lease-ttl", "3"])?;
    let first = wait_for("a leader", Duration::from_secs(10), || Ok(leader(&coords)))?;
    let other = 1 - first;
    let api = coords[other].api();
    let mut agent = Agent::start(&coords[other].url, dir.path(), "doomed", &[])?;
    let id = api.submit(&json!({"command": ["sleep", "60"], "max_attempts": 3}))?;
    wait_for("the job to run", Duration::from_secs(20), || {
        Ok((api.job(id)?["status"] == "running").then_some(()))
    })?;
    // A live agent beside it: a coordinator that hears no agent at all
    // holds every lease (decision 0041).
    let _alive = Agent::start(&coords[other].url, dir.path(), "alive", &[])?;
    coords[first].kill9();
    let killed = Instant::now();
    agent.kill9();
    let job = wait_for("the lease to expire", Duration::from_secs(60), || {
        let job = api.job(id)?;
        Ok((job["attempts"][0]["outcome"] == "lease_lost").then_some(job))
    })?;
    let took = killed.elapsed();
    println!(
        "leader killed; coordinator {other} took over and expired the dead agent's lease {:.1}s later (TTL 3 s)",
        took.as_secs_f64()
    );
    assert!(
        leader(&coords[other..=other]).is_some(),
        "coordinator {other} never said it leads"
    );
    assert_eq!(job["attempts"][0]["outcome"], "lease_lost", "{job}");
    Ok(())
}

/// `--db-ca-cert`: every connection of the coordinator is TLS, verified
/// against that CA. A server whose certificate another CA signed is
/// refused, and a URL asking for TLS without a CA is refused with a hint.
#[test]
fn tls_to_postgres_is_verified_and_used_for_every_connection() -> TestResult {
    if skip() {
        return Ok(());
    }
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let server = PgServer::start_with_tls(Some((&cert_pem, &key_pem)))?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert_pem)?;
    let ca = ca.display().to_string();
    let url = server.url("drover");
    let coord = Coordinator::start(dir.path(), &["--db", &url, "--db-ca-cert", &ca])?;
    coord.api().submit(&json!({"command": ["true"]}))?;
    let per_kind = server.query(
        "postgres",
        "SELECT count(*) FILTER (WHERE s.ssl) || ' ' || count(*) FILTER (WHERE NOT s.ssl)
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = 'drover'",
    )?;
    println!("the coordinator's connections to PostgreSQL, TLS and plain: {per_kind:?}");
    let (tls, plain) = per_kind[0].split_once(' ').ok_or("no counts")?;
    assert!(
        tls.parse::<u32>()? >= 6,
        "writer, readers, listener, leader: {per_kind:?}"
    );
    assert_eq!(plain, "0", "{per_kind:?}");

    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(&wrong, other.cert.pem())?;
    std::fs::create_dir_all(dir.path().join("wrong"))?;
    std::fs::create_dir_all(dir.path().join("plain"))?;
    let refused = Coordinator::start(
        &dir.path().join("wrong"),
        &["--db", &url, "--db-ca-cert", &wrong.display().to_string()],
    );
    let e = refused
        .err()
        .ok_or("a coordinator trusted a certificate its CA did not sign")?;
    assert!(
        e.to_string().contains("PostgreSQL cannot be reached"),
        "{e}"
    );
    let plain_url = format!("{url}?sslmode=require");
    let refused = Coordinator::start(&dir.path().join("plain"), &["--db", &plain_url]);
    let e = refused
        .err()
        .ok_or("sslmode=require without a CA was taken")?;
    assert!(e.to_string().contains("--db-ca-cert"), "{e}");
    Ok(())
}
