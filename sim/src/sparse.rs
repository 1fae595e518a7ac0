//! Products with inputs that are mostly one value: normalised MNIST-like images (the background
//! pixel) and ReLU outputs (zero). A row is kept as that background value `β` plus the entries
//! that differ from it, and `x bᵀ = β (1 bᵀ) + (x - β) bᵀ`: the second product touches only the
//! differing entries. Exact up to float rounding, like any reordering of a sum.
//!
//! Each output value is summed in an order fixed by its input row alone (four interleaved partial
//! sums over the row's entries, then `β` times the column sum), never by the product's width or
//! the column's position in it: a column computed in a wide fused product has the same bits as in
//! a narrow one. The AVX2 kernel fuses multiply and add (FMA), the portable one does not, so the
//! bits differ between machines with and without them, as the `gemm` crate's do.

use crate::matmul::View;
use crate::simd;

/// Panel width: two AVX registers of f32, so each stored entry's index and value are loaded
/// once for 16 outputs. Every row of the input runs over one panel (k x 16 values) before the
/// next. Measured on the MNIST layer (256 x 784 at 19% density, n = 254): 768 us a product with
/// 16, 926 with 8, 810 with 24 (the dense product: 1398 us).
const PANEL: usize = 16;

/// The rows of a matrix (rows x cols) as a background value and each row's other entries.
#[derive(Clone, Debug, Default)]
pub struct SparseRows {
    rows: usize,
    cols: usize,
    background: f32,
    /// Row `i`'s entries are `index[starts[i]..starts[i + 1]]`, `value[..]` (the differences
    /// `x - β`).
    starts: Vec<u32>,
    index: Vec<u32>,
    value: Vec<f32>,
}

impl SparseRows {
    /// The rows of `data` (rows x cols), if at most `max_density` of its entries differ from its
    /// smallest value (the background of a normalised image, the zero of a ReLU output).
    pub fn detect(data: &[f32], rows: usize, cols: usize, max_density: f32) -> Option<Self> {
        let mut s = Self::default();
        s.detect_into(data, rows, cols, max_density).then_some(s)
    }

    /// [`SparseRows::detect`] into an existing value, reusing its buffers; returns whether the
    /// data was sparse enough (the value is meaningless otherwise).
    pub fn detect_into(
        &mut self,
        data: &[f32],
        rows: usize,
        cols: usize,
        max_density: f32,
    ) -> bool {
        assert_eq!(
            data.len(),
            rows * cols,
            "sparse rows: shape and data disagree"
        );
        if data.is_empty() || cols > u32::MAX as usize {
            return false;
        }
        // The smallest value, in eight lanes that vectorise (NaN never compares smaller).
        let mut lanes = [f32::INFINITY; 8];
        let mut blocks = data.chunks_exact(8);
        for block in &mut blocks {
            for (m, &x) in lanes.iter_mut().zip(block) {
                *m = if x < *m { x } else { *m };
            }
        }
        let background = (lanes.iter().chain(blocks.remainder()))
            .fold(f32::INFINITY, |m, &x| if x < m { x } else { m });
        if !background.is_finite() {
            return false;
        }
        let limit = (max_density * data.len() as f32) as usize;
        self.rows = rows;
        self.cols = cols;
        self.background = background;
        self.starts.clear();
        self.starts.push(0);
        // Room for one more row than the limit allows (and 8 slots past it): each row is
        // compacted into the slots after the entries so far.
        let capacity = data.len().min(limit + cols) + 8;
        self.index.resize(capacity, 0);
        self.value.resize(capacity, 0.0);
        let mut count = 0;
        for row in data.chunks_exact(cols) {
            if count + cols + 8 > capacity {
                return false;
            }
            let index = &mut self.index[count..count + cols + 8];
            let value = &mut self.value[count..count + cols + 8];
            count += compact(row, background, index, value);
            if count > limit {
                return false;
            }
            self.starts.push(count as u32);
        }
        self.index.truncate(count);
        self.value.truncate(count);
        true
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Entries that differ from the background.
    pub fn stored(&self) -> usize {
        self.index.len()
    }

    fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let r = self.starts[i] as usize..self.starts[i + 1] as usize;
        (&self.index[r.clone()], &self.value[r])
    }
}

/// Writes the entries of `row` that differ from `background` (as `x - background`) and their
/// positions to the front of `value` and `index` (each 8 longer than `row`); returns how many.
fn compact(row: &[f32], background: f32, index: &mut [u32], value: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if simd::avx2() {
        // SAFETY: the feature was just detected.
        return unsafe { compact_avx2(row, background, index, value) };
    }
    compact_portable(row, background, index, value)
}

