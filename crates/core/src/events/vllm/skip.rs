//! Finding the end of a msgpack array of unsigned ints without decoding its elements.
//!
//! A msgpack array of variable-width integers has to be walked element by element to find
//! where it ends: each element's length depends on its first byte (the marker), so a plain
//! walk is one chain of dependent loads (marker, then its length, then the next marker),
//! about 10 cycles per element whatever the loop looks like.
//!
//! [`skip_uints`] breaks the chain with SIMD where the CPU has AVX2 (detected at run
//! time; elsewhere it walks element by element). It looks at the payload in fixed 32-byte
//! windows (two 16-byte lanes), independent of where elements start, and computes for
//! every byte `i` of a lane, in parallel: where the next element would start if one
//! started at `i` (`i` + its length by marker: 1 for a positive fixint, 2, 3, 5 for
//! uint8/16/32; a byte that is no such marker points at itself), and then, by pointer
//! doubling (byte shuffles: 1, 2, 4, 8 and, only where needed, 16 elements), where the
//! walk from `i` leaves the lane and how many elements it passes. The low lane is composed
//! with the high one for the 5 possible entries, so the only serial step left is one
//! shift of a 64-bit word per window: the element that straddles into the next window
//! fixes where the walk enters it (0..4 bytes in). A walk that does not leave its window
//! (an unexpected marker, or the array's end inside it) is finished by the element-by-
//! element walk, which also takes anything near the end of the payload.
//!
//! Every implementation can be called by name ([`skip_uints_with`]), so that tests, the
//! fuzz target and the benchmarks run each path the CPU has, not only the dispatched one.
//!
//! Only the encodings msgspec writes for non-negative ints up to 2^32 are stepped over
//! here; everything else is left to the caller's decoder (which accepts the same values in
//! other encodings and builds the errors), so the result is the same as decoding.

/// Encoded length of a msgpack unsigned int that fits in u32, in the encodings msgspec
/// writes (positive fixint, uint8, uint16, uint32), by marker byte; 0 for any other byte.
pub(super) const U32_LEN: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x80 {
        t[i] = 1;
        i += 1;
    }
    t[0xcc] = 2;
    t[0xcd] = 3;
    t[0xce] = 5;
    t
};

/// Steps over at most `n` elements of `buf` from `pos`, each in one of the encodings of
/// [`U32_LEN`] and wholly inside `buf`. Returns the position after the last element
/// stepped over and how many they were: fewer than `n` when the next element has another
/// encoding or would run past the end of `buf`.
pub(super) fn skip_uints(buf: &[u8], pos: usize, n: usize) -> (usize, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2::skip(buf, pos, n) };
        }
    }
    skip_scalar(buf, pos, n, usize::MAX)
}

/// The names of the implementations of `skip_uints` (the token-id skip), for
/// [`skip_uints_with`].
pub const SKIP_PATHS: [&str; 2] = ["scalar", "avx2"];

/// `skip_uints` (the token-id skip) by the implementation named `path` (one of
/// [`SKIP_PATHS`]): steps over at most `n` msgpack uints from `pos`, returns where it
/// stopped and how many it passed; `None` when this CPU cannot run it. Tests, the fuzz
/// target and the benchmarks call every path explicitly, so each is exercised on a
/// machine that has it, not only the one the dispatch picks.
pub fn skip_uints_with(path: &str, buf: &[u8], pos: usize, n: usize) -> Option<(usize, usize)> {
    match path {
        "scalar" => Some(skip_scalar(buf, pos, n, usize::MAX)),
        #[cfg(target_arch = "x86_64")]
        "avx2" if std::arch::is_x86_feature_detected!("avx2") => {
            // SAFETY: the CPU has AVX2, checked just above.
            Some(unsafe { avx2::skip(buf, pos, n) })
        }
        _ => None,
    }
}

