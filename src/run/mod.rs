//! A whole training run, as `pnn-train` performs it; usable from library code too.
//!
//! This module holds the run itself: its resolved configuration ([`RunConfig`]) and the one
//! training loop ([`run_with`]) that `pnn-train`, the library examples and the noise sweep all
//! drive. Around it: [`settings`] (the settings as flags and RON files), [`checkpoint`] (a run
//! saved to disk), [`recovery`] (surviving device resets) and [`noise_sweep`] (runs across the
//! levels of one hardware effect).

pub mod baseline;
pub mod checkpoint;
pub mod interrupt;
pub mod noise_sweep;
pub mod recovery;
pub mod settings;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::{self, BackendSpec};
use crate::data::{DataError, Dataset, DatasetKind, resolve_data_dir};
use crate::model::{ArchKind, DEFAULT_PROJ_DIM, ModelSpec, initialise};
use crate::oracle::{Activations, ForwardOracle, OracleError};
use crate::report::export::SavedModel;
use crate::report::metrics::{EpochMetrics, RunSummary};
use crate::report::observe::{BatchProgress, RunObserver};
use crate::train::{EvalSums, Evaluation, Hyper, TrainBatch, Trainer, epoch_order};
use checkpoint::{Checkpoint, CheckpointError, LinkTotals, Position, RunIdentity};
use interrupt::StopSignal;
use recovery::{Recovery, Snapshot};

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
    /// Evaluate on the first N test samples only.
    pub limit_test: Option<usize>,
    /// Save a checkpoint here at every epoch's end (see [`checkpoint`]).
    pub checkpoint: Option<PathBuf>,
    /// And every this many batches.
    pub checkpoint_every: Option<usize>,
    /// Continue the run whose checkpoint is here.
    pub resume: Option<PathBuf>,
    /// Start afresh even though `checkpoint` holds a saved run (which is then overwritten);
    /// without it such a run is refused ([`CheckpointError::HoldsRun`]).
    pub fresh: bool,
    /// The settings as a config file, stored in checkpoints (`ExperimentConfig::to_ron`).
    pub settings: Option<String>,
    /// Simulated layers evaluate by the reference choreography, not the fast paths.
    pub exact_reference: bool,
    /// Train on the pipelined schedule (layer l on batch t while layer l-1 on batch t+1), in
    /// windows of this many batches (each window one step for checkpoints and reset
    /// recovery); `None`: the sequential schedule. The results are the same bits either way.
    pub pipeline: Option<usize>,
    /// MF+DD (the default) or an exact-gradient baseline ([`baseline`]).
    pub method: crate::train::exact::Method,
    /// Evaluate on the test set at every epoch's end (and report [`EpochMetrics`]); otherwise
    /// once, after the last epoch. The noise sweep evaluates once: on a noisy device an
    /// evaluation draws from the device's noise streams, so it would change the training after it.
    pub evaluate_each_epoch: bool,
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
            limit_test: None,
            checkpoint: None,
            checkpoint_every: None,
            resume: None,
            fresh: false,
            settings: None,
            exact_reference: false,
            pipeline: None,
            method: crate::train::exact::Method::Dd,
            evaluate_each_epoch: true,
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
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The backend failed mid-run and the run was saved: `--resume dir` continues it.
    #[error(
        "{source}\nThe run is saved in {} at epoch {}, batch {} (all earlier batches done). Once the device is back, continue the run with:\n    pnn-train --resume {}\n(add --backend serial:PATH if the device's port has changed)",
        dir.display(), position.epoch + 1, position.batch, shell_word(dir)
    )]
    Interrupted {
        source: OracleError,
        dir: PathBuf,
        position: Position,
    },
    /// SIGINT or SIGTERM asked the run to stop ([`interrupt`]); it was saved at `position`.
    #[error(
        "stopped by {}: the run is saved in {} at epoch {}, batch {} (all earlier batches done). Continue it with:\n    pnn-train --resume {}",
        signal.name(), dir.display(), position.epoch + 1, position.batch, shell_word(dir)
    )]
    Stopped {
        signal: StopSignal,
        dir: PathBuf,
        position: Position,
    },
    /// A local loss, an evaluation loss or a weight became NaN or infinite: the run stopped
    /// without saving that state.
    #[error(
        "training diverged at epoch {}, batch {}: {what}. Nothing after it was saved; {}. Try a smaller --lr, or check the device's outputs (a profile's noise levels, a device returning NaN)",
        position.epoch + 1, position.batch,
        match kept {
            Some((dir, at)) => format!(
                "the last good checkpoint, in {} at epoch {}, batch {}, is kept", dir.display(), at.epoch + 1, at.batch
            ),
            None => "no checkpoint of the run was saved (--checkpoint DIR keeps one)".into(),
        }
    )]
    Diverged {
        /// What became non-finite, and where.
        what: String,
        /// The step that diverged (its batch, 1-based; or the epoch's batches, in its evaluation).
        position: Position,
        /// The last checkpoint saved, if any.
        kept: Option<(PathBuf, Position)>,
    },
}

