//! The job queue: submit, claim (one transaction), fenced reports, lease
//! renewal and expiry, logs, cancel.
//!
//! The fence: a write for an attempt is accepted only while the job is
//! `running` under the same `attempt` (the fencing token, +1 on every claim)
//! and the same `worker_id`. It is written once, in [`fenced!`]; ending an
//! attempt is one fenced update whose row count says whether the report was
//! stale ([`apply`]). What an ended attempt does to its job is decided by
//! [`crate::lifecycle::decide`].

use super::sql::{Connection, OptionalExtension};
use super::StoreError;
use super::{event, iso, json_col, wall_offset, worker_state, Ms, CLOCK_STEP};
use crate::lifecycle::{
    self, AttemptEnd, Counters, JobStatus, LostReason, Policy, Transition, BACKOFF_CAP_MS,
};
use crate::model::NewJob;
use crate::model::{Attempt, Job};
use drover_proto::{Assignment, CompleteRequest, CompleteResponse, Completion, CompletionResult};
use rusqlite::params;
use serde_json::{json, Value};

/// Backoff after the second and later lease losses: 10 s x 2^n, capped.
const LOSS_BACKOFF_MS: Ms = 10_000;

/// Spreads a delay over 80-120 % of itself, so jobs that failed together
/// do not all come back at once.
pub(crate) fn jitter(delay: Ms) -> Ms {
    let r = getrandom::u32().unwrap_or(u32::MAX / 2) as i64 % 401;
    delay * (800 + r) / 1000
}

/// The `run_after` (coordinator's clock) of a job that waits for the wall
/// time `not_before`, with the wall clock `offset` ahead; never before the
/// job was created. An offset under a step is rounding and slewing: the job
/// then waits for both clocks, so its `started_at` (coordinator's clock) is
/// never before its `not_before` either.
fn not_before_to_run_after(not_before: Ms, offset: Ms, created: Ms) -> Ms {
    let ahead = if offset >= CLOCK_STEP {
        offset
    } else {
        offset.min(0)
    };
    (not_before - ahead).max(created)
}

/// After the wall clock stepped (its offset went from `was` to `offset`),
/// re-times the queued jobs that wait for their `not_before`, so that they
/// keep following wall time (as `not_before_to_run_after`); returns how
/// many. Jobs that ran before wait for a retry backoff instead, which
/// follows the coordinator's clock. A scan of the queue, on a step only.
pub fn retime_not_before(
    conn: &Connection,
    now: Ms,
    offset: Ms,
    was: Ms,
) -> Result<usize, StoreError> {
    conn.prepare_cached(
        "UPDATE jobs SET run_after = max(not_before - ?1, created_at)
             WHERE status = 'queued' AND attempt = 0 AND not_before IS NOT NULL
               AND not_before > ?2 + min(?1, ?3)",
    )?
    .execute(params![offset, now, was])
}

/// At start, after the wall clock may have stepped while the coordinator
/// was down (its clock restarts from the wall): jobs waiting for
/// `not_before` wait for that wall time again, and no retry waits longer
/// than its own backoff (with the most jitter) from now. Returns how many
/// were re-timed.
pub fn rebase_waiting(conn: &Connection, now: Ms, retry_base: Ms) -> Result<usize, StoreError> {
    let planned = conn
        .prepare_cached(
            "UPDATE jobs SET run_after = not_before
             WHERE status = 'queued' AND attempt = 0 AND not_before IS NOT NULL
               AND run_after != not_before",
        )?
        .execute(params![])?;
    let retries = conn
        .prepare_cached(
            "UPDATE jobs SET run_after = ?1 + min(?2 * (1 << min(attempts_used - 1, 20)), ?3) * 12 / 10
             WHERE status = 'queued' AND attempts_used > 0
               AND run_after > ?1 + min(?2 * (1 << min(attempts_used - 1, 20)), ?3) * 12 / 10",
        )?
        .execute(params![now, retry_base, BACKOFF_CAP_MS])?;
    Ok(planned + retries)
}

/// Inserts a job, or returns the one already submitted under the same
/// idempotency key (409 if that one's spec differs). `true` when created.
/// The id the next submitted job gets (without a floor).
pub fn next_id(conn: &Connection) -> Result<Ms, StoreError> {
    conn.prepare_cached("SELECT coalesce(max(id), 0) + 1 FROM jobs")?
        .query_row(params![], |r| r.get(0))
}

/// Moves every queued job's attempt number on by `gap` (after a restore:
/// an attempt granted in the lost window is then never granted again).
/// Returns how many.
pub fn move_attempts_on(conn: &Connection, gap: i64) -> Result<usize, StoreError> {
    conn.prepare_cached("UPDATE jobs SET attempt = attempt + ?1 WHERE status = 'queued'")?
        .execute([gap])
}

