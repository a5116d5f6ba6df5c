//! One attempt of one job: the process (its own process group), its output
//! shipped to the coordinator in bounded chunks, timeout and cancel (TERM to
//! the group, KILL after the grace), the result file, and the final report,
//! spooled on disk until the coordinator has it.

use crate::client::{backoff, Client};
use crate::jobuser::JobUser;
use crate::spawn;
use crate::state::{Spooled, StateDir};
use drover_proto::{Assignment, CompleteRequest, Outcome};
use rustix::process::{kill_process, kill_process_group, Pid, Signal};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes sent in one log request.
const SHIP_MAX: usize = 512 * 1024;
/// The job's own dir inside its job dir (cwd, result and progress files).
pub const WORK: &str = "work";
/// The job's `TMPDIR`, next to `work/`: its own, gone with the job.
const TMP: &str = "tmp";
/// Largest result document read from `DROVER_RESULT_FILE`.
const RESULT_MAX: u64 = 1024 * 1024;

/// Shared by every job task.
pub struct Ctx {
    pub client: Arc<Client>,
    pub state: Arc<StateDir>,
    pub kill_grace: Duration,
    /// Who jobs run as; None: the agent's own user.
    pub user: Option<JobUser>,
    /// The umask jobs start with.
    pub job_umask: u32,
    /// The last heartbeat the coordinator answered: every lease it listed
    /// runs at least a TTL from when it was sent.
    pub renewed: tokio::sync::watch::Sender<Option<Renewal>>,
    /// Where each job gets a cgroup of its own, when the agent may make them.
    pub cgroups: Option<crate::cgroup::Cgroups>,
}

/// When a heartbeat the coordinator answered was sent (this machine's
/// monotonic clock), and the lease TTL it gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub sent: Instant,
    pub ttl: Duration,
}

impl Renewal {
    /// When an exclusive job must be stopped (TERM) so that it is dead
    /// (KILL after `kill_grace`) a second before its lease can run out.
    fn fence(&self, kill_grace: Duration) -> Instant {
        self.sent + self.ttl.saturating_sub(kill_grace + Duration::from_secs(1))
    }
}

/// Orders from the supervisor to a running job.
#[derive(Debug)]
pub enum Control {
    /// Stop it and report it cancelled, with the reason.
    Cancel(String),
    /// Stop it and hand it back unfinished (agent shutdown).
    Release,
    /// Kill it at once and report nothing: this agent's token was revoked
    /// (decommissioned), the job is someone else's now.
    Abandon,
}

enum Stop {
    Cancel(String),
    Release,
    Timeout(u64),
    LeaseLost,
    Abandoned,
    /// An exclusive job whose lease could not be renewed in time.
    Fenced,
}

/// Runs the attempt to its end and delivers its report.
pub async fn run(ctx: Arc<Ctx>, a: Assignment, control: mpsc::UnboundedReceiver<Control>) {
    let dir = ctx.state.job_dir(a.job_id, a.attempt);
    if let Some(report) = supervise(&ctx, &a, control, &dir).await {
        // A process that ran was spooled as it ended; one that never
        // started was not.
        if ctx.state.is_spooled(a.job_id, a.attempt) {
            deliver(&ctx.client, &ctx.state, a.job_id, report).await;
        } else {
            spool_and_deliver(&ctx.client, &ctx.state, a.job_id, report).await;
        }
    }
    let gone = dir.clone();
    if let Err(e) = off_thread(move || std::fs::remove_dir_all(&gone)).await {
        log::debug!("removing {}: {e}", dir.display());
    }
}

