//! A simulated layer behind the device protocol: [`Device`] implements
//! `firmware_protocol::server::PhysicalLayer` for any [`SimulatedLayer`], so
//! `firmware_protocol::server::Server` serves the simulator as firmware would serve hardware
//! (the emulator, `pnn-emulate`).
//!
//! The perturbed evaluation and the update are overridden with the layer's own (its exact fast
//! path and cached-direction update), so a run through the emulator computes the very numbers
//! `--backend sim` computes, bit for bit. A dense layer may carry a profile's hardware effects
//! ([`DeviceDense::with_noise`], keyed as `--backend sim:<profile>` keys them).

use std::ops::Range;

use firmware_protocol::message::{ActivationEncoding, DeviceError, LayerDescriptor};
use firmware_protocol::server::PhysicalLayer;
use firmware_protocol::shape::{ForwardMode, LayerShape};
use firmware_protocol::{DirectionSeed, UpdateTerm};

use crate::SimError;
use crate::conv::{ConvBlock, ConvGeometry};
use crate::dense::DenseLayer;
use crate::layer::SimulatedLayer;
use crate::noise::NoiseModel;

/// A simulated layer served by the protocol server. Parameter and input parts are staged here
/// and handed to the layer whole (the layer takes whole vectors); perturbed evaluations and
/// updates are the layer's own.
#[derive(Debug)]
pub struct Device<L: SimulatedLayer + ?Sized> {
    encoding: ActivationEncoding,
    /// Parameters as programmed; `dirty` until handed to the layer.
    params: Vec<f32>,
    dirty: bool,
    input: Vec<f32>,
    pairs: Vec<(Vec<f32>, Vec<f32>)>,
    features: Vec<f32>,
    next: Vec<f32>,
    layer: Box<L>,
}

/// A [`DenseLayer`] behind the device protocol.
pub type DeviceDense = Device<DenseLayer>;

/// A [`ConvBlock`] behind the device protocol (thesis section 4.4, Table 4): the projection `A`
/// is drawn on the device from the shape's projection seed, so only the C*d features and the
/// pooled next-layer input cross the link.
pub type DeviceConv = Device<ConvBlock>;

/// Any simulated layer behind the device protocol: what a server over layers of several kinds
/// (the emulator) holds. Made by [`Device::erased`].
pub type DeviceLayer = Device<dyn SimulatedLayer>;

impl<L: SimulatedLayer + 'static> Device<L> {
    fn wrap(layer: L, encoding: ActivationEncoding) -> Self {
        Self {
            encoding,
            params: layer.params().to_vec(),
            dirty: false,
            input: Vec::new(),
            pairs: Vec::new(),
            features: Vec::new(),
            next: Vec::new(),
            layer: Box::new(layer),
        }
    }

    /// The same device, its layer's kind erased, to serve next to layers of other kinds.
    pub fn erased(self) -> DeviceLayer {
        Device {
            encoding: self.encoding,
            params: self.params,
            dirty: self.dirty,
            input: self.input,
            pairs: self.pairs,
            features: self.features,
            next: self.next,
            layer: self.layer,
        }
    }
}

impl DeviceDense {
    pub fn new(n_in: usize, n_out: usize, encoding: ActivationEncoding) -> Self {
        Self::with_noise(n_in, n_out, encoding, &NoiseModel::default(), 0)
    }

    /// A layer with the hardware effects of `noise`, its faults and streams keyed by `seed`
    /// (`crate::noise::layer_seed(profile seed, layer index)`, as the in-process simulator keys
    /// the same layer of a model), via [`DenseLayer::with_noise`].
    pub fn with_noise(
        n_in: usize,
        n_out: usize,
        encoding: ActivationEncoding,
        noise: &NoiseModel,
        seed: u64,
    ) -> Self {
        Self::wrap(DenseLayer::with_noise(n_in, n_out, noise, seed), encoding)
    }
}

impl DeviceConv {
    /// A block of `shape` with zero parameters and fresh running statistics; refuses a shape
    /// [`ConvGeometry::check`] refuses, or one whose sizes do not fit the protocol's u32 fields.
    pub fn new(shape: ConvGeometry, encoding: ActivationEncoding) -> Result<Self, String> {
        shape.check().map_err(|e| e.to_string())?;
        if !LayerDescriptor::fits(&LayerShape::Conv(shape)) {
            return Err(format!(
                "a conv block of {} parameters, {} input and {} result values per sample is too \
                 large for the protocol's u32 sizes",
                shape.param_count(),
                shape.input_width(),
                shape.feature_width().saturating_add(shape.output_width())
            ));
        }
        Ok(Self::wrap(ConvBlock::new(shape), encoding))
    }
}

impl<L: SimulatedLayer + ?Sized> Device<L> {
    /// The simulated layer.
    pub fn layer(&self) -> &L {
        &self.layer
    }

