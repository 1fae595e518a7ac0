//! The generator and step 4 in AVX2 intrinsics, 8 pairs (16 values) per step: the very IEEE
//! operations of the portable code, in the same order (divisions stay divisions, no FMA), so the
//! same bits. The 64-bit products of `mix`, which AVX2 lacks, are put together exactly from
//! 32-bit ones (see [`keys_of`]), and the sum of squares is taken while the values
//! are generated, in the lanes (`j mod 8`) and the order of [`inverse_norm_of`](super::inverse_norm_of).
//!
//! A step is a long chain of dependent operations: `mix`, 11 divisions queued on the one
//! divider, the Horner schemes, the square root. One step after another, that chain is longer
//! than the out-of-order window reaches, so the loop is software-pipelined: each iteration draws
//! the keys of step `s + 2`, does the divisions of step `s + 1` and finishes step `s`, three
//! independent pieces of work. What then bounds the loop is the number of vector operations
//! (about 130 a step, nearly all of them the arithmetic of the specification).
//!
//! The intrinsics are safe to call inside these `#[target_feature(enable = "avx2")]` functions
//! (Rust 1.87); Rust 1.85 and 1.86 hold them unsafe, hence the `allow` below. Memory accesses
//! through pointers stay in `unsafe` blocks.
#![allow(unsafe_op_in_unsafe_fn)]

use super::{DirectionSeed, GAMMA, finish_norm, normalise};
use crate::simd::Avx2;
use core::arch::x86_64::*;

/// Values per step of the kernel: 8 pairs.
const STEP: usize = 16;

/// [`super::fill_direction`], bit for bit.
///
/// Not itself compiled for AVX2: the inverse norm is computed between the two AVX2 passes,
/// in plain code, because `libm::sqrt` is an SSE instruction that stalls if it runs while
/// the upper halves of the vector registers are in use (as they are inside an AVX2
/// function; returning from one clears them). Safe: the token proves the CPU has AVX2.
pub(super) fn fill_direction(_: Avx2, seed: DirectionSeed, out: &mut [f32]) {
    // SAFETY: the token guarantees AVX2.
    let lanes = unsafe { fill_raw(seed, out) };
    let inv = finish_norm(lanes);
    // SAFETY: as above.
    unsafe { normalise_avx2(out, inv) }
}

/// [`normalise`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn normalise_avx2(out: &mut [f32], inv: Option<f32>) {
    normalise(out, inv)
}

/// The keys of the 8 pairs of a step (see [`keys_of`]).
#[derive(Clone, Copy)]
struct Keys {
    k1: __m256i,
    k2: __m256i,
}

/// A step with all of its divisions done: what [`finish`] needs.
#[derive(Clone, Copy)]
struct Divided {
    k2: __m256i,
    ln: LnStart,
    sincos: SincosStart,
}

/// Writes the raw values `z` of steps 2 and 3 into `out` and returns the eight partial sums
/// of step 4, `lanes[l] = sum of z_j^2 over j = l mod 8` in increasing `j`, as
/// [`super::inverse_norm_of`] adds them.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn fill_raw(seed: DirectionSeed, out: &mut [f32]) -> [f64; 8] {
    if out.is_empty() {
        return [0.0; 8];
    }
    let mut counters = Counters::new(seed);
    // Step `s` has its keys in `keys[s % 2]` and its quotients in `divided[s % 2]`.
    let full = out.len() / STEP;
    let steps = out.len().div_ceil(STEP);
    let first = counters.draw();
    let mut keys = [first; 2];
    let mut divided = [divide(first); 2];
    if steps > 1 {
        keys[1] = counters.draw();
    }
    // Partial sums of lanes 0..4 and 4..8.
    let mut sum0 = _mm256_setzero_pd();
    let mut sum1 = _mm256_setzero_pd();
    for (s, step) in out.chunks_exact_mut(STEP).enumerate() {
        if s + 1 < steps {
            divided[(s + 1) % 2] = divide(keys[(s + 1) % 2]);
        }
        if s + 2 < steps {
            keys[s % 2] = counters.draw();
        }
        let (lo, hi) = finish(divided[s % 2]);
        // SAFETY: `step` holds STEP = 16 f32, written as two unaligned runs of 8.
        unsafe {
            _mm256_storeu_ps(step.as_mut_ptr(), lo);
            _mm256_storeu_ps(step.as_mut_ptr().add(8), hi);
        }
        // Values j = 16s + l (lo) and 16s + 8 + l (hi) go to lane l, in that order.
        (sum0, sum1) = add_squares(sum0, sum1, lo);
        (sum0, sum1) = add_squares(sum0, sum1, hi);
    }
    let mut lanes = [0f64; 8];
    // SAFETY: `lanes` holds 8 f64, written as two unaligned runs of 4.
    unsafe {
        _mm256_storeu_pd(lanes.as_mut_ptr(), sum0);
        _mm256_storeu_pd(lanes.as_mut_ptr().add(4), sum1);
    }
    // The last `len mod 16` values: the last step into scratch, of which the first values
    // are kept (an odd length drops the last `r sin`, step 3). The tail starts at a
    // multiple of 16, so value `i` of it falls in lane `i mod 8`.
    if full < steps {
        let (lo, hi) = finish(divided[full % 2]);
        let mut scratch = [0f32; STEP];
        // SAFETY: `scratch` holds STEP = 16 f32, written as two unaligned runs of 8.
        unsafe {
            _mm256_storeu_ps(scratch.as_mut_ptr(), lo);
            _mm256_storeu_ps(scratch.as_mut_ptr().add(8), hi);
        }
        let rest = &mut out[full * STEP..];
        rest.copy_from_slice(&scratch[..rest.len()]);
        for (i, x) in rest.iter().enumerate() {
            lanes[i % 8] += (*x as f64) * (*x as f64);
        }
    }
    lanes
}

