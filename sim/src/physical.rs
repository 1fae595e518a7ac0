//! The simulated layers as a firmware would present them: [`PhysicalLayer`] for [`DenseLayer`],
//! served by `firmware_protocol::server::Server` in the emulator (`pnn-emulate`).
//!
//! The perturbed evaluation and the update are overridden with the simulator's own (the exact
//! fast path and the cached-direction update), so a run through the emulator computes the very
//! numbers `--backend sim` computes, bit for bit.

use std::ops::Range;

use firmware_protocol::message::{ActivationEncoding, DeviceError, ForwardMode, LayerDescriptor};
use firmware_protocol::server::PhysicalLayer;
use firmware_protocol::{DirectionSeed, UpdateTerm};

use crate::dense::{DenseLayer, SimError};

/// A [`DenseLayer`] behind the device protocol. Parameter and input parts are staged here and
/// handed to the layer whole (the layer takes whole vectors).
#[derive(Debug)]
pub struct DeviceDense {
    layer: DenseLayer,
    encoding: ActivationEncoding,
    /// Parameters as programmed; `dirty` until handed to the layer.
    params: Vec<f32>,
    dirty: bool,
    input: Vec<f32>,
    out: Vec<f32>,
    pairs: Vec<(Vec<f32>, Vec<f32>)>,
}

impl DeviceDense {
    pub fn new(n_in: usize, n_out: usize, encoding: ActivationEncoding) -> Self {
        let layer = DenseLayer::new(n_in, n_out);
        Self {
            params: layer.params().to_vec(),
            layer,
            encoding,
            dirty: false,
            input: Vec::new(),
            out: Vec::new(),
            pairs: Vec::new(),
        }
    }

    pub fn layer(&self) -> &DenseLayer {
        &self.layer
    }

    pub fn layer_mut(&mut self) -> &mut DenseLayer {
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

impl PhysicalLayer for DeviceDense {
    fn descriptor(&self) -> LayerDescriptor {
        LayerDescriptor::dense(
            self.layer.n_in() as u32,
            self.layer.n_out() as u32,
            self.encoding,
        )
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
        let total = rows * self.layer.n_in();
        if offset == 0 {
            self.input.clear();
        }
        self.input.extend_from_slice(values);
        if self.input.len() == total {
            self.layer.load_input(&self.input).map_err(device_err)?;
        }
        Ok(())
    }

    fn forward(&mut self, _mode: ForwardMode, out: &mut [f32]) -> Result<(), DeviceError> {
        self.flush();
        self.layer.forward(&mut self.out).map_err(device_err)?;
        if self.out.len() != out.len() {
            return Err(DeviceError::ShapeMismatch {
                expected: out.len() as u32,
                got: self.out.len() as u32,
            });
        }
        out.copy_from_slice(&self.out);
        Ok(())
    }

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
        let block = out.len() / (2 * seeds.len());
        for ((plus, minus), dst) in self.pairs.iter().zip(out.chunks_exact_mut(2 * block)) {
            let (p, m) = dst.split_at_mut(block);
            p.copy_from_slice(plus);
            m.copy_from_slice(minus);
        }
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
            .map_err(device_err)?;
        Ok(())
    }

    fn perturbation_scratch(&self, _chunk_len: usize) -> usize {
        0
    }

    fn update_scratch(&self, _chunk_len: usize) -> usize {
        0
    }

    fn reset(&mut self) {
        let choreography = self.layer.choreography();
        *self = Self::new(self.layer.n_in(), self.layer.n_out(), self.encoding);
        self.layer.set_choreography(choreography);
    }
}

/// The literal choreography of the protocol's default implementation, over a plain parameter
/// vector: what a firmware that implements only the required methods runs. Used to hold the
/// simulator's overrides to the defaults.
#[derive(Debug)]
pub struct MinimalDense(pub DeviceDense);

impl PhysicalLayer for MinimalDense {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_protocol::frame::{self, FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
    use firmware_protocol::message::{Capabilities, ChunkRange, Packed, Request, Response};
    use firmware_protocol::server::{DeviceConfig, Server, ServerIo};

    fn config() -> DeviceConfig<'static> {
        DeviceConfig {
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
        }
    }

    /// Sends requests through the frame layer and collects every reply's f32 result.
    struct Client<L: PhysicalLayer> {
        server: Server<'static, L, Vec<L>, Vec<f32>>,
        io: ServerIo<Vec<u8>>,
        seq: u16,
    }

    impl<L: PhysicalLayer> Client<L> {
        fn new(layers: Vec<L>) -> Self {
            Self {
                server: Server::new(layers, config(), Vec::new(), Vec::new()),
                io: ServerIo {
                    decoder: FrameDecoder::new(vec![0; MAX_ENCODED]),
                    payload: vec![0; MAX_PAYLOAD],
                    out: vec![0; MAX_ENCODED + 1],
                },
                seq: 0,
            }
        }

        /// One request under `seq` (retransmissions reuse it); returns the raw reply bodies.
        fn send_seq(&mut self, seq: u16, req: &Request<'_>) -> Vec<u8> {
            let mut scratch = vec![0u8; MAX_PAYLOAD];
            let mut wire = vec![0u8; MAX_ENCODED + 1];
            let n = frame::encode(seq, req, &mut scratch, &mut wire).unwrap();
            let mut replies = Vec::new();
            self.server
                .serve(&mut self.io, &wire[..n], |bytes| {
                    replies.extend_from_slice(bytes);
                    Ok::<_, ()>(())
                })
                .unwrap();
            let mut dec = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
            let (_, f) = dec.feed(&replies);
            let f = f.unwrap().unwrap();
            assert_eq!(f.seq, seq);
            f.body.to_vec()
        }

        fn send(&mut self, req: &Request<'_>) -> Vec<u8> {
            self.seq = self.seq.wrapping_add(1);
            self.send_seq(self.seq, req)
        }

        fn ack(&mut self, req: &Request<'_>) {
            let body = self.send(req);
            assert_eq!(
                postcard::from_bytes::<Response>(&body).unwrap(),
                Response::Ack
            );
        }

        /// The whole result of a request, fetched block by block.
        fn result(&mut self, req: &Request<'_>) -> Vec<f32> {
            let mut bytes = Vec::new();
            let mut body = self.send(req);
            loop {
                let Response::Result {
                    total,
                    offset,
                    data,
                } = postcard::from_bytes(&body).unwrap()
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

    fn program<L: PhysicalLayer>(c: &mut Client<L>, n_in: usize, n_out: usize, rows: usize) {
        let p: Vec<f32> = (0..n_in * n_out + n_out)
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
        let mut minimal = Client::new(vec![MinimalDense(DeviceDense::new(
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
        assert_eq!(c.server.stats().retransmissions, 1);
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
            .server
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
            let mut c = Client::new(vec![DeviceDense::new(3, 2, ActivationEncoding::AdcU8 { scale: 0.1 })]);
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
            for r in requests.iter().skip(kind as usize).chain(requests.iter()) {
                let reply = c.send(r);
                proptest::prop_assert!(postcard::from_bytes::<Response>(&reply).is_ok());
            }
            let mut scratch = vec![0u8; 256];
            let mut out = vec![0u8; 300];
            proptest::prop_assert!(c.server.respond(7, &body, &mut scratch, &mut out).is_ok());
        }
    }
}
