//! Training through the emulator binary on a real pseudo-terminal: the same numbers as the
//! in-process simulator, shape mismatches caught before training, and a device that goes away
//! mid-run ending the run with a clear error.

mod serial_support;

use std::time::{Duration, Instant};

use serial_support::{Emulator, pnn_train, summary};

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
    // Everything but timings, the backend's name and the wire counters is identical.
    let strip = |mut v: serde_json::Value| {
        let o = v.as_object_mut().unwrap();
        for key in ["backend", "train_seconds", "seconds_per_epoch"]
            .iter()
            .chain(&wire)
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
    // batch once per layer (f32).
    let (train, test) = (4096u64, 10_000u64);
    let inputs = 4 * (train + test) * (784 + 50);
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
    let mut emulator = Emulator::spawn("784x50,50x50", &[]);
    let backend = format!("serial:{}?timeout_ms=500", emulator.path);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pnn-train"))
        .args([
            "--backend",
            &backend,
            "--dataset",
            "mnist",
            "--epochs",
            "20",
        ])
        .args(["--limit-train", "4096", "--seed", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    emulator.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("closed the link"), "{stderr}");
    // No hang: far less than even one retry cycle.
    assert!(killed_at.elapsed() < Duration::from_secs(5));
}
