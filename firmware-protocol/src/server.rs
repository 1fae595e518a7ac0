//! The device side: a dispatcher from frames to a [`PhysicalLayer`], the one trait a firmware
//! author implements. The emulator runs this very server over simulated layers, so every test
//! that talks to the emulator exercises the code a firmware runs.
//!
//! The server owns the protocol state: sequence numbers and the cached reply of the last
//! state-changing request (a retransmission is answered, not executed twice), input batch
//! assembly, the result buffer that bulk replies are read from, bounds checks and errors. A
//! layer only programs parameters, caches an input batch and runs forward passes; seeded
//! perturbation and update have default implementations in terms of those, which a device (or
//! the simulator's exact fast path) may replace.
//!
//! A frame that fails its CRC is answered with a NAK (`Error(Corrupt)` under the sequence number
//! the damaged frame carried), so that on a noisy line the host retransmits at once instead of
//! after its timeout; frames that are not even valid COBS are dropped silently.
//!
//! No allocation is needed: buffers are handed in as slices ([`Buffer`] for `&mut [f32]`), or as
//! `Vec`s that grow on demand with the `alloc` feature.

use core::ops::Range;

use crate::direction::{
    DirectionSeed, MAX_UPDATE_TERMS, UpdateTerm, apply_update_streaming, fill_direction,
};
use crate::frame::{self, CRC, CRC_LEN, FrameDecoder, FrameError, HEADER_LEN, MAX_PAYLOAD};
use crate::message::{
    Capabilities, ChunkRange, DeviceError, DeviceInfo, Encoded, ForwardMode, LayerDescriptor,
    MAX_LAYERS, PROTOCOL_VERSION, Packed, PixelNormaliser, REQUEST_KINDS, Request, Response,
};

/// What a physical layer must do. Parameters use the flat layout of its [`LayerDescriptor`].
pub trait PhysicalLayer {
    fn descriptor(&self) -> LayerDescriptor;

    /// Programs parameters `offset..offset + values.len()`.
    fn write_parameters(&mut self, offset: usize, values: &[f32]) -> Result<(), DeviceError>;

