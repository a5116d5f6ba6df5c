//! Lists that scale (cursors and filters on jobs and events) and the
//! worker lifecycle (stopped at once, PATCH, DELETE, forgetting), against
//! the real binaries.

use super::harness::{finished, wait_for, Agent, Api, Coordinator, TestResult};
use serde_json::{json, Value};
use std::time::Duration;

fn ids(r: &Value, key: &str) -> Vec<i64> {
    r[key]
        .as_array()
        .map(|a| a.iter().filter_map(|j| j["id"].as_i64()).collect())
        .unwrap_or_default()
}

fn get(api: &Api, path: &str) -> TestResult<Value> {
    let r = api.admin("GET", path, None)?;
    if r.status != 200 {
        return Err(format!("GET {path}: {} {}", r.status, r.text).into());
    }
    Ok(r.body)
}

/// 250 jobs paged 100 at a time reach every job once, newest first; the
/// filters (tag, status, worker, creation time) and the events' filters
/// (job, worker, type) keep only what they name; bad parameters get a 400
/// naming the parameter.
#[test]
fn job_pages_and_filters_reach_every_job() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let tagged: Vec<Value> = (0..50)
        .map(|_| json!({"command": ["true"], "preferred_tags": ["blue"]}))
        .collect();
    let plain: Vec<Value> = (0..200).map(|_| json!({"command": ["true"]})).collect();
    for batch in [&plain, &tagged] {
        let r = api.admin("POST", "/api/v1/jobs", Some(&json!(batch)))?;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    // Every page newest first, each job once, then next_before null.
    let (mut seen, mut before, mut pages) = (Vec::new(), None::<i64>, 0);
    loop {
        let cursor = before.map(|b| format!("&before={b}")).unwrap_or_default();
        let page = get(&api, &format!("/api/v1/jobs?limit=100{cursor}"))?;
        seen.extend(ids(&page, "jobs"));
        pages += 1;
        match page["next_before"].as_i64() {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(seen.len(), 250, "every job once, in {pages} pages");
    assert_eq!(seen, sorted, "newest first, no repeats");
    let blue = get(&api, "/api/v1/jobs?tag=blue&limit=1000")?;
    assert_eq!(ids(&blue, "jobs").len(), 50);
    assert!(blue["next_before"].is_null());
    let queued_blue = get(&api, "/api/v1/jobs?tag=blue&status=queued&limit=10")?;
    assert_eq!(ids(&queued_blue, "jobs").len(), 10);
    let reason = &queued_blue["jobs"][0]["waiting_reason"];
    assert!(
        reason.is_string(),
        "a queued job says why it waits: {reason}"
    );
    // Creation time: the oldest job's, at or after it is everything,
    // before it nothing.
    let oldest = api.job(*seen.last().ok_or("no jobs")?)?;
    let t = oldest["created_at"].as_str().ok_or("no created_at")?;
    let from = get(&api, &format!("/api/v1/jobs?created_after={t}&limit=1000"))?;
    assert_eq!(ids(&from, "jobs").len(), 250);
    let none = get(&api, &format!("/api/v1/jobs?created_before={t}"))?;
    assert_eq!(ids(&none, "jobs").len(), 0);
    // Run some on one worker: the worker filter finds exactly those.
    let _agent = Agent::start(&coord.url, dir.path(), "only", &["--slots", "8"])?;
    let newest = seen[0];
    finished(&api, newest)?;
    let wid = api.job(newest)?["worker_id"].as_i64().ok_or("no worker")?;
    wait_for("every job to finish", Duration::from_secs(60), || {
        Ok(api.jobs("queued")?.is_empty().then_some(()))
    })?;
    let on_worker = get(&api, &format!("/api/v1/jobs?worker={wid}&limit=1000"))?;
    assert_eq!(ids(&on_worker, "jobs").len(), 250);
    // Events of one job only, of some types only.
    let ev = get(&api, &format!("/api/v1/events?job={newest}"))?;
    let kinds: Vec<&str> = ev["events"]
        .as_array()
        .ok_or("no events")?
        .iter()
        .map(|e| {
            assert_eq!(e["job_id"], newest, "{e}");
            e["kind"].as_str().unwrap_or_default()
        })
        .collect();
    assert!(
        kinds.contains(&"job.submitted") && kinds.contains(&"job.succeeded"),
        "{kinds:?}"
    );
    let ev = get(&api, &format!("/api/v1/events?worker={wid}&type=worker.*"))?;
    let events = ev["events"].as_array().ok_or("no events")?;
    assert!(!events.is_empty());
    assert!(events
        .iter()
        .all(|e| e["worker_id"] == wid
            && e["kind"].as_str().is_some_and(|k| k.starts_with("worker."))));
    let ev = get(&api, "/api/v1/events?type=job.succeeded&limit=7")?;
    let events = ev["events"].as_array().ok_or("no events")?;
    assert_eq!(events.len(), 7);
    assert_eq!(
        ev["last_id"], events[6]["id"],
        "the cursor stops at the last one kept"
    );
    // Bad input: 400 naming the parameter.
    for (path, field) in [
        ("/api/v1/jobs?before=abc", "before"),
        ("/api/v1/jobs?after=-1", "after"),
        ("/api/v1/jobs?created_after=yesterday", "created_after"),
        ("/api/v1/jobs?worker=x", "worker"),
        ("/api/v1/jobs?stauts=queued", "stauts"),
        ("/api/v1/jobs?tag=%zz", "tag"),
        ("/api/v1/events?type=job.%2A%2A%2Ax", "type"),
        ("/api/v1/events?job=0", "job"),
        ("/api/v1/events?wrker=1", "wrker"),
        ("/api/v1/workers?colour=red", "colour"),
    ] {
        let r = api.admin("GET", path, None)?;
        assert!(
            r.status == 400 || r.status == 422,
            "{path}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.field(), field, "{path}: {}", r.text);
    }
    Ok(())
}

/// An agent stopped gracefully makes its worker `stopped` at once (event,
/// health log); it comes back idle when started again. PATCH changes tags,
/// metadata, slots and drain in one call; DELETE forgets a stopped worker
/// (404 after, its token refused, its events kept) and refuses a live
/// one; --forget-offline-after forgets a silent one by itself.
#[test]
fn workers_stop_at_once_and_can_be_patched_and_deleted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(
        dir.path(),
        &[
            "--auto-approve",
            "--lease-ttl",
            "3",
            "--forget-offline-after",
            "4s",
        ],
    )?;
    let api = coord.api();
    let mut agent = Agent::start(&coord.url, dir.path(), "w1", &[])?;
    let id = wait_for("the agent to register", Duration::from_secs(20), || {
        Ok(agent.worker_id().ok())
    })?;
    let path = format!("/api/v1/workers/{id}");
    wait_for("idle", Duration::from_secs(20), || {
        Ok((get(&api, &path)?["state"] == "idle").then_some(()))
    })?;
    // A live worker cannot be deleted.
    let r = api.admin("DELETE", &path, None)?;
    assert_eq!(r.status, 409, "{}", r.text);
    // PATCH: everything at once.
    let body = json!({"tags": ["gpu-a"], "metadata": {"rack": "r7", "owner": "ml"}, "slots": 3, "drain": true});
    let r = api.admin("PATCH", &path, Some(&body))?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["tags"], json!(["gpu-a"]));
    assert_eq!(r.body["metadata"], json!({"rack": "r7", "owner": "ml"}));
    assert_eq!(r.body["slots"], 3);
    assert_eq!(r.body["state"], "draining");
    let r = api.admin("PATCH", &path, Some(&json!({"drain": false})))?;
    assert_eq!(r.body["state"], "idle", "{}", r.text);
    assert_eq!(r.body["metadata"]["rack"], "r7", "untouched parts stay");
    let big = json!({"metadata": {"blob": "x".repeat(5000)}});
    for (body, field) in [
        (big, "metadata"),
        (json!({"slots": 0}), "slots"),
        (json!({"metadata": [1, 2]}), "metadata"),
        (json!({"colour": "red"}), "colour"),
        (json!({"drain": null}), "drain"),
        (json!({}), ""),
    ] {
        let r = api.admin("PATCH", &path, Some(&body))?;
        assert!(
            r.status == 400 || r.status == 422,
            "{body}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.field(), field, "{body}: {}", r.text);
    }
    // Stopped at once, not idle until the TTL.
    let token = agent.token()?;
    let started = std::time::Instant::now();
    agent.terminate();
    agent.wait_exit(Duration::from_secs(20))?;
    let w = get(&api, &path)?;
    assert_eq!(w["state"], "stopped", "{w}");
    println!(
        "stopped {:.1}s after SIGTERM",
        started.elapsed().as_secs_f64()
    );
    assert!(w["health_log"]
        .to_string()
        .contains("its agent stopped gracefully"));
    let ev = get(
        &api,
        &format!("/api/v1/events?worker={id}&type=worker.stopped"),
    )?;
    assert_eq!(ev["events"].as_array().map(Vec::len), Some(1), "{ev}");
    // Started again: back to idle, same worker.
    let mut agent = Agent::start(&coord.url, dir.path(), "w1", &[])?;
    wait_for("idle again", Duration::from_secs(20), || {
        Ok((get(&api, &path)?["state"] == "idle").then_some(()))
    })?;
    assert_eq!(agent.worker_id()?, id);
    agent.terminate();
    agent.wait_exit(Duration::from_secs(20))?;
    // DELETE: gone, token dead, history kept.
    let r = api.admin("DELETE", &path, None)?;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(api.admin("GET", &path, None)?.status, 404);
    assert_eq!(api.admin("DELETE", &path, None)?.status, 404);
    let list = get(&api, "/api/v1/workers")?;
    assert_eq!(list["workers"].as_array().map(Vec::len), Some(0), "{list}");
    let beat = json!({"incarnation": "x"}).to_string();
    let r = api.call(
        "POST",
        "/api/v1/agents/heartbeat",
        Some(&token),
        Some(beat.as_bytes()),
    )?;
    assert_eq!(
        r.status, 401,
        "a forgotten worker's token is dead: {}",
        r.text
    );
    let ev = get(&api, &format!("/api/v1/events?worker={id}"))?;
    let kinds = ev["events"].to_string();
    assert!(
        kinds.contains("worker.registered") && kinds.contains("worker.deleted"),
        "{kinds}"
    );
    // Offline past --forget-offline-after (4 s): forgotten by the sweep.
    let mut gone = Agent::start(&coord.url, dir.path(), "w2", &[])?;
    let id2 = wait_for("w2 to register", Duration::from_secs(20), || {
        Ok(gone.worker_id().ok())
    })?;
    gone.kill9();
    let path2 = format!("/api/v1/workers/{id2}");
    wait_for("w2 offline", Duration::from_secs(20), || {
        Ok((get(&api, &path2)?["state"] == "offline").then_some(()))
    })?;
    wait_for("w2 forgotten", Duration::from_secs(30), || {
        Ok((api.admin("GET", &path2, None)?.status == 404).then_some(()))
    })?;
    Ok(())
}

/// Named tokens and their roles: `read` may only GET (403 on submit),
/// `submit` may submit and cancel its own jobs but not another's nor drain
/// a worker (403, JSON errors); revoked, a token is refused (401); the
/// list shows when each was last used; the tokens themselves are in no
/// log and not in the database (only their SHA-256).
#[test]
fn api_tokens_hold_to_their_roles() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let mut tokens = std::collections::HashMap::new();
    for role in ["read", "submit"] {
        let body = json!({"name": format!("ci-{role}"), "role": role});
        let r = api.admin("POST", "/api/v1/tokens", Some(&body))?;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.body["role"], role);
        tokens.insert(
            role,
            r.body["token"].as_str().ok_or("no token")?.to_string(),
        );
    }
    let as_ = |role: &str, method: &str, path: &str, body: Option<&Value>| {
        let body = body.map(Value::to_string);
        api.call(
            method,
            path,
            Some(&tokens[role]),
            body.as_deref().map(str::as_bytes),
        )
    };
    let job = json!({"command": ["sleep", "30"]});
    // read: GETs only.
    for path in [
        "/api/v1/jobs",
        "/api/v1/workers",
        "/api/v1/stats",
        "/api/v1/events",
    ] {
        assert_eq!(as_("read", "GET", path, None)?.status, 200, "{path}");
    }
    let r = as_("read", "POST", "/api/v1/jobs", Some(&job))?;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "{}", r.text);
    assert!(r.text.contains("role is read"), "{}", r.text);
    assert_eq!(
        as_("read", "GET", "/api/v1/whoami", None)?.body["role"],
        "read"
    );
    // submit: its own jobs, nothing else.
    let r = as_("submit", "POST", "/api/v1/jobs", Some(&job))?;
    assert_eq!(r.status, 201, "{}", r.text);
    let own = r.body["id"].as_i64().ok_or("no id")?;
    let others = api.submit(&json!({"command": ["sleep", "30"], "env": {"API_KEY": "s3cret"}}))?;
    // Env values are for the admin and the submitter only.
    let path = format!("/api/v1/jobs/{others}");
    assert_eq!(
        as_("read", "GET", &path, None)?.body["env"]["API_KEY"],
        "(hidden)"
    );
    let listed = as_("submit", "GET", "/api/v1/jobs", None)?;
    assert!(!listed.text.contains("s3cret"), "{}", listed.text);
    assert_eq!(api.job(others)?["env"]["API_KEY"], "s3cret");
    let r = as_(
        "submit",
        "POST",
        &format!("/api/v1/jobs/{others}/cancel"),
        None,
    )?;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "{}", r.text);
    let r = as_(
        "submit",
        "POST",
        &format!("/api/v1/jobs/{own}/cancel"),
        None,
    )?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["status"], "cancelled");
    let r = as_("submit", "POST", &format!("/api/v1/jobs/{own}/retry"), None)?;
    assert_eq!(r.status, 200, "{}", r.text);
    for (method, path) in [
        ("POST", "/api/v1/workers/1/drain"),
        ("PATCH", "/api/v1/workers/1"),
        ("POST", "/api/v1/tokens"),
        ("GET", "/api/v1/tokens"),
    ] {
        let r = as_("submit", method, path, Some(&json!({"drain": true})))?;
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden"),
            "{method} {path}: {}",
            r.text
        );
    }
    // Listed with their last use; revoked, refused.
    let list = api.admin("GET", "/api/v1/tokens", None)?;
    let listed = list.body["tokens"].as_array().ok_or("no tokens")?;
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|t| t["last_used_at"].is_string() && t.get("token").is_none()),
        "{}",
        list.text
    );
    let read_id = listed[0]["id"].as_i64().ok_or("no id")?;
    let r = api.admin("DELETE", &format!("/api/v1/tokens/{read_id}"), None)?;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(as_("read", "GET", "/api/v1/jobs", None)?.status, 401);
    assert_eq!(
        api.admin("DELETE", &format!("/api/v1/tokens/{read_id}"), None)?
            .status,
        409
    );
    // Bad input.
    for (body, field) in [
        (json!({"name": "x", "role": "root"}), "role"),
        (json!({"name": "bad name", "role": "read"}), "name"),
        (json!({"name": "ci-submit", "role": "read"}), "name"),
    ] {
        let r = api.admin("POST", "/api/v1/tokens", Some(&body))?;
        assert!(
            matches!(r.status, 409 | 422),
            "{body}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.field(), field, "{body}: {}", r.text);
    }
    // The tokens are nowhere at rest.
    let mut at_rest = Vec::new();
    for entry in std::fs::read_dir(dir.path())? {
        let path = entry?.path();
        if path.is_file() {
            at_rest.push((path.clone(), std::fs::read(&path)?));
        }
    }
    for token in tokens.values() {
        for (path, bytes) in &at_rest {
            let found = bytes.windows(token.len()).any(|w| w == token.as_bytes());
            assert!(!found, "a token is in {}", path.display());
        }
    }
    Ok(())
}