    /// The simulated layer, with every programmed parameter handed to it.
    pub fn layer_mut(&mut self) -> &mut L {
        self.flush();
        &mut self.layer
    }

    fn flush(&mut self) {
        if self.dirty {
            self.layer
                .set_params(&self.params)
                .expect("staged parameters have the layer's length");
            self.dirty = false;
        }
    }

    /// Copies the features, then the next-layer input, into `out`, which must hold exactly
    /// both.
    fn copy_result(&self, with_next: bool, out: &mut [f32]) -> Result<(), DeviceError> {
        let f = self.features.len();
        let n = if with_next { self.next.len() } else { 0 };
        if f + n != out.len() {
            return Err(DeviceError::ShapeMismatch {
                expected: out.len() as u32,
                got: (f + n) as u32,
            });
        }
        out[..f].copy_from_slice(&self.features);
        out[f..].copy_from_slice(&self.next[..n]);
        Ok(())
    }
}

impl<L: SimulatedLayer + ?Sized> PhysicalLayer for Device<L> {
    fn descriptor(&self) -> LayerDescriptor {
        LayerDescriptor::new(self.layer.shape(), self.encoding)
    }

    fn write_parameters(&mut self, offset: usize, values: &[f32]) -> Result<(), DeviceError> {
        let end = offset + values.len();
        let count = self.params.len();
        let target = self
            .params
            .get_mut(offset..end)
            .ok_or(DeviceError::ShapeMismatch {
                expected: count as u32,
                got: end as u32,
            })?;
        target.copy_from_slice(values);
        self.dirty = true;
        Ok(())
    }

    fn read_parameters(&mut self, offset: usize, out: &mut [f32]) -> Result<(), DeviceError> {
        self.flush();
        let end = offset + out.len();
        let p = self.layer.params();
        let src = p.get(offset..end).ok_or(DeviceError::ShapeMismatch {
            expected: p.len() as u32,
            got: end as u32,
        })?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn load_input(
        &mut self,
        rows: usize,
        offset: usize,
        values: &[f32],
    ) -> Result<(), DeviceError> {
        // Parameters written before this batch are written before it (a device's clock ticks
        // at each batch: a write after the tick would drift differently).
        self.flush();
        let total = rows * self.layer.shape().input_width();
        if offset == 0 {
            self.input.clear();
        }
        self.input.extend_from_slice(values);
        if self.input.len() == total {
            self.layer.load_input(&self.input).map_err(device_err)?;
        }
        Ok(())
    }

    /// `out`: the features (rows x feature width), then, for a CNN block, the pooled
    /// next-layer input (rows x C*H/2*W/2).
    fn forward(&mut self, mode: ForwardMode, out: &mut [f32]) -> Result<(), DeviceError> {
        self.flush();
        self.layer
            .forward(mode, &mut self.features, &mut self.next)
            .map_err(device_err)?;
        self.copy_result(true, out)
    }

    /// A training-mode pass that leaves no trace: the layer state it commits (a CNN block's
    /// running statistics) is put back (section 4.4's snapshot and restore).
    fn forward_features(&mut self, out: &mut [f32]) -> Result<(), DeviceError> {
        self.flush();
        let saved = self.layer.layer_state();
        let result = self
            .layer
            .forward(ForwardMode::Train, &mut self.features, &mut self.next);
        self.layer
            .set_layer_state(&saved)
            .expect("the layer's own state fits it");
        result.map_err(device_err)?;
        self.copy_result(false, out)
    }

    /// `(a+, a-)` per direction, laid out as the protocol sends them.
    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [f32],
        _scratch: &mut [f32],
    ) -> Result<(), DeviceError> {
        self.flush();
        self.layer
            .evaluate_perturbed(chunk, seeds, eps, &mut self.pairs)
            .map_err(device_err)?;
        write_pairs(&self.pairs, out);
        Ok(())
    }

    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
        _scratch: &mut [f32],
    ) -> Result<(), DeviceError> {
        self.flush();
        self.layer
            .apply_update(chunk, scale, terms)
            .map_err(device_err)
    }

    fn perturbation_scratch(&self, _chunk_len: usize) -> usize {
        0
    }

    fn update_scratch(&self, _chunk_len: usize) -> usize {
        0
    }

    /// A conv block's BatchNorm running statistics (means, then variances).
    fn read_layer_state(&mut self, out: &mut [f32]) -> Result<(), DeviceError> {
        self.flush();
        let state = self.layer.layer_state();
        if state.len() != out.len() {
            return Err(DeviceError::ShapeMismatch {
                expected: state.len() as u32,
                got: out.len() as u32,
            });
        }
        out.copy_from_slice(&state);
        Ok(())
    }

    fn write_layer_state(&mut self, offset: usize, values: &[f32]) -> Result<(), DeviceError> {
        self.flush();
        let mut state = self.layer.layer_state();
        let end = offset.saturating_add(values.len());
        let count = state.len();
        let target = state
            .get_mut(offset..end)
            .ok_or(DeviceError::ShapeMismatch {
                expected: count as u32,
                got: end as u32,
            })?;
        target.copy_from_slice(values);
        self.layer.set_layer_state(&state).map_err(device_err)
    }

    /// Power-on: the layer's (zero parameters, fresh device and layer state), no input; the
    /// choreography stays.
    fn reset(&mut self) {
        self.layer.power_on();
        self.params.clear();
        self.params.extend_from_slice(self.layer.params());
        self.dirty = false;
        self.input.clear();
    }
}

