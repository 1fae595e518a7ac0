//! A device behind a [`Link`]: the handshake, and one [`SerialOracle`] per device layer, all
//! sharing the link. The requests themselves are `firmware_protocol::link::Client`'s; this file
//! checks what the device says against the model and maps the client's errors to
//! [`OracleError`]s.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use firmware_protocol::frame::{CRC_LEN, HEADER_LEN};
use firmware_protocol::link::{Client, ClientError, Link, LinkCounters};
use firmware_protocol::message::{Capabilities, ChunkRange, DeviceError, LayerDescriptor};

use crate::oracle::{
    Activations, ChunkUnits, ConvGeometry, DeviceLink, DirectionSeed, ForwardMode, ForwardOracle,
    ForwardOutput, LayerShape, OracleError, PerturbedPair, UpdateTerm,
};

/// Room for a request's fields around its bulk values, in bytes (generous).
const REQUEST_OVERHEAD: usize = HEADER_LEN + CRC_LEN + 32;

/// Room for a `LoadPixels` request's normaliser, beyond [`REQUEST_OVERHEAD`].
const PIXEL_REQUEST_FIELDS: usize = 48;

/// What the device said in the handshake.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceSummary {
    pub name: String,
    pub boot_id: u32,
    pub max_request: u32,
    pub max_batch: u32,
    pub max_directions: u16,
    pub capabilities: Capabilities,
    pub layers: Vec<LayerDescriptor>,
}

/// A connected, identified device.
pub struct SerialDevice {
    client: Arc<Mutex<Client>>,
    summary: DeviceSummary,
    /// Whether a dataset's pixels go up as bytes ([`SerialDevice::send_pixels`]).
    pixels: bool,
}

/// A refusal stays a refusal (the device is up and said no); every other failure is the link's.
impl From<ClientError> for OracleError {
    fn from(e: ClientError) -> Self {
        if e.is_refusal() {
            OracleError::Refused(e.to_string())
        } else {
            OracleError::Link(e.to_string())
        }
    }
}

/// Describes a layer as `dense 784x50 (39250 parameters)` or `conv 1x28x28 -> 32 channels,
/// d=16, projection seed 0x... (384 parameters)`.
pub fn describe(shape: &LayerShape) -> String {
    match *shape {
        LayerShape::Dense { inputs, outputs } => {
            format!(
                "dense {inputs}x{outputs} ({} parameters)",
                shape.param_count()
            )
        }
        LayerShape::Conv(ConvGeometry {
            in_channels,
            out_channels,
            height,
            width,
            proj_dim,
            projection_seed,
        }) => format!(
            "conv {in_channels}x{height}x{width} -> {out_channels} channels, d={proj_dim}, \
             projection seed {projection_seed:#018x} ({} parameters)",
            shape.param_count()
        ),
    }
}

/// `flat`, or `whole groups of N`.
fn describe_chunking(c: &ChunkUnits) -> String {
    match c {
        ChunkUnits::Flat => "flat chunks".into(),
        ChunkUnits::Groups { size } => format!("chunks of whole {size}-parameter groups"),
    }
}

/// The [`LayerShape`] of a layer as the device describes it. Every size in a descriptor follows
/// from its shape ([`LayerDescriptor::new`]); a descriptor whose sizes disagree with its shape,
/// or do not fit the protocol's u32 fields (device garbage), is refused.
pub fn layer_spec(d: &LayerDescriptor) -> Result<LayerShape, OracleError> {
    let shape = d.kind;
    if !LayerDescriptor::fits(&shape) {
        return Err(OracleError::Shape(format!(
            "the device describes a layer too large to hold: {}",
            describe(&shape)
        )));
    }
    if *d != LayerDescriptor::new(shape, d.encoding) {
        return Err(OracleError::Shape(format!(
            "the device's description of a layer contradicts itself: {} with {}, {} parameters, {} features, {} outputs",
            describe(&shape),
            describe_chunking(&d.chunking),
            d.param_count,
            d.feature_width,
            d.output_width
        )));
    }
    Ok(shape)
}

