//! Layers on a device behind a serial port (USB CDC, UART, or the emulator's pseudo-terminal),
//! speaking `firmware_protocol`.
//!
//! `--backend serial:/dev/ttyUSB0?baud=921600&timeout_ms=2000&retries=3` opens the port,
//! handshakes (protocol version, device name, boot id, layers), checks that the device holds
//! the model's layers, and hands out one [`SerialOracle`] per layer, all sharing the link.
//! Directions go up as seeds only; each batch's input goes up once per layer; activations come
//! down in the encoding the device declares. See `devices/README.md` for the device side.
//!
//! The link itself (transport, retransmission, counters, the typed client) is
//! `firmware_protocol::link`, which the emulator (`pnn_emulator`) shares.

pub mod device;

use std::time::Duration;

pub use device::{SerialDevice, SerialOracle};
use firmware_protocol::link::{Link, RetryPolicy, SerialPortTransport, Transport};

use crate::oracle::{LayerShape, OracleError};

/// Where and how to reach a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialSpec {
    pub path: String,
    pub baud: u32,
    /// Silence after which a request is retransmitted.
    pub timeout: Duration,
    /// Retransmissions before the run ends with an error.
    pub retries: u32,
}

impl SerialSpec {
    pub const DEFAULT_BAUD: u32 = 921_600;
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
    pub const DEFAULT_RETRIES: u32 = 3;

    /// Parses what follows `serial:`: `PATH[?baud=N&timeout_ms=N&retries=N]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (path, query) = s.split_once('?').unwrap_or((s, ""));
        if path.is_empty() {
            return Err("serial backend needs a port: serial:/dev/ttyUSB0".into());
        }
        let mut spec = Self {
            path: path.to_string(),
            baud: Self::DEFAULT_BAUD,
            timeout: Self::DEFAULT_TIMEOUT,
            retries: Self::DEFAULT_RETRIES,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("serial option '{pair}' is not key=value"))?;
            let number = |what: &str| {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("serial option {key}: '{value}' is not a {what}"))
            };
            match key {
                "baud" => match number("baud rate")? {
                    0 => return Err("serial option baud must be positive".into()),
                    b => spec.baud = u32::try_from(b).map_err(|_| "baud rate too large")?,
                },
                "timeout_ms" => match number("number of milliseconds")? {
                    0 => return Err("serial option timeout_ms must be positive".into()),
                    t => spec.timeout = Duration::from_millis(t),
                },
                "retries" => {
                    spec.retries = u32::try_from(number("count")?)
                        .map_err(|_| "retries too large")?
                        .min(100)
                }
                other => {
                    return Err(format!(
                        "unknown serial option '{other}' (expected baud, timeout_ms, retries)"
                    ));
                }
            }
        }
        Ok(spec)
    }

    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            timeout: self.timeout,
            retries: self.retries,
            baud: self.baud,
        }
    }
}

/// A first sequence number that differs between runs (see `firmware_protocol::link::fresh_nonce`).
fn first_seq() -> u16 {
    firmware_protocol::link::fresh_nonce() as u16
}

/// Connects over `transport` and returns one oracle per model layer.
pub fn open_transport(
    transport: Box<dyn Transport>,
    policy: RetryPolicy,
    layers: &[LayerShape],
) -> Result<Vec<SerialOracle>, OracleError> {
    SerialDevice::connect(Link::new(transport, policy, first_seq()))?.oracles(layers)
}

/// Opens the port and handshakes, without checking the layers against a model.
pub fn connect(spec: &SerialSpec) -> Result<SerialDevice, OracleError> {
    let transport = SerialPortTransport::open(&spec.path, spec.baud, spec.timeout)
        .map_err(|e| OracleError::Link(format!("cannot open serial port {}: {e}", spec.path)))?;
    SerialDevice::connect(Link::new(Box::new(transport), spec.policy(), first_seq()))
}

/// Opens the port and returns one oracle per model layer.
pub fn open(spec: &SerialSpec, layers: &[LayerShape]) -> Result<Vec<SerialOracle>, OracleError> {
    let transport = SerialPortTransport::open(&spec.path, spec.baud, spec.timeout)
        .map_err(|e| OracleError::Link(format!("cannot open serial port {}: {e}", spec.path)))?;
    open_transport(Box::new(transport), spec.policy(), layers).map_err(|e| match e {
        OracleError::Link(m) => OracleError::Link(format!("{}: {m}", spec.path)),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_options() {
        let s = SerialSpec::parse("/dev/ttyUSB0").unwrap();
        assert_eq!(s.baud, 921_600);
        assert_eq!(s.timeout, Duration::from_millis(2000));
        let s = SerialSpec::parse("/dev/pts/3?baud=115200&timeout_ms=50&retries=1").unwrap();
        assert_eq!(
            (s.path.as_str(), s.baud, s.timeout, s.retries),
            ("/dev/pts/3", 115_200, Duration::from_millis(50), 1)
        );
        for bad in [
            "",
            "?baud=1",
            "/d?baud=x",
            "/d?speed=3",
            "/d?timeout_ms=0",
            "/d?baud",
        ] {
            assert!(SerialSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
