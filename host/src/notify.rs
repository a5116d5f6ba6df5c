//! The systemd notification protocol (`sd_notify(3)`): a datagram of
//! `KEY=VALUE` lines to `$NOTIFY_SOCKET`. Units with `Type=notify` are
//! "started" once READY=1 arrives; STATUS= shows in `systemctl status`;
//! WATCHDOG=1 must come every `WatchdogSec` or systemd restarts the unit.
//! Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.

//!
//! `install` starts a service without systemd the same way: it gives it a
//! `$NOTIFY_SOCKET` of its own and waits for READY=1 (or the process's
//! exit). Such a process (no `$INVOCATION_ID`: systemd did not start it)
//! forgets the socket once READY=1 is sent.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Where this process's notifications go.
struct Target {
    path: Mutex<Option<OsString>>,
    enabled: AtomicBool,
    /// For READY=1 alone (started by `install`, not by systemd).
    once: bool,
}

impl Target {
    fn new(path: Option<OsString>, once: bool) -> Target {
        Target {
            enabled: AtomicBool::new(path.is_some()),
            path: Mutex::new(path),
            once,
        }
    }

    fn path(&self) -> Option<OsString> {
        self.path.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn send(&self, state: &str) -> bool {
        self.path().is_some_and(|path| send_to(&path, state))
    }

    fn ready(&self, status: &str) -> bool {
        let sent = self.send(&format!("READY=1\nSTATUS={status}"));
        if self.once {
            *self.path.lock().unwrap_or_else(|e| e.into_inner()) = None;
            self.enabled.store(false, Ordering::Relaxed);
        }
        sent
    }
}

/// `$NOTIFY_SOCKET` as this process found it.
fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        Target::new(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var_os("INVOCATION_ID").is_none(),
        )
    })
}

/// Whether notifications go anywhere (callers on busy paths skip building
/// their messages otherwise).
pub fn enabled() -> bool {
    target().enabled.load(Ordering::Relaxed)
}

/// Sends `state` (newline-separated assignments); false when there is no
/// socket or it could not be reached.
pub fn notify(state: &str) -> bool {
    target().send(state)
}

/// One datagram to the socket at `path` (`@name`: an abstract one).
fn send_to(path: &OsString, state: &str) -> bool {
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        }
        None => sock.send_to(state.as_bytes(), path),
    };
    sent.is_ok()
}

/// Says the service is up, and what it is doing.
pub fn ready(status: &str) -> bool {
    target().ready(status)
}

/// A status line for `systemctl status`.
pub fn status(status: &str) -> bool {
    notify(&format!("STATUS={status}"))
}

/// How often to ping the watchdog: half of `WatchdogSec`, when systemd set
/// one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog.
pub fn watchdog() -> bool {
    notify("WATCHDOG=1")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a service sends arrives at the socket `$NOTIFY_SOCKET` names;
    /// one started by `install` (not systemd) sends READY=1 and no more.
    #[test]
    fn messages_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        let mut recv = || {
            let n = socket.recv(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let service = Target::new(Some(path.clone().into()), false);
        assert!(service.ready("listening on 127.0.0.1:8700"));
        assert_eq!(
            recv().as_deref(),
            Some("READY=1\nSTATUS=listening on 127.0.0.1:8700")
        );
        assert!(service.send("STATUS=busy"));
        assert_eq!(recv().as_deref(), Some("STATUS=busy"));

        let detached = Target::new(Some(path.into()), true);
        assert!(detached.ready("registered"));
        assert!(recv().is_some_and(|m| m.starts_with("READY=1")));
        assert!(!detached.enabled.load(Ordering::Relaxed));
        assert!(!detached.send("STATUS=later"), "forgotten after READY");
        assert_eq!(recv(), None);
        assert!(!Target::new(None, false).send("STATUS=nobody listens"));
    }
}
