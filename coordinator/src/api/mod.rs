//! All HTTP routes in one table, one handler file per resource, and the
//! helpers every handler uses to read bodies and parameters.

mod agents;
mod dashboard;
mod events;
#[cfg(test)]
mod fuzz;
mod jobs;
mod tokens;
mod views;
mod workers;

use crate::auth::{self, Caller, Role};
use crate::error::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use drover_proto::routes;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Body limits per kind of route.
pub const JSON_LIMIT: usize = 1024 * 1024;
/// A batch submission (a JSON array of jobs).
pub const BATCH_LIMIT: usize = 16 * 1024 * 1024;
pub const AGENT_LIMIT: usize = 256 * 1024;
pub const LOG_CHUNK_LIMIT: usize = 1024 * 1024;
/// Largest over-limit body read (and dropped) before answering 413.
const DRAIN_MAX: u64 = 16 * 1024 * 1024;
/// A client has this long to send a whole body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest long-poll, in seconds.
pub const MAX_WAIT_S: u64 = 30;

pub use crate::app::App;

pub type AppState = Arc<App>;

pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/assets/dashboard.js", get(dashboard::script))
        .route("/assets/dashboard.css", get(dashboard::style))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route(routes::REGISTER, post(agents::register))
        .route(routes::HEARTBEAT, post(agents::heartbeat))
        .route(routes::CLAIM, post(agents::claim))
        .route(routes::TELEMETRY, post(agents::telemetry))
        .route("/api/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/api/v1/jobs/{id}", get(jobs::get))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/jobs/{id}/retry", post(jobs::retry))
        .route(routes::COMPLETE, post(jobs::complete))
        .route(routes::LOGS, post(jobs::append_log).get(jobs::read_log))
        .route(
            "/api/v1/workers",
            get(workers::list).post(workers::preregister),
        )
        .route(
            "/api/v1/workers/{id}",
            get(workers::get)
                .patch(workers::patch)
                .delete(workers::delete),
        )
        .route("/api/v1/workers/{id}/approve", post(workers::approve))
        .route("/api/v1/workers/{id}/reject", post(workers::reject))
        .route("/api/v1/workers/{id}/drain", post(workers::drain))
        .route("/api/v1/workers/{id}/undrain", post(workers::undrain))
        .route(
            "/api/v1/workers/{id}/decommission",
            post(workers::decommission),
        )
        .route("/api/v1/workers/{id}/tags", put(workers::set_tags))
        .route("/api/v1/workers/{id}/logs", get(workers::agent_log))
        .route("/api/v1/stats", get(workers::stats))
        .route("/api/v1/events", get(events::events))
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/api/v1/tokens/{id}", delete(tokens::revoke))
        .route("/api/v1/whoami", get(tokens::whoami))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), log_request))
        .layer(middleware::from_fn_with_state(app.clone(), cors))
        .with_state(app)
}

/// CORS for the origins `--cors-origin` names (none by default): their
/// preflights are answered here, and their requests' answers say they may
/// be read. Other origins get nothing extra, so browsers keep their pages
/// out. Tokens travel in `Authorization`, never in cookies.
async fn cors(State(app): State<AppState>, req: Request, next: Next) -> Response {
    use axum::http::header::{
        ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
        ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD,
        ORIGIN, VARY,
    };
    let origin = req
        .headers()
        .get(ORIGIN)
        .filter(|o| {
            app.config
                .cors_origins
                .iter()
                .any(|a| a.as_bytes() == o.as_bytes())
        })
        .cloned();
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    let preflight = req.method() == axum::http::Method::OPTIONS
        && req.headers().contains_key(ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, PUT"),
        );
        h.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after"),
    );
    h.append(VARY, HeaderValue::from_static("origin"));
    resp
}

async fn healthz(State(app): State<AppState>) -> Result<Response, ApiError> {
    app.db.writable()?;
    let version = app.db.schema_version_on_disk().await?;
    Ok(Json(serde_json::json!({
        "status": "ok",
        "schema_version": version,
        // Lets agents (drover-agent check) measure clock skew.
        "time_ms": app.db.clock().now(),
    }))
    .into_response())
}

/// Prometheus text: fleet gauges from the database, then the counters and
/// histograms kept in memory.
async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    use std::fmt::Write;
    let stats = app.db.stats().await?;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, label: &str, values: &[(&str, i64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (k, v) in values {
            let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
        }
    };
    let pairs = |m: &std::collections::BTreeMap<&'static str, i64>| -> Vec<(&str, i64)> {
        m.iter().map(|(k, v)| (*k, *v)).collect()
    };
    gauge(
        "drover_workers",
        "Workers by state.",
        "state",
        &pairs(&stats.workers),
    );
    gauge(
        "drover_jobs",
        "Jobs by status.",
        "status",
        &pairs(&stats.jobs),
    );
    gauge(
        "drover_gpus",
        "GPUs of live workers, and those held by running jobs.",
        "kind",
        &[("busy", stats.gpus_busy), ("total", stats.gpus_total)],
    );
    let wal = std::fs::metadata(app.config.db.with_extension("db-wal"))
        .or_else(|_| std::fs::metadata(format!("{}-wal", app.config.db.display())))
        .map(|m| m.len())
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP drover_agents_waiting Agents with a claim parked (ready for work).\n# TYPE drover_agents_waiting gauge\ndrover_agents_waiting {}",
        app.dispatcher.waiting()
    );
    let _ = writeln!(
        out,
        "# HELP drover_sqlite_wal_bytes Size of the SQLite write-ahead log.\n# TYPE drover_sqlite_wal_bytes gauge\ndrover_sqlite_wal_bytes {wal}"
    );
    app.metrics.render(&mut out, app.db.write_seconds());
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

