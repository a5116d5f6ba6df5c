//! One dispatch round, in one write transaction: hand queued jobs to the
//! waiting (parked) workers, best job first (priority, then age), each to
//! the best worker for it (`matching::best`), and answer workers that have
//! cancel orders pending.
//!
//! Cost: two queries for the fleet's state, one indexed query per GPU count
//! a waiting worker could take (the head of the queue for that count), so a
//! round costs the same with 100,000 queued and 1,000,000 finished jobs as
//! with none.

use super::jobs::grant;
use super::leases::take_orders;
use super::sql::{Connection, OptionalExtension};
use super::worker_state;
use super::StoreError;
use super::{iso, Ms};
use crate::lifecycle::JobStatus;
use crate::matching::{self, Needs, Offer, WorkerView};
use crate::model::Job;
use drover_proto::{Assignment, GpuInfo, GpuMetrics, Order};
use rusqlite::params;
use std::collections::HashMap;

/// Queued jobs looked at per shape in one round: the LIMIT of the queries
/// that read heads of the queue. A constant, not a parameter: SQLite
/// prepares a statement with a bound LIMIT again at every run.
const SCAN: usize = 256;

// No `LIMIT ?` in the round's queries: SQLite re-prepares a statement with a
// bound LIMIT on every run (a twentieth of the writer's time); the index
// order streams the rows, and the reader stops taking them.
// The round's queries name their index: without statistics SQLite may pick
// an index on a column the WHERE does not narrow and scan every queued job. The test at the bottom
// checks each plan.
const RUNNING_SQL: &str = "SELECT worker_id, gpu_indices FROM jobs INDEXED BY jobs_running_worker
    WHERE status = 'running'";
// The next shape after (gpus, tags, vram), as three prefix seeks: a row
// value comparison would only seek on the first column and scan the rest.
const NEXT_VRAM_SQL: &str =
    "SELECT gpus, required_tags, min_vram_mb FROM jobs INDEXED BY jobs_queue
    WHERE status = 'queued' AND gpus = ?1 AND required_tags = ?2 AND min_vram_mb > ?3
    ORDER BY min_vram_mb LIMIT 1";
const NEXT_TAGS_SQL: &str =
    "SELECT gpus, required_tags, min_vram_mb FROM jobs INDEXED BY jobs_queue
    WHERE status = 'queued' AND gpus = ?1 AND required_tags > ?2
    ORDER BY required_tags, min_vram_mb LIMIT 1";
const NEXT_GPUS_SQL: &str =
    "SELECT gpus, required_tags, min_vram_mb FROM jobs INDEXED BY jobs_queue
    WHERE status = 'queued' AND gpus > ?1
    ORDER BY gpus, required_tags, min_vram_mb LIMIT 1";
const HEADS_SQL: &str = "SELECT id, priority, run_after, gpus, min_vram_mb, required_tags, preferred_tags, cpu_fallback
    FROM jobs INDEXED BY jobs_queue
    WHERE status = 'queued' AND gpus = ?1 AND required_tags = ?2 AND min_vram_mb = ?3 AND run_after <= ?4
    ORDER BY priority DESC, id LIMIT 256";
const FALLBACK_SQL: &str =
    "SELECT id, priority, run_after, gpus, min_vram_mb, required_tags, preferred_tags, cpu_fallback
    FROM jobs INDEXED BY jobs_queue_fallback
    WHERE status = 'queued' AND cpu_fallback = 1 AND gpus > ?1 AND run_after <= ?2
    ORDER BY priority DESC, id LIMIT 256";
const ANY_READY_SQL: &str = "SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_queued_run_after
    WHERE status = 'queued' AND run_after <= ?1)";
