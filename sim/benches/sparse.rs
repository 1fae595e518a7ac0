//! The sparse product on the MNIST first layer's shape (`cargo bench -p pnn-sim --bench sparse`):
//! 256 rows of 784 inputs, ~15% of them off the background in the middle of the image, times
//! the 204 rows of four stacked directions. Prints the best of 400 products, on the threads
//! `PNN_THREADS` gives (this product is below the size that is split, so one).

use std::time::Instant;

use pnn_sim::matmul::View;
use pnn_sim::sparse::{Packed, SparseRows, sparse_gemm_bt};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

fn main() {
    let (m, k, n) = (256usize, 784usize, 204usize);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<f32> = (0..m * k)
        .map(|i| {
            let (row, col) = ((i % k) / 28, (i % k) % 28);
            let middle = row.abs_diff(14) < 9 && col.abs_diff(14) < 8;
            if middle && rng.random::<f32>() < 0.45 {
                rng.random::<f32>() * 2.0
            } else {
                -0.42
            }
        })
        .collect();
    let b: Vec<f32> = (0..n * k).map(|_| rng.random::<f32>() - 0.5).collect();
    let a = SparseRows::detect(&x, m, k, 0.5).expect("sparse");
    let mut c = vec![0f32; m * n];
    let mut packed = Packed::default();
    let mut best = f64::MAX;
    for _ in 0..400 {
        let start = Instant::now();
        sparse_gemm_bt(&a, View::new(&b, n, k), &mut c, n, false, &mut packed);
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!(
        "sparse product {m}x{k} ({:.1}% stored) times {n}x{k}ᵀ: best of 400 {:.1} us",
        100.0 * a.stored() as f64 / (m * k) as f64,
        best * 1e6
    );
}
