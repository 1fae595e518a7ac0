//! Replaying a recorded batch (`shared/reference/golden`) through the real [`Trainer`] and real
//! oracles.
//!
//! The recordings carry their own directions (an independent implementation drew them), which our
//! seeds cannot produce. Two thin adapters put them in place and change nothing else:
//!
//! - [`ReplayOracle`] wraps a real oracle and, for each seed the trainer sends, uses the next
//!   recorded direction of that layer: a perturbed evaluation writes `W ± eps v` to the real
//!   oracle and runs its clean forward pass (training mode, layer state restored after), the
//!   literal choreography of Algorithm 1; an update applies `W -= scale * sum dd_p v_p` with the
//!   trainer's `scale` and derivatives and programs the real oracle. A chunk whose length is not
//!   the recorded direction's fails: the chunking is checked, not assumed.
//! - [`ReplayRule`] wraps the real [`Sgd`]: it logs the derivatives the trainer computed (from the
//!   real oracle's features, the real projection and loss) and hands Sgd the recorded ones, so
//!   rounding in `L+ - L-` (README of golden/: ~1 % per derivative) cannot blur the comparison
//!   of `W` and `M` after the step. For `M` it also substitutes the recorded directions (the
//!   trainer draws `M`'s on the host from seeds).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use firmware_protocol::direction::step_with_vectors;
use pnn::oracle::{
    DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, InProcess, LayerShape, OracleError,
    PerturbedColumns, PerturbedPair, UpdateTerm,
};
use pnn::train::estimator::central_difference;
use pnn::train::update::{ProjectionStep, Sgd, UpdateRule, WeightStep};

/// One layer's share of a recording, in the order drawn: its `W` directions (chunks x P) with
/// their `(L+, L-)`, then its `M` directions.
#[derive(Clone, Debug, Default)]
pub struct LayerRecording {
    pub weights: Vec<Vec<f32>>,
    pub weight_losses: Vec<(f64, f64)>,
    pub projection: Vec<Vec<f32>>,
    pub projection_losses: Vec<(f64, f64)>,
}

/// Splits the recorded directions (`v_hat_concat` by `v_hat_lengths`) and losses per layer.
/// Each chunk is perturbed along `p` directions, so a layer's `W` directions add up to `p` times
/// its parameter count and its `M` directions to `p` times `features x classes`: the split needs
/// no chunk rule (the replay then checks each length against the trainer's chunks).
pub fn split_by_layer(
    all: &[f32],
    lengths: &[i64],
    losses: &[f64],
    p: usize,
    layers: &[(usize, usize)],
) -> Vec<LayerRecording> {
    let mut at = 0;
    let mut k = 0;
    let mut take = |total: usize| {
        let (mut vs, mut ls) = (Vec::new(), Vec::new());
        let mut sum = 0;
        while sum < total {
            let n = lengths[k] as usize;
            vs.push(all[at..at + n].to_vec());
            ls.push((losses[2 * k], losses[2 * k + 1]));
            at += n;
            sum += n;
            k += 1;
        }
        assert_eq!(sum, total, "recorded directions do not tile the layer");
        (vs, ls)
    };
    let out = layers
        .iter()
        .map(|&(params, projection)| {
            let (weights, weight_losses) = take(p * params);
            let (projection, projection_losses) = take(p * projection);
            LayerRecording {
                weights,
                weight_losses,
                projection,
                projection_losses,
            }
        })
        .collect();
    assert_eq!(at, all.len(), "not every recorded direction is a layer's");
    out
}

/// A real oracle whose directions are the recorded ones (see the module docs).
pub struct ReplayOracle<O> {
    pub inner: O,
    params: Vec<f32>,
    recorded: VecDeque<Vec<f32>>,
    by_seed: HashMap<u64, Vec<f32>>,
}

impl<O: ForwardOracle> ReplayOracle<O> {
    pub fn new(inner: O, weights: &[Vec<f32>]) -> Self {
        Self {
            inner,
            params: Vec::new(),
            recorded: weights.iter().cloned().collect(),
            by_seed: HashMap::new(),
        }
    }

    /// Recorded directions the trainer has not asked for.
    pub fn unused(&self) -> usize {
        self.recorded.len()
    }
}

