//! The trainer's gradient estimate held to the paper's definition (eqs. 8, 10, 13) on a tiny layer
//! with the ideal oracle, and the update-rule seam carrying a rule that is not seeded.

use firmware_protocol::DirectionSeed;
use firmware_protocol::direction::apply_update;
use pnn::backend::sim::SimOracle;
use pnn::model::InitialParams;
use pnn::oracle::{Activations, ForwardOracle, LayerShape, OracleError};
use pnn::train::estimator::{Difference, Scratch as EstimatorScratch, directional_derivatives};
use pnn::train::exact::{ExactTrainer, Method};
use pnn::train::loss::cross_entropy;
use pnn::train::projection::Projection;
use pnn::train::update::{ProjectionStep, Sgd, UpdateRule, WeightStep};
use pnn::train::{Hyper, Trainer};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

const N_IN: usize = 8;
const N_OUT: usize = 5;
const CLASSES: usize = 3;
const BATCH: usize = 32;

struct Problem {
    x: Vec<f32>,
    labels: Vec<u8>,
    params: Vec<f32>,
    m: Vec<f32>,
}

fn problem(seed: u64) -> Problem {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut u = |b: f32| rng.random_range(-b..b);
    Problem {
        x: (0..BATCH * N_IN).map(|_| u(1.5)).collect(),
        labels: (0..BATCH).map(|i| (i % CLASSES) as u8).collect(),
        params: (0..N_OUT * N_IN + N_OUT).map(|_| u(0.6)).collect(),
        m: (0..N_OUT * CLASSES).map(|_| u(0.8)).collect(),
    }
}

