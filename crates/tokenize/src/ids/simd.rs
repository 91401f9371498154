//! The vector code of the token-id scanner, and all of its `unsafe`.
//!
//! - [`classify`]: the byte classes of a 64-byte block with SSE2 (in every x86_64);
//!   [`Avx512::classify`] the same with AVX-512 compares into bit masks.
//! - [`Avx512::block_ids`]: the values of every id that lies wholly inside a 64-byte
//!   block, 8 ids per vector, with AVX-512 (VBMI and VBMI2): the ids' end and start
//!   positions are compressed into the low lanes (`vpcompressb`), each id's digits are
//!   gathered right-aligned into an 8-byte lane (`vpermb`, masked to the id's own
//!   digits), and the 8-digit groups are converted with multiply-adds (`vpmaddubsw`:
//!   pairs, `vpmaddwd`: fours, one 32-bit multiply: eights). Used only when the CPU has
//!   the features (checked at run time, [`Avx512::detect`]); the caller's SWAR loop is
//!   the fallback and does the same work one id at a time.

use super::Classes;

/// [`Classes`] 16 bytes at a time with SSE2 (part of every x86_64).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn classify(block: &[u8; 64]) -> Classes {
    use std::arch::x86_64::*;
    let mut c = Classes { digits: 0, commas: 0, spaces: 0, closes: 0, zeros: 0 };
    for k in 0..4 {
        // SAFETY: SSE2 is in the x86_64 baseline; the unaligned load reads the 16 bytes
        // at 16 * k of the 64-byte block.
        unsafe {
            let x = _mm_loadu_si128(block.as_ptr().add(16 * k).cast::<__m128i>());
            // Signed compares: bytes >= 0x80 are negative, so below '0'.
            let digit = _mm_and_si128(
                _mm_cmpgt_epi8(x, _mm_set1_epi8(b'0' as i8 - 1)),
                _mm_cmplt_epi8(x, _mm_set1_epi8(b'9' as i8 + 1)),
            );
            let mask = |m: __m128i| u64::from(_mm_movemask_epi8(m) as u16) << (16 * k);
            c.digits |= mask(digit);
            c.commas |= mask(_mm_cmpeq_epi8(x, _mm_set1_epi8(b',' as i8)));
            c.spaces |= mask(_mm_cmpeq_epi8(x, _mm_set1_epi8(b' ' as i8)));
            c.closes |= mask(_mm_cmpeq_epi8(x, _mm_set1_epi8(b']' as i8)));
            c.zeros |= mask(_mm_cmpeq_epi8(x, _mm_set1_epi8(b'0' as i8)));
        }
    }
    c
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub(super) fn classify(block: &[u8; 64]) -> Classes {
    super::classify_bytes(block)
}

/// Proof that the CPU runs the AVX-512 block reader (obtained only from [`Self::detect`]).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct Avx512(());

