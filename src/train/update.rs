//! The update rule: how the directional derivatives of one chunk become a change of its
//! parameters. One seam ([`UpdateRule`]); [`Sgd`], the paper's rule, is the default.
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