fn signal_group(pgid: i32, sig: Signal) {
    if let Some(pgid) = Pid::from_raw(pgid) {
        let _ = kill_process_group(pgid, sig);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What systemd tells the agent alone: a job must not notify or feed the
/// watchdog on the agent's behalf.
const SERVICE_ONLY: [&str; 5] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
];

/// The job's whole environment: the agent's own, less its settings (the
/// registration secret among them) and its service's, its own `TMPDIR`,
/// then the job's, then Drover's. `dir` is the job's `work/`.
fn environment(a: &Assignment, dir: &Path, user: Option<&JobUser>) -> BTreeMap<OsString, OsString> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(key, _)| {
            !key.as_bytes().starts_with(b"DROVER_") && !SERVICE_ONLY.iter().any(|s| key == *s)
        })
        .collect();
    if let Some(u) = user {
        for key in ["USER", "LOGNAME"] {
            env.insert(key.into(), u.name.as_str().into());
        }
        env.insert("HOME".into(), u.home.as_os_str().into());
    }
    if let Some(job_dir) = dir.parent() {
        env.insert("TMPDIR".into(), job_dir.join(TMP).into());
    }
    env.extend(a.env.iter().map(|(k, v)| (k.into(), v.into())));
    let gpus = a
        .gpu_indices
        .iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let visible = if gpus.is_empty() { "none" } else { &gpus };
    for (key, value) in [
        ("DROVER_JOB_ID", OsString::from(a.job_id.to_string())),
        ("DROVER_ATTEMPT", a.attempt.to_string().into()),
        ("DROVER_RESULT_FILE", dir.join("result.json").into()),
        ("DROVER_PROGRESS_FILE", dir.join("progress.json").into()),
        ("CUDA_DEVICE_ORDER", "PCI_BUS_ID".into()),
        ("NVIDIA_VISIBLE_DEVICES", visible.into()),
        ("CUDA_VISIBLE_DEVICES", gpus.as_str().into()),
    ] {
        env.insert(key.into(), value);
    }
    env
}

/// Runs the process; `None` when the lease was lost (nothing to report).
async fn supervise(
    ctx: &Ctx,
    a: &Assignment,
    control: mpsc::UnboundedReceiver<Control>,
    dir: &Path,
) -> Option<CompleteRequest> {
    let mut job = match start(ctx, a, dir).await {
        Ok(job) => job,
        Err(error) => {
            return Some(CompleteRequest {
                attempt: a.attempt,
                outcome: Outcome::Failed,
                exit_code: None,
                result: None,
                error: Some(error),
            })
        }
    };
    let (status, stop) = watch(ctx, a, &mut job, control).await;
    log::debug!("job process exited job_id={} status={status:?}", a.job_id);
    // Whatever the job left running (in its group, or escaped from it into
    // its cgroup) ends with it.
    job.kill_all();
    collect_output(a.job_id, std::mem::take(&mut job.pumps)).await;
    let mut oom_kills = 0;
    if let Some(cgroup) = job.cgroup.take() {
        oom_kills = cgroup.oom_kills();
        off_thread(move || cgroup.remove()).await;
    }
    job.spool.close();
    log::debug!("job output collected job_id={}", a.job_id);
    let (outcome, exit_code, mut error) = ending(a, &status, stop)?;
    if let (true, Some(mb)) = (oom_kills > 0, a.limits.and_then(|l| l.memory_mb)) {
        let why = format!("the kernel's OOM killer ended it: over its memory limit of {mb} MB");
        error = Some(error.map_or(why.clone(), |e| format!("{e}; {why}")));
    }
    let report = report(a, dir, outcome, exit_code, error);
    deliver_after_output(ctx, a, job, report).await
}

/// Makes the job dir (the agent's), its `work/` and its `tmp/` (the
/// job's, given to the job user); returns `work/`.
fn job_dirs(dir: &Path, user: Option<&JobUser>) -> Result<std::path::PathBuf, String> {
    let work = dir.join(WORK);
    for own in [&work, &dir.join(TMP)] {
        std::fs::create_dir_all(own)
            .map_err(|e| format!("creating the job dir {}: {e}", own.display()))?;
        if let Some(u) = user {
            let owner = (
                rustix::fs::Uid::from_raw(u.uid),
                rustix::fs::Gid::from_raw(u.gid),
            );
            rustix::fs::chown(own, Some(owner.0), Some(owner.1))
                .map_err(|e| format!("giving the job dir {} to {}: {e}", own.display(), u.name))?;
        }
    }
    if user.is_some() {
        // Traversable (the unit's umask makes dirs 0700), not listable.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("opening the job dir {} to its job: {e}", dir.display()))?;
    }
    Ok(work)
}

