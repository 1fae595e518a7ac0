//! Products with a left-hand side that stays the same for many products: a dense layer's input,
//! multiplied by the directions of every chunk of a batch. `gemm` packs its left-hand side again
//! for every product (about a fifth of the time of the CIFAR-shaped layer's products); here it is
//! packed once per batch ([`PackedRows::pack`]) and every product reads the packed copy.
//!
//! `c (m x n) = x (m x k) · bᵀ` with `b` stored n x k. Each value is one multiply-add chain over
//! `k` in order, started from zero (then added to `c` where asked): the same bits whatever the
//! product's width, the value's position in it, or how the work is split among threads. The
//! AVX2 kernel fuses each multiply-add (FMA), the portable one does not, so the bits differ
//! between machines with and without them, as the `gemm` crate's do.

/// Rows per panel: two AVX registers of f32.
const MR: usize = 16;
/// Columns per kernel call: 6 x 2 accumulators and the two panel loads fill 14 of 16 registers.
const NR: usize = 6;
/// Inner-dimension block: a panel's block (MR x KC x 4 bytes = 16 KB) stays in L1 while the
/// kernel runs over every column group.
const KC: usize = 256;

/// The left-hand side, packed: panels of MR rows (zero past m), each k-major (MR values per k).
#[derive(Clone, Debug, Default)]
pub struct PackedRows {
    rows: usize,
    cols: usize,
    panels: Vec<f32>,
}

impl PackedRows {
    /// Packs `x` (rows x cols, row-major).
    pub fn pack(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols, "packed rows: shape and data disagree");
        self.rows = rows;
        self.cols = cols;
        let panels = rows.div_ceil(MR);
        if self.panels.len() != panels * MR * cols {
            self.panels.clear();
            self.panels.resize(panels * MR * cols, 0.0);
        }
        let all = crate::threads::SharedMut(self.panels.as_mut_ptr());
        crate::threads::for_each(panels, rows * cols >= 1 << 18, |p| {
            // SAFETY: panel p (MR * cols values from p * MR * cols) lies inside the buffer,
            // which `self` holds mutably throughout, and this part alone writes it.
            let panel =
                unsafe { std::slice::from_raw_parts_mut(all.ptr().add(p * MR * cols), MR * cols) };
            let live = MR.min(rows - p * MR);
            for (j, column) in panel.chunks_exact_mut(MR).enumerate() {
                for (r, v) in column.iter_mut().enumerate() {
                    *v = if r < live {
                        x[(p * MR + r) * cols + j]
                    } else {
                        0.0
                    };
                }
            }
        });
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// `c (m x n, row stride ldc) = [c +] x · bᵀ`, `b` (n rows of k at stride ldb).
#[allow(clippy::too_many_arguments)]
pub fn packed_gemm_bt(
    x: &PackedRows,
    b: &[f32],
    n: usize,
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (m, k) = (x.rows, x.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        k <= ldb && b.len() >= (n - 1) * ldb + k,
        "packed product: b too short"
    );
    assert!(
        n <= ldc && c.len() >= (m - 1) * ldc + n,
        "packed product: c too short"
    );
    crate::matmul::count_flops(2 * (m * n * k) as u64);
    let panels = m.div_ceil(MR);
    let out = crate::threads::SharedMut(c.as_mut_ptr());
    let avx2 = crate::simd::avx2_fma();
    let split = 2 * m * n * k >= crate::threads::WORTH_A_THREAD;
    crate::threads::for_each(panels, split, |p| {
        // The panel's product, transposed: n rows of MR values.
        let mut tile = vec![0f32; n * MR];
        let panel = &x.panels[p * MR * k..(p + 1) * MR * k];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for j0 in (0..n).step_by(NR) {
                let nr = NR.min(n - j0);
                let at = &mut tile[j0 * MR..(j0 + nr) * MR];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: features detected above; `at` holds nr rows of MR values, the
                    // panel k * MR values, b rows j0..j0+nr of ldb >= k values.
                    unsafe { kernel_avx2(panel, k0, kc, b, j0, nr, ldb, at) };
                    continue;
                }
                kernel_portable(panel, k0, kc, b, j0, nr, ldb, at);
            }
        }
        for r in 0..MR.min(m - p * MR) {
            // SAFETY: row p * MR + r of `c` (n values from row * ldc) lies inside it; panel
            // p's rows are written by this part alone, while the caller holds `c` mutably.
            let row =
                unsafe { std::slice::from_raw_parts_mut(out.ptr().add((p * MR + r) * ldc), n) };
            for (j, v) in row.iter_mut().enumerate() {
                let value = tile[j * MR + r];
                *v = if accumulate { *v + value } else { value };
            }
        }
    });
}

/// Adds `panel[k0..k0+kc] · b[j0..j0+nr][k0..k0+kc]ᵀ` to `tile` (nr rows of MR values).
#[allow(clippy::too_many_arguments)]
fn kernel_portable(
    panel: &[f32],
    k0: usize,
    kc: usize,
    b: &[f32],
    j0: usize,
    nr: usize,
    ldb: usize,
    tile: &mut [f32],
) {
    for (j, acc) in tile.chunks_exact_mut(MR).take(nr).enumerate() {
        let brow = &b[(j0 + j) * ldb + k0..][..kc];
        for (kk, &bv) in brow.iter().enumerate() {
            let col = &panel[(k0 + kk) * MR..][..MR];
            for r in 0..MR {
                acc[r] += col[r] * bv;
            }
        }
    }
}

