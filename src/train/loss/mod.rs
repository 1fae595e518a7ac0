//! The local loss of Mono-Forward: mean softmax cross-entropy of the goodness (thesis eq. 3).
//!
//! The loss has the same bits on every machine (section "Arithmetic" of [`cross_entropy`]):
//! the finite difference `(L+ - L-) / (2 eps)` of two such losses is the MF+DD derivative. The
//! arithmetic is written once, generic over `Simd` (four f64 lanes), and instantiated twice:
//! `Portable` keeps the lanes in arrays of plain f64 (any target, and x86-64 without AVX2),
//! `Avx2` in AVX2 registers, chosen at run time. Both do the same IEEE operations in the same
//! order, so they give the same bits (tested, as is the equality with the scalar code this
//! replaced).

mod lanes;

#[cfg(target_arch = "x86_64")]
use firmware_protocol::simd::Avx2;
use lanes::{Portable, Simd};

/// Rows per block: the lanes of the vectorised loops, one row each, in [`GROUPS`] of four.
const LANES: usize = 16;
/// Groups of four lanes (one AVX2 register each) per block.
const GROUPS: usize = LANES / 4;
/// Classes per transposed chunk of a block (16 KiB of f64, in the L1 cache). A block with more
/// classes is transposed twice, once for the maximum and once for the exponentials.
const COLUMNS: usize = 128;

/// Mean over the batch of `-log softmax(g)_y`, by log-sum-exp in f64. `logits` is rows x
/// classes, row-major.
///
/// # Arithmetic
/// The value is the same on every machine, bit for bit. For each row:
///
/// - its maximum `m` (the largest value that is not NaN) is subtracted in f64, `x - m`;
/// - the exponentials are [`exp_nonpositive`], a fixed polynomial in plain f64 arithmetic
///   (so a NaN logit counts as `e^-708`);
/// - they are summed in class order, `((e_0 + e_1) + e_2) + ...`;
/// - the natural logarithm of the sum (which lies in `[1, classes]`) is [`ln_normal`], the
///   fdlibm algorithm of `libm::log`, and gives the same bits;
/// - the row's term is `ln(sum) - (g_y - m)`.
///
/// The terms are added in row order, starting from 0, and divided by the number of rows. Every
/// step is an IEEE f64 add, sub, mul, div, a comparison or an exact conversion, never a fused
/// multiply-add, in that order.
///
/// # Speed
/// Blocks of 16 rows are transposed (up to 128 classes at a time) so that row `i` of a block is
/// lane `i` of the vector loops, and all of the above runs on 16 rows at once: each row's sum
/// stays in class order. On Zen 3 with AVX2 (detected at run time), 256 x 10 logits take
/// 4.7 us, 3.7x less than the row-by-row version this replaced; 1.7x less without AVX2
/// (`cargo bench --bench loss`).
pub fn cross_entropy(logits: &[f32], classes: usize, labels: &[u8]) -> f64 {
    check(logits, classes, labels);
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = Avx2::detect() {
        // SAFETY: `avx2` exists, so the CPU has AVX2.
        return unsafe { cross_entropy_avx2(avx2, logits, classes, labels) };
    }
    cross_entropy_lanes(Portable, logits, classes, labels)
}

/// [`cross_entropy`] by the path of CPUs without AVX2 only: the same bits, slower (for tests and
/// benchmarks).
pub fn cross_entropy_portable(logits: &[f32], classes: usize, labels: &[u8]) -> f64 {
    check(logits, classes, labels);
    cross_entropy_lanes(Portable, logits, classes, labels)
}

fn check(logits: &[f32], classes: usize, labels: &[u8]) {
    assert_eq!(
        logits.len(),
        labels.len() * classes,
        "logits and labels disagree"
    );
    assert!(classes > 0, "no classes");
}

/// [`cross_entropy_lanes`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2, which `avx2` (from [`Avx2::detect`]) proves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn cross_entropy_avx2(avx2: Avx2, logits: &[f32], classes: usize, labels: &[u8]) -> f64 {
    cross_entropy_lanes(avx2, logits, classes, labels)
}

