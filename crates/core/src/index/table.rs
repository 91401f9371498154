//! The key table: block key -> location `(node, offset)`.
//!
//! An open-addressing hash table in groups of seven slots, one group per 64-byte cache
//! line: an 8-byte control word (the slots' 1-byte tags, 8 bits of the key's hash with
//! 0 = empty, and the group's overflow count, the number of keys whose probe sequence
//! passed over the group because it was full) and the seven 8-byte locations. Every
//! operation on a key touches one line per group probed (usually one): the tags it waits
//! for and the location it then reads or writes come together, and the line is a
//! function of the key alone, so callers prefetch it a run of keys ahead. (An earlier
//! layout kept the control words in an array of their own, so that they would stay
//! cached; but a store or removal then waited for a second line, the location, which in
//! W1 cost removals about 2.5x.)
//!
//! Overflow counts are exact (decremented on removal), so there are no tombstones and
//! removals never lengthen later probes (a SwissTable marks removed slots deleted when
//! their group was ever full, and reads the group before a slot to decide).
//!
//! Keys are not stored: a location is checked by reading the key from its node (the
//! caller passes `key_at`), which keeps the table at about 9.1 bytes per slot. So that a
//! tag that matches by chance (1 in 255 per occupied slot) rarely costs that read, a
//! stored offset below 2^24 carries seven more bits of the key's hash in its top byte
//! (offsets are below 2^31; larger ones, up to 2^31, are stored plainly and always read). Callers
//! prefetch the groups of a whole run of keys before they touch them, so that the misses
//! of a run overlap.
//!
//! Growth does not rehash the table's entries (that needs the key of every entry, one
//! random read each): the index rebuilds the table from its nodes, whose keys it reads in
//! order ([`KeyTable::with_room`] and [`KeyTable::insert_new`]). The group count is a
//! prime (the home group comes from a multiply, so any count works), which lets the table
//! grow by 1.5x rather than 2x and lets every probe stride reach every group.

use super::tree::{mix, Loc};

/// Slots per group.
const SLOTS: usize = 7;
// Tags are bytes 0-6 of a control word; byte 7 is the overflow count.
const LOW: u64 = 0x0001_0101_0101_0101;
const HIGH: u64 = 0x0080_8080_8080_8080;
const SEVEN: u64 = 0x7F7F_7F7F_7F7F_7F7F;
const OVER_ONE: u64 = 1 << 56;

/// One group, one cache line: the control word (seven tags and the overflow count) and
/// the seven locations.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Group {
    tags: u64,
    slots: [Loc; SLOTS],
}

const EMPTY_GROUP: Group = Group { tags: 0, slots: [Loc { node: 0, off: 0 }; SLOTS] };

/// Tag `j` of a group's tag word.
#[inline]
fn tag_at(tags: u64, j: usize) -> u8 {
    (tags >> (8 * j)) as u8
}

/// The zero bytes among bytes 0-6 of `x`, exactly: bit 8 * j + 7 for each zero byte
/// `j` (no carry crosses a byte, so there are no false positives).
#[inline]
fn zero_bytes(x: u64) -> u64 {
    !(((x & SEVEN).wrapping_add(SEVEN)) | x | SEVEN) & HIGH
}

/// Slots whose tag equals `tag`, exactly (a bit at 8 * j + 7 per slot `j`).
#[inline]
fn candidates(tags: u64, tag: u8) -> u64 {
    zero_bytes(tags ^ (u64::from(tag) * LOW))
}

/// Empty slots, exactly.
#[inline]
fn free(tags: u64) -> u64 {
    zero_bytes(tags)
}

/// The overflow count of a control word (saturating: a saturated count is never
/// decremented, so it may be too high, never too low).
#[inline]
fn over(tags: u64) -> u64 {
    tags >> 56
}

