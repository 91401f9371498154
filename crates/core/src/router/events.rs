//! Applying KV events to the router's index.

use super::{Mode, OnHashMismatch, Router, WorkerState};
use crate::error::{Error, Result};
use crate::events::vllm::{DecodeOptions, FlatHashes, TokenIds};
use crate::events::{EngineHash, KvEvent, KvEventBatch, Value};
use crate::hash::{ExtraKey, RequestExtras};
use crate::index::PrefixIndex;
use crate::types::{Tier, WorkerKey};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The largest data-parallel rank for which a batch may add a worker by itself
/// (`auto_add_workers`): the rank comes from the payload, which must not be able to
/// create workers without bound.
pub const MAX_AUTO_RANK: u32 = 255;

/// The most blocks stored or removed under one hold of the index write lock. Consecutive
/// events of a batch share a hold up to this many blocks (a typical batch of a few events
/// of up to 256 blocks in all takes the lock once), so a route waits behind at most this
/// many blocks of one batch (about 10 µs), whatever the size of the batch.
pub const APPLY_CHUNK: usize = 256;

/// What [`Router::apply_events`] did with one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Events applied.
    pub events: u32,
    /// Blocks stored (per event block, duplicates included).
    pub blocks_stored: u32,
    /// Blocks removed.
    pub blocks_removed: u32,
    /// Removals of blocks the worker did not hold.
    pub unknown_removals: u32,
    /// Stored runs whose parent was unknown.
    pub orphans: u32,
    /// Placeholder events skipped (no tokens to key them by, in native-hash mode).
    pub placeholders_skipped: u32,
    /// Events skipped for an unknown `medium`.
    pub unknown_medium: u32,
    /// Events of other KV cache groups than group 0 (hybrid models) skipped.
    pub other_groups_skipped: u32,
    /// Blocks whose engine hash was checked against the router's own computation.
    pub hashes_verified: u32,
    /// Blocks whose engine hash disagreed (only with `on_hash_mismatch: "count"`).
    pub hash_mismatches: u32,
}

/// A validated, ready-to-apply operation, borrowing the batch's tokens.
enum Op<'a> {
    Store {
        tier: Tier,
        parent: Option<u64>,
        /// The event's engine hashes (projected to u64): this range of [`Plan::hashes`].
        engine: Range<usize>,
        /// Whether the router keys blocks by its own hash (else the engine's are the keys).
        rekey: bool,
        /// Event-form extra keys per block and tokens, for native re-keying at apply time
        /// (the parent's router key is only known then).
        tokens: &'a [u32],
        extra: Vec<Option<Vec<ExtraKey>>>,
    },
    Remove {
        tier: Tier,
        /// The removed engine hashes: this range of [`Plan::hashes`].
        engine: Range<usize>,
    },
    Clear,
}

/// A validated batch: its operations and the engine hashes of all its events in one
/// vector (one allocation per batch rather than one per event).
struct Plan<'a> {
    ops: Vec<Op<'a>>,
    hashes: Vec<u64>,
}

fn to_extra_key(v: &Value) -> Option<ExtraKey> {
    Some(match v {
        Value::Str(s) => ExtraKey::Str(s.clone()),
        Value::Int(i) => ExtraKey::Int(*i),
        Value::UInt(u) => ExtraKey::Int(i64::try_from(*u).ok()?),
        Value::Bin(b) => ExtraKey::Bytes(b.clone()),
        Value::Array(a) => ExtraKey::Tuple(a.iter().map(to_extra_key).collect::<Option<_>>()?),
        _ => return None,
    })
}

impl Router {
    /// Decodes a vLLM `KVEventBatch` msgpack payload and applies it for worker `name`
    /// (the data-parallel rank comes from the batch).
    ///
    /// Token ids are decoded only when the router uses them: with a vLLM scheme (the
    /// engine's hashes are the keys) only those of events that start a sequence, for
    /// `verify_engine_hashes`, unless `vocab_size` asks for every token to be checked.
    pub fn apply_vllm_batch(&self, name: &str, payload: &[u8]) -> Result<ApplyReport> {
        // The hashes are decoded straight into the plan's vector (`decode_flat`): the
        // same checks, errors and result as `apply_events(name, &decode_with(..)?)`.
        let (batch, flat) = crate::events::vllm::decode_flat(payload, self.decode_options())?;
        self.apply_inner(name, &batch, Some(flat), None)
    }

