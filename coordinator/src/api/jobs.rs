//! Job routes: submit, list, get, cancel (admin); complete and log chunks
//! (the agent holding the lease); read logs (admin).

use super::agents::{authenticate, check_report};
use super::{authorize, check_owner};
use super::{
    int_param, known_params, parse_json, path_id, query_param, read_body, streaming, text_param,
    AppState,
};
use super::{AGENT_LIMIT, BATCH_LIMIT, JSON_LIMIT, LOG_CHUNK_LIMIT};
use crate::auth::{Caller, Role};

/// Most jobs in one batch submission.
const MAX_BATCH: usize = 10_000;
use super::views;
use crate::db::jobs::JobQuery;
use crate::db::ms;
use crate::error::ApiError;
use crate::lifecycle::JobStatus;
use crate::model::{Job, NewJob};
use crate::spec;
use crate::spec::JobSpec;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_proto::CompleteRequest;
use serde_json::{json, Value};

/// Submits one job (an object: 201 with the job) or many (an array: 201
/// with `{"jobs": [...]}`), all in one transaction: all or none. Errors in
/// an array name the index: `[3].command`.
pub async fn submit(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = authorize(&app, &headers, Role::Submit).await?;
    let bytes = read_body(&headers, body, BATCH_LIMIT).await?;
    let is_batch = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if !is_batch && bytes.len() > JSON_LIMIT {
        return Err(ApiError::too_large(JSON_LIMIT));
    }
    let specs: Vec<NewJob> = if is_batch {
        let specs = parse_json::<Vec<JobSpec>>(&bytes)?;
        if specs.is_empty() || specs.len() > MAX_BATCH {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_batch",
                format!("a batch holds 1 to {MAX_BATCH} jobs"),
            ));
        }
        specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.validate().map_err(|mut e| {
                    e.field = Some(format!("[{i}].{}", e.field.unwrap_or_default()));
                    e
                })
            })
            .collect::<Result<_, _>>()?
    } else {
        vec![parse_json::<JobSpec>(&bytes)?.validate()?]
    };
    let specs: Vec<NewJob> = specs
        .into_iter()
        .map(|s| NewJob {
            submitted_by: caller.token_id,
            ..s
        })
        .collect();
    let results = app
        .write_waking(app.db.queue_submit(specs, is_batch))
        .await?;
    let created = results.iter().any(|(c, _)| *c);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    // Say at once why a job that is still queued waits (no worker fits...).
    let jobs: Vec<_> = results.into_iter().map(|(_, j)| j).collect();
    let jobs = app.db.explain(jobs).await?;
    let mut jobs = views::jobs(&jobs, app.db.clock().now());
    if is_batch {
        log::info!("jobs submitted count={}", jobs.len());
        Ok((status, Json(json!({ "jobs": jobs }))).into_response())
    } else {
        let job = jobs.pop().unwrap_or_default();
        log::debug!("job submitted job_id={}", job["id"]);
        Ok((status, Json(job)).into_response())
    }
}

/// Puts a failed or cancelled job back in the queue with a fresh set of
/// attempts (its history is kept).
pub async fn retry(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = authorize(&app, &headers, Role::Submit).await?;
    let id = path_id("job", &id)?;
    check_owner(&app, caller, id).await?;
    let job = app.db.retry(id).await?;
    app.wake_claimers();
    Ok(Json(views::job(&job, app.db.clock().now())).into_response())
}

/// A job as `caller` may see it: a job's environment values are often
/// secrets, so only the admin and the token that submitted the job see
/// them; other tokens see the names.
fn seen_by(caller: Caller, job: &Job, now: crate::db::Ms) -> Value {
    let mut v = views::job(job, now);
    let own = caller.token_id.is_some() && job.submitted_by == caller.token_id;
    if caller.role != Role::Admin && !own {
        if let Some(env) = v["env"].as_object_mut() {
            env.values_mut().for_each(|x| *x = Value::from("(hidden)"));
        }
    }
    v
}

/// What `GET /api/v1/jobs` takes.
const LIST_PARAMS: [&str; 8] = [
    "status",
    "worker",
    "tag",
    "created_after",
    "created_before",
    "after",
    "before",
    "limit",
];