const NEXT_READY_SQL: &str = "SELECT min(run_after) FROM jobs INDEXED BY jobs_queued_run_after
    WHERE status = 'queued' AND run_after > ?1";

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
    /// Workers held empty for a job that waited too long: worker -> job
    /// (`workers.reserved_for`).
    reservations: HashMap<i64, i64>,
    /// When the next delayed job (retry backoff, not_before) becomes
    /// claimable, so a round runs right then.
    pub next_ready: Option<Ms>,
    /// How long each dispatched job waited since it became claimable.
    pub waits: Vec<Ms>,
    /// Some queued job was claimable (whether or not it was granted).
    pub ready: bool,
    /// The workers given jobs, in the order given (one entry per job).
    pub given: Vec<i64>,
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
fn fleet(conn: &Connection) -> Result<Vec<WorkerView>, StoreError> {
    let mut running: HashMap<i64, (u32, Vec<u32>)> = HashMap::new();
    let mut stmt = conn.prepare_cached(RUNNING_SQL)?;
    for row in stmt.query_map(params![], |r| {
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
        "SELECT id, name, state, tags, gpus, slots, gpu_metrics, CASE WHEN incarnation LIKE 'stopped:%' THEN 1 ELSE 0 END,
         can_limit
         FROM workers WHERE state != 'decommissioned' AND forgotten_at IS NULL",
    )?;
    let rows = stmt.query_map(params![], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, crate::lifecycle::WorkerState>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, bool>(7)?,
            r.get::<_, bool>(8)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name, state, tags, gpus, slots, metrics, stopping, can_limit) = row?;
        let mut tags: Vec<String> = serde_json::from_str(&tags).unwrap_or_default();
        if can_limit {
            // Matched by jobs with limits, which require it.
            tags.push(drover_proto::LIMITS_TAG.to_string());
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
            stopping,
            offer: Offer {
                worker_id: id,
                tags,
                gpus: serde_json::from_str::<Vec<GpuInfo>>(&gpus).unwrap_or_default(),
                busy_gpus: busy,
                slots: slots.max(0) as u32,
                running: n,
                gpu_util,
                // In memory (`parked::Dispatcher`): set for a round's offers.
                last_given: 0,
            },
        });
    }
    Ok(out)
}

/// A kind of queued job: what it needs to fit (GPU count, required tags,
/// VRAM). Fleets have few shapes however long the queue is.
struct Shape {
    gpus: u32,
    tags_json: String,
    min_vram_mb: i64,
}

/// Most shapes looked at in one round.
const MAX_SHAPES: usize = 128;

