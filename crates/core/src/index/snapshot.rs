//! Snapshot and restore of a [`PrefixIndex`] to bytes.
//!
//! Format version 2, all integers little-endian:
//!
//! ```text
//! magic   b"KVRIDX\0\x02"
//! u64     node count N (root excluded), nodes in pre-order:
//!           u32 parent ordinal (0 = root, i = the i-th node written, 1-based)
//!           u32 key count K (>= 1), K x u64 keys
//!           u32 holder count H, H x (u32 worker, 3 x u16 refs), sorted by worker
//! u64     orphan count, each (u64 first key, u64 declared parent)
//! u32     engine-map count, each: u32 worker, u64 entries E, E x (u64 engine, u64 key)
//! u64 x 3 counters: orphan stores, unknown removals, evictions
//! u64     checksum: XXH3-64 of every byte before it (magic included)
//! ```
//!
//! Restore first checks the magic and the checksum over the whole snapshot, so a
//! corrupted snapshot (a flipped bit anywhere, a truncation, bytes appended) is rejected
//! before any of it is parsed. Version 1 (the same layout without the checksum) is not
//! read: it is rejected with an error that says so (take a new snapshot).
//!
//! Restore then validates everything (lengths against the remaining bytes, parent ordinals,
//! duplicate keys, holder order, zero reference counts) and builds a fresh index, so a
//! corrupt snapshot yields [`Error::Snapshot`] and never a half-built index.

use super::tree::{Holder, KeyMap, Loc, PrefixIndex, MAX_WORKER, ROOT};
use super::IndexConfig;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"KVRIDX\0\x02";
/// Version 1: no checksum; recognized only to say why it is refused.
const MAGIC_V1: &[u8; 8] = b"KVRIDX\0\x01";

/// Bytes of the checksum trailer that ends index and router snapshots.
pub(crate) const CHECKSUM_LEN: usize = 8;

/// Appends the checksum trailer (XXH3-64 of everything in `out` so far, little-endian).
pub(crate) fn seal(out: &mut Vec<u8>) {
    let sum = xxhash_rust::xxh3::xxh3_64(out);
    out.extend_from_slice(&sum.to_le_bytes());
}

/// Checks the checksum trailer of sealed `bytes` and returns what it covers (`what` names
/// the kind of snapshot in the error).
pub(crate) fn unseal<'a>(bytes: &'a [u8], what: &str) -> Result<&'a [u8]> {
    let Some(body_len) = bytes.len().checked_sub(CHECKSUM_LEN) else {
        return Err(Error::Snapshot(format!("truncated {what} snapshot ({} bytes)", bytes.len())));
    };
    let (body, trailer) = bytes.split_at(body_len);
    let stored = u64::from_le_bytes(trailer.try_into().expect("8 bytes"));
    let actual = xxhash_rust::xxh3::xxh3_64(body);
    if stored != actual {
        return Err(Error::Snapshot(format!(
            "{what} snapshot is corrupted: checksum {actual:#018x} over {body_len} bytes does \
             not match the stored {stored:#018x}"
        )));
    }
    Ok(body)
}

impl PrefixIndex {
    /// Serializes the whole index (tree, holders, engine mappings, orphans, counters),
    /// ending with a checksum over all of it.
    pub fn snapshot(&self) -> Vec<u8> {
        let stats_nodes = self.nodes.iter().skip(1).filter(|n| n.live).count();
        let mut out = Vec::with_capacity(64 + self.table.len() * 8 + stats_nodes * 24);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(stats_nodes as u64).to_le_bytes());
        // Pre-order walk with an explicit stack of (node, parent ordinal).
        let mut ordinal = 0u32;
        let mut stack: Vec<(u32, u32)> = Vec::new();
        let mut roots = self.nodes[ROOT as usize].children.nodes();
        roots.sort_unstable_by_key(|&n| self.nodes[n as usize].keys[0]);
        for r in roots.into_iter().rev() {
            stack.push((r, 0));
        }
        while let Some((n, parent_ord)) = stack.pop() {
            ordinal += 1;
            let node = &self.nodes[n as usize];
            out.extend_from_slice(&parent_ord.to_le_bytes());
            out.extend_from_slice(&(node.keys.len() as u32).to_le_bytes());
            for k in &node.keys {
                out.extend_from_slice(&k.to_le_bytes());
            }
            out.extend_from_slice(&(node.holders.len() as u32).to_le_bytes());
            for h in &node.holders {
                out.extend_from_slice(&h.worker.to_le_bytes());
                for r in h.refs {
                    out.extend_from_slice(&r.to_le_bytes());
                }
            }
            let mut kids = node.children.nodes();
            kids.sort_unstable_by_key(|&c| self.nodes[c as usize].keys[0]);
            for c in kids.into_iter().rev() {
                stack.push((c, ordinal));
            }
        }
        let orphans = self.orphan_entries();
        out.extend_from_slice(&(orphans.len() as u64).to_le_bytes());
        for (a, b) in orphans {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        let maps: Vec<(usize, &KeyMap<u64>)> =
            self.engine_maps.iter().enumerate().filter(|(_, m)| !m.is_empty()).collect();
        out.extend_from_slice(&(maps.len() as u32).to_le_bytes());
        for (w, m) in maps {
            out.extend_from_slice(&(w as u32).to_le_bytes());
            out.extend_from_slice(&(m.len() as u64).to_le_bytes());
            let mut pairs: Vec<(u64, u64)> = m.iter().map(|(&a, &b)| (a, b)).collect();
            pairs.sort_unstable();
            for (a, b) in pairs {
                out.extend_from_slice(&a.to_le_bytes());
                out.extend_from_slice(&b.to_le_bytes());
            }
        }
        for c in [self.orphan_stores, self.unknown_removals, self.evictions] {
            out.extend_from_slice(&c.to_le_bytes());
        }
        seal(&mut out);
        out
    }

