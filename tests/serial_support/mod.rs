//! Shared by the `serial_*` integration tests: the emulator binary on a pseudo-terminal, the
//! emulator in process over the shared in-memory pipe, and `pnn-train` runs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use firmware_protocol::link::{RetryPolicy, pipe};
use pnn::backend::serial::{self, SerialOracle};
use pnn::oracle::LayerShape;
use pnn_emulator::{EmulatorConfig, parse_layers};

/// An ideal emulated device of `layers` (as `--layers` names them) served on a thread over
/// `firmware_protocol::link::pipe`, by the emulator's one serve loop; returns the host's
/// oracles for `model` and the device's thread, which ends when the oracles are dropped.
pub fn in_process(layers: &str, model: &[LayerShape]) -> (Vec<SerialOracle>, JoinHandle<()>) {
    let (host, mut device) = pipe();
    let config = EmulatorConfig {
        boot_id: 9,
        ..EmulatorConfig::new("in-process", parse_layers(layers, 16, 0).unwrap())
    };
    let thread = std::thread::spawn(move || {
        pnn_emulator::serve(&mut device, &config, usize::MAX, false).expect("serves");
    });
    let policy = RetryPolicy {
        timeout: Duration::from_secs(10),
        retries: 0,
        baud: 921_600,
    };
    let oracles = serial::open_transport(Box::new(host), policy, model).expect("connects");
    (oracles, thread)
}

/// `pnn-emulate` running as a child process; killed when dropped.
pub struct Emulator {
    child: Child,
    /// Where the (first) device is served: a pseudo-terminal's path, or `HOST:PORT`.
    pub path: String,
    /// Where each device is served, in order (one per `--layers`).
    pub paths: Vec<String>,
}

impl Emulator {
    pub fn spawn(layers: &str, extra: &[&str]) -> Self {
        Self::spawn_profile("ideal", layers, extra)
    }

    /// An emulator of `devices/<profile>.ron`.
    pub fn spawn_profile(profile: &str, layers: &str, extra: &[&str]) -> Self {
        let emulator = Self::spawn_devices(&profile_path(profile), &[layers], extra);
        assert!(
            emulator.path.starts_with("/dev/"),
            "a pty: {}",
            emulator.path
        );
        emulator
    }

    /// One emulator process serving one device per entry of `devices` (each a `--layers`
    /// list), with `extra` arguments (`--listen ADDR` per device for TCP).
    pub fn spawn_devices(profile: &str, devices: &[&str], extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pnn-emulate"))
            .args(["--profile", profile])
            .args(devices.iter().flat_map(|d| ["--layers", d]))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("pnn-emulate starts");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let paths: Vec<String> = (0..devices.len())
            .map(|_| {
                let mut line = String::new();
                out.read_line(&mut line)
                    .expect("pnn-emulate prints where each device is");
                line.trim().to_string()
            })
            .collect();
        for p in &paths {
            assert!(
                p.starts_with("/dev/") || p.parse::<std::net::SocketAddr>().is_ok(),
                "a path or an address: {p:?}"
            );
        }
        Self {
            child,
            path: paths[0].clone(),
            paths,
        }
    }

    /// Ends the emulator, as pulling the cable would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The path of `devices/<name>.ron`.
pub fn profile_path(name: &str) -> String {
    format!("{}/devices/{name}.ron", env!("CARGO_MANIFEST_DIR"))
}

pub fn pnn_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pnn-train"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("pnn-train runs")
}

/// The JSON summary on the last stdout line.
pub fn summary(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pnn-train failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a summary line");
    serde_json::from_str(last).expect("the last line is JSON")
}
