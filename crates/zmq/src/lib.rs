//! kvroute-zmq: a ZeroMQ subscriber for vLLM KV-event publishers.
//!
//! vLLM's `ZmqEventPublisher` sends each `KVEventBatch` as `[topic, seq, payload]` on a PUB
//! socket, where `seq` is an 8-byte big-endian counter starting at 0, and keeps the last
//! batches in a ring buffer that a ROUTER "replay" socket serves. [`Subscriber`] connects a
//! SUB socket to each configured publisher, tracks the sequence numbers, fills gaps through
//! the replay socket (with a DEALER, as recorded in `zmq_wire.json`), detects engine
//! restarts, and hands every batch, in order and exactly once, to an [`EventSink`]. It does
//! not decode the msgpack payload: that is the sink's job.
//!
//! [`RouterSink`] is the sink that feeds a [`kvroute::router::Router`] ([`subscribe`]
//! starts a subscriber on one); [`resume_from`] turns the stream positions of a restored
//! router snapshot into start seqs, so a late router replica replays only what it missed.
//!
//! Each publisher gets its own thread; the sink is called on that thread. Nothing blocks
//! the caller of [`Subscriber::start`].
//!
//! Sequence rules, per publisher:
//! - the next expected seq is applied at once;
//! - a seq above the expected one is a gap: the subscriber asks the replay endpoint for
//!   everything from the missing seq on, buffers live messages meanwhile (at most
//!   [`SubscriberConfig::max_pending`]; the rest wait in the socket's queue), and applies
//!   the union in order, without duplicates. When it can, it also re-requests the last applied
//!   seq and compares payloads, so a publisher that restarted and ran past the old seq is
//!   not mistaken for the old stream;
//! - a gap the replay cannot fill (no replay endpoint, timeout, the publisher no longer has
//!   the missing batches) and a seq below the expected one (engine restart) both call
//!   [`EventSink::on_reset`], then continue with the new stream. Live batches buffered
//!   during a failed replay are applied after the reset, in order, as far as they lead
//!   without a hole into what the replay returned.
//!
//! The default topic is `""` (every topic): vLLM's default topic is the empty string and
//! llm-d publishes on `kv@<pod-ip>:<port>@<model>`. A publisher that stays connected
//! without sending anything is flagged [`PublisherStats::idle`].

mod frames;
mod sink;
mod worker;

pub use frames::END_SEQ;
pub use sink::{resume_from, subscribe, subscribe_with_sink, RouterSink, SinkStats};

use parking_lot::Mutex;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// The topic subscribed to by default: `""`, every topic. vLLM's own default topic is the
/// empty string, and llm-d deployments publish on `kv@<pod-ip>:<port>@<model>`; a SUB
/// socket only filters by prefix, so the empty topic receives both.
pub const DEFAULT_TOPIC: &str = "";

/// Receives what the subscriber reads. Implemented by the router glue and by tests.
///
/// Methods are called from the subscriber's threads (one per publisher), never
/// concurrently for the same publisher.
pub trait EventSink: Send + Sync + 'static {
    /// One batch payload (the 3rd frame) from `publisher` with its sequence number.
    ///
    /// An error is counted in [`PublisherStats::sink_errors`]; the batch still counts as
    /// applied (retrying a payload that does not decode would not help).
    fn on_batch(&self, publisher: &PublisherInfo, seq: u64, payload: &[u8]) -> kvroute::Result<()>;

    /// The worker's state can no longer be trusted (engine restart, a gap replay could not
    /// fill): drop its index entries; new events rebuild them.
    fn on_reset(&self, publisher: &PublisherInfo, reason: ResetReason);
}

/// Who sent a batch: passed to every [`EventSink`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherInfo {
    /// The position of the publisher in [`SubscriberConfig::publishers`].
    pub index: usize,
    /// The configured worker name.
    pub worker: String,
    /// The PUB endpoint the subscriber connects to.
    pub endpoint: String,
}

/// Why a worker's state was reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetReason {
    /// The publisher's sequence went backwards or its replayed history differs from what
    /// was applied: the engine restarted.
    Restart {
        /// The seq the subscriber expected next.
        expected: u64,
        /// The seq that arrived.
        got: u64,
    },
    /// Batches were lost and the replay could not provide them.
    Gap {
        /// The first missing seq.
        expected: u64,
        /// The seq the stream continues with.
        got: u64,
        /// Why the replay did not fill the gap.
        cause: GapCause,
    },
}