/// A started attempt: its process group, the pumps copying its output into
/// the spool, and the shipper sending the spool on (it says when the
/// coordinator answers that the lease is lost).
struct Started {
    exited: std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<std::process::ExitStatus>> + Send>,
    >,
    pgid: i32,
    spool: Arc<OutputSpool>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
    shipper: tokio::task::JoinHandle<()>,
    lost: oneshot::Receiver<()>,
    cgroup: Option<crate::cgroup::JobCgroup>,
}

impl Started {
    /// SIGKILL to the job's process group and to everything in its cgroup
    /// (what left the group too).
    fn kill_all(&self) {
        signal_group(self.pgid, Signal::KILL);
        if let Some(c) = &self.cgroup {
            c.kill();
        }
    }
}

/// Creates the job dir, spawns the process and starts moving its output;
/// an error is the attempt's failure message.
///
/// The job dir holds the agent's files (the process group, the output
/// spool) and is the agent's; the job's own files (its default cwd, result
/// and progress files) are in `work/` inside it, which belongs to the job's
/// user: a job cannot put a link where the agent writes.
async fn start(ctx: &Ctx, a: &Assignment, dir: &Path) -> Result<Started, String> {
    if a.command.is_empty() {
        return Err("empty command".into());
    }
    let work = job_dirs(dir, ctx.user.as_ref())?;
    let cwd = a.cwd.as_deref().map(Path::new).unwrap_or(&work);
    // On the runtime's thread, which lives as long as the agent: the job's
    // death signal follows the thread that spawns it.
    let env = environment(a, &work, ctx.user.as_ref());
    let cgroup = match &ctx.cgroups {
        Some(c) => Some(c.job(a.job_id, a.attempt, a.limits.as_ref())?),
        None if a.limits.is_some() => return Err(crate::cgroup::CANNOT_LIMIT.into()),
        None => None,
    };
    let procs = cgroup.as_ref().map(|c| &c.procs);
    let launch = spawn::Launch {
        user: ctx.user.as_ref(),
        cgroup_procs: procs,
        umask: Some(ctx.job_umask),
    };
    let mut child = spawn::spawn_as(&a.command, &env, cwd, &launch).map_err(|e| {
        log::warn!(
            "job could not start job_id={} attempt={}: {e}",
            a.job_id,
            a.attempt
        );
        format!("could not start {:?}: {e}", a.command[0])
    })?;
    let pgid = child.pid;
    if let Err(e) = ctx.state.record_group(a.job_id, a.attempt, pgid) {
        log::warn!("{e}: a crash of this agent would leave the job's processes running");
    }
    log::info!(
        "job running job_id={} attempt={} pid={pgid} gpus={:?}",
        a.job_id,
        a.attempt,
        a.gpu_indices
    );
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let exited = Box::pin(child.wait());
    let spool = match OutputSpool::create(dir.join("output.spool")).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            signal_group(pgid, Signal::KILL);
            let _ = exited.await;
            return Err(format!(
                "creating the output spool in {}: {e}",
                dir.display()
            ));
        }
    };
    let mut pumps = Vec::new();
    if let Some(out) = stdout {
        pumps.push(tokio::spawn(pump(out, 0, spool.clone())));
    }
    if let Some(err) = stderr {
        pumps.push(tokio::spawn(pump(err, 1, spool.clone())));
    }
    let (lost_tx, lost) = oneshot::channel();
    let shipper = tokio::spawn(ship(
        ctx.client.clone(),
        a.job_id,
        a.attempt,
        spool.clone(),
        lost_tx,
    ));
    Ok(Started {
        exited,
        pgid,
        spool,
        pumps,
        shipper,
        lost,
        cgroup,
    })
}

