//! The per-publisher thread: SUB socket, socket monitor, sequence tracking and replay.

use crate::frames::{self, Batch, ReplayReply};
use crate::{
    io_err, ms, EventSink, GapCause, PublisherConfig, PublisherInfo, PublisherStats, ResetReason,
    SubscriberConfig,
};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// At most this many live messages are handled per wake-up before checking `stop` again.
const DRAIN_BATCH: usize = 1024;

static MONITOR_ID: AtomicUsize = AtomicUsize::new(0);

/// What a replay produced.
enum ReplayOutcome {
    /// Buffered batches, sorted by seq.
    Done(Vec<(u64, Vec<u8>)>),
    /// The replay could not be completed.
    Failed(GapCause),
    /// Shutdown was requested during the replay.
    Stopped,
}

pub(crate) struct Worker {
    info: PublisherInfo,
    ctx: zmq::Context,
    sub: zmq::Socket,
    mon: zmq::Socket,
    topic: Vec<u8>,
    replay_endpoint: Option<String>,
    replay_timeout: Duration,
    /// How many live batches a replay buffers at most.
    max_pending: usize,
    poll_ms: i64,
    sink: Arc<dyn EventSink>,
    stats: Arc<Mutex<PublisherStats>>,
    stop: Arc<AtomicBool>,
    /// The next seq expected; `None` until the first message (without `start_seq`).
    expected: Option<u64>,
    /// The sink holds state for this worker that relies on an unbroken stream.
    holds_state: bool,
    /// The last applied batch, to check a replay comes from the same stream.
    last: Option<(u64, Vec<u8>)>,
    /// Batches applied from a replay that may still arrive live; dropped once the live
    /// stream passes them.
    replayed: BTreeMap<u64, Vec<u8>>,
    /// The connection was lost and re-established since the last in-order batch.
    after_reconnect: bool,
    seen_disconnect: bool,
}

impl Worker {
    pub(crate) fn new(
        ctx: &zmq::Context,
        cfg: &SubscriberConfig,
        p: &PublisherConfig,
        info: PublisherInfo,
        sink: Arc<dyn EventSink>,
        stats: Arc<Mutex<PublisherStats>>,
        stop: Arc<AtomicBool>,
    ) -> kvroute::Result<Worker> {
        let sub = ctx.socket(zmq::SUB).map_err(|e| io_err("creating SUB socket", e))?;
        sub.set_linger(0).map_err(|e| io_err("setting linger", e))?;
        sub.set_rcvhwm(cfg.rcvhwm).map_err(|e| io_err("setting rcvhwm", e))?;
        let reconnect = i32::try_from(ms(cfg.reconnect_interval)).unwrap_or(i32::MAX);
        sub.set_reconnect_ivl(reconnect).map_err(|e| io_err("setting reconnect interval", e))?;
        sub.set_subscribe(p.topic.as_bytes()).map_err(|e| io_err("subscribing", e))?;
        // The monitor must be connected before the SUB connects, or early events are lost.
        let mon_ep = format!(
            "inproc://kvroute-zmq-monitor-{}-{}",
            std::process::id(),
            MONITOR_ID.fetch_add(1, Ordering::Relaxed)
        );
        let events = zmq::SocketEvent::CONNECTED as i32
            | zmq::SocketEvent::DISCONNECTED as i32
            | zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32;
        sub.monitor(&mon_ep, events).map_err(|e| io_err("monitoring SUB socket", e))?;
        let mon = ctx.socket(zmq::PAIR).map_err(|e| io_err("creating monitor socket", e))?;
        mon.set_linger(0).map_err(|e| io_err("setting linger", e))?;
        mon.connect(&mon_ep).map_err(|e| io_err("connecting monitor", e))?;
        sub.connect(&p.endpoint)
            .map_err(|e| io_err(&format!("connecting to {}", p.endpoint), e))?;
        Ok(Worker {
            info,
            ctx: ctx.clone(),
            sub,
            mon,
            topic: p.topic.as_bytes().to_vec(),
            replay_endpoint: p.replay_endpoint.clone(),
            replay_timeout: cfg.replay_timeout,
            max_pending: cfg.max_pending.max(1),
            poll_ms: ms(cfg.poll_interval),
            sink,
            stats,
            stop,
            expected: p.start_seq,
            holds_state: p.start_seq.is_some(),
            last: None,
            replayed: BTreeMap::new(),
            after_reconnect: false,
            seen_disconnect: false,
        })
    }

