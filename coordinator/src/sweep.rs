//! The sweep: every second, end leases past their deadline (re-queue or
//! fail the job), mark silent workers offline, and prune old GPU samples.
//! Retention (finished jobs and events past --retention-days) runs in its
//! own loop: a batch a second, or one every 100 ms while it is behind.

use crate::app::App;
use crate::db::{ms, retention, wall_offset, Ms};
use crate::error::ApiError;
use std::time::Duration;

pub const INTERVAL: Duration = Duration::from_secs(1);

/// What one pass changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub expired: usize,
    pub offline: usize,
    /// The pass's write, queue and commit included.
    pub took: Duration,
    /// Jobs waiting for `not_before` re-timed after a wall-clock step.
    pub retimed: usize,
    /// The wall clock's offset this pass went by.
    pub wall_offset: Ms,
    /// When a worker was last heard from, if a whole TTL ago: leases held.
    pub deaf: Option<Ms>,
    /// Leases given a fresh TTL on hearing a worker again.
    pub rebased: usize,
}

/// Passes between looks for workers and agent log lines to forget
/// (--forget-offline-after, --agent-log-hours).
const FORGET_EVERY: u32 = 10;

async fn forget(app: &App) {
    if let Some(after) = app.config.forget_offline_after {
        if let Err(e) = app.db.forget_silent(after).await {
            log::warn!("forgetting silent workers failed: {e}");
        }
    }
    if let Some(keep) = app.config.agent_log {
        if let Err(e) = app.db.prune_agent_log(keep).await {
            log::warn!("pruning agent log lines failed: {e}");
        }
    }
}

/// Passes between WAL checkpoints.
const CHECKPOINT_EVERY: u32 = 30;

pub async fn run(app: std::sync::Arc<App>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut passes = 0u32;
    let mut offset = wall_offset(app.db.clock().now());
    // No worker heard from for a TTL at the last pass: leases held.
    let mut deaf = false;
    // systemd's watchdog (WatchdogSec=): a pass a second shows the runtime
    // runs; a stuck one gets the coordinator restarted.
    let watchdog = drover_host::notify::watchdog_interval().is_some();
    loop {
        tick.tick().await;
        if watchdog {
            drover_host::notify::watchdog();
        }
        passes = passes.wrapping_add(1);
        // One coordinator of a shared database sweeps (PostgreSQL).
        if !app.db.check_file() || !app.db.leads().await {
            continue;
        }
        if passes.is_multiple_of(CHECKPOINT_EVERY) {
            // Keeps the WAL small even when readers (sqlite3, the dashboard)
            // kept SQLite's own checkpoints from finishing.
            match app.db.checkpoint().await {
                Ok((frames, done)) if frames > 0 && done < frames => {
                    log::warn!("WAL checkpoint incomplete: {done} of {frames} frames (a reader holds a snapshot)")
                }
                Ok(_) => {}
                Err(e) => log::warn!("WAL checkpoint failed: {e}"),
            }
        }
        if passes.is_multiple_of(FORGET_EVERY) {
            forget(&app).await;
        }
        match run_once(&app, offset, deaf).await {
            Ok(swept) => {
                if swept.wall_offset != offset {
                    log::warn!(
                        "the wall clock stepped {:+.1} s; leases keep the monotonic clock, {} jobs waiting for not_before re-timed",
                        (swept.wall_offset - offset) as f64 / 1000.0,
                        swept.retimed
                    );
                    offset = swept.wall_offset;
                }
                log_deafness(deaf, &swept, app.db.clock().now());
                deaf = swept.deaf.is_some();
                if swept.expired > 0 || swept.offline > 0 {
                    log::info!(
                        "sweep expired_leases={} workers_offline={} took_ms={:.1}",
                        swept.expired,
                        swept.offline,
                        swept.took.as_secs_f64() * 1000.0
                    );
                }
            }
            Err(e) => log::error!("sweep failed: {e}"),
        }
    }
}

/// Says when the coordinator starts or stops hearing from no worker.
fn log_deafness(was_deaf: bool, swept: &Swept, now: Ms) {
    match (was_deaf, swept.deaf) {
        (false, Some(heard)) => log::warn!(
            "no agent heard from for {:.0} s: this coordinator may be the one cut off; \
             leases are held (no job moves) until an agent is heard again",
            (now - heard) as f64 / 1000.0
        ),
        (true, None) => log::warn!(
            "an agent is heard again: {} running leases get a fresh TTL to be renewed",
            swept.rebased
        ),
        _ => {}
    }
}

/// One pass, `was` the wall clock's offset at the last and `was_deaf`
/// whether it heard no worker; returns what changed.
pub async fn run_once(app: &App, was: Ms, was_deaf: bool) -> Result<Swept, ApiError> {
    let ttl = ms(app.config.lease_ttl);
    let history = ms(app.config.gpu_history);
    let start = std::time::Instant::now();
    let pass = app.db.sweep(ttl, history, was, was_deaf).await?;
    let swept = Swept {
        expired: pass.expired,
        offline: pass.offline,
        took: start.elapsed(),
        retimed: pass.retimed,
        wall_offset: pass.wall_offset,
        deaf: pass.deaf,
        rebased: pass.rebased,
    };
    app.metrics
        .leases_expired
        .fetch_add(swept.expired as u64, std::sync::atomic::Ordering::Relaxed);
    if swept.expired > 0 || swept.retimed > 0 {
        app.wake_claimers();
    }
    Ok(swept)
}

/// Pause between retention batches while it is behind: a fleet finishing
/// more jobs a second than one batch a second prunes would otherwise grow
/// its database without bound.
const CATCH_UP: Duration = Duration::from_millis(100);

/// Retention: deletes finished jobs (with their attempts and logs) and
/// events older than `--retention-days`, a batch at a time, each its own
/// write so that claims and heartbeats go in between.
pub async fn retain(app: std::sync::Arc<App>) {
    let Some(keep) = app.config.retention else {
        return;
    };
    loop {
        if !app.db.leads().await {
            tokio::time::sleep(INTERVAL).await;
            continue;
        }
        let pruned = app.db.prune(ms(keep)).await;
        let behind = match pruned {
            Ok((jobs, events)) => {
                if jobs > 0 || events > 0 {
                    log::debug!("retention pruned jobs={jobs} events={events}");
                }
                jobs == retention::PRUNE_JOBS || events == retention::PRUNE_EVENTS
            }
            Err(e) => {
                log::error!("retention failed: {e}");
                false
            }
        };
        tokio::time::sleep(if behind { CATCH_UP } else { INTERVAL }).await;
    }
}
