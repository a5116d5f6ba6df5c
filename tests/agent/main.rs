//! The real agent binary against a scriptable fake coordinator (tiny_http:
//! fine here, no network reaches it) that answers what a test wants.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Serves every request with `respond(path) -> (status, body)` until dropped.
struct Fake {
    server: Arc<tiny_http::Server>,
    url: String,
    hits: Arc<AtomicUsize>,
}

impl Fake {
    fn start(respond: fn(&str) -> (u16, &'static str)) -> Result<Fake, Box<dyn std::error::Error>> {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?);
        let url = format!(
            "http://{}",
            server.server_addr().to_ip().ok_or("no ip addr")?
        );
        let hits = Arc::new(AtomicUsize::new(0));
        let (s, h) = (server.clone(), hits.clone());
        std::thread::spawn(move || {
            for mut req in s.incoming_requests() {
                h.fetch_add(1, Ordering::Relaxed);
                let mut body = Vec::new();
                let _ = req.as_reader().read_to_end(&mut body);
                let (status, text) = respond(req.url());
                let kind = if text.starts_with('<') {
                    "text/html"
                } else {
                    "application/json"
                };
                let header = tiny_http::Header::from_bytes("Content-Type", kind)
                    .unwrap_or_else(|()| unreachable!("a valid header"));
                let _ = req.respond(
                    tiny_http::Response::from_string(text)
                        .with_status_code(status)
                        .with_header(header),
                );
            }
        });
        Ok(Fake { server, url, hits })
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

fn agent(url: &str, state: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_drover-agent"));
    c.args([
        "--coordinator",
        url,
        "--registration-secret",
        "some-secret",
        "--name",
        "t",
    ])
    .arg("--state-dir")
    .arg(state)
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

#[test]
fn wrong_secret_stops_the_agent_with_a_hint() -> TestResult {
    let fake = Fake::start(|_| {
        (
            401,
            r#"{"error": {"code": "unauthorized", "message": "wrong registration secret"}}"#,
        )
    })?;
    let dir = tempfile::tempdir()?;
    let out = agent(&fake.url, dir.path()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "exit 3 = refused for good (systemd does not restart it): {stderr}"
    );
    assert!(
        stderr.contains("--registration-secret"),
        "the hint names the flag: {stderr}"
    );
    assert!(
        !stderr.contains("some-secret"),
        "the secret is never logged"
    );
    Ok(())
}

#[test]
fn a_failing_coordinator_is_retried_and_explained_once() -> TestResult {
    let fake = Fake::start(|_| {
        (
            503,
            r#"{"error": {"code": "database_busy", "message": "busy"}}"#,
        )
    })?;
    let dir = tempfile::tempdir()?;
    let mut child = agent(&fake.url, dir.path()).spawn()?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert!(child.try_wait()?.is_none(), "the agent keeps retrying");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let hits = fake.hits.load(Ordering::Relaxed);
    assert!(
        (2..=40).contains(&hits),
        "retried with backoff, not in a tight loop: {hits} tries in 4 s"
    );
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("registering failed"))
        .count();
    assert_eq!(warnings, 1, "the same failure is explained once: {stderr}");
    assert!(
        stderr.contains("journalctl -u drover-coordinator"),
        "with a hint: {stderr}"
    );
    Ok(())
}

#[test]
fn an_unwritable_state_dir_is_refused_with_a_hint() -> TestResult {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x")?;
    let out = agent("http://127.0.0.1:9", &file.join("state")).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("state dir") && stderr.contains("--state-dir"),
        "{stderr}"
    );
    Ok(())
}

/// Runs the agent against `url` for `secs`, then returns what it logged.
fn run_for(url: &str, secs: u64) -> Result<String, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut child = agent(url, dir.path()).spawn()?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn a_server_that_is_not_drover_is_named_as_such() -> TestResult {
    let fake = Fake::start(|_| (502, "<html><body>Bad Gateway</body></html>"))?;
    let stderr = run_for(&fake.url, 2)?;
    assert!(
        stderr.contains("this is not a Drover coordinator")
            && stderr.contains("check --coordinator"),
        "{stderr}"
    );
    assert!(!stderr.contains("the coordinator is failing"), "{stderr}");
    Ok(())
}

#[test]
fn https_against_a_plain_http_coordinator_says_so() -> TestResult {
    // A plain HTTP server answers a TLS hello with a 400 in clear text.
    let server = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("https://{}", server.local_addr()?);
    std::thread::spawn(move || {
        for mut conn in server.incoming().flatten() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 512];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let stderr = run_for(&url, 3)?;
    assert!(stderr.contains("answers plain HTTP, not HTTPS"), "{stderr}");
    Ok(())
}

#[test]
fn an_unreachable_coordinator_is_mentioned_while_it_lasts() -> TestResult {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    // Retries back off up to 10 s: 42 s holds one past the 30 s mark.
    let stderr = run_for(&format!("http://127.0.0.1:{port}"), 42)?;
    let first = stderr
        .lines()
        .filter(|l| l.contains("registering failed"))
        .count();
    let again = stderr
        .lines()
        .filter(|l| l.contains("still failing after"))
        .count();
    assert_eq!(first, 1, "explained once: {stderr}");
    assert!(again >= 1, "a reminder at least every 30 s: {stderr}");
    Ok(())
}
