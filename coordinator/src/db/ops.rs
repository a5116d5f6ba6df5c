//! The store's operations: everything the rest of the coordinator asks of
//! the database, each one transaction. This is the store boundary: outside
//! `db/`, code calls these and sees typed rows ([`crate::model`]) and
//! [`StoreError`], never SQL or a connection. A second engine implements
//! the same list.

use super::agent_log;
use super::dispatch::{self, Round};
use super::logs::{self, LogRows};
use super::workers::{self, Action, Agent, Beat, Registrant};
use super::{
    events, highwater, jobs, leases, retention, tokens, wall_offset, Db, Ms, Queued, StoreError,
};
use crate::model::NewJob;
use crate::model::{Event, Job, Stats, Worker, WorkerDetail};
use drover_proto::{
    CompleteRequest, CompleteResponse, Completion, CompletionResult, HeartbeatRequest,
    RegisterRequest,
};
use std::collections::HashMap;

/// Lease time-to-live and the heartbeat interval (the grace for a report
/// in flight), both in ms.
pub type BeatTimes = (Ms, Ms);

/// What one sweep pass changed in the store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub expired: usize,
    pub offline: usize,
    /// When a worker was last heard from, if that is a whole TTL ago: the
    /// leases were held.
    pub deaf: Option<Ms>,
    /// Leases given a fresh TTL: the first pass that heard a worker again.
    pub rebased: usize,
    /// Jobs waiting for `not_before` re-timed after a wall-clock step.
    pub retimed: usize,
    /// The wall clock's offset this pass went by.
    pub wall_offset: Ms,
}

/// What a claim's piggy-backed reports and heartbeat came to: each
/// report's answer, the heartbeat's, and the incarnation check.
pub type ClaimRecord = (Vec<CompletionResult>, Option<Beat>, Result<(), StoreError>);

impl Db {
    // Startup and background work.

    /// Re-times what was measured on the previous process's clock: running
    /// leases get `grace` to be renewed, live workers a fresh silence
    /// window, waiting jobs their backoff. (leases, workers, jobs) changed.
    /// On PostgreSQL only the waiting jobs.
    pub async fn prepare_start(
        &self,
        grace: Ms,
        retry_base: Ms,
    ) -> Result<(usize, usize, usize), StoreError> {
        self.write(move |c, now| {
            // Coordinators sharing a database keep leases on clocks that
            // agree (wall time, NTP): one starting moves no lease, and a
            // whole cluster down is the sweep's deafness (leases held until
            // a worker is heard again). No retry waits past its backoff.
            if c.is_pg() {
                return Ok((0, 0, jobs::rebase_waiting(c, now, retry_base)?));
            }
            Ok((
                leases::rebase_leases(c, now, grace)?,
                workers::rebase_liveness(c, now)?,
                jobs::rebase_waiting(c, now, retry_base)?,
            ))
        })
        .await
    }

    /// One sweep: leases past their deadline, workers silent for `ttl`,
    /// GPU samples older than `history`; `was` is the wall clock's offset
    /// at the last pass.
    ///
    /// A coordinator that heard from no worker for a whole `ttl` may be the
    /// one cut off: it holds every lease (`Pass::deaf`) rather than give
    /// the whole fleet's jobs away, and the first pass that hears a worker
    /// again (`was_deaf`) gives every running lease a fresh `ttl`, as a
    /// restart does.
    pub async fn sweep(
        &self,
        ttl: Ms,
        history: Ms,
        was: Ms,
        was_deaf: bool,
    ) -> Result<Pass, StoreError> {
        self.write(move |c, now| {
            let heard = workers::last_heard(c)?;
            let deaf = heard.filter(|h| *h < now - ttl);
            let (mut expired, mut rebased) = (0, 0);
            if deaf.is_none() {
                if was_deaf {
                    rebased = leases::rebase_leases(c, now, ttl)?;
                }
                expired = leases::expire_leases(c, now)?;
            }
            let offline = workers::mark_silent_offline(c, now, now - ttl, (ttl / 1000) as u64)?;
            workers::prune_gpu_history(c, now - history)?;
            let mut wall = wall_offset(now);
            let mut retimed = 0;
            if (wall - was).abs() >= super::CLOCK_STEP {
                retimed = jobs::retime_not_before(c, now, wall, was)?;
            } else {
                wall = was;
            }
            Ok(Pass {
                expired,
                offline,
                deaf,
                rebased,
                retimed,
                wall_offset: wall,
            })
        })
        .await
    }

