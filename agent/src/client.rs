//! The coordinator's HTTP API, as the agent calls it (blocking ureq, run on
//! tokio's blocking pool by the callers), with errors that carry a hint.

use drover_proto::routes;
use drover_proto::{
    ClaimRequest, ClaimResponse, CompleteRequest, CompleteResponse, ErrorBody, ErrorDetail,
    HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub enum ClientError {
    /// No HTTP answer: refused, timed out, DNS, TLS.
    Unreachable { url: String, reason: String },
    /// The coordinator answered with an error status.
    Status { status: u16, error: ErrorDetail },
    /// An answer we could not understand.
    Protocol(String),
    /// An HTTP server answered, but not with Drover's API (a web server or
    /// a proxy's error page at that address).
    NotDrover { url: String, detail: String },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Status { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// Worth retrying later: no answer, an overloaded or failing coordinator.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::Protocol(_)
            | ClientError::NotDrover { .. } => true,
            ClientError::Status { status, error } => {
                *status == 429
                    || *status >= 500
                    || *status == 408
                    // Another agent process still holds this worker: it goes
                    // offline after a lease TTL of silence.
                    || error.code == "worker_alive"
            }
        }
    }

    /// A short kind, so the same failure is explained once, not every retry.
    pub fn kind(&self) -> String {
        match self {
            ClientError::Unreachable { .. } => "unreachable".into(),
            ClientError::Status { status, error } => format!("{status}:{}", error.code),
            ClientError::Protocol(_) => "protocol".into(),
            ClientError::NotDrover { .. } => "not_drover".into(),
        }
    }

    /// What the operator should try.
    pub fn hint(&self) -> Option<String> {
        match self {
            ClientError::Unreachable { reason, .. }
                if reason.to_ascii_lowercase().contains("certificate") || reason.contains("UnknownIssuer") =>
            {
                Some(
                    "the coordinator's TLS certificate is not trusted: pass the CA that signed it with --ca-cert (DROVER_CA_CERT)"
                        .into(),
                )
            }
            ClientError::Unreachable { url, reason }
                if url.starts_with("https://") && plain_http_reply(reason) =>
            {
                Some(format!(
                    "{url} answers plain HTTP, not HTTPS: use http:// in --coordinator, or start the coordinator with --tls-cert and --tls-key"
                ))
            }
            ClientError::NotDrover { url, .. } => Some(format!(
                "the server at {url} is not a Drover coordinator: check --coordinator (DROVER_COORDINATOR); \
                 the coordinator answers {url}/healthz with JSON"
            )),
            ClientError::Unreachable { url, .. } => Some(format!(
                "check that drover-coordinator runs and listens on the address in {url} (its --listen defaults to 127.0.0.1:8700, \
                 which other machines cannot reach), and that no firewall blocks the port: try curl {url}/healthz"
            )),
            ClientError::Status { error, .. } if error.code == "decommissioned" => Some(
                "an admin decommissioned this worker; it will not run jobs again. To bring the machine back, \
                 register it as a new worker: remove the agent's state dir and start it with another --name"
                    .into(),
            ),
            ClientError::Status { error, .. } if error.code == "worker_alive" => Some(
                "another agent runs as this worker (a second agent with the same --name on this machine, or the \
                 previous agent whose state dir was lost); stop it, or give this one another --name. \
                 This agent retries, and registers (waiting for approval) once that worker has gone offline"
                    .into(),
            ),
            ClientError::Status { error, .. } if error.code == "name_taken" => Some(
                "another worker on this machine has that name: give this agent another --name".into(),
            ),
            ClientError::Status { status: 401, .. } => Some(
                "the registration secret is wrong: set --registration-secret (DROVER_REGISTRATION_SECRET) to the coordinator's"
                    .into(),
            ),
            ClientError::Status { status: 413, .. } => Some("a request was too large for the coordinator".into()),
            ClientError::Status { status, .. } if *status >= 500 => {
                Some("the coordinator is failing; see its log (journalctl -u drover-coordinator)".into())
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable { url, reason } => {
                write!(f, "coordinator unreachable at {url}: {reason}")
            }
            ClientError::Status { status, error } => {
                write!(
                    f,
                    "coordinator answered {status} {}: {}",
                    error.code, error.message
                )
            }
            ClientError::Protocol(m) => write!(f, "unexpected answer from the coordinator: {m}"),
            ClientError::NotDrover { url, detail } => {
                write!(f, "this is not a Drover coordinator at {url}: {detail}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// Whether a TLS failure reads as a plain-HTTP server's answer to a
/// client hello.
fn plain_http_reply(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    r.contains("invalidcontenttype") || r.contains("corrupt message") || r.contains("wrong version")
}

/// What `/healthz` says.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Health {
    #[serde(default)]
    pub time_ms: i64,
}

/// The agent's connection to its coordinator: one of several, when the
/// coordinators share a store (a lease renewed on any of them counts).
pub struct Client {
    bases: Vec<String>,
    /// The one in use: the next after one is unreachable or answers 5xx.
    current: AtomicUsize,
    http: ureq::Agent,
    token: RwLock<Option<String>>,
}

impl Client {
    /// A client for `base` (a comma-separated list: several coordinators);
    /// `ca` is a PEM file of the CA that signed an HTTPS coordinator's
    /// certificate (else the public web roots apply).
    pub fn new(base: &str, ca: Option<&std::path::Path>) -> Result<Client, String> {
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .user_agent(concat!("drover-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = ca {
            builder = builder.tls_config(tls_config(ca)?);
        }
        Ok(Client {
            bases: crate::config::coordinator_urls(base)
                .map(str::to_string)
                .collect(),
            current: AtomicUsize::new(0),
            http: builder.build(),
            token: RwLock::new(None),
        })
    }

    /// The coordinator in use.
    pub fn base(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed) % self.bases.len().max(1);
        self.bases.get(i).map_or("", String::as_str)
    }

    /// After `e` from the coordinator in use: moves on to the next one when
    /// it is unreachable or failing (5xx). The caller's retry (with its
    /// backoff and jitter) then reaches the next one.
    fn fail_over(&self, e: &ClientError) {
        let failing = match e {
            ClientError::Unreachable { .. } => true,
            ClientError::Status { status, .. } => *status >= 500,
            _ => false,
        };
        if !failing || self.bases.len() < 2 {
            return;
        }
        let from = self.base().to_string();
        self.current.fetch_add(1, Ordering::Relaxed);
        log::warn!("coordinator {from}: {e}; moving on to {}", self.base());
    }

    pub fn set_token(&self, token: String) {
        if let Ok(mut t) = self.token.write() {
            *t = Some(token);
        }
    }

    fn bearer(&self) -> String {
        let token = self
            .token
            .read()
            .ok()
            .and_then(|t| t.clone())
            .unwrap_or_default();
        format!("Bearer {token}")
    }

    fn call(
        &self,
        path: &str,
        auth: String,
        timeout: Duration,
        body: Body,
    ) -> Result<Option<ureq::Response>, ClientError> {
        let url = format!("{}{path}", self.base());
        let req = self
            .http
            .post(&url)
            .timeout(timeout)
            .set("Authorization", &auth);
        let result = match body {
            Body::Json(v) => req.send_json(v),
            Body::Bytes(b) => req
                .set("Content-Type", "application/octet-stream")
                .send_bytes(b),
        };
        match result {
            Ok(resp) if resp.status() == 204 => Ok(None),
            Ok(resp) => Ok(Some(resp)),
            Err(e) => {
                let e = self.error(e);
                self.fail_over(&e);
                Err(e)
            }
        }
    }

    /// A ureq failure as a ClientError: the coordinator's JSON error when it
    /// answered, else unreachable.
    fn error(&self, e: ureq::Error) -> ClientError {
        match e {
            ureq::Error::Status(status, resp) => {
                let kind = resp.content_type().to_string();
                let text = resp.into_string().unwrap_or_default();
                match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(b) => ClientError::Status {
                        status,
                        error: b.error,
                    },
                    Err(_) => ClientError::NotDrover {
                        url: self.base().to_string(),
                        detail: format!(
                            "it answered {status} with {kind}, not Drover's JSON error"
                        ),
                    },
                }
            }
            ureq::Error::Transport(t) => ClientError::Unreachable {
                url: self.base().to_string(),
                reason: t.to_string(),
            },
        }
    }

    fn json<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        auth: String,
        timeout: Duration,
        body: &B,
    ) -> Result<Option<R>, ClientError> {
        let value = serde_json::to_value(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match self.call(path, auth, timeout, Body::Json(value))? {
            None => Ok(None),
            Some(resp) => self.parse(path, resp).map(Some),
        }
    }

    /// A success answer's JSON; one that is not JSON at all did not come
    /// from Drover.
    fn parse<R: DeserializeOwned>(
        &self,
        path: &str,
        resp: ureq::Response,
    ) -> Result<R, ClientError> {
        let kind = resp.content_type().to_string();
        if kind != "application/json" {
            return Err(ClientError::NotDrover {
                url: self.base().to_string(),
                detail: format!("{path} answered {} with {kind}", resp.status()),
            });
        }
        resp.into_json::<R>()
            .map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    fn some<R>(path: &str, r: Option<R>) -> Result<R, ClientError> {
        r.ok_or_else(|| ClientError::Protocol(format!("{path}: empty answer")))
    }

    /// A GET returning JSON, with the admin token when given.
    fn get_json(
        &self,
        path: &str,
        admin_token: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let url = format!("{}{path}", self.base());
        let mut req = self.http.get(&url).timeout(Duration::from_secs(5));
        if let Some(t) = admin_token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(resp) => resp
                .into_json()
                .map_err(|e| ClientError::Protocol(format!("{path}: {e}"))),
            Err(e) => Err(self.error(e)),
        }
    }

    /// `GET /healthz`: the coordinator answers, and its clock.
    pub fn health(&self) -> Result<Health, ClientError> {
        serde_json::from_value(self.get_json("/healthz", None)?)
            .map_err(|e| ClientError::Protocol(format!("/healthz: {e}")))
    }

    /// An admin GET (deploy watches workers register).
    pub fn admin_get(
        &self,
        path: &str,
        admin_token: &str,
    ) -> Result<serde_json::Value, ClientError> {
        self.get_json(path, Some(admin_token))
    }

    /// Whether the coordinator accepts `secret`, without registering: an
    /// empty registration is refused 422 past the secret check, 401 before.
    pub fn probe_secret(&self, secret: &str) -> Result<(), ClientError> {
        let path = routes::REGISTER;
        match self.json::<_, serde_json::Value>(
            path,
            format!("Bearer {secret}"),
            TIMEOUT,
            &serde_json::json!({}),
        ) {
            Err(e) if e.status() == Some(422) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(ClientError::Protocol(
                "an empty registration was accepted".into(),
            )),
        }
    }

    pub fn register(
        &self,
        secret: &str,
        req: &RegisterRequest,
    ) -> Result<RegisterResponse, ClientError> {
        let path = routes::REGISTER;
        Self::some(
            path,
            self.json(path, format!("Bearer {secret}"), TIMEOUT, req)?,
        )
    }

    pub fn heartbeat(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, ClientError> {
        let path = routes::HEARTBEAT;
        Self::some(path, self.json(path, self.bearer(), TIMEOUT, req)?)
    }

    /// Sends log lines and progress (answered 204).
    pub fn telemetry(&self, req: &drover_proto::TelemetryRequest) -> Result<(), ClientError> {
        let path = routes::TELEMETRY;
        self.json::<_, serde_json::Value>(path, self.bearer(), TIMEOUT, req)
            .map(drop)
    }

    /// Long-poll for a job; `None` when none came within `wait`.
    pub fn claim(
        &self,
        req: &ClaimRequest,
        wait: Duration,
    ) -> Result<Option<ClaimResponse>, ClientError> {
        let path = routes::claim(wait.as_secs());
        // The answer may take the whole wait: read timeout = wait + 10 s.
        self.json(&path, self.bearer(), wait + Duration::from_secs(10), req)
    }

    /// Appends output; true when the coordinator's cap for this attempt is
    /// reached and it keeps no more.
    pub fn append_log(
        &self,
        job_id: i64,
        attempt: i64,
        stream: &str,
        data: &[u8],
    ) -> Result<bool, ClientError> {
        let path = routes::logs(job_id, attempt, stream);
        match self.call(&path, self.bearer(), TIMEOUT, Body::Bytes(data))? {
            None => Ok(false),
            Some(resp) => {
                let v: serde_json::Value = resp
                    .into_json()
                    .map_err(|e| ClientError::Protocol(format!("{path}: {e}")))?;
                Ok(v["truncated"].as_bool().unwrap_or(false))
            }
        }
    }

    pub fn complete(
        &self,
        job_id: i64,
        req: &CompleteRequest,
    ) -> Result<CompleteResponse, ClientError> {
        let path = routes::complete(job_id);
        Self::some(&path, self.json(&path, self.bearer(), TIMEOUT, req)?)
    }
}

/// TLS trusting only the CA certificates in `ca` (like curl's --cacert).
fn tls_config(ca: &std::path::Path) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading --ca-cert {}: {e}", ca.display()))?;
    for cert in certs {
        roots.add(cert).map_err(|e| {
            format!(
                "--ca-cert {}: not a usable CA certificate: {e}",
                ca.display()
            )
        })?;
    }
    if roots.is_empty() {
        return Err(format!(
            "--ca-cert {} holds no PEM certificate",
            ca.display()
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

enum Body<'a> {
    Json(serde_json::Value),
    Bytes(&'a [u8]),
}

/// Exponential backoff with full jitter: 0.5 s x 2^n, capped at 10 s.
pub fn backoff(failures: u32) -> Duration {
    let cap_ms = (500u64 << failures.min(5)).min(10_000);
    Duration::from_millis(crate::random_below(cap_ms) + 1)
}