impl SerialDevice {
    /// Handshakes over `link`: checks the protocol version and reads every layer's description.
    pub fn connect(link: Link) -> Result<Self, OracleError> {
        let mut client = Client::new(link);
        let info = client.hello()?;
        let layers = info.layers;
        let mut summary = DeviceSummary {
            name: info.name.to_string(),
            boot_id: info.boot_id,
            max_request: info.max_request,
            max_batch: info.max_batch,
            max_directions: info.max_directions,
            capabilities: info.capabilities,
            layers: Vec::new(),
        };
        if !(summary.capabilities.seeded_perturbation && summary.capabilities.raw_parameter_writes)
        {
            return Err(OracleError::Link(format!(
                "device '{}' lacks a capability MF+DD training needs: {:?}",
                summary.name, summary.capabilities
            )));
        }
        // Limits no run can live with are refused here, as the permanent mismatches they are
        // (not mid-run, where they would read as a device gone missing).
        if summary.max_batch == 0 || summary.max_directions == 0 {
            return Err(OracleError::Backend(format!(
                "device '{}' announces max_batch {} and max_directions {}: it can take no input batch or no direction; its firmware is misconfigured",
                summary.name, summary.max_batch, summary.max_directions
            )));
        }
        if (summary.max_request as usize) < REQUEST_OVERHEAD + 64 {
            return Err(OracleError::Link(format!(
                "device '{}' accepts requests of at most {} bytes, too few for any data",
                summary.name, summary.max_request
            )));
        }
        for layer in 0..layers {
            summary.layers.push(client.describe_layer(layer)?);
        }
        tracing::info!(
            device = %summary.name,
            boot_id = summary.boot_id,
            layers = ?summary.layers.iter().map(|d| describe(&d.kind)).collect::<Vec<_>>(),
            "connected"
        );
        Ok(Self {
            client: Arc::new(Mutex::new(client)),
            summary,
            pixels: true,
        })
    }

    /// Whether a dataset's pixels go up as bytes the device normalises (the default; the same
    /// bits as f32 values, a quarter of the bytes), or as f32 values (`pixels=0`).
    pub fn send_pixels(mut self, pixels: bool) -> Self {
        self.pixels = pixels;
        self
    }

    pub fn summary(&self) -> &DeviceSummary {
        &self.summary
    }

