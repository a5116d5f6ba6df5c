//! Named API tokens: made and revoked by an admin, each with a role. Only
//! each token's SHA-256 is stored; the token itself is shown once.

use super::sql::{Connection, OptionalExtension};
use super::{event, Ms, StoreError};
use crate::auth::Role;
use rusqlite::params;
use serde_json::json;

/// A named token as listed (never its hash).
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created_at: Ms,
    pub last_used_at: Option<Ms>,
    pub revoked_at: Option<Ms>,
}

const COLUMNS: &str = "id, name, role, created_at, last_used_at, revoked_at";

fn row(r: &super::sql::Row) -> rusqlite::Result<ApiToken> {
    let role: String = r.get(2)?;
    Ok(ApiToken {
        id: r.get(0)?,
        name: r.get(1)?,
        // The CHECK constraint keeps other values out.
        role: Role::parse(&role).unwrap_or(Role::Read),
        created_at: r.get(3)?,
        last_used_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

pub fn create(
    conn: &Connection,
    now: Ms,
    name: &str,
    role: Role,
    hash: &str,
) -> Result<ApiToken, StoreError> {
    let taken: Option<i64> = conn
        .prepare_cached("SELECT id FROM api_tokens WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?;
    if let Some(id) = taken {
        return Err(StoreError::conflict(
            "name_taken",
            format!("token {id} is already named {name:?}"),
        )
        .with_field("name"));
    }
    conn.prepare_cached(
        "INSERT INTO api_tokens (name, role, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![name, role.as_str(), hash, now])?;
    let id = conn.last_insert_rowid()?;
    let data = json!({"name": name, "role": role.as_str()});
    event(conn, now, "token.created", None, None, data)?;
    log::info!(
        "api token created id={id} name={name:?} role={}",
        role.as_str()
    );
    get(conn, id)
}

pub fn get(conn: &Connection, id: i64) -> Result<ApiToken, StoreError> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM api_tokens WHERE id = ?1"))?
        .query_row([id], row)
        .optional()?
        .ok_or_else(|| StoreError::not_found(format!("no token with id {id}")))
}

pub fn list(conn: &Connection) -> Result<Vec<ApiToken>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM api_tokens ORDER BY id"))?
        .query_map(params![], row)?
        .collect::<Result<_, _>>()?)
}

/// Revokes token `id` (kept, listed as revoked).
pub fn revoke(conn: &Connection, now: Ms, id: i64) -> Result<(), StoreError> {
    let t = get(conn, id)?;
    if t.revoked_at.is_some() {
        return Err(StoreError::conflict(
            "invalid_state",
            format!("token {id} was already revoked"),
        ));
    }
    conn.prepare_cached("UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1")?
        .execute(params![id, now])?;
    event(
        conn,
        now,
        "token.revoked",
        None,
        None,
        json!({"id": id, "name": t.name}),
    )?;
    log::info!("api token revoked id={id} name={:?}", t.name);
    Ok(())
}

/// The live token with this hash: (id, role).
pub fn lookup(conn: &Connection, hash: &str) -> Result<Option<(i64, Role)>, StoreError> {
    let found: Option<(i64, String)> = conn
        .prepare_cached(
            "SELECT id, role FROM api_tokens WHERE token_hash = ?1 AND revoked_at IS NULL",
        )?
        .query_row([hash], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(found.and_then(|(id, role)| Role::parse(&role).map(|r| (id, r))))
}

/// Records that token `id` was used at `now`.
pub fn touch(conn: &Connection, now: Ms, id: i64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1")?
        .execute(params![id, now])?;
    Ok(())
}