/// The API described for tools (OpenAPI 3.1): `coordinator/openapi.json`,
/// kept true by a test that checks every route against it.
pub const OPENAPI: &str = include_str!("../../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// One debug line per request (never the headers: they carry tokens), and
/// the request counted by route pattern.
async fn log_request(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let start = Instant::now();
    let mut resp = next.run(req).await;
    app.metrics
        .http(&format!("{method} {route}"), resp.status().as_u16());
    // A refused request's body may be left unread, and then the connection
    // cannot carry another request: say so, or a client reusing it reads EOF.
    if has_body && (resp.status().is_client_error() || resp.status().is_server_error()) {
        resp.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    log::debug!(
        "http method={method} path={path} status={} ms={:.1}",
        resp.status().as_u16(),
        start.elapsed().as_secs_f64() * 1000.0
    );
    resp
}

/// A response whose body a task writes as it goes (events, a log being
/// followed). The task's sends fail once the client is gone.
/// Idle SSE connections get a comment this often (proxies drop silent ones).
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(15);

pub fn streaming<F, Fut>(content_type: &'static str, produce: F) -> Response
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(produce(tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Reads a whole body of at most `limit` bytes. A declared length over the
/// limit is refused without keeping a byte of it: up to [`DRAIN_MAX`] is
/// read and dropped first, so that an ordinary client sees the 413 instead
/// of a broken pipe; beyond that the connection is closed at once.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit as u64) {
        if n <= DRAIN_MAX {
            let _ = tokio::time::timeout(BODY_TIMEOUT, drain(body)).await;
        }
        return Err(ApiError::too_large(limit));
    }
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {}s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let inner = e.into_inner();
            if inner.is::<http_body_util::LengthLimitError>() {
                Err(ApiError::too_large(limit))
            } else {
                Err(ApiError::bad_request(
                    "body_read",
                    format!("reading the request body: {inner}"),
                ))
            }
        }
    }
}

async fn drain(mut body: Body) {
    use http_body_util::BodyExt;
    while let Some(Ok(_)) = body.frame().await {}
}

/// Parses JSON, naming the field at fault: syntax errors are 400
/// `malformed_json`; wrong types, missing or unknown fields are 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::bad_request(
            "malformed_json",
            "the request body is empty; expected a JSON document",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let msg = inner.to_string();
                // serde reports a missing field at its parent.
                let named = msg
                    .split('`')
                    .nth(1)
                    .filter(|_| msg.starts_with("missing field"));
                let field = match (path.as_str(), named) {
                    (".", Some(n)) => n.to_string(),
                    (p, Some(n)) => format!("{p}.{n}"),
                    (p, None) => p.to_string(),
                };
                ApiError::invalid(&field, msg)
            }
            _ => ApiError::bad_request(
                "malformed_json",
                format!("the request body is not valid JSON: {inner}"),
            ),
        }
    })?;
    de.end().map_err(|e| {
        ApiError::bad_request(
            "malformed_json",
            format!("trailing data after the JSON document: {e}"),
        )
    })?;
    Ok(value)
}

/// The value of one query parameter (raw; our parameters need no decoding).
pub fn query_param<'a>(query: &'a Option<String>, name: &str) -> Option<&'a str> {
    query
        .as_deref()?
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// One query parameter's value with its %XX escapes decoded (a `+` stays
/// a `+`, as in a time's offset). A parameter given twice is refused.
pub fn text_param(query: &Option<String>, name: &str) -> Result<Option<String>, ApiError> {
    let mut found = query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| *k == name);
    let Some((_, raw)) = found.next() else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ApiError::bad_request(
            "invalid_parameter",
            format!("query parameter {name}: {why}"),
        )
        .with_field(name)
    };
    if found.next().is_some() {
        return Err(bad("given more than once"));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex: String = bytes.by_ref().take(2).map(char::from).collect();
        let byte = u8::from_str_radix(&hex, 16).map_err(|_| bad("a bad %XX escape"))?;
        out.push(byte);
    }
    String::from_utf8(out)
        .map(Some)
        .map_err(|_| bad("not UTF-8 once decoded"))
}

/// Refuses a query naming a parameter the route does not know (a typo in
/// a filter would otherwise list everything).
pub fn known_params(query: &Option<String>, known: &[&str]) -> Result<(), ApiError> {
    let names = query.as_deref().unwrap_or_default().split('&');
    for name in names.map(|kv| kv.split('=').next().unwrap_or_default()) {
        if !name.is_empty() && !known.contains(&name) {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!(
                    "unknown query parameter {name:?}; this route takes {}",
                    known.join(", ")
                ),
            )
            .with_field(name));
        }
    }
    Ok(())
}

