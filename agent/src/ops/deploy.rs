//! `drover-agent deploy`: put this binary on other machines over SSH (the
//! system `ssh`, so ~/.ssh/config, the ssh-agent and known_hosts work as
//! usual; Drover stores no keys), run `check` there, then `install`, then wait
//! for the worker to show up at the coordinator.

use crate::config::Args;
use crate::suggest;
use serde::Serialize;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where to deploy and how to reach it.
#[derive(Debug, Clone)]
pub struct Target {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl Target {
    /// `[USER@]HOST[:PORT]`
    pub fn parse(s: &str) -> Result<Target, String> {
        let (user, rest) = match s.split_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(format!("{s:?}: empty user before @")),
            None => (None, s),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (
                h.to_string(),
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("{s:?}: port {p:?} is not a number"))?,
                ),
            ),
            _ => (rest.to_string(), None),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(Target { user, host, port })
    }

    fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    pub fn label(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.destination()),
            None => self.destination(),
        }
    }
}

/// Deploy settings besides the agent's own flags.
#[derive(Debug, Clone)]
pub struct Options {
    pub identity: Option<PathBuf>,
    pub ssh_options: Vec<String>,
    pub prefix: Option<PathBuf>,
    pub no_systemd: bool,
    pub jobs: usize,
    pub json: bool,
    pub admin_token: Option<String>,
}

/// How one host went.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub host: String,
    pub ok: bool,
    /// The step reached: connect, check, copy, install, register, done.
    pub step: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Quotes one word for a POSIX shell.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The agent flags to pass on, as words; never a secret (see [`secrets`]).
fn agent_flags(a: &Args) -> Vec<String> {
    let mut out = vec!["--coordinator".to_string(), a.coordinator.clone()];
    let mut push = |k: &str, v: Option<String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            out.push(k.to_string());
            out.push(v);
        }
    };
    push("--name", a.name.clone());
    push("--slots", a.slots.map(|s| s.to_string()));
    push("--fake-gpus", a.fake_gpus.clone());
    push("--tags", (!a.tags.is_empty()).then(|| a.tags.join(",")));
    push("--kill-grace", Some(a.kill_grace.to_string()));
    push("--shutdown-grace", Some(a.shutdown_grace.to_string()));
    out
}

/// The secrets to hand over, as shell assignments for the remote shell to
/// read from ssh's stdin: never in an argv, here or there, where `ps`
/// would show them.
fn secrets(a: &Args) -> String {
    [
        ("DROVER_REGISTRATION_SECRET", &a.registration_secret),
        ("DROVER_TOKEN", &a.token),
    ]
    .into_iter()
    .filter_map(|(k, v)| {
        v.as_ref()
            .filter(|v| !v.is_empty())
            .map(|v| format!("{k}={}\n", sh_quote(v)))
    })
    .collect()
}

/// Runs `command` there with the secrets in its environment, read from
/// stdin (sudo keeps them with --preserve-env).
const WITH_SECRETS: &str = "set -a && eval \"$(cat)\" && set +a && ";
const SUDO: &str = "sudo -n --preserve-env=DROVER_REGISTRATION_SECRET,DROVER_TOKEN ";

/// `--state-dir` for the install, when not the default (the remote check
/// uses a scratch dir of its own instead).
fn state_dir_flag(a: &Args) -> Option<String> {
    (a.state_dir != std::path::Path::new("/var/lib/drover-agent")).then(|| {
        format!(
            " --state-dir {}",
            sh_quote(&a.state_dir.display().to_string())
        )
    })
}

struct Ssh<'a> {
    target: &'a Target,
    opts: &'a Options,
}

