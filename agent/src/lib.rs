//! Drover agent: registers this machine with the coordinator, heartbeats,
//! claims the jobs it can run, runs them, and reports. `main.rs` parses
//! flags and calls [`run`].

#[macro_use]
extern crate drover_host;

use drover_host::lockfile;

pub mod cgroup;
pub mod client;
pub mod config;
pub mod inventory;
pub mod job;
pub mod jobuser;
pub mod logring;
pub mod ops;
pub mod simulate;
pub mod spawn;
pub mod state;
pub mod suggest;
pub mod supervisor;

use client::{backoff, Client, ClientError};
use config::Config;
use drover_proto::RegisterRequest;
use inventory::GpuSource;
use job::{off_thread, Ctx};
use state::{Identity, StateDir};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;
use supervisor::Supervisor;

/// Exit status when the coordinator refused this agent for good (wrong
/// secret, decommissioned, token revoked): restarting will not help.
pub const EXIT_REFUSED: i32 = 3;
pub const EXIT_REVOKED: i32 = 4;

/// A random u64 (from the std hasher's random keys; not for secrets).
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

/// Milliseconds since the epoch on this machine's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random number in 0..n (0 when n is 0).
pub fn random_below(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        random_u64() % n
    }
}

/// Logs a failure with its hint once, again when it changes, and while it
/// lasts a reminder every `REMIND` that the agent is still retrying, so a
/// long outage neither fills the journal nor looks like a hang.
#[derive(Default)]
pub struct Explainer {
    /// The failure's kind, when it began, when it was last mentioned.
    last: Option<(String, std::time::Instant, std::time::Instant)>,
}

/// How often a lasting failure is mentioned again.
const REMIND: Duration = Duration::from_secs(30);

impl Explainer {
    pub fn explain(&mut self, what: &str, e: &ClientError) {
        let kind = e.kind();
        let now = std::time::Instant::now();
        if let Some((k, since, said)) = &mut self.last {
            if *k == kind {
                if now.duration_since(*said) >= REMIND {
                    log::warn!(
                        "{what} still failing after {}s, retrying: {e}",
                        now.duration_since(*since).as_secs()
                    );
                    *said = now;
                } else {
                    log::debug!("{what} failed again: {e}");
                }
                return;
            }
        }
        match e.hint() {
            Some(hint) => log::warn!("{what} failed: {e}. Try: {hint}"),
            None => log::warn!("{what} failed: {e}"),
        }
        self.last = Some((kind, now, now));
    }

