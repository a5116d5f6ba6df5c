//! Starting a job's process the way `posix_spawn` does, plus the one thing
//! `posix_spawn` cannot do: `PR_SET_PDEATHSIG`, so that a job dies with its
//! agent instead of running on unsupervised.
//!
//! std's `Command` forks the whole agent (page tables and all) as soon as a
//! `pre_exec` hook is set, and uses `posix_spawn` otherwise; the fork cost
//! ~0.65 ms of every dispatch here (BENCHMARKS.md). This is the vfork-style
//! `clone(CLONE_VM | CLONE_VFORK)` that glibc's `posix_spawn` makes: the
//! child borrows the agent's memory and a stack of its own, the calling
//! thread waits until the child has called `execve` (or failed), and the
//! child reports a failure by writing its errno into memory both share.
//!
//! The child runs only async-signal-safe calls on data prepared before the
//! clone: no allocation, no locks, no Rust panics.
//!
//! The death signal follows the *thread* that spawned the job: call
//! [`spawn`] from a thread that lives as long as the agent (a tokio worker,
//! never `spawn_blocking`, whose threads exit when idle).

use crate::jobuser::JobUser;
use rustix::process::{waitpid, Pid, PidfdFlags, WaitOptions};
use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// The child's stack: it calls a few libc wrappers, then `execve`.
const STACK: usize = 64 * 1024;
/// Where to look for a bare program name when the job's environment has no
/// `PATH` (what `execvp` uses).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A started job process: the leader of its own process group.
pub struct Child {
    pub pid: i32,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    /// Readable once the process has exited; `None` where the kernel has no
    /// `pidfd_open` (before Linux 5.3, or a seccomp filter refusing it).
    pidfd: Option<OwnedFd>,
}

/// What the child reads, and where it leaves its errno. `repr(C)` and raw
/// pointers only: it is read from the child's side of the clone.
#[repr(C)]
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    fds: [RawFd; 3],
    parent: libc::pid_t,
    /// Whether to take on `uid`, `gid` and the `ngroups` groups at
    /// `groups` before exec.
    switch: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: *const libc::gid_t,
    ngroups: usize,
    /// `cgroup.procs` of the job's cgroup, open for writing; -1: none.
    cgroup_procs: RawFd,
    /// The file mode creation mask the program starts with; -1: the agent's.
    umask: i32,
    errno: AtomicI32,
}

/// What the child needs as C strings, made before the clone (the child
/// may not allocate).
struct CStrings {
    /// The program, resolved in the job's `PATH`.
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
}

impl CStrings {
    fn new(
        argv: &[String],
        env: &BTreeMap<OsString, OsString>,
        cwd: &Path,
    ) -> io::Result<CStrings> {
        let program = argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let argv_c = argv
            .iter()
            .map(|a| c_string(OsStr::new(a)))
            .collect::<io::Result<Vec<_>>>()?;
        let path = c_string(resolve(program, env, cwd)?.as_os_str())?;
        let envp = env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.clone();
                kv.push("=");
                kv.push(v);
                c_string(&kv)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(CStrings {
            path,
            argv: argv_c,
            envp,
            cwd: c_string(cwd.as_os_str())?,
        })
    }
}

/// Starts `argv` with exactly the environment `env`, in `cwd`, stdin from
/// /dev/null, stdout and stderr piped, in a new process group, killed when
/// the calling thread's process dies.
pub fn spawn(argv: &[String], env: &BTreeMap<OsString, OsString>, cwd: &Path) -> io::Result<Child> {
    spawn_as(argv, env, cwd, &Launch::default())
}

/// How a job is started besides its command, environment and directory.
#[derive(Default)]
pub struct Launch<'a> {
    /// Run as this user (its uid, gid and groups); None: as the agent.
    pub user: Option<&'a JobUser>,
    /// `cgroup.procs` of the job's cgroup, to start in it.
    pub cgroup_procs: Option<&'a std::fs::File>,
    /// The umask the job starts with; None: the agent's own.
    pub umask: Option<u32>,
}

