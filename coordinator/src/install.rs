//! `drover-coordinator install`: the binary, an env file (0600) with the
//! settings and the generated admin token and registration secret, the unit
//! from `systemd/` pointed at them, then systemd (or a detached process).

use crate::auth;
use crate::config::{Args, Config, DEFAULT_DB};
use drover_host::service::{
    env_file_text, env_file_value, install_self, restart_and_wait, system_user, systemctl,
    systemd_running, write_file, Detached,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const UNIT: &str = include_str!("../../systemd/drover-coordinator.service");

pub fn install(prefix: Option<&Path>, no_systemd: bool, mut args: Args) -> Result<(), String> {
    let root = prefix.unwrap_or(Path::new("/usr/local"));
    let bin = root.join("bin/drover-coordinator");
    // Settings live in /etc (where the unit looks), or under the prefix.
    let env_file = prefix
        .unwrap_or(Path::new("/"))
        .join("etc/drover/coordinator.env");
    // The default database goes under the prefix, when there is one.
    if let (Some(p), true) = (prefix, args.db == Path::new(DEFAULT_DB)) {
        args.db = p.join("var/lib/drover/drover.db");
    }
    if crate::config::store(&args.db).1.is_some() {
        return Err(
            "install sets up a coordinator on an SQLite file: install with the \
             default --db, then put DROVER_DB=postgres://... in the env file \
             (README, \"Growing past one machine\")"
                .into(),
        );
    }
    keep_or_make_secrets(&mut args, &env_file)?;
    let config = Config::from_args(args.clone())?;
    let systemd = !no_systemd;
    if systemd && prefix.is_none() && !systemd_running() {
        return Err(
            "systemd is not running on this machine: run install again with --no-systemd".into(),
        );
    }
    let env = settings(&args, &config);
    let db_dir = config
        .db
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let detached = Detached {
        bin: bin.clone(),
        dir: db_dir.clone(),
        stem: "coordinator",
    };
    if !systemd {
        detached.stop(Duration::from_secs(15));
    }
    install_self(&bin)?;
    say!("✓ binary      {}", bin.display());
    write_file(
        &env_file,
        env_file_text("drover-coordinator", &env).as_bytes(),
        0o600,
    )?;
    say!(
        "✓ settings    {} (0600: holds the admin token and the registration secret)",
        env_file.display()
    );
    // A staged install (a prefix, for systemd) touches nothing outside it.
    let staged = systemd && prefix.is_some();
    if !staged {
        std::fs::create_dir_all(&db_dir)
            .map_err(|e| format!("creating {}: {e}", db_dir.display()))?;
    }
    if systemd {
        install_unit(prefix, &bin, &env_file, &config.db, staged)?;
    } else {
        let pid = detached.start(&env)?;
        say!(
            "✓ running     pid {pid} (no systemd), log {}",
            detached.log_file().display()
        );
    }
    say_next_steps(&config, &env_file);
    Ok(())
}

/// Keeps the admin token and the registration secret of an earlier install
/// unless new ones are given; makes them on a first install.
fn keep_or_make_secrets(args: &mut Args, env_file: &Path) -> Result<(), String> {
    let earlier = std::fs::read_to_string(env_file).unwrap_or_default();
    let earlier_value = |key: &str| env_file_value(&earlier, key);
    if args.admin_token.is_none() && args.admin_token_file.is_none() {
        args.admin_token = Some(match earlier_value("DROVER_ADMIN_TOKEN") {
            Some(t) => t,
            None => auth::new_token("drv_admin_").map_err(|e| e.to_string())?,
        });
    }
    if args.registration_secret.is_none() {
        args.registration_secret = Some(match earlier_value("DROVER_REGISTRATION_SECRET") {
            Some(s) => s,
            None => auth::new_token("drv_reg_").map_err(|e| e.to_string())?,
        });
    }
    Ok(())
}

/// Writes the unit and, unless staged under a prefix, enables and
/// (re)starts it.
fn install_unit(
    prefix: Option<&Path>,
    bin: &Path,
    env_file: &Path,
    db: &Path,
    staged: bool,
) -> Result<(), String> {
    let unit = match prefix {
        Some(p) => p.join("etc/systemd/system/drover-coordinator.service"),
        None => PathBuf::from("/etc/systemd/system/drover-coordinator.service"),
    };
    let own = own_state_dir(prefix, db);
    let text = unit_text(bin, env_file, db, own)?;
    if !staged && !own {
        let db_dir = db.parent().unwrap_or(Path::new("."));
        prepare_service_user(db_dir)?;
    }
    write_file(&unit, text.as_bytes(), 0o644)?;
    say!("✓ unit        {}", unit.display());
    if prefix.is_some() {
        say!("  staged under a prefix: systemd is not told; link the unit into /etc/systemd/system to use it");
        return Ok(());
    }
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", "drover-coordinator"])?;
    let status = restart_and_wait("drover-coordinator")?;
    say!("✓ service     drover-coordinator enabled and ready: {status}; logs: journalctl -u drover-coordinator");
    Ok(())
}

/// Where the dashboard is and how to add workers. The secrets stay in the
/// env file: the commands read them from there, never from this output.
fn say_next_steps(config: &Config, env_file: &Path) {
    let port = config.listen.port();
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    if config.listen.ip().is_loopback() {
        say!(
            "! it listens on {}: only this machine can reach it. For a fleet, install with --listen 0.0.0.0:{port}",
            config.listen
        );
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "THIS-HOST".into());
    let env = env_file.display();
    say!("\nDashboard: {scheme}://{host}:{port}/#token=<DROVER_ADMIN_TOKEN from {env}>");
    say!("Next, add workers (from a machine with SSH access to them):");
    let read = |key: &str| format!("\"$(sudo sed -n 's/^{key}=\"\\(.*\\)\"/\\1/p' {env})\"");
    say!(
        "  export DROVER_REGISTRATION_SECRET={}",
        read("DROVER_REGISTRATION_SECRET")
    );
    say!(
        "  drover-agent deploy root@WORKER --coordinator {scheme}://{host}:{port} --admin-token {}",
        read("DROVER_ADMIN_TOKEN")
    );
}

/// The env file's settings: every flag given to install applies to the
/// service too.
fn settings(args: &Args, config: &Config) -> BTreeMap<&'static str, String> {
    let mut env: BTreeMap<&'static str, String> = BTreeMap::new();
    env.insert("DROVER_LISTEN", config.listen.to_string());
    env.insert("DROVER_DB", config.db.display().to_string());
    env.insert("DROVER_LEASE_TTL", config.lease_ttl.as_secs().to_string());
    if let Some(g) = args.restart_grace {
        env.insert("DROVER_RESTART_GRACE", g.to_string());
    }
    for (key, value) in [
        ("DROVER_RETRY_BACKOFF", args.retry_backoff.to_string()),
        ("DROVER_RESERVE_AFTER", args.reserve_after.to_string()),
        ("DROVER_MAX_CONNECTIONS", args.max_connections.to_string()),
        ("DROVER_LOG_CAP", args.log_cap.to_string()),
        ("DROVER_RETENTION_DAYS", args.retention_days.to_string()),
        (
            "DROVER_GPU_HISTORY_HOURS",
            args.gpu_history_hours.to_string(),
        ),
        ("DROVER_SQLITE_SYNCHRONOUS", args.sqlite_synchronous.clone()),
    ] {
        env.insert(key, value);
    }
    if let Some(t) = &args.admin_token {
        env.insert("DROVER_ADMIN_TOKEN", t.clone());
    }
    if let Some(f) = &args.admin_token_file {
        env.insert("DROVER_ADMIN_TOKEN_FILE", f.display().to_string());
    }
    if let Some(s) = &args.registration_secret {
        env.insert("DROVER_REGISTRATION_SECRET", s.clone());
    }
    if config.auto_approve {
        env.insert("DROVER_AUTO_APPROVE", "true".into());
    }
    if let Some((cert, key)) = &config.tls {
        env.insert("DROVER_TLS_CERT", cert.display().to_string());
        env.insert("DROVER_TLS_KEY", key.display().to_string());
    }
    env
}

