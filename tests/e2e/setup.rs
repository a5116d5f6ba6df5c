//! `drover-agent check`, `install` and `uninstall` on this machine, with a
//! prefix (no root paths touched).

use crate::harness::*;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

fn agent_cmd(args: &[&str]) -> TestResult<(i32, String)> {
    let out = Command::new(agent_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

#[test]
fn check_says_what_is_ready_and_what_to_fix() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let state = dir.path().join("state").to_string_lossy().to_string();
    let (code, out) = agent_cmd(&[
        "check",
        "--coordinator",
        &coord.url,
        "--registration-secret",
        SECRET,
        "--state-dir",
        &state,
    ])?;
    assert_eq!(code, 0, "{out}");
    for want in [
        "✓ state dir",
        "✓ coordinator",
        "✓ clock within",
        "✓ registration secret accepted",
        "GPU",
        "x86_64",
    ] {
        assert!(
            out.contains(want) || (want == "x86_64" && out.contains(std::env::consts::ARCH)),
            "{want}: {out}"
        );
    }
    let (code, out) = agent_cmd(&[
        "check",
        "--coordinator",
        &coord.url,
        "--registration-secret",
        "wrong-secret",
        "--state-dir",
        &state,
    ])?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("✗ registration secret refused"), "{out}");
    assert!(
        out.contains("→ the registration secret does not match"),
        "{out}"
    );
    let (code, out) = agent_cmd(&[
        "check",
        "--coordinator",
        "http://127.0.0.1:9",
        "--registration-secret",
        SECRET,
        "--state-dir",
        &state,
    ])?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("✗ coordinator http://127.0.0.1:9 is not reachable"),
        "{out}"
    );
    assert!(
        out.contains("DROVER_LISTEN=0.0.0.0:8700"),
        "names the line to change: {out}"
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x")?;
    let bad_state = file.join("state").to_string_lossy().to_string();
    let (code, out) = agent_cmd(&[
        "check",
        "--coordinator",
        &coord.url,
        "--registration-secret",
        SECRET,
        "--state-dir",
        &bad_state,
    ])?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("✗ state dir") && out.contains("--state-dir"),
        "{out}"
    );
    Ok(())
}

#[test]
fn install_upgrade_and_uninstall_without_systemd() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve", "--lease-ttl", "3"])?;
    let api = coord.api();
    let prefix = dir.path().join("prefix");
    let p = prefix.to_string_lossy().to_string();
    let flags = |tags: &str| -> Vec<String> {
        [
            "install",
            "--prefix",
            &p,
            "--no-systemd",
            "--coordinator",
            &coord.url,
            "--registration-secret",
            SECRET,
            "--name",
            "installed",
            "--tags",
            tags,
            "--shutdown-grace",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = flags("a,b");
    let (code, out) = agent_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_eq!(code, 0, "{out}");
    let env = prefix.join("etc/drover/agent.env");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&env)?.permissions().mode() & 0o777,
        0o600,
        "the env file holds the secret"
    );
    let worker = wait_for(
        "the installed agent to register",
        Duration::from_secs(20),
        || {
            let w = api.admin("GET", "/api/v1/workers", None)?;
            Ok(w.body["workers"]
                .as_array()
                .and_then(|a| a.first().cloned()))
        },
    )?;
    assert_eq!(worker["tags"], json!(["a", "b"]));
    let id = worker["id"].as_i64().ok_or("no id")?;
    let job = api.submit(&json!({"command": ["true"]}))?;
    wait_for(
        "a job on the installed agent",
        Duration::from_secs(20),
        || Ok((api.job(job)?["status"] == "succeeded").then_some(())),
    )?;

    // Again with new tags: an upgrade in place, same worker.
    let args = flags("a,c");
    let (code, out) = agent_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("stopping the running agent"), "{out}");
    wait_for("the new tags", Duration::from_secs(20), || {
        let w = api.admin("GET", &format!("/api/v1/workers/{id}"), None)?;
        Ok((w.body["tags"] == json!(["a", "c"])).then_some(()))
    })?;
    let all = api.admin("GET", "/api/v1/workers", None)?;
    assert_eq!(
        all.body["workers"].as_array().map(|a| a.len()),
        Some(1),
        "same worker, not a new one"
    );

    let pid: i32 = std::fs::read_to_string(prefix.join("var/lib/drover-agent/agent.pid"))?
        .trim()
        .parse()?;
    let (code, out) = agent_cmd(&["uninstall", "--prefix", &p, "--no-systemd"])?;
    assert_eq!(code, 0, "{out}");
    assert!(!prefix.join("bin/drover-agent").exists() && !env.exists());
    assert!(
        prefix.join("var/lib/drover-agent/identity.json").exists(),
        "the state dir is kept"
    );
    // SAFETY: kill(pid, 0) only probes.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z");
    assert!(!alive, "the agent is stopped");
    Ok(())
}