/// Waits for the process to exit, stopping it on a cancel, a hand-back, its
/// timeout or a lost lease (TERM, then KILL after the grace), or killing it
/// at once when the agent is revoked. Returns its status and why it was
/// stopped, if it was.
async fn watch(
    ctx: &Ctx,
    a: &Assignment,
    job: &mut Started,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> (std::io::Result<std::process::ExitStatus>, Option<Stop>) {
    let pgid = job.pgid;
    let deadline = a.timeout_s.map(|t| Instant::now() + Duration::from_secs(t));
    let mut renewals = ctx.renewed.subscribe();
    let fence = |r: &Option<Renewal>| {
        a.exclusive
            .then(|| r.map(|r| r.fence(ctx.kill_grace)))
            .flatten()
    };
    let mut fence_at = fence(&renewals.borrow_and_update());
    let mut stop: Option<Stop> = None;
    let mut kill_at: Option<Instant> = None;
    let mut lost_open = true;
    loop {
        let stopping = stop.is_some();
        let new_stop = tokio::select! {
            status = &mut job.exited => return (status, stop),
            c = control.recv(), if !stopping => match c {
                Some(Control::Cancel(reason)) => Stop::Cancel(reason),
                Some(Control::Abandon) => {
                    log::warn!("killing job job_id={} attempt={}: this agent was revoked", a.job_id, a.attempt);
                    job.kill_all();
                    stop = Some(Stop::Abandoned);
                    continue;
                }
                Some(Control::Release) | None => Stop::Release,
            },
            _ = sleep_until(deadline), if !stopping => Stop::Timeout(a.timeout_s.unwrap_or(0)),
            changed = renewals.changed(), if !stopping && a.exclusive => {
                if changed.is_ok() {
                    fence_at = fence(&renewals.borrow_and_update());
                }
                continue;
            }
            _ = sleep_until(fence_at), if !stopping => Stop::Fenced,
            r = &mut job.lost, if !stopping && lost_open => {
                lost_open = false;
                match r {
                    Ok(()) => Stop::LeaseLost,
                    Err(_) => continue,
                }
            },
            _ = sleep_until(kill_at) => {
                log::warn!("job ignored SIGTERM for {}s, killing job_id={} attempt={}", ctx.kill_grace.as_secs(), a.job_id, a.attempt);
                job.kill_all();
                kill_at = None;
                continue;
            }
        };
        log::info!(
            "stopping job job_id={} attempt={} reason={}",
            a.job_id,
            a.attempt,
            describe(&new_stop)
        );
        signal_group(pgid, Signal::TERM);
        kill_at = Some(Instant::now() + ctx.kill_grace);
        stop = Some(new_stop);
    }
}

/// Lets the pumps copy what the pipes still hold, at most 5 s each (a
/// process the job left behind may keep a pipe open).
async fn collect_output(job_id: i64, pumps: Vec<tokio::task::JoinHandle<()>>) {
    for p in pumps {
        let abort = p.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), p)
            .await
            .is_err()
        {
            log::warn!("job output still open after exit, dropping the rest job_id={job_id}");
            abort.abort();
        }
    }
}