    /// After a restore (`highwater`): when the database is behind `mark`
    /// (or has jobs and no mark), new job ids start past it and queued
    /// jobs' attempt numbers move on. Returns the next job id, and (the
    /// queued jobs moved on) when the database was behind.
    pub async fn guard_restore(
        &self,
        mark: Option<i64>,
    ) -> Result<(i64, Option<usize>), StoreError> {
        let (next, floor, moved) = self
            .write(move |c, _| {
                let next = jobs::next_id(c)?;
                Ok(match highwater::restored_floor(next, mark) {
                    Some(floor) => (
                        floor,
                        Some(floor),
                        Some(jobs::move_attempts_on(c, highwater::ATTEMPT_GAP)?),
                    ),
                    None => (next, None, None),
                })
            })
            .await?;
        if let Some(floor) = floor {
            self.id_floor
                .store(floor, std::sync::atomic::Ordering::Relaxed);
        }
        Ok((next, moved))
    }

    /// One batch of retention: finished jobs and events older than `keep`.
    pub async fn prune(&self, keep: Ms) -> Result<(usize, usize), StoreError> {
        self.write(move |c, now| {
            let cutoff = now - keep;
            Ok((
                retention::prune_finished(c, cutoff)?,
                retention::prune_events(c, cutoff)?,
            ))
        })
        .await
    }

    /// The schema version the file holds.
    pub async fn schema_version_on_disk(&self) -> Result<i64, StoreError> {
        self.read(|c, _| {
            let sql = c.dialect(
                "PRAGMA user_version",
                "SELECT max(version) FROM drover_schema",
            );
            c.query_row(sql, rusqlite::params![], |r| r.get(0))
        })
        .await
    }

    // Dispatch.

    /// One dispatch round for the workers with a claim parked.
    pub async fn dispatch_round(
        &self,
        waiting: Vec<i64>,
        lease_ttl: Ms,
        reserve_after: Ms,
        last_given: std::sync::Arc<HashMap<i64, u64>>,
    ) -> Result<Round, StoreError> {
        self.write(move |c, now| {
            dispatch::round(c, now, &waiting, lease_ttl, reserve_after, &last_given)
        })
        .await
    }

    /// Puts back grants no claim took: (worker, job, attempt).
    pub async fn release_undelivered(
        &self,
        grants: Vec<(i64, i64, i64)>,
    ) -> Result<(), StoreError> {
        self.write(move |c, now| {
            for (worker, job, attempt) in &grants {
                leases::release_undelivered(c, now, *worker, *job, *attempt)?;
            }
            Ok(())
        })
        .await
    }

    // Agents.

    /// The worker a token hash belongs to.
    pub async fn authenticate(&self, token_hash: String) -> Result<Option<Agent>, StoreError> {
        self.read(move |c, _| workers::authenticate(c, &token_hash))
            .await
    }

    /// Registers (or re-registers) a worker: (id, state).
    pub async fn register(
        &self,
        req: RegisterRequest,
        token_hash: String,
        auto_approve: bool,
        who: Registrant,
        address: String,
    ) -> Result<(i64, String), StoreError> {
        self.write(move |c, now| {
            workers::register(c, now, &req, &token_hash, auto_approve, who, &address)
        })
        .await
    }

    pub async fn heartbeat(
        &self,
        worker_id: i64,
        req: HeartbeatRequest,
        times: BeatTimes,
    ) -> Result<Beat, StoreError> {
        self.write(move |c, now| workers::heartbeat(c, now, worker_id, &req, times, ""))
            .await
    }

    /// Refuses a claim from an agent process that is not the worker's
    /// current one.
    pub async fn check_incarnation(
        &self,
        worker_id: i64,
        incarnation: String,
    ) -> Result<(), StoreError> {
        self.read(move |c, _| workers::check_incarnation(c, worker_id, &incarnation))
            .await
    }

    /// Queues an agent's report of an attempt's end.
    pub async fn queue_complete(
        &self,
        worker_id: i64,
        job_id: i64,
        req: CompleteRequest,
        retry_backoff: Ms,
    ) -> Result<Queued<CompleteResponse>, StoreError> {
        self.queue(move |c, now| jobs::complete(c, now, worker_id, job_id, &req, retry_backoff))
            .await
    }

