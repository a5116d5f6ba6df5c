//! The history checker shared by the kill tests (a port of Jepsen's
//! total-queue check plus lease checks). It reads what the coordinator
//! recorded (jobs, attempts, events in the SQLite file) and what the jobs
//! themselves recorded (a line per start and end of every run, appended to
//! one file), and counts what must never happen.
//!
//! A job records its runs by running [`recorded`]: `start JOB ATTEMPT` and
//! `end JOB ATTEMPT` lines in the history file.

use crate::harness::TestResult;
use rusqlite::{Connection, OpenFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

/// A job command that appends its runs to `history` around `work` (shell).
pub fn recorded(history: &Path, work: &str) -> Vec<String> {
    let h = history.to_string_lossy();
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "echo \"start $DROVER_JOB_ID $DROVER_ATTEMPT\" >> '{h}'; {work}; \
             echo \"end $DROVER_JOB_ID $DROVER_ATTEMPT\" >> '{h}'"
        ),
    ]
}

/// What the checker found. Valid iff every count in the first block is 0.
#[derive(Debug, Default)]
pub struct Report {
    /// Submitted (acknowledged) but not terminal, or gone.
    pub lost: Vec<i64>,
    /// Terminal jobs nobody submitted.
    pub unexpected: Vec<i64>,
    /// More than one terminal event, or more than one accepted report.
    pub double_complete: Vec<i64>,
    /// The accepted report is not from the job's latest claimed attempt.
    pub stale_accepted: Vec<i64>,
    /// Two attempts of a job whose leases overlap in time.
    pub overlap: Vec<i64>,
    /// A run of an attempt the coordinator never granted.
    pub run_without_lease: Vec<(i64, i64)>,
    /// A run that started after the job's accepted completion.
    pub ran_after_completion: Vec<i64>,
    /// Succeeded, but the accepted attempt's run never reached its end.
    pub success_without_run: Vec<i64>,

    // Figures, not faults.
    pub jobs: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub cancelled: usize,
    /// Attempts that lost their lease (agent gone, stopped or restarted).
    pub lost_leases: usize,
    /// Runs of attempts that were superseded (at-least-once re-runs).
    pub superseded_runs: usize,
    /// Finished runs beyond one per job (allowed by at-least-once: the
    /// earlier run's report was refused or never sent).
    pub extra_finished_runs: usize,
    pub integrity: String,
}

impl Report {
    pub fn valid(&self) -> bool {
        self.lost.is_empty()
            && self.unexpected.is_empty()
            && self.double_complete.is_empty()
            && self.stale_accepted.is_empty()
            && self.overlap.is_empty()
            && self.run_without_lease.is_empty()
            && self.ran_after_completion.is_empty()
            && self.success_without_run.is_empty()
            && self.integrity == "ok"
    }

    pub fn assert_valid(&self) {
        assert!(self.valid(), "history check failed:\n{self}");
    }
}

/// Checks the history of the jobs `ids`, prints the report and asserts it
/// is clean.
pub fn assert_clean(db: &Path, history: &Path, ids: &[i64]) -> TestResult<Report> {
    let report = check(db, history, &ids.iter().copied().collect())?;
    println!("{report}");
    report.assert_valid();
    Ok(report)
}

fn first<T: fmt::Debug>(v: &[T]) -> String {
    if v.is_empty() {
        String::new()
    } else {
        format!(" e.g. {:?}", &v[..v.len().min(5)])
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "jobs {} (succeeded {}, failed {}, cancelled {}); lost leases {}, superseded runs {}, extra finished runs {}",
            self.jobs, self.succeeded, self.failed, self.cancelled, self.lost_leases, self.superseded_runs, self.extra_finished_runs
        )?;
        writeln!(f, "lost: {}{}", self.lost.len(), first(&self.lost))?;
        writeln!(
            f,
            "unexpected: {}{}",
            self.unexpected.len(),
            first(&self.unexpected)
        )?;
        writeln!(
            f,
            "double-complete: {}{}",
            self.double_complete.len(),
            first(&self.double_complete)
        )?;
        writeln!(
            f,
            "stale-accepted: {}{}",
            self.stale_accepted.len(),
            first(&self.stale_accepted)
        )?;
        writeln!(f, "overlap: {}{}", self.overlap.len(), first(&self.overlap))?;
        writeln!(
            f,
            "run without a lease: {}{}",
            self.run_without_lease.len(),
            first(&self.run_without_lease)
        )?;
        writeln!(
            f,
            "ran after completion: {}{}",
            self.ran_after_completion.len(),
            first(&self.ran_after_completion)
        )?;
        writeln!(
            f,
            "success without a finished run: {}{}",
            self.success_without_run.len(),
            first(&self.success_without_run)
        )?;
        write!(f, "integrity_check: {}", self.integrity)
    }
}

struct Attempt {
    attempt: i64,
    started_at: i64,
    ended_at: Option<i64>,
    outcome: Option<String>,
}

