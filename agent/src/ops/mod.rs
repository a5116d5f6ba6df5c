//! The operator's commands, beside the agent proper: `install` and
//! `uninstall` (this machine, with systemd or detached), `check` (can this
//! machine run an agent), `deploy` (install over ssh on many hosts). They
//! use the agent's config, client and inventory; the agent never uses them.

pub mod deploy;
pub mod setup;
