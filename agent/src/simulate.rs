//! `drover-agent simulate --agents N`: N virtual agents in one process,
//! speaking the real protocol (register, heartbeat on schedule, parked
//! claims, complete), so one machine stands in for a large fleet. Each
//! virtual agent holds one keep-alive connection for its claims, which carry
//! its heartbeats (as the real agent's do) and the reports of its no-op jobs
//! (one round trip per batch); the reports of sleeping jobs, which run side
//! by side, use a second one. A tiny HTTP/1.1 client on tokio (plain http
//! only) keeps thousands of parked claims at a few KB each. Runs for `--duration` and
//! stops by itself, printing figures (and a JSON summary line at the end).

use crate::config::{Args, JobMode};
use drover_proto::{
    ClaimResponse, CompleteRequest, Completion, HeartbeatResponse, LeaseRef, Outcome,
    RegisterResponse,
};
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One keep-alive HTTP/1.1 connection.
struct Http {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(addr: &str) -> Http {
        Http {
            addr: addr.to_string(),
            conn: None,
        }
    }

    async fn post(
        &mut self,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, Vec<u8>), String> {
        let r = self.try_post(path, token, body).await;
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn try_post(
        &mut self,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, Vec<u8>), String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = s.set_nodelay(true);
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let body = body.to_string();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let stream = conn.get_mut();
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(body.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        conn.read_line(&mut line).await.map_err(|e| e.to_string())?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let (mut length, mut close) = (0usize, false);
        loop {
            line.clear();
            if conn.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
                return Err("connection closed".into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().map_err(|_| "bad content-length")?;
            } else if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut data = vec![0u8; length];
        conn.read_exact(&mut data)
            .await
            .map_err(|e| e.to_string())?;
        if close {
            self.conn = None;
        }
        Ok((status, data))
    }
}

#[derive(Default)]
struct Stats {
    registered: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    /// (seconds since the start, latency ms) of every heartbeat.
    heartbeat_ms: Mutex<Vec<(f64, f64)>>,
}

/// Heartbeats in the first seconds meet the registration storm; the summary
/// also gives the figures after it.
const WARM_UP_S: f64 = 30.0;

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs the virtual fleet until `duration` has passed.
pub async fn run(
    args: Args,
    agents: usize,
    mode: JobMode,
    duration: Duration,
) -> Result<(), String> {
    let addr = args
        .coordinator
        .strip_prefix("http://")
        .ok_or("simulate speaks plain http:// only")?
        .trim_end_matches('/')
        .to_string();
    let secret = args
        .registration_secret
        .clone()
        .ok_or("simulate needs --registration-secret")?;
    let gpus = match &args.fake_gpus {
        Some(spec) => crate::inventory::parse_fake_gpus(spec)?,
        None => Vec::new(),
    };
    let run_id = format!("{:08x}", crate::random_u64() as u32);
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(agents);
    for i in 0..agents {
        let (addr, secret, stats, gpus, args, run_id) = (
            addr.clone(),
            secret.clone(),
            stats.clone(),
            gpus.clone(),
            args.clone(),
            run_id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Spread the registrations over the first seconds, as a real fleet.
            tokio::time::sleep(Duration::from_millis(crate::random_below(2000))).await;
            if let Err(e) = agent(
                i,
                &addr,
                &secret,
                &run_id,
                gpus,
                &args,
                mode,
                (started, deadline),
                stats.clone(),
            )
            .await
            {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                log::debug!("virtual agent {i}: {e}");
            }
        }));
    }
    let mut last = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(
            Duration::from_secs(10).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
        let done = stats.completed.load(Ordering::Relaxed);
        let mut hb: Vec<f64> = stats
            .heartbeat_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, ms)| *ms)
            .collect();
        log::info!(
            "simulate t={:.0}s agents={} jobs_done={done} (+{}) heartbeat p50={:.1}ms p99={:.1}ms errors={}",
            started.elapsed().as_secs_f64(),
            stats.registered.load(Ordering::Relaxed),
            done - last,
            pct(&mut hb, 0.5),
            pct(&mut hb, 0.99),
            stats.errors.load(Ordering::Relaxed)
        );
        last = done;
    }
    for t in tasks {
        t.abort();
    }
    let samples = stats
        .heartbeat_ms
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut hb: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
    let mut steady: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= WARM_UP_S)
        .map(|(_, ms)| *ms)
        .collect();
    let summary = json!({
        "agents": stats.registered.load(Ordering::Relaxed),
        "jobs_completed": stats.completed.load(Ordering::Relaxed),
        "errors": stats.errors.load(Ordering::Relaxed),
        "heartbeats": hb.len(),
        "heartbeat_p50_ms": pct(&mut hb, 0.5),
        "heartbeat_p99_ms": pct(&mut hb, 0.99),
        "heartbeat_max_ms": hb.last().copied().unwrap_or(0.0),
        "steady_heartbeats": steady.len(),
        "steady_heartbeat_p50_ms": pct(&mut steady, 0.5),
        "steady_heartbeat_p99_ms": pct(&mut steady, 0.99),
        "steady_heartbeat_max_ms": steady.last().copied().unwrap_or(0.0),
        "seconds": started.elapsed().as_secs_f64(),
    });
    say!("{summary}");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn agent(
    i: usize,
    addr: &str,
    secret: &str,
    run_id: &str,
    gpus: Vec<drover_proto::GpuInfo>,
    args: &Args,
    mode: JobMode,
    (started, deadline): (Instant, Instant),
    stats: Arc<Stats>,
) -> Result<(), String> {
    let mut http = Http::new(addr);
    let register = json!({
        "name": format!("sim-{i}"), "machine_id": format!("sim-{run_id}"),
        "inventory": {"hostname": format!("sim-{i}"), "cpu_cores": 8, "memory_mb": 65536, "gpus": gpus},
        "tags": args.tags, "slots": args.slots, "agent_version": "simulate",
    });
    let (status, body) = http
        .post("/api/v1/agents/register", secret, &register)
        .await?;
    if status != 200 {
        return Err(format!(
            "register: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let reg: RegisterResponse = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    stats.registered.fetch_add(1, Ordering::Relaxed);
    let token = reg.token;
    let incarnation = format!("sim-{run_id}-{i}");
    let leases: Arc<Mutex<HashSet<LeaseRef>>> = Arc::default();

    // The first heartbeat introduces the process; the later ones ride on
    // claims, as the real agent's do.
    let first = beat(&mut http, &token, &incarnation, &leases).await?;
    let mut interval = Duration::from_secs(first.heartbeat_interval_s.max(1));
    let mut due = jittered(interval);
    // Sleeping jobs report on their own connection as they end; no-op jobs
    // are reported with the next claim (one round trip per batch).
    let (ended, mut reports) = tokio::sync::mpsc::unbounded_channel::<Completion>();
    let reporter = {
        let (addr, token, leases, stats) = (
            addr.to_string(),
            token.clone(),
            leases.clone(),
            stats.clone(),
        );
        tokio::spawn(async move {
            let mut http = Http::new(&addr);
            while let Some(done) = reports.recv().await {
                let body = serde_json::to_value(&done.report).unwrap_or_default();
                let path = format!("/api/v1/jobs/{}/complete", done.job_id);
                match http.post(&path, &token, &body).await {
                    Ok((200, _)) => stats.completed.fetch_add(1, Ordering::Relaxed),
                    _ => stats.errors.fetch_add(1, Ordering::Relaxed),
                };
                leases
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&LeaseRef {
                        job_id: done.job_id,
                        attempt: done.report.attempt,
                    });
            }
        })
    };
    let mut done: Vec<Completion> = Vec::new();
    while Instant::now() < deadline {
        let carry = due.saturating_duration_since(Instant::now()) <= Duration::from_secs(1);
        let mut body = json!({"incarnation": incarnation, "completed": done});
        if carry {
            body["beat"] = json!({"incarnation": incarnation, "leases": held(&leases)});
            due = jittered(interval);
        }
        let wait = due
            .saturating_duration_since(Instant::now())
            .as_secs()
            .clamp(1, 30);
        let sent_ms = crate::now_ms();
        let (status, body) = match http
            .post(&format!("/api/v1/agents/claim?wait={wait}"), &token, &body)
            .await
        {
            Ok(r) => r,
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if carry {
                    due = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if status == 204 {
            continue;
        }
        if status != 200 {
            // Refused (its reports, if any, are sent again: a replay; its
            // heartbeat, if any, goes with the next claim).
            stats.errors.fetch_add(1, Ordering::Relaxed);
            if carry {
                due = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let resp: ClaimResponse = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        if let Some(answer) = &resp.beat {
            // Recorded when the claim arrived (the coordinator's clock in the
            // answer; the same machine's clock as ours, 1 ms resolution).
            interval = Duration::from_secs(answer.heartbeat_interval_s.max(1));
            let ms = (answer.now_ms - sent_ms).max(0) as f64;
            let at = started.elapsed().as_secs_f64();
            stats
                .heartbeat_ms
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, ms));
        }
        {
            let mut held = leases.lock().unwrap_or_else(|e| e.into_inner());
            for r in &resp.completed {
                let counter = if r.error.is_none() {
                    &stats.completed
                } else {
                    &stats.errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
                held.remove(&LeaseRef {
                    job_id: r.job_id,
                    attempt: r.attempt,
                });
            }
            held.extend(resp.jobs.iter().map(|j| LeaseRef {
                job_id: j.job_id,
                attempt: j.attempt,
            }));
        }
        done.clear();
        for job in resp.jobs {
            let report = Completion {
                job_id: job.job_id,
                report: CompleteRequest {
                    attempt: job.attempt,
                    outcome: Outcome::Succeeded,
                    exit_code: Some(0),
                    result: None,
                    error: None,
                },
            };
            match mode {
                JobMode::Noop => done.push(report),
                JobMode::Sleep => {
                    let ended = ended.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(crate::random_below(2000))).await;
                        let _ = ended.send(report);
                    });
                }
            }
        }
    }
    reporter.abort();
    Ok(())
}

/// An instant one interval from now, +-10 %.
fn jittered(interval: Duration) -> Instant {
    let spread = interval.as_millis() as u64 / 5;
    Instant::now() + interval - Duration::from_millis(spread / 2)
        + Duration::from_millis(crate::random_below(spread + 1))
}

fn held(leases: &Mutex<HashSet<LeaseRef>>) -> Vec<LeaseRef> {
    leases
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect()
}

async fn beat(
    http: &mut Http,
    token: &str,
    incarnation: &str,
    leases: &Mutex<HashSet<LeaseRef>>,
) -> Result<HeartbeatResponse, String> {
    let (status, body) = http
        .post(
            "/api/v1/agents/heartbeat",
            token,
            &json!({"incarnation": incarnation, "leases": held(leases)}),
        )
        .await?;
    if status != 200 {
        return Err(format!("heartbeat: {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}
