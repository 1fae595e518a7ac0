//! The four-f64-lane arithmetic the loss is written over ([`Simd`]), and its two instances:
//! [`Portable`] (arrays of plain f64, any target) and `Avx2` (AVX2 registers, x86-64 where the
//! CPU has it). Each operation is one IEEE operation per lane, so both give the same bits.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
use firmware_protocol::simd::Avx2;

/// Four f64 lanes and the operations the loss needs, each one IEEE operation per lane (or an
/// exact move, conversion or bit operation), so every implementation gives the same bits.
pub(super) trait Simd: Copy {
    /// Columns of a block (4 vectors each) whose exponentials are computed side by side, 2 or
    /// 3: enough independent chains to keep the FP pipelines busy through the 13 dependent
    /// Horner steps, not so many that they spill out of the registers. Measured on Zen 3 (whole
    /// loss, 256 x 10): with AVX2, 3 columns (12 registers of chains; the compiler keeps the
    /// Horner loop rolled, 12 independent multiply-adds per coefficient) take 2/3 of the time
    /// of 1 or 2, and 4 or 5 (which spill) take longer than 3; with the SSE2 arrays, 2 columns
    /// take 3/4 of the time of 1 and 2/3 of that of 3.
    const AT_ONCE: usize;
    /// Four f64.
    type V: Copy;
    /// Four u64 (the bits of a `V`).
    type U: Copy;
    fn splat(self, x: f64) -> Self::V;
    fn load(self, x: &[f64; 4]) -> Self::V;
    fn store(self, v: Self::V, to: &mut [f64; 4]);
    fn to_array(self, v: Self::V) -> [f64; 4] {
        let mut a = [0.0; 4];
        self.store(v, &mut a);
        a
    }
    /// Exact widening.
    fn widen(self, x: &[f32; 4]) -> Self::V;
    /// Column `j` of four rows, widened: `[rows[0][j], rows[1][j], rows[2][j], rows[3][j]]`.
    fn transpose4(self, rows: [&[f32; 4]; 4]) -> [Self::V; 4] {
        let column = |j: usize| self.widen(&[rows[0][j], rows[1][j], rows[2][j], rows[3][j]]);
        [column(0), column(1), column(2), column(3)]
    }
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// `if a > b { a } else { b }`: `b` where `a` is NaN (and of two zeros).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    fn to_bits(self, v: Self::V) -> Self::U;
    fn of_bits(self, u: Self::U) -> Self::V;
    fn splat_u(self, x: u64) -> Self::U;
    /// Wrapping.
    fn add_u(self, a: Self::U, b: Self::U) -> Self::U;
    /// Wrapping.
    fn sub_u(self, a: Self::U, b: Self::U) -> Self::U;
    fn and_u(self, a: Self::U, b: Self::U) -> Self::U;
    fn or_u(self, a: Self::U, b: Self::U) -> Self::U;
    fn shl<const N: i32>(self, u: Self::U) -> Self::U;
    fn shr<const N: i32>(self, u: Self::U) -> Self::U;
}

/// Lanes as arrays, plain Rust arithmetic (which the compiler vectorises where it can).
#[derive(Clone, Copy)]
pub(super) struct Portable;

#[inline(always)]
fn lanewise<T: Copy>(a: [T; 4], b: [T; 4], f: impl Fn(T, T) -> T) -> [T; 4] {
    [f(a[0], b[0]), f(a[1], b[1]), f(a[2], b[2]), f(a[3], b[3])]
}

#[inline(always)]
fn each<T: Copy, R>(a: [T; 4], f: impl Fn(T) -> R) -> [R; 4] {
    [f(a[0]), f(a[1]), f(a[2]), f(a[3])]
}

impl Simd for Portable {
    const AT_ONCE: usize = 2;
    type V = [f64; 4];
    type U = [u64; 4];
    #[inline(always)]
    fn splat(self, x: f64) -> [f64; 4] {
        [x; 4]
    }
    #[inline(always)]
    fn load(self, x: &[f64; 4]) -> [f64; 4] {
        *x
    }
    #[inline(always)]
    fn store(self, v: [f64; 4], to: &mut [f64; 4]) {
        *to = v;
    }
    #[inline(always)]
    fn widen(self, x: &[f32; 4]) -> [f64; 4] {
        each(*x, f64::from)
    }
    #[inline(always)]
    fn add(self, a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
        lanewise(a, b, |a, b| a + b)
    }
    #[inline(always)]
    fn sub(self, a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
        lanewise(a, b, |a, b| a - b)
    }
    #[inline(always)]
    fn mul(self, a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
        lanewise(a, b, |a, b| a * b)
    }
    #[inline(always)]
    fn div(self, a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
        lanewise(a, b, |a, b| a / b)
    }
    #[inline(always)]
    fn max(self, a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
        lanewise(a, b, |a, b| if a > b { a } else { b })
    }
    #[inline(always)]
    fn to_bits(self, v: [f64; 4]) -> [u64; 4] {
        each(v, f64::to_bits)
    }
    #[inline(always)]
    fn of_bits(self, u: [u64; 4]) -> [f64; 4] {
        each(u, f64::from_bits)
    }
    #[inline(always)]
    fn splat_u(self, x: u64) -> [u64; 4] {
        [x; 4]
    }
    #[inline(always)]
    fn add_u(self, a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
        lanewise(a, b, u64::wrapping_add)
    }
    #[inline(always)]
    fn sub_u(self, a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
        lanewise(a, b, u64::wrapping_sub)
    }
    #[inline(always)]
    fn and_u(self, a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
        lanewise(a, b, |a, b| a & b)
    }
    #[inline(always)]
    fn or_u(self, a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
        lanewise(a, b, |a, b| a | b)
    }
    #[inline(always)]
    fn shl<const N: i32>(self, u: [u64; 4]) -> [u64; 4] {
        each(u, |u| u << N)
    }
    #[inline(always)]
    fn shr<const N: i32>(self, u: [u64; 4]) -> [u64; 4] {
        each(u, |u| u >> N)
    }
}

