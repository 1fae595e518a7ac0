//! A whole training run, as `pnn-train` performs it; usable from library code too.

use std::path::PathBuf;
use std::time::Instant;

use crate::backend::{self, BackendSpec};
use crate::data::{DataError, Dataset, DatasetKind, resolve_data_dir};
use crate::export::SavedModel;
use crate::metrics::{EpochMetrics, RunSummary};
use crate::model::{ArchKind, DEFAULT_PROJ_DIM, ModelSpec, initialise};
use crate::observe::{BatchProgress, RunObserver};
use crate::oracle::{Activations, ForwardOracle, OracleError, WireStats};
use crate::trainer::{Hyper, Trainer, epoch_order};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub dataset: DatasetKind,
    pub data_dir: Option<PathBuf>,
    /// MLP or CNN (thesis Appendix A).
    pub arch: ArchKind,
    /// Hidden widths (MLP) or channels per block (CNN); `None` takes Table 3's or 4's.
    pub hidden: Option<Vec<usize>>,
    /// d, the CNN's projected features per channel (section 4.4).
    pub proj_dim: usize,
    pub epochs: u32,
    pub hyper: Hyper,
    /// Train on the first N training samples only.
    pub limit_train: Option<usize>,
    pub backend: BackendSpec,
    /// Train at most this many batches per epoch (smoke tests, quick looks).
    pub max_batches: Option<usize>,
}

impl RunConfig {
    pub fn new(dataset: DatasetKind) -> Self {
        Self {
            dataset,
            data_dir: None,
            arch: ArchKind::Mlp,
            hidden: None,
            proj_dim: DEFAULT_PROJ_DIM,
            epochs: 200,
            hyper: Hyper::default(),
            limit_train: None,
            backend: BackendSpec::Sim,
            max_batches: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Oracle(#[from] OracleError),
}

/// Loads the data, builds the backend's oracles and trains, reporting to `observer` (a closure
/// `FnMut(&EpochMetrics)` is one).
pub fn run(config: &RunConfig, observer: impl RunObserver) -> Result<RunSummary, RunError> {
    config.hyper.validate().map_err(RunError::Config)?;
    let model = ModelSpec::new(
        config.dataset,
        config.arch,
        config.hidden.clone(),
        config.proj_dim,
        config.hyper.seed,
    )
    .map_err(RunError::Config)?;
    let dir = resolve_data_dir(config.data_dir.as_deref())?;
    let mut data = Dataset::load(config.dataset, &dir)?;
    if let Some(n) = config.limit_train {
        if n == 0 {
            return Err(RunError::Config("--limit-train must be at least 1".into()));
        }
        data.train.truncate(n);
    }
    tracing::info!(
        "{}: {} training and {} test samples from {}",
        config.dataset,
        data.train.len(),
        data.test.len(),
        dir.display()
    );
    let specs = model.layer_specs();
    let oracles = backend::open(&config.backend, &specs)?;
    tracing::info!(
        "backend {}: {} layers, hidden {:?}, {} MF parameters",
        config.backend,
        specs.len(),
        model.hidden,
        model.mf_parameter_count()
    );
    tracing::debug!(?config, "run configuration");
    run_with(config, &data, &model, oracles, observer)
}

/// The training loop over any backend's oracles.
pub fn run_with<O: ForwardOracle>(
    config: &RunConfig,
    data: &Dataset,
    model: &ModelSpec,
    oracles: Vec<O>,
    mut observer: impl RunObserver,
) -> Result<RunSummary, RunError> {
    let hyper = config.hyper.clone();
    let init = initialise(&model.layer_specs(), model.classes, hyper.seed);
    let mut trainer = Trainer::new(oracles, init, hyper.clone())?;
    let mut train_seconds = 0.0;
    let mut last = None;
    let mut x = Vec::new();
    for epoch in 0..config.epochs {
        let start = Instant::now();
        let order = epoch_order(hyper.seed, epoch, data.train.len());
        let mut loss_sums = vec![0f64; model.hidden.len()];
        let mut batches = 0u32;
        let planned = order
            .len()
            .div_ceil(hyper.batch_size)
            .min(config.max_batches.unwrap_or(usize::MAX));
        observer.epoch_started(epoch + 1, planned);
        for (b, batch) in order.chunks(hyper.batch_size).take(planned).enumerate() {
            data.normalizer.batch(&data.train, batch, &mut x);
            let labels: Vec<u8> = batch.iter().map(|&i| data.train.labels[i]).collect();
            let input = Activations::new(batch.len(), data.input_width(), x.clone());
            let losses = trainer.train_batch(epoch, b as u32, input, &labels)?;
            loss_sums.iter_mut().zip(&losses).for_each(|(s, l)| *s += l);
            batches += 1;
            observer.batch_done(&BatchProgress {
                epoch: epoch + 1,
                batch: b + 1,
                batches: planned,
                samples: batch.len(),
                local_loss: &losses,
                oracle_evaluations: trainer.oracle_evaluations(),
            });
        }
        let train_time = start.elapsed().as_secs_f64();
        train_seconds += train_time;
        let eval_start = Instant::now();
        let eval = trainer.evaluate(&data.test, &data.normalizer)?;
        let metrics = EpochMetrics::new(
            epoch + 1,
            train_time,
            eval_start.elapsed().as_secs_f64(),
            loss_sums
                .iter()
                .map(|s| s / batches.max(1) as f64)
                .collect(),
            &eval,
            trainer.oracle_evaluations(),
        );
        observer.epoch_done(&metrics);
        last = Some(eval);
    }
    let eval = match last {
        Some(eval) => eval,
        None => trainer.evaluate(&data.test, &data.normalizer)?,
    };
    let wire = trainer
        .oracles_mut()
        .iter()
        .filter_map(|o| o.wire_stats())
        .reduce(|a, b| WireStats {
            bytes_up: a.bytes_up + b.bytes_up,
            bytes_down: a.bytes_down + b.bytes_down,
            round_trips: a.round_trips + b.round_trips,
        });
    if observer.wants_model() {
        observer.model_trained(&SavedModel::from_trainer(
            &trainer,
            &model.layer_specs(),
            data,
            config.epochs,
        ));
    }
    Ok(RunSummary {
        dataset: config.dataset.name().into(),
        backend: config.backend.to_string(),
        arch: model.arch_name().into(),
        hidden: model.hidden.clone(),
        epochs: config.epochs,
        batch_size: hyper.batch_size,
        lr: hyper.lr,
        eps: hyper.eps,
        directions: hyper.directions,
        chunk_max: hyper.chunk_max,
        seed: hyper.seed,
        train_samples: data.train.len(),
        test_samples: data.test.len(),
        mf_parameters: model.mf_parameter_count(),
        test_accuracy_cumulative: eval.accuracy_cumulative,
        test_accuracy_final_layer: eval.accuracy_final_layer,
        test_loss_cumulative: eval.loss_cumulative,
        test_loss_final_layer: eval.loss_final_layer,
        test_accuracy_per_layer: eval.accuracy_per_layer,
        train_seconds,
        seconds_per_epoch: if config.epochs > 0 {
            train_seconds / config.epochs as f64
        } else {
            0.0
        },
        oracle_evaluations: trainer.oracle_evaluations(),
        weights_sha256: trainer.weights_sha256(),
        wire_bytes_up: wire.map(|w| w.bytes_up),
        wire_bytes_down: wire.map(|w| w.bytes_down),
        round_trips: wire.map(|w| w.round_trips),
    })
}
