//! The ordered event stream, as clients read it.

use super::{iso, json_col};
use crate::error::ApiError;
use rusqlite::{params, Connection};
use serde_json::{json, Value};

/// Events after `after`, oldest first.
pub fn events_after(conn: &Connection, after: i64, limit: i64) -> Result<Vec<Value>, ApiError> {
    Ok(conn
        .prepare_cached("SELECT id, at, kind, job_id, worker_id, data FROM events WHERE id > ?1 ORDER BY id LIMIT ?2")?
        .query_map(params![after, limit], |r| {
            Ok(json!({
                "id": r.get::<_, i64>(0)?,
                "at": iso(r.get(1)?),
                "kind": r.get::<_, String>(2)?,
                "job_id": r.get::<_, Option<i64>>(3)?,
                "worker_id": r.get::<_, Option<i64>>(4)?,
                "data": json_col(&r.get::<_, String>(5)?),
            }))
        })?
        .collect::<Result<_, _>>()?)
}
