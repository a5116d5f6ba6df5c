//! Leases: renewal by heartbeats (with cancel orders for leases an agent
//! no longer holds), expiry by the sweep, release of what an agent lost,
//! and the restart and stall graces. Every write is fenced.

use super::jobs::{current, end_attempt, lose, Fence};
use super::sql::{Connection, OptionalExtension};
use super::StoreError;
use super::{event, Ms};
use crate::lifecycle::{AttemptEnd, LostReason};
use drover_proto::{LeaseRef, Order, Progress};
use rusqlite::params;
use serde_json::json;
use std::collections::HashSet;

/// Expired leases handled per sweep transaction.
const EXPIRE_BATCH: i64 = 500;

pub struct Renewal {
    pub orders: Vec<Order>,
    pub released: bool,
}

/// Renews the leases an agent reports. A reported lease it no longer holds,
/// or whose job was cancelled, gets a `cancel` order. A lease the agent does
/// not report although granted more than `report_grace` ago (its claim
/// reply was lost: the agent never heard of it), or any it does not report
/// when it says it is stopping, is released without spending an attempt.
/// The grace is one heartbeat interval: a heartbeat built while the claim
/// reply was still on its way cannot list the lease, one built an interval
/// later can.
pub fn renew_leases(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    leases: &[LeaseRef],
    (lease_ttl, report_grace): (Ms, Ms),
    stopping: bool,
) -> Result<Renewal, StoreError> {
    let mut orders = Vec::new();
    for lease in leases {
        // One statement renews the lease and says whether a cancel is pending.
        let renewed: Option<bool> = conn
            .prepare_cached(fenced!(
                "UPDATE jobs SET lease_expires_at = ?4 + exclusive * ?5",
                " RETURNING cancel_requested"
            ))?
            .query_row(
                params![
                    lease.job_id,
                    lease.attempt,
                    worker_id,
                    now + lease_ttl,
                    super::jobs::EXCLUSIVE_MARGIN
                ],
                |r| r.get(0),
            )
            .optional()?;
        let reason = match renewed {
            Some(cancel) => cancel.then(|| "cancelled".to_string()),
            None => Some(match current(conn, lease.job_id)? {
                None => "job does not exist".to_string(),
                Some(cur) => format!(
                    "lease lost: the job is {} at attempt {}",
                    cur.status.as_str(),
                    cur.attempt
                ),
            }),
        };
        if let Some(reason) = reason {
            orders.push(Order {
                kind: "cancel".into(),
                job_id: lease.job_id,
                attempt: lease.attempt,
                reason,
            });
        }
    }
    let reported: HashSet<(i64, i64)> = leases.iter().map(|l| (l.job_id, l.attempt)).collect();
    let held: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT id, attempt FROM jobs WHERE worker_id = ?1 AND status = 'running' AND started_at < ?2",
        )?
        .query_map(params![worker_id, if stopping { Ms::MAX } else { now - report_grace }], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    let unreported: Vec<i64> = held
        .into_iter()
        .filter(|key| !reported.contains(key))
        .map(|(id, _)| id)
        .collect();
    for job_id in &unreported {
        lose(conn, now, *job_id, LostReason::NotReported)?;
    }
    Ok(Renewal {
        orders,
        released: !unreported.is_empty(),
    })
}

/// Cancel orders not given to their agents yet, for the workers in
/// `waiting` (marks them given): worker -> orders. One scan of the running
/// jobs, whatever the number of waiting workers. Heartbeats keep repeating
/// the orders until the job ends.
pub fn take_orders(
    conn: &Connection,
    waiting: impl Fn(i64) -> bool,
) -> Result<std::collections::HashMap<i64, Vec<Order>>, StoreError> {
    let mut out: std::collections::HashMap<i64, Vec<Order>> = std::collections::HashMap::new();
    let pending: Vec<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT id, attempt, worker_id FROM jobs INDEXED BY jobs_running_worker
             WHERE status = 'running' AND cancel_requested = 1",
        )?
        .query_map(params![], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (job_id, attempt, worker) in pending.into_iter().filter(|p| waiting(p.2)) {
        conn.prepare_cached("UPDATE jobs SET cancel_requested = 2 WHERE id = ?1")?
            .execute([job_id])?;
        out.entry(worker).or_default().push(Order {
            kind: "cancel".into(),
            job_id,
            attempt,
            reason: "cancelled".into(),
        });
    }
    Ok(out)
}