/// Lays `(a+, a-)` per direction out as the protocol sends them: `a+` then `a-`, direction by
/// direction.
fn write_pairs(pairs: &[(Vec<f32>, Vec<f32>)], out: &mut [f32]) {
    let block = out.len() / (2 * pairs.len().max(1));
    for ((plus, minus), dst) in pairs.iter().zip(out.chunks_exact_mut(2 * block)) {
        let (p, m) = dst.split_at_mut(block);
        p.copy_from_slice(plus);
        m.copy_from_slice(minus);
    }
}

fn device_err(e: SimError) -> DeviceError {
    match e {
        SimError::ParameterCount { expected, got } => DeviceError::ShapeMismatch {
            expected: expected as u32,
            got: got as u32,
        },
        SimError::InputShape { width, got } => DeviceError::ShapeMismatch {
            expected: width as u32,
            got: got as u32,
        },
        SimError::NoInput => DeviceError::NoInput,
        SimError::BufferLength { expected, got, .. } => DeviceError::ShapeMismatch {
            expected: expected as u32,
            got: got as u32,
        },
        SimError::ChunkOutOfRange { start, end, count } => DeviceError::ChunkOutOfRange {
            start: start as u32,
            end: end as u32,
            count: count as u32,
        },
    }
}

/// The literal choreography of the protocol's default implementation, over a simulated device's
/// required methods (and its no-trace training pass): what a firmware that implements only those
/// runs. Used to hold the simulator's overrides to the defaults.
#[derive(Debug)]
pub struct Minimal<L>(pub L);

impl<L: PhysicalLayer> PhysicalLayer for Minimal<L> {
    fn descriptor(&self) -> LayerDescriptor {
        self.0.descriptor()
    }
    fn write_parameters(&mut self, offset: usize, values: &[f32]) -> Result<(), DeviceError> {
        self.0.write_parameters(offset, values)
    }
    fn read_parameters(&mut self, offset: usize, out: &mut [f32]) -> Result<(), DeviceError> {
        self.0.read_parameters(offset, out)
    }
    fn load_input(
        &mut self,
        rows: usize,
        offset: usize,
        values: &[f32],
    ) -> Result<(), DeviceError> {
        self.0.load_input(rows, offset, values)
    }
    fn forward(&mut self, mode: ForwardMode, out: &mut [f32]) -> Result<(), DeviceError> {
        self.0.forward(mode, out)
    }
    fn forward_features(&mut self, out: &mut [f32]) -> Result<(), DeviceError> {
        self.0.forward_features(out)
    }
    fn read_layer_state(&mut self, out: &mut [f32]) -> Result<(), DeviceError> {
        self.0.read_layer_state(out)
    }
    fn write_layer_state(&mut self, offset: usize, values: &[f32]) -> Result<(), DeviceError> {
        self.0.write_layer_state(offset, values)
    }
}

/// Test of the contract both simulated layers keep: an update that follows a perturbed
/// evaluation of the same chunk and seeds (the cached directions, the moved pre-activation)
/// changes the parameters exactly as `firmware_protocol::direction::apply_update` does, so a
/// host's shadow stays bit-identical. `layer` has parameters and an input; `chunk` is in range.
#[cfg(test)]
pub(crate) fn assert_cached_update_is_the_protocol_update<L: SimulatedLayer>(
    layer: &mut L,
    chunk: Range<usize>,
) {
    use firmware_protocol::direction::apply_update;
    let before = layer.params().to_vec();
    let mut shadow = before.clone();
    let terms = [
        UpdateTerm {
            seed: DirectionSeed(11),
            derivative: 0.5,
        },
        UpdateTerm {
            seed: DirectionSeed(12),
            derivative: -1.25,
        },
    ];
    let seeds = [DirectionSeed(11), DirectionSeed(12)];
    layer
        .evaluate_perturbed(chunk.clone(), &seeds, 1e-3, &mut Vec::new())
        .unwrap();
    layer.apply_update(chunk.clone(), 0.3, &terms).unwrap();
    let (mut v, mut g) = (vec![0.0; chunk.len()], vec![0.0; chunk.len()]);
    apply_update(&mut shadow[chunk.clone()], 0.3, &terms, &mut v, &mut g);
    let bits = |x: &[f32]| x.iter().map(|w| w.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&shadow), bits(layer.params()));
    assert_ne!(
        shadow[chunk.start], before[chunk.start],
        "the update changed nothing"
    );
}