/// The body of [`cross_entropy`] (which checks the arguments). A label `y >= classes` panics.
#[inline(always)]
fn cross_entropy_lanes<S: Simd>(s: S, logits: &[f32], classes: usize, labels: &[u8]) -> f64 {
    let mut total = 0f64;
    // Column c of the block's current chunk of classes: `chunk[c][i]` is row i. (On the heap,
    // no longer than needed: zeroing a 16 KiB array on the stack costs more than allocating.)
    let mut chunk = vec![[0f64; LANES]; classes.min(COLUMNS)];
    for (block, block_labels) in logits.chunks(LANES * classes).zip(labels.chunks(LANES)) {
        let rows = block_labels.len();
        let mut max = [s.splat(f64::NEG_INFINITY); GROUPS];
        for c0 in (0..classes).step_by(COLUMNS) {
            transpose(s, block, rows, classes, c0, &mut chunk, &mut max);
        }
        let mut sum = [s.splat(0.0); GROUPS];
        for c0 in (0..classes).step_by(COLUMNS) {
            let cols = (classes - c0).min(COLUMNS);
            if classes > COLUMNS {
                // The chunk holds the block's last classes (from the maximum): copy these again.
                transpose(s, block, rows, classes, c0, &mut chunk, &mut max.clone());
            }
            let columns = &chunk[..cols];
            match S::AT_ONCE {
                3 => add_columns::<S, 3, { 3 * GROUPS }>(s, columns, &max, &mut sum),
                _ => add_columns::<S, 2, { 2 * GROUPS }>(s, columns, &max, &mut sum),
            }
        }
        let mut correct = [0f64; LANES];
        for (c, (row, &y)) in correct
            .iter_mut()
            .zip(block.chunks_exact(classes).zip(block_labels))
        {
            *c = row[y as usize] as f64;
        }
        let log = ln_lanes(s, sum);
        for g in 0..GROUPS.min(rows.div_ceil(4)) {
            let term = s.sub(log[g], s.sub(s.load(group(&correct, g)), max[g]));
            for t in s.to_array(term).into_iter().take(rows - 4 * g) {
                total += t;
            }
        }
    }
    total / labels.len() as f64
}

/// Adds `e^(x - max)` of the columns `cols` to `sum`, column after column, `K` columns (`N =
/// 4K` vectors) at a time through the exponential and the rest one by one.
#[inline(always)]
fn add_columns<S: Simd, const K: usize, const N: usize>(
    s: S,
    cols: &[[f64; LANES]],
    max: &[S::V; GROUPS],
    sum: &mut [S::V; GROUPS],
) {
    let mut steps = cols.chunks_exact(K);
    for step in &mut steps {
        add_exponentials::<S, N>(s, step, max, sum);
    }
    for col in steps.remainder().chunks(1) {
        add_exponentials::<S, GROUPS>(s, col, max, sum);
    }
}

/// Adds `e^(x - max)` of the columns `cols` (`N / GROUPS` of them) to `sum`, column after
/// column, the `N` vectors side by side through the exponential.
#[inline(always)]
fn add_exponentials<S: Simd, const N: usize>(
    s: S,
    cols: &[[f64; LANES]],
    max: &[S::V; GROUPS],
    sum: &mut [S::V; GROUPS],
) {
    debug_assert_eq!(cols.len() * GROUPS, N);
    let mut x = [max[0]; N];
    for (k, col) in cols.iter().enumerate() {
        for g in 0..GROUPS {
            x[k * GROUPS + g] = s.sub(s.load(group(col, g)), max[g]);
        }
    }
    let e = exp_lanes(s, x);
    for k in 0..cols.len() {
        for g in 0..GROUPS {
            sum[g] = s.add(sum[g], e[k * GROUPS + g]);
        }
    }
}

/// The values of the missing rows of the last block.
static ZEROS: [f32; COLUMNS] = [0.0; COLUMNS];

/// Lanes `4g..4g + 4` of a column.
#[inline(always)]
fn group(col: &[f64; LANES], g: usize) -> &[f64; 4] {
    col[4 * g..4 * g + 4].try_into().unwrap()
}