/// Submits `job`, its id at least `floor` (past a restored database's lost
/// window, `highwater`; 0: none, the id is SQLite's next rowid).
pub fn submit(
    conn: &Connection,
    now: Ms,
    job: &NewJob,
    floor: i64,
) -> Result<(bool, Job), StoreError> {
    let fingerprint = job.fingerprint();
    if let Some(key) = &job.idempotency_key {
        let existing: Option<(i64, String)> = conn
            .prepare_cached("SELECT id, spec_sha256 FROM jobs WHERE idempotency_key = ?1")?
            .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((id, fp)) = existing {
            if fp != fingerprint {
                return Err(StoreError::conflict(
                    "idempotency_conflict",
                    format!("idempotency key {key:?} was used by job {id} with a different spec"),
                )
                .with_field("idempotency_key"));
            }
            return Ok((false, get(conn, id)?));
        }
    }
    // The id: the next one, or past the floor (?20) a restore set. SQLite
    // gives a NULL id the next one; PostgreSQL takes it from the sequence.
    macro_rules! insert {
        ($next:literal) => {
            concat!(
                "INSERT INTO jobs (id, status, command, env, cwd, gpus, min_vram_mb, required_tags,
                 preferred_tags, priority, max_attempts, timeout_s, not_before, idempotency_key,
                 spec_sha256, metadata, run_after, created_at, cpu_fallback, exclusive, limits,
                 submitted_by)
                 VALUES (CASE WHEN ?20 > 0 THEN max((SELECT coalesce(max(id), 0) + 1 FROM jobs), ?20)
                 ELSE ", $next, " END, 'queued',
                 ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
                 ?21)"
            )
        };
    }
    let sql = conn.dialect(
        insert!("NULL"),
        insert!("nextval(pg_get_serial_sequence('jobs', 'id'))"),
    );
    conn.prepare_cached(sql)?.execute(params![
        to_json(&job.command),
        to_json(&job.env),
        job.cwd,
        job.gpus,
        job.min_vram_mb as i64,
        to_json(&job.required_tags),
        to_json(&job.preferred_tags),
        job.priority,
        job.max_attempts,
        job.timeout_s.map(|t| t as i64),
        job.not_before,
        job.idempotency_key,
        fingerprint,
        job.metadata.to_string(),
        job.not_before
            .map_or(now, |t| not_before_to_run_after(t, wall_offset(now), now)),
        now,
        job.cpu_fallback,
        job.exclusive,
        job.limits.map(|l| to_json(&l)),
        floor,
        job.submitted_by
    ])?;
    let id = conn.last_insert_rowid()?;
    event(
        conn,
        now,
        "job.submitted",
        Some(id),
        None,
        json!({"priority": job.priority, "gpus": job.gpus}),
    )?;
    Ok((true, get(conn, id)?))
}

/// JSON text of a submission part (these types always serialize).
fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// Data of a `job.claimed` event.
#[derive(serde::Serialize)]
struct Claimed<'a> {
    attempt: i64,
    gpus: &'a [u32],
}

/// Data of the event that ends an attempt (`job.succeeded`, `job.requeued`, ...).
#[derive(serde::Serialize)]
struct Ended<'a> {
    attempt: i64,
    outcome: &'a str,
    exit_code: Option<i32>,
    error: Option<&'a str>,
    run_after: Option<String>,
}

/// What an exclusive job's lease is held past its TTL: its agent stops it
/// before the TTL runs out (kill grace included), and this covers clock
/// rates and a slow kill, so a second attempt never starts while the first
/// may still run.
pub const EXCLUSIVE_MARGIN: Ms = 5_000;

