//! Flags (each also read from a `DROVER_*` env var), validated into a
//! [`Config`] once.

use crate::inventory;
use clap::Parser;
use drover_proto::GpuInfo;
use std::path::PathBuf;
use std::time::Duration;

/// `drover-agent [FLAGS]` runs the agent; the subcommands set it up.
#[derive(Debug, Parser)]
#[command(
    name = "drover-agent",
    version,
    about = "Drover agent: runs jobs from a Drover coordinator on this machine",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: Args,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Install this binary and its service on this machine (as root), with the
    /// flags given; run again to change settings or upgrade.
    Install {
        /// Root of the install: PREFIX/bin, PREFIX/etc/drover, and (when given)
        /// PREFIX/etc/systemd/system and PREFIX/var/lib/drover-agent.
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Do not use systemd: start the agent detached (pid and log files in
        /// its state dir).
        #[arg(long)]
        no_systemd: bool,
        #[command(flatten)]
        agent: Args,
    },
    /// Stop and remove what `install` put in place (the state dir stays
    /// unless --purge).
    Uninstall {
        /// The root given to `install --prefix`.
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// The agent was installed with --no-systemd (a detached process).
        #[arg(long)]
        no_systemd: bool,
        /// Also delete the state dir (token, spool).
        #[arg(long)]
        purge: bool,
        /// The agent's state dir (default: the one in the installed env
        /// file, else /var/lib/drover-agent).
        #[arg(long, env = "DROVER_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Put this agent on other machines over SSH: copy the binary, check,
    /// install, and wait for each worker to show up at the coordinator.
    Deploy {
        /// Targets: [USER@]HOST[:PORT]
        #[arg(required = true)]
        targets: Vec<String>,
        /// Private key for ssh (else ssh's own configuration and agent).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// An ssh -o option, repeatable (e.g. UserKnownHostsFile=/path).
        #[arg(long = "ssh-option")]
        ssh_options: Vec<String>,
        /// Hosts deployed at once.
        #[arg(long, default_value_t = 8)]
        jobs: usize,
        /// Install root on the targets (see `install --prefix`).
        #[arg(long)]
        prefix: Option<PathBuf>,
        /// Install without systemd on the targets.
        #[arg(long)]
        no_systemd: bool,
        /// One JSON object per host instead of the table.
        #[arg(long)]
        json: bool,
        /// Admin token, to watch each worker register (and say if it waits
        /// for approval).
        #[arg(long, env = "DROVER_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        #[command(flatten)]
        agent: Args,
    },
    /// A fleet of virtual agents in this process, speaking the real protocol
    /// (load tests, capacity planning). Stops by itself after --duration.
    Simulate {
        /// Virtual agents.
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// What their jobs do.
        #[arg(long, value_enum, default_value = "noop")]
        job_mode: JobMode,
        /// Seconds to run.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        #[command(flatten)]
        agent: Args,
    },
    /// Preflight: can this machine run an agent for that coordinator?
    /// Exit status 0 only when everything needed passes.
    Check {
        #[command(flatten)]
        agent: Args,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Coordinator base URL, e.g. http://10.0.0.5:8700; or several,
    /// comma-separated, of coordinators sharing one store: the agent moves
    /// to the next when one is unreachable or answers 5xx.
    #[arg(
        long,
        env = "DROVER_COORDINATOR",
        default_value = "http://127.0.0.1:8700"
    )]
    pub coordinator: String,

    /// Shared secret to register with (only needed until the agent has a token).
    #[arg(long, env = "DROVER_REGISTRATION_SECRET", hide_env_values = true)]
    pub registration_secret: Option<String>,

    /// Token of a worker an admin pre-registered (POST /api/v1/workers);
    /// used instead of the registration secret.
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// PEM file of the CA that signed an https:// coordinator's certificate
    /// (a self-signed one, say); without it the public web roots apply.
    #[arg(long, env = "DROVER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// Directory for the agent's token, result spool and job scratch dirs.
    #[arg(
        long,
        env = "DROVER_STATE_DIR",
        default_value = "/var/lib/drover-agent"
    )]
    pub state_dir: PathBuf,

    /// Worker name (default: the hostname). Unique per machine.
    #[arg(long, env = "DROVER_NAME")]
    pub name: Option<String>,

    /// Capability tags, comma separated (e.g. cuda12,a100).
    #[arg(long, env = "DROVER_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,

    /// Jobs run at once (default: one per GPU, or 1 on a CPU worker).
    #[arg(long, env = "DROVER_SLOTS")]
    pub slots: Option<u32>,

    /// Pretend to have these GPUs instead of asking NVML:
    /// comma list of [COUNTx]MODEL:VRAM_MB, e.g. 4xA100:81920,RTX4090:24564
    #[arg(long, env = "DROVER_FAKE_GPUS")]
    pub fake_gpus: Option<String>,

    /// Seconds between SIGTERM and SIGKILL when a job is cancelled or times out.
    #[arg(long, env = "DROVER_KILL_GRACE", default_value_t = 10)]
    pub kill_grace: u64,

    /// Seconds running jobs get to finish on SIGTERM before they are stopped
    /// and handed back to the coordinator.
    #[arg(long, env = "DROVER_SHUTDOWN_GRACE", default_value_t = 60)]
    pub shutdown_grace: u64,

    /// User jobs run as, when the agent runs as root (default: drover-job,
    /// which install makes; jobs must not run as the user that holds the
    /// agent's token).
    #[arg(long, env = "DROVER_JOB_USER")]
    pub job_user: Option<String>,

    /// The umask jobs start with, in octal (the agent's own is 0077).
    #[arg(long, env = "DROVER_JOB_UMASK", default_value = "0022", value_parser = parse_umask)]
    pub job_umask: u32,
}

