//! Scheduling with several fake-GPU and CPU agents: each job on the right
//! machine, in the right order, none starved, and a reason for every wait.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

/// Waits until `n` agents have a claim parked (ready for work).
fn all_waiting(api: &Api, n: i64) -> TestResult {
    wait_for(
        &format!("{n} agents waiting"),
        Duration::from_secs(30),
        || {
            let s = api.admin("GET", "/api/v1/stats", None)?;
            Ok((s.body["agents_waiting"].as_i64() == Some(n)).then_some(()))
        },
    )
}

fn worker_ids(api: &Api) -> TestResult<std::collections::HashMap<String, i64>> {
    let w = api.admin("GET", "/api/v1/workers", None)?;
    Ok(w.body["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or("").to_string(),
                w["id"].as_i64().unwrap_or(0),
            )
        })
        .collect())
}

#[test]
fn jobs_go_to_the_right_worker() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let _big = Agent::start(
        &coord.url,
        dir.path(),
        "big",
        &["--fake-gpus", "2xA100:81920", "--tags", "cuda12,a100"],
    )?;
    let _small = Agent::start(
        &coord.url,
        dir.path(),
        "small",
        &["--fake-gpus", "1xT4:16384", "--tags", "cuda12"],
    )?;
    let _fast = Agent::start(
        &coord.url,
        dir.path(),
        "fast",
        &["--slots", "2", "--tags", "fast"],
    )?;
    let _plain = Agent::start(&coord.url, dir.path(), "plain", &["--slots", "2"])?;
    all_waiting(&api, 4)?;
    let ids = worker_ids(&api)?;
    let run = |spec: Value| -> TestResult<i64> {
        all_waiting(&api, 4)?;
        let j = finished(&api, api.submit(&spec)?)?;
        assert_eq!(j["status"], "succeeded", "{j}");
        Ok(j["worker_id"].as_i64().unwrap_or(0))
    };
    // VRAM: only the A100s have 40 GB.
    assert_eq!(
        run(json!({"command": ["true"], "gpus": 1, "min_vram_mb": 40000}))?,
        ids["big"]
    );
    // Tags: a100 only on big; cuda12 GPU jobs go to a GPU worker.
    assert_eq!(
        run(json!({"command": ["true"], "gpus": 1, "required_tags": ["a100"]}))?,
        ids["big"]
    );
    let w = run(json!({"command": ["true"], "gpus": 1, "required_tags": ["cuda12"]}))?;
    assert!(w == ids["big"] || w == ids["small"]);
    // A CPU job goes to a CPU worker, keeping GPUs free.
    for _ in 0..5 {
        let w = run(json!({"command": ["true"]}))?;
        assert!(
            w == ids["fast"] || w == ids["plain"],
            "CPU job on worker {w}"
        );
    }
    // Preferred tags: 10 of 10 go to the preferred idle worker.
    for _ in 0..10 {
        assert_eq!(
            run(json!({"command": ["true"], "preferred_tags": ["fast"]}))?,
            ids["fast"]
        );
    }
    // Required tags no CPU worker has: the GPU worker's spare slot takes it.
    assert_eq!(
        run(json!({"command": ["true"], "required_tags": ["a100"]}))?,
        ids["big"]
    );
    Ok(())
}

