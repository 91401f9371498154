//! The glue between the subscriber and a [`Router`]: every batch goes to
//! [`Router::apply_vllm_batch`] and moves the publisher's stream position; every reset
//! drops the worker's index entries ([`Router::clear_worker`]).

use crate::{EventSink, PublisherInfo, ResetReason, Subscriber, SubscriberConfig};
use kvroute::router::Router;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a [`RouterSink`] did for one worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Batches the router applied.
    pub batches: u64,
    /// Events in those batches.
    pub events: u64,
    /// Blocks stored by those batches (per event block, duplicates included).
    pub blocks_stored: u64,
    /// Blocks removed by those batches.
    pub blocks_removed: u64,
    /// Batches the router rejected (bad block size, hash mismatch, undecodable payload,
    /// unknown worker). A rejected batch changes nothing in the index.
    pub errors: u64,
    /// The last rejection, as text, with the seq of its batch.
    pub last_error: Option<String>,
    /// Resets: the worker's entries were dropped (engine restart, unfillable gap).
    pub resets: u64,
    /// (block, worker) pairs dropped by those resets.
    pub blocks_dropped: u64,
    /// The reason of the last reset, as text.
    pub last_reset: Option<String>,
}

/// An [`EventSink`] that feeds a [`Router`].
///
/// - `on_batch`: [`Router::apply_vllm_batch_from`] for the publisher's worker name (the
///   data-parallel rank comes from the batch), which records the seq as the worker's
///   stream position atomically with the batch, so that [`Router::snapshot`] always pairs
///   the index with the position it reflects. The position moves even when the router
///   rejects the batch: replaying a batch that does not apply would not help.
/// - `on_reset`: [`Router::clear_worker`]; new events rebuild the entries. A worker the
///   router does not know yet has nothing to drop.
///
/// A rejected batch is returned as an error, which the subscriber counts in
/// [`PublisherStats::sink_errors`](crate::PublisherStats::sink_errors) and
/// [`PublisherStats::last_error`](crate::PublisherStats::last_error).
#[derive(Debug)]
pub struct RouterSink {
    router: Arc<Router>,
    stats: Mutex<BTreeMap<String, SinkStats>>,
}

impl RouterSink {
    /// A sink feeding `router`.
    pub fn new(router: Arc<Router>) -> Self {
        RouterSink { router, stats: Mutex::new(BTreeMap::new()) }
    }

    /// The router fed.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The counters, by worker name (workers appear at their first batch or reset).
    pub fn stats(&self) -> BTreeMap<String, SinkStats> {
        self.stats.lock().clone()
    }
}

impl EventSink for RouterSink {
    fn on_batch(&self, publisher: &PublisherInfo, seq: u64, payload: &[u8]) -> kvroute::Result<()> {
        let result =
            self.router.apply_vllm_batch_from(&publisher.worker, payload, &publisher.worker, seq);
        let mut stats = self.stats.lock();
        let st = stats.entry(publisher.worker.clone()).or_default();
        match result {
            Ok(report) => {
                st.batches += 1;
                st.events += u64::from(report.events);
                st.blocks_stored += u64::from(report.blocks_stored);
                st.blocks_removed += u64::from(report.blocks_removed);
                Ok(())
            }
            Err(e) => {
                st.errors += 1;
                st.last_error = Some(format!("seq {seq}: {e}"));
                Err(e)
            }
        }
    }

    fn on_reset(&self, publisher: &PublisherInfo, reason: ResetReason) {
        // UnknownWorker: no batch of this worker was ever applied, nothing to drop.
        let dropped = self.router.clear_worker(&publisher.worker).unwrap_or(0);
        let mut stats = self.stats.lock();
        let st = stats.entry(publisher.worker.clone()).or_default();
        st.resets += 1;
        st.blocks_dropped += dropped;
        st.last_reset = Some(reason.to_string());
    }
}

/// Starts a [`Subscriber`] that feeds `router` through a [`RouterSink`]. Use
/// [`subscribe_with_sink`] to keep the sink's counters.
pub fn subscribe(router: Arc<Router>, cfg: SubscriberConfig) -> kvroute::Result<Subscriber> {
    subscribe_with_sink(router, cfg).map(|(sub, _)| sub)
}

/// Like [`subscribe`], also returning the sink (for [`RouterSink::stats`]).
pub fn subscribe_with_sink(
    router: Arc<Router>,
    cfg: SubscriberConfig,
) -> kvroute::Result<(Subscriber, Arc<RouterSink>)> {
    let sink = Arc::new(RouterSink::new(router));
    let sub = Subscriber::start(cfg, sink.clone())?;
    Ok((sub, sink))
}

/// Sets each publisher's [`start_seq`](crate::PublisherConfig::start_seq) to one past the
/// stream position recorded for its worker name in `positions` (as returned by
/// [`Router::restore`] or [`Router::stream_positions`]), so that a replica that restored a
/// snapshot asks the publishers to replay everything after it. Publishers without a
/// recorded position are left as they are. Returns how many were set.
pub fn resume_from(cfg: &mut SubscriberConfig, positions: &BTreeMap<String, u64>) -> usize {
    let mut n = 0;
    for p in &mut cfg.publishers {
        if let Some(&seq) = positions.get(&p.worker_name()) {
            // u64::MAX is the end marker's seq and never a batch's: nothing follows it.
            p.start_seq = seq.checked_add(1);
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PublisherConfig;

    #[test]
    fn resume_from_sets_start_seq_one_past_each_recorded_position() {
        let mut cfg = SubscriberConfig {
            publishers: vec![
                PublisherConfig::new("tcp://h:1").with_worker("a"),
                PublisherConfig::new("tcp://h:2"), // worker "h:2"
                PublisherConfig::new("tcp://h:3").with_worker("new"),
                PublisherConfig::new("tcp://h:4").with_worker("end"),
            ],
            ..SubscriberConfig::default()
        };
        cfg.publishers[2].start_seq = Some(9);
        let positions = BTreeMap::from([
            ("a".to_string(), 41),
            ("h:2".to_string(), 0),
            ("gone".to_string(), 5),
            ("end".to_string(), u64::MAX),
        ]);
        assert_eq!(resume_from(&mut cfg, &positions), 3);
        let got: Vec<Option<u64>> = cfg.publishers.iter().map(|p| p.start_seq).collect();
        assert_eq!(got, vec![Some(42), Some(1), Some(9), None]);
    }
}
