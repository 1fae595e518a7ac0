//! Replays the golden CNN batch recorded by an independent PyTorch implementation
//! (`shared/reference/golden/mnist_cnn_P2_seed0_batch0.npz`, see its README): the update
//! arithmetic, the per-channel parameter layout, the chunking, the block's forward pass and its
//! BatchNorm running statistics against someone else's reading of the paper.

mod common;

use std::fs::File;
use std::path::PathBuf;

use firmware_protocol::direction::step_with_vectors;
use pnn::oracle::{Activations, ForwardMode, LayerShape};
use pnn::train::chunking::projection_row_chunks;
use pnn::train::loss::cross_entropy;
use pnn::train::projection::Projection;
use pnn_sim::Choreography;
use pnn_sim::conv::ConvBlock;

struct Golden(zip::ZipArchive<File>);

impl Golden {
    fn open() -> Option<Self> {
        let candidates = [
            std::env::var_os("PNN_GOLDEN_DIR").map(PathBuf::from),
            std::env::var_os("PNN_DATA_DIR").map(|d| PathBuf::from(d).join("../reference/golden")),
            Some(PathBuf::from("../shared/reference/golden")),
        ];
        let path = candidates
            .into_iter()
            .flatten()
            .map(|d| d.join("mnist_cnn_P2_seed0_batch0.npz"))
            .find(|p| p.exists())?;
        Some(Self(
            zip::ZipArchive::new(File::open(path).expect("open golden file")).expect("npz"),
        ))
    }