impl Ssh<'_> {
    fn base(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
        for o in &self.opts.ssh_options {
            c.args(["-o", o]);
        }
        if let Some(id) = &self.opts.identity {
            c.arg("-i").arg(id);
        }
        c
    }

    /// Runs a shell command there: Ok(stdout) or Err(stderr + stdout).
    fn run(&self, command: &str) -> Result<String, String> {
        let mut c = self.base("ssh");
        if let Some(p) = self.target.port {
            c.args(["-p", &p.to_string()]);
        }
        c.arg(self.target.destination()).arg(command);
        output(c)
    }

    /// Runs a shell command there with `secrets` (shell assignments) in its
    /// environment, passed through stdin.
    fn run_with_secrets(&self, command: &str, secrets: &str) -> Result<String, String> {
        let mut c = self.base("ssh");
        if let Some(p) = self.target.port {
            c.args(["-p", &p.to_string()]);
        }
        c.arg(self.target.destination())
            .arg(format!("{WITH_SECRETS}{command}"));
        output_with_input(c, secrets.as_bytes())
    }

    /// Copies a file there through ssh's stdin (no scp/sftp needed there).
    fn copy(&self, local: &std::path::Path, remote: &str) -> Result<String, String> {
        let file =
            std::fs::File::open(local).map_err(|e| format!("reading {}: {e}", local.display()))?;
        let mut c = self.base("ssh");
        if let Some(p) = self.target.port {
            c.args(["-p", &p.to_string()]);
        }
        c.arg(self.target.destination())
            .arg(format!("umask 077 && cat > {remote}"))
            .stdin(file);
        output(c)
    }
}

/// Runs ssh with `input` on its stdin.
fn output_with_input(mut c: Command, input: &[u8]) -> Result<String, String> {
    use std::io::Write;
    c.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c
        .spawn()
        .map_err(|e| format!("running ssh: {e} (is the OpenSSH client installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .map_err(|e| format!("writing to ssh: {e}"))?;
    }
    finish(
        child
            .wait_with_output()
            .map_err(|e| format!("running ssh: {e}"))?,
    )
}

fn output(mut c: Command) -> Result<String, String> {
    let out = c
        .output()
        .map_err(|e| format!("running ssh: {e} (is the OpenSSH client installed?)"))?;
    finish(out)
}

fn finish(out: std::process::Output) -> Result<String, String> {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        )
        .trim()
        .to_string())
    }
}

fn fail(host: &str, step: &str, error: String) -> Outcome {
    Outcome {
        host: host.to_string(),
        ok: false,
        step: step.to_string(),
        suggestion: suggest::suggest(&error).map(str::to_string),
        error: Some(error),
        worker_id: None,
        state: None,
    }
}

/// The remote machine's CPU architecture as Rust names it.
fn arch_of(uname_m: &str) -> &str {
    match uname_m.trim() {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        other => other,
    }
}

fn deploy_one(
    target: &Target,
    opts: &Options,
    agent: &Args,
    progress: &dyn Fn(&str, &str),
) -> Outcome {
    let host = target.label();
    let ssh = Ssh { target, opts };
    match install_on(&ssh, &host, agent, progress) {
        Ok(hostname) => registered(&host, opts, agent, &hostname, progress),
        Err((step, e)) => fail(&host, step, e),
    }
}

