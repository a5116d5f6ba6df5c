//! One process per file: an exclusive `flock` on a lock file that names its
//! holder. The kernel drops the lock when the holder dies, so a lock left by
//! a `kill -9` never blocks a restart. Shared with drover-coordinator.

use rustix::fs::FlockOperation;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Held while alive; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Locks `path` (creating it 0600) and writes `holder` into it; when another
/// process holds it, the error says who (what that process wrote).
pub fn acquire(path: &Path, holder: &str) -> Result<Lock, LockError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| LockError::Io(format!("{}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    if let Err(e) = rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        if e != rustix::io::Errno::WOULDBLOCK {
            return Err(io(e.into()));
        }
        let mut text = String::new();
        let _ = file.take(4096).read_to_string(&mut text);
        return Err(LockError::Held(text.trim().to_string()));
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    file.write_all(format!("{holder}\n").as_bytes())
        .map_err(io)?;
    Ok(Lock { _file: file })
}

/// What stood in the way of a lock.
#[derive(Debug)]
pub enum LockError {
    /// Another live process holds it; what it wrote about itself.
    Held(String),
    Io(String),
}

/// This machine's host name, for a holder's description.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_dropped_one_frees_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = acquire(&path, "pid=1 first").unwrap();
        match acquire(&path, "pid=2 second") {
            Err(LockError::Held(who)) => assert_eq!(who, "pid=1 first"),
            other => panic!("expected the lock to be held: {other:?}"),
        }
        drop(first);
        let again = acquire(&path, "pid=3 third").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "pid=3 third\n");
        drop(again);
    }
}
