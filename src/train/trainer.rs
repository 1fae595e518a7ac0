//! The MF+DD trainer: thesis Algorithm 1 (chunked), over any [`ForwardOracle`].
//!
//! Per batch, every layer in order: each chunk of `W_l` is perturbed along P seeded directions on
//! the oracle, the host computes `L±` and `dd_p = (L+ - L-) / (2 eps)` (eq. 13, see
//! [`super::estimator`]) and the update rule ([`super::update`]; by default SGD,
//! `W_k -= lr * n_k / P * sum_p dd_p v_p`) steps the chunk at once, before the next chunk
//! (sequential block-coordinate descent, section 4.4). Then a clean forward pass gives `a_l`; the
//! chunks of `M_l` are updated on the host from `a_l` alone (lines 14-24,
//! [`super::projection`]), and `a_l` feeds layer `l+1`. The host keeps a shadow of every layer's
//! parameters, which the update rule keeps equal to the layer's.

use std::ops::Range;
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use firmware_protocol::{DirectionKey, ParamGroup};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};

use super::chunking::projection_row_chunks;
use super::estimator::{self, Difference, directional_derivatives};
use super::evaluation::{EvalSums, Evaluation};
use super::projection::{self, Projection, ProjectionTraining, train_projection};
use super::update::{Optimizer, UpdateRule, WeightStep};
use crate::data::{Normalizer, Split};
use crate::model::InitialParams;
use crate::oracle::{Activations, ForwardMode, ForwardOracle, OracleError, UpdateTerm};

/// MF+DD hyperparameters; the defaults are the paper's (section 4.5).
///
/// The fields after `seed` are left out of the JSON (a checkpoint's run identity) while they
/// hold the paper's choice, so a run with the defaults keeps the identity it had before they
/// existed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyper {
    pub lr: f32,
    pub eps: f32,
    pub directions: usize,
    pub chunk_max: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Central (the paper's) or forward differences ([`Difference`]).
    #[serde(default, skip_serializing_if = "Difference::is_central")]
    pub difference: Difference,
    /// The update rule stepping the estimate ([`Optimizer`]; SGD, the paper's, by default).
    #[serde(default, skip_serializing_if = "Optimizer::is_sgd")]
    pub optimizer: Optimizer,
    /// `--eps auto`: each layer's eps is chosen from the device's measured noise
    /// ([`estimator::choose_eps`]), `eps` being the least it takes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eps_auto: bool,
}

impl Default for Hyper {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            eps: 1e-3,
            directions: 4,
            chunk_max: 50_000,
            batch_size: 256,
            seed: 0,
            difference: Difference::Central,
            optimizer: Optimizer::Sgd,
            eps_auto: false,
        }
    }
}

impl Hyper {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!(
                "learning rate must be a positive number, got {}",
                self.lr
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("eps must be a positive number, got {}", self.eps));
        }
        if self.directions == 0 || self.directions > firmware_protocol::direction::MAX_UPDATE_TERMS
        {
            return Err(format!(
                "directions must be between 1 and {}, got {}",
                firmware_protocol::direction::MAX_UPDATE_TERMS,
                self.directions
            ));
        }
        if self.chunk_max == 0 {
            return Err("chunk-max must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("batch size must be at least 1".into());
        }
        Ok(())
    }
}

/// The host's state of one layer: the shadow of `W_l`, `M_l`, and their chunks.
#[derive(Clone, Debug)]
pub struct LayerState {
    pub shadow: Vec<f32>,
    pub projection: Projection,
    pub weight_chunks: Vec<Range<usize>>,
    pub projection_rows: Vec<Range<usize>>,
}

