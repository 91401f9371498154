//! Applying KV events to the router's index.

use super::{Mode, OnHashMismatch, Router, WorkerState};
use crate::error::{Error, Result};
use crate::events::{KvEvent, KvEventBatch, Value};
use crate::hash::{ExtraKey, RequestExtras};
use crate::types::{Tier, WorkerKey};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The largest data-parallel rank for which a batch may add a worker by itself
/// (`auto_add_workers`): the rank comes from the payload, which must not be able to
/// create workers without bound.
pub const MAX_AUTO_RANK: u32 = 255;

/// The most blocks stored or removed under one hold of the index write lock.
pub const APPLY_CHUNK: usize = 16;

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
        /// Engine hashes (projected to u64).
        engine: Vec<u64>,
        /// Router keys, when the router keys blocks by its own hash (else = engine).
        keys: Option<Vec<u64>>,
        /// Event-form extra keys per block and tokens, for native re-keying at apply time
        /// (the parent's router key is only known then).
        tokens: &'a [u32],
        extra: Vec<Option<Vec<ExtraKey>>>,
    },
    Remove {
        tier: Tier,
        engine: Vec<u64>,
    },
    Clear,
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
    pub fn apply_vllm_batch(&self, name: &str, payload: &[u8]) -> Result<ApplyReport> {
        let batch = crate::events::vllm::decode(payload)?;
        self.apply_events(name, &batch)
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
        let result = crate::events::vllm::decode(payload)
            .and_then(|batch| self.apply_inner(name, &batch, Some((publisher, seq))));
        if result.is_err() {
            let _batch = self.apply_lock.lock();
            self.streams.lock().insert(publisher.to_string(), seq);
        }
        result
    }

    /// Applies a decoded batch for worker `name` at the batch's data-parallel rank. The
    /// whole batch is validated first; on any error nothing is applied.
    pub fn apply_events(&self, name: &str, batch: &KvEventBatch) -> Result<ApplyReport> {
        self.apply_inner(name, batch, None)
    }

    fn apply_inner(
        &self,
        name: &str,
        batch: &KvEventBatch,
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
                let _ = self.add_worker(name, rank);
                self.worker(name, rank)?
            }
            None => return Err(Error::UnknownWorker(key.to_string())),
        };
        let mut report = ApplyReport::default();
        let ops = match self.validate(batch, &mut report) {
            Ok(ops) => ops,
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
        self.apply_ops(&worker, ops, &mut report, stream, ts_ms);
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
            c.skipped_fields += u64::from(batch.skipped_fields);
            c.skipped_events += u64::from(batch.skipped_events);
            c.last_event_ts = batch.ts;
        }
        self.metrics.event_batches.fetch_add(1, Ordering::Relaxed);
        Ok(report)
    }

    /// Checks every event and turns it into an operation, touching no state.
    fn validate<'a>(
        &self,
        batch: &'a KvEventBatch,
        report: &mut ApplyReport,
    ) -> Result<Vec<Op<'a>>> {
        let bs = self.cfg.block_size;
        let vllm = self.cfg.hash_algo.is_vllm();
        let mut ops = Vec::with_capacity(batch.events.len());
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
                    let engine: Vec<u64> = s.block_hashes.iter().map(|h| h.to_u64()).collect();
                    let parent = s.parent_block_hash.as_ref().map(|h| h.to_u64());
                    let placeholder = s.is_placeholder();
                    if !placeholder && s.token_ids.len() != engine.len() * bs {
                        return Err(Error::invalid(format!(
                            "event {i}: {} token ids for {} blocks of {bs}",
                            s.token_ids.len(),
                            engine.len()
                        )));
                    }
                    if let Some(v) = self.cfg.vocab_size {
                        if let Some(t) = s.token_ids.iter().find(|&&t| t >= v) {
                            return Err(Error::invalid(format!(
                                "event {i}: token id {t} outside the vocabulary (size {v})"
                            )));
                        }
                    }
                    let extra: Vec<Option<Vec<ExtraKey>>> = match &s.extra_keys {
                        None => Vec::new(),
                        Some(list) => list
                            .iter()
                            .map(|e| match e {
                                None => None,
                                Some(Value::Array(a)) => {
                                    a.iter().map(to_extra_key).collect::<Option<Vec<_>>>()
                                }
                                Some(v) => to_extra_key(v).map(|k| vec![k]),
                            })
                            .collect(),
                    };
                    if vllm {
                        if self.cfg.verify_engine_hashes
                            && parent.is_none()
                            && !placeholder
                            && s.lora_name.is_none()
                            && extra.iter().all(Option::is_none)
                        {
                            let mut mine = Vec::new();
                            self.hasher.block_keys(
                                &s.token_ids,
                                &RequestExtras::default(),
                                &mut mine,
                            );
                            report.hashes_verified += engine.len() as u32;
                            if mine != engine {
                                let bad = mine.iter().zip(&engine).filter(|(a, b)| a != b).count();
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
                            engine,
                            keys: None,
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
                            engine,
                            keys: Some(Vec::new()),
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
                    ops.push(Op::Remove {
                        tier,
                        engine: r.block_hashes.iter().map(|h| h.to_u64()).collect(),
                    });
                }
                KvEvent::AllBlocksCleared => ops.push(Op::Clear),
            }
        }
        Ok(ops)
    }

    /// Applies validated operations.
    ///
    /// Batches are serialized by `apply_lock` (which [`snapshot`](Self::snapshot) also
    /// takes, so a snapshot never sees half a batch or a stream position that does not
    /// match the index), but the index write lock is taken per chunk of at most
    /// [`APPLY_CHUNK`] blocks, and native re-keying hashes tokens outside it, so a route
    /// never waits behind more than one chunk of one batch.
    fn apply_ops(
        &self,
        worker: &Arc<WorkerState>,
        ops: Vec<Op<'_>>,
        report: &mut ApplyReport,
        stream: Option<(&str, u64)>,
        ts_ms: u64,
    ) {
        let id = worker.id;
        let vllm = self.cfg.hash_algo.is_vllm();
        let _batch = self.apply_lock.lock();
        if !self.is_registered(worker) {
            return; // removed while the batch was validated; its id may be reused
        }
        if self.cfg.mode == Mode::Hybrid && !worker.has_events.swap(true, Ordering::Relaxed) {
            // Events win from now on: drop the predictions for this worker.
            self.index.write().clear_worker(id);
        } else {
            worker.has_events.store(true, Ordering::Relaxed);
        }
        let mut keys = Vec::new();
        for op in ops {
            report.events += 1;
            match op {
                Op::Store { tier, parent, engine, keys: rekey, tokens, extra } => {
                    if rekey.is_some() {
                        let parent_key =
                            parent.map(|p| self.index.read().engine_key(id, p).unwrap_or(p));
                        self.hasher.native_keys_from(parent_key, tokens, &extra, &mut keys);
                    }
                    for (c, chunk) in engine.chunks(APPLY_CHUNK).enumerate() {
                        let start = c * APPLY_CHUNK;
                        let chunk_parent = if c == 0 { parent } else { Some(engine[start - 1]) };
                        let mut index = self.index.write();
                        let r = if rekey.is_some() {
                            let ks = &keys[start..start + chunk.len()];
                            index.store_mapped(id, tier, chunk_parent, chunk, ks)
                        } else {
                            index.store(id, tier, chunk_parent, chunk)
                        };
                        drop(index);
                        if let Ok(r) = r {
                            report.blocks_stored += r.blocks;
                            report.orphans += u32::from(r.orphan);
                        }
                        // Predicted residency: these blocks are now known, not predicted.
                        let ks =
                            if rekey.is_some() { &keys[start..start + chunk.len()] } else { chunk };
                        self.confirm_predictions(worker, ks, ts_ms);
                    }
                }
                Op::Remove { tier, engine } => {
                    for chunk in engine.chunks(APPLY_CHUNK) {
                        let mut index = self.index.write();
                        let r = if vllm {
                            index.remove(id, tier, chunk)
                        } else {
                            index.remove_mapped(id, tier, chunk)
                        };
                        drop(index);
                        report.blocks_removed += r.removed;
                        report.unknown_removals += r.unknown;
                    }
                }
                Op::Clear => {
                    self.index.write().clear_worker(id);
                    self.overlay.write().clear_worker(id.0);
                }
            }
        }
        if let Some((publisher, seq)) = stream {
            self.streams.lock().insert(publisher.to_string(), seq);
        }
    }
}
