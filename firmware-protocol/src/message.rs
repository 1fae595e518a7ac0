//! The messages host and device exchange, serialised with postcard.
//!
//! Every request is answered by exactly one reply frame carrying the request's sequence number
//! (see [`crate::frame`]). Bulk data travels in pieces that fit one frame:
//!
//! - **Up** (host to device): [`Request::LoadInput`] and [`Request::SetParameters`] carry a slice
//!   of the whole at a value offset. Parts are sent in order; the device acknowledges each.
//! - **Down** (device to host): [`Request::EvaluatePerturbed`], [`Request::Forward`] and
//!   [`Request::ReadParameters`] leave their result in the device's result buffer and reply with
//!   its first block ([`Response::Result`]); the host fetches the rest with
//!   [`Request::ReadResult`].
//!
//! Directions travel as 8-byte seeds ([`DirectionSeed`]) and never as vectors: the device
//! regenerates them with [`crate::direction`]. There is no gradient request: a device perturbs,
//! evaluates, restores and applies seeded updates; the host computes the loss and its estimates.
//!
//! Every field is fixed in the order written here; [`PROTOCOL_VERSION`] changes with any change
//! to these types.

use core::fmt;
use core::marker::PhantomData;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeSeq, SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};

use crate::direction::{DirectionSeed, UpdateTerm};
pub use crate::shape::{ChunkUnits, ForwardMode, LayerShape};

/// Bumped with every change to the messages or the framing. Host and device must agree.
///
/// - 1: dense layers.
/// - 2: CNN blocks ([`LayerShape::Conv`]); a clean forward pass of a layer whose next-layer input
///   differs from its features returns both ([`LayerDescriptor::forward_width`]). Every message
///   of a dense layer keeps its version-1 bytes.
///
/// [`Request::LoadPixels`] came later within version 2, as a request a device may not know:
/// the host tries it and falls back to [`Request::LoadInput`] on
/// [`DeviceError::UnknownRequest`], and every other message keeps its bytes.
pub const PROTOCOL_VERSION: u16 = 2;

/// Most layers one device may hold.
pub const MAX_LAYERS: usize = 16;

/// Host to device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request<'a> {
    /// The handshake: answered by [`Response::Hello`] whatever the versions (the host decides).
    Hello { protocol_version: u16 },
    /// Answered by [`Response::Layer`].
    DescribeLayer { layer: u8 },
    /// Values `offset..offset + values.len()` of a batch of `rows` inputs (rows x input width,
    /// row-major, f32). A part with `offset == 0` starts a new batch; parts must follow in order.
    /// The batch is complete, and forward passes possible, once every value has arrived.
    LoadInput {
        layer: u8,
        rows: u32,
        offset: u32,
        #[serde(borrow)]
        values: Packed<'a, f32>,
    },
    /// Programs parameters `offset..offset + values.len()` of the layer's flat layout.
    SetParameters {
        layer: u8,
        offset: u32,
        #[serde(borrow)]
        values: Packed<'a, f32>,
    },
    /// All parameters into the result buffer (f32), answered with its first block.
    ReadParameters { layer: u8 },
    /// Algorithm 1, lines 6-9: for each seed, perturb the chunk by `+eps v`, evaluate, by
    /// `-eps v`, evaluate, restore bit for bit. The result buffer holds, per seed in order, the
    /// features under `+` then under `-` (rows x feature width each), in the layer's encoding.
    EvaluatePerturbed {
        layer: u8,
        chunk: ChunkRange,
        eps: f32,
        #[serde(borrow)]
        seeds: Packed<'a, DirectionSeed>,
    },
    /// Algorithm 1, lines 10 and 12: `W[chunk] -= scale * sum_p dd_p v_p`, with the arithmetic of
    /// [`crate::direction::apply_update`].
    ApplyUpdate {
        layer: u8,
        chunk: ChunkRange,
        scale: f32,
        #[serde(borrow)]
        terms: Packed<'a, UpdateTerm>,
    },
    /// A clean forward pass on the cached input. The result buffer holds, per batch, the
    /// features (rows x feature width) and, for layers whose next-layer input differs from them
    /// (a CNN block pools), that input after them (rows x output width):
    /// [`LayerDescriptor::forward_width`] values per row in all. `mode` selects BatchNorm's
    /// statistics: the batch's (committed to the running statistics) or the running ones.
    Forward { layer: u8, mode: ForwardMode },
    /// The block of the result buffer that starts at byte `offset` of its encoding.
    ReadResult { offset: u32 },
    /// Back to the power-on state: a new boot id, no input, no result, parameters unspecified.
    Reset,
    /// The layer's state outside its parameters ([`LayerShape::state_len`] values, f32: a CNN
    /// block's BatchNorm running means, then variances) into the result buffer, answered with
    /// its first block. Added after the first ten requests: a device that predates it answers
    /// [`DeviceError::UnknownRequest`], and the host then keeps no copy of that state.
    ReadLayerState { layer: u8 },
    /// Writes values `offset..offset + values.len()` of that state (resume, reset recovery).
    WriteLayerState {
        layer: u8,
        offset: u32,
        #[serde(borrow)]
        values: Packed<'a, f32>,
    },
    /// [`Request::LoadInput`] with the values as a dataset's 8-bit pixels, a quarter of the
    /// bytes: the device normalises pixel `p` at index `i` of a row itself, in f32 and in this
    /// order, `(p as f32 / 255.0 - mean[c]) / std[c]` with `c = i / plane` (channel-major
    /// images), exactly the host's arithmetic (`pnn::data::Normalizer`), so the layer gets the
    /// same bits. Same batch and parts rules as `LoadInput`, offsets counted in values. A device
    /// of protocol version 2 that predates it answers [`DeviceError::UnknownRequest`], and the
    /// host sends f32 values instead.
    LoadPixels {
        layer: u8,
        rows: u32,
        offset: u32,
        normaliser: PixelNormaliser,
        #[serde(borrow)]
        pixels: &'a [u8],
    },
}

