//! Test harness: a real publisher peer (tests/peer/vllm_publisher.py, pyzmq) and a
//! recording sink. Every wait is bounded so a broken test fails instead of hanging.

#![allow(dead_code)]

use kvroute_zmq::{EventSink, PublisherInfo, ResetReason, Subscriber};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `testdata/vllm/kv_events.json`, relative to the project root.
pub fn kv_events_path() -> PathBuf {
    manifest_dir().join("../../testdata/vllm/kv_events.json")
}

/// The Python interpreter: `$KVROUTE_PYTHON`, else `<root>/.venv/bin/python`, else `python3`.
/// Fails the test (does not skip it) when pyzmq or msgpack is missing.
pub fn python() -> PathBuf {
    let py = match std::env::var_os("KVROUTE_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let venv = manifest_dir().join("../../.venv/bin/python");
            if venv.exists() {
                venv
            } else {
                PathBuf::from("python3")
            }
        }
    };
    let out = Command::new(&py).args(["-c", "import zmq, msgpack"]).output();
    match out {
        Ok(o) if o.status.success() => py,
        Ok(o) => panic!(
            "{} cannot import pyzmq and msgpack, which the ZeroMQ integration tests need \
             (a real vLLM-style publisher peer). Run scripts/test.sh, or: \
             python3 -m venv .venv && .venv/bin/pip install pyzmq msgpack \
             (or point KVROUTE_PYTHON at an interpreter that has them). stderr: {}",
            py.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run Python interpreter {} ({e}); set KVROUTE_PYTHON or create .venv with \
             pyzmq and msgpack",
            py.display()
        ),
    }
}

/// The real vLLM payloads of kv_events.json, in order.
pub fn vllm_payloads() -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(kv_events_path()).expect("read kv_events.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("parse kv_events.json");
    v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["batch"]["payload_hex"].as_str())
        .map(unhex)
        .collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// The payload the peer sends for `seq` in `epoch`, derived independently from the
/// vectors: the real payload, with the float64 timestamp replaced when `epoch > 0`.
pub fn expected_payload(payloads: &[Vec<u8>], seq: u64, epoch: u32) -> Vec<u8> {
    let mut p = payloads[(seq % payloads.len() as u64) as usize].clone();
    if epoch > 0 {
        let ts = f64::from(epoch) * 1e6 + seq as f64;
        p[2..10].copy_from_slice(&ts.to_be_bytes());
    }
    p
}

/// A running publisher peer process.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// The XPUB/PUB endpoint.
    pub pub_ep: String,
    /// The ROUTER replay endpoint.
    pub replay_ep: String,
}

impl Peer {
    /// Starts the peer with extra arguments; waits for its endpoints.
    pub fn spawn(extra: &[&str]) -> Peer {
        // Through ../zmq so that the CLI's tests (crates/cli) can include this harness too.
        let script = manifest_dir().join("../zmq/tests/peer/vllm_publisher.py");
        let mut child = Command::new(python())
            .arg(&script)
            .arg("--payloads")
            .arg(kv_events_path())
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn publisher peer");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut peer =
            Peer { child, stdin, lines, pub_ep: String::new(), replay_ep: String::new() };
        loop {
            let line = peer.line();
            if let Some(ep) = line.strip_prefix("PUB ") {
                peer.pub_ep = ep.to_string();
            } else if let Some(ep) = line.strip_prefix("REPLAY ") {
                peer.replay_ep = ep.to_string();
            } else if line == "READY" {
                break;
            } else {
                panic!("unexpected peer output: {line}");
            }
        }
        peer
    }

    fn line(&mut self) -> String {
        self.lines.recv_timeout(WAIT).expect("publisher peer did not answer in time (or died)")
    }

    /// Runs one command; returns the peer's next seq.
    pub fn cmd(&mut self, cmd: &str) -> u64 {
        writeln!(self.stdin, "{cmd}").expect("write to peer");
        self.stdin.flush().expect("flush peer stdin");
        let line = self.line();
        match line.strip_prefix("OK ") {
            Some(n) => n.parse().expect("seq"),
            None => panic!("peer command {cmd:?} failed: {line}"),
        }
    }

    /// The port of an endpoint `tcp://127.0.0.1:PORT`.
    pub fn port(ep: &str) -> String {
        ep.rsplit(':').next().expect("port").to_string()
    }

    /// Kills the process (an engine crash) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the sink saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A batch.
    Batch {
        /// The worker name.
        worker: String,
        /// Its seq.
        seq: u64,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A reset.
    Reset(String, ResetReason),
}

/// A sink that records everything, optionally sleeping per batch (a slow consumer).
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<Vec<Seen>>,
    cv: Condvar,
    /// Sleep this long in every on_batch.
    pub delay: Duration,
}

impl Recorder {
    pub fn slow(delay: Duration) -> Recorder {
        Recorder { delay, ..Recorder::default() }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for what was seen; panics after [`WAIT`].
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + WAIT;
        let mut g = self.seen.lock().unwrap();
        while !pred(&g) {
            let now = Instant::now();
            assert!(now < deadline, "timed out waiting for {what}; seen so far: {:?}", summary(&g));
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        g.clone()
    }

    /// Waits until a batch with `seq` was seen (from any worker).
    pub fn wait_seq(&self, seq: u64) -> Vec<Seen> {
        self.wait_for(&format!("seq {seq}"), |s| {
            s.iter().any(|e| matches!(e, Seen::Batch { seq: x, .. } if *x == seq))
        })
    }
}

impl EventSink for Recorder {
    fn on_batch(&self, p: &PublisherInfo, seq: u64, payload: &[u8]) -> kvroute::Result<()> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let mut g = self.seen.lock().unwrap();
        g.push(Seen::Batch { worker: p.worker.clone(), seq, payload: payload.to_vec() });
        self.cv.notify_all();
        Ok(())
    }

    fn on_reset(&self, p: &PublisherInfo, reason: ResetReason) {
        let mut g = self.seen.lock().unwrap();
        g.push(Seen::Reset(p.worker.clone(), reason));
        self.cv.notify_all();
    }
}

/// A compact description: seqs, with resets marked.
pub fn summary(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|e| match e {
            Seen::Batch { seq, .. } => seq.to_string(),
            Seen::Reset(_, r) => format!("RESET({r})"),
        })
        .collect()
}

/// The seqs of the batches seen.
pub fn seqs(seen: &[Seen]) -> Vec<u64> {
    seen.iter()
        .filter_map(|e| match e {
            Seen::Batch { seq, .. } => Some(*seq),
            Seen::Reset(..) => None,
        })
        .collect()
}

/// Waits until `pred` holds for the subscriber's stats of publisher 0.
pub fn wait_stats(
    sub: &Subscriber,
    what: &str,
    pred: impl Fn(&kvroute_zmq::PublisherStats) -> bool,
) -> kvroute_zmq::PublisherStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = sub.stats().remove(0);
        if pred(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; stats: {st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