impl Avx512 {
    /// `Some` when this CPU has AVX-512 F, BW, VBMI and VBMI2 (and the OS saves the
    /// vector state: the standard library's detection checks both).
    #[inline]
    pub(super) fn detect() -> Option<Avx512> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vbmi")
                && std::arch::is_x86_feature_detected!("avx512vbmi2")
            {
                return Some(Avx512(()));
            }
        }
        None
    }

    /// Appends to `out` the values of the ids that lie wholly inside `block`, in order:
    /// the k-th id starts at the k-th set bit of `starts` and ends at the k-th set bit
    /// of `ends`. The caller guarantees (the scanner's masks do) that `ends` has at most
    /// 32 bits, that `starts` has at least as many, that every id is 1 to 8 ASCII digits
    /// from its start to its end inside the block, and that its start is not after
    /// its end.
    #[inline]
    pub(super) fn block_ids(self, block: &[u8; 64], starts: u64, ends: u64, out: &mut Vec<u32>) {
        // Memory safety rests on this alone (the writes below): an end is a digit followed
        // by a non-digit, so two ends are at least 2 bytes apart and a 64-bit mask of
        // them has at most 32 bits; checked anyway, one popcnt per block. (Masks that
        // broke the other promises would give wrong values, never an access outside the
        // block or the output: `vpermb` takes its indices modulo 64.)
        assert!(ends.count_ones() <= 32, "more than 32 ids end in a 64-byte block");
        debug_assert!(starts.count_ones() >= ends.count_ones());
        // Whole groups of 8 are written: room for up to 32.
        out.reserve(32);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `self` exists only if `detect` found the target features of
        // `block_ids_avx512`. It writes ceil(n / 8) * 8 <= 32 u32s from `out.len()` (n:
        // the ids, the bits of `ends`), inside the capacity just reserved, and returns n;
        // the length grows by the n of them that are the ids' values (each written, none
        // read before).
        unsafe {
            let len = out.len();
            let n = block_ids_avx512(block, starts, ends, out.as_mut_ptr().add(len));
            out.set_len(len + n);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (block, starts, ends, n, out);
            unreachable!("Avx512 is only detected on x86_64");
        }
    }

    /// The block reader's loop (`super::id_list_blocks_with`) with this reader, compiled
    /// with the features it needs, so that the per-block calls inline and the bit masks
    /// use BMI and POPCNT.
    #[inline]
    pub(super) fn id_list_blocks(self, b: &[u8], i: usize) -> Option<(Vec<u32>, usize)> {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `self` exists only if `detect` found the target features of
        // `id_list_blocks_avx512`; it is safe code compiled with them.
        unsafe {
            id_list_blocks_avx512(b, i, self)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (b, i);
            unreachable!("Avx512 is only detected on x86_64");
        }
    }

    /// [`Classes`] of a 64-byte block with one AVX-512 compare per class.
    #[inline]
    pub(super) fn classify(self, block: &[u8; 64]) -> Classes {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `self` exists only if `detect` found the target features of
        // `classify_avx512`, which reads the 64 bytes of `block`.
        unsafe {
            classify_avx512(block)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = block;
            unreachable!("Avx512 is only detected on x86_64");
        }
    }
}

/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn id_list_blocks_avx512(b: &[u8], i: usize, simd: Avx512) -> Option<(Vec<u32>, usize)> {
    super::id_list_blocks_with(b, i, Some(Simd::Avx512(simd)))
}

/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn classify_avx512(block: &[u8; 64]) -> Classes {
    use std::arch::x86_64::*;
    // SAFETY: the block is 64 bytes, as many as a 512-bit unaligned load reads.
    let x = unsafe { _mm512_loadu_si512(block.as_ptr().cast()) };
    let eq = |c: u8| _mm512_cmpeq_epi8_mask(x, _mm512_set1_epi8(c as i8));
    Classes {
        // Unsigned: x - '0' <= 9.
        digits: _mm512_cmple_epu8_mask(
            _mm512_sub_epi8(x, _mm512_set1_epi8(b'0' as i8)),
            _mm512_set1_epi8(9),
        ),
        commas: eq(b','),
        spaces: eq(b' '),
        closes: eq(b']'),
        zeros: eq(b'0'),
    }
}

/// Byte k: k.
#[cfg(target_arch = "x86_64")]
const IOTA: [u8; 64] = {
    let mut a = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        a[k] = k as u8;
        k += 1;
    }
    a
};

/// Byte 8i + j: i (which id of a group of 8 the byte of lane i belongs to).
#[cfg(target_arch = "x86_64")]
const LANE_ID: [u8; 64] = {
    let mut a = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        a[k] = (k / 8) as u8;
        k += 1;
    }
    a
};

/// Byte 8i + j: j - 7 (the offset of the j-th byte of an 8-byte right-aligned id from
/// the id's last digit).
#[cfg(target_arch = "x86_64")]
const FROM_END: [i8; 64] = {
    let mut a = [0i8; 64];
    let mut k = 0;
    while k < 64 {
        a[k] = (k % 8) as i8 - 7;
        k += 1;
    }
    a
};

