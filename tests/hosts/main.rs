//! Drover on real hosts: booted systemd, units installed by the product's
//! own `install` commands, jobs crossing a real network. Needs root and
//! systemd-container; skipped (saying so) without them, required in CI
//! (DROVER_REQUIRE_HOSTS=1).
//!
//!   cargo test --workspace --test hosts -- --nocapture

#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
#[macro_use]
mod net;

use harness::{agent_bin, wait_for, Api, TestResult};
use net::{Host, Hosts};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PORT: u16 = 8700;

/// A coordinator and agents installed on booted hosts, agents approved.
struct Installed<'a> {
    hosts: &'a Hosts,
    api: Api,
    admin: String,
    /// The registration secret `install` generated.
    secret: String,
}

/// Installs the coordinator on `coordinator` and an agent on each of
/// `agents` (named after its host), as an operator would: the product's
/// `install` commands, the secret passed on stdin, approval over the API.
/// `flags` go to the coordinator's install (and so to its service).
fn install<'a>(
    hosts: &'a Hosts,
    coordinator: &str,
    agents: &[&str],
    flags: &str,
) -> TestResult<Installed<'a>> {
    let c = hosts.get(coordinator);
    // The binaries as the hosts see them (bound from the build dir).
    let bin = |name: &str| format!("{}/{name}", net::BIN_DIR);
    // Checks the agent binary is fresh (and that it exists).
    agent_bin();
    c.sh(&format!(
        "{} install --listen 0.0.0.0:{PORT} {flags}",
        bin("drover-coordinator")
    ))?;
    let setting = |key: &str| -> TestResult<String> {
        let v = c.sh(&format!(
            "sed -n 's/^{key}=\"\\(.*\\)\"/\\1/p' /etc/drover/coordinator.env"
        ))?;
        Ok(v.trim().to_string())
    };
    let admin = setting("DROVER_ADMIN_TOKEN")?;
    let secret = setting("DROVER_REGISTRATION_SECRET")?;
    let url = format!("http://{}:{PORT}", c.addr);
    let api = Api::new(&url);
    wait_for("the coordinator to answer", Duration::from_secs(30), || {
        Ok(api.healthy().then_some(()))
    })?;
    for name in agents {
        hosts.get(name).sh_in(
            &format!(
                "DROVER_REGISTRATION_SECRET=\"$(cat)\" {} install --coordinator {url} --name {name} --shutdown-grace 2 --kill-grace 2",
                bin("drover-agent")
            ),
            Some(secret.as_bytes()),
        )?;
    }
    let installed = Installed {
        hosts,
        api,
        admin,
        secret,
    };
    for name in agents {
        let id = installed.worker(name)?;
        let r = installed.admin("POST", &format!("/api/v1/workers/{id}/approve"), None)?;
        assert_eq!(r["state"], "idle", "{r}");
    }
    Ok(installed)
}

impl Installed<'_> {
    fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> TestResult<Value> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let r = self
            .api
            .call(method, path, Some(&self.admin), bytes.as_deref())?;
        if r.status >= 300 {
            return Err(format!("{method} {path}: {} {}", r.status, r.text).into());
        }
        Ok(r.body)
    }

    /// The id of worker `name`, once it has registered.
    fn worker(&self, name: &str) -> TestResult<i64> {
        wait_for(
            &format!("worker {name} to register"),
            Duration::from_secs(30),
            || {
                let list = self.admin("GET", "/api/v1/workers", None)?;
                let workers = list["workers"].as_array().cloned().unwrap_or_default();
                Ok(workers
                    .iter()
                    .find(|w| w["name"] == name)
                    .and_then(|w| w["id"].as_i64()))
            },
        )
    }

    fn job(&self, id: i64) -> TestResult<Value> {
        self.admin("GET", &format!("/api/v1/jobs/{id}"), None)
    }

    /// Submits `spec`; the job's id.
    fn submit(&self, spec: &Value) -> TestResult<i64> {
        let job = self.admin("POST", "/api/v1/jobs", Some(spec))?;
        Ok(job["id"].as_i64().ok_or("no job id")?)
    }

    /// The output of job `id`'s latest attempt.
    fn log(&self, id: i64) -> TestResult<String> {
        let path = format!("/api/v1/jobs/{id}/logs");
        Ok(self.api.call("GET", &path, Some(&self.admin), None)?.text)
    }

    /// Job `id` once its status is `status`, within `limit` (else the
    /// error shows the job and its agents' last log lines).
    fn job_in(&self, id: i64, status: &str, limit: Duration) -> TestResult<Value> {
        let waited = wait_for(&format!("job {id} {status}"), limit, || {
            let j = self.job(id)?;
            Ok((j["status"] == status).then_some(j))
        });
        waited.map_err(|e| {
            let job = self.job(id).map(|j| j.to_string()).unwrap_or_default();
            let logs: Vec<String> = self
                .hosts
                .hosts
                .iter()
                .filter_map(|h| {
                    let cmd = "journalctl -u drover-agent --no-pager -o cat -n 15";
                    let (_, out, _) = h.exec(cmd, None).ok()?;
                    Some(format!("{}: {out}", h.name))
                })
                .collect();
            format!("{e}; job: {job}; agents: {}", logs.join("\n")).into()
        })
    }

    /// The host whose agent is worker `id`.
    fn host_of(&self, worker_id: i64) -> TestResult<&Host> {
        let w = self.admin("GET", &format!("/api/v1/workers/{worker_id}"), None)?;
        let name = w["name"].as_str().ok_or("worker without a name")?;
        Ok(self.hosts.get(name))
    }
}

