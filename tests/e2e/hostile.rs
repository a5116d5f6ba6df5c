//! Bad requests get clear errors and change nothing; hostile connections
//! do not take the coordinator down.

use crate::harness::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn bad_requests_get_the_right_status_and_change_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &["--auto-approve"])?;
    let api = coord.api();
    let reg = json!({"name": "w", "machine_id": "m", "inventory": {"hostname": "h"}}).to_string();
    let r = api.call(
        "POST",
        "/api/v1/agents/register",
        Some(SECRET),
        Some(reg.as_bytes()),
    )?;
    assert_eq!(r.status, 200, "{}", r.text);
    let agent = r.body["token"].as_str().ok_or("no token")?.to_string();
    let big = vec![b' '; 4 * 1024 * 1024];
    let named = |role: &str| -> TestResult<String> {
        let body = json!({"name": format!("bad-{role}"), "role": role});
        let r = api.admin("POST", "/api/v1/tokens", Some(&body))?;
        Ok(r.body["token"].as_str().ok_or(r.text.clone())?.to_string())
    };
    let (read, submit) = (named("read")?, named("submit")?);
    let fat_metadata = json!({"metadata": {"blob": "x".repeat(5000)}}).to_string();

    // (method, path, token, body, status, code, field)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a [u8]>,
        u16,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b"{\"command\": [\"x\""),
            400,
            "malformed_json",
            "",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b""),
            400,
            "malformed_json",
            "",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b"{\"command\": \"ls\"}"),
            422,
            "invalid_field",
            "command",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b"{}"),
            422,
            "invalid_field",
            "command",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b"{\"command\": []}"),
            422,
            "invalid_field",
            "command",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b"{\"command\": [\"x\"], \"gpus\": -1}"),
            422,
            "invalid_field",
            "gpus",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b"{\"command\": [\"x\"], \"priority\": \"high\"}"),
            422,
            "invalid_field",
            "priority",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b"{\"command\": [\"x\"], \"timeout_s\": -5}"),
            422,
            "invalid_field",
            "timeout_s",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(b"{\"command\": [\"x\"], \"gpu\": 1}"),
            422,
            "invalid_field",
            "gpu",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(ADMIN),
            Some(&big),
            413,
            "body_too_large",
            "",
        ),
        (
            "POST",
            "/api/v1/jobs",
            None,
            Some(b"{\"command\": [\"x\"]}"),
            401,
            "unauthorized",
            "",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some("wrong-token"),
            Some(b"{\"command\": [\"x\"]}"),
            401,
            "unauthorized",
            "",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(SECRET),
            Some(b"{\"command\": [\"x\"]}"),
            401,
            "unauthorized",
            "",
        ),
        (
            "POST",
            "/api/v1/jobs",
            Some(&agent),
            Some(b"{\"command\": [\"x\"]}"),
            401,
            "unauthorized",
            "",
        ),
        ("GET", "/api/v1/jobs", None, None, 401, "unauthorized", ""),
        (
            "GET",
            "/api/v1/jobs?limit=0",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "limit",
        ),
        (
            "GET",
            "/api/v1/jobs?status=lost",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "status",
        ),
        (
            "GET",
            "/api/v1/jobs/999999",
            Some(ADMIN),
            None,
            404,
            "not_found",
            "",
        ),
        (
            "GET",
            "/api/v1/jobs/abc",
            Some(ADMIN),
            None,
            404,
            "not_found",
            "",
        ),
        (
            "POST",
            "/api/v1/jobs/999999/cancel",
            Some(ADMIN),
            None,
            404,
            "not_found",
            "",
        ),
        (
            "GET",
            "/api/v1/workers/999999",
            Some(ADMIN),
            None,
            404,
            "not_found",
            "",
        ),
        (
            "GET",
            "/api/v1/nope",
            Some(ADMIN),
            None,
            404,
            "not_found",
            "",
        ),
        (
            "DELETE",
            "/api/v1/jobs",
            Some(ADMIN),
            None,
            405,
            "method_not_allowed",
            "",
        ),
        (
            "POST",
            "/api/v1/agents/register",
            Some("wrong-secret"),
            Some(reg.as_bytes()),
            401,
            "unauthorized",
            "",
        ),
        (
            "POST",
            "/api/v1/agents/register",
            Some(SECRET),
            Some(b"{\"name\": \"w\"}"),
            422,
            "invalid_field",
            "machine_id",
        ),
        (
            "POST",
            "/api/v1/agents/claim?wait=0",
            Some(ADMIN),
            Some(b"{\"incarnation\": \"i\"}"),
            401,
            "unauthorized",
            "",
        ),
        (
            "POST",
            "/api/v1/agents/claim?wait=0",
            None,
            Some(b"{\"incarnation\": \"i\"}"),
            401,
            "unauthorized",
            "",
        ),
        (
            "POST",
            "/api/v1/agents/heartbeat",
            Some(&agent),
            Some(b"{\"incarnation\": 5}"),
            422,
            "invalid_field",
            "incarnation",
        ),
        (
            "POST",
            "/api/v1/jobs/999999/complete",
            Some(&agent),
            Some(b"{\"attempt\": 1, \"outcome\": \"succeeded\"}"),
            404,
            "not_found",
            "",
        ),
        (
            "POST",
            "/api/v1/jobs/1/complete",
            Some(&agent),
            Some(b"{\"attempt\": 1, \"outcome\": \"won\"}"),
            422,
            "invalid_field",
            "outcome",
        ),
        (
            "POST",
            "/api/v1/jobs/1/complete",
            Some(&agent),
            Some(b"{\"attempt\": 0, \"outcome\": \"failed\"}"),
            422,
            "invalid_field",
            "attempt",
        ),
        (
            "POST",
            "/api/v1/jobs/1/logs",
            Some(&agent),
            Some(b"x"),
            400,
            "invalid_parameter",
            "attempt",
        ),
        (
            "POST",
            "/api/v1/jobs/1/logs?attempt=1&stream=stdin",
            Some(&agent),
            Some(b"x"),
            400,
            "invalid_parameter",
            "stream",
        ),
        // Lists: bad cursors, unknown filters, bad values (400, named).
        (
            "GET",
            "/api/v1/jobs?before=x",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "before",
        ),
        (
            "GET",
            "/api/v1/jobs?after=-5",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "after",
        ),
        (
            "GET",
            "/api/v1/jobs?colour=red",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "colour",
        ),
        (
            "GET",
            "/api/v1/jobs?created_after=yesterday",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "created_after",
        ),
        (
            "GET",
            "/api/v1/jobs?limit=0",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "limit",
        ),
        (
            "GET",
            "/api/v1/events?type=a**",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "type",
        ),
        (
            "GET",
            "/api/v1/events?job=abc",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "job",
        ),
        (
            "GET",
            "/api/v1/workers?state=asleep",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "state",
        ),
        (
            "GET",
            "/api/v1/workers/1/logs?level=loud",
            Some(ADMIN),
            None,
            400,
            "invalid_parameter",
            "level",
        ),
        // Worker records: oversized metadata, nothing to change.
        (
            "PATCH",
            "/api/v1/workers/1",
            Some(ADMIN),
            Some(fat_metadata.as_bytes()),
            422,
            "invalid_field",
            "metadata",
        ),
        (
            "PATCH",
            "/api/v1/workers/1",
            Some(ADMIN),
            Some(b"{}"),
            422,
            "invalid_field",
            "",
        ),
        // Roles: 403 with a JSON error.
        (
            "POST",
            "/api/v1/jobs",
            Some(&read),
            Some(b"{\"command\": [\"true\"]}"),
            403,
            "forbidden",
            "",
        ),
        (
            "POST",
            "/api/v1/workers/1/drain",
            Some(&submit),
            None,
            403,
            "forbidden",
            "",
        ),
        (
            "PATCH",
            "/api/v1/workers/1",
            Some(&submit),
            Some(b"{\"drain\": true}"),
            403,
            "forbidden",
            "",
        ),
        (
            "POST",
            "/api/v1/tokens",
            Some(&submit),
            Some(b"{\"name\": \"x\", \"role\": \"admin\"}"),
            403,
            "forbidden",
            "",
        ),
        (
            "POST",
            "/api/v1/tokens",
            Some(ADMIN),
            Some(b"{\"name\": \"x\", \"role\": \"root\"}"),
            422,
            "invalid_field",
            "role",
        ),
    ];
    for (method, path, token, body, status, code, field) in &cases {
        let r = api.call(method, path, *token, *body)?;
        assert_eq!(r.status, *status, "{method} {path}: {}", r.text);
        assert_eq!(r.code(), *code, "{method} {path}: {}", r.text);
        assert_eq!(r.field(), *field, "{method} {path}: {}", r.text);
        assert!(
            !r.body["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{method} {path}: a message"
        );
    }
    // Nothing was half-written: no job exists, and the server still serves.
    let all = api.admin("GET", "/api/v1/jobs", None)?;
    assert_eq!(all.body["jobs"], json!([]), "{}", all.text);
    assert!(api.healthy());
    let id = api.submit(&json!({"command": ["true"]}))?;
    assert_eq!(api.job(id)?["status"], "queued");
    Ok(())
}

