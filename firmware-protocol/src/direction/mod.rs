//! The one specification of a perturbation direction.
//!
//! Thesis eq. (7) and Algorithm 1, line 6: `v ~ N(0, I)`, `v_hat = v / ||v||`. Host, simulator
//! and device firmware all call this module, so the same [`DirectionSeed`] gives the same f32
//! vector, bit for bit, on every target. Everything here is specified down to the bit:
//!
//! 1. **Seed.** A [`DirectionKey`] (run seed, epoch, batch, layer, parameter group, chunk,
//!    direction index) is folded into one `u64` by [`DirectionKey::seed`]: starting from
//!    `mix(run_seed ^ DOMAIN)`, each further field `f` is absorbed as `h = mix(h + GAMMA ^ f)`,
//!    where `mix` is the SplitMix64 finaliser. Directions travel over the wire as this seed.
//! 2. **Uniforms.** Pair `i` (from 0) comes from `bits = mix(seed + (i + 1) * GAMMA)` (wrapping),
//!    the SplitMix64 stream, which is counter-based: pairs are independent and computed in any
//!    order or in SIMD lanes. `k1 = bits >> 40` and `k2 = (bits >> 8) & 0xFF_FFFF` (24 bits each)
//!    give `u1 = (k1 + 1) / 2^24` in (0, 1] and `u2 = k2 / 2^24` in [0, 1).
//! 3. **Gaussians.** Box-Muller, `r = sqrt(-2 ln u1)`, `z = (r cos 2 pi u2, r sin 2 pi u2)`, with
//!    `ln` and `sin`/`cos` evaluated by the fixed f32 polynomials of [`ln_u1`] and [`sincos_turn`]
//!    (every operation an IEEE f32 add, mul, div or sqrt in a fixed order, no fused multiply-add,
//!    so every target and every SIMD width rounds identically). Pair `i` gives values `2i` and
//!    `2i + 1`; an odd length drops the last `r sin`.
//! 4. **Normalisation.** `sum` of `z_j^2` in f64 over eight interleaved partial sums
//!    (`j mod 8`), added lane 0 to 7; `inv = 1 / sqrt(sum)` rounded to f32; `v_j = z_j * inv`.
//!    (If every `z_j` is zero, which needs `u1 = 1` for every pair, `v` is the first unit vector.)
//!
//! The update of Algorithm 1, lines 10 and 12, is specified here too ([`apply_update`]), so that
//! a device and the host's shadow of its weights apply the very same arithmetic.
//!
//! The code here is the reference and what firmware runs; `avx2.rs` holds the x86-64 fast path
//! of [`fill_direction`] (host only, `std`), held to these bits by the tests below.

/// SplitMix64 increment (the golden ratio, 2^64 / phi).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// Separates direction seeds from any other use of the run seed.
const DOMAIN: u64 = 0x706E_6E2D_6469_7231; // "pnn-dir1"

/// The SplitMix64 output function (Steele, Lea and Flood, 2014): a bijection on `u64`.
#[inline]
pub const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
const fn absorb(h: u64, field: u64) -> u64 {
    mix(h.wrapping_add(GAMMA) ^ field)
}

/// Which parameters of a layer a direction perturbs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ParamGroup {
    /// The layer's own parameters `W_l` (weights then bias; conv blocks add BatchNorm).
    Weights = 0,
    /// The host-side projection `M_l`.
    Projection = 1,
}

/// Everything that identifies one direction of one training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirectionKey {
    pub run_seed: u64,
    pub epoch: u32,
    pub batch: u32,
    pub layer: u32,
    pub group: ParamGroup,
    pub chunk: u32,
    pub index: u32,
}

impl DirectionKey {
    /// Folds the key into the seed that names the direction (step 1 of the module docs).
    pub const fn seed(&self) -> DirectionSeed {
        let mut h = mix(self.run_seed ^ DOMAIN);
        h = absorb(h, self.epoch as u64);
        h = absorb(h, self.batch as u64);
        h = absorb(h, self.layer as u64);
        h = absorb(h, self.group as u64);
        h = absorb(h, self.chunk as u64);
        h = absorb(h, self.index as u64);
        DirectionSeed(h)
    }
}

