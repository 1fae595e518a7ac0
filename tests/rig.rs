//! A rig of devices: each layer on its own emulated device, both layers on one device, a mixed
//! `sim` + `serial:` rig and a device over `tcp:` all train to the same weights and summary as
//! `--backend sim`; a rig file names devices and their layers; checkpoints record the rig and a
//! resume re-programs every device; a rig that does not match its devices is refused before
//! training, naming the device.

mod serial_support;

use serial_support::{Emulator, pnn_train, profile_path, summary};

/// One epoch unless the test says otherwise (`EPOCH1` follows `RUN` where it does not).
const EPOCH1: [&str; 2] = ["--epochs", "1"];
const RUN: [&str; 10] = [
    "--dataset",
    "mnist",
    "--limit-train",
    "2048",
    "--limit-test",
    "2000",
    "--seed",
    "7",
    "--lr",
    "0.01",
];

/// A summary without what differs between backends: timings, the backend's name and the
/// link's counters.
fn core(mut v: serde_json::Value) -> serde_json::Value {
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

/// A run of `RUN` on `backend`; `extra` may give `--epochs`, else one epoch.
fn train(backend: &str, extra: &[&str]) -> serde_json::Value {
    let epochs: &[&str] = if extra.contains(&"--epochs") {
        &[]
    } else {
        &EPOCH1
    };
    summary(&pnn_train(
        &[&["--backend", backend][..], &RUN, epochs, extra].concat(),
    ))
}

fn sim() -> serde_json::Value {
    core(train("sim", &[]))
}

#[test]
fn each_layer_on_its_own_device_and_a_mixed_rig_match_sim() {
    let expected = sim();
    // One emulator process, two devices on two pseudo-terminals, one layer each.
    let two = Emulator::spawn_devices(&profile_path("ideal"), &["784x50", "50x50"], &[]);
    let backend = format!(
        "serial:{}?timeout_ms=10000,serial:{}?timeout_ms=10000",
        two.paths[0], two.paths[1]
    );
    let rig = train(&backend, &[]);
    assert_eq!(core(rig.clone()), expected);
    assert!(rig["wire_bytes_up"].as_u64().unwrap() > 0);
    assert_eq!(rig["retries"], 0);
    // The simulator for the first layer, a device for the second.
    let second = Emulator::spawn("50x50", &[]);
    let mixed = format!("sim,serial:{}?timeout_ms=10000", second.path);
    let mixed = train(&mixed, &[]);
    assert_eq!(core(mixed.clone()), expected);
    // Only the second layer's traffic crosses a link: far less than both layers' inputs.
    assert!(
        mixed["wire_bytes_up"].as_u64().unwrap() * 4 < rig["wire_bytes_up"].as_u64().unwrap(),
        "{mixed} vs {rig}"
    );
}

#[test]
fn a_rig_file_with_both_layers_on_one_device_and_tcp_match_sim() {
    let expected = sim();
    let one = Emulator::spawn("784x50,50x50", &[]);
    let dir = tempfile::tempdir().unwrap();
    let rig = dir.path().join("one-board.ron");
    std::fs::write(
        &rig,
        format!(
            r#"(devices: [(name: "board", backend: "serial:{}", timeout_ms: 10000, layers: [0, 1])])"#,
            one.path
        ),
    )
    .unwrap();
    let out = pnn_train(&[&["--rig", rig.to_str().unwrap()][..], &RUN, &EPOCH1].concat());
    let got = summary(&out);
    assert_eq!(core(got.clone()), expected);
    assert_eq!(
        got["backend"],
        format!("serial:{0},serial:{0}", one.path),
        "the rig, one backend per layer"
    );
    // Over TCP to an emulator on the loopback address.
    let net = Emulator::spawn_devices(
        &profile_path("ideal"),
        &["784x50,50x50"],
        &["--listen", "127.0.0.1:0"],
    );
    let tcp = train(&format!("tcp:{}?timeout_ms=10000", net.path), &[]);
    assert_eq!(core(tcp.clone()), expected);
    assert!(tcp["round_trips"].as_u64().unwrap() > 0);
}

#[test]
fn checkpoints_record_the_rig_and_a_resume_reprograms_every_device() {
    let two = Emulator::spawn_devices(&profile_path("ideal"), &["784x50", "50x50"], &[]);
    let backend = format!(
        "serial:{}?timeout_ms=10000,serial:{}?timeout_ms=10000",
        two.paths[0], two.paths[1]
    );
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let ckpt = ckpt.to_str().unwrap();
    // One epoch, saved; then a second resumed from the rig the checkpoint names (the
    // devices keep the first run's weights, so the resume must program them from the saved
    // state: the emulators are restarted in between to forget everything).
    let first = pnn_train(
        &[
            &["--backend", &backend, "--checkpoint", ckpt][..],
            &RUN,
            &EPOCH1,
        ]
        .concat(),
    );
    summary(&first);
    drop(two);
    let two = Emulator::spawn_devices(&profile_path("ideal"), &["784x50", "50x50"], &[]);
    let rig_now = format!(
        "serial:{}?timeout_ms=10000,serial:{}?timeout_ms=10000",
        two.paths[0], two.paths[1]
    );
    let resumed = pnn_train(&["--resume", ckpt, "--epochs", "2", "--backend", &rig_now]);
    let resumed = summary(&resumed);
    assert_eq!(
        resumed["backend"],
        format!("serial:{},serial:{}", two.paths[0], two.paths[1]),
    );
    let whole = train("sim", &["--epochs", "2"]);
    assert_eq!(core(resumed), core(whole));
}

#[test]
fn a_resume_without_a_backend_reopens_the_rig_the_checkpoint_records() {
    let two = Emulator::spawn_devices(&profile_path("ideal"), &["784x50", "50x50"], &[]);
    let backend = format!("serial:{},serial:{}", two.paths[0], two.paths[1]);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let ckpt = ckpt.to_str().unwrap();
    summary(&pnn_train(
        &[
            &["--backend", &backend, "--checkpoint", ckpt][..],
            &RUN,
            &EPOCH1,
        ]
        .concat(),
    ));
    let resumed = summary(&pnn_train(&["--resume", ckpt, "--epochs", "2"]));
    assert_eq!(resumed["backend"], backend, "the checkpoint's rig");
    assert_eq!(resumed["epochs"], 2);
}

#[test]
fn a_rig_that_does_not_match_its_devices_is_refused_before_training() {
    // Layers swapped: the first device holds the second layer.
    let two = Emulator::spawn_devices(&profile_path("ideal"), &["50x50", "784x50"], &[]);
    let dir = tempfile::tempdir().unwrap();
    let rig = dir.path().join("swapped.ron");
    std::fs::write(
        &rig,
        format!(
            r#"(devices: [
                (name: "left", backend: "serial:{}", layers: [0]),
                (name: "right", backend: "serial:{}", layers: [1]),
            ])"#,
            two.paths[0], two.paths[1]
        ),
    )
    .unwrap();
    let out = pnn_train(&[&["--rig", rig.to_str().unwrap()][..], &RUN, &EPOCH1].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("device 'left'")
            && stderr.contains("dense 50x50")
            && stderr.contains("dense 784x50"),
        "names the device and both shapes: {stderr}"
    );
    assert!(!stderr.contains("epoch 1"), "no training: {stderr}");
    // A rig and a backend at once, and a rig file that is not one: usage errors.
    let both = pnn_train(&["--rig", rig.to_str().unwrap(), "--backend", "sim"]);
    assert_eq!(both.status.code(), Some(2));
    std::fs::write(&rig, "(devices: [(backend: \"sim\", layers: [1])])").unwrap();
    let bad = pnn_train(&[&["--rig", rig.to_str().unwrap()][..], &RUN, &EPOCH1].concat());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("layer 0"), "{stderr}");
}
