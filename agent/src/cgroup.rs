//! Each job in a cgroup of its own, under the agent's (systemd delegates it:
//! `Delegate=yes` in the unit), so that stopping a job stops everything it
//! started: a process that left the job's process group (`setsid`, a
//! double fork) is still in its cgroup, and `cgroup.kill` ends them all.
//! Without a delegated cgroup v2 (the agent run by hand, an old kernel)
//! jobs stay in the agent's cgroup and only their process group is
//! signalled; the agent says so at start.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent's own cgroup, where job cgroups are made.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
}

impl Cgroups {
    /// The agent's cgroup, when it may make job cgroups in it: a systemd
    /// service's own (delegated, and no other agent's), cgroup v2, with
    /// `cgroup.kill`. Elsewhere (a shell, a test harness running many
    /// agents in one cgroup) jobs stay in the agent's cgroup.
    pub fn detect() -> Option<Cgroups> {
        std::env::var_os("INVOCATION_ID")?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        if !path.trim().ends_with(".service") {
            return None;
        }
        let root = v2_mount()?.join(path.trim().trim_start_matches('/'));
        if !root.join("cgroup.kill").exists() {
            return None;
        }
        let probe = root.join("drover-probe");
        let made = std::fs::create_dir(&probe).is_ok();
        let _ = std::fs::remove_dir(&probe);
        made.then_some(Cgroups { root })
    }

    /// Makes the cgroup of one attempt (an earlier one of the same name, left
    /// by a killed agent, is emptied and reused).
    pub fn job(&self, job_id: i64, attempt: i64) -> Result<JobCgroup, String> {
        let dir = self.root.join(format!("job-{job_id}-{attempt}"));
        if let Err(e) = std::fs::create_dir(&dir) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(format!("making the job's cgroup {}: {e}", dir.display()));
            }
        }
        let procs = OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| format!("opening {}/cgroup.procs: {e}", dir.display()))?;
        Ok(JobCgroup { dir, procs })
    }

    /// Kills and removes the job cgroups an earlier agent process left.
    pub fn reap_leftovers(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        let mut reaped = 0;
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("job-") {
                let dir = e.path();
                kill(&dir);
                remove(&dir);
                reaped += 1;
            }
        }
        reaped
    }
}

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or
/// /sys/fs/cgroup/unified beside v1 controllers (systemd's hybrid mode).
fn v2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE ...
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// One attempt's cgroup.
#[derive(Debug)]
pub struct JobCgroup {
    dir: PathBuf,
    /// Open for the child, which writes itself into it before exec.
    pub procs: File,
}

impl JobCgroup {
    /// SIGKILL to every process in it, wherever they moved in the tree.
    pub fn kill(&self) {
        kill(&self.dir);
    }

    /// Kills what is left and removes it once empty.
    pub fn remove(self) {
        kill(&self.dir);
        remove(&self.dir);
    }
}

fn kill(dir: &Path) {
    if let Ok(mut f) = OpenOptions::new().write(true).open(dir.join("cgroup.kill")) {
        let _ = f.write_all(b"1");
    }
}

/// Removes an emptied cgroup (the kernel frees it once its last process
/// has been reaped: a moment after the kill).
fn remove(dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => return,
        }
    }
    log::warn!(
        "the job cgroup {} is still busy; left in place",
        dir.display()
    );
}
