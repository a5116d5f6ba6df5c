//! The agent's main loop. It owns the agent's state (running jobs, whether
//! it may claim, whether it is stopping) and changes it only in response to
//! one `Event` at a time; the heartbeat, claim and job tasks send events.
//! Heartbeats ride on claims (`Beats`): an idle agent holds one connection.

use crate::client::{backoff, ClientError};
use crate::inventory::GpuSource;
use crate::job::{self, off_thread, Control, Ctx};
use crate::Explainer;
use drover_proto::{
    Assignment, ClaimRequest, HeartbeatRequest, HeartbeatResponse, LeaseRef, Order, Outcome,
    Progress,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};

/// Longest claim long-poll.
const CLAIM_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub enum Event {
    /// A claim's answer: jobs, and/or orders for running jobs.
    Claimed(Vec<Assignment>, Vec<Order>),
    /// A claim ended without a job (204 or an error).
    ClaimEnded(Option<ClientError>),
    JobDone {
        job_id: i64,
        attempt: i64,
    },
    Beat(HeartbeatResponse),
    Shutdown,
    GraceOver,
    /// The coordinator no longer knows this agent's token.
    Revoked(ClientError),
    /// Revoked jobs had their chance to die; exit now.
    RevokedExit,
}

/// What the agent tracks of one attempt it holds. Keyed by (job, attempt):
/// after a pause past its lease, an agent may hold a job's old attempt
/// (ending) and its new one at once.
type Key = (i64, i64);

struct Running {
    gpus: Vec<u32>,
    control: Option<mpsc::UnboundedSender<Control>>,
}

/// Leases held now, with their GPUs; read for every heartbeat.
pub type Leases = Vec<(LeaseRef, Vec<u32>)>;

pub struct Supervisor {
    pub ctx: Arc<Ctx>,
    pub incarnation: String,
    pub worker_id: i64,
    pub shutdown_grace: Duration,
    pub gpu: GpuSource,
    /// Shared with the heartbeat task: set once shutdown begins.
    pub stopping: Arc<AtomicBool>,
    /// Wakes the heartbeat task for an immediate heartbeat.
    pub beat_now: Arc<Notify>,
}

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Claiming and running jobs.
    Working,
    /// Shutting down: no new claims; running jobs get the grace, then are
    /// handed back.
    Stopping,
    /// The coordinator refused this agent's token: jobs are killed, then it
    /// exits.
    Revoked,
}

/// The loop's state, changed one event at a time.
struct Loop {
    running: HashMap<Key, Running>,
    phase: Phase,
    /// Claims wait for the first heartbeat: it introduces this process.
    introduced: bool,
    approved: bool,
    warned_pending: bool,
    /// A claim is parked (or on its way).
    claiming: bool,
    claim_failures: u32,
    claim_errors: Explainer,
    tx: mpsc::Sender<Event>,
    leases: watch::Sender<Leases>,
}

impl Loop {
    /// One claim is always parked, also while pending approval or when
    /// every slot is busy: the coordinator hands out only what may run and
    /// fits, and a parked claim is how a cancel or an approval reaches this
    /// agent at once.
    fn wants_claim(&self) -> bool {
        self.phase == Phase::Working && self.introduced && !self.claiming
    }

    fn claim_delay(&self) -> Duration {
        if self.claim_failures > 0 {
            backoff(self.claim_failures)
        } else {
            Duration::ZERO
        }
    }

    fn publish(&self) {
        publish(&self.leases, &self.running);
        // Every claim and every finished job passes here: no message (nor
        // its formatting) outside systemd.
        if drover_host::notify::enabled() {
            drover_host::notify::status(&format!("{} jobs running", self.running.len()));
        }
    }

    /// Sends `control` to every running job.
    fn tell_all(&self, control: impl Fn() -> Control) {
        for r in self.running.values() {
            if let Some(c) = &r.control {
                let _ = c.send(control());
            }
        }
    }
}