    /// Rebuilds an index from [`snapshot`](Self::snapshot) bytes. The checksum is checked
    /// before anything is parsed; any corruption or inconsistency is an
    /// [`Error::Snapshot`].
    pub fn restore(bytes: &[u8], config: IndexConfig) -> Result<PrefixIndex> {
        if bytes.len() >= 8 && &bytes[..8] == MAGIC_V1 {
            return Err(Error::Snapshot(
                "index snapshot format version 1 (no checksum) is no longer read; take a new \
                 snapshot"
                    .into(),
            ));
        }
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(Error::Snapshot(
                "not a kvroute index snapshot (bad magic or unsupported version)".into(),
            ));
        }
        let bytes = unseal(bytes, "index")?;
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(8)? != MAGIC {
            return Err(Error::Snapshot(
                "not a kvroute index snapshot (bad magic or unsupported version)".into(),
            ));
        }
        let mut idx = PrefixIndex::new(config);
        let count = r.u64()?;
        // Each node needs at least 12 bytes: bound the count before allocating.
        if count > (r.remaining() / 12) as u64 {
            return Err(r.err("node count exceeds the snapshot size"));
        }
        let mut ids: Vec<u32> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let parent_ord = r.u32()? as usize;
            if parent_ord > ids.len() {
                return Err(r.err("parent ordinal refers to a later node"));
            }
            let parent = if parent_ord == 0 { ROOT } else { ids[parent_ord - 1] };
            let k = r.u32()? as usize;
            if k == 0 || k > r.remaining() / 8 {
                return Err(r.err("bad key count"));
            }
            let mut keys = Vec::with_capacity(k);
            for _ in 0..k {
                keys.push(r.u64()?);
            }
            let h = r.u32()? as usize;
            if h > r.remaining() / 10 {
                return Err(r.err("bad holder count"));
            }
            let mut holders: Vec<Holder> = Vec::with_capacity(h);
            for _ in 0..h {
                let worker = r.u32()?;
                let refs = [r.u16()?, r.u16()?, r.u16()?];
                if worker > MAX_WORKER {
                    return Err(r.err("worker id out of range"));
                }
                if refs == [0, 0, 0] {
                    return Err(r.err("holder with zero references"));
                }
                if holders.last().is_some_and(|p| p.worker >= worker) {
                    return Err(r.err("holders not sorted by worker"));
                }
                holders.push(Holder { worker, refs });
            }
            let id = idx.alloc_node(parent);
            for h in &holders {
                let w = h.worker as usize;
                if idx.worker_blocks.len() <= w {
                    idx.worker_blocks.resize(w + 1, 0);
                }
                idx.worker_blocks[w] += k as u64;
                idx.holder_blocks += k as u64;
            }
            let first = keys[0];
            // Room in the key table before the keys are in a node (see `reserve_keys`).
            idx.reserve_keys(k);
            idx.nodes[id as usize].keys = keys;
            idx.nodes[id as usize].holders = holders;
            for off in 0..k {
                let key = idx.nodes[id as usize].keys[off];
                if idx.lookup(key).is_some() {
                    return Err(r.err(format!("duplicate key {key:#x}")));
                }
                idx.insert_key(key, Loc { node: id, off: off as u32 });
            }
            idx.attach_child(parent, first, id);
            ids.push(id);
        }
        let orphans = r.u64()?;
        if orphans > (r.remaining() / 16) as u64 {
            return Err(r.err("orphan count exceeds the snapshot size"));
        }
        for _ in 0..orphans {
            let (first, parent) = (r.u64()?, r.u64()?);
            idx.add_orphan(first, parent);
        }
        let maps = r.u32()?;
        for _ in 0..maps {
            let w = r.u32()? as usize;
            let n = r.u64()?;
            if n > (r.remaining() / 16) as u64 {
                return Err(r.err("engine map size exceeds the snapshot size"));
            }
            if w > MAX_WORKER as usize {
                return Err(r.err("worker id out of range"));
            }
            if idx.engine_maps.len() <= w {
                idx.engine_maps.resize_with(w + 1, KeyMap::default);
            }
            let m = &mut idx.engine_maps[w];
            m.reserve(n as usize);
            for _ in 0..n {
                let (e, k) = (r.u64()?, r.u64()?);
                m.insert(e, k);
            }
        }
        idx.orphan_stores = r.u64()?;
        idx.unknown_removals = r.u64()?;
        idx.evictions = r.u64()?;
        if r.remaining() != 0 {
            return Err(r.err("trailing bytes"));
        }
        Ok(idx)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn err(&self, what: impl std::fmt::Display) -> Error {
        Error::Snapshot(format!("{what} at byte {}", self.pos))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.err("truncated snapshot"));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}