/// `GET /api/v1/jobs`: newest first, `limit` (<= 1,000) at a time; `before`
/// (an id) pages back, `after` bounds from below; filters by status,
/// worker, tag (required or preferred), creation time. `next_before` is
/// the cursor of the next page (null on the last).
pub async fn list(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = authorize(&app, &headers, Role::Read).await?;
    known_params(&query, &LIST_PARAMS)?;
    let status = match query_param(&query, "status") {
        None | Some("") => None,
        Some(s) => match JobStatus::parse(s) {
            Some(status) => Some(status),
            None => {
                let names: Vec<&str> = JobStatus::ALL.iter().map(|j| j.as_str()).collect();
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("status={s:?} is not one of {}", names.join(", ")),
                )
                .with_field("status"));
            }
        },
    };
    let id = |name: &str| -> Result<Option<i64>, ApiError> {
        query_param(&query, name)
            .map(|_| int_param(&query, name, 0, 0, i64::MAX))
            .transpose()
    };
    let time = |name: &str| -> Result<Option<i64>, ApiError> {
        text_param(&query, name)?
            .map(|t| {
                spec::parse_time(name, &t).map_err(|e| {
                    ApiError::bad_request("invalid_parameter", e.message).with_field(name)
                })
            })
            .transpose()
    };
    let q = JobQuery {
        status,
        worker: id("worker")?,
        tag: text_param(&query, "tag")?.filter(|t| !t.is_empty()),
        created_after: time("created_after")?,
        created_before: time("created_before")?,
        after: id("after")?,
        before: id("before")?,
        limit: int_param(&query, "limit", 100, 1, 1000)?,
    };
    let jobs = app.db.jobs(q.clone()).await?;
    let next_before = (jobs.len() as i64 == q.limit)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    let now = app.db.clock().now();
    let jobs: Vec<Value> = jobs.iter().map(|j| seen_by(caller, j, now)).collect();
    Ok(Json(json!({ "jobs": jobs, "next_before": next_before })).into_response())
}

pub async fn get(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = authorize(&app, &headers, Role::Read).await?;
    let id = path_id("job", &id)?;
    // A queued job says why it is not running.
    let job = app.db.job(id).await?;
    Ok(Json(seen_by(caller, &job, app.db.clock().now())).into_response())
}

pub async fn cancel(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = authorize(&app, &headers, Role::Submit).await?;
    let id = path_id("job", &id)?;
    check_owner(&app, caller, id).await?;
    let job = app.db.cancel(id).await?;
    // A parked claim of the job's agent carries the cancel to it at once.
    app.wake_claimers();
    Ok(Json(views::job(&job, app.db.clock().now())).into_response())
}

pub async fn complete(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = authenticate(&app, &headers).await?;
    let id = path_id("job", &id)?;
    let bytes = read_body(&headers, body, JSON_LIMIT + AGENT_LIMIT).await?;
    let req: CompleteRequest = parse_json(&bytes)?;
    check_report(&req, "")?;
    let backoff = ms(app.config.retry_backoff);
    let resp = app
        .write_waking(app.db.queue_complete(agent.id, id, req, backoff))
        .await?;
    if !resp.replay {
        log::info!(
            "job reported job_id={id} worker_id={} status={}",
            agent.id,
            resp.status
        );
    }
    Ok(Json(resp).into_response())
}

pub async fn append_log(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = authenticate(&app, &headers).await?;
    let id = path_id("job", &id)?;
    let attempt = int_param(&query, "attempt", 0, 1, i64::MAX)?;
    if attempt == 0 {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            "query parameter attempt is required",
        )
        .with_field("attempt"));
    }
    let stream = match query_param(&query, "stream").unwrap_or("stdout") {
        s @ ("stdout" | "stderr") => s.to_string(),
        other => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("stream={other:?} must be stdout or stderr"),
            )
            .with_field("stream"))
        }
    };
    let data = read_body(&headers, body, LOG_CHUNK_LIMIT).await?;
    if data.is_empty() {
        return Err(ApiError::bad_request(
            "empty_chunk",
            "a log chunk must hold at least one byte",
        ));
    }
    let cap = app.config.log_cap;
    let truncated = app
        .db
        .append_log(agent.id, id, attempt, stream, data, cap)
        .await?;
    Ok(Json(json!({ "truncated": truncated })).into_response())
}

/// The output of an attempt (default: the latest) as text; with
/// `follow=1`, streamed as it arrives until the attempt ends.
pub async fn read_log(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authorize(&app, &headers, Role::Read).await?;
    let id = path_id("job", &id)?;
    let attempt = match query_param(&query, "attempt") {
        None => None,
        Some(_) => Some(int_param(&query, "attempt", 1, 1, i64::MAX)?),
    };
    let follow = matches!(query_param(&query, "follow"), Some("1" | "true"));
    if follow {
        // Fail here (404) rather than inside the stream.
        app.db.log_after(id, attempt, i64::MAX).await?;
        return Ok(streaming("text/plain; charset=utf-8", move |tx| {
            follow_log(app, id, attempt, tx)
        }));
    }
    let (attempt, bytes) = app.db.read_log(id, attempt).await?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (
                header::HeaderName::from_static("x-drover-attempt"),
                attempt.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

async fn follow_log(
    app: AppState,
    id: i64,
    mut attempt: Option<i64>,
    tx: tokio::sync::mpsc::Sender<axum::body::Bytes>,
) {
    let mut after = 0;
    loop {
        let mut commits = app.db.commits();
        commits.borrow_and_update();
        let (a, rows, live) = match app.db.log_after(id, attempt, after).await {
            Ok(r) => r,
            Err(e) => {
                log::warn!("log follow stopped job_id={id}: {e}");
                return;
            }
        };
        attempt = Some(a);
        for (row, data) in &rows {
            after = *row;
            if tx.send(data.clone().into()).await.is_err() {
                return;
            }
        }
        if !rows.is_empty() {
            continue;
        }
        if !live {
            return;
        }
        tokio::select! {
            _ = commits.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
            _ = tx.closed() => return,
        }
    }
}
