//! Link faults and device resets through the emulator binary on a real pseudo-terminal
//! (issue 7): a short MNIST run over a line that damages one byte in a thousand, loses one frame
//! in a hundred, and a device that power-cycles every 2,500 requests ends with the weights of a
//! fault-free run, and its summary counts the retries, resyncs and re-programs; a device
//! unplugged mid-run ends the run with a checkpoint and the command that continues it, and that
//! command, against a new device, finishes with the weights of an undisturbed run.

mod common;
mod serial_support;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use pnn::run::checkpoint::Checkpoint;
use serde_json::Value;
use serial_support::Emulator;

use common::{train_command, train_output as train};

fn summary_of(out: &Output) -> Value {
    serial_support::summary(out)
}

const LINK_KEYS: [&str; 6] = [
    "wire_bytes_up",
    "wire_bytes_down",
    "round_trips",
    "retries",
    "resyncs",
    "reprograms",
];

/// Everything but timings, the backend's name and the link's counters.
fn core(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    for key in ["backend", "train_seconds", "seconds_per_epoch"]
        .iter()
        .chain(&LINK_KEYS)
    {
        o.remove(*key);
    }
    v
}

const RUN: [&str; 14] = [
    "--dataset",
    "mnist",
    "--hidden",
    "20,20",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--limit-train",
    "192",
    "--limit-test",
    "100",
    "--seed",
    "3",
];

#[test]
fn a_noisy_line_and_a_resetting_device_leave_the_weights_bit_identical() {
    let emulator = Emulator::spawn(
        "784x20,20x20",
        &[
            "--corrupt-rate",
            "1e-3",
            "--drop-rate",
            "0.01",
            "--reset-every",
            "2500",
            "--max-frame",
            "512",
            "--fault-seed",
            "1",
        ],
    );
    // Short timeouts: on a pseudo-terminal a reply takes well under a millisecond, and a
    // retransmission that crosses a slow reply is harmless (answered from the device's cache, or
    // recomputed identically, the late reply discarded as stale).
    let backend = format!("serial:{}?timeout_ms=20&retries=100", emulator.path);
    let start = Instant::now();
    let serial = summary_of(&train(
        &[&RUN[..], &["--backend", &backend, "--quiet"]].concat(),
    ));
    let seconds = start.elapsed().as_secs_f64();
    let sim = summary_of(&train(&[&RUN[..], &["--quiet"]].concat()));
    eprintln!(
        "over the faulty line: {seconds:.1} s, {} round trips, {} retries, {} resyncs, {} re-programs, {} bytes up",
        serial["round_trips"],
        serial["retries"],
        serial["resyncs"],
        serial["reprograms"],
        serial["wire_bytes_up"]
    );
    for key in LINK_KEYS {
        assert!(sim.get(key).is_none(), "sim reports no {key}");
    }
    for key in ["retries", "resyncs", "reprograms"] {
        assert!(serial[key].as_u64().unwrap() > 0, "{key} counted: {serial}");
    }
    assert_eq!(core(serial), core(sim));
}

#[test]
fn an_unplugged_device_leaves_a_checkpoint_that_a_new_device_finishes() {
    let run = [
        "--dataset",
        "mnist",
        "--hidden",
        "20,20",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--limit-train",
        "2048",
        "--limit-test",
        "500",
        "--seed",
        "8",
    ];
    let undisturbed = summary_of(&train(&[&run[..], &["--quiet"]].concat()));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let d = dir.to_str().unwrap();

    let mut first = Emulator::spawn("784x20,20x20", &[]);
    let backend = format!("serial:{}?timeout_ms=2000", first.path);
    let mut child = train_command(
        &[
            &run[..],
            &[
                "--backend",
                &backend,
                "--checkpoint",
                d,
                "--checkpoint-every",
                "4",
            ],
        ]
        .concat(),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Unplug once the run is under way (its first periodic checkpoint is there).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(c) = Checkpoint::load(&dir)
            && c.position.batch >= 4
        {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "the run makes no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    // A little later, so that the cut falls between periodic checkpoints.
    std::thread::sleep(Duration::from_millis(30));
    let unplugged = Instant::now();
    first.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(unplugged.elapsed() < Duration::from_secs(10), "no hang");
    assert!(stderr.contains("closed the link"), "{stderr}");
    assert!(
        stderr.contains(&format!("pnn-train --resume {d}")),
        "says how to resume: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let saved = Checkpoint::load(&dir).unwrap();
    assert!(saved.position.batch >= 4 || saved.position.epoch > 0);
    eprintln!(
        "saved at epoch {}, batch {}",
        saved.position.epoch + 1,
        saved.position.batch
    );

    // A new device on another port: the saved settings, with the new port.
    let second = Emulator::spawn("784x20,20x20", &[]);
    let backend = format!("serial:{}?timeout_ms=2000", second.path);
    let resumed = summary_of(&train(&["--resume", d, "--backend", &backend, "--quiet"]));
    assert_eq!(resumed["weights_sha256"], undisturbed["weights_sha256"]);
    assert_eq!(core(resumed), core(undisturbed));
}
