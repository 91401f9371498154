//! Finding the end of a msgpack array of unsigned ints without decoding its elements.
//!
//! A msgpack array of variable-width integers has to be walked element by element to find
//! where it ends: each element's length depends on its first byte (the marker), so a plain
//! walk is one chain of dependent loads (marker, then its length, then the next marker),
//! about 10 cycles per element whatever the loop looks like.
//!
//! [`skip_uints`] breaks the chain with SIMD where the CPU has AVX2 (detected at run
//! time; elsewhere it walks element by element). It looks at the payload in fixed 16-byte
//! windows, independent of where elements start, and computes for every byte `i` of a
//! window, in parallel: where the next element would start if one started at `i`
//! (`i` + its length by marker: 1 for a positive fixint, 2, 3, 5 for uint8/16/32; a byte
//! that is no such marker points at itself), and then, by pointer doubling (three rounds
//! of a byte shuffle: 1, 2, 4, then 8 elements), where the walk from `i` leaves the window
//! and how many elements it passes. The only serial step left is one small table lookup
//! per window: the element that straddles into the next window fixes where the walk
//! enters it (0..4 bytes in). A walk that does not leave its window within 8 elements
//! (an unexpected marker, or a run of 1-byte elements) is finished by the element-by-
//! element walk, which also takes the last window of the array and anything near the end
//! of the payload.
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

    /// [`super::skip_uints`] with AVX2: two 16-byte windows per 32-byte load.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn skip(buf: &[u8], pos: usize, n: usize) -> (usize, usize) {
        let len = buf.len();
        let mut done = 0;
        // `base` is where the current pair of windows starts, `entry` where in it the next
        // element starts (0..=4).
        let mut base = pos;
        let mut entry = 0usize;
        let iota = _mm256_setr_epi8(
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
            11, 12, 13, 14, 15,
        );
        let one = _mm256_set1_epi8(1);
        let sixteen = _mm256_set1_epi8(16);
        let m_cc = _mm256_set1_epi8(0xccu8 as i8);
        let m_cd = _mm256_set1_epi8(0xcdu8 as i8);
        let m_ce = _mm256_set1_epi8(0xceu8 as i8);
        let mut nx_out = [0u8; 32];
        let mut cnt_out = [0u8; 32];
        loop {
            // The element-by-element walk takes what the windows cannot: the array's last
            // window, the payload's last bytes, and windows whose walk does not leave them
            // within 8 elements.
            let mut stuck = false;
            while base + 32 <= len && done < n {
                // SAFETY: `base + 32 <= len`, so the 32 bytes read are inside `buf`.
                let v = unsafe { _mm256_loadu_si256(buf.as_ptr().add(base).cast()) };
                let fix = _mm256_cmpgt_epi8(v, _mm256_set1_epi8(-1));
                let cc = _mm256_cmpeq_epi8(v, m_cc);
                let cd = _mm256_cmpeq_epi8(v, m_cd);
                let ce = _mm256_cmpeq_epi8(v, m_ce);
                // Lengths 1, 2, 3, 5 (the masks exclude each other); 0 for other bytes,
                // which then point at themselves and stop every walk that reaches them.
                let l = _mm256_or_si256(
                    _mm256_or_si256(
                        _mm256_and_si256(fix, one),
                        _mm256_and_si256(cc, _mm256_set1_epi8(2)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(cd, _mm256_set1_epi8(3)),
                        _mm256_and_si256(ce, _mm256_set1_epi8(5)),
                    ),
                );
                let mut nx = _mm256_add_epi8(iota, l);
                let mut cnt = _mm256_min_epu8(l, one);
                // Pointer doubling within each 16-byte lane: after round k, `nx[i]` is
                // where the walk from `i` is after 2^k elements or once it left the
                // window (>= 16), and `cnt[i]` how many elements it passed.
                for _ in 0..3 {
                    let inside = _mm256_cmpgt_epi8(sixteen, nx);
                    let nx2 = _mm256_shuffle_epi8(nx, nx);
                    let cnt2 = _mm256_shuffle_epi8(cnt, nx);
                    cnt = _mm256_add_epi8(cnt, _mm256_and_si256(cnt2, inside));
                    nx = _mm256_blendv_epi8(nx, nx2, inside);
                }
                // SAFETY: the arrays are 32 bytes; storeu has no alignment requirement.
                unsafe {
                    _mm256_storeu_si256(nx_out.as_mut_ptr().cast(), nx);
                    _mm256_storeu_si256(cnt_out.as_mut_ptr().cast(), cnt);
                }
                let mut w = 0;
                while w < 2 {
                    let exit = usize::from(nx_out[w * 16 + entry]);
                    let c = usize::from(cnt_out[w * 16 + entry]);
                    let start = base + w * 16;
                    if exit < 16 || c > n - done || start + exit > len {
                        // Stuck inside the window, the array ends in it, or the element
                        // that leaves it runs past the payload.
                        base = start;
                        stuck = true;
                        break;
                    }
                    done += c;
                    entry = exit - 16;
                    w += 1;
                }
                if stuck {
                    break;
                }
                base += 32;
            }
            let pos = base + entry;
            if done == n || !stuck {
                // Done, or fewer than 32 bytes left: walk the rest element by element.
                let (p, d) = skip_scalar(buf, pos, n - done, usize::MAX);
                return (p, done + d);
            }
            // Step over the window the doubling could not pass, then go on with windows.
            let (p, d) = skip_scalar(buf, pos, n - done, base + 16);
            done += d;
            if p < base + 16 || done == n {
                // An element in another encoding, or the end of the array or the payload.
                return (p, done);
            }
            base += 16;
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

    #[test]
    fn agrees_with_the_element_by_element_walk() {
        let mut r = Rng(7);
        for case in 0..4000u64 {
            let count = (r.next() % 300) as usize;
            let mut buf = vec![0u8; (r.next() % 3) as usize];
            let start = buf.len();
            for _ in 0..count {
                enc(value(&mut r, case % 64), &mut buf);
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
            let want = skip_scalar(&buf, start, ask, usize::MAX);
            assert_eq!(skip_uints(&buf, start, ask), want, "case {case}");
            if case % 5 == 0 && ask == count {
                assert_eq!(want, (end, count), "case {case}");
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
        assert_eq!(skip_uints(&buf, 0, 200), (mid, 100));
        assert_eq!(skip_uints(&buf, 0, 50), skip_scalar(&buf, 0, 50, usize::MAX));
        // A uint32 whose last byte is missing.
        let mut cut = Vec::new();
        for _ in 0..40 {
            enc(1 << 30, &mut cut);
        }
        cut.pop();
        assert_eq!(skip_uints(&cut, 0, 40), (39 * 5, 39));
    }
}