fn status_line(stream: &mut TcpStream) -> String {
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn hostile_connections_do_not_take_the_coordinator_down() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    let addr = coord.url.trim_start_matches("http://").to_string();
    let timeout = Some(Duration::from_secs(10));

    // A 1 TiB Content-Length with a 2 KB body: refused at once.
    let mut s = TcpStream::connect(&addr)?;
    s.set_read_timeout(timeout)?;
    write!(
        s,
        "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nContent-Length: 1099511627776\r\n\r\n"
    )?;
    s.write_all(&[b'x'; 2048])?;
    let line = status_line(&mut s);
    assert!(line.contains(" 413 "), "huge Content-Length: {line:?}");
    drop(s);
    assert!(api.healthy(), "alive after a huge Content-Length");

    // A refused request whose body is not read says the connection closes,
    // so a client does not reuse it and read EOF.
    let mut s = TcpStream::connect(&addr)?;
    s.set_read_timeout(timeout)?;
    write!(
        s,
        "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
    )?;
    let mut head = [0u8; 1024];
    let n = s.read(&mut head)?;
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    drop(s);

    // A 256 MiB request line with no line break: the connection is refused
    // long before that much is read.
    let mut s = TcpStream::connect(&addr)?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(timeout)?;
    s.write_all(b"GET /")?;
    let chunk = vec![b'a'; 1024 * 1024];
    let mut sent = 0usize;
    for _ in 0..256 {
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += 1;
    }
    println!("long request line: the server stopped reading after about {sent} MiB");
    assert!(sent < 256, "the server read a 256 MiB request line");
    drop(s);
    assert!(api.healthy(), "alive after a 256 MiB request line");

    // 300 connections that send half a request and stall.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(&addr)?;
        s.write_all(b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Le")?;
        stalled.push(s);
    }
    for _ in 0..20 {
        assert!(
            api.healthy(),
            "/healthz answers while 300 connections stall"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stalled);
    assert!(api.healthy());
    let rss = peak_rss_kib(coord.pid()).ok_or("no /proc status")?;
    println!(
        "coordinator peak RSS after hostile connections: {} KiB",
        rss
    );
    assert!(rss < 256 * 1024, "peak RSS {rss} KiB stays bounded");
    Ok(())
}
