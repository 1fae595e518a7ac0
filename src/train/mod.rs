//! Training: MF+DD (thesis Algorithm 1) over any [`crate::oracle::ForwardOracle`].
//!
//! - [`trainer`]: the loop over batches, layers and chunks, and the host's state (shadows of
//!   `W_l`, the projections `M_l`).
//! - [`estimator`]: the directional-derivative estimate of a chunk from perturbed evaluations.
//! - [`update`]: the update rule seam ([`update::UpdateRule`], [`update::Sgd`] by default).
//! - [`projection`]: `M_l` and its host-only training.
//! - [`chunking`]: how `W_l` and `M_l` are cut into chunks.
//! - [`evaluation`]: the one evaluation loop (both prediction modes, every layer).
//! - [`exact`]: the exact-gradient baselines (`--method mf-exact`, `bp`) on the host, for the
//!   ideal simulator only.
//! - [`loss`]: the local loss, bit-identical on every machine.

pub mod chunking;
pub mod estimator;
pub mod evaluation;
pub mod exact;
pub mod loss;
pub mod projection;
pub mod trainer;
pub mod update;

pub use evaluation::{EvalSums, Evaluation, evaluate, evaluate_batch};
pub use trainer::{HostState, Hyper, LayerState, TrainBatch, Trainer, epoch_order};
pub use update::{Sgd, UpdateRule};
