//! Worker registry: registration, authentication, heartbeats, state changes.

use super::sql::{Connection, OptionalExtension};
use super::worker_state::{health_log, refresh_load, state_of, transition};
use super::StoreError;
use super::{event, json_col, leases, Ms};
use crate::lifecycle::{JobStatus, WorkerState};
use crate::model::{GpuSample, HealthChange, RecentAttempt, Stats, Worker, WorkerDetail};
use drover_proto::{HeartbeatRequest, Order, RegisterRequest};
use rusqlite::params;
use serde_json::json;

/// States in which a worker is approved and alive.
pub const LIVE_STATES: &str = "('idle', 'busy', 'draining')";

/// Workers waiting for approval, at most: the registration secret alone
/// cannot grow the registry without bound.
const MAX_PENDING: i64 = 1000;

/// Marks the incarnation of an agent process that said it is exiting.
const STOPPED: &str = "stopped:";

/// The agent behind a token.
#[derive(Debug, Clone)]
pub struct Agent {
    pub id: i64,
}

/// The worker a token belongs to; a decommissioned worker's token is
/// refused with its own code, so its agent knows to stop for good.
pub fn authenticate(conn: &Connection, token_hash: &str) -> Result<Option<Agent>, StoreError> {
    let found: Option<(i64, WorkerState)> = conn
        .prepare_cached("SELECT id, state FROM workers WHERE token_hash = ?1")?
        .query_row([token_hash], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match found {
        Some((id, WorkerState::Decommissioned)) => Err(decommissioned(id)),
        found => Ok(found.map(|(id, _)| Agent { id })),
    }
}

/// Refuses a decommissioned worker's agent (its token may still sit in a
/// cache); checked again inside every heartbeat and claim.
fn check_not_decommissioned(conn: &Connection, worker_id: i64) -> Result<WorkerState, StoreError> {
    let state = state_of(conn, worker_id)?;
    if state == WorkerState::Decommissioned {
        return Err(decommissioned(worker_id));
    }
    Ok(state)
}

/// An offline worker is heard from again: draining if it was drained, else
/// idle or busy.
fn back_online(conn: &Connection, now: Ms, worker_id: i64, reason: &str) -> Result<(), StoreError> {
    let drain: bool = conn
        .prepare_cached("SELECT drain FROM workers WHERE id = ?1")?
        .query_row([worker_id], |r| r.get(0))?;
    transition(
        conn,
        now,
        worker_id,
        if drain {
            WorkerState::Draining
        } else {
            WorkerState::Idle
        },
        reason,
    )?;
    refresh_load(conn, now, worker_id, reason)
}

/// Who is registering: an agent presenting its own token (proven to be
/// that worker), or a holder of the registration secret.
#[derive(Debug, Clone, Copy)]
pub enum Registrant {
    Proven(i64),
    /// `alive_since`: a worker heard from after this is someone else's live
    /// agent, never to be taken over by the secret alone.
    Secret {
        alive_since: Ms,
    },
}

/// Registers a machine, or re-registers it. An agent proven by its token
/// updates its own row. The secret alone creates a worker, or re-registers
/// one (same machine id and name) only when its agent is gone (offline,
/// stopped, silent): then it waits for approval again, unless auto-approve
/// is on. A live worker's identity is never handed to the secret (409).
pub fn register(
    conn: &Connection,
    now: Ms,
    req: &RegisterRequest,
    token_hash: &str,
    auto_approve: bool,
    who: Registrant,
    address: &str,
) -> Result<(i64, String), StoreError> {
    let named: Option<(i64, WorkerState, Ms, Option<String>)> = conn
        .prepare_cached(
            "SELECT id, state, coalesce(last_seen_at, 0), incarnation FROM workers
             WHERE machine_id = ?1 AND name = ?2",
        )?
        .query_row(params![req.machine_id, req.name], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let id = match (who, named) {
        (_, Some((_, WorkerState::Decommissioned, ..))) => {
            return Err(StoreError::forbidden(
                "decommissioned",
                format!(
                    "worker {:?} on this machine was decommissioned and may not register again",
                    req.name
                ),
            ))
        }
        (Registrant::Proven(id), Some((other, ..))) if other != id => {
            return Err(StoreError::conflict(
                "name_taken",
                format!(
                    "worker {other} already has the name {:?} on this machine; choose another --name",
                    req.name
                ),
            )
            .with_field("name"))
        }
        (Registrant::Proven(id), _) => {
            check_not_decommissioned(conn, id)?;
            update_registered(conn, now, id, req, token_hash, address)?;
            id
        }
        (Registrant::Secret { alive_since }, Some((id, state, seen, incarnation))) => {
            let gone = state == WorkerState::Offline
                || seen < alive_since
                || incarnation.is_some_and(|i| i.starts_with(STOPPED));
            if !gone {
                return Err(worker_alive(id, &req.name));
            }
            update_registered(conn, now, id, req, token_hash, address)?;
            if !auto_approve {
                transition(
                    conn,
                    now,
                    id,
                    WorkerState::Pending,
                    "re-registered without its token: waiting for approval",
                )?;
            }
            id
        }
        (Registrant::Secret { .. }, None) => {
            return insert_registered(conn, now, req, token_hash, auto_approve, address)
        }
    };
    let state = state_of(conn, id)?;
    log::info!(
        "worker re-registered worker_id={id} name={:?} state={}",
        req.name,
        state.as_str()
    );
    Ok((id, state.as_str().to_string()))
}

/// The refusal of the secret for a worker whose agent is alive.
fn worker_alive(id: i64, name: &str) -> StoreError {
    StoreError::conflict(
        "worker_alive",
        format!(
            "worker {id} ({name:?} on this machine) is registered and its agent is alive; \
             an agent re-registers with its own token (identity.json in its state dir). \
             If that agent is gone, this one can register once the worker is offline"
        ),
    )
    .with_field("name")
}

/// The refusal of a decommissioned worker's agent.
pub fn decommissioned(id: i64) -> StoreError {
    StoreError::revoked(
        "decommissioned",
        format!("worker {id} was decommissioned by an admin; its token no longer works"),
    )
}

/// Re-registration of an existing worker: new token and inventory, the
/// leases its previous agent held released.
fn update_registered(
    conn: &Connection,
    now: Ms,
    id: i64,
    req: &RegisterRequest,
    token_hash: &str,
    address: &str,
) -> Result<(), StoreError> {
    let inv = &req.inventory;
    let (gpus, tags, slots) = stored_inventory(req)?;
    conn.prepare_cached(
        "UPDATE workers SET token_hash = ?2, hostname = ?3, cpu_cores = ?4, memory_mb = ?5,
         gpus = ?6, tags = CASE WHEN tags_pinned = 1 THEN tags ELSE ?7 END, slots = ?8,
         agent_version = ?9, last_seen_at = ?10, incarnation = NULL,
         machine_id = ?11, name = ?12, address = ?13, can_limit = ?14 WHERE id = ?1",
    )?
    .execute(params![
        id,
        token_hash,
        inv.hostname,
        inv.cpu_cores,
        inv.memory_mb as i64,
        gpus,
        tags,
        slots,
        req.agent_version,
        now,
        req.machine_id,
        req.name,
        address,
        inv.can_limit
    ])?;
    // Whatever the old token's agent ran is gone with it.
    leases::release_worker_jobs(conn, now, id, crate::lifecycle::LostReason::AgentRestarted)?;
    if matches!(
        state_of(conn, id)?,
        WorkerState::Offline | WorkerState::Stopped
    ) {
        back_online(conn, now, id, "re-registered")?;
    }
    refresh_load(conn, now, id, "re-registered")?;
    event(
        conn,
        now,
        "worker.registered",
        None,
        Some(id),
        json!({"name": req.name, "again": true}),
    )
}

/// A registration's GPUs and tags as stored (JSON), and its slots (one per
/// GPU, at least one, unless given).
fn stored_inventory(req: &RegisterRequest) -> Result<(String, String, u32), StoreError> {
    let json =
        |v: Result<String, serde_json::Error>| v.map_err(|e| StoreError::internal(e.to_string()));
    let gpus = json(serde_json::to_string(&req.inventory.gpus))?;
    let tags = json(serde_json::to_string(&req.tags))?;
    let slots = req
        .slots
        .unwrap_or_else(|| (req.inventory.gpus.len() as u32).max(1));
    Ok((gpus, tags, slots))
}

/// A new worker: pending, or idle when auto-approved.
fn insert_registered(
    conn: &Connection,
    now: Ms,
    req: &RegisterRequest,
    token_hash: &str,
    auto_approve: bool,
    address: &str,
) -> Result<(i64, String), StoreError> {
    let inv = &req.inventory;
    let (gpus, tags, slots) = stored_inventory(req)?;
    let state = if auto_approve {
        WorkerState::Idle
    } else {
        WorkerState::Pending
    };
    if !auto_approve {
        let pending: i64 = conn
            .prepare_cached("SELECT count(*) FROM workers WHERE state = 'pending'")?
            .query_row(params![], |r| r.get(0))?;
        if pending >= MAX_PENDING {
            return Err(StoreError::limited(
                "too_many_pending",
                format!(
                    "{pending} workers already wait for approval: approve or reject them first"
                ),
            ));
        }
    }
    conn.prepare_cached(
        "INSERT INTO workers (name, machine_id, state, token_hash, hostname, cpu_cores,
         memory_mb, gpus, tags, slots, agent_version, registered_at, last_seen_at, address, can_limit)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?14)",
    )?
    .execute(params![
        req.name,
        req.machine_id,
        state,
        token_hash,
        inv.hostname,
        inv.cpu_cores,
        inv.memory_mb as i64,
        gpus,
        tags,
        slots,
        req.agent_version,
        now,
        address,
        inv.can_limit
    ])?;
    let id = conn.last_insert_rowid()?;
    let reason = if auto_approve {
        "registered (auto-approved)"
    } else {
        "registered, waiting for approval"
    };
    health_log(conn, now, id, None, state, reason)?;
    event(
        conn,
        now,
        "worker.registered",
        None,
        Some(id),
        json!({"name": req.name, "state": state.as_str(), "gpus": inv.gpus.len()}),
    )?;
    log::info!(
        "worker registered worker_id={id} name={:?} gpus={} state={state}",
        req.name,
        inv.gpus.len()
    );
    Ok((id, state.to_string()))
}

