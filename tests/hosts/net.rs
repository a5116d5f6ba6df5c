//! Throwaway hosts: each boots systemd as PID 1 in a container
//! (`systemd-nspawn` over a copy-on-write overlay of this machine's root, so
//! the freshly built binaries are visible and every write lands in the
//! host's tmpfs), joined by a private bridge with its own 10.213.0.x
//! addresses. Commands run inside with `nsenter`; a host's cable is pulled
//! with `ip link set vb-NAME down`. Everything is torn down on drop, and
//! only the processes started here are killed. The recipe and its traps:
//! `../shared/HOSTS.md`.

use crate::harness::{coordinator_bin, wait_for, TestResult};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The hosts share one bridge and one subnet: one set at a time, in this
/// process and across processes (two `cargo test` runs).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
const LOCK_FILE: &str = "/run/drover-test-hosts.lock";

const BRIDGE: &str = "drvbr0";
/// libfaketime, to set a host's clock off (Debian's faketime).
pub const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const SUBNET: &str = "10.213.0";

/// Why these tests cannot run here, if they cannot (not root, no
/// systemd-nspawn). With DROVER_REQUIRE_HOSTS=1 that is a failure.
pub fn unavailable() -> Option<String> {
    let why = if rustix::process::geteuid().as_raw() != 0 {
        "they need root (namespaces, mounts, a bridge)"
    } else if !Path::new("/usr/bin/systemd-nspawn").exists() {
        "systemd-nspawn is missing (apt-get install systemd-container)"
    } else if !Path::new("/usr/sbin/ip").exists() && !Path::new("/sbin/ip").exists() {
        "ip is missing (apt-get install iproute2)"
    } else if !Path::new("/usr/sbin/nft").exists() {
        "nft is missing (apt-get install nftables)"
    } else if !Path::new(FAKETIME).exists() {
        "libfaketime is missing (apt-get install faketime)"
    } else {
        return None;
    };
    let required = std::env::var("DROVER_REQUIRE_HOSTS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "DROVER_REQUIRE_HOSTS=1 but the hosts tests cannot run: {why}"
    );
    Some(why.to_string())
}

/// Skips the calling test (with the reason) where hosts cannot boot.
macro_rules! require_hosts {
    () => {
        if let Some(why) = crate::net::unavailable() {
            eprintln!("SKIPPED: the real-hosts tests did not run: {why}");
            return Ok(());
        }
    };
}

pub struct Host {
    pub name: String,
    pub addr: String,
    dir: PathBuf,
    nspawn: Child,
    leader: i32,
}

pub struct Hosts {
    pub hosts: Vec<Host>,
    _turn: std::sync::MutexGuard<'static, ()>,
    _lock: std::fs::File,
}

impl Hosts {
    /// Boots one host per name (at most 11 characters each), addressed
    /// 10.213.0.11, .12, ...; returns once every one runs systemd.
    pub fn boot(names: &[&str]) -> TestResult<Hosts> {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let lock = std::fs::File::create(LOCK_FILE)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
        // A bridge of an earlier run that was killed: ours by name.
        let _ = run("ip", &["link", "del", BRIDGE]);
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        let mut hosts = Hosts {
            hosts: Vec::new(),
            _turn: turn,
            _lock: lock,
        };
        run(
            "ip",
            &["addr", "add", &format!("{SUBNET}.1/24"), "dev", BRIDGE],
        )?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        let start = Instant::now();
        for (i, name) in names.iter().enumerate() {
            let host = Host::start(name, &format!("{SUBNET}.{}", 11 + i))?;
            hosts.hosts.push(host);
        }
        for host in &mut hosts.hosts {
            host.wait_booted()?;
            host.sh(&format!(
                "ip addr add {}/24 dev host0 && ip link set host0 up",
                host.addr
            ))?;
        }
        println!(
            "booted {} hosts in {:.1}s",
            names.len(),
            start.elapsed().as_secs_f64()
        );
        Ok(hosts)
    }

    pub fn get(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // The last booted first: agents hand their jobs back while the
        // coordinator (booted first) still answers.
        let start = Instant::now();
        for host in self.hosts.iter_mut().rev() {
            host.stop();
        }
        println!(
            "tore the hosts down in {:.1}s",
            start.elapsed().as_secs_f64()
        );
        let _ = run("ip", &["link", "del", BRIDGE]);
    }
}

