//! The API's JSON for the store's typed rows: times as RFC 3339 text,
//! leases as seconds left, the restore hint of an offline worker.

use crate::db::{iso, wall_offset, Ms};
use crate::lifecycle::{JobStatus, WorkerState};
use crate::model::{Event, Job, Stats, Worker, WorkerDetail};
use crate::spec::shell_quote;
use serde_json::{json, Value};

/// A job; `now` is the store's clock (for the lease left and the time a
/// delayed job becomes claimable).
pub fn job(j: &Job, now: Ms) -> Value {
    let running = j.status == JobStatus::Running;
    let mut v = json!({
        "id": j.id,
        "status": j.status.as_str(),
        "command": j.command,
        "env": j.env,
        "cwd": j.cwd,
        "gpus": j.gpus,
        "min_vram_mb": j.min_vram_mb,
        "required_tags": j.required_tags,
        "preferred_tags": j.preferred_tags,
        "priority": j.priority,
        "max_attempts": j.max_attempts,
        "timeout_s": j.timeout_s,
        "not_before": iso(j.not_before),
        "idempotency_key": j.idempotency_key,
        "metadata": j.metadata,
        "attempt": j.attempt,
        "attempts_used": j.attempts_used,
        "worker_id": j.worker_id,
        "gpu_indices": j.gpu_indices,
        "lease_expires_in_s": j.lease_expires_at.filter(|_| running)
            .map(|l| (l - now).max(0) as f64 / 1000.0),
        "cancel_requested": j.cancel_requested,
        "exit_code": j.exit_code,
        "result": j.result,
        "error": j.error,
        "created_at": iso(j.created_at),
        "started_at": iso(j.started_at),
        "finished_at": iso(j.finished_at),
        // As wall time, like not_before (the clocks differ once the wall
        // clock steps).
        "run_after": (j.status == JobStatus::Queued && j.run_after > now)
            .then(|| iso(Some(j.run_after + wall_offset(now)))),
        "progress": j.progress,
        "cpu_fallback": j.cpu_fallback,
        "exclusive": j.exclusive,
        "limits": j.limits,
        "waiting_reason": j.waiting_reason,
    });
    if let Some(attempts) = &j.attempts {
        v["attempts"] = attempts
            .iter()
            .map(|a| {
                json!({
                    "attempt": a.attempt,
                    "worker_id": a.worker_id,
                    "gpu_indices": a.gpu_indices,
                    "started_at": iso(a.started_at),
                    "ended_at": iso(a.ended_at),
                    "outcome": a.outcome,
                    "exit_code": a.exit_code,
                    "error": a.error,
                    "log_bytes": a.log_bytes,
                })
            })
            .collect();
    }
    v
}

pub fn jobs(jobs: &[Job], now: Ms) -> Vec<Value> {
    jobs.iter().map(|j| job(j, now)).collect()
}

pub fn worker(w: &Worker) -> Value {
    json!({
        "id": w.id,
        "name": w.name,
        "state": w.state.as_str(),
        "hostname": w.hostname,
        "cpu_cores": w.cpu_cores,
        "memory_mb": w.memory_mb,
        "gpus": w.gpus,
        "tags": w.tags,
        "slots": w.slots,
        "agent_version": w.agent_version,
        "gpu_metrics": w.gpu_metrics,
        "registered_at": iso(w.registered_at),
        "last_seen_at": iso(w.last_seen_at),
        "drain": w.drain,
        "tags_pinned": w.tags_pinned,
        "address": w.address,
        // How to bring an offline worker back, without SSH keys here.
        "restore": restore_hint(w),
        "running_jobs": w.running_jobs.len(),
        "running_job_ids": w.running_jobs,
        "can_limit": w.can_limit,
        "metadata": w.metadata,
        "decommissioned_at": iso(w.decommissioned_at),
    })
}

/// One worker with its GPU history, health log and recent attempts.
pub fn worker_detail(d: &WorkerDetail) -> Value {
    let mut v = worker(&d.worker);
    v["gpu_history"] = d
        .gpu_history
        .iter()
        .map(|s| {
            json!({
                "gpu": s.gpu,
                "at": iso(s.at),
                "utilization_pct": s.utilization_pct,
                "memory_used_mb": s.memory_used_mb,
                "temperature_c": s.temperature_c,
                "power_w": s.power_w,
            })
        })
        .collect();
    v["health_log"] = d
        .health_log
        .iter()
        .map(|h| json!({"at": iso(h.at), "from": h.from, "to": h.to, "reason": h.reason}))
        .collect();
    v["recent_jobs"] = d
        .recent_jobs
        .iter()
        .map(|r| {
            json!({
                "job_id": r.job_id,
                "attempt": r.attempt,
                "started_at": iso(r.started_at),
                "ended_at": iso(r.ended_at),
                "outcome": r.outcome,
                "exit_code": r.exit_code,
            })
        })
        .collect();
    v
}

/// The command that brings an offline worker back (its last address).
fn restore_hint(w: &Worker) -> Option<String> {
    let address = w
        .address
        .as_deref()
        .filter(|_| w.state == WorkerState::Offline)?;
    let host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    };
    // Every value is quoted: names in older databases were not validated.
    // The secret comes from DROVER_REGISTRATION_SECRET, never argv.
    Some(format!(
        "drover-agent deploy {} --name {} --coordinator \"$DROVER_COORDINATOR\"",
        shell_quote(&format!("root@{host}")),
        shell_quote(&w.name)
    ))
}

pub fn event(e: &Event) -> Value {
    json!({
        "id": e.id,
        "at": iso(e.at),
        "kind": e.kind,
        "job_id": e.job_id,
        "worker_id": e.worker_id,
        "data": e.data,
    })
}

/// The fleet summary; `agents_waiting` is the dispatcher's.
pub fn stats(s: &Stats, agents_waiting: usize) -> Value {
    let waits = &s.queue_waits;
    let pct = |p: f64| -> Option<f64> {
        let i = ((waits.len() as f64 - 1.0) * p).round() as usize;
        waits.get(i).map(|w| *w as f64 / 1000.0)
    };
    json!({
        "workers": s.workers,
        "jobs": s.jobs,
        "gpus": {"total": s.gpus_total, "busy": s.gpus_busy},
        "last_event_id": s.last_event_id,
        "queue_wait_s_last_hour": {"p50": pct(0.5), "p95": pct(0.95), "dispatched": waits.len()},
        "agents_waiting": agents_waiting,
    })
}

/// One of an agent's own log lines.
pub fn agent_line(l: &crate::db::agent_log::AgentLine) -> Value {
    json!({
        "id": l.id,
        "time": iso(Some(l.at)),
        "level": l.level,
        "target": l.target,
        "message": l.message,
    })
}