/// The SplitMix64 counters `seed + (i + 1) GAMMA` of pairs `i` 0..4 and 4..8 of the next
/// step to draw.
struct Counters(__m256i, __m256i);

impl Counters {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn new(seed: DirectionSeed) -> Self {
        let c = |i: u64| seed.0.wrapping_add((i + 1).wrapping_mul(GAMMA)) as i64;
        Self(
            _mm256_setr_epi64x(c(0), c(1), c(2), c(3)),
            _mm256_setr_epi64x(c(4), c(5), c(6), c(7)),
        )
    }

    /// The keys of the next step.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn draw(&mut self) -> Keys {
        let (k1, k2) = keys_of(self.0, self.1);
        let advance = _mm256_set1_epi64x(8u64.wrapping_mul(GAMMA) as i64);
        self.0 = _mm256_add_epi64(self.0, advance);
        self.1 = _mm256_add_epi64(self.1, advance);
        Keys { k1, k2 }
    }
}

/// `sum0 += x_0..4^2`, `sum1 += x_4..8^2` in f64, each square of an exactly widened `x`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn add_squares(sum0: __m256d, sum1: __m256d, x: __m256) -> (__m256d, __m256d) {
    let a = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    let b = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x));
    (
        _mm256_add_pd(sum0, _mm256_mul_pd(a, a)),
        _mm256_add_pd(sum1, _mm256_mul_pd(b, b)),
    )
}

/// The divisions of a step, and what leads to them.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn divide(keys: Keys) -> Divided {
    Divided {
        k2: keys.k2,
        ln: ln_start(keys.k1),
        sincos: sincos_start(keys.k2),
    }
}

/// The 16 values of a step, in output order: values 0..8 and 8..16.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn finish(d: Divided) -> (__m256, __m256) {
    let r = radius_finish(d.ln);
    let (c, s) = sincos_finish(d.sincos, d.k2);
    let x = _mm256_mul_ps(r, c);
    let y = _mm256_mul_ps(r, s);
    // The lanes hold pairs 0 1 4 5 | 2 3 6 7 (see `keys_of`): interleaving within each
    // 128-bit half gives values 0..8 (pairs 0..4) and 8..16 (pairs 4..8).
    (_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y))
}

/// The multipliers of [`super::mix`].
const M1: u64 = 0xBF58_476D_1CE4_E5B9;
const M2: u64 = 0x94D0_49BB_1331_11EB;

/// The 32x32-bit products of `z * m` in each 64-bit lane: `z_lo m_lo` (64 bits, in the
/// whole lane) and the cross products `z_lo m_hi`, `z_hi m_lo` mod 2^32 (in the low and the
/// high half of the lane). `z * m mod 2^64 = z_lo m_lo + ((z_lo m_hi + z_hi m_lo) << 32)`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn products(z: __m256i, m: u64) -> (__m256i, __m256i) {
    let m_lo = _mm256_set1_epi64x((m & 0xFFFF_FFFF) as i64);
    let m_swapped = _mm256_set1_epi64x(m.rotate_left(32) as i64);
    (_mm256_mul_epu32(z, m_lo), _mm256_mullo_epi32(z, m_swapped))
}

/// `z * m mod 2^64` in each 64-bit lane, exact: the sum of the two cross products goes to
/// the high half.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mul64(z: __m256i, m: u64) -> __m256i {
    let (lo_lo, cross) = products(z, m);
    let high = _mm256_blend_epi32::<0b1010_1010>(_mm256_setzero_si256(), cross);
    let sum = _mm256_add_epi64(_mm256_slli_epi64::<32>(cross), high);
    _mm256_add_epi64(lo_lo, sum)
}

