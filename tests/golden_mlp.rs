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
    // (ours, recorded) L+ - L- of every direction.
    let mut differences = Vec::new();
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
                let mut ours = [0f64; 2];
                for (o, sign) in ours.iter_mut().zip([1.0f32, -1.0]) {
                    let mut perturbed = theta.clone();
                    perturbed[chunk.clone()]
                        .iter_mut()
                        .zip(&v)
                        .for_each(|(w, vi)| *w += sign * eps * vi);
                    forward_with(&perturbed, n_in, n_out, &input, 256, &mut act);
                    matmul(256, classes, n_out, &act, &m, &mut goodness, false);
                    *o = cross_entropy(&goodness, classes, &labels);
                }
                differences.push((ours[0] - ours[1], lp - lm));
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
                let mut ours = [0f64; 2];
                for (o, sign) in ours.iter_mut().zip([1.0f32, -1.0]) {
                    let mut perturbed = m.clone();
                    perturbed[rows.start * classes..rows.end * classes]
                        .iter_mut()
                        .zip(&u)
                        .for_each(|(w, ui)| *w += sign * eps * ui);
                    matmul(256, classes, n_out, &act, &perturbed, &mut goodness, false);
                    *o = cross_entropy(&goodness, classes, &labels);
                }
                differences.push((ours[0] - ours[1], lp - lm));
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
    // L+ - L- is small (README of golden/: ~2e-5, rounding moves it by ~1 %): a fixed
    // tolerance near the smallest difference would pass a derivative of the wrong sign. The gap
    // must stay well below the smallest recorded difference.
    let worst = (differences.iter())
        .map(|(ours, recorded)| (ours - recorded).abs())
        .fold(0.0, f64::max);
    let smallest = (differences.iter())
        .map(|(_, recorded)| recorded.abs())
        .fold(f64::INFINITY, f64::min);
    eprintln!("recomputed L+ - L-: largest gap {worst:.2e}, smallest |L+ - L-| {smallest:.2e}");
    assert!(
        worst < smallest / 4.0,
        "recomputed L+ - L- differ from the recording by up to {worst:.2e}, against a smallest \
         recorded difference of {smallest:.2e}"
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

/// The same recorded batch through the real `Trainer::train_batch`, the real simulated layers and
/// the real `Sgd` (the directions and, for the steps, the recorded `L±` fed in by
/// `common::replay`): `W` and `M` after the step must be the recording's.
#[test]
fn the_trainer_replays_the_recorded_batch() {
    use common::replay::{ReplayOracle, ReplayRule, difference_gap, split_by_layer};
    use pnn::backend::sim::SimOracle;
    use pnn::model::InitialParams;
    use pnn::oracle::{Activations, ForwardOracle, LayerShape};
    use pnn::train::projection::Projection;
    use pnn::train::{Hyper, Trainer};

    let g = Golden::load();
    let hp: Vec<f64> = npy::<f64>(&g.arrays, "hparams").data;
    let (p, eps, lr, chunk_max) = (hp[0] as usize, hp[1] as f32, hp[2] as f32, hp[3] as usize);
    let classes = 10;
    let specs = [
        LayerShape::Dense {
            inputs: 784,
            outputs: 50,
        },
        LayerShape::Dense {
            inputs: 50,
            outputs: 50,
        },
    ];
    let sizes: Vec<_> = (specs.iter())
        .map(|s| (s.param_count(), s.feature_width() * classes))
        .collect();
    let recording = split_by_layer(
        &g.f32("v_hat_concat"),
        &npy::<i64>(&g.arrays, "v_hat_lengths").data,
        &npy::<f64>(&g.arrays, "L_plus_minus").data,
        p,
        &sizes,
    );
    let oracles: Vec<_> = (specs.iter().zip(&recording))
        .map(|(s, r)| ReplayOracle::new(SimOracle::new(*s), &r.weights))
        .collect();
    let init = InitialParams {
        layers: (0..2).map(|l| g.f32(&format!("theta{l}_before"))).collect(),
        projections: (0..2)
            .map(|l| Projection::new(50, classes, g.f32(&format!("M{l}_before"))))
            .collect(),
    };
    let hyper = Hyper {
        lr,
        eps,
        directions: p,
        chunk_max,
        batch_size: 256,
        seed: 0,
        ..Hyper::default()
    };
    let rule = ReplayRule::new(recording.clone(), eps);
    let log = rule.log.clone();
    let mut trainer = Trainer::new(oracles, init, hyper)
        .unwrap()
        .with_update_rule(rule);
    let labels: Vec<u8> = (npy::<i64>(&g.arrays, "y").data.iter())
        .map(|&y| y as u8)
        .collect();
    let x = Activations::new(256, 784, g.f32("x"));
    let clean_losses = trainer.train_batch(0, 0, &x, &labels).unwrap();

    let state = trainer.host_state();
    for l in 0..2 {
        let dw = max_abs_diff(&state.shadows[l], &g.f32(&format!("theta{l}_after")));
        let dm = max_abs_diff(&state.projections[l].data, &g.f32(&format!("M{l}_after")));
        eprintln!("layer {l}: W differs by {dw:.2e}, M by {dm:.2e}");
        assert!(
            dw < 1e-6,
            "layer {l}: W after the trainer's step differs by {dw}"
        );
        assert!(
            dm < 1e-6,
            "layer {l}: M after the trainer's step differs by {dm}"
        );
        // The layer holds what the trainer's shadow says.
        let held = trainer.oracles_mut()[l].inner.read_parameters().unwrap();
        assert_eq!(held, state.shadows[l], "layer {l}: shadow and layer differ");
        assert_eq!(
            trainer.oracles()[l].unused(),
            0,
            "layer {l}: directions unused"
        );
        // The clean loss the trainer reports (features of the updated W, before M's step) is the
        // midpoint of the recorded M evaluations, up to O(eps²).
        for &(lp, lm) in &recording[l].projection_losses {
            let mid = (lp + lm) / 2.0;
            assert!(
                (mid - clean_losses[l]).abs() < 1e-6,
                "layer {l}: clean loss {}, recorded midpoint {mid}",
                clean_losses[l]
            );
        }
    }
    // The derivatives the trainer computed itself, from the real layers' features.
    let log = log.lock().unwrap();
    assert_eq!(
        log.len(),
        recording.iter().map(|r| r.weights.len()).sum::<usize>()
    );
    let (worst, smallest) = difference_gap(&log, eps);
    eprintln!("L+ - L-: largest gap {worst:.2e}, smallest recorded |L+ - L-| {smallest:.2e}");
    assert!(
        worst < smallest / 4.0,
        "the trainer's L+ - L- differs from the recording by up to {worst:.2e}, against a \
         smallest recorded difference of {smallest:.2e}"
    );
}
