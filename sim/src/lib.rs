//! The simulated physical neural network: layers that execute in process what a physical device
//! executes in hardware, with the same seeded perturbation and update arithmetic as firmware
//! (`firmware_protocol::direction`).

mod choreography;
pub mod conv;
pub mod dense;
pub mod device;
pub mod direction_cache;
pub mod emulator;
mod error;
pub mod layer;
pub mod matmul;
pub mod noise;
pub mod packed;
pub mod profile;
mod simd;
pub mod sparse;
pub mod threads;

pub use choreography::Choreography;
pub use conv::ConvBlock;
pub use dense::DenseLayer;
pub use error::SimError;
pub use layer::SimulatedLayer;
pub use noise::NoiseModel;
