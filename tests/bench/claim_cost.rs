//! Claim cost: one dispatch round granting one job to a waiting worker, on
//! an empty table and with 1,000,000 finished + 100,000 queued jobs, in the
//! same process. Prints figures and the ratio; asserts nothing about speed.
//! Also the database writer's CPU time per job (grant + report, the bound
//! on throughput) and the commit rates behind group commit.
//!
//!   cargo bench -p coordinator --bench claim_cost

use coordinator::db::{dispatch, jobs, retention, workers, Clock, Db};
use drover_proto::{CompleteRequest, Inventory, Outcome, RegisterRequest};
use std::collections::HashMap;
use std::time::Instant;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TTL: i64 = 30_000;

async fn setup(db: &Db) -> Result<i64> {
    register(db, "bench", 1).await
}

async fn register(db: &Db, name: &str, slots: u32) -> Result<i64> {
    let req = RegisterRequest {
        name: name.into(),
        machine_id: name.into(),
        inventory: Inventory {
            hostname: "bench".into(),
            ..Default::default()
        },
        tags: vec!["t0".into()],
        slots: Some(slots),
        agent_version: String::new(),
    };
    let hash = format!("hash-{name}");
    let (id, _) = db
        .write(move |c, now| {
            let who = workers::Registrant::Secret { alive_since: now };
            workers::register(c, now, &req, &hash, true, who, "127.0.0.1")
        })
        .await?;
    Ok(id)
}

/// Bulk-inserts finished and queued jobs straight into the table.
async fn fill(db: &Db, finished: usize, queued: usize, shapes: usize) -> Result<()> {
    for (count, status) in [(finished, "succeeded"), (queued, "queued")] {
        let mut left = count;
        while left > 0 {
            let n = left.min(50_000);
            left -= n;
            db.write(move |c, now| {
                let mut stmt = c.prepare_cached(
                    "INSERT INTO jobs (status, command, required_tags, priority, spec_sha256, run_after, created_at, finished_at)
                     VALUES (?1, '[\"true\"]', ?2, ?3, 'x', ?4, ?4, ?5)",
                )?;
                for i in 0..n {
                    // `shapes` kinds of jobs; the worker fits one (tag t0).
                    let tags = format!("[\"t{}\"]", i % shapes);
                    let finished_at = (status != "queued").then_some(now);
                    stmt.execute(rusqlite::params![status, tags, (i % 7) as i64, now - 1000, finished_at])?;
                }
                Ok(())
            })
            .await?;
        }
    }
    Ok(())
}

/// The agent's report that `attempt` of `job` succeeded.
fn succeed(
    c: &coordinator::db::Connection,
    now: i64,
    worker: i64,
    job: i64,
    attempt: i64,
) -> std::result::Result<drover_proto::CompleteResponse, coordinator::db::StoreError> {
    let req = CompleteRequest {
        attempt,
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        result: None,
        error: None,
    };
    jobs::complete(c, now, worker, job, &req, 1000)
}

/// Times `n` rounds that each grant one job, completing it after.
async fn measure(db: &Db, worker: i64, n: usize) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let round = db
            .write(move |c, now| dispatch::round(c, now, &[worker], TTL, 60_000, &HashMap::new()))
            .await?;
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        let granted = round
            .answers
            .get(&worker)
            .map(|(j, _)| j.clone())
            .unwrap_or_default();
        if granted.len() != 1 {
            return Err(format!("expected one grant, got {}", granted.len()).into());
        }
        let a = &granted[0];
        let (job, attempt) = (a.job_id, a.attempt);
        db.write(move |c, now| succeed(c, now, worker, job, attempt))
            .await?;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times)
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = Db::open(&dir.path().join("empty.db"), true, Clock::new())?;
    let w = setup(&empty).await?;
    fill(&empty, 0, 300, 1).await?;
    let base = measure(&empty, w, 300).await?;

    let big = Db::open(&dir.path().join("big.db"), true, Clock::new())?;
    let w = setup(&big).await?;
    let t0 = Instant::now();
    fill(&big, 1_000_000, 100_000, 10).await?;
    println!(
        "filled 1,000,000 finished + 100,000 queued jobs in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    // Start from a checkpointed WAL, as a long-running coordinator would be.
    big.checkpoint().await?;
    let loaded = measure(&big, w, 300).await?;

    println!(
        "dispatch round granting one job (includes its commit, synchronous=FULL), 300 rounds:"
    );
    for (name, v) in [
        ("empty table", &base),
        ("1M finished + 100k queued", &loaded),
    ] {
        println!(
            "  {name:<28} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99)
        );
    }
    println!(
        "  ratio p50 loaded / empty: {:.2}x (target <= 2x)",
        pct(&loaded, 0.5) / pct(&base, 0.5)
    );
    // Retention on the same table: batches of finished jobs past the cutoff
    // (these have no attempt or log rows; real ones delete those too).
    let mut batch_ms = Vec::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        let n = big
            .write(|c, now| retention::prune_finished(c, now + 1))
            .await?;
        batch_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        if n != retention::PRUNE_JOBS {
            return Err(format!("a retention batch deleted {n} jobs").into());
        }
    }
    batch_ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "retention: a batch of {} finished jobs deleted in p50 {:.2} ms, max {:.2} ms (commit included); at one batch per 100 ms while behind: {:.0} jobs/s",
        retention::PRUNE_JOBS,
        pct(&batch_ms, 0.5),
        batch_ms.last().copied().unwrap_or(0.0),
        retention::PRUNE_JOBS as f64 * 10.0
    );
    Ok(())
}

