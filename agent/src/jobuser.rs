//! The user jobs run as. A job runs code the agent's operator did not
//! write: as root it could read the agent's token (and with it claim other
//! users' jobs and their secrets). An agent running as root starts its jobs
//! as `drover-job` (made by `install`, in the `video` and `render` groups
//! for GPUs) or the user `--job-user` names; an agent running as another
//! user starts them as itself.

use std::path::PathBuf;

/// The default job user, made by `drover-agent install`.
pub const DEFAULT: &str = "drover-job";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from /etc/group).
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

/// The user jobs run as: `None` runs them as the agent's own user. A user
/// named on the command line must exist; a missing default is a warning
/// (jobs then run as root, which `install` avoids by making it).
pub fn resolve(wanted: Option<&str>) -> Result<Option<JobUser>, String> {
    let root = rustix::process::geteuid().is_root();
    if !root {
        return match wanted {
            Some(name) => Err(format!(
                "--job-user {name} needs the agent to run as root (it runs jobs as itself otherwise)"
            )),
            None => Ok(None),
        };
    }
    let name = wanted.unwrap_or(DEFAULT);
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    match lookup(&passwd, &group, name) {
        Some(user) => Ok(Some(user)),
        None if wanted.is_some() => Err(format!(
            "--job-user {name}: no such user (create it, or leave the flag out to use {DEFAULT})"
        )),
        None => {
            log::warn!(
                "jobs run as root and can read this agent's token: there is no user {DEFAULT} \
                 (drover-agent install makes it; or pass --job-user)"
            );
            Ok(None)
        }
    }
}

/// `name` in passwd(5) text, with its groups from group(5) text.
fn lookup(passwd: &str, group: &str, name: &str) -> Option<JobUser> {
    let fields: Vec<&str> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == name)?;
    let (uid, gid) = (fields[2].parse().ok()?, fields[3].parse().ok()?);
    let mut groups: Vec<u32> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == name))
        .filter_map(|f| f[2].parse().ok())
        .collect();
    groups.push(gid);
    groups.sort_unstable();
    groups.dedup();
    Some(JobUser {
        name: name.to_string(),
        uid,
        gid,
        groups,
        home: PathBuf::from(fields[5]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_and_its_groups_are_read_from_the_files() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\ndrover-job:x:998:997::/nonexistent:/usr/sbin/nologin\n";
        let group = "video:x:44:drover-job,alice\nrender:x:105:drover-job\naudio:x:29:alice\ndrover-job:x:997:\n";
        let u = lookup(passwd, group, "drover-job").unwrap();
        assert_eq!((u.uid, u.gid), (998, 997));
        assert_eq!(u.groups, vec![44, 105, 997]);
        assert_eq!(u.home, PathBuf::from("/nonexistent"));
        assert!(lookup(passwd, group, "nobody-here").is_none());
        // A name that is a prefix of another is not that user.
        assert!(lookup(passwd, group, "drover").is_none());
    }
}