/// How the attempt ended: (outcome, exit code, error); `None` when there is
/// nothing to report (the lease is lost, or the agent revoked).
fn ending(
    a: &Assignment,
    status: &std::io::Result<std::process::ExitStatus>,
    stop: Option<Stop>,
) -> Option<(Outcome, Option<i32>, Option<String>)> {
    let (exit_code, exit_error) = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (Some(c), (c != 0).then(|| format!("exit code {c}"))),
            (None, Some(sig)) => (Some(128 + sig), Some(format!("killed by signal {sig}"))),
            (None, None) => (None, Some("ended without a status".to_string())),
        },
        Err(e) => (None, Some(format!("waiting for the process: {e}"))),
    };
    let (outcome, error) = match stop {
        None if exit_code == Some(0) => (Outcome::Succeeded, None),
        None => (Outcome::Failed, exit_error),
        Some(Stop::Cancel(reason)) => (Outcome::Cancelled, Some(reason)),
        Some(Stop::Timeout(t)) => (Outcome::TimedOut, Some(format!("timeout after {t}s"))),
        Some(Stop::Release) => (Outcome::Released, None),
        Some(Stop::Abandoned) => return None,
        Some(Stop::Fenced) => (
            Outcome::Released,
            Some("stopped: its lease could not be renewed in time (exclusive job)".into()),
        ),
        Some(Stop::LeaseLost) => {
            log::warn!(
                "lease lost, result dropped job_id={} attempt={}",
                a.job_id,
                a.attempt
            );
            return None;
        }
    };
    Some((outcome, exit_code, error))
}

/// The attempt's report, with the job's result file (a bad one adds to the
/// error).
fn report(
    a: &Assignment,
    dir: &Path,
    outcome: Outcome,
    exit_code: Option<i32>,
    mut error: Option<String>,
) -> Spooled {
    let result = match read_json_file(&dir.join(WORK).join("result.json"), RESULT_MAX) {
        Ok(r) => r,
        Err(e) => {
            let note = format!("result file: {e}");
            error = Some(match error {
                Some(prev) => format!("{prev}; {note}"),
                None => note,
            });
            None
        }
    };
    log::info!(
        "job ended job_id={} attempt={} outcome={} exit_code={exit_code:?}",
        a.job_id,
        a.attempt,
        outcome.as_str()
    );
    Spooled {
        job_id: a.job_id,
        report: CompleteRequest {
            attempt: a.attempt,
            outcome,
            exit_code,
            result,
            error,
        },
    }
}

/// Spools the report, waits for the output to go out (logs precede the
/// report that closes the lease), and returns the report to send; `None`
/// when the coordinator said the lease is lost meanwhile.
async fn deliver_after_output(
    ctx: &Ctx,
    a: &Assignment,
    mut job: Started,
    report: Spooled,
) -> Option<CompleteRequest> {
    // On disk before waiting for the output to go out, so an agent killed
    // during an outage still delivers the result when it comes back.
    let (state, spooled) = (ctx.state.clone(), report.clone());
    if let Err(e) = off_thread(move || state.spool(&spooled)).await {
        log::error!(
            "could not spool the report of job {} (delivering it anyway): {e}",
            a.job_id
        );
    }
    let _ = (&mut job.shipper).await;
    if matches!(job.lost.try_recv(), Ok(())) {
        log::warn!(
            "lease lost, result dropped job_id={} attempt={}",
            a.job_id,
            a.attempt
        );
        let (state, job_id, attempt) = (ctx.state.clone(), a.job_id, a.attempt);
        off_thread(move || state.unspool(job_id, attempt)).await;
        return None;
    }
    Some(report.report)
}

fn describe(stop: &Stop) -> String {
    match stop {
        Stop::Fenced => "exclusive job, lease not renewed in time".into(),
        Stop::Cancel(r) => format!("cancel ({r})"),
        Stop::Release => "agent stopping, handing back".into(),
        Stop::Timeout(t) => format!("timeout after {t}s"),
        Stop::LeaseLost => "lease lost".into(),
        Stop::Abandoned => "agent revoked".into(),
    }
}

