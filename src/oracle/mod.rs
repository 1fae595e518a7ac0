//! The boundary between the host and whatever executes a layer: [`ForwardOracle`].
//!
//! One oracle is one layer of the model, on any backend (the in-process simulator, a device over a
//! serial port). The trainer drives every backend through this trait and never touches weights
//! directly: it hands over seeds and scalars, and gets activations back. No gradient is ever
//! asked of an oracle.
//!
//! The contract is the trait's required methods: what every device must do. What only some
//! backends can do is reached through capability accessors that return `None` by default
//! ([`ForwardOracle::in_process`], [`ForwardOracle::link`]), never by a downcast to a concrete
//! backend. [`conformance`] checks an oracle against the contract, and two oracles against each
//! other.

use std::ops::Range;

mod capabilities;
pub mod conformance;

pub use capabilities::{DeviceLink, InProcess, LinkCounters};
pub use firmware_protocol::message::PixelNormaliser;
pub use firmware_protocol::shape::{ChunkUnits, ConvGeometry, ForwardMode, LayerShape};
pub use firmware_protocol::{DirectionSeed, UpdateTerm};
use std::sync::Arc;

/// A batch of row vectors, row-major.
#[derive(Clone, Debug, Default)]
pub struct Activations {
    pub rows: usize,
    pub width: usize,
    pub data: Vec<f32>,
    /// The same values as a dataset's 8-bit pixels and the normaliser that gives `data` from
    /// them, bit for bit, where they came from a dataset (`Normalizer::batch_activations`): a
    /// device can take these, a quarter of the bytes, and normalise itself
    /// ([`firmware_protocol::message::Request::LoadPixels`]).
    pub pixels: Option<Arc<Pixels>>,
}

/// A batch of 8-bit pixels and how they normalise (see [`Activations::pixels`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Pixels {
    pub data: Vec<u8>,
    pub normaliser: PixelNormaliser,
}

/// Equal values are equal activations, whether or not they also carry their pixels.
impl PartialEq for Activations {
    fn eq(&self, other: &Self) -> bool {
        (self.rows, self.width) == (other.rows, other.width) && self.data == other.data
    }
}

impl Activations {
    pub fn new(rows: usize, width: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            rows * width,
            data.len(),
            "activations: shape and data disagree"
        );
        Self {
            rows,
            width,
            data,
            pixels: None,
        }
    }

    /// Refuses input of another width than `shape` takes (every in-process backend checks this
    /// before handing the values to its layer).
    pub fn check_width(&self, shape: &LayerShape) -> Result<(), OracleError> {
        if self.width != shape.input_width() {
            return Err(OracleError::Shape(format!(
                "input is {} wide, the layer takes {}",
                self.width,
                shape.input_width()
            )));
        }
        Ok(())
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
    /// The input of the next layer: `next` where the layer gives one, else the features.
    pub fn into_next_input(self) -> Activations {
        self.next.unwrap_or(self.features)
    }
}

/// `(a+, a-)` of one direction: the features under `W + eps v` and `W - eps v`.
pub type PerturbedPair = (Activations, Activations);

/// A perturbed evaluation given over the features it can change only (see
/// [`InProcess::evaluate_perturbed_columns`]).
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
    /// A `sim:<profile.ron>` backend's profile that does not read or is invalid: a configuration
    /// error (the file is the user's), not a device failure.
    #[error("{0}")]
    Profile(String),
}

impl OracleError {
    /// The exit status the command-line tools give it: 2 for a bad profile file (a
    /// configuration error, as everywhere), else 4 (backend or device error).
    pub fn exit_code(&self) -> u8 {
        match self {
            OracleError::Profile(_) => 2,
            _ => 4,
        }
    }

    /// Whether the failure may pass (the link broke, the device did not answer or refused for
    /// now), so that a run cut short by it is worth saving for a later `--resume`; a shape
    /// mismatch, a missing ability or a backend that cannot open stays as it is.
    pub fn is_transient(&self) -> bool {
        matches!(self, OracleError::Link(_) | OracleError::Refused(_))
    }
}

/// One layer's forward evaluation, wherever it executes (see the module docs).
///
/// # The contract (required methods)
///
/// Every method below without a default is something every device must answer, because training,
/// checkpoints or reset recovery need it from every device:
///
/// - [`spec`](Self::spec): the layer's shape, so the host can check it against the model.
/// - [`write_parameters`](Self::write_parameters): programming `W_l` (initialisation, resume,
///   and re-programming a device that reset).
/// - [`read_parameters`](Self::read_parameters): reading `W_l` back. Required to be *answered*,
///   not to succeed: a device without read-back returns [`OracleError::Unsupported`] (the
///   protocol's `parameter_read_back` capability), and the conformance suite then skips the
///   checks that need it, saying so.
/// - [`load_input`](Self::load_input), [`forward`](Self::forward): a clean pass.
/// - [`evaluate_perturbed`](Self::evaluate_perturbed): `(a+, a-)` per seed, leaving no trace:
///   parameters bit-identical afterwards, layer state (BatchNorm running statistics) untouched.
/// - [`apply_update`](Self::apply_update): exactly `firmware_protocol::direction::apply_update`,
///   so the host's shadow copy, updated with the same call, stays bit-identical to the layer's.
/// - [`read_layer_state`](Self::read_layer_state), [`write_layer_state`](Self::write_layer_state):
///   the state outside the parameters that training changes. Required so that no layer with such
///   state can forget them and silently break an exact resume; a layer without any returns
///   `Ok(None)` and accepts an empty state.
///
/// Shapes the layer cannot take (a wrong input width, a chunk outside the parameters, a wrong
/// parameter count) are refused with [`OracleError::Shape`] or [`OracleError::Refused`], never a
/// panic. [`conformance::check_contract`] checks all of this on any implementation.
///
/// # Capabilities (optional abilities)
///
/// - [`in_process`](Self::in_process): the layer lives in this process's memory (the simulator):
///   shortcuts the trainer may take, and the switch to the literal reference choreography.
/// - [`link`](Self::link) / [`link_mut`](Self::link_mut): the layer is behind a link to a device
///   that can reset: traffic and health counters, and the device's power-on session.
///
/// Both return `None` by default; a backend that has the ability returns `Some(self)` (or a part
/// of itself) and implements the capability's trait.
pub trait ForwardOracle {
    fn spec(&self) -> &LayerShape;

    /// Programs all parameters `W_l` (flat, in the layout of [`LayerShape`]).
    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError>;

    /// Reads the parameters back, or [`OracleError::Unsupported`] where the device cannot.
    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError>;

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

    /// `W[chunk] -= scale * sum_p dd_p v_p` (Algorithm 1, line 12).
    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError>;

    /// The layer's state outside its parameters that training changes, flat: a conv block's
    /// BatchNorm running statistics (means, then variances); `None` where there is none.
    /// Checkpoints and reset recovery save and restore it.
    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError>;

    /// Restores what [`ForwardOracle::read_layer_state`] returned (an empty state where that
    /// was `None`).
    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError>;

    /// The in-process capability (see [`InProcess`]); `None`, the default: the layer is elsewhere.
    fn in_process(&mut self) -> Option<&mut dyn InProcess> {
        None
    }

    /// The link capability (see [`DeviceLink`]); `None`, the default: there is no link, and the
    /// layer never loses its state.
    fn link(&self) -> Option<&dyn DeviceLink> {
        None
    }

    /// [`ForwardOracle::link`], to ask the device something (its session).
    fn link_mut(&mut self) -> Option<&mut dyn DeviceLink> {
        None
    }
}