    /// What [`apply_vllm_batch`](Self::apply_vllm_batch) decodes of a payload.
    fn decode_options(&self) -> DecodeOptions {
        let token_ids = if !self.cfg.hash_algo.is_vllm() || self.cfg.vocab_size.is_some() {
            TokenIds::Keep
        } else if self.cfg.verify_engine_hashes {
            TokenIds::KeepForRoots
        } else {
            TokenIds::Skip
        };
        DecodeOptions { token_ids }
    }

    /// Like [`apply_vllm_batch`](Self::apply_vllm_batch), and records `seq` as the last
    /// sequence number applied from `publisher` atomically with the batch (under the same
    /// index lock that [`snapshot`](Self::snapshot) reads under), so a snapshot never
    /// pairs an index with a stream position that does not match it. The position moves
    /// even when the batch is rejected (a replay would only bring the same bad batch).
    pub fn apply_vllm_batch_from(
        &self,
        name: &str,
        payload: &[u8],
        publisher: &str,
        seq: u64,
    ) -> Result<ApplyReport> {
        let result = crate::events::vllm::decode_flat(payload, self.decode_options()).and_then(
            |(batch, flat)| self.apply_inner(name, &batch, Some(flat), Some((publisher, seq))),
        );
        if result.is_err() {
            let _batch = self.apply_lock.lock();
            self.streams.lock().insert(publisher.to_string(), seq);
        }
        result
    }

    /// Applies a decoded batch for worker `name` at the batch's data-parallel rank. The
    /// whole batch is validated first; on any error nothing is applied.
    pub fn apply_events(&self, name: &str, batch: &KvEventBatch) -> Result<ApplyReport> {
        self.apply_inner(name, batch, None, None)
    }

