//! Starts the real binaries on 127.0.0.1 with a temp database, talks HTTP to
//! them, waits by polling with a deadline, and kills its children on drop.

use serde_json::Value;
use std::error::Error;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub type TestResult<T = ()> = Result<T, Box<dyn Error>>;

pub const ADMIN: &str = "test-admin-token-0123456789";
pub const SECRET: &str = "test-registration-secret";

pub fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_drover-coordinator"))
}

/// The agent is built by `cargo test --workspace` next to the coordinator
/// (`cargo test -p coordinator` alone does not rebuild it: refuse a stale one).
pub fn agent_bin() -> PathBuf {
    let p = coordinator_bin().with_file_name("drover-agent");
    let built = fs::metadata(&p).and_then(|m| m.modified());
    let Ok(built) = built else {
        panic!(
            "{} is missing: run the tests with `cargo test --workspace`",
            p.display()
        );
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest = ["agent/src", "host/src", "proto/src"]
        .iter()
        .filter_map(|d| newest_file(&root.join(d)))
        .max();
    assert!(
        newest.is_none_or(|n| n <= built),
        "{} is older than its sources: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// When the newest file under `dir` was changed.
fn newest_file(dir: &Path) -> Option<std::time::SystemTime> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            if meta.is_dir() {
                newest_file(&e.path())
            } else {
                meta.modified().ok()
            }
        })
        .max()
}

