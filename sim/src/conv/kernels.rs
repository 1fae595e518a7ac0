//! The elementwise kernels of the CNN block's fast path (`conv::ConvBlock`'s perturbed
//! evaluation). Each is written once, portably, and compiled a second time with AVX2 and FMA
//! for CPUs that have them (chosen in `crate::simd`): the same IEEE operations in the same
//! order, so the same bits either way (`mul_add` is one rounding with or without an FMA unit).
//! The build targets baseline x86-64 (SSE2), where these loops ran at a quarter of the width.

use crate::simd::multiversion;

/// Lanes the kernels work in (two AVX2 registers of f32).
const LANES: usize = 16;

/// Directions whose contributions [`direction_contributions`] computes side by side.
pub(crate) const DIRECTIONS_AT_ONCE: usize = 4;

/// For each of up to [`DIRECTIONS_AT_ONCE`] directions `q` (row `q` of `v`, row stride `ldv`,
/// `taps` long): `out[q * ldo + i] = sum_t v[q][t] cols_t[t * ld + start + i]` for `i < len`,
/// one fused multiply-add per tap in tap order. That is the contribution
/// `v ⊛ x` of the directions' conv weights to a run of pre-activation columns, from the
/// transposed unfolded input (taps x columns, row stride `ld`). The directions share each load
/// of the input, and their independent sums hide the latency of the multiply-adds.
pub(crate) fn direction_contributions(
    v: &[f32],
    (rows, ldv, taps): (usize, usize, usize),
    cols_t: &[f32],
    (ld, start): (usize, usize),
    out: &mut [f32],
    (len, ldo): (usize, usize),
) {
    let k = Contributions {
        v,
        ldv,
        taps,
        cols_t,
        ld,
        start,
        len,
        ldo,
    };
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe {
                match rows {
                    1 => contributions_wide::<1>(k, out),
                    2 => contributions_wide::<2>(k, out),
                    3 => contributions_wide::<3>(k, out),
                    4 => contributions_wide::<4>(k, out),
                    _ => panic!("{rows} directions at once"),
                }
            };
        }
    }
    match rows {
        1 => contributions_body::<1>(k, out),
        2 => contributions_body::<2>(k, out),
        3 => contributions_body::<3>(k, out),
        4 => contributions_body::<4>(k, out),
        _ => panic!("{rows} directions at once"),
    }
}

/// The operands of [`direction_contributions`].
#[derive(Clone, Copy)]
struct Contributions<'a> {
    v: &'a [f32],
    ldv: usize,
    taps: usize,
    cols_t: &'a [f32],
    ld: usize,
    start: usize,
    len: usize,
    ldo: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn contributions_wide<const Q: usize>(k: Contributions, out: &mut [f32]) {
    contributions_body::<Q>(k, out)
}

#[inline(always)]
fn contributions_body<const Q: usize>(k: Contributions, out: &mut [f32]) {
    let Contributions {
        v,
        ldv,
        taps,
        cols_t,
        ld,
        start,
        len,
        ldo,
    } = k;
    assert!(out.len() >= (Q - 1) * ldo + len);
    assert!(taps == 0 || cols_t.len() >= (taps - 1) * ld + start + len);
    assert!(v.len() >= (Q - 1) * ldv + taps);
    let w: [&[f32]; Q] = std::array::from_fn(|q| &v[q * ldv..][..taps]);
    let full = len - len % LANES;
    for i in (0..full).step_by(LANES) {
        let mut acc = [[0f32; LANES]; Q];
        for t in 0..taps {
            let src: &[f32; LANES] = cols_t[t * ld + start + i..][..LANES].try_into().unwrap();
            for q in 0..Q {
                let vt = w[q][t];
                for (a, x) in acc[q].iter_mut().zip(src) {
                    *a = vt.mul_add(*x, *a);
                }
            }
        }
        for q in 0..Q {
            out[q * ldo + i..][..LANES].copy_from_slice(&acc[q]);
        }
    }
    for i in full..len {
        for q in 0..Q {
            let mut acc = 0f32;
            for t in 0..taps {
                acc = w[q][t].mul_add(cols_t[t * ld + start + i], acc);
            }
            out[q * ldo + i] = acc;
        }
    }
}

multiversion! {
    /// `sum a[i] b[i]` (as long as `a`) in f64, where the products of f32 values are exact
    /// (sixteen interleaved partial sums).
    fn dot_f64 / dot_f64_wide / dot_f64_body(a: &[f32], b: &[f32]) -> f64
}

#[inline(always)]
fn dot_f64_body(a: &[f32], b: &[f32]) -> f64 {
    let b = &b[..a.len()];
    let mut acc = [0f64; LANES];
    let (ab, bb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ab.remainder(), bb.remainder());
    for (x, y) in ab.zip(bb) {
        for l in 0..LANES {
            acc[l] = (x[l] as f64).mul_add(y[l] as f64, acc[l]);
        }
    }
    for (l, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[l] = (*x as f64).mul_add(*y as f64, acc[l]);
    }
    acc.iter().sum()
}

multiversion! {
    /// Over a run of one channel's columns: `[sum dz, sum dz², sum (z0 - mean0) dz]` (f64,
    /// sixteen interleaved partial sums each), the moments from which the batch statistics of
    /// `z0 + s dz` follow for any `s`.
    fn perturbation_sums / perturbation_sums_wide / perturbation_sums_body(
        z0: &[f32],
        dz: &[f32],
        mean0: f64
    ) -> [f64; 3]
}