    /// Queues what a claim carries, in one transaction: its reports first
    /// (they stand on their own, and the heartbeat's new incarnation would
    /// release the leases they report on), then the heartbeat, then the
    /// incarnation check. A refused report is that report's answer; a
    /// store failure fails the whole claim.
    pub async fn queue_claim_record(
        &self,
        worker_id: i64,
        completed: Vec<Completion>,
        beat: Option<HeartbeatRequest>,
        incarnation: String,
        retry_backoff: Ms,
        times: BeatTimes,
    ) -> Result<Queued<ClaimRecord>, StoreError> {
        self.queue(move |c, now| {
            let results = completed
                .iter()
                .map(|done| jobs::report(c, now, worker_id, done, retry_backoff))
                .collect::<Result<Vec<_>, _>>()?;
            let beat = beat
                .map(|b| workers::heartbeat(c, now, worker_id, &b, times, "beat."))
                .transpose()?;
            let fresh = workers::check_incarnation(c, worker_id, &incarnation);
            Ok((results, beat, fresh))
        })
        .await
    }

    /// Appends a chunk of an attempt's output; true when the cap cut it.
    pub async fn append_log(
        &self,
        worker_id: i64,
        job_id: i64,
        attempt: i64,
        stream: String,
        data: impl AsRef<[u8]> + Send + 'static,
        cap: u64,
    ) -> Result<bool, StoreError> {
        self.write(move |c, now| {
            logs::append_log(
                c,
                now,
                worker_id,
                job_id,
                attempt,
                &stream,
                data.as_ref(),
                cap,
            )
        })
        .await
    }

    // Jobs.

    /// Queues submissions, all in one transaction: (created, job) each.
    /// In a batch (`indexed`), an error names the job's index: `[3].field`.
    pub async fn queue_submit(
        &self,
        specs: Vec<NewJob>,
        indexed: bool,
    ) -> Result<Queued<Vec<(bool, Job)>>, StoreError> {
        let floor = self.id_floor();
        self.queue(move |c, now| {
            specs
                .iter()
                .enumerate()
                .map(|(i, job)| {
                    jobs::submit(c, now, job, floor).map_err(|mut e| {
                        if indexed {
                            e.field = Some(format!("[{i}].{}", e.field.unwrap_or_default()));
                        }
                        e
                    })
                })
                .collect()
        })
        .await
    }

    /// Says why each queued job of `jobs` waits.
    pub async fn explain(&self, mut jobs: Vec<Job>) -> Result<Vec<Job>, StoreError> {
        self.read(move |c, now| {
            dispatch::explain_waiting(c, now, &mut jobs)?;
            Ok(jobs)
        })
        .await
    }

    /// The jobs `q` asks for, newest first, each queued one explained.
    pub async fn jobs(&self, q: jobs::JobQuery) -> Result<Vec<Job>, StoreError> {
        self.read(move |c, now| {
            let mut jobs = jobs::list(c, &q)?;
            dispatch::explain_waiting(c, now, &mut jobs)?;
            Ok(jobs)
        })
        .await
    }

    /// One job with its attempts and, queued, why it waits.
    pub async fn job(&self, id: i64) -> Result<Job, StoreError> {
        self.read(move |c, now| {
            let mut job = jobs::get(c, id)?;
            if job.status == crate::lifecycle::JobStatus::Queued {
                let on = dispatch::reserved_on(c, id)?;
                job.waiting_reason = dispatch::why_waiting(c, now, id, on, &mut None)?;
            }
            Ok(job)
        })
        .await
    }

    pub async fn cancel(&self, id: i64) -> Result<Job, StoreError> {
        self.write(move |c, now| jobs::cancel(c, now, id)).await
    }

    pub async fn retry(&self, id: i64) -> Result<Job, StoreError> {
        self.write(move |c, now| jobs::retry(c, now, id)).await
    }

    /// Output rows of an attempt (default: the latest) after row `after`:
    /// (attempt, rows, whether the attempt still runs).
    pub async fn log_after(
        &self,
        id: i64,
        attempt: Option<i64>,
        after: i64,
    ) -> Result<(i64, LogRows, bool), StoreError> {
        self.read(move |c, _| logs::log_after(c, id, attempt, after))
            .await
    }

    /// The whole output of an attempt (default: the latest).
    pub async fn read_log(
        &self,
        id: i64,
        attempt: Option<i64>,
    ) -> Result<(i64, Vec<u8>), StoreError> {
        self.read(move |c, _| logs::read_log(c, id, attempt)).await
    }

