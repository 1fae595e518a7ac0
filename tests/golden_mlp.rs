//! Replays the recorded MF+DD batch of an independent implementation (shared/reference/golden):
//! it pins the update arithmetic, the parameter layout, the chunking and the order of Algorithm 1.

mod common;

use common::{npy, read_npz, shared_dir};
use firmware_protocol::direction::step_with_vectors;
use pnn::data::{Dataset, DatasetKind};
use pnn::oracle::ChunkUnits;
use pnn::train::chunking::projection_row_chunks;
use pnn::train::loss::cross_entropy;
use pnn_sim::dense::forward_with;
use pnn_sim::matmul::matmul;

struct Golden {
    arrays: std::collections::HashMap<String, Vec<u8>>,
}

impl Golden {
    fn load() -> Self {
        Self {
            arrays: read_npz(&shared_dir().join("reference/golden/mnist_P2_seed0_batch0.npz")),
        }
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        npy::<f32>(&self.arrays, name).data
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// One layer of Algorithm 1 driven by the recorded directions (W chunks x P, then M chunks x P)
/// and, for the derivatives, `derivative(k, L+, L-)` which either takes the recorded losses or
/// recomputes them.
#[test]
fn recorded_directions_and_losses_reproduce_the_recorded_update() {
    let g = Golden::load();
    let hp: Vec<f64> = npy::<f64>(&g.arrays, "hparams").data;
    let (p_count, eps, lr, c_max) = (hp[0] as usize, hp[1] as f32, hp[2] as f32, hp[3] as usize);
    assert_eq!((p_count, c_max), (2, 50_000));
    let v_all = g.f32("v_hat_concat");
    let v_len: Vec<i64> = npy::<i64>(&g.arrays, "v_hat_lengths").data;
    let losses = npy::<f64>(&g.arrays, "L_plus_minus").data;
    let labels: Vec<u8> = npy::<i64>(&g.arrays, "y")
        .data
        .iter()
        .map(|&y| y as u8)
        .collect();
    let x = npy::<f32>(&g.arrays, "x");
    assert_eq!(x.shape, vec![256, 784]);

    let widths = [784usize, 50, 50];
    let classes = 10;
    let mut offset = 0;
    let mut k = 0;
    let mut next_direction = |n: usize| {
        assert_eq!(
            v_len[k] as usize, n,
            "direction {k} has another length: layout or chunking differs"
        );
        let v = v_all[offset..offset + n].to_vec();
        offset += n;
        k += 1;
        (v, k - 1)
    };
    let mut input = x.data.clone();
    let mut worst_recomputed = 0f64;
    for l in 0..2 {
        let (n_in, n_out) = (widths[l], widths[l + 1]);
        let mut theta = g.f32(&format!("theta{l}_before"));
        let mut m = g.f32(&format!("M{l}_before"));
        let mut scratch = Vec::new();
        let mut act = Vec::new();
        let mut goodness = vec![0f32; 256 * classes];
        for chunk in ChunkUnits::Flat.chunks(theta.len(), c_max) {
            let mut terms = Vec::new();
            for _ in 0..p_count {
                let (v, idx) = next_direction(chunk.len());
                let (lp, lm) = (losses[2 * idx], losses[2 * idx + 1]);
                // Recompute L± from x and the parameters: equal to ~1e-6 (README of golden/).
                for (sign, recorded) in [(1.0f32, lp), (-1.0, lm)] {
                    let mut perturbed = theta.clone();
                    perturbed[chunk.clone()]
                        .iter_mut()
                        .zip(&v)
                        .for_each(|(w, vi)| *w += sign * eps * vi);
                    forward_with(&perturbed, n_in, n_out, &input, 256, &mut act);
                    matmul(256, classes, n_out, &act, &m, &mut goodness, false);
                    let ours = cross_entropy(&goodness, classes, &labels);
                    worst_recomputed = worst_recomputed.max((ours - recorded).abs());
                }
                terms.push((((lp - lm) / (2.0 * eps as f64)) as f32, v));
            }
            scratch.resize(chunk.len(), 0.0);
            let scale = lr * chunk.len() as f32 / p_count as f32;
            step_with_vectors(
                &mut theta[chunk],
                scale,
                terms.iter().map(|(d, v)| (*d, &v[..])),
                &mut scratch,
            );
        }
        let diff = max_abs_diff(&theta, &g.f32(&format!("theta{l}_after")));
        assert!(
            diff < 1e-6,
            "layer {l}: W after the update differs by {diff}"
        );
        // M is trained on the clean activations of the updated W, which also feed layer l+1.
        forward_with(&theta, n_in, n_out, &input, 256, &mut act);
        for rows in projection_row_chunks(n_out, classes, c_max) {
            let n = rows.len() * classes;
            let mut terms = Vec::new();
            for _ in 0..p_count {
                let (u, idx) = next_direction(n);
                let (lp, lm) = (losses[2 * idx], losses[2 * idx + 1]);
                for (sign, recorded) in [(1.0f32, lp), (-1.0, lm)] {
                    let mut perturbed = m.clone();
                    perturbed[rows.start * classes..rows.end * classes]
                        .iter_mut()
                        .zip(&u)
                        .for_each(|(w, ui)| *w += sign * eps * ui);
                    matmul(256, classes, n_out, &act, &perturbed, &mut goodness, false);
                    let ours = cross_entropy(&goodness, classes, &labels);
                    worst_recomputed = worst_recomputed.max((ours - recorded).abs());
                }
                terms.push((((lp - lm) / (2.0 * eps as f64)) as f32, u));
            }
            scratch.resize(n, 0.0);
            let scale = lr * n as f32 / p_count as f32;
            let chunk = &mut m[rows.start * classes..rows.end * classes];
            step_with_vectors(
                chunk,
                scale,
                terms.iter().map(|(d, u)| (*d, &u[..])),
                &mut scratch,
            );
        }
        let diff = max_abs_diff(&m, &g.f32(&format!("M{l}_after")));
        assert!(
            diff < 1e-6,
            "layer {l}: M after the update differs by {diff}"
        );
        input = act;
    }
    assert_eq!(offset, v_all.len(), "not every recorded direction was used");
    assert!(
        worst_recomputed < 2e-6,
        "recomputed losses differ from the recording by {worst_recomputed}"
    );
}

#[test]
fn our_normalisation_gives_the_recorded_inputs() {
    let g = Golden::load();
    let x = g.f32("x");
    let data =
        Dataset::load(DatasetKind::Mnist, &common::data_dir()).expect("MNIST in shared/data");
    let first: Vec<usize> = (0..256).collect();
    let mut ours = Vec::new();
    data.normalizer.batch(&data.train, &first, &mut ours);
    let diff = max_abs_diff(&ours, &x);
    assert!(diff < 1e-4, "normalised inputs differ by {diff}");
    let labels: Vec<u8> = npy::<i64>(&g.arrays, "y")
        .data
        .iter()
        .map(|&y| y as u8)
        .collect();
    assert_eq!(&data.train.labels[..256], &labels[..]);
}
