//! Each worker's agent log: its own lines (level, module, message), the
//! last `KEEP` per worker, for `--agent-log-hours`; read whole, after an
//! id, or followed. An error line is also a `worker.error` event.

use super::sql::Connection;
use super::worker_state::state_of;
use super::{event, iso, Ms, StoreError};
use drover_proto::LogLine;
use rusqlite::params;
use serde_json::json;

/// Lines kept per worker.
pub const KEEP: i64 = 500;
/// Most `worker.error` events one batch of lines makes.
const ERRORS_PER_BATCH: usize = 5;
/// An agent's time for a line is kept if within this of the coordinator's.
const SKEW_KEPT: Ms = 3_600_000;

/// A stored line.
#[derive(Debug, Clone)]
pub struct AgentLine {
    pub id: i64,
    pub at: Ms,
    pub level: String,
    pub target: String,
    pub message: String,
}

/// The levels, most severe first: a filter keeps a level and those before.
pub const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

pub fn rank(level: &str) -> usize {
    LEVELS
        .iter()
        .position(|l| *l == level)
        .unwrap_or(LEVELS.len())
}

/// Appends `lines` to worker `worker_id`'s log and drops what is past the
/// ring; each error line (a few per batch) also becomes an event.
pub fn append(
    conn: &Connection,
    now: Ms,
    worker_id: i64,
    lines: &[LogLine],
) -> Result<(), StoreError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO agent_log (worker_id, at, level, target, line) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for l in lines {
        let at = if (l.at_ms - now).abs() <= SKEW_KEPT {
            l.at_ms
        } else {
            now
        };
        insert.execute(params![worker_id, at, l.level, l.target, l.message])?;
    }
    conn.prepare_cached(
        "DELETE FROM agent_log WHERE worker_id = ?1 AND id <= (
           SELECT id FROM agent_log WHERE worker_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![worker_id, KEEP])?;
    for l in lines
        .iter()
        .filter(|l| l.level == "error")
        .take(ERRORS_PER_BATCH)
    {
        let data = json!({"message": l.message, "target": l.target});
        event(conn, now, "worker.error", None, Some(worker_id), data)?;
    }
    Ok(())
}

/// Lines of worker `worker_id` after id `after`, oldest first, at most
/// `limit`, of `max_rank` (see `LEVELS`) or more severe.
pub fn read(
    conn: &Connection,
    worker_id: i64,
    after: i64,
    max_rank: usize,
    limit: i64,
) -> Result<Vec<AgentLine>, StoreError> {
    state_of(conn, worker_id)?;
    let rows = conn
        .prepare_cached(
            "SELECT id, at, level, target, line FROM agent_log
             WHERE worker_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?
        .query_map(params![worker_id, after, limit], |r| {
            Ok(AgentLine {
                id: r.get(0)?,
                at: r.get(1)?,
                level: r.get(2)?,
                target: r.get(3)?,
                message: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows
        .into_iter()
        .filter(|l| rank(&l.level) <= max_rank)
        .collect())
}

/// One line as plain text.
pub fn text(l: &AgentLine) -> String {
    format!(
        "{} {} {}: {}\n",
        iso(Some(l.at)).unwrap_or_default(),
        l.level.to_ascii_uppercase(),
        l.target,
        l.message
    )
}

/// Deletes lines logged before `cutoff` (a batch).
pub fn prune(conn: &Connection, cutoff: Ms) -> Result<usize, StoreError> {
    conn.prepare_cached(
        "DELETE FROM agent_log WHERE id IN (SELECT id FROM agent_log WHERE at < ?1 LIMIT 5000)",
    )?
    .execute([cutoff])
}

/// A line of an older agent (plain text sent with its heartbeat, "LEVEL
/// message").
pub fn from_legacy(now: Ms, line: &str) -> LogLine {
    let (level, message) = match line.split_once(' ') {
        Some((l, m)) if rank(&l.to_ascii_lowercase()) < LEVELS.len() => (l.to_ascii_lowercase(), m),
        _ => ("info".to_string(), line),
    };
    LogLine {
        at_ms: now,
        level,
        target: "agent".into(),
        message: message.to_string(),
    }
}