/// The distinct shapes of queued jobs, by index seeks (a few per shape).
fn shapes(conn: &Connection) -> Result<Vec<Shape>, StoreError> {
    type Key = (i64, String, i64);
    let seek = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<Option<Key>, StoreError> {
        conn.prepare_cached(sql)?
            .query_row(p, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
    };
    let mut out: Vec<Shape> = Vec::new();
    let mut next = seek(NEXT_GPUS_SQL, &[&-1i64])?;
    while let Some((gpus, tags, vram)) = next {
        if out.len() >= MAX_SHAPES {
            break;
        }
        next = match seek(NEXT_VRAM_SQL, &[&gpus, &tags, &vram])? {
            Some(k) => Some(k),
            None => match seek(NEXT_TAGS_SQL, &[&gpus, &tags])? {
                Some(k) => Some(k),
                None => seek(NEXT_GPUS_SQL, &[&gpus])?,
            },
        };
        out.push(Shape {
            gpus: gpus.max(0) as u32,
            tags_json: tags,
            min_vram_mb: vram,
        });
    }
    Ok(out)
}

fn candidate(r: &super::sql::Row) -> rusqlite::Result<Candidate> {
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
}

/// The best queued jobs of one shape claimable since `ready_by`.
fn heads(
    conn: &Connection,
    shape: &Shape,
    ready_by: Ms,
    limit: usize,
) -> Result<Vec<Candidate>, StoreError> {
    let mut stmt = conn.prepare_cached(HEADS_SQL)?;
    let rows = stmt.query_map(
        params![shape.gpus, shape.tags_json, shape.min_vram_mb, ready_by],
        candidate,
    )?;
    Ok(rows.take(limit).collect::<Result<_, _>>()?)
}

/// The heads of the queue the waiting offers could take now: per shape that
/// some offer could fit, plus CPU-fallback jobs. Best first.
fn candidates(
    conn: &Connection,
    now: Ms,
    shapes: &[Shape],
    offers: &[Offer],
    reserved: bool,
) -> Result<Vec<Candidate>, StoreError> {
    let open: Vec<&Offer> = offers.iter().filter(|o| o.free_slots() > 0).collect();
    // Jobs of one shape fit the same offers, and each one granted takes a
    // slot: the free slots bound what a shape can use. A held worker only
    // takes its own job, which may lie deeper: then the full scan.
    let per_shape = if reserved {
        SCAN
    } else {
        let free: usize = open.iter().map(|o| o.free_slots() as usize).sum();
        free.min(SCAN)
    };
    let mut out: Vec<Candidate> = Vec::new();
    for shape in shapes {
        let needs = needs_from(shape.gpus, shape.min_vram_mb, &shape.tags_json, "[]", false);
        if open.iter().any(|o| matching::place(&needs, o).is_some()) {
            out.extend(heads(conn, shape, now, per_shape)?);
        }
    }
    let max_free = open
        .iter()
        .map(|o| o.gpus.len().saturating_sub(o.busy_gpus.len()) as u32)
        .max()
        .unwrap_or(0);
    let mut stmt = conn.prepare_cached(FALLBACK_SQL)?;
    for c in stmt.query_map(params![max_free, now], candidate)? {
        out.push(c?);
    }
    out.sort_by_key(|c| (std::cmp::Reverse(c.priority), c.id));
    out.dedup_by_key(|c| c.id);
    Ok(out)
}

/// The workers held free for a job: (worker, job, whether the job is
/// still queued).
fn held(conn: &Connection) -> Result<Vec<(i64, i64, bool)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT w.id, w.reserved_for, coalesce(j.status = 'queued', false)
         FROM workers w LEFT JOIN jobs j ON j.id = w.reserved_for
         WHERE w.reserved_for IS NOT NULL",
    )?;
    let rows = stmt.query_map(params![], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The workers held free for a queued job (worker -> job); reservations
/// whose job left the queue end here.
fn still_held(conn: &Connection) -> Result<HashMap<i64, i64>, StoreError> {
    let mut out = HashMap::new();
    for (worker, job, queued) in held(conn)? {
        if queued {
            out.insert(worker, job);
        } else {
            hold(conn, worker, None)?;
        }
    }
    Ok(out)
}

/// The worker held free for queued job `job_id`, if any.
pub fn reserved_on(conn: &Connection, job_id: i64) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT id FROM workers WHERE reserved_for = ?1")?
        .query_row([job_id], |r| r.get(0))
        .optional()
}

/// Holds `worker` free for `job` (None: lets it go).
fn hold(conn: &Connection, worker: i64, job: Option<i64>) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE workers SET reserved_for = ?1 WHERE id = ?2")?
        .execute(params![job, worker])?;
    Ok(())
}

/// Multi-GPU jobs claimable for longer than `reserve_after` get a worker held
/// free for them (no new jobs) until they fit, so a stream of small jobs
/// cannot starve them.
fn reserve(
    conn: &Connection,
    now: Ms,
    shapes: &[Shape],
    views: &[WorkerView],
    reserve_after: Ms,
    reservations: &mut HashMap<i64, i64>,
) -> Result<(), StoreError> {
    let gone: Vec<i64> = reservations
        .keys()
        .copied()
        .filter(|w| {
            !views
                .iter()
                .any(|v| v.offer.worker_id == *w && v.takes_work())
        })
        .collect();
    for worker in gone {
        reservations.remove(&worker);
        hold(conn, worker, None)?;
    }
    for shape in shapes.iter().filter(|s| s.gpus > 1) {
        for job in heads(conn, shape, now - reserve_after, 4)? {
            if reservations.values().any(|j| *j == job.id) {
                continue;
            }
            let host = views
                .iter()
                .filter(|v| v.takes_work() && !reservations.contains_key(&v.offer.worker_id))
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
                    "reserving worker {} for job {} (needs {} GPUs, claimable since {})",
                    v.offer.worker_id,
                    job.id,
                    job.needs.gpus,
                    iso(Some(job.claimable_since)).unwrap_or_default()
                );
                reservations.insert(v.offer.worker_id, job.id);
                hold(conn, v.offer.worker_id, Some(job.id))?;
            }
        }
    }
    Ok(())
}