/// As [`spawn`], started as `launch` says.
pub fn spawn_as(
    argv: &[String],
    env: &BTreeMap<OsString, OsString>,
    cwd: &Path,
    launch: &Launch,
) -> io::Result<Child> {
    let (user, cgroup_procs) = (launch.user, launch.cgroup_procs);
    let umask = launch.umask.map_or(-1, |m| (m & 0o777) as i32);
    let c = CStrings::new(argv, env, cwd)?;
    let groups: &[u32] = user.map_or(&[], |u| &u.groups);
    let (argv_p, envp_p) = (null_terminated(&c.argv), null_terminated(&c.envp));
    let (fds, out_r, err_r) = stdio()?;

    let mut args = ChildArgs {
        path: c.path.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        cwd: c.cwd.as_ptr(),
        fds: [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()],
        parent: rustix::process::getpid().as_raw_nonzero().get(),
        switch: user.is_some(),
        uid: user.map_or(0, |u| u.uid),
        gid: user.map_or(0, |u| u.gid),
        groups: groups.as_ptr(),
        ngroups: groups.len(),
        cgroup_procs: cgroup_procs.map_or(-1, |f| f.as_raw_fd()),
        umask,
        errno: AtomicI32::new(0),
    };

    // The child's stack: 16-byte aligned, freed when this returns (the
    // child has exec'd or exited by then: CLONE_VFORK). Never read here,
    // so it need not be initialized.
    let mut stack: Vec<u128> = Vec::with_capacity(STACK / 16);
    // SAFETY: the stack top is one past the end of `stack`'s allocation,
    // which outlives the clone. The signal masks are plain values owned
    // here. Every signal is blocked across the clone so that no handler of
    // the agent's runs on the child's side (it shares the agent's memory);
    // the child sets the dispositions back to default before unblocking.
    // `args` outlives the clone, which returns only once the child is done
    // with it.
    let (pid, clone_error) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child_main,
            stack.as_mut_ptr().add(STACK / 16).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs).cast(),
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        (pid, clone_error)
    };
    drop(fds);
    if pid < 0 {
        return Err(clone_error);
    }
    drop(stack);
    // The child wrote it (or not) before clone returned.
    let errno = args.errno.load(Ordering::Acquire);
    if errno != 0 {
        // It exited with 127 before exec: collect it, report why.
        reap(pid)?;
        return Err(io::Error::from_raw_os_error(errno));
    }
    // The pid is our unreaped child, so it cannot name another process.
    let pidfd = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).ok());
    Ok(Child {
        pid,
        stdout: Some(pipe::Receiver::from_owned_fd(out_r)?),
        stderr: Some(pipe::Receiver::from_owned_fd(err_r)?),
        pidfd,
    })
}

impl Child {
    /// Waits for the process to exit and collects its status (take the
    /// pipes first).
    pub async fn wait(self) -> io::Result<ExitStatus> {
        let pid = self.pid;
        if let Some(fd) = self.pidfd {
            // SAFETY: the pidfd is owned by the AsyncFd and closed only
            // when it drops.
            let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
            drop(fd.readable().await?);
            return reap(pid);
        }
        // No pidfd: a blocking-pool thread waits instead.
        tokio::task::spawn_blocking(move || reap(pid))
            .await
            .map_err(io::Error::other)?
    }
}

