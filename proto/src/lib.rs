//! Wire types of the agent <-> coordinator protocol.
//!
//! Rules (see ARCHITECTURE.md): no I/O and no logic here; fields are only ever
//! added, as `Option` or `#[serde(default)]`; no `deny_unknown_fields`, so that
//! agents and coordinators of different versions keep talking to each other.
//! User-facing submissions are strict and live in the coordinator.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// API prefix shared by every route.
pub const API: &str = "/api/v1";

/// The agent protocol's routes: the coordinator serves these patterns; the
/// agent and the simulator call them through the functions.
pub mod routes {
    pub const REGISTER: &str = "/api/v1/agents/register";
    pub const HEARTBEAT: &str = "/api/v1/agents/heartbeat";
    pub const CLAIM: &str = "/api/v1/agents/claim";
    pub const COMPLETE: &str = "/api/v1/jobs/{id}/complete";
    pub const LOGS: &str = "/api/v1/jobs/{id}/logs";
    /// The agent's own log lines and its jobs' progress, within a second.
    pub const TELEMETRY: &str = "/api/v1/agents/telemetry";

    /// A claim that parks up to `wait_s` seconds.
    pub fn claim(wait_s: u64) -> String {
        format!("{CLAIM}?wait={wait_s}")
    }

    pub fn complete(job_id: i64) -> String {
        COMPLETE.replace("{id}", &job_id.to_string())
    }

    /// Output of an attempt, `stream` being stdout or stderr.
    pub fn logs(job_id: i64, attempt: i64, stream: &str) -> String {
        let path = LOGS.replace("{id}", &job_id.to_string());
        format!("{path}?attempt={attempt}&stream={stream}")
    }
}

/// One GPU as seen by the agent (NVML or the `--fake-gpus` fixture).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    #[serde(default)]
    pub uuid: String,
    pub model: String,
    pub vram_mb: u64,
}

/// A machine's inventory, sent at registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub hostname: String,
    #[serde(default)]
    pub cpu_cores: u32,
    #[serde(default)]
    pub memory_mb: u64,
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    /// The agent can hold a job to its memory and CPU limits (a cgroup v2
    /// of its own with the memory and cpu controllers).
    #[serde(default)]
    pub can_limit: bool,
}

/// The tag a worker that can enforce limits matches, and that a job with
/// limits requires. Drover's own: agents and operators cannot set it.
pub const LIMITS_TAG: &str = "drover:limits";

/// What a job may use at most. The kernel holds it to them: over its
/// memory it is killed (OOM), its CPU time is throttled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// CPUs' worth of time per second (1.5: one and a half cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Worker name, unique per machine (defaults to the hostname).
    pub name: String,
    /// Stable id of the machine (`/etc/machine-id` or one kept in the state
    /// dir); with `name` it makes re-registration idempotent.
    pub machine_id: String,
    pub inventory: Inventory,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Jobs this worker may run at once.
    #[serde(default)]
    pub slots: Option<u32>,
    #[serde(default)]
    pub agent_version: String,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub worker_id: i64,
    /// The agent's own bearer token. Shown once; the coordinator keeps a hash.
    pub token: String,
    pub state: String,
    #[serde(default)]
    pub heartbeat_interval_s: u64,
    #[serde(default)]
    pub lease_ttl_s: u64,
}

impl std::fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("worker_id", &self.worker_id)
            .field("token", &"<redacted>")
            .field("state", &self.state)
            .finish()
    }
}

/// A lease the agent holds: the job and its fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    pub job_id: i64,
    /// Fencing token: grows by one on every claim of the job.
    pub attempt: i64,
}

/// Live metrics of one GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuMetrics {
    pub index: u32,
    #[serde(default)]
    pub utilization_pct: f64,
    #[serde(default)]
    pub memory_used_mb: u64,
    #[serde(default)]
    pub temperature_c: f64,
    #[serde(default)]
    pub power_w: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Random id of this agent process; a new one tells the coordinator the
    /// agent restarted and holds none of its earlier leases.
    pub incarnation: String,
    /// Every lease the agent holds now; the coordinator renews these.
    #[serde(default)]
    pub leases: Vec<LeaseRef>,
    #[serde(default)]
    pub gpus: Vec<GpuMetrics>,
    /// The agent is exiting: it holds no leases beyond `leases` and will
    /// claim nothing more under this incarnation.
    #[serde(default)]
    pub stopping: bool,
    /// Latest `DROVER_PROGRESS_FILE` document of running jobs.
    #[serde(default)]
    pub progress: Vec<Progress>,
    /// The agent's own log lines since the last heartbeat.
    #[serde(default)]
    pub log_lines: Vec<String>,
}