/// What the coordinator recorded: each job's (status, latest attempt), its
/// attempts, its terminal events, and the store's integrity check.
#[derive(Default)]
pub struct Recorded {
    jobs: BTreeMap<i64, (String, i64)>,
    attempts: BTreeMap<i64, Vec<Attempt>>,
    terminal_events: BTreeMap<i64, usize>,
    integrity: String,
}

const JOBS: &str = "SELECT id, status, attempt FROM jobs";
const ATTEMPTS: &str =
    "SELECT job_id, attempt, started_at, ended_at, outcome FROM job_attempts ORDER BY job_id, attempt";
const TERMINAL: &str = "SELECT job_id, count(*) FROM events
     WHERE kind IN ('job.succeeded', 'job.failed', 'job.cancelled') AND job_id IS NOT NULL
     GROUP BY job_id";

impl Recorded {
    /// From an SQLite file (stopped or live: read-only).
    pub fn sqlite(db: &Path) -> TestResult<Recorded> {
        let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut r = Recorded {
            integrity: conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?,
            ..Recorded::default()
        };
        for row in conn
            .prepare(JOBS)?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        {
            let (id, status, attempt) = row?;
            r.jobs.insert(id, (status, attempt));
        }
        for row in conn.prepare(ATTEMPTS)?.query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                Attempt {
                    attempt: row.get(1)?,
                    started_at: row.get(2)?,
                    ended_at: row.get(3)?,
                    outcome: row.get(4)?,
                },
            ))
        })? {
            let (job, a) = row?;
            r.attempts.entry(job).or_default().push(a);
        }
        for row in conn
            .prepare(TERMINAL)?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        {
            let (job, n): (i64, usize) = row?;
            r.terminal_events.insert(job, n);
        }
        Ok(r)
    }

    /// From a PostgreSQL database (`url`).
    pub fn postgres(url: &str) -> TestResult<Recorded> {
        let mut client = postgres::Client::connect(url, postgres::NoTls)?;
        let mut r = Recorded {
            integrity: "ok".into(),
            ..Recorded::default()
        };
        for row in client.query(JOBS, &[])? {
            r.jobs
                .insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
        }
        for row in client.query(ATTEMPTS, &[])? {
            r.attempts
                .entry(row.try_get(0)?)
                .or_default()
                .push(Attempt {
                    attempt: row.try_get(1)?,
                    started_at: row.try_get(2)?,
                    ended_at: row.try_get(3)?,
                    outcome: row.try_get(4)?,
                });
        }
        for row in client.query(TERMINAL, &[])? {
            let n: i64 = row.try_get(1)?;
            r.terminal_events.insert(row.try_get(0)?, n as usize);
        }
        Ok(r)
    }
}

/// Checks the coordinator's SQLite file (stopped or live: read-only) and
/// the jobs' history file against the ids whose submission was
/// acknowledged.
pub fn check(db: &Path, history: &Path, submitted: &BTreeSet<i64>) -> TestResult<Report> {
    check_recorded(Recorded::sqlite(db)?, history, submitted)
}

