//! A pseudo-terminal pair: the device's side, which the emulator serves, and the path a host
//! opens.

use std::fs::File;
use std::time::Duration;

use firmware_protocol::link::{SerialPortTransport, Side};
use serialport::{SerialPort, TTYPort};

/// A pseudo-terminal pair: the device's side, and the path a host opens.
pub struct Pty {
    /// The device's side, served by [`crate::serve()`].
    pub device: SerialPortTransport,
    pub path: String,
    /// Keeps the host side open without a lock, so a host that leaves does not hang up the
    /// device side and the next host can connect (and take its own exclusive lock).
    _host_side: File,
}

/// A new pseudo-terminal pair, its device side waiting for requests.
pub fn open_pty() -> std::io::Result<Pty> {
    let (mut device, host_side) = TTYPort::pair().map_err(std::io::Error::from)?;
    let path = host_side
        .name()
        .ok_or_else(|| std::io::Error::other("the pseudo-terminal has no name"))?;
    let keep = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    drop(host_side);
    device
        .set_timeout(Duration::from_secs(1))
        .map_err(std::io::Error::from)?;
    Ok(Pty {
        device: SerialPortTransport::new(Box::new(device), Side::Device),
        path,
        _host_side: keep,
    })
}