impl Supervisor {
    /// Runs until a shutdown has handed every job back or finished it.
    /// Err when the coordinator revoked this agent: (exit status, why).
    pub async fn run(self, heartbeat_interval: Duration) -> Result<(), (i32, String)> {
        let (tx, mut rx) = mpsc::channel::<Event>(256);
        let (leases_tx, leases_rx) = watch::channel::<Leases>(Vec::new());
        let beats = Arc::new(Beats {
            ctx: self.ctx.clone(),
            incarnation: self.incarnation.clone(),
            leases: leases_rx,
            tx: tx.clone(),
            gpu: self.gpu.clone(),
            stopping: self.stopping.clone(),
            schedule: Mutex::new((Instant::now(), heartbeat_interval)),
            skew_warned: AtomicBool::new(false),
        });
        tokio::spawn(heartbeat_loop(beats.clone(), self.beat_now.clone()));
        let telemetry = tokio::spawn(telemetry_loop(beats.clone()));
        tokio::spawn(signals(tx.clone()));
        let mut st = Loop {
            running: HashMap::new(),
            phase: Phase::Working,
            introduced: false,
            approved: false,
            warned_pending: false,
            claiming: false,
            claim_failures: 0,
            claim_errors: Explainer::default(),
            tx,
            leases: leases_tx,
        };
        loop {
            match st.phase {
                Phase::Revoked if st.running.is_empty() => return Err(self.revoked_exit()),
                Phase::Stopping if st.running.is_empty() => break,
                _ => {}
            }
            if st.wants_claim() {
                st.claiming = true;
                tokio::spawn(claim(beats.clone(), st.claim_delay()));
            }
            let Some(event) = rx.recv().await else { break };
            self.handle(&mut st, event)?;
        }
        telemetry.abort();
        self.say_stopped().await;
        Ok(())
    }

    /// One event; Err when the agent must exit now.
    fn handle(&self, st: &mut Loop, event: Event) -> Result<(), (i32, String)> {
        match event {
            Event::Claimed(jobs, orders) => self.claimed(st, jobs, orders),
            Event::ClaimEnded(error) => {
                st.claiming = false;
                match error {
                    None => st.claim_failures = 0,
                    Some(e) => {
                        st.claim_failures += 1;
                        st.claim_errors.explain("claiming work", &e);
                        drover_host::notify::status(&format!(
                            "{} jobs running; claims fail: {e}",
                            st.running.len()
                        ));
                    }
                }
            }
            Event::JobDone { job_id, attempt } => {
                st.running.remove(&(job_id, attempt));
                st.publish();
            }
            Event::Beat(resp) => self.beat(st, resp),
            Event::Revoked(e) if st.phase != Phase::Revoked => {
                st.phase = Phase::Revoked;
                self.revoked(&e, st);
            }
            Event::Revoked(_) => {}
            Event::RevokedExit => {
                log::error!("{} jobs did not stop within 5 s; exiting", st.running.len());
                return Err(self.revoked_exit());
            }
            Event::Shutdown if st.phase == Phase::Working => self.shutdown(st),
            Event::Shutdown | Event::GraceOver => {
                if !st.running.is_empty() {
                    log::info!("handing back {} running jobs", st.running.len());
                }
                st.tell_all(|| Control::Release);
            }
        }
        Ok(())
    }

    /// A claim's answer: orders for running jobs, and jobs to start (or,
    /// once stopping or revoked, to hand straight back unstarted).
    fn claimed(&self, st: &mut Loop, jobs: Vec<Assignment>, orders: Vec<Order>) {
        st.claiming = false;
        st.claim_failures = 0;
        st.claim_errors.recovered("claims work again");
        apply_orders(&st.running, orders);
        if !jobs.is_empty() && !st.approved && st.warned_pending {
            log::info!(
                "approved by the coordinator; running work (worker_id={})",
                self.worker_id
            );
        }
        for a in jobs {
            st.approved = true;
            let key = (a.job_id, a.attempt);
            let (ctx, done) = (self.ctx.clone(), st.tx.clone());
            if st.phase != Phase::Working {
                // Granted before the coordinator heard we are stopping.
                let running = Running {
                    gpus: Vec::new(),
                    control: None,
                };
                st.running.insert(key, running);
                tokio::spawn(async move {
                    job::spool_and_deliver(&ctx.client, &ctx.state, key.0, released(key.1)).await;
                    let _ = done
                        .send(Event::JobDone {
                            job_id: key.0,
                            attempt: key.1,
                        })
                        .await;
                });
                continue;
            }
            let (control_tx, control_rx) = mpsc::unbounded_channel();
            let running = Running {
                gpus: a.gpu_indices.clone(),
                control: Some(control_tx),
            };
            st.running.insert(key, running);
            tokio::spawn(async move {
                job::run(ctx, a, control_rx).await;
                let _ = done
                    .send(Event::JobDone {
                        job_id: key.0,
                        attempt: key.1,
                    })
                    .await;
            });
        }
        st.publish();
    }