#[test]
fn least_loaded_then_priority_order() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let _a = Agent::start(&coord.url, dir.path(), "a", &["--slots", "2"])?;
    let _b = Agent::start(&coord.url, dir.path(), "b", &["--slots", "2"])?;
    all_waiting(&api, 2)?;
    let long = json!({"command": ["sleep", "60"]});
    let first = api.submit(&long)?;
    let on = |id: i64| -> TestResult<i64> {
        wait_for("the job to start", Duration::from_secs(20), || {
            let j = api.job(id)?;
            Ok((j["status"] == "running").then(|| j["worker_id"].as_i64().unwrap_or(0)))
        })
    };
    let w1 = on(first)?;
    all_waiting(&api, 2)?;
    let second = api.submit(&long)?;
    let w2 = on(second)?;
    assert_ne!(w1, w2, "the second job goes to the less loaded worker");
    for id in [first, second] {
        api.admin("POST", &format!("/api/v1/jobs/{id}/cancel"), None)?;
        finished(&api, id)?;
    }

    // Priority order on a busy single-slot worker: once it frees up, queued
    // jobs run highest priority first, then oldest first.
    let dir2 = tempfile::tempdir()?;
    let coord2 = Coordinator::start(dir2.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api2 = coord2.api();
    let _one = Agent::start(&coord2.url, dir2.path(), "one", &[])?;
    all_waiting(&api2, 1)?;
    let blocker = api2.submit(&json!({"command": ["sleep", "60"]}))?;
    wait_for("the blocker to run", Duration::from_secs(20), || {
        Ok((api2.job(blocker)?["status"] == "running").then_some(()))
    })?;
    let order = dir2.path().join("order.txt");
    let mut expected = Vec::new();
    for (name, priority) in [("p1", 1), ("p5a", 5), ("p3", 3), ("p5b", 5), ("p0", 0)] {
        api2.submit(
            &json!({"command": ["sh", "-c", "echo $NAME >> \"$ORDER\""], "priority": priority,
                            "env": {"NAME": name, "ORDER": order.to_string_lossy()}}),
        )?;
        expected.push((priority, name));
    }
    expected.sort_by_key(|(p, _)| -p);
    api2.admin("POST", &format!("/api/v1/jobs/{blocker}/cancel"), None)?;
    let ran = wait_for("the queued jobs to run", Duration::from_secs(30), || {
        let lines = read_lines(&order);
        Ok((lines.len() == 5).then_some(lines))
    })?;
    let want: Vec<&str> = expected.iter().map(|(_, n)| *n).collect();
    assert_eq!(ran, want, "priority, then age");
    Ok(())
}

#[test]
fn a_four_gpu_job_is_not_starved_by_one_gpu_jobs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(
        dir.path(),
        &["--auto-approve", "--lease-ttl", "3", "--reserve-after", "2"],
    )?;
    let api = coord.api();
    let _gpu = Agent::start(
        &coord.url,
        dir.path(),
        "quad",
        &["--fake-gpus", "4xA100:81920"],
    )?;
    all_waiting(&api, 1)?;
    let small = json!({"command": ["sleep", "0.5"], "gpus": 1});
    for _ in 0..4 {
        api.submit(&small)?;
    }
    let big = api.submit(&json!({"command": ["true"], "gpus": 4}))?;
    // A steady stream of 1-GPU jobs, always enough queued to fill any free GPU.
    let mut stream = Vec::new();
    let started = std::time::Instant::now();
    while api.job(big)?["status"] != "succeeded" {
        if started.elapsed() > Duration::from_secs(40) {
            return Err(format!("the 4-GPU job starved: {}", api.job(big)?).into());
        }
        if api.jobs("queued")?.len() < 6 {
            stream.push(api.submit(&small)?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "4-GPU job done after {:.1}s while {} 1-GPU jobs streamed in (reserve after 2s)",
        started.elapsed().as_secs_f64(),
        stream.len()
    );
    let j = api.job(big)?;
    assert_eq!(j["gpu_indices"], json!([0, 1, 2, 3]));
    // The stream was still flowing: 1-GPU jobs submitted before the big job
    // finished were still waiting behind it.
    assert!(!stream.is_empty());
    Ok(())
}

#[test]
fn retries_back_off_and_succeed_on_the_third_attempt() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(
        dir.path(),
        &["--auto-approve", "--lease-ttl", "3", "--retry-backoff", "1"],
    )?;
    let api = coord.api();
    let _a = Agent::start(&coord.url, dir.path(), "r", &[])?;
    let count = dir.path().join("count");
    let id = api.submit(&json!({"command": ["sh", "-c",
        "n=$(cat \"$COUNT\" 2>/dev/null || echo 0); n=$((n+1)); echo $n > \"$COUNT\"; [ $n -ge 3 ]"],
        "env": {"COUNT": count.to_string_lossy()}}))?;
    let j = finished(&api, id)?;
    assert_eq!(j["status"], "succeeded", "{j}");
    let attempts = j["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 3, "{j}");
    assert_eq!(attempts[0]["outcome"], "failed");
    assert_eq!(attempts[0]["exit_code"], 1);
    assert_eq!(attempts[2]["outcome"], "succeeded");
    let t = |a: &Value, k: &str| -> TestResult<f64> {
        let s = a[k].as_str().ok_or("no time")?;
        humantime_secs(s)
    };
    let gap1 = t(&attempts[1], "started_at")? - t(&attempts[0], "ended_at")?;
    let gap2 = t(&attempts[2], "started_at")? - t(&attempts[1], "ended_at")?;
    println!("retry gaps: {gap1:.2}s then {gap2:.2}s (backoff 1s x 2^n, +-20% jitter)");
    assert!(gap1 >= 0.79, "first retry waits the backoff: {gap1}");
    assert!(gap2 > gap1, "gaps grow: {gap1} then {gap2}");
    Ok(())
}

/// Seconds since the epoch of an RFC 3339 time.
fn humantime_secs(s: &str) -> TestResult<f64> {
    let t = humantime::parse_rfc3339(s)?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_secs_f64())
}