/// Gives `job_id` to `worker_id` with a new lease on `gpu_indices`. The
/// caller moves an idle worker to busy (`worker_state::refresh_load`).
pub(super) fn grant(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    job_id: i64,
    gpu_indices: &[u32],
    lease_ttl: Ms,
) -> Result<Assignment, StoreError> {
    let gpus =
        serde_json::to_string(gpu_indices).map_err(|e| StoreError::internal(e.to_string()))?;
    // A SELECT then a plain UPDATE: `UPDATE .. RETURNING` costs SQLite an
    // ephemeral table and a statement journal per call, about a tenth of
    // the writer's time at full throughput.
    let read: Option<Assignment> = conn
        .prepare_cached(
            "SELECT attempt + 1, command, env, cwd, timeout_s, exclusive, limits FROM jobs
             WHERE id = ?1 AND status = 'queued'",
        )?
        .query_row([job_id], |r| {
            Ok(Assignment {
                job_id,
                attempt: r.get(0)?,
                command: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                env: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
                cwd: r.get(3)?,
                gpu_indices: gpu_indices.to_vec(),
                timeout_s: r.get::<_, Option<i64>>(4)?.map(|t| t.max(0) as u64),
                lease_ttl_s: (lease_ttl / 1000).max(0) as u64,
                exclusive: r.get(5)?,
                limits: limits_col(r.get(6)?),
            })
        })
        .optional()?;
    let a = read
        .ok_or_else(|| StoreError::internal(format!("job {job_id} was not queued when granted")))?;
    conn.prepare_cached(
        "UPDATE jobs SET status = 'running', attempt = ?2, attempts_used = attempts_used + 1,
         worker_id = ?3, gpu_indices = ?4, lease_expires_at = ?5, started_at = ?6,
         cancel_requested = 0, progress = NULL
         WHERE id = ?1",
    )?
    .execute(params![
        job_id,
        a.attempt,
        worker_id,
        gpus,
        now + lease_ttl + if a.exclusive { EXCLUSIVE_MARGIN } else { 0 },
        now
    ])?;
    conn.prepare_cached(
        "INSERT INTO job_attempts (job_id, attempt, worker_id, gpu_indices, started_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![job_id, a.attempt, worker_id, gpus, now])?;
    event(
        conn,
        now,
        "job.claimed",
        Some(job_id),
        Some(worker_id),
        // A struct, not `json!`: no map built per job.
        Claimed {
            attempt: a.attempt,
            gpus: gpu_indices,
        },
    )?;
    log::debug!(
        "job claimed job_id={job_id} attempt={} worker_id={worker_id}",
        a.attempt
    );
    Ok(a)
}

/// The job an attempt belongs to, as the lifecycle rule reads it.
pub(super) struct Current {
    pub(super) status: JobStatus,
    pub(super) attempt: i64,
    pub(super) worker_id: Option<i64>,
    pub(super) counters: Counters,
}

pub(super) fn current(conn: &Connection, job_id: i64) -> Result<Option<Current>, StoreError> {
    conn.prepare_cached(
        "SELECT status, attempt, worker_id, attempts_used, max_attempts, lease_losses,
             cancel_requested FROM jobs WHERE id = ?1",
    )?
    .query_row([job_id], |r| {
        Ok(Current {
            status: r.get(0)?,
            attempt: r.get(1)?,
            worker_id: r.get(2)?,
            counters: Counters {
                attempts_used: r.get(3)?,
                max_attempts: r.get(4)?,
                lease_losses: r.get(5)?,
                cancel_requested: r.get(6)?,
            },
        })
    })
    .optional()
}

/// An attempt: which job, which try, on which worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub job_id: i64,
    pub attempt: i64,
    pub worker_id: i64,
}