/// Polls `f` every 25 ms until it returns Some, or fails after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> TestResult<Option<T>>,
) -> TestResult<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn kill_group(child: &mut Child) {
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe {
        libc::killpg(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub struct Coordinator {
    child: Option<Child>,
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    starts: usize,
    /// What `--db` is given: the SQLite file, or a PostgreSQL URL
    /// (`pg::suite_database`); none when `extra` names it.
    db: Option<String>,
}

impl Coordinator {
    /// Starts a coordinator with a fresh database in `dir`, auto-approving.
    pub fn start(dir: &Path, extra: &[&str]) -> TestResult<Coordinator> {
        Coordinator::start_with_env(dir, extra, &[])
    }

    /// The same, with extra environment variables for the process.
    pub fn start_with_env(
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TestResult<Coordinator> {
        Coordinator::start_on(dir, 0, extra, env)
    }

    /// The same, listening on `port` (0: any free one).
    pub fn start_on(
        dir: &Path,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> TestResult<Coordinator> {
        let mut c = Coordinator {
            child: None,
            dir: dir.to_path_buf(),
            port,
            url: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            starts: 0,
            db: None,
        };
        if !extra.contains(&"--db") {
            c.db = Some(suite_database().unwrap_or_else(|| c.db_path().display().to_string()));
        }
        c.spawn()?;
        Ok(c)
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("drover.db")
    }

    fn spawn(&mut self) -> TestResult {
        self.starts += 1;
        let log_path = self.dir.join(format!("coordinator-{}.log", self.starts));
        let log = fs::File::create(&log_path)?;
        let child = Command::new(coordinator_bin())
            .args(self.db.iter().flat_map(|db| ["--db", db]))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--admin-token", ADMIN, "--registration-secret", SECRET])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
        self.child = Some(child);
        let addr = wait_for("the coordinator to listen", Duration::from_secs(20), || {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    return Err(format!("coordinator exited with {status}: {log}").into());
                }
            }
            let text = fs::read_to_string(&log_path)?;
            Ok(text.lines().find_map(|l| {
                l.split("listening on ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_string)
            }))
        })?;
        self.port = addr.rsplit(':').next().ok_or("no port")?.parse()?;
        self.url = addr;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM, then waits (up to 20 s) for a clean exit.
    pub fn stop(&mut self) -> TestResult {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let exited = wait_for("the coordinator to exit", Duration::from_secs(20), || {
                Ok(c.try_wait()?.map(|_| ()))
            });
            if exited.is_err() {
                kill_group(&mut c);
            }
            exited?;
        }
        Ok(())
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(&mut c);
        }
    }

    /// Starts again on the same port and database.
    pub fn restart(&mut self) -> TestResult {
        self.kill9();
        self.spawn()
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Agent {
    child: Option<Child>,
    pub state_dir: PathBuf,
}

impl Agent {
    pub fn start(url: &str, dir: &Path, name: &str, extra: &[&str]) -> TestResult<Agent> {
        Agent::spawn(&[], url, dir, name, extra)
    }

    /// `drover-agent simulate`: `n` virtual agents (no processes: their
    /// jobs succeed at once) in one process, for at most 15 minutes.
    pub fn simulate(
        url: &str,
        dir: &Path,
        name: &str,
        n: usize,
        extra: &[&str],
    ) -> TestResult<Agent> {
        let n = n.to_string();
        let command = ["simulate", "--agents", &n, "--duration", "900"];
        Agent::spawn(&command, url, dir, name, extra)
    }

    fn spawn(
        command: &[&str],
        url: &str,
        dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> TestResult<Agent> {
        let state_dir = dir.join(format!("agent-{name}"));
        let log_path = dir.join(format!("agent-{name}.log"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(agent_bin())
            .args(command)
            .args([
                "--coordinator",
                url,
                "--registration-secret",
                SECRET,
                "--name",
                name,
            ])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
        Ok(Agent {
            child: Some(child),
            state_dir,
        })
    }

    /// The agent's token, as it keeps it.
    pub fn token(&self) -> TestResult<String> {
        let id: Value = serde_json::from_slice(&fs::read(self.state_dir.join("identity.json"))?)?;
        Ok(id["token"].as_str().ok_or("no token")?.to_string())
    }

    pub fn worker_id(&self) -> TestResult<i64> {
        let id: Value = serde_json::from_slice(&fs::read(self.state_dir.join("identity.json"))?)?;
        Ok(id["worker_id"].as_i64().ok_or("no worker_id")?)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// A signal to the agent process alone.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGTERM to the agent alone (as systemd's KillMode=mixed does).
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
    }

    /// Whether the agent process has exited.
    pub fn exited(&mut self) -> TestResult<bool> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?.is_some()),
            None => Ok(true),
        }
    }

    /// Waits for the agent to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> TestResult<std::process::ExitStatus> {
        let child = self.child.as_mut().ok_or("agent not running")?;
        let status = wait_for("the agent to exit", limit, || Ok(child.try_wait()?))?;
        self.child = None;
        Ok(status)
    }

    /// SIGKILL to the agent's whole process group.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(&mut c);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A small HTTP client that returns every status with its JSON body.
pub struct Api {
    base: String,
    http: ureq::Agent,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn field(&self) -> &str {
        self.body["error"]["field"].as_str().unwrap_or("")
    }
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.to_string(),
            http: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        }
    }

    /// A client that trusts `config`'s roots (for an HTTPS coordinator).
    pub fn with_tls(base: &str, config: std::sync::Arc<rustls::ClientConfig>) -> Api {
        Api {
            base: base.to_string(),
            http: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .tls_config(config)
                .build(),
        }
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
    ) -> TestResult<Reply> {
        let mut req = self.http.request(method, &format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(format!("{method} {path}: {e}").into()),
        };
        let status = resp.status();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut resp.into_reader(), &mut text)?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply { status, body, text })
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> TestResult<Reply> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.call(method, path, Some(ADMIN), bytes.as_deref())
    }

    /// Submits a job; fails unless 201.
    pub fn submit(&self, spec: &Value) -> TestResult<i64> {
        let r = self.admin("POST", "/api/v1/jobs", Some(spec))?;
        if r.status != 201 {
            return Err(format!("submit answered {}: {}", r.status, r.text).into());
        }
        Ok(r.body["id"].as_i64().ok_or("no id")?)
    }

    pub fn job(&self, id: i64) -> TestResult<Value> {
        let r = self.admin("GET", &format!("/api/v1/jobs/{id}"), None)?;
        if r.status != 200 {
            return Err(format!("GET job {id} answered {}: {}", r.status, r.text).into());
        }
        Ok(r.body)
    }

    /// Jobs of one status (up to 1000).
    pub fn jobs(&self, status: &str) -> TestResult<Vec<Value>> {
        let r = self.admin(
            "GET",
            &format!("/api/v1/jobs?status={status}&limit=1000"),
            None,
        )?;
        Ok(r.body["jobs"].as_array().cloned().unwrap_or_default())
    }

    /// One unlabelled figure from `/metrics` (None when absent).
    pub fn metric(&self, name: &str) -> TestResult<Option<u64>> {
        let m = self.call("GET", "/metrics", None, None)?;
        Ok(m.text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok()))
    }

    /// Agents with a claim parked, from `/metrics`.
    pub fn agents_waiting(&self) -> TestResult<Option<u64>> {
        self.metric("drover_agents_waiting")
    }

    pub fn healthy(&self) -> bool {
        self.call("GET", "/healthz", None, None)
            .map(|r| r.status == 200)
            .unwrap_or(false)
    }
}

