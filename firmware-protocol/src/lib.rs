//! The contract between the pnn host and a physical layer's firmware.
//!
//! `#![no_std]` and allocation-free (a `Vec`-backed [`server::Buffer`] comes with the `alloc`
//! feature), so device firmware links the very code the host runs:
//!
//! - [`direction`]: the one specification of a perturbation direction and of the seeded update;
//! - [`message`]: the requests and replies (there is no gradient request);
//! - [`frame`]: postcard body, sequence number, CRC-32, COBS, `0x00` delimiter;
//! - [`shape`]: what a layer is (shapes, conv geometry, chunking, forward mode), for every crate;
//! - [`server`]: the device-side dispatcher over the [`server::PhysicalLayer`] trait;
//! - [`simd`] (host builds): the one detection of the CPU's vector instructions;
//! - `link` (feature `std`): the host side of a link, shared by the pnn host and its emulator.
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod direction;
pub mod frame;
#[cfg(feature = "std")]
pub mod link;
pub mod message;
pub mod server;
pub mod shape;
#[cfg(feature = "std")]
pub mod simd;
#[cfg(feature = "std")]
#[doc(hidden)]
pub mod skipped;

pub use direction::{DirectionKey, DirectionSeed, ParamGroup, UpdateTerm};