    /// Reads parameters `offset..offset + out.len()`. Needed by the default perturbation and
    /// update, and for [`Request::ReadParameters`].
    fn read_parameters(&mut self, _offset: usize, _out: &mut [f32]) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported)
    }

    /// Stores values `offset..offset + values.len()` of an input batch of `rows` rows. The server
    /// calls it in order, starting at offset 0 for each batch, and only within the batch.
    fn load_input(&mut self, rows: usize, offset: usize, values: &[f32])
    -> Result<(), DeviceError>;

    /// A clean forward pass on the cached batch: `out` is rows x feature width, followed, for a
    /// layer whose next-layer input differs from its features (a CNN block), by rows x output
    /// width ([`LayerDescriptor::forward_width`] values per row in all). In
    /// [`ForwardMode::Train`] a CNN block normalises with the batch's statistics and commits them
    /// to its running statistics; in [`ForwardMode::Eval`] it normalises with the running ones.
    fn forward(&mut self, mode: ForwardMode, out: &mut [f32]) -> Result<(), DeviceError>;

    /// The features (rows x feature width) of a training-mode pass under the parameters as
    /// currently written, for the default [`PhysicalLayer::evaluate_perturbed`]. It must leave
    /// no trace: a CNN block normalises with the batch's statistics but leaves its running
    /// statistics untouched (thesis section 4.4). The default is `forward(Train, out)`, right for
    /// a layer without such state whose result is its features alone (dense); a layer with a
    /// separate next-layer input must override it (the default refuses with `Unsupported`).
    fn forward_features(&mut self, out: &mut [f32]) -> Result<(), DeviceError> {
        if self.descriptor().has_separate_output() {
            return Err(DeviceError::Unsupported);
        }
        self.forward(ForwardMode::Train, out)
    }

    /// Algorithm 1, lines 6-9, for each seed: `out` receives the features under `W + eps v` then
    /// under `W - eps v` (rows x feature width each), `v` the normalised direction the seed names
    /// over `chunk`. Must leave the parameters bit-identical. `scratch` holds `2 * chunk.len()`
    /// values.
    ///
    /// The default is the literal choreography: save the chunk, write `w + eps v`, evaluate
    /// ([`PhysicalLayer::forward_features`]), write `w - eps v`, evaluate, write the saved values
    /// back.
    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<(), DeviceError> {
        let n = chunk.len();
        let (saved, v) = scratch[..2 * n].split_at_mut(n);
        self.read_parameters(chunk.start, saved)?;
        let block = out.len() / (2 * seeds.len().max(1));
        let mut result = Ok(());
        for (seed, pair) in seeds.iter().zip(out.chunks_exact_mut(2 * block)) {
            fill_direction(*seed, v);
            let (plus, minus) = pair.split_at_mut(block);
            for (sign, target) in [(1.0f32, plus), (-1.0, minus)] {
                // w + sign * eps * v, written over v (v is regenerated for the next seed).
                let perturbed = v.iter_mut().zip(saved.iter());
                perturbed.for_each(|(vi, w)| *vi = w + sign * eps * *vi);
                result = self
                    .write_parameters(chunk.start, v)
                    .and_then(|_| self.forward_features(target));
                fill_direction(*seed, v);
                if result.is_err() {
                    break;
                }
            }
            if result.is_err() {
                break;
            }
        }
        // Restore whatever happened.
        self.write_parameters(chunk.start, saved)?;
        result
    }

    /// Algorithm 1, lines 10 and 12: `W[chunk] -= scale * sum_p dd_p v_p` with the arithmetic of
    /// [`crate::direction::apply_update`]. `scratch` holds `chunk.len()` values. The default
    /// reads the chunk, updates it with [`apply_update_streaming`] and writes it back.
    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
        scratch: &mut [f32],
    ) -> Result<(), DeviceError> {
        let w = &mut scratch[..chunk.len()];
        self.read_parameters(chunk.start, w)?;
        apply_update_streaming(w, scale, terms);
        self.write_parameters(chunk.start, w)
    }

    /// Scratch values the server must provide for a perturbed evaluation over `chunk_len`
    /// parameters (an implementation that overrides the defaults may need none).
    fn perturbation_scratch(&self, chunk_len: usize) -> usize {
        2 * chunk_len
    }

    /// Scratch values for an update over `chunk_len` parameters.
    fn update_scratch(&self, chunk_len: usize) -> usize {
        chunk_len
    }

    /// Reads the layer's state outside its parameters (`descriptor().kind.state_len()` values:
    /// a CNN block's BatchNorm running means, then variances) into `out`. The default, for a
    /// layer that keeps none, refuses any non-empty read.
    fn read_layer_state(&mut self, out: &mut [f32]) -> Result<(), DeviceError> {
        match out.is_empty() {
            true => Ok(()),
            false => Err(DeviceError::Unsupported),
        }
    }

    /// Writes values `offset..offset + values.len()` of that state.
    fn write_layer_state(&mut self, _offset: usize, _values: &[f32]) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported)
    }

    /// Back to the power-on state (drop the cached input).
    fn reset(&mut self) {}
}

/// Memory for results and scratch: a fixed slice, or (with `alloc`) a `Vec` that grows.
pub trait Buffer {
    /// The first `len` values, if the buffer can hold them (contents kept).
    fn get(&mut self, len: usize) -> Option<&mut [f32]>;
    fn view(&self) -> &[f32];

    /// [`Buffer::get`], or the device's out-of-memory error saying how much was needed.
    fn claim(&mut self, len: usize) -> Result<&mut [f32], DeviceError> {
        let available = self.view().len() as u32;
        self.get(len).ok_or(DeviceError::OutOfMemory {
            needed: len as u32,
            available,
        })
    }
}

impl Buffer for &mut [f32] {
    fn get(&mut self, len: usize) -> Option<&mut [f32]> {
        self.get_mut(..len)
    }
    fn view(&self) -> &[f32] {
        self
    }
}