/// A direction as it travels: 8 bytes, whatever the chunk length.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct DirectionSeed(pub u64);

/// The stream of standard normal f32 values a seed names (steps 2 and 3), before normalisation.
#[derive(Clone, Copy, Debug)]
pub struct GaussianStream {
    state: u64,
    spare: Option<f32>,
}

impl GaussianStream {
    pub const fn new(seed: DirectionSeed) -> Self {
        Self {
            state: seed.0,
            spare: None,
        }
    }

    /// The next Box-Muller pair.
    #[inline]
    pub fn next_pair(&mut self) -> (f32, f32) {
        self.state = self.state.wrapping_add(GAMMA);
        gaussian_pair(mix(self.state))
    }

    /// Fills `out` with the next `out.len()` values; only valid on a fresh stream, since an odd
    /// length drops the second value of the last pair (step 3). Pairs are computed in blocks
    /// that the compiler vectorises; the values equal those of [`GaussianStream::next_pair`].
    fn fill_fresh(&mut self, out: &mut [f32]) {
        let whole = out.len() / (2 * BLOCK) * (2 * BLOCK);
        let (blocks, rest) = out.split_at_mut(whole);
        fill_blocks_portable(self.state, blocks);
        self.state = self
            .state
            .wrapping_add(((whole / 2) as u64).wrapping_mul(GAMMA));
        let mut tail = rest.chunks_exact_mut(2);
        for pair in &mut tail {
            (pair[0], pair[1]) = self.next_pair();
        }
        if let [last] = tail.into_remainder() {
            *last = self.next_pair().0;
        }
    }
}

/// Pairs per block of the vectorised generator.
const BLOCK: usize = 16;

/// Fills whole blocks of `2 * BLOCK` values, pair `i` from `mix(base + (i + 1) GAMMA)`: the
/// reference generator, and the one of targets without [`avx2`].
#[inline(always)]
fn fill_blocks_portable(base: u64, out: &mut [f32]) {
    for (b, block) in out.chunks_exact_mut(2 * BLOCK).enumerate() {
        let first = (b * BLOCK) as u64;
        let mut r = [0f32; BLOCK];
        let mut c = [0f32; BLOCK];
        let mut s = [0f32; BLOCK];
        for lane in 0..BLOCK {
            let bits = mix(base.wrapping_add((first + lane as u64 + 1).wrapping_mul(GAMMA)));
            let (k1, k2) = split_bits(bits);
            r[lane] = radius(k1);
            (c[lane], s[lane]) = sincos_turn(k2);
        }
        for lane in 0..BLOCK {
            block[2 * lane] = r[lane] * c[lane];
            block[2 * lane + 1] = r[lane] * s[lane];
        }
    }
}

#[inline(always)]
fn split_bits(bits: u64) -> (u32, u32) {
    ((bits >> 40) as u32, ((bits >> 8) as u32) & 0x00FF_FFFF)
}

#[inline(always)]
fn gaussian_pair(bits: u64) -> (f32, f32) {
    let (k1, k2) = split_bits(bits);
    let r = radius(k1);
    let (c, s) = sincos_turn(k2);
    (r * c, r * s)
}

#[inline(always)]
fn radius(k1: u32) -> f32 {
    sqrtf(-2.0 * ln_u1(k1))
}

#[inline(always)]
fn sqrtf(x: f32) -> f32 {
    // Both are IEEE correctly rounded; std's lowers to the SIMD instruction.
    #[cfg(feature = "std")]
    {
        x.sqrt()
    }
    #[cfg(not(feature = "std"))]
    {
        libm::sqrtf(x)
    }
}

/// `ln u1` for `u1 = (k1 + 1) / 2^24`, `k1 < 2^24` (step 3). `x = k1 + 1` is exact in f32 and is
/// split as `x = 2^e m` with `m` in [sqrt(1/2), sqrt(2)); then `ln u1 = (e - 24) ln 2 + ln m`,
/// `ln m = 2 t (1 + t^2/3 + t^4/5 + t^6/7 + t^8/9)`, `t = (m - 1) / (m + 1)`, |t| < 0.172
/// (truncation error below 4e-10).
#[inline(always)]
pub fn ln_u1(k1: u32) -> f32 {
    let x = (k1 + 1) as f32;
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32) - 127;
    let mut m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000);
    let big = m > core::f32::consts::SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += big as i32;
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let series = 1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0))));
    (e - 24) as f32 * core::f32::consts::LN_2 + 2.0 * t * series
}