    pub(crate) fn index(&self) -> usize {
        self.info.index
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub(crate) fn run(mut self) {
        while !self.stopped() {
            let (sub_ready, mon_ready) = {
                let mut items =
                    [self.sub.as_poll_item(zmq::POLLIN), self.mon.as_poll_item(zmq::POLLIN)];
                if zmq::poll(&mut items, self.poll_ms).is_err() {
                    // EINTR and friends: try again (the stop flag is checked first).
                    continue;
                }
                (items[0].is_readable(), items[1].is_readable())
            };
            if mon_ready {
                self.drain_monitor();
            }
            if sub_ready {
                for _ in 0..DRAIN_BATCH {
                    if self.stopped() {
                        break;
                    }
                    match self.sub.recv_multipart(zmq::DONTWAIT) {
                        Ok(frames) => self.on_live_frames(frames),
                        Err(_) => break,
                    }
                }
            }
        }
    }

    fn drain_monitor(&mut self) {
        while let Ok(frames) = self.mon.recv_multipart(zmq::DONTWAIT) {
            let Some(head) = frames.first() else { continue };
            if head.len() < 2 {
                continue;
            }
            let event = u16::from_ne_bytes([head[0], head[1]]);
            let mut st = self.stats.lock();
            // Compare raw values: `SocketEvent::from_raw` panics on unknown events.
            match event {
                e if e == zmq::SocketEvent::HANDSHAKE_SUCCEEDED as u16 => {
                    st.connected = true;
                    st.connected_at = Some(SystemTime::now());
                    if self.seen_disconnect {
                        self.seen_disconnect = false;
                        self.after_reconnect = true;
                        st.reconnects += 1;
                    }
                }
                e if e == zmq::SocketEvent::DISCONNECTED as u16 => {
                    st.connected = false;
                    st.connected_at = None;
                    self.seen_disconnect = true;
                }
                _ => {}
            }
        }
    }

    /// Validates a live message; `None` (counted) when it must be skipped.
    fn accept(&self, parsed: Result<Batch, frames::FrameError>) -> Option<Batch> {
        match parsed {
            Ok(b) if self.topic.is_empty() || b.topic == self.topic => Some(b),
            Ok(_) => {
                self.stats.lock().foreign_topic += 1;
                None
            }
            Err(_) => {
                self.stats.lock().frame_errors += 1;
                None
            }
        }
    }

    fn on_live_frames(&mut self, frames: Vec<Vec<u8>>) {
        if let Some(b) = self.accept(frames::parse_live(frames)) {
            self.on_live(b.seq, b.payload);
        }
    }

    fn on_live(&mut self, seq: u64, payload: Vec<u8>) {
        if self.replayed.last_key_value().is_some_and(|(&hi, _)| seq > hi) {
            self.replayed.clear();
        }
        let Some(expected) = self.expected else {
            // The first message, and the sink has nothing: start the stream here.
            self.apply(seq, payload);
            return;
        };
        if seq == expected {
            self.after_reconnect = false;
            self.apply(seq, payload);
        } else if seq < expected {
            if self.replayed.get(&seq).is_some_and(|p| *p == payload) {
                self.stats.lock().duplicates += 1;
                return;
            }
            self.restart(expected, seq);
            let mut pending = BTreeMap::from([(seq, payload)]);
            self.resolve(&mut pending);
        } else {
            let mut pending = BTreeMap::from([(seq, payload)]);
            self.resolve(&mut pending);
        }
    }

    /// Engine restart: reset, then expect the new stream from seq 0.
    fn restart(&mut self, expected: u64, got: u64) {
        self.stats.lock().restarts += 1;
        self.reset(ResetReason::Restart { expected, got });
        self.expected = Some(0);
    }

    fn reset(&mut self, reason: ResetReason) {
        self.stats.lock().resets += 1;
        self.holds_state = false;
        self.last = None;
        self.replayed.clear();
        self.after_reconnect = false;
        let sink = &self.sink;
        let info = &self.info;
        if catch_unwind(AssertUnwindSafe(|| sink.on_reset(info, reason))).is_err() {
            let mut st = self.stats.lock();
            st.sink_errors += 1;
            st.last_error = Some("the sink panicked in on_reset".to_string());
        }
    }

    fn apply(&mut self, seq: u64, payload: Vec<u8>) {
        // Counted first, so the stats already include a batch once the sink has seen it.
        {
            let mut st = self.stats.lock();
            st.batches += 1;
            st.last_seq = Some(seq);
            st.last_batch_at = Some(SystemTime::now());
        }
        let sink = &self.sink;
        let info = &self.info;
        let error = match catch_unwind(AssertUnwindSafe(|| sink.on_batch(info, seq, &payload))) {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("seq {seq}: {e}")),
            Err(_) => Some(format!("seq {seq}: the sink panicked")),
        };
        if let Some(e) = error {
            let mut st = self.stats.lock();
            st.sink_errors += 1;
            st.last_error = Some(e);
        }
        self.expected = seq.checked_add(1);
        self.holds_state = true;
        self.last = Some((seq, payload));
    }

