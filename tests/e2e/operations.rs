//! What an operator does every day: approve, drain, decommission,
//! pre-register; tokens and secrets; events, log follow, metrics.

use crate::harness::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn state(api: &Api, worker: i64) -> TestResult<String> {
    let w = api.admin("GET", &format!("/api/v1/workers/{worker}"), None)?;
    Ok(w.body["state"].as_str().unwrap_or("").to_string())
}

fn wait_status(api: &Api, job: i64, want: &str) -> TestResult<Value> {
    wait_for(
        &format!("job {job} to be {want}"),
        Duration::from_secs(30),
        || {
            let j = api.job(job)?;
            Ok((j["status"] == want).then_some(j))
        },
    )
}

#[test]
fn approval_drain_and_decommission() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--lease-ttl", "3"])?;
    let api = coord.api();
    let mut a = Agent::start(&coord.url, dir.path(), "a", &["--slots", "2"])?;
    let wa = wait_for("a to register", Duration::from_secs(20), || {
        Ok(a.worker_id().ok())
    })?;
    assert_eq!(state(&api, wa)?, "pending");

    // Pending: the job waits, and says why.
    let job = api.submit(&json!({"command": ["true"]}))?;
    std::thread::sleep(Duration::from_millis(500));
    let j = api.job(job)?;
    assert_eq!(j["status"], "queued");
    assert!(
        j["waiting_reason"]
            .as_str()
            .unwrap_or("")
            .contains("a is pending"),
        "{j}"
    );
    let r = api.admin("POST", &format!("/api/v1/workers/{wa}/approve"), None)?;
    assert_eq!(r.status, 200, "{}", r.text);
    wait_status(&api, job, "succeeded")?;

    // Drain: running jobs finish, nothing new starts; it says when it is empty.
    let long = api.submit(&json!({"command": ["sleep", "60"]}))?;
    wait_status(&api, long, "running")?;
    let r = api.admin(
        "POST",
        &format!("/api/v1/workers/{wa}/drain"),
        Some(&json!({"reason": "kernel update"})),
    )?;
    assert_eq!(r.body["state"], "draining", "{}", r.text);
    let waiting = api.submit(&json!({"command": ["true"]}))?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        api.job(waiting)?["status"],
        "queued",
        "a draining worker takes nothing new"
    );
    api.admin("POST", &format!("/api/v1/jobs/{long}/cancel"), None)?;
    wait_status(&api, long, "cancelled")?;
    let events = api.admin("GET", "/api/v1/events?after=0&limit=1000", None)?;
    let drained = events.body["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .any(|e| e["kind"] == "worker.drained" && e["worker_id"] == wa)
        })
        .unwrap_or(false);
    assert!(drained, "a worker.drained event once empty");
    let w = api.admin("GET", &format!("/api/v1/workers/{wa}"), None)?;
    let log = w.body["health_log"].to_string();
    assert!(log.contains("drained by admin: kernel update"), "{log}");
    api.admin("POST", &format!("/api/v1/workers/{wa}/undrain"), None)?;
    wait_status(&api, waiting, "succeeded")?;

    // Decommission mid-job: the job goes elsewhere without spending an
    // attempt, the token is revoked, the machine may not register again.
    let b = Agent::start(&coord.url, dir.path(), "b", &[])?;
    let wb = wait_for("b to register", Duration::from_secs(20), || {
        Ok(b.worker_id().ok())
    })?;
    api.admin("POST", &format!("/api/v1/workers/{wb}/approve"), None)?;
    api.admin("POST", &format!("/api/v1/workers/{wb}/drain"), None)?;
    let pid_file = dir.path().join("moved.pid");
    let script = format!(
        "[ \"$DROVER_ATTEMPT\" != 1 ] || {{ echo $$ > {}; exec sleep 60; }}",
        pid_file.display()
    );
    let moved = api.submit(&json!({"command": ["sh", "-c", script], "max_attempts": 1}))?;
    let j = wait_status(&api, moved, "running")?;
    assert_eq!(j["worker_id"], wa);
    let pid: i32 = wait_for("the job's pid", Duration::from_secs(10), || {
        Ok(std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok()))
    })?;
    let token = a.token()?;
    api.admin("POST", &format!("/api/v1/workers/{wb}/undrain"), None)?;
    let r = api.admin("POST", &format!("/api/v1/workers/{wa}/decommission"), None)?;
    assert_eq!(r.body["state"], "decommissioned", "{}", r.text);
    // The agent hears it on its parked claim and kills the job at once.
    let decommissioned = std::time::Instant::now();
    wait_for(
        "the decommissioned agent's job to die",
        Duration::from_secs(3),
        || Ok((!alive(pid)).then_some(())),
    )?;
    println!(
        "decommission -> job process gone: {:.2} s",
        decommissioned.elapsed().as_secs_f64()
    );
    let j = wait_status(&api, moved, "succeeded")?;
    assert_eq!(j["worker_id"], wb);
    assert_eq!(j["attempts"][0]["outcome"], "decommissioned");
    let hb = json!({"incarnation": "x"}).to_string();
    let r = api.call(
        "POST",
        "/api/v1/agents/heartbeat",
        Some(&token),
        Some(hb.as_bytes()),
    )?;
    assert_eq!(r.status, 401, "the decommissioned agent's token is revoked");
    let status = a.wait_exit(Duration::from_secs(20))?;
    assert_eq!(
        status.code(),
        Some(4),
        "the decommissioned agent stops for good"
    );
    let log = std::fs::read_to_string(dir.path().join("agent-a.log"))?;
    assert!(
        log.contains("decommissioned by an admin") && !log.contains("secret is wrong"),
        "the agent says why it stops: {log}"
    );
    let again = Agent::start(&coord.url, dir.path(), "a", &[])?;
    let mut again = again;
    let status = again.wait_exit(Duration::from_secs(20))?;
    assert_eq!(
        status.code(),
        Some(4),
        "registering again is refused for good"
    );
    assert_eq!(state(&api, wa)?, "decommissioned");
    Ok(())
}