/// How a device turns a dataset's 8-bit pixels into a layer's input ([`Request::LoadPixels`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PixelNormaliser {
    /// Values per channel plane (H * W).
    pub plane: u32,
    /// Channels in use (1 to [`PixelNormaliser::MAX_CHANNELS`]); the rest of `mean` and `std`
    /// is ignored.
    pub channels: u8,
    pub mean: [f32; PixelNormaliser::MAX_CHANNELS],
    pub std: [f32; PixelNormaliser::MAX_CHANNELS],
}

impl PixelNormaliser {
    /// Channels a normaliser can describe (RGB).
    pub const MAX_CHANNELS: usize = 3;

    /// What pixel `p` of `channel` becomes.
    pub fn value(&self, p: u8, channel: usize) -> f32 {
        normalise_pixel(p, self.mean[channel], self.std[channel])
    }
}

/// The one formula by which a pixel becomes an input value, on the host
/// (`pnn::data::Normalizer`) and on a device ([`Request::LoadPixels`]): f32 arithmetic in this
/// order, so both give the same bits.
#[inline]
pub fn normalise_pixel(p: u8, mean: f32, std: f32) -> f32 {
    (p as f32 / 255.0 - mean) / std
}

/// Number of [`Request`] variants: a body whose tag is at least this comes from a newer host.
pub const REQUEST_KINDS: u32 = 13;

impl Request<'_> {
    /// Whether executing the request changes device state, so that a retransmission (same
    /// sequence number, same bytes) must be answered from the cached reply, not executed again.
    /// A training-mode forward pass commits the batch's statistics to a CNN block's running
    /// statistics, so executing it twice would commit them twice.
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::LoadInput { .. }
                | Request::LoadPixels { .. }
                | Request::SetParameters { .. }
                | Request::ApplyUpdate { .. }
                | Request::Reset
                | Request::WriteLayerState { .. }
                | Request::Forward {
                    mode: ForwardMode::Train,
                    ..
                }
        )
    }
}

/// Device to host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response<'a> {
    #[serde(borrow)]
    Hello(DeviceInfo<'a>),
    Layer(LayerDescriptor),
    Ack,
    /// Bytes `offset..offset + data.len()` of a result of `total` bytes.
    Result {
        total: u32,
        offset: u32,
        #[serde(borrow)]
        data: Encoded<'a>,
    },
    Error(DeviceError),
}

