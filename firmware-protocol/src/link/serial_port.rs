//! A serial port (USB CDC, UART, or a pseudo-terminal) as a [`Transport`], on either side.

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use super::{Transport, is_hangup};

/// Which end of the line a [`SerialPortTransport`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The host's: a write waits until the line has drained, and a read that finds nothing on a
    /// port that polled readable means the device hung up.
    Host,
    /// The device's (the emulator's pseudo-terminal): writes are queued without waiting for a
    /// reader, and an empty read is silence (hosts come and go).
    Device,
}

/// A serial port as a [`Transport`].
pub struct SerialPortTransport {
    port: Box<dyn serialport::SerialPort>,
    side: Side,
    /// The port's current timeout (it applies to reads and writes alike).
    timeout: Duration,
    /// The timeout writes get: a whole frame must drain at the line rate.
    write_timeout: Duration,
}

impl SerialPortTransport {
    /// Opens the port at `path` on the host's side.
    pub fn open(path: &str, baud: u32, timeout: Duration) -> std::io::Result<Self> {
        let port = serialport::new(path, baud)
            .timeout(timeout)
            .open()
            .map_err(std::io::Error::from)?;
        Ok(Self::new(port, Side::Host))
    }

    /// An already open port (the emulator's side of a pseudo-terminal, or a pair's side in
    /// tests); writes get at least the port's timeout, and at least 2 s.
    pub fn new(port: Box<dyn serialport::SerialPort>, side: Side) -> Self {
        let timeout = port.timeout();
        Self {
            port,
            side,
            timeout,
            write_timeout: timeout.max(Duration::from_secs(2)),
        }
    }

    fn set_timeout(&mut self, timeout: Duration) -> std::io::Result<()> {
        if timeout != self.timeout {
            self.port
                .set_timeout(timeout)
                .map_err(std::io::Error::from)?;
            self.timeout = timeout;
        }
        Ok(())
    }
}

impl Transport for SerialPortTransport {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        // Not the short remainder a receive left behind: a slow line needs time to drain.
        self.set_timeout(self.write_timeout)?;
        self.port.write_all(bytes)?;
        if self.side == Side::Device {
            return Ok(());
        }
        self.port.flush().map_err(|e| {
            // serialport reports a failed tcdrain as a bare "flush failed" without the errno; a
            // peer that hung up is told apart by a read that finds the line closed.
            let mut probe = [0u8; 1];
            let _ = self.port.set_timeout(Duration::from_millis(1));
            self.timeout = Duration::from_millis(1);
            match self.port.read(&mut probe) {
                Ok(0) => ErrorKind::BrokenPipe.into(),
                Err(r) if is_hangup(&r) => r,
                _ => e,
            }
        })
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        self.set_timeout(timeout)?;
        match self.port.read(buf) {
            // A tty that polled readable and reads nothing has been hung up.
            Ok(0) if self.side == Side::Host => Err(ErrorKind::BrokenPipe.into()),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::Interrupted => {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        self.port
            .clear(serialport::ClearBuffer::Input)
            .map_err(std::io::Error::from)
    }
}
