-- Drover coordinator database schema.
--
-- This file is the single source of the schema. The coordinator embeds it and
-- applies it at start: each "-- migration N" section below runs once, in order,
-- in one exclusive transaction that also sets PRAGMA user_version = N.
-- Sections are append-only: never edit a released one, add a new one.
-- A database whose user_version is newer than the binary is refused.
--
-- Conventions
--   * Times are INTEGER milliseconds since the Unix epoch (UTC). In sqlite3:
--       SELECT datetime(created_at / 1000, 'unixepoch') FROM jobs;
--   * JSON documents are TEXT holding JSON (use json_extract / json_each).
--   * Lease deadlines (jobs.lease_expires_at) are written on the coordinator's
--     monotonic clock (wall time at start + monotonic time since). They are
--     re-based to now + grace at every start, so a stored deadline is never
--     trusted across a restart.
--
-- Connection settings (applied by the coordinator, not stored here):
--   journal_mode=WAL, synchronous=FULL, foreign_keys=ON, busy_timeout=5000.

-- migration 1

-- Every machine running drover-agent, and workers an admin pre-registered.
CREATE TABLE workers (
    id              INTEGER PRIMARY KEY,
    name            TEXT    NOT NULL,
    -- Stable machine identity sent by the agent; (machine_id, name) makes
    -- re-registration of the same machine idempotent. NULL when pre-registered
    -- and not yet seen.
    machine_id      TEXT,
    state           TEXT    NOT NULL CHECK (state IN
                        ('pending', 'idle', 'busy', 'draining', 'offline', 'decommissioned')),
    -- SHA-256 (hex) of the agent's bearer token; NULL once revoked.
    token_hash      TEXT UNIQUE,
    hostname        TEXT    NOT NULL DEFAULT '',
    -- Address the agent last registered from (for the restore hint).
    address         TEXT,
    cpu_cores       INTEGER NOT NULL DEFAULT 0,
    memory_mb       INTEGER NOT NULL DEFAULT 0,
    -- JSON array of {"index", "uuid", "model", "vram_mb"}.
    gpus            TEXT    NOT NULL DEFAULT '[]',
    -- JSON array of strings.
    tags            TEXT    NOT NULL DEFAULT '[]',
    -- 1 when an admin set the tags: the agent's --tags no longer apply.
    tags_pinned     INTEGER NOT NULL DEFAULT 0,
    -- 1 while drained by an admin (survives going offline and back).
    drain           INTEGER NOT NULL DEFAULT 0,
    -- Jobs this worker runs at once.
    slots           INTEGER NOT NULL DEFAULT 1 CHECK (slots >= 1),
    agent_version   TEXT    NOT NULL DEFAULT '',
    -- Random id of the agent process last heard from; a new one means the
    -- agent restarted and lost the jobs it ran.
    incarnation     TEXT,
    -- Latest heartbeat's GPU metrics, JSON array.
    gpu_metrics     TEXT    NOT NULL DEFAULT '[]',
    registered_at   INTEGER NOT NULL,
    last_seen_at    INTEGER,
    UNIQUE (machine_id, name)
);

-- Every worker state change, with why it happened.
CREATE TABLE worker_health_log (
    id          INTEGER PRIMARY KEY,
    worker_id   INTEGER NOT NULL REFERENCES workers(id),
    at          INTEGER NOT NULL,
    from_state  TEXT,
    to_state    TEXT    NOT NULL,
    reason      TEXT    NOT NULL
);
CREATE INDEX worker_health_log_by_worker ON worker_health_log (worker_id, id);

