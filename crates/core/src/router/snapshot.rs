//! Router snapshots: the index plus the worker names behind its ids and the event
//! publishers' stream positions, so a late router replica starts warm and asks for replay
//! from where the snapshot was taken.
//!
//! Format: `b"KVRSNAP\x01"`, a little-endian u32 length, a JSON header of that length
//! (`version`, `block_size`, `hash_algo`, `native_seed`, `hash_seed`, `workers` as
//! `[{name, dp_rank, id}]`, `streams` as `{publisher: last_seq}`), then the index snapshot
//! ([`PrefixIndex::snapshot`]).

use super::Router;
use crate::error::{Error, Result};
use crate::hash::HashAlgo;
use crate::index::PrefixIndex;
use crate::types::WorkerKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const MAGIC: &[u8; 8] = b"KVRSNAP\x01";

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
            version: 1,
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
        out
    }

    /// Replaces the index with a snapshot's. Workers named in the snapshot but unknown
    /// here are added; ids are renumbered to this router's. The snapshot must come from a
    /// router with the same block size and hash scheme. On error nothing changes.
    /// Returns the snapshot's stream positions (also recorded in this router).
    pub fn restore(&self, bytes: &[u8]) -> Result<BTreeMap<String, u64>> {
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(Error::Snapshot("not a kvroute router snapshot".into()));
        }
        let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let json = bytes
            .get(12..12 + len)
            .ok_or_else(|| Error::Snapshot("truncated snapshot header".into()))?;
        let header: Header = serde_json::from_slice(json)
            .map_err(|e| Error::Snapshot(format!("snapshot header: {e}")))?;
        if header.version != 1 {
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
        let mut index = PrefixIndex::restore(&bytes[12 + len..], self.cfg.index.clone())?;
        // Make sure every worker exists, then renumber.
        for w in &header.workers {
            if self.registry.read().get(&WorkerKey::new(&w.name, w.dp_rank)).is_none() {
                match self.add_worker(&w.name, w.dp_rank) {
                    Ok(_) | Err(Error::WorkerExists(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let mut map = hashbrown::HashMap::new();
        {
            let reg = self.registry.read();
            for w in &header.workers {
                let id = reg
                    .by_key
                    .get(&WorkerKey::new(&w.name, w.dp_rank))
                    .ok_or_else(|| Error::Snapshot(format!("worker {} vanished", w.name)))?;
                if map.insert(w.id, id.0).is_some() {
                    return Err(Error::Snapshot(format!("worker id {} appears twice", w.id)));
                }
            }
        }
        index.remap_workers(&map).map_err(|e| Error::Snapshot(e.to_string()))?;
        {
            let _batch = self.apply_lock.lock();
            *self.index.write() = index;
        }
        {
            let reg = self.registry.read();
            for w in reg.slots.iter().flatten() {
                if header.workers.iter().any(|s| s.name == w.key.name && s.dp_rank == w.key.dp_rank)
                {
                    w.has_events.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        let mut streams = self.streams.lock();
        streams.extend(header.streams.iter().map(|(k, v)| (k.clone(), *v)));
        Ok(header.streams)
    }
}