/// Writes the values of the n ids of the block (n: the bits of `ends`) to `dst`, in
/// whole groups of 8, and returns n.
///
/// # Safety
/// The CPU must have the enabled features; `dst` must be valid for writes of
/// `n.div_ceil(8) * 8` u32s; `starts` and `ends` as [`Avx512::block_ids`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
#[inline]
unsafe fn block_ids_avx512(block: &[u8; 64], starts: u64, ends: u64, dst: *mut u32) -> usize {
    use std::arch::x86_64::*;
    let n = ends.count_ones() as usize;
    // SAFETY (every load below): the arrays and the block are 64 bytes, as many as a
    // 512-bit unaligned load reads.
    let (x, iota, lane_id, from_end) = unsafe {
        (
            _mm512_loadu_si512(block.as_ptr().cast()),
            _mm512_loadu_si512(IOTA.as_ptr().cast()),
            _mm512_loadu_si512(LANE_ID.as_ptr().cast()),
            _mm512_loadu_si512(FROM_END.as_ptr().cast()),
        )
    };
    // The digits' values (other bytes are never selected below).
    let v = _mm512_sub_epi8(x, _mm512_set1_epi8(b'0' as i8));
    // Lane i: the position of id i's last digit / first digit.
    let e = _mm512_maskz_compress_epi8(ends, iota);
    let s = _mm512_maskz_compress_epi8(starts, iota);
    let pairs = _mm512_set1_epi16(0x010A); // bytes 10, 1
    let fours = _mm512_set1_epi32(0x0001_0064); // words 100, 1
    let eights = _mm512_set1_epi64(10_000);
    for g in 0..n.div_ceil(8) {
        // Byte 8i + j of this group: id 8g + i's end, start.
        let sel = _mm512_add_epi8(lane_id, _mm512_set1_epi8(8 * g as i8));
        let eb = _mm512_permutexvar_epi8(sel, e);
        let sb = _mm512_permutexvar_epi8(sel, s);
        // The id's digits right-aligned in 8 bytes (first digit lowest), zeros before
        // its start: positions end - 7 .. end, those at or after the start kept. The
        // positions are -7..=62, so signed bytes compare them; `vpermb` takes an
        // index's low 6 bits, and the masked-off lanes are zero.
        let idx = _mm512_add_epi8(eb, from_end);
        let mine = _mm512_cmpge_epi8_mask(idx, sb);
        let digits = _mm512_maskz_permutexvar_epi8(mine, idx, v);
        // 10 * d0 + d1 per byte pair, 100 * p0 + p1 per word pair: per 8-byte lane the
        // high four digits' value in its low half, the low four's in its high half.
        let q = _mm512_madd_epi16(_mm512_maddubs_epi16(digits, pairs), fours);
        let r = _mm512_add_epi64(_mm512_mul_epu32(q, eights), _mm512_srli_epi64(q, 32));
        // SAFETY: group g writes u32s 8g .. 8g + 8 of `dst`, within the caller's room.
        unsafe { _mm256_storeu_si256(dst.add(8 * g).cast(), _mm512_cvtepi64_epi32(r)) };
    }
    n
}

/// The block reader the CPU runs: AVX-512 (VBMI2) when present, else AVX2.
#[derive(Clone, Copy, Debug)]
pub(super) enum Simd {
    /// AVX2 compares into masks, 4 ids per conversion ([`Avx2`]).
    Avx2(Avx2),
    /// AVX-512 compress and permute, 8 ids per conversion ([`Avx512`]).
    Avx512(Avx512),
}

impl Simd {
    /// The best block reader this CPU has, if any.
    #[inline]
    pub(super) fn detect() -> Option<Simd> {
        Avx512::detect().map(Simd::Avx512).or_else(|| Avx2::detect().map(Simd::Avx2))
    }

    /// [`Classes`] of a 64-byte block.
    #[inline(always)]
    pub(super) fn classify(self, block: &[u8; 64]) -> Classes {
        match self {
            Simd::Avx2(s) => s.classify(block),
            Simd::Avx512(s) => s.classify(block),
        }
    }

    /// As [`Avx512::block_ids`] (the same contract for both readers).
    #[inline(always)]
    pub(super) fn block_ids(self, block: &[u8; 64], starts: u64, ends: u64, out: &mut Vec<u32>) {
        match self {
            Simd::Avx2(s) => s.block_ids(block, starts, ends, out),
            Simd::Avx512(s) => s.block_ids(block, starts, ends, out),
        }
    }

