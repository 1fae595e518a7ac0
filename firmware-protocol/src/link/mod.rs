//! The host side of a link to a device, shared by the pnn host and the emulator (`std` only),
//! as postcard-rpc's `host_client` is shared by its hosts:
//!
//! - [`Transport`] (`transport.rs`): bytes to and from a device, a trait of three methods;
//! - [`Link`] (`retry.rs`): frames requests, pairs replies with them by sequence number and
//!   retransmits, under a [`RetryPolicy`]; fails with a [`LinkError`];
//! - [`LinkCounters`] (`counters.rs`): the one record of a link's traffic and health;
//! - [`Client`] (`client.rs`): one typed call per request (`hello`, `describe_layer`,
//!   `set_parameters`, ... `forward`), each returning the reply's value or a [`ClientError`];
//! - [`pipe`] (`pipe.rs`): an in-memory pair of transports, for in-process tests and emulators;
//! - [`Loopback`] (`loopback.rs`): a device server in the same process as a transport;
//! - [`SerialPortTransport`] (`serial_port.rs`, feature `serialport`): a serial port (USB CDC,
//!   UART or a pseudo-terminal), on the host's side or the device's;
//! - [`TcpTransport`], [`TcpListenerLine`] (`tcp.rs`): a TCP stream carrying the same frames
//!   (a board exported by ser2net's raw mode, or `pnn-emulate --listen`), host and device side.
//!
//! A device speaks to any of these through `crate::server::Server`, whose retransmission cache
//! makes every request safe to repeat.

mod client;
mod counters;
mod loopback;
mod pipe;
mod retry;
#[cfg(feature = "serialport")]
mod serial_port;
mod tcp;
mod transport;

pub use client::{Client, ClientError};
pub use counters::LinkCounters;
pub use loopback::Loopback;
pub use pipe::{PipeEnd, pipe};
pub use retry::{Link, LinkError, RetryPolicy, request_name};
#[cfg(feature = "serialport")]
pub use serial_port::{SerialPortTransport, Side};
pub use tcp::{TcpListenerLine, TcpTransport};
pub use transport::{Transport, is_hangup};

/// A number that differs from one process start to the next (time and process id, mixed): a
/// host's first sequence number, so that a late reply left in the port by an earlier run is
/// never taken for one of this run's, and an emulator's boot id.
pub fn fresh_nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    crate::direction::mix(t.as_nanos() as u64 ^ std::process::id() as u64)
}
