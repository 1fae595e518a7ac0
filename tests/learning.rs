//! Every layer learns, at the rate the paper's step sets: two epochs on real MNIST (the settings
//! of `tests/cli.rs`'s `two_epochs_on_mnist_learn`: P = 4, lr 1e-3, eps 1e-3, batch 256), held to
//! bands measured over seeds, and a test that the bands reject the bugs they are there for (an
//! oracle wrapper that drops updates or scales the step).
//!
//! `PNN_MEASURE_SEEDS=N cargo test --release --test learning -- measure --nocapture --ignored`
//! prints the figures the bands come from.

mod common;

use std::ops::Range;

use pnn::backend::sim::SimOracle;
use pnn::data::DatasetKind;
use pnn::oracle::{
    Activations, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, InProcess, LayerShape,
    OracleError, PerturbedPair, UpdateTerm,
};
use pnn::report::metrics::{EpochMetrics, RunSummary};
use pnn::run::{RunConfig, load, run_with};

/// What the wrapper does to the updates the trainer sends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Healthy,
    /// Every weight update dropped.
    DropAll,
    /// The updates of one layer (0-based) dropped.
    DropLayer(usize),
    /// The step scale `lr * n / P` multiplied (the same as a 2x error in `lr`, `n/P` or `/2 eps`).
    Scale(f32),
}

struct Wrapped {
    inner: SimOracle,
    layer: usize,
    variant: Variant,
}

impl ForwardOracle for Wrapped {
    fn spec(&self) -> &LayerShape {
        self.inner.spec()
    }
    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        self.inner.write_parameters(params)
    }
    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        self.inner.read_parameters()
    }
    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        self.inner.load_input(input)
    }
    fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        self.inner.forward(mode)
    }
    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<PerturbedPair>,
    ) -> Result<(), OracleError> {
        self.inner.evaluate_perturbed(chunk, seeds, eps, out)
    }
    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError> {
        match self.variant {
            Variant::DropAll => Ok(()),
            Variant::DropLayer(l) if l == self.layer => Ok(()),
            Variant::Scale(f) => self.inner.apply_update(chunk, scale * f, terms),
            _ => self.inner.apply_update(chunk, scale, terms),
        }
    }
    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        self.inner.read_layer_state()
    }
    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        self.inner.write_layer_state(state)
    }
    /// The inner layer's: the trainer's shadow follows what the layer really holds.
    fn in_process(&mut self) -> Option<&mut dyn InProcess> {
        self.inner.in_process()
    }
}

/// The run of `tests/cli.rs`'s accuracy test (`pnn-train --backend sim --dataset mnist --epochs 2
/// --seed S`), through [`run_with`] over wrapped oracles. Returns the summary and the last
/// epoch's mean local loss per layer.
fn two_epochs(seed: u64, variant: Variant) -> (RunSummary, Vec<f64>) {
    let mut config = RunConfig::new(DatasetKind::Mnist);
    config.data_dir = Some(common::data_dir());
    config.epochs = 2;
    config.hyper.seed = seed;
    let (data, model) = load(&config).expect("MNIST in shared/data");
    let oracles = (model.layer_specs().iter().enumerate())
        .map(|(layer, spec)| Wrapped {
            inner: SimOracle::new(*spec),
            layer,
            variant,
        })
        .collect();
    let mut last = Vec::new();
    let summary = run_with(&config, &data, &model, oracles, |m: &EpochMetrics| {
        last = m.train_local_loss.clone();
    })
    .expect("the run trains");
    (summary, last)
}

