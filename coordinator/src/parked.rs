//! Parked claims: each waiting agent's claim (a future and a oneshot, no
//! thread), when each worker was last given a job, and the signals that start
//! a dispatch round. The loop that runs rounds is `dispatch`.

use drover_proto::ClaimResponse;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

struct Parked {
    ticket: u64,
    reply: oneshot::Sender<ClaimResponse>,
}

/// The parked claims, and the round placing work on them, if one runs.
#[derive(Default)]
struct Parking {
    claims: HashMap<i64, Parked>,
    round: Option<Hold>,
}

/// A round holds the claims parked before it began (tickets below `upto`):
/// a deadline of one of them waits for the round's answer (a grant, or
/// nothing once the round ends). The claims whose deadline came meanwhile.
struct Hold {
    upto: u64,
    expired: Vec<(i64, u64)>,
}

#[derive(Default)]
pub struct Dispatcher {
    parked: Mutex<Parking>,
    /// Any reason for a round: a park or a change of work.
    kick: Notify,
    /// A change of work since the last round (not a mere park).
    work: Notify,
    worked: AtomicBool,
    tickets: AtomicU64,
    /// When each worker was last given a job (a sequence number): equal
    /// workers take turns. In memory: after a restart they start even.
    /// Shared with the round that reads it; copied only when a round gave
    /// jobs (not on every re-park).
    given: Mutex<Arc<HashMap<i64, u64>>>,
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
        lock(&self.parked)
            .claims
            .insert(worker_id, Parked { ticket, reply });
        self.kick.notify_one();
        (ticket, rx)
    }

    /// Takes a claim back at its deadline. False when a round took it or
    /// holds it: its answer is on the way (a grant, or nothing at the end
    /// of the round). Without the hold, a round could grant a job to a
    /// claim that left meanwhile, and the job would go back unrun with its
    /// attempt spent as `not_reported`.
    pub fn unpark(&self, worker_id: i64, ticket: u64) -> bool {
        let mut parked = lock(&self.parked);
        if parked.claims.get(&worker_id).map(|p| p.ticket) != Some(ticket) {
            return false;
        }
        match &mut parked.round {
            Some(hold) if ticket < hold.upto => {
                hold.expired.push((worker_id, ticket));
                false
            }
            _ => {
                parked.claims.remove(&worker_id);
                true
            }
        }
    }

    /// A round begins placing work: holds the parked claims and returns
    /// their workers.
    pub fn hold_waiting(&self) -> Vec<i64> {
        let mut parked = lock(&self.parked);
        parked.round = Some(Hold {
            upto: self.tickets.load(Ordering::Relaxed),
            expired: Vec::new(),
        });
        parked.claims.keys().copied().collect()
    }

    /// The round is done: claims whose deadline came meanwhile (and that it
    /// did not take) are answered with nothing; the others wait on.
    pub fn release_held(&self) {
        let mut parked = lock(&self.parked);
        let Some(hold) = parked.round.take() else {
            return;
        };
        for (worker, ticket) in hold.expired {
            if parked.claims.get(&worker).map(|p| p.ticket) == Some(ticket) {
                parked.claims.remove(&worker);
            }
        }
    }

    /// Answers a worker's parked claim with nothing (204), e.g. when its
    /// agent says it is stopping.
    pub fn dismiss(&self, worker_id: i64) {
        lock(&self.parked).claims.remove(&worker_id);
    }

    /// Work changed (jobs or capacity): run a round now.
    pub fn kick(&self) {
        self.worked.store(true, Ordering::Release);
        self.work.notify_one();
        self.kick.notify_one();
    }

    pub fn waiting(&self) -> usize {
        lock(&self.parked).claims.len()
    }

    /// Takes a worker's parked claim to answer it.
    pub fn take(&self, worker_id: i64) -> Option<oneshot::Sender<ClaimResponse>> {
        lock(&self.parked)
            .claims
            .remove(&worker_id)
            .map(|p| p.reply)
    }

    /// When each worker was last given a job.
    pub fn last_given(&self) -> Arc<HashMap<i64, u64>> {
        lock(&self.given).clone()
    }

    /// A round gave jobs to `workers`, in this order.
    pub fn note_given(&self, workers: &[i64]) {
        if workers.is_empty() {
            return;
        }
        let mut given = lock(&self.given);
        let map = Arc::make_mut(&mut given);
        let mut turn = map.values().copied().max().unwrap_or(0);
        for w in workers {
            turn += 1;
            map.insert(*w, turn);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_during_a_round_waits_for_its_end() {
        let d = Dispatcher::default();
        let (ticket, mut rx) = d.park(7);
        assert_eq!(d.hold_waiting(), vec![7]);
        // The claim's deadline comes while the round places work.
        assert!(!d.unpark(7, ticket), "held: the answer is on the way");
        assert!(rx
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Empty));
        // The round gave it nothing: answered with nothing at its end.
        d.release_held();
        assert_eq!(d.waiting(), 0);
        assert!(rx
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
        // Outside a round a deadline takes the claim back at once.
        let (ticket, _rx) = d.park(8);
        assert!(d.unpark(8, ticket));
        // A held claim whose deadline did not come waits on after the round.
        let (_, _rx) = d.park(9);
        d.hold_waiting();
        // One parked after the round began is not the round's: at once.
        let (late, _rx2) = d.park(10);
        assert!(d.unpark(10, late));
        d.release_held();
        assert_eq!(d.waiting(), 1);
        assert!(d.take(9).is_some());
    }
}