    /// Applies `pending` (live batches at or after a gap) after filling the gap before
    /// them by replay, repeating for any further hole; resets when a hole cannot be filled.
    fn resolve(&mut self, pending: &mut BTreeMap<u64, Vec<u8>>) {
        loop {
            let expected = self.expected.unwrap_or(0);
            pending.retain(|&s, _| s >= expected);
            while let Some(payload) = pending.remove(&self.expected.unwrap_or(0)) {
                let seq = self.expected.unwrap_or(0);
                self.apply(seq, payload);
                if self.expected.is_none() {
                    return;
                }
            }
            let Some((&got, _)) = pending.first_key_value() else {
                return;
            };
            let expected = self.expected.unwrap_or(0);
            self.stats.lock().gaps += 1;
            // Re-request the last applied batch too, to check the stream is the same one.
            let verify = self.last.as_ref().filter(|(s, _)| s.checked_add(1) == Some(expected));
            let start = verify.map_or(expected, |(s, _)| *s);
            let outcome = match self.replay_endpoint.clone() {
                None => ReplayOutcome::Failed(GapCause::NoReplayEndpoint),
                Some(ep) => self.replay(&ep, start, pending),
            };
            let replayed = match outcome {
                ReplayOutcome::Stopped => return,
                ReplayOutcome::Failed(cause) => {
                    if !matches!(cause, GapCause::NoReplayEndpoint) {
                        self.stats.lock().replays_failed += 1;
                    }
                    self.give_up(expected, got, cause, pending, Vec::new());
                    continue;
                }
                ReplayOutcome::Done(r) => r,
            };
            if let Some((last_seq, last_payload)) = &self.last {
                if let Some((_, p)) = replayed.iter().find(|(s, _)| s == last_seq) {
                    if p != last_payload {
                        // Same seq, different batch: a new engine process.
                        self.stats.lock().replays_ok += 1;
                        let got = replayed.first().map_or(got, |(s, _)| *s);
                        // The replayed batches belong to the new stream; the next round
                        // asks for its beginning (seq 0) if they do not start there.
                        self.restart(expected, got);
                        self.replayed.extend(replayed.iter().cloned());
                        pending.extend(replayed);
                        continue;
                    }
                } else if self.after_reconnect {
                    self.stats.lock().replays_failed += 1;
                    self.give_up(expected, got, GapCause::Unverified, pending, replayed);
                    continue;
                }
            }
            let first_new = replayed.iter().map(|(s, _)| *s).find(|&s| s >= expected);
            if first_new != Some(expected) {
                self.stats.lock().replays_failed += 1;
                let cause = GapCause::NotBuffered { first: first_new };
                self.give_up(expected, got, cause, pending, replayed);
                continue;
            }
            self.stats.lock().replays_ok += 1;
            self.after_reconnect = false;
            for (s, p) in replayed {
                if s >= expected {
                    self.replayed.insert(s, p.clone());
                    pending.insert(s, p);
                }
            }
        }
    }

