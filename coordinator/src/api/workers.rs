//! Worker routes (admin): list, detail, pre-register, approve, reject,
//! drain, undrain, decommission, tags, patch, delete; fleet stats.

use super::authorize;
use super::{
    int_param, known_params, parse_json, path_id, query_param, read_body, views, AppState,
    JSON_LIMIT,
};
use crate::auth::Role;
use crate::db::{agent_log, workers};
use crate::error::ApiError;
use crate::lifecycle::WorkerState;
use crate::{auth, spec};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// `GET /api/v1/workers[?state=S][&tag=T]`: the workers in that state and
/// with that tag (both optional).
pub async fn list(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Read).await?;
    known_params(&query, &["state", "tag"])?;
    let state = match query_param(&query, "state") {
        None | Some("") => None,
        Some(s) => Some(WorkerState::parse(s).ok_or_else(|| {
            let names: Vec<&str> = WorkerState::ALL.iter().map(|w| w.as_str()).collect();
            ApiError::bad_request(
                "invalid_parameter",
                format!("state={s:?} is not one of {}", names.join(", ")),
            )
            .with_field("state")
        })?),
    };
    let tag = query_param(&query, "tag").filter(|t| !t.is_empty());
    let workers: Vec<_> = app
        .db
        .workers()
        .await?
        .iter()
        .filter(|w| state.is_none_or(|s| w.state == s))
        .filter(|w| tag.is_none_or(|t| w.tags.as_array().is_some_and(|a| a.iter().any(|x| x == t))))
        .map(views::worker)
        .collect();
    Ok(Json(json!({ "workers": workers })).into_response())
}

pub async fn get(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Read).await?;
    let id = path_id("worker", &id)?;
    Ok(Json(views::worker_detail(&app.db.worker(id).await?)).into_response())
}

pub async fn approve(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let id = path_id("worker", &id)?;
    let worker = app.db.approve(id).await?;
    app.wake_claimers();
    Ok(Json(views::worker_detail(&worker)).into_response())
}

pub async fn stats(State(app): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Read).await?;
    let stats = app.db.stats().await?;
    // Agents with a claim parked right now: ready for work.
    Ok(Json(views::stats(&stats, app.dispatcher.waiting())).into_response())
}

/// Optional body of an admin action: `{"reason": "..."}`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Why {
    #[serde(default)]
    reason: Option<String>,
}

async fn action(
    app: AppState,
    headers: HeaderMap,
    id: String,
    body: Body,
    action: workers::Action,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let id = path_id("worker", &id)?;
    let bytes = read_body(&headers, body, JSON_LIMIT).await?;
    let why: Why = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        Why::default()
    } else {
        parse_json(&bytes)?
    };
    if why.reason.as_deref().is_some_and(|r| r.len() > 500) {
        return Err(ApiError::invalid("reason", "at most 500 characters"));
    }
    let worker = app.db.act(id, action, why.reason).await?;
    if action == workers::Action::Decommission || action == workers::Action::Reject {
        app.tokens.revoke_worker(id);
        app.dispatcher.dismiss(id);
    }
    app.wake_claimers();
    Ok(Json(views::worker_detail(&worker)).into_response())
}

pub async fn reject(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    action(app, headers, id, body, workers::Action::Reject).await
}

pub async fn drain(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    action(app, headers, id, body, workers::Action::Drain).await
}

pub async fn undrain(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    action(app, headers, id, body, workers::Action::Undrain).await
}

pub async fn decommission(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    action(app, headers, id, body, workers::Action::Decommission).await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsBody {
    tags: Vec<String>,
}

pub async fn set_tags(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let id = path_id("worker", &id)?;
    let bytes = read_body(&headers, body, JSON_LIMIT).await?;
    let tags = spec::tags("tags", parse_json::<TagsBody>(&bytes)?.tags)?;
    let worker = app.db.set_tags(id, tags).await?;
    app.wake_claimers();
    Ok(Json(views::worker_detail(&worker)).into_response())
}

/// Most bytes of a worker's metadata (as JSON).
const METADATA_LIMIT: usize = 4096;

/// Each part may be left out, but not sent as null.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default, deserialize_with = "present")]
    tags: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, deserialize_with = "present")]
    slots: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    drain: Option<bool>,
}

