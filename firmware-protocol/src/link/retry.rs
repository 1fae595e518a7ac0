//! [`Link`]: a framed, sequenced, retrying request/reply channel over a [`Transport`].
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
//! its cached reply, and every other request is free of side effects (`crate::server`).

use std::time::{Duration, Instant};

use super::{LinkCounters, Transport, is_hangup};
use crate::frame::{self, FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
use crate::message::{DeviceError, Request, Response};

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

/// Whether a reply body is the device's NAK (`Error(Corrupt)`, see `crate::server`).
fn is_nak(body: &[u8]) -> bool {
    body.len() < 8
        && matches!(
            postcard::from_bytes::<Response>(body),
            Ok(Response::Error(DeviceError::Corrupt))
        )
}

/// A framed, sequenced, retrying request/reply channel (see the module docs).
pub struct Link<T: Transport = Box<dyn Transport>> {
    transport: T,
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

impl<T: Transport> Link<T> {
    /// A link whose first request goes out under sequence number `first_seq + 1`.
    pub fn new(mut transport: T, policy: RetryPolicy, first_seq: u16) -> Self {
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

    /// Everything this link has sent and received, retransmissions and dropped frames included.
    pub fn counters(&self) -> LinkCounters {
        self.counters
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Makes the next request go out under sequence number `last + 1`: a test sends a
    /// request again under the number it went out with, as a retransmission does.
    pub fn set_last_seq(&mut self, last: u16) {
        self.seq = last;
    }

    /// Sends `request` and returns the body of its reply, retransmitting as the module docs say.
    pub fn call(&mut self, request: &Request<'_>) -> Result<&[u8], LinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let n = frame::encode(seq, request, &mut self.payload, &mut self.wire).map_err(|e| {
            LinkError::Protocol(format!("cannot frame {}: {e}", request_name(request)))
        })?;
        let (corrupt0, stale0) = (self.counters.resyncs, self.counters.stale_replies);
        let tries = self.policy.retries + 1;
        for attempt in 0..tries {
            if attempt > 0 {
                self.counters.retries += 1;
                tracing::debug!(
                    seq,
                    attempt,
                    request = request_name(request),
                    "retransmitting"
                );
            }
            self.transport.send(&self.wire[..n]).map_err(|e| {
                if is_hangup(&e) {
                    LinkError::Closed(e.to_string())
                } else {
                    LinkError::Write(e)
                }
            })?;
            self.counters.bytes_up += n as u64;
            if self.await_reply(seq)? {
                self.counters.round_trips += 1;
                return Ok(&self.reply);
            }
        }
        Err(LinkError::NoReply {
            request: request_name(request),
            seq,
            tries,
            timeout_ms: self.policy.timeout.as_millis(),
            corrupt: self.counters.resyncs - corrupt0,
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
                self.counters.bytes_down += got as u64;
                self.pending = (0, got);
                last_byte = Instant::now();
            }
            let (at, end) = self.pending;
            let (used, frame) = self.decoder.feed(&self.read_buf[at..end]);
            self.pending.0 += used;
            match frame {
                None => {}
                Some(Err(e)) => {
                    self.counters.resyncs += 1;
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
pub fn request_name(request: &Request<'_>) -> &'static str {
    match request {
        Request::Hello { .. } => "Hello",
        Request::DescribeLayer { .. } => "DescribeLayer",
        Request::LoadInput { .. } => "LoadInput",
        Request::LoadPixels { .. } => "LoadPixels",
        Request::SetParameters { .. } => "SetParameters",
        Request::ReadParameters { .. } => "ReadParameters",
        Request::EvaluatePerturbed { .. } => "EvaluatePerturbed",
        Request::ApplyUpdate { .. } => "ApplyUpdate",
        Request::Forward { .. } => "Forward",
        Request::ReadResult { .. } => "ReadResult",
        Request::Reset => "Reset",
        Request::ReadLayerState { .. } => "ReadLayerState",
        Request::WriteLayerState { .. } => "WriteLayerState",
    }
}