-- The job queue and its history. A job's id is the one id every side uses.
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY,
    status           TEXT    NOT NULL CHECK (status IN
                         ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- What to run: JSON array argv, JSON object env, optional working dir.
    command          TEXT    NOT NULL,
    env              TEXT    NOT NULL DEFAULT '{}',
    cwd              TEXT,
    -- Requirements.
    gpus             INTEGER NOT NULL DEFAULT 0 CHECK (gpus >= 0),
    min_vram_mb      INTEGER NOT NULL DEFAULT 0 CHECK (min_vram_mb >= 0),
    required_tags    TEXT    NOT NULL DEFAULT '[]',
    preferred_tags   TEXT    NOT NULL DEFAULT '[]',
    priority         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    -- A GPU job that may run on a CPU slot when no GPU is free.
    cpu_fallback     INTEGER NOT NULL DEFAULT 0,
    timeout_s        INTEGER CHECK (timeout_s > 0),
    not_before       INTEGER,
    idempotency_key  TEXT UNIQUE,
    -- SHA-256 of the normalized submission: a resubmit with the same
    -- idempotency key must carry the same spec.
    spec_sha256      TEXT    NOT NULL,
    metadata         TEXT    NOT NULL DEFAULT '{}',
    -- Earliest time the job may be claimed: not_before, or a retry backoff.
    run_after        INTEGER NOT NULL,
    -- Fencing token: grows by one on every claim, also on claims that do not
    -- count against max_attempts (a graceful hand-back). A report is accepted
    -- only for the current (id, attempt, worker_id) while running.
    attempt          INTEGER NOT NULL DEFAULT 0,
    -- Attempts charged against max_attempts.
    attempts_used    INTEGER NOT NULL DEFAULT 0,
    -- Consecutive lease losses, for the lease-loss backoff.
    lease_losses     INTEGER NOT NULL DEFAULT 0,
    -- Current (running) or last worker, its GPUs and lease deadline.
    worker_id        INTEGER REFERENCES workers(id),
    gpu_indices      TEXT    NOT NULL DEFAULT '[]',
    lease_expires_at INTEGER,
    -- A cancel of a running job: 1 = asked, 2 = the agent was told (through
    -- its parked claim); heartbeats repeat the order until the job ends.
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    -- Last document the job wrote to DROVER_PROGRESS_FILE (JSON).
    progress         TEXT,
    -- Outcome of the last attempt.
    exit_code        INTEGER,
    result           TEXT,
    error            TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
);
-- Dispatch: queued jobs grouped by shape (what they need to fit), each
-- shape by priority, then age. A round seeks the distinct shapes and reads
-- the head of each shape a waiting worker could take, so its cost does not
-- grow with the queue or the history.
CREATE INDEX jobs_queue ON jobs (gpus, required_tags, min_vram_mb, priority DESC, id)
    WHERE status = 'queued';
CREATE INDEX jobs_queue_fallback ON jobs (priority DESC, id) WHERE status = 'queued' AND cpu_fallback = 1;
-- The sweep's scan for expired leases, and a worker's running jobs.
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_running_worker ON jobs (worker_id) WHERE status = 'running';
CREATE INDEX jobs_status ON jobs (status, id);
-- Retention: finished jobs by age.
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
-- Delayed jobs (retry backoff, not_before) becoming claimable.
CREATE INDEX jobs_queued_run_after ON jobs (run_after) WHERE status = 'queued';

-- One row per lease (claim) of a job.
CREATE TABLE job_attempts (
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    attempt     INTEGER NOT NULL,
    worker_id   INTEGER NOT NULL REFERENCES workers(id),
    gpu_indices TEXT    NOT NULL DEFAULT '[]',
    started_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    -- succeeded | failed | cancelled | timed_out | released | lease_lost |
    -- agent_restarted; NULL while the lease is live.
    outcome     TEXT,
    exit_code   INTEGER,
    error       TEXT,
    -- Log bytes kept for this attempt (capped).
    log_bytes   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, attempt)
) WITHOUT ROWID;
CREATE INDEX job_attempts_by_worker ON job_attempts (worker_id, started_at);
CREATE INDEX job_attempts_by_start ON job_attempts (started_at);

-- Output of each attempt, in order, as the agent sent it.
CREATE TABLE job_logs (
    id        INTEGER PRIMARY KEY,
    job_id    INTEGER NOT NULL REFERENCES jobs(id),
    attempt   INTEGER NOT NULL,
    stream    TEXT    NOT NULL CHECK (stream IN ('stdout', 'stderr', 'drover')),
    at        INTEGER NOT NULL,
    data      BLOB    NOT NULL
);
CREATE INDEX job_logs_by_attempt ON job_logs (job_id, attempt, id);

-- Per-GPU metrics from heartbeats, kept --gpu-history-hours (24 h) and
-- pruned by the sweep in small batches.
CREATE TABLE gpu_metrics (
    worker_id       INTEGER NOT NULL REFERENCES workers(id),
    gpu_index       INTEGER NOT NULL,
    at              INTEGER NOT NULL,
    utilization_pct REAL    NOT NULL,
    memory_used_mb  INTEGER NOT NULL,
    temperature_c   REAL    NOT NULL,
    power_w         REAL    NOT NULL
);
CREATE INDEX gpu_metrics_by_worker ON gpu_metrics (worker_id, at);
CREATE INDEX gpu_metrics_by_time ON gpu_metrics (at);

-- The last 500 log lines of each worker's agent, sent with its heartbeats.
CREATE TABLE agent_log (
    id         INTEGER PRIMARY KEY,
    worker_id  INTEGER NOT NULL REFERENCES workers(id),
    at         INTEGER NOT NULL,
    line       TEXT    NOT NULL
);
CREATE INDEX agent_log_by_worker ON agent_log (worker_id, id);

-- One ordered stream of job and worker events (kept --retention-days).
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    -- e.g. job.submitted, job.claimed, job.succeeded, job.requeued,
    -- worker.registered, worker.state
    kind       TEXT    NOT NULL,
    job_id     INTEGER,
    worker_id  INTEGER,
    -- JSON object with the details.
    data       TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX events_by_time ON events (at);