impl RunError {
    /// The exit status the command-line tools give this error: 2 invalid configuration, 3 data
    /// error, 4 backend or device error (an interrupted run too), 6 checkpoint error, 7 training
    /// diverged, 130/143 stopped by SIGINT/SIGTERM (128 + the signal's number).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => 2,
            RunError::Data(_) => 3,
            RunError::Oracle(e) => e.exit_code(),
            RunError::Interrupted { .. } => 4,
            RunError::Checkpoint(_) => 6,
            RunError::Diverged { .. } => 7,
            RunError::Stopped { signal, .. } => signal.exit_code(),
        }
    }
}

/// Loads the data, builds the backend's oracles and trains, reporting to `observer` (a closure
/// `FnMut(&EpochMetrics)` is one).
pub fn run(config: &RunConfig, observer: impl RunObserver) -> Result<RunSummary, RunError> {
    if config.method != crate::train::exact::Method::Dd {
        // Refused before the data loads: the message is about the settings.
        if let Some(why) = baseline::refusal(config) {
            return Err(RunError::Config(why));
        }
        let (data, model) = load(config)?;
        return baseline::run_baseline(config, &data, &model, observer);
    }
    let (data, model) = load(config)?;
    let specs = model.layer_specs();
    let mut oracles = backend::open(&config.backend, &specs)?;
    if config.exact_reference {
        tracing::info!("perturbations evaluated by the reference choreography (--exact-reference)");
        for oracle in &mut oracles {
            if let Some(layer) = oracle.in_process() {
                layer.set_exact_reference(true);
            }
        }
    }
    if let (Some(_), BackendSpec::SimProfile(path)) = (&config.resume, &config.backend) {
        let noisy = pnn_sim::profile::DeviceProfile::load(path).is_ok_and(|p| !p.noise.is_ideal());
        if noisy {
            tracing::warn!(
                "resuming on a simulated device with hardware effects: its noise streams, programming errors and drift clocks start afresh, so the run will not end bit-identical to an uninterrupted one"
            );
        }
    }
    tracing::info!(
        "backend {}: {} layers, hidden {:?}, {} MF parameters",
        config.backend,
        specs.len(),
        model.hidden,
        model.mf_parameter_count()
    );
    tracing::debug!(?config, "run configuration");
    run_pipelined(config, &data, &model, oracles, observer)
}

/// The data and the model of the run `config` describes, its hyperparameters checked: the
/// dataset loaded from the data directory (`--data-dir`, else as [`resolve_data_dir`] finds it)
/// and cut to `limit_train` and `limit_test` samples.
pub fn load(config: &RunConfig) -> Result<(Dataset, ModelSpec), RunError> {
    config.hyper.validate().map_err(RunError::Config)?;
    let model = ModelSpec::new(
        config.dataset,
        config.arch,
        config.hidden.clone(),
        config.proj_dim,
        config.hyper.seed,
    )
    .map_err(RunError::Config)?;
    check_memory(&model, config.hyper.batch_size)?;
    let dir = resolve_data_dir(config.data_dir.as_deref())?;
    let mut data = Dataset::load(config.dataset, &dir)?;
    if let Some(n) = config.limit_train {
        if n == 0 {
            return Err(RunError::Config("--limit-train must be at least 1".into()));
        }
        data.train.truncate(n);
    }
    if let Some(n) = config.limit_test {
        data.test.truncate(n);
    }
    tracing::info!(
        "{}: {} training and {} test samples from {}",
        config.dataset,
        data.train.len(),
        data.test.len(),
        dir.display()
    );
    Ok((data, model))
}

