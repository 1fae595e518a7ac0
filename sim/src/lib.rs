//! The simulated physical neural network: layers that execute in process what a physical device
//! executes in hardware, with the same seeded perturbation and update arithmetic as firmware
//! (`firmware_protocol::direction`).
//!
//! Where things are:
//! - [`layer`]: [`SimulatedLayer`], what every simulated layer does; the host's in-process
//!   oracle (`pnn::backend::sim`) and the device adapter ([`device`]) are both written against
//!   it alone.
//! - [`dense`], [`conv`]: the two layers, each a folder: `mod.rs` the layer and its public API,
//!   `reference.rs` the literal choreography of Algorithm 1, `fast.rs` the exact fast path;
//!   `conv/` adds `unfold.rs` (im2col and the taps path), `stages.rs` (convolution, BatchNorm,
//!   projection, pooling) and `kernels.rs` (the fast path's elementwise kernels).
//! - [`device`]: [`device::Device`], any simulated layer behind `firmware_protocol::server`'s
//!   `PhysicalLayer` (what the emulator serves).
//! - [`noise`]: the hardware effects and how the fast path treats each ([`NoiseModel::effects`]);
//!   [`profile`]: device profiles (`devices/*.ron`).
//! - Products: [`matmul`] (gemm), [`packed`] (a dense input packed once per batch), [`sparse`]
//!   (a mostly-constant input as sparse rows); `simd` chooses their AVX builds; [`threads`];
//!   [`direction_cache`] (a chunk's directions, drawn once).
//! - [`Choreography`] (fast or reference) and [`SimError`] (what a layer refuses) are shared by
//!   both layers.

mod choreography;
pub mod conv;
pub mod dense;
pub mod device;
pub mod direction_cache;
mod error;
pub mod layer;
pub mod matmul;
pub mod noise;
pub mod packed;
pub mod profile;
pub mod ron_error;
mod simd;
pub mod sparse;
pub mod threads;

pub use choreography::Choreography;
pub use conv::ConvBlock;
pub use dense::DenseLayer;
pub use error::SimError;
pub use layer::SimulatedLayer;
pub use noise::NoiseModel;