/// Why a replay could not fill a gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapCause {
    /// The publisher has no replay endpoint configured.
    NoReplayEndpoint,
    /// No end marker arrived within [`SubscriberConfig::replay_timeout`].
    Timeout,
    /// The publisher no longer buffers the missing batches; `first` is the earliest seq it
    /// replayed (`None`: it replayed nothing).
    NotBuffered {
        /// The first replayed seq.
        first: Option<u64>,
    },
    /// After a reconnect the replay could not prove the publisher is the same process
    /// (it no longer buffers the last applied batch), so its history is not trusted.
    Unverified,
    /// The replay request could not be sent (socket error).
    Transport(String),
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::Restart { expected, got } => {
                write!(f, "publisher restarted (expected seq {expected}, got {got})")
            }
            ResetReason::Gap { expected, got, cause } => {
                write!(f, "unfillable gap (expected seq {expected}, got {got}): {cause:?}")
            }
        }
    }
}

/// One vLLM publisher to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// The PUB endpoint, `tcp://host:port` (or `ipc://path`).
    pub endpoint: String,
    /// The ROUTER replay endpoint (vLLM's `replay_endpoint`), if the publisher has one.
    pub replay_endpoint: Option<String>,
    /// The topic to subscribe to; `""` ([`DEFAULT_TOPIC`]) subscribes to everything. With a
    /// non-empty topic, messages whose topic frame differs (a longer topic sharing the
    /// prefix) are ignored and counted.
    pub topic: String,
    /// The worker name handed to the sink. Empty: `host:port` of the endpoint.
    pub worker: String,
    /// "The sink already has every batch before this seq": the first message triggers a
    /// replay from here when it is later. Used when a router replica restores a snapshot
    /// that recorded each publisher's last seq. `None`: start with whatever arrives first.
    pub start_seq: Option<u64>,
}

impl PublisherConfig {
    /// A publisher on `endpoint` with every topic, no replay endpoint, the worker
    /// named after the endpoint, and no start seq.
    pub fn new(endpoint: impl Into<String>) -> Self {
        PublisherConfig {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: DEFAULT_TOPIC.to_string(),
            worker: String::new(),
            start_seq: None,
        }
    }

    /// Sets the replay endpoint.
    pub fn with_replay(mut self, replay_endpoint: impl Into<String>) -> Self {
        self.replay_endpoint = Some(replay_endpoint.into());
        self
    }

    /// Sets the worker name.
    pub fn with_worker(mut self, worker: impl Into<String>) -> Self {
        self.worker = worker.into();
        self
    }

    /// The worker name: [`PublisherConfig::worker`], or the endpoint without its scheme.
    pub fn worker_name(&self) -> String {
        if !self.worker.is_empty() {
            return self.worker.clone();
        }
        match self.endpoint.split_once("://") {
            Some((_, rest)) => rest.to_string(),
            None => self.endpoint.clone(),
        }
    }
}

/// The subscriber's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// The publishers; at least one, with distinct worker names.
    pub publishers: Vec<PublisherConfig>,
    /// How long a replay may take until its end marker before the gap counts as unfillable.
    pub replay_timeout: Duration,
    /// The SUB socket's receive high-water mark (messages); beyond it the publisher drops
    /// messages for this subscriber, which shows up as a gap. 0 means no limit.
    pub rcvhwm: i32,
    /// How often the threads wake up to check for shutdown. Bounds shutdown latency.
    pub poll_interval: Duration,
    /// The SUB socket's reconnect interval (ZeroMQ reconnects by itself).
    pub reconnect_interval: Duration,
    /// A publisher that has been connected this long without sending a batch is flagged
    /// as [`PublisherStats::idle`] (wrong topic, KV events not enabled in the engine, or
    /// an idle engine).
    pub idle_warning: Duration,
    /// How many live batches are buffered at most while a replay is in progress; beyond
    /// it they wait in the SUB socket's queue (bounded by `rcvhwm`). At least 1.
    pub max_pending: usize,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            publishers: Vec::new(),
            replay_timeout: Duration::from_secs(2),
            rcvhwm: 10_000,
            poll_interval: Duration::from_millis(50),
            reconnect_interval: Duration::from_millis(100),
            idle_warning: Duration::from_secs(10),
            max_pending: 100_000,
        }
    }
}