/// `--coordinator`: one URL or several, comma-separated, each normalized
/// (no trailing slash); the list comes back comma-joined.
fn coordinator_list(text: &str) -> Result<String, String> {
    let urls: Vec<&str> = text
        .split(',')
        .map(|u| u.trim().trim_end_matches('/'))
        .collect();
    for url in &urls {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "--coordinator {url:?} must be an http:// or https:// URL, e.g. http://10.0.0.5:8700 \
                 (several: comma-separated)"
            ));
        }
    }
    Ok(urls.join(","))
}

/// The URLs of a `--coordinator` list.
pub fn coordinator_urls(list: &str) -> impl Iterator<Item = &str> {
    list.split(',')
}

/// An octal umask such as 0022 or 027.
fn parse_umask(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim(), 8) {
        Ok(mask) if mask <= 0o777 => Ok(mask),
        _ => Err(format!(
            "{s:?} is not an octal umask from 0000 to 0777 (e.g. 0022)"
        )),
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub coordinator: String,
    pub registration_secret: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub name: String,
    pub tags: Vec<String>,
    pub slots: Option<u32>,
    pub fake_gpus: Option<Vec<GpuInfo>>,
    pub kill_grace: Duration,
    pub shutdown_grace: Duration,
    /// None: jobs run as the agent's own user.
    pub job_user: Option<crate::jobuser::JobUser>,
    pub job_umask: u32,
}

impl Config {
    pub fn from_args(args: Args) -> Result<Config, String> {
        let coordinator = coordinator_list(&args.coordinator)?;
        let name = match args.name {
            Some(n) if !n.trim().is_empty() => n.trim().to_string(),
            Some(_) => return Err("--name must not be empty".into()),
            None => inventory::hostname(),
        };
        let tags: Vec<String> = args
            .tags
            .into_iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if args.slots == Some(0) {
            return Err("--slots must be at least 1".into());
        }
        let fake_gpus = match args.fake_gpus.as_deref() {
            None | Some("") => None,
            Some(spec) => Some(inventory::parse_fake_gpus(spec)?),
        };
        Ok(Config {
            coordinator,
            registration_secret: args.registration_secret.filter(|s| !s.is_empty()),
            token: args.token.filter(|s| !s.is_empty()),
            ca_cert: args.ca_cert,
            state_dir: args.state_dir,
            name,
            tags,
            slots: args.slots,
            fake_gpus,
            kill_grace: Duration::from_secs(args.kill_grace),
            shutdown_grace: Duration::from_secs(args.shutdown_grace),
            job_user: crate::jobuser::resolve(args.job_user.as_deref().filter(|u| !u.is_empty()))?,
            job_umask: args.job_umask,
        })
    }
}

/// What virtual jobs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JobMode {
    /// Complete at once.
    Noop,
    /// Sleep 0-2 s, then complete.
    Sleep,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `--help` describes every flag of every subcommand.
    #[test]
    fn every_flag_has_a_description() {
        let cli = super::Cli::command();
        for cmd in std::iter::once(&cli).chain(cli.get_subcommands()) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "{} --{id} has no description",
                    cmd.get_name()
                );
            }
        }
    }
}
