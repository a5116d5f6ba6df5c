//! Drover coordinator: the worker registry and the job queue in one SQLite
//! file behind an HTTP+JSON API. `main.rs` parses flags and calls [`run`].

#[macro_use]
extern crate drover_host;

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod dispatch;
pub mod error;
pub mod http;
pub mod install;
pub mod lifecycle;
pub mod matching;
pub mod metrics;
pub mod model;
pub mod parked;
pub mod ratelimit;
pub mod spec;
pub mod sweep;

use app::App;
use config::Config;
use db::{ms, Clock, Db};
use drover_host::lockfile;
use std::sync::Arc;

/// A database behind its high-water mark was restored (or copied): new ids
/// and attempts start past what its lost window may have handed out.
async fn guard_restore(db: &Db) -> Result<(), String> {
    let Some(path) = db.path() else {
        return Ok(());
    };
    let mark = db::highwater::read(path);
    let (next, moved) = db
        .guard_restore(mark)
        .await
        .map_err(|e| format!("checking the high-water mark: {e}"))?;
    if let Some(moved) = moved {
        log::warn!(
            "the database is behind its high-water mark ({}): restored or copied; \
             new job ids start at {next} and {moved} queued jobs' attempt numbers move on by {}, \
             so nothing handed out in the lost window is handed out again",
            mark.map_or("none beside it".to_string(), |m| format!(
                "job ids went up to {}",
                m - 1
            )),
            db::highwater::ATTEMPT_GAP
        );
    }
    // From now on the mark is this database's (the sweep moves it on).
    db::highwater::write(path, next)
}