/// Counters of one publisher. Snapshot them with [`Subscriber::stats`].
///
/// Serializes (serde) to a flat map with these field names; times are seconds since the
/// Unix epoch (`f64`). The CLI's statistics file and the Python `ZmqSubscriber.stats()`
/// are this serialization.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PublisherStats {
    /// The worker name.
    pub worker: String,
    /// The PUB endpoint.
    pub endpoint: String,
    /// Whether the SUB socket currently has a connection to the publisher.
    pub connected: bool,
    /// Batches handed to [`EventSink::on_batch`].
    pub batches: u64,
    /// The seq of the last batch handed to the sink.
    pub last_seq: Option<u64>,
    /// Gaps detected (including the initial one implied by `start_seq`).
    pub gaps: u64,
    /// Replays that filled their gap.
    pub replays_ok: u64,
    /// Replays that were attempted and did not fill their gap.
    pub replays_failed: u64,
    /// Publisher restarts detected.
    pub restarts: u64,
    /// Calls of [`EventSink::on_reset`].
    pub resets: u64,
    /// Errors (or panics) returned by the sink.
    pub sink_errors: u64,
    /// The text of the last sink error (or panic), with the seq of its batch.
    pub last_error: Option<String>,
    /// Malformed messages skipped (wrong frame count, seq not 8 bytes, ...).
    pub frame_errors: u64,
    /// Messages skipped because their topic frame differs from the configured topic.
    pub foreign_topic: u64,
    /// Live messages dropped because the replay had already applied them.
    pub duplicates: u64,
    /// Reconnections after the connection to the publisher was lost.
    pub reconnects: u64,
    /// When the last batch was handed to the sink.
    #[serde(serialize_with = "epoch_secs")]
    pub last_batch_at: Option<SystemTime>,
    /// When the current connection was established (`None` while disconnected).
    #[serde(serialize_with = "epoch_secs")]
    pub connected_at: Option<SystemTime>,
    /// Connected for at least [`SubscriberConfig::idle_warning`] without a batch in that
    /// time: the publisher sends nothing this subscriber accepts (check the topic and that
    /// the engine publishes KV events). Computed when the stats are taken.
    pub idle: bool,
}

fn epoch_secs<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    let secs =
        t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64());
    s.serialize_some(&secs)
}

impl PublisherStats {
    /// Whether the publisher counts as [`idle`](PublisherStats::idle) at `now`: connected
    /// for at least `after`, with no batch within the last `after`.
    pub fn is_idle_at(&self, now: SystemTime, after: Duration) -> bool {
        let Some(since) = self.connected_at.filter(|_| self.connected) else {
            return false;
        };
        let quiet_since = match self.last_batch_at {
            Some(b) if b > since => b,
            _ => since,
        };
        now.duration_since(quiet_since).is_ok_and(|d| d >= after)
    }
}

/// A running subscriber. Stops (and joins its threads) on [`Subscriber::shutdown`] or drop.
pub struct Subscriber {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Vec<Arc<Mutex<PublisherStats>>>,
    idle_warning: Duration,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber").field("publishers", &self.stats.len()).finish()
    }
}