fn compact_portable(row: &[f32], background: f32, index: &mut [u32], value: &mut [f32]) -> usize {
    let mut n = 0;
    for (j, &x) in row.iter().enumerate() {
        if x != background {
            index[n] = j as u32;
            value[n] = x - background;
            n += 1;
        }
    }
    n
}

/// For each 8-bit mask, the positions of its set bits, in order, then zeros: the permutation
/// that packs the selected lanes of a register to its front.
#[cfg(target_arch = "x86_64")]
const PACK_LANES: [[u32; 8]; 256] = {
    let mut table = [[0u32; 8]; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut lane, mut n) = (0, 0);
        while lane < 8 {
            if mask & (1 << lane) != 0 {
                table[mask][n] = lane as u32;
                n += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    table
};

/// [`compact`] eight entries at a time, without a branch: the lanes off the background are
/// packed to the front of a register by a permutation from [`PACK_LANES`], all eight are
/// stored, and the count advances by how many were selected (the next block overwrites the
/// rest). `index` and `value` need 8 slots of room past the entries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn compact_avx2(
    row: &[f32],
    background: f32,
    index: &mut [u32],
    value: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    let bg = _mm256_set1_ps(background);
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut n = 0;
    let mut blocks = row.chunks_exact(8);
    for (b, block) in (&mut blocks).enumerate() {
        assert!(n + 8 <= index.len() && n + 8 <= value.len());
        // SAFETY: `block` holds eight values; the assert keeps both stores inside the slices;
        // the table holds a row for every 8-bit mask.
        unsafe {
            let x = _mm256_loadu_ps(block.as_ptr());
            let mask = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(x, bg)) as usize;
            let order = _mm256_loadu_si256(PACK_LANES[mask].as_ptr().cast());
            let diff = _mm256_sub_ps(x, bg);
            let at = _mm256_add_epi32(lanes, _mm256_set1_epi32((b * 8) as i32));
            _mm256_storeu_ps(
                value.as_mut_ptr().add(n),
                _mm256_permutevar8x32_ps(diff, order),
            );
            _mm256_storeu_si256(
                index.as_mut_ptr().add(n).cast(),
                _mm256_permutevar8x32_epi32(at, order),
            );
            n += mask.count_ones() as usize;
        }
    }
    let done = row.len() - blocks.remainder().len();
    for (j, &x) in blocks.remainder().iter().enumerate() {
        if x != background {
            index[n] = (done + j) as u32;
            value[n] = x - background;
            n += 1;
        }
    }
    n
}

/// Scratch of [`sparse_gemm_bt`]: the right-hand side packed into panels, and its column sums.
#[derive(Clone, Debug, Default)]
pub struct Packed {
    /// The panels from `start` on, which is 64-byte aligned: a panel's row of PANEL values is
    /// then one cache line, which the kernel loads for every stored entry.
    buffer: Vec<f32>,
    start: usize,
    column_sums: Vec<f32>,
}

impl Packed {
    fn panels(&self) -> &[f32] {
        &self.buffer[self.start..]
    }

    /// Room for `len` values of panels, aligned.
    fn panels_mut(&mut self, len: usize) -> &mut [f32] {
        const LINE: usize = 64 / std::mem::size_of::<f32>();
        // Grown, never shrunk: products of different widths share the buffer, and a
        // regrowth would zero what is about to be written anyway.
        if self.buffer.len() < len + LINE {
            self.buffer.resize(len + LINE, 0.0);
        }
        let misalignment = self.buffer.as_ptr().align_offset(64);
        self.start = if misalignment < LINE { misalignment } else { 0 };
        let start = self.start;
        &mut self.buffer[start..start + len]
    }
}

/// `c (m x n, row stride ldc) = [c +] a (m x k) · bᵀ`, `b` stored n x k (a dense layer's weights,
/// or stacked directions): [`crate::matmul::gemm_into`] with `b_transposed`, for sparse `a`.
pub fn sparse_gemm_bt(
    a: &SparseRows,
    b: View,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    packed: &mut Packed,
) {
    let (m, k, n) = (a.rows, a.cols, b.rows);
    assert_eq!(b.cols, k, "sparse product: inner dimensions differ");
    assert!(
        b.cols <= b.ld || b.rows <= 1,
        "row stride shorter than a row"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        b.data.len() >= (n - 1) * b.ld + k,
        "sparse product: right-hand side too short"
    );
    assert!(
        n <= ldc && c.len() >= (m - 1) * ldc + n,
        "sparse product: output too short"
    );
    crate::matmul::count_flops(2 * (a.stored() * n + k * n) as u64);
    pack(b, packed);
    let avx2 = simd::avx2_fma();
    // Panels write disjoint columns and each value's sum does not depend on its panel: they run
    // on threads when the product is large enough (`crate::threads`), with the same bits.
    let panels = n.div_ceil(PANEL);
    let split = 2 * a.stored() * n >= crate::threads::WORTH_A_THREAD;
    let out = Output {
        c: crate::threads::SharedMut(c.as_mut_ptr()),
        ldc,
        n,
        accumulate,
    };
    let packed = &*packed;
    crate::threads::for_each(panels, split, |p| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the features were detected above; the shapes were checked above.
            unsafe { kernel_avx2(a, packed, p, out) };
            return;
        }
        kernel_portable(a, packed, p, out);
    });
}