/// The bands a healthy two-epoch run lies in. Measured with `measure` (8 seeds, 0-7; MNIST, 2
/// epochs, P = 4, lr 1e-3):
///
/// | run | layer-1 local loss, epoch 2 | final-layer acc | cumulative acc |
/// |---|---|---|---|
/// | healthy | 1.125-1.272 (mean 1.19) | 0.183-0.307 (mean 0.234, sd 0.04) | 0.686-0.760 |
/// | all updates dropped | 2.29-2.55 | 0.080-0.121 | 0.069-0.166 |
/// | layer-2 updates dropped | 1.125-1.272 | 0.060-0.190 | 0.653-0.752 |
/// | step x0.5 | 1.438-1.650 | 0.091-0.213 | 0.565-0.696 |
/// | step x2 | 0.882-0.973 | 0.367-0.550 | 0.762-0.788 |
///
/// Layer 1's local loss after two epochs measures the step size: x0.5 and x2 fall outside
/// `LAYER1_LOSS` at every seed, with about two healthy standard deviations to spare on each side
/// (a faster-learning x2 is still a 2x error in `lr * n / P` or `/ 2 eps`). Layer 2 learns slowly
/// in two epochs; `FINAL_LAYER_ACC` sits two standard deviations under the healthy mean and
/// rejects a dead layer 2 at the seed the test runs (0.087 at seed 0; over seeds 0-7 it rejects
/// 5 of 8, the other three score 0.16-0.19).
const LAYER1_LOSS: Range<f64> = 1.03..1.38;
const FINAL_LAYER_ACC: f64 = 0.15;
const CUMULATIVE_ACC: f64 = 0.60;

/// What is wrong with a run's figures, if anything.
fn band_violations(s: &RunSummary, loss: &[f64]) -> Vec<String> {
    let mut wrong = Vec::new();
    if !LAYER1_LOSS.contains(&loss[0]) {
        wrong.push(format!(
            "layer 1's local loss {:.4} outside {LAYER1_LOSS:?}: the step is not lr * n / P",
            loss[0]
        ));
    }
    if s.test_accuracy_final_layer < FINAL_LAYER_ACC {
        wrong.push(format!(
            "final-layer accuracy {:.4} under {FINAL_LAYER_ACC}: the last layer does not learn",
            s.test_accuracy_final_layer
        ));
    }
    if s.test_accuracy_cumulative < CUMULATIVE_ACC {
        wrong.push(format!(
            "cumulative accuracy {:.4} under {CUMULATIVE_ACC}",
            s.test_accuracy_cumulative
        ));
    }
    // Every layer beats chance (10 classes) by a clear margin.
    for (l, acc) in s.test_accuracy_per_layer.iter().enumerate() {
        if *acc < FINAL_LAYER_ACC {
            wrong.push(format!(
                "layer {} accuracy {acc:.4} under {FINAL_LAYER_ACC}",
                l + 1
            ));
        }
    }
    wrong
}

#[test]
fn every_layer_learns_at_the_papers_step() {
    let (s, loss) = two_epochs(0, Variant::Healthy);
    eprintln!(
        "seed 0: cumulative {:.4}, final {:.4}, per layer {:?}, local loss {loss:.4?}",
        s.test_accuracy_cumulative, s.test_accuracy_final_layer, s.test_accuracy_per_layer
    );
    let wrong = band_violations(&s, &loss);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The bands of [`every_layer_learns_at_the_papers_step`] are not decoration: each broken update
/// (the same run, seed 0) falls outside them.
#[test]
fn the_bands_reject_dropped_and_mis_scaled_updates() {
    for variant in [
        Variant::DropAll,
        Variant::DropLayer(1),
        Variant::Scale(0.5),
        Variant::Scale(2.0),
    ] {
        let (s, loss) = two_epochs(0, variant);
        let wrong = band_violations(&s, &loss);
        eprintln!("{variant:?}: {wrong:?}");
        assert!(
            !wrong.is_empty(),
            "{variant:?} passes the bands: cumulative {:.4}, final {:.4}, local loss {loss:.4?}",
            s.test_accuracy_cumulative,
            s.test_accuracy_final_layer
        );
    }
}

#[test]
#[ignore = "prints the seeds' figures the bands come from"]
fn measure() {
    let seeds: u64 = std::env::var("PNN_MEASURE_SEEDS").map_or(5, |s| s.parse().unwrap());
    for variant in [
        Variant::Healthy,
        Variant::DropAll,
        Variant::DropLayer(1),
        Variant::Scale(0.5),
        Variant::Scale(2.0),
    ] {
        for seed in 0..seeds {
            let (s, loss) = two_epochs(seed, variant);
            println!(
                "{variant:?} seed {seed}: cumulative {:.4} final {:.4} per-layer {:?} local loss {:.4?}",
                s.test_accuracy_cumulative,
                s.test_accuracy_final_layer,
                s.test_accuracy_per_layer,
                loss
            );
        }
    }
}
