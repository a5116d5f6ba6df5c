//! What happens to a job when an attempt ends: one pure rule, no I/O.
//!
//! [`decide`] takes the job's counters, how the attempt ended, the retry
//! policy and `now`, and returns a [`Transition`]. The store applies it
//! under the fence (`db::jobs::apply`); whether a report is stale is decided
//! there, by the row count of that one fenced update, never here.

use drover_proto::{CompleteRequest, Outcome};

/// Milliseconds since the Unix epoch (the coordinator's clock).
pub type Ms = i64;

/// A job's status, as stored and as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|j| j.as_str() == s)
    }

    /// Done for good: no attempt follows (until an admin's retry).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A worker's state, as stored and as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Registered, waiting for an admin's approval.
    Pending,
    Idle,
    Busy,
    /// Finishes what it runs, takes nothing new.
    Draining,
    /// No heartbeat for a lease TTL.
    Offline,
    /// Retired by an admin: its token is refused, it never comes back.
    Decommissioned,
    /// Its agent stopped gracefully (holding nothing); back when it starts.
    Stopped,
}

impl WorkerState {
    pub const ALL: [WorkerState; 7] = [
        WorkerState::Pending,
        WorkerState::Idle,
        WorkerState::Busy,
        WorkerState::Draining,
        WorkerState::Offline,
        WorkerState::Decommissioned,
        WorkerState::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Pending => "pending",
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Draining => "draining",
            WorkerState::Offline => "offline",
            WorkerState::Decommissioned => "decommissioned",
            WorkerState::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<WorkerState> {
        WorkerState::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// Approved and may be given work (a draining one may not).
    pub fn takes_work(self) -> bool {
        matches!(self, WorkerState::Idle | WorkerState::Busy)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a lease ended without a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// No heartbeat renewed it within the TTL.
    LeaseExpired,
    /// The agent restarted (new process, or registered anew).
    AgentRestarted,
    /// The agent's heartbeats stopped listing it (e.g. the claim reply was
    /// lost). Not the job's fault: it does not spend an attempt.
    NotReported,
    /// The worker was decommissioned. Not the job's fault either.
    Decommissioned,
}

impl LostReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LostReason::LeaseExpired => "lease_lost",
            LostReason::AgentRestarted => "agent_restarted",
            LostReason::NotReported => "not_reported",
            LostReason::Decommissioned => "decommissioned",
        }
    }

    /// Counts against the job's attempts (the machine may be the job's
    /// victim: a job that kills its agent must not loop forever).
    fn charged(self) -> bool {
        matches!(self, LostReason::LeaseExpired | LostReason::AgentRestarted)
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy)]
pub enum AttemptEnd<'a> {
    /// The agent reported it.
    Reported(&'a CompleteRequest),
    /// The coordinator ended it without a report.
    Lost(LostReason),
}

/// What of the job the rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Attempts spent, the one ending included.
    pub attempts_used: i64,
    pub max_attempts: i64,
    /// Charged lease losses before this one.
    pub lease_losses: i64,
    pub cancel_requested: bool,
}

/// Retry timing.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// First retry after a failure or timeout (`--retry-backoff`), doubling.
    pub retry_backoff: Ms,
    /// After the second and later lease losses, doubling (the first one
    /// retries at once: it is usually the machine's fault).
    pub loss_backoff: Ms,
}

/// Longest backoff of any kind.
pub const BACKOFF_CAP_MS: Ms = 5 * 60_000;

/// Exponential backoff: `base` x 2^(n-1) for the n-th retry, capped.
pub fn backoff(base: Ms, n: i64) -> Ms {
    if n <= 0 || base <= 0 {
        return 0;
    }
    let shift = (n - 1).min(20) as u32;
    base.saturating_mul(1 << shift).min(BACKOFF_CAP_MS)
}

/// What ending an attempt does to its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Queued again, or a terminal status.
    pub status: JobStatus,
    /// When a re-queued job may run (now for a terminal one).
    pub run_after: Ms,
    pub attempts_used: i64,
    pub lease_losses: i64,
    /// The ended attempt's outcome, as stored and shown.
    pub outcome: &'static str,
    pub exit_code: Option<i32>,
    /// The result document (JSON text), kept for a reported end.
    pub result: Option<String>,
    pub error: Option<String>,
}

impl Transition {
    /// The event that announces it: `job.requeued` or `job.<status>`.
    pub fn event_kind(&self) -> &'static str {
        match self.status {
            JobStatus::Queued => "job.requeued",
            JobStatus::Running => "job.running",
            JobStatus::Succeeded => "job.succeeded",
            JobStatus::Failed => "job.failed",
            JobStatus::Cancelled => "job.cancelled",
        }
    }
}

