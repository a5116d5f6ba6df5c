//! The ordered event stream, as clients read it.

use super::sql::Connection;
use super::{json_col, StoreError};
use crate::model::Event;
use rusqlite::params;

/// Events after `after`, oldest first.
pub fn events_after(conn: &Connection, after: i64, limit: i64) -> Result<Vec<Event>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id, at, kind, job_id, worker_id, data FROM events WHERE id > ?1 ORDER BY id LIMIT ?2")?
        .query_map(params![after, limit], |r| {
            Ok(Event {
                id: r.get(0)?,
                at: r.get(1)?,
                kind: r.get(2)?,
                job_id: r.get(3)?,
                worker_id: r.get(4)?,
                data: json_col(&r.get::<_, String>(5)?),
            })
        })?
        .collect::<Result<_, _>>()?)
}