/// The host's whole training state: every layer's shadow of `W_l`, every `M_l`, and the
/// evaluation counter. Checkpoints store it; reset recovery rolls back to it (`crate::run::recovery`).
#[derive(Clone, Debug, PartialEq)]
pub struct HostState {
    pub shadows: Vec<Vec<f32>>,
    pub projections: Vec<Projection>,
    pub oracle_evaluations: u64,
    /// The update rule's state ([`UpdateRule::state`]: momentum's or Adam's moments; empty for
    /// SGD).
    pub rule_state: Vec<f32>,
    /// `--eps auto`: the eps each layer's weights are perturbed by now (empty otherwise).
    pub chosen_eps: Vec<f32>,
}

const SHUFFLE_DOMAIN: u64 = 0x706E_6E2D_7368_7566; // "pnn-shuf"

/// The order in which an epoch visits the first `n` training samples (seeded Fisher-Yates).
pub fn epoch_order(seed: u64, epoch: u32, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let key = firmware_protocol::direction::mix(seed ^ SHUFFLE_DOMAIN).wrapping_add(epoch as u64);
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
        firmware_protocol::direction::mix(key),
    ));
    order
}

pub struct Trainer<O> {
    oracles: Vec<O>,
    layers: Vec<LayerState>,
    hyper: Hyper,
    evaluations: u64,
    rule: Box<dyn UpdateRule + Send + Sync>,
    /// Each layer's eps for its weights: `hyper.eps`, or `--eps auto`'s choice.
    eps: Vec<f32>,
    scratch: Scratch,
    /// Time each layer has spent training ([`Trainer::layer_busy_seconds`]).
    busy: Vec<Duration>,
}

/// One batch for [`Trainer::train_batches_pipelined`].
pub struct TrainBatch<'a> {
    pub epoch: u32,
    pub batch: u32,
    pub input: &'a Activations,
    pub labels: &'a [u8],
}

/// What one layer's step on one batch gives.
struct LayerDone {
    loss: f64,
    next_input: Activations,
    evaluations: u64,
}

/// One layer's step of Algorithm 1 on one batch: the chunks of `W_l`, the clean pass, `M_l`.
struct LayerStep<'a> {
    layer: usize,
    epoch: u32,
    batch: u32,
    hyper: &'a Hyper,
    /// The layer's eps for `W_l`: `hyper.eps`, or `--eps auto`'s current choice (re-chosen here).
    eps: &'a mut f32,
}