/// `kill -9` of `unit`'s main process; returns once systemd has it running
/// again (a new main process, active), with how long that took.
fn kill9_until_restarted(host: &Host, unit: &str) -> TestResult<Duration> {
    let main_pid = || -> TestResult<String> {
        Ok(host
            .sh(&format!("systemctl show -p MainPID --value {unit}"))?
            .trim()
            .to_string())
    };
    let before = main_pid()?;
    let t0 = Instant::now();
    host.sh(&format!("kill -9 {before}"))?;
    wait_for(
        &format!("systemd to restart {unit}"),
        Duration::from_secs(30),
        || {
            let now = main_pid()?;
            Ok((now != before && now != "0" && active(host, unit)?).then_some(()))
        },
    )?;
    Ok(t0.elapsed())
}

fn active(host: &Host, unit: &str) -> TestResult<bool> {
    let (_, out, _) = host.exec(&format!("systemctl is-active {unit}"), None)?;
    Ok(out.trim() == "active")
}

/// Installed with the product's own commands on booted hosts, the units
/// run under systemd, a job submitted with curl from another host runs on
/// an agent host, and journald has the coordinator's log.
#[test]
fn installed_units_run_a_job_submitted_from_another_host() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1", "drv-a2"])?;
    let t0 = Instant::now();
    let fleet = install(&hosts, "drv-c", &["drv-a1", "drv-a2"], "")?;
    println!(
        "installed 1 coordinator + 2 agents in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(active(hosts.get("drv-c"), "drover-coordinator")?);
    assert!(active(hosts.get("drv-a1"), "drover-agent")?);
    assert!(active(hosts.get("drv-a2"), "drover-agent")?);
    // Type=notify: systemd knows when each is ready, and what it does.
    for (host, unit, says) in [
        ("drv-c", "drover-coordinator", "listening on"),
        ("drv-a1", "drover-agent", "registered as worker"),
    ] {
        let show = hosts.get(host).sh(&format!(
            "systemctl show -p Type -p StatusText -p WatchdogUSec {unit}"
        ))?;
        println!("{unit}: {}", show.replace('\n', "; "));
        assert!(show.contains("Type=notify"), "{show}");
        assert!(show.contains("WatchdogUSec=30s"), "{show}");
        assert!(show.contains(says), "{show}");
        let (_, score, _) = hosts.get(host).exec(
            &format!("systemd-analyze security --no-pager {unit} | tail -1"),
            None,
        )?;
        println!("{unit}: {}", score.trim());
        let exposure: f64 = score
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no exposure level in {score:?}"))?;
        assert!(exposure <= 4.5, "{unit}: {score}");
    }

    // The agent says it can hold jobs to limits exactly when its delegated
    // cgroup has the memory and cpu controllers.
    let controllers = hosts.get("drv-a1").sh(
        "cat $(awk '$9 == \"cgroup2\" {print $5}' /proc/self/mountinfo)/system.slice/drover-agent.service/cgroup.controllers",
    )?;
    let able = ["memory", "cpu"]
        .iter()
        .all(|c| controllers.split_whitespace().any(|x| x == *c));
    let w = fleet.admin(
        "GET",
        &format!("/api/v1/workers/{}", fleet.worker("drv-a1")?),
        None,
    )?;
    println!(
        "delegated controllers {:?}: can_limit {}",
        controllers.trim(),
        w["can_limit"]
    );
    assert_eq!(w["can_limit"], able, "{w}");

    let spec = json!({"command": ["sh", "-c", "echo ran-on $(hostname)"]}).to_string();
    let reply = hosts.get("drv-a2").sh_in(
        &format!(
            "curl -sf -H \"Authorization: Bearer $(cat)\" -H 'Content-Type: application/json' -d '{spec}' http://{}:{PORT}/api/v1/jobs",
            hosts.get("drv-c").addr
        ),
        Some(fleet.admin.as_bytes()),
    )?;
    let id = serde_json::from_str::<Value>(&reply)?["id"]
        .as_i64()
        .ok_or("no job id in the reply")?;
    let t1 = Instant::now();
    let job = fleet.job_in(id, "succeeded", Duration::from_secs(30))?;
    println!(
        "job {id} submitted from drv-a2 succeeded in {:.2}s",
        t1.elapsed().as_secs_f64()
    );
    let worker = job["worker_id"].as_i64().ok_or("no worker")?;
    let log = fleet.log(id)?;
    let ran_on = &fleet.host_of(worker)?.name;
    assert_eq!(log.trim(), format!("ran-on {ran_on}"));

    let journal = hosts
        .get("drv-c")
        .sh("journalctl -u drover-coordinator --no-pager -o cat")?;
    assert!(journal.contains("listening on"), "{journal}");
    Ok(())
}