/// Stops what an earlier agent process left running (it was killed, so
/// only its jobs' direct children got the death signal): every process of
/// a recorded group that carries that attempt's DROVER_JOB_ID and
/// DROVER_ATTEMPT (a reused group id belongs to someone else). Then the
/// stale job dirs go. Returns how many processes were killed.
pub fn reap_leftovers(state: &crate::state::StateDir) -> usize {
    let mut killed = 0;
    for (job_id, attempt, pgid, dir) in state.leftover_jobs() {
        let marks = [
            format!("DROVER_JOB_ID={job_id}"),
            format!("DROVER_ATTEMPT={attempt}"),
        ];
        let pids = group_members(pgid)
            .into_iter()
            .filter(|pid| environ_has(*pid, &marks))
            .collect::<Vec<_>>();
        for pid in pids.iter().filter_map(|p| Pid::from_raw(*p)) {
            let _ = kill_process(pid, Signal::KILL);
        }
        if !pids.is_empty() {
            log::warn!(
                "killed {} processes the previous agent left running job_id={job_id} attempt={attempt}",
                pids.len()
            );
        }
        killed += pids.len();
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log::debug!("removing {}: {e}", dir.display());
        }
    }
    killed
}

/// Processes whose process group is `pgid` (from /proc).
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // After the command name (which may hold spaces): state, ppid, pgrp.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(2)?.parse::<i32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}

/// Whether a process's environment holds every one of `marks` (KEY=VALUE).
fn environ_has(pid: i32, marks: &[String]) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
    marks.iter().all(|m| vars.contains(&m.as_bytes()))
}

/// Reads a JSON document a job wrote (result or progress file), without
/// following a symlink, at most `max` bytes. `None` when absent or empty.
pub fn read_json_file(path: &Path, max: u64) -> Result<Option<Value>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it (a symlink is refused): {e}")),
    };
    // A hard link to another file (the agent's token, say) is not the
    // job's own document.
    let meta = file.metadata().map_err(|e| format!("reading it: {e}"))?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err("refused: not a plain file of its own (a hard link or a special file)".into());
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading it: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("not valid JSON: {e}"))
}

/// One attempt's output on its way to the coordinator, kept in a file in the
/// job dir as records (stream byte, u32 length, data). The job never waits
/// for the coordinator and the agent's memory does not grow with the output:
/// the pumps append, the shipper sends from where it left off. Nothing
/// printed is lost to an outage; beyond [`SPOOL_CAP`] output is dropped
/// with a marker.
struct OutputSpool {
    path: std::path::PathBuf,
    file: tokio::sync::Mutex<Option<tokio::fs::File>>,
    state: std::sync::Mutex<SpoolState>,
    more: tokio::sync::Notify,
}

#[derive(Default)]
struct SpoolState {
    written: u64,
    closed: bool,
    /// Output past the cap (here or at the coordinator) is not kept.
    full: bool,
}

const SPOOL_CAP: u64 = 64 * 1024 * 1024;
const STREAMS: [&str; 2] = ["stdout", "stderr"];