    /// One oracle per layer of the model, after checking that the device holds exactly those
    /// layers (a mismatch names both shapes). The handshake's traffic is counted on the first.
    pub fn oracles(self, model: &[LayerShape]) -> Result<Vec<SerialOracle>, OracleError> {
        let device = &self.summary.layers;
        if device.len() != model.len() {
            return Err(OracleError::Shape(format!(
                "device '{}' holds {} layers [{}], the model needs {} [{}]",
                self.summary.name,
                device.len(),
                device
                    .iter()
                    .map(|d| describe(&d.kind))
                    .collect::<Vec<_>>()
                    .join(", "),
                model.len(),
                model.iter().map(describe).collect::<Vec<_>>().join(", ")
            )));
        }
        for (l, (d, s)) in device.iter().zip(model).enumerate() {
            if d.kind != *s {
                let mut hint = String::new();
                if let (LayerShape::Conv(device), LayerShape::Conv(model)) = (d.kind, s)
                    && device.projection_seed != model.projection_seed
                {
                    hint = format!(
                        "; the device draws the block's fixed projection A from seed {:#018x}, the model from {:#018x} (pnn-emulate derives it from its --seed as pnn-train does from --seed: give both the same)",
                        device.projection_seed, model.projection_seed
                    );
                }
                return Err(OracleError::Shape(format!(
                    "layer {l}: device '{}' holds {} ({}, {} features), the model needs {} ({}, {} features){hint}",
                    self.summary.name,
                    describe(&d.kind),
                    describe_chunking(&d.chunking),
                    d.feature_width,
                    describe(s),
                    describe_chunking(&s.chunk_units()),
                    s.feature_width()
                )));
            }
        }
        let handshake = self.lock().counters().traffic();
        Ok(device
            .iter()
            .enumerate()
            .map(|(l, d)| SerialOracle {
                client: Arc::clone(&self.client),
                layer: l as u8,
                descriptor: *d,
                max_request: self.summary.max_request as usize,
                max_batch: self.summary.max_batch as usize,
                max_directions: self.summary.max_directions as usize,
                read_back: self.summary.capabilities.parameter_read_back,
                takes_pixels: self.pixels,
                rows: 0,
                // The handshake's traffic (not its retries) is counted on the first layer.
                share: if l == 0 {
                    handshake
                } else {
                    LinkCounters::default()
                },
                values: Vec::new(),
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One device layer as a [`ForwardOracle`].
pub struct SerialOracle {
    client: Arc<Mutex<Client>>,
    layer: u8,
    /// The layer as the device described it, which the handshake checked equals the model's.
    descriptor: LayerDescriptor,
    max_request: usize,
    max_batch: usize,
    max_directions: usize,
    read_back: bool,
    /// Whether to send a dataset's pixels as bytes (until the device says it does not know how).
    takes_pixels: bool,
    /// Rows of the batch loaded last.
    rows: usize,
    /// This oracle's share of the link's traffic and health.
    share: LinkCounters,
    values: Vec<f32>,
}

impl SerialOracle {
    pub fn descriptor(&self) -> &LayerDescriptor {
        &self.descriptor
    }

    /// The shared link's counters (all layers), retransmissions and dropped frames included.
    pub fn link_counters(&self) -> LinkCounters {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters()
    }

    /// Runs `f` on the client and adds the traffic it caused to this oracle's counters.
    fn with_link<T>(
        &mut self,
        f: impl FnOnce(&mut Client, &mut Vec<f32>) -> Result<T, ClientError>,
    ) -> Result<T, OracleError> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let before = client.counters();
        let result = f(&mut client, &mut self.values);
        self.share += client.counters() - before;
        Ok(result?)
    }

    /// Values of f32 bulk data that fit one request.
    fn part_len(&self) -> usize {
        (self.max_request - REQUEST_OVERHEAD) / 4
    }
}

fn chunk_range(chunk: &Range<usize>) -> ChunkRange {
    ChunkRange {
        start: chunk.start as u32,
        end: chunk.end as u32,
    }
}

impl ForwardOracle for SerialOracle {
    fn spec(&self) -> &LayerShape {
        &self.descriptor.kind
    }

    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        if params.len() != self.descriptor.kind.param_count() {
            return Err(OracleError::Shape(format!(
                "{} parameters for a layer of {}",
                params.len(),
                self.descriptor.kind.param_count()
            )));
        }
        let (layer, part) = (self.layer, self.part_len());
        self.with_link(|client, _| {
            for (k, values) in params.chunks(part).enumerate() {
                client.set_parameters(layer, (k * part) as u32, values)?;
            }
            Ok(())
        })
    }

    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        if !self.read_back {
            return Err(OracleError::Unsupported("parameter read-back"));
        }
        let (layer, count) = (self.layer, self.descriptor.kind.param_count());
        self.with_link(|client, values| {
            client.read_parameters(layer, count, values)?;
            Ok(values.clone())
        })
    }

    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        if input.width != self.descriptor.kind.input_width() || input.rows == 0 {
            return Err(OracleError::Shape(format!(
                "input is {} rows of {} values, the layer takes rows of {}",
                input.rows,
                input.width,
                self.descriptor.kind.input_width()
            )));
        }
        if input.rows > self.max_batch {
            return Err(OracleError::Shape(format!(
                "a batch of {} rows, the device takes at most {}",
                input.rows, self.max_batch
            )));
        }
        let (layer, part, rows) = (self.layer, self.part_len(), input.rows as u32);
        // A dataset's pixels go up as bytes where the device normalises them itself (a quarter
        // of the bytes, the same bits); a device that does not know the request gets f32s.
        if let Some(pixels) = input
            .pixels
            .as_ref()
            .filter(|p| self.takes_pixels && p.data.len() == input.data.len() && !p.data.is_empty())
        {
            let part = self.max_request - REQUEST_OVERHEAD - PIXEL_REQUEST_FIELDS;
            let taken = self.with_link(|client, _| {
                for (k, bytes) in pixels.data.chunks(part).enumerate() {
                    let at = (k * part) as u32;
                    match client.load_pixels(layer, rows, at, pixels.normaliser, bytes) {
                        Err(ClientError::Refused {
                            error: DeviceError::UnknownRequest,
                            ..
                        }) if k == 0 => return Ok(false),
                        other => other?,
                    }
                }
                Ok(true)
            })?;
            if taken {
                self.rows = input.rows;
                return Ok(());
            }
            tracing::info!("the device does not know LoadPixels: inputs go up as f32 values");
            self.takes_pixels = false;
        }
        self.with_link(|client, _| {
            for (k, values) in input.data.chunks(part).enumerate() {
                client.load_input(layer, rows, (k * part) as u32, values)?;
            }
            Ok(())
        })?;
        self.rows = input.rows;
        Ok(())
    }

    /// The features and, for a layer whose next-layer input differs from them (a CNN block),
    /// that input: the device returns both in one result, features first.
    fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        let layer = self.layer;
        let (rows, width, encoding) = (
            self.rows,
            self.descriptor.kind.feature_width(),
            self.descriptor.encoding,
        );
        let next_width = if self.descriptor.has_separate_output() {
            self.descriptor.kind.output_width()
        } else {
            0
        };
        let (features, next) = self.with_link(|client, values| {
            client.forward(layer, mode, rows * (width + next_width), encoding, values)?;
            let (features, next) = values.split_at(rows * width);
            Ok((features.to_vec(), next.to_vec()))
        })?;
        Ok(ForwardOutput {
            features: Activations::new(rows, width, features),
            next: (next_width > 0).then(|| Activations::new(rows, next_width, next)),
        })
    }

    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<PerturbedPair>,
    ) -> Result<(), OracleError> {
        if seeds.is_empty() || seeds.len() > self.max_directions {
            return Err(OracleError::Shape(format!(
                "{} directions, the device takes 1 to {}",
                seeds.len(),
                self.max_directions
            )));
        }
        let (layer, range) = (self.layer, chunk_range(&chunk));
        let (rows, width, encoding) = (
            self.rows,
            self.descriptor.kind.feature_width(),
            self.descriptor.encoding,
        );
        let block = rows * width;
        self.with_link(|client, values| {
            let expected = 2 * seeds.len() * block;
            client.evaluate_perturbed(layer, range, eps, seeds, expected, encoding, values)
        })?;
        out.resize_with(seeds.len(), Default::default);
        for ((plus, minus), pair) in out.iter_mut().zip(self.values.chunks_exact(2 * block)) {
            for (a, src) in [(plus, &pair[..block]), (minus, &pair[block..])] {
                a.rows = rows;
                a.width = width;
                a.data.clear();
                a.data.extend_from_slice(src);
            }
        }
        Ok(())
    }

    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError> {
        let (layer, range) = (self.layer, chunk_range(&chunk));
        self.with_link(|client, _| client.apply_update(layer, range, scale, terms))
    }

    /// A conv block's BatchNorm running statistics, read over the wire (`ReadLayerState`), so
    /// that checkpoints and reset recovery carry them. A device that predates the request keeps
    /// them to itself: `None` (`crate::run::recovery` then warns that resume and reset recovery
    /// restart them).
    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        let (layer, count) = (self.layer, self.descriptor.kind.state_len());
        if count == 0 {
            return Ok(None);
        }
        self.with_link(
            |client, values| match client.read_layer_state(layer, count, values) {
                Ok(()) => Ok(Some(values.clone())),
                Err(ClientError::Refused {
                    error: DeviceError::UnknownRequest | DeviceError::Unsupported,
                    ..
                }) => Ok(None),
                Err(e) => Err(e),
            },
        )
    }

    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        if state.is_empty() {
            return Ok(());
        }
        let count = self.descriptor.kind.state_len();
        if state.len() != count {
            return Err(OracleError::Shape(format!(
                "{} values of layer state for a layer that keeps {count}",
                state.len()
            )));
        }
        let (layer, part) = (self.layer, self.part_len());
        self.with_link(|client, _| {
            for (k, values) in state.chunks(part).enumerate() {
                client.write_layer_state(layer, (k * part) as u32, values)?;
            }
            Ok(())
        })
    }

    fn link(&self) -> Option<&dyn DeviceLink> {
        Some(self)
    }

    fn link_mut(&mut self) -> Option<&mut dyn DeviceLink> {
        Some(self)
    }
}