/// Refuses, before anything is allocated, a model whose run could not fit in this machine's
/// memory (an allocation failure would abort the process without a word).
fn check_memory(model: &ModelSpec, batch: usize) -> Result<(), RunError> {
    let needed = model.memory_estimate(batch);
    let Some(total) = machine_memory() else {
        return Ok(());
    };
    if needed <= total as u128 {
        return Ok(());
    }
    let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
    Err(RunError::Config(format!(
        "the model (hidden {:?}, {} parameters) with batches of {batch} needs at least {:.1} GiB of memory, and this machine has {:.1} GiB: choose smaller --hidden/--channels, --proj-dim or --batch-size",
        model.hidden,
        model.mf_parameter_count(),
        gib(needed),
        gib(total as u128)
    )))
}

/// The machine's memory in bytes (Linux: `MemTotal` of /proc/meminfo), where it can be read.
fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A path as one shell word.
pub(crate) fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Where a run stands between steps: what a checkpoint holds besides the host's state.
struct RunState {
    /// The next step.
    position: Position,
    /// The current epoch's sums of local losses, batches done and training time so far.
    loss_sums: Vec<f64>,
    batches: u32,
    epoch_train_seconds: f64,
    /// Training time of the completed epochs.
    train_seconds: f64,
    metrics: Vec<EpochMetrics>,
    /// Link counters of the processes that ran the run before this one.
    carried: Option<LinkTotals>,
    /// Where the last checkpoint was saved, and at which position.
    saved: Option<Position>,
}

impl RunState {
    fn new(layers: usize, resumed: Option<&Checkpoint>) -> Self {
        match resumed {
            None => Self {
                position: Position { epoch: 0, batch: 0 },
                loss_sums: vec![0.0; layers],
                batches: 0,
                epoch_train_seconds: 0.0,
                train_seconds: 0.0,
                metrics: Vec::new(),
                carried: None,
                saved: None,
            },
            Some(c) => Self {
                position: c.position,
                loss_sums: c.epoch_loss_sums.clone(),
                batches: c.epoch_batches,
                epoch_train_seconds: c.epoch_train_seconds,
                train_seconds: c.train_seconds,
                metrics: c.metrics.clone(),
                carried: c.link,
                saved: Some(c.position),
            },
        }
    }

    fn checkpoint(
        &self,
        identity: &RunIdentity,
        config: &RunConfig,
        snapshot: Snapshot,
        link: Option<LinkTotals>,
    ) -> Checkpoint {
        Checkpoint {
            identity: identity.clone(),
            epochs: config.epochs,
            position: self.position,
            layers: snapshot.host.shadows,
            projections: snapshot.host.projections,
            epoch_loss_sums: self.loss_sums.clone(),
            epoch_batches: self.batches,
            epoch_train_seconds: self.epoch_train_seconds,
            train_seconds: self.train_seconds,
            oracle_evaluations: snapshot.host.oracle_evaluations,
            metrics: self.metrics.clone(),
            layer_state: snapshot.layer_state,
            link,
            settings: config.settings.clone(),
            options: checkpoint::OptionsState {
                rule_state: snapshot.host.rule_state,
                chosen_eps: snapshot.host.chosen_eps,
                eps_history: (self.metrics.iter())
                    .filter_map(|m| m.eps.clone())
                    .collect(),
            },
        }
    }
}

/// The link counters of this process's layers, plus those carried over from earlier processes.
fn link_totals<O: ForwardOracle>(
    trainer: &Trainer<O>,
    recovery: &Recovery,
    carried: Option<LinkTotals>,
) -> Option<LinkTotals> {
    let shares = (trainer.oracles().iter())
        .filter_map(|o| Some(o.link()?.counters()))
        .reduce(|a, b| a + b);
    if shares.is_none() && !recovery.enabled() && carried.is_none() {
        return None;
    }
    let link = shares.unwrap_or_default();
    let now = LinkTotals {
        bytes_up: link.bytes_up,
        bytes_down: link.bytes_down,
        round_trips: link.round_trips,
        retries: link.retries,
        resyncs: link.resyncs,
        reprograms: recovery.reprograms(),
    };
    Some(carried.unwrap_or_default() + now)
}

