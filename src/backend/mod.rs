//! Backends: where layers execute. Each provides one [`crate::oracle::ForwardOracle`] per layer.

pub mod sim;

use std::fmt;
use std::str::FromStr;

/// A backend as named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    /// The ideal simulated PNN, in process.
    Sim,
}

impl FromStr for BackendSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sim" => Ok(Self::Sim),
            other => Err(format!("unknown backend '{other}' (expected: sim)")),
        }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sim => f.write_str("sim"),
        }
    }
}
