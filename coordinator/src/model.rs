//! What the store takes to insert (a validated submission) and what it
//! returns to read: jobs, workers, events and the fleet
//! summary as typed rows. Any store fills them the same way; `api/views.rs`
//! renders them as the API's JSON. Times are the store's milliseconds
//! ([`Ms`]); JSON columns (commands, tags, metadata) stay JSON values.

use crate::db::Ms;
use crate::lifecycle::{JobStatus, WorkerState};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// A validated submission, ready to insert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewJob {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub gpus: u32,
    pub min_vram_mb: u64,
    pub cpu_fallback: bool,
    /// Left out of the fingerprint when false: specs submitted before the
    /// field existed keep their idempotency fingerprint.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exclusive: bool,
    /// Left out of the fingerprint when none (as `exclusive`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<drover_proto::Limits>,
    pub required_tags: Vec<String>,
    pub preferred_tags: Vec<String>,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout_s: Option<u64>,
    /// Milliseconds since the epoch.
    pub not_before: Option<i64>,
    pub idempotency_key: Option<String>,
    pub metadata: Value,
    /// The named API token submitting it (None: the admin token). Not part
    /// of the spec's fingerprint.
    #[serde(skip)]
    pub submitted_by: Option<i64>,
}

impl NewJob {
    /// SHA-256 of the normalized spec: equal for equal submissions.
    pub fn fingerprint(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A job as stored.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub status: JobStatus,
    pub command: Value,
    pub env: Value,
    pub cwd: Option<String>,
    pub gpus: i64,
    pub min_vram_mb: i64,
    pub required_tags: Value,
    pub preferred_tags: Value,
    pub priority: i64,
    pub max_attempts: i64,
    pub timeout_s: Option<i64>,
    /// Wall time (ms since the epoch).
    pub not_before: Option<Ms>,
    pub idempotency_key: Option<String>,
    pub metadata: Value,
    pub attempt: i64,
    pub attempts_used: i64,
    pub worker_id: Option<i64>,
    pub gpu_indices: Value,
    /// On the store's clock.
    pub lease_expires_at: Option<Ms>,
    pub cancel_requested: bool,
    pub exit_code: Option<i64>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: Option<Ms>,
    pub started_at: Option<Ms>,
    pub finished_at: Option<Ms>,
    /// On the store's clock.
    pub run_after: Ms,
    pub progress: Option<Value>,
    pub cpu_fallback: bool,
    pub exclusive: bool,
    pub limits: Option<drover_proto::Limits>,
    /// Why a queued job is not running, when asked for.
    /// The named token that submitted it (None: the admin token).
    pub submitted_by: Option<i64>,
    pub waiting_reason: Option<String>,
    /// Filled by the one-job read only.
    pub attempts: Option<Vec<Attempt>>,
}

/// One attempt of a job.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub attempt: i64,
    pub worker_id: i64,
    pub gpu_indices: Value,
    pub started_at: Option<Ms>,
    pub ended_at: Option<Ms>,
    pub outcome: Option<String>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub log_bytes: i64,
}

/// A worker as stored.
#[derive(Debug, Clone)]
pub struct Worker {
    pub id: i64,
    pub name: String,
    pub state: WorkerState,
    pub hostname: String,
    pub cpu_cores: i64,
    pub memory_mb: i64,
    pub gpus: Value,
    pub tags: Value,
    pub slots: i64,
    pub agent_version: String,
    pub gpu_metrics: Value,
    pub registered_at: Option<Ms>,
    pub last_seen_at: Option<Ms>,
    pub drain: bool,
    pub tags_pinned: bool,
    pub address: Option<String>,
    /// Ids of the jobs it runs.
    pub running_jobs: Vec<i64>,
    /// Its agent can hold jobs to their memory and CPU limits.
    pub can_limit: bool,
    /// Free-form, set by an admin (a JSON object).
    pub metadata: Value,
    pub decommissioned_at: Option<Ms>,
}

/// One worker with its history.
#[derive(Debug, Clone)]
pub struct WorkerDetail {
    pub worker: Worker,
    pub gpu_history: Vec<GpuSample>,
    /// Newest first.
    pub health_log: Vec<HealthChange>,
    /// Newest first.
    pub recent_jobs: Vec<RecentAttempt>,
}

#[derive(Debug, Clone)]
pub struct GpuSample {
    pub gpu: i64,
    pub at: Option<Ms>,
    pub utilization_pct: f64,
    pub memory_used_mb: i64,
    pub temperature_c: f64,
    pub power_w: f64,
}

#[derive(Debug, Clone)]
pub struct HealthChange {
    pub at: Option<Ms>,
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct RecentAttempt {
    pub job_id: i64,
    pub attempt: i64,
    pub started_at: Option<Ms>,
    pub ended_at: Option<Ms>,
    pub outcome: Option<String>,
    pub exit_code: Option<i64>,
}

/// One entry of the event stream.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    pub at: Option<Ms>,
    pub kind: String,
    pub job_id: Option<i64>,
    pub worker_id: Option<i64>,
    pub data: Value,
}

/// The fleet summary.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Every state, zero included.
    pub workers: BTreeMap<&'static str, i64>,
    /// Every status, zero included.
    pub jobs: BTreeMap<&'static str, i64>,
    pub gpus_total: i64,
    pub gpus_busy: i64,
    pub last_event_id: i64,
    /// First claim minus submission of the jobs dispatched in the last
    /// hour, in ms, sorted.
    pub queue_waits: Vec<i64>,
}
