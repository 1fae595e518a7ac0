//! The boundary between the host and whatever executes a layer: [`ForwardOracle`].
//!
//! One oracle is one layer of the model, on any backend (the in-process simulator, a device over a
//! serial port). The trainer drives every backend through this trait and never touches weights
//! directly: it hands over seeds and scalars, and gets activations back. No gradient is ever
//! asked of an oracle.

use std::ops::Range;

pub use firmware_protocol::shape::{ChunkUnits, ConvGeometry, ForwardMode, LayerShape};
pub use firmware_protocol::{DirectionSeed, UpdateTerm};

/// A batch of row vectors, row-major.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Activations {
    pub rows: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Activations {
    pub fn new(rows: usize, width: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            rows * width,
            data.len(),
            "activations: shape and data disagree"
        );
        Self { rows, width, data }
    }
}

/// The result of a clean forward pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForwardOutput {
    /// The features the goodness is computed from.
    pub features: Activations,
    /// The input of the next layer, where it differs from `features` (a conv block pools).
    pub next: Option<Activations>,
}

impl ForwardOutput {
    pub fn next_input(&self) -> &Activations {
        self.next.as_ref().unwrap_or(&self.features)
    }
}

/// `(a+, a-)` of one direction: the features under `W + eps v` and `W - eps v`.
pub type PerturbedPair = (Activations, Activations);

/// A perturbed evaluation given over the features it can change only (see
/// [`ForwardOracle::evaluate_perturbed_columns`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerturbedColumns {
    /// [`LayerShape::touched_features`] of the chunk.
    pub touched: Range<usize>,
    /// `(a+, a-)` per seed, each rows x `touched.len()`: the touched columns only.
    pub pairs: Vec<PerturbedPair>,
    /// The clean features of the current parameters (rows x feature width), which every
    /// evaluation equals outside `touched`.
    pub clean: Activations,
}

#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("the device refused the request: {0}")]
    Refused(String),
    #[error("the device link failed: {0}")]
    Link(String),
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error("cannot open the backend: {0}")]
    Backend(String),
}

/// Traffic on a device link (the serial backend): bytes each way and request/reply exchanges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub round_trips: u64,
}

/// How a device link has fared: retransmissions (after silence, damage or a NAK) and frames
/// dropped as damaged, after which the receiver resynchronised at the next delimiter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkHealth {
    pub retries: u64,
    pub resyncs: u64,
}

/// One layer's forward evaluation, wherever it executes (see the module docs).
///
/// Contract: `evaluate_perturbed` leaves no trace in the layer's state (parameters bit-identical
/// afterwards, BatchNorm running statistics untouched); `apply_update` applies exactly
/// `firmware_protocol::direction::apply_update`, so the host's shadow copy of the parameters,
/// updated with the same call, stays bit-identical to the layer's.
pub trait ForwardOracle {
    fn spec(&self) -> &LayerShape;

    /// Programs all parameters `W_l` (flat, in the layout of [`LayerShape`]).
    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError>;

    /// Reads the parameters back, where the backend can.
    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        Err(OracleError::Unsupported("parameter read-back"))
    }

    /// Caches a batch of inputs (rows x input_width) for the evaluations that follow.
    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError>;

    /// A clean forward pass on the cached input.
    fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError>;

    /// For each seed, the features under `W + eps v` and `W - eps v` where `v` is the normalised
    /// direction the seed names over `chunk` (Algorithm 1, lines 6-9); `out` is resized to
    /// `seeds.len()` pairs.
    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<PerturbedPair>,
    ) -> Result<(), OracleError>;

    /// [`ForwardOracle::evaluate_perturbed`] for a backend that knows its evaluations leave
    /// every feature outside `spec().touched_features(&chunk)` at its clean value, bit for bit
    /// (an exact simulation: no noise drawn per evaluation): fills `out` with the touched
    /// columns and the clean features, and returns `true`, sparing the full features of every
    /// evaluation and the host the products over the untouched ones. `false`, the default: the
    /// backend cannot say, `out` is untouched, and the caller uses `evaluate_perturbed`.
    fn evaluate_perturbed_columns(
        &mut self,
        _chunk: Range<usize>,
        _seeds: &[DirectionSeed],
        _eps: f32,
        _out: &mut PerturbedColumns,
    ) -> Result<bool, OracleError> {
        Ok(false)
    }

    /// `W[chunk] -= scale * sum_p dd_p v_p` (Algorithm 1, line 12).
    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError>;

    /// A hint that the next perturbed evaluation will be of `chunk` along `seeds`, for a backend
    /// that can draw directions ahead (the simulator, on a free thread). Changes no result.
    /// The default does nothing.
    fn prefetch_directions(&mut self, _chunk: Range<usize>, _seeds: &[DirectionSeed]) {}

    /// The parameters as the layer holds them now, for a backend that holds them in this
    /// process (the simulator): after an update the trainer copies the chunk into its shadow
    /// rather than computing the same update a second time. `None`, the default: the layer is
    /// elsewhere and the host updates its shadow itself (`apply_update`'s contract makes the two
    /// the same bits).
    fn parameters_in_process(&self) -> Option<&[f32]> {
        None
    }

    /// This oracle's share of its link's traffic, for backends with a link.
    fn wire_stats(&self) -> Option<WireStats> {
        None
    }

    /// This oracle's share of its link's retries and resyncs, for backends with a link.
    fn link_health(&self) -> Option<LinkHealth> {
        None
    }

    /// The device's current power-on session (its boot id), asked of the device, for backends
    /// whose device can lose what was written to it (a reset, a brown-out). `None`, the default:
    /// the layer never loses its state. A changed value means the device must be re-programmed
    /// (see `crate::recovery`).
    fn session(&mut self) -> Result<Option<u64>, OracleError> {
        Ok(None)
    }

    /// The layer's state outside its parameters that training changes, flat: a conv block's
    /// BatchNorm running statistics (means, then variances). `None`, the default: there is none.
    /// Checkpoints and reset recovery save and restore it, so a layer that keeps such state must
    /// implement this and [`ForwardOracle::write_layer_state`] for a resume to be exact.
    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        Ok(None)
    }

    /// Restores what [`ForwardOracle::read_layer_state`] returned.
    fn write_layer_state(&mut self, _state: &[f32]) -> Result<(), OracleError> {
        Err(OracleError::Unsupported("writing layer state"))
    }
}
