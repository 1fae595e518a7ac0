//! The update rule: how the directional derivatives of one chunk become a change of its
//! parameters. One seam ([`UpdateRule`]); [`Sgd`], the paper's rule, is the default; [`Moments`]
//! is momentum and Adam (`--optimizer`, [`Optimizer`]).
//!
//! # Adding a rule (momentum, Adam, ...)
//!
//! Write one type implementing [`UpdateRule`] in a file beside this one and hand it to
//! [`super::Trainer::with_update_rule`]. It implements:
//!
//! - [`UpdateRule::step_weights`]: one chunk of `W_l`. It gets the chunk's `P` seeded terms
//!   `(seed_p, dd_p)` and must change the layer (through the oracle) and the host's shadow to
//!   the same bits. A rule with a seeded form (SGD) sends the terms with
//!   `ForwardOracle::apply_update`; a rule without one computes the new chunk in the shadow (the
//!   directions are `firmware_protocol::direction::fill_direction(seed_p, ..)`), keeps its state
//!   (moments, keyed by [`WeightStep::layer`] and [`WeightStep::chunk_index`]) on the host, and
//!   programs the layer from the shadow (`ForwardOracle::write_parameters`: the whole layer, as
//!   the contract has no write of one chunk yet). `tests/estimator.rs` has such a rule.
//! - [`UpdateRule::step_projection`]: one chunk of `M_l` (host only), given the explicit
//!   direction vectors.
//! - [`UpdateRule::state`] / [`UpdateRule::restore_state`] where it keeps state, so a checkpoint
//!   can carry it (SGD keeps none).
//!
//! The estimate itself (which evaluations, central or forward differences) is not the rule's
//! concern: see [`super::estimator`].

use std::ops::Range;

use firmware_protocol::direction::{apply_update, step_with_vectors};

use crate::oracle::{ForwardOracle, OracleError, UpdateTerm};

/// One chunk of `W_l` to step.
#[derive(Clone, Copy, Debug)]
pub struct WeightStep<'a> {
    /// The layer's index in the model.
    pub layer: usize,
    /// The chunk's index among the layer's weight chunks.
    pub chunk_index: usize,
    /// The chunk, in the layer's flat parameters.
    pub chunk: &'a Range<usize>,
    /// `(seed_p, dd_p)` for the `P` directions of this step.
    pub terms: &'a [UpdateTerm],
    /// The learning rate.
    pub lr: f32,
}

/// One chunk of `M_l` (whole rows, host only) to step.
#[derive(Clone, Copy, Debug)]
pub struct ProjectionStep<'a> {
    /// The layer's index in the model.
    pub layer: usize,
    /// The chunk's index among the projection's row chunks.
    pub chunk_index: usize,
    /// `dd_p` per direction.
    pub derivatives: &'a [f32],
    /// The unit direction `u_p` per derivative, each as long as the chunk.
    pub directions: &'a [Vec<f32>],
    /// The learning rate.
    pub lr: f32,
}

/// How derivatives along random directions change the parameters (see the module docs).
pub trait UpdateRule {
    /// Steps the chunk `step.chunk` of `W_l` on the layer and, to the same bits, in `shadow`
    /// (the host's copy of the whole layer).
    fn step_weights(
        &mut self,
        step: &WeightStep<'_>,
        oracle: &mut dyn ForwardOracle,
        shadow: &mut [f32],
    ) -> Result<(), OracleError>;

    /// Steps one chunk of `M_l` (rows x classes, row-major), on the host.
    fn step_projection(&mut self, step: &ProjectionStep<'_>, chunk: &mut [f32]);

    /// The rule's state (moments and the like), flat, for a checkpoint; empty where it keeps none.
    fn state(&self) -> Vec<f32> {
        Vec::new()
    }

    /// Restores what [`UpdateRule::state`] returned.
    fn restore_state(&mut self, state: &[f32]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} values of update-rule state for a rule that keeps none",
                state.len()
            ))
        }
    }
}

/// Stochastic gradient descent on the estimate, thesis eq. 13 / Algorithm 1 line 12:
/// `W_k -= lr * n_k / P * sum_p dd_p v_p`, sent to the layer as seeded terms. Keeps no state
/// (only scratch space).
#[derive(Clone, Debug, Default)]
pub struct Sgd {
    v: Vec<f32>,
    g: Vec<f32>,
}

impl Sgd {
    /// `lr * n / P`: the step's scale for a chunk of `n` parameters and `P` directions.
    fn scale(lr: f32, n: usize, directions: usize) -> f32 {
        lr * n as f32 / directions as f32
    }
}