type SharedRule<'a> = Mutex<&'a mut (dyn UpdateRule + Send + Sync + 'static)>;

impl LayerStep<'_> {
    fn train<O: ForwardOracle>(
        self,
        oracle: &mut O,
        state: &mut LayerState,
        rule: &SharedRule<'_>,
        s: &mut Scratch,
        input: &Activations,
        labels: &[u8],
    ) -> Result<LayerDone, OracleError> {
        let (hyper, l, epoch, batch) = (self.hyper, self.layer, self.epoch, self.batch);
        let rule = || rule.lock().unwrap_or_else(|p| p.into_inner());
        let key_of = |group, chunk: usize, index: usize| DirectionKey {
            run_seed: hyper.seed,
            epoch,
            batch,
            layer: l as u32,
            group,
            chunk: chunk as u32,
            index: index as u32,
        };
        let key = |group, chunk: usize, index: usize| key_of(group, chunk, index).seed();
        let (mut evaluations, eps) = (0, self.eps);
        oracle.load_input(input)?;
        if hyper.eps_auto
            && batch.is_multiple_of(estimator::EPS_AUTO_RECHECK_BATCHES)
            && let Some(first) = state.weight_chunks.first()
        {
            // Directions of their own (indices past any P), so the training's are untouched.
            let seeds: Vec<_> = (0..hyper.directions)
                .map(|p| key(ParamGroup::Weights, 0, 64 + p))
                .collect();
            let choice = estimator::choose_eps(
                oracle,
                &state.projection,
                first,
                &seeds,
                hyper.eps,
                labels,
                &mut s.estimator,
            )?;
            evaluations += choice.evaluations;
            if choice.eps != *eps {
                tracing::info!(
                    "eps auto, layer {}: eps {} (clean-loss spread {:.3e}, mean |L+ - L-| {:.3e})",
                    l + 1,
                    choice.eps,
                    choice.noise,
                    choice.signal
                );
            }
            *eps = choice.eps;
        }
        let eps = *eps;
        // Lines 3-13: the chunks of W_l, each updated before the next is perturbed.
        for (k, chunk) in state.weight_chunks.iter().enumerate() {
            let seeds: Vec<_> = (0..hyper.directions)
                .map(|p| key(ParamGroup::Weights, k, p))
                .collect();
            evaluations += hyper.difference.evaluations(seeds.len());
            directional_derivatives(
                oracle,
                &state.projection,
                chunk,
                &seeds,
                eps,
                hyper.difference,
                labels,
                &mut s.estimator,
                &mut s.derivatives,
            )?;
            s.terms.clear();
            s.terms.extend(
                (seeds.iter().zip(&s.derivatives)).map(|(seed, &derivative)| UpdateTerm {
                    seed: *seed,
                    derivative,
                }),
            );
            let step = WeightStep {
                layer: l,
                chunk_index: k,
                chunk,
                terms: &s.terms,
                lr: hyper.lr,
            };
            rule().step_weights(&step, oracle, &mut state.shadow)?;
        }
        // Line 25, before the M update as the reference implementation does: the clean pass
        // with the updated W_l gives the a_l that trains M_l and feeds layer l+1.
        let out = oracle.forward(ForwardMode::Train)?;
        evaluations += 1;
        let mut rule = rule();
        let training = ProjectionTraining {
            layer: l,
            row_chunks: &state.projection_rows,
            directions: hyper.directions,
            eps: hyper.eps,
            difference: hyper.difference,
            lr: hyper.lr,
            rule: &mut **rule,
        };
        let loss = train_projection(
            &mut state.projection,
            training,
            &out.features,
            labels,
            |j, p| key(ParamGroup::Projection, j, p),
            &mut s.projection,
        );
        drop(rule);
        // The next batch starts this layer with its first chunk: its directions can be
        // drawn while the layers after this one train (same values, a hint only).
        if let Some(first) = state.weight_chunks.first() {
            let next: Vec<_> = (0..hyper.directions)
                .map(|p| {
                    DirectionKey {
                        batch: batch + 1,
                        ..key_of(ParamGroup::Weights, 0, p)
                    }
                    .seed()
                })
                .collect();
            if let Some(layer) = oracle.in_process() {
                layer.prefetch_directions(first.clone(), &next);
            }
        }
        Ok(LayerDone {
            loss,
            next_input: out.into_next_input(),
            evaluations,
        })
    }
}

#[derive(Default)]
struct Scratch {
    estimator: estimator::Scratch,
    projection: projection::Scratch,
    derivatives: Vec<f32>,
    terms: Vec<UpdateTerm>,
}

impl<O: ForwardOracle> Trainer<O> {
    /// Checks the oracles against the initial parameters and programs them.
    pub fn new(
        mut oracles: Vec<O>,
        init: InitialParams,
        hyper: Hyper,
    ) -> Result<Self, OracleError> {
        hyper.validate().map_err(OracleError::Shape)?;
        if oracles.len() != init.layers.len() {
            return Err(OracleError::Shape(format!(
                "the model has {} layers, the backend provides {}",
                init.layers.len(),
                oracles.len()
            )));
        }
        let classes = init.projections.first().map_or(0, |p| p.classes);
        let mut layers = Vec::new();
        for (l, ((oracle, params), projection)) in oracles
            .iter_mut()
            .zip(init.layers)
            .zip(init.projections)
            .enumerate()
        {
            let spec = *oracle.spec();
            if spec.param_count() != params.len() || spec.feature_width() != projection.rows {
                return Err(OracleError::Shape(format!(
                    "layer {l}: the backend's layer has {} parameters and {} features, the model {} and {}",
                    spec.param_count(),
                    spec.feature_width(),
                    params.len(),
                    projection.rows
                )));
            }
            oracle.write_parameters(&params)?;
            layers.push(LayerState {
                weight_chunks: spec.weight_chunks(hyper.chunk_max).collect(),
                projection_rows: projection_row_chunks(projection.rows, classes, hyper.chunk_max),
                shadow: params,
                projection,
            });
        }
        let depth = layers.len();
        Ok(Self {
            oracles,
            evaluations: 0,
            rule: hyper.optimizer.rule(),
            eps: vec![hyper.eps; layers.len()],
            layers,
            hyper,
            scratch: Scratch::default(),
            busy: vec![Duration::ZERO; depth],
        })
    }

