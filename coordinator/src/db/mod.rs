//! The only module that touches SQLite.
//!
//! One writer thread owns the write connection. Requests send it closures;
//! it runs whatever is pending in one `BEGIN IMMEDIATE` transaction, each
//! closure inside its own savepoint (a failing request rolls back only its own
//! changes), commits once, then answers every waiter (group commit: one fsync
//! for many requests). Reads run on a small pool of read-only connections in
//! tokio's blocking pool, never on the async runtime and never holding a
//! snapshot across a wait.

/// A statement on the job an attempt belongs to, under the fence: the
/// parameters ?1 job id, ?2 attempt, ?3 worker id. The only place the fence
/// is spelled.
macro_rules! fenced {
    ($head:literal) => {
        fenced!($head, "")
    };
    ($head:literal, $tail:literal) => {
        concat!(
            $head,
            " WHERE id = ?1 AND attempt = ?2 AND worker_id = ?3 AND status = 'running'",
            $tail
        )
    };
}

pub mod agent_log;
pub mod backup;
pub mod dispatch;
pub mod events;
pub mod highwater;
pub mod jobs;
pub mod leases;
pub mod logs;
mod ops;
pub mod pg;
pub mod retention;
pub mod sql;
pub mod tokens;
pub mod worker_state;
pub mod workers;

mod error;
use crate::metrics::Histogram;
pub use error::{Kind, StoreError};
pub use ops::{BeatTimes, ClaimRecord, Pass};
use rusqlite::{params, OpenFlags};
pub use sql::Connection;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// The schema, applied section by section (see its header).
const SCHEMA: &str = include_str!("../../../schema.sql");
/// "DRVR": marks the file as a Drover database.
const APPLICATION_ID: i64 = 0x4452_5652;
const READERS: usize = 4;
/// Most operations committed in one transaction.
const MAX_BATCH: usize = 512;
/// Prepared statements kept per connection. rusqlite keeps 16 by default;
/// the writer alone uses far more, and evicted ones are parsed again.
const STATEMENT_CACHE: usize = 512;

/// Milliseconds since the Unix epoch.
pub type Ms = i64;

/// How long a statement waits for a lock another connection holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a checkpoint waits for readers to leave the WAL.
const CHECKPOINT_WAIT: Duration = Duration::from_millis(100);

/// A change of the wall clock's offset that counts as a step (NTP slewing
/// adds up to one too, eventually).
pub const CLOCK_STEP: Ms = 1000;

/// The coordinator's clock: wall time at start plus monotonic time since.
/// Stepping the system clock while running moves no lease deadline; leases
/// are re-based at every start, so the base never needs to be trusted later.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall0: Ms,
    t0: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            wall0: wall_ms(),
            t0: Instant::now(),
        }
    }

    pub fn now(&self) -> Ms {
        self.wall0 + self.t0.elapsed().as_millis() as Ms
    }
}

/// The wall clock, as it is now (it may have stepped since start).
fn wall_ms() -> Ms {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Ms)
        .unwrap_or(0)
}

