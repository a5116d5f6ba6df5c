use clap::Parser;
use coordinator::config::{Cli, Command, Config};
use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match Cli::parse() {
        Cli {
            command:
                Some(Command::Install {
                    prefix,
                    no_systemd,
                    args,
                }),
            ..
        } => {
            return match coordinator::install::install(prefix.as_deref(), no_systemd, *args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("drover-coordinator: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Cli {
            command: Some(Command::Backup { path, db }),
            ..
        } => return backup(&db, &path),
        Cli { run, .. } => run,
    };
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drover-coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("drover-coordinator: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(coordinator::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("drover-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `drover-coordinator backup PATH`.
fn backup(db: &std::path::Path, path: &std::path::Path) -> ExitCode {
    match coordinator::db::backup::backup(db, path) {
        Ok(c) => {
            println!(
                "copied {} ({} pages, {} bytes, schema version {}) to {} in {} ms",
                db.display(),
                c.pages,
                c.bytes,
                c.schema_version,
                path.display(),
                c.took.as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drover-coordinator backup: {e}");
            ExitCode::FAILURE
        }
    }
}
