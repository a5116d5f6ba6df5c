//! The ordered stream of job and worker events: long-poll JSON, or
//! server-sent events (`Accept: text/event-stream`), resumable by id
//! (`after=` or `Last-Event-ID`).

use super::{int_param, require_admin, streaming, views, AppState, MAX_WAIT_S};
use crate::error::ApiError;
use crate::model::Event;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc;

/// Idle SSE connections get a comment this often (proxies drop silent ones).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let after = int_param(&query, "after", resume, 0, i64::MAX)?;
    let limit = int_param(&query, "limit", 1000, 1, 1000)?;
    if sse {
        return Ok(streaming("text/event-stream", move |tx| {
            follow(app, after, tx)
        }));
    }
    let wait = int_param(&query, "wait", 0, 0, i64::MAX)?.min(MAX_WAIT_S as i64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait as u64);
    loop {
        // Subscribe before reading, so a commit in between still wakes us.
        let mut commits = app.db.commits();
        commits.borrow_and_update();
        let events = app.db.events_after(after, limit).await?;
        if !events.is_empty() || tokio::time::Instant::now() >= deadline {
            let last = events.last().map_or(after, |e| e.id);
            let events: Vec<Value> = events.iter().map(views::event).collect();
            return Ok(Json(json!({ "events": events, "last_id": last })).into_response());
        }
        tokio::select! {
            _ = commits.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

fn frame(e: &Event) -> Bytes {
    format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        e.id,
        e.kind,
        views::event(e)
    )
    .into()
}

async fn follow(app: AppState, mut after: i64, tx: mpsc::Sender<Bytes>) {
    loop {
        let mut commits = app.db.commits();
        commits.borrow_and_update();
        let events = match app.db.events_after(after, 500).await {
            Ok(e) => e,
            Err(e) => {
                log::warn!("event stream stopped: {e}");
                return;
            }
        };
        for e in &events {
            after = e.id;
            if tx.send(frame(e)).await.is_err() {
                return;
            }
        }
        if !events.is_empty() {
            continue;
        }
        tokio::select! {
            _ = commits.changed() => {}
            _ = tokio::time::sleep(KEEP_ALIVE) => {
                if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}