/// How far the wall clock is ahead of the coordinator's clock at `now`:
/// about 0, until someone steps the wall clock. `not_before` is wall time;
/// `run_after` is the coordinator's.
pub fn wall_offset(now: Ms) -> Ms {
    wall_ms() - now
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Milliseconds of a duration, for arithmetic with [`Ms`].
pub fn ms(d: Duration) -> Ms {
    d.as_millis() as Ms
}

type Finish = Box<dyn FnOnce(Option<StoreError>) + Send>;

trait WriteOp: Send {
    /// Sets `stalled` when the operation failed for want of storage (the
    /// database locked from outside, a full disk).
    fn run(self: Box<Self>, conn: &Connection, now: Ms, stalled: &mut bool) -> Finish;
    fn fail(self: Box<Self>, e: StoreError);
    /// Runs on its own, outside any transaction (a checkpoint).
    fn maintenance(&self) -> bool {
        false
    }
}

/// A checkpoint, run by the writer between transactions.
struct Checkpoint {
    reply: oneshot::Sender<Result<(i64, i64), StoreError>>,
}

impl WriteOp for Checkpoint {
    fn run(self: Box<Self>, conn: &Connection, _now: Ms, _: &mut bool) -> Finish {
        // PostgreSQL checkpoints by itself.
        let Some(conn) = conn.lite() else {
            return Box::new(move |_| {
                let _ = self.reply.send(Ok((0, 0)));
            });
        };
        // TRUNCATE waits for readers; RESTART is the fallback when they stay.
        // Each waits CHECKPOINT_WAIT at most, not the writer's busy timeout:
        // a reader that stays (Litestream holds one while it copies the WAL)
        // would otherwise stall every write for twice that.
        let _ = conn.busy_timeout(CHECKPOINT_WAIT);
        let result = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", params![], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .and_then(|(busy, log, done): (i64, i64, i64)| {
                if busy != 0 {
                    conn.query_row("PRAGMA wal_checkpoint(RESTART)", params![], |r| {
                        Ok((r.get(1)?, r.get(2)?))
                    })
                } else {
                    Ok((log, done))
                }
            })
            .map_err(StoreError::from);
        let _ = conn.busy_timeout(BUSY_TIMEOUT);
        Box::new(move |_| {
            let _ = self.reply.send(result);
        })
    }

    fn fail(self: Box<Self>, e: StoreError) {
        let _ = self.reply.send(Err(e));
    }

    fn maintenance(&self) -> bool {
        true
    }
}

struct Op<F, R> {
    f: F,
    reply: oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> WriteOp for Op<F, R>
where
    F: FnOnce(&Connection, Ms) -> Result<R, StoreError> + Send + 'static,
    R: Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection, now: Ms, stalled: &mut bool) -> Finish {
        let Op { f, reply } = *self;
        let result = match exec(conn, "SAVEPOINT op") {
            Err(e) => Err(e),
            Ok(()) => {
                let r = f(conn, now);
                let end = match r {
                    Ok(_) => exec(conn, "RELEASE op"),
                    Err(_) => exec(conn, "ROLLBACK TO op").and_then(|()| exec(conn, "RELEASE op")),
                };
                end.and(r)
            }
        };
        if result.as_ref().is_err_and(StoreError::is_storage) {
            *stalled = true;
        }
        Box::new(move |commit_error| {
            let _ = reply.send(match commit_error {
                Some(e) => Err(e),
                None => result,
            });
        })
    }

    fn fail(self: Box<Self>, e: StoreError) {
        let _ = self.reply.send(Err(e));
    }
}

/// Runs one parameterless statement through the statement cache: the
/// writer runs these around every request, and parsing them each time was a
/// sixth of its time.
fn exec(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute(params![]).map(drop)
}

/// Begins the writer's transaction. On PostgreSQL it first takes the
/// writers' lock: the transactions of every coordinator on the database
/// commit one after another, as SQLite's do (decision 0044).
fn begin(conn: &Connection) -> Result<(), StoreError> {
    match conn {
        Connection::Lite(_) => exec(conn, "BEGIN IMMEDIATE"),
        Connection::Pg(_) => {
            exec(conn, "BEGIN")?;
            let locked = conn.execute("SELECT pg_advisory_xact_lock(?1)", params![pg::WRITERS]);
            if let Err(e) = locked {
                let _ = exec(conn, "ROLLBACK");
                return Err(e);
            }
            Ok(())
        }
    }
}

/// A write handed to the writer, not yet committed.
pub struct Queued<R> {
    rx: oneshot::Receiver<Result<R, StoreError>>,
    start: std::time::Instant,
    write_seconds: Arc<Histogram>,
}

impl<R> Queued<R> {
    /// The write's result, once committed (or refused).
    pub async fn done(self) -> Result<R, StoreError> {
        let r = self
            .rx
            .await
            .map_err(|_| StoreError::internal("the database writer dropped a request"))?;
        self.write_seconds
            .observe(self.start.elapsed().as_secs_f64());
        r
    }
}