// Lanes in AVX2 registers. An `Avx2` exists only where the CPU has AVX2 (only its detection
// makes one), which is what makes these methods sound; they are meant to be inlined into
// `cross_entropy_avx2`, compiled for AVX2.

// SAFETY (for every `unsafe` block of this impl): an `Avx2` proves that the CPU has AVX2 (see
// `Avx2`), and every pointer comes from a reference to exactly the 16 or 32 bytes that the
// unaligned load or store touches.
#[cfg(target_arch = "x86_64")]
impl Simd for Avx2 {
    const AT_ONCE: usize = 3;
    type V = __m256d;
    type U = __m256i;
    #[inline(always)]
    fn splat(self, x: f64) -> __m256d {
        // SAFETY: see the impl.
        unsafe { _mm256_set1_pd(x) }
    }
    #[inline(always)]
    fn load(self, x: &[f64; 4]) -> __m256d {
        // SAFETY: see the impl.
        unsafe { _mm256_loadu_pd(x.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, v: __m256d, to: &mut [f64; 4]) {
        // SAFETY: see the impl.
        unsafe { _mm256_storeu_pd(to.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn widen(self, x: &[f32; 4]) -> __m256d {
        // SAFETY: see the impl.
        unsafe { _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr())) }
    }
    #[inline(always)]
    fn transpose4(self, rows: [&[f32; 4]; 4]) -> [__m256d; 4] {
        // SAFETY: see the impl.
        unsafe {
            let a0 = _mm_loadu_ps(rows[0].as_ptr());
            let a1 = _mm_loadu_ps(rows[1].as_ptr());
            let a2 = _mm_loadu_ps(rows[2].as_ptr());
            let a3 = _mm_loadu_ps(rows[3].as_ptr());
            let t0 = _mm_unpacklo_ps(a0, a1); // a00 a10 a01 a11
            let t1 = _mm_unpacklo_ps(a2, a3); // a20 a30 a21 a31
            let t2 = _mm_unpackhi_ps(a0, a1); // a02 a12 a03 a13
            let t3 = _mm_unpackhi_ps(a2, a3); // a22 a32 a23 a33
            [
                _mm256_cvtps_pd(_mm_movelh_ps(t0, t1)),
                _mm256_cvtps_pd(_mm_movehl_ps(t1, t0)),
                _mm256_cvtps_pd(_mm_movelh_ps(t2, t3)),
                _mm256_cvtps_pd(_mm_movehl_ps(t3, t2)),
            ]
        }
    }
    #[inline(always)]
    fn add(self, a: __m256d, b: __m256d) -> __m256d {
        // SAFETY: see the impl.
        unsafe { _mm256_add_pd(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256d, b: __m256d) -> __m256d {
        // SAFETY: see the impl.
        unsafe { _mm256_sub_pd(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256d, b: __m256d) -> __m256d {
        // SAFETY: see the impl.
        unsafe { _mm256_mul_pd(a, b) }
    }
    #[inline(always)]
    fn div(self, a: __m256d, b: __m256d) -> __m256d {
        // SAFETY: see the impl.
        unsafe { _mm256_div_pd(a, b) }
    }
    #[inline(always)]
    fn max(self, a: __m256d, b: __m256d) -> __m256d {
        // `vmaxpd` returns its second operand unless the first is greater.
        // SAFETY: see the impl.
        unsafe { _mm256_max_pd(a, b) }
    }
    #[inline(always)]
    fn to_bits(self, v: __m256d) -> __m256i {
        // SAFETY: see the impl.
        unsafe { _mm256_castpd_si256(v) }
    }
    #[inline(always)]
    fn of_bits(self, u: __m256i) -> __m256d {
        // SAFETY: see the impl.
        unsafe { _mm256_castsi256_pd(u) }
    }
    #[inline(always)]
    fn splat_u(self, x: u64) -> __m256i {
        // SAFETY: see the impl.
        unsafe { _mm256_set1_epi64x(x as i64) }
    }
    #[inline(always)]
    fn add_u(self, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: see the impl.
        unsafe { _mm256_add_epi64(a, b) }
    }
    #[inline(always)]
    fn sub_u(self, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: see the impl.
        unsafe { _mm256_sub_epi64(a, b) }
    }
    #[inline(always)]
    fn and_u(self, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: see the impl.
        unsafe { _mm256_and_si256(a, b) }
    }
    #[inline(always)]
    fn or_u(self, a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: see the impl.
        unsafe { _mm256_or_si256(a, b) }
    }
    #[inline(always)]
    fn shl<const N: i32>(self, u: __m256i) -> __m256i {
        // SAFETY: see the impl.
        unsafe { _mm256_slli_epi64::<N>(u) }
    }
    #[inline(always)]
    fn shr<const N: i32>(self, u: __m256i) -> __m256i {
        // SAFETY: see the impl.
        unsafe { _mm256_srli_epi64::<N>(u) }
    }
}
