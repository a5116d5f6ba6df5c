//! What only PostgreSQL has: its schema and migrations, the writers' lock,
//! the wake-ups between coordinators (LISTEN/NOTIFY) and the lock that
//! picks the one coordinator that runs the background work.

use super::sql::Connection;
use super::StoreError;
use rusqlite::params;

/// The schema, section by section (see its header).
const SCHEMA: &str = include_str!("../../../schema-postgres.sql");

/// Advisory lock keys ("DRVR" and a number).
pub const WRITERS: i64 = 0x4452_5652_0001;
const MIGRATIONS: i64 = 0x4452_5652_0002;
pub const LEADER: i64 = 0x4452_5652_0003;

/// The channel coordinators notify after a commit that may wake a claim.
pub const CHANNEL: &str = "drover_wake";

/// Applies the migrations the database lacks, each in one transaction,
/// under a lock so that coordinators starting together migrate once.
/// Refuses a database newer than this binary.
pub fn migrate(conn: &Connection) -> Result<(), String> {
    let known = super::schema_version();
    let sections = super::sections(SCHEMA);
    if sections.last().map(|s| s.0) != Some(known) {
        return Err(format!(
            "schema-postgres.sql does not reach schema version {known}: this binary is broken"
        ));
    }
    for (v, sql) in sections {
        let step = |e: StoreError| format!("migrating PostgreSQL to schema version {v}: {e}");
        conn.execute_batch("BEGIN").map_err(step)?;
        let applied = apply(conn, v, sql, known);
        let end = if applied.as_ref().is_ok_and(|done| *done) {
            conn.execute_batch("COMMIT")
        } else {
            conn.execute_batch("ROLLBACK")
        };
        if applied.map_err(step)? {
            end.map_err(step)?;
            log::info!("database migrated to schema version {v}");
        }
    }
    Ok(())
}

/// Inside a transaction: applies migration `v` unless the database has
/// it. True when it was applied.
fn apply(conn: &Connection, v: i64, sql: &str, known: i64) -> Result<bool, StoreError> {
    conn.execute("SELECT pg_advisory_xact_lock(?1)", params![MIGRATIONS])?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS drover_schema (version BIGINT NOT NULL)")?;
    let at: Option<i64> =
        conn.query_row("SELECT max(version) FROM drover_schema", params![], |r| {
            r.get(0)
        })?;
    let at = at.unwrap_or(0);
    if at > known {
        return Err(StoreError::new(
            super::Kind::Invalid,
            "schema_too_new",
            format!(
                "the database is at schema version {at} but this drover-coordinator knows only up to {known}; run a newer binary"
            ),
        ));
    }
    if at >= v {
        return Ok(false);
    }
    conn.execute_batch(sql)?;
    conn.execute("DELETE FROM drover_schema", params![])?;
    conn.execute(
        "INSERT INTO drover_schema (version) VALUES (?1)",
        params![v],
    )?;
    Ok(true)
}