/// dL/dW of the local loss, by hand in f64: z = x Wᵀ + b, a = ReLU(z), G = a M, L = mean CE.
fn analytic_gradient(p: &Problem) -> Vec<f64> {
    let (w, b) = p.params.split_at(N_OUT * N_IN);
    let mut grad = vec![0f64; p.params.len()];
    for s in 0..BATCH {
        let x = &p.x[s * N_IN..(s + 1) * N_IN];
        let z: Vec<f64> = (0..N_OUT)
            .map(|o| {
                b[o] as f64
                    + (0..N_IN)
                        .map(|i| x[i] as f64 * w[o * N_IN + i] as f64)
                        .sum::<f64>()
            })
            .collect();
        let a: Vec<f64> = z.iter().map(|v| v.max(0.0)).collect();
        let g: Vec<f64> = (0..CLASSES)
            .map(|c| (0..N_OUT).map(|o| a[o] * p.m[o * CLASSES + c] as f64).sum())
            .collect();
        let max = g.iter().cloned().fold(f64::MIN, f64::max);
        let denom: f64 = g.iter().map(|v| (v - max).exp()).sum();
        let dg: Vec<f64> = (0..CLASSES)
            .map(|c| {
                ((g[c] - max).exp() / denom - (c == p.labels[s] as usize) as u8 as f64)
                    / BATCH as f64
            })
            .collect();
        for o in 0..N_OUT {
            if z[o] <= 0.0 {
                continue;
            }
            let dz: f64 = (0..CLASSES)
                .map(|c| dg[c] * p.m[o * CLASSES + c] as f64)
                .sum();
            for i in 0..N_IN {
                grad[o * N_IN + i] += dz * x[i] as f64;
            }
            grad[N_OUT * N_IN + o] += dz;
        }
    }
    grad
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `n / N * sum_p dd_p v_p` over `count` directions, with `dd_p = (L+ - L-) / (2 eps)` computed
/// from the oracle's perturbed activations as the trainer does (eq. 10).
fn estimate(p: &Problem, count: usize, eps: f32) -> Vec<f64> {
    let mut oracle = SimOracle::new(LayerShape::dense(N_IN, N_OUT));
    oracle.write_parameters(&p.params).unwrap();
    oracle
        .load_input(&Activations::new(BATCH, N_IN, p.x.clone()))
        .unwrap();
    let projection = Projection::new(N_OUT, CLASSES, p.m.clone());
    let n = p.params.len();
    let seeds: Vec<DirectionSeed> = (0..count as u64)
        .map(|i| DirectionSeed(i * 7919 + 1))
        .collect();
    let mut pairs = Vec::new();
    oracle
        .evaluate_perturbed(0..n, &seeds, eps, &mut pairs)
        .unwrap();
    let mut estimate = vec![0f64; n];
    let mut g = Vec::new();
    let mut v = vec![0f32; n];
    for (seed, (plus, minus)) in seeds.iter().zip(&pairs) {
        projection.goodness(plus, &mut g);
        let lp = cross_entropy(&g, CLASSES, &p.labels);
        projection.goodness(minus, &mut g);
        let lm = cross_entropy(&g, CLASSES, &p.labels);
        let dd = (lp - lm) / (2.0 * eps as f64);
        firmware_protocol::direction::fill_direction(*seed, &mut v);
        estimate
            .iter_mut()
            .zip(&v)
            .for_each(|(e, vi)| *e += n as f64 / count as f64 * dd * *vi as f64);
    }
    estimate
}

#[test]
fn the_estimate_approaches_the_analytic_gradient() {
    // With N directions in n = 45 dimensions, E[cos] of the averaged estimator is about
    // 1/sqrt(1 + n/N): 0.83 for N = 100 and 0.994 for N = 4000. Measured on seeds 0..3:
    // 0.86 / 0.81 / 0.78 with 100 directions, 0.994 / 0.995 / 0.995 with 4000.
    for seed in 0..3 {
        let p = problem(seed);
        let exact = analytic_gradient(&p);
        let few = cosine(&estimate(&p, 100, 1e-3), &exact);
        let many = cosine(&estimate(&p, 4000, 1e-3), &exact);
        eprintln!("seed {seed}: cosine with 100 directions {few:.4}, with 4000 {many:.4}");
        assert!(many > 0.985, "cosine {many} with 4000 directions");
        assert!(few > 0.6, "cosine {few} with 100 directions");
        assert!(many > few, "more directions did not help: {few} -> {many}");
        // Unbiased (eq. 8): the estimate's scale matches the gradient's.
        let ratio = estimate(&p, 4000, 1e-3)
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt()
            / exact.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(
            (ratio - (1.0 + 45.0 / 4000.0f64).sqrt()).abs() < 0.1,
            "norm ratio {ratio}"
        );
    }
}

#[test]
fn one_update_step_lowers_the_local_loss_in_expectation() {
    let p = problem(11);
    let before = {
        let mut g = Vec::new();
        let mut o = SimOracle::new(LayerShape::dense(N_IN, N_OUT));
        o.write_parameters(&p.params).unwrap();
        o.load_input(&Activations::new(BATCH, N_IN, p.x.clone()))
            .unwrap();
        let out = o.forward(pnn::oracle::ForwardMode::Train).unwrap();
        Projection::new(N_OUT, CLASSES, p.m.clone()).goodness(&out.features, &mut g);
        cross_entropy(&g, CLASSES, &p.labels)
    };
    // The trainer's first batch from the same start, with 200 different direction seeds.
    let changes: Vec<f64> = (0..200u64)
        .map(|seed| {
            let init = InitialParams {
                layers: vec![p.params.clone()],
                projections: vec![Projection::new(N_OUT, CLASSES, p.m.clone())],
            };
            let hyper = Hyper {
                lr: 0.05,
                directions: 4,
                seed,
                ..Hyper::default()
            };
            let mut t = Trainer::new(
                vec![SimOracle::new(LayerShape::dense(N_IN, N_OUT))],
                init,
                hyper,
            )
            .unwrap();
            let losses = t
                .train_batch(0, 0, &Activations::new(BATCH, N_IN, p.x.clone()), &p.labels)
                .unwrap();
            losses[0] - before
        })
        .collect();
    let mean = changes.iter().sum::<f64>() / changes.len() as f64;
    let sd = (changes.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (changes.len() - 1) as f64)
        .sqrt();
    let stderr = sd / (changes.len() as f64).sqrt();
    eprintln!("loss {before:.5}: mean change {mean:.6} +- {stderr:.6} (sd {sd:.6})");
    assert!(
        mean + 4.0 * stderr < 0.0,
        "mean change {mean} +- {stderr} is not a decrease"
    );
}

/// SGD computed in the host's shadow and programmed into the layer, as a rule without a seeded
/// form (momentum, Adam) reaches a device: the seam carries it with nothing but this type.
#[derive(Default)]
struct HostSideSgd {
    v: Vec<f32>,
    g: Vec<f32>,
}

impl UpdateRule for HostSideSgd {
    fn step_weights(
        &mut self,
        step: &WeightStep<'_>,
        oracle: &mut dyn ForwardOracle,
        shadow: &mut [f32],
    ) -> Result<(), OracleError> {
        let chunk = step.chunk.clone();
        let scale = step.lr * chunk.len() as f32 / step.terms.len() as f32;
        self.v.resize(chunk.len(), 0.0);
        self.g.resize(chunk.len(), 0.0);
        apply_update(
            &mut shadow[chunk],
            scale,
            step.terms,
            &mut self.v,
            &mut self.g,
        );
        oracle.write_parameters(shadow)
    }

    fn step_projection(&mut self, step: &ProjectionStep<'_>, chunk: &mut [f32]) {
        Sgd::default().step_projection(step, chunk);
    }
}

/// Trains 4 batches of [`problem`] in chunks of 12 with `rule` (the default [`Sgd`] if `None`);
/// returns the weights' hash, the layer's parameters as read back and the host's shadow.
fn train_with_rule(
    exact_reference: bool,
    rule: Option<HostSideSgd>,
) -> (String, Vec<f32>, Vec<f32>) {
    let p = problem(3);
    let hyper = Hyper {
        chunk_max: 12,
        batch_size: BATCH,
        ..Hyper::default()
    };
    let init = InitialParams {
        layers: vec![p.params.clone()],
        projections: vec![Projection::new(N_OUT, CLASSES, p.m.clone())],
    };
    let mut oracle = SimOracle::new(LayerShape::dense(N_IN, N_OUT));
    oracle
        .in_process()
        .unwrap()
        .set_exact_reference(exact_reference);
    let mut trainer = Trainer::new(vec![oracle], init, hyper).unwrap();
    if let Some(rule) = rule {
        trainer = trainer.with_update_rule(rule);
    }
    let input = Activations::new(BATCH, N_IN, p.x.clone());
    for b in 0..4 {
        trainer.train_batch(0, b, &input, &p.labels).unwrap();
    }
    let read = trainer.oracles_mut()[0].read_parameters().unwrap();
    assert_ne!(read, p.params, "training moved the layer");
    (
        trainer.weights_sha256(),
        read,
        trainer.layers()[0].shadow.clone(),
    )
}

#[test]
fn an_update_rule_that_programs_the_layer_from_the_host_plugs_into_the_seam() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // The literal choreography computes every forward from the parameters: the same bits.
    let (seeded_hash, seeded, _) = train_with_rule(true, None);
    let (written_hash, written, shadow) = train_with_rule(true, Some(HostSideSgd::default()));
    assert_eq!(seeded_hash, written_hash);
    assert_eq!(bits(&seeded), bits(&written));
    assert_eq!(bits(&written), bits(&shadow), "the layer is the shadow");
    // The fast path moves its cached pre-activation by seeded updates and recomputes it after a
    // write: the same steps, rounded differently (measured 6e-8 apart after 4 batches).
    let (_, seeded, _) = train_with_rule(false, None);
    let (_, written, shadow) = train_with_rule(false, Some(HostSideSgd::default()));
    assert_eq!(bits(&written), bits(&shadow), "the layer is the shadow");
    let gap = (seeded.iter().zip(&written))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("fast path: seeded and written steps {gap:e} apart");
    assert!(gap < 1e-5, "{gap}");
}