/// The rule. `jitter` spreads a failure's backoff (the caller passes a
/// random 80-120 %; tests pass what they check).
pub fn decide(
    cur: Counters,
    end: AttemptEnd,
    policy: Policy,
    now: Ms,
    jitter: impl Fn(Ms) -> Ms,
) -> Transition {
    // Run again after `delay` unless cancelled meanwhile or out of attempts.
    let again = |used: i64, delay: Ms| -> (JobStatus, Ms) {
        if cur.cancel_requested {
            (JobStatus::Cancelled, now)
        } else if used < cur.max_attempts {
            (JobStatus::Queued, now + delay)
        } else {
            (JobStatus::Failed, now)
        }
    };
    let failure_delay = || jitter(backoff(policy.retry_backoff, cur.attempts_used));
    let mut t = Transition {
        status: JobStatus::Failed,
        run_after: now,
        attempts_used: cur.attempts_used,
        lease_losses: cur.lease_losses,
        outcome: "",
        exit_code: None,
        result: None,
        error: None,
    };
    match end {
        AttemptEnd::Reported(req) => {
            t.outcome = req.outcome.as_str();
            t.exit_code = req.exit_code;
            t.result = req.result.as_ref().map(|v| v.to_string());
            (t.status, t.run_after) = match req.outcome {
                Outcome::Succeeded => (JobStatus::Succeeded, now),
                Outcome::Cancelled => {
                    t.error = Some(req.error.clone().unwrap_or_else(|| "cancelled".into()));
                    (JobStatus::Cancelled, now)
                }
                Outcome::Failed => {
                    t.error = Some(req.error.clone().unwrap_or_else(|| match req.exit_code {
                        Some(c) => format!("exit code {c}"),
                        None => "failed".into(),
                    }));
                    again(cur.attempts_used, failure_delay())
                }
                Outcome::TimedOut => {
                    t.error = Some("timeout".into());
                    again(cur.attempts_used, failure_delay())
                }
                Outcome::Released => {
                    // Handed back unfinished: the attempt is given back.
                    t.attempts_used -= 1;
                    t.result = None;
                    match cur.cancel_requested {
                        true => (JobStatus::Cancelled, now),
                        false => (JobStatus::Queued, now),
                    }
                }
            };
        }
        AttemptEnd::Lost(reason) => {
            t.outcome = reason.as_str();
            t.error = Some(reason.as_str().to_string());
            (t.status, t.run_after) = if reason.charged() {
                t.lease_losses += 1;
                again(
                    cur.attempts_used,
                    backoff(policy.loss_backoff, t.lease_losses - 1),
                )
            } else {
                t.attempts_used -= 1;
                again(t.attempts_used, 0)
            };
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Ms = 1_000_000;
    const POLICY: Policy = Policy {
        retry_backoff: 10_000,
        loss_backoff: 10_000,
    };

    fn counters(used: i64, max: i64) -> Counters {
        Counters {
            attempts_used: used,
            max_attempts: max,
            lease_losses: 0,
            cancel_requested: false,
        }
    }

    fn report(outcome: Outcome, exit_code: Option<i32>) -> CompleteRequest {
        CompleteRequest {
            attempt: 1,
            outcome,
            exit_code,
            result: Some(serde_json::json!({"loss": 0.1})),
            error: None,
        }
    }

    /// Every way an attempt can end, one row each.
    #[test]
    fn every_way_an_attempt_ends() {
        let ok = report(Outcome::Succeeded, Some(0));
        let failed = report(Outcome::Failed, Some(3));
        let timed_out = report(Outcome::TimedOut, None);
        let cancelled = report(Outcome::Cancelled, Some(143));
        let released = report(Outcome::Released, None);
        let cancel_asked = Counters {
            cancel_requested: true,
            ..counters(1, 3)
        };
        let lost_once = Counters {
            lease_losses: 1,
            ..counters(2, 3)
        };
        use AttemptEnd::{Lost, Reported};
        use JobStatus::*;
        use LostReason::*;
        /// (what, counters, end, status, run_after - now, attempts used,
        /// lease losses, outcome, error)
        type Row<'a> = (
            &'a str,
            Counters,
            AttemptEnd<'a>,
            JobStatus,
            Ms,
            i64,
            i64,
            &'a str,
            Option<&'a str>,
        );
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("success", counters(1, 3), Reported(&ok), Succeeded, 0, 1, 0, "succeeded", None),
            ("failure, attempts left", counters(1, 3), Reported(&failed), Queued, 10_000, 1, 0, "failed", Some("exit code 3")),
            ("second failure backs off twice as long", counters(2, 3), Reported(&failed), Queued, 20_000, 2, 0, "failed", Some("exit code 3")),
            ("failure on the last attempt", counters(3, 3), Reported(&failed), Failed, 0, 3, 0, "failed", Some("exit code 3")),
            ("timeout, attempts left", counters(1, 2), Reported(&timed_out), Queued, 10_000, 1, 0, "timed_out", Some("timeout")),
            ("timeout on the last attempt", counters(1, 1), Reported(&timed_out), Failed, 0, 1, 0, "timed_out", Some("timeout")),
            ("cancelled by its agent", counters(1, 3), Reported(&cancelled), Cancelled, 0, 1, 0, "cancelled", Some("cancelled")),
            ("failure after a cancel was asked", cancel_asked, Reported(&failed), Cancelled, 0, 1, 0, "failed", Some("exit code 3")),
            ("graceful hand-back", counters(1, 1), Reported(&released), Queued, 0, 0, 0, "released", None),
            ("hand-back after a cancel was asked", cancel_asked, Reported(&released), Cancelled, 0, 0, 0, "released", None),
            ("first lease loss retries at once", counters(1, 3), Lost(LeaseExpired), Queued, 0, 1, 1, "lease_lost", Some("lease_lost")),
            ("second lease loss backs off", lost_once, Lost(LeaseExpired), Queued, 10_000, 2, 2, "lease_lost", Some("lease_lost")),
            ("lease loss on the last attempt", counters(3, 3), Lost(AgentRestarted), Failed, 0, 3, 1, "agent_restarted", Some("agent_restarted")),
            ("decommission hands back, no attempt spent", counters(3, 3), Lost(Decommissioned), Queued, 0, 2, 0, "decommissioned", Some("decommissioned")),
            ("an unreported lease is given back", counters(1, 1), Lost(NotReported), Queued, 0, 0, 0, "not_reported", Some("not_reported")),
            ("a lost lease of a cancelled job", cancel_asked, Lost(LeaseExpired), Cancelled, 0, 1, 1, "lease_lost", Some("lease_lost")),
        ];
        for (what, cur, end, status, delay, used, losses, outcome, error) in rows {
            let t = decide(cur, end, POLICY, NOW, |d| d);
            assert_eq!(
                (
                    t.status,
                    t.run_after - NOW,
                    t.attempts_used,
                    t.lease_losses,
                    t.outcome,
                    t.error.as_deref()
                ),
                (status, delay, used, losses, outcome, error),
                "{what}"
            );
            assert_eq!(t.event_kind() == "job.requeued", status == Queued, "{what}");
        }
    }

    #[test]
    fn a_report_keeps_its_exit_code_and_result_but_a_hand_back_keeps_no_result() {
        let t = decide(
            counters(1, 3),
            AttemptEnd::Reported(&report(Outcome::Succeeded, Some(0))),
            POLICY,
            NOW,
            |d| d,
        );
        assert_eq!(
            (t.exit_code, t.result.as_deref()),
            (Some(0), Some(r#"{"loss":0.1}"#))
        );
        let t = decide(
            counters(1, 3),
            AttemptEnd::Reported(&report(Outcome::Released, None)),
            POLICY,
            NOW,
            |d| d,
        );
        assert_eq!(t.result, None);
    }

    #[test]
    fn a_failure_backoff_stays_within_its_jitter_and_the_cap() {
        let failed = report(Outcome::Failed, Some(1));
        for used in 1..30 {
            let base = backoff(POLICY.retry_backoff, used);
            let t = decide(
                counters(used, 100),
                AttemptEnd::Reported(&failed),
                POLICY,
                NOW,
                crate::db::jobs::jitter,
            );
            let delay = t.run_after - NOW;
            assert!(
                (base * 8 / 10..=base * 12 / 10).contains(&delay),
                "attempt {used}: {delay} outside 80-120 % of {base}"
            );
            assert!(delay <= BACKOFF_CAP_MS * 12 / 10);
        }
    }

    #[test]
    fn statuses_read_back_as_written() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        for w in WorkerState::ALL {
            assert_eq!(WorkerState::parse(w.as_str()), Some(w));
        }
        assert_eq!(WorkerState::parse("gone"), None);
        assert_eq!(JobStatus::parse("done"), None);
        assert!(JobStatus::Failed.is_terminal() && !JobStatus::Queued.is_terminal());
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(10_000, 0), 0);
        assert_eq!(backoff(10_000, 1), 10_000);
        assert_eq!(backoff(10_000, 2), 20_000);
        assert_eq!(backoff(10_000, 3), 40_000);
        assert_eq!(backoff(10_000, 30), 300_000);
        assert_eq!(backoff(0, 3), 0);
    }
}