/// What a running job last wrote to its progress file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub job_id: i64,
    pub attempt: i64,
    pub progress: Value,
}

/// One of the agent's own log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When it was logged, ms since the epoch (the agent's clock).
    pub at_ms: i64,
    /// error, warn, info, debug or trace.
    pub level: String,
    /// The module that logged it.
    pub target: String,
    pub message: String,
}

/// What an agent sends as it happens (within a second), between
/// heartbeats: its own log lines and its jobs' changed progress. Changes
/// no lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRequest {
    pub incarnation: String,
    #[serde(default)]
    pub logs: Vec<LogLine>,
    #[serde(default)]
    pub progress: Vec<Progress>,
}

/// An instruction from the coordinator to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// `cancel`: stop this attempt's process and report it. Unknown kinds are
    /// ignored by older agents.
    pub kind: String,
    pub job_id: i64,
    pub attempt: i64,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub state: String,
    pub heartbeat_interval_s: u64,
    pub lease_ttl_s: u64,
    #[serde(default)]
    pub orders: Vec<Order>,
    /// The coordinator's clock (ms since the epoch), to detect clock skew.
    #[serde(default)]
    pub now_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub incarnation: String,
    /// Attempts that ended since the last claim. Reporting them with the
    /// claim makes "done, give me more" one round trip and one transaction;
    /// the reply answers each in `completed`, in order.
    #[serde(default)]
    pub completed: Vec<Completion>,
    /// A heartbeat riding on the claim (recorded before the claim parks,
    /// answered in `beat`), so an agent needs one connection and one request
    /// per heartbeat interval, not two. Its `incarnation` must be the claim's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat: Option<HeartbeatRequest>,
}

/// One attempt's end, reported with a claim (the body of
/// `POST /jobs/{id}/complete` plus the job's id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub job_id: i64,
    #[serde(flatten)]
    pub report: CompleteRequest,
}

/// The answer to one reported completion: what `POST /jobs/{id}/complete`
/// would have answered, the status on success or the error otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResult {
    pub job_id: i64,
    pub attempt: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// True when this exact report had already been accepted (a retry).
    #[serde(default)]
    pub replay: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// A job handed to an agent with its lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub job_id: i64,
    pub attempt: i64,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Indices of the GPUs this job owns (empty for a CPU job).
    #[serde(default)]
    pub gpu_indices: Vec<u32>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub lease_ttl_s: u64,
    /// Never to run twice at once: the agent stops it when it cannot renew
    /// its lease before the lease runs out.
    #[serde(default)]
    pub exclusive: bool,
    /// Memory and CPU limits, held by the job's cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// A claim's answer: jobs to run, and/or orders for jobs the agent runs (a
/// parked claim is also how a cancel reaches the agent at once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// Jobs granted, each with its lease: several when the agent has
    /// several free slots.
    #[serde(default)]
    pub jobs: Vec<Assignment>,
    #[serde(default)]
    pub orders: Vec<Order>,
    /// The answers to the claim's `completed` reports, in order.
    #[serde(default)]
    pub completed: Vec<CompletionResult>,
    /// The answer to the claim's `beat`, as of when it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat: Option<HeartbeatResponse>,
}

/// How an attempt ended, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit, killed by a signal, or failed to start.
    Failed,
    /// Stopped because the coordinator ordered a cancel.
    Cancelled,
    /// Stopped because it ran past its `timeout_s`.
    TimedOut,
    /// Handed back unfinished (agent shutdown); re-queued at once without
    /// spending an attempt.
    Released,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed_out",
            Outcome::Released => "released",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub attempt: i64,
    pub outcome: Outcome,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteResponse {
    pub status: String,
    /// True when this exact report had already been accepted (a retry).
    #[serde(default)]
    pub replay: bool,
}

/// Body of every error reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}