#[test]
fn pre_registered_worker_runs_with_its_token() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    let r = api.admin(
        "POST",
        "/api/v1/workers",
        Some(&json!({"name": "pre", "tags": ["gpu-room-2"]})),
    )?;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.body["state"], "idle",
        "pre-registered workers are approved"
    );
    let token = r.body["token"].as_str().ok_or("no token")?.to_string();
    let id = r.body["id"].as_i64().ok_or("no id")?;
    // The agent has no secret, only the token.
    let state_dir = dir.path().join("agent-pre");
    let log = std::fs::File::create(dir.path().join("agent-pre.log"))?;
    let mut child = std::process::Command::new(agent_bin())
        .args([
            "--coordinator",
            &coord.url,
            "--token",
            &token,
            "--name",
            "pre",
            "--tags",
            "ignored",
        ])
        .arg("--state-dir")
        .arg(&state_dir)
        .env("RUST_LOG", "info")
        .stderr(log)
        .spawn()?;
    let job = api.submit(&json!({"command": ["true"], "required_tags": ["gpu-room-2"]}))?;
    let j = wait_status(&api, job, "succeeded");
    if j.is_err() {
        eprintln!(
            "{}",
            std::fs::read_to_string(dir.path().join("agent-pre.log"))?
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(j?["worker_id"], id);
    let w = api.admin("GET", &format!("/api/v1/workers/{id}"), None)?;
    assert!(
        w.body["cpu_cores"].as_i64().unwrap_or(0) > 0,
        "the agent filled in its inventory: {}",
        w.text
    );
    assert_eq!(
        w.body["tags"],
        json!(["gpu-room-2"]),
        "the admin's tags win over --tags"
    );
    Ok(())
}

#[test]
fn admin_routes_refuse_every_other_credential_and_secrets_stay_secret() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let agent = Agent::start(&coord.url, dir.path(), "s", &[])?;
    wait_for("the agent to register", Duration::from_secs(20), || {
        Ok(agent.worker_id().ok())
    })?;
    let agent_token = agent.token()?;
    let id = api.submit(&json!({"command": ["echo", "hello"]}))?;
    wait_status(&api, id, "succeeded")?;
    let routes = [
        ("POST", "/api/v1/jobs".to_string()),
        ("GET", "/api/v1/jobs".to_string()),
        ("GET", format!("/api/v1/jobs/{id}")),
        ("POST", format!("/api/v1/jobs/{id}/cancel")),
        ("POST", format!("/api/v1/jobs/{id}/retry")),
        ("GET", format!("/api/v1/jobs/{id}/logs")),
        ("GET", "/api/v1/workers".to_string()),
        ("POST", "/api/v1/workers".to_string()),
        ("GET", "/api/v1/workers/1".to_string()),
        ("POST", "/api/v1/workers/1/approve".to_string()),
        ("POST", "/api/v1/workers/1/reject".to_string()),
        ("POST", "/api/v1/workers/1/drain".to_string()),
        ("POST", "/api/v1/workers/1/undrain".to_string()),
        ("POST", "/api/v1/workers/1/decommission".to_string()),
        ("PUT", "/api/v1/workers/1/tags".to_string()),
        ("GET", "/api/v1/stats".to_string()),
        ("GET", "/api/v1/events".to_string()),
    ];
    for (method, path) in &routes {
        for token in [
            None,
            Some("wrong-token-123456"),
            Some(SECRET),
            Some(agent_token.as_str()),
        ] {
            let r = api.call(method, path, token, Some(b"{}"))?;
            assert_eq!(
                r.status,
                401,
                "{method} {path} with {:?}: {}",
                token.map(|t| &t[..4]),
                r.text
            );
        }
    }
    // Nothing changed: the worker is still idle and the job still succeeded.
    assert_eq!(api.job(id)?["status"], "succeeded");

    // The secrets are nowhere on disk in the clear but where they belong.
    drop(agent);
    let mut files = vec![coord.db_path(), dir.path().join("drover.db-wal")];
    files.extend(
        std::fs::read_dir(dir.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log")),
    );
    for f in &files {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        for secret in [ADMIN, SECRET, agent_token.as_str()] {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "{} holds a secret", f.display());
        }
    }
    Ok(())
}