impl Host {
    fn start(name: &str, addr: &str) -> TestResult<Host> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("drover-host-{name}-"))
            .tempdir()?
            .keep();
        let (up, root) = (dir.join("up"), dir.join("root"));
        std::fs::create_dir_all(&up)?;
        std::fs::create_dir_all(&root)?;
        run(
            "mount",
            &["-t", "tmpfs", "tmpfs", &up.display().to_string()],
        )?;
        std::fs::create_dir_all(up.join("upper"))?;
        std::fs::create_dir_all(up.join("work"))?;
        let layers = format!(
            "lowerdir=/,upperdir={},workdir={}",
            up.join("upper").display(),
            up.join("work").display()
        );
        run(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &layers,
                &root.display().to_string(),
            ],
        )?;
        std::fs::write(root.join("etc/hostname"), format!("{name}\n"))?;
        // Each host its own machine id (the agent's identity uses it).
        let id: String = (0..4).map(|_| format!("{:08x}", rand32())).collect();
        std::fs::write(root.join("etc/machine-id"), format!("{id}\n"))?;
        let console = std::fs::File::create(dir.join("console.log"))?;
        let nspawn = Command::new("systemd-nspawn")
            .args(["-D", &root.display().to_string()])
            .args(["--register=no", "--keep-unit", &format!("--machine={name}")])
            .arg(format!("--network-bridge={BRIDGE}"))
            .arg(format!("--bind-ro={}:{BIN_DIR}", build_dir().display()))
            .args(["-b", "--", "systemd.firstboot=off"])
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()?;
        Ok(Host {
            name: name.to_string(),
            addr: addr.to_string(),
            dir,
            nspawn,
            leader: 0,
        })
    }

    fn wait_booted(&mut self) -> TestResult {
        let nspawn = self.nspawn.id();
        self.leader = wait_for(
            &format!("host {} to start systemd", self.name),
            Duration::from_secs(30),
            || Ok(host_init(nspawn as i32)),
        )?;
        let mut state = String::new();
        let booted = wait_for(
            &format!("host {} to boot", self.name),
            Duration::from_secs(60),
            || {
                let out = self.exec("systemctl is-system-running", None)?;
                state = format!("{}{}", out.1.trim(), out.2.trim());
                Ok(matches!(state.as_str(), "running" | "degraded").then_some(()))
            },
        );
        if let Err(e) = booted {
            let console = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(15).collect();
            let jobs = self.exec("systemctl list-jobs --no-pager", None)?.1;
            return Err(format!(
                "{e} (leader {}, last state {state:?}; jobs: {jobs}; console: {})",
                self.leader,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
            .into());
        }
        Ok(())
    }

    /// Runs `cmd` with `sh -c` inside the host: (exit status, stdout, stderr).
    pub fn exec(&self, cmd: &str, stdin: Option<&[u8]>) -> TestResult<(i32, String, String)> {
        let mut child = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", cmd])
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(data)?;
        }
        let out = child.wait_with_output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs `cmd` inside the host; its stdout, or an error with both
    /// streams when it fails.
    pub fn sh(&self, cmd: &str) -> TestResult<String> {
        self.sh_in(cmd, None)
    }

    /// As `sh`, with `stdin` on its standard input (secrets: never argv).
    pub fn sh_in(&self, cmd: &str, stdin: Option<&[u8]>) -> TestResult<String> {
        let (status, out, err) = self.exec(cmd, stdin)?;
        if status != 0 {
            return Err(format!("on {}: `{cmd}` exited {status}: {out}{err}", self.name).into());
        }
        Ok(out)
    }

    /// Pulls the host's cable (its processes go on), or plugs it back.
    pub fn cable(&self, connected: bool) -> TestResult {
        let state = if connected { "up" } else { "down" };
        run("ip", &["link", "set", &format!("vb-{}", self.name), state])
    }

    /// Powers the host off (systemd stops its units), then unmounts and
    /// removes its overlay.
    fn stop(&mut self) {
        let pid = self.nspawn.id() as i32;
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(None) = self.nspawn.try_wait() {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        for m in ["root", "up"] {
            let path = self.dir.join(m).display().to_string();
            if run("umount", &[&path]).is_err() {
                let _ = run("umount", &["-l", &path]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The host's PID 1 (systemd) among nspawn's descendants: nspawn may start
/// it through helpers that come and go.
fn host_init(nspawn: i32) -> Option<i32> {
    let children = |pid: i32| -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let mut level = children(nspawn);
    for _ in 0..3 {
        let init = level.iter().copied().find(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            // PID 1 in its own namespace: the last NSpid field is 1.
            let pid1 = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ns| ns.split_whitespace().last() == Some("1"));
            pid1 && comm.trim() == "systemd"
        });
        if init.is_some() {
            return init;
        }
        level = level.into_iter().flat_map(children).collect();
    }
    None
}

/// Where the freshly built binaries are inside every host (bound read-only
/// from this machine's build dir: nspawn gives each host its own /tmp, so
/// a checkout under /tmp would not be seen).
pub const BIN_DIR: &str = "/opt/drover-test-bin";

/// Runs a command on this machine; an error says what failed.
fn run(program: &str, args: &[&str]) -> TestResult {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// The directory of the binaries under test (both are built there).
fn build_dir() -> PathBuf {
    coordinator_bin()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn rand32() -> u32 {
    let mut b = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut b)
    });
    u32::from_le_bytes(b)
}
