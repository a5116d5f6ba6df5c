//! Retention: finished jobs (with their attempts and logs) and events
//! older than the cutoff go, a batch at a time.

use super::sql::Connection;
use super::Ms;
use super::StoreError;

/// Deletes events older than `cutoff` among the oldest `PRUNE_EVENTS` (by id, which
/// follows time; one written before a backwards clock step waits for a
/// later pass). At most a batch per call.
pub fn prune_events(conn: &Connection, cutoff: Ms) -> Result<usize, StoreError> {
    conn
        .prepare_cached(&format!(
            "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT {PRUNE_EVENTS}) AND at < ?1"
        ))?
        .execute([cutoff])
}

/// Most jobs (and events) one retention batch deletes.
pub const PRUNE_JOBS: usize = 200;
pub const PRUNE_EVENTS: usize = 5000;

/// Deletes jobs finished before `cutoff`, with their attempts and logs, at
/// most a batch per call. Returns how many jobs.
pub fn prune_finished(conn: &Connection, cutoff: Ms) -> Result<usize, StoreError> {
    let ids: Vec<i64> = conn
        .prepare_cached(&format!(
            "SELECT id FROM jobs INDEXED BY jobs_finished WHERE finished_at < ?1
             ORDER BY finished_at LIMIT {PRUNE_JOBS}"
        ))?
        .query_map([cutoff], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        conn.prepare_cached("DELETE FROM job_logs WHERE job_id = ?1")?
            .execute([id])?;
        conn.prepare_cached("DELETE FROM job_attempts WHERE job_id = ?1")?
            .execute([id])?;
        conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
            .execute([id])?;
    }
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    #[test]
    fn retention_prunes_old_finished_jobs_with_their_attempts_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let conn = super::super::test_db(&path);
        conn.execute_batch(
            "INSERT INTO workers (id, name, state, registered_at) VALUES (1, 'w', 'idle', 0);
             INSERT INTO jobs (id, status, command, spec_sha256, run_after, created_at, finished_at)
               VALUES (1, 'succeeded', '[]', 'x', 0, 0, 1000), (2, 'failed', '[]', 'x', 0, 0, 9000),
                      (3, 'queued', '[]', 'x', 0, 0, NULL);
             INSERT INTO job_attempts (job_id, attempt, worker_id, started_at) VALUES (1, 1, 1, 0), (2, 1, 1, 0);
             INSERT INTO job_logs (job_id, attempt, stream, at, data) VALUES (1, 1, 'stdout', 0, x'00'), (2, 1, 'stdout', 0, x'00');",
        )
        .unwrap();
        assert_eq!(prune_finished(&conn, 5000).unwrap(), 1);
        let count = |sql: &str| {
            conn.query_row(sql, params![], |r| r.get::<_, i64>(0))
                .unwrap()
        };
        assert_eq!(
            count("SELECT count(*) FROM jobs"),
            2,
            "the old finished job is gone, the rest kept"
        );
        assert_eq!(count("SELECT count(*) FROM jobs WHERE id = 1"), 0);
        assert_eq!(count("SELECT count(*) FROM job_attempts"), 1);
        assert_eq!(count("SELECT count(*) FROM job_logs"), 1);
        assert_eq!(prune_finished(&conn, 5000).unwrap(), 0);
        // Events: the old ones go, also one after a newer (a clock step).
        conn.execute_batch(
            "INSERT INTO events (at, kind) VALUES (1000, 'a'), (9000, 'b'), (2000, 'c'), (9500, 'd')",
        )
        .unwrap();
        assert_eq!(prune_events(&conn, 5000).unwrap(), 2);
        let kinds: Vec<String> = conn
            .prepare_cached("SELECT kind FROM events ORDER BY id")
            .unwrap()
            .query_map(params![], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(kinds, ["b", "d"]);
    }
}