/// The one protocol client of these tests: `firmware_protocol::link`'s typed [`Client`] over a
/// [`Loopback`] (the server in process, no thread), the very link a host runs, with the raw
/// calls these tests need on top.
///
/// [`Client`]: firmware_protocol::link::Client
/// [`Loopback`]: firmware_protocol::link::Loopback
#[cfg(test)]
mod test_client {
    use std::time::Duration;

    use firmware_protocol::frame::MAX_PAYLOAD;
    use firmware_protocol::link::{Client, Link, Loopback, RetryPolicy};
    use firmware_protocol::message::{Capabilities, Request, Response};
    use firmware_protocol::server::{DeviceConfig, PhysicalLayer, Server};

    pub(super) type TestServer<L> = Server<'static, L, Vec<L>, Vec<f32>>;

    pub(super) struct TestClient<L: PhysicalLayer + Send + 'static> {
        client: Client<Loopback<'static, L, Vec<L>, Vec<f32>>>,
    }

    impl<L: PhysicalLayer + Send + 'static> TestClient<L> {
        pub(super) fn new(layers: Vec<L>) -> Self {
            let config = DeviceConfig {
                name: "test",
                boot_id: 1,
                max_request: MAX_PAYLOAD as u32,
                max_batch: 64,
                max_directions: 8,
                capabilities: Capabilities {
                    seeded_perturbation: true,
                    raw_parameter_writes: true,
                    parameter_read_back: true,
                },
            };
            let server = Server::new(layers, config, Vec::new(), Vec::new());
            let policy = RetryPolicy {
                timeout: Duration::from_secs(10),
                retries: 0,
                baud: 921_600,
            };
            Self {
                client: Client::new(Link::new(Loopback::new(server), policy, 0)),
            }
        }

        pub(super) fn server(&self) -> &TestServer<L> {
            self.client.link().transport().server()
        }

        pub(super) fn server_mut(&mut self) -> &mut TestServer<L> {
            self.client.link_mut().transport_mut().server_mut()
        }

        /// The raw reply body to `req`.
        pub(super) fn send(&mut self, req: &Request<'_>) -> Vec<u8> {
            self.client.call(req).expect("a reply").to_vec()
        }

        /// `req` under sequence number `seq` (a retransmission reuses it).
        pub(super) fn send_seq(&mut self, seq: u16, req: &Request<'_>) -> Vec<u8> {
            self.client.link_mut().set_last_seq(seq.wrapping_sub(1));
            self.send(req)
        }

        pub(super) fn ack(&mut self, req: &Request<'_>) {
            self.client.ack(req).unwrap();
        }

        /// The whole result of a request, fetched block by block.
        pub(super) fn result(&mut self, req: &Request<'_>) -> Vec<f32> {
            let mut bytes = Vec::new();
            let mut body = self.send(req);
            loop {
                let Ok(Response::Result {
                    total,
                    offset,
                    data,
                }) = postcard::from_bytes(&body)
                else {
                    panic!(
                        "not a result: {:?}",
                        postcard::from_bytes::<Response>(&body)
                    );
                };
                assert_eq!(offset as usize, bytes.len());
                bytes.extend_from_slice(data.bytes().unwrap());
                if bytes.len() == total as usize {
                    break;
                }
                body = self.send(&Request::ReadResult {
                    offset: bytes.len() as u32,
                });
            }
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_client::TestClient as Client;
    use super::*;
    use firmware_protocol::frame::FrameDecoder;
    use firmware_protocol::message::{ChunkRange, Packed, Request, Response};

    fn program<L: PhysicalLayer + Send>(c: &mut Client<L>, n_in: usize, n_out: usize, rows: usize) {
        program_sizes(c, n_in * n_out + n_out, n_in, rows);
    }

    /// Programs `params` parameters and loads `rows` inputs of `n_in` values into layer 0.
    fn program_sizes<L: PhysicalLayer + Send>(
        c: &mut Client<L>,
        params: usize,
        n_in: usize,
        rows: usize,
    ) {
        let p: Vec<f32> = (0..params)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
            .collect();
        for (k, part) in p.chunks(1000).enumerate() {
            c.ack(&Request::SetParameters {
                layer: 0,
                offset: (k * 1000) as u32,
                values: Packed::Items(part),
            });
        }
        let x: Vec<f32> = (0..rows * n_in)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0)
            .collect();
        for (k, part) in x.chunks(3000).enumerate() {
            c.ack(&Request::LoadInput {
                layer: 0,
                rows: rows as u32,
                offset: (k * 3000) as u32,
                values: Packed::Items(part),
            });
        }
    }

    #[test]
    fn the_simulator_override_agrees_with_the_protocol_default_choreography() {
        let (n_in, n_out, rows) = (120, 30, 40);
        let mut fast = Client::new(vec![DeviceDense::new(n_in, n_out, ActivationEncoding::F32)]);
        let mut minimal = Client::new(vec![Minimal(DeviceDense::new(
            n_in,
            n_out,
            ActivationEncoding::F32,
        ))]);
        program(&mut fast, n_in, n_out, rows);
        program(&mut minimal, n_in, n_out, rows);
        let seeds = [DirectionSeed(5), DirectionSeed(6), DirectionSeed(7)];
        let terms: Vec<UpdateTerm> = seeds
            .iter()
            .map(|&seed| UpdateTerm {
                seed,
                derivative: 0.7,
            })
            .collect();
        for chunk in [
            ChunkRange {
                start: 0,
                end: 3630,
            },
            ChunkRange {
                start: 100,
                end: 333,
            },
        ] {
            let eval = Request::EvaluatePerturbed {
                layer: 0,
                chunk,
                eps: 1e-2,
                seeds: Packed::Items(&seeds),
            };
            let a = fast.result(&eval);
            let b = minimal.result(&eval);
            assert_eq!(a.len(), 2 * seeds.len() * rows * n_out);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 2e-6, "{x} vs {y}");
            }
            let update = Request::ApplyUpdate {
                layer: 0,
                chunk,
                scale: 0.05,
                terms: Packed::Items(&terms),
            };
            fast.ack(&update);
            minimal.ack(&update);
            let read = Request::ReadParameters { layer: 0 };
            // The update arithmetic is the protocol's in both: bit for bit.
            assert_eq!(fast.result(&read), minimal.result(&read));
        }
    }

    #[test]
    fn a_retransmitted_update_is_applied_once() {
        let mut c = Client::new(vec![DeviceDense::new(8, 4, ActivationEncoding::F32)]);
        program(&mut c, 8, 4, 3);
        let read = Request::ReadParameters { layer: 0 };
        let before = c.result(&read);
        let terms = [UpdateTerm {
            seed: DirectionSeed(9),
            derivative: 1.0,
        }];
        let update = Request::ApplyUpdate {
            layer: 0,
            chunk: ChunkRange { start: 0, end: 36 },
            scale: 0.1,
            terms: Packed::Items(&terms),
        };
        let first = c.send_seq(500, &update);
        let again = c.send_seq(500, &update);
        assert_eq!(first, again);
        let once = c.result(&read);
        assert_ne!(once, before);
        assert_eq!(c.server().stats().retransmissions, 1);
        // The same request under a new sequence number is a new update.
        c.send_seq(501, &update);
        assert_ne!(c.result(&read), once);
    }

    #[test]
    fn refusals_are_typed() {
        let mut c = Client::new(vec![DeviceDense::new(8, 4, ActivationEncoding::F32)]);
        let err = |c: &mut Client<DeviceDense>, r: &Request<'_>| {
            let body = c.send(r);
            match postcard::from_bytes::<Response>(&body).unwrap() {
                Response::Error(e) => e,
                other => panic!("{other:?}"),
            }
        };
        let seeds = [DirectionSeed(1)];
        let eval = Request::EvaluatePerturbed {
            layer: 0,
            chunk: ChunkRange { start: 0, end: 4 },
            eps: 1e-3,
            seeds: Packed::Items(&seeds),
        };
        assert_eq!(err(&mut c, &eval), DeviceError::NoInput);
        assert_eq!(
            err(
                &mut c,
                &Request::Forward {
                    layer: 3,
                    mode: ForwardMode::Eval
                }
            ),
            DeviceError::NoSuchLayer { layer: 3 }
        );
        let x = [0.5f32; 8];
        assert_eq!(
            err(
                &mut c,
                &Request::LoadInput {
                    layer: 0,
                    rows: 2,
                    offset: 8,
                    values: Packed::Items(&x)
                }
            ),
            DeviceError::OutOfOrder {
                expected: 0,
                got: 8
            }
        );
        c.ack(&Request::LoadInput {
            layer: 0,
            rows: 1,
            offset: 0,
            values: Packed::Items(&x),
        });
        let far = Request::EvaluatePerturbed {
            layer: 0,
            chunk: ChunkRange { start: 30, end: 37 },
            eps: 1e-3,
            seeds: Packed::Items(&seeds),
        };
        assert_eq!(
            err(&mut c, &far),
            DeviceError::ChunkOutOfRange {
                start: 30,
                end: 37,
                count: 36
            }
        );
        assert_eq!(
            err(&mut c, &Request::ReadResult { offset: 4 }),
            DeviceError::NoResult
        );
        // An unknown request tag (from a newer host) is named as such.
        let mut scratch = vec![0u8; 64];
        let mut out = vec![0u8; 80];
        let n = c
            .server_mut()
            .respond(3, &[42, 0], &mut scratch, &mut out)
            .unwrap();
        let mut dec = FrameDecoder::new(vec![0u8; 80]);
        let (_, f) = dec.feed(&out[..n]);
        let body = f.unwrap().unwrap().body.to_vec();
        assert_eq!(
            postcard::from_bytes::<Response>(&body).unwrap(),
            Response::Error(DeviceError::UnknownRequest)
        );
    }

    #[test]
    fn reset_changes_the_boot_id_and_forgets_the_input() {
        let mut c = Client::new(vec![DeviceDense::new(8, 4, ActivationEncoding::F32)]);
        program(&mut c, 8, 4, 3);
        let hello = |c: &mut Client<DeviceDense>| {
            let body = c.send(&Request::Hello {
                protocol_version: 1,
            });
            match postcard::from_bytes::<Response>(&body).unwrap() {
                Response::Hello(info) => info.boot_id,
                other => panic!("{other:?}"),
            }
        };
        let before = hello(&mut c);
        c.ack(&Request::Reset);
        assert_ne!(hello(&mut c), before);
        let body = c.send(&Request::Forward {
            layer: 0,
            mode: ForwardMode::Eval,
        });
        assert_eq!(
            postcard::from_bytes::<Response>(&body).unwrap(),
            Response::Error(DeviceError::NoInput)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Whatever body arrives behind a good CRC (random bytes, or requests with random
        /// fields), the server answers with one reply frame and never panics.
        #[test]
        fn the_server_survives_any_request(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48),
            kind in 0u8..10,
            a in 0u32..80,
            b in 0u32..80,
            n in 0usize..40,
            layer in 0u8..3,
        ) {
            let conv = ConvGeometry { in_channels: 1, out_channels: 2, height: 2, width: 3, proj_dim: 2, projection_seed: 5 };
            let mut c = Client::new(vec![
                DeviceDense::new(3, 2, ActivationEncoding::AdcU8 { scale: 0.1 }).erased(),
                DeviceConv::new(conv, ActivationEncoding::F32).unwrap().erased(),
            ]);
            let values: Vec<f32> = (0..n).map(|i| i as f32 - 5.0).collect();
            let seeds: Vec<DirectionSeed> = (0..n as u64).map(DirectionSeed).collect();
            let terms: Vec<UpdateTerm> = seeds.iter().map(|&seed| UpdateTerm { seed, derivative: 1.0 }).collect();
            let chunk = ChunkRange { start: a, end: b };
            let requests = [
                Request::LoadInput { layer, rows: b, offset: 0, values: Packed::Items(&values) },
                Request::LoadInput { layer, rows: b, offset: a, values: Packed::Items(&values) },
                Request::SetParameters { layer, offset: a, values: Packed::Items(&values) },
                Request::EvaluatePerturbed { layer, chunk, eps: 0.1, seeds: Packed::Items(&seeds) },
                Request::ApplyUpdate { layer, chunk, scale: 0.1, terms: Packed::Items(&terms) },
                Request::Forward { layer, mode: ForwardMode::Train },
                Request::ReadResult { offset: a },
                Request::ReadParameters { layer },
                Request::DescribeLayer { layer },
                Request::Reset,
            ];
            // A batch first, so that evaluations get past the input check.
            let x = [0.5f32; 6];
            c.send(&Request::LoadInput { layer: 0, rows: 2, offset: 0, values: Packed::Items(&x) });
            c.send(&Request::LoadInput { layer: 1, rows: 1, offset: 0, values: Packed::Items(&x) });
            for r in requests.iter().skip(kind as usize).chain(requests.iter()) {
                let reply = c.send(r);
                proptest::prop_assert!(postcard::from_bytes::<Response>(&reply).is_ok());
            }
            let mut scratch = vec![0u8; 256];
            let mut out = vec![0u8; 300];
            proptest::prop_assert!(c.server_mut().respond(7, &body, &mut scratch, &mut out).is_ok());
        }
    }
}

