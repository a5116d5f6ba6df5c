//! What both Drover binaries do on a host, outside the product's logic:
//! the lock file that keeps one coordinator per database and one agent per
//! state directory, and the service plumbing of their install commands
//! (systemd units, env files, a detached process where there is no
//! systemd).

/// `println!` that ignores a closed stdout (output piped into `head`, say):
/// an install must not stop half way because nobody reads its report.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

pub mod lockfile;
pub mod notify;
pub mod service;