/// Holds the database's write lock from outside (as an operator's sqlite3
/// left in `BEGIN IMMEDIATE` would) for `hold`; returns once it is taken.
/// Join the handle to wait for its release.
pub fn hold_write_lock(
    db: PathBuf,
    hold: Duration,
) -> TestResult<std::thread::JoinHandle<Result<(), String>>> {
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || -> Result<(), String> {
        let conn = rusqlite::Connection::open(&db).map_err(|e| e.to_string())?;
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| e.to_string())?;
        let _ = locked_tx.send(());
        std::thread::sleep(hold);
        conn.execute_batch("ROLLBACK").map_err(|e| e.to_string())
    });
    locked_rx.recv_timeout(Duration::from_secs(10))?;
    Ok(holder)
}

/// Lines of a file each job appends its id (and attempt) to.
/// A port nothing listens on now (the OS's pick, released).
pub fn free_port() -> TestResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn read_lines(path: &Path) -> Vec<String> {
    match fs::File::open(path) {
        Ok(f) => BufReader::new(f).lines().map_while(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}

/// The `p` quantile (0..=1) of sorted figures; NaN when there are none.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Peak resident memory of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A number from the environment (a test's scale knob), or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A run's random seed: `name` from the environment (to replay a run), else
/// the clock. Print it.
pub fn seed_from(name: &str) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    env_or(name, now | 1)
}

/// xorshift64*: enough randomness for choosing victims, replayable by seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) % n.max(1)
    }
}