/// Handle to the database, cheap to clone.
#[derive(Clone)]
pub struct Db {
    writer: mpsc::Sender<Box<dyn WriteOp>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    reader_permits: Arc<Semaphore>,
    clock: Clock,
    /// Bumped after every commit: followers of events and logs wait on it.
    commits: watch::Receiver<u64>,
    /// Time from a write request to its commit.
    write_seconds: Arc<Histogram>,
    /// The file this handle opened, to notice it deleted or replaced
    /// (none on PostgreSQL).
    file: Option<Arc<OpenedFile>>,
    /// New job ids start here at the least (`highwater`): past what a
    /// restored database's lost window handed out.
    id_floor: Arc<std::sync::atomic::AtomicI64>,
    /// On PostgreSQL: whether this coordinator leads (`pg::Leader`).
    leader: Option<Arc<Mutex<pg::Leader>>>,
    /// On PostgreSQL: another coordinator announced work.
    remote_work: Arc<tokio::sync::Notify>,
}

/// The database file as opened: its path and (device, inode). Once the
/// path no longer leads to that inode (deleted, or replaced by another
/// file), every write is refused: nothing committed to the orphaned inode
/// would survive a restart.
struct OpenedFile {
    path: std::path::PathBuf,
    id: (u64, u64),
    lost: std::sync::atomic::AtomicBool,
}

impl OpenedFile {
    fn open(path: &Path) -> Result<OpenedFile, String> {
        Ok(OpenedFile {
            path: path.to_path_buf(),
            id: file_id(path)
                .map_err(|e| format!("reading the database file {}: {e}", path.display()))?,
            lost: Default::default(),
        })
    }

    fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn refusal(&self) -> StoreError {
        StoreError::unavailable(
            "database_gone",
            format!(
                "the database file {} was deleted or replaced under the running coordinator; \
                 writes are refused. Restore it from a backup, then restart drover-coordinator",
                self.path.display()
            ),
        )
    }
}

fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl Db {
    /// Opens (creating if needed) and migrates the database, then starts the
    /// writer thread.
    pub fn open(path: &Path, synchronous_full: bool, clock: Clock) -> Result<Db, String> {
        let ctx = |e: rusqlite::Error| format!("opening the database at {}: {e}", path.display());
        create_private(path)?;
        let file = Arc::new(OpenedFile::open(path)?);
        let mut conn = rusqlite::Connection::open(path).map_err(ctx)?;
        configure(&conn, synchronous_full).map_err(|e| format!("{}: {e}", path.display()))?;
        migrate(&mut conn)
            .map_err(|e| format!("migrating the database at {}: {e}", path.display()))?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let r = rusqlite::Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(ctx)?;
            r.busy_timeout(BUSY_TIMEOUT).map_err(ctx)?;
            r.execute_batch("PRAGMA query_only = ON").map_err(ctx)?;
            r.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            readers.push(Connection::Lite(r));
        }
        Db::start(conn.into(), readers, Some(file), clock).map(|(db, _)| db)
    }

    /// Connects to PostgreSQL (`url`; over TLS verified against `ca` when
    /// given), migrates it, then starts the writer thread.
    pub fn open_pg(url: &str, ca: Option<&Path>, clock: Clock) -> Result<Db, String> {
        let tls = pg::Tls::new(ca)?;
        let conn = Connection::pg(url, &tls)?;
        pg::migrate(&conn)?;
        let readers = (0..READERS)
            .map(|_| Connection::pg(url, &tls))
            .collect::<Result<Vec<_>, _>>()?;
        let (mut db, commits) = Db::start(conn, readers, None, clock)?;
        pg::listen(url, tls.clone(), commits, db.remote_work.clone())?;
        db.leader = Some(Arc::new(Mutex::new(pg::Leader::new(url, tls)?)));
        Ok(db)
    }

    /// Starts the writer; returns the handle and the sender of commits.
    fn start(
        conn: Connection,
        readers: Vec<Connection>,
        file: Option<Arc<OpenedFile>>,
        clock: Clock,
    ) -> Result<(Db, Arc<watch::Sender<u64>>), String> {
        let (tx, rx) = mpsc::channel(4096);
        let (commits_tx, commits) = watch::channel(0u64);
        let commits_tx = Arc::new(commits_tx);
        let sender = commits_tx.clone();
        let mark = file.as_ref().map(|f| highwater::Mark::new(&f.path));
        std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || writer_loop(conn, rx, clock, commits_tx, mark))
            .map_err(|e| format!("starting the database writer thread: {e}"))?;
        let db = Db {
            writer: tx,
            readers: Arc::new(Mutex::new(readers)),
            reader_permits: Arc::new(Semaphore::new(READERS)),
            clock,
            commits,
            write_seconds: Arc::new(Histogram::new(crate::metrics::FAST)),
            file,
            id_floor: Arc::default(),
            leader: None,
            remote_work: Arc::default(),
        };
        Ok((db, sender))
    }

    /// Whether this coordinator runs the background work (the lease sweep,
    /// retention): always on SQLite, the leader's on PostgreSQL.
    pub async fn leads(&self) -> bool {
        let Some(leader) = self.leader.clone() else {
            return true;
        };
        tokio::task::spawn_blocking(move || leader.lock().map(|mut l| l.check()).unwrap_or(false))
            .await
            .unwrap_or(false)
    }

    /// Notified when another coordinator announced work (PostgreSQL).
    pub fn remote_work(&self) -> Arc<tokio::sync::Notify> {
        self.remote_work.clone()
    }

    /// Tells the other coordinators (PostgreSQL) that work may have become
    /// claimable: a notification that joins the next commit, unwaited.
    pub fn announce_work(&self) {
        if self.leader.is_none() {
            return;
        }
        let (reply, _) = oneshot::channel::<Result<(), StoreError>>();
        let f = |c: &Connection, _| {
            c.execute("SELECT pg_notify(?1, 'work')", params![pg::CHANNEL])
                .map(drop)
        };
        let _ = self.writer.try_send(Box::new(Op { f, reply }));
    }

    /// The database file's path (none on PostgreSQL).
    pub fn path(&self) -> Option<&std::path::Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Where new job ids start at the least.
    pub fn id_floor(&self) -> i64 {
        self.id_floor.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Refused (503 `database_gone`) once the file was found deleted or
    /// replaced.
    pub fn writable(&self) -> Result<(), StoreError> {
        match &self.file {
            Some(file) if file.is_lost() => Err(file.refusal()),
            _ => Ok(()),
        }
    }

    /// Checks that the path still leads to the file this handle opened;
    /// from the first time it does not, every write is refused. Returns
    /// whether the file is (still) in place.
    pub fn check_file(&self) -> bool {
        let Some(file) = &self.file else {
            return true;
        };
        if file.is_lost() {
            return false;
        }
        match file_id(&file.path) {
            Ok(id) if id == file.id => true,
            found => {
                let what = match found {
                    Ok(_) => "replaced by another file".to_string(),
                    Err(e) => format!("gone ({e})"),
                };
                log::error!(
                    "the database file {} was {what}: refusing every write from now on; \
                     restore it from a backup and restart drover-coordinator",
                    file.path.display()
                );
                file.lost.store(true, std::sync::atomic::Ordering::Relaxed);
                false
            }
        }
    }

    pub fn write_seconds(&self) -> &Histogram {
        &self.write_seconds
    }

    /// Changes after every commit (subscribe, then read, then wait).
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.clone()
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Runs `f` in the writer's transaction; its changes commit (durably)
    /// before this returns Ok, or not at all.
    ///
    /// `write`, `queue` and `read` are the SQLite engine's raw access: the
    /// operations in `ops.rs` use them, and so does the white-box store
    /// benchmark (tests/bench/claim_cost.rs). Nothing else outside `db/`
    /// does: the coordinator calls the operations.
    pub async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection, Ms) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.queue(f).await?.done().await
    }

    /// Hands `f` to the writer and returns once it is queued; `done` waits
    /// for its commit. Between the two a caller can ask for follow-up work
    /// that then usually joins the same transaction.
    pub async fn queue<R, F>(&self, f: F) -> Result<Queued<R>, StoreError>
    where
        F: FnOnce(&Connection, Ms) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        self.writable()?;
        let (reply, rx) = oneshot::channel();
        let start = std::time::Instant::now();
        self.writer
            .send(Box::new(Op { f, reply }))
            .await
            .map_err(|_| StoreError::internal("the database writer has stopped"))?;
        Ok(Queued {
            rx,
            start,
            write_seconds: self.write_seconds.clone(),
        })
    }

    /// Checkpoints the WAL into the database file and truncates it, between
    /// transactions. Returns (WAL frames, frames checkpointed).
    pub async fn checkpoint(&self) -> Result<(i64, i64), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Box::new(Checkpoint { reply }))
            .await
            .map_err(|_| StoreError::internal("the database writer has stopped"))?;
        rx.await
            .map_err(|_| StoreError::internal("the database writer dropped a request"))?
    }

    /// Runs `f` on a read-only connection in the blocking pool.
    pub async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection, Ms) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let _permit = self
            .reader_permits
            .acquire()
            .await
            .map_err(|_| StoreError::internal("database readers closed"))?;
        let readers = self.readers.clone();
        let now = self.clock.now();
        tokio::task::spawn_blocking(move || {
            let conn = readers
                .lock()
                .map_err(|_| StoreError::internal("database reader pool poisoned"))?
                .pop()
                .ok_or_else(|| StoreError::internal("no free database reader"))?;
            let r = f(&conn, now);
            if let Ok(mut pool) = readers.lock() {
                pool.push(conn);
            }
            r
        })
        .await
        .map_err(|e| StoreError::internal(format!("database reader task failed: {e}")))?
    }
}

