//! A rig: which device runs which layer of the model. A lab's hardware comes as several boards,
//! one per layer or a few layers each, on USB serial ports or on another host; a rig names
//! them, and the host opens one [`ForwardOracle`](crate::oracle::ForwardOracle) per model layer
//! from it.
//!
//! Two spellings, one meaning:
//!
//! - `--backend` with one backend per layer, comma-separated:
//!   `serial:/dev/ttyACM0,serial:/dev/ttyACM1`, or `sim,tcp:lab-pi:4000`. Layers given the same
//!   spelling are one device holding those layers (`serial:/dev/ttyACM0,serial:/dev/ttyACM0`
//!   is one board with both layers).
//! - `--rig rigs/X.ron`, a file naming the devices, their link options and the layers each
//!   holds (see `rigs/` for examples):
//!
//! ```ron
//! (
//!     devices: [
//!         (name: "board-a", backend: "serial:/dev/ttyACM0", layers: [0]),
//!         (name: "board-b", backend: "tcp:lab-pi.local:4000", timeout_ms: 5000, layers: [1]),
//!     ],
//! )
//! ```
//!
//! A device holds its layers in the order given (a board holding model layers 1 and 2 describes
//! them as its layers 0 and 1); the handshake checks that each device holds exactly the layers
//! the rig gives it, before any training. Checkpoints record the rig as its per-layer spelling
//! with every link option written out, so `--resume` reopens the same devices.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::serial::SerialSpec;
use super::{AnyOracle, BackendSpec};
use crate::oracle::{LayerShape, OracleError};

/// One device of a rig: a backend and the model layers it holds, in the device's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RigDevice {
    /// A name for messages (the file's, else the backend's spelling).
    pub name: String,
    pub backend: BackendSpec,
    pub layers: Vec<usize>,
}

/// Which device runs which layer; every layer `0..n` on exactly one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rig {
    devices: Vec<RigDevice>,
}

impl Rig {
    /// A rig of `devices`, checked: each holds at least one layer, no layer is held twice, the
    /// layers are `0..n` with none missing, and no port is named by two devices.
    pub fn new(devices: Vec<RigDevice>) -> Result<Self, String> {
        if devices.is_empty() {
            return Err("a rig needs at least one device".into());
        }
        let mut held: Vec<Option<&str>> = Vec::new();
        for (k, device) in devices.iter().enumerate() {
            if matches!(device.backend, BackendSpec::Rig(_)) {
                return Err(format!("device '{}': a rig inside a rig", device.name));
            }
            if device.layers.is_empty() {
                return Err(format!("device '{}' holds no layers", device.name));
            }
            for &l in &device.layers {
                if held.len() <= l {
                    held.resize(l + 1, None);
                }
                if let Some(other) = held[l] {
                    return Err(format!(
                        "layer {l} is given to two devices, '{other}' and '{}'",
                        device.name
                    ));
                }
                held[l] = Some(&device.name);
            }
            if let Some(port) = device.backend.port()
                && let Some(other) =
                    (devices[..k].iter()).find(|d| d.backend.port().as_ref() == Some(&port))
            {
                return Err(format!(
                    "devices '{}' and '{}' are both on {port}: one port reaches one device (give it both layers instead)",
                    other.name, device.name
                ));
            }
        }
        if let Some(missing) = held.iter().position(Option::is_none) {
            return Err(format!(
                "no device holds layer {missing} (the rig's layers must be 0 to {} with none missing)",
                held.len() - 1
            ));
        }
        Ok(Self { devices })
    }

    /// One backend per layer, in layer order; equal spellings are one device.
    pub fn per_layer(backends: Vec<BackendSpec>) -> Result<Self, String> {
        let mut devices: Vec<RigDevice> = Vec::new();
        for (l, backend) in backends.into_iter().enumerate() {
            match devices.iter_mut().find(|d| d.backend == backend) {
                Some(device) => device.layers.push(l),
                None => devices.push(RigDevice {
                    name: backend.to_string(),
                    backend,
                    layers: vec![l],
                }),
            }
        }
        Self::new(devices)
    }

