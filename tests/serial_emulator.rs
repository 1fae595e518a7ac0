//! Training through the emulator binary on a real pseudo-terminal: the same numbers as the
//! in-process simulator, shape mismatches caught before training, and a device that goes away
//! mid-run ending the run with a clear error. The emulator in process, over the in-memory pipe,
//! computes what the binary does on its pseudo-terminal.

mod serial_support;

use std::time::{Duration, Instant};

use pnn::backend::serial::{self, SerialOracle, SerialSpec};
use pnn::oracle::{Activations, DirectionSeed, ForwardMode, ForwardOracle, LayerShape, UpdateTerm};
use serial_support::{Emulator, in_process, pnn_train, summary};

const RUN: [&str; 8] = [
    "--dataset",
    "mnist",
    "--epochs",
    "1",
    "--limit-train",
    "4096",
    "--seed",
    "7",
];

#[test]
fn serial_training_matches_sim_bit_for_bit() {
    let emulator = Emulator::spawn("784x50,50x50", &[]);
    let backend = format!("serial:{}?timeout_ms=10000", emulator.path);
    let serial = summary(&pnn_train(&[&["--backend", &backend][..], &RUN].concat()));
    let sim = summary(&pnn_train(&[&["--backend", "sim"][..], &RUN].concat()));
    let wire = ["wire_bytes_up", "wire_bytes_down", "round_trips"];
    for key in wire {
        assert!(sim.get(key).is_none(), "sim reports no {key}");
        assert!(serial[key].as_u64().unwrap() > 0, "serial reports {key}");
    }
    // The link's health: counted (a clean line needs no recovery), absent on sim.
    let health = ["retries", "resyncs", "reprograms"];
    for key in health {
        assert!(sim.get(key).is_none(), "sim reports no {key}");
        assert_eq!(serial[key].as_u64(), Some(0), "serial reports {key}");
    }
    // Everything but timings, the backend's name and the wire counters is identical.
    let strip = |mut v: serde_json::Value| {
        let o = v.as_object_mut().unwrap();
        for key in ["backend", "train_seconds", "seconds_per_epoch"]
            .iter()
            .chain(&wire)
            .chain(&health)
        {
            o.remove(*key);
        }
        v
    };
    let (serial_core, sim_core) = (strip(serial.clone()), strip(sim));
    assert_eq!(serial_core, sim_core);
    assert_eq!(serial_core["oracle_evaluations"], 288);
    assert_eq!(
        serial_core["weights_sha256"].as_str().unwrap().len(),
        64,
        "final weights are hashed"
    );
    // The inputs alone need this much uplink: each training batch once per layer, each test
    // batch once per layer (the first layer's as the dataset's 8-bit pixels, the second's f32).
    let (train, test) = (4096u64, 10_000u64);
    let inputs = (train + test) * (784 + 4 * 50);
    let up = serial["wire_bytes_up"].as_u64().unwrap();
    assert!(
        up >= inputs && up < inputs + inputs / 50,
        "{up} bytes up, inputs {inputs}"
    );
}

#[test]
fn a_device_with_other_layers_is_refused_before_training() {
    let emulator = Emulator::spawn("784x40,40x50", &[]);
    let out = pnn_train(
        &[
            &["--backend", &format!("serial:{}", emulator.path)][..],
            &RUN,
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("dense 784x40") && stderr.contains("dense 784x50"),
        "names both shapes: {stderr}"
    );
    assert!(
        !stderr.contains("epoch 1"),
        "no training happened: {stderr}"
    );
}

#[test]
fn a_device_that_goes_away_mid_run_ends_it_with_an_error() {
    use std::io::{BufRead, BufReader};
    let mut emulator = Emulator::spawn("784x50,50x50", &[]);
    let backend = format!("serial:{}?timeout_ms=500", emulator.path);
    // Where the run is saved when its device goes (else a directory under the system's temp).
    let saved = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pnn-train"))
        .args([
            "--backend",
            &backend,
            "--dataset",
            "mnist",
            "--epochs",
            "20",
        ])
        .args(["--checkpoint", saved.path().to_str().unwrap()])
        .args(["--limit-train", "4096", "--seed", "1"])
        .env("RUST_LOG", "pnn=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the handshake, so that the device goes away mid-run and not before the start.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("connected") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("pnn-train connects");
    std::thread::sleep(Duration::from_millis(300));
    let killed_at = Instant::now();
    emulator.kill();
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("closed the link"), "{stderr}");
    assert!(stderr.contains("pnn-train --resume"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // No hang: far less than even one retry cycle.
    assert!(killed_at.elapsed() < Duration::from_secs(5));
}

/// Everything a training step asks of a layer: the perturbed outputs, the forward pass after a
/// seeded update, and the parameters read back.
fn exercise(o: &mut SerialOracle, n_in: usize, n_out: usize) -> Vec<Vec<u32>> {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let params: Vec<f32> = (0..n_in * n_out + n_out)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
        .collect();
    o.write_parameters(&params).unwrap();
    let rows = 7;
    let x: Vec<f32> = (0..rows * n_in).map(|i| (i % 13) as f32 / 13.0).collect();
    o.load_input(&Activations::new(rows, n_in, x)).unwrap();
    let seeds = [DirectionSeed(3), DirectionSeed(4), DirectionSeed(5)];
    let mut pairs = Vec::new();
    o.evaluate_perturbed(10..900, &seeds, 1e-2, &mut pairs)
        .unwrap();
    let terms: Vec<UpdateTerm> = seeds
        .iter()
        .map(|&seed| UpdateTerm {
            seed,
            derivative: 0.25,
        })
        .collect();
    o.apply_update(10..900, 0.1, &terms).unwrap();
    let mut out: Vec<Vec<u32>> = pairs
        .iter()
        .flat_map(|(p, m)| [bits(&p.data), bits(&m.data)])
        .collect();
    out.push(bits(&o.forward(ForwardMode::Train).unwrap().features.data));
    out.push(bits(&o.read_parameters().unwrap()));
    out
}

#[test]
fn the_emulator_in_process_computes_what_the_binary_does_on_its_pty() {
    let model = [LayerShape::dense(100, 20)];
    let emulator = Emulator::spawn("100x20", &[]);
    let mut pty = serial::open(&SerialSpec::parse(&emulator.path).unwrap(), &model).unwrap();
    let (mut piped, device) = in_process("100x20", &model);
    assert_eq!(
        exercise(&mut piped[0], 100, 20),
        exercise(&mut pty[0], 100, 20)
    );
    // The same requests on both links (the replies differ in the device's name and boot id).
    let counters = |o: &SerialOracle| o.link().expect("a serial oracle has a link").counters();
    let (a, b) = (counters(&piped[0]), counters(&pty[0]));
    assert_eq!((a.bytes_up, a.round_trips), (b.bytes_up, b.round_trips));
    drop(piped);
    device.join().unwrap();
}
