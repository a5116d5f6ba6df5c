//! A worker's state: each change with its health-log line and event, and
//! the load rule (idle while it runs nothing, busy while it runs a job).
//! Below the registry, the queue and the leases, which all change states.

use super::sql::{Connection, OptionalExtension};
use super::{event, Ms, StoreError};
use crate::lifecycle::WorkerState;
use rusqlite::params;
use serde_json::json;

pub fn state_of(conn: &Connection, worker_id: i64) -> Result<WorkerState, StoreError> {
    conn.prepare_cached("SELECT state FROM workers WHERE id = ?1 AND forgotten_at IS NULL")?
        .query_row([worker_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::not_found(format!("no worker with id {worker_id}")))
}

/// Appends a line to a worker's health log (a state change, or an admin
/// action that keeps the state: then `from` = `to`).
pub fn health_log(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    from: Option<WorkerState>,
    to: WorkerState,
    reason: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO worker_health_log (worker_id, at, from_state, to_state, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![worker_id, now, from, to, reason])?;
    Ok(())
}

/// Changes a worker's state and appends the change to its health log.
/// No-op when the state is already `to`.
pub fn transition(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    to: WorkerState,
    reason: &str,
) -> Result<(), StoreError> {
    let from = state_of(conn, worker_id)?;
    if from == to {
        return Ok(());
    }
    conn.prepare_cached("UPDATE workers SET state = ?2 WHERE id = ?1")?
        .execute(params![worker_id, to])?;
    health_log(conn, now, worker_id, Some(from), to, reason)?;
    let (from, to_name) = (from.as_str(), to.as_str());
    event(
        conn,
        now,
        "worker.state",
        None,
        Some(worker_id),
        json!({"from": from, "to": to_name, "reason": reason}),
    )?;
    let line = format!(
        "worker state changed worker_id={worker_id} from={from} to={to_name} reason={reason:?}"
    );
    if matches!(to, WorkerState::Offline | WorkerState::Decommissioned) {
        log::info!("{line}");
    } else {
        log::debug!("{line}");
    }
    Ok(())
}

/// Moves an idle worker to busy when it runs jobs, and a busy one back to
/// idle when it runs none. Other states are left alone.
pub fn refresh_load(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    reason: &str,
) -> Result<(), StoreError> {
    // EXISTS, not count(*): this runs for every grant and every end, and a
    // count would walk all of a many-slot worker's running jobs each time.
    let (state, running): (WorkerState, bool) = conn
        .prepare_cached(
            "SELECT state, EXISTS (SELECT 1 FROM jobs WHERE worker_id = ?1 AND status = 'running')
             FROM workers WHERE id = ?1",
        )?
        .query_row([worker_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    match (state, running) {
        (WorkerState::Idle, true) => transition(conn, now, worker_id, WorkerState::Busy, reason),
        (WorkerState::Busy, false) => transition(conn, now, worker_id, WorkerState::Idle, reason),
        (WorkerState::Draining, false) => drained(conn, now, worker_id),
        _ => Ok(()),
    }
}

/// A draining worker ran its last job: say so (it stays drained).
fn drained(conn: &Connection, now: Ms, worker_id: i64) -> Result<(), StoreError> {
    event(
        conn,
        now,
        "worker.drained",
        None,
        Some(worker_id),
        json!({}),
    )?;
    log::info!("worker drained, running nothing worker_id={worker_id}");
    Ok(())
}