/// Runs one round for the workers in `waiting`. `reserve_after` is how long
/// a job that fits no waiting worker may wait before a worker is held empty
/// for it. Reservations are rows, not memory: rounds run one at a time
/// under the writers' lock, so with several coordinators every round sees
/// the reservations the others made.
pub fn round(
    conn: &Connection,
    now: Ms,
    waiting: &[i64],
    lease_ttl: Ms,
    reserve_after: Ms,
    last_given: &HashMap<i64, u64>,
) -> Result<Round, StoreError> {
    let mut round = Round::default();
    // Built only when needed (orders pending, jobs ready): with 10,000
    // agents re-parking every heartbeat interval, most rounds find neither.
    let set = std::cell::OnceCell::new();
    let waiting_set = || {
        set.get_or_init(|| {
            waiting
                .iter()
                .copied()
                .collect::<std::collections::HashSet<i64>>()
        })
    };
    for (w, orders) in take_orders(conn, |w| waiting_set().contains(&w))? {
        round.answers.entry(w).or_default().1 = orders;
    }
    round.reservations = still_held(conn)?;
    round.next_ready = conn
        .prepare_cached(NEXT_READY_SQL)?
        .query_row([now], |r| r.get(0))?;
    let any_ready: bool = conn
        .prepare_cached(ANY_READY_SQL)?
        .query_row([now], |r| r.get(0))?;
    if !any_ready {
        return Ok(round);
    }
    round.ready = true;
    let views = fleet(conn)?;
    let live = |v: &WorkerView| v.takes_work();
    let mut offers: Vec<Offer> = views
        .iter()
        .filter(|v| live(v) && waiting_set().contains(&v.offer.worker_id))
        .map(|v| Offer {
            last_given: last_given.get(&v.offer.worker_id).copied().unwrap_or(0),
            ..v.offer.clone()
        })
        .collect();
    let shapes = shapes(conn)?;
    reserve(
        conn,
        now,
        &shapes,
        &views,
        reserve_after,
        &mut round.reservations,
    )?;
    let reserved = !round.reservations.is_empty();
    let jobs = candidates(conn, now, &shapes, &offers, reserved)?;
    give(conn, now, lease_ttl, jobs, &mut offers, &mut round)?;
    Ok(round)
}

/// Gives each of `jobs` (best first) to the best of `offers` for it, if
/// any, and records it in `round`.
fn give(
    conn: &Connection,
    now: Ms,
    lease_ttl: Ms,
    jobs: Vec<Candidate>,
    offers: &mut [Offer],
    round: &mut Round,
) -> Result<(), StoreError> {
    for job in jobs {
        if offers.iter().all(|o| o.free_slots() == 0) {
            break;
        }
        let allowed = |o: &Offer| match round.reservations.get(&o.worker_id) {
            Some(j) => *j == job.id,
            None => true,
        };
        let Some((i, gpus)) = matching::best(&job.needs, offers, allowed) else {
            continue;
        };
        let worker = offers[i].worker_id;
        let a = grant(conn, now, worker, job.id, &gpus, lease_ttl)?;
        // A worker already running something is busy: only its first
        // job can change its state.
        if offers[i].running == 0 {
            worker_state::refresh_load(conn, now, worker, &format!("claimed job {}", job.id))?;
        }
        round.waits.push(now - job.claimable_since);
        offers[i].take(&gpus);
        // The most recently given now (the dispatcher numbers the turns
        // once the round is over).
        offers[i].last_given = u64::MAX;
        round.given.push(worker);
        round.answers.entry(worker).or_default().0.push(a);
    }
    Ok(())
}