    /// Reads a rig file (see the module docs); errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read rig file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("rig file {}: {e}", path.display()))
    }

    /// Parses a rig file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let options = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        let file: RigFile = options.from_str(text).map_err(|e| {
            let at = pnn_sim::ron_error::locate(text, &e);
            format!(
                "line {}, column {}: {}{}",
                at.line,
                at.column,
                at.key.map(|k| format!("key `{k}`: ")).unwrap_or_default(),
                at.message
            )
        })?;
        let devices = file
            .devices
            .into_iter()
            .enumerate()
            .map(|(k, d)| d.resolve(k))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(devices)
    }

    pub fn devices(&self) -> &[RigDevice] {
        &self.devices
    }

    /// How many model layers the rig holds.
    pub fn layer_count(&self) -> usize {
        self.devices.iter().map(|d| d.layers.len()).sum()
    }

    /// The backend of each layer, in layer order.
    pub fn layer_backends(&self) -> Vec<&BackendSpec> {
        let mut out = vec![None; self.layer_count()];
        for d in &self.devices {
            for &l in &d.layers {
                out[l] = Some(&d.backend);
            }
        }
        out.into_iter().map(|b| b.expect("checked")).collect()
    }

    /// The per-layer spelling with every link option written out (what checkpoints store).
    pub fn spelled_out(&self) -> String {
        (self.layer_backends().iter())
            .map(|b| b.spelled_out())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether every device is the simulator (in process).
    pub fn is_simulated(&self) -> bool {
        self.devices.iter().all(|d| d.backend.is_simulated())
    }

    /// Opens every device and returns one oracle per model layer: each device's handshake checks
    /// it holds exactly its layers, so a mismatch between rig and devices ends here, before any
    /// training, naming the device.
    pub fn open(&self, layers: &[LayerShape]) -> Result<Vec<AnyOracle>, OracleError> {
        if self.layer_count() != layers.len() {
            return Err(OracleError::Shape(format!(
                "the rig holds {} layers ({}), the model has {}",
                self.layer_count(),
                self.devices
                    .iter()
                    .map(|d| format!("'{}': {:?}", d.name, d.layers))
                    .collect::<Vec<_>>()
                    .join(", "),
                layers.len()
            )));
        }
        let mut out: Vec<Option<AnyOracle>> = (0..layers.len()).map(|_| None).collect();
        for device in &self.devices {
            let shapes: Vec<LayerShape> = device.layers.iter().map(|&l| layers[l]).collect();
            let context = |e: OracleError| {
                let at = format!("device '{}' (layers {:?})", device.name, device.layers);
                match e {
                    OracleError::Shape(m) => OracleError::Shape(format!("{at}: {m}")),
                    OracleError::Refused(m) => OracleError::Refused(format!("{at}: {m}")),
                    OracleError::Link(m) => OracleError::Link(format!("{at}: {m}")),
                    OracleError::Backend(m) => OracleError::Backend(format!("{at}: {m}")),
                    other => other,
                }
            };
            // Each layer keyed by its index in the model, as a whole-model backend keys it.
            let oracles =
                super::open_at(&device.backend, &shapes, &device.layers).map_err(context)?;
            for (&l, oracle) in device.layers.iter().zip(oracles) {
                out[l] = Some(oracle);
            }
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every layer held"))
            .collect())
    }
}

/// The per-layer spelling (options left at what was written).
impl fmt::Display for Rig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .layer_backends()
            .iter()
            .map(|b| b.to_string())
            .collect();
        f.write_str(&names.join(","))
    }
}

/// A rig file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RigFile {
    devices: Vec<DeviceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    #[serde(default)]
    name: Option<String>,
    /// `sim`, `sim:<profile.ron>`, `serial:PATH` or `tcp:HOST:PORT` (options may follow `?`).
    backend: String,
    layers: Vec<usize>,
    #[serde(default)]
    baud: Option<u32>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    retries: Option<u32>,
}

