//! Command-line flags (each also read from a `DROVER_*` env var), validated
//! once into a [`Config`].

use crate::auth::Secret;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_DB: &str = "/var/lib/drover/drover.db";

/// `drover-coordinator [FLAGS]` runs the coordinator; `install` sets it up.
#[derive(Debug, Parser)]
#[command(
    name = "drover-coordinator",
    version,
    about = "Drover coordinator: the worker registry and job queue of a Drover fleet",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: Args,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Install this binary and its service on this machine (as root), with the
    /// flags given (the admin token and registration secret are generated
    /// when not given); prints the command that adds workers.
    #[command(mut_arg("db", |a| a
        .default_value(DEFAULT_DB)
        .help("SQLite database file (under PREFIX when --prefix is given)")))]
    Install {
        /// Root of the install: PREFIX/bin (default /usr/local/bin), and when
        /// given PREFIX/etc/drover (default /etc/drover),
        /// PREFIX/etc/systemd/system and PREFIX/var/lib/drover.
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Do not use systemd: start the coordinator detached.
        #[arg(long)]
        no_systemd: bool,
        #[command(flatten)]
        args: Box<Args>,
    },
    /// Writes a consistent copy of the database to PATH, also while the
    /// coordinator runs (SQLite's online backup); the copy is checked and
    /// appears whole or not at all.
    Backup {
        /// Where the copy goes; it must not exist.
        path: PathBuf,
        /// The database to copy.
        #[arg(long, env = "DROVER_DB", default_value = "drover.db")]
        db: PathBuf,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// SQLite database file (created if missing; keep it on a local disk),
    /// or a PostgreSQL URL (postgres://USER@HOST:PORT/DB; several hosts
    /// with target_session_attrs=read-write) shared by every coordinator.
    #[arg(long, env = "DROVER_DB", default_value = "drover.db")]
    pub db: PathBuf,

    /// Address and port to listen on.
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:8700")]
    pub listen: String,

    /// Bearer token for admin calls and submissions. When neither this nor
    /// --admin-token-file is given, one is generated on first start and kept
    /// 0600 in `admin.token` next to the database.
    #[arg(long, env = "DROVER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File holding the admin token (first line).
    #[arg(long, env = "DROVER_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,

    /// Shared secret agents present to register.
    #[arg(long, env = "DROVER_REGISTRATION_SECRET", hide_env_values = true)]
    pub registration_secret: Option<String>,

    /// Approve self-registered agents at once instead of waiting for an admin.
    #[arg(long, env = "DROVER_AUTO_APPROVE")]
    pub auto_approve: bool,

    /// Lease TTL in seconds; agents heartbeat every TTL / 3 and a worker
    /// silent for a TTL is marked offline.
    #[arg(long, env = "DROVER_LEASE_TTL", default_value_t = 30)]
    pub lease_ttl: u64,

    /// Seconds every lease is extended by at start, so that agents reconnect
    /// before anything is re-queued. Default: max(2 x lease TTL, 60).
    #[arg(long, env = "DROVER_RESTART_GRACE")]
    pub restart_grace: Option<u64>,

    /// Base of the exponential retry backoff after a failed attempt, seconds.
    #[arg(long, env = "DROVER_RETRY_BACKOFF", default_value_t = 10)]
    pub retry_backoff: u64,

    /// Seconds a multi-GPU job may wait for a worker with enough free GPUs
    /// before one is kept free for it (no new jobs) until it fits.
    #[arg(long, env = "DROVER_RESERVE_AFTER", default_value_t = 60)]
    pub reserve_after: u64,

    /// Most open HTTP connections; further connections are closed at once.
    #[arg(long, env = "DROVER_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Bytes of log kept per job attempt; the rest is dropped with a marker.
    #[arg(long, env = "DROVER_LOG_CAP", default_value_t = 16 * 1024 * 1024)]
    pub log_cap: u64,

    /// Days finished jobs (with their attempts and logs) are kept; 0 keeps
    /// them forever.
    #[arg(long, env = "DROVER_RETENTION_DAYS", default_value_t = 30)]
    pub retention_days: u64,

    /// Workers offline or stopped this long are forgotten (as by DELETE):
    /// a duration like 7d or 12h; 0 never forgets.
    #[arg(long, env = "DROVER_FORGET_OFFLINE_AFTER", default_value = "7d", value_parser = forget_after)]
    pub forget_offline_after: Duration,

    /// Hours each agent's own log lines are kept (besides the last 500 per
    /// worker); 0 keeps them until the 500 roll over.
    #[arg(long, env = "DROVER_AGENT_LOG_HOURS", default_value_t = 24)]
    pub agent_log_hours: u64,

    /// Hours of per-GPU metrics kept for the dashboard.
    #[arg(long, env = "DROVER_GPU_HISTORY_HOURS", default_value_t = 24)]
    pub gpu_history_hours: u64,

    /// PEM certificate chain: serve HTTPS instead of HTTP (with --tls-key).
    #[arg(long, env = "DROVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "DROVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate(s) of the CA that signed PostgreSQL's server
    /// certificate: connect to it over TLS, verified (with --db
    /// postgres://...). Without it the connection is plain.
    #[arg(long, env = "DROVER_DB_CA_CERT")]
    pub db_ca_cert: Option<PathBuf>,

    /// `full` (default: an acknowledged write survives power loss) or
    /// `normal` (never corrupts, may lose the last commits on power loss).
    #[arg(long, env = "DROVER_SQLITE_SYNCHRONOUS", default_value = "full")]
    pub sqlite_synchronous: String,

    /// An origin (scheme://host[:port]) whose pages may call the API from a
    /// browser (CORS); repeat for several. None by default.
    #[arg(
        long = "cors-origin",
        env = "DROVER_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
}