/// Saves a checkpoint, or says why not and goes on: the previous checkpoint stands, and losing
/// the run over a full disk would be worse.
fn save_or_warn(checkpoint: &Checkpoint, dir: &Path) -> bool {
    match checkpoint.save(dir) {
        Ok(()) => {
            tracing::debug!(
                "checkpoint saved in {} (epoch {}, batch {})",
                dir.display(),
                checkpoint.position.epoch + 1,
                checkpoint.position.batch
            );
            true
        }
        Err(e) => {
            tracing::warn!("checkpoint not saved ({e}); the previous one stands");
            false
        }
    }
}

/// The test-set evaluation, one batch per step, each repeated after a device reset; `None` when
/// a signal asked the run to stop ([`interrupt`]) before it was done.
fn evaluate<O: ForwardOracle>(
    trainer: &mut Trainer<O>,
    recovery: &mut Recovery,
    snapshot: Option<&Snapshot>,
    data: &Dataset,
) -> Result<Option<Evaluation>, OracleError> {
    let mut sums = EvalSums::new(trainer.layers().len());
    let indices: Vec<usize> = (0..data.test.len()).collect();
    for batch in indices.chunks(trainer.hyper().batch_size) {
        if interrupt::requested().is_some() {
            return Ok(None);
        }
        sums = recovery.run(trainer, snapshot, |t| {
            let mut sums = sums.clone();
            t.evaluate_batch(&data.test, &data.normalizer, batch, &mut sums)
                .map(|()| sums)
        })?;
    }
    Ok(Some(sums.finish()))
}

/// Each layer's busy time over `wall` seconds, between two readings of
/// [`Trainer::layer_busy_seconds`].
fn utilisation(before: &[f64], after: &[f64], wall: f64) -> Vec<f64> {
    (before.iter().zip(after))
        .map(|(b, a)| if wall > 0.0 { (a - b) / wall } else { 0.0 })
        .collect()
}

/// Each layer's link traffic so far, [up, down] bytes, where every layer has a link.
fn layer_wire_bytes<O: ForwardOracle>(trainer: &Trainer<O>) -> Option<Vec<[u64; 2]>> {
    (trainer.oracles().iter())
        .map(|o| {
            o.link()
                .map(|l| l.counters())
                .map(|c| [c.bytes_up, c.bytes_down])
        })
        .collect()
}

/// What became NaN or infinite in a training step, if anything: a local loss or a weight.
fn non_finite<O: ForwardOracle>(losses: &[f64], trainer: &Trainer<O>) -> Option<String> {
    if let Some((l, x)) = losses.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Some(format!("the local loss of layer {} is {x}", l + 1));
    }
    for (l, layer) in trainer.layers().iter().enumerate() {
        let weights = layer.shadow.iter().chain(&layer.projection.data);
        if let Some(x) = weights.into_iter().find(|x| !x.is_finite()) {
            return Some(format!("a weight of layer {} is {x}", l + 1));
        }
    }
    None
}

/// What is NaN or infinite in an evaluation's losses, if anything.
fn eval_non_finite(eval: &Evaluation) -> Option<String> {
    [eval.loss_cumulative, eval.loss_final_layer]
        .into_iter()
        .chain(eval.loss_per_layer.iter().copied())
        .find(|x| !x.is_finite())
        .map(|x| format!("a test-set loss is {x}"))
}

/// The same directory, however spelled.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The checkpoint-safety rule: a directory that holds a saved run is written only by that run's
/// continuation (`--resume` of the same directory), or when told to start afresh (`--fresh`).
fn check_overwrite(dir: &Path, config: &RunConfig) -> Result<(), CheckpointError> {
    let continues = config.resume.as_deref().is_some_and(|r| same_dir(r, dir));
    let path = Checkpoint::path_in(dir);
    if config.fresh || continues || !path.exists() {
        return Ok(());
    }
    let what = match Checkpoint::load(dir) {
        Ok(c) if c.position.epoch >= c.epochs => format!("a finished run of {} epochs", c.epochs),
        Ok(c) => format!(
            "a run at epoch {} of {}, batch {}",
            c.position.epoch + 1,
            c.epochs,
            c.position.batch
        ),
        Err(e) => format!("a checkpoint that does not read ({e})"),
    };
    Err(CheckpointError::HoldsRun {
        path,
        what,
        dir: shell_word(dir),
    })
}

