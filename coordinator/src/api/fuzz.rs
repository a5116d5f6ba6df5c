//! Property tests over every request body the coordinator parses: whatever
//! the bytes, parsing and validation answer Ok or a 4xx naming the problem,
//! and never panic.

use super::agents::check_beat;
use super::agents::check_report;
use super::parse_json;
use crate::error::ApiError;
use crate::spec::JobSpec;
use drover_proto::{ClaimRequest, CompleteRequest, HeartbeatRequest, RegisterRequest};
use proptest::prelude::*;
use serde_json::Value;

/// Arbitrary JSON documents, biased towards the shapes the API uses.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        "[ -~]{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "command",
            "gpus",
            "true",
            "echo",
            "",
            "succeeded",
            "cuda12"
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        let keys = prop::sample::select(vec![
            "command",
            "env",
            "cwd",
            "gpus",
            "min_vram_mb",
            "required_tags",
            "preferred_tags",
            "priority",
            "max_attempts",
            "timeout_s",
            "not_before",
            "idempotency_key",
            "metadata",
            "cpu_fallback",
            "exclusive",
            "limits",
            "memory_mb",
            "cpus",
            "name",
            "machine_id",
            "inventory",
            "slots",
            "incarnation",
            "leases",
            "attempt",
            "outcome",
            "exit_code",
            "completed",
            "job_id",
            "x",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys.prop_map(String::from), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn check<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match parse_json::<T>(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(e.status.is_client_error(), "{e}");
            assert!(!e.message.is_empty());
            None
        }
    }
}

fn all(bytes: &[u8]) {
    if let Some(spec) = check::<JobSpec>(bytes) {
        if let Err(e) = spec.validate() {
            assert_eq!(e.status.as_u16(), 422, "{e}");
            assert!(e.field.is_some(), "a validation error names its field: {e}");
        }
    }
    let _ = check::<Vec<JobSpec>>(bytes);
    let _ = check::<RegisterRequest>(bytes);
    let invalid = |e: ApiError| {
        assert_eq!(e.status.as_u16(), 422, "{e}");
        assert!(e.field.is_some(), "a validation error names its field: {e}");
    };
    if let Some(claim) = check::<ClaimRequest>(bytes) {
        for (i, done) in claim.completed.iter().enumerate() {
            let _ = check_report(&done.report, &format!("completed[{i}].")).map_err(invalid);
        }
        if let Some(beat) = &claim.beat {
            let _ = check_beat(beat, "beat.").map_err(invalid);
        }
    }
    if let Some(beat) = check::<HeartbeatRequest>(bytes) {
        let _ = check_beat(&beat, "").map_err(invalid);
    }
    if let Some(report) = check::<CompleteRequest>(bytes) {
        let _ = check_report(&report, "").map_err(invalid);
    }
}

proptest! {
    // 3000 cases by default (well under a second); CI sets PROPTEST_CASES
    // for a longer run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        all(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json()) {
        all(v.to_string().as_bytes());
    }
}