    fn apply_inner(
        &self,
        name: &str,
        batch: &KvEventBatch,
        flat: Option<FlatHashes>,
        stream: Option<(&str, u64)>,
    ) -> Result<ApplyReport> {
        if self.cfg.mode == Mode::Approximate {
            return Err(Error::config(
                "the router is in approximate mode and takes no KV events (use precise or hybrid)",
            ));
        }
        let rank = match batch.data_parallel_rank {
            None => 0,
            Some(r) if (0..=i64::from(u16::MAX)).contains(&r) => r as u32,
            Some(r) => return Err(Error::invalid(format!("data_parallel_rank {r} out of range"))),
        };
        let key = WorkerKey::new(name, rank);
        let known = self.registry.read().get(&key).cloned();
        let worker = match known {
            Some(w) => w,
            None if self.cfg.auto_add_workers && rank > MAX_AUTO_RANK => {
                return Err(Error::invalid(format!(
                    "data_parallel_rank {rank} above {MAX_AUTO_RANK}: not adding a worker for it"
                )))
            }
            None if self.cfg.auto_add_workers => {
                // Another batch may have added it meanwhile; any other failure (an empty
                // name, too many workers) is the batch's error, not "unknown worker".
                match self.add_worker(name, rank) {
                    Ok(_) | Err(Error::WorkerExists(_)) => {}
                    Err(e) => {
                        self.metrics.event_errors.fetch_add(1, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                self.worker(name, rank)?
            }
            None => return Err(Error::UnknownWorker(key.to_string())),
        };
        let mut report = ApplyReport::default();
        let plan = match self.validate(batch, flat, &mut report) {
            Ok(plan) => plan,
            Err(e) => {
                worker.counters.lock().errors += 1;
                self.metrics.event_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let ts_ms = if batch.ts.is_finite() && batch.ts > 0.0 {
            (batch.ts * 1e3) as u64
        } else {
            super::wall_ms()
        };
        let store_errors = match self.apply_ops(&worker, plan, &mut report, stream, ts_ms) {
            Ok(n) => n,
            Err(e) => {
                // The worker was removed while the batch was validated: nothing applied.
                self.metrics.event_errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        {
            let mut c = worker.counters.lock();
            c.batches += 1;
            c.events += u64::from(report.events);
            c.blocks_stored += u64::from(report.blocks_stored);
            c.blocks_removed += u64::from(report.blocks_removed);
            c.unknown_removals += u64::from(report.unknown_removals);
            c.orphans += u64::from(report.orphans);
            c.placeholders_skipped += u64::from(report.placeholders_skipped);
            c.hash_mismatches += u64::from(report.hash_mismatches);
            c.store_errors += store_errors;
            c.skipped_fields += u64::from(batch.skipped_fields);
            c.skipped_events += u64::from(batch.skipped_events);
            c.last_event_ts = batch.ts;
            // The eviction horizon: cached blocks / blocks stored per second since the
            // worker's first batch.
            let first = f64::from_bits(worker.first_event_ts_bits.load(Ordering::Relaxed));
            if first.is_nan() {
                worker.first_event_ts_bits.store(batch.ts.to_bits(), Ordering::Relaxed);
            } else if batch.ts > first && c.blocks_stored > 0 && c.blocks_removed > 0 {
                // Known once the cache has evicted: before that it has not turned over.
                let cached = c.blocks_stored.saturating_sub(c.blocks_removed) as f64;
                let rate = c.blocks_stored as f64 / (batch.ts - first);
                worker.horizon_bits.store((cached / rate).to_bits(), Ordering::Relaxed);
            }
        }
        self.metrics.event_batches.fetch_add(1, Ordering::Relaxed);
        Ok(report)
    }

    /// Checks every event and turns it into an operation, touching no state.
    ///
    /// With `flat` (from [`decode_flat`](crate::events::vllm::decode_flat)), the events'
    /// hashes are taken from it (their `block_hashes` are empty) and it becomes the plan's
    /// hash vector; without, they are projected from the events.
    fn validate<'a>(
        &self,
        batch: &'a KvEventBatch,
        flat: Option<FlatHashes>,
        report: &mut ApplyReport,
    ) -> Result<Plan<'a>> {
        let bs = self.cfg.block_size;
        let vllm = self.cfg.hash_algo.is_vllm();
        let mut ops = Vec::with_capacity(batch.events.len());
        let (mut hashes, ranges) = match flat {
            Some(f) => {
                debug_assert_eq!(f.ranges.len(), batch.events.len());
                (f.hashes, Some(f.ranges))
            }
            None => (Vec::new(), None),
        };
        // The hashes of event `i`, a range of `hashes`.
        let take = |hashes: &mut Vec<u64>, i: usize, own: &[EngineHash]| match &ranges {
            Some(r) => r[i].clone(),
            None => {
                let from = hashes.len();
                hashes.extend(own.iter().map(EngineHash::to_u64));
                from..hashes.len()
            }
        };
        for (i, ev) in batch.events.iter().enumerate() {
            match ev {
                KvEvent::BlockStored(s) => {
                    if s.group_idx.is_some_and(|g| g != 0) {
                        report.other_groups_skipped += 1;
                        continue;
                    }
                    let Some(tier) = s.tier() else {
                        report.unknown_medium += 1;
                        continue;
                    };
                    if s.block_size != 0 && s.block_size as usize != bs {
                        return Err(Error::BlockSizeMismatch {
                            router: bs,
                            event: s.block_size as usize,
                        });
                    }
                    let range = take(&mut hashes, i, &s.block_hashes);
                    let engine = &hashes[range.clone()];
                    let parent = s.parent_block_hash.as_ref().map(|h| h.to_u64());
                    let placeholder = s.is_placeholder();
                    if !placeholder && s.token_count() != engine.len() * bs {
                        return Err(Error::invalid(format!(
                            "event {i}: {} token ids for {} blocks of {bs}",
                            s.token_count(),
                            engine.len()
                        )));
                    }
                    if s.tokens_skipped > 0 && (!vllm || self.cfg.vocab_size.is_some()) {
                        return Err(Error::invalid(format!(
                            "event {i}: its token ids were skipped at decoding, and this \
                             router needs them (decode with TokenIds::Keep)"
                        )));
                    }
                    if let Some(v) = self.cfg.vocab_size {
                        if let Some(t) = s.token_ids.iter().find(|&&t| t >= v) {
                            return Err(Error::invalid(format!(
                                "event {i}: token id {t} outside the vocabulary (size {v})"
                            )));
                        }
                    }
                    // A block's extra keys must convert whole: dropping them would key
                    // the block as if it had none. Native keys cannot be computed then
                    // (an error); with engine hashes the block only skips verification.
                    let extra: Vec<Option<Vec<ExtraKey>>> = match &s.extra_keys {
                        None => Vec::new(),
                        Some(list) => list
                            .iter()
                            .enumerate()
                            .map(|(b, e)| {
                                let keys = match e {
                                    None => return Ok(None),
                                    Some(Value::Array(a)) => {
                                        a.iter().map(to_extra_key).collect::<Option<Vec<_>>>()
                                    }
                                    Some(v) => to_extra_key(v).map(|k| vec![k]),
                                };
                                match keys {
                                    Some(k) => Ok(Some(k)),
                                    None if vllm => Ok(Some(Vec::new())),
                                    None => Err(Error::invalid(format!(
                                        "event {i}: extra keys of block {b} hold a value vLLM \
                                         does not hash (only str, int, bytes and tuples): {e:?}"
                                    ))),
                                }
                            })
                            .collect::<Result<_>>()?,
                    };
                    if vllm {
                        let root = parent.is_none()
                            && !placeholder
                            && s.lora_name.is_none()
                            && extra.iter().all(Option::is_none);
                        if self.cfg.verify_engine_hashes && root && s.tokens_skipped > 0 {
                            return Err(Error::invalid(format!(
                                "event {i}: starts a sequence but its token ids were skipped \
                                 at decoding, so its hashes cannot be verified"
                            )));
                        }
                        if self.cfg.verify_engine_hashes && root {
                            let mut mine = Vec::new();
                            self.hasher.block_keys(
                                &s.token_ids,
                                &RequestExtras::default(),
                                &mut mine,
                            );
                            report.hashes_verified += engine.len() as u32;
                            if mine != engine {
                                let bad = mine.iter().zip(engine).filter(|(a, b)| a != b).count();
                                match self.cfg.on_hash_mismatch {
                                    OnHashMismatch::Error => {
                                        self.metrics
                                            .hash_mismatches
                                            .fetch_add(bad as u64, Ordering::Relaxed);
                                        return Err(Error::HashMismatch(format!(
                                            "event {i}: {bad} of {} block hashes differ from the router's {} hashes \
                                             (engine {:#018x}, router {:#018x}); check --prefix-caching-hash-algo, \
                                             PYTHONHASHSEED and the block size",
                                            engine.len(),
                                            self.cfg.hash_algo.name(),
                                            engine[0],
                                            mine.first().copied().unwrap_or(0)
                                        )));
                                    }
                                    OnHashMismatch::Count => report.hash_mismatches += bad as u32,
                                }
                            }
                        }
                        ops.push(Op::Store {
                            tier,
                            parent,
                            engine: range,
                            rekey: false,
                            tokens: &[],
                            extra: Vec::new(),
                        });
                    } else {
                        if placeholder {
                            report.placeholders_skipped += 1;
                            continue;
                        }
                        ops.push(Op::Store {
                            tier,
                            parent,
                            engine: range,
                            rekey: true,
                            tokens: &s.token_ids,
                            extra,
                        });
                    }
                }
                KvEvent::BlockRemoved(r) => {
                    if r.group_idx.is_some_and(|g| g != 0) {
                        report.other_groups_skipped += 1;
                        continue;
                    }
                    let Some(tier) = r.tier() else {
                        report.unknown_medium += 1;
                        continue;
                    };
                    let engine = take(&mut hashes, i, &r.block_hashes);
                    ops.push(Op::Remove { tier, engine });
                }
                KvEvent::AllBlocksCleared => ops.push(Op::Clear),
            }
        }
        Ok(Plan { ops, hashes })
    }

    /// Applies validated operations. Fails with [`Error::UnknownWorker`], having applied
    /// nothing, when the worker was removed after validation (its id may be reused).
    /// Stores the index refuses after validation are counted (`store_errors` in the
    /// worker's and the router's metrics), never dropped silently; the function returns
    /// how many blocks those were.
    ///
    /// Batches are serialized by `apply_lock` (which [`snapshot`](Self::snapshot) also
    /// takes, so a snapshot never sees half a batch or a stream position that does not
    /// match the index). The index write lock is held across consecutive operations for
    /// up to [`APPLY_CHUNK`] blocks, then released and taken again, so a route never
    /// waits behind more than that many blocks of one batch; native re-keying hashes
    /// tokens outside it, and a `Clear` or the confirmation of predicted blocks releases
    /// it first.
    fn apply_ops(
        &self,
        worker: &Arc<WorkerState>,
        plan: Plan<'_>,
        report: &mut ApplyReport,
        stream: Option<(&str, u64)>,
        ts_ms: u64,
    ) -> Result<u64> {
        let id = worker.id;
        let vllm = self.cfg.hash_algo.is_vllm();
        let _batch = self.apply_lock.lock();
        if !self.is_registered(worker) {
            return Err(Error::UnknownWorker(format!(
                "{} (removed while its batch was being applied)",
                worker.key
            )));
        }
        let mut store_errors = 0u64;
        if self.cfg.mode == Mode::Hybrid && !worker.has_events.swap(true, Ordering::Relaxed) {
            // Events win from now on: drop the predictions for this worker.
            self.index.write().clear_worker(id);
        } else {
            worker.has_events.store(true, Ordering::Relaxed);
        }
        let hashes = &plan.hashes[..];
        // Per operation, the keys of the store that follows it (empty if none, or if
        // it re-keys): a prefetch hint for the end of this one (`store_ahead`).
        let follows: Vec<Range<usize>> = plan
            .ops
            .iter()
            .skip(1)
            .map(|op| match op {
                Op::Store { engine, rekey: false, .. } => engine.clone(),
                _ => 0..0,
            })
            .chain(std::iter::once(0..0))
            .collect();
        let mut lock = Window { router: self, guard: None, blocks: 0 };
        let mut keys = Vec::new();
        for (op, follow) in plan.ops.into_iter().zip(follows) {
            report.events += 1;
            match op {
                Op::Store { tier, parent, engine, rekey, tokens, extra } => {
                    let engine = &hashes[engine];
                    if rekey {
                        let parent_key = parent.map(|p| {
                            let k = match &lock.guard {
                                Some(g) => g.engine_key(id, p),
                                None => self.index.read().engine_key(id, p),
                            };
                            k.unwrap_or(p)
                        });
                        lock.release();
                        self.hasher.native_keys_from(parent_key, tokens, &extra, &mut keys);
                    }
                    let mut start = 0;
                    while start < engine.len() {
                        let n = lock.room().min(engine.len() - start);
                        let chunk = &engine[start..start + n];
                        let chunk_parent =
                            if start == 0 { parent } else { Some(engine[start - 1]) };
                        let index = lock.index(n);
                        let r = if rekey {
                            index.store_mapped(
                                id,
                                tier,
                                chunk_parent,
                                chunk,
                                &keys[start..start + n],
                            )
                        } else {
                            // What is stored next: the rest of this event, or the next
                            // event's keys.
                            let next = if start + n < engine.len() {
                                &engine[start + n..]
                            } else {
                                &hashes[follow.clone()]
                            };
                            index.store_ahead(id, tier, chunk_parent, chunk, next)
                        };
                        match r {
                            Ok(r) => {
                                report.blocks_stored += r.blocks;
                                report.orphans += u32::from(r.orphan);
                            }
                            Err(_) => store_errors += n as u64,
                        }
                        start += n;
                    }
                    // Predicted residency: these blocks are now known, not predicted.
                    if !self.overlay.read().nothing_to_confirm() {
                        lock.release();
                        let ks = if rekey { &keys[..] } else { engine };
                        self.confirm_predictions(worker, ks, ts_ms);
                    }
                }
                Op::Remove { tier, engine } => {
                    let engine = &hashes[engine];
                    let mut start = 0;
                    while start < engine.len() {
                        let n = lock.room().min(engine.len() - start);
                        let part = &engine[start..start + n];
                        let index = lock.index(n);
                        let r = if vllm {
                            index.remove(id, tier, part)
                        } else {
                            index.remove_mapped(id, tier, part)
                        };
                        report.blocks_removed += r.removed;
                        report.unknown_removals += r.unknown;
                        start += n;
                    }
                }
                Op::Clear => {
                    lock.release();
                    self.clear_worker_state(id);
                }
            }
        }
        lock.release();
        if let Some((publisher, seq)) = stream {
            self.streams.lock().insert(publisher.to_string(), seq);
        }
        if store_errors > 0 {
            self.metrics.store_errors.fetch_add(store_errors, Ordering::Relaxed);
        }
        Ok(store_errors)
    }
}

/// The index write lock of a batch being applied, held over up to [`APPLY_CHUNK`] blocks.
struct Window<'r> {
    router: &'r Router,
    guard: Option<parking_lot::RwLockWriteGuard<'r, PrefixIndex>>,
    /// Blocks stored or removed under the current hold.
    blocks: usize,
}

impl<'r> Window<'r> {
    /// Blocks that fit under the current hold (a full hold is released at the next
    /// [`index`](Self::index), so this is never 0).
    fn room(&self) -> usize {
        if self.guard.is_some() && self.blocks < APPLY_CHUNK {
            APPLY_CHUNK - self.blocks
        } else {
            APPLY_CHUNK
        }
    }

    /// The index, for `n` (at most [`room`](Self::room)) more blocks: takes the write lock
    /// if it is not held, after releasing it if the hold is full.
    fn index(&mut self, n: usize) -> &mut PrefixIndex {
        if self.blocks >= APPLY_CHUNK {
            self.release();
        }
        self.blocks += n;
        self.guard.get_or_insert_with(|| self.router.index.write())
    }

    /// Releases the write lock (if held).
    fn release(&mut self) {
        self.guard = None;
        self.blocks = 0;
    }
}

#[cfg(test)]
mod tests {
    //! White-box tests of errors that the public API cannot provoke on purpose: a worker
    //! removed between validation and application, and an index that refuses a store.

    use super::*;
    use crate::events::{BlockStored, EngineHash};
    use crate::router::Request;

    fn stored(hashes: &[u64]) -> KvEvent {
        KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().map(|&h| EngineHash::Int(h)).collect(),
            block_size: 16,
            ..Default::default()
        })
    }

    fn vllm_router() -> Router {
        Router::from_json(r#"{"hash_algo": "sha256", "workers": [{"name": "a"}]}"#).unwrap()
    }

    #[test]
    fn a_batch_for_a_worker_removed_mid_batch_is_an_error_not_an_empty_success() {
        let r = std::sync::Arc::new(vllm_router());
        let batch = KvEventBatch::new(1.0, vec![stored(&[1, 2, 3])]);
        // Hold the apply lock so the batch stops after validation, and meanwhile do what
        // `remove_worker` does under that lock (it takes the worker out of the registry),
        // then let the batch go on.
        let hold = r.apply_lock.lock();
        let applier = {
            let r = r.clone();
            std::thread::spawn(move || r.apply_events("a", &batch))
        };
        // Give the batch time to look its worker up and validate (it then waits on the
        // lock; if it were later, it would fail the lookup, an error just the same).
        std::thread::sleep(std::time::Duration::from_millis(500));
        {
            let mut reg = r.registry.write();
            let id = reg.by_key.remove(&WorkerKey::new("a", 0)).unwrap();
            reg.slots[id.index()] = None;
            reg.rebuild_names();
        }
        drop(hold);
        let result = applier.join().unwrap();
        assert!(matches!(result, Err(Error::UnknownWorker(_))), "{result:?}");
        let m = r.metrics();
        assert_eq!(m.event_batches, 0, "nothing counted as applied");
        // 1 when the batch got past its lookup before the removal (the case under test;
        // a machine too busy to get there in 500 ms fails the lookup instead, uncounted).
        assert!(m.event_errors <= 1);
        assert_eq!(m.index.holder_blocks, 0);
    }

    #[test]
    fn runs_longer_than_one_lock_hold_chain_across_holds_and_events() {
        // 3 events of 100 blocks, each continuing the previous: the 256-block hold ends
        // inside the third event, whose second part must attach to the first part's last
        // block (a wrong parent would make it an orphan and break the match).
        let r = vllm_router();
        let hashes: Vec<u64> = (1..=300).collect();
        let mut events = Vec::new();
        for (i, run) in hashes.chunks(100).enumerate() {
            let mut ev = stored(run);
            if let KvEvent::BlockStored(s) = &mut ev {
                s.parent_block_hash = (i > 0).then(|| EngineHash::Int(run[0] - 1));
            }
            events.push(ev);
        }
        let report = r.apply_events("a", &KvEventBatch::new(1.0, events)).unwrap();
        assert_eq!((report.blocks_stored, report.orphans), (300, 0));
        let mut m = crate::index::Matches::new();
        r.index.read().find_matches(&hashes, crate::index::MatchOptions::default(), &mut m);
        assert_eq!(m.max_blocks(), 300, "the whole chain matches");
        assert_eq!(r.index_stats().holder_blocks, 300);
        // One removal of all 300, tail first (over two holds), and of one unknown block.
        let mut tail_first: Vec<u64> = hashes.iter().rev().copied().collect();
        tail_first.push(999);
        let removed = KvEvent::BlockRemoved(crate::events::BlockRemoved {
            block_hashes: tail_first.into_iter().map(EngineHash::Int).collect(),
            ..Default::default()
        });
        let report = r.apply_events("a", &KvEventBatch::new(2.0, vec![removed])).unwrap();
        assert_eq!((report.blocks_removed, report.unknown_removals), (300, 1));
        assert_eq!(r.index_stats().holder_blocks, 0);
    }

    /// Registers worker `name` under an id the index refuses (above `MAX_WORKER`).
    fn register_out_of_range(r: &Router, name: &str) -> Arc<WorkerState> {
        let id = crate::types::WorkerId(crate::index::MAX_WORKER + 1);
        let model = if r.cfg.mode == Mode::Precise {
            None
        } else {
            Some(crate::model::BlockPool::new(64, r.cfg.block_size, true).unwrap())
        };
        let state =
            Arc::new(WorkerState::new(WorkerKey::new(name, 0), id, model, r.initial_ttl_ms()));
        let mut reg = r.registry.write();
        reg.slots.resize(id.index() + 1, None);
        reg.slots[id.index()] = Some(state.clone());
        reg.by_key.insert(state.key.clone(), id);
        reg.rebuild_names();
        state
    }

    #[test]
    fn stores_the_index_refuses_after_validation_are_counted() {
        let r = vllm_router();
        register_out_of_range(&r, "huge");
        let batch = KvEventBatch::new(1.0, vec![stored(&[1, 2, 3]), stored(&[4])]);
        let report = r.apply_events("huge", &batch).unwrap();
        assert_eq!(report.blocks_stored, 0);
        let m = r.metrics();
        assert_eq!(m.store_errors, 4);
        let w = m.workers.iter().find(|w| w.worker.name == "huge").unwrap();
        assert_eq!(w.events.store_errors, 4);
        assert!(r.prometheus().contains("kvroute_store_errors_total 4"));
    }

    #[test]
    fn predictions_the_index_refuses_are_counted() {
        let r = Router::from_json(r#"{"mode": "approximate"}"#).unwrap();
        r.add_worker("a", 0).unwrap();
        let tokens: Vec<u32> = (0..64).collect();
        let mut d = r.route(&Request::new(&tokens)).unwrap();
        assert_eq!(d.keys.len(), 4);
        let huge = register_out_of_range(&r, "huge");
        d.worker = huge.key.clone();
        d.worker_id = huge.id;
        r.on_routed(&d).unwrap();
        let m = r.metrics();
        assert_eq!(m.prediction_errors, 1, "the refused store of the predicted blocks");
        assert_eq!(m.index.holder_blocks, 0);
        assert!(r.prometheus().contains("kvroute_prediction_errors_total 1"));
    }
}