/// Where a run that has no checkpoint directory is saved when it is stopped by a signal or its
/// device fails: `pnn-rescue-<unix time>-<pid>` in the temporary directory (`$TMPDIR`, else
/// `/tmp`).
pub fn rescue_dir() -> PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    std::env::temp_dir().join(format!("pnn-rescue-{t}-{}", std::process::id()))
}

/// The training loop over any backend's oracles. Continues the run in `config.resume` if set,
/// saves checkpoints into `config.checkpoint`, and survives device resets ([`recovery`]);
/// when a device fails for good, saves the last completed batch boundary and returns
/// [`RunError::Interrupted`].
///
/// `config.pipeline` (the pipelined schedule) needs oracles that can move to a thread of their
/// own: [`run_pipelined`] takes those; here it is refused.
pub fn run_with<O: ForwardOracle>(
    config: &RunConfig,
    data: &Dataset,
    model: &ModelSpec,
    oracles: Vec<O>,
    observer: impl RunObserver,
) -> Result<RunSummary, RunError> {
    if config.pipeline.is_some() {
        return Err(RunError::Config(
            "the pipelined schedule (--pipeline) needs oracles that can be sent between threads: \
             call run::run_pipelined"
                .into(),
        ));
    }
    run_loop(config, data, model, oracles, observer, None)
}

/// [`run_with`] for oracles that can each run on a thread of their own, which the pipelined
/// schedule (`config.pipeline`) needs; the sequential schedule otherwise.
pub fn run_pipelined<O: ForwardOracle + Send>(
    config: &RunConfig,
    data: &Dataset,
    model: &ModelSpec,
    oracles: Vec<O>,
    observer: impl RunObserver,
) -> Result<RunSummary, RunError> {
    run_loop(
        config,
        data,
        model,
        oracles,
        observer,
        Some(Trainer::train_batches_pipelined),
    )
}