#[cfg(feature = "alloc")]
impl Buffer for alloc::vec::Vec<f32> {
    fn get(&mut self, len: usize) -> Option<&mut [f32]> {
        if self.len() < len {
            self.resize(len, 0.0);
        }
        Some(&mut self[..len])
    }
    fn view(&self) -> &[f32] {
        self
    }
}

/// What the device reports about itself, beyond its layers.
#[derive(Clone, Debug)]
pub struct DeviceConfig<'n> {
    pub name: &'n str,
    /// Pick a fresh one at every power-up (a random number or a persistent counter).
    pub boot_id: u32,
    pub max_request: u32,
    pub max_batch: u32,
    pub max_directions: u16,
    pub capabilities: Capabilities,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct InputState {
    rows: usize,
    filled: usize,
    total: usize,
}

#[derive(Clone, Copy, Debug)]
struct Cached {
    seq: u16,
    crc: u32,
    reply: Result<Outcome, DeviceError>,
    /// The result buffer's generation the reply refers to.
    result_generation: u32,
}

/// Counters a device may log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub requests: u64,
    /// Frames dropped for a bad CRC, bad COBS, shortness or length.
    pub bad_frames: u64,
    /// Retransmitted state-changing requests answered from the cache.
    pub retransmissions: u64,
    /// Negative acknowledgements sent for frames that failed their CRC.
    pub naks: u64,
}

/// The device-side dispatcher (see the module docs).
pub struct Server<'n, L, Ls, B> {
    layers: Ls,
    result: B,
    scratch: B,
    config: DeviceConfig<'n>,
    inputs: [InputState; MAX_LAYERS],
    /// Values in the result buffer, and their encoding.
    result_len: usize,
    result_encoding: crate::message::ActivationEncoding,
    /// Counts the results computed into the result buffer, so that a cached result can tell
    /// whether the buffer still holds it.
    result_generation: u32,
    last: Option<Cached>,
    stats: ServerStats,
    _layer: core::marker::PhantomData<L>,
}

/// Receive and transmit buffers of a server: the frame decoder's, the payload scratch and the
/// encoded reply. `MAX_ENCODED`, `MAX_PAYLOAD` and `MAX_ENCODED + 1` bytes take any frame; a
/// device with less RAM gives less and declares it in `max_request`.
pub struct ServerIo<B> {
    pub decoder: FrameDecoder<B>,
    pub payload: B,
    pub out: B,
}

