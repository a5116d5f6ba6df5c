//! Installing a Drover program as a service: files written atomically with
//! their mode, systemd when it runs, else a detached process with pid and log
//! files. Shared by `drover-agent install` and `drover-coordinator install`
//! (the coordinator includes this file).

use rustix::process::{kill_process, Pid, Signal};
use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a detached start waits for READY=1: past the 30 s after which
/// the services send it anyway.
const READY_WAIT: Duration = Duration::from_secs(35);

/// Writes a file through a temp file and a rename, with `mode`.
pub fn write_file(path: &Path, text: &[u8], mode: u32) -> Result<(), String> {
    let ctx = |e: std::io::Error| format!("writing {}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(ctx)?;
    }
    let tmp = path.with_extension("drover-tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(ctx)?;
    std::io::Write::write_all(&mut f, text)
        .and_then(|_| f.sync_all())
        .map_err(ctx)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(ctx)?;
    std::fs::rename(&tmp, path).map_err(ctx)
}

/// Copies the running executable to `dest` (0755) unless it is that file.
pub fn install_self(dest: &Path) -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    if std::fs::canonicalize(&me).ok() == std::fs::canonicalize(dest).ok() {
        return Ok(());
    }
    let bytes = std::fs::read(&me).map_err(|e| format!("reading {}: {e}", me.display()))?;
    write_file(dest, &bytes, 0o755)
}

/// One `KEY="value"` line per setting, quoted for systemd's EnvironmentFile.
pub fn env_file_text(program: &str, env: &BTreeMap<&'static str, String>) -> String {
    let mut out = format!("# Written by `{program} install`; run it again to change these.\n");
    for (k, v) in env {
        let v = v.replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str(&format!("{k}=\"{v}\"\n"));
    }
    out
}

/// The value of `key` in an env file written by [`env_file_text`], its
/// quoting undone (a bare `KEY=value` line is taken as it stands).
pub fn env_file_value(text: &str, key: &str) -> Option<String> {
    let raw = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))?;
    let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return Some(raw.to_string());
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    Some(out)
}

/// Is systemd the init system here?
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

pub fn systemctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| format!("running systemctl {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// (Re)starts `unit` and waits until it says it is ready (`Type=notify`:
/// systemctl returns then, or fails when the service exits first);
/// returns the status line the service set.
pub fn restart_and_wait(unit: &str) -> Result<String, String> {
    systemctl(&["restart", unit]).map_err(|e| format!("{e}; see journalctl -u {unit}"))?;
    let out = Command::new("systemctl")
        .args(["show", "-p", "StatusText", "--value", unit])
        .output()
        .map_err(|e| format!("running systemctl show {unit}: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs an administration command quietly; whether it succeeded.
fn admin(program: &str, args: &[&str]) -> Result<bool, String> {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .map_err(|e| format!("running {program}: {e}"))
}

/// Makes system user `name` (with its own group, no login, `home` not
/// created) unless it exists, and adds it to those of `groups` this
/// machine has. True when it was made now.
pub fn system_user(name: &str, home: &str, groups: &[&str]) -> Result<bool, String> {
    let made = !admin("id", &["-u", name])?;
    if made {
        let args = [
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            home,
            "--shell",
            "/usr/sbin/nologin",
            name,
        ];
        if !admin("useradd", &args)? {
            return Err(format!("creating the system user {name} (useradd) failed"));
        }
    }
    for group in groups {
        if admin("getent", &["group", group])? && !admin("usermod", &["-aG", group, name])? {
            return Err(format!(
                "adding {name} to the group {group} (usermod) failed"
            ));
        }
    }
    Ok(made)
}

/// Sends `sig` to `pid`; a process already gone is no error.
fn signal(pid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = kill_process(pid, sig);
    }
}

/// A program run without systemd: detached, with `STEM.pid` and `STEM.log`
/// in `dir`.
pub struct Detached {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub stem: &'static str,
}

impl Detached {
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join(format!("{}.pid", self.stem))
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.stem))
    }

    /// The pid in the pid file, if that process is alive and runs our binary.
    pub fn running_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        let name = self.bin.file_name()?.to_string_lossy().to_string();
        (String::from_utf8_lossy(&cmdline).contains(&name) && !zombie).then_some(pid)
    }

    /// SIGTERM, up to `patience` to exit (an agent hands its jobs back),
    /// then SIGKILL.
    pub fn stop(&self, patience: Duration) {
        let Some(pid) = self.running_pid() else {
            return;
        };
        say!("stopping the running {} (pid {pid})", self.stem);
        signal(pid, Signal::TERM);
        let start = Instant::now();
        while self.running_pid().is_some() && start.elapsed() < patience {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.running_pid().is_some() {
            signal(pid, Signal::KILL);
        }
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// Starts the binary in its own process group with `env` (and no other
    /// `DROVER_*`), output to the log file, and waits until it says it is
    /// ready (READY=1 on a notify socket of its own, as under systemd).
    /// Fails if it exits first.
    pub fn start(&self, env: &BTreeMap<&'static str, String>) -> Result<u32, String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.log_file())
            .map_err(|e| format!("opening {}: {e}", self.log_file().display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DROVER_") {
                cmd.env_remove(k);
            }
        }
        let notify = self.dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify);
        let socket =
            UnixDatagram::bind(&notify).map_err(|e| format!("making {}: {e}", notify.display()))?;
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("NOTIFY_SOCKET", &notify)
            // Not started by systemd: its READY=1 is for this wait alone.
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own process group: a terminal's hangup or ^C reaches the
        // installer's foreground group, not this one.
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        let pid = child.id();
        write_file(&self.pid_file(), format!("{pid}\n").as_bytes(), 0o600)?;
        let waited = self.wait_ready(&socket, &mut child);
        let _ = std::fs::remove_file(&notify);
        waited.map(|()| pid)
    }

    /// Waits for READY=1 from `child` on `socket`, up to `READY_WAIT` (the
    /// services send it within 30 s, ready or not, with a status saying
    /// why). An exit first is an error with the log's last lines.
    fn wait_ready(&self, socket: &UnixDatagram, child: &mut Child) -> Result<(), String> {
        let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < READY_WAIT {
            if let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]);
                if message.lines().any(|l| l == "READY=1") {
                    if let Some(status) = message.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                        say!("{}: {status}", self.stem);
                    }
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(self.log_file()).unwrap_or_default();
                let last: Vec<&str> = tail.lines().rev().take(3).collect();
                return Err(format!(
                    "{} exited at start ({status}): {}",
                    self.stem,
                    last.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            }
        }
        say!(
            "{} did not say it is ready within {}s; see {}",
            self.stem,
            READY_WAIT.as_secs(),
            self.log_file().display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_values_read_back_as_written() {
        let tricky = r#"a\b"c\"d$e'f"#.to_string();
        let mut env = BTreeMap::new();
        env.insert("DROVER_SECRET", tricky.clone());
        env.insert("DROVER_PLAIN", "x".to_string());
        let text = env_file_text("t", &env);
        assert_eq!(env_file_value(&text, "DROVER_SECRET"), Some(tricky.clone()));
        assert_eq!(env_file_value(&text, "DROVER_PLAIN"), Some("x".into()));
        assert_eq!(env_file_value(&text, "DROVER"), None);
        // Written again from what was read: the same file (no growth).
        let again = env_file_text("t", &env);
        assert_eq!(text, again);
        assert_eq!(env_file_value("K=bare", "K"), Some("bare".into()));
    }
}
