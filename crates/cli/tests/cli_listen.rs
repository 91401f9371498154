//! `kvroute listen` against the pyzmq publisher peer of kvroute-zmq's tests, publishing
//! vLLM's recorded KV event payloads. Expected figures come from vLLM's recorded facts and
//! from a router fed the same payloads directly.

#[path = "../../zmq/tests/common/mod.rs"]
mod common;

use common::{expected_payload, vllm_payloads, Peer, WAIT};
use kvroute::router::Router;
use serde_json::Value as J;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

fn kvroute() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvroute"))
}

fn temp_json(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvroute-cli-listen-{name}-{}.json", std::process::id()))
}

fn spawn_listen(args: &[&str]) -> Child {
    kvroute()
        .arg("listen")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvroute listen")
}

/// Waits for the child to exit, failing the test after [`WAIT`] plus its duration.
fn finish(child: Child) -> Output {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(WAIT).expect("kvroute listen did not exit in time").expect("wait")
}

fn read_stats(path: &PathBuf) -> J {
    let text = std::fs::read_to_string(path).expect("stats JSON written");
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).expect("stats file is JSON")
}

#[test]
fn first_payload_leaves_six_blocks_held() {
    let mut peer = Peer::spawn(&[]);
    let out = temp_json("first");
    let child = spawn_listen(&[
        "--endpoint",
        &peer.pub_ep,
        "--replay-endpoint",
        &peer.replay_ep,
        "--worker",
        "w0",
        "--duration",
        "3",
        "--stats-json",
        out.to_str().unwrap(),
    ]);
    peer.cmd("waitsub");
    peer.cmd("pub 1"); // vLLM step "r1": 6 full blocks of tokens 0..99 cached
    let o = finish(child);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stderr: {stderr}");
    let j = read_stats(&out);
    assert_eq!(j["interrupted"], false);
    assert_eq!(j["hash_algo"], "xxh3", "the default re-keys blocks from the events' tokens");
    assert_eq!(j["index"]["holder_blocks"], 6);
    let w = &j["workers"][0];
    assert_eq!(j["workers"].as_array().unwrap().len(), 1);
    assert_eq!(w["worker"], "w0");
    assert_eq!(w["endpoint"].as_str(), Some(peer.pub_ep.as_str()));
    assert_eq!(w["connected"], true);
    assert_eq!(w["blocks_held"], 6);
    assert_eq!((w["batches"].as_u64(), w["batches_applied"].as_u64()), (Some(1), Some(1)));
    assert_eq!((w["events"].as_u64(), w["blocks_stored"].as_u64()), (Some(1), Some(6)));
    assert_eq!(w["last_seq"], 0);
    for k in ["gaps", "replays_ok", "replays_failed", "resets", "sink_errors", "frame_errors"] {
        assert_eq!(w[k], 0, "{k}");
    }
    assert_eq!(w["last_error"], J::Null);
    // stderr is not a terminal here: one status line per second, then a final one.
    let status: Vec<&str> = stderr.lines().filter(|l| l.contains("blocks held")).collect();
    assert!(status.len() >= 2, "stderr: {stderr}");
    let last = status.last().unwrap();
    assert!(last.contains("1 batches, 6 blocks held, 0 gaps, 0 replays, 0 errors"), "{last}");
    assert!(!stderr.contains('\r'), "no carriage returns when stderr is not a terminal");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("w0: 6 blocks held, 1 batches, 1 events"), "stdout: {stdout}");
}

#[test]
fn rejected_batches_and_an_unfillable_gap_are_reported() {
    let mut peer = Peer::spawn(&[]);
    let out = temp_json("gap");
    let child = spawn_listen(&[
        "--endpoint",
        &peer.pub_ep,
        "--replay-endpoint",
        &peer.replay_ep,
        "--hash-algo",
        "sha256",
        "--duration",
        "3",
        "--stats-json",
        out.to_str().unwrap(),
    ]);
    let payloads = vllm_payloads();
    let n = payloads.len() as u64;
    peer.cmd("waitsub");
    // Every recorded payload, and the first (r1: 6 blocks) once more.
    peer.cmd(&format!("pub {}", n + 1));
    peer.cmd("lose 3"); // neither sent nor kept for replay
    peer.cmd("pub 1"); // seq n + 4
    let o = finish(child);
    assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    let j = read_stats(&out);

    // What a router keyed by sha256 makes of the same payloads, fed directly.
    let cfg = r#"{"hash_algo": "sha256", "auto_add_workers": true}"#;
    let probe = Router::from_json(cfg).unwrap();
    let mut rejected = Vec::new();
    for seq in 0..=n {
        if let Err(e) = probe.apply_vllm_batch("w", &expected_payload(&payloads, seq, 0)) {
            rejected.push(format!("seq {seq}: {e}"));
        }
    }
    assert!(!rejected.is_empty(), "the handcrafted payloads have made-up hashes");
    let held_at_gap = probe.index_stats().holder_blocks;
    assert!(held_at_gap > 0);
    // After the gap the worker's entries were dropped and rebuilt from seq n + 4 alone.
    let rebuilt = Router::from_json(cfg).unwrap();
    rebuilt.apply_vllm_batch("w", &expected_payload(&payloads, n + 4, 0)).unwrap();
    let held = rebuilt.index_stats().holder_blocks;
    assert!(held > 0);

    let w = &j["workers"][0];
    let port = Peer::port(&peer.pub_ep);
    assert_eq!(w["worker"].as_str(), Some(format!("127.0.0.1:{port}").as_str()));
    assert_eq!(w["blocks_held"].as_u64(), Some(held));
    assert_eq!(w["batches"].as_u64(), Some(n + 2));
    assert_eq!(w["last_seq"].as_u64(), Some(n + 4));
    assert_eq!(w["sink_errors"].as_u64(), Some(rejected.len() as u64));
    assert_eq!(w["batches_applied"].as_u64(), Some(n + 2 - rejected.len() as u64));
    assert_eq!(w["last_error"].as_str(), rejected.last().map(String::as_str));
    assert!(w["last_error"].as_str().unwrap().contains("hash"), "{w}");
    let counts = ["gaps", "replays_ok", "replays_failed", "resets", "restarts"].map(|k| &w[k]);
    assert_eq!(counts, [1, 0, 1, 1, 0].map(J::from).each_ref());
    assert!(w["last_reset"].as_str().unwrap().contains("unfillable gap"), "{w}");
    assert_eq!(w["blocks_dropped"].as_u64(), Some(held_at_gap));
}