    /// The block reader's loop compiled with this reader's features.
    #[inline]
    pub(super) fn id_list_blocks(self, b: &[u8], i: usize) -> Option<(Vec<u32>, usize)> {
        match self {
            Simd::Avx2(s) => s.id_list_blocks(b, i),
            Simd::Avx512(s) => s.id_list_blocks(b, i),
        }
    }
}

/// Proof that the CPU runs the AVX2 block reader (obtained only from [`Self::detect`]).
///
/// The block's classes come from two 32-byte compares per class; each id wholly inside
/// the block is then found from the masks (`tzcnt` of its start and end), loaded as the
/// 8 bytes that end at its last digit, masked to its digits, and converted 4 ids at a
/// time with `vpmaddubsw` (pairs), `vpmaddwd` (fours) and one 32-bit multiply (eights).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct Avx2(());

impl Avx2 {
    /// `Some` when this CPU has AVX2, BMI1, BMI2, POPCNT and LZCNT (and the OS saves the
    /// vector state: the standard library's detection checks both).
    #[inline]
    pub(super) fn detect() -> Option<Avx2> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("bmi1")
                && std::arch::is_x86_feature_detected!("bmi2")
                && std::arch::is_x86_feature_detected!("popcnt")
                && std::arch::is_x86_feature_detected!("lzcnt")
            {
                return Some(Avx2(()));
            }
        }
        None
    }

    /// As [`Avx512::block_ids`], with the same promises from the caller.
    #[inline]
    pub(super) fn block_ids(self, block: &[u8; 64], starts: u64, ends: u64, out: &mut Vec<u32>) {
        // As in the AVX-512 reader, memory safety rests on this alone (the writes below).
        assert!(ends.count_ones() <= 32, "more than 32 ids end in a 64-byte block");
        debug_assert!(starts.count_ones() >= ends.count_ones());
        // Whole groups of 4 are written: room for up to 32.
        out.reserve(32);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `self` exists only if `detect` found the target features of
        // `block_ids_avx2`. It writes ceil(n / 4) * 4 <= 32 u32s from `out.len()` (n: the
        // ids, the bits of `ends`), inside the capacity just reserved, and returns n; the
        // length grows by the n of them that are the ids' values (each written, none read
        // before).
        unsafe {
            let len = out.len();
            let n = block_ids_avx2(block, starts, ends, out.as_mut_ptr().add(len));
            out.set_len(len + n);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (block, starts, ends, out);
            unreachable!("Avx2 is only detected on x86_64");
        }
    }

    /// The block reader's loop (`super::id_list_blocks_with`) with this reader, compiled
    /// with the features it needs, so that the per-block calls inline and the bit masks
    /// use BMI and POPCNT.
    #[inline]
    pub(super) fn id_list_blocks(self, b: &[u8], i: usize) -> Option<(Vec<u32>, usize)> {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `self` exists only if `detect` found the target features of
        // `id_list_blocks_avx2`; it is safe code compiled with them.
        unsafe {
            id_list_blocks_avx2(b, i, self)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (b, i);
            unreachable!("Avx2 is only detected on x86_64");
        }
    }

    /// [`Classes`] of a 64-byte block with two AVX2 compares per class.
    #[inline]
    pub(super) fn classify(self, block: &[u8; 64]) -> Classes {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `self` exists only if `detect` found the target features of
        // `classify_avx2`, which reads the 64 bytes of `block`.
        unsafe {
            classify_avx2(block)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = block;
            unreachable!("Avx2 is only detected on x86_64");
        }
    }
}

/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt,bmi1,bmi2,lzcnt")]
unsafe fn id_list_blocks_avx2(b: &[u8], i: usize, simd: Avx2) -> Option<(Vec<u32>, usize)> {
    super::id_list_blocks_with(b, i, Some(Simd::Avx2(simd)))
}

