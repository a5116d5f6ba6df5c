//! End-to-end tests: the real `drover-coordinator` and `drover-agent`
//! binaries, a real SQLite file in a temp dir, real HTTP on 127.0.0.1 with
//! free ports, real child processes.

mod agent;
mod browser;
mod chaos;
mod checker;
mod defects;
mod deploy;
mod failover;
mod fleet_api;
mod harness;
mod hostile;
mod openapi;
mod operations;
mod pg;
mod pgserver;
mod queue;
mod recovery;
mod scheduling;
mod setup;
mod tls;
