//! vLLM 0.33's `ZmqEventPublisher`, on the wire: a PUB socket sending
//! `[topic, seq (8 bytes big-endian, from 0), payload]` per event batch, a ring buffer of the
//! last `buffer_steps` batches, and a ROUTER socket that answers a replay request
//! `[client, "", start_seq]` with `[client, "", topic, seq, payload]` for every buffered
//! batch with `seq >= start_seq`, then the end marker `[client, "", "", 0xff * 8, ""]`.
//! A request with another frame count is ignored, as vLLM logs and drops it.
//!
//! Unlike vLLM, which binds only wildcard (`tcp://*:5557`) and ipc endpoints and *connects*
//! its PUB socket to anything else, the emulator binds every endpoint it is given: scripts
//! start it with `tcp://127.0.0.1:PORT` and point the router's SUB socket there.
//!
//! Fault switches: [`Publisher::drop_next`] keeps the next batches out of the live stream
//! (they are still buffered, so only a replay can fill the gap) and [`Publisher::restart`]
//! starts the sequence over at 0 with an empty buffer, as a restarted engine does.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// vLLM's `ZmqEventPublisher.END_SEQ`: `(-1).to_bytes(8, "big", signed=True)`.
pub const END_SEQ: [u8; 8] = [0xff; 8];

/// vLLM's default `buffer_steps`.
pub const BUFFER_STEPS: usize = 10_000;

struct State {
    pub_sock: zmq::Socket,
    seq: u64,
    buffer: VecDeque<(u64, Vec<u8>)>,
    drop_next: u64,
    sent: u64,
    dropped: u64,
}

/// The PUB socket, the replay buffer and the ROUTER thread.
pub struct Publisher {
    topic: Vec<u8>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    replay: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("topic", &String::from_utf8_lossy(&self.topic)).finish()
    }
}

fn zerr(what: &str, endpoint: &str, e: zmq::Error) -> String {
    format!("{what} {endpoint}: {e}")
}

impl Publisher {
    /// Binds the PUB socket on `endpoint` and the ROUTER on `replay_endpoint`, and starts
    /// the replay thread.
    pub fn bind(endpoint: &str, replay_endpoint: &str, topic: &str) -> Result<Self, String> {
        let ctx = zmq::Context::new();
        let pub_sock = ctx.socket(zmq::PUB).map_err(|e| zerr("PUB socket for", endpoint, e))?;
        // vLLM's default hwm.
        pub_sock.set_sndhwm(100_000).map_err(|e| zerr("PUB hwm for", endpoint, e))?;
        pub_sock.set_linger(0).map_err(|e| zerr("PUB linger for", endpoint, e))?;
        pub_sock.bind(endpoint).map_err(|e| zerr("cannot bind --kv-events", endpoint, e))?;
        let router = ctx.socket(zmq::ROUTER).map_err(|e| zerr("ROUTER for", replay_endpoint, e))?;
        router
            .set_sndhwm(2 * (BUFFER_STEPS as i32 + 1))
            .map_err(|e| zerr("ROUTER hwm for", replay_endpoint, e))?;
        router.set_linger(0).map_err(|e| zerr("ROUTER linger for", replay_endpoint, e))?;
        router
            .bind(replay_endpoint)
            .map_err(|e| zerr("cannot bind --replay-endpoint", replay_endpoint, e))?;
        let state = Arc::new(Mutex::new(State {
            pub_sock,
            seq: 0,
            buffer: VecDeque::new(),
            drop_next: 0,
            sent: 0,
            dropped: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let topic = topic.as_bytes().to_vec();
        let replay = {
            let (state, stop, topic) = (Arc::clone(&state), Arc::clone(&stop), topic.clone());
            std::thread::Builder::new()
                .name("emulate-replay".into())
                .spawn(move || serve_replay(router, &state, &stop, &topic))
                .map_err(|e| format!("spawning the replay thread: {e}"))?
        };
        Ok(Publisher { topic, state, stop, replay: Some(replay) })
    }

    /// Publishes one encoded batch under the next sequence number (or only buffers it,
    /// while a drop is pending). Returns the seq used.
    pub fn publish(&self, payload: Vec<u8>) -> u64 {
        let mut st = self.state.lock();
        let seq = st.seq;
        st.seq += 1;
        if st.drop_next > 0 {
            st.drop_next -= 1;
            st.dropped += 1;
        } else {
            let frames: [&[u8]; 3] = [&self.topic, &seq.to_be_bytes(), &payload];
            // PUB never blocks: at the high-water mark ZeroMQ drops, like vLLM's socket.
            if st.pub_sock.send_multipart(frames, zmq::DONTWAIT).is_ok() {
                st.sent += 1;
            }
        }
        if st.buffer.len() == BUFFER_STEPS {
            st.buffer.pop_front();
        }
        st.buffer.push_back((seq, payload));
        seq
    }

    /// Leaves the next `n` batches out of the live stream (they stay replayable).
    pub fn drop_next(&self, n: u64) {
        self.state.lock().drop_next += n;
    }

    /// A restarted engine: the sequence starts over at 0 and nothing is replayable.
    pub fn restart(&self) {
        let mut st = self.state.lock();
        st.seq = 0;
        st.buffer.clear();
        st.drop_next = 0;
    }

    /// `(next seq, batches sent live, batches dropped)`.
    pub fn counts(&self) -> (u64, u64, u64) {
        let st = self.state.lock();
        (st.seq, st.sent, st.dropped)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.replay.take() {
            let _ = h.join();
        }
    }
}

fn serve_replay(router: zmq::Socket, state: &Mutex<State>, stop: &AtomicBool, topic: &[u8]) {
    while !stop.load(Ordering::SeqCst) {
        match router.poll(zmq::POLLIN, 50) {
            Ok(n) if n > 0 => {}
            _ => continue,
        }
        let Ok(frames) = router.recv_multipart(0) else { continue };
        if frames.len() != 3 {
            continue;
        }
        let client = &frames[0];
        let start = match <[u8; 8]>::try_from(frames[2].as_slice()) {
            Ok(b) => u64::from_be_bytes(b),
            // vLLM reads any length with int.from_bytes; an empty frame is 0.
            Err(_) => frames[2].iter().fold(0u64, |a, &b| (a << 8) | u64::from(b)),
        };
        let batches: Vec<(u64, Vec<u8>)> =
            state.lock().buffer.iter().filter(|(s, _)| *s >= start).cloned().collect();
        for (seq, payload) in &batches {
            let msg: [&[u8]; 5] = [client, b"", topic, &seq.to_be_bytes(), payload];
            let _ = router.send_multipart(msg, 0);
        }
        let end: [&[u8]; 5] = [client, b"", b"", &END_SEQ, b""];
        let _ = router.send_multipart(end, 0);
    }
}
