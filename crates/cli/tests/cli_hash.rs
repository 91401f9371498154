//! Runs the built `kvroute hash` and checks it against vLLM's own vectors.

use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn vectors() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vllm/block_hashes.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .arg("hash")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn find<'a>(doc: &'a Value, algo: &str, seed: Option<&str>, case: &str) -> &'a Value {
    doc["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["algo"] == algo && v["PYTHONHASHSEED"].as_str() == seed && v["case"] == case)
        .unwrap()
}

fn check(out: &Output, vector: &Value) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["none_hash"], vector["none_hash_hex"]);
    let blocks = got["blocks"].as_array().unwrap();
    let want = vector["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), want.len());
    for (g, w) in blocks.iter().zip(want) {
        assert_eq!(g["hash"], w["hash_hex"]);
        let ge: u64 = g["event_hash"].to_string().parse().unwrap();
        let we: u64 = w["event_hash_u64"].to_string().parse().unwrap();
        assert_eq!(ge, we);
    }
}

#[test]
fn hashes_plain_0_99_like_vllm() {
    let doc = vectors();
    let tokens = doc["inputs"]["plain_0_99"]["token_ids"].to_string();
    // Default algorithm (sha256), tokens on standard input.
    check(&run(&[], &tokens), find(&doc, "sha256", None, "plain_0_99"));
    // Tokens from a file, every vLLM scheme with PYTHONHASHSEED=0.
    let dir = std::env::temp_dir().join(format!("kvroute-cli-hash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens.json");
    std::fs::write(&file, &tokens).unwrap();
    for algo in ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"] {
        let out =
            run(&["--algo", algo, "--hash-seed", "0", "--tokens", file.to_str().unwrap()], "");
        check(&out, find(&doc, algo, Some("0"), "plain_0_99"));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lora_and_salt_flags_match_vllm() {
    let doc = vectors();
    let input = &doc["inputs"]["lora_and_cache_salt"];
    let out = run(
        &[
            "--algo",
            "sha256_cbor",
            "--lora-name",
            input["lora"]["lora_name"].as_str().unwrap(),
            "--lora-path",
            input["lora"]["lora_path"].as_str().unwrap(),
            "--cache-salt",
            input["cache_salt"].as_str().unwrap(),
        ],
        &input["token_ids"].to_string(),
    );
    check(&out, find(&doc, "sha256_cbor", None, "lora_and_cache_salt"));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let cases: [(&[&str], &str); 5] = [
        (&[], "not json"),
        (&[], "[1, -2, 3]"),
        (&[], "[4294967296]"),
        (&[], "{\"tokens\": [1]}"),
        (&["--algo", "xxhash"], "[1, 2, 3]"),
    ];
    for (args, input) in cases {
        let out = run(args, input);
        assert_eq!(out.status.code(), Some(2), "{args:?} {input}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.starts_with("kvroute: error: "), "{err}");
        assert!(out.stdout.is_empty());
    }
    let out = run(&["--algo", "xxhash"], "[1]");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("PYTHONHASHSEED"), "{err}");
}