    /// This trainer with `rule` in place of the one `hyper.optimizer` names (see [`UpdateRule`]).
    pub fn with_update_rule(mut self, rule: impl UpdateRule + Send + Sync + 'static) -> Self {
        self.rule = Box::new(rule);
        self
    }

    /// The update rule, for its state (a checkpoint).
    pub fn update_rule(&self) -> &dyn UpdateRule {
        &*self.rule
    }

    /// A trainer that continues from `state` (a checkpoint): the oracles are programmed from its
    /// shadows, as [`Trainer::new`] does from initial parameters.
    pub fn from_state(
        oracles: Vec<O>,
        state: HostState,
        hyper: Hyper,
    ) -> Result<Self, OracleError> {
        let init = InitialParams {
            layers: state.shadows,
            projections: state.projections,
        };
        let mut trainer = Self::new(oracles, init, hyper)?;
        trainer.evaluations = state.oracle_evaluations;
        trainer
            .rule
            .restore_state(&state.rule_state)
            .map_err(OracleError::Shape)?;
        trainer.restore_eps(&state.chosen_eps)?;
        Ok(trainer)
    }

    pub fn host_state(&self) -> HostState {
        HostState {
            shadows: self.layers.iter().map(|l| l.shadow.clone()).collect(),
            projections: self.layers.iter().map(|l| l.projection.clone()).collect(),
            oracle_evaluations: self.evaluations,
            rule_state: self.rule.state(),
            chosen_eps: self.chosen_eps().unwrap_or_default(),
        }
    }

    /// `--eps auto`: each layer's eps now; `None` without it.
    pub fn chosen_eps(&self) -> Option<Vec<f32>> {
        self.hyper.eps_auto.then(|| self.eps.clone())
    }

    fn restore_eps(&mut self, chosen: &[f32]) -> Result<(), OracleError> {
        if chosen.is_empty() {
            self.eps.iter_mut().for_each(|e| *e = self.hyper.eps);
        } else if chosen.len() == self.eps.len() && self.hyper.eps_auto {
            self.eps.copy_from_slice(chosen);
        } else {
            return Err(OracleError::Shape(format!(
                "{} chosen eps values for {} layers (eps auto: {})",
                chosen.len(),
                self.eps.len(),
                self.hyper.eps_auto
            )));
        }
        Ok(())
    }

    /// Puts back a state from [`Trainer::host_state`] and programs every layer from it (a device
    /// that lost its parameters is re-programmed from the shadow).
    pub fn restore(&mut self, state: &HostState) -> Result<(), OracleError> {
        let fits = state.shadows.len() == self.layers.len()
            && state.projections.len() == self.layers.len()
            && self
                .layers
                .iter()
                .zip(&state.shadows)
                .all(|(l, s)| l.shadow.len() == s.len())
            && (self.layers.iter().zip(&state.projections))
                .all(|(l, p)| l.projection.data.len() == p.data.len());
        if !fits {
            return Err(OracleError::Shape(
                "the state to restore is of another model".into(),
            ));
        }
        for ((layer, oracle), (shadow, projection)) in (self.layers.iter_mut())
            .zip(&mut self.oracles)
            .zip(state.shadows.iter().zip(&state.projections))
        {
            layer.shadow.copy_from_slice(shadow);
            layer.projection.clone_from(projection);
            oracle.write_parameters(shadow)?;
        }
        self.evaluations = state.oracle_evaluations;
        self.rule
            .restore_state(&state.rule_state)
            .map_err(OracleError::Shape)?;
        self.restore_eps(&state.chosen_eps)
    }