    /// A heartbeat's answer: approval, and orders for running jobs.
    fn beat(&self, st: &mut Loop, resp: HeartbeatResponse) {
        let now_approved = resp.state != "pending";
        if now_approved && !st.approved && st.warned_pending {
            log::info!("approved by the coordinator (worker_id={})", self.worker_id);
        }
        if !now_approved && !st.warned_pending {
            self.warn_pending();
            st.warned_pending = true;
        }
        st.approved = now_approved;
        st.introduced = true;
        apply_orders(&st.running, resp.orders);
    }

    /// SIGTERM or SIGINT: no more claims; running jobs get the grace.
    fn shutdown(&self, st: &mut Loop) {
        st.phase = Phase::Stopping;
        // Tell the coordinator now: no more jobs for this process.
        self.stopping.store(true, Ordering::SeqCst);
        self.beat_now.notify_one();
        log::info!(
            "stopping: no new claims; {} running jobs get {}s to finish, then are handed back",
            st.running.len(),
            self.shutdown_grace.as_secs()
        );
        let done = st.tx.clone();
        let grace = self.shutdown_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = done.send(Event::GraceOver).await;
        });
    }

    /// Tells the coordinator this agent holds nothing and claims nothing
    /// more, so a claim still parked for it cannot hand out a job.
    async fn say_stopped(&self) {
        let req = HeartbeatRequest {
            incarnation: self.incarnation.clone(),
            leases: Vec::new(),
            gpus: Vec::new(),
            stopping: true,
            progress: Vec::new(),
            log_lines: Vec::new(),
        };
        send_telemetry(&self.ctx.client, &self.incarnation, Vec::new()).await;
        let client = self.ctx.client.clone();
        match off_thread(move || client.heartbeat(&req)).await {
            Ok(_) => log::info!("stopped; the coordinator knows"),
            Err(e) => log::warn!("stopped; could not tell the coordinator: {e}"),
        }
    }

    fn revoked_exit(&self) -> (i32, String) {
        (
            crate::EXIT_REVOKED,
            format!(
                "worker {} was revoked by the coordinator; not restarting",
                self.worker_id
            ),
        )
    }

    /// The coordinator refused this agent for good: say why, forget the
    /// identity, kill every job at once (they are someone else's now), and
    /// exit once they are gone (or after 5 s).
    fn revoked(&self, e: &ClientError, st: &Loop) {
        let jobs = st.running.len();
        st.tell_all(|| Control::Abandon);
        let tx = st.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = tx.send(Event::RevokedExit).await;
        });
        let identity = self.ctx.state.root().join("identity.json");
        if e.code() == Some("decommissioned") {
            log::error!(
                "worker {} was decommissioned by an admin: stopping {jobs} running jobs now and exiting. \
                 The machine can come back only as a new worker (another --name)",
                self.worker_id
            );
        } else {
            log::error!(
                "the coordinator refused this agent's token ({e}); it was revoked or the coordinator's database is new. \
                 Stopping {jobs} running jobs and removing {} so the next start registers again",
                identity.display()
            );
        }
        self.ctx.state.forget_identity();
    }

    fn warn_pending(&self) {
        log::warn!(
            "worker {} waits for admin approval. Approve it with: curl -X POST -H \"Authorization: Bearer $DROVER_ADMIN_TOKEN\" {}/api/v1/workers/{}/approve",
            self.worker_id,
            self.ctx.client.base(),
            self.worker_id
        );
    }
}

