//! [`Client`]: one typed call per request, over a [`Link`].

use super::{Link, LinkCounters, LinkError, Transport, request_name};
use crate::direction::{DirectionSeed, UpdateTerm};
use crate::message::{
    ActivationEncoding, ChunkRange, DeviceError, DeviceInfo, ForwardMode, LayerDescriptor,
    PROTOCOL_VERSION, Packed, PixelNormaliser, Request, Response, peek_hello_version,
};

/// Why a call got no value: the link failed, the device refused, or its reply made no sense.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The device answered with an error (it is up; the request was not acceptable).
    #[error("{request}: {error}")]
    Refused {
        request: &'static str,
        error: DeviceError,
    },
    #[error("protocol error: unexpected reply to {request}: {reply}")]
    Unexpected {
        request: &'static str,
        reply: String,
    },
    #[error("protocol error: the reply to {request} does not decode ({len} bytes)")]
    Undecodable { request: &'static str, len: usize },
    #[error(
        "protocol error: {request} returned bytes {offset}..{end} of {total}, expected the {expected} bytes from {from}"
    )]
    BadResult {
        request: &'static str,
        offset: usize,
        end: usize,
        total: usize,
        expected: usize,
        from: usize,
    },
    #[error(
        "the device speaks protocol version {device}, this host speaks version {PROTOCOL_VERSION}: update the firmware or the host"
    )]
    VersionMismatch { device: u16 },
}

/// Why `body`, the reply to `request`, is not the one expected.
fn unexpected(request: &Request<'_>, body: &[u8]) -> ClientError {
    let request = request_name(request);
    match postcard::from_bytes::<Response>(body) {
        Ok(Response::Error(error)) => ClientError::Refused { request, error },
        Ok(other) => ClientError::Unexpected {
            request,
            reply: format!("{other:?}"),
        },
        Err(_) => ClientError::Undecodable {
            request,
            len: body.len(),
        },
    }
}

/// A device behind a [`Link`], one method per request (see the module docs of `crate::link`).
///
/// Bulk writes (`set_parameters`, `load_input`) send one request each: the caller splits its
/// values to fit the device's `max_request`. Results (`forward`, `evaluate_perturbed`,
/// `read_parameters`) are read whole, block by block ([`Client::fetch`]).
pub struct Client<T: Transport = Box<dyn Transport>> {
    link: Link<T>,
}

impl<T: Transport> Client<T> {
    pub fn new(link: Link<T>) -> Self {
        Self { link }
    }

    pub fn link(&self) -> &Link<T> {
        &self.link
    }

    pub fn link_mut(&mut self) -> &mut Link<T> {
        &mut self.link
    }

    pub fn into_link(self) -> Link<T> {
        self.link
    }

    pub fn counters(&self) -> LinkCounters {
        self.link.counters()
    }

    /// Sends `request` and returns the raw body of its reply.
    pub fn call(&mut self, request: &Request<'_>) -> Result<&[u8], ClientError> {
        Ok(self.link.call(request)?)
    }

    /// Sends a request whose reply is an `Ack`.
    pub fn ack(&mut self, request: &Request<'_>) -> Result<(), ClientError> {
        let body = self.link.call(request)?;
        match postcard::from_bytes::<Response>(body) {
            Ok(Response::Ack) => Ok(()),
            _ => Err(unexpected(request, body)),
        }
    }

