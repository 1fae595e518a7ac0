//! Backends: where layers execute. Each provides one [`ForwardOracle`] per layer; [`AnyOracle`]
//! is the one enum at the command-line boundary (the trainer itself is generic).

pub mod gpu;
pub mod rig;
pub mod serial;
pub mod sim;

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;

use crate::oracle::{
    Activations, DeviceLink, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, InProcess,
    LayerShape, OracleError, PerturbedPair, UpdateTerm,
};
use gpu::{GpuOracle, GpuSpec};
pub use rig::Rig;
use serial::{SerialOracle, SerialSpec};
use sim::SimOracle;

/// A backend as named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    /// The ideal simulated PNN, in process.
    Sim,
    /// The simulated PNN with the hardware effects of a device profile (`sim:devices/x.ron`).
    SimProfile(PathBuf),
    /// A device (or the emulator) on a serial port: `serial:PATH?baud=N&timeout_ms=N&retries=N`.
    Serial(SerialSpec),
    /// A device (or `pnn-emulate --listen`) behind a TCP socket, e.g. a board exported by
    /// ser2net's raw mode: `tcp:HOST:PORT?timeout_ms=N&retries=N`.
    Tcp(SerialSpec),
    /// Several devices, each holding some of the layers (`--backend a,b` with one backend per
    /// layer, or `--rig FILE`); see [`rig`].
    Rig(Rig),
    /// The simulated PNN on a GPU: `gpu`, `gpu:<adapter name>` or `gpu:<profile.ron>`.
    Gpu(GpuSpec),
}

