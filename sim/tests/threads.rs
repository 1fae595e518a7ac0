//! The thread count is a speed setting only: a layer trained on one thread and on two gives the
//! same bits. (A test binary of its own: the count is process-wide.)

use firmware_protocol::{DirectionSeed, UpdateTerm};
use pnn_sim::DenseLayer;
use pnn_sim::matmul::View;
use pnn_sim::sparse::{Packed, SparseRows, sparse_gemm_bt};
use pnn_sim::threads::set_threads;

/// Evaluations and updates of a layer large enough that its products and directions run on
/// threads when there are some: every evaluation's activations and the final parameters.
fn train(input_sparse: bool) -> (Vec<Vec<f32>>, Vec<f32>) {
    let (n_in, n_out, batch) = (1024, 160, 256);
    let mut layer = DenseLayer::new(n_in, n_out);
    let params: Vec<f32> = (0..layer.param_count())
        .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 8000.0)
        .collect();
    layer.set_params(&params).unwrap();
    let x: Vec<f32> = (0..batch * n_in)
        .map(|i| {
            if input_sparse && i % 7 != 0 {
                -0.5
            } else {
                ((i * 31 % 97) as f32 - 48.0) / 50.0
            }
        })
        .collect();
    layer.load_input(&x).unwrap();
    let mut seen = Vec::new();
    let mut out = Vec::new();
    // Chunks of 90,000 parameters and 4 directions: 360,000 values to draw per chunk.
    for (k, chunk) in [0..90_000, 90_000..layer.param_count()]
        .into_iter()
        .enumerate()
    {
        let seeds: Vec<_> = (0..4).map(|p| DirectionSeed(100 * k as u64 + p)).collect();
        layer
            .evaluate_perturbed(chunk.clone(), &seeds, 1e-3, &mut out)
            .unwrap();
        for (plus, minus) in &out {
            seen.push(plus.clone());
            seen.push(minus.clone());
        }
        let terms: Vec<_> = (seeds.iter().enumerate())
            .map(|(p, &seed)| UpdateTerm {
                seed,
                derivative: p as f32 - 1.5,
            })
            .collect();
        layer.apply_update(chunk, 1e-3, &terms).unwrap();
        let mut clean = Vec::new();
        layer.forward(&mut clean).unwrap();
        seen.push(clean);
    }
    (seen, layer.params().to_vec())
}

fn bits(values: &[Vec<f32>]) -> Vec<Vec<u32>> {
    values
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn one_thread_and_two_give_the_same_bits() {
    for sparse in [false, true] {
        set_threads(1);
        let (seen_1, params_1) = train(sparse);
        set_threads(2);
        let (seen_2, params_2) = train(sparse);
        assert_eq!(bits(&seen_1), bits(&seen_2), "sparse input: {sparse}");
        assert_eq!(
            bits(&[params_1]),
            bits(&[params_2]),
            "sparse input: {sparse}"
        );
    }
    // A sparse product large enough to be split by panels.
    let (m, k, n) = (512, 2048, 300);
    let x: Vec<f32> = (0..m * k)
        .map(|i| if i % 5 == 0 { (i % 13) as f32 } else { 0.0 })
        .collect();
    let b: Vec<f32> = (0..n * k)
        .map(|i| ((i * 17 % 23) as f32 - 11.0) / 7.0)
        .collect();
    let a = SparseRows::detect(&x, m, k, 0.25).unwrap();
    let product = |threads| {
        set_threads(threads);
        let mut c = vec![0f32; m * n];
        sparse_gemm_bt(
            &a,
            View::new(&b, n, k),
            &mut c,
            n,
            false,
            &mut Packed::default(),
        );
        c
    };
    assert_eq!(bits(&[product(1)]), bits(&[product(2)]));
}
