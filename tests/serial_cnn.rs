//! CNN blocks and device profiles over the serial protocol, through the `pnn-emulate` binary on
//! a real pseudo-terminal: a small CNN trains to the very numbers of the in-process simulator, a
//! noisy profile's device computes what `--backend sim:<profile>` computes, and a device whose
//! blocks differ from the model's (shape or projection) is refused naming both. Prints the bytes
//! one CNN epoch moves against the least the protocol could move.

mod serial_support;

use pnn::backend::serial::{self, SerialSpec};
use pnn::backend::sim::SimOracle;
use pnn::model::{DEFAULT_PROJ_DIM, ModelSpec, initialise};
use pnn::oracle::{Activations, DirectionSeed, ForwardMode, ForwardOracle, UpdateTerm};
use serial_support::{Emulator, pnn_train, profile_path, summary};

/// `pnn-train --arch cnn --channels 4,4` on MNIST: blocks 1x28x28 -> 4 and 4x14x14 -> 4.
const CNN_LAYERS: &str = "conv1x28x28:4,conv4x14x14:4";

const CNN_RUN: [&str; 12] = [
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
    "--seed",
    "7",
];

const WIRE: [&str; 6] = [
    "wire_bytes_up",
    "wire_bytes_down",
    "round_trips",
    "retries",
    "resyncs",
    "reprograms",
];

