//! Test-set evaluation through programmed oracles: both prediction modes of section 4.1
//! (cumulative goodness over the layers, and the final layer alone) and every layer's figures.
//! One loop, used by the trainer and by anything else that evaluates a model (export).

use std::borrow::Borrow;

use crate::data::{Normalizer, Split};
use crate::oracle::{Activations, ForwardMode, ForwardOracle, OracleError};

use super::loss::{argmax_rows, cross_entropy};
use super::projection::Projection;

/// Test-set figures of both prediction modes (section 4.1) and of each layer.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    pub accuracy_cumulative: f64,
    pub accuracy_final_layer: f64,
    pub loss_cumulative: f64,
    pub loss_final_layer: f64,
    pub accuracy_per_layer: Vec<f64>,
    pub loss_per_layer: Vec<f64>,
}

/// An evaluation's running sums, batch by batch ([`evaluate_batch`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalSums {
    correct: Vec<usize>,
    loss: Vec<f64>,
    correct_cum: usize,
    loss_cum: f64,
    samples: usize,
}

impl EvalSums {
    pub fn new(layers: usize) -> Self {
        Self {
            correct: vec![0; layers],
            loss: vec![0.0; layers],
            ..Default::default()
        }
    }

    pub fn finish(&self) -> Evaluation {
        let nf = self.samples.max(1) as f64;
        let last = self.correct.len() - 1;
        Evaluation {
            accuracy_cumulative: self.correct_cum as f64 / nf,
            accuracy_final_layer: self.correct[last] as f64 / nf,
            loss_cumulative: self.loss_cum / nf,
            loss_final_layer: self.loss[last] / nf,
            accuracy_per_layer: self.correct.iter().map(|&c| c as f64 / nf).collect(),
            loss_per_layer: self.loss.iter().map(|&l| l / nf).collect(),
        }
    }
}

/// The classes one batch was predicted as, in the batch's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchPredictions {
    /// By the goodness summed over the layers.
    pub cumulative: Vec<usize>,
    /// By the final layer's goodness alone.
    pub final_layer: Vec<usize>,
}

/// Evaluates `split` in batches of `batch_size` samples, in order, through `oracles` (programmed)
/// and their `projections`.
pub fn evaluate<O: ForwardOracle, P: Borrow<Projection>>(
    oracles: &mut [O],
    projections: &[P],
    split: &Split,
    normalizer: &Normalizer,
    batch_size: usize,
) -> Result<Evaluation, OracleError> {
    if oracles.is_empty() {
        return Err(OracleError::Shape("a model of no layers".into()));
    }
    let mut sums = EvalSums::new(oracles.len());
    let indices: Vec<usize> = (0..split.len()).collect();
    for batch in indices.chunks(batch_size.max(1)) {
        evaluate_batch(oracles, projections, split, normalizer, batch, &mut sums)?;
    }
    Ok(sums.finish())
}

/// Adds the samples `batch` of `split` to an evaluation's sums and returns their predictions
/// ([`evaluate`] is these batches in order). `sums` changes only on success.
pub fn evaluate_batch<O: ForwardOracle, P: Borrow<Projection>>(
    oracles: &mut [O],
    projections: &[P],
    split: &Split,
    normalizer: &Normalizer,
    batch: &[usize],
    sums: &mut EvalSums,
) -> Result<BatchPredictions, OracleError> {
    let layers = oracles.len();
    if layers == 0 || projections.len() != layers || sums.correct.len() != layers {
        return Err(OracleError::Shape(format!(
            "{layers} layers, {} projections and sums of {} layers",
            projections.len(),
            sums.correct.len()
        )));
    }
    let classes = projections[0].borrow().classes;
    let mut g = Vec::new();
    let mut input = Activations::default();
    normalizer.batch_activations(split, batch, &mut input);
    let labels: Vec<u8> = batch.iter().map(|&i| split.labels[i]).collect();
    let mut cumulative = vec![0f32; batch.len() * classes];
    let mut per_layer = Vec::with_capacity(layers);
    let mut final_layer = Vec::new();
    for (oracle, projection) in oracles.iter_mut().zip(projections) {
        let projection = projection.borrow();
        oracle.load_input(&input)?;
        let out = oracle.forward(ForwardMode::Eval)?;
        projection.goodness(&out.features, &mut g);
        final_layer = argmax_rows(&g, classes).collect();
        per_layer.push((
            cross_entropy(&g, classes, &labels) * batch.len() as f64,
            count_correct(&final_layer, &labels),
        ));
        cumulative.iter_mut().zip(&g).for_each(|(c, v)| *c += v);
        input = out.into_next_input();
    }
    for (l, (loss, correct)) in per_layer.into_iter().enumerate() {
        sums.loss[l] += loss;
        sums.correct[l] += correct;
    }
    sums.loss_cum += cross_entropy(&cumulative, classes, &labels) * batch.len() as f64;
    let predicted: Vec<usize> = argmax_rows(&cumulative, classes).collect();
    sums.correct_cum += count_correct(&predicted, &labels);
    sums.samples += batch.len();
    Ok(BatchPredictions {
        cumulative: predicted,
        final_layer,
    })
}

fn count_correct(predicted: &[usize], labels: &[u8]) -> usize {
    (predicted.iter())
        .zip(labels)
        .filter(|(p, y)| **p == **y as usize)
        .count()
}
