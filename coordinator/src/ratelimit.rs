//! Token buckets for failed registrations: per client address (burst 5,
//! 10 a minute) and for all clients together (60 a minute). A limited client
//! gets 429 with Retry-After, also for a correct secret, until its bucket
//! refills; successful registrations cost nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Rate {
    burst: f64,
    per_sec: f64,
}

impl Rate {
    fn refill(&self, b: &mut Bucket, now: Instant) {
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst);
        b.at = now;
    }

    /// Seconds until a token is there (0 when one is).
    fn wait(&self, b: &Bucket) -> u64 {
        if b.tokens >= 1.0 {
            0
        } else {
            ((1.0 - b.tokens) / self.per_sec).ceil().max(1.0) as u64
        }
    }
}

pub struct RateLimiter {
    per_client: Rate,
    global: Rate,
    state: Mutex<(HashMap<IpAddr, Bucket>, Bucket)>,
}

/// Addresses remembered at most; the oldest are forgotten beyond it.
const MAX_CLIENTS: usize = 10_000;

impl RateLimiter {
    pub fn registrations() -> RateLimiter {
        RateLimiter::new(5.0, 10.0 / 60.0, 60.0, 1.0)
    }

    fn new(burst: f64, per_sec: f64, global_burst: f64, global_per_sec: f64) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            per_client: Rate { burst, per_sec },
            global: Rate {
                burst: global_burst,
                per_sec: global_per_sec,
            },
            state: Mutex::new((
                HashMap::new(),
                Bucket {
                    tokens: global_burst,
                    at: now,
                },
            )),
        }
    }

    /// Whether `client` may try now: `Err(seconds to wait)` when not.
    pub fn check(&self, client: IpAddr) -> Result<(), u64> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (clients, global) = &mut *st;
        self.global.refill(global, now);
        let wait = match clients.get_mut(&client) {
            Some(b) => {
                self.per_client.refill(b, now);
                self.per_client.wait(b)
            }
            None => 0,
        };
        match wait.max(self.global.wait(global)) {
            0 => Ok(()),
            w => Err(w),
        }
    }

    /// Spends a token of `client` and of the global bucket (a failed try).
    pub fn failed(&self, client: IpAddr) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (clients, global) = &mut *st;
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            if let Some(oldest) = clients.iter().min_by_key(|(_, b)| b.at).map(|(ip, _)| *ip) {
                clients.remove(&oldest);
            }
        }
        let b = clients.entry(client).or_insert(Bucket {
            tokens: self.per_client.burst,
            at: now,
        });
        self.per_client.refill(b, now);
        b.tokens -= 1.0;
        self.global.refill(global, now);
        global.tokens -= 1.0;
    }
}

/// A token bucket per worker, for what its agent may send as often as it
/// likes (telemetry): an agent's token holder cannot make the coordinator
/// write (and keep events) faster than this.
pub struct PerWorker {
    rate: Rate,
    state: Mutex<HashMap<i64, Bucket>>,
}

impl PerWorker {
    /// Telemetry: bursts of 20, 5 a second (an agent sends at most one a
    /// second plus one per 200 ms of log lines).
    pub fn telemetry() -> PerWorker {
        PerWorker {
            rate: Rate {
                burst: 20.0,
                per_sec: 5.0,
            },
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Spends one of `worker`'s tokens: `Err(seconds to wait)` when none.
    pub fn take(&self, worker: i64) -> Result<(), u64> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.len() >= MAX_CLIENTS && !st.contains_key(&worker) {
            st.retain(|_, b| now.duration_since(b.at).as_secs() < 60);
        }
        let b = st.entry(worker).or_insert(Bucket {
            tokens: self.rate.burst,
            at: now,
        });
        self.rate.refill(b, now);
        match self.rate.wait(b) {
            0 => {
                b.tokens -= 1.0;
                Ok(())
            }
            w => Err(w),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_limited_per_client_and_globally() {
        let rl = RateLimiter::new(5.0, 10.0 / 60.0, 8.0, 1.0 / 60.0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..5 {
            assert!(rl.check(a).is_ok());
            rl.failed(a);
        }
        let wait = rl.check(a).unwrap_err();
        assert!((1..=6).contains(&wait), "{wait}");
        // Another client still may, until the global budget is spent.
        for _ in 0..3 {
            assert!(rl.check(b).is_ok());
            rl.failed(b);
        }
        assert!(rl.check(b).is_err(), "global budget spent");
    }
}