/// Where a panel's results go: `c` (rows x ldc, `n` columns used), written or added to.
#[derive(Clone, Copy)]
struct Output {
    c: crate::threads::SharedMut<f32>,
    ldc: usize,
    n: usize,
    accumulate: bool,
}

impl Output {
    /// Writes (or adds) panel `p`'s result for input row `row`, the lanes inside `n`.
    ///
    /// # Safety
    /// `c` must hold `rows` rows of `ldc` (checked by [`sparse_gemm_bt`]), borrowed mutably
    /// throughout, and no other caller may write panel `p`'s columns at the same time.
    #[inline(always)]
    unsafe fn store(self, row: usize, p: usize, out: &[f32; PANEL]) {
        let lanes = PANEL.min(self.n - p * PANEL);
        // SAFETY: see above; the columns p * PANEL.. p * PANEL + lanes lie inside `n <= ldc`.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(self.c.ptr().add(row * self.ldc + p * PANEL), lanes)
        };
        if self.accumulate {
            dst.iter_mut().zip(out).for_each(|(d, o)| *d += o);
        } else {
            dst.copy_from_slice(&out[..lanes]);
        }
    }
}

/// `b` (n x k) into panels of [`PANEL`] columns of `bᵀ`, each k x PANEL, zero past `n`; and the
/// column sums `1 bᵀ`, each summed in input order.
fn pack(b: View, packed: &mut Packed) {
    let (n, k) = (b.rows, b.cols);
    let panels = n.div_ceil(PANEL);
    packed.column_sums.resize(panels * PANEL, 0.0);
    let mut column_sums = std::mem::take(&mut packed.column_sums);
    let all = packed.panels_mut(panels * k * PANEL);
    for (p, panel) in all.chunks_exact_mut(k * PANEL).enumerate() {
        let full = (p + 1) * PANEL <= n;
        #[cfg(target_arch = "x86_64")]
        let done = full && simd::avx() && {
            // SAFETY: the feature was just detected; the panel's PANEL rows exist.
            unsafe { transpose_panel_avx(b, p * PANEL, panel) };
            true
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = !full && false;
        if !done {
            transpose_panel(b, p * PANEL, panel);
        }
        // Each lane's sum runs over its row in input order.
        let mut sums = [0f32; PANEL];
        for column in panel.chunks_exact(PANEL) {
            for (s, x) in sums.iter_mut().zip(column) {
                *s += x;
            }
        }
        column_sums[p * PANEL..(p + 1) * PANEL].copy_from_slice(&sums);
    }
    packed.column_sums = column_sums;
}

/// Rows `first..first + PANEL` of `b` (zeros past its end) into `panel` as k x PANEL.
fn transpose_panel(b: View, first: usize, panel: &mut [f32]) {
    let k = b.cols;
    for t in 0..PANEL {
        let r = first + t;
        if r < b.rows {
            let row = &b.data[r * b.ld..][..k];
            for (j, &x) in row.iter().enumerate() {
                panel[j * PANEL + t] = x;
            }
        } else {
            for j in 0..k {
                panel[j * PANEL + t] = 0.0;
            }
        }
    }
}

/// [`transpose_panel`] for a panel of whole rows, 8 x 8 blocks at a time in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_panel_avx(b: View, first: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = b.cols;
    assert!(first + PANEL <= b.rows && panel.len() == k * PANEL);
    assert!(b.data.len() >= (first + PANEL - 1) * b.ld + k);
    let whole = k / 8 * 8;
    for half in 0..PANEL / 8 {
        let row = |t: usize| (first + half * 8 + t) * b.ld;
        for j in (0..whole).step_by(8) {
            // SAFETY: rows first..first + PANEL hold k values each (asserted above) and
            // j + 8 <= k; the panel holds k rows of PANEL values.
            unsafe {
                let r: [__m256; 8] =
                    std::array::from_fn(|t| _mm256_loadu_ps(b.data.as_ptr().add(row(t) + j)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let columns = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (c, v) in columns.iter().enumerate() {
                    _mm256_storeu_ps(panel.as_mut_ptr().add((j + c) * PANEL + half * 8), *v);
                }
            }
        }
        for j in whole..k {
            for t in 0..8 {
                panel[j * PANEL + half * 8 + t] = b.data[row(t) + j];
            }
        }
    }
}

/// Panel `p` of the product, portable.
fn kernel_portable(a: &SparseRows, packed: &Packed, p: usize, out: Output) {
    let k = a.cols;
    let panel = &packed.panels()[p * k * PANEL..(p + 1) * k * PANEL];
    let sums = &packed.column_sums[p * PANEL..(p + 1) * PANEL];
    for i in 0..a.rows {
        let (index, value) = a.row(i);
        let mut acc = [[0f32; PANEL]; 4];
        let mut quads = index.chunks_exact(4).zip(value.chunks_exact(4));
        for (ix, vx) in &mut quads {
            for q in 0..4 {
                let col = &panel[ix[q] as usize * PANEL..][..PANEL];
                for t in 0..PANEL {
                    acc[q][t] += vx[q] * col[t];
                }
            }
        }
        let done = index.len() / 4 * 4;
        for (q, (&j, &v)) in index[done..].iter().zip(&value[done..]).enumerate() {
            let col = &panel[j as usize * PANEL..][..PANEL];
            for t in 0..PANEL {
                acc[q][t] += v * col[t];
            }
        }
        let mut result = [0f32; PANEL];
        for t in 0..PANEL {
            let partial = (acc[0][t] + acc[1][t]) + (acc[2][t] + acc[3][t]);
            result[t] = a.background * sums[t] + partial;
        }
        // SAFETY: this call alone writes panel p (see `sparse_gemm_bt`).
        unsafe { out.store(i, p, &result) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(a: &SparseRows, packed: &Packed, p: usize, out: Output) {
    use std::arch::x86_64::*;
    const W: usize = PANEL / 8;
    let k = a.cols;
    let panel = &packed.panels()[p * k * PANEL..(p + 1) * k * PANEL];
    let base = panel.as_ptr();
    // SAFETY (all loads below): `column_sums` holds whole panels; every stored index is below k,
    // so `index * PANEL + PANEL <= k * PANEL`, inside this panel.
    let sums: [__m256; W] = std::array::from_fn(|w| unsafe {
        _mm256_loadu_ps(packed.column_sums.as_ptr().add(p * PANEL + 8 * w))
    });
    let background = _mm256_set1_ps(a.background);
    for i in 0..a.rows {
        let (index, value) = a.row(i);
        let mut acc = [[_mm256_setzero_ps(); W]; 4];
        let mut quads = index.chunks_exact(4).zip(value.chunks_exact(4));
        for (ix, vx) in &mut quads {
            for q in 0..4 {
                let v = _mm256_set1_ps(vx[q]);
                let at = unsafe { base.add(ix[q] as usize * PANEL) };
                for (w, acc) in acc[q].iter_mut().enumerate() {
                    unsafe {
                        let col = _mm256_loadu_ps(at.add(8 * w));
                        *acc = _mm256_fmadd_ps(v, col, *acc);
                    }
                }
            }
        }
        let done = index.len() / 4 * 4;
        for (q, (&j, &v)) in index[done..].iter().zip(&value[done..]).enumerate() {
            let v = _mm256_set1_ps(v);
            let at = unsafe { base.add(j as usize * PANEL) };
            for (w, acc) in acc[q].iter_mut().enumerate() {
                unsafe {
                    let col = _mm256_loadu_ps(at.add(8 * w));
                    *acc = _mm256_fmadd_ps(v, col, *acc);
                }
            }
        }
        let mut result = [0f32; PANEL];
        for w in 0..W {
            let partial = _mm256_add_ps(
                _mm256_add_ps(acc[0][w], acc[1][w]),
                _mm256_add_ps(acc[2][w], acc[3][w]),
            );
            let value = _mm256_add_ps(_mm256_mul_ps(background, sums[w]), partial);
            // SAFETY: `result` holds PANEL = 8 W values.
            unsafe { _mm256_storeu_ps(result.as_mut_ptr().add(8 * w), value) };
        }
        // SAFETY: this call alone writes panel p (see `sparse_gemm_bt`).
        unsafe { out.store(i, p, &result) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::gemm_into;

    fn image_like(rows: usize, cols: usize, background: f32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                if (i * 7919) % 5 < 4 {
                    background
                } else {
                    background + ((i * 31 % 97) as f32) / 40.0
                }
            })
            .collect()
    }

    #[test]
    fn agrees_with_the_dense_product_in_every_layout() {
        for (m, k, n, accumulate) in [(9, 37, 21, false), (5, 784, 8, true), (1, 3, 1, false)] {
            let x = image_like(m, k, -0.42);
            let a = SparseRows::detect(&x, m, k, 0.5).expect("sparse enough");
            assert_eq!(a.stored(), x.iter().filter(|&&v| v != -0.42).count());
            // b is n x k inside a wider matrix (row stride k + 3).
            let ld = k + 3;
            let b: Vec<f32> = (0..n * ld)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
                .collect();
            let bv = View {
                data: &b,
                rows: n,
                cols: k,
                ld,
            };
            let ldc = n + 2;
            let mut want = vec![0.5f32; m * ldc];
            let mut got = want.clone();
            gemm_into(View::new(&x, m, k), bv, true, &mut want, ldc, accumulate);
            sparse_gemm_bt(&a, bv, &mut got, ldc, accumulate, &mut Packed::default());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let scale = (k as f32).sqrt() * 2.0;
                assert!((g - w).abs() < 1e-5 * scale, "{i}: {g} vs {w}");
            }
            // Columns past n of each output row are untouched.
            for row in got.chunks_exact(ldc) {
                assert_eq!(&row[n..], &[0.5, 0.5]);
            }
        }
    }

    #[test]
    fn a_column_has_the_same_bits_in_a_narrow_and_a_wide_product() {
        let (m, k, n) = (6, 50, 19);
        let x = image_like(m, k, 0.0);
        let a = SparseRows::detect(&x, m, k, 0.5).unwrap();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 17 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut wide = vec![0f32; m * n];
        sparse_gemm_bt(
            &a,
            View::new(&b, n, k),
            &mut wide,
            n,
            false,
            &mut Packed::default(),
        );
        for col in [0, 7, 8, 18] {
            let mut narrow = vec![0f32; m];
            let one = View::new(&b[col * k..(col + 1) * k], 1, k);
            sparse_gemm_bt(&a, one, &mut narrow, 1, false, &mut Packed::default());
            for i in 0..m {
                assert_eq!(narrow[i].to_bits(), wide[i * n + col].to_bits());
            }
        }
    }

    /// The portable code, which CPUs without AVX2 run, agrees with what this one ran above.
    #[test]
    fn the_portable_paths_agree_with_the_vectorised_ones() {
        let (m, k, n) = (7, 45, 35);
        let x = image_like(m, k, 0.25);
        let a = SparseRows::detect(&x, m, k, 0.5).unwrap();
        for row in x.chunks_exact(k) {
            let (mut i1, mut v1) = (vec![0u32; k + 8], vec![0f32; k + 8]);
            let (mut i2, mut v2) = (i1.clone(), v1.clone());
            let n1 = compact(row, 0.25, &mut i1, &mut v1);
            let n2 = compact_portable(row, 0.25, &mut i2, &mut v2);
            assert_eq!((&i1[..n1], &v1[..n1]), (&i2[..n2], &v2[..n2]));
        }
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 19 % 37) as f32 - 18.0) / 11.0)
            .collect();
        let mut packed = Packed::default();
        pack(View::new(&b, n, k), &mut packed);
        let mut panel = vec![0f32; k * PANEL];
        for p in 0..n.div_ceil(PANEL) {
            transpose_panel(View::new(&b, n, k), p * PANEL, &mut panel);
            assert_eq!(panel, packed.panels()[p * k * PANEL..(p + 1) * k * PANEL]);
        }
        let mut got = vec![0f32; m * n];
        let out = Output {
            c: crate::threads::SharedMut(got.as_mut_ptr()),
            ldc: n,
            n,
            accumulate: false,
        };
        for p in 0..n.div_ceil(PANEL) {
            kernel_portable(&a, &packed, p, out);
        }
        let mut want = vec![0f32; m * n];
        gemm_into(
            View::new(&x, m, k),
            View::new(&b, n, k),
            true,
            &mut want,
            n,
            false,
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
    }

    #[test]
    fn dense_data_is_not_taken_for_sparse() {
        let x: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert!(SparseRows::detect(&x, 10, 10, 0.5).is_none());
        let relu: Vec<f32> = (0..100)
            .map(|i| if i % 3 == 0 { 1.0 } else { 0.0 })
            .collect();
        let s = SparseRows::detect(&relu, 10, 10, 0.5).unwrap();
        assert_eq!(s.stored(), 34);
        assert!(SparseRows::detect(&[f32::NAN; 4], 2, 2, 0.5).is_none());
    }
}
