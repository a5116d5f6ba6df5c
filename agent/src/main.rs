use agent::config::{Cli, Command, Config};
use agent::ops::{deploy, setup};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    agent::logring::init();
    let cli = Cli::parse();
    let done = |r: Result<(), String>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let fix = agent::suggest::suggest(&e)
                .map(|s| format!("\n  → {s}"))
                .unwrap_or_default();
            eprintln!("drover-agent: {e}{fix}");
            ExitCode::FAILURE
        }
    };
    let args = match cli.command {
        None => cli.run,
        Some(Command::Install {
            prefix,
            no_systemd,
            agent,
        }) => return done(setup::install(prefix.as_deref(), no_systemd, agent)),
        Some(Command::Uninstall {
            prefix,
            no_systemd,
            purge,
            state_dir,
        }) => {
            return done(setup::uninstall(
                prefix.as_deref(),
                no_systemd,
                purge,
                state_dir.as_deref(),
            ))
        }
        Some(Command::Deploy {
            targets,
            identity,
            ssh_options,
            jobs,
            prefix,
            no_systemd,
            json,
            admin_token,
            agent,
        }) => {
            let targets = match targets
                .iter()
                .map(|t| deploy::Target::parse(t))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(t) => t,
                Err(e) => return done(Err(e)),
            };
            let opts = deploy::Options {
                identity,
                ssh_options,
                prefix,
                no_systemd,
                jobs,
                json,
                admin_token,
            };
            let outcomes = deploy::deploy(targets, opts, agent);
            deploy::report(&outcomes, json);
            return if outcomes.iter().all(|o| o.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Some(Command::Simulate {
            agents,
            job_mode,
            duration,
            agent,
        }) => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return done(Err(format!("starting the async runtime: {e}"))),
            };
            return done(rt.block_on(agent::simulate::run(
                agent,
                agents,
                job_mode,
                std::time::Duration::from_secs(duration),
            )));
        }
        Some(Command::Check { agent }) => {
            return match setup::check(agent) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => done(Err(e)),
            }
        }
    };
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drover-agent: {e}");
            return ExitCode::from(2);
        }
    };
    // One thread: an agent's work is light (a claim, pipes, a heartbeat),
    // hand-offs between threads cost more than it does (~0.3 ms of each
    // dispatch, measured), and the jobs' death signal follows this thread,
    // which lives as long as the process. HTTP calls run on the blocking
    // pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("drover-agent: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(agent::run(config));
    // What run awaited is done (reports spooled); an HTTP call still in
    // flight on the blocking pool must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            log::error!("{message}");
            eprintln!("drover-agent: {message}");
            ExitCode::from(code as u8)
        }
    }
}