/// Creates the database file 0600 before SQLite does (job env and metadata
/// may hold secrets); SQLite gives `-wal` and `-shm` the same mode.
pub(crate) fn create_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("creating the database directory {}: {e}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| format!("creating the database file {}: {e}", path.display()))
}

fn configure(conn: &rusqlite::Connection, synchronous_full: bool) -> Result<(), String> {
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", params![], |r| r.get(0))
        .map_err(|e| format!("setting WAL mode: {e}"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "the database refused WAL mode (journal_mode is {mode}); is it on a network filesystem?"
        ));
    }
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| format!("setting busy_timeout: {e}"))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let sync = if synchronous_full { "FULL" } else { "NORMAL" };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync};
         PRAGMA foreign_keys = ON;
         PRAGMA journal_size_limit = 67108864;
         PRAGMA temp_store = MEMORY;"
    ))
    .map_err(|e| format!("setting pragmas: {e}"))?;
    let check: String = conn
        .query_row("PRAGMA quick_check", params![], |r| r.get(0))
        .map_err(|e| format!("running quick_check: {e}"))?;
    if check != "ok" {
        return Err(format!(
            "the database failed PRAGMA quick_check ({check}); restore it from a backup"
        ));
    }
    Ok(())
}

/// The schema's migrations, in order: (version, SQL).
fn migrations() -> Vec<(i64, &'static str)> {
    sections(SCHEMA)
}

/// The `-- migration N` sections of a schema file: (N, SQL).
fn sections(schema: &'static str) -> Vec<(i64, &'static str)> {
    let mut out = Vec::new();
    let mut rest = schema;
    while let Some(pos) = rest.find("\n-- migration ") {
        let after = &rest[pos + "\n-- migration ".len()..];
        let line_end = after.find('\n').unwrap_or(after.len());
        let version = after[..line_end].trim().parse::<i64>().unwrap_or(-1);
        let body = &after[line_end..];
        let body_end = body.find("\n-- migration ").unwrap_or(body.len());
        out.push((version, &body[..body_end]));
        rest = &body[body_end..];
    }
    out
}

/// Highest schema version this binary knows.
pub fn schema_version() -> i64 {
    migrations().last().map(|m| m.0).unwrap_or(0)
}

