//! Framing: how a message becomes bytes on a serial line, and back.
//!
//! ```text
//! payload = seq (u16 LE) | body (postcard) | crc (u32 LE, CRC-32/ISO-HDLC over seq and body)
//! frame   = COBS(payload) | 0x00
//! ```
//!
//! - COBS removes every zero byte from the payload, so `0x00` only ever ends a frame: a receiver
//!   that joins mid-stream, or reads garbage, resynchronises at the next zero.
//! - The CRC rejects corrupted and truncated frames.
//! - The sequence number pairs a reply with its request. A host retransmits a request under the
//!   same number; a device answers a retransmission of a state-changing request from its cached
//!   reply instead of executing it twice (see [`crate::server`]).
//! - A payload is at most [`MAX_PAYLOAD`] bytes; anything longer is discarded up to the next
//!   delimiter and reported as [`FrameError::Oversize`]. Bulk data (an input batch of 256 x 784
//!   f32 is 800 KB) is therefore split into parts (see [`crate::message`]).
//!
//! [`FrameDecoder`] never panics, whatever bytes it is fed; a property test holds it to that.

use serde::{Deserialize, Serialize};

/// Largest payload (sequence number, body and CRC, before COBS), in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Sequence number.
pub const HEADER_LEN: usize = 2;
pub const CRC_LEN: usize = 4;
/// Largest postcard body.
pub const MAX_BODY: usize = MAX_PAYLOAD - HEADER_LEN - CRC_LEN;
/// Largest frame on the wire, without its delimiter.
pub const MAX_ENCODED: usize = cobs::max_encoding_length(MAX_PAYLOAD);

/// The CRC of a payload: CRC-32/ISO-HDLC (the CRC of Ethernet and zlib).
pub const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// The COBS-encoded length of a payload of `payload_len` bytes, delimiter included.
pub const fn wire_len(payload_len: usize) -> usize {
    cobs::max_encoding_length(payload_len) + 1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A frame longer than the receiver's buffer; dropped up to its delimiter.
    Oversize,
    /// Not valid COBS.
    Cobs,
    /// Shorter than a sequence number and a CRC.
    TooShort,
    /// The CRC does not match: corrupted or truncated.
    Crc,
    /// The body did not decode as the expected message.
    Body,
    /// The message does not fit the buffers given to the encoder.
    BufferTooSmall,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Oversize => "frame longer than the receive buffer",
            Self::Cobs => "frame is not valid COBS",
            Self::TooShort => "frame shorter than its header and CRC",
            Self::Crc => "frame CRC mismatch (corrupted or truncated)",
            Self::Body => "frame body does not decode",
            Self::BufferTooSmall => "message does not fit the frame buffer",
        })
    }
}

/// Encodes `body` under `seq` into `out`, delimiter included; returns the bytes written.
/// `scratch` holds the payload before COBS (at least the payload's length).
pub fn encode<T: Serialize>(
    seq: u16,
    body: &T,
    scratch: &mut [u8],
    out: &mut [u8],
) -> Result<usize, FrameError> {
    if scratch.len() < HEADER_LEN + CRC_LEN {
        return Err(FrameError::BufferTooSmall);
    }
    let cap = scratch.len().min(MAX_PAYLOAD);
    scratch[..HEADER_LEN].copy_from_slice(&seq.to_le_bytes());
    let body_len = postcard::to_slice(body, &mut scratch[HEADER_LEN..cap - CRC_LEN])
        .map_err(|_| FrameError::BufferTooSmall)?
        .len();
    let n = HEADER_LEN + body_len;
    let crc = CRC.checksum(&scratch[..n]);
    scratch[n..n + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    encode_payload(&scratch[..n + CRC_LEN], out)
}

/// COBS-encodes a complete payload (sequence number, body and CRC) and appends the delimiter.
pub fn encode_payload(payload: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    if out.len() < wire_len(payload.len()) {
        return Err(FrameError::BufferTooSmall);
    }
    let n = cobs::encode(payload, out);
    out[n] = 0;
    Ok(n + 1)
}

/// A payload that passed its CRC: the sequence number and the postcard body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub seq: u16,
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    pub fn decode<T: Deserialize<'a>>(&self) -> Result<T, FrameError> {
        postcard::from_bytes(self.body).map_err(|_| FrameError::Body)
    }
}

