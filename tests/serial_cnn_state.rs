//! BatchNorm state over the wire (issue 17, item 5): a serial CNN's running statistics travel in
//! the protocol (`ReadLayerState`, `WriteLayerState`) and a retransmitted training pass commits
//! them once, so a serial CNN behind a line that damages and loses frames, on a device that
//! power-cycles, and a serial CNN killed mid-run and resumed on a fresh device, both end
//! bit-identical to the undisturbed simulated run.

mod common;
mod serial_support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use pnn::run::checkpoint::Checkpoint;
use serde_json::Value;
use serial_support::Emulator;

use common::{train_command, train_output as train};

const LAYERS: &str = "conv1x28x28:4,conv4x14x14:4";

const RUN: [&str; 17] = [
    "--dataset",
    "mnist",
    "--arch",
    "cnn",
    "--channels",
    "4,4",
    "--epochs",
    "2",
    "--limit-train",
    "256",
    "--batch-size",
    "32",
    "--limit-test",
    "200",
    "--seed",
    "7",
    "-q",
];

/// Everything but timings, the backend's name and the link's counters.
fn core(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    for key in [
        "backend",
        "train_seconds",
        "seconds_per_epoch",
        "wire_bytes_up",
        "wire_bytes_down",
        "round_trips",
        "retries",
        "resyncs",
        "reprograms",
    ] {
        o.remove(key);
    }
    v
}

fn summary_of(out: &std::process::Output) -> Value {
    serial_support::summary(out)
}

fn sim_reference() -> Value {
    summary_of(&train(&RUN))
}

#[test]
fn a_serial_cnn_on_a_faulty_line_and_a_resetting_device_ends_as_the_simulator() {
    let emulator = Emulator::spawn(
        LAYERS,
        &[
            "--seed",
            "7",
            "--corrupt-rate",
            "2e-5",
            "--drop-rate",
            "0.003",
            "--reset-every",
            "1500",
            "--max-frame",
            "512",
            "--fault-seed",
            "1",
        ],
    );
    let backend = format!("serial:{}?timeout_ms=20&retries=100", emulator.path);
    let serial = summary_of(&train(&[&RUN[..], &["--backend", &backend]].concat()));
    eprintln!(
        "CNN over the faulty line: {} round trips, {} retries, {} resyncs, {} re-programs",
        serial["round_trips"], serial["retries"], serial["resyncs"], serial["reprograms"]
    );
    for key in ["retries", "reprograms"] {
        assert!(serial[key].as_u64().unwrap() > 0, "{key} counted: {serial}");
    }
    assert_eq!(core(serial), core(sim_reference()));
}

#[test]
fn a_killed_serial_cnn_resumes_on_a_fresh_device_as_the_simulator_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    let emulator = Emulator::spawn(LAYERS, &["--seed", "7"]);
    let backend = format!("serial:{}?timeout_ms=5000", emulator.path);
    let args = [
        &RUN[..],
        &[
            "--backend",
            &backend,
            "--checkpoint",
            d,
            "--checkpoint-every",
            "1",
        ],
    ]
    .concat();
    let mut child = train_command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the first epoch's training is half done: its BatchNorm statistics have moved.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if Checkpoint::load(&dir).is_ok_and(|c| (c.position.epoch, c.position.batch) >= (0, 4)) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended first");
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(emulator);
    let saved = Checkpoint::load(&dir).unwrap();
    assert!(
        saved
            .layer_state
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s.len() == 8)),
        "the checkpoint holds each block's BatchNorm statistics: {:?}",
        saved.layer_state
    );
    let fresh = Emulator::spawn(LAYERS, &["--seed", "7"]);
    let backend = format!("serial:{}?timeout_ms=5000", fresh.path);
    let resumed = summary_of(&train(&["--resume", d, "--backend", &backend, "-q"]));
    assert_eq!(core(resumed), core(sim_reference()));
}

/// Item 14: limits that no run can live with are permanent mismatches: a device announcing
/// `max_batch 0` is refused at the handshake, one whose batches are too small for the run at its
/// first batch; neither says "once the device is back" nor leaves a rescue checkpoint.
#[test]
fn a_device_that_cannot_take_the_run_is_refused_without_a_rescue_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for (max_batch, expect) in [("0", "announces max_batch 0"), ("16", "takes at most 16")] {
        let emulator = Emulator::spawn("784x20,20x20", &["--max-batch", max_batch]);
        let backend = format!("serial:{}", emulator.path);
        let out = train_command(&[
            "--backend",
            &backend,
            "--hidden",
            "20,20",
            "--epochs",
            "1",
            "--limit-train",
            "256",
            "--batch-size",
            "32",
            "-q",
        ])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
        let msg = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{msg}");
        assert!(
            msg.contains(expect) && !msg.contains("device is back"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "a rescue directory"
        );
    }
}