/// Checks `--cors-origin` values: an origin exactly as a browser sends it.
fn cors_origins(origins: Vec<String>) -> Result<Vec<String>, String> {
    for o in &origins {
        let rest = o
            .strip_prefix("https://")
            .or_else(|| o.strip_prefix("http://"));
        let plain = rest.is_some_and(|r| {
            !r.is_empty()
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        });
        if !plain {
            return Err(format!(
                "--cors-origin {o:?} is not an origin: scheme://host[:port], no path, no wildcard \
                 (e.g. https://dash.example.com)"
            ));
        }
    }
    Ok(origins)
}

/// Where `--db` points: (the SQLite file, the PostgreSQL URL). A path or
/// `sqlite://PATH` is SQLite; `postgres://` or `postgresql://` PostgreSQL.
pub(crate) fn store(db: &std::path::Path) -> (PathBuf, Option<String>) {
    let text = db.to_string_lossy();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return (PathBuf::from("drover.db"), Some(text.into_owned()));
    }
    match text.strip_prefix("sqlite://") {
        Some(path) => (PathBuf::from(path), None),
        None => (db.to_path_buf(), None),
    }
}

/// Validated settings, passed explicitly to every part.
#[derive(Debug, Clone)]
pub struct Config {
    /// The SQLite file (unused on PostgreSQL).
    pub db: PathBuf,
    /// The PostgreSQL URL, when `--db` is one.
    pub postgres: Option<String>,
    /// The CA of PostgreSQL's certificate: TLS to it.
    pub db_ca_cert: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin_token: Secret,
    pub registration_secret: Secret,
    pub auto_approve: bool,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub restart_grace: Duration,
    pub retry_backoff: Duration,
    pub reserve_after: Duration,
    pub max_connections: usize,
    pub log_cap: u64,
    pub gpu_history: Duration,
    pub retention: Option<Duration>,
    /// None: never forget offline workers.
    pub forget_offline_after: Option<Duration>,
    /// None: agent log lines are kept until the ring rolls over.
    pub agent_log: Option<Duration>,
    pub synchronous_full: bool,
    /// Certificate and key files, when serving HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Origins allowed to call the API from a browser.
    pub cors_origins: Vec<String>,
}