impl<'n, L, Ls, B> Server<'n, L, Ls, B>
where
    L: PhysicalLayer,
    Ls: AsMut<[L]> + AsRef<[L]>,
    B: Buffer,
{
    /// A server over `layers` (at most [`MAX_LAYERS`]), with buffers for results and scratch.
    pub fn new(layers: Ls, config: DeviceConfig<'n>, result: B, scratch: B) -> Self {
        assert!(
            layers.as_ref().len() <= MAX_LAYERS,
            "at most {MAX_LAYERS} layers"
        );
        Self {
            layers,
            result,
            scratch,
            config,
            inputs: [InputState::default(); MAX_LAYERS],
            result_len: 0,
            result_encoding: crate::message::ActivationEncoding::F32,
            result_generation: 0,
            last: None,
            stats: ServerStats::default(),
            _layer: core::marker::PhantomData,
        }
    }

    pub fn layers(&self) -> &[L] {
        self.layers.as_ref()
    }

    pub fn layers_mut(&mut self) -> &mut [L] {
        self.layers.as_mut()
    }

    pub fn boot_id(&self) -> u32 {
        self.config.boot_id
    }

    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// Declares a smaller largest request than the configuration's (a device with small receive
    /// buffers, or a noisy line, where short frames get through more often). Replies are bounded
    /// by the payload buffer handed to [`Server::serve`].
    pub fn set_max_request(&mut self, bytes: u32) {
        self.config.max_request = bytes;
    }

    /// Feeds received bytes; every reply is passed to `write` as one complete frame.
    pub fn serve<E, IoB>(
        &mut self,
        io: &mut ServerIo<IoB>,
        mut input: &[u8],
        mut write: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E>
    where
        IoB: AsRef<[u8]> + AsMut<[u8]>,
    {
        while !input.is_empty() {
            let (n, frame) = io.decoder.feed(input);
            input = &input[n..];
            match frame {
                None => {}
                Some(Err(e)) => {
                    self.stats.bad_frames += 1;
                    // A NAK under the damaged frame's sequence number: the host retransmits at
                    // once rather than after its timeout (it ignores a NAK whose number was hit).
                    let nak = io.decoder.damaged_seq().filter(|_| e == FrameError::Crc);
                    if let Some(seq) = nak {
                        let reply = Response::Error(DeviceError::Corrupt);
                        if let Ok(len) =
                            frame::encode(seq, &reply, io.payload.as_mut(), io.out.as_mut())
                        {
                            self.stats.naks += 1;
                            write(&io.out.as_ref()[..len])?;
                        }
                    }
                }
                Some(Ok(frame)) => {
                    let len =
                        self.respond(frame.seq, frame.body, io.payload.as_mut(), io.out.as_mut());
                    if let Ok(len) = len {
                        write(&io.out.as_ref()[..len])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Handles one request body received under `seq` and encodes the reply frame into `out`
    /// (`payload` is scratch). Returns the reply's length on the wire.
    pub fn respond(
        &mut self,
        seq: u16,
        body: &[u8],
        payload: &mut [u8],
        out: &mut [u8],
    ) -> Result<usize, FrameError> {
        self.stats.requests += 1;
        let request: Request<'_> = match postcard::from_bytes(body) {
            Ok(r) => r,
            Err(_) => {
                // A tag beyond the known requests is a request from a newer host.
                let unknown = matches!(postcard::take_from_bytes::<u32>(body), Ok((tag, _)) if tag >= REQUEST_KINDS);
                let e = if unknown {
                    DeviceError::UnknownRequest
                } else {
                    DeviceError::BadFrame
                };
                return frame::encode(seq, &Response::Error(e), payload, out);
            }
        };
        let crc = CRC.checksum(body);
        let cached = self.last.filter(|c| c.seq == seq && c.crc == crc);
        let max_values = |size: usize| {
            (payload.len().min(MAX_PAYLOAD) - HEADER_LEN - CRC_LEN).saturating_sub(16) / size
        };
        let block_cap = max_values(1);
        let outcome = match cached.filter(|_| request.mutates()) {
            // A retransmission: the cached outcome, not a second execution. A result (of a
            // training-mode forward pass) is answered from the result buffer, which only a
            // later request can have changed, and that request would have replaced the cache.
            Some(c) => {
                self.stats.retransmissions += 1;
                match c.reply {
                    // A host retransmits before anything else, so this is a stale duplicate
                    // from before a request that overwrote the buffer: say so, do not recompute.
                    Ok(Outcome::Result { .. }) if c.result_generation != self.result_generation => {
                        Err(DeviceError::NoResult)
                    }
                    reply => reply,
                }
            }
            None => {
                let outcome = self.execute(&request);
                let computed = !matches!(request, Request::ReadResult { .. });
                if computed && matches!(outcome, Ok(Outcome::Result { .. })) {
                    self.result_generation = self.result_generation.wrapping_add(1);
                }
                if request.mutates() {
                    self.last = Some(Cached {
                        seq,
                        crc,
                        reply: outcome,
                        result_generation: self.result_generation,
                    });
                }
                outcome
            }
        };
        let reply = match outcome {
            Err(e) => Response::Error(e),
            Ok(Outcome::Ack) => Response::Ack,
            Ok(Outcome::Hello) => Response::Hello(DeviceInfo {
                protocol_version: PROTOCOL_VERSION,
                name: self.config.name,
                boot_id: self.config.boot_id,
                layers: self.layers.as_ref().len() as u8,
                max_request: self.config.max_request,
                max_batch: self.config.max_batch,
                max_directions: self.config.max_directions,
                capabilities: self.config.capabilities,
            }),
            Ok(Outcome::Layer(d)) => Response::Layer(d),
            Ok(Outcome::Result { offset_values }) => {
                let size = self.result_encoding.size();
                let count = (block_cap / size).min(self.result_len - offset_values);
                let values = &self.result.view()[offset_values..offset_values + count];
                Response::Result {
                    total: (self.result_len * size) as u32,
                    offset: (offset_values * size) as u32,
                    data: Encoded::Values {
                        values,
                        encoding: self.result_encoding,
                    },
                }
            }
        };
        frame::encode(seq, &reply, payload, out)
    }

    fn check_chunk(d: &LayerDescriptor, chunk: ChunkRange) -> Result<Range<usize>, DeviceError> {
        if chunk.is_empty() || chunk.end > d.param_count {
            return Err(DeviceError::ChunkOutOfRange {
                start: chunk.start,
                end: chunk.end,
                count: d.param_count,
            });
        }
        Ok(chunk.start as usize..chunk.end as usize)
    }

    /// Checks a part `offset..offset + len` of an input batch of `rows` rows for `layer`
    /// ([`Request::LoadInput`], [`Request::LoadPixels`]): a part at offset 0 starts a new batch,
    /// any other must continue the current one. The caller loads it, then records it filled.
    fn begin_input_part(
        &mut self,
        layer: u8,
        rows: usize,
        offset: usize,
        len: usize,
    ) -> Result<(), DeviceError> {
        let (_, d) = layer_of(&mut self.layers, layer)?;
        if rows == 0 || rows > self.config.max_batch as usize {
            return Err(DeviceError::ShapeMismatch {
                expected: self.config.max_batch,
                got: rows as u32,
            });
        }
        let total = rows * d.input_width() as usize;
        let state = &mut self.inputs[layer as usize];
        if offset == 0 {
            *state = InputState {
                rows,
                filled: 0,
                total,
            };
        } else if state.rows != rows || state.filled != offset {
            return Err(DeviceError::OutOfOrder {
                expected: state.filled as u32,
                got: offset as u32,
            });
        }
        if offset + len > total {
            return Err(DeviceError::ShapeMismatch {
                expected: total as u32,
                got: (offset + len) as u32,
            });
        }
        Ok(())
    }

    fn input_rows(&self, layer: u8) -> Result<usize, DeviceError> {
        if layer as usize >= self.layers.as_ref().len() {
            return Err(DeviceError::NoSuchLayer { layer });
        }
        let s = self.inputs[layer as usize];
        if s.rows == 0 || s.filled != s.total {
            return Err(DeviceError::NoInput);
        }
        Ok(s.rows)
    }

    fn seeds_in<'s>(
        &self,
        packed: &Packed<'_, DirectionSeed>,
        buf: &'s mut [DirectionSeed; MAX_UPDATE_TERMS],
    ) -> Result<&'s [DirectionSeed], DeviceError> {
        let max = (self.config.max_directions as usize).min(MAX_UPDATE_TERMS);
        if packed.is_empty() || packed.len() > max {
            return Err(DeviceError::TooManyDirections {
                max: max as u16,
                got: packed.len().min(u16::MAX as usize) as u16,
            });
        }
        packed.copy_to(buf);
        Ok(&buf[..packed.len()])
    }

    fn execute(&mut self, request: &Request<'_>) -> Result<Outcome, DeviceError> {
        match request {
            Request::Hello { .. } => Ok(Outcome::Hello),
            Request::DescribeLayer { layer } => {
                Ok(Outcome::Layer(layer_of(&mut self.layers, *layer)?.1))
            }
            Request::Reset => {
                self.layers.as_mut().iter_mut().for_each(|l| l.reset());
                self.inputs = [InputState::default(); MAX_LAYERS];
                self.result_len = 0;
                self.config.boot_id = self.config.boot_id.wrapping_add(1);
                Ok(Outcome::Ack)
            }
            Request::SetParameters {
                layer,
                offset,
                values,
            } => {
                if !self.config.capabilities.raw_parameter_writes {
                    return Err(DeviceError::Unsupported);
                }
                let (l, d) = layer_of(&mut self.layers, *layer)?;
                let end = *offset as usize + values.len();
                if end > d.param_count as usize {
                    return Err(DeviceError::ShapeMismatch {
                        expected: d.param_count,
                        got: end as u32,
                    });
                }
                in_pieces(values, |at, piece| {
                    l.write_parameters(*offset as usize + at, piece)
                })?;
                Ok(Outcome::Ack)
            }
            Request::LoadInput {
                layer,
                rows,
                offset,
                values,
            } => {
                let (offset, rows) = (*offset as usize, *rows as usize);
                self.begin_input_part(*layer, rows, offset, values.len())?;
                let (l, _) = layer_of(&mut self.layers, *layer)?;
                in_pieces(values, |at, piece| l.load_input(rows, offset + at, piece))?;
                self.inputs[*layer as usize].filled = offset + values.len();
                Ok(Outcome::Ack)
            }
            Request::LoadPixels {
                layer,
                rows,
                offset,
                normaliser: n,
                pixels,
            } => {
                let (offset, rows) = (*offset as usize, *rows as usize);
                let (_, d) = layer_of(&mut self.layers, *layer)?;
                let width = d.input_width() as usize;
                let channels = n.channels as usize;
                if !(1..=PixelNormaliser::MAX_CHANNELS).contains(&channels)
                    || n.plane as usize * channels != width
                {
                    return Err(DeviceError::ShapeMismatch {
                        expected: width as u32,
                        got: n.plane.saturating_mul(n.channels as u32),
                    });
                }
                self.begin_input_part(*layer, rows, offset, pixels.len())?;
                let (l, _) = layer_of(&mut self.layers, *layer)?;
                const PIECE: usize = 256;
                let mut buf = [0f32; PIECE];
                for (k, part) in pixels.chunks(PIECE).enumerate() {
                    let at = offset + k * PIECE;
                    for (i, (b, &p)) in buf.iter_mut().zip(part).enumerate() {
                        let c = (at + i) % width / n.plane as usize;
                        *b = n.value(p, c);
                    }
                    l.load_input(rows, at, &buf[..part.len()])?;
                }
                self.inputs[*layer as usize].filled = offset + pixels.len();
                Ok(Outcome::Ack)
            }
            Request::Forward { layer, mode } => {
                let rows = self.input_rows(*layer)?;
                let (l, d) = layer_of(&mut self.layers, *layer)?;
                let len = rows * d.forward_width() as usize;
                let out = self.result.claim(len);
                self.result_len = 0;
                l.forward(*mode, out?)?;
                self.result_len = len;
                self.result_encoding = d.encoding;
                Ok(Outcome::Result { offset_values: 0 })
            }
            Request::EvaluatePerturbed {
                layer,
                chunk,
                eps,
                seeds,
            } => {
                let mut buf = [DirectionSeed(0); MAX_UPDATE_TERMS];
                let seeds = self.seeds_in(seeds, &mut buf)?;
                let rows = self.input_rows(*layer)?;
                let (l, d) = layer_of(&mut self.layers, *layer)?;
                let chunk = Self::check_chunk(&d, *chunk)?;
                let len = 2 * seeds.len() * rows * d.feature_width as usize;
                let scratch_len = l.perturbation_scratch(chunk.len());
                self.result_len = 0;
                let out = self.result.claim(len)?;
                let scratch = self.scratch.claim(scratch_len)?;
                l.evaluate_perturbed(chunk, seeds, *eps, out, scratch)?;
                self.result_len = len;
                self.result_encoding = d.encoding;
                Ok(Outcome::Result { offset_values: 0 })
            }
            Request::ApplyUpdate {
                layer,
                chunk,
                scale,
                terms,
            } => {
                let max = (self.config.max_directions as usize).min(MAX_UPDATE_TERMS);
                if terms.len() > max {
                    return Err(DeviceError::TooManyDirections {
                        max: max as u16,
                        got: terms.len().min(u16::MAX as usize) as u16,
                    });
                }
                let mut buf = [UpdateTerm {
                    seed: DirectionSeed(0),
                    derivative: 0.0,
                }; MAX_UPDATE_TERMS];
                terms.copy_to(&mut buf);
                let (l, d) = layer_of(&mut self.layers, *layer)?;
                let chunk = Self::check_chunk(&d, *chunk)?;
                let scratch_len = l.update_scratch(chunk.len());
                let scratch = self.scratch.claim(scratch_len)?;
                l.apply_update(chunk, *scale, &buf[..terms.len()], scratch)?;
                Ok(Outcome::Ack)
            }
            Request::ReadParameters { layer } => {
                if !self.config.capabilities.parameter_read_back {
                    return Err(DeviceError::Unsupported);
                }
                let (l, d) = layer_of(&mut self.layers, *layer)?;
                let len = d.param_count as usize;
                self.result_len = 0;
                let out = self.result.claim(len)?;
                l.read_parameters(0, out)?;
                self.result_len = len;
                self.result_encoding = crate::message::ActivationEncoding::F32;
                Ok(Outcome::Result { offset_values: 0 })
            }
            Request::ReadLayerState { layer } => {
                let (l, d) = layer_of(&mut self.layers, *layer)?;
                let len = d.kind.state_len();
                if len == 0 {
                    return Err(DeviceError::Unsupported);
                }
                self.result_len = 0;
                let out = self.result.claim(len)?;
                l.read_layer_state(out)?;
                self.result_len = len;
                self.result_encoding = crate::message::ActivationEncoding::F32;
                Ok(Outcome::Result { offset_values: 0 })
            }
            Request::WriteLayerState {
                layer,
                offset,
                values,
            } => {
                let (l, d) = layer_of(&mut self.layers, *layer)?;
                let (offset, count) = (*offset as usize, d.kind.state_len());
                if offset.saturating_add(values.len()) > count {
                    return Err(DeviceError::ShapeMismatch {
                        expected: count as u32,
                        got: offset.saturating_add(values.len()) as u32,
                    });
                }
                in_pieces(values, |at, piece| l.write_layer_state(offset + at, piece))?;
                Ok(Outcome::Ack)
            }
            Request::ReadResult { offset } => {
                let size = self.result_encoding.size();
                let offset = *offset as usize;
                if !offset.is_multiple_of(size) || offset / size >= self.result_len {
                    return Err(DeviceError::NoResult);
                }
                Ok(Outcome::Result {
                    offset_values: offset / size,
                })
            }
        }
    }
}

fn layer_of<L: PhysicalLayer>(
    layers: &mut impl AsMut<[L]>,
    layer: u8,
) -> Result<(&mut L, LayerDescriptor), DeviceError> {
    let l = layers
        .as_mut()
        .get_mut(layer as usize)
        .ok_or(DeviceError::NoSuchLayer { layer })?;
    let d = l.descriptor();
    Ok((l, d))
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ack,
    Hello,
    Layer(LayerDescriptor),
    Result { offset_values: usize },
}

/// Calls `f(offset, values)` over `packed` in pieces decoded into a small stack buffer.
fn in_pieces(
    packed: &Packed<'_, f32>,
    mut f: impl FnMut(usize, &[f32]) -> Result<(), DeviceError>,
) -> Result<(), DeviceError> {
    const PIECE: usize = 256;
    let mut buf = [0f32; PIECE];
    let n = packed.len();
    let mut at = 0;
    while at < n {
        let k = PIECE.min(n - at);
        for (i, b) in buf[..k].iter_mut().enumerate() {
            *b = packed.get(at + i);
        }
        f(at, &buf[..k])?;
        at += k;
    }
    Ok(())
}