#[test]
fn bad_registrations_are_rate_limited() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    let body = json!({"name": "x", "machine_id": "m", "inventory": {"hostname": "h"}}).to_string();
    let mut statuses = Vec::new();
    for _ in 0..60 {
        let r = api.call(
            "POST",
            "/api/v1/agents/register",
            Some("not-the-secret"),
            Some(body.as_bytes()),
        )?;
        statuses.push(r.status);
    }
    let limited = statuses.iter().filter(|s| **s == 429).count();
    println!(
        "60 bad registrations: {} x 401, {limited} x 429",
        statuses.iter().filter(|s| **s == 401).count()
    );
    assert_eq!(&statuses[..5], &[401; 5], "the first tries are answered");
    assert_eq!(statuses[59], 429);
    // Limited even with the right secret, with a Retry-After.
    let r = api.call(
        "POST",
        "/api/v1/agents/register",
        Some(SECRET),
        Some(body.as_bytes()),
    )?;
    assert_eq!(r.status, 429);
    assert_eq!(r.code(), "rate_limited");
    assert!(api.healthy());
    Ok(())
}

#[test]
fn events_in_order_resume_sse_log_follow_and_metrics() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let _agent = Agent::start(&coord.url, dir.path(), "e", &[])?;
    let first = api.submit(&json!({"command": ["true"]}))?;
    wait_status(&api, first, "succeeded")?;
    let all = api.admin("GET", "/api/v1/events?after=0", None)?;
    let events = all.body["events"].as_array().cloned().unwrap_or_default();
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["id"].as_i64().unwrap_or(0))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ordered: {ids:?}");
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e["job_id"] == first)
        .map(|e| e["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["job.submitted", "job.claimed", "job.succeeded"]);
    let last = all.body["last_id"].as_i64().ok_or("no last_id")?;

    // Long-poll resumes after the last id and returns as soon as there is news.
    let url = coord.url.clone();
    let poll = std::thread::spawn(move || {
        Api::new(&url)
            .admin("GET", &format!("/api/v1/events?after={last}&wait=20"), None)
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(300));
    let second = api.submit(
        &json!({"command": ["sh", "-c", "for i in 1 2 3 4; do echo line $i; sleep 0.4; done"]}),
    )?;
    let r = poll.join().map_err(|_| "poll thread")??;
    let got = r.body["events"].as_array().cloned().unwrap_or_default();
    assert!(!got.is_empty(), "{}", r.text);
    assert!(got.iter().all(|e| e["id"].as_i64().unwrap_or(0) > last));
    assert_eq!(got[0]["kind"], "job.submitted");
    assert_eq!(got[0]["job_id"], second);

    // Log follow streams the output as it comes, and ends with the job.
    wait_status(&api, second, "running")?;
    let follow = api.admin("GET", &format!("/api/v1/jobs/{second}/logs?follow=1"), None)?;
    assert_eq!(follow.text, "line 1\nline 2\nline 3\nline 4\n");
    assert_eq!(api.job(second)?["status"], "succeeded");

    // Server-sent events, resumable with Last-Event-ID.
    let addr = coord.url.trim_start_matches("http://");
    let sse = |resume: i64| -> TestResult<Vec<(i64, String)>> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nAccept: text/event-stream\r\nLast-Event-ID: {resume}\r\n\r\n"
        )?;
        let mut reader = BufReader::new(s);
        let mut out = Vec::new();
        let mut id = 0;
        let mut line = String::new();
        while out.len() < 3 {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.trim().parse()?;
            } else if let Some(v) = line.strip_prefix("event: ") {
                out.push((id, v.trim().to_string()));
            }
        }
        Ok(out)
    };
    let head = sse(0)?;
    assert_eq!(
        head.iter().map(|e| e.0).collect::<Vec<_>>(),
        ids[..3].to_vec()
    );
    let resumed = sse(head[1].0)?;
    assert_eq!(resumed[0].0, head[2].0, "resumes right after Last-Event-ID");

    // Stats: the queue wait of the last hour.
    let stats = api.admin("GET", "/api/v1/stats", None)?;
    assert_eq!(
        stats.body["queue_wait_s_last_hour"]["dispatched"], 2,
        "{}",
        stats.text
    );
    assert!(stats.body["queue_wait_s_last_hour"]["p95"]
        .as_f64()
        .is_some());

    // The agent's own log lines, read from the coordinator.
    let w = api.admin("GET", "/api/v1/workers", None)?;
    let wid = w.body["workers"][0]["id"].as_i64().ok_or("no worker")?;
    let lines = wait_for("the agent's log lines", Duration::from_secs(20), || {
        let r = api.admin("GET", &format!("/api/v1/workers/{wid}/logs"), None)?;
        Ok(r.text.contains("job ended").then_some(r.text))
    })?;
    assert!(
        lines.contains("INFO agent: agent running worker_id="),
        "{lines}"
    );

    // /metrics is Prometheus text.
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split("\r\n\r\n").nth(1).ok_or("no body")?;
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err("unexpected chunked /metrics".into());
    } else {
        body
    };
    for line in body.lines().filter(|l| !l.is_empty()) {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').ok_or(format!("bad line {line:?}"))?;
        value
            .parse::<f64>()
            .map_err(|_| format!("bad value in {line:?}"))?;
        let metric = name.split('{').next().unwrap_or("");
        assert!(
            !metric.is_empty()
                && metric
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line:?}"
        );
        if name.contains('{') {
            assert!(name.ends_with('}'), "bad labels in {line:?}");
        }
    }
    for want in [
        "drover_workers{state=\"idle\"}",
        "drover_jobs{status=\"succeeded\"} 2",
        "drover_jobs_dispatched_total 2",
        "drover_http_requests_total{route=\"POST /api/v1/jobs\",code=\"201\"} 2",
        "drover_dispatch_round_seconds_count",
        "drover_queue_wait_seconds_bucket{le=\"+Inf\"} 2",
        "drover_sqlite_write_seconds_count",
        "drover_sqlite_wal_bytes",
    ] {
        assert!(body.contains(want), "/metrics lacks {want}:\n{body}");
    }
    Ok(())
}