/// Job `id` once it has ended (succeeded, failed or cancelled), within 30 s.
pub fn finished(api: &Api, id: i64) -> TestResult<Value> {
    wait_for(
        &format!("job {id} to finish"),
        Duration::from_secs(30),
        || {
            let j = api.job(id)?;
            Ok(matches!(
                j["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
            .then_some(j))
        },
    )
}

/// Whether process `pid` runs (a zombie does not).
pub fn alive(pid: i32) -> bool {
    // A zombie is gone for our purposes: it runs nothing.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Established TCP connections the process `pid` holds to `port` on this
/// machine (its socket fds matched against /proc/net/tcp{,6}).
pub fn connections_to(pid: u32, port: u16) -> usize {
    let sockets: std::collections::HashSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // remote address, state (01: established), inode
            f.len() > 9 && f[2].ends_with(&port) && f[3] == "01" && sockets.contains(f[9])
        })
        .count()
}

/// A fake agent speaking the HTTP protocol, for races a real agent
/// cannot be made to run on cue.
pub struct FakeAgent {
    pub token: String,
    pub incarnation: String,
}

impl FakeAgent {
    pub fn register(api: &Api, name: &str) -> TestResult<FakeAgent> {
        FakeAgent::register_with_slots(api, name, None)
    }

    /// Registers (and heartbeats once); `slots` as the agent would say.
    pub fn register_with_slots(api: &Api, name: &str, slots: Option<u32>) -> TestResult<FakeAgent> {
        FakeAgent::register_as(api, name, slots, Value::Null)
    }

    /// Registers with `more` (an object) added to its inventory.
    pub fn register_as(
        api: &Api,
        name: &str,
        slots: Option<u32>,
        more: Value,
    ) -> TestResult<FakeAgent> {
        let mut inventory =
            serde_json::json!({"hostname": name, "cpu_cores": 1, "memory_mb": 1024});
        if let (Some(inv), Value::Object(more)) = (inventory.as_object_mut(), more) {
            inv.extend(more);
        }
        let body = serde_json::json!({"name": name, "machine_id": format!("fake-{name}"),
                          "inventory": inventory, "slots": slots});
        let r = api.call(
            "POST",
            "/api/v1/agents/register",
            Some(SECRET),
            Some(body.to_string().as_bytes()),
        )?;
        if r.status != 200 {
            return Err(format!("register answered {}: {}", r.status, r.text).into());
        }
        let agent = FakeAgent {
            token: r.body["token"].as_str().ok_or("no token")?.to_string(),
            incarnation: format!("inc-{name}"),
        };
        agent.heartbeat(api, &[])?;
        Ok(agent)
    }

    pub fn heartbeat(&self, api: &Api, leases: &[(i64, i64)]) -> TestResult<Reply> {
        let leases: Vec<Value> = leases
            .iter()
            .map(|(j, a)| serde_json::json!({"job_id": j, "attempt": a}))
            .collect();
        let body = serde_json::json!({"incarnation": self.incarnation, "leases": leases});
        api.call(
            "POST",
            "/api/v1/agents/heartbeat",
            Some(&self.token),
            Some(body.to_string().as_bytes()),
        )
    }

    pub fn claim(&self, api: &Api, wait: u64) -> TestResult<Reply> {
        self.claim_with(
            api,
            wait,
            serde_json::json!({"incarnation": self.incarnation}),
        )
    }

    /// A claim that reports attempts that ended.
    pub fn claim_reporting(&self, api: &Api, wait: u64, completed: Value) -> TestResult<Reply> {
        let body = serde_json::json!({"incarnation": self.incarnation, "completed": completed});
        self.claim_with(api, wait, body)
    }

    pub fn claim_with(&self, api: &Api, wait: u64, body: Value) -> TestResult<Reply> {
        api.call(
            "POST",
            &format!("/api/v1/agents/claim?wait={wait}"),
            Some(&self.token),
            Some(body.to_string().as_bytes()),
        )
    }

    pub fn complete(&self, api: &Api, job: i64, attempt: i64, outcome: &str) -> TestResult<Reply> {
        let body = serde_json::json!({"attempt": attempt, "outcome": outcome, "exit_code": 0});
        api.call(
            "POST",
            &format!("/api/v1/jobs/{job}/complete"),
            Some(&self.token),
            Some(body.to_string().as_bytes()),
        )
    }
}

/// DROVER_TEST_POSTGRES (a server URL, `postgres://USER@HOST:PORT`): every
/// coordinator the end-to-end tests start then keeps its store in a fresh
/// database there instead of an SQLite file, so that the whole suite can
/// be run against PostgreSQL. Tests that read the SQLite file itself fail
/// in that mode.
fn suite_database() -> Option<String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = std::env::var("DROVER_TEST_POSTGRES").ok()?;
    let name = format!(
        "suite_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut client = postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls)
        .unwrap_or_else(|e| panic!("DROVER_TEST_POSTGRES={base}: {e}"));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap_or_else(|e| panic!("creating {name} on {base}: {e}"));
    Some(format!("{base}/{name}"))
}
