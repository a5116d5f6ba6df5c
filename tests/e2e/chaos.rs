//! The chaos run: jobs of random length on several real agents while a
//! driver SIGKILLs and restarts agents every few seconds, SIGSTOPs one for
//! longer than its lease, and SIGKILLs the coordinator twice. Then the
//! checker reads every job's history: lost, double-complete, stale-accepted,
//! overlap, ran after completion must all be 0. Failover times are printed.
//! Meanwhile (C6) event followers reconnect at random and resume with
//! `after=ID` (long-poll) or `Last-Event-ID` (SSE): each must see the database's events in order, with no gap,
//! duplicate or phantom; and one job prints 100 MiB: every attempt keeps at
//! most the 16 MiB log cap, and says so.
//!
//! Short by default (CI). The long run:
//!   DROVER_CHAOS_JOBS=2000 DROVER_CHAOS_AGENTS=8 \
//!     cargo test --workspace --test e2e chaos -- --nocapture
//! DROVER_CHAOS_SEED replays a run's choices (the seed is printed);
//! DROVER_CHAOS_KEEP=1 keeps the run's database and logs (the path is printed).

use crate::checker;
use crate::harness::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The coordinator's cap on one attempt's stored log.
const LOG_CAP: i64 = 16 << 20;

/// C6: follows the event stream until `stop`, opening a new connection every
/// 1-20 requests and resuming after the last id it saw, with random page
/// sizes; through coordinator restarts (errors are retried). Returns the
/// ids in the order seen and the number of reconnects.
fn follow_events(url: &str, stop: &AtomicBool, seed: u64) -> (Vec<i64>, usize) {
    let mut rng = Rng(seed);
    let (mut seen, mut reconnects) = (Vec::new(), 0);
    let mut api = Api::new(url);
    let mut left = 1 + rng.below(20);
    while !stop.load(Ordering::Acquire) {
        if left == 0 {
            api = Api::new(url);
            left = 1 + rng.below(20);
            reconnects += 1;
        }
        left -= 1;
        let after = seen.last().copied().unwrap_or(0);
        let limit = 1 + rng.below(300);
        match api.admin(
            "GET",
            &format!("/api/v1/events?after={after}&limit={limit}&wait=1"),
            None,
        ) {
            Ok(r) if r.status == 200 => {
                for e in r.body["events"].as_array().into_iter().flatten() {
                    seen.push(e["id"].as_i64().unwrap_or(-1));
                }
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    (seen, reconnects)
}

/// C6 over server-sent events: one stream at a time, dropped after 1-300
/// events and resumed with `Last-Event-ID`; through coordinator restarts.
/// Returns the ids in the order seen and the number of reconnects.
fn follow_sse(url: &str, stop: &AtomicBool, seed: u64) -> (Vec<i64>, usize) {
    use std::io::{BufRead, BufReader, Write};
    let mut rng = Rng(seed);
    let (mut seen, mut reconnects) = (Vec::<i64>::new(), 0);
    let addr = url.trim_start_matches("http://").to_string();
    while !stop.load(Ordering::Acquire) {
        let resume = seen.last().copied().unwrap_or(0);
        let stream = (|| -> std::io::Result<std::net::TcpStream> {
            let mut s = std::net::TcpStream::connect(&addr)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            write!(
                s,
                "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\
                 Accept: text/event-stream\r\nLast-Event-ID: {resume}\r\n\r\n"
            )?;
            Ok(s)
        })();
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        reconnects += 1;
        let mut budget = 1 + rng.below(300);
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        while budget > 0 && !stop.load(Ordering::Acquire) {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {
                    if let Some(id) = line.strip_prefix("id: ") {
                        seen.push(id.trim().parse().unwrap_or(-1));
                        budget -= 1;
                    }
                }
                // Quiet (the read timeout) or gone: go on, or reconnect.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
    }
    (seen, reconnects)
}

/// What a follower saw against the database's event ids up to the last id
/// it saw: (gaps, duplicates or reorders, phantoms).
fn follower_faults(seen: &[i64], db_ids: &BTreeSet<i64>) -> (usize, usize, usize) {
    let reorders = seen.windows(2).filter(|w| w[0] >= w[1]).count();
    let last = seen.last().copied().unwrap_or(0);
    let got: BTreeSet<i64> = seen.iter().copied().collect();
    let gaps = db_ids.range(..=last).filter(|id| !got.contains(id)).count();
    let phantoms = got.iter().filter(|id| !db_ids.contains(id)).count();
    (gaps, reorders, phantoms)
}

#[test]
fn chaos_run_loses_nothing_and_completes_nothing_twice() -> TestResult {
    let n_jobs = env_or("DROVER_CHAOS_JOBS", 300) as usize;
    let n_agents = env_or("DROVER_CHAOS_AGENTS", 4) as usize;
    let seed = seed_from("DROVER_CHAOS_SEED");
    let mut rng = Rng(seed);
    println!("chaos: {n_jobs} jobs, {n_agents} agents x 2 slots, seed {seed}");
    let ttl = 3;
    let dir = tempfile::tempdir()?;
    let history = dir.path().join("history.txt");
    let mut coord = Coordinator::start(
        dir.path(),
        &[
            "--auto-approve",
            "--lease-ttl",
            "3",
            "--restart-grace",
            "10",
            "--retry-backoff",
            "0",
        ],
    )?;
    let agent_flags = ["--slots", "2", "--kill-grace", "1"];
    let names: Vec<String> = (0..n_agents).map(|i| format!("c{i}")).collect();
    let mut agents: Vec<Agent> = names
        .iter()
        .map(|n| Agent::start(&coord.url, dir.path(), n, &agent_flags))
        .collect::<TestResult<_>>()?;

    // Jobs of 0-800 ms; enough attempts that agent deaths do not fail them.
    let specs: Vec<Value> = (0..n_jobs)
        .map(|_| {
            let ms = rng.below(800);
            json!({
                "command": checker::recorded(&history, &format!("sleep {}.{:03}", ms / 1000, ms % 1000)),
                "max_attempts": 50,
            })
        })
        .collect();
    // C6: one loud job among them.
    let mut specs = specs;
    specs.push(json!({
        "command": checker::recorded(&history, "head -c 104857600 /dev/zero | tr '\\0' x"),
        "max_attempts": 50,
    }));
    let n_jobs = specs.len();
    let stop_followers = AtomicBool::new(false);
    let n_followers = env_or("DROVER_CHAOS_FOLLOWERS", 10);
    let mut submitted = BTreeSet::new();
    std::thread::scope(|scope| -> TestResult {
        let followers: Vec<_> = (0..n_followers)
            .map(|i| {
                let (url, stop) = (coord.url.clone(), &stop_followers);
                // Every other one over server-sent events.
                scope.spawn(move || match i % 2 {
                    0 => follow_events(&url, stop, seed ^ (i + 1)),
                    _ => follow_sse(&url, stop, seed ^ (i + 1)),
                })
            })
            .collect();
        for chunk in specs.chunks(500) {
            let r = coord
                .api()
                .admin("POST", "/api/v1/jobs", Some(&json!(chunk)))?;
            assert_eq!(r.status, 201, "{}", r.text);
            for j in r.body["jobs"].as_array().ok_or("no jobs")? {
                submitted.insert(j["id"].as_i64().ok_or("no id")?);
            }
        }
        let started = Instant::now();

        // The driver. Victims are chosen at random; the coordinator dies at a
        // third and at two thirds of the work; one agent is stopped past its
        // lease once a tenth is done.
        let mut kills: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
        let mut stops: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
        let mut coordinator_kills = 0;
        let mut stopped: Option<(usize, Instant)> = None;
        let mut stop_done = false;
        let mut next_kill = Instant::now() + Duration::from_secs(2);
        let limit = Duration::from_secs(120 + n_jobs as u64 / 5);
        let mut restarts = Vec::new();
        loop {
            let done = match coord.api().admin("GET", "/api/v1/stats", None) {
                Ok(r) if r.status == 200 => {
                    let j = &r.body["jobs"];
                    ["succeeded", "failed", "cancelled"]
                        .iter()
                        .map(|s| j[s].as_u64().unwrap_or(0))
                        .sum::<u64>() as usize
                }
                _ => 0,
            };
            if done >= n_jobs && stopped.is_none() {
                break;
            }
            assert!(
                started.elapsed() < limit,
                "chaos run did not finish in {limit:?}: {done} of {n_jobs} done"
            );
            let frac = done as f64 / n_jobs as f64;
            // Not while an agent is stopped: the restart grace would renew its
            // lease and hide the expiry this run is to show.
            if coordinator_kills < 2
                && stopped.is_none()
                && frac >= (coordinator_kills + 1) as f64 / 3.0
            {
                coord.kill9();
                let down = Instant::now();
                std::thread::sleep(Duration::from_millis(500));
                coord.restart()?;
                restarts.push(down.elapsed());
                coordinator_kills += 1;
                println!("chaos: coordinator killed and restarted at {done}/{n_jobs}");
            }
            if !stop_done && frac >= 0.1 {
                let i = rng.below(n_agents as u64) as usize;
                agents[i].signal(libc::SIGSTOP);
                stopped = Some((i, Instant::now()));
                stops.insert(names[i].clone(), vec![Instant::now()]);
                stop_done = true;
                println!("chaos: agent {} stopped at {done}/{n_jobs}", names[i]);
            }
            if let Some((i, at)) = stopped {
                if at.elapsed() > Duration::from_secs(ttl + 3) {
                    agents[i].signal(libc::SIGCONT);
                    stopped = None;
                }
            }
            if Instant::now() >= next_kill {
                let i = rng.below(n_agents as u64) as usize;
                if stopped.map(|(s, _)| s) != Some(i) {
                    agents[i].kill9();
                    kills
                        .entry(names[i].clone())
                        .or_default()
                        .push(Instant::now());
                    // systemd would restart it after RestartSec; sooner here.
                    std::thread::sleep(Duration::from_millis(200));
                    agents[i] = Agent::start(&coord.url, dir.path(), &names[i], &agent_flags)?;
                }
                next_kill = Instant::now() + Duration::from_millis(1500 + rng.below(2000));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let elapsed = started.elapsed();
        // Let late reports (and refusals) land, then stop everything.
        std::thread::sleep(Duration::from_millis(500));
        let workers = coord.api().admin("GET", "/api/v1/workers", None)?;
        let coordinator_peak_kib = peak_rss_kib(coord.pid()).unwrap_or(0);
        let newest = coord.api().admin("GET", "/api/v1/jobs?limit=1", None)?;
        let loud = coord
            .api()
            .job(newest.body["jobs"][0]["id"].as_i64().ok_or("no job")?)?;
        let loud_log =
            coord
                .api()
                .admin("GET", &format!("/api/v1/jobs/{}/logs", loud["id"]), None)?;
        stop_followers.store(true, Ordering::Release);
        let seen: Vec<(Vec<i64>, usize)> = followers
            .into_iter()
            .map(|f| f.join().unwrap_or_default())
            .collect();
        drop(agents);
        coord.kill9();

        if std::env::var_os("DROVER_CHAOS_KEEP").is_some() {
            println!("chaos: files kept in {}", dir.path().display());
        }
        let report = checker::check(&coord.db_path(), &history, &submitted)?;
        println!("chaos: finished in {:.1}s\n{report}", elapsed.as_secs_f64());

        // Failover: from an agent's SIGKILL to its jobs running elsewhere (or
        // on its restarted self), read from the attempts the kill cut short.
        let name_of: BTreeMap<i64, String> = workers.body["workers"]
            .as_array()
            .ok_or("no workers")?
            .iter()
            .filter_map(|w| Some((w["id"].as_i64()?, w["name"].as_str()?.to_string())))
            .collect();
        let (kill_ends, kill_reruns) =
            failover_seconds(&coord.db_path(), &name_of, &kills, "agent_restarted")?;
        let (stop_ends, stop_reruns) =
            failover_seconds(&coord.db_path(), &name_of, &stops, "lease_lost")?;
        let show = |v: &[f64]| {
            format!(
                "p50 {:.2}s p90 {:.2}s max {:.2}s",
                pct(v, 0.5),
                pct(v, 0.9),
                v.last().copied().unwrap_or(f64::NAN)
            )
        };
        println!(
            "chaos: {} agent kills, {} coordinator kills (down {restarts:?})",
            kills.values().map(Vec::len).sum::<usize>(),
            coordinator_kills,
        );
        println!(
        "chaos: agent SIGKILL -> its {} attempts released (the restarted agent re-registers): {}; -> running again: {}",
        kill_ends.len(),
        show(&kill_ends),
        show(&kill_reruns)
    );
        println!(
        "chaos: agent SIGSTOP -> its {} leases expired (TTL {ttl}s + sweep 1s): {}; -> running again: {} (a job's second lease loss waits the 10 s loss backoff)",
        stop_ends.len(),
        show(&stop_ends),
        show(&stop_reruns)
    );
        // Stale reports the coordinator refused (409), as the agents logged them.
        let refused: usize = names
            .iter()
            .map(|n| {
                read_lines(&dir.path().join(format!("agent-{n}.log")))
                    .iter()
                    .filter(|l| l.contains("report refused job_id="))
                    .count()
            })
            .sum();
        println!("chaos: stale reports refused with 409: {refused}");
        if std::env::var_os("DROVER_CHAOS_KEEP").is_some() {
            let _ = dir.keep();
        }
        // C6: the followers against the database's events.
        let db = rusqlite::Connection::open_with_flags(
            coord.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        let db_ids: BTreeSet<i64> = db
            .prepare("SELECT id FROM events")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut faults = (0, 0, 0);
        for (ids, _) in &seen {
            let (g, r, p) = follower_faults(ids, &db_ids);
            faults = (faults.0 + g, faults.1 + r, faults.2 + p);
        }
        println!(
        "chaos: {} event followers (half of them over SSE), {} reconnects, {} events each (min; {} in the database): gaps {}, duplicates or reorders {}, phantoms {}",
        seen.len(),
        seen.iter().map(|s| s.1).sum::<usize>(),
        seen.iter().map(|s| s.0.len()).min().unwrap_or(0),
        db_ids.len(),
        faults.0,
        faults.1,
        faults.2
    );
        let kept: Vec<i64> = loud["attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a["log_bytes"].as_i64().unwrap_or(-1))
            .collect();
        println!(
        "chaos: the 100 MiB job ({}, {} attempts) kept {kept:?} bytes per attempt; coordinator peak RSS {} MiB (last process)",
        loud["status"],
        kept.len(),
        coordinator_peak_kib / 1024
    );
        report.assert_valid();
        assert_eq!(report.succeeded, n_jobs, "every job succeeds: {report}");
        assert_eq!(coordinator_kills, 2, "the coordinator was killed twice");
        assert_eq!(
            faults,
            (0, 0, 0),
            "event followers: (gaps, reorders, phantoms)"
        );
        assert!(
            seen.iter().all(|s| s.0.len() * 2 > db_ids.len()),
            "every follower kept up with most of the stream"
        );
        assert!(
            kept.iter().all(|b| (0..=LOG_CAP).contains(b)) && kept.last() == Some(&LOG_CAP),
            "the loud job's stored log per attempt: {kept:?}"
        );
        assert!(
            loud_log.text.contains("[drover] log cap"),
            "the stored log says it was capped"
        );
        Ok(())
    })
}

/// For every attempt of an agent that ended with `outcome` after a fault
/// of that agent (a kill, a stop): seconds from the fault to the attempt's
/// end, and to the job's next attempt starting; each sorted.
fn failover_seconds(
    db: &std::path::Path,
    name_of: &BTreeMap<i64, String>,
    faults: &BTreeMap<String, Vec<Instant>>,
    outcome: &str,
) -> TestResult<(Vec<f64>, Vec<f64>)> {
    // Attempts carry wall-clock ms; faults were taken on the monotonic
    // clock: put both on the wall clock through "now".
    let now_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let now_mono = Instant::now();
    let wall = |t: Instant| now_wall - now_mono.duration_since(t).as_millis() as i64;
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare(
        "SELECT a.worker_id, a.started_at, a.ended_at, n.started_at FROM job_attempts a
         JOIN job_attempts n ON n.job_id = a.job_id AND n.attempt = a.attempt + 1
         WHERE a.outcome = ?1",
    )?;
    let (mut ends, mut reruns) = (Vec::new(), Vec::new());
    for row in stmt.query_map([outcome], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })? {
        let (worker, began, ended, next) = row?;
        let Some(times) = name_of.get(&worker).and_then(|n| faults.get(n)) else {
            continue;
        };
        // The first fault of that agent after the attempt began.
        if let Some(k) = times.iter().map(|t| wall(*t)).find(|k| *k >= began) {
            if k <= ended {
                ends.push((ended - k) as f64 / 1000.0);
                reruns.push((next - k) as f64 / 1000.0);
            }
        }
    }
    ends.sort_by(f64::total_cmp);
    reruns.sort_by(f64::total_cmp);
    Ok((ends, reruns))
}

/// The follower check finds a planted gap, a repeat and a phantom.
#[test]
fn the_follower_check_finds_each_planted_fault() {
    let db: BTreeSet<i64> = [1, 2, 3, 5, 6, 7].into_iter().collect();
    assert_eq!(follower_faults(&[1, 2, 3, 5, 6], &db), (0, 0, 0));
    assert_eq!(follower_faults(&[1, 3, 5], &db), (1, 0, 0), "2 missed");
    assert_eq!(follower_faults(&[1, 2, 2, 3], &db), (0, 1, 0), "2 twice");
    assert_eq!(
        follower_faults(&[1, 2, 3, 4, 5], &db),
        (0, 0, 1),
        "4 never was"
    );
}
