//! The agent's state dir: its identity (token, 0600), the machine id, the
//! spool of finished reports not yet delivered, and job scratch dirs.
//! Every file that must survive a crash is written to a temp file, fsynced,
//! renamed, and the directory fsynced.

use drover_proto::CompleteRequest;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    pub worker_id: i64,
    pub token: String,
    pub coordinator: String,
}

/// A finished attempt's report, kept until the coordinator took it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spooled {
    pub job_id: i64,
    pub report: CompleteRequest,
}

pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Creates the dir (0711: only traversable by others) and checks that
    /// it is writable.
    pub fn open(root: &Path) -> Result<StateDir, String> {
        let hint = "Try: create it and give it to the agent's user (sudo install -d -m 0700 -o $USER DIR), or pass --state-dir";
        fs::create_dir_all(root).map_err(|e| {
            format!(
                "state dir {} cannot be created: {e}. {hint}",
                root.display()
            )
        })?;
        // Jobs running as another user reach their own dirs under jobs/
        // (traverse only: nobody else lists or reads anything here; the
        // identity and the spool are the agent's alone).
        let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o711));
        for (sub, mode) in [("spool", 0o700), ("jobs", 0o711)] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(|e| {
                format!("state dir {} is not writable: {e}. {hint}", root.display())
            })?;
            let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(mode));
        }
        let probe = root.join(".write-test");
        fs::write(&probe, b"ok")
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| format!("state dir {} is not writable: {e}. {hint}", root.display()))?;
        // Absolute, so jobs (which run in their own cwd) get usable paths.
        let root =
            fs::canonicalize(root).map_err(|e| format!("state dir {}: {e}", root.display()))?;
        Ok(StateDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn identity_path(&self) -> PathBuf {
        self.root.join("identity.json")
    }

    pub fn load_identity(&self) -> Result<Option<Identity>, String> {
        let path = self.identity_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                format!(
                    "{} is damaged ({e}); delete it to register again",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    pub fn save_identity(&self, id: &Identity) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(id).map_err(|e| e.to_string())?;
        write_durably(&self.identity_path(), &bytes)
    }

    pub fn forget_identity(&self) {
        let _ = fs::remove_file(self.identity_path());
    }

    /// A stable id for this machine: `/etc/machine-id`, else one generated
    /// once and kept in the state dir.
    pub fn machine_id(&self) -> Result<String, String> {
        if let Ok(id) = fs::read_to_string("/etc/machine-id") {
            let id = id.trim();
            if !id.is_empty() {
                return Ok(id.to_string());
            }
        }
        let path = self.root.join("machine-id");
        if let Ok(id) = fs::read_to_string(&path) {
            return Ok(id.trim().to_string());
        }
        let id = format!("{:016x}{:016x}", crate::random_u64(), crate::random_u64());
        write_durably(&path, id.as_bytes())?;
        Ok(id)
    }

    fn spool_path(&self, job_id: i64, attempt: i64) -> PathBuf {
        self.root
            .join("spool")
            .join(format!("{job_id}-{attempt}.json"))
    }

    /// Keeps a report on disk (fsynced) before it is sent.
    pub fn spool(&self, s: &Spooled) -> Result<(), String> {
        let bytes = serde_json::to_vec(s).map_err(|e| e.to_string())?;
        write_durably(&self.spool_path(s.job_id, s.report.attempt), &bytes)
    }

    pub fn is_spooled(&self, job_id: i64, attempt: i64) -> bool {
        self.spool_path(job_id, attempt).exists()
    }

    pub fn unspool(&self, job_id: i64, attempt: i64) {
        let path = self.spool_path(job_id, attempt);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("removing delivered report {}: {e}", path.display());
            }
        }
    }

    /// Reports left by an earlier run, oldest job first.
    pub fn spooled(&self) -> Vec<Spooled> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.root.join("spool")) else {
            return out;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Spooled>(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => out.push(s),
                Err(e) => log::warn!("ignoring unreadable spooled report {}: {e}", path.display()),
            }
        }
        out.sort_by_key(|s| (s.job_id, s.report.attempt));
        out
    }

    /// Scratch dir of one attempt (its default cwd, result and progress files).
    pub fn job_dir(&self, job_id: i64, attempt: i64) -> PathBuf {
        self.root.join("jobs").join(format!("{job_id}-{attempt}"))
    }

    /// Notes the process group an attempt runs in, so that a later agent
    /// can stop what this one leaves behind if it is killed.
    pub fn record_group(&self, job_id: i64, attempt: i64, pgid: i32) -> Result<(), String> {
        let path = self.job_dir(job_id, attempt).join(GROUP_FILE);
        fs::write(&path, pgid.to_string()).map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Attempts an earlier agent process started and did not clean up:
    /// (job, attempt, process group, job dir).
    pub fn leftover_jobs(&self) -> Vec<(i64, i64, i32, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.root.join("jobs")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (job, attempt) = name.split_once('-')?;
                let pgid = fs::read_to_string(e.path().join(GROUP_FILE)).ok()?;
                Some((
                    job.parse().ok()?,
                    attempt.parse().ok()?,
                    pgid.trim().parse().ok()?,
                    e.path(),
                ))
            })
            .collect()
    }
}

/// In a job dir: the attempt's process group id.
const GROUP_FILE: &str = "pgid";

/// Write to a temp file, fsync, rename over `path`, fsync the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let ctx = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(ctx)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(ctx)?;
    fs::rename(&tmp, path).map_err(ctx)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ctx)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::Outcome;

    #[test]
    fn identity_and_spool_round_trip() {
        let dir = std::env::temp_dir().join(format!("drover-state-test-{}", std::process::id()));
        let st = StateDir::open(&dir).unwrap();
        assert!(st.load_identity().unwrap().is_none());
        st.save_identity(&Identity {
            worker_id: 7,
            token: "drv_agent_x".into(),
            coordinator: "http://c".into(),
        })
        .unwrap();
        let mode = fs::metadata(dir.join("identity.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(st.load_identity().unwrap().unwrap().worker_id, 7);
        let report = CompleteRequest {
            attempt: 2,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            result: None,
            error: None,
        };
        st.spool(&Spooled {
            job_id: 5,
            report: report.clone(),
        })
        .unwrap();
        let back = st.spooled();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].report, report);
        st.unspool(5, 2);
        assert!(st.spooled().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