/// What a device says about itself in the handshake.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo<'a> {
    /// First, so that a host can read it from any later version's reply.
    pub protocol_version: u16,
    pub name: &'a str,
    /// Changes on every reset and power-up: a host that sees a new one reprograms the device.
    pub boot_id: u32,
    /// Layers held, described one by one by [`Request::DescribeLayer`].
    pub layers: u8,
    /// Largest request frame the device accepts, in bytes before COBS (header and CRC included).
    pub max_request: u32,
    /// Most rows of one input batch.
    pub max_batch: u32,
    /// Most seeds of one perturbed evaluation or update.
    pub max_directions: u16,
    pub capabilities: Capabilities,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Perturbations and updates from seeds ([`Request::EvaluatePerturbed`],
    /// [`Request::ApplyUpdate`]). Required by the MF+DD trainer.
    pub seeded_perturbation: bool,
    /// Arbitrary parameter values may be programmed ([`Request::SetParameters`]).
    pub raw_parameter_writes: bool,
    /// Parameters can be read back ([`Request::ReadParameters`]).
    pub parameter_read_back: bool,
}

/// One layer as the device holds it. The sizes after `kind` follow from it
/// ([`LayerDescriptor::new`]); they travel so that a host can check a device's arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerDescriptor {
    pub kind: LayerShape,
    pub param_count: u32,
    /// Values per sample the host computes the goodness from (what perturbed evaluations return).
    pub feature_width: u32,
    /// Values per sample of the next layer's input.
    pub output_width: u32,
    pub chunking: ChunkUnits,
    pub encoding: ActivationEncoding,
}

/// `n` on the wire: sizes that do not fit a u32 saturate (a device holds no such layer).
const fn wire_u32(n: usize) -> u32 {
    if n > u32::MAX as usize {
        u32::MAX
    } else {
        n as u32
    }
}

impl LayerDescriptor {
    /// The descriptor of a layer of this shape (see [`LayerShape`]).
    pub const fn new(kind: LayerShape, encoding: ActivationEncoding) -> Self {
        Self {
            kind,
            param_count: wire_u32(kind.param_count()),
            feature_width: wire_u32(kind.feature_width()),
            output_width: wire_u32(kind.output_width()),
            chunking: kind.chunk_units(),
            encoding,
        }
    }

    /// Whether every size of a layer of this shape fits the protocol's u32 fields (its
    /// parameters, its input and its forward result per sample); a device holds no larger layer.
    pub const fn fits(shape: &LayerShape) -> bool {
        let max = u32::MAX as usize;
        shape.param_count() <= max && shape.input_width() <= max && shape.forward_width() <= max
    }

    /// Values per sample of the layer's input (saturating).
    pub const fn input_width(&self) -> u32 {
        wire_u32(self.kind.input_width())
    }

    /// Whether the next layer's input differs from the features (and so follows them in a
    /// clean forward pass's result).
    pub const fn has_separate_output(&self) -> bool {
        self.kind.has_separate_output()
    }

    /// Values per sample of a clean forward pass's result: the features, then the next-layer
    /// input where it differs from them (saturating).
    pub const fn forward_width(&self) -> u32 {
        if self.has_separate_output() {
            self.feature_width.saturating_add(self.output_width)
        } else {
            self.feature_width
        }
    }
}

/// How activations travel down.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum ActivationEncoding {
    /// Little-endian IEEE f32, exact.
    F32,
    /// One unsigned ADC code per value: `value = code * scale` (codes saturate at 0 and 255).
    AdcU8 { scale: f32 },
    /// Two bytes, little-endian: `value = code * scale` (codes saturate at 0 and 65535).
    AdcU16 { scale: f32 },
}

impl ActivationEncoding {
    /// Bytes per value.
    pub const fn size(&self) -> usize {
        match self {
            Self::F32 => 4,
            Self::AdcU8 { .. } => 1,
            Self::AdcU16 { .. } => 2,
        }
    }

    fn code(value: f32, scale: f32, max: f32) -> f32 {
        let c = libm::roundf(value / scale);
        // NaN compares false: saturates to 0.
        if c > 0.0 { c.min(max) } else { 0.0 }
    }

    /// Writes the encoding of `value` into `out` (`out.len() == self.size()`).
    pub fn encode(&self, value: f32, out: &mut [u8]) {
        match *self {
            Self::F32 => out.copy_from_slice(&value.to_le_bytes()),
            Self::AdcU8 { scale } => out[0] = Self::code(value, scale, 255.0) as u8,
            Self::AdcU16 { scale } => {
                out.copy_from_slice(&(Self::code(value, scale, 65535.0) as u16).to_le_bytes())
            }
        }
    }

