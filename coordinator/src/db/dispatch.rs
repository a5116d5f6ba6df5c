//! One dispatch round, in one write transaction: hand queued jobs to the
//! waiting (parked) workers, best job first (priority, then age), each to
//! the best worker for it (`matching::best`), and answer workers that have
//! cancel orders pending.
//!
//! Cost: two queries for the fleet's state, one indexed query per GPU count
//! a waiting worker could take (the head of the queue for that count), so a
//! round costs the same with 100,000 queued and 1,000,000 finished jobs as
//! with none.

use super::jobs::{grant, take_orders};
use super::{iso, Ms};
use crate::error::ApiError;
use crate::matching::{self, Needs, Offer, WorkerView};
use drover_proto::{Assignment, GpuInfo, GpuMetrics, Order};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;

/// Queued jobs looked at per GPU count in one round.
const SCAN: i64 = 256;

/// A queued job as the round sees it.
struct Candidate {
    id: i64,
    priority: i64,
    claimable_since: Ms,
    needs: Needs,
}

/// What a round decided.
#[derive(Default)]
pub struct Round {
    /// Per waiting worker: the jobs granted to it and the orders for it.
    pub answers: HashMap<i64, (Vec<Assignment>, Vec<Order>)>,
    /// Workers held empty for a job that waited too long: worker -> job.
    pub reservations: HashMap<i64, i64>,
}

fn needs_from(
    gpus: u32,
    min_vram_mb: i64,
    required: &str,
    preferred: &str,
    cpu_fallback: bool,
) -> Needs {
    Needs {
        gpus,
        min_vram_mb: min_vram_mb.max(0) as u64,
        required_tags: serde_json::from_str(required).unwrap_or_default(),
        preferred_tags: serde_json::from_str(preferred).unwrap_or_default(),
        cpu_fallback,
    }
}

/// Every approved, live worker's offer (and, for explanations, the rest).
fn fleet(conn: &Connection) -> Result<Vec<WorkerView>, ApiError> {
    let mut running: HashMap<i64, (u32, Vec<u32>)> = HashMap::new();
    let mut stmt =
        conn.prepare_cached("SELECT worker_id, gpu_indices FROM jobs WHERE status = 'running'")?;
    for row in stmt.query_map([], |r| {
        Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, String>(1)?))
    })? {
        let (worker, gpus) = row?;
        let entry = running.entry(worker.unwrap_or_default()).or_default();
        entry.0 += 1;
        entry
            .1
            .extend(serde_json::from_str::<Vec<u32>>(&gpus).unwrap_or_default());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, state, tags, gpus, slots, gpu_metrics, coalesce(incarnation LIKE 'stopped:%', 0)
         FROM workers WHERE state != 'decommissioned'",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, bool>(7)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name, mut state, tags, gpus, slots, metrics, stopping) = row?;
        if stopping && (state == "idle" || state == "busy") {
            // Its agent is shutting down: it takes nothing new.
            state = "stopping".into();
        }
        let metrics: Vec<GpuMetrics> = serde_json::from_str(&metrics).unwrap_or_default();
        let gpu_util = if metrics.is_empty() {
            0.0
        } else {
            metrics.iter().map(|m| m.utilization_pct).sum::<f64>() / metrics.len() as f64
        };
        let (n, busy) = running.remove(&id).unwrap_or_default();
        out.push(WorkerView {
            name,
            state,
            offer: Offer {
                worker_id: id,
                tags: serde_json::from_str(&tags).unwrap_or_default(),
                gpus: serde_json::from_str::<Vec<GpuInfo>>(&gpus).unwrap_or_default(),
                busy_gpus: busy,
                slots: slots.max(0) as u32,
                running: n,
                gpu_util,
            },
        });
    }
    Ok(out)
}

/// The heads of the queue a set of offers could take from: per GPU count up
/// to the most free GPUs any offer has, plus CPU-fallback jobs.
fn candidates(conn: &Connection, now: Ms, max_free_gpus: u32) -> Result<Vec<Candidate>, ApiError> {
    let map = |r: &rusqlite::Row| -> rusqlite::Result<Candidate> {
        Ok(Candidate {
            id: r.get(0)?,
            priority: r.get(1)?,
            claimable_since: r.get(2)?,
            needs: needs_from(
                r.get(3)?,
                r.get(4)?,
                &r.get::<_, String>(5)?,
                &r.get::<_, String>(6)?,
                r.get(7)?,
            ),
        })
    };
    let columns =
        "id, priority, run_after, gpus, min_vram_mb, required_tags, preferred_tags, cpu_fallback";
    let mut out: Vec<Candidate> = Vec::new();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {columns} FROM jobs WHERE status = 'queued' AND gpus = ?1 AND run_after <= ?2
         ORDER BY priority DESC, id LIMIT ?3"
    ))?;
    for gpus in 0..=max_free_gpus {
        for c in stmt.query_map(params![gpus, now, SCAN], map)? {
            out.push(c?);
        }
    }
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {columns} FROM jobs WHERE status = 'queued' AND cpu_fallback = 1 AND gpus > ?1 AND run_after <= ?2
         ORDER BY priority DESC, id LIMIT ?3"
    ))?;
    for c in stmt.query_map(params![max_free_gpus, now, SCAN], map)? {
        out.push(c?);
    }
    out.sort_by_key(|c| (std::cmp::Reverse(c.priority), c.id));
    Ok(out)
}