/// The even and the odd 32-bit elements of `a` (64-bit lanes 0..4) and `b` (4..8): the low
/// and the high halves of the 8 lanes, ordered 0 1 4 5 | 2 3 6 7.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn halves(a: __m256i, b: __m256i) -> (__m256i, __m256i) {
    let (a, b) = (_mm256_castsi256_ps(a), _mm256_castsi256_ps(b));
    let lo = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
    let hi = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
    (_mm256_castps_si256(lo), _mm256_castps_si256(hi))
}

/// `(k1, k2)` of [`super::split_bits`]`(`[`super::mix`]`(c))` for the 8 counters `c` in `a`
/// (pairs 0..4) and `b` (pairs 4..8), in 32-bit lanes ordered as pairs 0 1 4 5 | 2 3 6 7.
///
/// `mix` is `z ^= z >> 30; z *= M1; z ^= z >> 27; z *= M2; z ^ (z >> 31)`. Up to the second
/// product this is done in 64-bit lanes. Of the rest only `k1 = bits >> 40` and
/// `k2 = (bits >> 8) mod 2^24` are needed, and with `z = z_hi 2^32 + z_lo` the second
/// product and the last step come out in 32-bit halves, without 64-bit arithmetic:
/// - `z_lo` is the low half of `y_lo M2_lo`, `z_hi` its high half plus both cross products
///   (mod 2^32);
/// - `bits >> 40 = (z >> 40) ^ (z >> 71) = z_hi >> 8`;
/// - the low half of `z >> 31` is `(z_hi << 1) | (z_lo >> 31)`, so
///   `(bits >> 8) mod 2^24 = (z_lo ^ (z_hi << 1)) >> 8`: the bit `z_lo >> 31` falls off.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn keys_of(a: __m256i, b: __m256i) -> (__m256i, __m256i) {
    let (a, b) = (first_product(a), first_product(b));
    let (lo_lo_a, cross_a) = products(a, M2);
    let (lo_lo_b, cross_b) = products(b, M2);
    let (z_lo, lo_lo_hi) = halves(lo_lo_a, lo_lo_b);
    let (cross_1, cross_2) = halves(cross_a, cross_b);
    let z_hi = _mm256_add_epi32(lo_lo_hi, _mm256_add_epi32(cross_1, cross_2));
    let k1 = _mm256_srli_epi32::<8>(z_hi);
    let k2 = _mm256_srli_epi32::<8>(_mm256_xor_si256(z_lo, _mm256_slli_epi32::<1>(z_hi)));
    (k1, k2)
}

/// `mix` up to its second product: `z ^= z >> 30; z *= M1; z ^ (z >> 27)`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn first_product(z: __m256i) -> __m256i {
    let z = mul64(_mm256_xor_si256(z, _mm256_srli_epi64::<30>(z)), M1);
    _mm256_xor_si256(z, _mm256_srli_epi64::<27>(z))
}

/// [`super::radius`] in each lane: `sqrt(-2 ln_u1(k1))`.
#[cfg(test)]
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn radius(k1: __m256i) -> __m256 {
    radius_finish(ln_start(k1))
}

/// [`super::ln_u1`] up to its division: `t = (m - 1) / (m + 1)` and `(e - 24) as f32`.
#[derive(Clone, Copy)]
struct LnStart {
    t: __m256,
    exponent: __m256,
}

/// The first half of [`super::ln_u1`] in each lane, operation for operation.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn ln_start(k1: __m256i) -> LnStart {
    let one = _mm256_set1_ps(1.0);
    let x = _mm256_cvtepi32_ps(_mm256_add_epi32(k1, _mm256_set1_epi32(1)));
    let bits = _mm256_castps_si256(x);
    let e = _mm256_sub_epi32(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(127));
    let m = _mm256_castsi256_ps(_mm256_or_si256(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007F_FFFF)),
        _mm256_set1_epi32(0x3F80_0000),
    ));
    let big = _mm256_cmp_ps::<_CMP_GT_OQ>(m, _mm256_set1_ps(core::f32::consts::SQRT_2));
    let m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5)), big);
    // `big` is all ones (-1) where true: `e += big as i32`.
    let e = _mm256_sub_epi32(e, _mm256_castps_si256(big));
    LnStart {
        t: _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one)),
        exponent: _mm256_cvtepi32_ps(_mm256_sub_epi32(e, _mm256_set1_epi32(24))),
    }
}