/// `(cos 2 pi u2, sin 2 pi u2)` for `u2 = k2 / 2^24`, `k2 < 2^24` (step 3). The quadrant is
/// `q = k2 >> 22`; `theta = (k2 mod 2^22) / 2^22 * pi/2` in [0, pi/2) is evaluated by Taylor
/// polynomials (sin to theta^11, cos to theta^12, Horner in theta^2; error below 6e-8) and
/// rotated by `q` quarter turns.
#[inline(always)]
pub fn sincos_turn(k2: u32) -> (f32, f32) {
    let q = k2 >> 22;
    let theta = (k2 & 0x003F_FFFF) as f32 * (core::f32::consts::FRAC_PI_2 / 4_194_304.0);
    let t2 = theta * theta;
    let sin = theta
        * (1.0
            - t2 / 6.0
                * (1.0 - t2 / 20.0 * (1.0 - t2 / 42.0 * (1.0 - t2 / 72.0 * (1.0 - t2 / 110.0)))));
    let cos = 1.0
        - t2 / 2.0
            * (1.0
                - t2 / 12.0
                    * (1.0
                        - t2 / 30.0 * (1.0 - t2 / 56.0 * (1.0 - t2 / 90.0 * (1.0 - t2 / 132.0)))));
    let swap = q & 1 == 1;
    let (x, y) = if swap { (sin, cos) } else { (cos, sin) };
    let neg_cos = q == 1 || q == 2;
    let neg_sin = q >= 2;
    (if neg_cos { -x } else { x }, if neg_sin { -y } else { y })
}

/// The AVX2 fast path of [`fill_direction`], bit for bit the portable code.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
mod avx2;

impl Iterator for GaussianStream {
    type Item = f32;

    #[inline]
    fn next(&mut self) -> Option<f32> {
        if let Some(s) = self.spare.take() {
            return Some(s);
        }
        let (a, b) = self.next_pair();
        self.spare = Some(b);
        Some(a)
    }
}

/// The f32 factor `1 / ||z||` of step 4, given the raw values.
fn inverse_norm(z: impl Iterator<Item = f32>) -> Option<f32> {
    let mut lanes = [0f64; 8];
    for (j, x) in z.enumerate() {
        lanes[j % 8] += (x as f64) * (x as f64);
    }
    finish_norm(lanes)
}

fn finish_norm(lanes: [f64; 8]) -> Option<f32> {
    let sum = lanes.iter().fold(0.0, |acc, l| acc + l);
    (sum > 0.0).then(|| (1.0 / libm::sqrt(sum)) as f32)
}

/// [`inverse_norm`] over a slice, in eight lanes the compiler can vectorise.
fn inverse_norm_of(z: &[f32]) -> Option<f32> {
    finish_norm(square_lanes(z))
}

/// The eight partial sums of step 4: `lanes[l]` adds `z_j^2` over `j = l mod 8`, in increasing `j`.
fn square_lanes(z: &[f32]) -> [f64; 8] {
    let mut lanes = [0f64; 8];
    let mut blocks = z.chunks_exact(8);
    for block in &mut blocks {
        for (l, x) in lanes.iter_mut().zip(block) {
            *l += (*x as f64) * (*x as f64);
        }
    }
    for (l, x) in lanes.iter_mut().zip(blocks.remainder()) {
        *l += (*x as f64) * (*x as f64);
    }
    lanes
}

/// Writes the normalised direction `v_hat` of length `out.len()` named by `seed` into `out`.
pub fn fill_direction(seed: DirectionSeed, out: &mut [f32]) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if let Some(token) = crate::simd::Avx2::detect() {
        return avx2::fill_direction(token, seed, out);
    }
    fill_direction_portable(seed, out)
}

/// [`fill_direction`] in portable code: the reference, and the path of every target without
/// [`avx2`] (device firmware).
fn fill_direction_portable(seed: DirectionSeed, out: &mut [f32]) {
    GaussianStream::new(seed).fill_fresh(out);
    normalise(out, inverse_norm_of(out));
}

