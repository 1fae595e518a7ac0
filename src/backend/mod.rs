//! Backends: where layers execute. Each provides one [`ForwardOracle`] per layer; [`AnyOracle`]
//! is the one enum at the command-line boundary (the trainer itself is generic).

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
}

impl FromStr for BackendSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sim" => Ok(Self::Sim),
            _ if s.starts_with("sim:") && s.len() > 4 => {
                Ok(Self::SimProfile(PathBuf::from(&s[4..])))
            }
            other => match other.strip_prefix("serial:") {
                Some(rest) => SerialSpec::parse(rest).map(Self::Serial),
                None => Err(format!(
                    "unknown backend '{other}' (expected: sim, sim:<profile.ron> such as sim:devices/pcm.ron, or serial:PATH)"
                )),
            },
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sim => f.write_str("sim"),
            Self::SimProfile(path) => write!(f, "sim:{}", path.display()),
            Self::Serial(s) => write!(f, "serial:{}", s.path),
        }
    }
}

/// Opens the backend and returns one oracle per layer of the model.
pub fn open(spec: &BackendSpec, layers: &[LayerShape]) -> Result<Vec<AnyOracle>, OracleError> {
    match spec {
        BackendSpec::Sim => Ok(SimOracle::for_layers(layers)
            .into_iter()
            .map(AnyOracle::Sim)
            .collect()),
        BackendSpec::SimProfile(path) => {
            let profile = pnn_sim::profile::DeviceProfile::load(path)
                .map_err(|e| OracleError::Profile(e.to_string()))?;
            Ok(SimOracle::for_profile(layers, &profile)?
                .into_iter()
                .map(AnyOracle::Sim)
                .collect())
        }
        BackendSpec::Serial(s) => Ok(serial::open(s, layers)?
            .into_iter()
            .map(AnyOracle::Serial)
            .collect()),
    }
}

/// Any backend's oracle.
// One value per layer of the model: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyOracle {
    Sim(SimOracle),
    Serial(SerialOracle),
}

macro_rules! dispatch {
    ($self:ident, $o:ident => $e:expr) => {
        match $self {
            AnyOracle::Sim($o) => $e,
            AnyOracle::Serial($o) => $e,
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