/// What a heartbeat changed: the worker's state and orders for the agent.
pub struct Beat {
    pub state: String,
    pub orders: Vec<Order>,
    /// True when leases were released (a re-queue happened).
    pub released: bool,
}

/// Records a heartbeat: liveness, metrics, the agent's process identity, and
/// renewal of every lease it reports. Returns cancel orders for leases it
/// reports but no longer holds; releases those it holds but has not
/// reported although granted more than `report_grace` ago.
pub fn heartbeat(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    req: &HeartbeatRequest,
    (lease_ttl, report_grace): (Ms, Ms),
    prefix: &str,
) -> Result<Beat, StoreError> {
    let state = check_not_decommissioned(conn, worker_id)?;
    let mut released = adopt_incarnation(conn, now, worker_id, &req.incarnation)?;
    check_gpu_metrics(conn, worker_id, req, prefix)?;
    let metrics =
        serde_json::to_string(&req.gpus).map_err(|e| StoreError::internal(e.to_string()))?;
    conn.prepare_cached("UPDATE workers SET last_seen_at = ?2, gpu_metrics = ?3 WHERE id = ?1")?
        .execute(params![worker_id, now, metrics])?;
    let last_sample: Option<Ms> = conn
        .prepare_cached("SELECT max(at) FROM gpu_metrics WHERE worker_id = ?1")?
        .query_row([worker_id], |r| r.get(0))?;
    // History keeps a sample per half interval at most, however often an
    // agent beats: one token cannot grow it faster.
    let sample = last_sample.is_none_or(|at| now - at >= report_grace / 2);
    for g in req.gpus.iter().filter(|_| sample) {
        conn.prepare_cached(
            "INSERT INTO gpu_metrics (worker_id, gpu_index, at, utilization_pct, memory_used_mb, temperature_c, power_w)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            worker_id,
            g.index,
            now,
            g.utilization_pct,
            g.memory_used_mb as i64,
            g.temperature_c,
            g.power_w
        ])?;
    }
    if state == WorkerState::Offline || (state == WorkerState::Stopped && !req.stopping) {
        back_online(conn, now, worker_id, "heartbeat resumed")?;
    }
    // Older agents send their lines with heartbeats, as plain text.
    let legacy: Vec<_> = req
        .log_lines
        .iter()
        .map(|l| super::agent_log::from_legacy(now, l))
        .collect();
    super::agent_log::append(conn, now, worker_id, &legacy)?;
    let renewal = leases::renew_leases(
        conn,
        now,
        worker_id,
        &req.leases,
        (lease_ttl, report_grace),
        req.stopping,
    )?;
    leases::record_progress(conn, now, worker_id, &req.progress)?;
    released |= renewal.released;
    if req.stopping {
        conn.prepare_cached("UPDATE workers SET incarnation = ?2 WHERE id = ?1")?
            .execute(params![worker_id, format!("{STOPPED}{}", req.incarnation)])?;
        log::info!("agent stopping worker_id={worker_id}");
        stop_if_idle(conn, now, worker_id)?;
    }
    Ok(Beat {
        state: state_of(conn, worker_id)?.as_str().to_string(),
        orders: renewal.orders,
        released,
    })
}

