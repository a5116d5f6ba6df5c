//! HTTPS on the coordinator's listener (--tls-cert/--tls-key), and an agent
//! that trusts it through --ca-cert.

use crate::harness::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn coordinator_serves_https_and_agents_verify_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem())?;
    std::fs::write(&key_pem, cert.signing_key.serialize_pem())?;
    let cert_arg = cert_pem.to_string_lossy().to_string();
    let key_arg = key_pem.to_string_lossy().to_string();
    let coord = Coordinator::start(
        dir.path(),
        &[
            "--auto-approve",
            "--tls-cert",
            &cert_arg,
            "--tls-key",
            &key_arg,
        ],
    )?;
    assert!(coord.url.starts_with("https://"), "{}", coord.url);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let api = Api::with_tls(&coord.url, Arc::new(config));
    assert!(api.healthy(), "/healthz over HTTPS");

    // Plain HTTP to the TLS port gets nowhere, and harms nothing.
    let plain = Api::new(&coord.url.replace("https://", "http://"));
    assert!(plain
        .call("GET", "/healthz", None, None)
        .map(|r| r.status != 200)
        .unwrap_or(true));
    assert!(api.healthy());

    // An agent that trusts the CA runs a job; one that does not says why.
    let _good = Agent::start(
        &coord.url,
        dir.path(),
        "trusting",
        &["--ca-cert", &cert_arg],
    )?;
    let id = api.submit(&json!({"command": ["true"]}))?;
    wait_for("the job over HTTPS", Duration::from_secs(30), || {
        Ok((api.job(id)?["status"] == "succeeded").then_some(()))
    })?;
    let _bad = Agent::start(&coord.url, dir.path(), "untrusting", &[])?;
    let log = dir.path().join("agent-untrusting.log");
    wait_for("the TLS hint", Duration::from_secs(20), || {
        Ok(std::fs::read_to_string(&log)?
            .contains("--ca-cert")
            .then_some(()))
    })?;
    Ok(())
}