/// S1: every route x every kind of credential, against the checked-in
/// table `tests/e2e/fixtures/auth_matrix.txt` (`DROVER_S1_PRINT=1` prints
/// the observed table). Every refusal changes nothing in the database.
#[test]
fn the_auth_matrix_matches_the_checked_in_table() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    let approve = |id: i64| api.admin("POST", &format!("/api/v1/workers/{id}/approve"), None);
    let a = FakeAgent::register(&api, "s1-a")?;
    let b = FakeAgent::register(&api, "s1-b")?;
    let p = FakeAgent::register(&api, "s1-pending")?;
    let d = FakeAgent::register(&api, "s1-decommissioned")?;
    let id_of = |name: &str| -> TestResult<i64> {
        let list = api.admin("GET", "/api/v1/workers", None)?;
        list.body["workers"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["name"] == name))
            .and_then(|w| w["id"].as_i64())
            .ok_or_else(|| format!("no worker {name}: {}", list.text).into())
    };
    for name in ["s1-a", "s1-b", "s1-decommissioned"] {
        assert_eq!(approve(id_of(name)?)?.status, 200);
    }
    let r = api.admin(
        "POST",
        &format!(
            "/api/v1/workers/{}/decommission",
            id_of("s1-decommissioned")?
        ),
        None,
    )?;
    assert_eq!(r.status, 200, "{}", r.text);
    // A holds the lease of job JA (attempt 1); JX waits in the queue for
    // the admin's actions; W is a spare worker for them.
    let ja = api.submit(&json!({"command": ["true"]}))?;
    assert_eq!(a.claim(&api, 5)?.body["jobs"][0]["job_id"], ja);
    let jx = api.submit(&json!({"command": ["true"], "required_tags": ["nowhere"]}))?;
    let w = api.admin(
        "POST",
        "/api/v1/workers",
        Some(&json!({"name": "s1-spare"})),
    )?;
    let w = w.body["id"]
        .as_i64()
        .ok_or(format!("preregister: {}", w.text))?;

    let named = |role: &str| -> TestResult<String> {
        let body = json!({"name": format!("s1-{role}-token"), "role": role});
        let r = api.admin("POST", "/api/v1/tokens", Some(&body))?;
        Ok(r.body["token"]
            .as_str()
            .ok_or(format!("token: {}", r.text))?
            .to_string())
    };
    let (read, submit) = (named("read")?, named("submit")?);
    let creds: [(&str, Option<&str>); 10] = [
        ("none", None),
        ("garbage", Some("drv_agent_not-a-real-token-0000")),
        ("secret", Some(SECRET)),
        ("agentA", Some(&a.token)),
        ("agentB", Some(&b.token)),
        ("pending", Some(&p.token)),
        ("decom", Some(&d.token)),
        ("read", Some(&read)),
        ("submit", Some(&submit)),
        ("admin", Some(ADMIN)),
    ];
    // The body each credential sends: an agent its own incarnation.
    let inc = |cred: &str| match cred {
        "agentB" => b.incarnation.clone(),
        "pending" => p.incarnation.clone(),
        "decom" => d.incarnation.clone(),
        _ => a.incarnation.clone(),
    };
    let expected = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/e2e/fixtures/auth_matrix.txt"),
    )?;
    let digest = || -> TestResult<String> {
        let c = rusqlite::Connection::open_with_flags(
            coord.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        let q = |sql: &str| -> TestResult<String> {
            Ok(c.query_row(sql, [], |r| r.get::<_, Option<String>>(0))?
                .unwrap_or_default())
        };
        Ok([
            q("SELECT group_concat(id || status || attempt || ifnull(worker_id, '') || cancel_requested || required_tags) FROM jobs")?,
            q("SELECT group_concat(id || state || token_hash || tags || ifnull(incarnation, '') || drain) FROM workers")?,
            q("SELECT count(*) || '/' || (SELECT count(*) FROM job_logs) || '/' || (SELECT count(*) FROM events) FROM job_attempts")?,
        ]
        .join("|"))
    };
    let mut observed = Vec::new();
    let mut changed = Vec::new();
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let route: Vec<&str> = line.split_whitespace().take(2).collect();
        let (method, template) = (route[0], route[1]);
        let path = template
            .replace("{JA}", &ja.to_string())
            .replace("{JX}", &jx.to_string())
            .replace("{W}", &w.to_string());
        let mut row = format!("{method:<6} {template:<40}");
        for (cred, token) in creds {
            let body = match template {
                "/api/v1/agents/heartbeat"
                | "/api/v1/agents/claim?wait=0"
                | "/api/v1/agents/telemetry" => {
                    json!({"incarnation": inc(cred)})
                }
                "/api/v1/jobs" => json!({"command": ["true"], "required_tags": ["nowhere"]}),
                "/api/v1/jobs/{JA}/complete" => {
                    json!({"attempt": 1, "outcome": "succeeded", "exit_code": 0})
                }
                "/api/v1/workers" => json!({"name": format!("s1-{cred}")}),
                "/api/v1/workers/{W}/tags" => json!({"tags": ["s1"]}),
                "/api/v1/workers/{W}" => json!({"drain": false}),
                "/api/v1/tokens" => json!({"name": format!("s1-by-{cred}"), "role": "read"}),
                "/api/v1/agents/register" => {
                    json!({"name": format!("s1-reg-{cred}"), "machine_id": format!("s1-{cred}"), "inventory": {"hostname": "s1"}})
                }
                _ => json!({}),
            };
            let bytes = (method != "GET").then(|| body.to_string().into_bytes());
            let before = digest()?;
            let r = api.call(method, &path, token, bytes.as_deref())?;
            if r.status >= 400 && digest()? != before {
                changed.push(format!("{method} {template} as {cred}: {}", r.status));
            }
            row.push_str(&format!(" {:>7}", r.status));
        }
        observed.push(row);
    }
    let header = format!(
        "# {:<45} {}",
        "route",
        creds
            .iter()
            .map(|(c, _)| format!("{c:>7}"))
            .collect::<String>()
    );
    let table = format!("{header}\n{}\n", observed.join("\n"));
    if std::env::var_os("DROVER_S1_PRINT").is_some() {
        println!("{table}");
    }
    let want: Vec<String> = expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let got: Vec<String> = observed
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let mismatches: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("  want {w}\n  got  {g}"))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} rows differ from the checked-in table:\n{}\nobserved:\n{table}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert!(
        changed.is_empty(),
        "refusals that changed the database: {changed:?}"
    );
    Ok(())
}