-- Views for the questions people ask with sqlite3 (see the README,
-- "Inspecting with sqlite3"). Times are shown in UTC.

-- The fleet: every worker, its state, GPUs, running jobs, last heartbeat.
CREATE VIEW fleet AS
SELECT w.id, w.name, w.state, w.hostname,
       json_array_length(w.gpus) AS gpus,
       (SELECT count(*) FROM jobs j WHERE j.worker_id = w.id AND j.status = 'running') AS running,
       w.slots, w.tags,
       datetime(w.last_seen_at / 1000, 'unixepoch') AS last_seen
FROM workers w
ORDER BY w.id;

-- The queue in dispatch order, with how long each job has waited.
CREATE VIEW queue AS
SELECT id, priority, gpus, min_vram_mb, required_tags, attempt, attempts_used, max_attempts,
       round((strftime('%s', 'now') * 1000 - created_at) / 1000.0) AS waited_s,
       CASE WHEN run_after > strftime('%s', 'now') * 1000
            THEN datetime(run_after / 1000, 'unixepoch') END AS not_until,
       json_extract(command, '$') AS command
FROM jobs
WHERE status = 'queued'
ORDER BY priority DESC, id;

-- Running jobs with their worker and GPUs.
CREATE VIEW running_jobs AS
SELECT j.id, j.attempt, w.name AS worker, j.gpu_indices,
       round((strftime('%s', 'now') * 1000 - j.started_at) / 1000.0) AS running_s,
       json_extract(j.progress, '$.progress') AS progress,
       json_extract(j.command, '$') AS command
FROM jobs j JOIN workers w ON w.id = j.worker_id
WHERE j.status = 'running'
ORDER BY j.started_at;

-- Failures of the last 24 hours, newest first.
CREATE VIEW recent_failures AS
SELECT j.id, datetime(j.finished_at / 1000, 'unixepoch') AS finished, j.attempt, w.name AS worker,
       j.exit_code, j.error, json_extract(j.command, '$') AS command
FROM jobs j LEFT JOIN workers w ON w.id = j.worker_id
WHERE j.status = 'failed' AND j.finished_at > (strftime('%s', 'now') - 86400) * 1000
ORDER BY j.finished_at DESC;

-- migration 2
-- A CHECK (x IN ('a', 'b', 'c', ...)) of more than two values makes SQLite
-- build a temporary index of the list each time it checks a row: a fifth of
-- the writer's work per job at full throughput (callgrind). The same
-- constraints as OR chains, changed in place the way SQLite documents for
-- altering a CHECK constraint (writable_schema; the coordinator then bumps
-- schema_version so that every connection reloads the schema).
PRAGMA writable_schema = ON;
UPDATE sqlite_schema SET sql = replace(sql, 'CHECK (state IN
                        (''pending'', ''idle'', ''busy'', ''draining'', ''offline'', ''decommissioned''))',
    'CHECK (state = ''pending'' OR state = ''idle'' OR state = ''busy''
                        OR state = ''draining'' OR state = ''offline'' OR state = ''decommissioned'')')
WHERE type = 'table' AND name = 'workers';
UPDATE sqlite_schema SET sql = replace(sql, 'CHECK (status IN
                         (''queued'', ''running'', ''succeeded'', ''failed'', ''cancelled''))',
    'CHECK (status = ''queued'' OR status = ''running'' OR status = ''succeeded''
                         OR status = ''failed'' OR status = ''cancelled'')')
WHERE type = 'table' AND name = 'jobs';
UPDATE sqlite_schema SET sql = replace(sql, 'CHECK (stream IN (''stdout'', ''stderr'', ''drover''))',
    'CHECK (stream = ''stdout'' OR stream = ''stderr'' OR stream = ''drover'')')
WHERE type = 'table' AND name = 'job_logs';
PRAGMA writable_schema = OFF;

-- migration 3
-- jobs_status (status, id) changed twice per job (a delete and an insert at
-- the claim and again at the end): 12 % of the writer's instructions per
-- job. Queued and running jobs have their partial indexes already; finished
-- ones get this one, which a job enters once, when it ends. (A job is
-- finished exactly when finished_at is set.)
DROP INDEX jobs_status;
CREATE INDEX jobs_finished_by_status ON jobs (status, id) WHERE finished_at IS NOT NULL;

