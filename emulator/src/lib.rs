//! The device emulator behind `pnn-emulate`: simulated layers served through
//! `firmware_protocol::server::Server`, the dispatcher a firmware runs, on a real
//! pseudo-terminal or any other `firmware_protocol::link::Transport` (an in-memory pipe in tests).
//!
//! - `config`: what the device is ([`EmulatorConfig`], `--layers` and `--encoding` parsing);
//! - `device`: its simulated layers and the protocol server over them ([`server()`]);
//! - `serve`: the one serve loop ([`serve()`]), power-cycling the device when its line says so;
//! - `pty`: the pseudo-terminal a host opens ([`open_pty`]);
//! - `faults`: fault injection on a line ([`FaultyTransport`], [`FaultConfig`]);
//! - `timing`: real link speeds and device compute time ([`Timing`], [`PacedLine`], [`PacedLayer`]).
//!
//! A physical device's layers are fixed by its hardware; the emulator's are given by a layer
//! list, in order: `784x50` is a dense layer (inputs x outputs), `conv1x28x28:32` a CNN block
//! on 1 channel of 28 x 28 with 32 output channels (`pnn-train --arch cnn --channels 32,32` on
//! MNIST is `conv1x28x28:32,conv32x14x14:32`). Its name and its hardware effects come from the
//! device profile: dense layer `l` gets the profile's noise model keyed by
//! `noise::layer_seed(profile seed, l)`, exactly as `--backend sim:<profile>` builds layer `l`
//! of a model. CNN blocks are simulated ideal only, so a profile with effects is refused for
//! them (as the in-process simulator refuses it).
//!
//! A CNN block's fixed projection `A` is drawn on the device: block `l` of the list draws it
//! from `conv::block_projection_seed(seed, l)` with `seed` the emulator's `--seed`, the rule by
//! which `pnn-train --seed` names the model's projections. The seed travels in the layer's
//! descriptor and the host refuses a device whose seed is not its model's, so an emulator
//! serves the runs of one `--seed` (and one `--proj-dim`).

pub mod config;
pub mod device;
pub mod faults;
pub mod pty;
pub mod serve;
pub mod timing;

pub use config::{EmulatorConfig, fresh_boot_id, layer_name, parse_encoding, parse_layers};
pub use device::{EmulatedServer, layers, paced_server, server};
pub use faults::{FaultConfig, FaultCounters, FaultyTransport};
pub use pty::{Pty, open_pty};
pub use serve::{DeviceLine, MIN_FRAME, serve, serve_paced};
pub use timing::{PacedLayer, PacedLine, Timing};
