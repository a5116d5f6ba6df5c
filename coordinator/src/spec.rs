//! A job submission: parsed strictly (an unknown field is a 422 naming it)
//! and validated into a [`NewJob`] before anything is written.

use crate::error::ApiError;
use crate::model::NewJob;
use drover_proto::LIMITS_TAG;
use serde::Deserialize;
use serde_json::Value;

use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub min_vram_mb: u64,
    #[serde(default)]
    pub cpu_fallback: bool,
    /// Never run twice at once, even across a partition.
    #[serde(default)]
    pub exclusive: bool,
    /// Memory and CPU the job may use at most.
    #[serde(default)]
    pub limits: Option<drover_proto::Limits>,
    #[serde(default)]
    pub required_tags: Vec<String>,
    #[serde(default)]
    pub preferred_tags: Vec<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub not_before: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub metadata: Option<Value>,
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The most memory a limit may name: 16 TiB.
const MAX_MEMORY_MB: u64 = 16 * 1024 * 1024;
const MAX_ARGS_BYTES: usize = 256 * 1024;
const MAX_METADATA_BYTES: usize = 64 * 1024;

fn no_nul(field: &str, s: &str) -> Result<(), ApiError> {
    if s.contains('\0') {
        return Err(ApiError::invalid(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// Validates and de-duplicates a list of tags.
pub fn tags(field: &str, tags: Vec<String>) -> Result<Vec<String>, ApiError> {
    // Counted as sent, duplicates included (as the OpenAPI document says).
    if tags.len() > 64 {
        return Err(ApiError::invalid(field, "at most 64 tags"));
    }
    let mut out = Vec::with_capacity(tags.len());
    for (i, t) in tags.into_iter().enumerate() {
        let f = format!("{field}[{i}]");
        if t.is_empty() || t.len() > 64 {
            return Err(ApiError::invalid(&f, "a tag is 1 to 64 characters"));
        }
        if !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/=".contains(c))
        {
            return Err(ApiError::invalid(
                &f,
                format!("tag {t:?} may only hold letters, digits and - _ . : / ="),
            ));
        }
        if t.starts_with("drover:") && !(field == "required_tags" && t == LIMITS_TAG) {
            return Err(ApiError::invalid(
                &f,
                format!("tags starting with drover: are Drover's own ({LIMITS_TAG}: the worker can enforce limits)"),
            ));
        }
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// A worker's name or machine id: 1 to 64 of letters, digits and `-_.`,
/// starting with a letter or digit (a hostname fits; a shell
/// metacharacter, a space or a quote does not).
pub fn worker_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        return Ok(());
    }
    Err(ApiError::invalid(
        field,
        format!(
            "{name:?} is not a valid {field}: 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ),
    ))
}

/// `s` as one shell word: as it is when it holds nothing the shell reads
/// specially, else in single quotes (a quote inside as '\'').
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.,:/=@+%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Parses an RFC 3339 time into milliseconds since the epoch.
pub fn parse_time(field: &str, s: &str) -> Result<i64, ApiError> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        ApiError::invalid(
            field,
            format!("{s:?} is not an RFC 3339 time like 2026-01-01T00:00:00Z: {e}"),
        )
    })?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| ApiError::invalid(field, "must be after 1970"))?;
    Ok(d.as_millis() as i64)
}

impl JobSpec {
    /// Checks every field, in the order of the document: the first one at
    /// fault is named.
    pub fn validate(self) -> Result<NewJob, ApiError> {
        self.check_command()?;
        self.check_resources()?;
        let max_attempts = self.check_scheduling()?;
        let not_before = match &self.not_before {
            Some(s) => Some(parse_time("not_before", s)?),
            None => None,
        };
        if let Some(k) = &self.idempotency_key {
            if k.is_empty() || k.len() > 200 {
                return Err(ApiError::invalid(
                    "idempotency_key",
                    "must be 1 to 200 characters",
                ));
            }
        }
        let metadata = metadata(self.metadata)?;
        let limits = self
            .limits
            .filter(|l| l.memory_mb.is_some() || l.cpus.is_some());
        Ok(NewJob {
            command: self.command,
            env: self.env,
            cwd: self.cwd,
            gpus: self.gpus,
            min_vram_mb: self.min_vram_mb,
            cpu_fallback: self.cpu_fallback,
            exclusive: self.exclusive,
            limits,
            // Sorted: jobs needing the same tags form one shape for dispatch.
            // A job with limits runs only where they hold (`LIMITS_TAG`).
            required_tags: {
                let mut t = tags("required_tags", self.required_tags)?;
                if limits.is_some() && !t.iter().any(|x| x == LIMITS_TAG) {
                    t.push(LIMITS_TAG.to_string());
                }
                t.sort();
                t
            },
            preferred_tags: tags("preferred_tags", self.preferred_tags)?,
            priority: self.priority,
            max_attempts,
            timeout_s: self.timeout_s,
            not_before,
            idempotency_key: self.idempotency_key,
            metadata,
            submitted_by: None,
        })
    }

    /// The argv, the environment and their size, the working directory.
    fn check_command(&self) -> Result<(), ApiError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(ApiError::invalid(
                "command",
                "must be a non-empty array of strings: the program and its arguments",
            ));
        }
        let mut size = 0;
        for (i, a) in self.command.iter().enumerate() {
            no_nul(&format!("command[{i}]"), a)?;
            size += a.len();
        }
        for (k, v) in &self.env {
            let f = format!("env.{k}");
            if k.is_empty() || k.contains('=') {
                return Err(ApiError::invalid(
                    &f,
                    "an env name must be non-empty and hold no '='",
                ));
            }
            no_nul(&f, k)?;
            no_nul(&f, v)?;
            size += k.len() + v.len();
        }
        if size > MAX_ARGS_BYTES {
            return Err(ApiError::invalid(
                "command",
                format!("command and env together exceed {MAX_ARGS_BYTES} bytes"),
            ));
        }
        if let Some(cwd) = &self.cwd {
            no_nul("cwd", cwd)?;
            if !cwd.starts_with('/') {
                return Err(ApiError::invalid("cwd", "must be an absolute path"));
            }
        }
        Ok(())
    }

    /// GPUs, CPU fallback, VRAM.
    fn check_resources(&self) -> Result<(), ApiError> {
        if self.gpus > 64 {
            return Err(ApiError::invalid("gpus", "at most 64 GPUs per job"));
        }
        let no_gpus = "is set but the job asks for no GPUs (gpus: 0)";
        if self.cpu_fallback && self.gpus == 0 {
            return Err(ApiError::invalid("cpu_fallback", no_gpus));
        }
        if self.min_vram_mb > 0 && self.gpus == 0 {
            return Err(ApiError::invalid("min_vram_mb", no_gpus));
        }
        if self.min_vram_mb > 16 * 1024 * 1024 {
            return Err(ApiError::invalid(
                "min_vram_mb",
                "is larger than any GPU (16 TiB)",
            ));
        }
        let limits = self.limits.unwrap_or_default();
        if limits
            .memory_mb
            .is_some_and(|m| !(16..=MAX_MEMORY_MB).contains(&m))
        {
            return Err(ApiError::invalid(
                "limits.memory_mb",
                format!("must be from 16 to {MAX_MEMORY_MB} (MB)"),
            ));
        }
        if limits.cpus.is_some_and(|c| !(0.01..=1024.0).contains(&c)) {
            return Err(ApiError::invalid(
                "limits.cpus",
                "must be from 0.01 to 1024 (CPUs' worth of time)",
            ));
        }
        Ok(())
    }

    /// Priority, attempts and timeout; returns the attempts allowed.
    fn check_scheduling(&self) -> Result<u32, ApiError> {
        if !(-1_000_000..=1_000_000).contains(&self.priority) {
            return Err(ApiError::invalid(
                "priority",
                "must be between -1000000 and 1000000",
            ));
        }
        let max_attempts = self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if !(1..=100).contains(&max_attempts) {
            return Err(ApiError::invalid(
                "max_attempts",
                "must be between 1 and 100",
            ));
        }
        if let Some(t) = self.timeout_s {
            if t == 0 || t > 365 * 24 * 3600 {
                return Err(ApiError::invalid(
                    "timeout_s",
                    "must be between 1 and 31536000 seconds",
                ));
            }
        }
        Ok(max_attempts)
    }
}

