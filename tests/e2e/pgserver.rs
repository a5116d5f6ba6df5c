//! A real PostgreSQL server for the tests and benchmarks: `initdb` as the
//! `postgres` user into a temp dir, `pg_ctl start` on a free 127.0.0.1
//! port, stopped (and removed) when dropped. Needs root (to become
//! `postgres`) and the PostgreSQL binaries on PATH; `.ci/run` makes both
//! required.

use super::harness::{free_port, TestResult};
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
}

/// Why the PostgreSQL tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (initdb runs as the postgres user)".into());
    }
    for bin in ["initdb", "pg_ctl", "postgres", "pg_basebackup"] {
        if which(bin).is_none() {
            return Some(format!(
                "needs PostgreSQL's {bin} on PATH (apt install postgresql)"
            ));
        }
    }
    if Command::new("id")
        .arg("postgres")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return Some("needs a postgres user (apt install postgresql)".into());
    }
    None
}

/// Skips (returning true) when PostgreSQL is missing, unless
/// DROVER_REQUIRE_POSTGRES is set: then missing it fails the test.
pub fn skip() -> bool {
    let Some(why) = missing() else {
        return false;
    };
    assert!(
        std::env::var_os("DROVER_REQUIRE_POSTGRES").is_none(),
        "DROVER_REQUIRE_POSTGRES is set but PostgreSQL cannot run: {why}"
    );
    eprintln!("skipped: {why}");
    true
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.exists())
    })
}

/// A PostgreSQL program's path as found on this process's PATH (`su` may
/// set another).
fn bin(name: &str) -> String {
    which(name).map_or(name.to_string(), |p| p.display().to_string())
}

/// Runs `cmd` (shell) as the postgres user.
fn as_postgres(cmd: &str) -> TestResult {
    let out = Command::new("su")
        .args(["postgres", "-s", "/bin/sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

impl PgServer {
    /// A new cluster, started.
    pub fn start() -> TestResult<PgServer> {
        PgServer::start_with_tls(None)
    }

    /// A new cluster, started; with `tls` (certificate PEM, key PEM) it
    /// also offers TLS with that certificate.
    pub fn start_with_tls(tls: Option<(&str, &str)>) -> TestResult<PgServer> {
        let dir = tempfile::tempdir()?;
        std::os::unix::fs::chown(dir.path(), Some(uid("postgres")?), None)?;
        let server = PgServer {
            dir,
            port: free_port()?,
        };
        as_postgres(&format!(
            "{} -D {} -A trust -U postgres --no-sync >/dev/null",
            bin("initdb"),
            server.data().display()
        ))?;
        if let Some((cert, key)) = tls {
            server.offer_tls(cert, key)?;
        }
        server.pg_ctl("start -w")?;
        server.create_db("drover")?;
        Ok(server)
    }

    /// `ssl = on` with this certificate and key (the key the postgres
    /// user's alone, as PostgreSQL insists).
    fn offer_tls(&self, cert: &str, key: &str) -> TestResult {
        use std::os::unix::fs::PermissionsExt;
        let postgres = uid("postgres")?;
        for (name, pem, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
            let path = self.data().join(name);
            std::fs::write(&path, pem)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            std::os::unix::fs::chown(&path, Some(postgres), None)?;
        }
        let conf = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str("\nssl = on\n");
        std::fs::write(&conf, text)?;
        Ok(())
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl(&self, what: &str) -> TestResult {
        as_postgres(&format!(
            "{pg_ctl} -D {data} -l {data}/../server.log -o '-p {port} -k {dir} -c listen_addresses=127.0.0.1' {what}",
            pg_ctl = bin("pg_ctl"),
            data = self.data().display(),
            port = self.port,
            dir = self.dir.path().display(),
        ))
    }

    /// A streaming standby of this server (`pg_basebackup -R`), started;
    /// `synchronous`: this server then waits for it at every commit.
    pub fn standby(&self, synchronous: bool) -> TestResult<PgServer> {
        let dir = tempfile::tempdir()?;
        std::os::unix::fs::chown(dir.path(), Some(uid("postgres")?), None)?;
        let standby = PgServer {
            dir,
            port: free_port()?,
        };
        as_postgres(&format!(
            "{} -h 127.0.0.1 -p {} -U postgres -D {} -R -X stream -c fast",
            bin("pg_basebackup"),
            self.port,
            standby.data().display()
        ))?;
        standby.pg_ctl("start -w")?;
        if synchronous {
            let mut client = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)?;
            client.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")?;
            client.batch_execute("SELECT pg_reload_conf()")?;
        }
        Ok(standby)
    }

    /// The standby becomes a primary.
    pub fn promote(&self) -> TestResult {
        self.pg_ctl("promote -w")
    }

    /// Immediate shutdown: the server's host lost.
    pub fn kill(&self) -> TestResult {
        self.pg_ctl("stop -m immediate -w")
    }

    /// Fast shutdown, then start again (the server restarted under load).
    pub fn restart(&self) -> TestResult {
        self.pg_ctl("stop -m fast -w")?;
        self.pg_ctl("start -w")
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn create_db(&self, name: &str) -> TestResult {
        let mut client = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)?;
        client.batch_execute(&format!("CREATE DATABASE {name}"))?;
        Ok(())
    }

    /// Runs `sql` on `db` and returns the first column of each row, as
    /// text.
    pub fn query(&self, db: &str, sql: &str) -> TestResult<Vec<String>> {
        let mut client = postgres::Client::connect(&self.url(db), postgres::NoTls)?;
        Ok(client
            .simple_query(sql)?
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.pg_ctl("stop -m immediate -w");
    }
}

fn uid(user: &str) -> TestResult<u32> {
    let out = Command::new("id").args(["-u", user]).output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}
