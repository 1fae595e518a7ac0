//! [`SimulatedLayer`]: what every simulated layer ([`DenseLayer`], [`ConvBlock`]) does, the one
//! interface the host's in-process oracle (`pnn::backend::sim::SimOracle`) and the device server
//! ([`crate::device::Device`]) are both written against.
//!
//! A new kind of simulated layer implements this trait and is served in process and behind the
//! device protocol at once. The methods are called once per request (a batch, a chunk), never in
//! an inner loop, so a `dyn SimulatedLayer` costs nothing measurable; the hot loops stay inside
//! each layer's own (static) fast paths.

use std::fmt::Debug;
use std::ops::Range;

use firmware_protocol::shape::{ForwardMode, LayerShape};
use firmware_protocol::{DirectionSeed, UpdateTerm};

use crate::{Choreography, ConvBlock, DenseLayer, SimError};

/// One simulated layer: parameters, a cached input batch, a clean forward pass, perturbed
/// evaluations that leave no trace, the seeded update, and its state besides the parameters.
pub trait SimulatedLayer: Debug + Send + Sync {
    /// Its shape, in the vocabulary every crate shares.
    fn shape(&self) -> LayerShape;

    /// The flat parameters (as the host's shadow and the golden recordings lay them out).
    fn params(&self) -> &[f32];

    /// Programs every parameter (a device write).
    fn set_params(&mut self, params: &[f32]) -> Result<(), SimError>;

    /// Caches a batch of inputs (batch x input width, row-major) for what follows.
    fn load_input(&mut self, x: &[f32]) -> Result<(), SimError>;

    /// Rows of the cached batch (0 before any).
    fn batch(&self) -> usize;

    /// The clean forward pass: `features` (batch x feature width) and, for a layer whose
    /// next-layer input differs from its features (a CNN block), that input in `next` (left
    /// empty otherwise). In [`ForwardMode::Train`] a layer with BatchNorm commits the batch's
    /// statistics; a dense layer reads no mode.
    fn forward(
        &mut self,
        mode: ForwardMode,
        features: &mut Vec<f32>,
        next: &mut Vec<f32>,
    ) -> Result<(), SimError>;

    /// Algorithm 1, lines 6-9: `(a+, a-)` per seed, the training-mode features under
    /// `W ± eps v` over `chunk`. Leaves the layer bit-unchanged (parameters, layer state).
    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), SimError>;

    /// [`SimulatedLayer::evaluate_perturbed`] over the features the chunk touches only, with the
    /// clean features in `clean`, where the layer can give that exactly; `Ok(false)`, computing
    /// nothing, where it cannot (the default).
    fn evaluate_perturbed_columns(
        &mut self,
        _chunk: Range<usize>,
        _seeds: &[DirectionSeed],
        _eps: f32,
        _out: &mut Vec<(Vec<f32>, Vec<f32>)>,
        _clean: &mut Vec<f32>,
    ) -> Result<bool, SimError> {
        Ok(false)
    }

    /// Algorithm 1, lines 10 and 12, with the arithmetic of
    /// `firmware_protocol::direction::apply_update`.
    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), SimError>;

    /// State besides the parameters that a forward pass changes (a CNN block's BatchNorm
    /// running means, then variances); empty for a layer without any.
    fn layer_state(&self) -> Vec<f32>;

    /// Programs what [`SimulatedLayer::layer_state`] reads.
    fn set_layer_state(&mut self, state: &[f32]) -> Result<(), SimError>;

    /// A hint that the next perturbed evaluation is of `chunk` along `seeds` (the default
    /// ignores it).
    fn prefetch_directions(&mut self, _chunk: Range<usize>, _seeds: &[DirectionSeed]) {}

    fn choreography(&self) -> Choreography;

    /// Selects the fast path or the literal reference choreography.
    fn set_choreography(&mut self, choreography: Choreography);

    /// Back to the power-on state (zero parameters, fresh device state and layer state, no
    /// input), keeping the choreography.
    fn power_on(&mut self);

    /// The dense layer, if this is one (for inspecting its device state).
    fn as_dense(&self) -> Option<&DenseLayer> {
        None
    }

    fn as_dense_mut(&mut self) -> Option<&mut DenseLayer> {
        None
    }

    /// The CNN block, if this is one (for inspecting its BatchNorm state).
    fn as_conv(&self) -> Option<&ConvBlock> {
        None
    }

    fn as_conv_mut(&mut self) -> Option<&mut ConvBlock> {
        None
    }
}

/// The simulated layer of `shape`, ideal (exact f32), all parameters zero.
pub fn ideal(shape: LayerShape) -> Box<dyn SimulatedLayer> {
    match shape {
        LayerShape::Dense { inputs, outputs } => Box::new(DenseLayer::new(inputs, outputs)),
        LayerShape::Conv(geometry) => Box::new(ConvBlock::new(geometry)),
    }
}
