//! The MF+DD trainer: thesis Algorithm 1 (chunked), over any [`ForwardOracle`].
//!
//! Per batch, every layer in order: each chunk of `W_l` is perturbed along P seeded directions on
//! the oracle, the host computes `L±` and `dd_p = (L+ - L-) / (2 eps)` (eq. 13) and the update
//! `W_k -= lr * n_k / P * sum_p dd_p v_p` is applied at once, before the next chunk (sequential
//! block-coordinate descent, section 4.4). Then a clean forward pass gives `a_l`; the chunks of
//! `M_l` are updated on the host from `a_l` alone (lines 14-24), and `a_l` feeds layer `l+1`.
//! The host keeps a shadow of every layer's parameters, updated with the same seeded arithmetic
//! (or, for a layer simulated in this process, copied from it after the update).

use std::ops::Range;

use firmware_protocol::direction::{apply_update, fill_direction, step_with_vectors};
use firmware_protocol::{DirectionKey, ParamGroup};
use pnn_sim::matmul::matmul;
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};

use crate::chunking::{projection_row_chunks, weight_chunks};
use crate::data::{Normalizer, Split};
use crate::loss::{argmax_rows, cross_entropy};
use crate::model::InitialParams;
use crate::oracle::{
    Activations, ForwardMode, ForwardOracle, OracleError, PerturbedColumns, PerturbedPair,
    UpdateTerm,
};
use crate::projection::Projection;

/// MF+DD hyperparameters; the defaults are the paper's (section 4.5).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyper {
    pub lr: f32,
    pub eps: f32,
    pub directions: usize,
    pub chunk_max: usize,
    pub batch_size: usize,
    pub seed: u64,
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

/// The host's whole training state: every layer's shadow of `W_l`, every `M_l`, and the
/// evaluation counter. Checkpoints store it; reset recovery rolls back to it (`crate::recovery`).
#[derive(Clone, Debug, PartialEq)]
pub struct HostState {
    pub shadows: Vec<Vec<f32>>,
    pub projections: Vec<Projection>,
    pub oracle_evaluations: u64,
}

/// An evaluation's running sums, batch by batch ([`Trainer::evaluate_batch`]).
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
    classes: usize,
    evaluations: u64,
    scratch: Scratch,
}