/// Whether the database lives in the unit's own StateDirectory (under the
/// prefix, when staged), which systemd makes writable for the unit's
/// dynamic user.
fn own_state_dir(prefix: Option<&Path>, db: &Path) -> bool {
    let state = prefix.unwrap_or(Path::new("/")).join("var/lib/drover");
    db.parent() == Some(state.as_path())
}

/// The unit for these paths. A database elsewhere than /var/lib/drover
/// needs that directory writable under ProtectSystem=strict
/// (ReadWritePaths=) and a fixed user that can own it (a dynamic user's
/// uid changes).
fn unit_text(bin: &Path, env_file: &Path, db: &Path, own: bool) -> Result<String, String> {
    let mut text = UNIT
        .replace(
            "/usr/local/bin/drover-coordinator",
            &bin.display().to_string(),
        )
        .replace(
            "/etc/drover/coordinator.env",
            &env_file.display().to_string(),
        )
        .replace(
            &format!("Environment=DROVER_DB={DEFAULT_DB}"),
            &format!("Environment=DROVER_DB={}", db.display()),
        );
    if !own {
        let dir = db.parent().filter(|d| d.is_absolute()).ok_or_else(|| {
            format!(
                "--db {}: give an absolute path for a systemd install",
                db.display()
            )
        })?;
        if dir.to_string_lossy().contains(char::is_whitespace) {
            return Err(format!(
                "--db {}: a path with spaces cannot go into the unit",
                db.display()
            ));
        }
        text = text.replace(
            "DynamicUser=yes",
            &format!(
                "User={SERVICE_USER}\nGroup={SERVICE_USER}\nReadWritePaths={}",
                dir.display()
            ),
        );
    }
    Ok(text)
}

