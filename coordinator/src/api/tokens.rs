//! Named API tokens (admin): make one with a role (the token shown once),
//! list them, revoke one; and `whoami`, which tells a client (the
//! dashboard) what its own token may do.

use super::{authorize, parse_json, path_id, read_body, AppState, JSON_LIMIT};
use crate::auth::{self, Role};
use crate::db::iso;
use crate::db::tokens::ApiToken;
use crate::error::ApiError;
use crate::spec;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

fn view(t: &ApiToken) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": t.role.as_str(),
        "created_at": iso(Some(t.created_at)),
        "last_used_at": iso(t.last_used_at),
        "revoked_at": iso(t.revoked_at),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
}

/// `POST /api/v1/tokens` `{"name", "role"}`: 201 with the token, shown
/// this once (only its SHA-256 is kept).
pub async fn create(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let bytes = read_body(&headers, body, JSON_LIMIT).await?;
    let t: NewToken = parse_json(&bytes)?;
    spec::worker_name("name", &t.name)?;
    let role = Role::parse(&t.role).ok_or_else(|| {
        ApiError::invalid(
            "role",
            format!("{:?} is not one of read, submit, admin", t.role),
        )
    })?;
    let token = auth::new_token("drv_api_")?;
    let made = app
        .db
        .create_token(t.name, role, auth::hash_token(&token))
        .await?;
    let mut v = view(&made);
    v["token"] = token.into();
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// `GET /api/v1/tokens`: every named token (never the token itself).
pub async fn list(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let tokens: Vec<Value> = app.db.api_tokens().await?.iter().map(view).collect();
    Ok(Json(json!({ "tokens": tokens })).into_response())
}

/// `DELETE /api/v1/tokens/{id}`: revokes it (204); refused from then on
/// (by other coordinators within the token cache's 10 s).
pub async fn revoke(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let id = path_id("token", &id)?;
    app.db.revoke_token(id).await?;
    app.api_tokens.revoke(|(token, _)| *token == id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/whoami`: the caller's role (any valid token).
pub async fn whoami(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = authorize(&app, &headers, Role::Read).await?;
    Ok(Json(json!({"role": caller.role.as_str(), "token_id": caller.token_id})).into_response())
}
