//! `install`, `uninstall` and `check`: putting the agent on a machine.
//!
//! The unit is the one in `systemd/` (embedded), with its paths rewritten for
//! the chosen prefix: one source for the units.

use crate::config::{Args, Config};
use crate::inventory::GpuSource;
use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UNIT: &str = include_str!("../../systemd/drover-agent.service");
const DEFAULT_STATE_DIR: &str = "/var/lib/drover-agent";

/// Where an install puts things.
#[derive(Debug, Clone)]
pub struct Layout {
    pub bin: PathBuf,
    pub env_file: PathBuf,
    pub unit: PathBuf,
    pub state_dir: PathBuf,
    /// systemd manages the agent (else: detached, pid file).
    pub systemd: bool,
    /// A prefix was given: a staged install systemd does not see.
    pub staged: bool,
}

impl Layout {
    pub fn new(prefix: Option<&Path>, state_dir: &Path, no_systemd: bool) -> Layout {
        let root = prefix.unwrap_or(Path::new("/usr/local"));
        let state_dir = match prefix {
            Some(p) if state_dir == Path::new(DEFAULT_STATE_DIR) => p.join("var/lib/drover-agent"),
            _ => state_dir.to_path_buf(),
        };
        Layout {
            bin: root.join("bin/drover-agent"),
            env_file: root.join("etc/drover/agent.env"),
            unit: match prefix {
                Some(p) => p.join("etc/systemd/system/drover-agent.service"),
                None => PathBuf::from("/etc/systemd/system/drover-agent.service"),
            },
            state_dir,
            systemd: !no_systemd,
            staged: prefix.is_some(),
        }
    }

    fn pid_file(&self) -> PathBuf {
        self.state_dir.join("agent.pid")
    }

    fn log_file(&self) -> PathBuf {
        self.state_dir.join("agent.log")
    }
}

/// The settings an install writes to the env file (and gives a detached agent).
fn settings(args: &Args, layout: &Layout) -> BTreeMap<&'static str, String> {
    let mut env = BTreeMap::new();
    env.insert("DROVER_COORDINATOR", args.coordinator.clone());
    env.insert("DROVER_STATE_DIR", layout.state_dir.display().to_string());
    let optional = [
        (
            "DROVER_REGISTRATION_SECRET",
            args.registration_secret.clone(),
        ),
        ("DROVER_TOKEN", args.token.clone()),
        ("DROVER_NAME", args.name.clone()),
        ("DROVER_SLOTS", args.slots.map(|s| s.to_string())),
        ("DROVER_FAKE_GPUS", args.fake_gpus.clone()),
        (
            "DROVER_CA_CERT",
            args.ca_cert.as_ref().map(|p| p.display().to_string()),
        ),
        (
            "DROVER_TAGS",
            (!args.tags.is_empty()).then(|| args.tags.join(",")),
        ),
    ];
    for (k, v) in optional {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            env.insert(k, v);
        }
    }
    env.insert("DROVER_KILL_GRACE", args.kill_grace.to_string());
    env.insert("DROVER_SHUTDOWN_GRACE", args.shutdown_grace.to_string());
    env
}

/// One `KEY="value"` line per setting, quoted for systemd's EnvironmentFile.
fn env_file_text(env: &BTreeMap<&'static str, String>) -> String {
    let mut out =
        String::from("# Written by `drover-agent install`; run it again to change these.\n");
    for (k, v) in env {
        let v = v.replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str(&format!("{k}=\"{v}\"\n"));
    }
    out
}

/// The unit from `systemd/`, pointed at this layout.
pub fn unit_text(layout: &Layout) -> String {
    UNIT.replace(
        "/usr/local/bin/drover-agent",
        &layout.bin.display().to_string(),
    )
    .replace(
        "/etc/drover/agent.env",
        &layout.env_file.display().to_string(),
    )
    .replace(
        &format!("Environment=DROVER_STATE_DIR={DEFAULT_STATE_DIR}"),
        &format!(
            "Environment=DROVER_STATE_DIR={}",
            layout.state_dir.display()
        ),
    )
}