/// Passes cancel orders to the jobs they name; the rest is ignored (an
/// order for an attempt this agent no longer runs, or a kind it does not know).
fn apply_orders(running: &HashMap<Key, Running>, orders: Vec<Order>) {
    for order in orders {
        match (
            order.kind.as_str(),
            running.get(&(order.job_id, order.attempt)),
        ) {
            ("cancel", Some(r)) => {
                if let Some(c) = &r.control {
                    let _ = c.send(Control::Cancel(order.reason));
                }
            }
            (kind, _) => log::debug!(
                "ignoring order {kind} for job {} attempt {}",
                order.job_id,
                order.attempt
            ),
        }
    }
}

fn publish(tx: &watch::Sender<Leases>, running: &HashMap<Key, Running>) {
    let leases = running
        .iter()
        .map(|((job_id, attempt), r)| {
            (
                LeaseRef {
                    job_id: *job_id,
                    attempt: *attempt,
                },
                r.gpus.clone(),
            )
        })
        .collect();
    tx.send_replace(leases);
}

/// How long before a heartbeat is due a claim takes it along.
const CARRY_SLACK: Duration = Duration::from_secs(1);
/// How long past due the heartbeat task waits for a claim to carry the beat
/// before it sends one on its own.
const CARRY_GRACE: Duration = Duration::from_secs(2);

/// The agent's heartbeats. They normally ride on its claims (one connection,
/// one request per interval); the heartbeat task sends one on its own only
/// when no claim carried it: the first (it introduces the process), while
/// claims back off, and when stopping.
struct Beats {
    ctx: Arc<Ctx>,
    incarnation: String,
    leases: watch::Receiver<Leases>,
    tx: mpsc::Sender<Event>,
    gpu: GpuSource,
    stopping: Arc<AtomicBool>,
    /// When the next heartbeat is due, and the interval the coordinator asks for.
    schedule: Mutex<(Instant, Duration)>,
    skew_warned: AtomicBool,
}

impl Beats {
    fn schedule(&self) -> (Instant, Duration) {
        *self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_due(&self, due: Instant) {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner()).0 = due;
    }

    /// The next heartbeat is due one interval from now, +-10 % (jitter keeps
    /// a restarted fleet from beating in step).
    fn schedule_next(&self) -> Instant {
        let mut s = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        let spread = s.1.as_millis() as u64 / 5;
        s.0 = Instant::now() + s.1 - Duration::from_millis(spread / 2)
            + Duration::from_millis(crate::random_below(spread + 1));
        s.0
    }

    /// A heartbeat of what the agent holds and sees now (its log lines go
    /// by `telemetry_loop`).
    fn request(&self) -> HeartbeatRequest {
        let (held, busy): (Vec<LeaseRef>, Vec<u32>) = {
            let l = self.leases.borrow();
            (
                l.iter().map(|(r, _)| *r).collect(),
                l.iter().flat_map(|(_, g)| g.clone()).collect(),
            )
        };
        HeartbeatRequest {
            incarnation: self.incarnation.clone(),
            progress: self.progress(&held),
            leases: held,
            gpus: self.gpu.metrics(&busy),
            stopping: self.stopping.load(Ordering::SeqCst),
            log_lines: Vec::new(),
        }
    }

    /// What the jobs of `held` last wrote to their progress files.
    fn progress(&self, held: &[LeaseRef]) -> Vec<Progress> {
        held.iter()
            .filter_map(|l| {
                let doc = job::read_json_file(
                    &self
                        .ctx
                        .state
                        .job_dir(l.job_id, l.attempt)
                        .join(job::WORK)
                        .join("progress.json"),
                    64 * 1024,
                );
                doc.ok().flatten().map(|progress| Progress {
                    job_id: l.job_id,
                    attempt: l.attempt,
                    progress,
                })
            })
            .collect()
    }