/// The second half of [`super::ln_u1`] and the rest of [`super::radius`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn radius_finish(ln: LnStart) -> __m256 {
    let LnStart { t, exponent } = ln;
    let t2 = _mm256_mul_ps(t, t);
    let series = _mm256_mul_ps(t2, _mm256_set1_ps(1.0 / 9.0));
    let series = _mm256_mul_ps(t2, _mm256_add_ps(_mm256_set1_ps(1.0 / 7.0), series));
    let series = _mm256_mul_ps(t2, _mm256_add_ps(_mm256_set1_ps(1.0 / 5.0), series));
    let series = _mm256_mul_ps(t2, _mm256_add_ps(_mm256_set1_ps(1.0 / 3.0), series));
    let series = _mm256_add_ps(_mm256_set1_ps(1.0), series);
    let ln = _mm256_add_ps(
        _mm256_mul_ps(exponent, _mm256_set1_ps(core::f32::consts::LN_2)),
        _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0), t), series),
    );
    _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0), ln))
}

/// [`super::sincos_turn`] in each lane.
#[cfg(test)]
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn sincos_turn(k2: __m256i) -> (__m256, __m256) {
    sincos_finish(sincos_start(k2), k2)
}

/// [`super::sincos_turn`] up to its divisions: `theta` and the quotients `t2 / d` of the
/// Horner schemes, innermost first.
#[derive(Clone, Copy)]
struct SincosStart {
    theta: __m256,
    /// `t2 / d` for d = 110, 72, 42, 20, 6 (sin).
    sin: [__m256; 5],
    /// `t2 / d` for d = 132, 90, 56, 30, 12, 2 (cos).
    cos: [__m256; 6],
}

/// The first half of [`super::sincos_turn`] in each lane, operation for operation; every
/// `t2 / d` is a division, as in the portable code.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn sincos_start(k2: __m256i) -> SincosStart {
    let theta = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_and_si256(k2, _mm256_set1_epi32(0x003F_FFFF))),
        _mm256_set1_ps(core::f32::consts::FRAC_PI_2 / 4_194_304.0),
    );
    let t2 = _mm256_mul_ps(theta, theta);
    SincosStart {
        theta,
        sin: [
            over(t2, 110.0),
            over(t2, 72.0),
            over(t2, 42.0),
            over(t2, 20.0),
            over(t2, 6.0),
        ],
        cos: [
            over(t2, 132.0),
            over(t2, 90.0),
            over(t2, 56.0),
            over(t2, 30.0),
            over(t2, 12.0),
            over(t2, 2.0),
        ],
    }
}

/// `t2 / d`: a division, as in the portable code.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn over(t2: __m256, d: f32) -> __m256 {
    _mm256_div_ps(t2, _mm256_set1_ps(d))
}

/// The second half of [`super::sincos_turn`]: the Horner schemes
/// `sin = theta (1 - q6 (1 - q20 (1 - q42 (1 - q72 (1 - q110)))))`,
/// `cos = 1 - q2 (1 - q12 (1 - q30 (1 - q56 (1 - q90 (1 - q132)))))` and the quadrant.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn sincos_finish(start: SincosStart, k2: __m256i) -> (__m256, __m256) {
    let one = _mm256_set1_ps(1.0);
    let SincosStart {
        theta,
        sin: qs,
        cos: qc,
    } = start;
    let mut sin = _mm256_sub_ps(one, qs[0]);
    for q in &qs[1..] {
        sin = _mm256_sub_ps(one, _mm256_mul_ps(*q, sin));
    }
    let sin = _mm256_mul_ps(theta, sin);
    let mut cos = _mm256_sub_ps(one, qc[0]);
    for q in &qc[1..] {
        cos = _mm256_sub_ps(one, _mm256_mul_ps(*q, cos));
    }
    // Quadrant q = k2 >> 22: bit 22 swaps sin and cos, bit 23 negates sin, bit 22 xor bit
    // 23 negates cos. Shifted to the sign bit: blendv selects on it, xor flips it.
    let swap = _mm256_castsi256_ps(_mm256_slli_epi32::<9>(k2));
    let b23 = _mm256_slli_epi32::<8>(k2);
    let sign = _mm256_set1_epi32(i32::MIN);
    let neg_sin = _mm256_castsi256_ps(_mm256_and_si256(b23, sign));
    let neg_cos = _mm256_and_si256(_mm256_xor_si256(b23, _mm256_slli_epi32::<9>(k2)), sign);
    let x = _mm256_blendv_ps(cos, sin, swap);
    let y = _mm256_blendv_ps(sin, cos, swap);
    (
        _mm256_xor_ps(x, _mm256_castsi256_ps(neg_cos)),
        _mm256_xor_ps(y, neg_sin),
    )
}
