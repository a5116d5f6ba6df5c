//! `drover-agent simulate --agents N`: N virtual agents in one process,
//! speaking the real protocol (register, heartbeat on schedule, parked
//! claims, complete), so one machine stands in for a large fleet. Each
//! virtual agent holds one keep-alive connection for its claims, which carry
//! its heartbeats (as the real agent's do) and the reports of its no-op jobs
//! (one round trip per batch); the reports of sleeping jobs, which run side
//! by side, use a second one. Requests are the agent's own types
//! (`drover_proto`) on the protocol's routes (`drover_proto::routes`); the
//! transport is a tiny HTTP/1.1 client on tokio (plain http only; with a
//! list of coordinators it moves to the next on a failure) that keeps
//! thousands of parked claims at a few KB each, where the agent's blocking
//! client would need a thread per parked claim (decision 0037). Runs for `--duration` and
//! stops by itself, printing figures (and a JSON summary line at the end).

use crate::config::{Args, JobMode};
use drover_proto::{
    routes, Assignment, ClaimRequest, ClaimResponse, CompleteRequest, Completion, HeartbeatRequest,
    HeartbeatResponse, Inventory, LeaseRef, Outcome, RegisterRequest, RegisterResponse,
};
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One keep-alive HTTP/1.1 connection to one of the coordinators: after a
/// failed request or a 5xx it moves to the next one (the store is shared,
/// so leases and tokens hold there too), as the real agent does.
struct Http {
    addrs: Arc<[String]>,
    at: usize,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(addrs: &Arc<[String]>, first: usize) -> Http {
        Http {
            addrs: addrs.clone(),
            at: first % addrs.len().max(1),
            conn: None,
        }
    }

    async fn post(
        &mut self,
        path: &str,
        token: &str,
        body: &impl serde::Serialize,
    ) -> Result<(u16, Vec<u8>), String> {
        let body = serde_json::to_string(body).map_err(|e| e.to_string())?;
        let r = self.try_post(path, token, &body).await;
        if r.as_ref().map_or(true, |(status, _)| *status >= 500) {
            self.conn = None;
            self.at = (self.at + 1) % self.addrs.len().max(1);
        }
        r
    }