#[test]
fn ctrl_c_stops_and_still_writes_the_statistics() {
    let mut peer = Peer::spawn(&[]);
    let out = temp_json("ctrlc");
    let mut child = spawn_listen(&[
        "--endpoint",
        &peer.pub_ep,
        "--worker",
        "w0",
        "--stats-json",
        out.to_str().unwrap(),
    ]);
    peer.cmd("waitsub");
    peer.cmd("pub 1");
    // Wait for a status line that shows the batch, then interrupt.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx.recv_timeout(WAIT).expect("a status line within the wait");
        if line.contains("1 batches") {
            break;
        }
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    assert!(kill.expect("run kill").success());
    let o = finish(child);
    assert!(o.status.success(), "exit status {:?}", o.status);
    let j = read_stats(&out);
    assert_eq!(j["interrupted"], true);
    assert_eq!(j["workers"][0]["blocks_held"], 6);
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let o = kvroute().arg("listen").args(args).output().expect("run kvroute");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: stderr {stderr}");
    assert!(stderr.contains(needle), "{args:?}: stderr {stderr}");
}

#[test]
fn bad_flags_exit_with_code_two_and_one_line() {
    let one_line = |args: &[&str], needle: &str| {
        assert_usage_error(args, needle);
        let o = kvroute().arg("listen").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("kvroute: error: "), "{stderr}");
        assert!(o.stdout.is_empty());
    };
    one_line(&["--endpoint", "http://127.0.0.1:5557", "--duration", "1"], "http://127.0.0.1:5557");
    one_line(&["--endpoint", "127.0.0.1:5557", "--duration", "1"], "tcp://host:port");
    one_line(
        &["--endpoint", "tcp://127.0.0.1:1", "--endpoint", "tcp://127.0.0.1:2", "--worker", "a"],
        "--worker",
    );
    one_line(
        &["--endpoint", "tcp://127.0.0.1:1", "--replay-endpoint", "ftp://x", "--duration", "1"],
        "ftp://x",
    );
    one_line(&["--endpoint", "tcp://127.0.0.1:1", "--duration", "0"], "--duration");
    one_line(&["--endpoint", "tcp://127.0.0.1:1", "--block-size", "0"], "block");
    one_line(&["--endpoint", "tcp://127.0.0.1:1", "--idle-warning", "0"], "--idle-warning");
    // Parse errors come from clap: exit 2 too.
    assert_usage_error(&["--duration", "1"], "--endpoint");
    assert_usage_error(&["--endpoint", "tcp://127.0.0.1:1", "--hash-algo", "md5"], "md5");
}

#[test]
fn llm_d_topic_is_received_by_default() {
    // llm-d publishes on kv@<pod-ip>:<port>@<model>; no --topic needed.
    let mut peer = Peer::spawn(&["--topic", "kv@10.0.0.7:8000@Qwen/Qwen3-0.6B"]);
    let out = temp_json("llmd");
    let child = spawn_listen(&[
        "--endpoint",
        &peer.pub_ep,
        "--worker",
        "w0",
        "--duration",
        "2",
        "--stats-json",
        out.to_str().unwrap(),
    ]);
    peer.cmd("waitsub");
    peer.cmd("pub 1");
    let o = finish(child);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stderr: {stderr}");
    assert!(!stderr.contains("warning"), "stderr: {stderr}");
    let j = read_stats(&out);
    let w = &j["workers"][0];
    assert_eq!((w["batches"].as_u64(), w["blocks_held"].as_u64()), (Some(1), Some(6)));
    assert_eq!(w["idle"], false);
}

#[test]
fn connected_publisher_that_sends_nothing_is_warned_about() {
    let mut peer = Peer::spawn(&["--topic", "kv@10.0.0.7:8000@m"]);
    let out = temp_json("idle");
    let child = spawn_listen(&[
        "--endpoint",
        &peer.pub_ep,
        "--worker",
        "w0",
        "--topic",
        "kv-events",
        "--idle-warning",
        "0.5",
        "--duration",
        "2.5",
        "--stats-json",
        out.to_str().unwrap(),
    ]);
    peer.cmd("waitsub");
    peer.cmd("pub 2"); // on a topic the listener does not subscribe to
    let o = finish(child);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stderr: {stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "one warning per silent spell; stderr: {stderr}");
    assert!(warnings[0].contains("w0") && warnings[0].contains("--topic"), "{stderr}");
    let j = read_stats(&out);
    let w = &j["workers"][0];
    assert_eq!((w["batches"].as_u64(), w["idle"].as_bool()), (Some(0), Some(true)));
    assert!(w["connected_at"].as_f64().is_some(), "{w}");
}