    pub async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, StoreError> {
        self.read(move |c, _| events::events_after(c, after, limit))
            .await
    }

    // Workers.

    pub async fn workers(&self) -> Result<Vec<Worker>, StoreError> {
        self.read(|c, _| workers::list(c)).await
    }

    pub async fn worker(&self, id: i64) -> Result<WorkerDetail, StoreError> {
        self.read(move |c, now| workers::get(c, now, id)).await
    }

    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.read(workers::stats).await
    }

    /// The worker's agent log lines after id `after`, of `max_rank` (see
    /// `agent_log::LEVELS`) or more severe.
    pub async fn agent_log(
        &self,
        id: i64,
        after: i64,
        max_rank: usize,
        limit: i64,
    ) -> Result<Vec<agent_log::AgentLine>, StoreError> {
        self.read(move |c, _| agent_log::read(c, id, after, max_rank, limit))
            .await
    }

    /// An agent's log lines and its jobs' changed progress.
    pub async fn telemetry(
        &self,
        worker_id: i64,
        req: drover_proto::TelemetryRequest,
    ) -> Result<(), StoreError> {
        self.write(move |c, now| {
            agent_log::append(c, now, worker_id, &req.logs)?;
            leases::record_progress(c, now, worker_id, &req.progress)
        })
        .await
    }

    /// Drops agent log lines older than `keep` (a batch).
    pub async fn prune_agent_log(&self, keep: std::time::Duration) -> Result<usize, StoreError> {
        self.write(move |c, now| agent_log::prune(c, now - super::ms(keep)))
            .await
    }

    pub async fn approve(&self, id: i64) -> Result<WorkerDetail, StoreError> {
        self.write(move |c, now| workers::approve(c, now, id)).await
    }

    pub async fn act(
        &self,
        id: i64,
        action: Action,
        reason: Option<String>,
    ) -> Result<WorkerDetail, StoreError> {
        self.write(move |c, now| workers::act(c, now, id, action, reason.as_deref()))
            .await
    }

    pub async fn set_tags(&self, id: i64, tags: Vec<String>) -> Result<WorkerDetail, StoreError> {
        self.write(move |c, now| workers::set_tags(c, now, id, &tags))
            .await
    }

    /// Tags, metadata, slots and drain of a worker, in one transaction.
    pub async fn patch_worker(
        &self,
        id: i64,
        patch: workers::Patch,
    ) -> Result<WorkerDetail, StoreError> {
        self.write(move |c, now| workers::patch(c, now, id, &patch))
            .await
    }

    /// Forgets a worker whose agent is gone or that was decommissioned.
    pub async fn delete_worker(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |c, now| workers::delete(c, now, id)).await
    }

    /// Forgets workers offline or stopped for longer than `after`.
    pub async fn forget_silent(&self, after: std::time::Duration) -> Result<usize, StoreError> {
        let text = humantime::format_duration(after).to_string();
        self.write(move |c, now| workers::forget_silent(c, now, now - super::ms(after), &text))
            .await
    }

    // Named API tokens.

    pub async fn create_token(
        &self,
        name: String,
        role: crate::auth::Role,
        hash: String,
    ) -> Result<tokens::ApiToken, StoreError> {
        self.write(move |c, now| tokens::create(c, now, &name, role, &hash))
            .await
    }

    pub async fn api_tokens(&self) -> Result<Vec<tokens::ApiToken>, StoreError> {
        self.read(|c, _| tokens::list(c)).await
    }

    pub async fn revoke_token(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |c, now| tokens::revoke(c, now, id)).await
    }

    pub async fn lookup_token(
        &self,
        hash: String,
    ) -> Result<Option<(i64, crate::auth::Role)>, StoreError> {
        self.read(move |c, _| tokens::lookup(c, &hash)).await
    }

    pub async fn touch_token(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |c, now| tokens::touch(c, now, id)).await
    }

    /// The named token that submitted job `id` (None: the admin token).
    pub async fn job_owner(&self, id: i64) -> Result<Option<i64>, StoreError> {
        self.read(move |c, _| jobs::owner(c, id)).await
    }

    /// Registers a worker ahead of its agent, approved.
    pub async fn preregister(
        &self,
        name: String,
        tags: Vec<String>,
        slots: u32,
        token_hash: String,
    ) -> Result<WorkerDetail, StoreError> {
        self.write(move |c, now| workers::preregister(c, now, &name, &tags, slots, &token_hash))
            .await
    }
}
