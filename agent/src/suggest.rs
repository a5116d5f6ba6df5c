//! One table from the failures people hit when putting agents on machines to
//! the fix for each. A suggestion names the fix, not the symptom.

pub const NO_SYSTEMD: &str =
    "no systemd on this machine (an LXC or plain container without it?): install with --no-systemd, which starts the agent detached";
pub const NVML: &str = "install the NVIDIA driver on the host and check nvidia-smi; in an LXC container, pass /dev/nvidia* and the driver's libnvidia-ml.so.1 into the container (README: Adding machines)";

/// (any of these fragments, case-insensitive) -> the fix. Most specific first.
const TABLE: &[(&[&str], &str)] = &[
    (
        &["permission denied (publickey"],
        "the host refused your SSH key: copy it there with ssh-copy-id USER@HOST, or pass the right key with --identity FILE",
    ),
    (
        &["remote host identification has changed"],
        "the host key changed (reinstalled machine?): if that is expected, ssh-keygen -R HOST, then connect once to accept the new key",
    ),
    (
        &["host key verification failed", "no matching host key", "host key for"],
        "the host key is not known yet: check it and add it with ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts (or connect once with ssh)",
    ),
    (
        &["a password is required", "a terminal is required", "sudo: no tty"],
        "sudo asks for a password: deploy as root (root@HOST), or allow passwordless sudo for the drover-agent install step",
    ),
    (
        &["coordinator unreachable", "coordinator is not reachable"],
        "the worker cannot reach the coordinator: the coordinator listens on 127.0.0.1:8700 by default; set DROVER_LISTEN=0.0.0.0:8700 in its env file (/etc/drover/coordinator.env), restart it, open the port in the firewall, and give agents an address they can reach",
    ),
    (
        &["connection refused"],
        "nothing listens on that port: check the port (USER@HOST:PORT) and that the service runs there, and that no firewall rejects it",
    ),
    (
        &["timed out", "no route to host", "network is unreachable", "could not resolve hostname", "name or service not known"],
        "the host does not answer: check its address and name, the network path and the firewall",
    ),
    (
        &["wrong registration secret", "401 unauthorized"],
        "the registration secret does not match: set DROVER_REGISTRATION_SECRET (--registration-secret) to the coordinator's",
    ),
    (&["systemd is not running"], NO_SYSTEMD),
    (
        &["exec format error", "cannot execute binary file"],
        "the binary was built for another CPU architecture: build drover-agent for the target (cargo build --release --target <arch>-unknown-linux-gnu)",
    ),
    (
        &["glibc_", "version `glibc"],
        "the target's glibc is older than the one drover-agent was built against: build on (or for) the oldest distribution in the fleet",
    ),
    (&["libnvidia-ml", "nvml"], NVML),
];

/// The fix for a failure message, if we know one.
pub fn suggest(message: &str) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    TABLE
        .iter()
        .find(|(fragments, _)| fragments.iter().any(|f| m.contains(f)))
        .map(|(_, fix)| *fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_gets_its_fix() {
        let check = |message: &str, fix_mentions: &str| {
            let s = suggest(message).unwrap_or_else(|| panic!("no suggestion for {message:?}"));
            assert!(
                s.contains(fix_mentions),
                "{message:?} -> {s:?} should mention {fix_mentions:?}"
            );
        };
        check(
            "root@10.0.0.5: Permission denied (publickey,password).",
            "ssh-copy-id",
        );
        check(
            "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@",
            "ssh-keygen -R",
        );
        check("Host key verification failed.", "ssh-keyscan");
        check("No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\nHost key verification failed.", "ssh-keyscan");
        check(
            "ssh: connect to host 10.0.0.5 port 22: Connection refused",
            "USER@HOST:PORT",
        );
        check(
            "ssh: connect to host 10.0.0.9 port 22: Connection timed out",
            "firewall",
        );
        check(
            "ssh: Could not resolve hostname gpu-7: Name or service not known",
            "address",
        );
        check("sudo: a password is required", "passwordless sudo");
        check(
            "coordinator unreachable at http://127.0.0.1:8700: Connection refused",
            "DROVER_LISTEN=0.0.0.0:8700",
        );
        check("registration secret refused: coordinator answered 401 unauthorized: wrong registration secret", "DROVER_REGISTRATION_SECRET");
        check("systemd is not running on this machine", "--no-systemd");
        check(
            "bash: /tmp/drover-agent: cannot execute binary file: Exec format error",
            "--target",
        );
        check(
            "/tmp/drover-agent: /lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.34' not found",
            "oldest distribution",
        );
        check(
            "NVML: libnvidia-ml.so.1: cannot open shared object file",
            "/dev/nvidia*",
        );
        assert_eq!(suggest("all good"), None);
    }
}