    /// The value `bytes` (`bytes.len() == self.size()`) encodes.
    pub fn decode(&self, bytes: &[u8]) -> f32 {
        match *self {
            Self::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            Self::AdcU8 { scale } => bytes[0] as f32 * scale,
            Self::AdcU16 { scale } => u16::from_le_bytes([bytes[0], bytes[1]]) as f32 * scale,
        }
    }
}

/// Why a device refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceError {
    /// The frame arrived but its body did not decode.
    BadFrame,
    /// A request this device does not know (a newer host, or a capability it lacks).
    UnknownRequest,
    NoSuchLayer {
        layer: u8,
    },
    /// A size the device cannot accept: `expected` is what it holds or allows.
    ShapeMismatch {
        expected: u32,
        got: u32,
    },
    /// The request needs more memory than the device has.
    OutOfMemory {
        needed: u32,
        available: u32,
    },
    /// The device is still working on something else; retry later.
    Busy,
    /// A forward pass or perturbed evaluation before a complete input batch.
    NoInput,
    ChunkOutOfRange {
        start: u32,
        end: u32,
        count: u32,
    },
    /// An input or parameter part that does not continue the previous one.
    OutOfOrder {
        expected: u32,
        got: u32,
    },
    TooManyDirections {
        max: u16,
        got: u16,
    },
    /// [`Request::ReadResult`] with nothing, or less, in the result buffer.
    NoResult,
    /// The device lacks the capability the request needs.
    Unsupported,
    /// A device-specific failure code.
    Hardware {
        code: u16,
    },
    /// A negative acknowledgement: a frame arrived with a bad CRC (sent under the sequence number
    /// the damaged frame carried, which may itself be damaged). The host retransmits at once
    /// instead of waiting out its timeout; see [`crate::server::Server::serve`].
    Corrupt,
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadFrame => write!(f, "the device could not decode the request"),
            Self::UnknownRequest => write!(f, "the device does not know this request"),
            Self::NoSuchLayer { layer } => write!(f, "the device has no layer {layer}"),
            Self::ShapeMismatch { expected, got } => {
                write!(
                    f,
                    "shape mismatch: the device expects {expected}, got {got}"
                )
            }
            Self::OutOfMemory { needed, available } => write!(
                f,
                "out of memory: the request needs {needed} values, the device has {available}"
            ),
            Self::Busy => write!(f, "the device is busy"),
            Self::NoInput => write!(f, "no complete input batch is loaded"),
            Self::ChunkOutOfRange { start, end, count } => {
                write!(f, "chunk {start}..{end} is outside the {count} parameters")
            }
            Self::OutOfOrder { expected, got } => {
                write!(f, "part at offset {got} does not continue at {expected}")
            }
            Self::TooManyDirections { max, got } => {
                write!(f, "{got} directions, the device takes at most {max}")
            }
            Self::NoResult => write!(f, "no result to read at that offset"),
            Self::Unsupported => write!(f, "the device lacks this capability"),
            Self::Hardware { code } => write!(f, "hardware fault, code {code}"),
            Self::Corrupt => write!(f, "the request arrived corrupted"),
        }
    }
}

/// A parameter range, always 8 bytes on the wire (two little-endian u32), so that the size of
/// a request never depends on where or how long its chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRange {
    pub start: u32,
    pub end: u32,
}