/// `systemctl stop` of the agent running a job hands it back at once and
/// it finishes on the other host; `kill -9` of an agent is answered by
/// systemd restarting it, under the same worker id.
#[test]
fn agent_stop_and_kill_under_systemd() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1", "drv-a2"])?;
    let fleet = install(&hosts, "drv-c", &["drv-a1", "drv-a2"], "")?;
    let spec = json!({"command": ["sh", "-c", "sleep 6; echo finished"], "max_attempts": 3});
    let id = fleet.submit(&spec)?;
    let first = fleet.job_in(id, "running", Duration::from_secs(20))?;
    let first_worker = first["worker_id"].as_i64().ok_or("no worker")?;
    let host = fleet.host_of(first_worker)?;
    let t0 = Instant::now();
    host.sh("systemctl stop drover-agent")?;
    let stopped = t0.elapsed();
    let moved = wait_for("the job to run elsewhere", Duration::from_secs(20), || {
        let j = fleet.job(id)?;
        let elsewhere = j["status"] == "running" && j["worker_id"].as_i64() != Some(first_worker);
        Ok(elsewhere.then_some(j))
    })?;
    println!(
        "systemctl stop took {:.1}s; the job ran again elsewhere {:.1}s after the stop began",
        stopped.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let done = fleet.job_in(id, "succeeded", Duration::from_secs(30))?;
    let attempts = done["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 2, "{done}");
    assert_eq!(attempts[0]["outcome"], "released", "{done}");
    assert_eq!(
        done["attempts_used"], 1,
        "a hand-back does not count: {done}"
    );
    assert_eq!(done["worker_id"], moved["worker_id"]);

    // kill -9: systemd restarts the agent; it comes back as the same worker.
    let other = fleet.host_of(moved["worker_id"].as_i64().ok_or("no worker")?)?;
    let worker_id = fleet.worker(&other.name)?;
    let took = kill9_until_restarted(other, "drover-agent")?;
    println!(
        "kill -9 -> restarted by systemd in {:.1}s",
        took.as_secs_f64()
    );
    let id2 = fleet.submit(&json!({"command": ["true"], "required_tags": []}))?;
    fleet.job_in(id2, "succeeded", Duration::from_secs(30))?;

    // systemctl restart mid-job: the job is handed back (no attempt spent)
    // and ends once.
    let (id3, worker3, host3) = start_job(&fleet, "sleep 4; echo once")?;
    let t2 = Instant::now();
    host3.sh("systemctl restart drover-agent")?;
    let done = fleet.job_in(id3, "succeeded", Duration::from_secs(40))?;
    assert_eq!(done["attempts_used"], 1, "{done}");
    assert_eq!(fleet.log(id3)?.trim(), "once", "{done}");
    println!(
        "systemctl restart of worker {worker3}'s agent mid-job: the job ended once, {:.1}s later, after {} attempts ({} spent)",
        t2.elapsed().as_secs_f64(),
        done["attempts"].as_array().map_or(0, Vec::len),
        done["attempts_used"]
    );
    assert_eq!(
        fleet.worker(&other.name)?,
        worker_id,
        "same worker id after the restart"
    );
    let list = fleet.admin("GET", "/api/v1/workers", None)?;
    assert_eq!(
        list["workers"].as_array().map(Vec::len),
        Some(2),
        "no new worker: {list}"
    );
    Ok(())
}

/// Submits `command` (run by sh) and returns the job once it runs, with
/// the host it runs on.
fn start_job<'a>(fleet: &'a Installed, command: &str) -> TestResult<(i64, i64, &'a Host)> {
    let spec = json!({"command": ["sh", "-c", command], "max_attempts": 3});
    let id = fleet.submit(&spec)?;
    let running = fleet.job_in(id, "running", Duration::from_secs(20))?;
    let worker = running["worker_id"].as_i64().ok_or("no worker")?;
    Ok((id, worker, fleet.host_of(worker)?))
}