/// A heartbeat's GPU metrics must name the worker's registered GPUs, each
/// once (`prefix` names where the heartbeat sits in the body).
fn check_gpu_metrics(
    conn: &Connection,
    worker_id: i64,
    req: &HeartbeatRequest,
    prefix: &str,
) -> Result<(), StoreError> {
    if req.gpus.is_empty() {
        return Ok(());
    }
    let count: i64 = conn
        .prepare_cached("SELECT json_array_length(gpus) FROM workers WHERE id = ?1")?
        .query_row([worker_id], |r| r.get(0))?;
    let mut seen = std::collections::HashSet::new();
    for (i, g) in req.gpus.iter().enumerate() {
        if i64::from(g.index) >= count || !seen.insert(g.index) {
            return Err(StoreError::invalid(
                &format!("{prefix}gpus[{i}].index"),
                format!(
                    "GPU {} is not one of this worker's {count} registered GPUs (or is listed twice)",
                    g.index
                ),
            ));
        }
    }
    Ok(())
}

/// Adopts the agent process behind a heartbeat. A different process than
/// last time means the agent restarted: the jobs the old one ran died with
/// it and are released at once (instead of after a lease TTL). True if any
/// were. Only heartbeats (and registration) change the incarnation.
fn adopt_incarnation(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    incarnation: &str,
) -> Result<bool, StoreError> {
    let known: Option<String> = conn
        .prepare_cached("SELECT incarnation FROM workers WHERE id = ?1")?
        .query_row([worker_id], |r| r.get(0))?;
    if known.as_deref() == Some(incarnation) {
        return Ok(false);
    }
    if known.as_deref().and_then(|k| k.strip_prefix(STOPPED)) == Some(incarnation) {
        // A stopping agent keeps heartbeating for the jobs it lets finish.
        return Ok(false);
    }
    let released = match known {
        Some(_) => {
            leases::release_worker_jobs(
                conn,
                now,
                worker_id,
                crate::lifecycle::LostReason::AgentRestarted,
            )? > 0
        }
        None => false,
    };
    conn.prepare_cached("UPDATE workers SET incarnation = ?2 WHERE id = ?1")?
        .execute(params![worker_id, incarnation])?;
    Ok(released)
}