/// Checks a decoded payload's length and CRC and splits it into sequence number and body.
pub fn check_payload(payload: &[u8]) -> Result<Frame<'_>, FrameError> {
    if payload.len() < HEADER_LEN + CRC_LEN {
        return Err(FrameError::TooShort);
    }
    let (data, crc) = payload.split_at(payload.len() - CRC_LEN);
    if CRC.checksum(data).to_le_bytes() != crc {
        return Err(FrameError::Crc);
    }
    Ok(Frame {
        seq: u16::from_le_bytes([data[0], data[1]]),
        body: &data[HEADER_LEN..],
    })
}

/// Reassembles frames from a byte stream (see the module docs). The buffer bounds the frame
/// length: a frame whose encoding does not fit is dropped whole.
#[derive(Debug)]
pub struct FrameDecoder<B> {
    buf: B,
    len: usize,
    overflow: bool,
    /// The sequence number the last frame carried, when it failed its CRC.
    damaged: Option<u16>,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> FrameDecoder<B> {
    /// A decoder that keeps frames in `buf`; [`MAX_ENCODED`] bytes take any frame.
    pub fn new(buf: B) -> Self {
        Self {
            buf,
            len: 0,
            overflow: false,
            damaged: None,
        }
    }

    /// The sequence number carried by the frame [`FrameDecoder::feed`] just rejected for its CRC
    /// (`None` after any other outcome). The frame is damaged, so the number may be too; a device
    /// uses it to ask for a retransmission at once (a NAK), a host that gets a wrong one ignores
    /// it as a stale reply.
    pub fn damaged_seq(&self) -> Option<u16> {
        self.damaged
    }

    /// Forgets a partly received frame.
    pub fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    /// Whether bytes of an unfinished frame are held.
    pub fn in_frame(&self) -> bool {
        self.len > 0 || self.overflow
    }

    /// Consumes bytes from `input` up to and including the first delimiter that ends a
    /// non-empty frame. Returns how many bytes were consumed and, if a frame ended, the frame
    /// or why it was rejected. Call again with the rest of `input`.
    pub fn feed<'s>(&'s mut self, input: &[u8]) -> (usize, Option<Result<Frame<'s>, FrameError>>) {
        let mut i = 0;
        self.damaged = None;
        while i < input.len() {
            let rest = &input[i..];
            let Some(z) = rest.iter().position(|&b| b == 0) else {
                self.take(rest);
                return (input.len(), None);
            };
            self.take(&rest[..z]);
            i += z + 1;
            if self.overflow {
                self.clear();
                return (i, Some(Err(FrameError::Oversize)));
            }
            if self.len == 0 {
                // Back-to-back delimiters: nothing between them.
                continue;
            }
            let len = self.len;
            self.len = 0;
            let buf = &mut self.buf.as_mut()[..len];
            let n = match cobs::decode_in_place(buf) {
                Ok(n) if n <= len => n,
                _ => return (i, Some(Err(FrameError::Cobs))),
            };
            let result = check_payload(&buf[..n]);
            if result == Err(FrameError::Crc) {
                self.damaged = Some(u16::from_le_bytes([buf[0], buf[1]]));
            }
            return (i, Some(result));
        }
        (i, None)
    }

    fn take(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        let buf = self.buf.as_mut();
        match buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflow = true,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::message::{DeviceError, Response};
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn frame_bytes(seq: u16, body: &Response<'_>) -> Vec<u8> {
        let mut scratch = vec![0u8; 1024];
        let mut out = vec![0u8; 1100];
        let n = encode(seq, body, &mut scratch, &mut out).unwrap();
        out.truncate(n);
        out
    }

    /// Every outcome of feeding `bytes` in pieces of `step`.
    fn decode_all(
        dec: &mut FrameDecoder<Vec<u8>>,
        bytes: &[u8],
        step: usize,
    ) -> Vec<Result<(u16, Vec<u8>), FrameError>> {
        let mut out = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            let mut rest = piece;
            while !rest.is_empty() {
                let (n, r) = dec.feed(rest);
                if let Some(r) = r {
                    out.push(r.map(|f| (f.seq, f.body.to_vec())));
                }
                rest = &rest[n..];
            }
        }
        out
    }