/// Applies `t` to the attempt `f` under the fence, with its attempt row,
/// event and the worker's load. False when the fence does not hold (a stale
/// report): then nothing was written.
fn apply(conn: &Connection, now: Ms, f: Fence, t: &Transition) -> Result<bool, StoreError> {
    let terminal = t.status.is_terminal();
    let changed = conn
        .prepare_cached(fenced!(
            "UPDATE jobs SET status = ?4, run_after = ?5, attempts_used = ?6, lease_losses = ?7,
             exit_code = ?8, result = ?9, error = ?10, lease_expires_at = NULL,
             finished_at = CASE WHEN ?11 THEN CAST(?12 AS BIGINT) ELSE NULL END"
        ))?
        .execute(params![
            f.job_id,
            f.attempt,
            f.worker_id,
            t.status,
            t.run_after,
            t.attempts_used,
            t.lease_losses,
            t.exit_code,
            t.result,
            t.error,
            terminal,
            now
        ])?;
    if changed == 0 {
        return Ok(false);
    }
    if !terminal {
        crate::metrics::REQUEUES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    conn.prepare_cached(
        "UPDATE job_attempts SET ended_at = ?3, outcome = ?4, exit_code = ?5, error = ?6
         WHERE job_id = ?1 AND attempt = ?2",
    )?
    .execute(params![
        f.job_id,
        f.attempt,
        now,
        t.outcome,
        t.exit_code,
        t.error
    ])?;
    event(
        conn,
        now,
        t.event_kind(),
        Some(f.job_id),
        Some(f.worker_id),
        Ended {
            attempt: f.attempt,
            outcome: t.outcome,
            exit_code: t.exit_code,
            error: t.error.as_deref(),
            run_after: iso(Some(t.run_after)),
        },
    )?;
    worker_state::refresh_load(
        conn,
        now,
        f.worker_id,
        &format!("job {} {}", f.job_id, t.outcome),
    )?;
    Ok(true)
}

/// Retry timing; a lost lease never uses `retry_backoff`.
fn policy(retry_backoff: Ms) -> Policy {
    Policy {
        retry_backoff,
        loss_backoff: LOSS_BACKOFF_MS,
    }
}

/// Ends the attempt `f` the way `end` says. None when the fence does not
/// hold (stale); else the job's new status.
pub(super) fn end_attempt(
    conn: &Connection,
    now: Ms,
    f: Fence,
    counters: Counters,
    end: AttemptEnd,
    retry_backoff: Ms,
) -> Result<Option<JobStatus>, StoreError> {
    let t = lifecycle::decide(counters, end, policy(retry_backoff), now, jitter);
    if !apply(conn, now, f, &t)? {
        return Ok(None);
    }
    let line = format!(
        "attempt ended job_id={} attempt={} worker_id={} outcome={} next={}",
        f.job_id,
        f.attempt,
        f.worker_id,
        t.outcome,
        t.status.as_str()
    );
    if matches!(end, AttemptEnd::Lost(_)) || t.status == JobStatus::Failed {
        log::warn!("{line}");
    } else {
        log::debug!("{line}");
    }
    Ok(Some(t.status))
}

/// Ends the running attempt of `job_id` without a report.
pub(super) fn lose(
    conn: &Connection,
    now: Ms,
    job_id: i64,
    reason: LostReason,
) -> Result<(), StoreError> {
    let Some(cur) = current(conn, job_id)? else {
        return Ok(());
    };
    let (Some(worker_id), JobStatus::Running) = (cur.worker_id, cur.status) else {
        return Ok(());
    };
    let f = Fence {
        job_id,
        attempt: cur.attempt,
        worker_id,
    };
    end_attempt(conn, now, f, cur.counters, AttemptEnd::Lost(reason), 0)?;
    Ok(())
}

/// An agent's report of how its attempt ended. Fenced; a repeat of an
/// accepted report is answered 200 with `replay: true` and changes nothing.
pub fn complete(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    job_id: i64,
    req: &CompleteRequest,
    retry_backoff: Ms,
) -> Result<CompleteResponse, StoreError> {
    let cur = current(conn, job_id)?
        .ok_or_else(|| StoreError::not_found(format!("no job with id {job_id}")))?;
    let f = Fence {
        job_id,
        attempt: req.attempt,
        worker_id,
    };
    let end = AttemptEnd::Reported(req);
    if let Some(status) = end_attempt(conn, now, f, cur.counters, end, retry_backoff)? {
        return Ok(CompleteResponse {
            status: status.as_str().to_string(),
            replay: false,
        });
    }
    let earlier: Option<(Option<String>, Option<i32>)> = conn
        .prepare_cached(
            "SELECT outcome, exit_code FROM job_attempts WHERE job_id = ?1 AND attempt = ?2 AND worker_id = ?3",
        )?
        .query_row(params![job_id, req.attempt, worker_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((Some(outcome), exit_code)) = earlier {
        if outcome == req.outcome.as_str() && exit_code == req.exit_code {
            return Ok(CompleteResponse {
                status: cur.status.as_str().to_string(),
                replay: true,
            });
        }
    }
    Err(stale(f, &cur))
}

fn stale(f: Fence, cur: &Current) -> StoreError {
    StoreError::conflict(
        "stale_lease",
        format!(
            "job {} attempt {} is not leased to worker {}: the job is {} at attempt {}",
            f.job_id,
            f.attempt,
            f.worker_id,
            cur.status.as_str(),
            cur.attempt
        ),
    )
    .with_field("attempt")
}

/// Checks that the attempt `f` holds its job's live lease (409 if not).
pub(super) fn check_fence(conn: &Connection, f: Fence) -> Result<(), StoreError> {
    let holds = conn
        .prepare_cached(fenced!("SELECT 1 FROM jobs"))?
        .query_row(params![f.job_id, f.attempt, f.worker_id], |_| Ok(()))
        .optional()?;
    if holds.is_some() {
        return Ok(());
    }
    match current(conn, f.job_id)? {
        None => Err(StoreError::not_found(format!(
            "no job with id {}",
            f.job_id
        ))),
        Some(cur) => Err(stale(f, &cur)),
    }
}

/// Cancels a queued job at once; a running one is marked, and its agent is
/// ordered to stop it at its next heartbeat.
pub fn cancel(conn: &Connection, now: Ms, job_id: i64) -> Result<Job, StoreError> {
    let cur = current(conn, job_id)?
        .ok_or_else(|| StoreError::not_found(format!("no job with id {job_id}")))?;
    match cur.status {
        JobStatus::Queued => {
            conn.prepare_cached(
                "UPDATE jobs SET status = 'cancelled', error = 'cancelled', finished_at = ?2 WHERE id = ?1",
            )?
            .execute(params![job_id, now])?;
            event(
                conn,
                now,
                "job.cancelled",
                Some(job_id),
                None,
                json!({"while": "queued"}),
            )?;
            log::info!("job cancelled job_id={job_id} while=queued");
        }
        JobStatus::Running if !cur.counters.cancel_requested => {
            conn.prepare_cached("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1")?
                .execute([job_id])?;
            event(
                conn,
                now,
                "job.cancel_requested",
                Some(job_id),
                cur.worker_id,
                json!({"attempt": cur.attempt}),
            )?;
            log::info!(
                "job cancel requested job_id={job_id} attempt={}",
                cur.attempt
            );
        }
        JobStatus::Running => {}
        other => {
            return Err(StoreError::conflict(
                "already_finished",
                format!("job {job_id} is already {}", other.as_str()),
            ))
        }
    }
    get(conn, job_id)
}

/// Re-queues a failed or cancelled job with its attempts reset.
pub fn retry(conn: &Connection, now: Ms, job_id: i64) -> Result<Job, StoreError> {
    let cur = current(conn, job_id)?
        .ok_or_else(|| StoreError::not_found(format!("no job with id {job_id}")))?;
    if !matches!(cur.status, JobStatus::Failed | JobStatus::Cancelled) {
        return Err(StoreError::conflict(
            "not_retryable",
            format!(
                "job {job_id} is {}; only failed or cancelled jobs can be retried",
                cur.status.as_str()
            ),
        ));
    }
    conn.prepare_cached(
        "UPDATE jobs SET status = 'queued', attempts_used = 0, lease_losses = 0, cancel_requested = 0,
         run_after = ?2, finished_at = NULL, error = NULL, exit_code = NULL, result = NULL, progress = NULL
         WHERE id = ?1",
    )?
    .execute(params![job_id, now])?;
    event(
        conn,
        now,
        "job.retried",
        Some(job_id),
        None,
        json!({"after": cur.status.as_str()}),
    )?;
    log::info!("job retried job_id={job_id} after={}", cur.status.as_str());
    get(conn, job_id)
}

const JOB_COLUMNS: &str = "id, status, command, env, cwd, gpus, min_vram_mb, required_tags,
    preferred_tags, priority, max_attempts, timeout_s, not_before, idempotency_key, metadata,
    attempt, attempts_used, worker_id, gpu_indices, lease_expires_at, cancel_requested,
    exit_code, result, error, created_at, started_at, finished_at, run_after, progress, cpu_fallback,
    exclusive, limits, submitted_by";

/// A job's `limits` column (written by `submit` from checked limits).
fn limits_col(text: Option<String>) -> Option<drover_proto::Limits> {
    serde_json::from_str(&text?).ok()
}

fn job_row(r: &super::sql::Row) -> rusqlite::Result<Job> {
    let json = |i: usize| -> rusqlite::Result<Value> { Ok(json_col(&r.get::<_, String>(i)?)) };
    let opt_json = |i: usize| -> rusqlite::Result<Option<Value>> {
        Ok(r.get::<_, Option<String>>(i)?.map(|t| json_col(&t)))
    };
    Ok(Job {
        id: r.get(0)?,
        status: r.get(1)?,
        command: json(2)?,
        env: json(3)?,
        cwd: r.get(4)?,
        gpus: r.get(5)?,
        min_vram_mb: r.get(6)?,
        required_tags: json(7)?,
        preferred_tags: json(8)?,
        priority: r.get(9)?,
        max_attempts: r.get(10)?,
        timeout_s: r.get(11)?,
        not_before: r.get(12)?,
        idempotency_key: r.get(13)?,
        metadata: json(14)?,
        attempt: r.get(15)?,
        attempts_used: r.get(16)?,
        worker_id: r.get(17)?,
        gpu_indices: json(18)?,
        lease_expires_at: r.get(19)?,
        cancel_requested: r.get(20)?,
        exit_code: r.get(21)?,
        result: opt_json(22)?,
        error: r.get(23)?,
        created_at: r.get(24)?,
        started_at: r.get(25)?,
        finished_at: r.get(26)?,
        run_after: r.get(27)?,
        progress: opt_json(28)?,
        cpu_fallback: r.get(29)?,
        exclusive: r.get(30)?,
        limits: limits_col(r.get(31)?),
        submitted_by: r.get(32)?,
        waiting_reason: None,
        attempts: None,
    })
}

/// Records one report of a claim's `completed`: a refusal (stale lease,
/// unknown job) is that report's answer; a store failure is the caller's
/// (the claim's transaction then rolls back). A refusal is decided before
/// anything is written.
pub fn report(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    done: &Completion,
    retry_backoff: Ms,
) -> Result<CompletionResult, StoreError> {
    let (status, replay, error) = match complete(
        conn,
        now,
        worker_id,
        done.job_id,
        &done.report,
        retry_backoff,
    ) {
        Ok(r) => (Some(r.status), r.replay, None),
        Err(e) if e.is_refusal() => (None, false, Some(e.detail())),
        Err(e) => return Err(e),
    };
    Ok(CompletionResult {
        job_id: done.job_id,
        attempt: done.report.attempt,
        status,
        replay,
        error,
    })
}

/// One job with its attempts.
pub fn get(conn: &Connection, job_id: i64) -> Result<Job, StoreError> {
    let mut job = conn
        .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))?
        .query_row([job_id], job_row)
        .optional()?
        .ok_or_else(|| StoreError::not_found(format!("no job with id {job_id}")))?;
    let attempts = conn
        .prepare_cached(
            "SELECT attempt, worker_id, gpu_indices, started_at, ended_at, outcome, exit_code, error, log_bytes
             FROM job_attempts WHERE job_id = ?1 ORDER BY attempt",
        )?
        .query_map([job_id], |r| {
            Ok(Attempt {
                attempt: r.get(0)?,
                worker_id: r.get(1)?,
                gpu_indices: json_col(&r.get::<_, String>(2)?),
                started_at: r.get(3)?,
                ended_at: r.get(4)?,
                outcome: r.get(5)?,
                exit_code: r.get(6)?,
                error: r.get(7)?,
                log_bytes: r.get(8)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    job.attempts = Some(attempts);
    Ok(job)
}

/// The named token that submitted job `id` (None: the admin token).
pub fn owner(conn: &Connection, id: i64) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT submitted_by FROM jobs WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::not_found(format!("no job with id {id}")))
}

/// Which jobs a listing wants: newest first, ids in `(after, before)`,
/// the other fields optional filters.
#[derive(Debug, Clone)]
pub struct JobQuery {
    pub status: Option<JobStatus>,
    pub worker: Option<i64>,
    /// A tag the job requires or prefers.
    pub tag: Option<String>,
    pub created_after: Option<Ms>,
    pub created_before: Option<Ms>,
    pub after: Option<i64>,
    pub before: Option<i64>,
    pub limit: i64,
}

impl JobQuery {
    pub fn newest(limit: i64) -> JobQuery {
        JobQuery {
            status: None,
            worker: None,
            tag: None,
            created_after: None,
            created_before: None,
            after: None,
            before: None,
            limit,
        }
    }
}

/// The jobs `q` asks for, newest first. The id bounds walk the primary key
/// (or the status's index) from the cursor down; the other filters are
/// checked on the rows walked.
pub fn list(conn: &Connection, q: &JobQuery) -> Result<Vec<Job>, StoreError> {
    // Each status reads its partial index (finished ones in id order,
    // queued and running ones sorted), never a scan of the whole history.
    let (index, filter) = match q.status {
        None => ("", "CAST(?1 AS TEXT) IS NULL"),
        Some(JobStatus::Queued) => (
            "INDEXED BY jobs_queued_run_after",
            "status = ?1 AND status = 'queued'",
        ),
        Some(JobStatus::Running) => (
            "INDEXED BY jobs_running_worker",
            "status = ?1 AND status = 'running'",
        ),
        Some(_) => (
            "INDEXED BY jobs_finished_by_status",
            "status = ?1 AND finished_at IS NOT NULL",
        ),
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs {index} WHERE {filter}
         AND id < ?2 AND id > ?3
         AND (CAST(?4 AS BIGINT) IS NULL OR worker_id = ?4)
         AND (CAST(?5 AS TEXT) IS NULL OR instr(required_tags || preferred_tags, ?5) > 0)
         AND created_at >= ?6 AND created_at < ?7
         ORDER BY id DESC LIMIT ?8"
    ))?;
    // As it appears in the JSON arrays: quoted, so "gpu" does not match "gpu2".
    let tag = q
        .tag
        .as_ref()
        .map(|t| serde_json::Value::from(t.as_str()).to_string());
    let rows = stmt.query_map(
        params![
            q.status,
            q.before.unwrap_or(i64::MAX),
            q.after.unwrap_or(0),
            q.worker,
            tag,
            q.created_after.unwrap_or(i64::MIN),
            q.created_before.unwrap_or(i64::MAX),
            q.limit
        ],
        job_row,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::leases::{expire_leases, release_undelivered};

    #[test]
    fn not_before_waits_for_both_clocks_below_a_step() {
        // Rounding puts the wall 1 ms ahead: still not before not_before.
        assert_eq!(not_before_to_run_after(10_000, 1, 0), 10_000);
        // The wall behind: wait until the wall reaches not_before.
        assert_eq!(not_before_to_run_after(10_000, -300, 0), 10_300);
        // A step forward: follow the wall.
        assert_eq!(not_before_to_run_after(10_000, 5_000, 0), 5_000);
        // Never before the job was created.
        assert_eq!(not_before_to_run_after(10_000, 9_000, 4_000), 4_000);
    }

    /// A database with two idle workers and job 1 granted to worker 1
    /// (attempt 1).
    fn granted() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let conn = super::super::test_db(&path);
        conn.execute_batch(
            "INSERT INTO workers (id, name, state, registered_at) VALUES (1, 'a', 'idle', 0), (2, 'b', 'idle', 0);
             INSERT INTO jobs (id, status, command, spec_sha256, run_after, created_at, max_attempts)
               VALUES (1, 'queued', '[\"true\"]', 'x', 0, 0, 2);",
        )
        .unwrap();
        let a = grant(&conn, 10, 1, 1, &[], 30_000).unwrap();
        assert_eq!(a.attempt, 1);
        (dir, conn)
    }

    fn report(attempt: i64, outcome: drover_proto::Outcome) -> CompleteRequest {
        CompleteRequest {
            attempt,
            outcome,
            exit_code: Some(0),
            result: None,
            error: None,
        }
    }

    /// The fence is the row count of one update: the holder's report lands
    /// once; a wrong attempt, a wrong worker, or any report after the job
    /// moved on is stale and writes nothing.
    #[test]
    fn only_the_lease_holder_ends_an_attempt() {
        use drover_proto::Outcome::{Failed, Succeeded};
        let (_dir, conn) = granted();
        let status = |c: &Connection| -> String {
            c.query_row("SELECT status FROM jobs WHERE id = 1", params![], |r| {
                r.get(0)
            })
            .unwrap()
        };
        let stale = |r: Result<CompleteResponse, StoreError>| match r {
            Err(e) => e.code == "stale_lease",
            Ok(_) => false,
        };
        assert!(
            stale(complete(&conn, 20, 1, 1, &report(2, Succeeded), 0)),
            "wrong attempt"
        );
        assert!(
            stale(complete(&conn, 20, 2, 1, &report(1, Succeeded), 0)),
            "wrong worker"
        );
        assert_eq!(
            status(&conn),
            "running",
            "nothing written by a stale report"
        );
        let r = complete(&conn, 20, 1, 1, &report(1, Failed), 0).unwrap();
        assert_eq!((r.status.as_str(), r.replay), ("queued", false));
        let again = complete(&conn, 21, 1, 1, &report(1, Failed), 0).unwrap();
        assert!(again.replay, "the same report again is a replay");
        assert!(
            stale(complete(&conn, 22, 1, 1, &report(1, Succeeded), 0)),
            "a different report for an ended attempt"
        );
        // Attempt 2 on worker 2: attempt 1's holder can no longer end it.
        let a = grant(&conn, 30, 2, 1, &[], 30_000).unwrap();
        assert_eq!(a.attempt, 2);
        assert!(stale(complete(&conn, 40, 1, 1, &report(2, Succeeded), 0)));
        let f = Fence {
            job_id: 1,
            attempt: 1,
            worker_id: 1,
        };
        assert!(
            check_fence(&conn, f).is_err(),
            "logs of the old attempt are refused"
        );
        assert!(check_fence(
            &conn,
            Fence {
                attempt: 2,
                worker_id: 2,
                ..f
            }
        )
        .is_ok());
        let r = complete(&conn, 50, 2, 1, &report(2, Succeeded), 0).unwrap();
        assert_eq!(r.status, "succeeded");
        let events: i64 = conn
            .query_row(
                "SELECT count(*) FROM events WHERE kind IN ('job.requeued', 'job.succeeded')",
                params![],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(events, 2, "one event per ended attempt");
    }

    /// The coordinator's own endings (expiry, release) go through the same
    /// fence: a job no longer running is left alone.
    #[test]
    fn a_lost_lease_ends_only_a_running_attempt() {
        let (_dir, conn) = granted();
        assert_eq!(expire_leases(&conn, 10 + 30_001).unwrap(), 1);
        let (status, used, losses): (String, i64, i64) = conn
            .query_row(
                "SELECT status, attempts_used, lease_losses FROM jobs WHERE id = 1",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((status.as_str(), used, losses), ("queued", 1, 1));
        release_undelivered(&conn, 40_000, 1, 1, 1).unwrap();
        assert_eq!(
            conn.query_row(
                "SELECT count(*) FROM events WHERE kind = 'job.requeued'",
                params![],
                |r| r.get::<_, i64>(0)
            )
            .unwrap(),
            1,
            "releasing an attempt that already ended changes nothing"
        );
    }

    /// Listing and counting by status read the partial indexes (an
    /// INDEXED BY that cannot serve its query is an error, so this also
    /// checks the plans), newest first.
    #[test]
    fn listing_and_counting_by_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let conn = super::super::test_db(&path);
        conn.execute_batch(
            "INSERT INTO workers (id, name, state, registered_at) VALUES (1, 'w', 'busy', 0);
             INSERT INTO jobs (id, status, command, spec_sha256, run_after, created_at, finished_at, worker_id)
               VALUES (1, 'succeeded', '[]', 'x', 0, 0, 10, 1), (2, 'queued', '[]', 'x', 0, 0, NULL, NULL),
                      (3, 'running', '[]', 'x', 0, 0, NULL, 1), (4, 'failed', '[]', 'x', 0, 0, 20, 1),
                      (5, 'succeeded', '[]', 'x', 0, 0, 30, 1), (6, 'queued', '[]', 'x', 0, 0, NULL, NULL),
                      (7, 'cancelled', '[]', 'x', 0, 0, 40, NULL);",
        )
        .unwrap();
        let query =
            |q: &JobQuery| -> Vec<i64> { list(&conn, q).unwrap().iter().map(|j| j.id).collect() };
        let ids = |status: Option<&str>, limit: i64| -> Vec<i64> {
            let status = status.and_then(JobStatus::parse);
            query(&JobQuery {
                status,
                ..JobQuery::newest(limit)
            })
        };
        assert_eq!(ids(None, 100), [7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(ids(None, 2), [7, 6]);
        assert_eq!(ids(Some("queued"), 100), [6, 2]);
        assert_eq!(ids(Some("queued"), 1), [6]);
        assert_eq!(ids(Some("running"), 100), [3]);
        assert_eq!(ids(Some("succeeded"), 100), [5, 1]);
        assert_eq!(ids(Some("failed"), 100), [4]);
        assert_eq!(ids(Some("cancelled"), 100), [7]);
        // Cursors: a page back from 5, and above 2.
        let page = |after, before| JobQuery {
            after,
            before,
            ..JobQuery::newest(2)
        };
        assert_eq!(query(&page(None, Some(5))), [4, 3]);
        assert_eq!(query(&page(None, Some(3))), [2, 1]);
        assert_eq!(query(&page(Some(5), None)), [7, 6]);
        assert_eq!(query(&page(Some(2), Some(5))), [4, 3]);
        let worker = JobQuery {
            worker: Some(1),
            ..JobQuery::newest(100)
        };
        assert_eq!(query(&worker), [5, 4, 3, 1]);
        let finished_by_1 = JobQuery {
            status: JobStatus::parse("succeeded"),
            ..worker
        };
        assert_eq!(query(&finished_by_1), [5, 1]);
        let stats = super::super::workers::stats(&conn, 0).unwrap();
        let jobs: Vec<(&str, i64)> = stats.jobs.into_iter().collect();
        assert_eq!(
            jobs,
            [
                ("cancelled", 1),
                ("failed", 1),
                ("queued", 2),
                ("running", 1),
                ("succeeded", 2)
            ]
        );
    }

    #[test]
    fn a_clock_stepped_back_while_down_strands_no_waiting_job() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let conn = super::super::test_db(&path);
        let hour = 3_600_000;
        let now = 1_000 * hour;
        // Times written under a clock an hour ahead: a retry due in 20 s, a
        // job planned for a wall time 10 minutes away, one due long ago.
        let insert = |id: i64, run_after: Ms, not_before: Option<Ms>, used: i64, attempt: i64| {
            conn.execute(
                "INSERT INTO jobs (id, status, command, created_at, run_after, not_before, attempts_used, attempt, spec_sha256)
                 VALUES (?1, 'queued', '[\"true\"]', 0, ?2, ?3, ?4, ?5, 'x')",
                params![id, run_after, not_before, used, attempt],
            )
            .unwrap();
        };
        insert(1, now + hour + 20_000, None, 1, 1);
        insert(2, now + 10 * 60_000 - hour, Some(now + 10 * 60_000), 0, 0);
        insert(3, now - hour, None, 2, 2);
        assert_eq!(rebase_waiting(&conn, now, 10_000).unwrap(), 2);
        let run_after = |id: i64| -> Ms {
            conn.query_row("SELECT run_after FROM jobs WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert_eq!(
            run_after(1),
            now + 12_000,
            "at most its backoff (+20 %) from now"
        );
        assert_eq!(run_after(2), now + 10 * 60_000, "its wall time again");
        assert_eq!(run_after(3), now - hour, "a due job stays due");
    }
}
