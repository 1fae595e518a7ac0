//! One serial link to a device: the transport (a small send/receive trait, so tests and later
//! fault injection can stand in for the port), and [`Link`], which frames requests, pairs replies
//! with them by sequence number and retransmits.
//!
//! Behaviour on bad input from the device side:
//! - garbage bytes, or a frame that fails COBS or its CRC (corrupted, truncated): dropped; the
//!   request is retransmitted at once under the same sequence number;
//! - a NAK (the device got the request with a bad CRC): retransmitted at once;
//! - a reply with another sequence number (a late reply to an earlier request): discarded, and
//!   the wait goes on;
//! - silence (no reply within the timeout): the request is retransmitted;
//! - after `retries` retransmissions without a good reply: [`LinkError::NoReply`];
//! - the device hangs up (pty closed, cable pulled): [`LinkError::Closed`] at once, no retry.
//!
//! Retransmission is safe because the device answers a repeated state-changing request from
//! its cached reply, and every other request is free of side effects (`firmware_protocol::server`).

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use firmware_protocol::frame::{self, FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
use firmware_protocol::message::{DeviceError, Request, Response};

use crate::oracle::WireStats;

/// Bytes to and from a device.
pub trait Transport: Send {
    /// Writes all of `bytes`.
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Reads what arrives within `timeout` into `buf`; `Ok(0)` when nothing did.
    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize>;
    /// Drops bytes received but not yet read (stale replies of an earlier session).
    fn discard_input(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A serial port (USB CDC, UART, or a pseudo-terminal) as a [`Transport`].
pub struct SerialTransport {
    port: Box<dyn serialport::SerialPort>,
    /// The port's current timeout (it applies to reads and writes alike).
    timeout: Duration,
    /// The timeout writes get: a whole frame must drain at the line rate.
    write_timeout: Duration,
}

impl SerialTransport {
    pub fn open(path: &str, baud: u32, timeout: Duration) -> std::io::Result<Self> {
        let port = serialport::new(path, baud)
            .timeout(timeout)
            .open()
            .map_err(std::io::Error::from)?;
        Ok(Self::from_port(port))
    }

    /// An already open port (a pseudo-terminal pair's side in tests); writes get at least the
    /// port's timeout, and at least 2 s.
    pub fn from_port(port: Box<dyn serialport::SerialPort>) -> Self {
        let timeout = port.timeout();
        Self {
            port,
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

impl Transport for SerialTransport {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        // Not the short remainder a receive left behind: a slow line needs time to drain.
        self.set_timeout(self.write_timeout)?;
        self.port.write_all(bytes)?;
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
            Ok(0) => Err(ErrorKind::BrokenPipe.into()),
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

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the device closed the link ({0})")]
    Closed(String),
    #[error(
        "the device did not answer {request} (sequence {seq}) after {tries} tries of {timeout_ms} ms each ({corrupt} corrupt frames, {stale} replies to other requests)"
    )]
    NoReply {
        request: &'static str,
        seq: u16,
        tries: u32,
        timeout_ms: u128,
        corrupt: u64,
        stale: u64,
    },
    #[error("writing to the device failed: {0}")]
    Write(std::io::Error),
    #[error("reading from the device failed: {0}")]
    Read(std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

fn is_hangup(e: &std::io::Error) -> bool {
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

/// Counters beyond [`WireStats`], for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub wire: WireStats,
    pub retransmissions: u64,
    pub corrupt_frames: u64,
    pub stale_replies: u64,
    /// Negative acknowledgements: the device received a request corrupted and said so.
    pub naks: u64,
}

/// Whether a reply body is the device's NAK (`Error(Corrupt)`, see `firmware_protocol::server`).
fn is_nak(body: &[u8]) -> bool {
    body.len() < 8
        && matches!(
            postcard::from_bytes::<Response>(body),
            Ok(Response::Error(DeviceError::Corrupt))
        )
}

/// How long to wait and how often to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Silence after which a request is retransmitted.
    pub timeout: Duration,
    /// Retransmissions before giving up.
    pub retries: u32,
    /// Line rate, to allow a long reply its transfer time on top of `timeout`.
    pub baud: u32,
}

/// A framed, sequenced, retrying request/reply channel (see the module docs).
pub struct Link {
    transport: Box<dyn Transport>,
    policy: RetryPolicy,
    decoder: FrameDecoder<Vec<u8>>,
    read_buf: Vec<u8>,
    /// `read_buf[pending.0..pending.1]` was read but not yet decoded.
    pending: (usize, usize),
    payload: Vec<u8>,
    wire: Vec<u8>,
    reply: Vec<u8>,
    seq: u16,
    counters: LinkCounters,
}

impl Link {
    pub fn new(mut transport: Box<dyn Transport>, policy: RetryPolicy, first_seq: u16) -> Self {
        // Stale bytes of an earlier session would only be discarded later; drop them now.
        let _ = transport.discard_input();
        Self {
            transport,
            policy,
            decoder: FrameDecoder::new(vec![0u8; MAX_ENCODED]),
            read_buf: vec![0u8; 64 * 1024],
            pending: (0, 0),
            payload: vec![0u8; MAX_PAYLOAD],
            wire: vec![0u8; MAX_ENCODED + 1],
            reply: Vec::new(),
            seq: first_seq,
            counters: LinkCounters::default(),
        }
    }

    pub fn counters(&self) -> LinkCounters {
        self.counters
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Sends `request` and returns the body of its reply, retransmitting as the module docs say.
    pub fn call(&mut self, request: &Request<'_>) -> Result<&[u8], LinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let n = frame::encode(seq, request, &mut self.payload, &mut self.wire)
            .map_err(|e| LinkError::Protocol(format!("cannot frame {}: {e}", name(request))))?;
        let (corrupt0, stale0) = (self.counters.corrupt_frames, self.counters.stale_replies);
        let tries = self.policy.retries + 1;
        for attempt in 0..tries {
            if attempt > 0 {
                self.counters.retransmissions += 1;
                tracing::debug!(seq, attempt, request = name(request), "retransmitting");
            }
            self.transport.send(&self.wire[..n]).map_err(|e| {
                if is_hangup(&e) {
                    LinkError::Closed(e.to_string())
                } else {
                    LinkError::Write(e)
                }
            })?;
            self.counters.wire.bytes_up += n as u64;
            if self.await_reply(seq)? {
                self.counters.wire.round_trips += 1;
                return Ok(&self.reply);
            }
        }
        Err(LinkError::NoReply {
            request: name(request),
            seq,
            tries,
            timeout_ms: self.policy.timeout.as_millis(),
            corrupt: self.counters.corrupt_frames - corrupt0,
            stale: self.counters.stale_replies - stale0,
        })
    }

    /// Waits for the reply to `seq`: `Ok(true)` when it is in `self.reply`, `Ok(false)` when the
    /// request should be retransmitted (silence, or a corrupt frame).
    fn await_reply(&mut self, seq: u16) -> Result<bool, LinkError> {
        let start = Instant::now();
        // Silence is measured from the last byte received; a long reply also gets its transfer
        // time at the nominal line rate, and no attempt lasts longer than that in total.
        let transfer =
            Duration::from_secs_f64((MAX_ENCODED as f64 * 10.0) / self.policy.baud.max(1) as f64);
        let hard_deadline = start + self.policy.timeout + transfer;
        let mut last_byte = start;
        loop {
            if self.pending.0 == self.pending.1 {
                let now = Instant::now();
                let silence_deadline = last_byte + self.policy.timeout;
                let deadline = silence_deadline.min(hard_deadline);
                if now >= deadline {
                    return Ok(false);
                }
                let got = self
                    .transport
                    .receive(&mut self.read_buf, deadline - now)
                    .map_err(|e| {
                        if is_hangup(&e) {
                            LinkError::Closed(e.to_string())
                        } else {
                            LinkError::Read(e)
                        }
                    })?;
                if got == 0 {
                    continue;
                }
                self.counters.wire.bytes_down += got as u64;
                self.pending = (0, got);
                last_byte = Instant::now();
            }
            let (at, end) = self.pending;
            let (used, frame) = self.decoder.feed(&self.read_buf[at..end]);
            self.pending.0 += used;
            match frame {
                None => {}
                Some(Err(e)) => {
                    self.counters.corrupt_frames += 1;
                    tracing::debug!(seq, error = %e, "dropped a bad frame");
                    return Ok(false);
                }
                Some(Ok(f)) if f.seq == seq && is_nak(f.body) => {
                    self.counters.naks += 1;
                    tracing::debug!(seq, "the device received the request corrupted");
                    return Ok(false);
                }
                Some(Ok(f)) if f.seq != seq => {
                    self.counters.stale_replies += 1;
                    tracing::debug!(expected = seq, got = f.seq, "discarded a stale reply");
                }
                Some(Ok(f)) => {
                    self.reply.clear();
                    self.reply.extend_from_slice(f.body);
                    return Ok(true);
                }
            }
        }
    }
}

/// A request's name, for errors.
pub fn name(request: &Request<'_>) -> &'static str {
    match request {
        Request::Hello { .. } => "Hello",
        Request::DescribeLayer { .. } => "DescribeLayer",
        Request::LoadInput { .. } => "LoadInput",
        Request::SetParameters { .. } => "SetParameters",
        Request::ReadParameters { .. } => "ReadParameters",
        Request::EvaluatePerturbed { .. } => "EvaluatePerturbed",
        Request::ApplyUpdate { .. } => "ApplyUpdate",
        Request::Forward { .. } => "Forward",
        Request::ReadResult { .. } => "ReadResult",
        Request::Reset => "Reset",
    }
}