/// Copies classes `c0..` (at most [`COLUMNS`]) of the `rows` rows of `block` into `chunk`, as
/// f64, row i in lane i (rows past the last are zeros), and raises `max` (lanes as in `chunk`)
/// to the largest value of each row. Whole 4 x 4 tiles go through [`Simd::transpose4`].
#[inline(always)]
fn transpose<S: Simd>(
    s: S,
    block: &[f32],
    rows: usize,
    classes: usize,
    c0: usize,
    chunk: &mut [[f64; LANES]],
    max: &mut [S::V; GROUPS],
) {
    let cols = (classes - c0).min(COLUMNS);
    let row = |i: usize| {
        if i < rows {
            &block[i * classes + c0..][..cols]
        } else {
            &ZEROS[..cols]
        }
    };
    for (g, max) in max.iter_mut().enumerate() {
        let r = [row(4 * g), row(4 * g + 1), row(4 * g + 2), row(4 * g + 3)];
        let mut m = *max;
        let tiles = cols / 4 * 4;
        for c in (0..tiles).step_by(4) {
            let tile = |i: usize| r[i][c..c + 4].try_into().unwrap();
            let t = s.transpose4([tile(0), tile(1), tile(2), tile(3)]);
            for (j, t) in t.into_iter().enumerate() {
                s.store(t, group_mut(&mut chunk[c + j], g));
                m = s.max(t, m);
            }
        }
        for c in tiles..cols {
            let t = s.widen(&[r[0][c], r[1][c], r[2][c], r[3][c]]);
            s.store(t, group_mut(&mut chunk[c], g));
            m = s.max(t, m);
        }
        *max = m;
    }
}

#[inline(always)]
fn group_mut(col: &mut [f64; LANES], g: usize) -> &mut [f64; 4] {
    (&mut col[4 * g..4 * g + 4]).try_into().unwrap()
}

/// Range reduction constant of [`exp_lanes`]: 1.5 * 2^52, adding it rounds to an integer.
const EXP_MAGIC: f64 = 6_755_399_441_055_744.0;
/// ln 2 split (as in fdlibm): the high part has trailing zero bits, so `k * LN2_HI` is exact.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// 1/13!, 1/12!, ..., 1/1!, 1/0!: the Taylor coefficients of [`exp_lanes`], highest first.
const EXP_TAYLOR: [f64; 14] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
    1.0,
    1.0,
];

/// `e^x` for `x <= 0` (the shifted logits of a log-sum-exp), relative error below 1e-15, and
/// below 1e-300 in absolute terms under `x = -708` (where it returns `e^-708`; NaN also gives
/// `e^-708`). Range reduction `x = k ln 2 + r`, `|r| <= ln 2 / 2`, rounding by the 1.5 * 2^52
/// trick; `e^r` by its Taylor series to `r^13` (Horner); `2^k` assembled in the exponent bits.
/// Branch-free, so it vectorises (`exp_lanes` is the same for four lanes at a time).
pub fn exp_nonpositive(x: f64) -> f64 {
    let s = Portable;
    s.to_array(exp_lanes(s, [s.splat(x)])[0])[0]
}

/// [`exp_nonpositive`] of every lane. Each step is done for all `N` vectors before the next, so
/// they are `N` independent chains side by side (see [`add_exponentials`]).
#[inline(always)]
fn exp_lanes<S: Simd, const N: usize>(s: S, x: [S::V; N]) -> [S::V; N] {
    // (Loops rather than `map`, which the compiler does not always inline, and an intrinsic
    // that is not inlined into AVX2 code is a function call.)
    let (mut x, mut t, mut r) = (x, x, x);
    for i in 0..N {
        x[i] = s.max(x[i], s.splat(-708.0));
        t[i] = s.add(
            s.mul(x[i], s.splat(std::f64::consts::LOG2_E)),
            s.splat(EXP_MAGIC),
        );
        let k = s.sub(t[i], s.splat(EXP_MAGIC));
        r[i] = s.sub(
            s.sub(x[i], s.mul(k, s.splat(LN2_HI))),
            s.mul(k, s.splat(LN2_LO)),
        );
    }
    let mut p = [s.splat(EXP_TAYLOR[0]); N];
    for &c in &EXP_TAYLOR[1..] {
        for i in 0..N {
            p[i] = s.add(s.mul(p[i], r[i]), s.splat(c));
        }
    }
    for i in 0..N {
        // k sits in the low mantissa bits of t: 2^k = (k + 1023) << 52.
        let k = s.sub_u(s.to_bits(t[i]), s.splat_u(EXP_MAGIC.to_bits()));
        let scale = s.of_bits(s.shl::<52>(s.add_u(k, s.splat_u(1023))));
        p[i] = s.mul(p[i], scale);
    }
    p
}