/// The summary without what legitimately differs between backends: timings, the backend's name
/// and the wire and link-health counters.
fn core(mut v: serde_json::Value) -> serde_json::Value {
    let o = v.as_object_mut().unwrap();
    for key in ["backend", "train_seconds", "seconds_per_epoch"]
        .iter()
        .chain(&WIRE)
    {
        o.remove(*key);
    }
    v
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn serial_cnn_training_matches_sim_bit_for_bit() {
    let emulator = Emulator::spawn(CNN_LAYERS, &["--seed", "7"]);
    let backend = format!("serial:{}?timeout_ms=10000", emulator.path);
    let serial = summary(&pnn_train(
        &[&["--backend", &backend][..], &CNN_RUN].concat(),
    ));
    let sim = summary(&pnn_train(&[&["--backend", "sim"][..], &CNN_RUN].concat()));
    assert_eq!(serial["arch"], "cnn");
    assert_eq!(core(serial.clone()), core(sim));
    assert_eq!(serial["weights_sha256"].as_str().unwrap().len(), 64);

    // Wire economy of one epoch (512 training images in 2 batches, then the 10,000 test images).
    // The least the protocol moves: each batch's input up once per block (the first as pixels); down, per training
    // batch and block, 2P perturbed feature sets and one clean pass, per test batch and block one
    // clean pass. A clean pass returns the C*d features and the pooled next-layer input (the
    // last block's too, which the host does not need).
    let specs = ModelSpec::cnn(
        pnn::data::DatasetKind::Mnist,
        Some(vec![4, 4]),
        DEFAULT_PROJ_DIM,
        7,
    )
    .unwrap()
    .layer_specs();
    let (train, test, p) = (512u64, 10_000u64, 4u64);
    let samples = train + test;
    // The first block's input goes up as the dataset's 8-bit pixels (LoadPixels), the rest as
    // f32 values.
    let inputs: u64 = (specs.iter().enumerate())
        .map(|(l, s)| s.input_width() as u64 * if l == 0 { 1 } else { 4 })
        .sum::<u64>()
        * samples;
    let features: u64 = specs.iter().map(|s| s.feature_width() as u64).sum::<u64>() * 4;
    let pooled: Vec<u64> = specs.iter().map(|s| s.output_width() as u64 * 4).collect();
    let needed = features * (samples + 2 * p * train) + pooled[0] * samples;
    let sent = needed + pooled[1] * samples;
    let (up, down) = (
        serial["wire_bytes_up"].as_u64().unwrap(),
        serial["wire_bytes_down"].as_u64().unwrap(),
    );
    eprintln!(
        "one CNN epoch (4,4 channels, d=16, P=4, 512 train + 10,000 test images): {up} bytes up \
         (inputs {inputs}, +{:.2}%), {down} bytes down (protocol payload {sent}, +{:.2}% framing; \
         the host needs {needed}, the last block's pooled output is {:.1}% of the payload), {} \
         round trips",
        100.0 * (up as f64 / inputs as f64 - 1.0),
        100.0 * (down as f64 / sent as f64 - 1.0),
        100.0 * (pooled[1] * samples) as f64 / sent as f64,
        serial["round_trips"]
    );
    assert!(
        up >= inputs && up < inputs + inputs / 50,
        "{up} up, {inputs}"
    );
    assert!(
        down >= sent && down < sent + sent / 50,
        "{down} down, {sent}"
    );
}

#[test]
fn a_serial_conv_block_computes_what_the_simulated_one_does_and_keeps_no_trace() {
    let emulator = Emulator::spawn(CNN_LAYERS, &["--seed", "7"]);
    let specs = ModelSpec::cnn(
        pnn::data::DatasetKind::Mnist,
        Some(vec![4, 4]),
        DEFAULT_PROJ_DIM,
        7,
    )
    .unwrap()
    .layer_specs();
    let mut serial = serial::open(&SerialSpec::parse(&emulator.path).unwrap(), &specs).unwrap();
    let mut sim = SimOracle::for_layers(&specs);
    let init = initialise(&specs, 10, 3);
    let rows = 6;
    let x: Vec<f32> = (0..rows * 784).map(|i| (i % 31) as f32 / 31.0).collect();
    let mut input = [
        Activations::new(rows, 784, x.clone()),
        Activations::new(rows, 784, x),
    ];
    for (l, spec) in specs.iter().enumerate() {
        let (s, o) = (&mut serial[l], &mut sim[l]);
        s.write_parameters(&init.layers[l]).unwrap();
        o.write_parameters(&init.layers[l]).unwrap();
        s.load_input(&input[0]).unwrap();
        o.load_input(&input[1]).unwrap();
        // Train twice (running statistics move), then the no-trace check around a perturbation.
        for _ in 0..2 {
            let (a, b) = (
                s.forward(ForwardMode::Train).unwrap(),
                o.forward(ForwardMode::Train).unwrap(),
            );
            assert_eq!(bits(&a.features.data), bits(&b.features.data));
            let (na, nb) = (a.next.unwrap(), b.next.unwrap());
            assert_eq!(na.width, spec.output_width());
            assert_eq!(bits(&na.data), bits(&nb.data));
            input = [na, nb];
        }
        let eval_before = s.forward(ForwardMode::Eval).unwrap();
        let seeds: Vec<DirectionSeed> = (0..3).map(DirectionSeed).collect();
        let (mut pa, mut pb) = (Vec::new(), Vec::new());
        s.evaluate_perturbed(0..spec.param_count(), &seeds, 1e-3, &mut pa)
            .unwrap();
        o.evaluate_perturbed(0..spec.param_count(), &seeds, 1e-3, &mut pb)
            .unwrap();
        for ((a_plus, a_minus), (b_plus, b_minus)) in pa.iter().zip(&pb) {
            assert_eq!(a_plus.width, spec.feature_width());
            assert_eq!(bits(&a_plus.data), bits(&b_plus.data));
            assert_eq!(bits(&a_minus.data), bits(&b_minus.data));
        }
        let eval_after = s.forward(ForwardMode::Eval).unwrap();
        assert_eq!(
            bits(&eval_before.features.data),
            bits(&eval_after.features.data),
            "a perturbed evaluation moved the running statistics"
        );
        assert_eq!(
            bits(&eval_before.next.unwrap().data),
            bits(&eval_after.next.unwrap().data)
        );
        let terms = [UpdateTerm {
            seed: seeds[1],
            derivative: 0.5,
        }];
        s.apply_update(0..spec.param_count(), 1e-2, &terms).unwrap();
        o.apply_update(0..spec.param_count(), 1e-2, &terms).unwrap();
        assert_eq!(
            bits(&s.read_parameters().unwrap()),
            bits(&o.read_parameters().unwrap())
        );
    }
}

#[test]
fn a_device_with_other_blocks_is_refused_naming_both() {
    // Other channels: the shapes are named.
    let emulator = Emulator::spawn("conv1x28x28:8,conv8x14x14:4", &["--seed", "7"]);
    let out = pnn_train(
        &[
            &["--backend", &format!("serial:{}", emulator.path)][..],
            &CNN_RUN,
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("layer 0")
            && stderr.contains("conv 1x28x28 -> 8 channels")
            && stderr.contains("conv 1x28x28 -> 4 channels"),
        "names both shapes: {stderr}"
    );
    assert!(
        !stderr.contains("epoch 1"),
        "no training happened: {stderr}"
    );
    drop(emulator);
    // The model's shapes but another run seed: the projections differ, and the error says how
    // to make them agree.
    let emulator = Emulator::spawn(CNN_LAYERS, &["--seed", "8"]);
    let out = pnn_train(
        &[
            &["--backend", &format!("serial:{}", emulator.path)][..],
            &CNN_RUN,
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("projection A") && stderr.contains("--seed"),
        "{stderr}"
    );
}

#[test]
fn the_emulator_refuses_conv_blocks_on_a_noisy_profile() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pnn-emulate"))
        .args(["--profile", &profile_path("pcm"), "--layers", CNN_LAYERS])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'pcm'") && stderr.contains("dense layers only"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no pty was offered");
}

#[test]
fn a_noisy_profile_serves_the_numbers_of_the_simulated_profile() {
    let run = [
        "--dataset",
        "mnist",
        "--epochs",
        "1",
        "--limit-train",
        "1024",
        "--seed",
        "5",
    ];
    let emulator = Emulator::spawn_profile("pcm", "784x50,50x50", &[]);
    let backend = format!("serial:{}?timeout_ms=10000", emulator.path);
    let serial = summary(&pnn_train(&[&["--backend", &backend][..], &run].concat()));
    let profile = format!("sim:{}", profile_path("pcm"));
    let sim = summary(&pnn_train(&[&["--backend", &profile][..], &run].concat()));
    let ideal = summary(&pnn_train(&[&["--backend", "sim"][..], &run].concat()));
    assert_eq!(core(serial), core(sim.clone()));
    // And the profile's effects are on: the ideal device trains to other weights.
    assert_ne!(sim["weights_sha256"], ideal["weights_sha256"]);
}