impl UpdateRule for Sgd {
    fn step_weights(
        &mut self,
        step: &WeightStep<'_>,
        oracle: &mut dyn ForwardOracle,
        shadow: &mut [f32],
    ) -> Result<(), OracleError> {
        let chunk = step.chunk;
        let scale = Self::scale(step.lr, chunk.len(), step.terms.len());
        oracle.apply_update(chunk.clone(), scale, step.terms)?;
        let shadow = &mut shadow[chunk.clone()];
        match oracle.in_process() {
            // The layer is in this process: its chunk is the update's result already.
            Some(layer) => shadow.copy_from_slice(&layer.parameters()[chunk.clone()]),
            None => {
                self.v.resize(chunk.len(), 0.0);
                self.g.resize(chunk.len(), 0.0);
                apply_update(shadow, scale, step.terms, &mut self.v, &mut self.g);
            }
        }
        Ok(())
    }

    fn step_projection(&mut self, step: &ProjectionStep<'_>, chunk: &mut [f32]) {
        let scale = Self::scale(step.lr, chunk.len(), step.derivatives.len());
        self.g.resize(chunk.len(), 0.0);
        let terms = (step.derivatives.iter())
            .zip(step.directions)
            .map(|(d, u)| (*d, &u[..]));
        step_with_vectors(chunk, scale, terms, &mut self.g);
    }
}

/// Which update rule steps the estimate: `sgd` (the paper's, the default), `momentum` or `adam`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    #[default]
    Sgd,
    Momentum,
    Adam,
}

impl Optimizer {
    pub fn is_sgd(&self) -> bool {
        *self == Optimizer::Sgd
    }

    /// A fresh rule of this kind.
    pub fn rule(self) -> Box<dyn UpdateRule + Send + Sync> {
        match self {
            Optimizer::Sgd => Box::new(Sgd::default()),
            Optimizer::Momentum | Optimizer::Adam => Box::new(Moments::new(self)),
        }
    }
}

impl std::fmt::Display for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Optimizer::Sgd => "sgd",
            Optimizer::Momentum => "momentum",
            Optimizer::Adam => "adam",
        })
    }
}

impl std::str::FromStr for Optimizer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sgd" => Ok(Optimizer::Sgd),
            "momentum" => Ok(Optimizer::Momentum),
            "adam" => Ok(Optimizer::Adam),
            other => Err(format!(
                "'{other}' is not an optimizer: expected sgd, momentum or adam"
            )),
        }
    }
}

/// Momentum's decay (PyTorch's heavy ball: `b = beta b + g`, `w -= lr b`).
pub const MOMENTUM_BETA: f32 = 0.9;
/// Adam's decays and denominator floor (Kingma & Ba, PyTorch's defaults).
pub const ADAM_BETAS: (f32, f32) = (0.9, 0.999);
pub const ADAM_EPSILON: f32 = 1e-8;

/// Which chunk a moment belongs to: (0 = `W_l`, 1 = `M_l`), layer, chunk index.
type Slot = (u8, usize, usize);

#[derive(Clone, Debug, Default, PartialEq)]
struct SlotState {
    steps: u64,
    first: Vec<f32>,
    second: Vec<f32>,
}

/// Momentum and Adam on the DD estimate `g = n/P * sum_p dd_p v_p` (eq. 10, the same vector SGD
/// steps along). Neither has a seeded form (the moments sum every past direction), so the rule
/// computes the new chunk on the host and programs the layer from its shadow
/// (`ForwardOracle::write_parameters`, the whole layer: 4 bytes per parameter over the link per
/// chunk step). The moments live on the host, keyed by chunk, and travel in checkpoints
/// ([`UpdateRule::state`]).
#[derive(Clone, Debug)]
pub struct Moments {
    kind: Optimizer,
    slots: std::collections::BTreeMap<Slot, SlotState>,
    v: Vec<f32>,
    g: Vec<f32>,
}

impl Moments {
    pub fn new(kind: Optimizer) -> Self {
        assert!(!kind.is_sgd(), "SGD keeps no moments: use Sgd");
        Self {
            kind,
            slots: Default::default(),
            v: Vec::new(),
            g: Vec::new(),
        }
    }