fn stopped() -> StoreError {
    StoreError::conflict(
        "agent_stopped",
        "this agent process said it was stopping; a new process must be started",
    )
}

/// A claim must come from the agent process whose heartbeat was seen last,
/// so that a claim left parked by a dead process cannot take a job.
pub fn check_incarnation(
    conn: &Connection,
    worker_id: i64,
    incarnation: &str,
) -> Result<(), StoreError> {
    check_not_decommissioned(conn, worker_id)?;
    let known: Option<String> = conn
        .prepare_cached("SELECT incarnation FROM workers WHERE id = ?1")?
        .query_row([worker_id], |r| r.get(0))?;
    match known.as_deref() {
        Some(k) if k == incarnation => Ok(()),
        Some(k) if k.strip_prefix(STOPPED) == Some(incarnation) => Err(stopped()),
        _ => Err(StoreError::conflict(
            "unknown_incarnation",
            "no heartbeat from this agent process yet (or a newer one took over): heartbeat, then claim",
        )
        .with_field("incarnation")),
    }
}

pub fn approve(conn: &Connection, now: Ms, worker_id: i64) -> Result<WorkerDetail, StoreError> {
    let state = state_of(conn, worker_id)?;
    match state {
        WorkerState::Pending => {
            transition(conn, now, worker_id, WorkerState::Idle, "approved by admin")?;
            get(conn, now, worker_id)
        }
        WorkerState::Decommissioned => Err(StoreError::conflict(
            "decommissioned",
            format!("worker {worker_id} is decommissioned and cannot be approved"),
        )),
        _ => get(conn, now, worker_id),
    }
}

/// Admin actions on a worker. `why` is the admin's reason, if given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reject,
    Drain,
    Undrain,
    Decommission,
}

pub fn act(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    action: Action,
    why: Option<&str>,
) -> Result<WorkerDetail, StoreError> {
    apply_action(conn, now, worker_id, action, why)?;
    get(conn, now, worker_id)
}

