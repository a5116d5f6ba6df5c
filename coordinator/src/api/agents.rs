//! Agent routes: register, heartbeat, claim (long-poll).

use super::{int_param, parse_json, read_body, AppState, AGENT_LIMIT, JSON_LIMIT, MAX_WAIT_S};
use crate::auth;
use crate::db::{ms, workers};
use crate::error::ApiError;
use crate::http::ClientAddr;
use crate::spec;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use drover_proto::{
    ClaimRequest, ClaimResponse, CompleteRequest, CompletionResult, HeartbeatRequest,
    HeartbeatResponse, RegisterRequest, RegisterResponse,
};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The agent behind the request's bearer token (401 otherwise).
pub async fn authenticate(app: &AppState, headers: &HeaderMap) -> Result<workers::Agent, ApiError> {
    let token = auth::bearer(headers).ok_or_else(|| {
        ApiError::unauthorized("missing bearer token: send Authorization: Bearer <agent token>")
    })?;
    let hash = auth::hash_token(token);
    if let Some(id) = app.tokens.get(&hash) {
        return Ok(workers::Agent { id });
    }
    let epoch = app.tokens.epoch();
    let key = hash.clone();
    let agent = app.db.authenticate(key).await?.ok_or_else(|| {
        ApiError::unauthorized("unknown or revoked agent token; the agent must register again")
    })?;
    app.tokens.insert(epoch, hash, agent.id);
    Ok(agent)
}

fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > 128 {
        return Err(ApiError::invalid(field, "must be 1 to 128 characters"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

pub async fn register(
    State(app): State<AppState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let ip = client
        .map(|Extension(ClientAddr(a))| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let (token, who) = registrant(&app, &headers, ip).await?;
    let bytes = read_body(&headers, body, AGENT_LIMIT).await?;
    let mut req: RegisterRequest = parse_json(&bytes)?;
    check_registration(&mut req)?;
    let hash = auth::hash_token(&token);
    let auto = app.config.auto_approve;
    let address = ip.to_string();
    let (worker_id, state) = app.db.register(req, hash, auto, who, address).await?;
    // A re-registration replaced the worker's token and may have released
    // leases.
    app.tokens.revoke_worker(worker_id);
    // A claim the previous agent process left parked must not get work.
    app.dispatcher.dismiss(worker_id);
    app.wake_claimers();
    Ok(Json(RegisterResponse {
        worker_id,
        token,
        state,
        heartbeat_interval_s: app.config.heartbeat_interval.as_secs(),
        lease_ttl_s: app.config.lease_ttl.as_secs(),
    })
    .into_response())
}

/// Who registers, and the token it will hold. The secret registers (or
/// re-registers) a machine and gets a new token; an agent's own token
/// updates its worker (a pre-registered one, or after a restart). Failed
/// attempts count against the client's registration rate limit.
async fn registrant(
    app: &AppState,
    headers: &HeaderMap,
    ip: std::net::IpAddr,
) -> Result<(String, workers::Registrant), ApiError> {
    let refused = |e: ApiError| {
        app.registrations.failed(ip);
        app.metrics
            .registrations_refused
            .fetch_add(1, Ordering::Relaxed);
        log::warn!("registration refused client={ip}: {}", e.message);
        e
    };
    if let Err(wait) = app.registrations.check(ip) {
        app.metrics
            .registrations_refused
            .fetch_add(1, Ordering::Relaxed);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many failed registrations from {ip}; retry in {wait}s"),
        );
        e.retry_after_s = Some(wait);
        return Err(e);
    }
    let Some(bearer) = auth::bearer(headers) else {
        return Err(refused(ApiError::unauthorized(
            "missing bearer token: send Authorization: Bearer <registration secret>",
        )));
    };
    if app.config.registration_secret.matches(bearer) {
        let silence = ms(app.config.lease_ttl);
        let who = workers::Registrant::Secret {
            alive_since: app.db.clock().now() - silence,
        };
        return Ok((auth::new_token("drv_agent_")?, who));
    }
    let hash = auth::hash_token(bearer);
    match app.db.authenticate(hash).await? {
        Some(agent) => Ok((bearer.to_string(), workers::Registrant::Proven(agent.id))),
        None => Err(refused(ApiError::unauthorized(
            "wrong registration secret or agent token",
        ))),
    }
}

/// Checks a registration's fields (tags are normalized in place).
fn check_registration(req: &mut RegisterRequest) -> Result<(), ApiError> {
    spec::worker_name("name", &req.name)?;
    spec::worker_name("machine_id", &req.machine_id)?;
    if req.inventory.gpus.len() > 64 {
        return Err(ApiError::invalid(
            "inventory.gpus",
            "at most 64 GPUs per worker",
        ));
    }
    if let Some(s) = req.slots {
        if !(1..=1024).contains(&s) {
            return Err(ApiError::invalid("slots", "must be between 1 and 1024"));
        }
    }
    req.tags = spec::tags("tags", std::mem::take(&mut req.tags))?;
    Ok(())
}

pub async fn heartbeat(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = authenticate(&app, &headers).await?;
    let bytes = read_body(&headers, body, AGENT_LIMIT).await?;
    let req: HeartbeatRequest = parse_json(&bytes)?;
    check_beat(&req, "")?;
    let times = beat_times(&app);
    let stopping = req.stopping;
    let beat = app.db.heartbeat(agent.id, req, times).await?;
    if stopping {
        app.dispatcher.dismiss(agent.id);
    }
    Ok(Json(answer_beat(&app, beat)).into_response())
}

/// `POST /api/v1/agents/telemetry`: the agent's own log lines and its
/// jobs' changed progress, as they happen (204). Rate limited per worker.
pub async fn telemetry(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = authenticate(&app, &headers).await?;
    if let Err(wait) = app.telemetry_rate.take(agent.id) {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "worker {} sends telemetry too often; retry in {wait}s",
                agent.id
            ),
        );
        e.retry_after_s = Some(wait);
        return Err(e);
    }
    let bytes = read_body(&headers, body, AGENT_LIMIT).await?;
    let req: drover_proto::TelemetryRequest = parse_json(&bytes)?;
    check_name("incarnation", &req.incarnation)?;
    check_lines(&req.logs)?;
    if req.progress.len() > 1024 {
        return Err(ApiError::invalid("progress", "at most 1024 jobs"));
    }
    app.db.telemetry(agent.id, req).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// At most 500 lines, each of a known level, a module name of at most 200
/// bytes and a message of at most 2,000.
fn check_lines(lines: &[drover_proto::LogLine]) -> Result<(), ApiError> {
    if lines.len() > 500 {
        return Err(ApiError::invalid("logs", "at most 500 lines"));
    }
    for (i, l) in lines.iter().enumerate() {
        if crate::db::agent_log::rank(&l.level) >= crate::db::agent_log::LEVELS.len() {
            let levels = crate::db::agent_log::LEVELS.join(", ");
            return Err(ApiError::invalid(
                &format!("logs[{i}].level"),
                format!("{:?} is not one of {levels}", l.level),
            ));
        }
        if l.target.len() > 200 || l.message.len() > 2000 {
            return Err(ApiError::invalid(
                &format!("logs[{i}]"),
                "a target of at most 200 bytes and a message of at most 2000",
            ));
        }
    }
    Ok(())
}

/// Checks a heartbeat's sizes (`prefix` names where it sits in the body).
pub(super) fn check_beat(req: &HeartbeatRequest, prefix: &str) -> Result<(), ApiError> {
    check_name(&format!("{prefix}incarnation"), &req.incarnation)?;
    if req.leases.len() > 1024 {
        return Err(ApiError::invalid(
            &format!("{prefix}leases"),
            "at most 1024 leases",
        ));
    }
    if req.log_lines.len() > 200 || req.log_lines.iter().any(|l| l.len() > 2000) {
        return Err(ApiError::invalid(
            &format!("{prefix}log_lines"),
            "at most 200 lines of 2000 bytes each",
        ));
    }
    Ok(())
}

fn beat_times(app: &AppState) -> (crate::db::Ms, crate::db::Ms) {
    (ms(app.config.lease_ttl), ms(app.config.heartbeat_interval))
}

/// The reply to a recorded heartbeat; wakes parked claims when it released
/// leases (an agent restart).
fn answer_beat(app: &AppState, beat: workers::Beat) -> HeartbeatResponse {
    if beat.released {
        app.wake_claimers();
    }
    HeartbeatResponse {
        state: beat.state,
        heartbeat_interval_s: app.config.heartbeat_interval.as_secs(),
        lease_ttl_s: app.config.lease_ttl.as_secs(),
        orders: beat.orders,
        now_ms: app.db.clock().now(),
    }
}

/// Long-poll: answers 200 with a job as soon as one this worker can run is
/// queued (now or while parked), 200 with orders as soon as one of its jobs
/// is cancelled, or 204 after `wait` seconds. Parked claims are futures
/// waiting on the queue's change signal, not threads.
///
/// A claim may carry the attempts that ended since the last one
/// (`completed`) and a heartbeat (`beat`): they are recorded first, in one
/// transaction (reports, then the heartbeat), each report answered in the
/// reply's `completed` as `POST /jobs/{id}/complete` would answer it and the
/// heartbeat in `beat`, and the reply is then 200 even when no job came. A
/// heartbeat that carries orders is answered at once.
pub async fn claim(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = authenticate(&app, &headers).await?;
    let wait = int_param(&query, "wait", MAX_WAIT_S as i64, 0, i64::MAX)?.min(MAX_WAIT_S as i64);
    let req: ClaimRequest = {
        let bytes = read_body(&headers, body, JSON_LIMIT + AGENT_LIMIT).await?;
        parse_json(&bytes)?
    };
    // The head and body are slices of the connection's read buffer: kept
    // through the park, they would pin it while hyper reads into a new one
    // (8 KB per parked agent).
    drop(headers);
    check_claim(&req)?;
    // A pending (or draining) worker's claim parks like any other and gets
    // a job once it may run one: approval wakes parked claims.
    let (completed, beat, parked) = record_and_park(&app, agent.id, req).await?;
    // Orders in the heartbeat's answer (cancels) must not wait for the park.
    let wait = match &beat {
        Some(b) if !b.orders.is_empty() => 0,
        _ => wait,
    };
    // None: the wait ran out, or a newer claim of the same worker replaced
    // this one.
    Ok(match wait_for_grant(&app, agent.id, parked, wait).await {
        Some(resp) => Json(ClaimResponse {
            completed,
            beat,
            ..resp
        })
        .into_response(),
        None if completed.is_empty() && beat.is_none() => StatusCode::NO_CONTENT.into_response(),
        None => Json(ClaimResponse {
            jobs: Vec::new(),
            orders: Vec::new(),
            completed,
            beat,
        })
        .into_response(),
    })
}

/// A parked claim: its ticket, and where its answer comes.
type Parked = (u64, tokio::sync::oneshot::Receiver<ClaimResponse>);

/// Checks a claim's sizes and its heartbeat.
fn check_claim(req: &ClaimRequest) -> Result<(), ApiError> {
    check_name("incarnation", &req.incarnation)?;
    if req.completed.len() > MAX_COMPLETED {
        return Err(ApiError::invalid(
            "completed",
            format!("at most {MAX_COMPLETED} reports per claim"),
        ));
    }
    for (i, done) in req.completed.iter().enumerate() {
        check_report(&done.report, &format!("completed[{i}]."))?;
    }
    if let Some(beat) = &req.beat {
        check_beat(beat, "beat.")?;
        if beat.incarnation != req.incarnation {
            return Err(ApiError::invalid(
                "beat.incarnation",
                "must be the claim's incarnation",
            ));
        }
        if beat.stopping {
            return Err(ApiError::invalid(
                "beat.stopping",
                "a stopping agent claims nothing: send its heartbeat to /agents/heartbeat",
            ));
        }
    }
    Ok(())
}

/// Records what the claim carries (reports, heartbeat) and parks it: the
/// answers to the reports and to the heartbeat, and the parked claim.
async fn record_and_park(
    app: &AppState,
    agent_id: i64,
    req: ClaimRequest,
) -> Result<(Vec<CompletionResult>, Option<HeartbeatResponse>, Parked), ApiError> {
    let ClaimRequest {
        incarnation,
        completed,
        beat,
    } = req;
    if completed.is_empty() && beat.is_none() {
        app.db.check_incarnation(agent_id, incarnation).await?;
        return Ok((Vec::new(), None, app.dispatcher.park(agent_id)));
    }
    let backoff = ms(app.config.retry_backoff);
    let reports = !completed.is_empty();
    // The reports stand on their own (an agent's spool may hold some from
    // before a restart): they are recorded even when the incarnation check
    // then refuses the claim, and a resend replays. They go before the
    // heartbeat, whose new incarnation would release the leases they report
    // on.
    let queued = app
        .db
        .queue_claim_record(
            agent_id,
            completed,
            beat,
            incarnation,
            backoff,
            beat_times(app),
        )
        .await?;
    // Parked before the reports commit: the round this asks for runs after
    // them in the writer, usually in their transaction, and sees the slots
    // they freed. One commit for "done, give me more".
    let (ticket, answer) = app.dispatcher.park(agent_id);
    if reports {
        // Freed slots: a change of work, not a mere re-park.
        app.wake_claimers();
    }
    match queued.done().await {
        Ok((results, beat, Ok(()))) => {
            for r in results.iter().filter(|r| r.error.is_none() && !r.replay) {
                log::info!(
                    "job reported job_id={} worker_id={agent_id} status={}",
                    r.job_id,
                    r.status.as_deref().unwrap_or("")
                );
            }
            let beat = beat.map(|b| answer_beat(app, b));
            Ok((results, beat, (ticket, answer)))
        }
        Ok((_, _, Err(e))) | Err(e) => {
            // Refused after parking: whatever a round granted meanwhile
            // goes back to the queue.
            if !app.dispatcher.unpark(agent_id, ticket) {
                if let Ok(resp) = answer.await {
                    let grants = resp.jobs.iter().map(|a| (agent_id, a.job_id, a.attempt));
                    crate::dispatch::release(app, grants.collect()).await?;
                }
            }
            Err(e.into())
        }
    }
}

/// The parked claim's answer, if one comes within `wait` seconds.
async fn wait_for_grant(
    app: &AppState,
    agent_id: i64,
    (ticket, mut answer): Parked,
    wait: i64,
) -> Option<ClaimResponse> {
    let deadline = tokio::time::sleep(Duration::from_secs(wait as u64));
    tokio::select! {
        r = &mut answer => r.ok(),
        _ = deadline => {
            if app.dispatcher.unpark(agent_id, ticket) {
                None
            } else {
                // A round took this claim just now: its answer is on the way.
                answer.await.ok()
            }
        }
    }
}

/// Checks an agent's report of an attempt's end; `at` prefixes the field
/// names (a report inside a claim's `completed` list).
pub fn check_report(req: &CompleteRequest, at: &str) -> Result<(), ApiError> {
    if req.attempt < 1 {
        return Err(ApiError::invalid(
            &format!("{at}attempt"),
            "must be 1 or more",
        ));
    }
    if req.error.as_ref().is_some_and(|e| e.len() > 4096) {
        return Err(ApiError::invalid(
            &format!("{at}error"),
            "at most 4096 bytes",
        ));
    }
    Ok(())
}

/// Reports sent with one claim, at most.
const MAX_COMPLETED: usize = 1024;