-- migration 4
-- Events are pruned oldest id first (ids follow time: they are given in
-- commit order, times on the coordinator's monotonic clock), so the index by
-- time only cost every event an insert (3 % of the writer's work per job).
DROP INDEX events_by_time;

-- migration 5
-- The queue says why each job waits: its retry backoff or not_before, no
-- live approved worker that fits it (GPUs, VRAM, required tags), or only a
-- free slot. (GET /api/v1/jobs/ID says it in more detail.) Now in milliseconds
-- from julianday(), which every sqlite3 has.
DROP VIEW queue;
CREATE VIEW queue AS
SELECT j.id, j.priority, j.gpus, j.min_vram_mb, j.required_tags, j.attempt, j.attempts_used,
       j.max_attempts,
       round((strftime('%s', 'now') * 1000 - j.created_at) / 1000.0) AS waited_s,
       CASE WHEN j.run_after > (julianday('now') - 2440587.5) * 86400000.0
            THEN datetime(j.run_after / 1000, 'unixepoch') END AS not_until,
       CASE
         WHEN j.run_after > (julianday('now') - 2440587.5) * 86400000.0
           THEN CASE WHEN j.attempts_used > 0 THEN 'retry backoff' ELSE 'not_before' END
                || ' until ' || datetime(j.run_after / 1000, 'unixepoch')
         WHEN NOT EXISTS (
           SELECT 1 FROM workers w
           WHERE (w.state = 'idle' OR w.state = 'busy')
             AND (j.gpus = 0 OR j.cpu_fallback
                  OR (SELECT count(*) FROM json_each(w.gpus) g
                      WHERE json_extract(g.value, '$.vram_mb') >= j.min_vram_mb) >= j.gpus)
             AND NOT EXISTS (SELECT 1 FROM json_each(j.required_tags) t
                             WHERE t.value NOT IN (SELECT value FROM json_each(w.tags))))
           THEN 'no live approved worker fits it (GPUs, VRAM, required tags)'
         ELSE 'waiting for a free slot on a worker that fits'
       END AS waiting_reason,
       json_extract(j.command, '$') AS command
FROM jobs j
WHERE j.status = 'queued'
ORDER BY j.priority DESC, j.id;

-- migration 6
-- Exclusive jobs never run twice at once: the agent stops one it cannot
-- renew before its lease ends, and the lease is held a margin longer.
ALTER TABLE jobs ADD COLUMN exclusive INTEGER NOT NULL DEFAULT 0 CHECK (exclusive = 0 OR exclusive = 1);

-- migration 7
-- Per-job memory and CPU limits (JSON {"memory_mb", "cpus"}), held by the
-- job's cgroup; and whether a worker's agent can hold jobs to them.
ALTER TABLE jobs ADD COLUMN limits TEXT;
ALTER TABLE workers ADD COLUMN can_limit INTEGER NOT NULL DEFAULT 0 CHECK (can_limit = 0 OR can_limit = 1);

-- migration 8
-- The worker held free for a multi-GPU job that waited too long (the job's
-- id), so a stream of small jobs cannot starve it. Decided by the
-- coordinator that leads (the only one on SQLite); every coordinator's
-- rounds respect it.
ALTER TABLE workers ADD COLUMN reserved_for INTEGER;
CREATE INDEX workers_reserved ON workers(reserved_for) WHERE reserved_for IS NOT NULL;

-- migration 9
-- Worker lifecycle: free-form metadata (a JSON object, size-capped), when
-- it was decommissioned, and when it was forgotten (DELETE, or offline
-- past --forget-offline-after): a forgotten worker is gone from every
-- listing and its token is dead, but its row stays for the history that
-- names it (health log, attempts, events).
ALTER TABLE workers ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
ALTER TABLE workers ADD COLUMN decommissioned_at INTEGER;
ALTER TABLE workers ADD COLUMN forgotten_at INTEGER;
-- Named API tokens with a role, made and revoked by an admin. Only the
-- SHA-256 of each token is kept.
CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL UNIQUE,
    role         TEXT    NOT NULL CHECK (role = 'read' OR role = 'submit' OR role = 'admin'),
    token_hash   TEXT    NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
-- The named token that submitted a job (NULL: the admin token).
ALTER TABLE jobs ADD COLUMN submitted_by INTEGER;

-- migration 10
-- A worker whose agent stopped gracefully is 'stopped' at once (until the
-- agent comes back). The CHECK changed in place as in migration 2.
PRAGMA writable_schema = ON;
UPDATE sqlite_schema SET sql = replace(sql, 'OR state = ''decommissioned'')',
    'OR state = ''decommissioned'' OR state = ''stopped'')')
WHERE type = 'table' AND name = 'workers';
PRAGMA writable_schema = OFF;

-- migration 11
-- Agent log lines are structured (level and the module that logged
-- them) and arrive within a second; kept 500 per worker and
-- --agent-log-hours.
ALTER TABLE agent_log ADD COLUMN level TEXT NOT NULL DEFAULT 'info';
ALTER TABLE agent_log ADD COLUMN target TEXT NOT NULL DEFAULT '';
CREATE INDEX agent_log_by_time ON agent_log (at);