/// The child's side of the clone: only async-signal-safe calls, nothing
/// that allocates or panics; on any failure its errno goes to the parent.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive and unused by the
    // parent until this side has exec'd or exited (CLONE_VFORK); every
    // pointer in it is valid and NUL-terminated.
    unsafe {
        let a = &mut *arg.cast::<ChildArgs>();
        // Handlers are the agent's code: back to default. Ignored signals
        // stay ignored (as exec keeps them), except SIGPIPE, which the Rust
        // runtime ignores for itself.
        for sig in 1..=64 {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
                && old.sa_sigaction != libc::SIG_DFL
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        // Raw syscalls for the credentials: glibc's wrappers would signal
        // every thread of the agent (whose memory this side shares) to
        // change theirs too. Before the death signal, which a change of
        // credentials clears.
        // Into the job's cgroup ("0": this process) while still root.
        let ok = libc::setpgid(0, 0) == 0
            && (a.cgroup_procs < 0 || libc::write(a.cgroup_procs, b"0".as_ptr().cast(), 1) == 1)
            && (!a.switch
                || libc::syscall(libc::SYS_setgroups, a.ngroups, a.groups) == 0
                    && libc::syscall(libc::SYS_setgid, a.gid) == 0
                    && libc::syscall(libc::SYS_setuid, a.uid) == 0)
            && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == 0
            // The agent died before the death signal was armed.
            && (libc::getppid() == a.parent || {
                *libc::__errno_location() = libc::ESRCH;
                false
            })
            && libc::dup2(a.fds[0], 0) == 0
            && libc::dup2(a.fds[1], 1) == 1
            && libc::dup2(a.fds[2], 2) == 2
            && libc::chdir(a.cwd) == 0
            && {
                if a.umask >= 0 {
                    libc::umask(a.umask as libc::mode_t);
                }
                true
            }
            && {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) == 0
            };
        if ok {
            libc::execve(a.path, a.argv, a.envp);
        }
        let errno = match *libc::__errno_location() {
            0 => libc::EINVAL,
            e => e,
        };
        a.errno.store(errno, Ordering::Release);
        libc::_exit(127)
    }
}

/// The program's path, searched for in the job's own `PATH` as `execvp`
/// would when it is a bare name.
fn resolve(program: &str, env: &BTreeMap<OsString, OsString>, cwd: &Path) -> io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let search = env
        .get(OsStr::new("PATH"))
        .map(|p| p.as_os_str())
        .unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut denied = false;
    for dir in std::env::split_paths(search) {
        let candidate = cwd.join(dir).join(program);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_file() => denied = true,
            _ => {}
        }
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

fn c_string(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} contains a NUL byte", s.to_string_lossy()),
        )
    })
}

fn null_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The child's stdin (/dev/null), stdout and stderr (pipes), and the
/// pipes' read ends. dup2 onto 0..=2 in the child must not overwrite a
/// source still to be copied: every source is above 2.
fn stdio() -> io::Result<([OwnedFd; 3], OwnedFd, OwnedFd)> {
    let stdin = OwnedFd::from(std::fs::File::open("/dev/null")?);
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    let fds = [
        above_stdio(stdin)?,
        above_stdio(out_w)?,
        above_stdio(err_w)?,
    ];
    Ok((fds, out_r, err_r))
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// `fd` itself when it is above 2 (always, unless the agent was started
/// with stdin, stdout or stderr closed), else a close-on-exec copy that is.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    Ok(rustix::io::fcntl_dupfd_cloexec(&fd, 3)?)
}

