//! `--method mf-exact` and `--method bp`: the exact-gradient baselines
//! ([`crate::train::exact`]) as a run, with the DD run's data order, initial parameters, epochs,
//! learning rate and batch size, and the same metrics, so a report can lay a DD run over its
//! ceiling. Host arithmetic only: refused on a device, on a simulated device profile, and with
//! checkpoints (a baseline run is short enough to run again).

use std::time::Instant;

use crate::backend::BackendSpec;
use crate::data::Dataset;
use crate::model::{ArchKind, ModelSpec, initialise};
use crate::oracle::Activations;
use crate::report::metrics::{EpochMetrics, RunSummary};
use crate::report::observe::RunObserver;
use crate::train::epoch_order;
use crate::train::exact::{ExactTrainer, Method};

use super::{RunConfig, RunError};

/// Why `config` cannot run its baseline method, if it cannot.
pub fn refusal(config: &RunConfig) -> Option<String> {
    let method = config.method;
    if !matches!(config.backend, BackendSpec::Sim) {
        return Some(format!(
            "--method {method} computes exact gradients from the weights on the host, which a device (or a simulated device profile) cannot give; run it with --backend sim, and train the device with --method dd"
        ));
    }
    if config.arch != ArchKind::Mlp {
        return Some(format!(
            "--method {method} is implemented for --arch mlp only (the CNN's exact local gradients are not yet written)"
        ));
    }
    if config.checkpoint.is_some() || config.resume.is_some() {
        return Some(format!(
            "--method {method} keeps no checkpoints: drop --checkpoint/--resume"
        ));
    }
    None
}

/// Trains `model` on `data` by `config.method`, reporting to `observer` as [`super::run_with`]
/// does.
pub fn run_baseline(
    config: &RunConfig,
    data: &Dataset,
    model: &ModelSpec,
    mut observer: impl RunObserver,
) -> Result<RunSummary, RunError> {
    if let Some(why) = refusal(config) {
        return Err(RunError::Config(why));
    }
    let hyper = &config.hyper;
    let specs = model.layer_specs();
    let init = initialise(&specs, model.classes, hyper.seed);
    let widths: Vec<usize> = std::iter::once(model.input_width)
        .chain(model.hidden.iter().copied())
        .collect();
    let mut trainer = ExactTrainer::new(config.method, &widths, init, hyper.lr, hyper.seed);
    let mut input = Activations::default();
    let mut train_seconds = 0.0;
    let mut last = None;
    let losses_len = if config.method == Method::Bp {
        1
    } else {
        model.hidden.len()
    };
    for epoch in 0..config.epochs {
        let start = Instant::now();
        let order = epoch_order(hyper.seed, epoch, data.train.len());
        let planned = order
            .len()
            .div_ceil(hyper.batch_size)
            .min(config.max_batches.unwrap_or(usize::MAX));
        observer.epoch_started(epoch + 1, planned);
        let mut sums = vec![0f64; losses_len];
        for batch in order.chunks(hyper.batch_size).take(planned) {
            data.normalizer
                .batch_activations(&data.train, batch, &mut input);
            let labels: Vec<u8> = batch.iter().map(|&i| data.train.labels[i]).collect();
            let losses = trainer.train_batch(&input, &labels);
            sums.iter_mut().zip(&losses).for_each(|(s, l)| *s += l);
        }
        let seconds = start.elapsed().as_secs_f64();
        train_seconds += seconds;
        if config.evaluate_each_epoch || epoch + 1 == config.epochs {
            let eval_start = Instant::now();
            let eval = trainer.evaluate(&data.test, &data.normalizer, hyper.batch_size);
            let metrics = EpochMetrics::new(
                epoch + 1,
                seconds,
                eval_start.elapsed().as_secs_f64(),
                sums.iter().map(|s| s / planned.max(1) as f64).collect(),
                &eval,
                0,
            );
            observer.epoch_done(&metrics);
            last = Some(eval);
        }
    }
    let eval = match last {
        Some(eval) => eval,
        None => trainer.evaluate(&data.test, &data.normalizer, hyper.batch_size),
    };
    Ok(RunSummary {
        weights_sha256: trainer.weights_sha256(),
        ..super::summary(config, model, data, eval, train_seconds)
    })
}