/// A step of a deploy that failed, and why.
type StepError = (&'static str, String);

/// Probes the host, copies this binary, checks and installs it there;
/// returns the host's name.
fn install_on(
    ssh: &Ssh,
    host: &str,
    agent: &Args,
    progress: &dyn Fn(&str, &str),
) -> Result<String, StepError> {
    let opts = ssh.opts;
    progress(host, "connecting");
    let probe = probe(ssh, host).map_err(|e| ("connect", e))?;
    let sudo = if probe.root { "" } else { SUDO };
    let secrets = secrets(agent);
    progress(host, "copying the binary");
    let remote = format!("/tmp/drover-agent-{:016x}", crate::random_u64());
    let me =
        std::env::current_exe().map_err(|e| ("copy", format!("finding this executable: {e}")))?;
    ssh.copy(&me, &remote).map_err(|e| ("copy", e))?;
    let flags: Vec<String> = agent_flags(agent).iter().map(|w| sh_quote(w)).collect();
    let flags = flags.join(" ");
    progress(host, "checking");
    // `check` needs no root and changes nothing, except a state dir it may create.
    let check_dir = format!("/tmp/drover-check-{:08x}", crate::random_u64() as u32);
    let check = format!(
        "chmod 755 {remote} && {remote} check {flags} --state-dir {check_dir}; s=$?; rm -rf {check_dir}; [ $s = 0 ] || rm -f {remote}; exit $s"
    );
    ssh.run_with_secrets(&check, &secrets).map_err(|e| {
        // The failed checks are the story; the passing ones are noise here.
        let failed: Vec<&str> = e.lines().filter(|l| l.starts_with('✗')).collect();
        let why = if failed.is_empty() {
            e.clone()
        } else {
            failed.join("\n")
        };
        ("check", why)
    })?;
    progress(host, "installing");
    let mut install = format!("{sudo}{remote} install {flags}");
    install.push_str(&state_dir_flag(agent).unwrap_or_default());
    if let Some(p) = &opts.prefix {
        install.push_str(&format!(" --prefix {}", sh_quote(&p.display().to_string())));
    }
    if opts.no_systemd {
        install.push_str(" --no-systemd");
    }
    let cleanup = format!("; status=$?; rm -f {remote}; exit $status");
    ssh.run_with_secrets(&format!("{install}{cleanup}"), &secrets)
        .map_err(|e| ("install", e))?;
    Ok(probe.hostname)
}

/// What the probe learnt of a host.
struct Probe {
    hostname: String,
    root: bool,
}

/// Connects and checks that the host can take this binary (same
/// architecture; systemd unless installing without it).
fn probe(ssh: &Ssh, host: &str) -> Result<Probe, String> {
    let out = ssh.run(
        "uname -m; hostname; id -u; test -d /run/systemd/system && echo systemd || echo no-systemd",
    )?;
    let lines: Vec<&str> = out.lines().collect();
    let [a, h, u, s, ..] = lines.as_slice() else {
        return Err(format!("unexpected answer to the probe: {out:?}"));
    };
    let arch = arch_of(a);
    if arch != std::env::consts::ARCH {
        return Err(format!(
            "{host} is {arch} but this drover-agent is {}: cannot execute binary file",
            std::env::consts::ARCH
        ));
    }
    let opts = ssh.opts;
    if *s != "systemd" && !opts.no_systemd && opts.prefix.is_none() {
        return Err(format!("systemd is not running on {host}"));
    }
    Ok(Probe {
        hostname: h.trim().to_string(),
        root: u.trim() == "0",
    })
}

/// The outcome once installed: with an admin token, waits for the worker
/// to register and says whether it needs approval.
fn registered(
    host: &str,
    opts: &Options,
    agent: &Args,
    hostname: &str,
    progress: &dyn Fn(&str, &str),
) -> Outcome {
    let name = agent.name.clone().unwrap_or_else(|| hostname.to_string());
    let done = |suggestion, worker_id, state| Outcome {
        host: host.to_string(),
        ok: true,
        step: "done".into(),
        error: None,
        suggestion,
        worker_id,
        state,
    };
    let Some(admin) = &opts.admin_token else {
        let hint = "pass --admin-token (DROVER_ADMIN_TOKEN) to see it register";
        return done(Some(hint.into()), None, None);
    };
    progress(host, "waiting for it to register");
    match wait_registered(agent, admin, &name) {
        Ok((id, state)) => {
            let approve = (state == "pending").then(|| {
                format!(
                    "approve it: curl -X POST -H \"Authorization: Bearer $DROVER_ADMIN_TOKEN\" {}/api/v1/workers/{id}/approve",
                    agent.coordinator
                )
            });
            done(approve, Some(id), Some(state))
        }
        Err(e) => fail(host, "register", e),
    }
}

/// The worker `name` as the coordinator sees it, once it heartbeats.
fn wait_registered(agent: &Args, admin: &str, name: &str) -> Result<(i64, String), String> {
    let client = crate::client::Client::new(&agent.coordinator, agent.ca_cert.as_deref())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(workers) = client.admin_get("/api/v1/workers", admin) {
            let found = workers["workers"].as_array().and_then(|ws| {
                ws.iter()
                    .filter(|w| w["name"] == name && w["state"] != "decommissioned")
                    .max_by_key(|w| w["last_seen_at"].as_str().unwrap_or("").to_string())
                    .cloned()
            });
            if let Some(w) = found.filter(|w| w["last_seen_at"].is_string()) {
                return Ok((
                    w["id"].as_i64().unwrap_or(0),
                    w["state"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "worker {name:?} did not show up at {} within 30 s: the agent there cannot reach the coordinator (coordinator unreachable)",
                agent.coordinator
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Deploys to every target, `jobs` at a time. Returns the outcomes in order.
pub fn deploy(targets: Vec<Target>, opts: Options, agent: Args) -> Vec<Outcome> {
    let results: Arc<Mutex<Vec<Option<Outcome>>>> = Arc::new(Mutex::new(vec![None; targets.len()]));
    let queue = Arc::new(Mutex::new(
        targets.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let json = opts.json;
    let progress = move |host: &str, step: &str| {
        if !json {
            say!("[{host}] {step}");
        }
    };
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1) {
            let (queue, results, opts, agent) = (queue.clone(), results.clone(), &opts, &agent);
            let progress = &progress;
            s.spawn(move || loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((i, target)) = next else { return };
                let outcome = deploy_one(&target, opts, agent, progress);
                if !opts.json {
                    match &outcome.error {
                        None => say!("[{}] ✓ done", outcome.host),
                        Some(e) => say!(
                            "[{}] ✗ {}: {}",
                            outcome.host,
                            outcome.step,
                            e.lines().next().unwrap_or("")
                        ),
                    }
                }
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(outcome);
            });
        }
    });
    let results = results.lock().unwrap_or_else(|e| e.into_inner()).clone();
    results.into_iter().flatten().collect()
}

/// Prints the summary (a table, or one JSON object per host).
pub fn report(outcomes: &[Outcome], json: bool) {
    if json {
        for o in outcomes {
            say!("{}", serde_json::to_string(o).unwrap_or_default());
        }
        return;
    }
    say!();
    say!(
        "{:<28} {:<7} {:<9} {:<8} {:<10} NOTE",
        "HOST",
        "RESULT",
        "STEP",
        "WORKER",
        "STATE"
    );
    for o in outcomes {
        let note = o
            .suggestion
            .clone()
            .map(|s| format!("→ {s}"))
            .unwrap_or_default();
        say!(
            "{:<28} {:<7} {:<9} {:<8} {:<10} {note}",
            o.host,
            if o.ok { "ok" } else { "FAILED" },
            o.step,
            o.worker_id
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            o.state.clone().unwrap_or_else(|| "-".into()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = Target::parse("root@10.0.0.5:2222").unwrap();
        assert_eq!(
            (t.user.as_deref(), t.host.as_str(), t.port),
            (Some("root"), "10.0.0.5", Some(2222))
        );
        let t = Target::parse("gpu-7").unwrap();
        assert_eq!((t.user, t.host.as_str(), t.port), (None, "gpu-7", None));
        assert!(Target::parse("@x").is_err());
        assert!(Target::parse("a@b:port").is_err());
        assert_eq!(Target::parse("root@h:22").unwrap().label(), "root@h:22");
    }

    #[test]
    fn secrets_travel_on_stdin_never_in_argv() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: Args,
        }
        let t = T::parse_from([
            "t",
            "--registration-secret",
            "s3cr'et",
            "--token",
            "tok",
            "--name",
            "n",
        ]);
        let flags = agent_flags(&t.a).join(" ");
        assert!(!flags.contains("s3cr") && !flags.contains("tok"), "{flags}");
        let lines = secrets(&t.a);
        assert_eq!(
            lines,
            "DROVER_REGISTRATION_SECRET='s3cr'\\''et'\nDROVER_TOKEN=tok\n"
        );
        // The remote shell reads them back exactly.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{WITH_SECRETS}printf %s \"$DROVER_REGISTRATION_SECRET\""
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(lines.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "s3cr'et");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("plain-word_1.2"), "plain-word_1.2");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
    }
}