/// The trainer's own estimator (`directional_derivatives`) over `seeds` on [`problem`]'s whole
/// layer: `dd_p` per direction.
fn derivatives(p: &Problem, seeds: &[DirectionSeed], eps: f32, difference: Difference) -> Vec<f32> {
    let mut oracle = SimOracle::new(LayerShape::dense(N_IN, N_OUT));
    oracle.write_parameters(&p.params).unwrap();
    oracle
        .load_input(&Activations::new(BATCH, N_IN, p.x.clone()))
        .unwrap();
    let projection = Projection::new(N_OUT, CLASSES, p.m.clone());
    let mut out = Vec::new();
    directional_derivatives(
        &mut oracle,
        &projection,
        &(0..p.params.len()),
        seeds,
        eps,
        difference,
        &p.labels,
        &mut EstimatorScratch::default(),
        &mut out,
    )
    .unwrap();
    out
}

/// `n / P * sum_p dd_p v_p` (eq. 10) from the trainer's `dd_p`.
fn accumulate(n: usize, seeds: &[DirectionSeed], dd: &[f32]) -> Vec<f64> {
    let mut estimate = vec![0f64; n];
    let mut v = vec![0f32; n];
    for (seed, d) in seeds.iter().zip(dd) {
        firmware_protocol::direction::fill_direction(*seed, &mut v);
        for (e, vi) in estimate.iter_mut().zip(&v) {
            *e += n as f64 / seeds.len() as f64 * *d as f64 * *vi as f64;
        }
    }
    estimate
}

