//! Optional abilities of an oracle, reached through [`super::ForwardOracle::in_process`] and
//! [`super::ForwardOracle::link`] (as probe-rs reaches a probe's optional interfaces): a backend
//! that has an ability implements its trait and returns itself; the caller asks, and takes the
//! general path when the answer is `None`. No caller downcasts to a concrete backend.

use std::ops::Range;

pub use firmware_protocol::link::LinkCounters;

use super::{DirectionSeed, OracleError, PerturbedColumns};

/// A layer held in this process's memory (the simulator): shortcuts that change no result, and
/// the switch between the fast evaluation and the literal choreography of Algorithm 1.
pub trait InProcess {
    /// The parameters as the layer holds them now: after an update the trainer copies the
    /// chunk into its shadow rather than computing the same update a second time
    /// (`apply_update`'s contract makes the two the same bits).
    fn parameters(&self) -> &[f32];

    /// [`super::ForwardOracle::evaluate_perturbed`] for a layer that knows its evaluations leave
    /// every feature outside `spec().touched_features(&chunk)` at its clean value, bit for bit
    /// (an exact simulation: no noise drawn per evaluation): fills `out` with the touched columns
    /// and the clean features and returns `true`, sparing the full features of every evaluation
    /// and the host the products over the untouched ones. `false`: the layer cannot promise it
    /// for this chunk, `out` holds nothing of use, and the caller uses `evaluate_perturbed`.
    fn evaluate_perturbed_columns(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut PerturbedColumns,
    ) -> Result<bool, OracleError>;

    /// A hint that the next perturbed evaluation will be of `chunk` along `seeds`, for a layer
    /// that can draw directions ahead (on a free thread). Changes no result.
    fn prefetch_directions(&mut self, chunk: Range<usize>, seeds: &[DirectionSeed]);

    /// `true`: perturbed evaluations follow the literal choreography of Algorithm 1 (perturb,
    /// full forward, perturb, full forward, restore), the reference every fast path is held to;
    /// `false` (the default of a new layer): the fastest exact path.
    fn set_exact_reference(&mut self, exact: bool);
}

/// A layer behind a link to a device (the serial backend): what went over the link, and the
/// device's power-on session.
pub trait DeviceLink {
    /// This layer's share of its link's counters (traffic, retries, resyncs...): the shares of
    /// all layers on one link add up to the link's.
    fn counters(&self) -> LinkCounters;

    /// The device's current power-on session (its boot id), asked of the device. A changed value
    /// means the device lost what was written to it (a reset, a brown-out) and must be
    /// re-programmed (see `crate::run::recovery`).
    fn session(&mut self) -> Result<u64, OracleError>;
}