/// Retention keeps up with a busy fleet: finished jobs and events past
/// --retention-days go a batch at a time, one batch every 100 ms while there
/// is more (a batch a second once caught up). 4,000 jobs and 20,000 events
/// written long ago (straight into the database, as an old history would
/// be) are gone in seconds, newer ones kept; at a batch a second this took
/// 20 s.
#[test]
fn retention_catches_up_with_a_long_history() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--retention-days", "1"])?;
    let api = coord.api();
    let keep = api.submit(&json!({"command": ["true"]}))?;
    {
        let mut db = rusqlite::Connection::open(coord.db_path())?;
        db.busy_timeout(Duration::from_secs(10))?;
        let tx = db.transaction()?;
        for _ in 0..4000 {
            tx.execute(
                "INSERT INTO jobs (status, command, spec_sha256, run_after, created_at, finished_at)
                 VALUES ('succeeded', '[\"true\"]', 'x', 0, 0, 1000)",
                [],
            )?;
        }
        for _ in 0..20_000 {
            tx.execute("INSERT INTO events (at, kind) VALUES (1000, 'old')", [])?;
        }
        tx.commit()?;
    }
    let t0 = std::time::Instant::now();
    let count = |sql: &str| -> TestResult<i64> {
        let db = rusqlite::Connection::open(coord.db_path())?;
        Ok(db.query_row(sql, [], |r| r.get(0))?)
    };
    wait_for("the old history to go", Duration::from_secs(10), || {
        let left = count("SELECT count(*) FROM jobs WHERE finished_at = 1000")?
            + count("SELECT count(*) FROM events WHERE kind = 'old'")?;
        Ok((left == 0).then_some(()))
    })?;
    println!(
        "4,000 old jobs and 20,000 old events pruned in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(api.job(keep)?["id"], keep, "a recent job is kept");
    assert!(count("SELECT count(*) FROM events WHERE job_id IS NOT NULL")? > 0);
    Ok(())
}