/// A window of batches on the pipelined schedule ([`Trainer::train_batches_pipelined`]).
type PipelinedStep<O> =
    fn(&mut Trainer<O>, &[TrainBatch<'_>]) -> Result<Vec<Vec<f64>>, OracleError>;

fn run_loop<O: ForwardOracle>(
    config: &RunConfig,
    data: &Dataset,
    model: &ModelSpec,
    mut oracles: Vec<O>,
    mut observer: impl RunObserver,
    pipelined: Option<PipelinedStep<O>>,
) -> Result<RunSummary, RunError> {
    if let Some(dir) = config.checkpoint.as_deref() {
        check_overwrite(dir, config)?;
    }
    let hyper = config.hyper.clone();
    let identity = RunIdentity::of(model, data, &hyper, config.max_batches);
    let resumed = match config.resume.as_deref() {
        Some(dir) => {
            let c = Checkpoint::load(dir)?;
            c.check_compatible(&identity, dir)?;
            if config.epochs < c.epochs {
                return Err(CheckpointError::FewerEpochs {
                    path: Checkpoint::path_in(dir),
                    saved: c.epochs,
                    given: config.epochs,
                }
                .into());
            }
            Some(c)
        }
        None => None,
    };
    // Sessions before programming: a reset during the programming shows at the first check.
    let mut recovery = Recovery::new(&mut oracles)?;
    let mut trainer = match &resumed {
        Some(c) => {
            // On a device, this re-programs it from the saved shadow.
            let mut trainer = Trainer::from_state(oracles, c.host_state(), hyper.clone())?;
            for (oracle, state) in trainer.oracles_mut().iter_mut().zip(&c.layer_state) {
                if let Some(state) = state {
                    oracle.write_layer_state(state)?;
                }
            }
            trainer
        }
        None => {
            let init = initialise(&model.layer_specs(), model.classes, hyper.seed);
            Trainer::new(oracles, init, hyper.clone())?
        }
    };
    let layers = model.hidden.len();
    let mut state = RunState::new(layers, resumed.as_ref());
    let saver = config.checkpoint.as_deref();
    if let Some(c) = &resumed {
        tracing::info!(
            "resuming from {} at epoch {}, batch {}",
            config.resume.as_deref().unwrap_or(Path::new("")).display(),
            c.position.epoch + 1,
            c.position.batch
        );
        observer.resumed(&c.metrics);
    } else if let Some(dir) = saver {
        // A first checkpoint now: a directory that cannot take one shows at once, and a run
        // cut short at any point has one to resume from.
        let snapshot = Snapshot::take(&mut trainer)?;
        let link = link_totals(&trainer, &recovery, None);
        state
            .checkpoint(&identity, config, snapshot, link)
            .save(dir)?;
        state.saved = Some(state.position);
    }
    drop(resumed);

    // A failed step: saves the last completed batch boundary (`snapshot`, taken before the step)
    // and says how to resume.
    let interrupted = |source: OracleError,
                       snapshot: Option<Snapshot>,
                       state: &RunState,
                       trainer: &Trainer<O>,
                       recovery: &Recovery|
     -> RunError {
        if !source.is_transient() {
            // A permanent mismatch: resuming would fail the same way, so no rescue checkpoint and
            // no "once the device is back" (the last checkpoint in --checkpoint DIR stands).
            return RunError::Oracle(source);
        }
        let Some(snapshot) = snapshot else {
            return match (saver, state.saved) {
                (Some(dir), Some(position)) => RunError::Interrupted {
                    source,
                    dir: dir.to_path_buf(),
                    position,
                },
                _ => RunError::Oracle(source),
            };
        };
        let dir = saver.map_or_else(rescue_dir, Path::to_path_buf);
        let link = link_totals(trainer, recovery, state.carried);
        match state
            .checkpoint(&identity, config, snapshot, link)
            .save(&dir)
        {
            Ok(()) => RunError::Interrupted {
                source,
                dir,
                position: state.position,
            },
            Err(e) => {
                tracing::error!("the run could not be saved: {e}");
                RunError::Oracle(source)
            }
        }
    };

    // A signal asked the run to stop: save where it stands (the last completed batch) and say
    // how to continue.
    let stopped = |signal: StopSignal,
                   state: &RunState,
                   trainer: &mut Trainer<O>,
                   recovery: &Recovery|
     -> RunError {
        let dir = saver.map_or_else(rescue_dir, Path::to_path_buf);
        let saved = Snapshot::take(trainer)
            .map_err(RunError::from)
            .and_then(|snapshot| {
                let link = link_totals(trainer, recovery, state.carried);
                let at = state.checkpoint(&identity, config, snapshot, link);
                at.save(&dir).map_err(RunError::from)
            });
        match saved {
            Ok(()) => RunError::Stopped {
                signal,
                dir,
                position: state.position,
            },
            Err(e) => {
                tracing::error!(
                    "stopped by {}, but the run could not be saved",
                    signal.name()
                );
                e
            }
        }
    };
    let diverged = |what: String, position: Position, state: &RunState| RunError::Diverged {
        what,
        position,
        kept: saver.map(Path::to_path_buf).zip(state.saved),
    };

    let mut last_eval: Option<Evaluation> = None;
    for epoch in state.position.epoch..config.epochs {
        let start = Instant::now();
        let order = epoch_order(hyper.seed, epoch, data.train.len());
        let planned = order
            .len()
            .div_ceil(hyper.batch_size)
            .min(config.max_batches.unwrap_or(usize::MAX));
        let first = if epoch == state.position.epoch {
            state.position.batch as usize
        } else {
            0
        };
        if first == 0 {
            state.loss_sums = vec![0f64; layers];
            state.batches = 0;
            state.epoch_train_seconds = 0.0;
        }
        state.position = Position {
            epoch,
            batch: first as u32,
        };
        let epoch_base = state.epoch_train_seconds;
        observer.epoch_started(epoch + 1, planned);
        let batches: Vec<&[usize]> = order.chunks(hyper.batch_size).take(planned).collect();
        let busy_before = trainer.layer_busy_seconds();
        let wire_before = layer_wire_bytes(&trainer);
        let mut b0 = first;
        while b0 < planned {
            // A window of batches trained as one step: one batch on the sequential schedule;
            // up to --pipeline batches on the pipelined one, never across a checkpoint.
            let mut b1 = (b0 + config.pipeline.unwrap_or(1).max(1)).min(planned);
            if let (Some(_), Some(every)) = (saver, config.checkpoint_every) {
                b1 = b1.min((b0 / every + 1) * every);
            }
            let window = &batches[b0..b1];
            let mut inputs = vec![Activations::default(); window.len()];
            for (batch, input) in window.iter().zip(&mut inputs) {
                data.normalizer.batch_activations(&data.train, batch, input);
            }
            let labels: Vec<Vec<u8>> = (window.iter())
                .map(|batch| batch.iter().map(|&i| data.train.labels[i]).collect())
                .collect();
            let snapshot = recovery.snapshot(&mut trainer)?;
            let step = recovery.run(&mut trainer, snapshot.as_ref(), |t| {
                let Some(pipelined) = pipelined.filter(|_| config.pipeline.is_some()) else {
                    return t
                        .train_batch(epoch, b0 as u32, &inputs[0], &labels[0])
                        .map(|losses| vec![losses]);
                };
                let steps: Vec<TrainBatch<'_>> = (inputs.iter().zip(&labels).enumerate())
                    .map(|(k, (input, labels))| TrainBatch {
                        epoch,
                        batch: (b0 + k) as u32,
                        input,
                        labels,
                    })
                    .collect();
                pipelined(t, &steps)
            });
            let window_losses = match step {
                Ok(losses) => losses,
                Err(e) => return Err(interrupted(e, snapshot, &state, &trainer, &recovery)),
            };
            for (k, losses) in window_losses.iter().enumerate() {
                let b = b0 + k;
                // On the pipelined schedule the weights checked are the window's last.
                if let Some(what) = non_finite(losses, &trainer) {
                    let at = Position {
                        epoch,
                        batch: b as u32 + 1,
                    };
                    return Err(diverged(what, at, &state));
                }
                state
                    .loss_sums
                    .iter_mut()
                    .zip(losses)
                    .for_each(|(s, l)| *s += l);
                state.batches += 1;
                state.position.batch = b as u32 + 1;
                state.epoch_train_seconds = epoch_base + start.elapsed().as_secs_f64();
                observer.batch_done(&BatchProgress {
                    epoch: epoch + 1,
                    batch: b + 1,
                    batches: planned,
                    samples: window[k].len(),
                    local_loss: losses,
                    oracle_evaluations: trainer.oracle_evaluations(),
                });
            }
            b0 = b1;
            if let (Some(dir), Some(every)) = (saver, config.checkpoint_every)
                && b0.is_multiple_of(every)
            {
                let snapshot = Snapshot::take(&mut trainer)?;
                let link = link_totals(&trainer, &recovery, state.carried);
                let at = state.checkpoint(&identity, config, snapshot, link);
                if save_or_warn(&at, dir) {
                    state.saved = Some(state.position);
                }
            }
            if let Some(signal) = interrupt::requested() {
                return Err(stopped(signal, &state, &mut trainer, &recovery));
            }
        }
        state.epoch_train_seconds = epoch_base + start.elapsed().as_secs_f64();
        if config.evaluate_each_epoch {
            let eval_start = Instant::now();
            let snapshot = recovery.snapshot(&mut trainer)?;
            let eval = match evaluate(&mut trainer, &mut recovery, snapshot.as_ref(), data) {
                Ok(Some(eval)) => eval,
                Ok(None) => {
                    let signal = interrupt::requested().expect("a stop was requested");
                    return Err(stopped(signal, &state, &mut trainer, &recovery));
                }
                Err(e) => return Err(interrupted(e, snapshot, &state, &trainer, &recovery)),
            };
            if let Some(what) = eval_non_finite(&eval) {
                return Err(diverged(what, state.position, &state));
            }
            let metrics = EpochMetrics::new(
                epoch + 1,
                state.epoch_train_seconds,
                eval_start.elapsed().as_secs_f64(),
                state
                    .loss_sums
                    .iter()
                    .map(|s| s / state.batches.max(1) as f64)
                    .collect(),
                &eval,
                trainer.oracle_evaluations(),
            );
            let mut metrics = metrics;
            // Where the schedule or the links make it worth knowing (the simulator in process,
            // one layer at a time, is busy all the time).
            if config.pipeline.is_some() || !config.backend.is_simulated() {
                metrics.layer_utilisation = Some(utilisation(
                    &busy_before,
                    &trainer.layer_busy_seconds(),
                    state.epoch_train_seconds - epoch_base,
                ));
            }
            if let (Some(before), Some(after)) = (&wire_before, layer_wire_bytes(&trainer)) {
                // The epoch's training and evaluation traffic of each layer, [up, down].
                metrics.layer_wire_bytes = Some(
                    (before.iter().zip(after))
                        .map(|(b, a)| [a[0] - b[0], a[1] - b[1]])
                        .collect(),
                );
            }
            metrics.eps = trainer.chosen_eps();
            observer.epoch_done(&metrics);
            state.metrics.push(metrics);
            last_eval = Some(eval);
        }
        state.train_seconds += state.epoch_train_seconds;
        state.position = Position {
            epoch: epoch + 1,
            batch: 0,
        };
        state.loss_sums = vec![0f64; layers];
        state.batches = 0;
        state.epoch_train_seconds = 0.0;
        if let Some(dir) = saver {
            let snapshot = Snapshot::take(&mut trainer)?;
            let link = link_totals(&trainer, &recovery, state.carried);
            if save_or_warn(&state.checkpoint(&identity, config, snapshot, link), dir) {
                state.saved = Some(state.position);
            }
        }
    }
    let eval = match last_eval {
        Some(eval) => eval,
        None => {
            let snapshot = recovery.snapshot(&mut trainer)?;
            match evaluate(&mut trainer, &mut recovery, snapshot.as_ref(), data) {
                Ok(Some(eval)) => eval,
                Ok(None) => {
                    let signal = interrupt::requested().expect("a stop was requested");
                    return Err(stopped(signal, &state, &mut trainer, &recovery));
                }
                Err(e) => return Err(interrupted(e, snapshot, &state, &trainer, &recovery)),
            }
        }
    };
    if let Some(what) = eval_non_finite(&eval) {
        return Err(diverged(what, state.position, &state));
    }
    let link = link_totals(&trainer, &recovery, state.carried);
    if observer.wants_model() {
        let snapshot = Snapshot::take(&mut trainer)?;
        observer.model_trained(&SavedModel::from_trainer(
            &trainer,
            &model.layer_specs(),
            &snapshot.layer_state,
            data,
            config.epochs,
        ));
    }
    Ok(RunSummary {
        oracle_evaluations: trainer.oracle_evaluations(),
        weights_sha256: trainer.weights_sha256(),
        wire_bytes_up: link.map(|w| w.bytes_up),
        wire_bytes_down: link.map(|w| w.bytes_down),
        round_trips: link.map(|w| w.round_trips),
        retries: link.map(|w| w.retries),
        resyncs: link.map(|w| w.resyncs),
        reprograms: link.map(|w| w.reprograms),
        ..summary(config, model, data, eval, state.train_seconds)
    })
}

/// The summary's fields that every method (MF+DD and the exact-gradient baselines) fills the
/// same way; the caller adds what it counts (evaluations, the weights' hash, link traffic).
fn summary(
    config: &RunConfig,
    model: &ModelSpec,
    data: &Dataset,
    eval: Evaluation,
    train_seconds: f64,
) -> RunSummary {
    let hyper = &config.hyper;
    RunSummary {
        dataset: config.dataset.name().into(),
        backend: match &config.method {
            crate::train::exact::Method::Dd => config.backend.to_string(),
            method => format!("{} ({method})", config.backend),
        },
        arch: model.arch_name().into(),
        hidden: model.hidden.clone(),
        epochs: config.epochs,
        batch_size: hyper.batch_size,
        lr: hyper.lr,
        eps: hyper.eps,
        directions: hyper.directions,
        chunk_max: hyper.chunk_max,
        seed: hyper.seed,
        // The samples each epoch trains on (--max-batches stops an epoch early).
        train_samples: config.max_batches.map_or(data.train.len(), |m| {
            data.train.len().min(m.saturating_mul(hyper.batch_size))
        }),
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
        oracle_evaluations: 0,
        weights_sha256: String::new(),
        wire_bytes_up: None,
        wire_bytes_down: None,
        round_trips: None,
        retries: None,
        resyncs: None,
        reprograms: None,
    }
}