    #[test]
    fn frames_round_trip_and_zero_only_delimits() {
        let bytes = frame_bytes(
            0x0100,
            &Response::Error(DeviceError::NoSuchLayer { layer: 0 }),
        );
        assert_eq!(bytes.iter().filter(|&&b| b == 0).count(), 1);
        assert_eq!(*bytes.last().unwrap(), 0);
        let mut dec = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
        let got = decode_all(&mut dec, &bytes, 3);
        let (seq, body) = got[0].clone().unwrap();
        assert_eq!(seq, 0x0100);
        let back: Response = postcard::from_bytes(&body).unwrap();
        assert_eq!(back, Response::Error(DeviceError::NoSuchLayer { layer: 0 }));
    }

    #[test]
    fn corruption_and_truncation_fail_the_crc_and_the_next_frame_decodes() {
        let good = frame_bytes(7, &Response::Ack);
        let mut corrupt = good.clone();
        corrupt[2] ^= 0x10;
        let truncated_then_delim = [&good[..good.len() - 3], &[0u8][..]].concat();
        let stream = [
            &b"\x13garbage\xff"[..],
            &[0],
            &corrupt,
            &truncated_then_delim,
            &good,
        ]
        .concat();
        let mut dec = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
        let got = decode_all(&mut dec, &stream, 5);
        assert!(got[..got.len() - 1].iter().all(|r| r.is_err()), "{got:?}");
        assert_eq!(got.last().unwrap().clone().unwrap().0, 7);
    }

    #[test]
    fn oversize_frames_are_dropped_whole() {
        let mut dec = FrameDecoder::new(vec![0u8; 16]);
        let stream = [&[0x55u8; 40][..], &[0], &frame_bytes(9, &Response::Ack)].concat();
        let got = decode_all(&mut dec, &stream, 7);
        assert_eq!(got[0], Err(FrameError::Oversize));
        assert_eq!(got[1].clone().unwrap().0, 9);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the decoder, and a good frame after them (behind a
        /// delimiter) always decodes.
        #[test]
        fn the_decoder_survives_any_bytes_and_resynchronises(
            garbage in proptest::collection::vec(any::<u8>(), 0..600),
            step in 1usize..64,
            cap in 8usize..300,
            seq in any::<u16>(),
        ) {
            let good = frame_bytes(seq, &Response::Error(DeviceError::Busy));
            let stream = [&garbage[..], &[0], &good].concat();
            let mut dec = FrameDecoder::new(vec![0u8; cap.max(good.len())]);
            let got = decode_all(&mut dec, &stream, step);
            let last = got.last().cloned().expect("the good frame ends the stream");
            let (s, body) = last.unwrap();
            prop_assert_eq!(s, seq);
            prop_assert_eq!(postcard::from_bytes::<Response>(&body).unwrap(), Response::Error(DeviceError::Busy));
        }

        /// Truncated, bit-flipped and oversize frames are rejected (never mistaken for a good
        /// frame with other contents), and never panic.
        #[test]
        fn damaged_frames_are_rejected(
            seq in any::<u16>(),
            layer in any::<u8>(),
            cut in 1usize..12,
            flip_at in 0usize..64,
            flip in 1u8..=255,
        ) {
            let good = frame_bytes(seq, &Response::Error(DeviceError::NoSuchLayer { layer }));
            let body_len = good.len() - 1;
            // Truncated: a prefix, then a delimiter.
            let truncated = [&good[..body_len.saturating_sub(cut)], &[0u8][..]].concat();
            let mut dec = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
            for r in decode_all(&mut dec, &truncated, 4) {
                prop_assert!(r.is_err());
            }
            // One byte changed (never to the delimiter): CRC-32 detects every burst of up to 32 bits.
            let mut flipped = good.clone();
            let at = flip_at % body_len;
            flipped[at] ^= flip;
            if flipped[at] != 0 {
                for r in decode_all(&mut dec, &flipped, 4) {
                    match r {
                        Err(_) => {}
                        Ok((s, body)) => {
                            // COBS may decode to the same payload only if nothing changed.
                            prop_assert!(s == seq && body == good_body(&good), "a damaged frame decoded");
                        }
                    }
                }
            }
            // Oversize: the good frame into a decoder too small for it.
            let mut small = FrameDecoder::new(vec![0u8; body_len - 1]);
            prop_assert_eq!(decode_all(&mut small, &good, 3), vec![Err(FrameError::Oversize)]);
        }
    }

    fn good_body(frame: &[u8]) -> Vec<u8> {
        let mut dec = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
        decode_all(&mut dec, frame, frame.len())[0]
            .clone()
            .unwrap()
            .1
    }
}
