//! The contract between the pnn host and a physical layer's firmware.
//!
//! `#![no_std]` and allocation-free, so device firmware links the very code the host runs.
//! [`direction`] is the one specification of a perturbation direction and of the seeded update.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod direction;

pub use direction::{DirectionKey, DirectionSeed, ParamGroup, UpdateTerm};