/// Stores what running jobs last wrote to their progress file (fenced:
/// reports for leases the worker no longer holds are ignored).
pub fn record_progress(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    progress: &[Progress],
) -> Result<(), StoreError> {
    for p in progress {
        let doc = p.progress.to_string();
        let changed = conn
            .prepare_cached(fenced!(
                "UPDATE jobs SET progress = ?4",
                " AND progress IS DISTINCT FROM ?4"
            ))?
            .execute(params![p.job_id, p.attempt, worker_id, doc])?;
        if changed > 0 {
            // Small documents ride in the event; a big one is read from the job.
            let data = match doc.len() <= PROGRESS_IN_EVENT {
                true => json!({"attempt": p.attempt, "progress": p.progress}),
                false => json!({"attempt": p.attempt}),
            };
            event(
                conn,
                now,
                "job.progress",
                Some(p.job_id),
                Some(worker_id),
                data,
            )?;
        }
    }
    Ok(())
}

/// Largest progress document (as JSON) carried in its `job.progress` event.
const PROGRESS_IN_EVENT: usize = 1024;

/// Takes back a grant whose answer could not be delivered (the claiming
/// request was gone): re-queued at once, no attempt spent.
pub fn release_undelivered(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    job_id: i64,
    attempt: i64,
) -> Result<(), StoreError> {
    if let Some(cur) = current(conn, job_id)? {
        let f = Fence {
            job_id,
            attempt,
            worker_id,
        };
        let end = AttemptEnd::Lost(LostReason::NotReported);
        end_attempt(conn, now, f, cur.counters, end, 0)?;
    }
    Ok(())
}

/// Ends every running attempt of a worker as lost. Returns how many.
pub fn release_worker_jobs(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    reason: LostReason,
) -> Result<usize, StoreError> {
    let running: Vec<i64> = conn
        .prepare_cached("SELECT id FROM jobs WHERE worker_id = ?1 AND status = 'running'")?
        .query_map([worker_id], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for job_id in &running {
        lose(conn, now, *job_id, reason)?;
    }
    Ok(running.len())
}

/// The sweep: ends leases past their deadline (at most a batch per call).
pub fn expire_leases(conn: &Connection, now: Ms) -> Result<usize, StoreError> {
    let expired: Vec<i64> = conn
        .prepare_cached(
            "SELECT id FROM jobs INDEXED BY jobs_running_lease WHERE status = 'running' AND lease_expires_at < ?1
             ORDER BY lease_expires_at LIMIT ?2",
        )?
        .query_map(params![now, EXPIRE_BATCH], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for job_id in &expired {
        lose(conn, now, *job_id, LostReason::LeaseExpired)?;
    }
    Ok(expired.len())
}

/// At start: every running lease gets `now + grace`; stored deadlines are
/// not trusted across a restart.
pub fn rebase_leases(conn: &Connection, now: Ms, grace: Ms) -> Result<usize, StoreError> {
    conn.prepare_cached("UPDATE jobs SET lease_expires_at = ?1 WHERE status = 'running'")?
        .execute([now + grace])
}

/// After the writer could not commit for `by` (a lock held from outside, a
/// full disk): running leases move on by that long, since no heartbeat could
/// renew them meanwhile.
pub fn extend_leases(conn: &Connection, by: Ms) -> Result<usize, StoreError> {
    conn.prepare_cached(
        "UPDATE jobs SET lease_expires_at = lease_expires_at + ?1 WHERE status = 'running'",
    )?
    .execute([by])
}
