//! The ordered stream of job and worker events: long-poll JSON, or
//! server-sent events (`Accept: text/event-stream`), resumable by id
//! (`after=` or `Last-Event-ID`), optionally only those of one job, one
//! worker or some types.

use super::authorize;
use super::{
    int_param, known_params, query_param, streaming, text_param, views, AppState, MAX_WAIT_S,
};
use crate::auth::Role;
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

use super::KEEP_ALIVE;

/// Events read from the store per pass; filters apply to them.
const PAGE: i64 = 1000;

/// Which events a reader wants. Applied to the ordered stream as it is
/// read, so a cursor moves past what was skipped.
#[derive(Clone, Default)]
struct Filter {
    job: Option<i64>,
    worker: Option<i64>,
    /// Types, each exact or a prefix ending in `*` (`job.*`).
    types: Vec<String>,
}

impl Filter {
    fn parse(query: &Option<String>) -> Result<Filter, ApiError> {
        let id = |name: &str| -> Result<Option<i64>, ApiError> {
            query_param(query, name)
                .map(|_| int_param(query, name, 0, 1, i64::MAX))
                .transpose()
        };
        let types: Vec<String> = text_param(query, "type")?
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(t) = types.iter().find(|t| {
            !t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._*".contains(c))
                || t.strip_suffix('*').unwrap_or(t).contains('*')
        }) {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("type={t:?}: a type is letters, digits, '.' and '_', optionally ending in '*' (job.*)"),
            )
            .with_field("type"));
        }
        Ok(Filter {
            job: id("job")?,
            worker: id("worker")?,
            types,
        })
    }

    fn matches(&self, e: &Event) -> bool {
        self.job.is_none_or(|j| e.job_id == Some(j))
            && self.worker.is_none_or(|w| e.worker_id == Some(w))
            && (self.types.is_empty()
                || self.types.iter().any(|t| match t.strip_suffix('*') {
                    Some(prefix) => e.kind.starts_with(prefix),
                    None => e.kind == *t,
                }))
    }
}

/// The events after `after` that `filter` keeps (at most `limit`), and the
/// id of the last event looked at.
async fn next_page(
    app: &AppState,
    after: i64,
    limit: i64,
    filter: &Filter,
) -> Result<(Vec<Event>, i64), ApiError> {
    let read = app.db.events_after(after, PAGE).await?;
    let mut last = read.last().map_or(after, |e| e.id);
    let mut kept = Vec::new();
    for e in read {
        if filter.matches(&e) {
            kept.push(e);
            if kept.len() as i64 == limit {
                last = kept.last().map_or(last, |e| e.id);
                break;
            }
        }
    }
    Ok((kept, last))
}

pub async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Read).await?;
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    known_params(&query, &["after", "limit", "wait", "job", "worker", "type"])?;
    let mut after = int_param(&query, "after", resume, 0, i64::MAX)?;
    let limit = int_param(&query, "limit", 1000, 1, 1000)?;
    let filter = Filter::parse(&query)?;
    if sse {
        return Ok(streaming("text/event-stream", move |tx| {
            follow(app, after, filter, tx)
        }));
    }
    let wait = int_param(&query, "wait", 0, 0, i64::MAX)?.min(MAX_WAIT_S as i64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait as u64);
    loop {
        // Subscribe before reading, so a commit in between still wakes us.
        let mut commits = app.db.commits();
        commits.borrow_and_update();
        let (events, last) = next_page(&app, after, limit, &filter).await?;
        if !events.is_empty() || tokio::time::Instant::now() >= deadline {
            let events: Vec<Value> = events.iter().map(views::event).collect();
            return Ok(Json(json!({ "events": events, "last_id": last })).into_response());
        }
        if last > after {
            // Only skipped events so far: read on from there.
            after = last;
            continue;
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

async fn follow(app: AppState, mut after: i64, filter: Filter, tx: mpsc::Sender<Bytes>) {
    loop {
        let mut commits = app.db.commits();
        commits.borrow_and_update();
        let (events, last) = match next_page(&app, after, PAGE, &filter).await {
            Ok(page) => page,
            Err(e) => {
                log::warn!("event stream stopped: {e}");
                return;
            }
        };
        for e in &events {
            if tx.send(frame(e)).await.is_err() {
                return;
            }
        }
        if last > after {
            after = last;
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