    fn read<T: npyz::Deserialize>(&mut self, name: &str) -> (Vec<u64>, Vec<T>) {
        let entry = self
            .0
            .by_name(&format!("{name}.npy"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let npy = npyz::NpyFile::new(entry).expect("npy header");
        let shape = npy.shape().to_vec();
        (shape, npy.into_vec().expect("npy data"))
    }

    fn f32(&mut self, name: &str) -> Vec<f32> {
        self.read::<f32>(name).1
    }
}

const CLASSES: usize = 10;

/// The two blocks of the MNIST CNN [32, 32] (thesis Table 4) in pnn's description.
fn specs() -> Vec<LayerShape> {
    vec![
        LayerShape::conv(1, 32, (28, 28), 16, 0),
        LayerShape::conv(32, 32, (14, 14), 16, 0),
    ]
}

fn block(spec: &LayerShape, params: &[f32], a: &[f32], choreography: Choreography) -> ConvBlock {
    let LayerShape::Conv(geometry) = *spec else {
        unreachable!()
    };
    let mut b = ConvBlock::new(geometry);
    b.set_choreography(choreography);
    b.set_params(params).unwrap();
    b.set_projection(a).unwrap();
    b
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn loss_of(features: &[f32], m: &Projection, labels: &[u8]) -> f64 {
    let mut g = Vec::new();
    m.goodness(
        &Activations::new(labels.len(), m.rows, features.to_vec()),
        &mut g,
    );
    cross_entropy(&g, CLASSES, labels)
}

#[test]
fn golden_cnn_batch_replays() {
    let Some(mut golden) = Golden::open() else {
        panic!(
            "golden file not found: set PNN_GOLDEN_DIR (or PNN_DATA_DIR to shared/data) or put \
             shared/ next to the repository"
        );
    };
    let hparams = golden.read::<f64>("hparams").1;
    let (p, eps, lr, chunk_max) = (
        hparams[0] as usize,
        hparams[1] as f32,
        hparams[2] as f32,
        hparams[3] as usize,
    );
    assert_eq!(p, 2);
    let (x_shape, x) = golden.read::<f32>("x");
    assert_eq!(x_shape, [256, 1, 28, 28]);
    let labels: Vec<u8> = golden.read::<i64>("y").1.iter().map(|&y| y as u8).collect();
    let v_all = golden.f32("v_hat_concat");
    let lengths = golden.read::<i64>("v_hat_lengths").1;
    let losses = golden.read::<f64>("L_plus_minus").1;
    let mut directions = Vec::new();
    let mut at = 0;
    for &len in &lengths {
        directions.push(&v_all[at..at + len as usize]);
        at += len as usize;
    }
    assert_eq!(at, v_all.len());
    let specs = specs();
    let mut input = x.clone();
    let mut k = 0; // the next recorded direction
    for (i, spec) in specs.iter().enumerate() {
        let theta_before = golden.f32(&format!("theta{i}_before"));
        let theta_after = golden.f32(&format!("theta{i}_after"));
        let m_before = golden.f32(&format!("M{i}_before"));
        let m_after = golden.f32(&format!("M{i}_after"));
        let a = golden.f32(&format!("A{i}"));
        assert_eq!(theta_before.len(), spec.param_count(), "layer {i}: layout");
        assert_eq!(m_before.len(), spec.feature_width() * CLASSES);
        let m0 = Projection::new(spec.feature_width(), CLASSES, m_before.clone());

        // Chunks: whole channels up to C_max, M in whole rows; the recorded directions have
        // exactly these lengths, in this order.
        let w_chunks = spec.weight_chunks(chunk_max).collect::<Vec<_>>();
        let m_chunks = projection_row_chunks(spec.feature_width(), CLASSES, chunk_max);

        // W: recompute L± through the simulated block along the recorded directions (both
        // choreographies), then replay the recorded L± through the update arithmetic.
        let mut theta = theta_before.clone();
        for chunk in &w_chunks {
            let vs = &directions[k..k + p];
            let recorded = &losses[2 * k..2 * (k + p)];
            for choreography in [Choreography::Fast, Choreography::Reference] {
                let mut b = block(spec, &theta, &a, choreography);
                b.load_input(&input).unwrap();
                let mut out = Vec::new();
                b.evaluate_perturbed_vectors(chunk.clone(), vs.iter().copied(), eps, &mut out)
                    .unwrap();
                for (q, (plus, minus)) in out.iter().enumerate() {
                    let (lp, lm) = (loss_of(plus, &m0, &labels), loss_of(minus, &m0, &labels));
                    eprintln!(
                        "layer {i} W direction {q} {choreography:?}: |ΔL+| {:.2e} |ΔL-| {:.2e}",
                        (lp - recorded[2 * q]).abs(),
                        (lm - recorded[2 * q + 1]).abs()
                    );
                    assert!(
                        (lp - recorded[2 * q]).abs() < 1e-6
                            && (lm - recorded[2 * q + 1]).abs() < 1e-6,
                        "layer {i} direction {q} ({choreography:?}): L± = ({lp}, {lm}), recorded {:?}",
                        &recorded[2 * q..2 * q + 2]
                    );
                }
            }
            let terms: Vec<(f32, &[f32])> = (0..p)
                .map(|q| {
                    assert_eq!(vs[q].len(), chunk.len(), "layer {i}: chunk length");
                    let dd = (recorded[2 * q] - recorded[2 * q + 1]) / (2.0 * eps as f64);
                    (dd as f32, vs[q])
                })
                .collect();
            let scale = lr * chunk.len() as f32 / p as f32;
            let mut g = vec![0.0; chunk.len()];
            step_with_vectors(&mut theta[chunk.clone()], scale, terms, &mut g);
            k += p;
        }
        let d = max_diff(&theta, &theta_after);
        eprintln!("layer {i}: W after replay differs by {d:.2e}");
        assert!(d < 1e-6, "layer {i}: W after the update differs by {d}");

        // The clean pass with the updated W, in training mode: it commits exactly one
        // momentum-0.1 update of the running statistics, and its features give the loss the
        // M directions were evaluated around.
        let mut b = block(spec, &theta_after, &a, Choreography::Fast);
        b.set_running_stats(
            &golden.f32(&format!("bn_mean{i}_before")),
            &golden.f32(&format!("bn_var{i}_before")),
        )
        .unwrap();
        b.load_input(&input).unwrap();
        let (mut features, mut next) = (Vec::new(), Vec::new());
        b.forward(ForwardMode::Train, &mut features, &mut next)
            .unwrap();
        let dm = max_diff(b.running_mean(), &golden.f32(&format!("bn_mean{i}_after")));
        let dv = max_diff(b.running_var(), &golden.f32(&format!("bn_var{i}_after")));
        assert!(
            dm < 1e-6 && dv < 1e-6,
            "layer {i}: running statistics differ by {dm}, {dv}"
        );
        let clean = loss_of(&features, &m0, &labels);

        // M: replay the recorded L± through the update arithmetic, row chunks of M.
        let mut m = m_before.clone();
        for rows in &m_chunks {
            let range = rows.start * CLASSES..rows.end * CLASSES;
            let recorded = &losses[2 * k..2 * (k + p)];
            for q in 0..p {
                // Central differences around the clean loss: their midpoint is the clean loss
                // up to O(eps²) (the M directions move G linearly).
                let mid = (recorded[2 * q] + recorded[2 * q + 1]) / 2.0;
                eprintln!("layer {i}: clean loss {clean:.7}, M direction {q} midpoint {mid:.7}");
                assert!(
                    (mid - clean).abs() < 1e-6,
                    "layer {i}: clean loss {clean}, recorded midpoint {mid}"
                );
            }
            let terms: Vec<(f32, &[f32])> = (0..p)
                .map(|q| {
                    let dd = (recorded[2 * q] - recorded[2 * q + 1]) / (2.0 * eps as f64);
                    (dd as f32, directions[k + q])
                })
                .collect();
            let scale = lr * range.len() as f32 / p as f32;
            let mut g = vec![0.0; range.len()];
            step_with_vectors(&mut m[range], scale, terms, &mut g);
            k += p;
        }
        let d = max_diff(&m, &m_after);
        eprintln!("layer {i}: M after replay differs by {d:.2e}");
        assert!(d < 1e-6, "layer {i}: M after the update differs by {d}");
        input = next;
    }
    assert_eq!(k, directions.len(), "every recorded direction replayed");
}

/// The recorded CNN batch through the real `Trainer::train_batch`, the real simulated conv blocks
/// (their forward passes, BatchNorm and running statistics) and the real `Sgd`, directions and
/// the steps' `L±` fed in by `common::replay`: `W`, `M` and the running statistics after the
/// step must be the recording's.
#[test]
fn the_trainer_replays_the_recorded_cnn_batch() {
    use common::replay::{ReplayOracle, ReplayRule, difference_gap, split_by_layer};
    use pnn::backend::sim::SimOracle;
    use pnn::model::InitialParams;
    use pnn::oracle::ForwardOracle;
    use pnn::train::{Hyper, Trainer};

    let mut golden = Golden::open().expect("golden file (see golden_cnn_batch_replays)");
    let hparams = golden.read::<f64>("hparams").1;
    let (p, eps, lr, chunk_max) = (
        hparams[0] as usize,
        hparams[1] as f32,
        hparams[2] as f32,
        hparams[3] as usize,
    );
    let specs = specs();
    let sizes: Vec<_> = (specs.iter())
        .map(|s| (s.param_count(), s.feature_width() * CLASSES))
        .collect();
    let recording = split_by_layer(
        &golden.f32("v_hat_concat"),
        &golden.read::<i64>("v_hat_lengths").1,
        &golden.read::<f64>("L_plus_minus").1,
        p,
        &sizes,
    );
    let mut oracles = Vec::new();
    let mut init = InitialParams {
        layers: Vec::new(),
        projections: Vec::new(),
    };
    for (i, spec) in specs.iter().enumerate() {
        let mut sim = SimOracle::new(*spec);
        (sim.conv_block_mut().expect("a conv block"))
            .set_projection(&golden.f32(&format!("A{i}")))
            .unwrap();
        let mut stats = golden.f32(&format!("bn_mean{i}_before"));
        stats.extend(golden.f32(&format!("bn_var{i}_before")));
        sim.write_layer_state(&stats).unwrap();
        oracles.push(ReplayOracle::new(sim, &recording[i].weights));
        init.layers.push(golden.f32(&format!("theta{i}_before")));
        init.projections.push(Projection::new(
            spec.feature_width(),
            CLASSES,
            golden.f32(&format!("M{i}_before")),
        ));
    }
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
    let labels: Vec<u8> = golden.read::<i64>("y").1.iter().map(|&y| y as u8).collect();
    let x = Activations::new(256, 784, golden.f32("x"));
    let clean_losses = trainer.train_batch(0, 0, &x, &labels).unwrap();

    let state = trainer.host_state();
    for i in 0..specs.len() {
        let dw = max_diff(&state.shadows[i], &golden.f32(&format!("theta{i}_after")));
        let dm = max_diff(
            &state.projections[i].data,
            &golden.f32(&format!("M{i}_after")),
        );
        let mut stats = golden.f32(&format!("bn_mean{i}_after"));
        stats.extend(golden.f32(&format!("bn_var{i}_after")));
        let oracle = &mut trainer.oracles_mut()[i];
        let held = oracle.read_layer_state().unwrap().expect("BatchNorm state");
        let ds = max_diff(&held, &stats);
        eprintln!("layer {i}: W differs by {dw:.2e}, M by {dm:.2e}, running stats by {ds:.2e}");
        assert!(
            dw < 1e-6,
            "layer {i}: W after the trainer's step differs by {dw}"
        );
        assert!(
            dm < 1e-6,
            "layer {i}: M after the trainer's step differs by {dm}"
        );
        assert!(ds < 1e-6, "layer {i}: running statistics differ by {ds}");
        let params = oracle.inner.read_parameters().unwrap();
        assert_eq!(
            params, state.shadows[i],
            "layer {i}: shadow and block differ"
        );
        assert_eq!(oracle.unused(), 0, "layer {i}: directions unused");
        for &(lp, lm) in &recording[i].projection_losses {
            let mid = (lp + lm) / 2.0;
            assert!(
                (mid - clean_losses[i]).abs() < 1e-6,
                "layer {i}: clean loss {}, recorded midpoint {mid}",
                clean_losses[i]
            );
        }
    }
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