impl OutputSpool {
    async fn create(path: std::path::PathBuf) -> std::io::Result<OutputSpool> {
        let file = tokio::fs::File::create(&path).await?;
        Ok(OutputSpool {
            path,
            file: tokio::sync::Mutex::new(Some(file)),
            state: Default::default(),
            more: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn append(&self, stream: u8, data: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let mut file = self.file.lock().await;
        let (written, full) = {
            let st = self.state();
            (st.written, st.full)
        };
        if full {
            return;
        }
        let (stream, data) = if written + data.len() as u64 > SPOOL_CAP {
            self.state().full = true;
            (1, &b"\n[drover] the agent's output spool is full; later output of this attempt is dropped\n"[..])
        } else {
            (stream, data)
        };
        let mut record = Vec::with_capacity(5 + data.len());
        record.push(stream);
        record.extend_from_slice(&(data.len() as u32).to_le_bytes());
        record.extend_from_slice(data);
        let Some(f) = file.as_mut() else { return };
        if let Err(e) = async {
            f.write_all(&record).await?;
            f.flush().await
        }
        .await
        {
            log::warn!(
                "writing job output to {}: {e}; output dropped",
                self.path.display()
            );
            self.state().full = true;
            return;
        }
        self.state().written += record.len() as u64;
        self.more.notify_one();
    }

    fn close(&self) {
        self.state().closed = true;
        self.more.notify_one();
    }

    /// Reads records from `offset`, merging one stream's consecutive records
    /// up to [`SHIP_MAX`] bytes: (stream, data, next offset).
    async fn read(
        &self,
        reader: &mut tokio::fs::File,
        offset: u64,
        end: u64,
    ) -> std::io::Result<(u8, Vec<u8>, u64)> {
        use tokio::io::AsyncSeekExt;
        reader.seek(std::io::SeekFrom::Start(offset)).await?;
        let (mut pos, mut stream, mut data) = (offset, None, Vec::new());
        while pos < end && data.len() < SHIP_MAX {
            let mut head = [0u8; 5];
            reader.read_exact(&mut head).await?;
            let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if stream.is_some_and(|s| s != head[0]) {
                break;
            }
            stream = Some(head[0]);
            let start = data.len();
            data.resize(start + len, 0);
            reader.read_exact(&mut data[start..]).await?;
            pos += 5 + len as u64;
        }
        Ok((stream.unwrap_or(0), data, pos))
    }
}

async fn pump(mut pipe: impl AsyncRead + Unpin, stream: u8, spool: Arc<OutputSpool>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => spool.append(stream, &buf[..n]).await,
        }
    }
}

/// Sends the spooled output in order. Retries while the coordinator is
/// unreachable; a 409 means the lease is gone: say so and stop.
async fn ship(
    client: Arc<Client>,
    job_id: i64,
    attempt: i64,
    spool: Arc<OutputSpool>,
    lost: oneshot::Sender<()>,
) {
    let mut reader = match tokio::fs::File::open(&spool.path).await {
        Ok(f) => f,
        Err(e) => {
            log::warn!(
                "reading job output back from {}: {e}; output not sent",
                spool.path.display()
            );
            return;
        }
    };
    let mut shipped = 0u64;
    loop {
        let (written, closed) = {
            let st = spool.state();
            (st.written, st.closed)
        };
        if shipped >= written {
            if closed {
                return;
            }
            spool.more.notified().await;
            continue;
        }
        let (stream, data, next) = match spool.read(&mut reader, shipped, written).await {
            Ok(r) => r,
            Err(e) => {
                log::warn!(
                    "reading job output back from {}: {e}; the rest is not sent",
                    spool.path.display()
                );
                return;
            }
        };
        let data = Arc::new(data);
        let stream = STREAMS[usize::from(stream.min(1))];
        let mut failures = 0;
        loop {
            let (c, d) = (client.clone(), data.clone());
            match off_thread(move || c.append_log(job_id, attempt, stream, &d)).await {
                Ok(truncated) => {
                    if truncated {
                        // The coordinator keeps no more of this attempt.
                        spool.state().full = true;
                        return;
                    }
                    break;
                }
                Err(e) if matches!(e.status(), Some(409) | Some(404)) => {
                    log::warn!("log refused, lease gone job_id={job_id} attempt={attempt}: {e}");
                    let _ = lost.send(());
                    return;
                }
                Err(e) if e.is_transient() || e.status() == Some(401) => {
                    if failures == 0 {
                        log::warn!("sending job output failed, kept on disk, retrying job_id={job_id}: {e}");
                    }
                    failures += 1;
                    tokio::time::sleep(backoff(failures)).await;
                }
                Err(e) => {
                    log::warn!("job output chunk refused, dropped job_id={job_id}: {e}");
                    break;
                }
            }
        }
        shipped = next;
    }
}

/// Runs `f` on the blocking pool and waits for it (a panic there goes on
/// here). The agent has one runtime thread: a blocking HTTP call, or an
/// fsync on a busy disk, must not hold up every job's output, the claims
/// and the heartbeats.
pub async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Spools a report (fsync, rename), then delivers it.
pub async fn spool_and_deliver(
    client: &Arc<Client>,
    state: &Arc<StateDir>,
    job_id: i64,
    report: CompleteRequest,
) {
    let spooled = Spooled { job_id, report };
    let (disk, copy) = (state.clone(), spooled.clone());
    if let Err(e) = off_thread(move || disk.spool(&copy)).await {
        log::error!("could not spool the report of job {job_id} (delivering it anyway): {e}");
    }
    deliver(client, state, job_id, spooled.report).await;
}

/// Sends a report that is already in the spool until the coordinator takes
/// it (200) or refuses it for good (409 stale, 404 gone), then drops it from
/// the spool. Never gives up on a transient failure: the spool survives an
/// agent restart too.
pub async fn deliver(
    client: &Arc<Client>,
    state: &Arc<StateDir>,
    job_id: i64,
    report: CompleteRequest,
) {
    let attempt = report.attempt;
    let report = Arc::new(report);
    let mut failures = 0;
    loop {
        let (c, r) = (client.clone(), report.clone());
        match off_thread(move || c.complete(job_id, &r)).await {
            Ok(resp) => {
                log::info!(
                    "reported job_id={job_id} attempt={attempt} outcome={} status={}{}",
                    report.outcome.as_str(),
                    resp.status,
                    if resp.replay {
                        " (already recorded)"
                    } else {
                        ""
                    }
                );
                break;
            }
            Err(e) if matches!(e.status(), Some(409) | Some(404)) => {
                log::warn!("report refused job_id={job_id} attempt={attempt}: {e}");
                break;
            }
            Err(e) if e.is_transient() || e.status() == Some(401) => {
                if failures == 0 {
                    log::warn!("report not delivered yet, kept in the spool, retrying job_id={job_id}: {e}");
                }
                failures += 1;
                tokio::time::sleep(backoff(failures)).await;
            }
            Err(e) => {
                log::error!("report refused, dropping it job_id={job_id} attempt={attempt}: {e}");
                break;
            }
        }
    }
    let state = state.clone();
    off_thread(move || state.unspool(job_id, attempt)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exclusive job is stopped early enough to be dead (TERM, then
    /// KILL after the grace) a second before its lease can run out.
    #[test]
    fn the_fence_leaves_the_kill_grace_and_a_second() {
        let sent = Instant::now();
        let r = Renewal {
            sent,
            ttl: Duration::from_secs(30),
        };
        assert_eq!(
            r.fence(Duration::from_secs(10)),
            sent + Duration::from_secs(19)
        );
        // A grace longer than the lease: stop at once.
        assert_eq!(r.fence(Duration::from_secs(60)), sent);
    }

    #[test]
    fn result_file_rules() {
        let dir = std::env::temp_dir().join(format!("drover-result-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("result.json");
        assert_eq!(read_json_file(&p, 100).unwrap(), None);
        std::fs::write(&p, br#"{"loss": 0.1}"#).unwrap();
        assert_eq!(
            read_json_file(&p, 100).unwrap(),
            Some(serde_json::json!({"loss": 0.1}))
        );
        assert!(read_json_file(&p, 5)
            .unwrap_err()
            .contains("larger than 5 bytes"));
        std::fs::write(&p, b"not json").unwrap();
        assert!(read_json_file(&p, 100)
            .unwrap_err()
            .contains("not valid JSON"));
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &p).unwrap();
        assert!(read_json_file(&p, 100).unwrap_err().contains("symlink"));
        std::fs::remove_file(&p).unwrap();
        let secret = dir.join("identity.json");
        std::fs::write(&secret, br#"{"token": "drv_agent_x"}"#).unwrap();
        std::fs::hard_link(&secret, &p).unwrap();
        assert!(read_json_file(&p, 100).unwrap_err().contains("hard link"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
