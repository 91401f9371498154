//! `kvroute simulate` as a user runs it: exit codes, messages and output files.

use std::process::Command;

fn kvroute() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvroute"))
}

/// Runs `kvroute simulate ARGS --json FILE` in a fresh temporary directory (named after
/// `tag`), checks that it exits 0, and returns its output and the parsed JSON.
fn simulate_json(tag: &str, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let dir = std::env::temp_dir().join(format!("kvroute-sim-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let out = kvroute().arg("simulate").args(args).arg("--json").arg(&json).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let v = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (out, v)
}

#[test]
fn bad_flags_exit_2_with_a_clear_message() {
    for args in [
        &["simulate", "--workers", "0"][..],
        &["simulate", "--workers", "many"],
        &["simulate", "--no-such-flag"],
        &["simulate", "--policies", "random,telepathy"],
        &["simulate", "--workload", "nonsense"],
        &["simulate", "--rate", "-1"],
        &["simulate", "--model", "gpt-17", "--workload", "seed"],
        &["simulate", "--workload", "trace:/nonexistent/trace.jsonl"],
        &["simulate", "--router-replicas", "0"],
        &["simulate", "--router-replicas", "two"],
        &["simulate", "--tail-quantile", "0"],
        &["simulate", "--tail-quantile", "1.5"],
        &["simulate", "--tail-quantile", "p99"],
    ] {
        let out = kvroute().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{args:?}");
    }
    let out = kvroute().args(["simulate", "--policies", "random,telepathy"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("telepathy"));
    let out = kvroute().args(["simulate", "--tail-quantile", "1.5"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("tail_quantile must be in (0, 1]"));
}

#[test]
fn malformed_trace_line_is_named_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("kvroute-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.jsonl");
    let good = r#"{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [0, 1]}"#;
    std::fs::write(&path, format!("{good}\n{good}\n{{\"timestamp\": 5, \"input\n{good}\n"))
        .unwrap();
    let out = kvroute()
        .args(["simulate", "--workload", &format!("trace:{}", path.display())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_and_svg_outputs_are_written() {
    let dir = std::env::temp_dir().join(format!("kvroute-sim-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("r.json"), dir.join("r.svg"));
    let out = kvroute()
        .args(["simulate", "--workload", "seed", "--policies", "random,session-affinity,oracle"])
        .arg("--json")
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("session-affinity"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["workload"], "seed");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        let h = r["hit_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&h));
        assert!(r["top_worker_share"].as_f64().unwrap() <= 1.0);
        assert_eq!(r["requests"], 300);
    }
    assert!(results[0]["ttft_p90_s"].as_f64().is_some());
    assert!(results[2]["ttft_p90_s"].is_null());
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg") && s.contains("session-affinity"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_workload_runs_end_to_end() {
    let (out, v) = simulate_json(
        "chat",
        &[
            "--workload",
            "chat",
            "--requests",
            "600",
            "--policies",
            "random,session-affinity,oracle",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("workload chat : 600 requests, 8 workers"), "{stdout}");
    assert_eq!(v["workload"], "chat");
    let hit = |i: usize| v["results"][i]["hit_rate"].as_f64().unwrap();
    let (rnd, aff, oracle) = (hit(0), hit(1), hit(2));
    // Each turn's prompt is the whole conversation so far: a conversation that stays on
    // one worker finds it there; spread at random it mostly does not. No policy beats the
    // single unbounded cache.
    assert!(aff > rnd + 0.2, "{aff} vs {rnd}");
    assert!(aff <= oracle + 1e-12 && rnd <= oracle + 1e-12);
    assert_eq!(v["results"][1]["completed"], 600);
}

#[test]
fn kvroute_is_a_default_policy_and_router_replicas_is_a_flag() {
    let (_, v) = simulate_json("rep", &["--workload", "seed", "--router-replicas", "2"]);
    assert_eq!(v["config"]["cluster"]["router_replicas"], 2);
    assert!(v["config"]["cluster"]["tail_quantile"].is_null(), "the preset's own by default");
    let policies: Vec<&str> =
        v["results"].as_array().unwrap().iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(policies[0], "kvroute", "{policies:?}");
    assert!(policies.contains(&"session-affinity") && policies.contains(&"oracle"));
}

#[test]
fn tail_quantile_is_a_flag_that_reaches_the_kvroute_policy() {
    let (_, v) = simulate_json(
        "tail",
        &["--workload", "seed", "--policies", "kvroute,llm-d", "--tail-quantile", "0.9"],
    );
    assert_eq!(v["config"]["cluster"]["tail_quantile"], 0.9);
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
}
