//! `pnn`: train neural networks with physical hardware in the loop.
//!
//! The algorithm is MF+DD (Mono-Forward with directional derivatives, `shared/reference`): every
//! layer learns alone from its local loss, and gradients are estimated from forward evaluations
//! only, so a layer may be a physical device that can run a forward pass and nothing else.
//! [`oracle::ForwardOracle`] is that boundary; [`train::Trainer`] drives it.

pub mod backend;
pub mod data;
pub mod model;
pub mod oracle;
pub mod report;
pub mod run;
pub mod sweep;
pub mod train;

// Old paths of the training modules, kept while colleagues' code still names them; to be
// removed once every caller says `crate::train::...`.