#[test]
fn idempotency_batches_not_before_retry_and_explanations() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();

    // Idempotent resubmit: the same key returns the first job; another spec is a conflict.
    let spec =
        json!({"command": ["true"], "idempotency_key": "sweep-17", "required_tags": ["nowhere"]});
    let first = api.admin("POST", "/api/v1/jobs", Some(&spec))?;
    assert_eq!(first.status, 201);
    let again = api.admin("POST", "/api/v1/jobs", Some(&spec))?;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["id"], first.body["id"]);
    let other = api.admin(
        "POST",
        "/api/v1/jobs",
        Some(&json!({"command": ["false"], "idempotency_key": "sweep-17"})),
    )?;
    assert_eq!(other.status, 409);
    assert_eq!(other.code(), "idempotency_conflict");

    // Batches: all or none, errors name the index.
    let bad = json!([{"command": ["true"]}, {"command": []}, {"command": ["true"]}]);
    let r = api.admin("POST", "/api/v1/jobs", Some(&bad))?;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.field(), "[1].command");
    let r = api.admin(
        "POST",
        "/api/v1/jobs",
        Some(&json!([{"command": ["true"], "gpu": 1}])),
    )?;
    assert_eq!(r.field(), "[0].gpu", "{}", r.text);
    let mut batch: Vec<Value> = (0..500)
        .map(|i| json!({"command": ["echo", i.to_string()], "required_tags": ["nowhere"]}))
        .collect();
    batch.push(json!({"command": ["true"], "idempotency_key": "sweep-17"}));
    let conflict = api.admin("POST", "/api/v1/jobs", Some(&Value::Array(batch.clone())))?;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.field(), "[500].idempotency_key");
    assert_eq!(
        api.jobs("queued")?.len(),
        1,
        "nothing of a refused batch was written"
    );
    batch.pop();
    let ok = api.admin("POST", "/api/v1/jobs", Some(&Value::Array(batch)))?;
    assert_eq!(ok.status, 201);
    assert_eq!(ok.body["jobs"].as_array().map(|a| a.len()), Some(500));
    assert_eq!(api.jobs("queued")?.len(), 501);

    let _gpu = Agent::start(
        &coord.url,
        dir.path(),
        "g",
        &["--fake-gpus", "2xA100:81920", "--tags", "cuda12"],
    )?;
    all_waiting(&api, 1)?;
    // Unschedulable jobs say why.
    let why = |spec: Value| -> TestResult<String> {
        let id = api.submit(&spec)?;
        let j = api.job(id)?;
        assert_eq!(j["status"], "queued", "{j}");
        Ok(j["waiting_reason"].as_str().unwrap_or("").to_string())
    };
    let check =
        |got: String, want: &str| assert!(got.contains(want), "{got:?} should say {want:?}");
    check(
        why(json!({"command": ["true"], "required_tags": ["h100"]}))?,
        "no worker has tag h100",
    );
    check(
        why(json!({"command": ["true"], "gpus": 1, "min_vram_mb": 100000}))?,
        "has 81920 MB; the job needs 100000 MB",
    );
    check(
        why(json!({"command": ["true"], "gpus": 8}))?,
        "the most any matching worker has is 2",
    );

    // not_before: the job waits for it, and says so.
    let soon = std::time::SystemTime::now() + Duration::from_secs(2);
    let at = humantime_fmt(soon);
    let id = api.submit(&json!({"command": ["true"], "not_before": at}))?;
    let j = api.job(id)?;
    assert!(
        j["waiting_reason"]
            .as_str()
            .unwrap_or("")
            .contains("not_before"),
        "{j}"
    );
    let j = finished(&api, id)?;
    let started = humantime_secs(j["started_at"].as_str().ok_or("no start")?)?;
    let not_before = humantime_secs(j["not_before"].as_str().ok_or("no not_before")?)?;
    assert!(
        started >= not_before,
        "started {started} before not_before {not_before}"
    );

    // Retry of a failed job: back in the queue with fresh attempts.
    let id = api.submit(&json!({"command": ["false"], "max_attempts": 1}))?;
    let j = finished(&api, id)?;
    assert_eq!(j["status"], "failed");
    let r = api.admin("POST", &format!("/api/v1/jobs/{id}/retry"), None)?;
    assert_eq!(r.status, 200, "{}", r.text);
    let j = finished(&api, id)?;
    // Attempts that ran (a grant that met a claim just expiring is handed
    // back unrun as `not_reported`, spending nothing: a known race).
    let ran = j["attempts"]
        .as_array()
        .map(|a| a.iter().filter(|a| a["outcome"] != "not_reported").count());
    assert_eq!(ran, Some(2), "{j}");
    let again = api.admin(
        "POST",
        &format!("/api/v1/jobs/{}/retry", first.body["id"]),
        None,
    )?;
    assert_eq!(again.status, 409, "a queued job cannot be retried");
    Ok(())
}

