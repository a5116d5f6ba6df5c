//! Waiting agents and the dispatch loop. An agent's claim parks here (a
//! future, no thread); whenever something changes (a job submitted or
//! re-queued, a slot freed, a worker approved, a cancel), one dispatch round
//! runs (`db::dispatch::round`) and answers the parked claims it gave work
//! or orders to. Rounds are serialized and coalesced: many changes while a
//! round runs cause one more round, not many.
//!
//! A round that finds claimable jobs but can place none ("stuck": a GPU job
//! and only CPU workers, say) would otherwise run again at every re-park,
//! each time loading the whole fleet: with 10,000 agents re-parking that
//! was ~290 rounds/s and half a core. After such a round, re-parks alone
//! wait out `STUCK_PAUSE`; a change of work (a submission, a report, a
//! freed slot, a worker approved or back, a cancel) still runs one at once.

use crate::app::App;
use crate::db::ms;
use drover_proto::ClaimResponse;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long re-parks alone wait for a round after a stuck one.
const STUCK_PAUSE: Duration = Duration::from_millis(100);

/// The dispatch loop: one round per kick (coalesced).
pub async fn run(app: Arc<App>) {
    // Next time a delayed job becomes claimable (the clock's ms).
    let mut next_ready: Option<crate::db::Ms> = None;
    let mut stuck_at: Option<tokio::time::Instant> = None;
    let d = &app.dispatcher;
    loop {
        let wait_ms = next_ready.map(|t| (t - app.db.clock().now()).max(0) as u64);
        let timer = tokio::select! {
            _ = d.kicked() => false,
            _ = sleep_ms(wait_ms) => true,
        };
        if let Some(at) = stuck_at {
            if !timer && !d.worked() {
                tokio::select! {
                    _ = tokio::time::sleep_until(at + STUCK_PAUSE) => {}
                    _ = d.work_changed() => {}
                }
            }
        }
        d.round_starts();
        let start = tokio::time::Instant::now();
        let result = round(&app).await;
        d.release_held();
        match result {
            Ok((next, stuck)) => {
                next_ready = next;
                stuck_at = stuck.then_some(start);
            }
            Err(e) => {
                log::error!("dispatch round failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                app.dispatcher.kick();
            }
        }
    }
}

async fn sleep_ms(ms: Option<u64>) {
    match ms {
        Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        None => std::future::pending().await,
    }
}

/// One round; returns when the next delayed job becomes claimable, and
/// whether it was stuck (jobs claimable, none placed, no orders).
async fn round(app: &App) -> Result<(Option<crate::db::Ms>, bool), crate::error::ApiError> {
    let d = &app.dispatcher;
    let waiting = d.hold_waiting();
    if waiting.is_empty() {
        return Ok((None, false));
    }
    let ttl = ms(app.config.lease_ttl);
    let reserve_after = ms(app.config.reserve_after);
    let start = std::time::Instant::now();
    let result = app
        .db
        .dispatch_round(waiting, ttl, reserve_after, d.last_given())
        .await?;
    d.note_given(&result.given);
    let m = &app.metrics;
    m.dispatch_round.observe(start.elapsed().as_secs_f64());
    m.dispatched
        .fetch_add(result.waits.len() as u64, Ordering::Relaxed);
    for w in &result.waits {
        m.queue_wait.observe(*w as f64 / 1000.0);
    }
    let next_ready = result.next_ready;
    let stuck = result.ready && result.answers.is_empty();
    let mut undelivered = Vec::new();
    for (worker, (jobs, orders)) in result.answers {
        let parked = d.take(worker);
        let granted: Vec<(i64, i64, Vec<u32>)> = jobs
            .iter()
            .map(|a| (a.job_id, a.attempt, a.gpu_indices.clone()))
            .collect();
        let sent = match parked {
            Some(reply) => reply
                .send(ClaimResponse {
                    jobs,
                    orders,
                    completed: Vec::new(),
                    beat: None,
                })
                .is_ok(),
            None => false,
        };
        // Logged once the reply is on its way: the line is not in its path.
        for (job, attempt, gpus) in &granted {
            log::info!(
                "job started job_id={job} attempt={attempt} worker_id={worker} gpus={gpus:?}"
            );
        }
        if !sent {
            undelivered.extend(granted.into_iter().map(|(j, a, _)| (worker, j, a)));
        }
    }
    release(app, undelivered).await?;
    Ok((next_ready, stuck))
}

/// Puts back grants whose claim could not take them (it was gone, or it
/// failed after being answered): (worker, job, attempt).
pub async fn release(
    app: &App,
    grants: Vec<(i64, i64, i64)>,
) -> Result<(), crate::error::ApiError> {
    if grants.is_empty() {
        return Ok(());
    }
    log::info!(
        "{} grants could not be delivered (claim gone or refused); re-queued",
        grants.len()
    );
    app.db.release_undelivered(grants).await?;
    app.dispatcher.kick();
    Ok(())
}