/// Step 4 once the factor is known: `v_j = z_j * inv`, or the first unit vector.
#[inline(always)]
fn normalise(out: &mut [f32], inv: Option<f32>) {
    match inv {
        Some(inv) => out.iter_mut().for_each(|x| *x *= inv),
        None => {
            out.iter_mut().for_each(|x| *x = 0.0);
            if let Some(first) = out.first_mut() {
                *first = 1.0;
            }
        }
    }
}

/// One seeded term of an update: the direction and its directional derivative
/// `dd_p = (L+ - L-) / (2 eps)` (thesis eq. 13).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpdateTerm {
    pub seed: DirectionSeed,
    pub derivative: f32,
}

/// Algorithm 1, lines 10 and 12, for directions already in memory: `g = sum_p dd_p * v_p`
/// (f32, starting from 0, terms in order), then `w_i -= scale * g_i`, with
/// `scale = lr * n_chunk / P`. `g` is scratch of `params.len()` values.
pub fn step_with_vectors<'a>(
    params: &mut [f32],
    scale: f32,
    terms: impl IntoIterator<Item = (f32, &'a [f32])>,
    g: &mut [f32],
) {
    let g = &mut g[..params.len()];
    g.iter_mut().for_each(|x| *x = 0.0);
    for (derivative, v) in terms {
        assert_eq!(v.len(), g.len(), "direction length differs from the chunk");
        for (gi, vi) in g.iter_mut().zip(v) {
            *gi += derivative * vi;
        }
    }
    for (w, gi) in params.iter_mut().zip(g.iter()) {
        *w -= scale * gi;
    }
}

/// The seeded update of Algorithm 1, lines 10 and 12: the directions are regenerated from their
/// seeds into `v` and applied by [`step_with_vectors`]. `v` and `g` are scratch of
/// `params.len()` values each. Equals [`apply_update_streaming`] bit for bit.
pub fn apply_update(
    params: &mut [f32],
    scale: f32,
    terms: &[UpdateTerm],
    v: &mut [f32],
    g: &mut [f32],
) {
    let n = params.len();
    let g = &mut g[..n];
    g.iter_mut().for_each(|x| *x = 0.0);
    for t in terms {
        fill_direction(t.seed, &mut v[..n]);
        for (gi, vi) in g.iter_mut().zip(&v[..n]) {
            *gi += t.derivative * vi;
        }
    }
    for (w, gi) in params.iter_mut().zip(g.iter()) {
        *w -= scale * gi;
    }
}

/// Most directions one update may carry.
pub const MAX_UPDATE_TERMS: usize = 64;

/// The same update as [`apply_update`], in constant memory: each direction is generated twice
/// (once for its norm, once while applying) and the P streams advance in lockstep. Suits firmware
/// with little RAM. Panics with more than [`MAX_UPDATE_TERMS`] terms.
pub fn apply_update_streaming(params: &mut [f32], scale: f32, terms: &[UpdateTerm]) {
    assert!(
        terms.len() <= MAX_UPDATE_TERMS,
        "at most {MAX_UPDATE_TERMS} directions per update"
    );
    let n = params.len();
    // None: the degenerate all-zero draw, whose direction is the first unit vector (step 4).
    let mut inv = [None; MAX_UPDATE_TERMS];
    let mut streams = [const { GaussianStream::new(DirectionSeed(0)) }; MAX_UPDATE_TERMS];
    for (p, t) in terms.iter().enumerate() {
        inv[p] = inverse_norm(direction_values(t.seed, n));
        streams[p] = GaussianStream::new(t.seed);
    }
    for (i, w) in params.iter_mut().enumerate() {
        let mut g = 0.0f32;
        for (p, t) in terms.iter().enumerate() {
            let z = streams[p].next().unwrap_or(0.0);
            let v = match inv[p] {
                Some(inv) => z * inv,
                None if i == 0 => 1.0,
                None => 0.0,
            };
            g += t.derivative * v;
        }
        *w -= scale * g;
    }
}