impl<O: ForwardOracle> ForwardOracle for ReplayOracle<O> {
    fn spec(&self) -> &LayerShape {
        self.inner.spec()
    }

    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        self.params = params.to_vec();
        self.inner.write_parameters(params)
    }

    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        self.inner.read_parameters()
    }

    fn load_input(&mut self, input: &pnn::oracle::Activations) -> Result<(), OracleError> {
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
        let state = self.inner.read_layer_state()?;
        out.clear();
        for seed in seeds {
            let v = self
                .recorded
                .pop_front()
                .expect("the trainer asks for more directions than were recorded");
            assert_eq!(
                v.len(),
                chunk.len(),
                "chunk {chunk:?}: the recorded direction has {} values (chunking differs)",
                v.len()
            );
            let mut pair = Vec::new();
            for sign in [1.0f32, -1.0] {
                let mut w = self.params.clone();
                (w[chunk.clone()].iter_mut().zip(&v)).for_each(|(w, vi)| *w += sign * eps * vi);
                self.inner.write_parameters(&w)?;
                pair.push(self.inner.forward(ForwardMode::Train)?.features);
                if let Some(s) = &state {
                    self.inner.write_layer_state(s)?;
                }
            }
            let minus = pair.pop().unwrap();
            out.push((pair.pop().unwrap(), minus));
            self.by_seed.insert(seed.0, v);
        }
        self.inner.write_parameters(&self.params)
    }

    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError> {
        let mut g = vec![0.0; chunk.len()];
        let vectors = terms.iter().map(|t| {
            let v = &self.by_seed[&t.seed.0];
            (t.derivative, &v[..])
        });
        step_with_vectors(&mut self.params[chunk], scale, vectors, &mut g);
        self.inner.write_parameters(&self.params)
    }

    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        self.inner.read_layer_state()
    }

    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        self.inner.write_layer_state(state)
    }

    fn in_process(&mut self) -> Option<&mut dyn InProcess> {
        Some(self)
    }
}

/// In process only so that the trainer's [`Sgd`] copies its shadow from the parameters the replay
/// computed (it would otherwise regenerate the seeded directions); every evaluation still goes
/// through [`ForwardOracle::evaluate_perturbed`].
impl<O: ForwardOracle> InProcess for ReplayOracle<O> {
    fn parameters(&self) -> &[f32] {
        &self.params
    }

    fn evaluate_perturbed_columns(
        &mut self,
        _: Range<usize>,
        _: &[DirectionSeed],
        _: f32,
        _: &mut PerturbedColumns,
    ) -> Result<bool, OracleError> {
        Ok(false)
    }

    fn prefetch_directions(&mut self, _: Range<usize>, _: &[DirectionSeed]) {}

    fn set_exact_reference(&mut self, _: bool) {}
}

/// One `W` direction: the derivative the trainer computed and the recorded `(L+, L-)`.
#[derive(Clone, Copy, Debug)]
pub struct WeightDerivative {
    pub layer: usize,
    pub ours: f32,
    pub recorded: (f64, f64),
}

/// The real [`Sgd`] fed the recorded derivatives (see the module docs).
pub struct ReplayRule {
    sgd: Sgd,
    layers: Vec<LayerRecording>,
    eps: f32,
    pub log: Arc<Mutex<Vec<WeightDerivative>>>,
}

impl ReplayRule {
    pub fn new(layers: Vec<LayerRecording>, eps: f32) -> Self {
        Self {
            sgd: Sgd::default(),
            layers,
            eps,
            log: Arc::default(),
        }
    }
}

impl UpdateRule for ReplayRule {
    fn step_weights(
        &mut self,
        step: &WeightStep<'_>,
        oracle: &mut dyn ForwardOracle,
        shadow: &mut [f32],
    ) -> Result<(), OracleError> {
        let p = step.terms.len();
        let recorded = &self.layers[step.layer].weight_losses[step.chunk_index * p..][..p];
        let terms: Vec<UpdateTerm> = (step.terms.iter().zip(recorded))
            .map(|(t, &(lp, lm))| {
                self.log.lock().unwrap().push(WeightDerivative {
                    layer: step.layer,
                    ours: t.derivative,
                    recorded: (lp, lm),
                });
                UpdateTerm {
                    seed: t.seed,
                    derivative: central_difference(lp, lm, self.eps),
                }
            })
            .collect();
        let fed = WeightStep {
            terms: &terms,
            ..*step
        };
        self.sgd.step_weights(&fed, oracle, shadow)
    }

    fn step_projection(&mut self, step: &ProjectionStep<'_>, chunk: &mut [f32]) {
        let p = step.derivatives.len();
        let layer = &self.layers[step.layer];
        let at = step.chunk_index * p;
        let directions = &layer.projection[at..at + p];
        for (ours, recorded) in step.directions.iter().zip(directions) {
            assert_eq!(
                ours.len(),
                recorded.len(),
                "layer {} M chunk {}: the recorded direction has another length (chunking differs)",
                step.layer,
                step.chunk_index
            );
        }
        let derivatives: Vec<f32> = layer.projection_losses[at..at + p]
            .iter()
            .map(|&(lp, lm)| central_difference(lp, lm, self.eps))
            .collect();
        let fed = ProjectionStep {
            derivatives: &derivatives,
            directions,
            ..*step
        };
        self.sgd.step_projection(&fed, chunk);
    }
}

/// The largest gap between our `L+ - L-` and the recorded one, and the smallest recorded
/// `|L+ - L-|`: a replay whose gap is not well below the smallest difference would get some
/// derivative's size (or sign) wrong.
pub fn difference_gap(log: &[WeightDerivative], eps: f32) -> (f64, f64) {
    let mut worst = 0f64;
    let mut smallest = f64::INFINITY;
    for d in log {
        let recorded = d.recorded.0 - d.recorded.1;
        let ours = d.ours as f64 * 2.0 * eps as f64;
        worst = worst.max((ours - recorded).abs());
        smallest = smallest.min(recorded.abs());
    }
    (worst, smallest)
}