impl Config {
    /// Checks the flags. The admin token may have to be read or generated,
    /// which needs the database's directory; see [`crate::auth::admin_token`].
    pub fn from_args(args: Args) -> Result<Config, String> {
        let listen: SocketAddr = args
            .listen
            .parse()
            .map_err(|e| format!("--listen {:?} is not ADDR:PORT: {e}", args.listen))?;
        if args.lease_ttl < 3 {
            return Err(format!(
                "--lease-ttl {} is too short: at least 3 seconds (agents heartbeat every TTL/3)",
                args.lease_ttl
            ));
        }
        let registration_secret = match args.registration_secret {
            Some(s) if s.len() >= 8 => {
                crate::auth::refuse_placeholder(&s, "--registration-secret (DROVER_REGISTRATION_SECRET)")?;
                Secret::new(s)
            }
            Some(_) => return Err("--registration-secret must be at least 8 characters".into()),
            None => {
                return Err(
                    "--registration-secret (or DROVER_REGISTRATION_SECRET) is required: agents present it to register"
                        .into(),
                )
            }
        };
        let synchronous_full = match args.sqlite_synchronous.as_str() {
            "full" => true,
            "normal" => false,
            other => {
                return Err(format!(
                    "--sqlite-synchronous {other:?}: expected full or normal"
                ))
            }
        };
        if args.max_connections < 16 {
            return Err("--max-connections must be at least 16".into());
        }
        let (db, postgres) = store(&args.db);
        if postgres.is_some() && args.admin_token.is_none() && args.admin_token_file.is_none() {
            return Err(
                "with --db postgres://..., give --admin-token-file (or --admin-token): \
                 every coordinator of the database must take the same one"
                    .into(),
            );
        }
        let admin_token =
            crate::auth::admin_token(args.admin_token, args.admin_token_file.as_deref(), &db)?;
        let lease_ttl = Duration::from_secs(args.lease_ttl);
        let restart_grace = Duration::from_secs(
            args.restart_grace
                .unwrap_or_else(|| (2 * args.lease_ttl).max(60)),
        );
        Ok(Config {
            db,
            postgres,
            db_ca_cert: args.db_ca_cert,
            listen,
            admin_token,
            registration_secret,
            auto_approve: args.auto_approve,
            lease_ttl,
            heartbeat_interval: lease_ttl / 3,
            restart_grace,
            retry_backoff: Duration::from_secs(args.retry_backoff),
            reserve_after: Duration::from_secs(args.reserve_after),
            max_connections: args.max_connections,
            log_cap: args.log_cap,
            gpu_history: Duration::from_secs(args.gpu_history_hours * 3600),
            agent_log: (args.agent_log_hours > 0)
                .then(|| Duration::from_secs(args.agent_log_hours * 3600)),
            forget_offline_after: (!args.forget_offline_after.is_zero())
                .then_some(args.forget_offline_after),
            retention: (args.retention_days > 0)
                .then(|| Duration::from_secs(args.retention_days * 86_400)),
            synchronous_full,
            tls: args.tls_cert.zip(args.tls_key),
            cors_origins: cors_origins(args.cors_origins)?,
        })
    }
}

/// `--forget-offline-after`: a duration (7d, 12h, 90m), or 0 for never.
fn forget_after(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 7d or 12h (0: never): {e}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `install --help` shows the database install really uses.
    #[test]
    fn install_shows_its_own_database_default() {
        let mut cli = super::Cli::command();
        cli.build();
        let install = cli.find_subcommand("install").unwrap();
        let db = install
            .get_arguments()
            .find(|a| a.get_id() == "db")
            .unwrap();
        let defaults: Vec<_> = db.get_default_values().iter().collect();
        assert_eq!(defaults, vec![super::DEFAULT_DB]);
    }
}
