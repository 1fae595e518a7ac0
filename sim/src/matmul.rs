//! The one place where the simulator multiplies matrices, so that the library behind it is
//! chosen by measurement. Today: the `gemm` crate, each call on one thread; a large product is
//! cut into blocks of rows that run on [`crate::threads`] (gemm's own threading was slower on
//! these shapes). `gemm` picks its SIMD kernel at run time, so products (and everything trained
//! from them) are bit-identical on one machine but may differ in the last bits between CPUs with
//! and without FMA.
//!
//! Matrices are dense, row-major f32 slices; `ld*` are row strides.

use std::sync::atomic::{AtomicU64, Ordering};

static FLOPS: AtomicU64 = AtomicU64::new(0);

/// Floating-point operations (2 per multiply-add) of every product since the process started,
/// for benchmarks that report achieved GFLOP/s.
pub fn flops_so_far() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

/// Adds the floating-point operations of a product computed outside [`gemm_into`].
pub(crate) fn count_flops(flops: u64) {
    FLOPS.fetch_add(flops, Ordering::Relaxed);
}

/// A row-major matrix view: `rows x cols` with row stride `ld`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl<'a> View<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            ld: cols,
        }
    }

    fn check(&self) {
        assert!(
            self.cols <= self.ld || self.rows <= 1,
            "row stride shorter than a row"
        );
        if self.rows > 0 && self.cols > 0 {
            assert!(
                self.data.len() >= (self.rows - 1) * self.ld + self.cols,
                "matmul: slice too short"
            );
        }
    }
}

/// `c (m x n, row stride ldc) = [c +] a (m x k) · op(b)`, where `op(b)` is `b` (k x n) or, with
/// `b_transposed`, the transpose of `b` stored (n x k): a dense layer's `x Wᵀ`.
pub fn gemm_into(
    a: View,
    b: View,
    b_transposed: bool,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    a.check();
    b.check();
    let (m, k) = (a.rows, a.cols);
    let (kb, n) = if b_transposed {
        (b.cols, b.rows)
    } else {
        (b.rows, b.cols)
    };
    assert_eq!(k, kb, "matmul: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        n <= ldc && c.len() >= (m - 1) * ldc + n,
        "matmul: output too short"
    );
    FLOPS.fetch_add(2 * (m * n * k) as u64, Ordering::Relaxed);
    let (rhs_cs, rhs_rs) = if b_transposed {
        (b.ld as isize, 1)
    } else {
        (1, b.ld as isize)
    };
    // Large products are cut into blocks of rows of `a` (and `c`) by their shape alone, each
    // block a product of its own, so that the blocks can run on threads and the bits do not
    // depend on how many (see `crate::threads`).
    let blocks = row_blocks(m, n, k);
    let rows_per_block = m.div_ceil(blocks).next_multiple_of(16).min(m);
    let blocks = m.div_ceil(rows_per_block);
    let out = crate::threads::SharedMut(c.as_mut_ptr());
    crate::threads::for_each_part(blocks, |block| {
        let first = block * rows_per_block;
        let rows = rows_per_block.min(m - first);
        // SAFETY: the checks above keep every index the strides reach inside the slices; the
        // blocks write disjoint rows of `c`, which the caller's `&mut` holds for the duration.
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                out.ptr().add(first * ldc),
                1,
                ldc as isize,
                accumulate,
                a.data.as_ptr().add(first * a.ld),
                1,
                a.ld as isize,
                b.data.as_ptr(),
                rhs_cs,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
}

/// Blocks of rows a product of this shape is cut into: one below
/// [`crate::threads::WORTH_A_THREAD`] operations, else one per 128 rows, at most 8.
fn row_blocks(m: usize, n: usize, k: usize) -> usize {
    if 2 * m * n * k < crate::threads::WORTH_A_THREAD {
        1
    } else {
        (m / 128).clamp(1, 8)
    }
}

/// `c (m x n) = [c +] a (m x k) · b (k x n)`, all contiguous.
pub fn matmul(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    gemm_into(
        View::new(a, m, k),
        View::new(b, k, n),
        false,
        c,
        n,
        accumulate,
    );
}

/// `c (m x n) = [c +] a (m x k) · bᵀ` where `b` is stored (n x k), all contiguous.
pub fn matmul_a_bt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    accumulate: bool,
) {
    gemm_into(
        View::new(a, m, k),
        View::new(b, n, k),
        true,
        c,
        n,
        accumulate,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn every_layout_agrees_with_the_definition() {
        let (m, n, k) = (7, 5, 11);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 13 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let expect = naive(m, n, k, &a, &b);
        let mut c = vec![0.0; m * n];
        matmul(m, n, k, &a, &b, &mut c, false);
        for (x, y) in c.iter().zip(&expect) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        let mut bt = vec![0.0; n * k];
        for l in 0..k {
            for j in 0..n {
                bt[j * k + l] = b[l * n + j];
            }
        }
        let mut c2 = vec![1.0; m * n];
        matmul_a_bt(m, n, k, &a, &bt, &mut c2, true);
        for (x, y) in c2.iter().zip(&expect) {
            assert!((x - (y + 1.0)).abs() < 1e-4, "{x} vs {}", y + 1.0);
        }
        // Columns 1..3 of the product written into a wider matrix, from rows 1..3 of bᵀ.
        let mut wide = vec![0.0; m * 9];
        gemm_into(
            View::new(&a, m, k),
            View {
                data: &bt[k..],
                rows: 2,
                cols: k,
                ld: k,
            },
            true,
            &mut wide[4..],
            9,
            false,
        );
        for i in 0..m {
            for j in 0..2 {
                assert!((wide[i * 9 + 4 + j] - expect[i * n + 1 + j]).abs() < 1e-4);
            }
        }
    }
}