impl ChunkRange {
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl Serialize for ChunkRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(8)?;
        for b in self
            .start
            .to_le_bytes()
            .iter()
            .chain(&self.end.to_le_bytes())
        {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for ChunkRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = <[u8; 8]>::deserialize(d)?;
        Ok(Self {
            start: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            end: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
    }
}

/// A value with a fixed little-endian wire layout, packed back to back in a [`Packed`] slice.
pub trait Fixed: Copy + 'static {
    const SIZE: usize;
    fn write(&self, out: &mut [u8]);
    fn read(bytes: &[u8]) -> Self;
}

impl Fixed for f32 {
    const SIZE: usize = 4;
    fn write(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Fixed for DirectionSeed {
    const SIZE: usize = 8;
    fn write(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0.to_le_bytes());
    }
    fn read(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        DirectionSeed(u64::from_le_bytes(a))
    }
}

/// Seed (u64) then derivative (f32): 12 bytes.
impl Fixed for UpdateTerm {
    const SIZE: usize = 12;
    fn write(&self, out: &mut [u8]) {
        self.seed.write(&mut out[..8]);
        self.derivative.write(&mut out[8..12]);
    }
    fn read(b: &[u8]) -> Self {
        UpdateTerm {
            seed: DirectionSeed::read(&b[..8]),
            derivative: f32::read(&b[8..12]),
        }
    }
}

/// A slice of [`Fixed`] values. On the wire: a varint byte count, then the values' bytes back to
/// back (postcard's byte-string layout). The sender builds it from typed values, the receiver
/// borrows the bytes of the frame, so neither side copies or allocates.
#[derive(Clone, Copy, Debug)]
pub enum Packed<'a, T> {
    Items(&'a [T]),
    Bytes(&'a [u8], PhantomData<T>),
}

impl<'a, T: Fixed> Packed<'a, T> {
    pub fn len(&self) -> usize {
        match self {
            Self::Items(v) => v.len(),
            Self::Bytes(b, _) => b.len() / T::SIZE,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> T {
        match self {
            Self::Items(v) => v[i],
            Self::Bytes(b, _) => T::read(&b[i * T::SIZE..(i + 1) * T::SIZE]),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Copies into `out` (at least `self.len()` long).
    pub fn copy_to(&self, out: &mut [T]) {
        for (o, v) in out.iter_mut().zip(self.iter()) {
            *o = v;
        }
    }
}

impl<T: Fixed + PartialEq> PartialEq for Packed<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().zip(other.iter()).all(|(a, b)| a == b)
    }
}

impl<T: Fixed> Serialize for Packed<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Bytes(b, _) => s.serialize_bytes(b),
            Self::Items(items) => {
                // A sequence of u8 is laid out exactly as a byte string in postcard.
                let mut seq = s.serialize_seq(Some(items.len() * T::SIZE))?;
                let mut buf = [0u8; 16];
                for item in items.iter() {
                    item.write(&mut buf[..T::SIZE]);
                    for b in &buf[..T::SIZE] {
                        seq.serialize_element(b)?;
                    }
                }
                seq.end()
            }
        }
    }
}

struct PackedVisitor<T>(PhantomData<T>);

impl<'de, T: Fixed> Visitor<'de> for PackedVisitor<T> {
    type Value = Packed<'de, T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a byte string of {}-byte values", T::SIZE)
    }
    fn visit_borrowed_bytes<E: de::Error>(self, b: &'de [u8]) -> Result<Self::Value, E> {
        if !b.len().is_multiple_of(T::SIZE) {
            return Err(E::invalid_length(b.len(), &self));
        }
        Ok(Packed::Bytes(b, PhantomData))
    }
}

impl<'de: 'a, 'a, T: Fixed> Deserialize<'de> for Packed<'a, T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(PackedVisitor(PhantomData))
    }
}

/// Activations (or parameters) in an [`ActivationEncoding`]: encoded while serialised from f32
/// on the device, borrowed as bytes on the host. Same wire layout as [`Packed`].
#[derive(Clone, Copy, Debug)]
pub enum Encoded<'a> {
    Values {
        values: &'a [f32],
        encoding: ActivationEncoding,
    },
    Bytes(&'a [u8]),
}

impl Encoded<'_> {
    /// The bytes, where they are at hand (the receiving side).
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Bytes(b) => Some(b),
            Self::Values { .. } => None,
        }
    }
}

impl PartialEq for Encoded<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Bytes(a), Self::Bytes(b)) => a == b,
            (
                Self::Values {
                    values: a,
                    encoding: ea,
                },
                Self::Values {
                    values: b,
                    encoding: eb,
                },
            ) => a == b && ea == eb,
            _ => false,
        }
    }
}

impl Serialize for Encoded<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Bytes(b) => s.serialize_bytes(b),
            Self::Values { values, encoding } => {
                let size = encoding.size();
                let mut seq = s.serialize_seq(Some(values.len() * size))?;
                let mut buf = [0u8; 4];
                for v in values.iter() {
                    encoding.encode(*v, &mut buf[..size]);
                    for b in &buf[..size] {
                        seq.serialize_element(b)?;
                    }
                }
                seq.end()
            }
        }
    }
}

struct EncodedVisitor;

impl<'de> Visitor<'de> for EncodedVisitor {
    type Value = Encoded<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }
    fn visit_borrowed_bytes<E: de::Error>(self, b: &'de [u8]) -> Result<Self::Value, E> {
        Ok(Encoded::Bytes(b))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Encoded<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(EncodedVisitor)
    }
}