    pub fn hyper(&self) -> &Hyper {
        &self.hyper
    }

    pub fn layers(&self) -> &[LayerState] {
        &self.layers
    }

    pub fn oracles(&self) -> &[O] {
        &self.oracles
    }

    pub fn oracles_mut(&mut self) -> &mut [O] {
        &mut self.oracles
    }

    /// Forward evaluations the oracles ran for training: 2P per chunk of `W` plus one clean pass
    /// per layer and batch. (`M` updates run on the host and need no oracle.)
    pub fn oracle_evaluations(&self) -> u64 {
        self.evaluations
    }

    /// Algorithm 1 on one batch. Returns each layer's local loss on the clean pass, before its
    /// `M` update.
    pub fn train_batch(
        &mut self,
        epoch: u32,
        batch: u32,
        input: &Activations,
        labels: &[u8],
    ) -> Result<Vec<f64>, OracleError> {
        let hyper = self.hyper.clone();
        let rule = Mutex::new(&mut *self.rule);
        // Layer l > 0 reads the features layer l - 1 produced.
        let mut produced: Option<Activations> = None;
        let mut losses = Vec::with_capacity(self.layers.len());
        let layers = self
            .oracles
            .iter_mut()
            .zip(&mut self.layers)
            .zip(&mut self.eps);
        for (l, (((oracle, state), eps), busy)) in layers.zip(&mut self.busy).enumerate() {
            let step = LayerStep {
                layer: l,
                epoch,
                batch,
                hyper: &hyper,
                eps,
            };
            let start = Instant::now();
            let input = produced.as_ref().unwrap_or(input);
            let done = step.train(oracle, state, &rule, &mut self.scratch, input, labels)?;
            *busy += start.elapsed();
            self.evaluations += done.evaluations;
            losses.push(done.loss);
            produced = Some(done.next_input);
        }
        Ok(losses)
    }

