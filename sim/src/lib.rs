//! The simulated physical neural network: layers that execute in process what a physical device
//! executes in hardware, with the same seeded perturbation and update arithmetic as firmware
//! (`firmware_protocol::direction`).

pub mod conv;
mod conv_kernels;
pub mod dense;
pub mod direction_cache;
pub mod matmul;
pub mod noise;
pub mod packed;
pub mod physical;
pub mod profile;
pub mod ron_error;
pub mod sparse;
pub mod threads;

pub use conv::ConvBlock;
pub use dense::DenseLayer;
pub use noise::NoiseModel;
