//! The one place where the simulator multiplies matrices, so that the library behind it is
//! chosen by measurement. Today: the `gemm` crate, single-threaded (these machines have two
//! logical cores on one physical core; threads gave nothing).
//!
//! All matrices are dense, row-major f32 slices.

/// `c (m x n) = [c +] a (m x k) · b (k x n)`.
pub fn matmul(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], accumulate: bool) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "matmul: slice too short"
    );
    // SAFETY: the assertion above keeps every index the strides reach inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `c (m x n) = [c +] a (m x k) · bᵀ` where `b` is stored (n x k): a dense layer's `x Wᵀ`.
pub fn matmul_a_bt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "matmul: slice too short"
    );
    // SAFETY: as in `matmul`; bᵀ is read with row stride 1 and column stride k.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
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
    fn both_layouts_agree_with_the_definition() {
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
        // bᵀ stored (n x k)
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
    }
}