/// # Safety
/// The CPU must have the enabled features.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn classify_avx2(block: &[u8; 64]) -> Classes {
    use std::arch::x86_64::*;
    let mut c = Classes { digits: 0, commas: 0, spaces: 0, closes: 0, zeros: 0 };
    for k in 0..2 {
        // SAFETY: the unaligned load reads the 32 bytes at 32 * k of the 64-byte block.
        let x = unsafe { _mm256_loadu_si256(block.as_ptr().add(32 * k).cast::<__m256i>()) };
        // Signed compares: bytes >= 0x80 are negative, so below '0'.
        let digit = _mm256_and_si256(
            _mm256_cmpgt_epi8(x, _mm256_set1_epi8(b'0' as i8 - 1)),
            _mm256_cmpgt_epi8(_mm256_set1_epi8(b'9' as i8 + 1), x),
        );
        let mask = |m: __m256i| u64::from(_mm256_movemask_epi8(m) as u32) << (32 * k);
        let eq = |ch: u8| mask(_mm256_cmpeq_epi8(x, _mm256_set1_epi8(ch as i8)));
        c.digits |= mask(digit);
        c.commas |= eq(b',');
        c.spaces |= eq(b' ');
        c.closes |= eq(b']');
        c.zeros |= eq(b'0');
    }
    c
}

/// Writes the values of the n ids of the block (n: the bits of `ends`) to `dst`, in
/// whole groups of 4, and returns n.
///
/// # Safety
/// The CPU must have the enabled features; `dst` must be valid for writes of
/// `n.div_ceil(4) * 4` u32s; `starts` and `ends` as [`Avx512::block_ids`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt,bmi1,bmi2")]
#[inline]
unsafe fn block_ids_avx2(block: &[u8; 64], mut starts: u64, mut ends: u64, dst: *mut u32) -> usize {
    use std::arch::x86_64::*;
    let n = ends.count_ones() as usize;
    // The id whose first digit is at the lowest set bit of `starts` and last digit at
    // the lowest of `ends`, as its digits right-aligned in a u64 (first digit lowest,
    // the places before it zero), and the next masks.
    let mut next = || -> i64 {
        let s = starts.trailing_zeros() as usize;
        let e = ends.trailing_zeros() as usize & 63;
        starts &= starts.wrapping_sub(1);
        ends &= ends.wrapping_sub(1);
        // The 8 bytes ending at byte e, straight from the block (no copy, whose stores
        // loads across them could not forward from): for e < 7, bytes 0 ..= 7 (`off`:
        // a conditional move).
        let off = e.saturating_sub(7);
        let raw = u64::from_le_bytes(block[off..off + 8].try_into().expect("8 bytes"));
        // The id's 1 to 7 digits (bytes s ..= e) moved to the top of the word with
        // zeros below: shifted down to drop the bytes before s, then up so that e is
        // the top byte. (Masks that broke the promises give wrong values, no panic.)
        let down = s.wrapping_sub(off).wrapping_mul(8) & 63;
        let up = (7 + s).wrapping_sub(e).wrapping_mul(8) & 63;
        ((raw >> down) << up) as i64
    };
    let pairs = _mm256_set1_epi16(0x010A); // bytes 10, 1
    let fours = _mm256_set1_epi32(0x0001_0064); // words 100, 1
    let eights = _mm256_set1_epi64x(10_000);
    let low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    for g in 0..n.div_ceil(4) {
        // Past the n-th id the masks are empty: those lanes are junk, written but
        // never counted.
        let (a, b, c, d) = (next(), next(), next(), next());
        // The digits' values; the zero bytes below them stay zero (saturating).
        let digits = _mm256_subs_epu8(_mm256_setr_epi64x(a, b, c, d), _mm256_set1_epi8(b'0' as i8));
        // 10 * d0 + d1 per byte pair, 100 * p0 + p1 per word pair: per 8-byte lane the
        // high four digits' value in its low half, the low four's in its high half.
        let q = _mm256_madd_epi16(_mm256_maddubs_epi16(digits, pairs), fours);
        let r = _mm256_add_epi64(_mm256_mul_epu32(q, eights), _mm256_srli_epi64(q, 32));
        let v = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(r, low_halves));
        // SAFETY: group g writes u32s 4g .. 4g + 4 of `dst`, within the caller's room.
        unsafe { _mm_storeu_si128(dst.add(4 * g).cast(), v) };
    }
    n
}
