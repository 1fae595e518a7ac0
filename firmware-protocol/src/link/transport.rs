//! Bytes to and from a device.

use std::io::ErrorKind;
use std::time::Duration;

/// Bytes to and from a device (or, on the device's side, a host): a serial port, a pipe, a
/// fault injector around either.
pub trait Transport: Send {
    /// Writes all of `bytes`.
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Reads what arrives within `timeout` into `buf`; `Ok(0)` when nothing did. The other side
    /// hanging up is an error for which [`is_hangup`] holds.
    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize>;
    /// Drops bytes received but not yet read (stale replies of an earlier session).
    fn discard_input(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        (**self).send(bytes)
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        (**self).receive(buf, timeout)
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        (**self).discard_input()
    }
}

/// Whether `e` says that the other side is gone (pty closed, cable pulled, pipe dropped).
pub fn is_hangup(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected
    ) || e.raw_os_error() == Some(5) // EIO: the other side of a pty is gone
        || e.to_string().contains("I/O error")
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        (**self).send(bytes)
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        (**self).receive(buf, timeout)
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        (**self).discard_input()
    }
}