/// An integer query parameter within bounds, or `default` when absent.
pub fn int_param(
    query: &Option<String>,
    name: &str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ApiError> {
    match query_param(query, name) {
        None => Ok(default),
        Some(v) => match v.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_parameter",
                format!("query parameter {name}={v:?} must be an integer from {min} to {max}"),
            )
            .with_field(name)),
        },
    }
}

/// A numeric id from the path; anything else names no such resource.
pub fn path_id(kind: &str, raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::not_found(format!("no {kind} with id {raw:?}")))
}

/// Who a request comes from, refused unless its role reaches `need`: 401
/// without a known token, 403 (naming the role) when it does not reach.
pub async fn authorize(app: &App, headers: &HeaderMap, need: Role) -> Result<Caller, ApiError> {
    let Some(token) = auth::bearer(headers) else {
        return Err(ApiError::unauthorized(
            "missing bearer token: send Authorization: Bearer <admin token or API token>",
        ));
    };
    if app.config.admin_token.matches(token) {
        return Ok(Caller {
            token_id: None,
            role: Role::Admin,
        });
    }
    let hash = auth::hash_token(token);
    let cache = &app.api_tokens;
    let (id, role) = match cache.get(&hash) {
        Some(found) => found,
        None => {
            let epoch = cache.epoch();
            let found = app
                .db
                .lookup_token(hash.clone())
                .await?
                .ok_or_else(|| ApiError::unauthorized("invalid token"))?;
            cache.insert(epoch, hash, found);
            found
        }
    };
    if app.touched.due(id) {
        if let Err(e) = app.db.touch_token(id).await {
            log::warn!("could not record the use of api token {id}: {e}");
        }
    }
    if role < need {
        let may = match role {
            Role::Read => "it may only read (GET)",
            _ => "it may read, submit jobs, and cancel or retry its own",
        };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this token's role is {}: {may}; this needs the {} role",
                role.as_str(),
                need.as_str()
            ),
        ));
    }
    Ok(Caller {
        token_id: Some(id),
        role,
    })
}

/// Refuses a `submit` token's change to a job another token submitted.
pub async fn check_owner(app: &App, caller: Caller, job_id: i64) -> Result<(), ApiError> {
    if caller.role == Role::Admin {
        return Ok(());
    }
    if app.db.job_owner(job_id).await? != caller.token_id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("job {job_id} was not submitted with this token; a submit token changes only its own jobs"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::CompleteRequest;

    #[test]
    fn json_errors_name_the_field() {
        let check = |body: &str, status: u16, field: Option<&str>| {
            let e = parse_json::<crate::spec::JobSpec>(body.as_bytes()).unwrap_err();
            assert_eq!(e.status.as_u16(), status, "{body}: {e}");
            assert_eq!(e.field.as_deref(), field, "{body}: {e}");
        };
        check("", 400, None);
        check("{", 400, None);
        check("{\"command\": [\"x\"]} junk", 400, None);
        check("{}", 422, Some("command"));
        check("{\"command\": \"x\"}", 422, Some("command"));
        check("{\"command\": [\"x\"], \"gpus\": -1}", 422, Some("gpus"));
        check("{\"command\": [\"x\"], \"gpus\": \"1\"}", 422, Some("gpus"));
        check("{\"command\": [\"x\"], \"gpu\": 1}", 422, Some("gpu"));
        check(
            "{\"command\": [\"x\"], \"env\": {\"A\": 1}}",
            422,
            Some("env.A"),
        );
        let e =
            parse_json::<CompleteRequest>(b"{\"attempt\": 1, \"outcome\": \"won\"}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("outcome"));
    }

    #[test]
    fn query_params() {
        let q = Some("wait=5&status=queued&flag".to_string());
        assert_eq!(query_param(&q, "wait"), Some("5"));
        assert_eq!(query_param(&q, "flag"), Some(""));
        assert_eq!(query_param(&q, "nope"), None);
        assert_eq!(int_param(&q, "wait", 30, 0, 30).unwrap(), 5);
        assert_eq!(int_param(&None, "wait", 30, 0, 30).unwrap(), 30);
        assert!(int_param(&Some("wait=-1".into()), "wait", 30, 0, 30).is_err());
        assert!(int_param(&Some("wait=x".into()), "wait", 30, 0, 30).is_err());
        let q = Some("t=2026-01-01T00%3A00%3A00%2B02:00&tag=a%2Fb&x=%zz&d=1&d=2".to_string());
        assert_eq!(
            text_param(&q, "t").unwrap().as_deref(),
            Some("2026-01-01T00:00:00+02:00")
        );
        assert_eq!(text_param(&q, "tag").unwrap().as_deref(), Some("a/b"));
        assert_eq!(text_param(&q, "nope").unwrap(), None);
        assert!(text_param(&q, "x").is_err());
        assert!(text_param(&q, "d").is_err());
        assert!(known_params(&q, &["t", "tag", "x", "d"]).is_ok());
        let e = known_params(&q, &["t"]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("tag"));
    }
}