/// The protocol version in the body of a [`Response::Hello`], read without decoding the rest:
/// a host reports a version mismatch even when a newer device's reply no longer decodes.
pub fn peek_hello_version(body: &[u8]) -> Option<u16> {
    // Variant index 0 (a varint), then the u16 version (a varint).
    let (tag, rest) = postcard::take_from_bytes::<u32>(body).ok()?;
    if tag != 0 {
        return None;
    }
    postcard::take_from_bytes::<u16>(rest).ok().map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn roundtrip<'a>(req: &Request<'_>, buf: &'a mut [u8]) -> Request<'a> {
        let n = postcard::to_slice(req, buf).unwrap().len();
        postcard::from_bytes(&buf[..n]).unwrap()
    }

    #[test]
    fn requests_round_trip_and_packed_values_borrow_the_frame() {
        let mut buf = [0u8; 256];
        let seeds = [DirectionSeed(1), DirectionSeed(u64::MAX)];
        let req = Request::EvaluatePerturbed {
            layer: 1,
            chunk: ChunkRange { start: 5, end: 900 },
            eps: 1e-3,
            seeds: Packed::Items(&seeds),
        };
        let back = roundtrip(&req, &mut buf);
        assert_eq!(back, req);
        match back {
            Request::EvaluatePerturbed { seeds, .. } => {
                assert!(matches!(seeds, Packed::Bytes(..)));
                assert_eq!(seeds.get(1), DirectionSeed(u64::MAX));
            }
            _ => unreachable!(),
        }
        let terms = [UpdateTerm {
            seed: DirectionSeed(7),
            derivative: -2.5,
        }];
        let req = Request::ApplyUpdate {
            layer: 0,
            chunk: ChunkRange { start: 0, end: 1 },
            scale: 0.25,
            terms: Packed::Items(&terms),
        };
        assert_eq!(roundtrip(&req, &mut buf), req);
    }

    #[test]
    fn the_last_request_tag_is_below_request_kinds() {
        let mut buf = [0u8; 64];
        let last = Request::LoadPixels {
            layer: 0,
            rows: 1,
            offset: 0,
            normaliser: PixelNormaliser {
                plane: 4,
                channels: 1,
                mean: [0.5, 0.0, 0.0],
                std: [0.25, 1.0, 1.0],
            },
            pixels: &[0, 7, 255, 3],
        };
        let body = postcard::to_slice(&last, &mut buf).unwrap();
        assert_eq!(body[0], (REQUEST_KINDS - 1) as u8);
        // The pixels travel as one byte each after a length.
        assert_eq!(&body[body.len() - 5..], [4, 0, 7, 255, 3]);
        assert_eq!(roundtrip(&last, &mut buf), last);
    }

    #[test]
    fn request_size_does_not_depend_on_the_chunk() {
        let seeds = [DirectionSeed(3); 4];
        let size = |start, end| {
            let mut buf = [0u8; 128];
            let req = Request::EvaluatePerturbed {
                layer: 0,
                chunk: ChunkRange { start, end },
                eps: 1e-3,
                seeds: Packed::Items(&seeds),
            };
            postcard::to_slice(&req, &mut buf).unwrap().len()
        };
        assert_eq!(size(0, 1), size(0, 39_250));
        assert_eq!(size(0, 1), size(4_000_000, 4_100_000));
    }

    #[test]
    fn packed_bytes_of_a_wrong_length_are_refused() {
        // Variant 3 = SetParameters { layer 0, offset 0, values: 3 bytes }.
        let body = [3u8, 0, 0, 3, 1, 2, 3];
        assert!(postcard::from_bytes::<Request>(&body).is_err());
    }

    #[test]
    fn encodings_saturate_and_round() {
        let mut b = [0u8; 2];
        let e = ActivationEncoding::AdcU8 { scale: 0.5 };
        e.encode(1.26, &mut b[..1]);
        assert_eq!(b[0], 3);
        e.encode(1e9, &mut b[..1]);
        assert_eq!(b[0], 255);
        e.encode(-4.0, &mut b[..1]);
        assert_eq!(b[0], 0);
        e.encode(f32::NAN, &mut b[..1]);
        assert_eq!(b[0], 0);
        let e = ActivationEncoding::AdcU16 { scale: 0.001 };
        e.encode(1.5, &mut b);
        assert_eq!(e.decode(&b), 1500.0 * 0.001);
    }

    /// The dense layer's messages are those of protocol version 1, byte for byte: the conv
    /// layer (version 2) added variants after them and changed no existing encoding.
    #[test]
    fn dense_messages_keep_their_version_1_bytes() {
        let mut buf = [0u8; 64];
        let d = LayerDescriptor::new(LayerShape::dense(784, 50), ActivationEncoding::F32);
        let body = postcard::to_slice(&Response::Layer(d), &mut buf).unwrap();
        assert_eq!(
            body,
            [1, 0, 0x90, 0x06, 0x32, 0xD2, 0xB2, 0x02, 0x32, 0x32, 0, 0]
        );
        let forward = Request::Forward {
            layer: 1,
            mode: ForwardMode::Eval,
        };
        assert_eq!(postcard::to_slice(&forward, &mut buf).unwrap(), [7, 1, 1]);
    }

    #[test]
    fn a_conv_descriptor_round_trips_with_its_sizes() {
        let d = LayerDescriptor::new(
            LayerShape::conv(1, 32, (28, 28), 16, u64::MAX - 3),
            ActivationEncoding::F32,
        );
        assert_eq!(d.param_count, 32 * (9 + 3));
        assert_eq!(d.chunking, ChunkUnits::Groups { size: 12 });
        assert_eq!((d.input_width(), d.feature_width), (784, 512));
        assert_eq!(
            (d.output_width, d.forward_width()),
            (32 * 14 * 14, 512 + 6272)
        );
        let dense = LayerDescriptor::new(LayerShape::dense(784, 50), ActivationEncoding::F32);
        assert_eq!(dense.forward_width(), 50);
        let mut buf = [0u8; 64];
        let body = postcard::to_slice(&Response::Layer(d), &mut buf).unwrap();
        assert_eq!(
            postcard::from_bytes::<Response>(body).unwrap(),
            Response::Layer(d)
        );
        // Garbage sizes saturate instead of overflowing.
        let max = u32::MAX as usize;
        let huge = LayerDescriptor::new(
            LayerShape::conv(max, max, (max, 9), 9, 0),
            ActivationEncoding::F32,
        );
        assert_eq!((huge.param_count, huge.input_width()), (u32::MAX, u32::MAX));
        assert_eq!(huge.forward_width(), u32::MAX);
        assert!(!LayerDescriptor::fits(&huge.kind));
        assert!(LayerDescriptor::fits(&d.kind));
        // Each size alone: parameters, input, forward result.
        let max = u32::MAX as usize;
        assert!(LayerDescriptor::fits(&LayerShape::dense(1, max / 2 - 1)));
        assert!(!LayerDescriptor::fits(&LayerShape::dense(1, max / 2 + 1)));
        assert!(!LayerDescriptor::fits(&LayerShape::conv(
            1,
            1,
            (1 << 16, 1 << 16),
            1,
            0
        )));
        assert!(!LayerDescriptor::fits(&LayerShape::conv(
            1,
            1 << 20,
            (2, 2),
            1 << 12,
            0
        )));
    }

    /// The shared shape vocabulary encodes a conv block exactly as protocol version 2's own
    /// descriptor type did (bytes recorded from that type).
    #[test]
    fn conv_descriptors_keep_their_version_2_bytes() {
        let d = LayerDescriptor::new(
            LayerShape::conv(3, 32, (28, 30), 16, u64::MAX - 3),
            ActivationEncoding::AdcU8 { scale: 0.5 },
        );
        let mut buf = [0u8; 64];
        let body = postcard::to_slice(&Response::Layer(d), &mut buf).unwrap();
        assert_eq!(
            body,
            [
                1, 1, 3, 32, 28, 30, 16, 252, 255, 255, 255, 255, 255, 255, 255, 255, 1, 192, 7,
                128, 4, 192, 52, 1, 30, 1, 0, 0, 0, 63
            ]
        );
    }

    #[test]
    fn the_hello_version_is_read_before_anything_else() {
        let info = DeviceInfo {
            protocol_version: 77,
            name: "x",
            boot_id: 1,
            layers: 2,
            max_request: 100,
            max_batch: 3,
            max_directions: 4,
            capabilities: Capabilities {
                seeded_perturbation: true,
                raw_parameter_writes: true,
                parameter_read_back: false,
            },
        };
        let mut buf = [0u8; 64];
        let body = postcard::to_slice(&Response::Hello(info), &mut buf).unwrap();
        assert_eq!(peek_hello_version(body), Some(77));
        assert_eq!(peek_hello_version(&[2]), None);
    }
}