#[test]
fn forward_differences_estimate_as_well_as_central_and_their_bias_shrinks_with_eps() {
    let seeds: Vec<DirectionSeed> = (0..400u64).map(|i| DirectionSeed(i * 7919 + 5)).collect();
    let n = N_OUT * N_IN + N_OUT;
    for seed in 0..3 {
        let p = problem(seed);
        let exact = analytic_gradient(&p);
        // Equal P: the two accumulated estimates point as closely at the analytic gradient.
        let central = cosine(
            &accumulate(
                n,
                &seeds,
                &derivatives(&p, &seeds, 1e-3, Difference::Central),
            ),
            &exact,
        );
        let forward = cosine(
            &accumulate(
                n,
                &seeds,
                &derivatives(&p, &seeds, 1e-3, Difference::Forward),
            ),
            &exact,
        );
        eprintln!(
            "seed {seed}: cosine with 400 directions, central {central:.4}, forward {forward:.4}"
        );
        assert!(central > 0.85 && forward > 0.85, "{central} {forward}");
        assert!((central - forward).abs() < 0.02, "{central} vs {forward}");
        // Per direction, forward differences carry eps/2 vᵀHv over the exact g·v (central's
        // error is O(eps²)): their mean distance from the exact directional derivative falls
        // with eps, about in proportion.
        let exact_dd: Vec<f64> = seeds
            .iter()
            .map(|s| {
                let mut v = vec![0f32; n];
                firmware_protocol::direction::fill_direction(*s, &mut v);
                v.iter().zip(&exact).map(|(a, b)| *a as f64 * b).sum()
            })
            .collect();
        let bias = |eps: f32| {
            let dd = derivatives(&p, &seeds, eps, Difference::Forward);
            dd.iter()
                .zip(&exact_dd)
                .map(|(d, e)| (*d as f64 - e).abs())
                .sum::<f64>()
                / seeds.len() as f64
        };
        let (wide, narrow) = (bias(0.1), bias(0.01));
        eprintln!(
            "seed {seed}: forward |dd - g.v| mean {wide:.3e} at eps 0.1, {narrow:.3e} at 0.01"
        );
        assert!(narrow < wide / 4.0, "{wide} -> {narrow}");
    }
}

/// `--method mf-exact`: one SGD step moves the layer by `lr` times the analytic local gradient
/// computed independently above (f64, by hand).
#[test]
fn mf_exact_steps_along_the_analytic_local_gradient() {
    for seed in 0..3 {
        let p = problem(seed);
        let exact = analytic_gradient(&p);
        let init = InitialParams {
            layers: vec![p.params.clone()],
            projections: vec![Projection::new(N_OUT, CLASSES, p.m.clone())],
        };
        let lr = 1e-2;
        let mut t = ExactTrainer::new(Method::MfExact, &[N_IN, N_OUT], init, lr, 0);
        t.train_batch(&Activations::new(BATCH, N_IN, p.x.clone()), &p.labels);
        let step: Vec<f64> = (p.params.iter().zip(t.layer_params(0)))
            .map(|(before, after)| (*before as f64 - *after as f64) / lr as f64)
            .collect();
        let worst = (step.iter().zip(&exact))
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        let scale = exact.iter().map(|g| g.abs()).fold(0f64, f64::max);
        assert!(
            worst < 1e-3 * scale.max(1e-3),
            "seed {seed}: {worst} off, gradient up to {scale}"
        );
    }
}

/// `--method bp`: plain SGD through both layers and the head lowers the training loss of a tiny
/// two-layer problem steadily.
#[test]
fn bp_lowers_the_loss_it_differentiates() {
    let p = problem(5);
    let second: Vec<f32> = (0..N_OUT * N_OUT + N_OUT)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) / 20.0)
        .collect();
    let init = InitialParams {
        layers: vec![p.params.clone(), second],
        projections: vec![
            Projection::new(N_OUT, CLASSES, p.m.clone()),
            Projection::new(N_OUT, CLASSES, p.m.clone()),
        ],
    };
    let mut t = ExactTrainer::new(Method::Bp, &[N_IN, N_OUT, N_OUT], init, 0.1, 3);
    let input = Activations::new(BATCH, N_IN, p.x.clone());
    let losses: Vec<f64> = (0..200)
        .map(|_| t.train_batch(&input, &p.labels)[0])
        .collect();
    eprintln!("bp loss {:.4} -> {:.4}", losses[0], losses[199]);
    assert!(
        losses[199] < 0.7 * losses[0],
        "{} -> {}",
        losses[0],
        losses[199]
    );
    assert!(losses.windows(2).filter(|w| w[1] > w[0]).count() < 20);
}