/// Collects an exited (or exiting) child's status.
fn reap(pid: i32) -> io::Result<ExitStatus> {
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ECHILD))?;
    loop {
        match waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => return Ok(ExitStatus::from_raw(status.as_raw())),
            Ok(None) => return Err(io::Error::from_raw_os_error(libc::ECHILD)),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<OsString, OsString> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    async fn run(
        argv: &[String],
        env: &BTreeMap<OsString, OsString>,
        cwd: &Path,
    ) -> (ExitStatus, String, String) {
        let mut child = spawn(argv, env, cwd).expect("spawn");
        let (mut out, mut err) = (String::new(), String::new());
        let mut o = child.stdout.take().expect("stdout");
        let mut e = child.stderr.take().expect("stderr");
        let (ro, re) = tokio::join!(o.read_to_string(&mut out), e.read_to_string(&mut err));
        ro.expect("read stdout");
        re.expect("read stderr");
        (child.wait().await.expect("wait"), out, err)
    }

    #[tokio::test]
    async fn runs_with_exactly_the_given_environment_directory_and_pipes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = env(&[("PATH", "/usr/bin:/bin"), ("ONLY", "this")]);
        let (status, out, err) = run(
            &sh("env | sort; pwd; echo oops >&2; exit 3"),
            &e,
            dir.path(),
        )
        .await;
        assert_eq!(status.code(), Some(3));
        let pwd = std::fs::canonicalize(dir.path()).expect("canonical");
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with('_'))
            .collect();
        assert_eq!(
            lines,
            [
                "ONLY=this",
                "PATH=/usr/bin:/bin",
                pwd.to_str().expect("utf-8")
            ]
        );
        assert_eq!(err, "oops\n");
    }

    #[tokio::test]
    async fn the_child_starts_with_default_signals_in_its_own_group() {
        // The test harness's threads have handlers and the Rust runtime
        // ignores SIGPIPE; none of it may reach the job.
        let dir = tempfile::tempdir().expect("tempdir");
        // cut runs in the shell's group: its pgrp is the shell's.
        let script = "grep -E '^(SigBlk|SigIgn)' /proc/self/status; \
                      echo $$; cut -d' ' -f5 /proc/self/stat";
        let mut child =
            spawn(&sh(script), &env(&[("PATH", "/usr/bin:/bin")]), dir.path()).expect("spawn");
        let pid = child.pid;
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .await
            .expect("read");
        assert!(child.wait().await.expect("wait").success(), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        // What this process ignores stays ignored, but SIGPIPE.
        let ignored = |status: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:\t"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        };
        let ours = ignored(&std::fs::read_to_string("/proc/self/status").expect("status"));
        let pipe = 1u64 << (libc::SIGPIPE - 1);
        assert_eq!(ignored(&out), ours.map(|m| m & !pipe), "{out}");
        let rest: Vec<&str> = out.lines().filter(|l| !l.starts_with("Sig")).collect();
        assert_eq!(rest[0], pid.to_string(), "{out}");
        assert_eq!(rest[1], pid.to_string(), "{out}");
    }

    #[tokio::test]
    async fn errors_name_what_could_not_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = env(&[("PATH", "/usr/bin:/bin")]);
        let missing = spawn(&["no-such-program-drover".into()], &e, dir.path())
            .err()
            .expect("refused");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let not_exec = dir.path().join("data.txt");
        std::fs::write(&not_exec, "x").expect("write");
        let e2 = env(&[("PATH", dir.path().to_str().expect("utf-8"))]);
        let denied = spawn(&["data.txt".into()], &e2, dir.path())
            .err()
            .expect("refused");
        assert_eq!(denied.kind(), io::ErrorKind::PermissionDenied);
        let bad_cwd = spawn(&sh("true"), &e, &dir.path().join("gone"))
            .err()
            .expect("refused");
        assert_eq!(bad_cwd.kind(), io::ErrorKind::NotFound);
        let nul = spawn(&["a\0b".into()], &e, dir.path())
            .err()
            .expect("refused");
        assert_eq!(nul.kind(), io::ErrorKind::InvalidInput);
        // A script without a #! line: execve refuses it (as posix_spawn does).
        let script = dir.path().join("noshebang");
        std::fs::write(&script, "true\n").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let noexec = spawn(&[script.to_string_lossy().into_owned()], &e, dir.path())
            .err()
            .expect("refused");
        assert_eq!(noexec.raw_os_error(), Some(libc::ENOEXEC));
    }

    #[tokio::test]
    async fn a_killed_child_reports_its_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = spawn(
            &sh("kill -9 $$"),
            &env(&[("PATH", "/usr/bin:/bin")]),
            dir.path(),
        )
        .expect("spawn");
        assert_eq!(
            child.wait().await.expect("wait").signal(),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn the_job_dies_with_the_thread_that_started_it() {
        // A runtime on a thread that then ends, as a blocking-pool thread
        // would: the death signal fires (which is why jobs start on workers).
        let pid = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let argv = ["sleep".to_string(), "30".to_string()];
                let child = spawn(&argv, &env(&[("PATH", "/usr/bin:/bin")]), Path::new("/"));
                child.expect("spawn").pid
            })
        })
        .join()
        .expect("thread");
        let status = reap(pid).expect("reap");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }
}