/// An agent host cut off mid-job. Healed within the lease: nothing moves,
/// one attempt. Cut off past the lease: the job runs again on the other
/// host after about a TTL, and when the cable is back the cut-off copy's
/// report is refused: the job ends once, with the second attempt's result.
#[test]
fn a_partitioned_agent_host() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1", "drv-a2"])?;
    let fleet = install(&hosts, "drv-c", &["drv-a1", "drv-a2"], "--lease-ttl 6")?;

    let (id, worker, host) = start_job(&fleet, "sleep 6; echo short")?;
    host.cable(false)?;
    std::thread::sleep(Duration::from_secs(3));
    host.cable(true)?;
    let done = fleet.job_in(id, "succeeded", Duration::from_secs(30))?;
    assert_eq!(done["worker_id"], worker, "{done}");
    assert_eq!(done["attempts"].as_array().map(Vec::len), Some(1), "{done}");
    println!("cut off for 3 s (lease 6 s): the job stayed, 1 attempt");

    let (id, worker, host) = start_job(&fleet, "sleep 15; echo $(hostname)")?;
    let cut = Instant::now();
    host.cable(false)?;
    let moved = wait_for("the job to run elsewhere", Duration::from_secs(30), || {
        let j = fleet.job(id)?;
        let elsewhere = j["status"] == "running" && j["worker_id"].as_i64() != Some(worker);
        Ok(elsewhere.then_some(j))
    })?;
    println!(
        "cut off past the lease (6 s): the job ran again elsewhere after {:.1}s",
        cut.elapsed().as_secs_f64()
    );
    let (status, _, _) = host.exec("pgrep -x sleep", None)?;
    println!(
        "the cut-off host's copy still runs when the cable comes back: {}",
        status == 0
    );
    host.cable(true)?;
    let done = fleet.job_in(id, "succeeded", Duration::from_secs(40))?;
    assert_eq!(done["worker_id"], moved["worker_id"], "{done}");
    let attempts = done["attempts"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 2, "{done}");
    assert_eq!(attempts[0]["worker_id"], worker, "{done}");
    let log = fleet.log(id)?;
    let second = fleet.host_of(moved["worker_id"].as_i64().ok_or("no worker")?)?;
    assert_eq!(log.trim(), second.name, "the second attempt's output");
    Ok(())
}