#[derive(Default)]
struct Scratch {
    pairs: Vec<PerturbedPair>,
    columns: PerturbedColumns,
    base: Vec<f32>,
    goodness: Vec<f32>,
    perturbed: Vec<f32>,
    delta: Vec<f32>,
    sub: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    u: Vec<Vec<f32>>,
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
                weight_chunks: weight_chunks(
                    &spec.chunk_units(),
                    spec.param_count(),
                    hyper.chunk_max,
                ),
                projection_rows: projection_row_chunks(projection.rows, classes, hyper.chunk_max),
                shadow: params,
                projection,
            });
        }
        Ok(Self {
            oracles,
            layers,
            hyper,
            classes,
            evaluations: 0,
            scratch: Scratch::default(),
        })
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
        Ok(trainer)
    }

    pub fn host_state(&self) -> HostState {
        HostState {
            shadows: self.layers.iter().map(|l| l.shadow.clone()).collect(),
            projections: self.layers.iter().map(|l| l.projection.clone()).collect(),
            oracle_evaluations: self.evaluations,
        }
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
        Ok(())
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
        // Layer l > 0 reads the features layer l - 1 produced.
        let mut produced: Option<Activations> = None;
        let mut losses = Vec::with_capacity(self.layers.len());
        for (l, (oracle, state)) in self.oracles.iter_mut().zip(&mut self.layers).enumerate() {
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
            oracle.load_input(produced.as_ref().unwrap_or(input))?;
            let spec = *oracle.spec();
            let s = &mut self.scratch;
            // Lines 3-13: the chunks of W_l, each updated before the next is perturbed.
            for (k, chunk) in state.weight_chunks.iter().enumerate() {
                let seeds: Vec<_> = (0..hyper.directions)
                    .map(|p| key(ParamGroup::Weights, k, p))
                    .collect();
                self.evaluations += 2 * seeds.len() as u64;
                s.terms.clear();
                let losses = perturbed_losses(
                    oracle,
                    &spec,
                    &state.projection,
                    chunk,
                    &seeds,
                    hyper.eps,
                    labels,
                    s,
                )?;
                for (seed, (l_plus, l_minus)) in seeds.iter().zip(losses) {
                    let derivative = ((l_plus - l_minus) / (2.0 * hyper.eps as f64)) as f32;
                    s.terms.push(UpdateTerm {
                        seed: *seed,
                        derivative,
                    });
                }
                let scale = hyper.lr * chunk.len() as f32 / hyper.directions as f32;
                oracle.apply_update(chunk.clone(), scale, &s.terms)?;
                let shadow = &mut state.shadow[chunk.clone()];
                match oracle.parameters_in_process() {
                    Some(params) => shadow.copy_from_slice(&params[chunk.clone()]),
                    None => {
                        s.v.resize(chunk.len(), 0.0);
                        s.g.resize(chunk.len(), 0.0);
                        apply_update(shadow, scale, &s.terms, &mut s.v, &mut s.g);
                    }
                }
            }
            // Line 25, before the M update as the reference implementation does: the clean pass
            // with the updated W_l gives the a_l that trains M_l and feeds layer l+1.
            let out = oracle.forward(ForwardMode::Train)?;
            self.evaluations += 1;
            losses.push(update_projection(
                &mut state.projection,
                &state.projection_rows,
                &out.features,
                labels,
                &hyper,
                |j, p| key(ParamGroup::Projection, j, p),
                s,
            ));
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
                oracle.prefetch_directions(first.clone(), &next);
            }
            produced = Some(match out.next {
                Some(next) => next,
                None => out.features,
            });
        }
        Ok(losses)
    }

    /// Evaluates both prediction modes and every layer on `split`, through the oracles.
    pub fn evaluate(
        &mut self,
        split: &Split,
        normalizer: &Normalizer,
    ) -> Result<Evaluation, OracleError> {
        let mut sums = EvalSums::new(self.layers.len());
        let indices: Vec<usize> = (0..split.len()).collect();
        for batch in indices.chunks(self.hyper.batch_size) {
            self.evaluate_batch(split, normalizer, batch, &mut sums)?;
        }
        Ok(sums.finish())
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
        let classes = self.classes;
        let mut x = Vec::new();
        let mut g = Vec::new();
        normalizer.batch(split, batch, &mut x);
        let labels: Vec<u8> = batch.iter().map(|&i| split.labels[i]).collect();
        let mut input = Activations::new(batch.len(), split.sample_len, x);
        let mut cumulative = vec![0f32; batch.len() * classes];
        let mut per_layer = Vec::with_capacity(self.layers.len());
        for (oracle, state) in self.oracles.iter_mut().zip(&self.layers) {
            oracle.load_input(&input)?;
            let out = oracle.forward(ForwardMode::Eval)?;
            state.projection.goodness(&out.features, &mut g);
            per_layer.push((
                cross_entropy(&g, classes, &labels) * batch.len() as f64,
                count_correct(&g, classes, &labels),
            ));
            cumulative.iter_mut().zip(&g).for_each(|(c, v)| *c += v);
            input = match out.next {
                Some(next) => next,
                None => out.features,
            };
        }
        for (l, (loss, correct)) in per_layer.into_iter().enumerate() {
            sums.loss[l] += loss;
            sums.correct[l] += correct;
        }
        sums.loss_cum += cross_entropy(&cumulative, classes, &labels) * batch.len() as f64;
        sums.correct_cum += count_correct(&cumulative, classes, &labels);
        sums.samples += batch.len();
        Ok(())
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

/// Lines 6-9 of Algorithm 1 on one chunk: `(L+, L-)` per seed.
///
/// A chunk changes only the features [`LayerShape::touched_features`] names, so the goodness is
/// computed as `G = a[:, outside] M[outside] + a[:, touched] M[touched]`. A backend that can
/// promise the untouched features are the clean ones gives the touched columns alone and the
/// first term is computed once for all evaluations; any other backend gives whole features and
/// both terms are computed per evaluation. The two ways perform the same operations on the same
/// values wherever the promise holds, so they give the same losses bit for bit; where the
/// features are not split (a chunk touching all of them) the goodness is one product.
#[allow(clippy::too_many_arguments)]
fn perturbed_losses<O: ForwardOracle>(
    oracle: &mut O,
    spec: &crate::oracle::LayerShape,
    projection: &Projection,
    chunk: &Range<usize>,
    seeds: &[firmware_protocol::DirectionSeed],
    eps: f32,
    labels: &[u8],
    s: &mut Scratch,
) -> Result<Vec<(f64, f64)>, OracleError> {
    let classes = projection.classes;
    let touched = spec.touched_features(chunk);
    let split = touched.len() < spec.feature_width();
    let mut losses = Vec::with_capacity(seeds.len());
    if split && oracle.evaluate_perturbed_columns(chunk.clone(), seeds, eps, &mut s.columns)? {
        let c = &s.columns;
        if c.touched != touched
            || c.pairs.len() != seeds.len()
            || c.clean.width != spec.feature_width()
        {
            return Err(OracleError::Shape(format!(
                "the backend's perturbed columns {:?} are not the chunk's {touched:?}",
                c.touched
            )));
        }
        projection.goodness_outside(&c.clean, &touched, &mut s.base);
        for (plus, minus) in &c.pairs {
            let mut loss = |a: &Activations| {
                s.goodness.clone_from(&s.base);
                projection.add_goodness_of(
                    &a.data,
                    a.rows,
                    touched.len(),
                    &touched,
                    &mut s.goodness,
                );
                cross_entropy(&s.goodness, classes, labels)
            };
            losses.push((loss(plus), loss(minus)));
        }
        return Ok(losses);
    }
    oracle.evaluate_perturbed(chunk.clone(), seeds, eps, &mut s.pairs)?;
    for (plus, minus) in &s.pairs {
        let mut loss = |a: &Activations| {
            if split {
                projection.goodness_outside(a, &touched, &mut s.goodness);
                let ld = a.width;
                projection.add_goodness_of(
                    &a.data[touched.start..],
                    a.rows,
                    ld,
                    &touched,
                    &mut s.goodness,
                );
            } else {
                projection.goodness(a, &mut s.goodness);
            }
            cross_entropy(&s.goodness, classes, labels)
        };
        losses.push((loss(plus), loss(minus)));
    }
    Ok(losses)
}

fn count_correct(logits: &[f32], classes: usize, labels: &[u8]) -> usize {
    argmax_rows(logits, classes)
        .zip(labels)
        .filter(|(p, y)| *p == **y as usize)
        .count()
}

/// Lines 14-24: the chunks of `M_l` (whole rows), host only, on the features `a_l`. A perturbed
/// goodness is `G0 ± eps a_rows U`, exact by linearity and free of the rounding that adding
/// `eps u` to `M` first would cost. Returns the local loss before the update.
fn update_projection(
    projection: &mut Projection,
    row_chunks: &[Range<usize>],
    features: &Activations,
    labels: &[u8],
    hyper: &Hyper,
    seed_of: impl Fn(usize, usize) -> firmware_protocol::DirectionSeed,
    s: &mut Scratch,
) -> f64 {
    let classes = projection.classes;
    let batch = features.rows;
    projection.goodness(features, &mut s.goodness);
    let loss_before = cross_entropy(&s.goodness, classes, labels);
    s.u.resize_with(hyper.directions, Vec::new);
    for (j, rows) in row_chunks.iter().enumerate() {
        if j > 0 {
            projection.goodness(features, &mut s.goodness);
        }
        let n = rows.len() * classes;
        // The chunk's columns of a_l, contiguous (batch x rows).
        s.sub.clear();
        for row in features.data.chunks_exact(features.width) {
            s.sub.extend_from_slice(&row[rows.clone()]);
        }
        let mut derivatives = Vec::with_capacity(hyper.directions);
        for (p, u) in s.u.iter_mut().enumerate() {
            u.resize(n, 0.0);
            fill_direction(seed_of(j, p), u);
            s.delta.resize(batch * classes, 0.0);
            matmul(batch, classes, rows.len(), &s.sub, u, &mut s.delta, false);
            let mut loss_at = |sign: f32| {
                s.perturbed.clear();
                s.perturbed.extend(
                    s.goodness
                        .iter()
                        .zip(&s.delta)
                        .map(|(g, d)| g + sign * hyper.eps * d),
                );
                cross_entropy(&s.perturbed, classes, labels)
            };
            let (l_plus, l_minus) = (loss_at(1.0), loss_at(-1.0));
            derivatives.push(((l_plus - l_minus) / (2.0 * hyper.eps as f64)) as f32);
        }
        let scale = hyper.lr * n as f32 / hyper.directions as f32;
        s.g.resize(n, 0.0);
        let terms = derivatives.iter().zip(&s.u).map(|(d, u)| (*d, &u[..]));
        let m_chunk = &mut projection.data[rows.start * classes..rows.end * classes];
        step_with_vectors(m_chunk, scale, terms, &mut s.g);
    }
    loss_before
}