/// The raw values of the direction `seed` names, for a chunk of length `n` (steps 2 and 3).
pub fn direction_values(seed: DirectionSeed, n: usize) -> impl Iterator<Item = f32> {
    GaussianStream::new(seed).take(n)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    fn key(index: u32) -> DirectionKey {
        DirectionKey {
            run_seed: 0,
            epoch: 0,
            batch: 0,
            layer: 0,
            group: ParamGroup::Weights,
            chunk: 0,
            index,
        }
    }

    #[test]
    fn every_field_of_the_key_changes_the_seed() {
        let base = key(0);
        let variants = [
            DirectionKey {
                run_seed: 1,
                ..base
            },
            DirectionKey { epoch: 1, ..base },
            DirectionKey { batch: 1, ..base },
            DirectionKey { layer: 1, ..base },
            DirectionKey {
                group: ParamGroup::Projection,
                ..base
            },
            DirectionKey { chunk: 1, ..base },
            DirectionKey { index: 1, ..base },
        ];
        let mut seeds: Vec<u64> = variants.iter().map(|k| k.seed().0).collect();
        seeds.push(base.seed().0);
        seeds.sort();
        seeds.dedup();
        assert_eq!(seeds.len(), 8);
    }

    #[test]
    fn the_specification_is_pinned() {
        // Pins the bit-level specification of the module docs: firmware built from another copy
        // of this crate must reproduce these values. Changing them breaks every device.
        assert_eq!(
            key(0).seed().0,
            0xcaba_2e92_b6c2_ed73,
            "{:#x}",
            key(0).seed().0
        );
        let mut v = [0f32; 5];
        fill_direction(DirectionSeed(42), &mut v);
        let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            bits,
            vec![1039309214, 1049730038, 3196052156, 3208151630, 1058113676]
        );
    }

    #[test]
    fn the_polynomials_are_accurate_over_their_whole_domain() {
        let mut worst_ln = 0f64;
        let mut worst_trig = 0f64;
        for k in (0..1u32 << 24)
            .step_by(997)
            .chain([0, (1 << 24) - 1, 1 << 22, 3 << 22])
        {
            let u1 = (k as f64 + 1.0) / 16_777_216.0;
            worst_ln = worst_ln.max((ln_u1(k) as f64 - u1.ln()).abs() / u1.ln().abs().max(1.0));
            let angle = core::f64::consts::TAU * k as f64 / 16_777_216.0;
            let (c, s) = sincos_turn(k);
            worst_trig = worst_trig
                .max((c as f64 - angle.cos()).abs())
                .max((s as f64 - angle.sin()).abs());
        }
        assert!(worst_ln < 3e-7, "ln error {worst_ln}");
        assert!(worst_trig < 3e-7, "sin/cos error {worst_trig}");
        assert_eq!(ln_u1((1 << 24) - 1), 0.0);
    }

    #[test]
    fn directions_are_unit_norm_and_gaussian() {
        let n = 100_000;
        let mut v = vec![0f32; n];
        fill_direction(key(3).seed(), &mut v);
        let norm: f64 = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6, "norm {norm}");
        // Rescaled by sqrt(n) the entries are ~N(0, 1): check mean, variance and kurtosis.
        let z: Vec<f64> = v.iter().map(|x| *x as f64 * (n as f64).sqrt()).collect();
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = z.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / var.powi(2);
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!((kurt - 3.0).abs() < 0.1, "kurtosis {kurt}");
        let beyond_2 = z.iter().filter(|x| x.abs() > 2.0).count() as f64 / n as f64;
        assert!((beyond_2 - 0.0455).abs() < 0.005, "P(|z|>2) = {beyond_2}");
    }

    #[test]
    fn fill_and_stream_agree_for_odd_and_even_lengths() {
        for n in [1usize, 2, 7, 64, 1001] {
            let mut v = vec![0f32; n];
            fill_direction(DirectionSeed(n as u64), &mut v);
            let raw: Vec<f32> = direction_values(DirectionSeed(n as u64), n).collect();
            let inv = inverse_norm(raw.iter().copied()).unwrap();
            let streamed: Vec<f32> = raw.iter().map(|z| z * inv).collect();
            assert_eq!(v, streamed, "length {n}");
        }
    }

    #[test]
    fn streaming_update_equals_buffered_update_bit_for_bit() {
        let terms = [
            UpdateTerm {
                seed: DirectionSeed(5),
                derivative: 0.75,
            },
            UpdateTerm {
                seed: DirectionSeed(6),
                derivative: -2.5,
            },
            UpdateTerm {
                seed: DirectionSeed(7),
                derivative: 1e-3,
            },
        ];
        for n in [1usize, 9, 500] {
            let init: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let (mut a, mut b) = (init.clone(), init.clone());
            let (mut v, mut g) = (vec![0.0; n], vec![0.0; n]);
            apply_update(&mut a, 0.01, &terms, &mut v, &mut g);
            apply_update_streaming(&mut b, 0.01, &terms);
            assert_eq!(a, b);
            assert_ne!(a, init);
        }
    }

    #[test]
    fn update_follows_algorithm_1() {
        // w -= scale * sum_p dd_p v_p, checked against an explicit computation in f64.
        let n = 33;
        let terms = [
            UpdateTerm {
                seed: DirectionSeed(8),
                derivative: 0.5,
            },
            UpdateTerm {
                seed: DirectionSeed(9),
                derivative: -1.5,
            },
        ];
        let mut w = vec![0.25f32; n];
        let (mut v, mut g) = (vec![0.0; n], vec![0.0; n]);
        apply_update(&mut w, 0.2, &terms, &mut v, &mut g);
        let mut v8 = vec![0f32; n];
        let mut v9 = vec![0f32; n];
        fill_direction(DirectionSeed(8), &mut v8);
        fill_direction(DirectionSeed(9), &mut v9);
        for i in 0..n {
            let expect = 0.25 - 0.2 * (0.5 * v8[i] as f64 - 1.5 * v9[i] as f64);
            assert!((w[i] as f64 - expect).abs() < 1e-6);
        }
    }

    /// Seeds for the comparisons of the AVX2 and portable paths: edge values (the first counter
    /// 0, counters wrapping around 2^64) and pseudo-random ones.
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    fn comparison_seeds() -> Vec<DirectionSeed> {
        let edges = [
            0,
            1,
            42,
            u64::MAX,
            GAMMA.wrapping_neg(),
            5u64.wrapping_mul(GAMMA).wrapping_neg(),
        ];
        edges
            .into_iter()
            .chain((0..40).map(|i| mix(i ^ 0x5EED)))
            .chain([key(0).seed().0, key(3).seed().0])
            .map(DirectionSeed)
            .collect()
    }

    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    #[test]
    fn the_avx2_path_equals_the_portable_path_bit_for_bit() {
        let Some(token) = crate::simd::Avx2::detect() else {
            crate::skipped::skipped(
                "the_avx2_path_equals_the_portable_path_bit_for_bit",
                "no AVX2 on this CPU: nothing to compare",
            );
            return;
        };
        let lengths = [
            0usize, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 999, 1000, 1001,
            39_249, 39_250,
        ];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for seed in comparison_seeds() {
            for n in lengths {
                // Raw values and the eight f64 partial sums, before step 4.
                let mut raw = vec![f32::NAN; n];
                GaussianStream::new(seed).fill_fresh(&mut raw);
                let mut raw_avx2 = vec![f32::NAN; n];
                // SAFETY: the CPU supports AVX2, checked above.
                let lanes = unsafe { avx2::fill_raw(seed, &mut raw_avx2) };
                assert_eq!(
                    bits(&raw_avx2),
                    bits(&raw),
                    "raw values, seed {seed:?}, length {n}"
                );
                let expect = square_lanes(&raw).map(f64::to_bits);
                assert_eq!(
                    lanes.map(f64::to_bits),
                    expect,
                    "partial sums, seed {seed:?}, length {n}"
                );
                // The whole of `fill_direction`.
                let mut portable = vec![f32::NAN; n];
                fill_direction_portable(seed, &mut portable);
                let mut fast = vec![f32::NAN; n];
                avx2::fill_direction(token, seed, &mut fast);
                assert_eq!(
                    bits(&fast),
                    bits(&portable),
                    "direction, seed {seed:?}, length {n}"
                );
                let mut public = vec![f32::NAN; n];
                fill_direction(seed, &mut public);
                assert_eq!(
                    bits(&public),
                    bits(&portable),
                    "fill_direction, seed {seed:?}, length {n}"
                );
            }
        }
    }

    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    #[test]
    fn the_avx2_arithmetic_equals_the_portable_one_on_every_input() {
        use core::arch::x86_64::*;
        let Some(_) = crate::simd::Avx2::detect() else {
            crate::skipped::skipped(
                "the_avx2_arithmetic_equals_the_portable_one_on_every_input",
                "no AVX2 on this CPU: nothing to compare",
            );
            return;
        };
        /// Radius, cos and sin of the 8 lanes `k1 = k..k+8`, `k2 = k'..k'+8`.
        #[target_feature(enable = "avx2")]
        unsafe fn eval(k1: &[u32; 8], k2: &[u32; 8]) -> ([f32; 8], [f32; 8], [f32; 8]) {
            let (mut r, mut c, mut s) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            // SAFETY: each array holds 8 values of 4 bytes, one unaligned 32-byte access.
            unsafe {
                let k1 = _mm256_loadu_si256(k1.as_ptr().cast());
                let k2 = _mm256_loadu_si256(k2.as_ptr().cast());
                let (cv, sv) = avx2::sincos_turn(k2);
                _mm256_storeu_ps(r.as_mut_ptr(), avx2::radius(k1));
                _mm256_storeu_ps(c.as_mut_ptr(), cv);
                _mm256_storeu_ps(s.as_mut_ptr(), sv);
            }
            (r, c, s)
        }
        // Every 24-bit k1 and k2 (k2 in another order, so that lanes mix quadrants).
        for k in (0..1u32 << 24).step_by(8) {
            let k1: [u32; 8] = core::array::from_fn(|l| k + l as u32);
            let k2 = k1.map(|k| k.wrapping_mul(0x9E3779B1) & 0x00FF_FFFF);
            // SAFETY: the CPU supports AVX2, checked above.
            let (r, c, s) = unsafe { eval(&k1, &k2) };
            for l in 0..8 {
                let (ce, se) = sincos_turn(k2[l]);
                assert_eq!(
                    r[l].to_bits(),
                    radius(k1[l]).to_bits(),
                    "radius, k1 = {}",
                    k1[l]
                );
                assert_eq!(c[l].to_bits(), ce.to_bits(), "cos, k2 = {}", k2[l]);
                assert_eq!(s[l].to_bits(), se.to_bits(), "sin, k2 = {}", k2[l]);
            }
        }
        // The keys from `mix`, on pseudo-random and edge counters.
        #[target_feature(enable = "avx2")]
        unsafe fn keys8(c: &[u64; 8]) -> ([u32; 8], [u32; 8]) {
            let (mut k1, mut k2) = ([0u32; 8], [0u32; 8]);
            // SAFETY: `c` holds 8 values of 8 bytes, two unaligned 32-byte reads; `k1` and `k2`
            // 8 values of 4 bytes, one unaligned 32-byte write each.
            unsafe {
                let a = _mm256_loadu_si256(c.as_ptr().cast());
                let b = _mm256_loadu_si256(c.as_ptr().add(4).cast());
                let (v1, v2) = avx2::keys_of(a, b);
                _mm256_storeu_si256(k1.as_mut_ptr().cast(), v1);
                _mm256_storeu_si256(k2.as_mut_ptr().cast(), v2);
            }
            (k1, k2)
        }
        let edges = [
            0,
            1,
            u64::MAX,
            1 << 32,
            (1 << 32) - 1,
            1 << 63,
            GAMMA,
            GAMMA.wrapping_neg(),
        ];
        let counters = edges
            .into_iter()
            .chain((0..1u64 << 17).map(|i| mix(i).wrapping_mul(GAMMA)));
        let counters: Vec<u64> = counters.collect();
        for c in counters.chunks_exact(8) {
            let c: [u64; 8] = c.try_into().unwrap();
            // SAFETY: the CPU supports AVX2, checked above.
            let (k1, k2) = unsafe { keys8(&c) };
            // Lanes hold pairs 0 1 4 5 | 2 3 6 7.
            for (lane, pair) in [0, 1, 4, 5, 2, 3, 6, 7].into_iter().enumerate() {
                let expect = split_bits(mix(c[pair]));
                assert_eq!((k1[lane], k2[lane]), expect, "keys of {:#x}", c[pair]);
            }
        }
    }
}
