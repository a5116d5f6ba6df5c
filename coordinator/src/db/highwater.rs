//! The high-water mark: the next job id this database may hand out, kept
//! in a file beside it (`DB.high-water`), outside the database. A database
//! restored from a replica or a backup is behind what its coordinator
//! handed out: the jobs of the lost window are gone, and their ids (and the
//! attempt numbers of jobs granted in it) would be handed out again, to
//! agents that may still run the lost ones. At start, a database behind its
//! mark, or one with jobs but no mark beside it (restored elsewhere), gets
//! new ids from past the mark plus `ID_GAP`, and its queued jobs' attempt
//! numbers move on by `ATTEMPT_GAP`: nothing handed out before can pass for
//! what is handed out next.

use std::path::{Path, PathBuf};

/// Job ids skipped after a restore: more than a replication lag's worth of
/// submissions.
pub const ID_GAP: i64 = 100_000;
/// What queued jobs' attempt numbers move on by after a restore.
pub const ATTEMPT_GAP: i64 = 1_000;

/// `DB.high-water`.
pub fn path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push(".high-water");
    PathBuf::from(name)
}

/// The mark beside `db`, if there is one.
pub fn read(db: &Path) -> Option<i64> {
    std::fs::read_to_string(path(db)).ok()?.trim().parse().ok()
}

/// The mark as the database writer keeps it: after every commit that moved
/// the next job id on, and before any request of that commit is answered,
/// so that no acknowledged id is ever past the mark. (A mark written by a
/// timer lagged the last second's ids: a replica restored from inside that
/// second was not behind it, and handed those ids out again.)
pub struct Mark {
    db: PathBuf,
    written: Option<i64>,
}

impl Mark {
    pub fn new(db: &Path) -> Mark {
        Mark {
            db: db.to_path_buf(),
            written: read(db),
        }
    }

    /// After a commit: moves the mark on to the next job id, never back
    /// (retention may delete the newest job).
    pub fn follow(&mut self, conn: &super::Connection) {
        let next = match super::jobs::next_id(conn) {
            Ok(next) => next,
            Err(e) => return log::warn!("reading the next job id for the high-water mark: {e}"),
        };
        if self.written.is_some_and(|w| next <= w) {
            return;
        }
        match write(&self.db, next) {
            Ok(()) => self.written = Some(next),
            Err(e) => log::warn!("{e}: a restore could not tell how far ids went"),
        }
    }
}

/// Writes the mark (under a temporary name, then renamed: whole or old).
pub fn write(db: &Path, next_id: i64) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let target = path(db);
    let mut tmp = target.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    f.write_all(format!("{next_id}\n").as_bytes())
        .and_then(|()| std::fs::rename(&tmp, &target))
        .map_err(|e| format!("writing {}: {e}", target.display()))
}

/// Where new job ids start, given the database's next id and the mark
/// beside it: `None` when the database is not behind (nothing to skip).
pub fn restored_floor(next_id: i64, mark: Option<i64>) -> Option<i64> {
    match mark {
        Some(m) if m > next_id => Some(m + ID_GAP),
        Some(_) => None,
        // Jobs but no mark: restored or copied from another machine.
        None if next_id > 1 => Some(next_id + ID_GAP),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_behind_its_mark_skips_past_it() {
        assert_eq!(restored_floor(10, Some(10)), None, "the same database");
        assert_eq!(restored_floor(12, Some(10)), None, "the mark lags a second");
        assert_eq!(restored_floor(8, Some(10)), Some(10 + ID_GAP), "restored");
        assert_eq!(
            restored_floor(8, None),
            Some(8 + ID_GAP),
            "restored elsewhere"
        );
        assert_eq!(restored_floor(1, None), None, "a new database");
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("drover.db");
        assert_eq!(read(&db), None);
        write(&db, 42).unwrap();
        assert_eq!(read(&db), Some(42));
    }
}