    /// A heartbeat went through (`sent` and `received`: this machine's clock
    /// around it); `reschedule`: the next one is due an interval from now.
    /// False when the supervisor is gone.
    async fn answered(
        &self,
        resp: HeartbeatResponse,
        (sent, received): (i64, i64),
        reschedule: bool,
    ) -> bool {
        // When it left this machine, on the monotonic clock: the leases it
        // listed run at least a TTL from then.
        let ago = Duration::from_millis((crate::now_ms() - sent).max(0) as u64);
        let renewal = job::Renewal {
            sent: tokio::time::Instant::now()
                .checked_sub(ago)
                .unwrap_or_else(tokio::time::Instant::now),
            ttl: Duration::from_secs(resp.lease_ttl_s),
        };
        self.ctx.renewed.send_replace(Some(renewal));
        if !self.skew_warned.load(Ordering::Relaxed) && check_skew(sent, received, resp.now_ms) {
            self.skew_warned.store(true, Ordering::Relaxed);
        }
        self.schedule.lock().unwrap_or_else(|e| e.into_inner()).1 =
            Duration::from_secs(resp.heartbeat_interval_s.max(1));
        if reschedule {
            self.schedule_next();
        }
        self.tx.send(Event::Beat(resp)).await.is_ok()
    }
}

async fn claim(beats: Arc<Beats>, delay: Duration) {
    tokio::time::sleep(delay).await;
    let (due, interval) = beats.schedule();
    // Take the heartbeat along when it is (nearly) due, and come back by the
    // time the next one is.
    let beat = (due.saturating_duration_since(Instant::now()) <= CARRY_SLACK
        && !beats.stopping.load(Ordering::SeqCst))
    .then(|| beats.request());
    let until = match beat {
        Some(_) => beats.schedule_next(),
        None => due,
    }
    .saturating_duration_since(Instant::now());
    let wait = until.min(CLAIM_WAIT).max(CARRY_SLACK.min(interval));
    let client = beats.ctx.client.clone();
    let req = ClaimRequest {
        incarnation: beats.incarnation.clone(),
        completed: Vec::new(),
        beat,
    };
    let sent = crate::now_ms();
    let (result, req) = off_thread(move || {
        let r = client.claim(&req, wait);
        (r, req)
    })
    .await;
    let event = match result {
        Ok(Some(mut resp)) => {
            if let Some(answer) = resp.beat.take() {
                // Recorded when the claim arrived, not when it returned.
                if !beats.answered(answer, (sent, sent), false).await {
                    return;
                }
            }
            Event::Claimed(resp.jobs, resp.orders)
        }
        Ok(None) => Event::ClaimEnded(None),
        Err(e) if e.status() == Some(401) => Event::Revoked(e),
        Err(e) => {
            if req.beat.is_some() {
                // The heartbeat did not go through: it is due again now.
                beats.set_due(Instant::now());
            }
            Event::ClaimEnded(Some(e))
        }
    };
    if let Err(mpsc::error::SendError(Event::Claimed(jobs, _))) = beats.tx.send(event).await {
        // The supervisor is gone (shutting down): hand the jobs back.
        for a in jobs {
            job::spool_and_deliver(
                &beats.ctx.client,
                &beats.ctx.state,
                a.job_id,
                released(a.attempt),
            )
            .await;
        }
    }
}

/// Sends a heartbeat on its own whenever one is due and no claim took it
/// along within `CARRY_GRACE`, or at once when woken (stopping).
async fn heartbeat_loop(beats: Arc<Beats>, beat_now: Arc<Notify>) {
    let mut failures = 0u32;
    let mut errors = Explainer::default();
    loop {
        let req = beats.request();
        let client = beats.ctx.client.clone();
        let sent = crate::now_ms();
        let result = off_thread(move || client.heartbeat(&req)).await;
        match result {
            Ok(resp) => {
                failures = 0;
                errors.recovered("heartbeats go through again");
                if !beats.answered(resp, (sent, crate::now_ms()), true).await {
                    return;
                }
            }
            Err(e) if e.status() == Some(401) => {
                let _ = beats.tx.send(Event::Revoked(e)).await;
                return;
            }
            Err(e) => {
                failures += 1;
                errors.explain("heartbeat", &e);
                let (_, interval) = beats.schedule();
                beats.set_due(Instant::now() + backoff(failures).min(interval));
            }
        }
        // Wait until a beat is overdue: each one a claim carries moves `due`.
        loop {
            let (due, _) = beats.schedule();
            let late = due + CARRY_GRACE;
            if Instant::now() >= late {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(late.into()) => {}
                _ = beat_now.notified() => break,
            }
        }
    }
}

