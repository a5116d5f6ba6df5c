//! `install`, `uninstall` and `check`: putting the agent on a machine.
//!
//! The unit is the one in `systemd/` (embedded), with its paths rewritten for
//! the chosen prefix: one source for the units.

use crate::config::{Args, Config};
use crate::inventory::GpuSource;
use drover_host::service::{
    env_file_text, env_file_value, install_self, restart_and_wait, system_user, systemctl,
    systemd_running, write_file, Detached,
};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const UNIT: &str = include_str!("../../../systemd/drover-agent.service");
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
            // Settings live in /etc (where the unit looks), or under the prefix.
            env_file: prefix
                .unwrap_or(Path::new("/"))
                .join("etc/drover/agent.env"),
            unit: match prefix {
                Some(p) => p.join("etc/systemd/system/drover-agent.service"),
                None => PathBuf::from("/etc/systemd/system/drover-agent.service"),
            },
            state_dir,
            systemd: !no_systemd,
            staged: prefix.is_some(),
        }
    }

    fn detached(&self) -> Detached {
        Detached {
            bin: self.bin.clone(),
            dir: self.state_dir.clone(),
            stem: "agent",
        }
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
        layout.detached().stop(patience);
    }
    install_self(&layout.bin)?;
    say!("✓ binary      {}", layout.bin.display());
    write_file(
        &layout.env_file,
        env_file_text("drover-agent", &env).as_bytes(),
        0o600,
    )?;
    say!("✓ settings    {} (0600)", layout.env_file.display());
    if !layout.staged && rustix::process::geteuid().is_root() {
        // GPUs are reached through the video and render groups.
        system_user(
            crate::jobuser::DEFAULT,
            "/nonexistent",
            &["video", "render"],
        )?;
        say!(
            "✓ job user    {} (jobs run as this user, never as root)",
            crate::jobuser::DEFAULT
        );
    }
    std::fs::create_dir_all(&layout.state_dir)
        .and_then(|_| {
            std::fs::set_permissions(&layout.state_dir, std::fs::Permissions::from_mode(0o711))
        })
        .map_err(|e| format!("creating the state dir {}: {e}", layout.state_dir.display()))?;
    say!("✓ state dir   {}", layout.state_dir.display());
    if layout.systemd {
        write_file(&layout.unit, unit_text(&layout).as_bytes(), 0o644)?;
        say!("✓ unit        {}", layout.unit.display());
        if layout.staged {
            say!("  staged under a prefix: systemd is not told; link the unit into /etc/systemd/system to use it");
            return Ok(());
        }
        systemctl(&["daemon-reload"])?;
        systemctl(&["enable", "drover-agent"])?;
        // restart = graceful stop (jobs handed back) + start on the new binary.
        let status = restart_and_wait("drover-agent")?;
        say!("✓ service     drover-agent enabled and ready: {status}; logs: journalctl -u drover-agent");
    } else {
        let d = layout.detached();
        let pid = d.start(&env)?;
        say!(
            "✓ running     pid {pid} (no systemd), log {}",
            d.log_file().display()
        );
    }
    Ok(())
}

/// `drover-agent uninstall`.
pub fn uninstall(
    prefix: Option<&Path>,
    no_systemd: bool,
    purge: bool,
    state_dir: Option<&Path>,
) -> Result<(), String> {
    let installed = Layout::new(prefix, Path::new(DEFAULT_STATE_DIR), no_systemd);
    // The state dir install wrote into the env file, unless one is given.
    let written = std::fs::read_to_string(&installed.env_file)
        .ok()
        .and_then(|text| env_file_value(&text, "DROVER_STATE_DIR"))
        .map(PathBuf::from);
    let state_dir = state_dir
        .map(Path::to_path_buf)
        .or(written)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let layout = Layout::new(prefix, &state_dir, no_systemd);
    if layout.systemd && !layout.staged && systemd_running() && layout.unit.exists() {
        systemctl(&["disable", "--now", "drover-agent"])?;
        say!("✓ service stopped and disabled");
    }
    // The longest a detached agent with default graces takes to stop.
    layout.detached().stop(Duration::from_secs(75));
    for path in [&layout.unit, &layout.env_file, &layout.bin] {
        match std::fs::remove_file(path) {
            Ok(()) => say!("✓ removed     {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", path.display())),
        }
    }
    if layout.systemd && !layout.staged && systemd_running() {
        let _ = systemctl(&["daemon-reload"]);
    }
    if purge {
        match std::fs::remove_dir_all(&layout.state_dir) {
            Ok(()) => say!("✓ removed     {} (state)", layout.state_dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", layout.state_dir.display())),
        }
    } else {
        say!(
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
        say!("{mark} {}", c.what);
        if let Some(s) = &c.suggestion {
            say!("    → {s}");
        }
        ready &= c.ok || !c.required;
    }
    Ok(ready)
}

fn libc_version() -> String {
    // ldd --version's first line ends with the version of the C library
    // it belongs to (the one programs here run with).
    let out = std::process::Command::new("ldd")
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    match text
        .as_deref()
        .ok()
        .and_then(|t| t.lines().next()?.split_whitespace().last())
    {
        Some(v) => format!("glibc {v}"),
        None => "glibc (version unknown: ldd --version failed)".to_string(),
    }
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
    fn the_unit_does_not_restart_an_agent_refused_for_good() {
        let line = UNIT
            .lines()
            .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
            .unwrap_or("");
        let codes: Vec<i32> = line
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect();
        for code in [crate::EXIT_REFUSED, crate::EXIT_REVOKED] {
            assert!(codes.contains(&code), "exit {code} restarts: {line:?}");
        }
    }

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
        assert_eq!(plain.env_file, Path::new("/etc/drover/agent.env"));
    }

    #[test]
    fn env_file_quotes_values() {
        let mut env = BTreeMap::new();
        env.insert("DROVER_NAME", "a \"b\" \\c".to_string());
        let text = env_file_text("drover-agent", &env);
        assert!(text.contains(r#"DROVER_NAME="a \"b\" \\c""#), "{text}");
    }
}
