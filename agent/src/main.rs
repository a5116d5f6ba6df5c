use agent::config::{Args, Cli, Command, Config};
use agent::ops::{deploy, setup};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    agent::logring::init();
    let cli = Cli::parse();
    match cli.command {
        None => run_agent(cli.run),
        Some(command) => operator(command),
    }
}

/// An operator's command (install, uninstall, deploy, check, simulate).
fn operator(command: Command) -> ExitCode {
    match command {
        Command::Install {
            prefix,
            no_systemd,
            agent,
        } => done(setup::install(prefix.as_deref(), no_systemd, agent)),
        Command::Uninstall {
            prefix,
            no_systemd,
            purge,
            state_dir,
        } => done(setup::uninstall(
            prefix.as_deref(),
            no_systemd,
            purge,
            state_dir.as_deref(),
        )),
        Command::Deploy {
            targets,
            identity,
            ssh_options,
            jobs,
            prefix,
            no_systemd,
            json,
            admin_token,
            agent,
        } => {
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
            exit_if(outcomes.iter().all(|o| o.ok))
        }
        Command::Simulate {
            agents,
            job_mode,
            duration,
            agent,
        } => done(
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("starting the async runtime: {e}"))
                .and_then(|rt| {
                    rt.block_on(agent::simulate::run(
                        agent,
                        agents,
                        job_mode,
                        std::time::Duration::from_secs(duration),
                    ))
                }),
        ),
        Command::Check { agent } => match setup::check(agent) {
            Ok(ok) => exit_if(ok),
            Err(e) => done(Err(e)),
        },
    }
}

/// The agent itself, until it is stopped (or revoked).
fn run_agent(args: Args) -> ExitCode {
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

/// A command's result: an error is printed with a suggested fix.
fn done(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let fix = agent::suggest::suggest(&e)
                .map(|s| format!("\n  → {s}"))
                .unwrap_or_default();
            eprintln!("drover-agent: {e}{fix}");
            ExitCode::FAILURE
        }
    }
}

fn exit_if(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