pub(crate) fn migrate(conn: &mut rusqlite::Connection) -> Result<(), String> {
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", params![], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", params![], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if app_id != APPLICATION_ID && (app_id != 0 || version != 0) {
        return Err(format!(
            "this is not a Drover database (application_id {app_id:#x}); point --db at a new or a Drover file"
        ));
    }
    let known = schema_version();
    if version > known {
        return Err(format!(
            "the database is at schema version {version} but this drover-coordinator knows only up to {known}; run a newer binary"
        ));
    }
    for (v, sql) in migrations() {
        if v <= version {
            continue;
        }
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .map_err(|e| e.to_string())?;
        tx.execute_batch(sql)
            .map_err(|e| format!("migration {v}: {e}"))?;
        // A migration that edits sqlite_schema in place (writable_schema)
        // must bump the schema cookie itself so connections reload it; for
        // the others SQLite has bumped it already and one more is harmless.
        let cookie: i64 = tx
            .query_row("PRAGMA schema_version", params![], |r| r.get(0))
            .map_err(|e| format!("migration {v}: {e}"))?;
        tx.execute_batch(&format!("PRAGMA schema_version = {}", cookie + 1))
            .map_err(|e| format!("migration {v}: {e}"))?;
        tx.execute_batch(&format!(
            "PRAGMA user_version = {v}; PRAGMA application_id = {APPLICATION_ID};"
        ))
        .map_err(|e| format!("migration {v}: {e}"))?;
        tx.commit().map_err(|e| format!("migration {v}: {e}"))?;
        log::info!("database migrated to schema version {v}");
    }
    // Read the schema once, so that this connection reloads it after a
    // bumped cookie now rather than re-preparing its first statements.
    conn.query_row("SELECT count(*) FROM sqlite_schema", params![], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(|e| format!("reading the schema: {e}"))?;
    Ok(())
}

/// The writer's memory of failed writes: from the first failure after the
/// last commit until the next commit, no heartbeat could be recorded.
struct Stall {
    last_commit: Instant,
    failing: bool,
}

impl Stall {
    /// Inside the first transaction that began after failures: gives every
    /// lease and every live worker the time the writer could not commit.
    /// Returns the stall, to log once the transaction commits.
    fn grant(&self, conn: &Connection, now: Ms) -> Option<(Duration, usize)> {
        if !self.failing {
            return None;
        }
        let stalled = self.last_commit.elapsed();
        let by = ms(stalled);
        let extended = leases::extend_leases(conn, by)
            .and_then(|n| workers::extend_liveness(conn, now, by).map(|_| n));
        match extended {
            Ok(leases) => Some((stalled, leases)),
            Err(e) => {
                log::error!("could not give leases back the {stalled:?} the writer stalled: {e}");
                None
            }
        }
    }
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Box<dyn WriteOp>>,
    clock: Clock,
    commits: Arc<watch::Sender<u64>>,
    mut mark: Option<highwater::Mark>,
) {
    let mut stall = Stall {
        last_commit: Instant::now(),
        failing: false,
    };
    while let Some(first) = rx.blocking_recv() {
        let batch = gather(first, &mut rx, &conn, &clock, &mut stall);
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = begin(&conn) {
            log::warn!("could not begin a write transaction: {e}");
            stall.failing = true;
            for op in batch {
                op.fail(e.clone());
            }
            continue;
        }
        let now = clock.now();
        let granted = stall.grant(&conn, now);
        let mut failing = false;
        let mut finishers: Vec<Finish> = batch
            .into_iter()
            .map(|op| op.run(&conn, now, &mut failing))
            .collect();
        // Requests that arrived meanwhile join this transaction (a dispatch
        // round kicked by a submission, say): one commit for both.
        let mut maintenance = None;
        while finishers.len() < MAX_BATCH && maintenance.is_none() {
            match rx.try_recv() {
                Ok(op) if op.maintenance() => maintenance = Some(op),
                Ok(op) => finishers.push(op.run(&conn, clock.now(), &mut failing)),
                Err(_) => break,
            }
        }
        let commit_error = commit(
            &conn,
            &commits,
            granted,
            failing,
            finishers.len(),
            &mut stall,
        );
        if let (None, Some(mark)) = (&commit_error, mark.as_mut()) {
            mark.follow(&conn);
        }
        for finish in finishers {
            finish(commit_error.clone());
        }
        if let Some(op) = maintenance {
            op.run(&conn, clock.now(), &mut stall.failing)(None);
        }
    }
    log::debug!("database writer stopped");
}

/// The requests waiting now, up to a batch; maintenance (a checkpoint)
/// runs at once, between transactions.
fn gather(
    first: Box<dyn WriteOp>,
    rx: &mut mpsc::Receiver<Box<dyn WriteOp>>,
    conn: &Connection,
    clock: &Clock,
    stall: &mut Stall,
) -> Vec<Box<dyn WriteOp>> {
    let mut batch = Vec::new();
    let mut next = Some(first);
    while let Some(op) = next.take() {
        if op.maintenance() {
            op.run(conn, clock.now(), &mut stall.failing)(None);
        } else {
            batch.push(op);
        }
        if batch.len() < MAX_BATCH {
            next = rx.try_recv().ok();
        }
    }
    batch
}

/// Commits the batch's transaction (rolls it back when that fails) and
/// keeps the stall bookkeeping; the error every request of it then gets.
fn commit(
    conn: &Connection,
    commits: &watch::Sender<u64>,
    granted: Option<(Duration, usize)>,
    failing: bool,
    requests: usize,
    stall: &mut Stall,
) -> Option<StoreError> {
    // Other coordinators' followers of events and logs read again.
    let announced = match conn {
        Connection::Pg(_) => conn
            .execute("SELECT pg_notify(?1, 'commit')", params![pg::CHANNEL])
            .map(drop),
        Connection::Lite(_) => Ok(()),
    };
    match announced.and_then(|()| exec(conn, "COMMIT")) {
        Ok(()) => {
            commits.send_modify(|n| *n = n.wrapping_add(1));
            if let Some((stalled, leases)) = granted {
                log::warn!(
                    "writes failed for {:.1}s (database locked or full); {leases} running leases and the live workers get that time back",
                    stalled.as_secs_f64()
                );
            }
            // Some requests of a committed batch may still have failed for
            // storage (a full disk refuses the larger writes).
            *stall = Stall {
                last_commit: Instant::now(),
                failing,
            };
            None
        }
        Err(e) => {
            log::error!("commit failed, {requests} requests rolled back: {e}");
            let _ = exec(conn, "ROLLBACK");
            stall.failing = true;
            Some(e)
        }
    }
}

/// States are stored as their names (`schema.sql` checks them).
macro_rules! stored_as_text {
    ($t:ty, $what:literal) => {
        impl rusqlite::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $t {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                let text = v.as_str()?;
                <$t>::parse(text).ok_or_else(|| {
                    rusqlite::types::FromSqlError::Other(
                        format!(concat!("unknown ", $what, " {:?}"), text).into(),
                    )
                })
            }
        }
    };
}