fn write_file(path: &Path, text: &[u8], mode: u32) -> Result<(), String> {
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

/// Is systemd the init system here?
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> Result<(), String> {
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

/// The pid in the pid file, if that process is a live drover-agent.
fn running_pid(layout: &Layout) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(layout.pid_file())
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
    (String::from_utf8_lossy(&cmdline).contains("drover-agent") && !zombie).then_some(pid)
}

/// Stops a detached agent gracefully (it hands its jobs back), waiting up to
/// `patience`, then kills it.
fn stop_detached(layout: &Layout, patience: Duration) {
    let Some(pid) = running_pid(layout) else {
        return;
    };
    println!("stopping the running agent (pid {pid}); it hands its jobs back");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let start = Instant::now();
    while running_pid(layout).is_some() && start.elapsed() < patience {
        std::thread::sleep(Duration::from_millis(100));
    }
    if running_pid(layout).is_some() {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let _ = std::fs::remove_file(layout.pid_file());
}

fn start_detached(layout: &Layout, env: &BTreeMap<&'static str, String>) -> Result<u32, String> {
    std::fs::create_dir_all(&layout.state_dir)
        .map_err(|e| format!("creating the state dir {}: {e}", layout.state_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(layout.log_file())
        .map_err(|e| format!("opening {}: {e}", layout.log_file().display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&layout.bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DROVER_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: setsid is async-signal-safe; nothing else runs before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", layout.bin.display()))?;
    let pid = child.id();
    write_file(&layout.pid_file(), format!("{pid}\n").as_bytes(), 0o600)?;
    // A moment to fail at start (wrong flags, refused secret) and say why.
    std::thread::sleep(Duration::from_millis(700));
    if let Ok(Some(status)) = child.try_wait() {
        let tail = std::fs::read_to_string(layout.log_file()).unwrap_or_default();
        let last: Vec<&str> = tail.lines().rev().take(3).collect();
        return Err(format!(
            "the agent exited at once ({status}): {}",
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(pid)
}

/// `drover-agent install`.
pub fn install(prefix: Option<&Path>, no_systemd: bool, args: Args) -> Result<(), String> {
    // Same validation as running: fail here, not in the service.
    Config::from_args(args.clone())?;
    let layout = Layout::new(prefix, &args.state_dir, no_systemd);
    if layout.systemd && !layout.staged && !systemd_running() {
        return Err(
            "systemd is not running on this machine (a container without it?): run install again with --no-systemd"
                .into(),
        );
    }
    let env = settings(&args, &layout);
    let patience = Duration::from_secs(args.shutdown_grace + args.kill_grace + 5);
    if !layout.systemd {
        stop_detached(&layout, patience);
    }
    let me = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    let same = std::fs::canonicalize(&me).ok() == std::fs::canonicalize(&layout.bin).ok();
    if !same {
        let bytes = std::fs::read(&me).map_err(|e| format!("reading {}: {e}", me.display()))?;
        write_file(&layout.bin, &bytes, 0o755)?;
    }
    println!("✓ binary      {}", layout.bin.display());
    write_file(&layout.env_file, env_file_text(&env).as_bytes(), 0o600)?;
    println!("✓ settings    {} (0600)", layout.env_file.display());
    std::fs::create_dir_all(&layout.state_dir)
        .and_then(|_| {
            std::fs::set_permissions(&layout.state_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| format!("creating the state dir {}: {e}", layout.state_dir.display()))?;
    println!("✓ state dir   {}", layout.state_dir.display());
    if layout.systemd {
        write_file(&layout.unit, unit_text(&layout).as_bytes(), 0o644)?;
        println!("✓ unit        {}", layout.unit.display());
        if layout.staged {
            println!("  staged under a prefix: systemd is not told; link the unit into /etc/systemd/system to use it");
            return Ok(());
        }
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", "drover-agent"])?;
        // restart = graceful stop (jobs handed back) + start on the new binary.
        systemctl(&["restart", "drover-agent"])?;
        println!(
            "✓ service     drover-agent enabled and (re)started; logs: journalctl -u drover-agent"
        );
    } else {
        let pid = start_detached(&layout, &env)?;
        println!(
            "✓ running     pid {pid} (no systemd), log {}",
            layout.log_file().display()
        );
    }
    Ok(())
}

/// `drover-agent uninstall`.
pub fn uninstall(
    prefix: Option<&Path>,
    no_systemd: bool,
    purge: bool,
    args: &Args,
) -> Result<(), String> {
    let layout = Layout::new(prefix, &args.state_dir, no_systemd);
    if layout.systemd && !layout.staged && systemd_running() && layout.unit.exists() {
        systemctl(&["disable", "--now", "drover-agent"])?;
        println!("✓ service stopped and disabled");
    }
    stop_detached(
        &layout,
        Duration::from_secs(args.shutdown_grace + args.kill_grace + 5),
    );
    for path in [&layout.unit, &layout.env_file, &layout.bin] {
        match std::fs::remove_file(path) {
            Ok(()) => println!("✓ removed     {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", path.display())),
        }
    }
    if layout.systemd && !layout.staged && systemd_running() {
        let _ = systemctl(&["daemon-reload"]);
    }
    if purge {
        match std::fs::remove_dir_all(&layout.state_dir) {
            Ok(()) => println!("✓ removed     {} (state)", layout.state_dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", layout.state_dir.display())),
        }
    } else {
        println!(
            "  kept        {} (token, spool); --purge removes it",
            layout.state_dir.display()
        );
    }
    Ok(())
}

/// One preflight result.
pub struct Check {
    pub ok: bool,
    /// Needed to run (a failure makes `check` exit non-zero).
    pub required: bool,
    pub what: String,
    pub suggestion: Option<String>,
}

fn line(ok: bool, required: bool, what: String, suggestion: Option<String>) -> Check {
    Check {
        ok,
        required,
        what,
        suggestion,
    }
}

/// `drover-agent check`: prints one line per check; Ok(true) when all needed pass.
pub fn check(args: Args) -> Result<bool, String> {
    let config = Config::from_args(args)?;
    let mut checks = Vec::new();
    checks.push(match crate::state::StateDir::open(&config.state_dir) {
        Ok(s) => line(
            true,
            true,
            format!("state dir {} is writable", s.root().display()),
            None,
        ),
        Err(e) => line(false, true, "state dir".into(), Some(e)),
    });
    checks.extend(coordinator_checks(&config));
    checks.push(gpu_check(&config));
    checks.push(if systemd_running() {
        line(true, false, "systemd is running".into(), None)
    } else {
        line(
            false,
            false,
            "systemd is not running here".into(),
            Some(crate::suggest::NO_SYSTEMD.to_string()),
        )
    });
    checks.push(line(
        true,
        false,
        format!(
            "{} {}, {}",
            std::env::consts::OS,
            std::env::consts::ARCH,
            libc_version()
        ),
        None,
    ));
    let mut ready = true;
    for c in &checks {
        let mark = if c.ok {
            "✓"
        } else if c.required {
            "✗"
        } else {
            "!"
        };
        println!("{mark} {}", c.what);
        if let Some(s) = &c.suggestion {
            println!("    → {s}");
        }
        ready &= c.ok || !c.required;
    }
    Ok(ready)
}

fn libc_version() -> String {
    // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    format!("glibc {}", v.to_string_lossy())
}

fn coordinator_checks(config: &Config) -> Vec<Check> {
    let base = &config.coordinator;
    let client = match crate::client::Client::new(base, config.ca_cert.as_deref()) {
        Ok(c) => c,
        Err(e) => return vec![line(false, true, "TLS settings".into(), Some(e))],
    };
    let sent = crate::now_ms();
    let health = client.health();
    let received = crate::now_ms();
    let mut out = Vec::new();
    match health {
        Ok(h) => {
            out.push(line(
                true,
                true,
                format!("coordinator {base} is reachable ({} ms)", received - sent),
                None,
            ));
            let skew = (sent + received) / 2 - h.time_ms;
            out.push(if h.time_ms <= 0 || skew.abs() <= 5_000 {
                line(
                    true,
                    false,
                    format!(
                        "clock within {:.1} s of the coordinator's",
                        skew.abs() as f64 / 1000.0
                    ),
                    None,
                )
            } else {
                line(
                    false,
                    false,
                    format!(
                        "clock {:.1} s off the coordinator's",
                        skew.abs() as f64 / 1000.0
                    ),
                    Some("enable time sync: timedatectl set-ntp true (or install chrony)".into()),
                )
            });
        }
        Err(e) => {
            let suggestion = crate::suggest::suggest(&e.to_string())
                .map(str::to_string)
                .or_else(|| e.hint());
            out.push(line(
                false,
                true,
                format!("coordinator {base} is not reachable: {e}"),
                suggestion,
            ));
            return out;
        }
    }
    match (&config.registration_secret, &config.token) {
        (Some(secret), _) => out.push(match client.probe_secret(secret) {
            Ok(()) => line(true, true, "registration secret accepted".into(), None),
            Err(e) => line(
                false,
                true,
                format!("registration secret refused: {e}"),
                crate::suggest::suggest(&e.to_string()).map(str::to_string),
            ),
        }),
        (None, Some(_)) => out.push(line(true, false, "a worker token is given (not checked)".into(), None)),
        (None, None) => out.push(line(
            false,
            true,
            "no registration secret and no token".into(),
            Some("pass --registration-secret (DROVER_REGISTRATION_SECRET) with the coordinator's secret".into()),
        )),
    }
    out
}

fn gpu_check(config: &Config) -> Check {
    let devices = Path::new("/dev/nvidiactl").exists();
    match GpuSource::probe(config.fake_gpus.clone()) {
        Ok(GpuSource::None) if devices => line(
            false,
            false,
            "/dev/nvidiactl exists but NVML sees no GPU".into(),
            Some(crate::suggest::NVML.to_string()),
        ),
        Ok(GpuSource::None) => line(true, false, "no NVIDIA GPU: a CPU worker".into(), None),
        Ok(src) => {
            let gpus = src.gpus();
            let models: Vec<String> = gpus
                .iter()
                .map(|g| format!("{} {} MiB", g.model, g.vram_mb))
                .collect();
            line(
                true,
                false,
                format!("{} GPU(s): {}", gpus.len(), models.join(", ")),
                None,
            )
        }
        Err(e) if devices => line(
            false,
            false,
            format!("NVML: {e}"),
            Some(crate::suggest::NVML.to_string()),
        ),
        Err(e) => line(
            true,
            false,
            format!("no NVIDIA GPU: a CPU worker (NVML: {e})"),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_rewritten_for_a_prefix() {
        let l = Layout::new(
            Some(Path::new("/opt/d")),
            Path::new(DEFAULT_STATE_DIR),
            false,
        );
        let u = unit_text(&l);
        assert!(u.contains("ExecStart=/opt/d/bin/drover-agent"), "{u}");
        assert!(
            u.contains("EnvironmentFile=/opt/d/etc/drover/agent.env"),
            "{u}"
        );
        assert!(
            u.contains("Environment=DROVER_STATE_DIR=/opt/d/var/lib/drover-agent"),
            "{u}"
        );
        assert!(u.contains("KillMode=mixed"));
        let plain = Layout::new(None, Path::new(DEFAULT_STATE_DIR), false);
        assert_eq!(
            plain.unit,
            Path::new("/etc/systemd/system/drover-agent.service")
        );
        assert_eq!(plain.env_file, Path::new("/usr/local/etc/drover/agent.env"));
    }

    #[test]
    fn env_file_quotes_values() {
        let mut env = BTreeMap::new();
        env.insert("DROVER_NAME", "a \"b\" \\c".to_string());
        let text = env_file_text(&env);
        assert!(text.contains(r#"DROVER_NAME="a \"b\" \\c""#), "{text}");
    }
}