    /// Algorithm 1 on `batches` in order, pipelined across layers (Mono-Forward's locality,
    /// thesis section 3): each layer runs on its own thread, so layer `l` trains batch `t` while
    /// layer `l-1` trains batch `t+1`. Layer `l` needs only `a_{l-1}` of batch `t`, computed with
    /// layer `l-1`'s weights after its update on batch `t`, exactly as [`Trainer::train_batch`]
    /// computes it, and each layer's own steps run in batch order: the results are bit-identical
    /// to calling `train_batch` on each batch, for any rig and any timing. (An update rule with
    /// state keeps it per layer, as the [`WeightStep`] it is given names the layer; calls for
    /// different layers may come in either order.) Returns each batch's losses, as `train_batch`.
    pub fn train_batches_pipelined(
        &mut self,
        batches: &[TrainBatch<'_>],
    ) -> Result<Vec<Vec<f64>>, OracleError>
    where
        O: Send,
    {
        let hyper = self.hyper.clone();
        let depth = self.layers.len();
        let rule = Mutex::new(&mut *self.rule);
        type Done = Result<(Vec<f64>, u64, Duration), Option<OracleError>>;
        let results: Vec<Done> = std::thread::scope(|scope| {
            let mut upstream: Option<mpsc::Receiver<Activations>> = None;
            let layers = self
                .oracles
                .iter_mut()
                .zip(&mut self.layers)
                .zip(&mut self.eps);
            let workers: Vec<_> = layers
                .enumerate()
                .map(|(l, ((oracle, state), eps))| {
                    let (to_next, from_this) = mpsc::channel::<Activations>();
                    let from_previous = upstream.replace(from_this);
                    let (rule, hyper) = (&rule, &hyper);
                    scope.spawn(move || -> Done {
                        let mut scratch = Scratch::default();
                        let (mut losses, mut evaluations) = (Vec::new(), 0);
                        let mut busy = Duration::ZERO;
                        for b in batches {
                            let received;
                            let input = match &from_previous {
                                None => b.input,
                                // A closed channel: a layer before this one failed.
                                Some(rx) => match rx.recv() {
                                    Ok(a) => {
                                        received = a;
                                        &received
                                    }
                                    Err(_) => return Err(None),
                                },
                            };
                            let step = LayerStep {
                                layer: l,
                                epoch: b.epoch,
                                batch: b.batch,
                                hyper,
                                eps: &mut *eps,
                            };
                            let start = Instant::now();
                            let done = step
                                .train(oracle, state, rule, &mut scratch, input, b.labels)
                                .map_err(Some)?;
                            busy += start.elapsed();
                            evaluations += done.evaluations;
                            losses.push(done.loss);
                            // A closed channel: a layer after this one failed.
                            if l + 1 < depth && to_next.send(done.next_input).is_err() {
                                return Err(None);
                            }
                        }
                        Ok((losses, evaluations, busy))
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut per_layer = Vec::with_capacity(depth);
        let mut failure = None;
        for (l, result) in results.into_iter().enumerate() {
            match result {
                Ok((losses, evaluations, busy)) => {
                    self.evaluations += evaluations;
                    self.busy[l] += busy;
                    per_layer.push(losses);
                }
                Err(e) => failure = failure.or(e),
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok((0..batches.len())
            .map(|t| per_layer.iter().map(|losses| losses[t]).collect())
            .collect())
    }

    /// Seconds each layer has spent on its training steps (its oracle's requests and the host's
    /// arithmetic for it, not waiting for its input), since the trainer was built.
    pub fn layer_busy_seconds(&self) -> Vec<f64> {
        self.busy.iter().map(Duration::as_secs_f64).collect()
    }

    /// Evaluates both prediction modes and every layer on `split`, through the oracles
    /// ([`super::evaluation::evaluate`] in batches of `hyper.batch_size`).
    pub fn evaluate(
        &mut self,
        split: &Split,
        normalizer: &Normalizer,
    ) -> Result<Evaluation, OracleError> {
        let projections: Vec<&Projection> = self.layers.iter().map(|l| &l.projection).collect();
        super::evaluation::evaluate(
            &mut self.oracles,
            &projections,
            split,
            normalizer,
            self.hyper.batch_size,
        )
    }

    /// Adds the samples `batch` of `split` to an evaluation's sums ([`Trainer::evaluate`] is
    /// these batches in order, `hyper.batch_size` samples each). `sums` changes only on success.
    pub fn evaluate_batch(
        &mut self,
        split: &Split,
        normalizer: &Normalizer,
        batch: &[usize],
        sums: &mut EvalSums,
    ) -> Result<(), OracleError> {
        let projections: Vec<&Projection> = self.layers.iter().map(|l| &l.projection).collect();
        super::evaluation::evaluate_batch(
            &mut self.oracles,
            &projections,
            split,
            normalizer,
            batch,
            sums,
        )
        .map(drop)
    }

    /// SHA-256 of every layer's parameters then every projection, as little-endian f32 bytes.
    pub fn weights_sha256(&self) -> String {
        let mut h = Sha256::new();
        for state in &self.layers {
            state.shadow.iter().for_each(|w| h.update(w.to_le_bytes()));
        }
        for state in &self.layers {
            state
                .projection
                .data
                .iter()
                .for_each(|w| h.update(w.to_le_bytes()));
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}
