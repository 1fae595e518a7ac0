//! Training from library code rather than the CLI: load a shipped config, override it in code,
//! watch the run with your own observer, then save, reload and evaluate the model.
//!
//! Run: `PNN_DATA_DIR=/path/to/data cargo run --release --example library_training`

use std::path::Path;

use pnn::backend::{self, BackendSpec};
use pnn::data::{Dataset, resolve_data_dir};
use pnn::report::export::{SavedModel, evaluate_with_predictions};
use pnn::report::metrics::EpochMetrics;
use pnn::report::observe::{BatchProgress, ByRef, RunObserver};
use pnn::run::settings::ExperimentConfig;

/// Keeps the best epoch and the trained model; prints a dot every 20 batches.
#[derive(Default)]
struct Watcher {
    best: Option<EpochMetrics>,
    model: Option<SavedModel>,
}

impl RunObserver for Watcher {
    fn batch_done(&mut self, p: &BatchProgress<'_>) {
        if p.batch.is_multiple_of(20) {
            eprint!(".");
        }
    }
    fn epoch_done(&mut self, m: &EpochMetrics) {
        eprintln!(
            " epoch {}: cumulative {:.4}",
            m.epoch, m.test_accuracy_cumulative
        );
        if self
            .best
            .as_ref()
            .is_none_or(|b| m.test_accuracy_cumulative > b.test_accuracy_cumulative)
        {
            self.best = Some(m.clone());
        }
    }
    fn wants_model(&self) -> bool {
        true
    }
    fn model_trained(&mut self, model: &SavedModel) {
        self.model = Some(model.clone());
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Table 1's MNIST setting, shortened: what is set here overrides the file.
    let file = ExperimentConfig::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs/table1-mlp-mnist.ron"),
    )?;
    let settings = file.overlay(ExperimentConfig {
        epochs: Some(3),
        limit_train: Some(20_000),
        ..Default::default()
    });
    let config = settings.to_run_config()?;

    let mut watcher = Watcher::default();
    let summary = pnn::run::run(&config, ByRef(&mut watcher))?;
    let best = watcher.best.expect("three epochs ran");
    println!(
        "final cumulative accuracy {:.4}; best {:.4} at epoch {}",
        summary.test_accuracy_cumulative, best.test_accuracy_cumulative, best.epoch
    );

    // Save, reload, and evaluate the model on a freshly opened backend.
    let path = std::env::temp_dir().join("pnn-library-example.safetensors");
    watcher
        .model
        .expect("the model was asked for")
        .save(&path)?;
    let model = SavedModel::load(&path)?;
    let data = Dataset::load(model.dataset, &resolve_data_dir(None)?)?;
    let mut oracles = backend::open(&BackendSpec::Sim, &model.layer_specs())?;
    model.program(&mut oracles)?;
    let (eval, predictions) = evaluate_with_predictions(
        &mut oracles,
        &model.projections(),
        &data.test,
        &model.normalizer,
        256,
    )?;
    println!(
        "reloaded from {}: cumulative {:.4}, final-layer {:.4}; first predictions {:?} for labels {:?}",
        path.display(),
        eval.accuracy_cumulative,
        eval.accuracy_final_layer,
        &predictions.cumulative[..8],
        &predictions.labels[..8]
    );
    assert_eq!(eval.accuracy_cumulative, summary.test_accuracy_cumulative);
    Ok(())
}
