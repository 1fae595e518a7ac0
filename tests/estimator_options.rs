//! The estimator's options (issue 15) through a device: forward differences (MLP and CNN) and each
//! optimizer train through the emulator binary on a pseudo-terminal to the very numbers of the
//! in-process simulator, and count their evaluations as scheduled.

mod serial_support;

use serial_support::{Emulator, pnn_train, summary};

/// The summary without what legitimately differs between backends: timings, the backend's name
/// and the wire and link-health counters.
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

/// `run` on the emulated device `layers` and on the simulator: the same numbers.
fn serial_matches_sim(layers: &str, run: &[&str]) -> serde_json::Value {
    let emulator = Emulator::spawn(layers, &["--seed", "7"]);
    let backend = format!("serial:{}?timeout_ms=10000", emulator.path);
    let serial = summary(&pnn_train(&[&["--backend", &backend][..], run].concat()));
    let sim = summary(&pnn_train(&[&["--backend", "sim"][..], run].concat()));
    assert_eq!(core(serial.clone()), core(sim), "{run:?}");
    eprintln!(
        "{run:?}: {} bytes up, {} down over the link",
        serial["wire_bytes_up"], serial["wire_bytes_down"]
    );
    serial
}

const MLP: [&str; 10] = [
    "--dataset",
    "mnist",
    "--epochs",
    "1",
    "--limit-train",
    "1024",
    "--limit-test",
    "500",
    "--seed",
    "7",
];

#[test]
fn forward_differences_and_each_optimizer_train_through_a_device_as_on_the_simulator() {
    let layers = "784x50,50x50";
    // 4 batches x 2 layers x 1 chunk: P + 1 = 5 evaluations per chunk, plus one clean pass per
    // layer and batch.
    let forward = serial_matches_sim(layers, &[&MLP[..], &["--difference", "forward"]].concat());
    assert_eq!(forward["oracle_evaluations"], 4 * 2 * (5 + 1));
    for optimizer in ["momentum", "adam"] {
        let s = serial_matches_sim(layers, &[&MLP[..], &["--optimizer", optimizer]].concat());
        assert_eq!(s["oracle_evaluations"], 4 * 2 * (8 + 1));
    }
    let sgd = serial_matches_sim(layers, &MLP);
    let adam = serial_matches_sim(
        layers,
        &[
            &MLP[..],
            &["--optimizer", "adam", "--difference", "forward"],
        ]
        .concat(),
    );
    assert_ne!(sgd["weights_sha256"], adam["weights_sha256"]);
    // SGD sends seeded terms; a rule without a seeded form writes the layer after each chunk's
    // step: 4 bytes per parameter of the layer, per chunk and batch, more up the link.
    let params = 784 * 50 + 50 + 50 * 50 + 50;
    let extra = adam["wire_bytes_up"].as_u64().unwrap() - sgd["wire_bytes_up"].as_u64().unwrap();
    assert!(
        extra >= 4 * 4 * params as u64,
        "{extra} more bytes up for 4 batches of {params} parameters"
    );
}

#[test]
fn a_cnn_trains_with_forward_differences_through_a_device_as_on_the_simulator() {
    let run = [
        "--dataset",
        "mnist",
        "--arch",
        "cnn",
        "--channels",
        "4,4",
        "--epochs",
        "1",
        "--limit-train",
        "512",
        "--limit-test",
        "500",
        "--seed",
        "7",
        "--difference",
        "forward",
    ];
    let s = serial_matches_sim("conv1x28x28:4,conv4x14x14:4", &run);
    // 2 batches x 2 blocks (48 and 156 parameters: one chunk each) x (P + 1), plus a clean pass
    // per block and batch.
    assert_eq!(s["oracle_evaluations"], 2 * 2 * (5 + 1));
}

/// `run` with `--eps auto`: its summary and the eps the metrics file logged at the end.
fn eps_auto(backend: &str, run: &[&str]) -> (serde_json::Value, Vec<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let s = summary(&pnn_train(
        &[
            &["--backend", backend, "--eps", "auto", "--metrics"][..],
            &[metrics.to_str().unwrap()],
            run,
        ]
        .concat(),
    ));
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let eps = last["eps"].as_array().expect("the metrics log eps").iter();
    (s, eps.map(|e| e.as_f64().unwrap()).collect())
}

#[test]
fn eps_auto_leaves_the_ideal_device_alone_and_opens_up_on_quantised_and_noisy_ones() {
    let profile = |name: &str| format!("sim:{}/devices/{name}.ron", env!("CARGO_MANIFEST_DIR"));
    // The ideal device repeats its clean loss bit for bit and resolves 1e-3: the same training.
    let (ideal, eps) = eps_auto(&profile("ideal"), &MLP);
    assert_eq!(eps, [1e-3; 2]);
    let fixed = summary(&pnn_train(
        &[&["--backend", &profile("ideal")][..], &MLP].concat(),
    ));
    assert_eq!(ideal["weights_sha256"], fixed["weights_sha256"]);
    // int8 weights: no spread, but 1e-3 is below the weights' step.
    let (_, eps) = eps_auto(&profile("mcu-int8"), &MLP);
    assert!(eps.iter().all(|&e| e > 0.05), "{eps:?}");
    // Output noise: eps grows until the differences clear it.
    let (_, eps) = eps_auto(&profile("aihwkit-io"), &MLP);
    assert!(eps.iter().all(|&e| e > 0.5), "{eps:?}");
}

#[test]
fn the_exact_gradient_baselines_are_refused_where_no_gradient_can_be_had() {
    let pcm = format!("sim:{}/devices/pcm.ron", env!("CARGO_MANIFEST_DIR"));
    for (args, what) in [
        (
            vec!["--method", "mf-exact", "--backend", "serial:/dev/null"],
            "a device (or a simulated device profile) cannot give",
        ),
        (
            vec!["--method", "bp", "--backend", pcm.as_str()],
            "run it with --backend sim",
        ),
        (
            vec!["--method", "mf-exact", "--arch", "cnn"],
            "--arch mlp only",
        ),
        (vec!["--method", "backprop"], "expected dd, mf-exact or bp"),
    ] {
        let out = pnn_train(&[&args[..], &["--epochs", "1"]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(what), "{args:?}: {err}");
    }
}
