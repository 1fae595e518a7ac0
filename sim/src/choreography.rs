//! How a simulated layer computes a perturbed evaluation: the exact fast path or the literal
//! choreography of Algorithm 1 it is held to.

/// How a perturbed evaluation is computed. Both give the same numbers up to float rounding; the
/// reference is the literal choreography of Algorithm 1 and what the fast path is held to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Choreography {
    /// Exact by linearity: `z(W ± eps v) = z0 ± eps x vᵀ`. The clean pre-activation `z0` is
    /// computed once per batch and kept current as chunks update: on an ideal device an update
    /// moves it by the combination of the products the evaluation computed, else the outputs
    /// the chunk touches are recomputed. The P directions are multiplied in one fused product
    /// over the rows of W the chunk covers, through the input's sparse rows where it has them,
    /// else through a copy of the input packed once for all of the batch's products.
    /// Conv blocks (`crate::conv`) follow the same scheme per channel.
    #[default]
    Fast,
    /// Perturb the weights, run the whole forward pass, twice per direction, restore.
    ///
    /// A device with input or read noise always evaluates this way: those draw a fresh full
    /// product per evaluation, so linearity has nothing to share. Every other effect (converters,
    /// output noise, nonlinearity, and every weight effect, whose exact per-weight change under
    /// `±eps v` is what the fast path multiplies) takes the fast path exactly, drawing the same
    /// noise in the same order as this choreography does.
    Reference,
}