#[cfg(test)]
mod conv_tests {
    use super::test_client::TestClient as Client;
    use super::*;
    use firmware_protocol::message::{ChunkRange, Packed, Request, Response};

    fn shape() -> ConvGeometry {
        ConvGeometry {
            in_channels: 2,
            out_channels: 3,
            height: 6,
            width: 4,
            proj_dim: 5,
            projection_seed: 77,
        }
    }

    /// Programs the block's parameters (BatchNorm scales and shifts away from 1 and 0) and
    /// loads `rows` inputs.
    fn program<L: PhysicalLayer + Send>(c: &mut Client<L>, rows: usize) {
        let s = shape();
        let p: Vec<f32> = (0..s.param_count())
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 80.0)
            .collect();
        c.ack(&Request::SetParameters {
            layer: 0,
            offset: 0,
            values: Packed::Items(&p),
        });
        let x: Vec<f32> = (0..rows * s.input_width())
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0)
            .collect();
        c.ack(&Request::LoadInput {
            layer: 0,
            rows: rows as u32,
            offset: 0,
            values: Packed::Items(&x),
        });
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn forward(mode: ForwardMode) -> Request<'static> {
        Request::Forward { layer: 0, mode }
    }

    /// Issue 17, item 5: a training-mode pass commits the batch's statistics, so its
    /// retransmission is answered from the cache (the same reply, committed once); the
    /// statistics read back over the wire and, written to a fresh device, make it evaluate as
    /// the trained one does.
    #[test]
    fn a_retransmitted_training_pass_commits_once_and_the_statistics_travel() {
        let rows = 4;
        let mut c = Client::new(vec![
            DeviceConv::new(shape(), ActivationEncoding::F32).unwrap(),
        ]);
        program(&mut c, rows);
        let read = Request::ReadLayerState { layer: 0 };
        let fresh = c.result(&read);
        assert_eq!(fresh.len(), shape().out_channels * 2);
        let first = c.send_seq(900, &forward(ForwardMode::Train));
        let again = c.send_seq(900, &forward(ForwardMode::Train));
        assert_eq!(first, again);
        assert_eq!(c.server().stats().retransmissions, 1);
        let once = c.result(&read);
        assert_ne!(
            bits(&once),
            bits(&fresh),
            "a training pass moves the statistics"
        );
        let mut single = Client::new(vec![
            DeviceConv::new(shape(), ActivationEncoding::F32).unwrap(),
        ]);
        program(&mut single, rows);
        single.send(&forward(ForwardMode::Train));
        assert_eq!(bits(&single.result(&read)), bits(&once), "committed twice");
        // A stale duplicate, after another result replaced the buffer: refused, not recomputed.
        let stale = c.send_seq(900, &forward(ForwardMode::Train));
        assert!(matches!(
            postcard::from_bytes::<Response>(&stale),
            Ok(Response::Error(DeviceError::NoResult))
        ));
        assert_eq!(bits(&c.result(&read)), bits(&once));

        // Onto a fresh device: its evaluation is the trained one's, bit for bit.
        let eval = c.result(&forward(ForwardMode::Eval));
        let mut other = Client::new(vec![
            DeviceConv::new(shape(), ActivationEncoding::F32).unwrap(),
        ]);
        program(&mut other, rows);
        assert_ne!(
            bits(&other.result(&forward(ForwardMode::Eval))),
            bits(&eval)
        );
        other.ack(&Request::WriteLayerState {
            layer: 0,
            offset: 0,
            values: Packed::Items(&once),
        });
        assert_eq!(bits(&other.result(&read)), bits(&once));
        assert_eq!(
            bits(&other.result(&forward(ForwardMode::Eval))),
            bits(&eval)
        );
        // A write past the state is refused, and changes nothing.
        let past = other.send(&Request::WriteLayerState {
            layer: 0,
            offset: 5,
            values: Packed::Items(&once),
        });
        assert!(matches!(
            postcard::from_bytes::<Response>(&past),
            Ok(Response::Error(DeviceError::ShapeMismatch { .. }))
        ));
        assert_eq!(bits(&other.result(&read)), bits(&once));
    }

    #[test]
    fn a_forward_pass_returns_the_features_then_the_pooled_input() {
        let rows = 3;
        let mut c = Client::new(vec![
            DeviceConv::new(shape(), ActivationEncoding::F32).unwrap(),
        ]);
        let d = c.server().layers()[0].descriptor();
        assert_eq!(
            d.chunking,
            firmware_protocol::shape::ChunkUnits::Groups { size: 21 }
        );
        program(&mut c, rows);
        let got = c.result(&forward(ForwardMode::Train));
        // The block itself, programmed alike.
        let mut block = ConvBlock::new(shape());
        block
            .set_params(c.server_mut().layers_mut()[0].layer_mut().params())
            .unwrap();
        let x: Vec<f32> = (0..rows * shape().input_width())
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0)
            .collect();
        block.load_input(&x).unwrap();
        let (mut f, mut next) = (Vec::new(), Vec::new());
        block
            .forward(ForwardMode::Train, &mut f, &mut next)
            .unwrap();
        assert_eq!(f.len(), rows * 15);
        assert_eq!(next.len(), rows * 3 * 3 * 2);
        assert_eq!(got.len(), rows * d.forward_width() as usize);
        assert_eq!(bits(&got[..f.len()]), bits(&f));
        assert_eq!(bits(&got[f.len()..]), bits(&next));
        // Train committed the batch statistics; Eval reads them, as the block does.
        let eval = c.result(&forward(ForwardMode::Eval));
        block.forward(ForwardMode::Eval, &mut f, &mut next).unwrap();
        assert_eq!(bits(&eval[..f.len()]), bits(&f));
        assert_eq!(
            bits(c.server().layers()[0].layer().running_mean()),
            bits(block.running_mean())
        );
    }

    #[test]
    fn the_conv_override_agrees_with_the_default_choreography_and_leaves_no_trace() {
        let rows = 4;
        let mut fast = Client::new(vec![
            DeviceConv::new(shape(), ActivationEncoding::F32).unwrap(),
        ]);
        let mut minimal = Client::new(vec![Minimal(
            DeviceConv::new(shape(), ActivationEncoding::F32).unwrap(),
        )]);
        program(&mut fast, rows);
        program(&mut minimal, rows);
        // Running statistics away from (0, 1) first.
        fast.result(&forward(ForwardMode::Train));
        minimal.result(&forward(ForwardMode::Train));
        let seeds = [DirectionSeed(5), DirectionSeed(6)];
        let terms: Vec<UpdateTerm> = seeds
            .iter()
            .map(|&seed| UpdateTerm {
                seed,
                derivative: 0.7,
            })
            .collect();
        let read = Request::ReadParameters { layer: 0 };
        // Whole channels, one channel, and a chunk cut mid-channel (the device takes any).
        for (start, end) in [(0, 63), (21, 42), (5, 30)] {
            let chunk = ChunkRange { start, end };
            let eval_before = fast.result(&forward(ForwardMode::Eval));
            let params_before = fast.result(&read);
            let request = Request::EvaluatePerturbed {
                layer: 0,
                chunk,
                eps: 1e-2,
                seeds: Packed::Items(&seeds),
            };
            let a = fast.result(&request);
            let b = minimal.result(&request);
            assert_eq!(a.len(), 2 * seeds.len() * rows * 15);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 2e-5, "{x} vs {y}");
            }
            // No trace: parameters, and the running statistics an Eval pass reads.
            assert_eq!(bits(&fast.result(&read)), bits(&params_before));
            assert_eq!(
                bits(&fast.result(&forward(ForwardMode::Eval))),
                bits(&eval_before)
            );
            let m = minimal.server().layers()[0].0.layer();
            let f = fast.server().layers()[0].layer();
            assert_eq!(bits(m.running_mean()), bits(f.running_mean()));
            assert_eq!(bits(m.running_var()), bits(f.running_var()));
            let update = Request::ApplyUpdate {
                layer: 0,
                chunk,
                scale: 0.05,
                terms: Packed::Items(&terms),
            };
            fast.ack(&update);
            minimal.ack(&update);
            assert_eq!(bits(&fast.result(&read)), bits(&minimal.result(&read)));
        }
    }

    #[test]
    fn a_conv_block_without_a_no_trace_pass_is_refused_by_the_default() {
        /// Only the required methods: the default perturbation cannot run a conv block's
        /// forward pass (it would commit running statistics and return the pooled input too).
        struct Bare(DeviceConv);
        impl PhysicalLayer for Bare {
            fn descriptor(&self) -> LayerDescriptor {
                self.0.descriptor()
            }
            fn write_parameters(&mut self, o: usize, v: &[f32]) -> Result<(), DeviceError> {
                self.0.write_parameters(o, v)
            }
            fn read_parameters(&mut self, o: usize, v: &mut [f32]) -> Result<(), DeviceError> {
                self.0.read_parameters(o, v)
            }
            fn load_input(&mut self, r: usize, o: usize, v: &[f32]) -> Result<(), DeviceError> {
                self.0.load_input(r, o, v)
            }
            fn forward(&mut self, m: ForwardMode, out: &mut [f32]) -> Result<(), DeviceError> {
                self.0.forward(m, out)
            }
        }
        let mut c = Client::new(vec![Bare(
            DeviceConv::new(shape(), ActivationEncoding::F32).unwrap(),
        )]);
        program(&mut c, 2);
        let before = c.result(&Request::ReadParameters { layer: 0 });
        let seeds = [DirectionSeed(1)];
        let body = c.send(&Request::EvaluatePerturbed {
            layer: 0,
            chunk: ChunkRange { start: 0, end: 21 },
            eps: 1e-2,
            seeds: Packed::Items(&seeds),
        });
        assert_eq!(
            postcard::from_bytes::<Response>(&body).unwrap(),
            Response::Error(DeviceError::Unsupported)
        );
        // Restored all the same.
        assert_eq!(c.result(&Request::ReadParameters { layer: 0 }), before);
    }

    #[test]
    fn bad_conv_shapes_are_refused_at_construction() {
        let mut s = shape();
        s.height = 1;
        assert!(DeviceConv::new(s, ActivationEncoding::F32).is_err());
        let mut s = shape();
        s.in_channels = 1 << 20;
        s.height = 1 << 12;
        let err = DeviceConv::new(s, ActivationEncoding::F32).unwrap_err();
        assert!(err.contains("too large"), "{err}");
    }
}
