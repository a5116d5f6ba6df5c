use agent::config::{Args, Config};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    agent::logring::init();
    let config = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("drover-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("drover-agent: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            log::error!("{message}");
            eprintln!("drover-agent: {message}");
            ExitCode::from(code as u8)
        }
    }
}
