//! What only PostgreSQL has: its schema and migrations, the writers' lock,
//! the wake-ups between coordinators (LISTEN/NOTIFY) and the lock that
//! picks the one coordinator that runs the background work.

use super::sql::Connection;
use super::StoreError;
use rusqlite::params;

/// The schema, section by section (see its header).
const SCHEMA: &str = include_str!("../../../schema-postgres.sql");

/// Advisory lock keys ("DRVR" and a number).
pub const WRITERS: i64 = 0x4452_5652_0001;
const MIGRATIONS: i64 = 0x4452_5652_0002;
pub const LEADER: i64 = 0x4452_5652_0003;

/// The channel coordinators notify after a commit that may wake a claim.
pub const CHANNEL: &str = "drover_wake";

/// How a coordinator reaches PostgreSQL: in the clear, or over TLS
/// verified against the CA of `--db-ca-cert` (then always: a server that
/// offers no TLS is refused, not talked to in the clear).
#[derive(Clone)]
pub enum Tls {
    Off,
    Verified(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    pub fn new(ca: Option<&std::path::Path>) -> Result<Tls, String> {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let Some(ca) = ca else {
            return Ok(Tls::Off);
        };
        let read =
            |e: &dyn std::fmt::Display| format!("reading --db-ca-cert {}: {e}", ca.display());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| read(&e))? {
            roots
                .add(cert.map_err(|e| read(&e))?)
                .map_err(|e| read(&e))?;
        }
        if roots.is_empty() {
            return Err(read(&"no PEM certificate in it"));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to PostgreSQL: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls::Verified(
            tokio_postgres_rustls::MakeRustlsConnect::new(config),
        ))
    }

    /// The URL's settings, checked against this TLS choice.
    pub fn config(&self, url: &str) -> Result<postgres::Config, String> {
        use postgres::config::SslMode;
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| format!("the PostgreSQL URL is not valid: {e}"))?;
        match self {
            Tls::Verified(_) => {
                config.ssl_mode(SslMode::Require);
            }
            Tls::Off if config.get_ssl_mode() == SslMode::Require => {
                return Err(
                    "the PostgreSQL URL asks for sslmode=require: give --db-ca-cert, \
                     the CA that signed the server's certificate"
                        .into(),
                )
            }
            Tls::Off => {
                config.ssl_mode(SslMode::Disable);
            }
        }
        Ok(config)
    }

    pub fn connect(&self, config: &postgres::Config) -> Result<postgres::Client, postgres::Error> {
        match self {
            Tls::Off => config.connect(postgres::NoTls),
            Tls::Verified(tls) => config.connect(tls.clone()),
        }
    }
}

/// Applies the migrations the database lacks, each in one transaction,
/// under a lock so that coordinators starting together migrate once.
/// Refuses a database newer than this binary.
pub fn migrate(conn: &Connection) -> Result<(), String> {
    let known = super::schema_version();
    let sections = super::sections(SCHEMA);
    if sections.last().map(|s| s.0) != Some(known) {
        return Err(format!(
            "schema-postgres.sql does not reach schema version {known}: this binary is broken"
        ));
    }
    for (v, sql) in sections {
        let step = |e: StoreError| format!("migrating PostgreSQL to schema version {v}: {e}");
        conn.execute_batch("BEGIN").map_err(step)?;
        let applied = apply(conn, v, sql, known);
        let end = if applied.as_ref().is_ok_and(|done| *done) {
            conn.execute_batch("COMMIT")
        } else {
            conn.execute_batch("ROLLBACK")
        };
        if applied.map_err(step)? {
            end.map_err(step)?;
            log::info!("database migrated to schema version {v}");
        }
    }
    Ok(())
}

/// Inside a transaction: applies migration `v` unless the database has
/// it. True when it was applied.
fn apply(conn: &Connection, v: i64, sql: &str, known: i64) -> Result<bool, StoreError> {
    conn.execute("SELECT pg_advisory_xact_lock(?1)", params![MIGRATIONS])?;
    conn.execute_batch(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS drover_schema (version BIGINT NOT NULL)",
    )?;
    let at: Option<i64> =
        conn.query_row("SELECT max(version) FROM drover_schema", params![], |r| {
            r.get(0)
        })?;
    let at = at.unwrap_or(0);
    if at > known {
        return Err(StoreError::new(
            super::Kind::Invalid,
            "schema_too_new",
            format!(
                "the database is at schema version {at} but this drover-coordinator knows only up to {known}; run a newer binary"
            ),
        ));
    }
    if at >= v {
        return Ok(false);
    }
    conn.execute_batch(sql)?;
    conn.execute("DELETE FROM drover_schema", params![])?;
    conn.execute(
        "INSERT INTO drover_schema (version) VALUES (?1)",
        params![v],
    )?;
    Ok(true)
}