impl FromStr for BackendSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains(',') {
            let layers = s
                .split(',')
                .enumerate()
                .map(|(l, one)| {
                    Self::one(one.trim()).map_err(|e| format!("layer {l}'s backend: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Rig::per_layer(layers).map(Self::Rig);
        }
        Self::one(s)
    }
}

impl BackendSpec {
    /// One backend (no commas).
    fn one(s: &str) -> Result<Self, String> {
        match s {
            "sim" => Ok(Self::Sim),
            "gpu" => Ok(Self::Gpu(GpuSpec::default())),
            _ if s.starts_with("gpu:") => GpuSpec::parse(&s[4..]).map(Self::Gpu),
            _ if s.starts_with("sim:") && s.len() > 4 => {
                Ok(Self::SimProfile(PathBuf::from(&s[4..])))
            }
            other => {
                if let Some(rest) = other.strip_prefix("serial:") {
                    return SerialSpec::parse(rest).map(Self::Serial);
                }
                if let Some(rest) = other.strip_prefix("tcp:") {
                    return SerialSpec::parse_tcp(rest).map(Self::Tcp);
                }
                Err(format!(
                    "unknown backend '{other}' (expected: sim, sim:<profile.ron> such as sim:devices/pcm.ron, serial:PATH, tcp:HOST:PORT, gpu, gpu:<adapter name> or gpu:<profile.ron>, or one of these per layer, comma-separated)"
                ))
            }
        }
    }

    /// The backend as `--backend` takes it, every link option written out (what checkpoints
    /// store, so a resumed run reopens the same devices the same way).
    pub fn spelled_out(&self) -> String {
        let options = |s: &SerialSpec| {
            format!(
                "{}?baud={}&timeout_ms={}&retries={}{}",
                s.path,
                s.baud,
                s.timeout.as_millis(),
                s.retries,
                if s.pixels { "" } else { "&pixels=0" }
            )
        };
        match self {
            Self::Serial(s) => format!("serial:{}", options(s)),
            Self::Tcp(s) => format!("tcp:{}", options(s)),
            Self::Rig(r) => r.spelled_out(),
            other => other.to_string(),
        }
    }

    /// Whether every layer runs on the simulator, in process.
    pub fn is_simulated(&self) -> bool {
        match self {
            Self::Sim | Self::SimProfile(_) | Self::Gpu(_) => true,
            Self::Serial(_) | Self::Tcp(_) => false,
            Self::Rig(r) => r.is_simulated(),
        }
    }

    /// The port a device backend is on (`serial:PATH`, `tcp:HOST:PORT`), which one device owns.
    pub fn port(&self) -> Option<String> {
        match self {
            Self::Serial(s) => Some(format!("serial:{}", s.path)),
            Self::Tcp(s) => Some(format!("tcp:{}", s.path)),
            _ => None,
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sim => f.write_str("sim"),
            Self::SimProfile(path) => write!(f, "sim:{}", path.display()),
            Self::Serial(s) => write!(f, "serial:{}", s.path),
            Self::Tcp(s) => write!(f, "tcp:{}", s.path),
            Self::Rig(r) => r.fmt(f),
            Self::Gpu(g) => write!(f, "{g}"),
        }
    }
}

/// Opens the backend and returns one oracle per layer of the model.
pub fn open(spec: &BackendSpec, layers: &[LayerShape]) -> Result<Vec<AnyOracle>, OracleError> {
    let indices: Vec<usize> = (0..layers.len()).collect();
    open_at(spec, layers, &indices)
}

/// [`open`] for some of a model's layers: `layers[k]` is layer `indices[k]` of the model (a rig
/// device holds some of them), which a noisy profile keys each layer's noise streams by.
pub(crate) fn open_at(
    spec: &BackendSpec,
    layers: &[LayerShape],
    indices: &[usize],
) -> Result<Vec<AnyOracle>, OracleError> {
    match spec {
        BackendSpec::Sim => Ok(SimOracle::for_layers(layers)
            .into_iter()
            .map(AnyOracle::Sim)
            .collect()),
        BackendSpec::SimProfile(path) => {
            let profile = pnn_sim::profile::DeviceProfile::load(path)
                .map_err(|e| OracleError::Profile(e.to_string()))?;
            (layers.iter().zip(indices))
                .map(|(s, &l)| SimOracle::with_noise(*s, &profile.noise, l).map(AnyOracle::Sim))
                .collect()
        }
        BackendSpec::Serial(s) => Ok(serial::open(s, layers)?
            .into_iter()
            .map(AnyOracle::Serial)
            .collect()),
        BackendSpec::Tcp(s) => Ok(serial::open_tcp(s, layers)?
            .into_iter()
            .map(AnyOracle::Serial)
            .collect()),
        BackendSpec::Rig(rig) => rig.open(layers),
        BackendSpec::Gpu(g) => Ok(gpu::open(g, layers)?
            .into_iter()
            .map(AnyOracle::Gpu)
            .collect()),
    }
}

/// Any backend's oracle.
// One value per layer of the model: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyOracle {
    Sim(SimOracle),
    Serial(SerialOracle),
    Gpu(GpuOracle),
}

macro_rules! dispatch {
    ($self:ident, $o:ident => $e:expr) => {
        match $self {
            AnyOracle::Sim($o) => $e,
            AnyOracle::Serial($o) => $e,
            AnyOracle::Gpu($o) => $e,
        }
    };
}

impl ForwardOracle for AnyOracle {
    fn spec(&self) -> &LayerShape {
        dispatch!(self, o => o.spec())
    }

    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        dispatch!(self, o => o.write_parameters(params))
    }

    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        dispatch!(self, o => o.read_parameters())
    }

    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        dispatch!(self, o => o.load_input(input))
    }

    fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        dispatch!(self, o => o.forward(mode))
    }

    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<PerturbedPair>,
    ) -> Result<(), OracleError> {
        dispatch!(self, o => o.evaluate_perturbed(chunk, seeds, eps, out))
    }

    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError> {
        dispatch!(self, o => o.apply_update(chunk, scale, terms))
    }

    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        dispatch!(self, o => o.read_layer_state())
    }

    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        dispatch!(self, o => o.write_layer_state(state))
    }

    fn in_process(&mut self) -> Option<&mut dyn InProcess> {
        dispatch!(self, o => o.in_process())
    }

    fn link(&self) -> Option<&dyn DeviceLink> {
        dispatch!(self, o => o.link())
    }

    fn link_mut(&mut self) -> Option<&mut dyn DeviceLink> {
        dispatch!(self, o => o.link_mut())
    }
}