/// Runs the coordinator until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), String> {
    let tls = match &config.tls {
        Some((cert, key)) => Some(http::tls_acceptor(cert, key)?),
        None => None,
    };
    let (db, _lock) = open_store(&config).await?;
    guard_restore(&db).await?;
    let grace = ms(config.restart_grace);
    let retry_base = ms(config.retry_backoff);
    let (leases, live, retimed) = db
        .prepare_start(grace, retry_base)
        .await
        .map_err(|e| format!("preparing the database: {e}"))?;
    if retimed > 0 {
        log::info!(
            "{retimed} waiting jobs re-timed to this start's clock (not_before, retry backoff)"
        );
    }
    if leases > 0 {
        log::info!(
            "restart grace: {leases} running leases and {live} workers get {}s to reconnect before anything is re-queued",
            config.restart_grace.as_secs()
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", config.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("reading the listening address: {e}"))?;
    log::info!(
        "listening on {}://{addr} db={} lease_ttl={}s auto_approve={}",
        if tls.is_some() { "https" } else { "http" },
        store_name(&config),
        config.lease_ttl.as_secs(),
        config.auto_approve
    );
    if let Some(warning) = cleartext_warning(addr, tls.is_some()) {
        log::warn!("{warning}");
    }
    let files = raise_open_files_limit();
    if let Some(n) = files.filter(|n| *n < config.max_connections as u64 + 64) {
        log::warn!(
            "the open-file limit is {n}, below --max-connections {} + 64: connections past it will fail; raise it (LimitNOFILE=, ulimit -n)",
            config.max_connections
        );
    }
    let max_connections = config.max_connections;
    let app = Arc::new(App::new(db, config));
    let sweeper = tokio::spawn(sweep::run(app.clone()));
    let retention = tokio::spawn(sweep::retain(app.clone()));
    let dispatcher = tokio::spawn(dispatch::run(app.clone()));
    let remote = tokio::spawn(wake_on_remote_work(app.clone()));
    // The listener is bound: connections queue until the loop accepts them.
    drover_host::notify::ready(&format!("listening on {addr}"));
    http::serve(
        listener,
        api::router(app),
        max_connections,
        tls,
        shutdown_signal(),
    )
    .await;
    sweeper.abort();
    retention.abort();
    dispatcher.abort();
    remote.abort();
    log::info!("stopping: every acknowledged write is already on disk");
    Ok(())
}

/// Work another coordinator announced (PostgreSQL) runs a dispatch round
/// for the claims parked here.
async fn wake_on_remote_work(app: Arc<App>) {
    let work = app.db.remote_work();
    loop {
        work.notified().await;
        app.dispatcher.kick();
    }
}

/// Opens the store `--db` names; an SQLite file is locked first.
async fn open_store(config: &Config) -> Result<(Db, Option<lockfile::Lock>), String> {
    let Some(url) = config.postgres.clone() else {
        let lock = lock_database(config)?;
        let db = Db::open(&config.db, config.synchronous_full, Clock::new())?;
        return Ok((db, Some(lock)));
    };
    // The PostgreSQL client blocks: it connects off the runtime.
    let ca = config.db_ca_cert.clone();
    let db = tokio::task::spawn_blocking(move || Db::open_pg(&url, ca.as_deref(), Clock::new()))
        .await
        .map_err(|e| format!("connecting to PostgreSQL: {e}"))??;
    Ok((db, None))
}

/// The store for the log: the file, or PostgreSQL's hosts and database
/// (never the URL, which may hold a password).
fn store_name(config: &Config) -> String {
    let Some(url) = &config.postgres else {
        return config.db.display().to_string();
    };
    match url.parse::<postgres::Config>() {
        Ok(pg) => format!(
            "postgres hosts={:?} dbname={}",
            pg.get_hosts(),
            pg.get_dbname().unwrap_or("")
        ),
        Err(_) => "postgres".into(),
    }
}

/// One coordinator per database file: a second would extend the first's
/// leases and serve beside it. The lock sits next to the file.
fn lock_database(config: &Config) -> Result<lockfile::Lock, String> {
    db::create_private(&config.db)?;
    let mut path = config.db.clone().into_os_string();
    path.push(".lock");
    let holder = format!(
        "pid={} host={} listen={}",
        std::process::id(),
        lockfile::hostname(),
        config.listen
    );
    lockfile::acquire(std::path::Path::new(&path), &holder).map_err(|e| match e {
        lockfile::LockError::Held(who) => format!(
            "another drover-coordinator already serves {} ({who}); stop it first, or give this one another --db",
            config.db.display()
        ),
        lockfile::LockError::Io(e) => format!("locking the database: {e}"),
    })
}

/// Every connection is an open file, and many shells start processes with
/// a soft limit of 1,024: raise it to the hard limit (as nginx and Go's
/// runtime do). Returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    // None is "unlimited".
    let (current, maximum) = (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    );
    let raised = Rlimit {
        current: lim.maximum,
        maximum: lim.maximum,
    };
    if current < maximum && setrlimit(Resource::Nofile, raised).is_ok() {
        return Some(maximum);
    }
    Some(current)
}

/// Plain HTTP beyond loopback sends every token in the clear: say so.
fn cleartext_warning(addr: std::net::SocketAddr, tls: bool) -> Option<String> {
    (!tls && !addr.ip().is_loopback()).then(|| {
        format!(
            "serving plain HTTP on {addr}: agent and admin tokens cross the network in cleartext; \
             use --tls-cert/--tls-key, a TLS proxy, or a private network (WireGuard)"
        )
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            log::warn!("cannot listen for SIGTERM ({e}); stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_http_beyond_loopback_is_warned_about() {
        let warn = |a: &str, tls| super::cleartext_warning(a.parse().unwrap(), tls);
        assert!(warn("0.0.0.0:8700", false).is_some_and(|w| w.contains("cleartext")));
        assert!(warn("10.1.2.3:8700", false).is_some());
        assert!(warn("[::]:8700", false).is_some());
        assert_eq!(warn("127.0.0.1:8700", false), None);
        assert_eq!(warn("[::1]:8700", false), None);
        assert_eq!(warn("0.0.0.0:8700", true), None);
    }
}
