//! Worker routes (admin): list, detail, approve, fleet stats.

use super::{path_id, require_admin, AppState};
use crate::db::workers;
use crate::error::ApiError;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

pub async fn list(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let workers = app.db.read(|c, _| workers::list(c)).await?;
    Ok(Json(json!({ "workers": workers })).into_response())
}

pub async fn get(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let id = path_id("worker", &id)?;
    Ok(Json(app.db.read(move |c, now| workers::get(c, now, id)).await?).into_response())
}

pub async fn approve(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let id = path_id("worker", &id)?;
    let worker = app
        .db
        .write(move |c, now| workers::approve(c, now, id))
        .await?;
    app.wake_claimers();
    Ok(Json(worker).into_response())
}

pub async fn stats(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let mut stats = app.db.read(|c, _| workers::stats(c)).await?;
    // Agents with a claim parked right now: ready for work.
    stats["agents_waiting"] = app.dispatcher.waiting().into();
    Ok(Json(stats).into_response())
}