/// The tag of a hash: its low 8 bits (the group comes from the high bits), 0 (which
/// marks an empty slot) made 1. All 8 bits, not 7 and an "occupied" bit: a new key's
/// tag matches some other key's by chance half as often, and each such match costs
/// reads of a node and its key, two misses in a large index.
#[inline]
fn tag_of(h: u64) -> u8 {
    let t = h as u8;
    t | u8::from(t == 0)
}

/// Set in a stored offset that carries seven more bits of the key's hash (bits 24-30)
/// above a 24-bit offset. Offsets of 2^24 or more are stored plainly (below 2^31).
const EXTRA: u32 = 1 << 31;
const OFF_BITS: u32 = (1 << 24) - 1;

/// Seven bits of the hash that neither the tag (bits 0-7) nor, in practice, the home
/// group (the high bits) uses.
#[inline]
fn extra_of(h: u64) -> u32 {
    ((h >> 8) & 0x7F) as u32
}

/// A location as stored for a key of hash `h`: an offset below 2^24 carries
/// [`extra_of`]`(h)`, so that a tag matching by chance is almost always rejected without
/// reading the key from its node (two dependent misses in a large index).
#[inline]
fn pack(loc: Loc, h: u64) -> Loc {
    debug_assert!(loc.off < EXTRA, "node offset {} out of range", loc.off);
    if loc.off <= OFF_BITS {
        Loc { node: loc.node, off: EXTRA | extra_of(h) << 24 | loc.off }
    } else {
        loc
    }
}

/// The location of a stored one.
#[inline]
fn unpack(s: Loc) -> Loc {
    if s.off & EXTRA != 0 {
        Loc { node: s.node, off: s.off & OFF_BITS }
    } else {
        s
    }
}

/// False when the stored location `s` certainly belongs to another key than one of
/// hash `h`.
#[inline]
fn may_be(s: Loc, h: u64) -> bool {
    s.off & EXTRA == 0 || (s.off >> 24) & 0x7F == extra_of(h)
}

/// The largest share of slots in use before the table grows.
const MAX_LOAD: (usize, usize) = (17, 20);
/// Groups of a key's probe sequence that [`KeyTable::prefetch_absent`] loads. Chosen on
/// W1's churn (new chains stored into a table at load 0.83): per 64-key store, 2 groups
/// 2.75 µs, 3 groups 1.86 µs, 4 groups 1.70 µs (medians, AMD EPYC Zen 5); the absent
/// key's probe ends at the first group nobody passed over, which at that load is the
/// third or later in about one probe in four.
const ABSENT_GROUPS: usize = 4;
/// A table grows to hold this many times the keys it must hold.
const GROWTH: (usize, usize) = (3, 2);

/// True when `n` is prime (trial division; `n` is a group count, at most about 10^9).
fn is_prime(n: usize) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 || n % 3 == 0 {
        return false;
    }
    let mut d = 5;
    while d * d <= n {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

/// Starts loading the cache line at `p` (a hint: no effect on results).
#[inline]
fn prefetch_line<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch never faults and has no effect on memory; the pointer comes
        // from a reference besides.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((p as *const T).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = p;
    }
}

