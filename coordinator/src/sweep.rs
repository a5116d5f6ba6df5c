//! The sweep: every second, end leases past their deadline (re-queue or
//! fail the job), mark silent workers offline, and wake parked claims when
//! a delayed job (backoff, not_before) becomes claimable.

use crate::api::App;
use crate::db::{jobs, ms, workers, Ms};
use crate::error::ApiError;
use std::time::Duration;

pub const INTERVAL: Duration = Duration::from_secs(1);

/// What one pass changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub expired: usize,
    pub offline: usize,
    pub became_ready: usize,
}

pub async fn run(app: std::sync::Arc<App>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = app.db.clock().now();
    loop {
        tick.tick().await;
        match run_once(&app, last).await {
            Ok((swept, now)) => {
                last = now;
                if swept.expired > 0 || swept.offline > 0 {
                    log::info!(
                        "sweep expired_leases={} workers_offline={}",
                        swept.expired,
                        swept.offline
                    );
                }
            }
            Err(e) => log::error!("sweep failed: {e}"),
        }
    }
}

/// One pass; `since` is the time of the previous pass. Returns what changed
/// and the time of this pass.
pub async fn run_once(app: &App, since: Ms) -> Result<(Swept, Ms), ApiError> {
    let silence = app.config.lease_ttl;
    let history = app.config.gpu_history;
    let (swept, now) = app
        .db
        .write(move |c, now| {
            let expired = jobs::expire_leases(c, now)?;
            let offline =
                workers::mark_silent_offline(c, now, now - ms(silence), silence.as_secs())?;
            let became_ready = jobs::count_became_ready(c, since, now)?;
            workers::prune_gpu_history(c, now - ms(history))?;
            Ok((
                Swept {
                    expired,
                    offline,
                    became_ready,
                },
                now,
            ))
        })
        .await?;
    if swept.expired > 0 || swept.became_ready > 0 {
        app.wake_claimers();
    }
    Ok((swept, now))
}