    /// Steps `params` (one chunk) along `g` (its estimate) with the slot's moments.
    fn step(&mut self, slot: Slot, params: &mut [f32], lr: f32) {
        let kind = self.kind;
        let state = self.slots.entry(slot).or_default();
        let n = params.len();
        if state.first.len() != n {
            // A chunk seen for the first time (or resized: a fresh start is the only sense).
            *state = SlotState {
                steps: 0,
                first: vec![0.0; n],
                second: if kind == Optimizer::Adam {
                    vec![0.0; n]
                } else {
                    Vec::new()
                },
            };
        }
        state.steps += 1;
        let g = &self.g[..n];
        match kind {
            Optimizer::Momentum => {
                for ((w, b), gi) in params.iter_mut().zip(&mut state.first).zip(g) {
                    *b = MOMENTUM_BETA * *b + gi;
                    *w -= lr * *b;
                }
            }
            Optimizer::Adam => {
                let (b1, b2) = ADAM_BETAS;
                let t = state.steps.min(i32::MAX as u64) as i32;
                let c1 = 1.0 - b1.powi(t);
                let c2 = 1.0 - b2.powi(t);
                for (((w, m), v), gi) in (params.iter_mut())
                    .zip(&mut state.first)
                    .zip(&mut state.second)
                    .zip(g)
                {
                    *m = b1 * *m + (1.0 - b1) * gi;
                    *v = b2 * *v + (1.0 - b2) * gi * gi;
                    *w -= lr * (*m / c1) / ((*v / c2).sqrt() + ADAM_EPSILON);
                }
            }
            Optimizer::Sgd => unreachable!("checked in new"),
        }
    }
}

impl UpdateRule for Moments {
    fn step_weights(
        &mut self,
        step: &WeightStep<'_>,
        oracle: &mut dyn ForwardOracle,
        shadow: &mut [f32],
    ) -> Result<(), OracleError> {
        let chunk = step.chunk.clone();
        let n = chunk.len();
        self.v.resize(n, 0.0);
        self.g.resize(n, 0.0);
        // g = n/P * sum_p dd_p v_p: the sum as apply_update forms it, then the scale.
        let g = &mut self.g[..n];
        g.iter_mut().for_each(|x| *x = 0.0);
        for t in step.terms {
            firmware_protocol::direction::fill_direction(t.seed, &mut self.v[..n]);
            for (gi, vi) in g.iter_mut().zip(&self.v[..n]) {
                *gi += t.derivative * vi;
            }
        }
        let scale = n as f32 / step.terms.len() as f32;
        g.iter_mut().for_each(|x| *x *= scale);
        self.step(
            (0, step.layer, step.chunk_index),
            &mut shadow[chunk],
            step.lr,
        );
        oracle.write_parameters(shadow)
    }

    fn step_projection(&mut self, step: &ProjectionStep<'_>, chunk: &mut [f32]) {
        let n = chunk.len();
        self.g.resize(n, 0.0);
        let g = &mut self.g[..n];
        g.iter_mut().for_each(|x| *x = 0.0);
        for (d, u) in step.derivatives.iter().zip(step.directions) {
            for (gi, ui) in g.iter_mut().zip(u) {
                *gi += d * ui;
            }
        }
        let scale = n as f32 / step.derivatives.len() as f32;
        g.iter_mut().for_each(|x| *x *= scale);
        self.step((1, step.layer, step.chunk_index), chunk, step.lr);
    }

    /// Per chunk, in order: group, layer, chunk, length, steps (low, high 32 bits), all as f32
    /// bit patterns; then the first moments and, for Adam, the second.
    fn state(&self) -> Vec<f32> {
        let word = |x: u64| f32::from_bits(x as u32);
        let mut out = Vec::new();
        for ((group, layer, chunk), s) in &self.slots {
            out.extend([
                word(*group as u64),
                word(*layer as u64),
                word(*chunk as u64),
                word(s.first.len() as u64),
                word(s.steps & 0xFFFF_FFFF),
                word(s.steps >> 32),
            ]);
            out.extend_from_slice(&s.first);
            out.extend_from_slice(&s.second);
        }
        out
    }

    fn restore_state(&mut self, state: &[f32]) -> Result<(), String> {
        let mut slots = std::collections::BTreeMap::new();
        let mut rest = state;
        let adam = self.kind == Optimizer::Adam;
        while !rest.is_empty() {
            if rest.len() < 6 {
                return Err(format!(
                    "{} optimizer state values end mid-header",
                    rest.len()
                ));
            }
            let w = |i: usize| rest[i].to_bits() as u64;
            let (group, layer, chunk, len) = (w(0), w(1), w(2), w(3) as usize);
            let steps = w(4) | (w(5) << 32);
            let need = 6 + len * if adam { 2 } else { 1 };
            if group > 1 || rest.len() < need {
                return Err(format!(
                    "the optimizer state is not {}'s (a chunk of {len} values, group {group})",
                    self.kind
                ));
            }
            let first = rest[6..6 + len].to_vec();
            let second = if adam {
                rest[6 + len..need].to_vec()
            } else {
                Vec::new()
            };
            slots.insert(
                (group as u8, layer as usize, chunk as usize),
                SlotState {
                    steps,
                    first,
                    second,
                },
            );
            rest = &rest[need..];
        }
        self.slots = slots;
        Ok(())
    }
}