/// Metadata: a JSON object of bounded size (none is an empty object).
fn metadata(m: Option<Value>) -> Result<Value, ApiError> {
    match m {
        None | Some(Value::Null) => Ok(Value::Object(Default::default())),
        Some(m @ Value::Object(_)) => {
            if m.to_string().len() > MAX_METADATA_BYTES {
                return Err(ApiError::invalid(
                    "metadata",
                    format!("is larger than {MAX_METADATA_BYTES} bytes"),
                ));
            }
            Ok(m)
        }
        Some(_) => Err(ApiError::invalid("metadata", "must be a JSON object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `sh` makes of a quoted word is the word itself.
    #[test]
    fn shell_quoting_survives_the_shell() {
        for word in [
            "gpu-7",
            "gpu-7' ; touch X ; echo '",
            "a b",
            "$(id)",
            "`id`",
            "x\\y\"z",
            "",
        ] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(word)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), word, "{word:?}");
        }
        assert_eq!(shell_quote("root@10.0.0.5"), "root@10.0.0.5");
    }

    fn check(body: &str, expected_field: Option<&str>) {
        let spec: JobSpec = match serde_json::from_str(body) {
            Ok(s) => s,
            Err(e) => panic!("{body}: does not parse: {e}"),
        };
        match (spec.validate(), expected_field) {
            (Ok(_), None) => {}
            (Err(e), Some(f)) => assert_eq!(e.field.as_deref(), Some(f), "{body}: {e}"),
            (Ok(_), Some(f)) => panic!("{body}: accepted, expected an error on {f}"),
            (Err(e), None) => panic!("{body}: refused: {e}"),
        }
    }

    #[test]
    fn validation_table() {
        check(r#"{"command": ["true"]}"#, None);
        check(
            r#"{"command": ["python3", "train.py"], "env": {"SEED": "7"}, "cwd": "/srv", "gpus": 1,
                "min_vram_mb": 40000, "required_tags": ["cuda12"], "preferred_tags": ["a100"],
                "priority": 5, "max_attempts": 3, "timeout_s": 3600,
                "not_before": "2026-01-01T00:00:00Z", "idempotency_key": "sweep-17",
                "metadata": {"owner": "ana"}}"#,
            None,
        );
        check(r#"{"command": []}"#, Some("command"));
        check(r#"{"command": [""]}"#, Some("command"));
        check(r#"{"command": ["a\u0000b"]}"#, Some("command[0]"));
        check(
            r#"{"command": ["x"], "env": {"A=B": "1"}}"#,
            Some("env.A=B"),
        );
        check(r#"{"command": ["x"], "cwd": "relative"}"#, Some("cwd"));
        check(
            r#"{"command": ["x"], "min_vram_mb": 10}"#,
            Some("min_vram_mb"),
        );
        check(
            r#"{"command": ["x"], "max_attempts": 0}"#,
            Some("max_attempts"),
        );
        check(r#"{"command": ["x"], "timeout_s": 0}"#, Some("timeout_s"));
        check(
            r#"{"command": ["x"], "not_before": "tomorrow"}"#,
            Some("not_before"),
        );
        check(
            r#"{"command": ["x"], "required_tags": ["ok", "bad tag"]}"#,
            Some("required_tags[1]"),
        );
        check(r#"{"command": ["x"], "metadata": [1]}"#, Some("metadata"));
        check(
            r#"{"command": ["x"], "idempotency_key": ""}"#,
            Some("idempotency_key"),
        );
        check(
            r#"{"command": ["x"], "limits": {"memory_mb": 8}}"#,
            Some("limits.memory_mb"),
        );
        check(
            r#"{"command": ["x"], "limits": {"cpus": 0}}"#,
            Some("limits.cpus"),
        );
        check(
            r#"{"command": ["x"], "preferred_tags": ["drover:limits"]}"#,
            Some("preferred_tags[0]"),
        );
        check(
            r#"{"command": ["x"], "required_tags": ["drover:other"]}"#,
            Some("required_tags[0]"),
        );
        check(
            r#"{"command": ["x"], "limits": {"memory_mb": 512, "cpus": 0.5}}"#,
            None,
        );
    }

    #[test]
    fn a_job_with_limits_requires_a_worker_that_holds_them() {
        let spec = |json: &str| -> NewJob {
            serde_json::from_str::<JobSpec>(json)
                .unwrap()
                .validate()
                .unwrap()
        };
        let limited =
            spec(r#"{"command": ["x"], "required_tags": ["gpu"], "limits": {"cpus": 2}}"#);
        assert_eq!(limited.required_tags, vec!["drover:limits", "gpu"]);
        let empty = spec(r#"{"command": ["x"], "limits": {}}"#);
        assert_eq!(empty.limits, None, "no limit named: none");
        assert!(empty.required_tags.is_empty());
        // Jobs from before limits existed keep their idempotency fingerprint.
        assert_eq!(
            empty.fingerprint(),
            spec(r#"{"command": ["x"]}"#).fingerprint()
        );
    }

    #[test]
    fn unknown_fields_and_wrong_types_do_not_parse() {
        assert!(serde_json::from_str::<JobSpec>(r#"{"command": ["x"], "gpu": 1}"#).is_err());
        assert!(serde_json::from_str::<JobSpec>(r#"{"command": ["x"], "gpus": -1}"#).is_err());
        assert!(serde_json::from_str::<JobSpec>(r#"{"command": "x"}"#).is_err());
    }

    #[test]
    fn fingerprint_follows_the_spec() {
        let a =
            serde_json::from_str::<JobSpec>(r#"{"command": ["x"], "env": {"B": "1", "A": "2"}}"#)
                .unwrap()
                .validate()
                .unwrap();
        let b =
            serde_json::from_str::<JobSpec>(r#"{"env": {"A": "2", "B": "1"}, "command": ["x"]}"#)
                .unwrap()
                .validate()
                .unwrap();
        let c = serde_json::from_str::<JobSpec>(r#"{"command": ["y"]}"#)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