fn apply_action(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    action: Action,
    why: Option<&str>,
) -> Result<(), StoreError> {
    let state = state_of(conn, worker_id)?;
    let reason = |what: &str| match why {
        Some(w) if !w.is_empty() => format!("{what} by admin: {w}"),
        _ => format!("{what} by admin"),
    };
    let conflict = |msg: String| Err(StoreError::conflict("invalid_state", msg));
    match (action, state) {
        (_, WorkerState::Decommissioned) => {
            return conflict(format!("worker {worker_id} is decommissioned"))
        }
        (Action::Reject, WorkerState::Pending) => {
            let to = WorkerState::Decommissioned;
            transition(conn, now, worker_id, to, &reason("rejected"))?;
        }
        (Action::Reject, other) => {
            return conflict(format!(
                "worker {worker_id} is {other}, not pending: decommission it instead"
            ))
        }
        (Action::Drain, _) => {
            conn.prepare_cached("UPDATE workers SET drain = 1 WHERE id = ?1")?
                .execute([worker_id])?;
            if state.takes_work() {
                let to = WorkerState::Draining;
                transition(conn, now, worker_id, to, &reason("drained"))?;
                refresh_load(conn, now, worker_id, "drained")?;
            }
        }
        (Action::Undrain, _) => {
            conn.prepare_cached("UPDATE workers SET drain = 0 WHERE id = ?1")?
                .execute([worker_id])?;
            if state == WorkerState::Draining {
                let to = WorkerState::Idle;
                transition(conn, now, worker_id, to, &reason("undrained"))?;
                refresh_load(conn, now, worker_id, "undrained")?;
            }
        }
        (Action::Decommission, _) => {
            // Its token is refused from now on (authenticate, heartbeat
            // and claim check the state); what it ran goes back to the
            // queue without spending an attempt.
            conn.prepare_cached(
                "UPDATE workers SET drain = 0, decommissioned_at = ?2 WHERE id = ?1",
            )?
            .execute(params![worker_id, now])?;
            leases::release_worker_jobs(
                conn,
                now,
                worker_id,
                crate::lifecycle::LostReason::Decommissioned,
            )?;
            transition(
                conn,
                now,
                worker_id,
                WorkerState::Decommissioned,
                &reason("decommissioned"),
            )?;
        }
    }
    Ok(())
}

/// Sets a worker's tags; from then on the agent's `--tags` no longer apply.
pub fn set_tags(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    tags: &[String],
) -> Result<WorkerDetail, StoreError> {
    pin_tags(conn, now, worker_id, tags)?;
    get(conn, now, worker_id)
}

fn pin_tags(conn: &Connection, now: Ms, worker_id: i64, tags: &[String]) -> Result<(), StoreError> {
    let state = state_of(conn, worker_id)?;
    let text = serde_json::to_string(tags).map_err(|e| StoreError::internal(e.to_string()))?;
    conn.prepare_cached("UPDATE workers SET tags = ?2, tags_pinned = 1 WHERE id = ?1")?
        .execute(params![worker_id, text])?;
    let reason = format!("tags set by admin: {}", tags.join(", "));
    health_log(conn, now, worker_id, Some(state), state, &reason)?;
    event(
        conn,
        now,
        "worker.tags",
        None,
        Some(worker_id),
        json!({"tags": tags}),
    )?;
    log::info!("worker tags set by admin worker_id={worker_id} tags={tags:?}");
    Ok(())
}

/// What `PATCH /api/v1/workers/{id}` changes, each part optional, all in
/// one transaction.
#[derive(Debug, Default)]
pub struct Patch {
    pub tags: Option<Vec<String>>,
    /// Replaces the whole object.
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub slots: Option<u32>,
    pub drain: Option<bool>,
}

pub fn patch(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    p: &Patch,
) -> Result<WorkerDetail, StoreError> {
    let state = state_of(conn, worker_id)?;
    if state == WorkerState::Decommissioned {
        return Err(StoreError::conflict(
            "invalid_state",
            format!("worker {worker_id} is decommissioned"),
        ));
    }
    if let Some(tags) = &p.tags {
        pin_tags(conn, now, worker_id, tags)?;
    }
    if let Some(metadata) = &p.metadata {
        let text =
            serde_json::to_string(metadata).map_err(|e| StoreError::internal(e.to_string()))?;
        conn.prepare_cached("UPDATE workers SET metadata = ?2 WHERE id = ?1")?
            .execute(params![worker_id, text])?;
        event(
            conn,
            now,
            "worker.metadata",
            None,
            Some(worker_id),
            json!({"metadata": metadata}),
        )?;
    }
    if let Some(slots) = p.slots {
        conn.prepare_cached("UPDATE workers SET slots = ?2 WHERE id = ?1")?
            .execute(params![worker_id, slots])?;
        let reason = format!("slots set by admin: {slots}");
        health_log(conn, now, worker_id, Some(state), state, &reason)?;
        event(
            conn,
            now,
            "worker.slots",
            None,
            Some(worker_id),
            json!({"slots": slots}),
        )?;
    }
    match p.drain {
        Some(true) => apply_action(conn, now, worker_id, Action::Drain, None)?,
        Some(false) => apply_action(conn, now, worker_id, Action::Undrain, None)?,
        None => {}
    }
    get(conn, now, worker_id)
}

