//! Router snapshots: the index plus the worker names behind its ids and the event
//! publishers' stream positions, so a late router replica starts warm and asks for replay
//! from where the snapshot was taken.
//!
//! Format version 2: `b"KVRSNAP\x02"`, a little-endian u32 length, a JSON header of that
//! length (`version`, `block_size`, `hash_algo`, `native_seed`, `hash_seed`, `workers` as
//! `[{name, dp_rank, id}]`, `streams` as `{publisher: last_seq}`), the index snapshot
//! ([`PrefixIndex::snapshot`], which carries its own checksum), then a little-endian u64
//! checksum: XXH3-64 of every byte before it. The checksum is checked before anything is
//! parsed, so a corrupted snapshot is rejected whole. Version 1 (`b"KVRSNAP\x01"`, no
//! checksum) is not read: it is rejected with an error that says so.
use super::{Router, WorkerState};
use crate::error::{Error, Result};
use crate::hash::HashAlgo;
use crate::index::snapshot::{seal, unseal};
use crate::index::PrefixIndex;
use crate::types::{WorkerId, WorkerKey};
use parking_lot::RwLockUpgradableReadGuard;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"KVRSNAP\x02";
const MAGIC_V1: &[u8; 8] = b"KVRSNAP\x01";
const VERSION: u32 = 2;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    version: u32,
    block_size: usize,
    hash_algo: HashAlgo,
    native_seed: u64,
    hash_seed: Option<String>,
    workers: Vec<SnapWorker>,
    streams: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapWorker {
    name: String,
    dp_rank: u32,
    id: u32,
}

impl Router {
    /// A cache model with the default capacity for a worker added by a restore (none in
    /// precise mode), as [`add_worker`](Self::add_worker) makes it.
    fn default_model(&self) -> Result<Option<crate::model::BlockPool>> {
        if self.cfg.mode == super::Mode::Precise {
            return Ok(None);
        }
        let blocks = self.cfg.capacity.num_gpu_blocks(self.cfg.block_size)?;
        Ok(Some(crate::model::BlockPool::new(blocks, self.cfg.block_size, true)?))
    }

    /// Serializes the index, the worker names and the stream positions.
    pub fn snapshot(&self) -> Vec<u8> {
        // No batch is half applied while we read (apply_lock), and the index read lock is
        // held while reading the registry so ids are consistent.
        let _batch = self.apply_lock.lock();
        let index = self.index.read();
        let workers = self
            .registry
            .read()
            .slots
            .iter()
            .flatten()
            .map(|w| SnapWorker { name: w.key.name.clone(), dp_rank: w.key.dp_rank, id: w.id.0 })
            .collect();
        let header = Header {
            version: VERSION,
            block_size: self.cfg.block_size,
            hash_algo: self.cfg.hash_algo,
            native_seed: self.cfg.native_seed,
            hash_seed: self.cfg.hash_seed.clone(),
            workers,
            streams: self.streams.lock().clone(),
        };
        let json = serde_json::to_vec(&header).expect("snapshot header serializes");
        let body = index.snapshot();
        let mut out = Vec::with_capacity(12 + json.len() + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&body);
        seal(&mut out);
        out
    }