/// Jobs run as the job user `install` made, not root: they cannot read or
/// list the agent's state dir (its token), a result file linked to the
/// token uploads nothing, and the job's own dir is writable.
#[test]
fn jobs_run_as_their_own_user_and_cannot_reach_the_agents_token() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1"])?;
    let fleet = install(&hosts, "drv-c", &["drv-a1"], "")?;
    let script = "id -un; id -u; umask; touch own-file && echo WROTE-CWD; \
        case \"$TMPDIR\" in */jobs/*/tmp) touch \"$TMPDIR/x\" && echo OWN-TMPDIR;; esac; \
        cat /var/lib/drover-agent/identity.json && echo READ-THE-TOKEN; \
        ls /var/lib/drover-agent >/dev/null 2>&1 && echo LISTED-THE-STATE-DIR; \
        ln -s /var/lib/drover-agent/identity.json \"$DROVER_RESULT_FILE\"; ls -l \"$DROVER_RESULT_FILE\"; true";
    let spec = json!({"command": ["sh", "-c", script]});
    let id = fleet.submit(&spec)?;
    let job = fleet.job_in(id, "succeeded", Duration::from_secs(30))?;
    let log = fleet.log(id)?;
    println!("the job said: {log:?}; its error: {}", job["error"]);
    let mut lines = log.lines();
    assert_eq!(lines.next(), Some("drover-job"), "{log}");
    assert_ne!(lines.next(), Some("0"), "{log}");
    assert_eq!(lines.next(), Some("0022"), "the job's umask: {log}");
    assert!(log.contains("OWN-TMPDIR"), "{log}");
    assert!(log.contains("WROTE-CWD"), "{log}");
    assert!(!log.contains("READ-THE-TOKEN"), "{log}");
    assert!(!log.contains("drv_agent_"), "{log}");
    assert!(!log.contains("LISTED-THE-STATE-DIR"), "{log}");
    // The link was made (the job says so) and refused: no token uploaded.
    assert!(
        log.contains("result.json -> /var/lib/drover-agent/identity.json"),
        "{log}"
    );
    assert!(job["result"].is_null(), "{job}");
    Ok(())
}

