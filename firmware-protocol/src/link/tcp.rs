//! A TCP stream as a [`Transport`]: the same framed bytes a serial port carries, as ser2net's raw
//! mode exports a board's port over the network (`tcp:HOST:PORT` on the host), and the
//! emulator's `--listen ADDR` serves.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::Transport;

/// The shortest read timeout a socket takes (zero means "block forever" to the OS).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// The host's end of a TCP connection to a device.
pub struct TcpTransport {
    stream: TcpStream,
    /// The read timeout last set on the socket.
    timeout: Option<Duration>,
}

impl TcpTransport {
    /// Connects to `addr` (`HOST:PORT`), trying each address it resolves to for up to `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<Self> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => return Self::new(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                ErrorKind::NotFound,
                format!("{addr} resolves to no address"),
            )
        }))
    }

    /// An open stream. Small frames go out at once (no Nagle delay: every request waits for
    /// its reply).
    pub fn new(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            timeout: None,
        })
    }

    pub fn peer(&self) -> std::io::Result<SocketAddr> {
        self.stream.peer_addr()
    }
}

/// Reads what arrives within `timeout`; `Ok(0)` on silence, `BrokenPipe` when the peer closed.
fn read_within(
    stream: &mut TcpStream,
    current: &mut Option<Duration>,
    buf: &mut [u8],
    timeout: Duration,
) -> std::io::Result<usize> {
    let wait = Some(timeout.max(MIN_WAIT));
    if *current != wait {
        stream.set_read_timeout(wait)?;
        *current = wait;
    }
    match stream.read(buf) {
        Ok(0) if !buf.is_empty() => Err(ErrorKind::BrokenPipe.into()),
        Ok(n) => Ok(n),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(0),
        Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

impl Transport for TcpTransport {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        read_within(&mut self.stream, &mut self.timeout, buf, timeout)
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        let mut sink = [0u8; 4096];
        while read_within(&mut self.stream, &mut self.timeout, &mut sink, MIN_WAIT)? > 0 {}
        Ok(())
    }
}

/// The device's end: a listening socket that serves one host connection at a time, as a
/// pseudo-terminal serves one host after another. A host that leaves is silence until the next
/// connects; replies with no host connected are dropped (the device keeps its state, as a board
/// behind ser2net does between connections).
pub struct TcpListenerLine {
    listener: TcpListener,
    host: Option<TcpStream>,
    timeout: Option<Duration>,
}

impl TcpListenerLine {
    /// Listens on `addr` (`HOST:PORT`; port 0 picks a free one, see [`Self::local_addr`]).
    pub fn bind(addr: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            host: None,
            timeout: None,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Takes a waiting connection, if any, in place of the current one (a host that reconnects
    /// after a timeout supersedes its old connection).
    fn accept(&mut self) -> std::io::Result<bool> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                self.host = Some(stream);
                self.timeout = None;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Transport for TcpListenerLine {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.host {
            Some(stream) => stream.write_all(bytes).or_else(|e| {
                if super::is_hangup(&e) {
                    self.host = None;
                    Ok(())
                } else {
                    Err(e)
                }
            }),
            None => Ok(()),
        }
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        if self.accept()? || self.host.is_some() {
            let stream = self.host.as_mut().expect("a host is connected");
            return match read_within(stream, &mut self.timeout, buf, timeout) {
                Err(e) if super::is_hangup(&e) => {
                    self.host = None;
                    Ok(0)
                }
                other => other,
            };
        }
        // No host: wait for one, a short while at a time.
        std::thread::sleep(timeout.min(Duration::from_millis(10)));
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cross_and_hosts_come_and_go() {
        let mut device = TcpListenerLine::bind("127.0.0.1:0").unwrap();
        let addr = device.local_addr().unwrap().to_string();
        let mut buf = [0u8; 16];
        // No host yet: silence, and replies go nowhere.
        assert_eq!(device.receive(&mut buf, MIN_WAIT).unwrap(), 0);
        device.send(b"lost").unwrap();
        for round in 0..2u8 {
            let mut host = TcpTransport::connect(&addr, Duration::from_secs(1)).unwrap();
            host.send(&[round, 1, 2]).unwrap();
            let mut got = Vec::new();
            while got.len() < 3 {
                let n = device.receive(&mut buf, Duration::from_millis(50)).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, [round, 1, 2]);
            device.send(b"ok").unwrap();
            let mut reply = Vec::new();
            while reply.len() < 2 {
                let n = host.receive(&mut buf, Duration::from_millis(50)).unwrap();
                reply.extend_from_slice(&buf[..n]);
            }
            assert_eq!(reply, b"ok");
            assert_eq!(host.receive(&mut buf, MIN_WAIT).unwrap(), 0, "silence");
            drop(host);
            // The device sees the host leave as silence, then serves the next one.
            for _ in 0..3 {
                assert_eq!(device.receive(&mut buf, MIN_WAIT).unwrap(), 0);
            }
        }
        // A device that goes away is a hang-up on the host's side.
        let mut host = TcpTransport::connect(&addr, Duration::from_secs(1)).unwrap();
        assert_eq!(device.receive(&mut buf, MIN_WAIT).unwrap(), 0);
        drop(device);
        let e = host.receive(&mut buf, Duration::from_secs(1)).unwrap_err();
        assert!(super::super::is_hangup(&e), "{e}");
    }
}