/// The system user a coordinator with its database outside
/// /var/lib/drover runs as.
const SERVICE_USER: &str = "drover";

/// Creates the service user (when missing) and gives it the database's
/// directory.
fn prepare_service_user(dir: &Path) -> Result<(), String> {
    let home = dir.display().to_string();
    if system_user(SERVICE_USER, &home, &[])? {
        say!("✓ user        {SERVICE_USER} (system user: owns {home})");
    }
    let owner = format!("{SERVICE_USER}:{SERVICE_USER}");
    let chowned = std::process::Command::new("chown")
        .args(["-R", &owner, &home])
        .status()
        .map_err(|e| format!("running chown: {e}"))?;
    if !chowned.success() {
        return Err(format!("chown {owner} {home} failed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_outside_the_state_dir_gets_a_writable_path_and_a_fixed_user() {
        let (bin, env) = (
            Path::new("/usr/local/bin/drover-coordinator"),
            Path::new("/etc/drover/coordinator.env"),
        );
        let unit = |db: &str| {
            let db = Path::new(db);
            unit_text(bin, env, db, own_state_dir(None, db))
        };
        let default = unit(DEFAULT_DB).unwrap();
        assert!(default.contains("DynamicUser=yes") && !default.contains("ReadWritePaths"));
        assert!(own_state_dir(
            Some(Path::new("/p")),
            Path::new("/p/var/lib/drover/drover.db")
        ));
        let srv = unit("/srv/drover/drover.db").unwrap();
        assert!(srv.contains("ReadWritePaths=/srv/drover\n"), "{srv}");
        assert!(srv.contains("User=drover\n") && !srv.contains("DynamicUser=yes"));
        assert!(srv.contains("Environment=DROVER_DB=/srv/drover/drover.db"));
        assert!(unit("rel/drover.db").is_err());
    }
}
