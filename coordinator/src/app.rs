//! The composition root: what the HTTP handlers, the dispatcher and the
//! sweep share (settings, the store, parked claims, metrics, caches).
//! Depends on no HTTP module, so none of them depends on another.

use crate::config::Config;
use crate::db::{Db, Queued, StoreError};
use crate::metrics::Metrics;
use crate::parked::Dispatcher;
use crate::ratelimit::RateLimiter;
use std::future::Future;

/// Shared state of the coordinator's parts.
pub struct App {
    pub db: Db,
    pub config: Config,
    /// Parked claims and the dispatch loop that answers them.
    pub dispatcher: Dispatcher,
    pub metrics: Metrics,
    /// Failed registrations per client address.
    pub registrations: RateLimiter,
    /// Agent tokens already checked: hash -> worker id.
    pub tokens: crate::auth::TokenCache<i64>,
    /// Named API tokens already checked: hash -> (id, role).
    pub api_tokens: crate::auth::TokenCache<(i64, crate::auth::Role)>,
    /// When each named API token's use was last written.
    pub touched: crate::auth::Touched,
    /// Telemetry requests per worker.
    pub telemetry_rate: crate::ratelimit::PerWorker,
}

impl App {
    pub fn new(db: Db, config: Config) -> App {
        App {
            db,
            config,
            dispatcher: Dispatcher::default(),
            metrics: Metrics::default(),
            registrations: RateLimiter::registrations(),
            tokens: Default::default(),
            api_tokens: Default::default(),
            touched: Default::default(),
            telemetry_rate: crate::ratelimit::PerWorker::telemetry(),
        }
    }

    /// Something may have become claimable (or cancellable): dispatch.
    pub fn wake_claimers(&self) {
        self.dispatcher.kick();
        self.db.announce_work();
    }

    /// A write that adds or frees work (a submission, a report): the
    /// dispatcher is kicked as soon as it is queued, so the round usually
    /// runs in the same transaction, right after it, and the job reaches a
    /// parked claim with one commit (one fsync) instead of two.
    pub async fn write_waking<R>(
        &self,
        queued: impl Future<Output = Result<Queued<R>, StoreError>>,
    ) -> Result<R, StoreError> {
        let queued = queued.await?;
        self.wake_claimers();
        queued.done().await
    }
}