    async fn try_post(
        &mut self,
        path: &str,
        token: &str,
        body: &str,
    ) -> Result<(u16, Vec<u8>), String> {
        let addr = self.addrs.get(self.at).ok_or("no coordinator")?;
        if self.conn.is_none() {
            let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = s.set_nodelay(true);
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            addr,
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

impl Stats {
    /// (seconds since the start, latency ms) of every heartbeat so far.
    fn samples(&self) -> Vec<(f64, f64)> {
        self.heartbeat_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
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

/// What every virtual agent shares.
struct Fleet {
    /// The coordinators' host:port, in the order given.
    addrs: Arc<[String]>,
    secret: String,
    run_id: String,
    gpus: Vec<drover_proto::GpuInfo>,
    args: Args,
    mode: JobMode,
    started: Instant,
    deadline: Instant,
    stats: Stats,
}

/// Runs the virtual fleet until `duration` has passed.
pub async fn run(
    args: Args,
    agents: usize,
    mode: JobMode,
    duration: Duration,
) -> Result<(), String> {
    let addrs = args
        .coordinator
        .split(',')
        .map(|url| {
            url.trim()
                .strip_prefix("http://")
                .map(|a| a.trim_end_matches('/').to_string())
                .ok_or_else(|| format!("{url:?}: simulate speaks plain http:// only"))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into();
    let secret = args
        .registration_secret
        .clone()
        .ok_or("simulate needs --registration-secret")?;
    let gpus = match &args.fake_gpus {
        Some(spec) => crate::inventory::parse_fake_gpus(spec)?,
        None => Vec::new(),
    };
    let started = Instant::now();
    let fleet = Arc::new(Fleet {
        addrs,
        secret,
        run_id: format!("{:08x}", crate::random_u64() as u32),
        gpus,
        args,
        mode,
        started,
        deadline: started + duration,
        stats: Stats::default(),
    });
    let tasks: Vec<_> = (0..agents)
        .map(|i| {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                // Spread the registrations over the first seconds, as a real fleet.
                tokio::time::sleep(Duration::from_millis(crate::random_below(2000))).await;
                if let Err(e) = agent(i, fleet.clone()).await {
                    fleet.stats.errors.fetch_add(1, Ordering::Relaxed);
                    log::debug!("virtual agent {i}: {e}");
                }
            })
        })
        .collect();
    report_progress(&fleet).await;
    for t in tasks {
        t.abort();
    }
    say!("{}", summary(&fleet));
    Ok(())
}

/// A line every 10 s until the deadline.
async fn report_progress(fleet: &Fleet) {
    let (stats, mut last) = (&fleet.stats, 0);
    while Instant::now() < fleet.deadline {
        let left = fleet.deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(Duration::from_secs(10).min(left)).await;
        let done = stats.completed.load(Ordering::Relaxed);
        let mut hb: Vec<f64> = stats.samples().iter().map(|(_, ms)| *ms).collect();
        log::info!(
            "simulate t={:.0}s agents={} jobs_done={done} (+{}) heartbeat p50={:.1}ms p99={:.1}ms errors={}",
            fleet.started.elapsed().as_secs_f64(),
            stats.registered.load(Ordering::Relaxed),
            done - last,
            pct(&mut hb, 0.5),
            pct(&mut hb, 0.99),
            stats.errors.load(Ordering::Relaxed)
        );
        last = done;
    }
}

/// The run's figures as one JSON line.
fn summary(fleet: &Fleet) -> serde_json::Value {
    let stats = &fleet.stats;
    let samples = stats.samples();
    let mut hb: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
    let mut steady: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= WARM_UP_S)
        .map(|(_, ms)| *ms)
        .collect();
    json!({
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
        "seconds": fleet.started.elapsed().as_secs_f64(),
    })
}

/// One virtual agent, registered.
struct Virtual<'a> {
    fleet: &'a Fleet,
    http: Http,
    token: String,
    incarnation: String,
    leases: Arc<Mutex<HashSet<LeaseRef>>>,
    interval: Duration,
    /// When the next heartbeat is due.
    due: Instant,
}

/// Registers virtual agent `i`, then claims and runs jobs until the
/// deadline, its heartbeats riding on its claims as the real agent's do.
async fn agent(i: usize, fleet: Arc<Fleet>) -> Result<(), String> {
    let mut v = register(i, &fleet).await?;
    // Sleeping jobs report on their own connection as they end; no-op jobs
    // are reported with the next claim (one round trip per batch).
    let (ended, reports) = tokio::sync::mpsc::unbounded_channel::<Completion>();
    let reporter = tokio::spawn(reporter(
        fleet.clone(),
        v.token.clone(),
        v.leases.clone(),
        reports,
    ));
    let mut done: Vec<Completion> = Vec::new();
    while Instant::now() < fleet.deadline {
        let Some(resp) = v.claim(&mut done).await? else {
            continue;
        };
        v.record(&resp);
        for report in resp.jobs.iter().map(succeeded) {
            match fleet.mode {
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

/// Registers virtual agent `i`, trying the coordinators in turn until one
/// answers or the run ends.
async fn register(i: usize, fleet: &Fleet) -> Result<Virtual<'_>, String> {
    loop {
        match try_register(i, fleet).await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() < fleet.deadline => {
                fleet.stats.errors.fetch_add(1, Ordering::Relaxed);
                log::debug!("virtual agent {i}: {e}; trying again");
                pause().await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Half a second or so after a failed request (jittered, so agents that
/// failed together do not come back together).
async fn pause() {
    tokio::time::sleep(Duration::from_millis(250 + crate::random_below(500))).await;
}

/// Registers virtual agent `i` and sends its first heartbeat (which
/// introduces the process).
async fn try_register(i: usize, fleet: &Fleet) -> Result<Virtual<'_>, String> {
    let mut http = Http::new(&fleet.addrs, i);
    let req = RegisterRequest {
        name: format!("sim-{i}"),
        machine_id: format!("sim-{}", fleet.run_id),
        inventory: Inventory {
            hostname: format!("sim-{i}"),
            cpu_cores: 8,
            memory_mb: 65536,
            gpus: fleet.gpus.clone(),
            can_limit: false,
        },
        tags: fleet.args.tags.clone(),
        slots: fleet.args.slots,
        agent_version: "simulate".into(),
    };
    let (status, body) = http.post(routes::REGISTER, &fleet.secret, &req).await?;
    if status != 200 {
        return Err(format!(
            "register: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let reg: RegisterResponse = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    fleet.stats.registered.fetch_add(1, Ordering::Relaxed);
    let mut v = Virtual {
        fleet,
        http,
        token: reg.token,
        incarnation: format!("sim-{}-{i}", fleet.run_id),
        leases: Arc::default(),
        interval: Duration::ZERO,
        due: Instant::now(),
    };
    let req = v.heartbeat();
    let (status, body) = v.http.post(routes::HEARTBEAT, &v.token, &req).await?;
    if status != 200 {
        return Err(format!("heartbeat: {status}"));
    }
    let first: HeartbeatResponse = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    v.interval = Duration::from_secs(first.heartbeat_interval_s.max(1));
    v.due = jittered(v.interval);
    Ok(v)
}

impl Virtual<'_> {
    fn heartbeat(&self) -> HeartbeatRequest {
        HeartbeatRequest {
            incarnation: self.incarnation.clone(),
            leases: held(&self.leases),
            gpus: Vec::new(),
            stopping: false,
            progress: Vec::new(),
            log_lines: Vec::new(),
        }
    }

    /// One claim carrying the reports in `done` (and the heartbeat when it
    /// is about due); `None` when it came back empty or failed (counted,
    /// retried: the reports stay in `done` for the next claim).
    async fn claim(&mut self, done: &mut Vec<Completion>) -> Result<Option<ClaimResponse>, String> {
        let carry = self.due.saturating_duration_since(Instant::now()) <= Duration::from_secs(1);
        let beat = carry.then(|| self.heartbeat());
        if carry {
            self.due = jittered(self.interval);
        }
        let req = ClaimRequest {
            incarnation: self.incarnation.clone(),
            completed: std::mem::take(done),
            beat,
        };
        let wait = self
            .due
            .saturating_duration_since(Instant::now())
            .as_secs()
            .clamp(1, 30);
        let sent_ms = crate::now_ms();
        let answer = self
            .http
            .post(&routes::claim(wait), &self.token, &req)
            .await;
        match answer {
            Ok((200, body)) => {
                let resp: ClaimResponse =
                    serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                if let Some(beat) = &resp.beat {
                    self.beat_answered(beat, sent_ms);
                }
                Ok(Some(resp))
            }
            Ok((204, _)) => Ok(None),
            // Refused or failed: its reports, if any, are sent again with
            // the next claim (a replay, answered as the first was); its
            // heartbeat, if any, too.
            _ => {
                self.fleet.stats.errors.fetch_add(1, Ordering::Relaxed);
                *done = req.completed;
                if carry {
                    self.due = Instant::now();
                }
                pause().await;
                Ok(None)
            }
        }
    }

    /// Records a heartbeat's latency: from sending the claim to the
    /// coordinator recording it (its clock in the answer; the same
    /// machine's clock as ours, 1 ms resolution).
    fn beat_answered(&mut self, answer: &HeartbeatResponse, sent_ms: i64) {
        self.interval = Duration::from_secs(answer.heartbeat_interval_s.max(1));
        let ms = (answer.now_ms - sent_ms).max(0) as f64;
        let at = self.fleet.started.elapsed().as_secs_f64();
        self.fleet
            .stats
            .heartbeat_ms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((at, ms));
    }

    /// Counts the answered reports and updates the leases held.
    fn record(&self, resp: &ClaimResponse) {
        let stats = &self.fleet.stats;
        let mut held = self.leases.lock().unwrap_or_else(|e| e.into_inner());
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
}

/// The report of a virtual job that succeeded.
fn succeeded(job: &Assignment) -> Completion {
    Completion {
        job_id: job.job_id,
        report: CompleteRequest {
            attempt: job.attempt,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            result: None,
            error: None,
        },
    }
}

/// Sends the reports of sleeping jobs as they end, on its own connection.
async fn reporter(
    fleet: Arc<Fleet>,
    token: String,
    leases: Arc<Mutex<HashSet<LeaseRef>>>,
    mut reports: tokio::sync::mpsc::UnboundedReceiver<Completion>,
) {
    let mut http = Http::new(&fleet.addrs, 0);
    while let Some(done) = reports.recv().await {
        let path = routes::complete(done.job_id);
        // Sent until answered (any coordinator) or the run ends.
        loop {
            match http.post(&path, &token, &done.report).await {
                Ok((200, _)) => fleet.stats.completed.fetch_add(1, Ordering::Relaxed),
                Ok((status, _)) if status < 500 => {
                    fleet.stats.errors.fetch_add(1, Ordering::Relaxed)
                }
                _ if Instant::now() < fleet.deadline => {
                    fleet.stats.errors.fetch_add(1, Ordering::Relaxed);
                    pause().await;
                    continue;
                }
                _ => fleet.stats.errors.fetch_add(1, Ordering::Relaxed),
            };
            break;
        }
        leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&LeaseRef {
                job_id: done.job_id,
                attempt: done.report.attempt,
            });
    }
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