#[inline(always)]
fn perturbation_sums_body(z0: &[f32], dz: &[f32], mean0: f64) -> [f64; 3] {
    assert_eq!(z0.len(), dz.len());
    let (mut s1, mut s2, mut s12) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    let (zb, db) = (z0.chunks_exact(LANES), dz.chunks_exact(LANES));
    let (zr, dr) = (zb.remainder(), db.remainder());
    for (z, d) in zb.zip(db) {
        for l in 0..LANES {
            let x = d[l] as f64;
            s1[l] += x;
            s2[l] += x * x;
            s12[l] += (z[l] as f64 - mean0) * x;
        }
    }
    for (l, (z, d)) in zr.iter().zip(dr).enumerate() {
        let x = *d as f64;
        s1[l] += x;
        s2[l] += x * x;
        s12[l] += (*z as f64 - mean0) * x;
    }
    [s1, s2, s12].map(|s| s.iter().sum())
}

multiversion! {
    /// BatchNorm and ReLU of both perturbed pre-activations `z0 ± eps (dz + vb)` at once:
    /// `plus = max(0, (z0 + t) alpha+ + shift+)`, `minus = max(0, (z0 - t) alpha- + shift-)`,
    /// `t = eps (dz + vb)`, each affine `(alpha, shift)` of [`crate::conv`]'s BatchNorm form.
    fn bn_relu_pair / bn_relu_pair_wide / bn_relu_pair_body(
        z0: &[f32],
        dz: &[f32],
        eps_vb: (f32, f32),
        affine: [(f32, f32); 2],
        plus: &mut [f32],
        minus: &mut [f32]
    )
}

#[inline(always)]
fn bn_relu_pair_body(
    z0: &[f32],
    dz: &[f32],
    (eps, vb): (f32, f32),
    [(ap, sp), (am, sm)]: [(f32, f32); 2],
    plus: &mut [f32],
    minus: &mut [f32],
) {
    let len = z0.len();
    let (dz, plus, minus) = (&dz[..len], &mut plus[..len], &mut minus[..len]);
    for i in 0..len {
        let t = eps * (dz[i] + vb);
        plus[i] = ((z0[i] + t) * ap + sp).max(0.0);
        minus[i] = ((z0[i] - t) * am + sm).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 1e7 - 0.8
            })
            .collect()
    }

    #[test]
    fn wide_and_portable_builds_agree_bit_for_bit() {
        // Lengths around the lane count, so that the tails run too.
        for len in [1, 15, 16, 17, 100, 784] {
            let (v, cols) = (values(4 * 11, 1), values(9 * 1000, 2));
            for rows in 1..=DIRECTIONS_AT_ONCE {
                let (mut a, mut b) = (vec![0.0; rows * len], vec![0.0; rows * len]);
                direction_contributions(&v, (rows, 11, 9), &cols, (1000, 3), &mut a, (len, len));
                let k = Contributions {
                    v: &v,
                    ldv: 11,
                    taps: 9,
                    cols_t: &cols,
                    ld: 1000,
                    start: 3,
                    len,
                    ldo: len,
                };
                match rows {
                    1 => contributions_body::<1>(k, &mut b),
                    2 => contributions_body::<2>(k, &mut b),
                    3 => contributions_body::<3>(k, &mut b),
                    _ => contributions_body::<4>(k, &mut b),
                }
                assert_eq!(a, b);
                for q in 0..rows {
                    for i in 0..len {
                        let direct: f64 = (0..9)
                            .map(|t| v[q * 11 + t] as f64 * cols[t * 1000 + 3 + i] as f64)
                            .sum();
                        let x = a[q * len + i] as f64;
                        assert!((x - direct).abs() < 1e-5, "{x} vs {direct}");
                    }
                }
            }

            let (z0, dz) = (values(len, 3), values(len, 4));
            let dot_direct: f64 = z0.iter().zip(&dz).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert_eq!(dot_f64(&z0, &dz), dot_f64_body(&z0, &dz));
            assert!((dot_f64(&z0, &dz) - dot_direct).abs() < 1e-12 * len as f64);
            let s = perturbation_sums(&z0, &dz, 0.25);
            assert_eq!(s, perturbation_sums_body(&z0, &dz, 0.25));
            let direct = z0.iter().zip(&dz).fold([0f64; 3], |acc, (z, d)| {
                let d = *d as f64;
                [acc[0] + d, acc[1] + d * d, acc[2] + (*z as f64 - 0.25) * d]
            });
            for (x, y) in s.iter().zip(direct) {
                assert!((x - y).abs() < 1e-9 * len as f64, "{x} vs {y}");
            }

            let affine = [(1.5, -0.1), (0.7, 0.2)];
            let (mut p1, mut m1, mut p2, mut m2) = (
                vec![0.0; len],
                vec![0.0; len],
                vec![0.0; len],
                vec![0.0; len],
            );
            bn_relu_pair(&z0, &dz, (1e-2, 0.3), affine, &mut p1, &mut m1);
            bn_relu_pair_body(&z0, &dz, (1e-2, 0.3), affine, &mut p2, &mut m2);
            assert_eq!((&p1, &m1), (&p2, &m2));
            for i in 0..len {
                let t = 1e-2 * (dz[i] + 0.3);
                assert_eq!(p1[i], ((z0[i] + t) * 1.5 - 0.1).max(0.0));
                assert_eq!(m1[i], ((z0[i] - t) * 0.7 + 0.2).max(0.0));
            }
        }
    }
}