impl DeviceEntry {
    fn resolve(self, k: usize) -> Result<RigDevice, String> {
        let name = self.name.unwrap_or_else(|| format!("device {k}"));
        let mut backend: BackendSpec = self
            .backend
            .parse()
            .map_err(|e| format!("device '{name}': {e}"))?;
        if matches!(backend, BackendSpec::Rig(_)) {
            return Err(format!(
                "device '{name}': one backend per device (list its layers instead)"
            ));
        }
        let options = [
            self.baud.map(|_| "baud"),
            self.timeout_ms.map(|_| "timeout_ms"),
            self.retries.map(|_| "retries"),
        ];
        match &mut backend {
            BackendSpec::Serial(spec) | BackendSpec::Tcp(spec) => {
                let mut query = Vec::new();
                if let Some(b) = self.baud {
                    query.push(format!("baud={b}"));
                }
                if let Some(t) = self.timeout_ms {
                    query.push(format!("timeout_ms={t}"));
                }
                if let Some(r) = self.retries {
                    query.push(format!("retries={r}"));
                }
                // Checked as the same options in the backend's spelling would be.
                let checked = SerialSpec::parse(&format!("x?{}", query.join("&")))
                    .map_err(|e| format!("device '{name}': {e}"))?;
                if self.baud.is_some() {
                    spec.baud = checked.baud;
                }
                if self.timeout_ms.is_some() {
                    spec.timeout = checked.timeout;
                }
                if self.retries.is_some() {
                    spec.retries = checked.retries;
                }
            }
            _ => {
                if let Some(option) = options.into_iter().flatten().next() {
                    return Err(format!(
                        "device '{name}': {option} is a link option, and {} has no link",
                        self.backend
                    ));
                }
            }
        }
        Ok(RigDevice {
            name,
            backend,
            layers: self.layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_layer_lists_group_equal_spellings_into_devices() {
        let rig: BackendSpec = "serial:/dev/a,sim,serial:/dev/a".parse().unwrap();
        let BackendSpec::Rig(rig) = rig else {
            panic!("a list is a rig")
        };
        let held: Vec<_> = rig.devices().iter().map(|d| d.layers.clone()).collect();
        assert_eq!(held, vec![vec![0, 2], vec![1]]);
        assert_eq!(rig.to_string(), "serial:/dev/a,sim,serial:/dev/a");
        assert_eq!(
            rig.spelled_out(),
            "serial:/dev/a?baud=921600&timeout_ms=2000&retries=3,sim,serial:/dev/a?baud=921600&timeout_ms=2000&retries=3"
        );
        // What checkpoints store reads back to the same rig.
        assert_eq!(
            rig.spelled_out().parse::<BackendSpec>().unwrap(),
            BackendSpec::Rig(rig.clone())
        );
        assert!(!rig.is_simulated());
        let err = "sim,bogus".parse::<BackendSpec>().unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn rig_files_name_devices_options_and_layers() {
        let rig = Rig::parse(
            r#"// two boards
            (devices: [
                (name: "a", backend: "serial:/dev/ttyACM0", baud: 115200, layers: [1, 2]),
                (name: "b", backend: "tcp:127.0.0.1:4000", timeout_ms: 50, retries: 1, layers: [0]),
            ])"#,
        )
        .unwrap();
        let [a, b] = rig.devices() else {
            panic!("two devices")
        };
        let (BackendSpec::Serial(sa), BackendSpec::Tcp(sb)) = (&a.backend, &b.backend) else {
            panic!("{rig:?}")
        };
        assert_eq!((sa.baud, a.layers.as_slice()), (115_200, &[1, 2][..]));
        assert_eq!((sb.timeout.as_millis(), sb.retries), (50, 1));
        assert_eq!(
            rig.to_string(),
            "tcp:127.0.0.1:4000,serial:/dev/ttyACM0,serial:/dev/ttyACM0"
        );
        for (text, says) in [
            ("(devices: [])", "at least one device"),
            (
                r#"(devices: [(backend: "sim", layers: [0, 0])])"#,
                "two devices",
            ),
            (r#"(devices: [(backend: "sim", layers: [1])])"#, "layer 0"),
            (r#"(devices: [(backend: "sim", layers: [])])"#, "no layers"),
            (
                r#"(devices: [(backend: "sim", baud: 9600, layers: [0])])"#,
                "has no link",
            ),
            (
                r#"(devices: [(backend: "serial:/d", timeout_ms: 0, layers: [0])])"#,
                "timeout_ms",
            ),
            (
                r#"(devices: [(backend: "serial:/d", layers: [0]), (backend: "serial:/d", layers: [1])])"#,
                "both on serial:/d",
            ),
            (r#"(devices: [(backend: "sim", layer: [0])])"#, "line 1"),
            (
                r#"(devices: [(backend: "sim,sim", layers: [0])])"#,
                "one backend per device",
            ),
        ] {
            let err = Rig::parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn the_example_rigs_read() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/rigs");
        let mut read = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rig = Rig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                rig.layer_count(),
                2,
                "{}: the MNIST MLP's layers",
                path.display()
            );
            read += 1;
        }
        assert!(read >= 3);
    }

    #[test]
    fn a_rig_of_other_size_than_the_model_is_refused_before_opening_anything() {
        let rig = Rig::per_layer(vec![BackendSpec::Sim, BackendSpec::Sim]).unwrap();
        let err = rig
            .open(&[LayerShape::dense(4, 3)])
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("holds 2 layers") && err.contains("has 1"),
            "{err}"
        );
    }
}