/// The element-by-element walk of [`skip_uints`], also stopping once `pos` reaches `stop`.
fn skip_scalar(buf: &[u8], mut pos: usize, n: usize, stop: usize) -> (usize, usize) {
    let mut done = 0;
    while done < n && pos < stop {
        let Some(&b) = buf.get(pos) else { break };
        let len = usize::from(U32_LEN[usize::from(b)]);
        if len == 0 || pos + len > buf.len() {
            break;
        }
        pos += len;
        done += 1;
    }
    (pos, done)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::skip_scalar;
    use std::arch::x86_64::*;

    /// Bytes of `buf` past a window's 32 that a walk leaving the window can reach: the
    /// element that straddles into the next window has at most 4 bytes there.
    const OVERHANG: usize = 4;

    /// How far ahead of the window the walk prefetches the payload.
    const PREFETCH: usize = 512;

    /// Where the walk from `entry` (0..=OVERHANG) of a window leaves it (`0x80 + k`: `k`
    /// bytes into the next window; below 0x80: it does not) and how many elements it
    /// passes, from the doubled `nx` and `cnt` of both lanes: the low lane is composed
    /// with the high one for the entries 0..=4, then one shift of a 64-bit word by the
    /// entry picks the answer.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn compose(nx: __m256i, cnt: __m256i, entry: usize) -> (u8, usize) {
        let lo_nx = _mm256_castsi256_si128(nx);
        let hi_nx = _mm256_extracti128_si256::<1>(nx);
        let lo_cnt = _mm256_castsi256_si128(cnt);
        let hi_cnt = _mm256_extracti128_si256::<1>(cnt);
        // Left the low lane: 0x80 + k -> k (the entry into the high lane); did not: bit 7
        // set -> vpshufb gives 0, which reads as "does not leave" below.
        let to_hi = _mm_xor_si128(lo_nx, _mm_set1_epi8(0x80u8 as i8));
        let c_nx = _mm_shuffle_epi8(hi_nx, to_hi);
        let c_cnt = _mm_add_epi8(lo_cnt, _mm_shuffle_epi8(hi_cnt, to_hi));
        let w_nx = _mm_cvtsi128_si64(c_nx) as u64;
        let w_cnt = _mm_cvtsi128_si64(c_cnt) as u64;
        let shift = 8 * entry as u32;
        ((w_nx >> shift) as u8, usize::from((w_cnt >> shift) as u8))
    }

    /// [`super::skip_uints`] with AVX2, over 32-byte windows (two 16-byte lanes).
    ///
    /// Per window, for every byte `i` of each lane in parallel: `nx[i]` = where the next
    /// element starts if one starts at `i`, stored as `0x70 + offset` while inside the
    /// lane and `0x80 + (offset - 16)` once past it (so `vpshufb`, which reads index bits
    /// 0..3 and gives 0 for an index with bit 7 set, follows pointers inside the lane and
    /// yields 0 for pointers that left it), and `cnt[i]` = elements passed. A byte that is
    /// no accepted marker has length 0 and points at itself. Doubling rounds
    /// (`nx = max(nx, nx[nx])`, `cnt += cnt[nx]`: the max keeps pointers that left, since
    /// pointers only move forward and every "left" value is above every "inside" one):
    /// three give the walk over 8 elements, enough to leave a lane unless it holds a run of
    /// 1-byte elements; only then a fourth gives 16, so a walk of accepted elements always
    /// leaves its 16-byte lane, and one that does not ("stuck") met another byte. The low lane is then
    /// composed with the high one for the 5 possible entries (0..=4), and the serial step
    /// per 32 bytes is one shift of a 64-bit word by the entry.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn skip(buf: &[u8], pos: usize, n: usize) -> (usize, usize) {
        let len = buf.len();
        let mut done = 0;
        // `base` is where the current window starts, `entry` where in it the next element
        // starts (0..=OVERHANG).
        let mut base = pos;
        let mut entry = 0usize;
        let iota = _mm256_setr_epi8(
            0x70, 0x71, 0x72, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7c, 0x7d,
            0x7e, 0x7f, 0x70, 0x71, 0x72, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x7b,
            0x7c, 0x7d, 0x7e, 0x7f,
        );
        // Lengths of the markers 0xcc.. (uint8, uint16, uint32; uint64 0xcf is not taken).
        let wide = _mm256_setr_epi8(
            2, 3, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        );
        let one = _mm256_set1_epi8(1);
        let m_cc = _mm256_set1_epi8(0xccu8 as i8);
        let bias = _mm256_set1_epi8(0x70);
        let minus1 = _mm256_set1_epi8(-1);
        loop {
            let mut stuck = false;
            while done < n && base + 32 + OVERHANG <= len {
                // SAFETY: `base + 32 <= len`, so the 32 bytes read are inside `buf`.
                let v = unsafe { _mm256_loadu_si256(buf.as_ptr().add(base).cast()) };
                // A payload just read from memory streams in ahead of the walk (a hint:
                // a prefetch never faults, and the address is only computed, not
                // dereferenced, so it may lie past the end of `buf`).
                _mm_prefetch::<_MM_HINT_T0>(buf.as_ptr().wrapping_add(base + PREFETCH).cast());
                // v - 0xcc is 0, 1, 2 for the wide markers; saturating + 0x70 sends every
                // value above 15 to bit 7 set (vpshufb: 0), the rest to its table entry.
                let idx = _mm256_adds_epu8(_mm256_sub_epi8(v, m_cc), bias);
                // Positive fixints (all bits set in `fix`; the table gave them 0): 0 - -1.
                let fix = _mm256_cmpgt_epi8(v, minus1);
                let l = _mm256_sub_epi8(_mm256_shuffle_epi8(wide, idx), fix);
                let mut nx = _mm256_add_epi8(iota, l);
                let mut cnt = _mm256_min_epu8(l, one);
                // Three rounds pass 8 elements, which leaves a lane unless it holds runs of
                // 1-byte elements; a fourth round (16) runs only for windows that need it.
                for _ in 0..3 {
                    cnt = _mm256_add_epi8(cnt, _mm256_shuffle_epi8(cnt, nx));
                    nx = _mm256_max_epu8(nx, _mm256_shuffle_epi8(nx, nx));
                }
                // SAFETY (both calls): this function runs only where the CPU has AVX2.
                let (mut exit, mut c) = unsafe { compose(nx, cnt, entry) };
                if exit < 0x80 {
                    cnt = _mm256_add_epi8(cnt, _mm256_shuffle_epi8(cnt, nx));
                    nx = _mm256_max_epu8(nx, _mm256_shuffle_epi8(nx, nx));
                    (exit, c) = unsafe { compose(nx, cnt, entry) };
                }
                if exit < 0x80 || c > n - done {
                    // Stuck (another byte), or the array ends in this window.
                    stuck = true;
                    break;
                }
                done += c;
                entry = usize::from(exit - 0x80);
                base += 32;
            }
            let pos = base + entry;
            if done == n || !stuck {
                // Done, or too few bytes left for a window: walk the rest element by element.
                let (p, d) = skip_scalar(buf, pos, n - done, usize::MAX);
                return (p, done + d);
            }
            // Step over the window the doubling could not pass, then go on with windows.
            let (p, d) = skip_scalar(buf, pos, n - done, base + 32);
            done += d;
            if p < base + 32 || done == n {
                // An element in another encoding, or the end of the array or the payload.
                return (p, done);
            }
            base += 32;
            entry = p - base;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// msgpack of `v` as msgspec writes it.
    fn enc(v: u32, out: &mut Vec<u8>) {
        match v {
            0..=0x7f => out.push(v as u8),
            0x80..=0xff => out.extend([0xcc, v as u8]),
            0x100..=0xffff => {
                out.push(0xcd);
                out.extend((v as u16).to_be_bytes());
            }
            _ => {
                out.push(0xce);
                out.extend(v.to_be_bytes());
            }
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            crate::rng::splitmix64(self.0)
        }
    }

    /// Values of 1, 2, 3 and 5 bytes in mixes from all-small to all-large.
    fn value(r: &mut Rng, mix: u64) -> u32 {
        let x = r.next();
        match (x >> 32) % 8 {
            k if k < mix % 8 => (x % 0x80) as u32,
            k if k < (mix / 8) % 8 + mix % 8 => (x % 0x10000) as u32,
            _ => x as u32,
        }
    }

    /// Every path agrees with the element-by-element walk, and at least the scalar one ran.
    fn check(buf: &[u8], start: usize, ask: usize, what: &str) -> (usize, usize) {
        let want = skip_uints_with("scalar", buf, start, ask).unwrap();
        for name in SKIP_PATHS {
            if let Some(got) = skip_uints_with(name, buf, start, ask) {
                assert_eq!(got, want, "{name} vs scalar: {what}");
            }
        }
        assert_eq!(skip_uints(buf, start, ask), want, "dispatch: {what}");
        want
    }

    #[test]
    fn this_machine_runs_every_simd_path() {
        // Guards against the tests silently covering only the scalar walk on a CI machine
        // that has AVX2: the path list must hold it whenever the CPU does.
        let runs = |p| skip_uints_with(p, &[], 0, 0).is_some();
        #[cfg(target_arch = "x86_64")]
        assert_eq!(runs("avx2"), std::arch::is_x86_feature_detected!("avx2"));
        assert!(runs("scalar"));
        assert!(!runs("no such path"));
    }

    /// Zipf-like token ids below 150k (most below 65,536, many below 128).
    fn zipf(r: &mut Rng) -> u32 {
        // Inverse CDF of a continuous 1/x law on 1..150_000.
        let u = (r.next() >> 11) as f64 / (1u64 << 53) as f64;
        (150_000f64.powf(u) as u32).saturating_sub(1)
    }

    #[test]
    fn agrees_with_the_element_by_element_walk() {
        let mut r = Rng(7);
        for case in 0..6000u64 {
            let count = (r.next() % 300) as usize;
            let mut buf = vec![0u8; (r.next() % 3) as usize];
            let start = buf.len();
            for _ in 0..count {
                let v = if case % 7 == 6 { zipf(&mut r) } else { value(&mut r, case % 64) };
                enc(v, &mut buf);
            }
            let end = buf.len();
            // Trailing bytes of any kind, sometimes none.
            for _ in 0..r.next() % 40 {
                buf.push(r.next() as u8);
            }
            // Sometimes corrupt one byte, or cut the payload short.
            match case % 5 {
                1 if end > start => {
                    let i = start + (r.next() as usize) % (end - start);
                    buf[i] = r.next() as u8;
                }
                2 if end > start => buf.truncate(start + (r.next() as usize) % (end - start)),
                _ => {}
            }
            let ask = match case % 3 {
                0 => count,
                1 => count / 2,
                _ => count + 3,
            };
            let want = check(&buf, start, ask, &format!("case {case}"));
            if case % 5 == 0 && ask == count {
                assert_eq!(want, (end, count), "case {case}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn proptest_paths_agree(
            vals in proptest::collection::vec((0u8..4, proptest::num::u32::ANY), 0..400),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            lead in 0usize..3,
            extra in 0usize..3,
        ) {
            // Random widths: fixint, uint8, uint16, uint32, each with a random value of it.
            let mut buf = vec![0u8; lead];
            for &(w, x) in &vals {
                let v = match w {
                    0 => x % 0x80,
                    1 => 0x80 + x % 0x80,
                    2 => 0x100 + x % 0xff00,
                    _ => 0x1_0000 + x % (u32::MAX - 0xffff),
                };
                enc(v, &mut buf);
            }
            let end = buf.len();
            buf.extend(&tail);
            let n = vals.len();
            let got = check(&buf, lead, n + extra, "proptest");
            if extra == 0 {
                proptest::prop_assert_eq!(got, (end, n));
            }
        }
    }

    #[test]
    fn stops_at_other_encodings_and_truncation() {
        let mut buf = Vec::new();
        for v in 0..100u32 {
            enc(v * 40_000, &mut buf);
        }
        let mid = buf.len();
        buf.extend([0xcf, 0, 0, 0, 0, 0, 0, 0, 1]); // u64 encoding: not stepped over
        for v in 0..100u32 {
            enc(v, &mut buf);
        }
        assert_eq!(check(&buf, 0, 200, "u64 inside"), (mid, 100));
        check(&buf, 0, 50, "half");
        // A uint32 whose last byte is missing.
        let mut cut = Vec::new();
        for _ in 0..40 {
            enc(1 << 30, &mut cut);
        }
        cut.pop();
        assert_eq!(check(&cut, 0, 40, "cut"), (39 * 5, 39));
    }
}
