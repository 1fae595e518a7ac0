//! Layers on a device behind a serial port (USB CDC, UART, or the emulator's pseudo-terminal),
//! speaking `firmware_protocol`.
//!
//! `--backend serial:/dev/ttyUSB0?baud=921600&timeout_ms=2000&retries=3` opens the port,
//! handshakes (protocol version, device name, boot id, layers), checks that the device holds
//! the model's layers, and hands out one [`SerialOracle`] per layer, all sharing the link.
//! Directions go up as seeds only; each batch's input goes up once per layer; activations come
//! down in the encoding the device declares. See `devices/README.md` for the device side.
//!
//! `--backend tcp:HOST:PORT?timeout_ms=2000&retries=3` reaches the same device over a TCP
//! stream carrying the same frames (a board exported by ser2net's raw mode, or
//! `pnn-emulate --listen`); `baud` there is the rate of the serial line behind the socket, which
//! sets how long a long reply may take.
//!
//! The link itself (transport, retransmission, counters, the typed client) is
//! `firmware_protocol::link`, which the emulator (`pnn_emulator`) shares.

pub mod device;

use std::time::Duration;

pub use device::{SerialDevice, SerialOracle};
use firmware_protocol::link::{Link, RetryPolicy, SerialPortTransport, TcpTransport, Transport};

use crate::oracle::{LayerShape, OracleError};

/// Where and how to reach a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialSpec {
    /// The port's path (`serial:`), or `HOST:PORT` (`tcp:`).
    pub path: String,
    pub baud: u32,
    /// Silence after which a request is retransmitted.
    pub timeout: Duration,
    /// Retransmissions before the run ends with an error.
    pub retries: u32,
    /// A dataset's pixels go up as bytes the device normalises (`pixels=1`, the default), or
    /// as f32 values (`pixels=0`: what the link carried before, for comparisons).
    pub pixels: bool,
}

impl SerialSpec {
    pub const DEFAULT_BAUD: u32 = 921_600;
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);
    pub const DEFAULT_RETRIES: u32 = 3;

    /// Parses what follows `serial:`: `PATH[?baud=N&timeout_ms=N&retries=N]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (path, _) = s.split_once('?').unwrap_or((s, ""));
        if path.is_empty() {
            return Err("serial backend needs a port: serial:/dev/ttyUSB0".into());
        }
        Self::parse_options(s, "serial")
    }

    /// Parses what follows `tcp:`: `HOST:PORT[?baud=N&timeout_ms=N&retries=N]`.
    pub fn parse_tcp(s: &str) -> Result<Self, String> {
        let (addr, _) = s.split_once('?').unwrap_or((s, ""));
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Self::parse_options(s, "tcp")
            }
            _ => Err(format!(
                "tcp backend needs HOST:PORT with a port from 1 to 65535, got '{addr}' (e.g. tcp:127.0.0.1:4000)"
            )),
        }
    }

    fn parse_options(s: &str, kind: &str) -> Result<Self, String> {
        let (path, query) = s.split_once('?').unwrap_or((s, ""));
        let mut spec = Self {
            path: path.to_string(),
            baud: Self::DEFAULT_BAUD,
            timeout: Self::DEFAULT_TIMEOUT,
            retries: Self::DEFAULT_RETRIES,
            pixels: true,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{kind} option '{pair}' is not key=value"))?;
            let number = |what: &str| {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{kind} option {key}: '{value}' is not a {what}"))
            };
            match key {
                "baud" => match number("baud rate")? {
                    0 => return Err(format!("{kind} option baud must be positive")),
                    b => spec.baud = u32::try_from(b).map_err(|_| "baud rate too large")?,
                },
                "timeout_ms" => match number("number of milliseconds")? {
                    0 => return Err(format!("{kind} option timeout_ms must be positive")),
                    t => spec.timeout = Duration::from_millis(t),
                },
                "retries" => {
                    spec.retries = u32::try_from(number("count")?)
                        .map_err(|_| "retries too large")?
                        .min(100)
                }
                "pixels" => match value {
                    "0" => spec.pixels = false,
                    "1" => spec.pixels = true,
                    _ => return Err(format!("{kind} option pixels: '{value}' is not 0 or 1")),
                },
                other => {
                    return Err(format!(
                        "unknown {kind} option '{other}' (expected baud, timeout_ms, retries, pixels)"
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
        .map(|d| d.send_pixels(spec.pixels))
        .map_err(|e| match e {
            OracleError::Link(m) => OracleError::Link(format!("{}: {m}", spec.path)),
            other => other,
        })
}

/// Connects to `HOST:PORT` and handshakes, without checking the layers against a model.
pub fn connect_tcp(spec: &SerialSpec) -> Result<SerialDevice, OracleError> {
    let transport = TcpTransport::connect(&spec.path, spec.timeout)
        .map_err(|e| OracleError::Link(format!("cannot connect to tcp:{}: {e}", spec.path)))?;
    SerialDevice::connect(Link::new(Box::new(transport), spec.policy(), first_seq())).map_err(|e| {
        match e {
            OracleError::Link(m) => OracleError::Link(format!("tcp:{}: {m}", spec.path)),
            other => other,
        }
    })
}

/// Connects to `HOST:PORT` and returns one oracle per model layer.
pub fn open_tcp(
    spec: &SerialSpec,
    layers: &[LayerShape],
) -> Result<Vec<SerialOracle>, OracleError> {
    connect_tcp(spec)?.oracles(layers)
}

/// Opens the port and returns one oracle per model layer.
pub fn open(spec: &SerialSpec, layers: &[LayerShape]) -> Result<Vec<SerialOracle>, OracleError> {
    connect(spec)?.oracles(layers)
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
        let t = SerialSpec::parse_tcp("127.0.0.1:4000?timeout_ms=50").unwrap();
        assert_eq!(
            (t.path.as_str(), t.timeout),
            ("127.0.0.1:4000", Duration::from_millis(50))
        );
        assert_eq!(
            SerialSpec::parse_tcp("[::1]:4000").unwrap().path,
            "[::1]:4000"
        );
        for bad in [
            "",
            "host",
            "host:",
            ":4000",
            "host:0",
            "host:99999",
            "h:1?speed=3",
        ] {
            let e = SerialSpec::parse_tcp(bad).unwrap_err();
            assert!(e.contains("tcp"), "{bad}: {e}");
        }
    }
}