#[test]
fn installed_units_pass_systemd_analyze() -> TestResult {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("skipped: systemd-analyze is not installed");
        return Ok(());
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir()?;
    let prefix = dir.path().join("p");
    let p = prefix.to_string_lossy().to_string();
    // With a prefix and without --no-systemd the install is staged: files
    // only, systemd is not touched.
    let (code, text) = agent_cmd(&[
        "install",
        "--prefix",
        &p,
        "--coordinator",
        "http://127.0.0.1:9",
        "--registration-secret",
        SECRET,
    ])?;
    assert_eq!(code, 0, "{text}");
    let out = Command::new(coordinator_bin())
        .args(["install", "--prefix", &p, "--registration-secret", SECRET])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = prefix.join("etc/systemd/system/drover-agent.service");
    let coordinator_unit = prefix.join("etc/systemd/system/drover-coordinator.service");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .arg(&coordinator_unit)
        .output()?;
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // S8: the coordinator's sandbox scores <= 3.0, the agent's <= 4.5 (it
    // starts jobs as another user and keeps the capabilities for that;
    // decision 0040).
    let exposure = |unit: &std::path::Path| -> TestResult<f64> {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(unit)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .ok_or(format!("no exposure level in: {text}"))?;
        let score = line
            .rsplit(':')
            .next()
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or(format!("cannot read {line:?}"))?;
        Ok(score)
    };
    // A database elsewhere: the staged install creates nothing outside its
    // prefix, and the unit may write the database's directory.
    let elsewhere = dir.path().join("not-created").join("drover.db");
    let staged = dir.path().join("q");
    let out = Command::new(coordinator_bin())
        .arg("install")
        .arg("--prefix")
        .arg(&staged)
        .arg("--db")
        .arg(&elsewhere)
        .args(["--registration-secret", SECRET])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("not-created").exists(),
        "a staged install made a dir outside its prefix"
    );
    let text =
        std::fs::read_to_string(staged.join("etc/systemd/system/drover-coordinator.service"))?;
    assert!(
        text.contains(&format!(
            "ReadWritePaths={}",
            dir.path().join("not-created").display()
        )),
        "{text}"
    );
    let (coordinator, agent) = (exposure(&coordinator_unit)?, exposure(&unit)?);
    println!("systemd-analyze security: coordinator {coordinator}, agent {agent}");
    assert!(coordinator <= 3.0, "coordinator exposure {coordinator}");
    assert!(agent <= 4.5, "agent exposure {agent}");
    Ok(())
}

#[test]
fn coordinator_install_generates_secrets_and_runs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let prefix = dir.path().join("c");
    let p = prefix.to_string_lossy().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    // A secret with the characters the env file must escape.
    let tricky = r#"se"cr\et-$HOME-0123456789"#;
    let install = |secret: Option<&str>| -> TestResult<String> {
        let mut cmd = Command::new(coordinator_bin());
        cmd.args([
            "install",
            "--prefix",
            &p,
            "--no-systemd",
            "--listen",
            &listen,
        ]);
        if let Some(s) = secret {
            cmd.args(["--registration-secret", s]);
        }
        let out = cmd.output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    };
    let out = install(Some(tricky))?;
    assert!(
        out.contains("drover-agent deploy root@WORKER"),
        "prints the next step: {out}"
    );
    let env = std::fs::read_to_string(prefix.join("etc/drover/coordinator.env"))?;
    let value = |key: &str| -> Option<String> {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('"').to_string())
    };
    let token = value("DROVER_ADMIN_TOKEN").ok_or("no admin token")?;
    assert!(token.starts_with("drv_admin_"));
    let url = format!("http://{listen}");
    let api = Api::new(&url);
    wait_for("the installed coordinator", Duration::from_secs(20), || {
        Ok(api.healthy().then_some(()))
    })?;
    let r = api.call("GET", "/api/v1/stats", Some(&token), None)?;
    assert_eq!(r.status, 200, "{}", r.text);
    // Again: an upgrade keeps the secrets (agents keep working), byte for byte.
    install(None)?;
    let env2 = std::fs::read_to_string(prefix.join("etc/drover/coordinator.env"))?;
    assert_eq!(env, env2);
    wait_for("the restarted coordinator", Duration::from_secs(20), || {
        Ok(api.healthy().then_some(()))
    })?;
    let reg = json!({"name": "w", "machine_id": "m", "inventory": {"hostname": "h"}}).to_string();
    let r = api.call(
        "POST",
        "/api/v1/agents/register",
        Some(tricky),
        Some(reg.as_bytes()),
    )?;
    assert_eq!(
        r.status, 200,
        "the secret survived the reinstall: {}",
        r.text
    );
    let pid: i32 = std::fs::read_to_string(prefix.join("var/lib/drover/coordinator.pid"))?
        .trim()
        .parse()?;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    Ok(())
}
