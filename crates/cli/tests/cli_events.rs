//! `kvroute events decode` on vLLM's payloads and on garbage.

use serde_json::Value as J;
use std::path::PathBuf;
use std::process::{Command, Output};

fn kvroute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvroute")).args(args).output().expect("run kvroute")
}

fn vector_batch(step_prefix: &str) -> J {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vllm/kv_events.json");
    let doc: J = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let step = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"].as_str().unwrap().starts_with(step_prefix))
        .unwrap_or_else(|| panic!("no step {step_prefix}"));
    step["batch"].clone()
}

fn stdout_json(out: &Output) -> J {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "expected one line, got {text:?}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn decodes_a_vllm_payload_from_hex_and_from_a_file() {
    let batch = vector_batch("r6 grows to 64 tokens");
    let hex = batch["payload_hex"].as_str().unwrap();
    let decoded = &batch["decoded"];
    let out = stdout_json(&kvroute(&["events", "decode", "--hex", hex]));
    assert_eq!(out["ts"], decoded[0]);
    assert_eq!(out["dp_rank"], decoded[2]);
    let events = out["events"].as_array().unwrap();
    let want = decoded[1].as_array().unwrap();
    assert_eq!(events.len(), want.len());
    for (got, want) in events.iter().zip(want) {
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&got[k], v, "field {k}");
        }
    }
    // Int hashes above 2^53 come out exactly.
    assert_eq!(events[1]["block_hashes"][0].as_u64(), Some(11309060389865205804));

    // The same payload as raw bytes in a file.
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let path = std::env::temp_dir().join(format!("kvroute-cli-events-{}.bin", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let from_file = stdout_json(&kvroute(&["events", "decode", "--file", path.to_str().unwrap()]));
    let _ = std::fs::remove_file(&path);
    assert_eq!(from_file, out);
}

#[test]
fn bytes_hashes_print_as_hex() {
    let batch = vector_batch("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0");
    let out = stdout_json(&kvroute(&[
        "events",
        "decode",
        "--hex",
        batch["payload_hex"].as_str().unwrap(),
    ]));
    assert_eq!(
        out["events"][0]["block_hashes"][0],
        batch["decoded"][1][0]["block_hashes"][0]["bytes_hex"]
    );
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "stderr: {err:?}");
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
}

#[test]
fn garbage_is_a_one_line_error_with_exit_code_2() {
    // Valid hex, not a batch.
    assert_one_line_error(&kvroute(&["events", "decode", "--hex", "c1c2c3"]), "decode error");
    // A truncated payload.
    let hex = vector_batch("reset_prefix_cache")["payload_hex"].as_str().unwrap().to_owned();
    let truncated = &hex[..hex.len() - 4];
    assert_one_line_error(&kvroute(&["events", "decode", "--hex", truncated]), "truncated");
    // Not hex at all.
    assert_one_line_error(&kvroute(&["events", "decode", "--hex", "zz"]), "invalid digit");
    // A missing file.
    assert_one_line_error(
        &kvroute(&["events", "decode", "--file", "/nonexistent/kvroute.bin"]),
        "cannot read",
    );
}

#[test]
fn exactly_one_input_is_required() {
    assert_eq!(kvroute(&["events", "decode"]).status.code(), Some(2));
    assert_eq!(kvroute(&["events", "decode", "--hex", "90", "--file", "x"]).status.code(), Some(2));
}