stored_as_text!(crate::lifecycle::JobStatus, "job status");
stored_as_text!(crate::lifecycle::WorkerState, "worker state");

/// Appends one row to the ordered event stream.
pub fn event(
    conn: &Connection,
    now: Ms,
    kind: &str,
    job_id: Option<i64>,
    worker_id: Option<i64>,
    data: impl serde::Serialize,
) -> Result<(), StoreError> {
    let data = serde_json::to_string(&data)
        .map_err(|e| StoreError::internal(format!("event {kind}: {e}")))?;
    conn.prepare_cached(
        "INSERT INTO events (at, kind, job_id, worker_id, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(rusqlite::params![now, kind, job_id, worker_id, data])?;
    Ok(())
}

/// RFC 3339 text of a stored time, for API output.
pub fn iso(ms: Option<Ms>) -> Option<String> {
    let ms = ms?;
    let t = UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))?;
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// Parses a JSON text column, tolerating a corrupt value as null.
pub fn json_col(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

/// A migrated SQLite database at `path`, for the store's unit tests.
#[cfg(test)]
pub(crate) fn test_db(path: &Path) -> Connection {
    create_private(path).unwrap();
    let mut conn = rusqlite::Connection::open(path).unwrap();
    migrate(&mut conn).unwrap();
    conn.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled SQLite is built without memory statistics
    /// (`.cargo/config.toml`): with them, every allocation takes a global
    /// mutex.
    #[test]
    fn sqlite_is_built_without_memory_statistics() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map(params![], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
    }

    /// A request queued while a transaction runs joins it: one commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_queued_during_a_transaction_shares_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), true, Clock::new()).unwrap();
        let commits = db.commits();
        let before = *commits.borrow();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let first = db
            .queue(move |_, _| {
                let _ = started_tx.send(());
                std::thread::sleep(Duration::from_millis(100));
                Ok(1)
            })
            .await
            .unwrap();
        started_rx.recv().unwrap();
        let second = db.queue(|_, _| Ok(2)).await.unwrap();
        assert_eq!(
            (first.done().await.unwrap(), second.done().await.unwrap()),
            (1, 2)
        );
        assert_eq!(*commits.borrow() - before, 1, "both in one commit");
    }

    #[test]
    fn schema_has_ordered_migrations() {
        let m = migrations();
        assert!(!m.is_empty());
        for (i, (v, sql)) in m.iter().enumerate() {
            assert_eq!(*v, i as i64 + 1, "migrations are numbered 1, 2, ...");
            assert!(["CREATE", "ALTER", "DROP", "sqlite_schema"]
                .iter()
                .any(|w| sql.contains(w)));
        }
    }

    #[test]
    fn fresh_database_migrates_and_refuses_newer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        create_private(&path).unwrap();
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        configure(&conn, true).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema_version());
        // Migration 2: no CHECK is an IN list any more (each such check
        // built a temporary index), and the OR chains still refuse a bad value.
        let ddl: String = conn
            .query_row(
                "SELECT group_concat(sql, ' ') FROM sqlite_schema WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!ddl.contains(" IN\n") && !ddl.contains(" IN ("), "{ddl}");
        for table in ["workers", "jobs", "job_logs"] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN INSERT INTO {table} DEFAULT VALUES"))
                .unwrap()
                .query_map(params![], |r| r.get(1))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                !plan.iter().any(|op| op == "OpenEphemeral"),
                "{table}: {plan:?}"
            );
        }
        conn.execute(
            "INSERT INTO workers (name, state, registered_at) VALUES ('w', 'idle', 0)",
            [],
        )
        .unwrap();
        let bad = conn
            .execute("UPDATE workers SET state = 'sleeping'", [])
            .unwrap_err();
        assert!(bad.to_string().contains("CHECK"), "{bad}");
        let bad = conn
            .execute(
                "INSERT INTO jobs (status, command, spec_sha256, run_after, created_at)
                 VALUES ('paused', '[]', 'x', 0, 0)",
                [],
            )
            .unwrap_err();
        assert!(bad.to_string().contains("CHECK"), "{bad}");
        // Re-running is a no-op.
        migrate(&mut conn).unwrap();
        conn.execute_batch(&format!("PRAGMA user_version = {}", v + 1))
            .unwrap();
        let err = migrate(&mut conn).unwrap_err();
        assert!(err.contains("newer") || err.contains("knows only"), "{err}");
    }

    /// A database made by an older binary (schema version 1, with rows)
    /// migrates in place: rows kept, the CHECK constraints rewritten.
    #[test]
    fn version_1_database_migrates_with_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        configure(&conn, true).unwrap();
        let (v, sql) = migrations()[0];
        assert_eq!(v, 1);
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = 1; PRAGMA application_id = {APPLICATION_ID}; COMMIT;"
        ))
        .unwrap();
        conn.execute(
            "INSERT INTO jobs (status, command, spec_sha256, run_after, created_at)
             VALUES ('queued', '[\"true\"]', 'x', 0, 0)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let (status, version): (String, i64) = conn
            .query_row(
                "SELECT status, (SELECT user_version FROM pragma_user_version) FROM jobs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((status.as_str(), version), ("queued", schema_version()));
        let ddl: String = conn
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE name = 'jobs'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(ddl.contains("status = 'queued' OR"), "{ddl}");
        let check: String = conn
            .query_row("PRAGMA integrity_check", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 3;")
            .unwrap();
        let err = migrate(&mut conn).unwrap_err();
        assert!(err.contains("not a Drover database"), "{err}");
    }

    #[test]
    fn iso_formats_millis() {
        assert_eq!(iso(Some(0)).as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(iso(None), None);
    }
}