fn io_err(what: &str, e: zmq::Error) -> kvroute::Error {
    kvroute::Error::Io(format!("{what}: {e}"))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl Subscriber {
    /// Validates `cfg`, connects one SUB socket per publisher and starts one thread per
    /// publisher. Returns at once; connections are made in the background.
    ///
    /// Errors: [`kvroute::Error::Config`] for an empty publisher list, an endpoint that is
    /// not `tcp://` or `ipc://`, duplicate worker names, a zero timeout or a negative HWM;
    /// [`kvroute::Error::Io`] when ZeroMQ refuses a socket or an endpoint.
    pub fn start(cfg: SubscriberConfig, sink: Arc<dyn EventSink>) -> kvroute::Result<Subscriber> {
        validate(&cfg)?;
        let idle_warning = cfg.idle_warning;
        let ctx = zmq::Context::new();
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::with_capacity(cfg.publishers.len());
        let mut stats = Vec::with_capacity(cfg.publishers.len());
        for (index, p) in cfg.publishers.iter().enumerate() {
            let info =
                PublisherInfo { index, worker: p.worker_name(), endpoint: p.endpoint.clone() };
            let st = Arc::new(Mutex::new(PublisherStats {
                worker: info.worker.clone(),
                endpoint: info.endpoint.clone(),
                ..PublisherStats::default()
            }));
            let w = worker::Worker::new(
                &ctx,
                &cfg,
                p,
                info,
                Arc::clone(&sink),
                Arc::clone(&st),
                Arc::clone(&stop),
            )?;
            workers.push(w);
            stats.push(st);
        }
        let mut threads = Vec::with_capacity(workers.len());
        for w in workers {
            let name = format!("kvroute-zmq-{}", w.index());
            let spawned = std::thread::Builder::new().name(name).spawn(move || w.run());
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    for h in threads {
                        let _ = h.join();
                    }
                    return Err(kvroute::Error::Io(format!("spawning subscriber thread: {e}")));
                }
            }
        }
        Ok(Subscriber { stop, threads, stats, idle_warning })
    }

    /// A snapshot of every publisher's counters, in configuration order, with
    /// [`PublisherStats::idle`] evaluated now.
    pub fn stats(&self) -> Vec<PublisherStats> {
        let now = SystemTime::now();
        self.stats
            .iter()
            .map(|s| {
                let mut st = s.lock().clone();
                st.idle = st.is_idle_at(now, self.idle_warning);
                st
            })
            .collect()
    }

    /// Stops every thread and waits for them. Takes at most about one
    /// [`SubscriberConfig::poll_interval`] plus the time of a sink call in progress.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.threads.drain(..) {
            // A panicking worker thread has already stopped; nothing more to do.
            let _ = h.join();
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn validate(cfg: &SubscriberConfig) -> kvroute::Result<()> {
    if cfg.publishers.is_empty() {
        return Err(kvroute::Error::config("no publishers configured"));
    }
    if cfg.replay_timeout.is_zero() || cfg.poll_interval.is_zero() {
        return Err(kvroute::Error::config("replay_timeout and poll_interval must be > 0"));
    }
    if cfg.idle_warning.is_zero() || cfg.max_pending == 0 {
        return Err(kvroute::Error::config("idle_warning and max_pending must be > 0"));
    }
    if cfg.rcvhwm < 0 {
        return Err(kvroute::Error::config(format!("rcvhwm must be >= 0, got {}", cfg.rcvhwm)));
    }
    let mut names = std::collections::HashSet::new();
    for p in &cfg.publishers {
        for ep in std::iter::once(&p.endpoint).chain(p.replay_endpoint.as_ref()) {
            let ok = ["tcp://", "ipc://"].iter().any(|s| ep.starts_with(s) && ep.len() > s.len());
            if !ok {
                return Err(kvroute::Error::config(format!(
                    "endpoint {ep:?} must be tcp://host:port or ipc://path"
                )));
            }
        }
        if !names.insert(p.worker_name()) {
            return Err(kvroute::Error::config(format!(
                "duplicate worker name {:?}",
                p.worker_name()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    impl EventSink for Nop {
        fn on_batch(&self, _: &PublisherInfo, _: u64, _: &[u8]) -> kvroute::Result<()> {
            Ok(())
        }
        fn on_reset(&self, _: &PublisherInfo, _: ResetReason) {}
    }

    #[test]
    fn worker_name_defaults_to_host_port() {
        assert_eq!(PublisherConfig::new("tcp://10.0.0.7:5557").worker_name(), "10.0.0.7:5557");
        assert_eq!(PublisherConfig::new("tcp://h:1").with_worker("w").worker_name(), "w");
    }

    #[test]
    fn idle_means_connected_and_quiet_for_the_whole_window() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let after = Duration::from_secs(10);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let st = PublisherStats { connected: true, connected_at: Some(t0), ..Default::default() };
        assert!(!st.is_idle_at(at(9), after));
        assert!(st.is_idle_at(at(10), after));
        let fed = PublisherStats { last_batch_at: Some(at(5)), ..st.clone() };
        assert!(!fed.is_idle_at(at(14), after));
        assert!(fed.is_idle_at(at(15), after));
        // A batch from before the current connection does not count.
        let old = PublisherStats { last_batch_at: Some(at(0) - after), ..st.clone() };
        assert!(old.is_idle_at(at(10), after));
        let down = PublisherStats { connected: false, ..st };
        assert!(!down.is_idle_at(at(100), after));
    }

    #[test]
    fn stats_serialize_flat_with_epoch_seconds() {
        let st = PublisherStats {
            worker: "w".into(),
            last_batch_at: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_500)),
            ..Default::default()
        };
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["worker"], "w");
        assert_eq!(v["last_batch_at"], 1.5);
        assert_eq!(v["connected_at"], serde_json::Value::Null);
        assert_eq!(v["idle"], false);
        assert_eq!(v["sink_errors"], 0);
    }

    #[test]
    fn default_topic_is_every_topic() {
        assert_eq!(PublisherConfig::new("tcp://h:1").topic, "");
    }

    #[test]
    fn bad_configs_are_rejected() {
        let start = |publishers: Vec<PublisherConfig>| {
            let cfg = SubscriberConfig { publishers, ..SubscriberConfig::default() };
            Subscriber::start(cfg, Arc::new(Nop)).map(|_| ())
        };
        assert!(matches!(start(vec![]), Err(kvroute::Error::Config(_))));
        assert!(matches!(
            start(vec![PublisherConfig::new("udp://x:1")]),
            Err(kvroute::Error::Config(_))
        ));
        assert!(matches!(
            start(vec![PublisherConfig::new("tcp://h:1").with_replay("tcp://")]),
            Err(kvroute::Error::Config(_))
        ));
        assert!(matches!(
            start(vec![PublisherConfig::new("tcp://h:1"), PublisherConfig::new("tcp://h:1")]),
            Err(kvroute::Error::Config(_))
        ));
        // ZeroMQ itself rejects a malformed tcp address: a typed error, no panic.
        assert!(matches!(
            start(vec![PublisherConfig::new("tcp://no-port")]),
            Err(kvroute::Error::Io(_))
        ));
    }
}