/// Log lines and progress reach the coordinator within a second: a line
/// wakes it (the lines of the next 200 ms go with it), and each second it
/// looks for progress files that changed. A job's progress goes at most
/// once a second, and only when it changed.
async fn telemetry_loop(beats: Arc<Beats>) {
    let mut sent: HashMap<LeaseRef, serde_json::Value> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leases = beats.leases.clone();
    loop {
        // Without jobs there is no progress to look at: no tick, so an
        // idle agent sleeps until it logs or is given a job.
        let idle = leases.borrow_and_update().is_empty();
        tokio::select! {
            _ = crate::logring::NEW_LINE.notified() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = tick.tick(), if !idle => {}
            changed = leases.changed(), if idle => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let held: Vec<LeaseRef> = beats.leases.borrow().iter().map(|(r, _)| *r).collect();
        sent.retain(|l, _| held.contains(l));
        let changed: Vec<Progress> = beats
            .progress(&held)
            .into_iter()
            .filter(|p| {
                let key = LeaseRef {
                    job_id: p.job_id,
                    attempt: p.attempt,
                };
                sent.get(&key) != Some(&p.progress)
            })
            .collect();
        let before: Vec<(LeaseRef, serde_json::Value)> = changed
            .iter()
            .map(|p| {
                (
                    LeaseRef {
                        job_id: p.job_id,
                        attempt: p.attempt,
                    },
                    p.progress.clone(),
                )
            })
            .collect();
        if send_telemetry(&beats.ctx.client, &beats.incarnation, changed).await {
            sent.extend(before);
        }
    }
}

/// Sends the log lines waiting in the ring and `progress`; true if it went
/// through (else the lines go back to the ring).
async fn send_telemetry(
    client: &Arc<crate::client::Client>,
    incarnation: &str,
    progress: Vec<Progress>,
) -> bool {
    let logs = crate::logring::take(200);
    if logs.is_empty() && progress.is_empty() {
        return true;
    }
    let req = drover_proto::TelemetryRequest {
        incarnation: incarnation.to_string(),
        logs,
        progress,
    };
    let client = client.clone();
    let (result, req) = off_thread(move || (client.telemetry(&req), req)).await;
    match result {
        Ok(()) => true,
        Err(e) => {
            crate::logring::put_back(req.logs);
            log::debug!("telemetry not sent: {e}");
            false
        }
    }
}

fn released(attempt: i64) -> drover_proto::CompleteRequest {
    drover_proto::CompleteRequest {
        attempt,
        outcome: Outcome::Released,
        exit_code: None,
        result: None,
        error: None,
    }
}

/// Warns when this machine's clock and the coordinator's disagree by more
/// than 5 s (leases do not depend on it, but timestamps in job output and
/// the coordinator's records will not line up); true if it did.
fn check_skew(sent: i64, received: i64, server: i64) -> bool {
    if server <= 0 {
        return false;
    }
    let skew = (sent + received) / 2 - server;
    if skew.abs() <= 5_000 {
        return false;
    }
    log::warn!(
        "clock skew: this machine's clock is {:.1}s {} the coordinator's. Try: enable time sync (timedatectl set-ntp true, or chrony)",
        skew.abs() as f64 / 1000.0,
        if skew > 0 { "ahead of" } else { "behind" }
    );
    true
}

async fn signals(tx: mpsc::Sender<Event>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::warn!("cannot listen for SIGTERM/SIGINT; the agent will not stop gracefully");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if tx.send(Event::Shutdown).await.is_err() {
            return;
        }
    }
}