/// An exclusive job on an agent host cut off mid-job is stopped there
/// before its next attempt starts elsewhere: the gap is printed and must
/// be positive. (A plain job's cut-off copy runs on: see
/// `a_partitioned_agent_host`.)
#[test]
fn an_exclusive_job_never_runs_twice_across_a_partition() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1", "drv-a2"])?;
    let fleet = install(&hosts, "drv-c", &["drv-a1", "drv-a2"], "--lease-ttl 9")?;
    let spec = json!({"command": ["sleep", "300"], "exclusive": true, "max_attempts": 3});
    let id = fleet.submit(&spec)?;
    let first = fleet.job_in(id, "running", Duration::from_secs(20))?;
    assert_eq!(first["exclusive"], true, "{first}");
    let worker = first["worker_id"].as_i64().ok_or("no worker")?;
    let host = fleet.host_of(worker)?;
    let cut = Instant::now();
    host.cable(false)?;
    let (mut gone, mut next) = (None, None);
    while cut.elapsed() < Duration::from_secs(60) && (gone.is_none() || next.is_none()) {
        if gone.is_none() && host.exec("pgrep -x sleep", None)?.0 != 0 {
            gone = Some(cut.elapsed());
        }
        if next.is_none() {
            let j = fleet.job(id)?;
            if j["status"] == "running" && j["worker_id"].as_i64() != Some(worker) {
                next = Some(cut.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    host.cable(true)?;
    let (gone, next) = (
        gone.ok_or("the cut-off copy never stopped")?,
        next.ok_or("no second attempt")?,
    );
    println!(
        "lease 9 s, kill grace 2 s: the cut-off copy stopped {:.1}s after the cut, the next attempt started {:.1}s after it: a gap of {:.1}s",
        gone.as_secs_f64(),
        next.as_secs_f64(),
        (next.as_secs_f64() - gone.as_secs_f64())
    );
    assert!(gone < next, "the two attempts overlapped");
    Ok(())
}

/// `drover-agent deploy` from the coordinator's host to another over the
/// real sshd on its own address (not loopback): the worker registers,
/// runs under systemd there, and runs a job. The secrets travel in the
/// environment, never in argv.
#[test]
fn deploy_over_ssh_between_hosts() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1"])?;
    let fleet = install(&hosts, "drv-c", &[], "--auto-approve")?;
    let (c, target) = (hosts.get("drv-c"), hosts.get("drv-a1"));
    c.sh("mkdir -p -m 0700 /root/.ssh && ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519")?;
    let key = c.sh("cat /root/.ssh/id_ed25519.pub")?;
    target.sh_in(
        "mkdir -p -m 0700 /root/.ssh && cat >> /root/.ssh/authorized_keys && systemctl start ssh",
        Some(key.as_bytes()),
    )?;
    let creds = format!("{}\n{}\n", fleet.secret, fleet.admin);
    let t0 = Instant::now();
    let out = c.sh_in(
        &format!(
            "{{ read -r DROVER_REGISTRATION_SECRET; read -r DROVER_ADMIN_TOKEN; export DROVER_REGISTRATION_SECRET DROVER_ADMIN_TOKEN; }}; \
             {}/drover-agent deploy root@{} --coordinator http://{}:{PORT} --name drv-a1 \
             --ssh-option StrictHostKeyChecking=accept-new --json",
            net::BIN_DIR,
            target.addr,
            c.addr
        ),
        Some(creds.as_bytes()),
    )?;
    println!(
        "deploy took {:.1}s: {}",
        t0.elapsed().as_secs_f64(),
        out.trim()
    );
    let report: Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
    assert_eq!(report["ok"], true, "{out}");
    assert!(active(target, "drover-agent")?);
    let spec = json!({"command": ["hostname"]});
    let id = fleet.submit(&spec)?;
    fleet.job_in(id, "succeeded", Duration::from_secs(30))?;
    let log = fleet.log(id)?;
    assert_eq!(log.trim(), "drv-a1");
    Ok(())
}

/// Cancelling a job stops everything it started, a process that left its
/// process group (`setsid`) included: each job has a cgroup of its own.
#[test]
fn a_cancelled_job_leaves_no_process_behind() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1"])?;
    let fleet = install(&hosts, "drv-c", &["drv-a1"], "")?;
    let host = hosts.get("drv-a1");
    let spec = json!({"command": ["sh", "-c", "setsid sleep 4242 & sleep 4343"]});
    let id = fleet.submit(&spec)?;
    fleet.job_in(id, "running", Duration::from_secs(20))?;
    wait_for("the job's processes", Duration::from_secs(10), || {
        let (a, _, _) = host.exec("pgrep -f 'slee[p] 4242'", None)?;
        let (b, _, _) = host.exec("pgrep -f 'slee[p] 4343'", None)?;
        Ok((a == 0 && b == 0).then_some(()))
    })?;
    let t0 = Instant::now();
    fleet.admin("POST", &format!("/api/v1/jobs/{id}/cancel"), None)?;
    fleet.job_in(id, "cancelled", Duration::from_secs(30))?;
    let gone = wait_for(
        "every process of the job to be gone",
        Duration::from_secs(10),
        || {
            let (status, _, _) = host.exec("pgrep -f 'slee[p] 4[23]4[23]'", None)?;
            Ok((status != 0).then_some(()))
        },
    );
    if let Err(e) = gone {
        let why = host.exec(
            "for p in $(pgrep -f 'slee[p] 4[23]4[23]'); do cat /proc/$p/cgroup | tail -1; done; \
             journalctl -u drover-agent -o cat | grep -i cgroup",
            None,
        )?;
        return Err(format!("{e}: {}{}", why.1, why.2).into());
    }
    println!(
        "cancelled: the job and its setsid child gone {:.1}s after the cancel",
        t0.elapsed().as_secs_f64()
    );
    let cgroups = host.sh(
        "ls $(awk '$9 == \"cgroup2\" {print $5}' /proc/self/mountinfo)/system.slice/drover-agent.service/",
    )?;
    assert!(
        !cgroups.contains("job-"),
        "a job cgroup was left: {cgroups}"
    );
    Ok(())
}

/// Job `id` once it succeeded, having run once (one attempt) and said
/// `want`.
fn ran_once(fleet: &Installed, id: i64, want: &str, limit: Duration) -> TestResult<Value> {
    let done = fleet.job_in(id, "succeeded", limit)?;
    assert_eq!(
        done["attempts"].as_array().map(Vec::len),
        Some(1),
        "run once: {done}"
    );
    if !want.is_empty() {
        assert_eq!(fleet.log(id)?.trim(), want, "{done}");
    }
    Ok(done)
}

/// The coordinator restarted, killed (-9: systemd starts it again) and
/// stopped for a while, each mid-job: the job runs on and ends once, its
/// report delivered when the coordinator is back.
#[test]
fn coordinator_restart_kill_and_stop_mid_job() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1"])?;
    let fleet = install(&hosts, "drv-c", &["drv-a1"], "--lease-ttl 6")?;
    let c = hosts.get("drv-c");
    let actions: [(&str, &dyn Fn() -> TestResult); 3] = [
        ("systemctl restart", &|| {
            c.sh("systemctl restart drover-coordinator")?;
            Ok(())
        }),
        ("kill -9", &|| {
            kill9_until_restarted(c, "drover-coordinator").map(|_| ())
        }),
        ("systemctl stop, 8 s down, start", &|| {
            c.sh("systemctl stop drover-coordinator")?;
            std::thread::sleep(Duration::from_secs(8));
            c.sh("systemctl start drover-coordinator")?;
            Ok(())
        }),
    ];
    for (what, act) in actions {
        let (id, _, _) = start_job(&fleet, "sleep 5; echo once")?;
        let t0 = Instant::now();
        act()?;
        let back = t0.elapsed();
        ran_once(&fleet, id, "once", Duration::from_secs(40))?;
        println!(
            "coordinator {what} mid-job: back after {:.1}s; the job ended once, {:.1}s after it",
            back.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The coordinator's host cut off past the lease while agents run jobs:
/// it hears no agent, so it holds every lease instead of re-running the
/// whole fleet's jobs; healed, the jobs end once, on their first attempt.
#[test]
fn a_partitioned_coordinator_host() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1", "drv-a2"])?;
    let fleet = install(&hosts, "drv-c", &["drv-a1", "drv-a2"], "--lease-ttl 6")?;
    let c = hosts.get("drv-c");
    let ids = [
        start_job(&fleet, "sleep 14; echo once")?.0,
        start_job(&fleet, "sleep 14; echo once")?.0,
    ];
    c.cable(false)?;
    std::thread::sleep(Duration::from_secs(12));
    c.cable(true)?;
    let healed = Instant::now();
    for id in ids {
        ran_once(&fleet, id, "once", Duration::from_secs(40))?;
    }
    let journal = c.sh("journalctl -u drover-coordinator --no-pager -o cat")?;
    assert!(journal.contains("may be the one cut off"), "{journal}");
    assert!(no_lease_expired(&journal), "{journal}");
    println!(
        "coordinator cut off 12 s (lease 6 s): 0 leases expired, both jobs ended once, {:.1}s after the heal",
        healed.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A relay on an agent host, in front of the coordinator: what the agent
/// sends waits `delay_ms` first (replies pass at once). The kernel here may
/// lack sch_netem: this is its delay, and nftables its loss.
const RELAY: &str = r#"
import asyncio, sys
port, host, target, delay = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) / 1000

async def pipe(r, w, wait):
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()
    async def read():
        while True:
            data = await r.read(65536)
            await q.put((loop.time() + wait, data))
            if not data:
                return
    async def write():
        while True:
            at, data = await q.get()
            await asyncio.sleep(max(0, at - loop.time()))
            if not data:
                w.write_eof()
                return
            w.write(data)
            await w.drain()
    await asyncio.gather(read(), write())

async def serve(cr, cw):
    try:
        sr, sw = await asyncio.open_connection(host, target)
        await asyncio.gather(pipe(cr, sw, delay), pipe(sr, cw, 0))
    except Exception:
        pass
    finally:
        cw.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    await server.serve_forever()

asyncio.run(main())
"#;

/// One agent behind 200 ms of delay and 5 % packet loss: its jobs run and
/// end once, and it keeps every lease.
#[test]
fn an_agent_behind_a_slow_lossy_link() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1"])?;
    let fleet = install(&hosts, "drv-c", &[], "--lease-ttl 6 --auto-approve")?;
    let (c, a) = (hosts.get("drv-c"), hosts.get("drv-a1"));
    a.sh_in("cat > /root/relay.py", Some(RELAY.as_bytes()))?;
    a.sh(&format!(
        "systemd-run --unit=drvtest-relay python3 /root/relay.py 8701 {} {PORT} 200",
        c.addr
    ))?;
    a.sh(&format!(
        "nft add table inet drvtest && \
         nft add chain inet drvtest out '{{ type filter hook output priority 0; }}' && \
         nft add rule inet drvtest out ip daddr {} numgen random mod 100 '<' 5 counter drop",
        c.addr
    ))?;
    // The fixture works: a request through the relay takes the delay.
    let rtt: f64 = wait_for("the relay", Duration::from_secs(10), || {
        let (status, out, _) = a.exec(
            "curl -s -o /dev/null -w '%{time_total}' http://127.0.0.1:8701/healthz",
            None,
        )?;
        Ok((status == 0).then(|| out.trim().parse().unwrap_or(0.0)))
    })?;
    assert!(rtt >= 0.2, "a request through the relay took {rtt}s");
    a.sh_in(
        &format!(
            "DROVER_REGISTRATION_SECRET=\"$(cat)\" {}/drover-agent install --coordinator http://127.0.0.1:8701 --name drv-a1 --slots 4",
            net::BIN_DIR
        ),
        Some(fleet.secret.as_bytes()),
    )?;
    fleet.worker("drv-a1")?;
    let t0 = Instant::now();
    let ids: Vec<i64> = (0..12)
        .map(|i| fleet.submit(&json!({"command": ["sh", "-c", format!("sleep 3; echo job-{i}")]})))
        .collect::<TestResult<_>>()?;
    for (i, id) in ids.iter().enumerate() {
        ran_once(&fleet, *id, &format!("job-{i}"), Duration::from_secs(90))?;
    }
    let dropped = a.sh("nft list table inet drvtest | grep -o 'packets [0-9]*'")?;
    let sent = a.sh("cat /sys/class/net/host0/statistics/tx_packets")?;
    println!(
        "200 ms delay (a request took {rtt:.2}s) + 5 % loss: 12 jobs of 3 s on 4 slots ended once each in {:.1}s; {} of {} packets dropped",
        t0.elapsed().as_secs_f64(),
        dropped.trim(),
        sent.trim()
    );
    let journal = c.sh("journalctl -u drover-coordinator --no-pager -o cat")?;
    assert!(no_lease_expired(&journal), "no lease lost: {journal}");
    Ok(())
}

/// An agent host whose clock is 30 s ahead (libfaketime, through a unit
/// drop-in): its jobs see that clock, and still run once with their leases
/// kept; times in the API are the coordinator's.
#[test]
fn an_agent_host_with_its_clock_30s_off() -> TestResult {
    require_hosts!();
    let hosts = Hosts::boot(&["drv-c", "drv-a1"])?;
    let fleet = install(&hosts, "drv-c", &["drv-a1"], "--lease-ttl 6")?;
    let a = hosts.get("drv-a1");
    a.sh(&format!(
        "mkdir -p /etc/systemd/system/drover-agent.service.d && \
         printf '[Service]\\nEnvironment=LD_PRELOAD={} FAKETIME=+30s\\n' > /etc/systemd/system/drover-agent.service.d/clock.conf && \
         systemctl daemon-reload && systemctl restart drover-agent",
        net::FAKETIME
    ))?;
    let id = fleet.submit(&json!({"command": ["sh", "-c", "date +%s; sleep 9"]}))?;
    let done = ran_once(&fleet, id, "", Duration::from_secs(40))?;
    let job_clock: f64 = fleet.log(id)?.trim().parse()?;
    let ours = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let ahead = job_clock - (ours - 9.0);
    let took = secs(&done["finished_at"])? - secs(&done["started_at"])?;
    println!(
        "agent clock {ahead:+.0} s off: the job ran once over 1.5 leases (6 s), {took:.1}s by the coordinator's clock"
    );
    assert!(ahead > 20.0, "the job saw the agent's clock: {ahead}");
    assert!((8.0..20.0).contains(&took), "{done}");
    Ok(())
}

/// Whether a coordinator's journal shows no lease expired.
fn no_lease_expired(journal: &str) -> bool {
    journal
        .lines()
        .filter_map(|l| l.split("expired_leases=").nth(1)?.split(' ').next())
        .all(|n| n == "0")
}

/// Seconds since the epoch of an RFC 3339 time in the API.
fn secs(v: &Value) -> TestResult<f64> {
    let t = humantime::parse_rfc3339(v.as_str().ok_or("no time")?)?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_secs_f64())
}
