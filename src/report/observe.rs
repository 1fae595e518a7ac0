//! Watching a run from outside: [`RunObserver`] is told when epochs start, when each batch is
//! done, each epoch's metrics, and (on request) the trained model at the end.
//!
//! A closure `FnMut(&EpochMetrics)` is an observer (it sees the epochs only), so is `&mut` of one,
//! and so is a pair of observers, which lets a caller combine a progress display, a metrics file
//! and a model export without writing a new type.

use std::path::PathBuf;

use super::export::{ExportError, SavedModel};
use super::metrics::EpochMetrics;

/// What a batch reports as it finishes.
#[derive(Clone, Debug)]
pub struct BatchProgress<'a> {
    /// 1-based epoch.
    pub epoch: u32,
    /// 1-based batch within the epoch.
    pub batch: usize,
    /// Batches this epoch will train (after `max_batches`).
    pub batches: usize,
    /// Samples in this batch.
    pub samples: usize,
    /// Each layer's local loss on this batch (clean pass, before its `M` update).
    pub local_loss: &'a [f64],
    /// Oracle forward evaluations for training since the start of the run.
    pub oracle_evaluations: u64,
}

pub trait RunObserver {
    /// An epoch (1-based) begins; it will train `batches` batches.
    fn epoch_started(&mut self, _epoch: u32, _batches: usize) {}
    fn batch_done(&mut self, _progress: &BatchProgress<'_>) {}
    fn epoch_done(&mut self, _metrics: &EpochMetrics) {}
    /// Whether [`RunObserver::model_trained`] should be called (building the model copies every
    /// parameter, so it is done only on request).
    fn wants_model(&self) -> bool {
        false
    }
    /// The trained model, once, after the last epoch.
    fn model_trained(&mut self, _model: &SavedModel) {}
    /// The run continues from a checkpoint; `history` holds the metrics of the epochs done
    /// before. By default they are passed to [`RunObserver::epoch_done`] again, so that a
    /// metrics file written from scratch ends up as an uninterrupted run's.
    fn resumed(&mut self, history: &[EpochMetrics]) {
        for m in history {
            self.epoch_done(m);
        }
    }
}

impl<F: FnMut(&EpochMetrics)> RunObserver for F {
    fn epoch_done(&mut self, metrics: &EpochMetrics) {
        self(metrics)
    }
}

/// Observes nothing.
pub struct NoObserver;

impl RunObserver for NoObserver {}

macro_rules! forward_all {
    ($($field:tt),+) => {
        fn epoch_started(&mut self, epoch: u32, batches: usize) {
            $(self.$field.epoch_started(epoch, batches);)+
        }
        fn batch_done(&mut self, progress: &BatchProgress<'_>) {
            $(self.$field.batch_done(progress);)+
        }
        fn epoch_done(&mut self, metrics: &EpochMetrics) {
            $(self.$field.epoch_done(metrics);)+
        }
        fn wants_model(&self) -> bool {
            false $(|| self.$field.wants_model())+
        }
        fn model_trained(&mut self, model: &SavedModel) {
            $(if self.$field.wants_model() { self.$field.model_trained(model); })+
        }
        fn resumed(&mut self, history: &[EpochMetrics]) {
            $(self.$field.resumed(history);)+
        }
    };
}

impl<A: RunObserver, B: RunObserver> RunObserver for (A, B) {
    forward_all!(0, 1);
}

impl<A: RunObserver, B: RunObserver, C: RunObserver> RunObserver for (A, B, C) {
    forward_all!(0, 1, 2);
}

/// A borrowed observer, so a caller keeps its observer (and what it collected) after the run.
pub struct ByRef<'a, T: ?Sized>(pub &'a mut T);

impl<T: RunObserver + ?Sized> RunObserver for ByRef<'_, T> {
    fn epoch_started(&mut self, epoch: u32, batches: usize) {
        self.0.epoch_started(epoch, batches)
    }
    fn batch_done(&mut self, progress: &BatchProgress<'_>) {
        self.0.batch_done(progress)
    }
    fn epoch_done(&mut self, metrics: &EpochMetrics) {
        self.0.epoch_done(metrics)
    }
    fn wants_model(&self) -> bool {
        self.0.wants_model()
    }
    fn model_trained(&mut self, model: &SavedModel) {
        self.0.model_trained(model)
    }
    fn resumed(&mut self, history: &[EpochMetrics]) {
        self.0.resumed(history)
    }
}

/// An observer that saves the trained model at the end of a run.
pub struct SaveModel {
    pub path: PathBuf,
    /// `None` until the run ends.
    pub result: Option<Result<(), ExportError>>,
}

impl SaveModel {
    pub fn new(path: PathBuf) -> Self {
        Self { path, result: None }
    }
}

impl RunObserver for SaveModel {
    fn wants_model(&self) -> bool {
        true
    }
    fn model_trained(&mut self, model: &SavedModel) {
        self.result = Some(model.save(&self.path));
        if let Some(Ok(())) = self.result {
            tracing::info!(path = %self.path.display(), "saved the model");
        }
    }
}