/// Listens for the other coordinators' commits (LISTEN on [`CHANNEL`]),
/// on a thread of its own with its own connection: every notification
/// bumps `commits` (followers of events and logs read again), and a
/// `work` one wakes `work` (the dispatcher runs a round for the claims
/// parked here). Reconnects after a lost connection, and then wakes both:
/// what was announced meanwhile is not known.
pub fn listen(
    url: &str,
    tls: Tls,
    commits: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    work: std::sync::Arc<tokio::sync::Notify>,
) -> Result<(), String> {
    let config = tls.config(url)?;
    let wake = move |kind: &str| {
        commits.send_modify(|n| *n = n.wrapping_add(1));
        if kind == "work" {
            work.notify_one();
        }
    };
    std::thread::Builder::new()
        .name("pg-listen".into())
        .spawn(move || loop {
            match tls.connect(&config) {
                Ok(mut client) => {
                    wake("work");
                    if let Err(e) = follow(&mut client, &wake) {
                        log::warn!("listening for other coordinators: {e}; reconnecting");
                    }
                }
                Err(e) => log::warn!("listening for other coordinators: {e}; retrying"),
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        })
        .map(drop)
        .map_err(|e| format!("starting the PostgreSQL listener thread: {e}"))
}

/// Hands each notification to `wake` until the connection fails.
fn follow(client: &mut postgres::Client, wake: &impl Fn(&str)) -> Result<(), postgres::Error> {
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    use postgres::fallible_iterator::FallibleIterator;
    loop {
        let next = client
            .notifications()
            .timeout_iter(std::time::Duration::from_secs(5))
            .next()?;
        match next {
            Some(n) => wake(n.payload()),
            // Quiet: check that the connection still stands.
            None => client.batch_execute("SELECT 1")?,
        }
    }
}

/// The leader lock: the one coordinator holding it runs the lease sweep
/// and retention. A session lock on a connection of its own, so that it
/// goes with the holder's session (a dead coordinator's is gone once the
/// server notices, within seconds with TCP keepalives) and another
/// coordinator's next try takes it.
pub struct Leader {
    config: postgres::Config,
    tls: Tls,
    client: Option<postgres::Client>,
    /// Whether `client`'s session holds the lock.
    held: bool,
    /// When the lock was last checked: the sweep and retention both ask,
    /// the server is asked once per `RECHECK`.
    checked: Option<std::time::Instant>,
}

/// How long a leader check's answer stands (under the sweep's second).
const RECHECK: std::time::Duration = std::time::Duration::from_millis(900);

impl Leader {
    pub fn new(url: &str, tls: Tls) -> Result<Leader, String> {
        Ok(Leader {
            config: tls.config(url)?,
            tls,
            client: None,
            held: false,
            checked: None,
        })
    }

    /// Whether this coordinator leads now: takes the lock when it is free,
    /// and notices losing it with its session.
    pub fn check(&mut self) -> bool {
        if self.checked.is_some_and(|t| t.elapsed() < RECHECK) {
            return self.held;
        }
        self.checked = Some(std::time::Instant::now());
        let was = self.held;
        self.held = match self.try_lock() {
            Ok(held) => held,
            Err(e) => {
                log::warn!("checking the leader lock: {e}");
                self.client = None;
                false
            }
        };
        if self.held != was {
            match self.held {
                true => {
                    log::info!("this coordinator now leads: it runs the lease sweep and retention")
                }
                false => log::warn!(
                    "this coordinator does not lead: another runs the lease sweep and retention"
                ),
            }
        }
        self.held
    }

    /// Takes the lock (again: session locks stack, so a re-take by the
    /// holder is undone at once). A new session holds nothing yet.
    fn try_lock(&mut self) -> Result<bool, postgres::Error> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.held = false;
            let mut client = self.tls.connect(&self.config)?;
            // The server notices a holder gone without a goodbye (a host
            // lost, a cable cut) within ~10 s, not TCP's default 2 hours.
            client.batch_execute(
                "SET tcp_keepalives_idle = 4; SET tcp_keepalives_interval = 2; \
                 SET tcp_keepalives_count = 3",
            )?;
            self.client = Some(client);
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(false);
        };
        let took: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER])?
            .try_get(0)?;
        if took && self.held {
            client.execute("SELECT pg_advisory_unlock($1)", &[&LEADER])?;
        }
        Ok(took)
    }
}