    /// A hole that cannot be filled: reset if the sink holds state, then continue with the
    /// current stream. What the replay did return is the publisher's latest history, so it
    /// is kept, and live batches older than it are dropped: a hole that no replay can fill
    /// would follow them, costing a second reset.
    fn give_up(
        &mut self,
        expected: u64,
        got: u64,
        cause: GapCause,
        pending: &mut BTreeMap<u64, Vec<u8>>,
        replayed: Vec<(u64, Vec<u8>)>,
    ) {
        if self.holds_state {
            self.reset(ResetReason::Gap { expected, got, cause });
        }
        self.after_reconnect = false;
        let first_replayed = replayed.iter().map(|(s, _)| *s).filter(|&s| s >= expected).min();
        if let Some(first) = first_replayed {
            for (s, p) in replayed.into_iter().filter(|(s, _)| *s >= first) {
                // They may still arrive live: remember them to drop the duplicates.
                self.replayed.insert(s, p.clone());
                pending.insert(s, p);
            }
            // Live batches that arrived meanwhile and lead without a hole into the replayed
            // history are applied after the reset, in order; older ones sit before a hole
            // no replay can fill (the publisher no longer buffers it) and would only cost a
            // second reset.
            let mut start = first;
            while let Some(prev) = start.checked_sub(1) {
                if !pending.contains_key(&prev) {
                    break;
                }
                start = prev;
            }
            pending.retain(|&s, _| s >= start);
        }
        self.expected = pending.first_key_value().map(|(s, _)| *s);
    }

    /// Asks the replay endpoint for every batch from `start` on, buffering live messages
    /// into `pending` meanwhile.
    fn replay(
        &mut self,
        endpoint: &str,
        start: u64,
        pending: &mut BTreeMap<u64, Vec<u8>>,
    ) -> ReplayOutcome {
        let fail = |what: &str, e: zmq::Error| {
            ReplayOutcome::Failed(GapCause::Transport(format!("{what}: {e}")))
        };
        let dealer = match self.ctx.socket(zmq::DEALER) {
            Ok(s) => s,
            Err(e) => return fail("creating DEALER socket", e),
        };
        if let Err(e) = dealer.set_linger(0) {
            return fail("setting linger", e);
        }
        if let Err(e) = dealer.connect(endpoint) {
            return fail("connecting to replay endpoint", e);
        }
        if let Err(e) = dealer.send_multipart(frames::replay_request(start), zmq::DONTWAIT) {
            return fail("sending replay request", e);
        }
        let deadline = Instant::now() + self.replay_timeout;
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        loop {
            if self.stopped() {
                return ReplayOutcome::Stopped;
            }
            let now = Instant::now();
            if now >= deadline {
                return ReplayOutcome::Failed(GapCause::Timeout);
            }
            let wait = ms(deadline - now).min(self.poll_ms);
            // Live messages are buffered up to `max_pending`; beyond it they wait in the SUB
            // socket's queue (bounded by its HWM, past which the publisher drops them and
            // the loss shows as a gap).
            let room = self.max_pending.saturating_sub(pending.len());
            let (dealer_ready, sub_ready) = {
                let mut items =
                    [dealer.as_poll_item(zmq::POLLIN), self.sub.as_poll_item(zmq::POLLIN)];
                let n = if room > 0 { 2 } else { 1 };
                if zmq::poll(&mut items[..n], wait).is_err() {
                    continue;
                }
                (items[0].is_readable(), n == 2 && items[1].is_readable())
            };
            if sub_ready {
                for _ in 0..DRAIN_BATCH.min(room) {
                    match self.sub.recv_multipart(zmq::DONTWAIT) {
                        Ok(f) => {
                            if let Some(b) = self.accept(frames::parse_live(f)) {
                                pending.entry(b.seq).or_insert(b.payload);
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
            if dealer_ready {
                while let Ok(f) = dealer.recv_multipart(zmq::DONTWAIT) {
                    match frames::parse_replay(f) {
                        Ok(ReplayReply::End) => {
                            out.sort_by_key(|(s, _)| *s);
                            out.dedup_by_key(|(s, _)| *s);
                            return ReplayOutcome::Done(out);
                        }
                        Ok(ReplayReply::Batch(b)) => {
                            if self.topic.is_empty() || b.topic == self.topic {
                                out.push((b.seq, b.payload));
                            } else {
                                self.stats.lock().foreign_topic += 1;
                            }
                        }
                        // Older vLLM replies carry no topic: the replay socket serves only
                        // this publisher's batches, so they are this stream's.
                        Ok(ReplayReply::Untagged { seq, payload }) => out.push((seq, payload)),
                        Err(_) => self.stats.lock().frame_errors += 1,
                    }
                }
            }
        }
    }
}