/// An admin registers a worker ahead of its agent: approved at once. The
/// agent starts with the returned token (`--token`) instead of the secret.
pub fn preregister(
    conn: &Connection,
    now: Ms,
    name: &str,
    tags: &[String],
    slots: u32,
    token_hash: &str,
) -> Result<WorkerDetail, StoreError> {
    let tags_text = serde_json::to_string(tags).map_err(|e| StoreError::internal(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO workers (name, state, token_hash, tags, tags_pinned, slots, registered_at)
         VALUES (?1, 'idle', ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        name,
        token_hash,
        tags_text,
        !tags.is_empty(),
        slots,
        now
    ])?;
    let id = conn.last_insert_rowid()?;
    health_log(
        conn,
        now,
        id,
        None,
        WorkerState::Idle,
        "pre-registered by admin",
    )?;
    event(
        conn,
        now,
        "worker.registered",
        None,
        Some(id),
        json!({"name": name, "pre_registered": true}),
    )?;
    log::info!("worker pre-registered worker_id={id} name={name:?}");
    get(conn, now, id)
}

/// A stopping agent that holds nothing any more: its worker is `stopped`
/// at once (not idle until its TTL runs out).
fn stop_if_idle(conn: &Connection, now: Ms, worker_id: i64) -> Result<(), StoreError> {
    let (state, running): (WorkerState, bool) = conn
        .prepare_cached(
            "SELECT state, EXISTS (SELECT 1 FROM jobs WHERE worker_id = ?1 AND status = 'running')
             FROM workers WHERE id = ?1",
        )?
        .query_row([worker_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if running
        || !matches!(
            state,
            WorkerState::Idle | WorkerState::Busy | WorkerState::Draining
        )
    {
        return Ok(());
    }
    let reason = "its agent stopped gracefully";
    transition(conn, now, worker_id, WorkerState::Stopped, reason)?;
    event(
        conn,
        now,
        "worker.stopped",
        None,
        Some(worker_id),
        json!({}),
    )?;
    log::info!("worker stopped worker_id={worker_id}");
    Ok(())
}

/// Forgets a worker: gone from every listing, its token dead, its machine
/// and name free to register anew as a new worker; its row stays for the
/// history that names it (health log, attempts, events).
fn forget(conn: &Connection, now: Ms, worker_id: i64, reason: &str) -> Result<(), StoreError> {
    let state = state_of(conn, worker_id)?;
    health_log(conn, now, worker_id, Some(state), state, reason)?;
    conn.prepare_cached(
        "UPDATE workers SET forgotten_at = ?2, token_hash = NULL, machine_id = NULL,
         incarnation = NULL, reserved_for = NULL WHERE id = ?1",
    )?
    .execute(params![worker_id, now])?;
    conn.prepare_cached("DELETE FROM agent_log WHERE worker_id = ?1")?
        .execute([worker_id])?;
    conn.prepare_cached("DELETE FROM gpu_metrics WHERE worker_id = ?1")?
        .execute([worker_id])?;
    event(
        conn,
        now,
        "worker.deleted",
        None,
        Some(worker_id),
        json!({"reason": reason}),
    )?;
    log::info!("worker forgotten worker_id={worker_id} reason={reason:?}");
    Ok(())
}

/// An admin deletes a worker whose agent is gone (offline, stopped) or
/// that was decommissioned; a live one must be decommissioned first.
pub fn delete(conn: &Connection, now: Ms, worker_id: i64) -> Result<(), StoreError> {
    let state = state_of(conn, worker_id)?;
    if !matches!(
        state,
        WorkerState::Offline | WorkerState::Stopped | WorkerState::Decommissioned
    ) {
        return Err(StoreError::conflict(
            "invalid_state",
            format!(
                "worker {worker_id} is {state}: only an offline, stopped or decommissioned worker can be deleted (decommission it first)"
            ),
        ));
    }
    forget(conn, now, worker_id, "deleted by admin")
}

/// Forgets workers offline or stopped since before `cutoff` (a batch).
pub fn forget_silent(
    conn: &Connection,
    now: Ms,
    cutoff: Ms,
    after: &str,
) -> Result<usize, StoreError> {
    let silent: Vec<i64> = conn
        .prepare_cached(
            "SELECT id FROM workers WHERE forgotten_at IS NULL
             AND (state = 'offline' OR state = 'stopped')
             AND coalesce(last_seen_at, registered_at) < ?1 LIMIT 100",
        )?
        .query_map([cutoff], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let reason = format!("forgotten: not heard from for more than {after}");
    for id in &silent {
        forget(conn, now, *id, &reason)?;
    }
    Ok(silent.len())
}

/// Marks workers silent since `cutoff` offline. Returns how many.
pub fn mark_silent_offline(
    conn: &Connection,
    now: Ms,
    cutoff: Ms,
    silence_s: u64,
) -> Result<usize, StoreError> {
    let silent: Vec<i64> = conn
        .prepare_cached(&format!(
            "SELECT id FROM workers WHERE state IN {LIVE_STATES} AND last_seen_at < ?1 LIMIT 500"
        ))?
        .query_map([cutoff], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &silent {
        transition(
            conn,
            now,
            *id,
            WorkerState::Offline,
            &format!("no heartbeat for {silence_s}s"),
        )?;
    }
    Ok(silent.len())
}

/// When any worker (decommissioned ones aside) was last heard from.
pub fn last_heard(conn: &Connection) -> Result<Option<Ms>, StoreError> {
    conn.prepare_cached("SELECT max(last_seen_at) FROM workers WHERE state != 'decommissioned'")?
        .query_row(params![], |r| r.get(0))
}

/// At start: every live worker gets a fresh `last_seen_at`, since the
/// coordinator cannot know when it last heard from it.
pub fn rebase_liveness(conn: &Connection, now: Ms) -> Result<usize, StoreError> {
    conn.prepare_cached(&format!(
        "UPDATE workers SET last_seen_at = ?1 WHERE state IN {LIVE_STATES}"
    ))?
    .execute([now])
}

/// After the writer could not commit for `by`: live workers' silence
/// excludes that time (their heartbeats could not be recorded).
pub fn extend_liveness(conn: &Connection, now: Ms, by: Ms) -> Result<usize, StoreError> {
    conn.prepare_cached(&format!(
        "UPDATE workers SET last_seen_at = min(last_seen_at + ?2, ?1) WHERE state IN {LIVE_STATES}"
    ))?
    .execute([now, by])
}

const WORKER_COLUMNS: &str = "id, name, state, hostname, cpu_cores, memory_mb, gpus, tags, slots,
    agent_version, gpu_metrics, registered_at, last_seen_at, drain, tags_pinned, address,
    (SELECT json_group_array(id) FROM jobs WHERE jobs.worker_id = workers.id AND jobs.status = 'running'),
    can_limit, metadata, decommissioned_at";

fn worker_row(r: &super::sql::Row) -> rusqlite::Result<Worker> {
    Ok(Worker {
        id: r.get(0)?,
        name: r.get(1)?,
        state: r.get(2)?,
        hostname: r.get(3)?,
        cpu_cores: r.get(4)?,
        memory_mb: r.get(5)?,
        gpus: json_col(&r.get::<_, String>(6)?),
        tags: json_col(&r.get::<_, String>(7)?),
        slots: r.get(8)?,
        agent_version: r.get(9)?,
        gpu_metrics: json_col(&r.get::<_, String>(10)?),
        registered_at: r.get(11)?,
        last_seen_at: r.get(12)?,
        drain: r.get(13)?,
        tags_pinned: r.get(14)?,
        address: r.get(15)?,
        running_jobs: serde_json::from_str(&r.get::<_, String>(16)?).unwrap_or_default(),
        can_limit: r.get(17)?,
        metadata: json_col(&r.get::<_, String>(18)?),
        decommissioned_at: r.get(19)?,
    })
}

pub fn list(conn: &Connection) -> Result<Vec<Worker>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE forgotten_at IS NULL ORDER BY id"
        ))?
        .query_map(params![], worker_row)?
        .collect::<Result<_, _>>()?)
}

/// One worker with its health log, recent jobs and the last hour of GPU
/// samples.
pub fn get(conn: &Connection, now: Ms, worker_id: i64) -> Result<WorkerDetail, StoreError> {
    let worker = conn
        .prepare_cached(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE id = ?1 AND forgotten_at IS NULL"
        ))?
        .query_row([worker_id], worker_row)
        .optional()?
        .ok_or_else(|| StoreError::not_found(format!("no worker with id {worker_id}")))?;
    let health_log = conn
        .prepare_cached(
            "SELECT at, from_state, to_state, reason FROM worker_health_log
             WHERE worker_id = ?1 ORDER BY id DESC LIMIT 100",
        )?
        .query_map([worker_id], |r| {
            Ok(HealthChange {
                at: r.get(0)?,
                from: r.get(1)?,
                to: r.get(2)?,
                reason: r.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let recent_jobs = conn
        .prepare_cached(
            "SELECT job_id, attempt, started_at, ended_at, outcome, exit_code FROM job_attempts
             WHERE worker_id = ?1 ORDER BY started_at DESC LIMIT 50",
        )?
        .query_map([worker_id], |r| {
            Ok(RecentAttempt {
                job_id: r.get(0)?,
                attempt: r.get(1)?,
                started_at: r.get(2)?,
                ended_at: r.get(3)?,
                outcome: r.get(4)?,
                exit_code: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let gpu_history = conn
        .prepare_cached(
            "SELECT gpu_index, at, utilization_pct, memory_used_mb, temperature_c, power_w FROM gpu_metrics
             WHERE worker_id = ?1 AND at > ?2 ORDER BY at",
        )?
        .query_map(params![worker_id, now - 3_600_000], |r| {
            Ok(GpuSample {
                gpu: r.get(0)?,
                at: r.get(1)?,
                utilization_pct: r.get(2)?,
                memory_used_mb: r.get(3)?,
                temperature_c: r.get(4)?,
                power_w: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(WorkerDetail {
        worker,
        gpu_history,
        health_log,
        recent_jobs,
    })
}

/// Fleet summary: workers by state, GPUs, jobs by status.
pub fn stats(conn: &Connection, now: Ms) -> Result<Stats, StoreError> {
    let mut stats = Stats::default();
    for state in WorkerState::ALL {
        stats.workers.insert(state.as_str(), 0);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT state, count(*) FROM workers WHERE forgotten_at IS NULL GROUP BY state",
    )?;
    for row in stmt.query_map(params![], |r| {
        Ok((r.get::<_, WorkerState>(0)?, r.get::<_, i64>(1)?))
    })? {
        let (state, n) = row?;
        stats.workers.insert(state.as_str(), n);
    }
    for status in JobStatus::ALL {
        stats.jobs.insert(status.as_str(), 0);
    }
    // Each part reads its partial index (there is no index on status alone).
    let mut stmt = conn.prepare_cached(
        "SELECT 'queued', count(*) FROM jobs INDEXED BY jobs_queued_run_after WHERE status = 'queued'
         UNION ALL
         SELECT 'running', count(*) FROM jobs INDEXED BY jobs_running_worker WHERE status = 'running'
         UNION ALL
         SELECT status, count(*) FROM jobs INDEXED BY jobs_finished_by_status
         WHERE finished_at IS NOT NULL GROUP BY status",
    )?;
    for row in stmt.query_map(params![], |r| {
        Ok((r.get::<_, JobStatus>(0)?, r.get::<_, i64>(1)?))
    })? {
        let (status, n) = row?;
        stats.jobs.insert(status.as_str(), n);
    }
    (stats.gpus_total, stats.gpus_busy) = conn
        .prepare_cached(&format!(
            "SELECT
               (SELECT coalesce(sum(json_array_length(gpus)), 0) FROM workers WHERE state IN {LIVE_STATES}),
               (SELECT coalesce(sum(json_array_length(gpu_indices)), 0) FROM jobs WHERE status = 'running')"
        ))?
        .query_row(params![], |r| Ok((r.get(0)?, r.get(1)?)))?;
    // Queue wait of jobs dispatched in the last hour: first claim - submit.
    stats.queue_waits = conn
        .prepare_cached(
            "SELECT a.started_at - j.created_at FROM job_attempts a INDEXED BY job_attempts_by_start
             JOIN jobs j ON j.id = a.job_id WHERE a.started_at > ?1 AND a.attempt = 1",
        )?
        .query_map([now - 3_600_000], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    stats.queue_waits.sort_unstable();
    stats.last_event_id = conn
        .prepare_cached("SELECT coalesce(max(id), 0) FROM events")?
        .query_row(params![], |r| r.get(0))?;
    Ok(stats)
}

/// Drops GPU samples older than `cutoff`, at most a batch per call (big
/// deletes grow the WAL and hold the write lock).
pub fn prune_gpu_history(conn: &Connection, cutoff: Ms) -> Result<usize, StoreError> {
    // A row's own address: SQLite's rowid, PostgreSQL's ctid.
    let sql = conn.dialect(
        "DELETE FROM gpu_metrics WHERE rowid IN (SELECT rowid FROM gpu_metrics WHERE at < ?1 ORDER BY at LIMIT 5000)",
        "DELETE FROM gpu_metrics WHERE ctid IN (SELECT ctid FROM gpu_metrics WHERE at < ?1 ORDER BY at LIMIT 5000)",
    );
    conn.prepare_cached(sql)?.execute([cutoff])
}