/// CPU time of the writer thread so far, in seconds (call it on that thread).
fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// The writer's CPU time per job at full load: 4 workers x 64 slots, 20,000
/// queued jobs; each write reports every job the previous one granted and
/// runs a round that grants up to 256 more, as group commit batches them
/// under load. Its inverse bounds the no-op throughput.
async fn writer_per_job(dir: &std::path::Path) -> Result<()> {
    // DROVER_BENCH_JOBS: fewer jobs, for a run under callgrind.
    let n: usize = std::env::var("DROVER_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let db = Db::open(&dir.join("writer.db"), true, Clock::new())?;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(register(&db, &format!("w{i}"), 64).await?);
    }
    fill(&db, 0, n, 1).await?;
    let (mut cpu, mut done, mut pending) = (0.0, 0, Vec::<(i64, i64, i64)>::new());
    let t0 = Instant::now();
    while done < n || !pending.is_empty() {
        let (ids, reports) = (ids.clone(), std::mem::take(&mut pending));
        let reported = reports.len();
        let (granted, spent) = db
            .write(move |c, now| {
                let t = thread_cpu();
                for &(worker, job, attempt) in &reports {
                    succeed(c, now, worker, job, attempt)?;
                }
                let round = dispatch::round(c, now, &ids, TTL, 60_000, &HashMap::new())?;
                let granted: Vec<(i64, i64, i64)> = round
                    .answers
                    .iter()
                    .flat_map(|(w, (a, _))| a.iter().map(|a| (*w, a.job_id, a.attempt)))
                    .collect();
                Ok((granted, thread_cpu() - t))
            })
            .await?;
        cpu += spent;
        if granted.is_empty() && reported == 0 && done < n {
            return Err("a round granted nothing with jobs queued".into());
        }
        done += granted.len();
        pending = granted;
    }
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "writer CPU per job (grant + report, 4 workers x 64 slots, {n} jobs, commits not included): \
         {:.1} us -> at most {:.0} jobs/s on one core ({:.0} jobs/s with the commits, FULL)",
        cpu / n as f64 * 1e6,
        n as f64 / cpu,
        n as f64 / wall
    );
    Ok(())
}

/// Durable writes per second, one at a time (a commit each) and 64 at a
/// time (group commit), with synchronous=FULL and NORMAL.
async fn commits(dir: &std::path::Path) -> Result<()> {
    println!("commits: one job insert per write request, 2,000 requests:");
    for full in [true, false] {
        let db = Db::open(&dir.join(format!("commits-{full}.db")), full, Clock::new())?;
        let insert = |db: &Db| {
            let db = db.clone();
            async move {
                db.write(|c, now| {
                    c.execute(
                        "INSERT INTO jobs (status, command, spec_sha256, run_after, created_at) VALUES ('queued', '[\"true\"]', 'x', ?1, ?1)",
                        [now],
                    )?;
                    Ok(())
                })
                .await
            }
        };
        let t0 = Instant::now();
        for _ in 0..2000 {
            insert(&db).await?;
        }
        let sequential = 2000.0 / t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        for _ in 0..(2000 / 64) {
            let batch: Vec<_> = (0..64).map(|_| tokio::spawn(insert(&db))).collect();
            for b in batch {
                b.await??;
            }
        }
        let grouped = (2000 / 64 * 64) as f64 / t0.elapsed().as_secs_f64();
        println!(
            "  synchronous={:<6} sequential {sequential:>8.0} writes/s   64 in flight (group commit) {grouped:>8.0} writes/s",
            if full { "FULL" } else { "NORMAL" }
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // `-- writer`: only the writer's cost per job (quick A/B of a change).
    let only_writer = std::env::args().any(|a| a == "writer");
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        if only_writer {
            return writer_per_job(dir.path()).await;
        }
        run().await?;
        writer_per_job(dir.path()).await?;
        commits(dir.path()).await
    })
}
