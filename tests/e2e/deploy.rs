//! `drover-agent deploy` over real ssh to a real sshd on 127.0.0.1 (Debian's
//! openssh-server; `.ci/run` installs it). Skipped with a message where sshd
//! is missing or we are not root, unless DROVER_REQUIRE_SSHD is set.

use crate::harness::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
    known_hosts: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) -> TestResult {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()?
        .success();
    if ok {
        Ok(())
    } else {
        Err("ssh-keygen failed".into())
    }
}

fn start_sshd(dir: &Path) -> TestResult<Option<Sshd>> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !Path::new("/usr/sbin/sshd").exists() || !root {
        if std::env::var_os("DROVER_REQUIRE_SSHD").is_some() {
            return Err(
                "sshd tests need /usr/sbin/sshd (apt-get install openssh-server) and root".into(),
            );
        }
        println!("skipped: needs /usr/sbin/sshd (openssh-server) and root");
        return Ok(None);
    }
    keygen(&dir.join("host_key"))?;
    keygen(&dir.join("client_key"))?;
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
    std::fs::create_dir_all("/run/sshd")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n",
            d = dir.display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("sshd.log"))?;
    let child = Command::new("/usr/sbin/sshd")
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stderr(log)
        .spawn()?;
    wait_for("sshd to listen", Duration::from_secs(10), || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(drop))
    })?;
    let host_pub = std::fs::read_to_string(dir.join("host_key.pub"))?;
    let mut parts = host_pub.split_whitespace();
    let (kind, key) = (
        parts.next().ok_or("no key type")?,
        parts.next().ok_or("no key")?,
    );
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {kind} {key}\n"))?;
    Ok(Some(Sshd {
        child,
        port,
        key: dir.join("client_key"),
        known_hosts,
    }))
}

/// Runs deploy with --json; returns (exit code, the host's JSON outcome).
fn deploy(args: &[String]) -> TestResult<(i32, Value)> {
    let out = Command::new(agent_bin())
        .arg("deploy")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().ok_or(format!(
        "no output: {}",
        String::from_utf8_lossy(&out.stderr)
    ))?;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {stdout}"))?;
    Ok((out.status.code().unwrap_or(-1), v))
}

#[test]
fn deploy_over_ssh_installs_upgrades_and_explains_failures() -> TestResult {
    let dir = tempfile::tempdir()?;
    let Some(sshd) = start_sshd(dir.path())? else {
        return Ok(());
    };
    let coord = Coordinator::start(dir.path(), &["--lease-ttl", "3"])?;
    let api = coord.api();
    let prefix = dir.path().join("target-prefix");
    // A state dir of its own: the remote check must not get --state-dir twice.
    let state_dir = dir.path().join("deployed-state");
    let args = |target: String,
                known_hosts: &Path,
                coordinator: &str,
                secret: &str,
                tags: &str|
     -> Vec<String> {
        [
            target.as_str(),
            "--identity",
            &sshd.key.to_string_lossy(),
            "--ssh-option",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
            "--ssh-option",
            "StrictHostKeyChecking=yes",
            "--prefix",
            &prefix.to_string_lossy(),
            "--no-systemd",
            "--json",
            "--admin-token",
            ADMIN,
            "--coordinator",
            coordinator,
            "--registration-secret",
            secret,
            "--name",
            "deployed",
            "--tags",
            tags,
            "--shutdown-grace",
            "2",
            "--state-dir",
            &state_dir.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let target = format!("root@127.0.0.1:{}", sshd.port);

    // Deploy: installed, registered, waiting for approval (with the command).
    let (code, v) = deploy(&args(
        target.clone(),
        &sshd.known_hosts,
        &coord.url,
        SECRET,
        "x",
    ))?;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["state"], "pending", "{v}");
    assert!(
        v["suggestion"].as_str().unwrap_or("").contains("/approve"),
        "{v}"
    );
    let id = v["worker_id"].as_i64().ok_or("no worker id")?;
    api.admin("POST", &format!("/api/v1/workers/{id}/approve"), None)?;
    let job = api.submit(&json!({"command": ["true"]}))?;
    wait_for(
        "a job on the deployed agent",
        Duration::from_secs(20),
        || Ok((api.job(job)?["status"] == "succeeded").then_some(())),
    )?;

    // Deploy again with new tags: an upgrade in place.
    let (code, v) = deploy(&args(
        target.clone(),
        &sshd.known_hosts,
        &coord.url,
        SECRET,
        "y",
    ))?;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["worker_id"], id, "same worker");
    let w = api.admin("GET", &format!("/api/v1/workers/{id}"), None)?;
    assert_eq!(w.body["tags"], json!(["y"]));
    assert_eq!(api.job(job)?["status"], "succeeded", "nothing lost");

    // Failures: each with the step it stopped at and the fix.
    let empty_known = dir.path().join("empty_known_hosts");
    std::fs::write(&empty_known, "")?;
    let wrong_key = dir.path().join("wrong_key");
    keygen(&wrong_key)?;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let fresh = dir.path().join("fresh-prefix");
    let mut cases: Vec<(&str, Vec<String>, &str, &str)> = Vec::new();
    let mut bad_key = args(target.clone(), &sshd.known_hosts, &coord.url, SECRET, "x");
    bad_key[2] = wrong_key.to_string_lossy().to_string();
    cases.push(("wrong key", bad_key, "connect", "ssh-copy-id"));
    cases.push((
        "closed port",
        args(
            format!("root@127.0.0.1:{closed}"),
            &sshd.known_hosts,
            &coord.url,
            SECRET,
            "x",
        ),
        "connect",
        "USER@HOST:PORT",
    ));
    cases.push((
        "unknown host key",
        args(target.clone(), &empty_known, &coord.url, SECRET, "x"),
        "connect",
        "ssh-keyscan",
    ));
    cases.push((
        "dead coordinator",
        args(
            target.clone(),
            &sshd.known_hosts,
            "http://127.0.0.1:9",
            SECRET,
            "x",
        ),
        "check",
        "DROVER_LISTEN=0.0.0.0:8700",
    ));
    cases.push((
        "wrong secret",
        args(
            target.clone(),
            &sshd.known_hosts,
            &coord.url,
            "wrong-secret",
            "x",
        ),
        "check",
        "DROVER_REGISTRATION_SECRET",
    ));
    for (name, mut a, step, fix) in cases {
        let i = a
            .iter()
            .position(|x| x == "--prefix")
            .ok_or("no --prefix")?;
        a[i + 1] = fresh.to_string_lossy().to_string();
        let (code, v) = deploy(&a)?;
        println!("{name}: {v}");
        assert_ne!(code, 0, "{name}: {v}");
        assert_eq!(v["ok"], false, "{name}: {v}");
        assert_eq!(v["step"], step, "{name}: {v}");
        assert!(
            v["suggestion"].as_str().unwrap_or("").contains(fix),
            "{name}: {v}"
        );
        assert!(
            !fresh.join("bin/drover-agent").exists(),
            "{name}: nothing installed"
        );
    }
    let pid: i32 = std::fs::read_to_string(state_dir.join("agent.pid"))?
        .trim()
        .parse()?;
    // Uninstall finds the state dir (and the running agent) in the env file.
    let out = Command::new(agent_bin())
        .args([
            "uninstall",
            "--prefix",
            &prefix.to_string_lossy(),
            "--no-systemd",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(pid), "uninstall stops the deployed agent");
    Ok(())
}