/// Runs one round for the workers in `waiting`. `reservations` are those of
/// the previous round; `reserve_after` is how long a job that fits no
/// waiting worker may wait before a worker is held empty for it.
pub fn round(
    conn: &Connection,
    now: Ms,
    waiting: &[i64],
    lease_ttl: Ms,
    reserve_after: Ms,
    reservations: &HashMap<i64, i64>,
) -> Result<Round, ApiError> {
    let mut round = Round::default();
    for &w in waiting {
        let orders = take_orders(conn, w)?;
        if !orders.is_empty() {
            round.answers.entry(w).or_default().1 = orders;
        }
    }
    // Reservations end when their job left the queue.
    let mut still = conn.prepare_cached("SELECT status = 'queued' FROM jobs WHERE id = ?1")?;
    for (&worker, &job) in reservations {
        if still.query_row([job], |r| r.get::<_, bool>(0)).optional()? == Some(true) {
            round.reservations.insert(worker, job);
        }
    }
    let any_ready: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND run_after <= ?1)",
        )?
        .query_row([now], |r| r.get(0))?;
    if !any_ready {
        return Ok(round);
    }
    let views = fleet(conn)?;
    let live = |v: &WorkerView| v.state == "idle" || v.state == "busy";
    let mut offers: Vec<Offer> = views
        .iter()
        .filter(|v| live(v) && waiting.contains(&v.offer.worker_id))
        .map(|v| v.offer.clone())
        .collect();
    let max_free = offers
        .iter()
        .filter(|o| o.free_slots() > 0)
        .map(|o| o.gpus.len().saturating_sub(o.busy_gpus.len()) as u32)
        .max();
    let Some(max_free) = max_free else {
        return Ok(round);
    };
    let reserved_job: HashMap<i64, i64> =
        round.reservations.iter().map(|(w, j)| (*j, *w)).collect();
    for job in candidates(conn, now, max_free)? {
        if offers.iter().all(|o| o.free_slots() == 0) {
            break;
        }
        let allowed = |o: &Offer| match round.reservations.get(&o.worker_id) {
            Some(j) => *j == job.id,
            None => true,
        };
        if let Some((i, gpus)) = matching::best(&job.needs, &offers, allowed) {
            let worker = offers[i].worker_id;
            let a = grant(conn, now, worker, job.id, &gpus, lease_ttl)?;
            offers[i].take(&gpus);
            round.answers.entry(worker).or_default().0.push(a);
            continue;
        }
        // Fits no waiting worker now. A multi-GPU job that has waited too
        // long gets a worker held empty for it, so a stream of small jobs
        // cannot starve it.
        if job.needs.gpus > 1
            && now - job.claimable_since > reserve_after
            && !reserved_job.contains_key(&job.id)
        {
            let host = views
                .iter()
                .filter(|v| live(v) && !round.reservations.contains_key(&v.offer.worker_id))
                .filter(|v| v.offer.could_host(&job.needs))
                .max_by_key(|v| {
                    let free = v.offer.gpus.len().saturating_sub(v.offer.busy_gpus.len());
                    (
                        free,
                        std::cmp::Reverse(v.offer.running),
                        std::cmp::Reverse(v.offer.worker_id),
                    )
                });
            if let Some(v) = host {
                log::info!(
                    "reserving worker {} for job {} (needs {} GPUs, waiting since {})",
                    v.offer.worker_id,
                    job.id,
                    job.needs.gpus,
                    iso(Some(job.claimable_since)).unwrap_or_default()
                );
                round.reservations.insert(v.offer.worker_id, job.id);
            }
        }
    }
    Ok(round)
}

/// Why queued job `job_id` is not running (None when it is not queued).
pub fn why_waiting(
    conn: &Connection,
    now: Ms,
    job_id: i64,
    reserved_on: Option<i64>,
) -> Result<Option<String>, ApiError> {
    let row = conn
        .prepare_cached(
            "SELECT status, run_after, gpus, min_vram_mb, required_tags, preferred_tags, cpu_fallback, attempts_used
             FROM jobs WHERE id = ?1",
        )?
        .query_row([job_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Ms>(1)?,
                needs_from(r.get(2)?, r.get(3)?, &r.get::<_, String>(4)?, &r.get::<_, String>(5)?, r.get(6)?),
                r.get::<_, i64>(7)?,
            ))
        })
        .optional()?;
    let Some((status, run_after, needs, attempts_used)) = row else {
        return Ok(None);
    };
    if status != "queued" {
        return Ok(None);
    }
    if run_after > now {
        let what = if attempts_used > 0 {
            "retry backoff"
        } else {
            "not_before"
        };
        return Ok(Some(format!(
            "waiting for its {what} until {}",
            iso(Some(run_after)).unwrap_or_default()
        )));
    }
    let mut why = matching::explain(&needs, &fleet(conn)?);
    if let Some(w) = reserved_on {
        why.push_str(&format!("; worker {w} is being kept free for it"));
    }
    Ok(Some(why))
}