/// A vector of `n` copies of `fill`. On Linux, a large one asks the kernel for huge pages
/// (`madvise(MADV_HUGEPAGE)`, before its memory is first touched): the table is read at
/// random, and with 4 KiB pages nearly every probe of a table of hundreds of megabytes
/// also misses the TLB. Only a hint: without it, or where it is refused, nothing changes
/// but the speed.
fn huge_vec<T: Copy>(n: usize, fill: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let bytes = n * std::mem::size_of::<T>();
        if bytes >= 4 << 20 {
            let start = v.as_ptr() as usize;
            let a = start.next_multiple_of(PAGE);
            let b = (start + bytes) / PAGE * PAGE;
            if b > a {
                // SAFETY: [a, b) lies inside the allocation just made for `v`, which is
                // not yet read or written; MADV_HUGEPAGE changes no contents, and its
                // result is ignored (it is a hint).
                unsafe {
                    libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    v.resize(n, fill);
    v
}

/// The key table. See the [module documentation](self).
#[derive(Clone, Debug, Default)]
pub(super) struct KeyTable {
    groups: Vec<Group>,
    len: usize,
}

impl KeyTable {
    /// Most keys a table of `groups` groups holds.
    #[inline]
    fn max_len(groups: usize) -> usize {
        groups * SLOTS * MAX_LOAD.0 / MAX_LOAD.1
    }

    /// An empty table with room for `n` keys and a margin: its group count is the first
    /// prime at or above what holds `n * 3 / 2` keys, so that it is not full again soon.
    pub(super) fn with_room(n: usize) -> Self {
        if n == 0 {
            return Self::default();
        }
        let want = n * GROWTH.0 / GROWTH.1 + 1;
        let mut groups = (want * MAX_LOAD.1).div_ceil(SLOTS * MAX_LOAD.0).max(2);
        while !is_prime(groups) {
            groups += 1;
        }
        KeyTable { groups: huge_vec(groups, EMPTY_GROUP), len: 0 }
    }

    /// Keys held.
    #[inline]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// How many more keys fit before the table must be rebuilt larger.
    #[inline]
    pub(super) fn room(&self) -> usize {
        Self::max_len(self.groups.len()).saturating_sub(self.len)
    }

    /// Heap bytes.
    pub(super) fn allocation_size(&self) -> usize {
        self.groups.capacity() * std::mem::size_of::<Group>()
    }

    /// The home group of hash `h` (from its high bits, by a multiply: any group count).
    #[inline]
    fn home(&self, h: u64) -> usize {
        ((u128::from(h) * self.groups.len() as u128) >> 64) as usize
    }

    /// The group after `i` in the probe sequence of `tag` (double hashing: keys that
    /// share a home group go on to different groups, so overflow does not cluster). The
    /// group count is prime, so every stride visits every group.
    #[inline]
    fn next(&self, i: usize, tag: u8) -> usize {
        let n = self.groups.len();
        // Any step in 1..n works (n is prime); skip the division for all but tiny tables.
        let t = usize::from(tag);
        let step = if n > 256 { 1 + t } else { 1 + t % (n - 1) };
        let j = i + step;
        if j >= n {
            j - n
        } else {
            j
        }
    }

    /// Starts loading the first `N` groups of `key`'s probe sequence into the cache (each
    /// one line: control word and locations). The three prefetches below are this with
    /// the depth their operation reads.
    #[inline]
    fn prefetch_probe<const N: usize>(&self, key: u64) {
        if self.groups.is_empty() {
            return;
        }
        let h = mix(key);
        let mut g = self.home(h);
        prefetch_line(&self.groups[g]);
        for _ in 1..N {
            g = self.next(g, tag_of(h));
            prefetch_line(&self.groups[g]);
        }
    }

    /// Starts loading the home group of `key`: what a lookup or removal of a present key
    /// reads.
    #[inline]
    pub(super) fn prefetch(&self, key: u64) {
        self.prefetch_probe::<1>(key);
    }

    /// Starts loading `key`'s first two groups: what [`insert_new`](Self::insert_new)
    /// (the rebuild) reads. It stops at the first group with a free slot: at the loads
    /// the table runs at, about three probes in ten go on to a second group, which would
    /// otherwise be a miss of its own after the first.
    #[inline]
    pub(super) fn prefetch_insert(&self, key: u64) {
        self.prefetch_probe::<2>(key);
    }

    /// Starts loading the first [`ABSENT_GROUPS`] groups of `key`'s probe sequence: what
    /// [`insert_absent`](Self::insert_absent) reads for a key that is not in the table.
    /// Its probe only ends at a group that no key passed over, and at the loads the
    /// table runs at (up to 0.85) that is often the third group or later: W1's churn,
    /// storing new chains into a full index, spent over half its store time waiting on
    /// those later groups while only two were prefetched (see `docs/benchmarks.md`).
    #[inline]
    pub(super) fn prefetch_absent(&self, key: u64) {
        self.prefetch_probe::<ABSENT_GROUPS>(key);
    }

    /// The slot of group `i` (whose control word is `t`) that holds `key`, if any.
    #[inline(always)]
    fn slot_of(
        &self,
        i: usize,
        t: u64,
        tag: u8,
        h: u64,
        key: u64,
        key_at: &impl Fn(Loc) -> u64,
    ) -> Option<usize> {
        let mut m = candidates(t, tag);
        while m != 0 {
            let j = (m.trailing_zeros() / 8) as usize;
            m &= m - 1;
            let s = self.groups[i].slots[j];
            if may_be(s, h) && key_at(unpack(s)) == key {
                return Some(j);
            }
        }
        None
    }

    /// Puts `loc` (of a key with hash `h` and tag `tag`) in a free slot of group `i`.
    #[inline(always)]
    fn place(&mut self, i: usize, tag: u8, h: u64, loc: Loc) {
        let j = (free(self.groups[i].tags).trailing_zeros() / 8) as usize;
        self.groups[i].tags |= u64::from(tag) << (8 * j);
        self.groups[i].slots[j] = pack(loc, h);
        self.len += 1;
    }

    /// The group and slot of `key`, if present, and the number of groups probed before.
    #[inline]
    fn position(
        &self,
        key: u64,
        h: u64,
        key_at: impl Fn(Loc) -> u64,
    ) -> Option<(usize, usize, usize)> {
        if self.groups.is_empty() {
            return None;
        }
        let tag = tag_of(h);
        let mut i = self.home(h);
        for k in 0..self.groups.len() {
            let t = self.groups[i].tags;
            if let Some(j) = self.slot_of(i, t, tag, h, key, &key_at) {
                return Some((i, j, k));
            }
            if over(t) == 0 {
                return None;
            }
            i = self.next(i, tag);
        }
        None
    }

    /// The location of `key`, if present.
    #[inline]
    pub(super) fn find(&self, key: u64, key_at: impl Fn(Loc) -> u64) -> Option<Loc> {
        self.position(key, mix(key), key_at).map(|(i, j, _)| unpack(self.groups[i].slots[j]))
    }

    /// Points `key` at `loc`; false when `key` is absent.
    #[inline]
    pub(super) fn set(&mut self, key: u64, loc: Loc, key_at: impl Fn(Loc) -> u64) -> bool {
        let h = mix(key);
        match self.position(key, h, key_at) {
            Some((i, j, _)) => {
                self.groups[i].slots[j] = pack(loc, h);
                true
            }
            None => false,
        }
    }

    /// Adds `key` at `loc`. The key must be absent and [`room`](Self::room) not zero.
    #[inline]
    pub(super) fn insert_new(&mut self, key: u64, loc: Loc) {
        debug_assert!(self.room() > 0, "insert into a full key table");
        let h = mix(key);
        let tag = tag_of(h);
        let mut i = self.home(h);
        while free(self.groups[i].tags) == 0 {
            if over(self.groups[i].tags) != 0xFF {
                self.groups[i].tags += OVER_ONE;
            }
            i = self.next(i, tag);
        }
        self.place(i, tag, h, loc);
    }

    /// Adds `key` at `loc` unless it is present: one pass over its probe sequence that
    /// both looks for the key and notes the first group with a free slot (what
    /// [`find`](Self::find) then [`insert_new`](Self::insert_new) do in two). Returns
    /// false, changing nothing, when the key is present. [`room`](Self::room) must not
    /// be zero.
    #[inline]
    pub(super) fn insert_absent(
        &mut self,
        key: u64,
        loc: Loc,
        key_at: impl Fn(Loc) -> u64,
    ) -> bool {
        let h = mix(key);
        let tag = tag_of(h);
        let home = self.home(h);
        let mut i = home;
        // The first group with a free slot, and how many full groups the probe passed
        // before it.
        let mut target = usize::MAX;
        let mut passed = 0usize;
        for _ in 0..self.groups.len() {
            let t = self.groups[i].tags;
            if self.slot_of(i, t, tag, h, key, &key_at).is_some() {
                return false;
            }
            if target == usize::MAX {
                if free(t) != 0 {
                    target = i;
                } else {
                    passed += 1;
                }
            }
            if over(t) == 0 {
                break;
            }
            i = self.next(i, tag);
        }
        debug_assert!(self.room() > 0, "insert into a full key table");
        if target == usize::MAX {
            // Every group up to the end of the key's probe sequence is full: go on to the
            // first free slot (the table has room, so there is one).
            i = self.next(i, tag);
            while free(self.groups[i].tags) == 0 {
                passed += 1;
                i = self.next(i, tag);
            }
            target = i;
        }
        let mut x = home;
        for _ in 0..passed {
            if over(self.groups[x].tags) != 0xFF {
                self.groups[x].tags += OVER_ONE;
            }
            x = self.next(x, tag);
        }
        debug_assert_eq!(x, target);
        self.place(target, tag, h, loc);
        true
    }

    /// Every location held, in table order.
    pub(super) fn entries(&self) -> impl Iterator<Item = Loc> + '_ {
        self.groups.iter().flat_map(|g| {
            (0..SLOTS).filter(move |&j| tag_at(g.tags, j) != 0).map(move |j| unpack(g.slots[j]))
        })
    }

    /// Removes `key`; returns its location, or `None` when it was absent.
    #[inline]
    pub(super) fn remove(&mut self, key: u64, key_at: impl Fn(Loc) -> u64) -> Option<Loc> {
        let h = mix(key);
        let (i, j, k) = self.position(key, h, key_at)?;
        self.groups[i].tags &= !(0xFF << (8 * j));
        let loc = unpack(self.groups[i].slots[j]);
        // It passed over the `k` groups before it.
        let tag = tag_of(h);
        let mut x = self.home(h);
        for _ in 0..k {
            if over(self.groups[x].tags) != 0xFF {
                self.groups[x].tags -= OVER_ONE;
            }
            x = self.next(x, tag);
        }
        self.len -= 1;
        Some(loc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys are their own "node" here: `Loc { node: key as u32, off: key >> 32 }`.
    fn loc(k: u64) -> Loc {
        Loc { node: k as u32, off: (k >> 32) as u32 }
    }
    fn key_at(l: Loc) -> u64 {
        u64::from(l.node) | u64::from(l.off) << 32
    }

    /// Locations come back as given whether their offset carries extra hash bits (below
    /// 2^24) or not (above), through find, set and remove.
    #[test]
    fn locations_round_trip_with_and_without_extra_hash_bits() {
        let offs = [0u32, 1, OFF_BITS, OFF_BITS + 1, EXTRA - 1];
        let mut t = KeyTable::with_room(100);
        let mut at = std::collections::HashMap::new();
        for k in 0..50u64 {
            let l = Loc { node: k as u32, off: offs[k as usize % offs.len()] };
            t.insert_new(k, l);
            at.insert(l, k);
        }
        let key_at = |l: Loc| at[&l];
        for k in 0..50u64 {
            assert_eq!(
                t.find(k, key_at),
                Some(Loc { node: k as u32, off: offs[k as usize % offs.len()] })
            );
        }
        assert!(!t.insert_absent(7, Loc { node: 7, off: 3 }, key_at));
        let moved = Loc { node: 999, off: OFF_BITS + 5 };
        assert!(t.set(3, moved, key_at));
        let mut at2 = at.clone();
        at2.insert(moved, 3);
        let key_at2 = |l: Loc| at2[&l];
        assert_eq!(t.find(3, key_at2), Some(moved));
        assert_eq!(t.remove(4, key_at2), Some(Loc { node: 4, off: offs[4] }));
        assert_eq!(t.find(4, key_at2), None);
        let mut all: Vec<Loc> = t.entries().collect();
        all.sort_by_key(|l| (l.node, l.off));
        assert_eq!(all.len(), 49);
        assert!(all.contains(&moved));
    }

    /// The byte tests are exact for every tag value, including ones next to zero bytes
    /// (where the usual borrow trick reports false zeros).
    #[test]
    fn byte_tests_are_exact() {
        let mut rng = 7u64;
        for _ in 0..100_000 {
            rng = crate::rng::splitmix64(rng);
            // Bytes drawn mostly from {0, 1, tag, 0x80, 0xFF, random} to hit the edges.
            let tag = tag_of(rng >> 13);
            let mut w = 0u64;
            for j in 0..8 {
                let r = (rng >> (j * 3)) & 7;
                let b = [0u64, 1, u64::from(tag), 0x80, 0xFF, (rng >> 40) & 0xFF, 0, 2][r as usize];
                w |= b << (8 * j);
            }
            let (mut want_free, mut want_tag) = (0u64, 0u64);
            for j in 0..SLOTS {
                let b = tag_at(w, j);
                if b == 0 {
                    want_free |= 0x80 << (8 * j);
                }
                if b == tag {
                    want_tag |= 0x80 << (8 * j);
                }
            }
            assert_eq!(free(w), want_free, "{w:#x}");
            assert_eq!(candidates(w, tag), want_tag, "{w:#x} tag {tag:#x}");
            assert_ne!(tag, 0);
        }
    }

    /// Against a `HashSet` through growth, removals and re-insertions at full load, with
    /// many keys sharing a home chunk (small tables, so chains of overflow form).
    #[test]
    fn agrees_with_a_set_under_heavy_load_and_removals() {
        let mut rng = 0x1234_5678u64;
        let mut next = || {
            rng = crate::rng::splitmix64(rng);
            rng % 5000
        };
        let mut set = std::collections::HashSet::new();
        let mut t = KeyTable::default();
        for step in 0..200_000 {
            let k = next();
            if set.contains(&k) {
                assert_eq!(t.remove(k, key_at), Some(loc(k)), "step {step}");
                set.remove(&k);
            } else {
                assert_eq!(t.find(k, key_at), None);
                if t.room() == 0 {
                    let mut bigger = KeyTable::with_room(t.len() + 1);
                    for &s in &set {
                        bigger.insert_new(s, loc(s));
                    }
                    t = bigger;
                }
                if step % 2 == 0 {
                    t.insert_new(k, loc(k));
                } else {
                    assert!(t.insert_absent(k, loc(k), key_at), "step {step}");
                }
                set.insert(k);
            }
            if step % 3 == 0 {
                // A present key is never added twice.
                if let Some(&s) = set.iter().next() {
                    let len = t.len();
                    assert!(!t.insert_absent(s, loc(s), key_at));
                    assert_eq!(t.len(), len);
                }
            }
            assert_eq!(t.len(), set.len());
            if step % 10_000 == 0 {
                for x in 0..5000 {
                    assert_eq!(t.find(x, key_at).is_some(), set.contains(&x), "key {x}");
                }
            }
        }
        // Fill to the limit: every key still found.
        let mut t = KeyTable::with_room(1000);
        let n = t.room();
        for k in 0..n as u64 {
            t.insert_new(k, loc(k));
        }
        assert_eq!(t.room(), 0);
        for k in 0..n as u64 {
            assert_eq!(t.find(k, key_at), Some(loc(k)));
        }
        assert_eq!(t.find(n as u64, key_at), None);
        for k in 0..n as u64 {
            assert!(!t.insert_absent(k, loc(k), key_at), "present at full load: {k}");
        }
        for k in (0..n as u64).step_by(2) {
            assert!(t.remove(k, key_at).is_some());
        }
        for k in 0..n as u64 {
            assert_eq!(t.find(k, key_at).is_some(), k % 2 == 1);
        }
        assert!(t.set(1, loc(7), |l| if l == loc(7) { 1 } else { key_at(l) }));
    }
}
