//! Each job in a cgroup of its own, under the agent's (systemd delegates it:
//! `Delegate=yes` in the unit), so that stopping a job stops everything it
//! started: a process that left the job's process group (`setsid`, a
//! double fork) is still in its cgroup, and `cgroup.kill` ends them all.
//! Without a delegated cgroup v2 (the agent run by hand, an old kernel)
//! jobs stay in the agent's cgroup and only their process group is
//! signalled; the agent says so at start.
//!
//! Where the delegated cgroup has the memory and cpu controllers, job
//! cgroups also hold a job's limits (`memory.max`, `cpu.max`): the agent
//! moves itself into a leaf of its own (`agent/`) to give them to its
//! children, and tells the coordinator it can (`Inventory::can_limit`).

use drover_proto::Limits;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent's own cgroup, where job cgroups are made.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    /// Job cgroups can hold memory and CPU limits.
    limits: bool,
}

/// The leaf the agent moves itself into to give controllers to jobs.
const AGENT_LEAF: &str = "agent";
/// `cpu.max`'s period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

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
        if !made {
            return None;
        }
        let limits = enable_limits(&root, std::process::id());
        Some(Cgroups { root, limits })
    }

    /// Whether job cgroups hold memory and CPU limits.
    pub fn can_limit(&self) -> bool {
        self.limits
    }

    /// Makes the cgroup of one attempt (an earlier one of the same name, left
    /// by a killed agent, is emptied and reused), holding `limits`.
    pub fn job(
        &self,
        job_id: i64,
        attempt: i64,
        limits: Option<&Limits>,
    ) -> Result<JobCgroup, String> {
        let dir = self.root.join(format!("job-{job_id}-{attempt}"));
        if let Err(e) = std::fs::create_dir(&dir) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(format!("making the job's cgroup {}: {e}", dir.display()));
            }
        }
        if let Some(l) = limits {
            if !self.limits {
                return Err(CANNOT_LIMIT.into());
            }
            set_limits(&dir, l)?;
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

/// Why a job with limits cannot run on an agent.
pub const CANNOT_LIMIT: &str = "this agent cannot hold a job to memory and CPU limits: that takes \
     its systemd unit (Delegate=yes) on cgroup v2 with the memory and cpu controllers";

/// Lets the job cgroups under `root` hold limits: moves process `pid` (the
/// agent) into a leaf of its own, since cgroup v2 gives controllers only
/// to the children of a cgroup without processes, then enables the memory
/// and cpu controllers for them. False where they are not there (cgroup
/// v1 or hybrid machines bind them to v1), or could not be enabled.
fn enable_limits(root: &Path, pid: u32) -> bool {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    if !(has("memory") && has("cpu")) {
        return false;
    }
    let leaf = root.join(AGENT_LEAF);
    let enabled = (|| -> std::io::Result<()> {
        if let Err(e) = std::fs::create_dir(&leaf) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string())?;
        std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu")
    })();
    match enabled {
        Ok(()) => true,
        Err(e) => {
            log::warn!(
                "jobs cannot be held to limits: enabling the memory and cpu controllers in {}: {e}",
                root.display()
            );
            false
        }
    }
}

/// Writes a job's limits into its cgroup `dir`: over its memory it is
/// killed (no swapping instead), its CPU time per period is capped.
fn set_limits(dir: &Path, limits: &Limits) -> Result<(), String> {
    let write = |file: &str, value: String| {
        std::fs::write(dir.join(file), &value)
            .map_err(|e| format!("setting the job's {file} to {value}: {e}"))
    };
    if let Some(mb) = limits.memory_mb {
        write("memory.max", (mb * 1024 * 1024).to_string())?;
        // Absent without swap accounting: then there is no swap to use.
        if dir.join("memory.swap.max").exists() {
            write("memory.swap.max", "0".into())?;
        }
    }
    if let Some(cpus) = limits.cpus {
        let quota = ((cpus * CPU_PERIOD_US as f64) as u64).max(1000);
        write("cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
    }
    Ok(())
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

    /// How many of its processes the kernel's OOM killer ended (over its
    /// memory limit).
    pub fn oom_kills(&self) -> u64 {
        let events = std::fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
        events
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup dir as the kernel shows one (plain files here).
    fn fake(controllers: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), controllers).unwrap();
        dir
    }

    #[test]
    fn limits_need_both_controllers_and_move_the_agent_to_a_leaf() {
        let v1 = fake("hugetlb\n");
        assert!(!enable_limits(v1.path(), 42), "no controllers, no limits");
        assert!(!v1.path().join(AGENT_LEAF).exists(), "nothing changed");

        let v2 = fake("cpuset cpu io memory pids\n");
        assert!(enable_limits(v2.path(), 42));
        let moved = std::fs::read_to_string(v2.path().join("agent/cgroup.procs")).unwrap();
        assert_eq!(moved, "42");
        let control = std::fs::read_to_string(v2.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(control, "+memory +cpu");
    }

    #[test]
    fn a_jobs_limits_are_written_to_its_cgroup() {
        let root = fake("cpu memory\n");
        let cgroups = Cgroups {
            root: root.path().to_path_buf(),
            limits: true,
        };
        let dir = root.path().join("job-7-1");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        std::fs::write(dir.join("memory.swap.max"), "max").unwrap();
        let limits = Limits {
            memory_mb: Some(512),
            cpus: Some(1.5),
        };
        let job = cgroups.job(7, 1, Some(&limits)).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (512u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "150000 100000");
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(job.oom_kills(), 1);

        let without = Cgroups {
            limits: false,
            ..cgroups
        };
        let err = without.job(8, 1, Some(&limits)).unwrap_err();
        assert!(
            err.contains("cannot hold a job to memory and CPU limits"),
            "{err}"
        );
    }
}