/// A field that is there must hold a value (null is refused).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// `PATCH /api/v1/workers/{id}`: tags (pinned, as PUT tags), metadata (a
/// JSON object, replaced whole), slots and drain, any of them, at once.
pub async fn patch(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let id = path_id("worker", &id)?;
    let bytes = read_body(&headers, body, JSON_LIMIT).await?;
    let b: PatchBody = parse_json(&bytes)?;
    if b.tags.is_none() && b.metadata.is_none() && b.slots.is_none() && b.drain.is_none() {
        return Err(ApiError::invalid(
            "",
            "nothing to change: give tags, metadata, slots or drain",
        ));
    }
    if let Some(m) = &b.metadata {
        let size = serde_json::to_string(m).map_or(usize::MAX, |t| t.len());
        if size > METADATA_LIMIT {
            return Err(ApiError::invalid(
                "metadata",
                format!("{size} bytes as JSON; at most {METADATA_LIMIT}"),
            ));
        }
    }
    if b.slots.is_some_and(|n| !(1..=1024).contains(&n)) {
        return Err(ApiError::invalid("slots", "must be between 1 and 1024"));
    }
    let patch = workers::Patch {
        tags: b.tags.map(|t| spec::tags("tags", t)).transpose()?,
        metadata: b.metadata,
        slots: b.slots,
        drain: b.drain,
    };
    let worker = app.db.patch_worker(id, patch).await?;
    app.wake_claimers();
    Ok(Json(views::worker_detail(&worker)).into_response())
}

/// `DELETE /api/v1/workers/{id}`: forgets an offline, stopped or
/// decommissioned worker (204); its history stays, its token is dead.
pub async fn delete(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let id = path_id("worker", &id)?;
    app.db.delete_worker(id).await?;
    app.tokens.revoke_worker(id);
    app.dispatcher.dismiss(id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewWorker {
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    slots: Option<u32>,
}

/// Pre-registers a worker (approved): 201 with the worker and its token,
/// shown once. Start its agent with `--token`.
pub async fn preregister(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Admin).await?;
    let bytes = read_body(&headers, body, JSON_LIMIT).await?;
    let w: NewWorker = parse_json(&bytes)?;
    spec::worker_name("name", &w.name)?;
    let slots = w.slots.unwrap_or(1);
    if !(1..=1024).contains(&slots) {
        return Err(ApiError::invalid("slots", "must be between 1 and 1024"));
    }
    let tags = spec::tags("tags", w.tags)?;
    let token = auth::new_token("drv_agent_")?;
    let hash = auth::hash_token(&token);
    let worker = app.db.preregister(w.name, tags, slots, hash).await?;
    let mut worker = views::worker_detail(&worker);
    worker["token"] = token.into();
    Ok((StatusCode::CREATED, Json(worker)).into_response())
}

/// `GET /api/v1/workers/{id}/logs[?after=ID&level=L&follow=1]`: the
/// agent's own lines (the last 500, for --agent-log-hours), of level `L`
/// or more severe. Plain text; JSON objects (`id`, `time`, `level`,
/// `target`, `message`) with `Accept: application/json`; with `follow=1`,
/// server-sent events as they arrive (within a second of being logged),
/// resumable by `Last-Event-ID`.
pub async fn agent_log(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Read).await?;
    let id = path_id("worker", &id)?;
    known_params(&query, &["after", "level", "follow"])?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let after = int_param(&query, "after", resume, 0, i64::MAX)?;
    let max_rank = match query_param(&query, "level") {
        None | Some("") => agent_log::LEVELS.len(),
        Some(l) => match agent_log::rank(l) {
            r if r < agent_log::LEVELS.len() => r,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("level={l:?} is not one of {}", agent_log::LEVELS.join(", ")),
                )
                .with_field("level"))
            }
        },
    };
    // 404 for a worker that does not exist, before any stream starts.
    let lines = app.db.agent_log(id, after, max_rank, 1000).await?;
    if matches!(query_param(&query, "follow"), Some("1" | "true")) {
        return Ok(super::streaming("text/event-stream", move |tx| {
            follow_agent_log(app, id, after, max_rank, tx)
        }));
    }
    let wants_json = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    if wants_json {
        let last = lines.last().map_or(after, |l| l.id);
        let lines: Vec<_> = lines.iter().map(views::agent_line).collect();
        return Ok(Json(json!({"lines": lines, "last_id": last})).into_response());
    }
    let text: String = lines.iter().map(agent_log::text).collect();
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Sends each new line as an SSE frame until the client leaves.
async fn follow_agent_log(
    app: AppState,
    id: i64,
    mut after: i64,
    max_rank: usize,
    tx: tokio::sync::mpsc::Sender<axum::body::Bytes>,
) {
    loop {
        let mut commits = app.db.commits();
        commits.borrow_and_update();
        let lines = match app.db.agent_log(id, after, max_rank, 500).await {
            Ok(l) => l,
            Err(e) => {
                log::debug!("agent log stream of worker {id} stopped: {e}");
                return;
            }
        };
        for l in &lines {
            after = l.id;
            let frame = format!(
                "id: {}\nevent: line\ndata: {}\n\n",
                l.id,
                views::agent_line(l)
            );
            if tx.send(frame.into()).await.is_err() {
                return;
            }
        }
        if !lines.is_empty() {
            continue;
        }
        tokio::select! {
            _ = commits.changed() => {}
            _ = tokio::time::sleep(super::KEEP_ALIVE) => {
                if tx.send(axum::body::Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}