/// [`kernel_avx2_n`] for `nr` columns (1 to NR).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2(
    panel: &[f32],
    k0: usize,
    kc: usize,
    b: &[f32],
    j0: usize,
    nr: usize,
    ldb: usize,
    tile: &mut [f32],
) {
    // SAFETY: as the caller's.
    unsafe {
        match nr {
            6 => kernel_avx2_n::<6>(panel, k0, kc, b, j0, ldb, tile),
            5 => kernel_avx2_n::<5>(panel, k0, kc, b, j0, ldb, tile),
            4 => kernel_avx2_n::<4>(panel, k0, kc, b, j0, ldb, tile),
            3 => kernel_avx2_n::<3>(panel, k0, kc, b, j0, ldb, tile),
            2 => kernel_avx2_n::<2>(panel, k0, kc, b, j0, ldb, tile),
            _ => kernel_avx2_n::<1>(panel, k0, kc, b, j0, ldb, tile),
        }
    }
}

/// Adds `panel[k0..k0+kc] · b[j0..j0+N][k0..k0+kc]ᵀ` to `tile` (N rows of MR values): N x 2
/// accumulators, each one FMA chain over k in order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2_n<const N: usize>(
    panel: &[f32],
    k0: usize,
    kc: usize,
    b: &[f32],
    j0: usize,
    ldb: usize,
    tile: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(tile.len() >= N * MR && panel.len() >= (k0 + kc) * MR);
    assert!(b.len() >= (j0 + N - 1) * ldb + k0 + kc);
    let out = tile.as_mut_ptr();
    // SAFETY: the tile holds N rows of MR values; the panel holds (k0 + kc) * MR values; b
    // holds rows j0..j0+N of at least k0 + kc values each (asserted above).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        for (j, a) in acc.iter_mut().enumerate() {
            a[0] = _mm256_loadu_ps(out.add(j * MR));
            a[1] = _mm256_loadu_ps(out.add(j * MR + 8));
        }
        let bp: [*const f32; N] = std::array::from_fn(|j| b.as_ptr().add((j0 + j) * ldb + k0));
        let mut at = panel.as_ptr().add(k0 * MR);
        for kk in 0..kc {
            let x0 = _mm256_loadu_ps(at);
            let x1 = _mm256_loadu_ps(at.add(8));
            for j in 0..N {
                let v = _mm256_broadcast_ss(&*bp[j].add(kk));
                acc[j][0] = _mm256_fmadd_ps(x0, v, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(x1, v, acc[j][1]);
            }
            at = at.add(MR);
        }
        for (j, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(j * MR), a[0]);
            _mm256_storeu_ps(out.add(j * MR + 8), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::{View, gemm_into};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 31) % 101) as f32 - 50.0) / 37.0)
            .collect()
    }

    #[test]
    fn agrees_with_gemm_in_every_shape_and_layout() {
        // Rows past whole panels, columns past whole groups, k past whole blocks; b and c inside
        // wider matrices; written and added to.
        for (m, n, k, accumulate) in [
            (37, 13, 300, false),
            (16, 6, 256, true),
            (5, 1, 3, false),
            (40, 20, 700, true),
        ] {
            let x = values(m * k, 1);
            let (ldb, ldc) = (k + 5, n + 3);
            let b = values(n * ldb, 2);
            let mut packed = PackedRows::default();
            packed.pack(&x, m, k);
            let start = values(m * ldc, 3);
            let (mut got, mut want) = (start.clone(), start.clone());
            packed_gemm_bt(&packed, &b, n, ldb, &mut got, ldc, accumulate);
            let bv = View {
                data: &b,
                rows: n,
                cols: k,
                ld: ldb,
            };
            gemm_into(View::new(&x, m, k), bv, true, &mut want, ldc, accumulate);
            for (i, (g, w)) in got
                .chunks_exact(ldc)
                .zip(want.chunks_exact(ldc))
                .enumerate()
            {
                for j in 0..n {
                    let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                    assert!(
                        (g[j] - w[j]).abs() < tol,
                        "({i}, {j}): {} vs {}",
                        g[j],
                        w[j]
                    );
                }
                // Columns past n are untouched.
                assert_eq!(&g[n..], &start[i * ldc + n..(i + 1) * ldc]);
            }
        }
    }

    #[test]
    fn a_column_has_the_same_bits_in_a_narrow_and_a_wide_product() {
        let (m, n, k) = (33, 17, 600);
        let x = values(m * k, 4);
        let b = values(n * k, 5);
        let mut packed = PackedRows::default();
        packed.pack(&x, m, k);
        let mut wide = vec![0f32; m * n];
        packed_gemm_bt(&packed, &b, n, k, &mut wide, n, false);
        for col in [0, 5, 6, 16] {
            let mut narrow = vec![0f32; m];
            packed_gemm_bt(
                &packed,
                &b[col * k..(col + 1) * k],
                1,
                k,
                &mut narrow,
                1,
                false,
            );
            for i in 0..m {
                assert_eq!(narrow[i].to_bits(), wide[i * n + col].to_bits());
            }
        }
    }

    /// The code that CPUs without AVX2 run agrees with the definition too.
    #[test]
    fn the_portable_kernel_agrees_with_the_definition() {
        let (n, k) = (7, 300);
        let x = values(MR * k, 6);
        let b = values(n * k, 7);
        let mut packed = PackedRows::default();
        packed.pack(&x, MR, k);
        let mut tile = vec![0f32; n * MR];
        for k0 in (0..k).step_by(KC) {
            kernel_portable(&packed.panels, k0, KC.min(k - k0), &b, 0, n, k, &mut tile);
        }
        for r in 0..MR {
            for j in 0..n {
                let want: f32 = (0..k).map(|l| x[r * k + l] * b[j * k + l]).sum();
                assert!((tile[j * MR + r] - want).abs() < 1e-3, "{r},{j}");
            }
        }
    }
}