/// One raw HTTP/1.1 request (custom method and headers); the answer's
/// status line and headers, lowercased.
fn raw_head(port: u16, request: &str) -> TestResult<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut head = String::new();
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    Ok(head)
}

/// CORS: only the origins `--cors-origin` names may call the API from a
/// browser; their preflights are answered, other origins get nothing.
#[test]
fn cors_answers_only_the_origins_named() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--cors-origin", "https://dash.example.com"])?;
    let preflight = |origin: &str| {
        raw_head(
            coord.port,
            &format!(
                "OPTIONS /api/v1/jobs HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\n\
                 Access-Control-Request-Headers: authorization, content-type\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    let ok = preflight("https://dash.example.com")?;
    assert!(ok.starts_with("http/1.1 204"), "{ok}");
    assert!(
        ok.contains("access-control-allow-origin: https://dash.example.com"),
        "{ok}"
    );
    assert!(
        ok.contains("access-control-allow-headers: authorization, content-type"),
        "{ok}"
    );
    let other = preflight("https://evil.example.com")?;
    assert!(!other.contains("access-control-allow-origin"), "{other}");
    let get = |origin: &str| {
        raw_head(
            coord.port,
            &format!(
                "GET /api/v1/stats HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\
                 Authorization: Bearer {ADMIN}\r\nConnection: close\r\n\r\n"
            ),
        )
    };
    let read = get("https://dash.example.com")?;
    assert!(read.starts_with("http/1.1 200"), "{read}");
    assert!(
        read.contains("access-control-allow-origin: https://dash.example.com"),
        "{read}"
    );
    assert!(read.contains("vary: origin"), "{read}");
    assert!(!get("https://evil.example.com")?.contains("access-control-allow-origin"));
    // A path or a wildcard is not an origin.
    let out = std::process::Command::new(coordinator_bin())
        .args(["--registration-secret", SECRET, "--cors-origin", "*"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not an origin"),
        "{err}"
    );
    Ok(())
}

/// `GET /api/v1/workers` filters by state and tag, and says which jobs each
/// worker runs; a state that does not exist is a 400 naming it.
#[test]
fn worker_lists_filter_and_show_running_jobs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let a = FakeAgent::register(&api, "a")?;
    FakeAgent::register(&api, "b")?;
    let names = |query: &str| -> TestResult<Vec<String>> {
        let r = api.admin("GET", &format!("/api/v1/workers{query}"), None)?;
        assert_eq!(r.status, 200, "{}", r.text);
        Ok(r.body["workers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|w| w["name"].as_str().map(str::to_string))
            .collect())
    };
    let a_id = api.admin("GET", "/api/v1/workers", None)?.body["workers"][0]["id"]
        .as_i64()
        .ok_or("no id")?;
    let r = api.admin(
        "PUT",
        &format!("/api/v1/workers/{a_id}/tags"),
        Some(&json!({"tags": ["gpu"]})),
    )?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(names("?tag=gpu")?, vec!["a"]);
    assert_eq!(names("?state=idle")?.len(), 2);
    assert!(names("?state=offline")?.is_empty());
    let id = api.submit(&json!({"command": ["true"], "required_tags": ["gpu"]}))?;
    let claimed = a.claim(&api, 5)?;
    assert_eq!(claimed.body["jobs"][0]["job_id"], id, "{}", claimed.text);
    assert_eq!(names("?state=busy")?, vec!["a"]);
    let w = api.admin("GET", "/api/v1/workers?state=busy", None)?;
    assert_eq!(
        w.body["workers"][0]["running_job_ids"],
        json!([id]),
        "{}",
        w.text
    );
    let bad = api.admin("GET", "/api/v1/workers?state=asleep", None)?;
    assert_eq!(bad.status, 400, "{}", bad.text);
    assert_eq!(bad.field(), "state", "{}", bad.text);
    Ok(())
}