/// The natural logarithm of a positive normal `x` (not 0, subnormal, infinite or NaN), the
/// same bits as `libm::log` (the FreeBSD `e_log.c` algorithm of libm 0.2, error below 1 ulp):
/// `x = 2^k (1 + f)` with `sqrt(2)/2 < 1 + f < sqrt(2)`, `s = f / (2 + f)`, and
/// `ln(1 + f) = f - hfsq + s (hfsq + R(s^2))` with `hfsq = f^2 / 2` and `R` the degree-7 Remez
/// polynomial in `s^2` of fdlibm (coefficients `LG1`..`LG7`), then `+ k ln 2` in two parts.
/// Plain f64 arithmetic and integer operations on the bits, no branch, so it vectorises
/// (`ln_lanes`). The log-sum-exp takes it on `[1, classes]`, where its relative error is
/// below 1e-15 (tested against `f64::ln`).
pub fn ln_normal(x: f64) -> f64 {
    let s = Portable;
    s.to_array(ln_lanes(s, [s.splat(x)])[0])[0]
}

/// [`ln_normal`] of every lane.
#[inline(always)]
fn ln_lanes<S: Simd, const N: usize>(s: S, x: [S::V; N]) -> [S::V; N] {
    const LG1: f64 = f64::from_bits(0x3fe5_5555_5555_5593);
    const LG2: f64 = f64::from_bits(0x3fd9_9999_9997_fa04);
    const LG3: f64 = f64::from_bits(0x3fd2_4924_9422_9359);
    const LG4: f64 = f64::from_bits(0x3fcc_71c5_1d8e_78af);
    const LG5: f64 = f64::from_bits(0x3fc7_4664_96cb_03de);
    const LG6: f64 = f64::from_bits(0x3fc3_9a09_d078_c69f);
    const LG7: f64 = f64::from_bits(0x3fc2_f112_df3e_5244);
    /// 2^52 + 1023: `k + 1023` in the low mantissa bits of 2^52, less this, is `k` exactly.
    const K_MAGIC: f64 = 4_503_599_627_371_519.0;
    let mut out = x;
    for (out, &x) in out.iter_mut().zip(&x) {
        let c = |v: f64| s.splat(v);
        let u = |v: u64| s.splat_u(v);
        // The high word, offset so that its exponent field is k + 1023 for the mantissa
        // 1 + f in [sqrt(2)/2, sqrt(2)).
        let bits = s.to_bits(x);
        let hx = s.add_u(s.shr::<32>(bits), u(0x3ff0_0000 - 0x3fe6_a09e));
        let exponent = s.or_u(s.shr::<20>(hx), u(0x4330_0000_0000_0000));
        let dk = s.sub(s.of_bits(exponent), c(K_MAGIC));
        let high = s.add_u(s.and_u(hx, u(0x000f_ffff)), u(0x3fe6_a09e));
        let low = s.and_u(bits, u(0xffff_ffff));
        let f = s.sub(s.of_bits(s.or_u(s.shl::<32>(high), low)), c(1.0));
        let hfsq = s.mul(s.mul(c(0.5), f), f);
        let sd = s.div(f, s.add(c(2.0), f));
        let z = s.mul(sd, sd);
        let w = s.mul(z, z);
        let t1 = s.mul(w, s.add(c(LG2), s.mul(w, s.add(c(LG4), s.mul(w, c(LG6))))));
        let t2 = s.mul(
            z,
            s.add(
                c(LG1),
                s.mul(w, s.add(c(LG3), s.mul(w, s.add(c(LG5), s.mul(w, c(LG7)))))),
            ),
        );
        let r = s.add(t2, t1);
        // s (hfsq + R) + dk LN2_LO - hfsq + f + dk LN2_HI, left to right.
        let v = s.add(s.mul(sd, s.add(hfsq, r)), s.mul(dk, c(LN2_LO)));
        *out = s.add(s.add(s.sub(v, hfsq), f), s.mul(dk, c(LN2_HI)));
    }
    out
}