/// Why queued job `job_id` is not running (None when it is not queued).
pub fn why_waiting(
    conn: &Connection,
    now: Ms,
    job_id: i64,
    reserved_on: Option<i64>,
    fleet_seen: &mut Option<Vec<WorkerView>>,
) -> Result<Option<String>, StoreError> {
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
            iso(Some(run_after + super::wall_offset(now))).unwrap_or_default()
        )));
    }
    // Read once for every job a listing explains.
    let workers = match fleet_seen {
        Some(w) => w,
        None => fleet_seen.insert(fleet(conn)?),
    };
    let mut why = matching::explain(&needs, workers);
    if let Some(w) = reserved_on {
        why.push_str(&format!("; worker {w} is being kept free for it"));
    }
    Ok(Some(why))
}

/// Puts `waiting_reason` on every queued job of a listing (the fleet read
/// once for all).
pub fn explain_waiting(c: &Connection, now: Ms, jobs: &mut [Job]) -> Result<(), StoreError> {
    let mut fleet = None;
    let mut queued = jobs
        .iter_mut()
        .filter(|j| j.status == JobStatus::Queued)
        .peekable();
    if queued.peek().is_none() {
        return Ok(());
    }
    // job -> the worker held for it, read once for the listing.
    let reserved: HashMap<i64, i64> = held(c)?.into_iter().map(|(w, j, _)| (j, w)).collect();
    for job in queued {
        let on = reserved.get(&job.id).copied();
        job.waiting_reason = why_waiting(c, now, job.id, on, &mut fleet)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every query of a dispatch round uses its index: the round's cost does
    /// not grow with the number of queued or finished jobs.
    #[test]
    fn round_queries_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("plan.db");
        let conn = super::super::test_db(&db);
        let conn = conn.lite().unwrap();
        let check = |sql: &str, index: &str| {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let n = stmt.parameter_count();
            let params: Vec<i64> = vec![0; n];
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(params), |r| {
                    r.get::<_, String>(3)
                })
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            let plan = plan.join(" | ");
            println!("{index}: {plan}");
            assert!(
                plan.contains(&format!("INDEX {index}")),
                "{sql}\nplan: {plan}"
            );
            assert!(!plan.contains("TEMP B-TREE"), "{sql}\nsorts: {plan}");
        };
        check(NEXT_VRAM_SQL, "jobs_queue");
        check(NEXT_TAGS_SQL, "jobs_queue");
        check(NEXT_GPUS_SQL, "jobs_queue");
        assert!(HEADS_SQL.ends_with(&format!("LIMIT {SCAN}")));
        assert!(FALLBACK_SQL.ends_with(&format!("LIMIT {SCAN}")));
        check(HEADS_SQL, "jobs_queue");
        check(FALLBACK_SQL, "jobs_queue_fallback");
        check(ANY_READY_SQL, "jobs_queued_run_after");
        check(NEXT_READY_SQL, "jobs_queued_run_after");
        check(RUNNING_SQL, "jobs_running_worker");
        // Each round runs these again with new values: none may need
        // parsing again (as a bound LIMIT would).
        for sql in [
            HEADS_SQL,
            FALLBACK_SQL,
            ANY_READY_SQL,
            NEXT_READY_SQL,
            NEXT_GPUS_SQL,
        ] {
            let mut stmt = conn.prepare(sql).unwrap();
            for round in 0..3i64 {
                let params = vec![round; stmt.parameter_count()];
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(params), |_| Ok(()))
                    .unwrap();
                assert!(rows.count() <= 1);
            }
            let reprepared = stmt.get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(reprepared, 0, "{sql}");
        }
    }
}