/// Milliseconds since the epoch of an RFC 3339 time the coordinator wrote.
fn ms_of(t: &Value) -> TestResult<i64> {
    let t = t.as_str().ok_or("not a time")?;
    let at = humantime::parse_rfc3339(t)?;
    Ok(at.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The agent's own lines reach a follower of its log within a second of
/// being logged (not with the next heartbeat, 10 s apart here), as JSON
/// objects; `level=` keeps the severe ones; a job's progress reaches the
/// API and the events within a second of the job writing it. An error
/// line is a `worker.error` event; telemetry is rate limited per worker.
#[test]
fn agent_lines_and_progress_arrive_within_a_second() -> TestResult {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir()?;
    // Heartbeats every 10 s: what arrives sooner came by telemetry.
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "30"])?;
    let api = coord.api();
    let agent = Agent::start(&coord.url, dir.path(), "talker", &[])?;
    let id = wait_for("the agent", Duration::from_secs(20), || {
        Ok(agent.worker_id().ok())
    })?;
    wait_for("idle", Duration::from_secs(20), || {
        Ok((get(&api, &format!("/api/v1/workers/{id}"))?["state"] == "idle").then_some(()))
    })?;
    let addr = coord.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET /api/v1/workers/{id}/logs?follow=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        super::harness::ADMIN
    )?;
    let mut reader = BufReader::new(s);
    // Let the stream catch up with what is there, then make the agent talk.
    std::thread::sleep(Duration::from_millis(500));
    let marker = "progress-test";
    let script = format!(
        "echo '{{\"progress\": 0.5, \"step\": \"{marker}\"}}' > \"$DROVER_PROGRESS_FILE\"; sleep 4"
    );
    let submitted = now_ms();
    let job = api.submit(&json!({"command": ["sh", "-c", script]}))?;
    // A line about this job: "job started" or the like, with its id.
    let (mut line, mut lag) = (String::new(), None);
    while lag.is_none() {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err("the log stream ended".into());
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let v: Value = serde_json::from_str(data)?;
        for key in ["id", "time", "level", "target", "message"] {
            assert!(v.get(key).is_some(), "{key} missing: {v}");
        }
        if v["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("job_id={job}")))
        {
            lag = Some(now_ms() - ms_of(&v["time"])?);
        }
    }
    let lag = lag.unwrap_or_default();
    // Progress: in the job and in a job.progress event.
    let progress_at = wait_for("the job's progress", Duration::from_secs(8), || {
        let j = api.job(job)?;
        Ok((j["progress"]["step"] == marker).then(now_ms))
    })?;
    let ev = get(&api, &format!("/api/v1/events?job={job}&type=job.progress"))?;
    assert_eq!(ev["events"][0]["data"]["progress"]["step"], marker, "{ev}");
    println!(
        "agent line followed {lag} ms after it was logged; progress visible {} ms after submission (heartbeats 10 s apart)",
        progress_at - submitted
    );
    assert!(
        lag < 3_000,
        "an agent line took {lag} ms: it waited for a heartbeat"
    );
    assert!(
        progress_at - submitted < 4_000,
        "progress took {} ms: it waited for a heartbeat",
        progress_at - submitted
    );
    // level=warn keeps warn and error lines only.
    let r = api.call(
        "GET",
        &format!("/api/v1/workers/{id}/logs?level=warn"),
        Some(super::harness::ADMIN),
        None,
    )?;
    assert_eq!(r.status, 200);
    let r = api.admin(
        "GET",
        &format!("/api/v1/workers/{id}/logs?level=loud"),
        None,
    )?;
    assert_eq!((r.status, r.field()), (400, "level"), "{}", r.text);
    // An error line is an event; a flood is refused.
    let token = agent.token()?;
    let body = json!({"incarnation": "probe", "logs": [
        {"at_ms": now_ms(), "level": "error", "target": "agent::job", "message": "spool full"}
    ]})
    .to_string();
    let post = || {
        api.call(
            "POST",
            "/api/v1/agents/telemetry",
            Some(&token),
            Some(body.as_bytes()),
        )
    };
    assert_eq!(post()?.status, 204);
    let ev = get(
        &api,
        &format!("/api/v1/events?worker={id}&type=worker.error"),
    )?;
    assert_eq!(ev["events"][0]["data"]["message"], "spool full", "{ev}");
    let refused = (0..40)
        .filter_map(|_| post().ok())
        .filter(|r| r.status == 429)
        .count();
    assert!(refused > 0, "40 telemetry posts at once were all taken");
    let bad = json!({"incarnation": "probe", "logs": [{"at_ms": 0, "level": "loud", "target": "x", "message": "y"}]});
    std::thread::sleep(Duration::from_secs(1));
    let r = api.call(
        "POST",
        "/api/v1/agents/telemetry",
        Some(&token),
        Some(bad.to_string().as_bytes()),
    )?;
    assert_eq!((r.status, r.field()), (422, "logs[0].level"), "{}", r.text);
    Ok(())
}