    pub fn recovered(&mut self, what: &str) {
        if self.last.take().is_some() {
            log::info!("{what}");
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT (then it hands back what it runs).
/// Returns the process exit status.
pub async fn run(config: Config) -> Result<(), (i32, String)> {
    let fail = |e: String| (1, e);
    let state = Arc::new(StateDir::open(&config.state_dir).map_err(fail)?);
    let _lock = lock_state_dir(&config)?;
    reap_leftovers(&state).await;
    let gpu = GpuSource::detect(config.fake_gpus.clone());
    let client =
        Arc::new(Client::new(&config.coordinator, config.ca_cert.as_deref()).map_err(|e| (2, e))?);
    let token = known_token(&config, &state, &client).await.map_err(fail)?;
    // Register at every start, so the coordinator has this start's
    // inventory, tags and slots: with the agent's own token when it has one
    // (it proves this is the same worker), else with the secret.
    let mut credentials: Vec<String> = token.into_iter().collect();
    credentials.extend(config.registration_secret.clone());
    if credentials.is_empty() {
        return Err((
            EXIT_REFUSED,
            "this agent has no token and no --registration-secret (DROVER_REGISTRATION_SECRET) to register with".to_string(),
        ));
    }
    tokio::spawn(systemd_watch());
    let cgroups = job_cgroups();
    let can_limit = cgroups.as_ref().is_some_and(cgroup::Cgroups::can_limit);
    let identity = register(&config, &state, &client, &gpu, can_limit, credentials).await?;
    client.set_token(identity.token.clone());
    ready(&format!(
        "registered as worker {} with {}",
        identity.worker_id, config.coordinator
    ));
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        state: state.clone(),
        kill_grace: config.kill_grace,
        user: config.job_user.clone(),
        job_umask: config.job_umask,
        renewed: tokio::sync::watch::Sender::new(None),
        cgroups,
    });
    let slots = config
        .slots
        .unwrap_or_else(|| gpu.gpus().len().max(1) as u32);
    let incarnation = format!("{:016x}", random_u64());
    log::info!(
        "agent running worker_id={} name={:?} coordinator={} slots={slots} gpus={}",
        identity.worker_id,
        config.name,
        config.coordinator,
        gpu.gpus().len()
    );
    let supervisor = Supervisor {
        ctx,
        incarnation,
        worker_id: identity.worker_id,
        shutdown_grace: config.shutdown_grace,
        gpu,
        stopping: Default::default(),
        beat_now: Default::default(),
    };
    supervisor.run(Duration::from_secs(10)).await
}

/// The agent's own token, when it has one for these coordinators (any
/// coordinator it registered with still in the list: the store is the
/// same) or was given one; with it, delivers the reports spooled while the
/// coordinator could not be reached. They go first: registering again, or
/// this process's first heartbeat, releases whatever the previous process
/// still held.
async fn known_token(
    config: &Config,
    state: &Arc<StateDir>,
    client: &Arc<Client>,
) -> Result<Option<String>, String> {
    let known = state.load_identity()?.filter(|id| {
        config::coordinator_urls(&id.coordinator)
            .any(|u| config::coordinator_urls(&config.coordinator).any(|c| c == u))
    });
    let token = known.map(|id| id.token).or_else(|| config.token.clone());
    if let Some(token) = &token {
        client.set_token(token.clone());
        for s in state.spooled() {
            log::info!(
                "delivering a spooled report job_id={} attempt={}",
                s.job_id,
                s.report.attempt
            );
            job::deliver(client, state, s.job_id, s.report).await;
        }
    }
    Ok(token)
}

/// Holding the lock, this is the only agent of this state dir: whatever its
/// recorded jobs still run was left by a killed predecessor.
async fn reap_leftovers(state: &Arc<StateDir>) {
    let state = state.clone();
    let reaped = off_thread(move || job::reap_leftovers(&state)).await;
    if reaped > 0 {
        log::info!("stopped {reaped} leftover job processes before starting");
    }
}

/// Where jobs get cgroups of their own, if anywhere; kills what a killed
/// predecessor left in them.
fn job_cgroups() -> Option<cgroup::Cgroups> {
    let Some(cgroups) = cgroup::Cgroups::detect() else {
        log::info!(
            "jobs share the agent's cgroup: a process a job moves out of its process group (setsid) \
             outlives a stop; run the agent under its unit (Delegate=yes) to give each job its own"
        );
        return None;
    };
    if !cgroups.can_limit() {
        log::info!(
            "{}: jobs with limits go to other workers",
            cgroup::CANNOT_LIMIT
        );
    }
    let left = cgroups.reap_leftovers();
    if left > 0 {
        log::warn!("killed what {left} jobs of an earlier agent process left in their cgroups");
    }
    Some(cgroups)
}

/// READY=1 went to systemd (`Type=notify`).
static READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells systemd the agent is up (once), with `status`.
fn ready(status: &str) {
    if !READY.swap(true, std::sync::atomic::Ordering::SeqCst) {
        drover_host::notify::ready(status);
    } else {
        drover_host::notify::status(status);
    }
}

/// Under systemd: READY=1 at the latest after `READY_AT_THE_LATEST` (an
/// unreachable coordinator must not hold the machine's boot; the status
/// says why it is not registered), and the watchdog pinged from this
/// runtime's thread, so a blocked agent gets restarted.
async fn systemd_watch() {
    const READY_AT_THE_LATEST: Duration = Duration::from_secs(30);
    let interval = drover_host::notify::watchdog_interval();
    let start = std::time::Instant::now();
    loop {
        let tick = interval
            .unwrap_or(READY_AT_THE_LATEST)
            .min(READY_AT_THE_LATEST);
        tokio::time::sleep(tick).await;
        if start.elapsed() >= READY_AT_THE_LATEST
            && !READY.load(std::sync::atomic::Ordering::SeqCst)
        {
            ready("started; not registered yet (see the journal)");
        }
        match interval {
            Some(_) => {
                drover_host::notify::watchdog();
            }
            None if READY.load(std::sync::atomic::Ordering::SeqCst) => return,
            None => {}
        }
    }
}

/// One agent per state dir: a second would take over the first's worker
/// and delete its identity.
fn lock_state_dir(config: &Config) -> Result<lockfile::Lock, (i32, String)> {
    let path = config.state_dir.join("agent.lock");
    let holder = format!(
        "pid={} host={} name={} coordinator={}",
        std::process::id(),
        lockfile::hostname(),
        config.name,
        config.coordinator
    );
    lockfile::acquire(&path, &holder).map_err(|e| match e {
        lockfile::LockError::Held(who) => (
            EXIT_REFUSED,
            format!(
                "another drover-agent already uses the state dir {} ({who}); stop it, or give this agent its own --state-dir",
                config.state_dir.display()
            ),
        ),
        lockfile::LockError::Io(e) => (1, format!("locking the state dir: {e}")),
    })
}

/// Registers (retrying while the coordinator is unreachable) and keeps the
/// token 0600 in the state dir. `credentials`: the agent's own token first
/// when it has one, then the registration secret; a refused token moves on
/// to the secret (the coordinator's database may be new).
async fn register(
    config: &Config,
    state: &StateDir,
    client: &Arc<Client>,
    gpu: &GpuSource,
    can_limit: bool,
    credentials: Vec<String>,
) -> Result<Identity, (i32, String)> {
    let req = RegisterRequest {
        name: config.name.clone(),
        machine_id: state.machine_id().map_err(|e| (1, e))?,
        inventory: drover_proto::Inventory {
            can_limit,
            ..inventory::inventory(gpu)
        },
        tags: config.tags.clone(),
        slots: config.slots,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let req = Arc::new(req);
    let mut failures = 0;
    let mut errors = Explainer::default();
    let mut credentials = credentials.into_iter().peekable();
    loop {
        let Some(bearer) = credentials.peek().cloned() else {
            return Err((EXIT_REFUSED, "no credential left to register with".into()));
        };
        let (c, r) = (client.clone(), req.clone());
        match off_thread(move || c.register(&bearer, &r)).await {
            Ok(resp) => {
                let id = Identity {
                    worker_id: resp.worker_id,
                    token: resp.token,
                    coordinator: config.coordinator.clone(),
                };
                state.save_identity(&id).map_err(|e| (1, e))?;
                log::info!("registered worker_id={} state={}", id.worker_id, resp.state);
                return Ok(id);
            }
            Err(e) if e.is_transient() => {
                errors.explain("registering", &e);
                drover_host::notify::status(&format!(
                    "not registered yet, retrying: {} answers {e}",
                    config.coordinator
                ));
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
            }
            Err(e) if e.code() == Some("unauthorized") && credentials.len() > 1 => {
                log::warn!(
                    "the coordinator does not know this agent's token (a new database?); registering with the secret"
                );
                credentials.next();
            }
            Err(e) => {
                let code = if e.code() == Some("decommissioned") {
                    EXIT_REVOKED
                } else {
                    EXIT_REFUSED
                };
                let hint = e.hint().map(|h| format!(". Try: {h}")).unwrap_or_default();
                return Err((
                    code,
                    format!("registering with {} failed: {e}{hint}", config.coordinator),
                ));
            }
        }
    }
}