impl DeviceLink for SerialOracle {
    /// This oracle's share: the handshake's traffic is counted on the first layer.
    fn counters(&self) -> LinkCounters {
        self.share
    }

    /// The boot id, from a `Hello`: a device that reset has a new one (see `crate::run::recovery`).
    fn session(&mut self) -> Result<u64, OracleError> {
        self.with_link(|client, _| client.boot_id().map(u64::from))
    }
}

impl From<DeviceError> for OracleError {
    fn from(e: DeviceError) -> Self {
        OracleError::Refused(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_protocol::message::ActivationEncoding;

    #[test]
    fn a_consistent_descriptor_gives_its_shape() {
        let shape = LayerShape::conv(1, 4, (6, 6), 2, 9);
        let d = LayerDescriptor::new(shape, ActivationEncoding::F32);
        assert_eq!(layer_spec(&d).unwrap(), shape);
    }

    #[test]
    fn descriptors_that_contradict_their_shape_or_overflow_are_refused() {
        let shape = LayerShape::dense(4, 3);
        let good = LayerDescriptor::new(shape, ActivationEncoding::F32);
        let wrong_count = LayerDescriptor {
            param_count: 14,
            ..good
        };
        let wrong_chunks = LayerDescriptor {
            chunking: ChunkUnits::Groups { size: 5 },
            ..good
        };
        for d in [wrong_count, wrong_chunks] {
            let e = layer_spec(&d).unwrap_err().to_string();
            assert!(e.contains("contradicts itself"), "{e}");
        }
        let huge = LayerShape::dense(1 << 20, 1 << 20);
        let d = LayerDescriptor::new(huge, ActivationEncoding::F32);
        let e = layer_spec(&d).unwrap_err().to_string();
        assert!(e.contains("too large to hold"), "{e}");
    }
}
