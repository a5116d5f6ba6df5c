//! Parked claims: each waiting agent's claim (a future and a oneshot, no
//! thread), the workers kept free for big jobs, and the signals that start
//! a dispatch round. The loop that runs rounds is `dispatch`.

use drover_proto::ClaimResponse;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

struct Parked {
    ticket: u64,
    reply: oneshot::Sender<ClaimResponse>,
}

#[derive(Default)]
pub struct Dispatcher {
    parked: Mutex<HashMap<i64, Parked>>,
    reservations: Mutex<HashMap<i64, i64>>,
    /// Any reason for a round: a park or a change of work.
    kick: Notify,
    /// A change of work since the last round (not a mere park).
    work: Notify,
    worked: AtomicBool,
    tickets: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dispatcher {
    /// Parks a claim of `worker_id` (replacing an older one, which then
    /// answers 204) and asks for a round.
    pub fn park(&self, worker_id: i64) -> (u64, oneshot::Receiver<ClaimResponse>) {
        let (reply, rx) = oneshot::channel();
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        lock(&self.parked).insert(worker_id, Parked { ticket, reply });
        self.kick.notify_one();
        (ticket, rx)
    }

    /// Takes a claim back at its deadline. False when a round already took
    /// it (its answer is on the way).
    pub fn unpark(&self, worker_id: i64, ticket: u64) -> bool {
        let mut parked = lock(&self.parked);
        match parked.get(&worker_id) {
            Some(p) if p.ticket == ticket => {
                parked.remove(&worker_id);
                true
            }
            _ => false,
        }
    }

    /// Answers a worker's parked claim with nothing (204), e.g. when its
    /// agent says it is stopping.
    pub fn dismiss(&self, worker_id: i64) {
        lock(&self.parked).remove(&worker_id);
    }

    /// Work changed (jobs or capacity): run a round now.
    pub fn kick(&self) {
        self.worked.store(true, Ordering::Release);
        self.work.notify_one();
        self.kick.notify_one();
    }

    /// The worker held free for a queued job, if any.
    pub fn reserved_for(&self, job_id: i64) -> Option<i64> {
        lock(&self.reservations)
            .iter()
            .find(|(_, j)| **j == job_id)
            .map(|(w, _)| *w)
    }

    /// Every queued job with a worker kept free for it: job -> worker.
    pub fn reserved_jobs(&self) -> HashMap<i64, i64> {
        lock(&self.reservations)
            .iter()
            .map(|(w, j)| (*j, *w))
            .collect()
    }

    pub fn waiting(&self) -> usize {
        lock(&self.parked).len()
    }

    /// Workers with a claim parked now.
    pub fn waiting_workers(&self) -> Vec<i64> {
        lock(&self.parked).keys().copied().collect()
    }

    /// Takes a worker's parked claim to answer it.
    pub fn take(&self, worker_id: i64) -> Option<oneshot::Sender<ClaimResponse>> {
        lock(&self.parked).remove(&worker_id).map(|p| p.reply)
    }

    /// Workers kept free for a queued job: worker -> job.
    pub fn reservations(&self) -> HashMap<i64, i64> {
        lock(&self.reservations).clone()
    }

    pub fn set_reservations(&self, r: HashMap<i64, i64>) {
        *lock(&self.reservations) = r;
    }

    /// Any reason for a round: a park or a change of work.
    pub async fn kicked(&self) {
        self.kick.notified().await
    }

    /// A change of work (not a mere park).
    pub async fn work_changed(&self) {
        self.work.notified().await
    }

    /// Whether work changed since the last round began.
    pub fn worked(&self) -> bool {
        self.worked.load(Ordering::Acquire)
    }

    /// A round begins: changes from now on ask for another.
    pub fn round_starts(&self) {
        self.worked.store(false, Ordering::Release);
    }
}
