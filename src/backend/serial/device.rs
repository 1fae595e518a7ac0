//! A device behind a [`Link`]: the handshake, and one [`SerialOracle`] per device layer, all
//! sharing the link.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use firmware_protocol::frame::{CRC_LEN, HEADER_LEN};
use firmware_protocol::message::{
    ActivationEncoding, Capabilities, ChunkRange, DeviceError, DeviceInfo, LayerDescriptor,
    PROTOCOL_VERSION, Packed, Request, Response, peek_hello_version,
};

use super::link::{Link, LinkError, name};
use crate::oracle::{
    Activations, ChunkUnits, ConvGeometry, DirectionSeed, ForwardMode, ForwardOracle,
    ForwardOutput, LayerShape, LinkHealth, OracleError, PerturbedPair, UpdateTerm, WireStats,
};

/// Room for a request's fields around its bulk values, in bytes (generous).
const REQUEST_OVERHEAD: usize = HEADER_LEN + CRC_LEN + 32;

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
    link: Arc<Mutex<Link>>,
    summary: DeviceSummary,
}

fn link_err(e: LinkError) -> OracleError {
    OracleError::Link(e.to_string())
}

fn unexpected(request: &Request<'_>, body: &[u8]) -> OracleError {
    match postcard::from_bytes::<Response>(body) {
        Ok(Response::Error(e)) => OracleError::Refused(format!("{}: {e}", name(request))),
        Ok(other) => OracleError::Link(format!(
            "protocol error: unexpected reply to {}: {other:?}",
            name(request)
        )),
        Err(_) => OracleError::Link(format!(
            "protocol error: the reply to {} does not decode ({} bytes)",
            name(request),
            body.len()
        )),
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
    let sizes = [
        shape.param_count(),
        shape.input_width(),
        shape.feature_width(),
        shape.output_width(),
    ];
    if sizes.iter().any(|&n| u32::try_from(n).is_err()) {
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
    pub fn connect(mut link: Link) -> Result<Self, OracleError> {
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
        };
        let body = link.call(&hello).map_err(link_err)?;
        let info: DeviceInfo = match postcard::from_bytes::<Response>(body) {
            Ok(Response::Hello(info)) => info,
            Ok(_) | Err(_) => {
                if let Some(v) = peek_hello_version(body).filter(|&v| v != PROTOCOL_VERSION) {
                    return Err(version_mismatch(v));
                }
                return Err(unexpected(&hello, body));
            }
        };
        if info.protocol_version != PROTOCOL_VERSION {
            return Err(version_mismatch(info.protocol_version));
        }
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
        if (summary.max_request as usize) < REQUEST_OVERHEAD + 64 {
            return Err(OracleError::Link(format!(
                "device '{}' accepts requests of at most {} bytes, too few for any data",
                summary.name, summary.max_request
            )));
        }
        for layer in 0..info.layers {
            let req = Request::DescribeLayer { layer };
            let body = link.call(&req).map_err(link_err)?;
            match postcard::from_bytes::<Response>(body) {
                Ok(Response::Layer(d)) => summary.layers.push(d),
                _ => return Err(unexpected(&req, body)),
            }
        }
        tracing::info!(
            device = %summary.name,
            boot_id = summary.boot_id,
            layers = ?summary.layers.iter().map(|d| describe(&d.kind)).collect::<Vec<_>>(),
            "connected"
        );
        Ok(Self {
            link: Arc::new(Mutex::new(link)),
            summary,
        })
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
        let handshake = self.lock().counters().wire;
        Ok(model
            .iter()
            .zip(device)
            .enumerate()
            .map(|(l, (spec, d))| SerialOracle {
                link: Arc::clone(&self.link),
                layer: l as u8,
                spec: *spec,
                descriptor: *d,
                max_request: self.summary.max_request as usize,
                max_batch: self.summary.max_batch as usize,
                max_directions: self.summary.max_directions as usize,
                read_back: self.summary.capabilities.parameter_read_back,
                rows: 0,
                stats: if l == 0 {
                    handshake
                } else {
                    WireStats::default()
                },
                health: LinkHealth::default(),
                values: Vec::new(),
            })
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn version_mismatch(device: u16) -> OracleError {
    OracleError::Link(format!(
        "the device speaks protocol version {device}, this host speaks version {PROTOCOL_VERSION}: update the firmware or the host"
    ))
}

/// One device layer as a [`ForwardOracle`].
pub struct SerialOracle {
    link: Arc<Mutex<Link>>,
    layer: u8,
    spec: LayerShape,
    descriptor: LayerDescriptor,
    max_request: usize,
    max_batch: usize,
    max_directions: usize,
    read_back: bool,
    /// Rows of the batch loaded last.
    rows: usize,
    /// This oracle's share of the link's traffic.
    stats: WireStats,
    /// This oracle's share of the link's retries and resyncs.
    health: LinkHealth,
    values: Vec<f32>,
}

impl SerialOracle {
    pub fn descriptor(&self) -> &LayerDescriptor {
        &self.descriptor
    }

    /// The shared link's counters (all layers), retransmissions and dropped frames included.
    pub fn link_counters(&self) -> super::link::LinkCounters {
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counters()
    }

    /// Runs `f` on the link and adds the traffic it caused to this oracle's counters.
    fn with_link<T>(
        &mut self,
        f: impl FnOnce(&mut Link, &mut Vec<f32>) -> Result<T, OracleError>,
    ) -> Result<T, OracleError> {
        let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let counters = link.counters();
        let before = counters.wire;
        let result = f(&mut link, &mut self.values);
        let now = link.counters();
        self.health.retries += now.retransmissions - counters.retransmissions;
        self.health.resyncs += now.corrupt_frames - counters.corrupt_frames;
        let after = now.wire;
        self.stats.bytes_up += after.bytes_up - before.bytes_up;
        self.stats.bytes_down += after.bytes_down - before.bytes_down;
        self.stats.round_trips += after.round_trips - before.round_trips;
        result
    }

    /// Values of f32 bulk data that fit one request.
    fn part_len(&self) -> usize {
        (self.max_request - REQUEST_OVERHEAD) / 4
    }
}

fn ack(link: &mut Link, request: &Request<'_>) -> Result<(), OracleError> {
    let body = link.call(request).map_err(link_err)?;
    match postcard::from_bytes::<Response>(body) {
        Ok(Response::Ack) => Ok(()),
        _ => Err(unexpected(request, body)),
    }
}

/// Issues `request`, then reads its whole result (`expected` values in `encoding`) into `out`.
fn fetch(
    link: &mut Link,
    request: &Request<'_>,
    expected: usize,
    encoding: ActivationEncoding,
    out: &mut Vec<f32>,
) -> Result<(), OracleError> {
    out.clear();
    let size = encoding.size();
    let total_bytes = expected * size;
    let mut current = request.clone();
    loop {
        let body = link.call(&current).map_err(link_err)?;
        let (total, offset, data) = match postcard::from_bytes::<Response>(body) {
            Ok(Response::Result {
                total,
                offset,
                data,
            }) => (total as usize, offset as usize, data),
            _ => return Err(unexpected(&current, body)),
        };
        let bytes = data.bytes().unwrap_or_default();
        if total != total_bytes
            || offset != out.len() * size
            || !bytes.len().is_multiple_of(size)
            || offset + bytes.len() > total
            || bytes.is_empty()
        {
            return Err(OracleError::Link(format!(
                "protocol error: {} returned bytes {offset}..{} of {total}, expected the {} bytes from {}",
                name(request),
                offset + bytes.len(),
                total_bytes,
                out.len() * size
            )));
        }
        out.extend(bytes.chunks_exact(size).map(|b| encoding.decode(b)));
        if out.len() == expected {
            return Ok(());
        }
        current = Request::ReadResult {
            offset: (out.len() * size) as u32,
        };
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
        &self.spec
    }

    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        if params.len() != self.spec.param_count() {
            return Err(OracleError::Shape(format!(
                "{} parameters for a layer of {}",
                params.len(),
                self.spec.param_count()
            )));
        }
        let (layer, part) = (self.layer, self.part_len());
        self.with_link(|link, _| {
            for (k, values) in params.chunks(part).enumerate() {
                let request = Request::SetParameters {
                    layer,
                    offset: (k * part) as u32,
                    values: Packed::Items(values),
                };
                ack(link, &request)?;
            }
            Ok(())
        })
    }

    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        if !self.read_back {
            return Err(OracleError::Unsupported("parameter read-back"));
        }
        let (layer, count) = (self.layer, self.spec.param_count());
        self.with_link(|link, values| {
            fetch(
                link,
                &Request::ReadParameters { layer },
                count,
                ActivationEncoding::F32,
                values,
            )?;
            Ok(values.clone())
        })
    }

    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        if input.width != self.spec.input_width() || input.rows == 0 {
            return Err(OracleError::Shape(format!(
                "input is {} rows of {} values, the layer takes rows of {}",
                input.rows,
                input.width,
                self.spec.input_width()
            )));
        }
        if input.rows > self.max_batch {
            return Err(OracleError::Shape(format!(
                "a batch of {} rows, the device takes at most {}",
                input.rows, self.max_batch
            )));
        }
        let (layer, part) = (self.layer, self.part_len());
        self.with_link(|link, _| {
            for (k, values) in input.data.chunks(part).enumerate() {
                let request = Request::LoadInput {
                    layer,
                    rows: input.rows as u32,
                    offset: (k * part) as u32,
                    values: Packed::Items(values),
                };
                ack(link, &request)?;
            }
            Ok(())
        })?;
        self.rows = input.rows;
        Ok(())
    }

    /// The features and, for a layer whose next-layer input differs from them (a CNN block),
    /// that input: the device returns both in one result, features first.
    fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        let request = Request::Forward {
            layer: self.layer,
            mode,
        };
        let (rows, width, encoding) = (
            self.rows,
            self.spec.feature_width(),
            self.descriptor.encoding,
        );
        let next_width = if self.descriptor.has_separate_output() {
            self.spec.output_width()
        } else {
            0
        };
        let (features, next) = self.with_link(|link, values| {
            fetch(
                link,
                &request,
                rows * (width + next_width),
                encoding,
                values,
            )?;
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
        let request = Request::EvaluatePerturbed {
            layer: self.layer,
            chunk: chunk_range(&chunk),
            eps,
            seeds: Packed::Items(seeds),
        };
        let (rows, width, encoding) = (
            self.rows,
            self.spec.feature_width(),
            self.descriptor.encoding,
        );
        let block = rows * width;
        self.with_link(|link, values| {
            fetch(link, &request, 2 * seeds.len() * block, encoding, values)
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
        let request = Request::ApplyUpdate {
            layer: self.layer,
            chunk: chunk_range(&chunk),
            scale,
            terms: Packed::Items(terms),
        };
        self.with_link(|link, _| ack(link, &request))
    }

    fn wire_stats(&self) -> Option<WireStats> {
        Some(self.stats)
    }

    fn link_health(&self) -> Option<LinkHealth> {
        Some(self.health)
    }

    /// The boot id, from a `Hello`: a device that reset has a new one (see `crate::recovery`).
    fn session(&mut self) -> Result<Option<u64>, OracleError> {
        self.with_link(|link, _| super::faults::boot_id(link).map(|id| Some(id as u64)))
    }
}

impl From<DeviceError> for OracleError {
    fn from(e: DeviceError) -> Self {
        OracleError::Refused(e.to_string())
    }
}
