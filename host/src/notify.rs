//! The systemd notification protocol (`sd_notify(3)`): a datagram of
//! `KEY=VALUE` lines to `$NOTIFY_SOCKET`. Units with `Type=notify` are
//! "started" once READY=1 arrives; STATUS= shows in `systemctl status`;
//! WATCHDOG=1 must come every `WatchdogSec` or systemd restarts the unit.
//! Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Whether this process runs under systemd's notification protocol (read
/// once: callers on busy paths skip building their messages otherwise).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("NOTIFY_SOCKET").is_some())
}

/// Sends `state` (newline-separated assignments); false when there is no
/// socket or it could not be reached.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket name.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    sent.is_ok()
}

/// Says the service is up, and what it is doing.
pub fn ready(status: &str) -> bool {
    notify(&format!("READY=1\nSTATUS={status}"))
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

    /// What a service sends arrives at the socket `$NOTIFY_SOCKET` names.
    #[test]
    fn messages_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        // This test owns NOTIFY_SOCKET in this process (no other test sets it).
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(ready("listening on 127.0.0.1:8700"));
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "READY=1\nSTATUS=listening on 127.0.0.1:8700"
        );
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!status("nobody listens"));
    }
}
