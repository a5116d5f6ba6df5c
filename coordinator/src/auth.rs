//! Tokens and secrets: generation, hashing, comparison, and the bearer header.
//!
//! Agent tokens are `drv_agent_` + 32 random bytes (hex); only their SHA-256
//! is stored. Secrets never reach a log line: [`Secret`] redacts `Debug`.

use crate::error::ApiError;
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A secret string whose `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// Constant-time check of a presented value against this secret.
    pub fn matches(&self, presented: &str) -> bool {
        // Comparing fixed-size digests keeps the time independent of where
        // the strings differ and of their lengths.
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented.as_bytes());
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Tokens already checked against the database (hash -> what the token
/// is: a worker id for agent tokens, id and role for API tokens), so calls
/// skip a database read. A revocation drops the entries it names and bumps
/// an epoch: a lookup that raced with it does not re-insert a stale entry.
/// An entry is trusted for `TOKEN_CACHE_TTL` at most, so a revocation this
/// process did not see (another coordinator wrote the database) takes
/// effect within it; heartbeats and claims check the worker's state in the
/// database anyway.
pub struct TokenCache<V> {
    map: std::sync::Mutex<std::collections::HashMap<String, (V, std::time::Instant)>>,
    epoch: std::sync::atomic::AtomicU64,
}

impl<V> Default for TokenCache<V> {
    fn default() -> Self {
        TokenCache {
            map: Default::default(),
            epoch: Default::default(),
        }
    }
}

/// Entries kept before the cache starts over.
const TOKEN_CACHE_MAX: usize = 100_000;
/// How long a checked token is trusted without reading the database again.
const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

type CacheMap<V> = std::collections::HashMap<String, (V, std::time::Instant)>;

impl<V: Copy> TokenCache<V> {
    fn map(&self) -> std::sync::MutexGuard<'_, CacheMap<V>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, hash: &str) -> Option<V> {
        let mut map = self.map();
        match map.get(hash) {
            Some((v, at)) if at.elapsed() < TOKEN_CACHE_TTL => Some(*v),
            Some(_) => {
                map.remove(hash);
                None
            }
            None => None,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Remembers a lookup made at `epoch`, unless a revocation came since.
    pub fn insert(&self, epoch: u64, hash: String, v: V) {
        let mut map = self.map();
        if self.epoch() == epoch {
            if map.len() >= TOKEN_CACHE_MAX {
                map.clear();
            }
            map.insert(hash, (v, std::time::Instant::now()));
        }
    }

    /// Drops the entries `gone` names.
    pub fn revoke(&self, gone: impl Fn(&V) -> bool) {
        let mut map = self.map();
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        map.retain(|_, (v, _)| !gone(v));
    }
}

impl TokenCache<i64> {
    /// A worker's agent token is dead (re-registration, reject, ...).
    pub fn revoke_worker(&self, worker_id: i64) {
        self.revoke(|id| *id == worker_id);
    }
}

/// What an API token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// GET only.
    Read,
    /// Also submit jobs, and cancel or retry its own.
    Submit,
    /// Everything (the admin token's role).
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Read, Role::Submit, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Who made a request: the admin token (no id) or a named API token.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub token_id: Option<i64>,
    pub role: Role,
}

/// When each named API token's use was last written, so that is done at
/// most once a minute per token.
#[derive(Default)]
pub struct Touched(std::sync::Mutex<std::collections::HashMap<i64, std::time::Instant>>);

/// How often a token's last use is written.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Touched {
    /// Whether token `id`'s use is due to be written (and notes it is).
    pub fn due(&self, id: i64) -> bool {
        let mut touched = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match touched.get(&id) {
            Some(at) if at.elapsed() < TOUCH_EVERY => false,
            _ => {
                if touched.len() >= TOKEN_CACHE_MAX {
                    touched.clear();
                }
                touched.insert(id, std::time::Instant::now());
                true
            }
        }
    }
}

/// SHA-256 of a token, hex: what the database stores.
pub fn hash_token(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// A fresh random token with a recognizable prefix.
pub fn new_token(prefix: &str) -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::internal(format!("no randomness for a token: {e}")))?;
    Ok(format!("{prefix}{}", hex(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// The admin token: given, read from a file, or generated on first start and
/// kept 0600 in `admin.token` next to the database.
pub fn admin_token(
    given: Option<String>,
    file: Option<&Path>,
    db: &Path,
) -> Result<Secret, String> {
    if let Some(t) = given {
        return check_admin_token(t, "--admin-token (DROVER_ADMIN_TOKEN)");
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the admin token file {}: {e}", path.display()))?;
        let first = text.lines().next().unwrap_or("").trim().to_string();
        return check_admin_token(first, &format!("the admin token file {}", path.display()));
    }
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let path = dir.join("admin.token");
    if path.exists() {
        return admin_token(None, Some(&path), db);
    }
    let token = new_token("drv_admin_").map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("creating {} for the admin token: {e}", dir.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("creating the admin token file {}: {e}", path.display()))?;
    writeln!(f, "{token}")
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("writing the admin token file {}: {e}", path.display()))?;
    log::warn!(
        "generated an admin token: it is in {} (read it with: sudo cat {})",
        path.display(),
        path.display()
    );
    Ok(Secret::new(token))
}

fn check_admin_token(t: String, source: &str) -> Result<Secret, String> {
    if t.len() < 16 {
        return Err(format!(
            "{source}: the admin token must be at least 16 characters"
        ));
    }
    refuse_placeholder(&t, source)?;
    Ok(Secret::new(t))
}

/// Where the example env file puts its placeholders.
pub const ENV_FILE: &str = "/etc/drover/coordinator.env";

/// Refuses the example env file's placeholder values (`change-me-...`).
pub fn refuse_placeholder(value: &str, source: &str) -> Result<(), String> {
    if value.to_ascii_lowercase().starts_with("change-me") {
        return Err(format!(
            "{source} is still the example's placeholder ({value:?}): set a real secret \
             (openssl rand -hex 32) in {ENV_FILE}, or wherever your unit's EnvironmentFile= points"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_matches_only_itself() {
        let s = Secret::new("correct horse battery".into());
        assert!(s.matches("correct horse battery"));
        assert!(!s.matches("correct horse batter"));
        assert!(!s.matches(""));
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn bearer_parsing() {
        let check = |value: Option<&str>, expected: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = value {
                h.insert(header::AUTHORIZATION, v.parse().unwrap());
            }
            assert_eq!(bearer(&h), expected, "header {value:?}");
        };
        check(None, None);
        check(Some("Bearer abc"), Some("abc"));
        check(Some("bearer  abc "), Some("abc"));
        check(Some("Basic abc"), None);
        check(Some("Bearer "), None);
        check(Some("abc"), None);
    }

    #[test]
    fn token_cache_forgets_revoked_workers_and_stale_lookups() {
        let c = TokenCache::default();
        let e = c.epoch();
        c.insert(e, "h1".into(), 1);
        c.insert(e, "h2".into(), 2);
        assert_eq!(c.get("h1"), Some(1));
        // A lookup that started before a revocation does not come back.
        let stale = c.epoch();
        c.revoke_worker(1);
        assert_eq!(c.get("h1"), None);
        assert_eq!(c.get("h2"), Some(2));
        c.insert(stale, "h1".into(), 1);
        assert_eq!(c.get("h1"), None);
        c.insert(c.epoch(), "h1".into(), 1);
        assert_eq!(c.get("h1"), Some(1));
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let a = new_token("drv_agent_").unwrap();
        let b = new_token("drv_agent_").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("drv_agent_") && a.len() == 10 + 64);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), a);
    }
}
