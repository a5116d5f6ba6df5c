//! `drover-coordinator backup PATH`: a consistent copy of the database
//! while the coordinator runs, by SQLite's online backup API in one step
//! (one read transaction: a snapshot, whatever the writer does meanwhile).
//! The copy is checked (`PRAGMA integrity_check`) and synced under a
//! temporary name, then renamed into place: PATH is either whole or absent.

use super::APPLICATION_ID;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a backup copied.
#[derive(Debug)]
pub struct Copied {
    pub pages: i64,
    pub bytes: u64,
    pub took: Duration,
    pub schema_version: i64,
}

/// Copies the Drover database `db` to `dest`, which must not exist.
pub fn backup(db: &Path, dest: &Path) -> Result<Copied, String> {
    let url = db.to_string_lossy();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // (The URL is not echoed: it may hold a password.)
        return Err(
            "backup copies an SQLite file; back up a PostgreSQL store with \
             PostgreSQL's own tools (pg_dump, pg_basebackup, a streaming standby)"
                .into(),
        );
    }
    if dest.exists() {
        return Err(format!(
            "{} already exists: a backup never overwrites; pick a new path",
            dest.display()
        ));
    }
    let start = Instant::now();
    let from = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("opening {}: {e}", db.display()))?;
    let _ = from.busy_timeout(Duration::from_secs(10));
    let (app_id, schema_version): (i64, i64) = from
        .query_row(
            "SELECT (SELECT application_id FROM pragma_application_id), (SELECT user_version FROM pragma_user_version)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(|e| format!("reading {}: {e}", db.display()))?;
    if app_id != APPLICATION_ID {
        return Err(format!("{} is not a Drover database", db.display()));
    }
    let partial = partial_path(dest);
    let _ = std::fs::remove_file(&partial);
    let pages = match copy(&from, &partial).and_then(|p| put_in_place(&partial, dest).map(|()| p)) {
        Ok(pages) => pages,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    Ok(Copied {
        pages,
        bytes,
        took: start.elapsed(),
        schema_version,
    })
}

/// `dest` with `.partial` added: beside it, so the rename stays on one
/// file system.
fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

/// Copies every page in one step and checks the copy; returns the pages.
fn copy(from: &Connection, to_path: &Path) -> Result<i64, String> {
    let mut to =
        Connection::open(to_path).map_err(|e| format!("creating {}: {e}", to_path.display()))?;
    let pages = {
        let b = rusqlite::backup::Backup::new(from, &mut to)
            .map_err(|e| format!("starting the backup: {e}"))?;
        // Every page in one step: one read transaction, one snapshot. Busy
        // or locked (a checkpoint holds the file a moment): again.
        let mut tries = 0;
        loop {
            use rusqlite::backup::StepResult;
            match b
                .step(-1)
                .map_err(|e| format!("copying the database: {e}"))?
            {
                StepResult::Done => break,
                _ if tries >= 100 => return Err("the database stayed busy for 10 s".into()),
                _ => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        b.progress().pagecount as i64
    };
    let check: String = to
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| format!("checking the copy: {e}"))?;
    if check != "ok" {
        return Err(format!("the copy failed its integrity check: {check}"));
    }
    Ok(pages)
}

/// Syncs the copy (0600: it holds token hashes) and renames it to `dest`,
/// then syncs the directory.
fn put_in_place(partial: &Path, dest: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::open(partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("syncing {}: {e}", partial.display()))?;
    std::fs::rename(partial, dest).map_err(|e| format!("renaming to {}: {e}", dest.display()))?;
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_is_whole_checked_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("drover.db");
        super::super::create_private(&db).unwrap();
        let mut conn = Connection::open(&db).unwrap();
        super::super::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO jobs (status, command, spec_sha256, run_after, created_at)
             VALUES ('queued', '[\"true\"]', 'x', 0, 0);",
        )
        .unwrap();
        let dest = dir.path().join("copy.db");
        let copied = backup(&db, &dest).unwrap();
        assert!(copied.pages > 0 && copied.bytes > 0);
        assert_eq!(copied.schema_version, super::super::schema_version());
        let n: i64 = Connection::open(&dest)
            .unwrap()
            .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        assert!(!partial_path(&dest).exists());
        let again = backup(&db, &dest).unwrap_err();
        assert!(again.contains("never overwrites"), "{again}");

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x);")
            .unwrap();
        let secret = Path::new("postgres://drover:hunter2@db:5432/drover");
        let err = backup(secret, &dir.path().join("pg.db")).unwrap_err();
        assert!(err.contains("pg_dump") && !err.contains("hunter2"), "{err}");
        let err = backup(&other, &dir.path().join("x.db")).unwrap_err();
        assert!(err.contains("not a Drover database"), "{err}");
    }
}