/// The same, on what the coordinator recorded in any store.
pub fn check_recorded(
    recorded: Recorded,
    history: &Path,
    submitted: &BTreeSet<i64>,
) -> TestResult<Report> {
    let Recorded {
        jobs,
        attempts,
        terminal_events,
        integrity,
    } = recorded;
    let mut r = Report {
        integrity,
        ..Report::default()
    };
    // What the runs themselves wrote.
    let mut started: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    let mut finished: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for line in crate::harness::read_lines(history) {
        let mut it = line.split_whitespace();
        let (Some(kind), Some(job), Some(attempt)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let (Ok(job), Ok(attempt)) = (job.parse::<i64>(), attempt.parse::<i64>()) else {
            continue;
        };
        match kind {
            "start" => {
                started.entry(job).or_default().insert(attempt);
            }
            "end" => finished.entry(job).or_default().push(attempt),
            _ => {}
        }
    }

    r.jobs = jobs.len();
    for id in submitted {
        match jobs.get(id) {
            Some((status, _))
                if ["succeeded", "failed", "cancelled"].contains(&status.as_str()) => {}
            _ => r.lost.push(*id),
        }
    }
    let none = Vec::new();
    for (id, (status, latest)) in &jobs {
        let terminal = ["succeeded", "failed", "cancelled"].contains(&status.as_str());
        match status.as_str() {
            "succeeded" => r.succeeded += 1,
            "failed" => r.failed += 1,
            "cancelled" => r.cancelled += 1,
            _ => {}
        }
        if terminal && !submitted.contains(id) {
            r.unexpected.push(*id);
        }
        let tries = attempts.get(id).unwrap_or(&none);
        let accepted: Vec<&Attempt> = tries
            .iter()
            .filter(|a| a.outcome.as_deref() == Some("succeeded"))
            .collect();
        if terminal_events.get(id).copied().unwrap_or(0) > 1 || accepted.len() > 1 {
            r.double_complete.push(*id);
        }
        if accepted.iter().any(|a| a.attempt != *latest) {
            r.stale_accepted.push(*id);
        }
        for pair in tries.windows(2) {
            if pair[0].ended_at.is_none_or(|end| pair[1].started_at < end) {
                r.overlap.push(*id);
                break;
            }
        }
        r.lost_leases += tries
            .iter()
            .filter(|a| {
                matches!(
                    a.outcome.as_deref(),
                    Some("lease_lost" | "agent_restarted" | "not_reported")
                )
            })
            .count();
        let granted: BTreeSet<i64> = tries.iter().map(|a| a.attempt).collect();
        let runs = started.get(id).cloned().unwrap_or_default();
        for a in runs.difference(&granted) {
            r.run_without_lease.push((*id, *a));
        }
        if let Some(done) = accepted.first() {
            if runs.iter().any(|a| *a > done.attempt) {
                r.ran_after_completion.push(*id);
            }
            let ends = finished.get(id).map(Vec::as_slice).unwrap_or_default();
            if !ends.contains(&done.attempt) {
                r.success_without_run.push(*id);
            }
            r.extra_finished_runs += ends.len().saturating_sub(1);
            r.superseded_runs += runs.iter().filter(|a| **a != done.attempt).count();
        }
    }
    Ok(r)
}

/// The checker itself: one planted fault of each kind, each counted once;
/// the clean job 1 in no list.
#[test]
fn the_checker_finds_each_planted_fault() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("h.db");
    let conn = Connection::open(&db)?;
    conn.execute_batch(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, status TEXT, attempt INTEGER);
         CREATE TABLE job_attempts (job_id INTEGER, attempt INTEGER, started_at INTEGER, ended_at INTEGER, outcome TEXT);
         CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, job_id INTEGER);
         -- 1: clean, after one lost lease.
         INSERT INTO jobs VALUES (1, 'succeeded', 2);
         INSERT INTO job_attempts VALUES (1, 1, 0, 10, 'lease_lost'), (1, 2, 11, 20, 'succeeded');
         INSERT INTO events (kind, job_id) VALUES ('job.succeeded', 1);
         -- 2: still queued (lost).
         INSERT INTO jobs VALUES (2, 'queued', 0);
         -- 3: completed twice.
         INSERT INTO jobs VALUES (3, 'succeeded', 1);
         INSERT INTO job_attempts VALUES (3, 1, 0, 10, 'succeeded');
         INSERT INTO events (kind, job_id) VALUES ('job.succeeded', 3), ('job.succeeded', 3);
         -- 4: the accepted report is attempt 1's, but attempt 2 was claimed; and they overlap.
         INSERT INTO jobs VALUES (4, 'succeeded', 2);
         INSERT INTO job_attempts VALUES (4, 1, 0, 30, 'succeeded'), (4, 2, 20, NULL, NULL);
         INSERT INTO events (kind, job_id) VALUES ('job.succeeded', 4);
         -- 5: nobody submitted it.
         INSERT INTO jobs VALUES (5, 'failed', 1);
         INSERT INTO job_attempts VALUES (5, 1, 0, 10, 'failed');
         INSERT INTO events (kind, job_id) VALUES ('job.failed', 5);
         -- 6: succeeded without its run finishing, and a run of an attempt never granted.
         INSERT INTO jobs VALUES (6, 'succeeded', 1);
         INSERT INTO job_attempts VALUES (6, 1, 0, 10, 'succeeded');
         INSERT INTO events (kind, job_id) VALUES ('job.succeeded', 6);",
    )?;
    drop(conn);
    let history = dir.path().join("history.txt");
    std::fs::write(
        &history,
        "start 1 1\nstart 1 2\nend 1 2\nstart 3 1\nend 3 1\nstart 4 1\nend 4 1\nstart 4 2\nstart 6 1\nstart 6 0\n",
    )?;
    let submitted: BTreeSet<i64> = [1, 2, 3, 4, 6].into();
    let r = check(&db, &history, &submitted)?;
    assert_eq!(r.lost, vec![2], "{r}");
    assert_eq!(r.unexpected, vec![5], "{r}");
    assert_eq!(r.double_complete, vec![3], "{r}");
    assert_eq!(r.stale_accepted, vec![4], "{r}");
    assert_eq!(r.overlap, vec![4], "{r}");
    assert_eq!(r.ran_after_completion, vec![4], "{r}");
    assert_eq!(r.run_without_lease, vec![(6, 0)], "{r}");
    assert_eq!(r.success_without_run, vec![6], "{r}");
    assert_eq!(r.lost_leases, 1);
    assert_eq!(r.integrity, "ok");
    assert!(!r.valid());
    let clean = check(&db, &history, &[1].into())?;
    assert!(
        clean.lost.is_empty() && clean.unexpected.len() == 4,
        "{clean}"
    );
    Ok(())
}