    /// Replaces the index with a snapshot's. Workers named in the snapshot but unknown
    /// here are added; ids are renumbered to this router's. The snapshot must come from a
    /// router with the same block size and hash scheme. Returns the snapshot's stream
    /// positions (also recorded in this router).
    ///
    /// On error nothing changes: the checksum, the header and the whole index are checked,
    /// the new workers' ids are planned and the index is renumbered before any worker is
    /// added. The plan, the additions and the swap of the index happen under the lock that
    /// serializes event batches and worker removal's index cleanup, so a worker removed
    /// concurrently either is not in the plan (and is added back from the snapshot) or has
    /// its entries dropped from the restored index afterwards; a reused id never inherits
    /// a removed worker's entries.
    pub fn restore(&self, bytes: &[u8]) -> Result<BTreeMap<String, u64>> {
        if bytes.len() >= 8 && &bytes[..8] == MAGIC_V1 {
            return Err(Error::Snapshot(
                "router snapshot format version 1 (no checksum) is no longer read; take a new \
                 snapshot"
                    .into(),
            ));
        }
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(Error::Snapshot("not a kvroute router snapshot".into()));
        }
        let bytes = unseal(bytes, "router")?;
        if bytes.len() < 12 {
            return Err(Error::Snapshot("truncated router snapshot".into()));
        }
        let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let json = bytes
            .get(12..12usize.saturating_add(len))
            .ok_or_else(|| Error::Snapshot("truncated snapshot header".into()))?;
        let header: Header = serde_json::from_slice(json)
            .map_err(|e| Error::Snapshot(format!("snapshot header: {e}")))?;
        if header.version != VERSION {
            return Err(Error::Snapshot(format!(
                "unsupported snapshot version {}",
                header.version
            )));
        }
        if header.block_size != self.cfg.block_size
            || header.hash_algo != self.cfg.hash_algo
            || header.native_seed != self.cfg.native_seed
            || header.hash_seed != self.cfg.hash_seed
        {
            return Err(Error::Snapshot(format!(
                "snapshot was taken with block size {} and hash {} (seed {:?}/{}), this router \
                 uses {} and {} (seed {:?}/{})",
                header.block_size,
                header.hash_algo.name(),
                header.hash_seed,
                header.native_seed,
                self.cfg.block_size,
                self.cfg.hash_algo.name(),
                self.cfg.hash_seed,
                self.cfg.native_seed
            )));
        }
        let mut keys = hashbrown::HashSet::new();
        for w in &header.workers {
            if w.name.is_empty() {
                return Err(Error::Snapshot("snapshot names a worker with an empty name".into()));
            }
            if !keys.insert(WorkerKey::new(&w.name, w.dp_rank)) {
                return Err(Error::Snapshot(format!(
                    "worker {}/{} appears twice",
                    w.name, w.dp_rank
                )));
            }
        }
        let mut index = PrefixIndex::restore(&bytes[12 + len..], self.cfg.index.clone())?;

        // From here on: plan, renumber, then commit, all under apply_lock (event batches,
        // predictions and remove_worker's index cleanup wait) and with the registry
        // reserved against other writers (add/remove) while routes may still read it.
        let _batch = self.apply_lock.lock();
        let reg = self.registry.upgradable_read();
        let mut free = reg
            .slots
            .iter()
            .enumerate()
            .filter(|(i, s)| s.is_none() && !reg.retiring.contains(&WorkerId(*i as u32)))
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
            .into_iter()
            .chain(reg.slots.len()..);
        let mut map = hashbrown::HashMap::new();
        let mut added: Vec<Arc<WorkerState>> = Vec::new();
        for w in &header.workers {
            let key = WorkerKey::new(&w.name, w.dp_rank);
            let id = match reg.by_key.get(&key) {
                Some(&id) => id,
                None => {
                    let id = WorkerId(free.next().expect("unbounded") as u32);
                    if id.0 > crate::index::MAX_WORKER {
                        return Err(Error::invalid(format!(
                            "too many workers: restoring this snapshot needs worker ids above {}",
                            crate::index::MAX_WORKER
                        )));
                    }
                    added.push(Arc::new(WorkerState::new(
                        key,
                        id,
                        self.default_model()?,
                        self.initial_ttl_ms(),
                    )));
                    id
                }
            };
            if map.insert(w.id, id.0).is_some() {
                return Err(Error::Snapshot(format!("worker id {} appears twice", w.id)));
            }
        }
        index.remap_workers(&map).map_err(|e| Error::Snapshot(e.to_string()))?;

        // Commit: nothing below fails.
        let added_none = added.is_empty();
        let mut reg = RwLockUpgradableReadGuard::upgrade(reg);
        for state in added {
            let i = state.id.index();
            reg.by_key.insert(state.key.clone(), state.id);
            if i >= reg.slots.len() {
                reg.slots.resize(i + 1, None);
            }
            reg.slots[i] = Some(state);
        }
        if !added_none {
            reg.rebuild_names();
        }
        for w in reg.slots.iter().flatten() {
            if keys.contains(&w.key) {
                w.has_events.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        drop(reg);
        *self.index.write() = index;
        let mut streams = self.streams.lock();
        streams.extend(header.streams.iter().map(|(k, v)| (k.clone(), *v)));
        Ok(header.streams)
    }
}
