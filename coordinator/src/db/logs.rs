//! Job output: appended by the lease holder up to a cap per attempt, read
//! whole or followed.

use super::jobs::{check_fence, current, Fence};
use super::sql::Connection;
use super::Ms;
use super::StoreError;
use crate::lifecycle::JobStatus;
use rusqlite::params;

/// What a stored log chunk costs beyond its bytes (a row, its index entry).
pub const LOG_CHUNK_OVERHEAD: i64 = 64;

/// Appends a chunk of output to the current attempt's log, up to `cap` bytes
/// per attempt (each chunk counting `LOG_CHUNK_OVERHEAD` more). Returns true when (part of) the chunk was dropped by the cap.
#[allow(clippy::too_many_arguments)]
pub fn append_log(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    job_id: i64,
    attempt: i64,
    stream: &str,
    data: &[u8],
    cap: u64,
) -> Result<bool, StoreError> {
    check_fence(
        conn,
        Fence {
            job_id,
            attempt,
            worker_id,
        },
    )?;
    let kept: i64 = conn
        .prepare_cached("SELECT log_bytes FROM job_attempts WHERE job_id = ?1 AND attempt = ?2")?
        .query_row(params![job_id, attempt], |r| r.get(0))?;
    // The cap counts what a chunk costs to store: its bytes plus a row's
    // overhead, so a stream of tiny chunks is bounded as well as a flood.
    let room = (cap as i64 - kept - LOG_CHUNK_OVERHEAD).max(0) as usize;
    if room == 0 {
        return Ok(!data.is_empty());
    }
    let take = data.len().min(room);
    let insert =
        "INSERT INTO job_logs (job_id, attempt, stream, at, data) VALUES (?1, ?2, ?3, ?4, ?5)";
    conn.prepare_cached(insert)?
        .execute(params![job_id, attempt, stream, now, &data[..take]])?;
    conn.prepare_cached(
        "UPDATE job_attempts SET log_bytes = log_bytes + ?3 WHERE job_id = ?1 AND attempt = ?2",
    )?
    .execute(params![job_id, attempt, take as i64 + LOG_CHUNK_OVERHEAD])?;
    if take < data.len() {
        let marker = format!(
            "\n[drover] log cap of {cap} bytes reached for this attempt; later output is dropped\n"
        );
        conn.prepare_cached(insert)?.execute(params![
            job_id,
            attempt,
            "drover",
            now,
            marker.as_bytes()
        ])?;
        log::warn!("log cap reached job_id={job_id} attempt={attempt} cap={cap}");
    }
    Ok(take < data.len())
}

/// Log chunks as (row id, bytes), in order.
pub type LogRows = Vec<(i64, Vec<u8>)>;

/// Log chunks of an attempt (default: the latest) after row `after`: the
/// attempt, (row id, bytes) in order, and whether it may still write more.
pub fn log_after(
    conn: &Connection,
    job_id: i64,
    attempt: Option<i64>,
    after: i64,
) -> Result<(i64, LogRows, bool), StoreError> {
    let cur = current(conn, job_id)?
        .ok_or_else(|| StoreError::not_found(format!("no job with id {job_id}")))?;
    let attempt = attempt.unwrap_or(cur.attempt);
    // A queued job's next attempt, or a running one, may still write.
    let live = (cur.status == JobStatus::Running && cur.attempt == attempt)
        || (cur.status == JobStatus::Queued && attempt > cur.attempt);
    let rows = conn
        .prepare_cached(
            "SELECT id, data FROM job_logs WHERE job_id = ?1 AND attempt = ?2 AND id > ?3 ORDER BY id LIMIT 256",
        )?
        .query_map(params![job_id, attempt, after], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok((attempt, rows, live))
}

/// The log of one attempt (default: the latest), in arrival order.
pub fn read_log(
    conn: &Connection,
    job_id: i64,
    attempt: Option<i64>,
) -> Result<(i64, Vec<u8>), StoreError> {
    let cur = current(conn, job_id)?
        .ok_or_else(|| StoreError::not_found(format!("no job with id {job_id}")))?;
    let attempt = attempt.unwrap_or(cur.attempt);
    let mut out = Vec::new();
    let mut stmt = conn.prepare_cached(
        "SELECT data FROM job_logs WHERE job_id = ?1 AND attempt = ?2 ORDER BY id",
    )?;
    for chunk in stmt.query_map(params![job_id, attempt], |r| r.get::<_, Vec<u8>>(0))? {
        out.extend_from_slice(&chunk?);
    }
    Ok((attempt, out))
}