fn humantime_fmt(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// RELIABILITY D2b: many clients racing with one idempotency key each get
/// the same job; the database holds one row per key; nothing is a 5xx.
#[test]
fn racing_submissions_with_one_key_make_one_job() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let (keys, racers) = (20, 25);
    let url = coord.url.clone();
    let answers = std::thread::scope(|s| {
        let handles: Vec<_> = (0..racers)
            .map(|_| {
                let url = url.clone();
                s.spawn(move || -> Result<Vec<(usize, u16, i64)>, String> {
                    let api = Api::new(&url);
                    let mut out = Vec::new();
                    for k in 0..keys {
                        let spec = json!({"command": ["true"], "idempotency_key": format!("race-{k}"),
                                          "required_tags": ["nowhere"]});
                        let r = api.admin("POST", "/api/v1/jobs", Some(&spec)).map_err(|e| e.to_string())?;
                        out.push((k, r.status, r.body["id"].as_i64().unwrap_or(-1)));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a racer panicked".to_string())?)
            .collect::<Result<Vec<_>, String>>()
    })?;
    let mut ids: std::collections::BTreeMap<usize, std::collections::BTreeSet<i64>> =
        Default::default();
    let mut created = 0;
    for (k, status, id) in answers.into_iter().flatten() {
        assert!(status == 200 || status == 201, "key {k}: status {status}");
        created += usize::from(status == 201);
        ids.entry(k).or_default().insert(id);
    }
    assert_eq!(created, keys, "exactly one 201 per key");
    for (k, set) in &ids {
        assert_eq!(set.len(), 1, "key {k} answered with several jobs: {set:?}");
    }
    let conn = rusqlite::Connection::open_with_flags(
        coord.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))?;
    assert_eq!(rows, keys as i64, "one row per key");
    Ok(())
}

/// Rounds run so far, from `/metrics`.
fn rounds(api: &Api) -> TestResult<u64> {
    api.metric("drover_dispatch_round_seconds_count")?
        .ok_or_else(|| "no drover_dispatch_round_seconds_count in /metrics".into())
}

/// A job nobody can run (a GPU job, CPU workers only) does not make every
/// re-park run a round that loads the whole fleet (with 10,000 agents that
/// was half a core): after a round that placed nothing, parks alone wait
/// 100 ms for the next. A change of work still dispatches at once: the
/// GPU worker that arrives runs the job.
#[test]
fn a_job_nobody_can_run_does_not_spin_the_dispatcher() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let (parked, busy) = (
        FakeAgent::register(&api, "parked")?,
        FakeAgent::register(&api, "busy")?,
    );
    let id = api.submit(&json!({"command": ["true"], "gpus": 1}))?;
    std::thread::scope(|s| -> TestResult {
        // One claim stays parked throughout, as most of a big fleet's are.
        let holder = s.spawn(|| {
            parked
                .claim(&api, 6)
                .map(|r| r.status)
                .map_err(|e| e.to_string())
        });
        wait_for("the claim to park", Duration::from_secs(5), || {
            Ok((api.agents_waiting()? == Some(1)).then_some(()))
        })?;
        let before = rounds(&api)?;
        let t0 = std::time::Instant::now();
        let mut parks = 0;
        while t0.elapsed() < Duration::from_secs(2) {
            let r = busy.claim(&api, 0)?;
            assert_eq!(r.status, 204, "{}", r.text);
            parks += 1;
        }
        let ran = rounds(&api)? - before;
        let bound = (t0.elapsed().as_secs_f64() * 10.0).ceil() as u64 + 3;
        println!("{parks} re-parks in 2 s with a stuck queue ran {ran} rounds (bound {bound})");
        assert!(parks > 2 * bound, "too few re-parks ({parks}) to tell");
        assert!(
            ran <= bound,
            "{ran} rounds for {parks} re-parks (bound {bound})"
        );
        assert_eq!(holder.join().map_err(|_| "claim thread")??, 204);
        Ok(())
    })?;
    let t0 = std::time::Instant::now();
    let _gpu = Agent::start(
        &coord.url,
        dir.path(),
        "gpu",
        &["--fake-gpus", "1xT4:16384"],
    )?;
    let job = finished(&api, id)?;
    assert_eq!(job["status"], "succeeded", "{job}");
    println!(
        "the GPU worker ran it {:.2} s after its agent started",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A job with memory and CPU limits runs only where they hold: it waits,
/// saying why, while no worker can hold them (and the tag that marks those
/// workers is Drover's own); a worker that can gets it, limits included.
#[test]
fn a_job_with_limits_waits_for_a_worker_that_holds_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let plain = FakeAgent::register(&api, "plain")?;
    let limits = json!({"memory_mb": 512, "cpus": 1.5});
    let id = api.submit(&json!({"command": ["true"], "limits": limits}))?;
    let r = plain.claim(&api, 1)?;
    assert_eq!(r.status, 204, "the plain worker gets nothing: {}", r.text);
    let j = api.job(id)?;
    assert_eq!(j["limits"], limits, "{j}");
    assert_eq!(j["required_tags"], json!(["drover:limits"]), "{j}");
    let why = j["waiting_reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("no worker can hold a job to memory and CPU limits"),
        "{j}"
    );
    // An operator cannot make a worker look able.
    let plain_id = worker_ids(&api)?["plain"];
    let r = api.admin(
        "PUT",
        &format!("/api/v1/workers/{plain_id}/tags"),
        Some(&json!({"tags": ["drover:limits"]})),
    )?;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.body["error"]["field"], "tags[0]", "{}", r.text);

    let able = FakeAgent::register_as(&api, "able", None, json!({"can_limit": true}))?;
    let r = able.claim(&api, 5)?;
    assert_eq!(r.body["jobs"][0]["job_id"], id, "{}", r.text);
    assert_eq!(r.body["jobs"][0]["limits"], limits, "{}", r.text);
    let w = api.admin("GET", "/api/v1/workers", None)?;
    let workers = w.body["workers"].as_array().cloned().unwrap_or_default();
    let can = |name: &str| {
        workers
            .iter()
            .find(|w| w["name"] == name)
            .map(|w| w["can_limit"].clone())
    };
    assert_eq!(can("able"), Some(json!(true)), "{}", w.text);
    assert_eq!(can("plain"), Some(json!(false)), "{}", w.text);
    Ok(())
}

/// Equal workers take turns: 20 jobs submitted one at a time (each waited
/// for) to 4 idle, equal workers go 5 ± 1 to each, not all to the lowest id.
#[test]
fn equal_workers_take_turns() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let _agents: Vec<Agent> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| Agent::start(&coord.url, dir.path(), n, &[]))
        .collect::<TestResult<_>>()?;
    let mut count: std::collections::HashMap<i64, usize> = Default::default();
    for _ in 0..20 {
        all_waiting(&api, 4)?;
        let id = api.submit(&json!({"command": ["true"]}))?;
        let j = finished(&api, id)?;
        *count
            .entry(j["worker_id"].as_i64().ok_or("no worker")?)
            .or_default() += 1;
    }
    println!("20 jobs on 4 equal workers: {count:?}");
    assert_eq!(count.len(), 4, "{count:?}");
    assert!(count.values().all(|n| (4..=6).contains(n)), "{count:?}");
    Ok(())
}