/// The index of the largest value of each row (the first on ties).
pub fn argmax_rows(logits: &[f32], classes: usize) -> impl Iterator<Item = usize> + '_ {
    logits.chunks_exact(classes).map(|row| {
        row.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv { (i, v) } else { (bi, bv) }
            })
            .0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_and_is_stable() {
        let logits = [1.0f32, 2.0, 3.0, 0.0, 0.0, 0.0];
        let labels = [2u8, 0];
        let l0 = -((3f64).exp() / (1f64.exp() + 2f64.exp() + 3f64.exp())).ln();
        let l1 = (3f64).ln();
        assert!((cross_entropy(&logits, 3, &labels) - (l0 + l1) / 2.0).abs() < 1e-12);
        // Large logits do not overflow.
        let big = [1000.0f32, 0.0];
        assert!((cross_entropy(&big, 2, &[0]) - 0.0).abs() < 1e-12);
        assert!((cross_entropy(&big, 2, &[1]) - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn the_exponential_is_accurate_from_0_to_minus_745() {
        let mut worst = 0f64;
        let mut x = 0.0f64;
        while x > -708.0 {
            let rel = (exp_nonpositive(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x -= 0.01234567;
        }
        assert!(worst < 2e-15, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-745.0) < 1e-300 && exp_nonpositive(-745.0) >= 0.0);
        assert!(exp_nonpositive(f64::NEG_INFINITY) < 1e-300);
    }

    #[test]
    fn many_classes_and_partial_blocks_agree_with_the_definition() {
        for (classes, rows) in [(10usize, 37usize), (100, 21), (1500, 3)] {
            let logits: Vec<f32> = (0..rows * classes)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 100.0)
                .collect();
            let labels: Vec<u8> = (0..rows)
                .map(|r| (r * 13 % classes.min(256)) as u8)
                .collect();
            let expect: f64 = logits
                .chunks_exact(classes)
                .zip(&labels)
                .map(|(row, &y)| {
                    let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
                        - row[y as usize] as f64
                })
                .sum::<f64>()
                / rows as f64;
            let got = cross_entropy(&logits, classes, &labels);
            assert!(
                (got - expect).abs() < 1e-12,
                "{classes} classes: {got} vs {expect}"
            );
        }
    }

    /// `exp_nonpositive` as it was before the vectorised version (commit e4ce696), verbatim but
    /// for its name.
    fn exp_before(x: f64) -> f64 {
        const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
        // ln 2 split (as in fdlibm): the high part has trailing zero bits, so k * LN2_HI is exact.
        const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
        const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
        let x = x.max(-708.0);
        let t = x * std::f64::consts::LOG2_E + MAGIC;
        let k = t - MAGIC;
        let r = (x - k * LN2_HI) - k * LN2_LO;
        let mut p = 1.0 / 6_227_020_800.0; // 1/13!
        for d in [
            479_001_600.0,
            39_916_800.0,
            3_628_800.0,
            362_880.0,
            40_320.0,
            5_040.0,
            720.0,
            120.0,
            24.0,
            6.0,
            2.0,
            1.0,
            1.0,
        ] {
            p = p * r + 1.0 / d;
        }
        let ki = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
        p * f64::from_bits(((ki + 1023) as u64) << 52)
    }

    /// `cross_entropy` as it was before the vectorised version (commit e4ce696), verbatim but
    /// for its name and that of `exp_nonpositive`: the new one must give the same bits.
    fn before(logits: &[f32], classes: usize, labels: &[u8]) -> f64 {
        const ROWS: usize = 16;
        let mut total = 0f64;
        let mut shifted = [0f64; 2048];
        for (block, block_labels) in logits.chunks(ROWS * classes).zip(labels.chunks(ROWS)) {
            let rows = block_labels.len();
            let mut correct = [0f64; ROWS];
            if classes * rows > shifted.len() {
                for (row, &y) in block.chunks_exact(classes).zip(block_labels) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                    let sum: f64 = row.iter().map(|&x| exp_before(x as f64 - max)).sum();
                    total += libm::log(sum) - (row[y as usize] as f64 - max);
                }
                continue;
            }
            for (r, (row, &y)) in block.chunks_exact(classes).zip(block_labels).enumerate() {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                for (s, &x) in shifted[r * classes..(r + 1) * classes].iter_mut().zip(row) {
                    *s = x as f64 - max;
                }
                correct[r] = row[y as usize] as f64 - max;
            }
            let shifted = &mut shifted[..rows * classes];
            shifted.iter_mut().for_each(|x| *x = exp_before(*x));
            for (r, sums) in shifted.chunks_exact(classes).enumerate() {
                total += libm::log(sums.iter().sum::<f64>()) - correct[r];
            }
        }
        total / labels.len() as f64
    }

    /// The definition in f64 with the platform's `exp` and `ln`.
    fn reference(logits: &[f32], classes: usize, labels: &[u8]) -> f64 {
        logits
            .chunks_exact(classes)
            .zip(labels)
            .map(|(row, &y)| {
                let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
                    - row[y as usize] as f64
            })
            .sum::<f64>()
            / labels.len() as f64
    }

    /// SplitMix64: a reproducible stream of test values.
    struct Stream(u64);

    impl Stream {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [-scale, scale).
        fn uniform(&mut self, scale: f64) -> f32 {
            ((self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0) as f32 * scale as f32
        }

        /// Logits of every kind: ordinary, tiny, huge, of both signs, zeros of both signs,
        /// repeated maxima, and with `special`, infinities and NaN.
        fn logit(&mut self, special: bool) -> f32 {
            match self.next() % 16 {
                0 => 0.0,
                1 => -0.0,
                2 => self.uniform(3.0e38),
                3 => self.uniform(1e-30),
                4 => self.uniform(1000.0),
                5 => 7.5,
                6 if special => f32::INFINITY,
                7 if special => f32::NEG_INFINITY,
                8 if special => f32::NAN,
                _ => self.uniform(10.0),
            }
        }

        /// A batch of `rows` x `classes` logits and labels anywhere in `0..classes` (`u8`).
        fn batch(&mut self, rows: usize, classes: usize, special: bool) -> (Vec<f32>, Vec<u8>) {
            let logits = (0..rows * classes).map(|_| self.logit(special)).collect();
            let labels = (0..rows)
                .map(|_| (self.next() % classes.min(256) as u64) as u8)
                .collect();
            (logits, labels)
        }
    }

    /// Equal bits, or both NaN (whose sign and payload the IEEE operations leave open).
    fn same(a: f64, b: f64) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Rows for a class count: 1 to 40, so every partial block size occurs.
    fn rows_for(classes: usize) -> usize {
        classes * 7 % 40 + 1
    }

    #[cfg(target_arch = "x86_64")]
    fn avx2(logits: &[f32], classes: usize, labels: &[u8]) -> Option<f64> {
        // SAFETY: `avx2` comes from `Avx2::detect`.
        Avx2::detect().map(|avx2| unsafe { cross_entropy_avx2(avx2, logits, classes, labels) })
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_portable_give_the_same_bits() {
        if Avx2::detect().is_none() {
            firmware_protocol::skipped::skipped(
                "avx2_and_portable_give_the_same_bits",
                "no AVX2 on this CPU: nothing to compare",
            );
            return;
        }
        let mut stream = Stream(1);
        for classes in 2..=1500 {
            let rows = rows_for(classes);
            for special in [false, true] {
                let (logits, labels) = stream.batch(rows, classes, special);
                let portable = cross_entropy_lanes(Portable, &logits, classes, &labels);
                let avx2 = avx2(&logits, classes, &labels).unwrap();
                assert!(
                    same(portable, avx2),
                    "{rows} x {classes}: portable {portable:e}, AVX2 {avx2:e}"
                );
                if !special {
                    assert!(portable.is_finite(), "{rows} x {classes}: {portable}");
                }
            }
        }
        // The pieces on their own, four lanes at a time: the exponential on anything (any bit
        // pattern made negative, NaN included, and the range of shifted logits), the logarithm
        // on positive normal numbers.
        let s = Avx2::detect().unwrap();
        for _ in 0..20_000 {
            let x: [f64; 4] = std::array::from_fn(|_| match stream.next() % 4 {
                0 => -f64::from_bits(stream.next()).abs(),
                1 => stream.uniform(750.0) as f64 - 750.0,
                _ => stream.uniform(40.0) as f64 - 40.0,
            });
            let portable = Portable.to_array(exp_lanes(Portable, [x])[0]);
            let avx2 = s.to_array(exp_lanes(s, [s.load(&x)])[0]);
            for (a, b) in portable.into_iter().zip(avx2) {
                assert!(same(a, b), "exp of {x:?}: {a:e} vs {b:e}");
            }
            let normals = f64::MAX.to_bits() - f64::MIN_POSITIVE.to_bits();
            let y: [f64; 4] = std::array::from_fn(|_| {
                f64::from_bits(stream.next() % normals + f64::MIN_POSITIVE.to_bits())
            });
            let portable = Portable.to_array(ln_lanes(Portable, [y])[0]);
            let avx2 = s.to_array(ln_lanes(s, [s.load(&y)])[0]);
            assert_eq!(
                portable.map(f64::to_bits),
                avx2.map(f64::to_bits),
                "ln of {y:?}"
            );
        }
    }

    #[test]
    fn the_same_bits_as_before_and_close_to_the_definition() {
        let mut stream = Stream(2);
        for classes in (2..=1500).step_by(7).chain([10, 100, 128, 129, 256, 257]) {
            let rows = rows_for(classes);
            for special in [false, true] {
                let (logits, labels) = stream.batch(rows, classes, special);
                let got = cross_entropy(&logits, classes, &labels);
                let old = before(&logits, classes, &labels);
                assert!(
                    same(got, old),
                    "{rows} x {classes}: {got:e}, before {old:e}"
                );
                #[cfg(target_arch = "x86_64")]
                {
                    let portable = cross_entropy_lanes(Portable, &logits, classes, &labels);
                    assert!(
                        same(portable, old),
                        "{rows} x {classes}: portable {portable:e}"
                    );
                }
                if !special {
                    let want = reference(&logits, classes, &labels);
                    assert!(
                        (got - want).abs() <= 1e-14 * want.abs(),
                        "{rows} x {classes}: {got:e} vs {want:e}"
                    );
                }
            }
        }
        // The training shapes, with goodness-like values.
        for (rows, classes) in [(256, 10), (256, 100), (64, 10), (1, 2), (17, 3)] {
            let logits: Vec<f32> = (0..rows * classes).map(|_| stream.uniform(8.0)).collect();
            let labels: Vec<u8> = (0..rows)
                .map(|_| (stream.next() % classes as u64) as u8)
                .collect();
            let got = cross_entropy(&logits, classes, &labels);
            assert!(same(got, before(&logits, classes, &labels)));
            let want = reference(&logits, classes, &labels);
            assert!(
                (got - want).abs() <= 1e-14 * want.abs(),
                "{got:e} vs {want:e}"
            );
        }
    }

    #[test]
    fn the_exponential_has_the_same_bits_as_before() {
        let mut stream = Stream(4);
        for _ in 0..1_000_000 {
            let x = match stream.next() % 4 {
                0 => -f64::from_bits(stream.next()).abs(),
                1 => stream.uniform(750.0) as f64 - 750.0,
                _ => stream.uniform(40.0) as f64 - 40.0,
            };
            assert!(same(exp_nonpositive(x), exp_before(x)), "exp {x:e}");
        }
    }

    #[test]
    fn empty_batches_and_wrong_labels() {
        assert!(cross_entropy(&[], 10, &[]).is_nan());
        let out_of_range = std::panic::catch_unwind(|| cross_entropy(&[0.0; 6], 3, &[0, 3]));
        assert!(out_of_range.is_err(), "a label past the classes must panic");
    }

    #[test]
    fn the_logarithm_is_libm_and_accurate_on_1_to_classes() {
        // Relative error against the platform's ln on [1, 2^14], densely near 1 and the
        // powers of two, where the reduction changes k.
        let mut worst = 0f64;
        let mut check = |x: f64| {
            let got = ln_normal(x);
            assert_eq!(got.to_bits(), libm::log(x).to_bits(), "ln {x:e}");
            let want = x.ln();
            if x == 1.0 {
                assert_eq!(got, 0.0);
            } else {
                worst = worst.max(((got - want) / want).abs());
            }
        };
        let mut x = 1.0f64;
        while x < 16384.0 {
            check(x);
            x += x * 1.2345e-4;
        }
        for k in 0..14 {
            let p = (1u64 << k) as f64;
            for i in 0..2000u64 {
                check(f64::from_bits(p.to_bits() + i));
                if k > 0 {
                    check(f64::from_bits(p.to_bits() - i));
                }
                check(p * std::f64::consts::SQRT_2 + i as f64 * p * 1e-15);
            }
        }
        assert!(worst < 1e-15, "relative error {worst:e}");
        // And the same bits as libm on every positive normal number.
        let mut stream = Stream(3);
        for _ in 0..200_000 {
            let x = f64::from_bits(
                stream.next() % (f64::MAX.to_bits() - f64::MIN_POSITIVE.to_bits())
                    + f64::MIN_POSITIVE.to_bits(),
            );
            assert_eq!(ln_normal(x).to_bits(), libm::log(x).to_bits(), "ln {x:e}");
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        let v: Vec<usize> = argmax_rows(&[0.0, 2.0, 2.0, 5.0, 1.0, 0.0], 3).collect();
        assert_eq!(v, vec![1, 0]);
    }
}
