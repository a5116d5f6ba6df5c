//! The OpenAPI document at /api/v1/openapi.json describes exactly the routes
//! the coordinator serves: none missing, none made up. (schemathesis, run by
//! `.ci/run`, checks the responses against it.)

use crate::harness::*;
use std::collections::BTreeSet;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// (METHOD, path) of every `.route(...)` in the router's source.
/// The path of a `.route(` call: a string literal, or a constant of the
/// protocol's route table (`routes::NAME`).
fn route_path(call: &str) -> String {
    use drover_proto::routes;
    let arg = call.trim_start();
    let Some(name) = arg.strip_prefix("routes::") else {
        return call.split('"').nth(1).unwrap_or_default().to_string();
    };
    let name: String = name
        .chars()
        .take_while(|c| c.is_ascii_uppercase() || *c == '_')
        .collect();
    match name.as_str() {
        "REGISTER" => routes::REGISTER,
        "HEARTBEAT" => routes::HEARTBEAT,
        "CLAIM" => routes::CLAIM,
        "COMPLETE" => routes::COMPLETE,
        "LOGS" => routes::LOGS,
        "TELEMETRY" => routes::TELEMETRY,
        other => panic!("unknown route constant routes::{other}"),
    }
    .to_string()
}

fn served_routes() -> BTreeSet<(String, String)> {
    let src = include_str!("../../coordinator/src/api/mod.rs");
    let table = &src[..src.find(".fallback(").unwrap_or(src.len())];
    let mut out = BTreeSet::new();
    for part in table.split(".route(").skip(1) {
        let path = route_path(part);
        for m in METHODS {
            let call = format!("{}(", m.to_lowercase());
            let found = part.match_indices(&call).any(|(i, _)| {
                i == 0
                    || !part.as_bytes()[i - 1].is_ascii_alphanumeric()
                        && part.as_bytes()[i - 1] != b'_'
            });
            if found {
                out.insert((m.to_string(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn the_openapi_document_matches_the_routes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let coord = Coordinator::start(dir.path(), &[])?;
    let api = coord.api();
    let r = api.call("GET", "/api/v1/openapi.json", None, None)?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["openapi"], "3.1.0");
    let paths = r.body["paths"].as_object().ok_or("no paths")?;
    let mut documented = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().ok_or("path item not an object")? {
            let id = op["operationId"]
                .as_str()
                .ok_or(format!("{method} {path}: no operationId"))?;
            assert!(ids.insert(id.to_string()), "operationId {id} used twice");
            let responses = op["responses"]
                .as_object()
                .ok_or(format!("{method} {path}: no responses"))?;
            assert!(
                responses.keys().any(|c| c.starts_with('2')),
                "{method} {path}: no 2xx response"
            );
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served = served_routes();
    assert!(
        served.len() > 20,
        "the route table was not found in api/mod.rs: {served:?}"
    );
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let made_up: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from openapi.json: {undocumented:?}"
    );
    assert!(
        made_up.is_empty(),
        "openapi.json documents routes that do not exist: {made_up:?}"
    );

    // And the live server agrees: every documented operation is routed,
    // every other method on a documented path is 405.
    for path in paths.keys() {
        let concrete = path.replace("{id}", "1");
        for m in METHODS {
            let r = api.call(m, &concrete, None, None)?;
            let unrouted = r.status == 405
                || (r.status == 404
                    && r.body["error"]["message"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("no route")));
            if documented.contains(&(m.to_string(), path.clone())) {
                assert!(
                    !unrouted,
                    "{m} {concrete} is documented but not served: {} {}",
                    r.status, r.text
                );
                // Every error the API gives is the documented error shape.
                if r.status >= 400 {
                    assert!(
                        r.body["error"]["code"].is_string(),
                        "{m} {concrete}: {}",
                        r.text
                    );
                }
            } else {
                assert_eq!(
                    r.status, 405,
                    "{m} {concrete} is not documented: {}",
                    r.text
                );
            }
        }
    }
    Ok(())
}
