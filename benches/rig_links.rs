//! MNIST MLP (784-50-50) seconds per epoch over emulated devices at real link speeds: one
//! device holding both layers, or two devices with one layer each (sequential and pipelined
//! schedules), at 921,600 baud (a UART) and 12 Mbit/s (USB full speed, taken as a 12 Mbaud
//! line, 10 bits a byte), with first-layer inputs as f32 values (`pixels=0`, before the wire
//! reductions) and as 8-bit pixels (after).
//!
//! ```text
//! cargo bench --bench rig_links
//! PNN_BENCH_RIG_LIMIT=1024 PNN_BENCH_RIG_RATES=12000000 cargo bench --bench rig_links
//! ```
//!
//! Each run trains `--limit-train` samples (`PNN_BENCH_RIG_LIMIT`, default 1024: 4 batches of
//! 256) and evaluates 256 test samples; the full-epoch figure scales the measured training time
//! by 60,000 / limit (the link carries the same bytes per batch whatever the epoch's length).
//! The pipelined run is one window of all its batches. For two devices it also prints the
//! busiest link's own byte time (its bytes up and down that epoch, training and evaluation, at
//! 10 bits a byte) against the epoch's wall time (training and evaluation), and each layer's
//! utilisation (busy time / wall time). The emulators compute at the host's speed (no
//! `--macs-per-second`), so a device's compute time is the host's, small next to the link's.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const FULL_EPOCH: f64 = 60_000.0;

/// `pnn-emulate` serving one device per `--layers` list; killed when dropped.
struct Emulator {
    child: Child,
    paths: Vec<String>,
}

impl Emulator {
    fn spawn(devices: &[&str], baud: u32) -> Self {
        let profile = format!("{}/devices/ideal.ron", env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_pnn-emulate"))
            .args(["--profile", &profile, "--baud", &baud.to_string()])
            .args(devices.iter().flat_map(|d| ["--layers", d]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("pnn-emulate starts");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let paths = devices
            .iter()
            .map(|_| {
                let mut line = String::new();
                out.read_line(&mut line).expect("a path per device");
                line.trim().to_string()
            })
            .collect();
        Self { child, paths }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Epoch {
    train_seconds: f64,
    eval_seconds: f64,
    bytes_up: u64,
    bytes_down: u64,
    layer_bytes: Vec<[u64; 2]>,
    utilisation: Vec<f64>,
    sha: String,
}

fn train(backend: &str, limit: usize, extra: &[&str]) -> Epoch {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_pnn-train"))
        .args(["--backend", backend, "--dataset", "mnist", "--epochs", "1"])
        .args(["--limit-train", &limit.to_string(), "--limit-test", "256"])
        .args([
            "--seed",
            "7",
            "--quiet",
            "--metrics",
            metrics.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .expect("pnn-train runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let m: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&metrics).unwrap().trim()).unwrap();
    let list = |v: &serde_json::Value| v.as_array().cloned().unwrap_or_default();
    Epoch {
        train_seconds: m["train_seconds"].as_f64().unwrap(),
        eval_seconds: m["eval_seconds"].as_f64().unwrap(),
        bytes_up: summary["wire_bytes_up"].as_u64().unwrap(),
        bytes_down: summary["wire_bytes_down"].as_u64().unwrap(),
        layer_bytes: list(&m["layer_wire_bytes"])
            .iter()
            .map(|b| [b[0].as_u64().unwrap(), b[1].as_u64().unwrap()])
            .collect(),
        utilisation: list(&m["layer_utilisation"])
            .iter()
            .map(|u| u.as_f64().unwrap())
            .collect(),
        sha: summary["weights_sha256"].as_str().unwrap().to_string(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let limit: usize = std::env::var("PNN_BENCH_RIG_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let rates: Vec<u32> = std::env::var("PNN_BENCH_RIG_RATES")
        .unwrap_or_else(|_| "921600,12000000".into())
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .expect("PNN_BENCH_RIG_RATES: comma-separated baud rates")
        })
        .collect();
    let batches = limit.div_ceil(256).to_string();
    println!(
        "MNIST MLP 784-50-50, batch 256, P = 4: --limit-train {limit} (scaled to 60,000), --limit-test 256"
    );
    println!(
        "{:>9} {:>8} {:>10} {:>7} {:>10} {:>10} {:>10} {:>10}  utilisation / busiest link",
        "baud", "devices", "schedule", "inputs", "train s", "s/epoch", "MB up", "MB down"
    );
    let mut hashes = Vec::new();
    for &baud in &rates {
        let byte_time = 10.0 / baud as f64;
        for (devices, lists) in [(1, &["784x50,50x50"][..]), (2, &["784x50", "50x50"][..])] {
            let emulator = Emulator::spawn(lists, baud);
            for (inputs, option) in [("f32", "&pixels=0"), ("u8", "")] {
                let backend = (emulator.paths.iter())
                    .map(|p| format!("serial:{p}?timeout_ms=60000{option}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let schedules: &[(&str, &[&str])] = if devices == 1 {
                    &[("sequential", &[])]
                } else {
                    &[
                        ("sequential", &[]),
                        ("pipelined", &["--pipeline", batches.as_str()]),
                    ]
                };
                let mut sequential = None;
                for (schedule, extra) in schedules {
                    let e = train(&backend, limit, extra);
                    hashes.push(e.sha.clone());
                    let mut note = String::new();
                    if devices == 2 {
                        let busiest = (e.layer_bytes.iter())
                            .map(|[up, down]| (up + down) as f64 * byte_time)
                            .fold(0.0, f64::max);
                        let wall = e.train_seconds + e.eval_seconds;
                        note = format!(
                            "[{}] / {busiest:.1} s link, epoch wall {wall:.1} s ({:.2}x)",
                            (e.utilisation.iter())
                                .map(|u| format!("{u:.2}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                            wall / busiest
                        );
                        match sequential {
                            None => sequential = Some(e.train_seconds),
                            Some(s) => note.push_str(&format!(
                                "; {:.2}x the sequential training time",
                                e.train_seconds / s
                            )),
                        }
                    }
                    println!(
                        "{baud:>9} {devices:>8} {schedule:>10} {inputs:>7} {:>10.2} {:>10.0} {:>10.2} {:>10.2}  {note}",
                        e.train_seconds,
                        e.train_seconds * FULL_EPOCH / limit as f64,
                        e.bytes_up as f64 / 1e6,
                        e.bytes_down as f64 / 1e6,
                    );
                }
            }
        }
    }
    hashes.dedup();
    println!(
        "weights_sha256 of every run: {}",
        if hashes.len() == 1 {
            format!("the same, {}", hashes[0])
        } else {
            format!("DIFFERENT: {hashes:?}")
        }
    );
}