    /// The handshake: what the device is, refused when it speaks another protocol version
    /// (read from the first field of its reply, whatever the rest of the reply holds).
    pub fn hello(&mut self) -> Result<DeviceInfo<'_>, ClientError> {
        let hello = Request::Hello {
            protocol_version: PROTOCOL_VERSION,
        };
        let body = self.link.call(&hello)?;
        match postcard::from_bytes::<Response>(body) {
            Ok(Response::Hello(info)) if info.protocol_version == PROTOCOL_VERSION => Ok(info),
            Ok(Response::Hello(info)) => Err(ClientError::VersionMismatch {
                device: info.protocol_version,
            }),
            _ => match peek_hello_version(body).filter(|&v| v != PROTOCOL_VERSION) {
                Some(device) => Err(ClientError::VersionMismatch { device }),
                None => Err(unexpected(&hello, body)),
            },
        }
    }

    /// The device's boot id, from a `Hello`: a device that has reset answers with a new one.
    pub fn boot_id(&mut self) -> Result<u32, ClientError> {
        self.hello().map(|info| info.boot_id)
    }

    pub fn describe_layer(&mut self, layer: u8) -> Result<LayerDescriptor, ClientError> {
        let request = Request::DescribeLayer { layer };
        let body = self.link.call(&request)?;
        match postcard::from_bytes::<Response>(body) {
            Ok(Response::Layer(d)) => Ok(d),
            _ => Err(unexpected(&request, body)),
        }
    }

    /// Parameters `offset..offset + values.len()` of `layer`, in one request.
    pub fn set_parameters(
        &mut self,
        layer: u8,
        offset: u32,
        values: &[f32],
    ) -> Result<(), ClientError> {
        self.ack(&Request::SetParameters {
            layer,
            offset,
            values: Packed::Items(values),
        })
    }

    /// Values `offset..offset + values.len()` of a batch of `rows` rows for `layer`, in one
    /// request.
    pub fn load_input(
        &mut self,
        layer: u8,
        rows: u32,
        offset: u32,
        values: &[f32],
    ) -> Result<(), ClientError> {
        self.ack(&Request::LoadInput {
            layer,
            rows,
            offset,
            values: Packed::Items(values),
        })
    }

    /// Values `offset..` of an input batch as 8-bit pixels the device normalises
    /// ([`Request::LoadPixels`]).
    pub fn load_pixels(
        &mut self,
        layer: u8,
        rows: u32,
        offset: u32,
        normaliser: PixelNormaliser,
        pixels: &[u8],
    ) -> Result<(), ClientError> {
        self.ack(&Request::LoadPixels {
            layer,
            rows,
            offset,
            normaliser,
            pixels,
        })
    }

    pub fn apply_update(
        &mut self,
        layer: u8,
        chunk: ChunkRange,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), ClientError> {
        self.ack(&Request::ApplyUpdate {
            layer,
            chunk,
            scale,
            terms: Packed::Items(terms),
        })
    }

    /// Drops everything the device holds (parameters, inputs, results).
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.ack(&Request::Reset)
    }

    /// A clean forward pass of the loaded batch: `expected` values in `encoding` into `out`.
    pub fn forward(
        &mut self,
        layer: u8,
        mode: ForwardMode,
        expected: usize,
        encoding: ActivationEncoding,
        out: &mut Vec<f32>,
    ) -> Result<(), ClientError> {
        self.fetch(&Request::Forward { layer, mode }, expected, encoding, out)
    }

    /// The outputs at `+eps` and `-eps` along each seed's direction over `chunk`, pair after
    /// pair: `expected` values in `encoding` into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_perturbed(
        &mut self,
        layer: u8,
        chunk: ChunkRange,
        eps: f32,
        seeds: &[DirectionSeed],
        expected: usize,
        encoding: ActivationEncoding,
        out: &mut Vec<f32>,
    ) -> Result<(), ClientError> {
        let request = Request::EvaluatePerturbed {
            layer,
            chunk,
            eps,
            seeds: Packed::Items(seeds),
        };
        self.fetch(&request, expected, encoding, out)
    }

    /// The `count` parameters of `layer` as the device holds them, into `out`.
    pub fn read_parameters(
        &mut self,
        layer: u8,
        count: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ClientError> {
        let request = Request::ReadParameters { layer };
        self.fetch(&request, count, ActivationEncoding::F32, out)
    }

    /// The `count` values of `layer`'s state outside its parameters
    /// ([`crate::shape::LayerShape::state_len`]) as the device holds them, into `out`.
    pub fn read_layer_state(
        &mut self,
        layer: u8,
        count: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ClientError> {
        let request = Request::ReadLayerState { layer };
        self.fetch(&request, count, ActivationEncoding::F32, out)
    }

    /// Values `offset..offset + values.len()` of `layer`'s state, in one request.
    pub fn write_layer_state(
        &mut self,
        layer: u8,
        offset: u32,
        values: &[f32],
    ) -> Result<(), ClientError> {
        self.ack(&Request::WriteLayerState {
            layer,
            offset,
            values: Packed::Items(values),
        })
    }

    /// Issues `request`, then reads its whole result (`expected` values in `encoding`) into
    /// `out`, asking for the rest with `ReadResult` while the device's replies fall short.
    pub fn fetch(
        &mut self,
        request: &Request<'_>,
        expected: usize,
        encoding: ActivationEncoding,
        out: &mut Vec<f32>,
    ) -> Result<(), ClientError> {
        out.clear();
        let size = encoding.size();
        let total_bytes = expected * size;
        let mut current = request.clone();
        loop {
            let body = self.link.call(&current)?;
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
                return Err(ClientError::BadResult {
                    request: request_name(request),
                    offset,
                    end: offset + bytes.len(),
                    total,
                    expected: total_bytes,
                    from: out.len() * size,
                });
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
}

impl ClientError {
    /// Whether the device is up and said no (as opposed to a link or protocol failure).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Refused { .. })
    }
}
