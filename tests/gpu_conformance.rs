//! The GPU backend (`--backend gpu`, `pnn::backend::gpu`) through the library's conformance suite
//! and against the CPU simulator, on whatever Vulkan adapter the machine has: in CI Mesa's
//! software driver lavapipe (`.ci/run` installs it), on a GPU machine the GPU
//! (`scripts/gpu-check.sh`). Without an adapter every test that needs one prints why it skips;
//! `PNN_REQUIRE_GPU=1` turns that skip into a failure.
//!
//! Tolerances, GPU against CPU (the GPU sums its products in another order, and a GPU's drivers
//! may fuse multiply-adds; lavapipe rounds every operation as IEEE does):
//! - directions: the same bits on lavapipe, 1e-6 elsewhere (`gpu/tests/directions.rs`);
//! - clean and perturbed features: 1e-5 of the features' scale (about 1), see [`FEATURES`];
//! - finite differences `(a+ - a-) / 2 eps`: 1e-2 relative to their largest magnitude;
//! - parameters after an update: the same bits (the host applies the update, as on the CPU),
//!   within the 1e-6 relative;
//! - perturbed evaluations leave the layer bit-unchanged, and two GPU runs give the same bits
//!   (the contract, and agreement with [`Tolerance::EXACT`]).
//!
//! Shapes are small: lavapipe runs about 0.5 GFLOP/s on one thread.

mod common;

use std::sync::Arc;

use pnn::backend::gpu::GpuOracle;
use pnn::backend::sim::SimOracle;
use pnn::data::{Dataset, DatasetKind};
use pnn::model::{ArchKind, DEFAULT_PROJ_DIM, ModelSpec, initialise};
use pnn::oracle::conformance::{Probe, Tolerance, check_agreement, check_contract};
use pnn::oracle::{Activations, ForwardOracle, LayerShape};
use pnn::train::{Hyper, Trainer, epoch_order};
use pnn_gpu::Gpu;

/// Features are about 1 in size here: 1e-5 of that, and 1e-5 relative of larger ones. The bound
/// is absolute because a clean forward after updates is `z0` moved by each update
/// (`z0 -= scale sum_p dd_p x v_pᵀ`, scale about 5 in the suite): its rounding follows the size of
/// the moves, not of the result (measured: 2.0e-6 on a feature of 0.093). The CPU's own fast path
/// is held to its reference choreography by the same 1e-5 (tests/oracle_conformance.rs).
const FEATURES: Tolerance = Tolerance {
    abs: 1e-5,
    rel: 1e-5,
};

fn gpu(test: &str) -> Option<Arc<Gpu>> {
    pnn_gpu::available(test)
}

fn gpu_layer(gpu: &Arc<Gpu>, spec: LayerShape, exact_reference: bool) -> GpuOracle {
    let mut o = GpuOracle::new(Arc::clone(gpu), spec).unwrap();
    o.in_process()
        .expect("the GPU layer's parameters are on the host")
        .set_exact_reference(exact_reference);
    o
}

fn shapes() -> [LayerShape; 2] {
    [LayerShape::dense(784, 16), LayerShape::dense(37, 11)]
}

#[test]
fn device_profiles_on_the_gpu_agree_with_the_cpu_simulator() {
    let Some(gpu) = gpu("device_profiles_on_the_gpu_agree_with_the_cpu_simulator") else {
        return;
    };
    // Gains and stuck weights (faulty), int8 converters and weights (mcu-int8), output noise and
    // programming error (aihwkit-io): the CPU simulator's device state and streams, so the same
    // numbers up to the products' rounding.
    for name in ["faulty", "mcu-int8", "aihwkit-io"] {
        let path = format!("{}/devices/{name}.ron", env!("CARGO_MANIFEST_DIR"));
        let profile = pnn_sim::profile::DeviceProfile::load(std::path::Path::new(&path)).unwrap();
        let spec = LayerShape::dense(784, 16);
        let deterministic = name != "aihwkit-io";
        for probe in probes() {
            let probe = Probe {
                deterministic,
                ..probe
            };
            let on_gpu =
                || GpuOracle::with_noise(Arc::clone(&gpu), spec, &profile.noise, 0).unwrap();
            let mut cpu = SimOracle::for_profile(&[spec], &profile).unwrap().remove(0);
            eprintln!("profile {name}, probe {probe:?}");
            // The contract's in-process checks repeat evaluations: noise-free devices only (as
            // tests/oracle_conformance.rs runs it on the CPU simulator's).
            if deterministic {
                check_contract(&mut on_gpu(), &probe).assert_passed();
            }
            check_agreement(&mut on_gpu(), &mut cpu, &probe, FEATURES).assert_passed();
        }
    }
}

fn probes() -> [Probe; 3] {
    [
        Probe::default(),
        Probe {
            sparse_input: true,
            seed: 2,
            ..Probe::default()
        },
        Probe {
            rows: 64,
            directions: 8,
            seed: 3,
            ..Probe::default()
        },
    ]
}

#[test]
fn the_gpu_oracle_conforms_on_both_paths() {
    let Some(gpu) = gpu("the_gpu_oracle_conforms_on_both_paths") else {
        return;
    };
    for spec in shapes() {
        for exact in [false, true] {
            for probe in probes() {
                eprintln!("{spec:?}, exact reference: {exact}, probe {probe:?}");
                check_contract(&mut gpu_layer(&gpu, spec, exact), &probe).assert_passed();
            }
        }
    }
}

#[test]
fn the_gpu_oracle_agrees_with_the_cpu_oracle() {
    let Some(gpu) = gpu("the_gpu_oracle_agrees_with_the_cpu_oracle") else {
        return;
    };
    for spec in shapes() {
        for exact in [false, true] {
            for probe in probes() {
                let mut cpu = SimOracle::new(spec);
                cpu.in_process().unwrap().set_exact_reference(exact);
                check_agreement(
                    &mut gpu_layer(&gpu, spec, exact),
                    &mut cpu,
                    &probe,
                    FEATURES,
                )
                .assert_passed();
            }
        }
    }
}

#[test]
fn two_gpu_runs_give_the_same_bits() {
    let Some(gpu) = gpu("two_gpu_runs_give_the_same_bits") else {
        return;
    };
    for spec in shapes() {
        for probe in probes() {
            check_agreement(
                &mut gpu_layer(&gpu, spec, false),
                &mut gpu_layer(&gpu, spec, false),
                &probe,
                Tolerance::EXACT,
            )
            .assert_passed();
        }
    }
}

#[test]
fn finite_differences_agree_with_the_cpu_within_a_percent() {
    let Some(gpu) = gpu("finite_differences_agree_with_the_cpu_within_a_percent") else {
        return;
    };
    // A small eps makes the differences of nearby values: the hardest case for the GPU's order
    // of summation.
    let probe = Probe {
        rows: 16,
        directions: 6,
        eps: 1e-3,
        ..Probe::default()
    };
    let spec = LayerShape::dense(784, 16);
    let (mut g, mut c) = (gpu_layer(&gpu, spec, false), SimOracle::new(spec));
    let params = probe.parameters(&spec);
    let input = probe.input(&spec);
    let mut worst = 0f32;
    for o in [&mut g as &mut dyn ForwardOracle, &mut c] {
        o.write_parameters(&params).unwrap();
        o.load_input(&input).unwrap();
    }
    for (k, chunk) in probe.chunks(&spec).into_iter().enumerate() {
        let seeds = probe.seeds(k);
        let fd = |o: &mut dyn ForwardOracle| {
            let mut pairs = Vec::new();
            o.evaluate_perturbed(chunk.clone(), &seeds, probe.eps, &mut pairs)
                .unwrap();
            (pairs.iter())
                .flat_map(|(p, m)| p.data.iter().zip(&m.data).map(|(a, b)| (a - b) / 0.002))
                .collect::<Vec<f32>>()
        };
        let (x, y) = (fd(&mut g), fd(&mut c));
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "chunk {chunk:?}: no feature moved");
        let gap = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(gap / scale);
        assert!(
            gap <= 1e-2 * scale,
            "chunk {chunk:?}: finite differences {gap:e} apart, largest {scale:e}"
        );
    }
    eprintln!("finite differences at most {worst:.2e} apart, relative to the largest");
}

/// Trains `batches` batches of 64 through `oracles`; every step's local losses and the final
/// parameters (the trainer's shadows and projections).
fn train<O: ForwardOracle>(
    oracles: Vec<O>,
    data: &Dataset,
    model: &ModelSpec,
    batches: usize,
) -> (Vec<f64>, Vec<f32>) {
    let hyper = Hyper {
        batch_size: 64,
        ..Hyper::default()
    };
    let init = initialise(&model.layer_specs(), model.classes, hyper.seed);
    let mut trainer = Trainer::new(oracles, init, hyper.clone()).unwrap();
    let order = epoch_order(hyper.seed, 0, data.train.len());
    let (mut losses, mut x) = (Vec::new(), Vec::new());
    for (b, batch) in order.chunks(hyper.batch_size).take(batches).enumerate() {
        data.normalizer.batch(&data.train, batch, &mut x);
        let labels: Vec<u8> = batch.iter().map(|&i| data.train.labels[i]).collect();
        let input = Activations::new(batch.len(), data.input_width(), x.clone());
        losses.extend(trainer.train_batch(0, b as u32, &input, &labels).unwrap());
    }
    let params = (trainer.layers().iter())
        .flat_map(|l| l.shadow.iter().chain(&l.projection.data).copied())
        .collect();
    (losses, params)
}

fn largest_gap<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len());
    (a.iter().zip(b))
        .map(|(&x, &y)| (x.into() - y.into()).abs())
        .fold(0.0, f64::max)
}

#[test]
fn mlp_steps_on_the_gpu_give_the_cpu_simulators_losses() {
    let Some(gpu) = gpu("mlp_steps_on_the_gpu_give_the_cpu_simulators_losses") else {
        return;
    };
    let batches = 3;
    let mut data = Dataset::load(DatasetKind::Mnist, &common::data_dir()).expect("MNIST");
    data.train.truncate(batches * 64);
    let hidden = Some(vec![50, 50]);
    let model = ModelSpec::new(
        DatasetKind::Mnist,
        ArchKind::Mlp,
        hidden,
        DEFAULT_PROJ_DIM,
        0,
    )
    .unwrap();
    let specs = model.layer_specs();
    let on_gpu: Vec<GpuOracle> = (specs.iter())
        .map(|s| GpuOracle::new(Arc::clone(&gpu), *s).unwrap())
        .collect();
    let (gpu_losses, gpu_params) = train(on_gpu, &data, &model, batches);
    let (cpu_losses, cpu_params) = train(SimOracle::for_layers(&specs), &data, &model, batches);
    let (_, initial) = train(SimOracle::for_layers(&specs), &data, &model, 0);
    let loss_diff = largest_gap(&gpu_losses, &cpu_losses);
    let weight_diff = largest_gap(&gpu_params, &cpu_params);
    let moved = largest_gap(&cpu_params, &initial);
    eprintln!(
        "MLP on the GPU: losses {loss_diff:.2e}, weights {weight_diff:.2e} from the CPU's after {batches} batches (training moved them by {moved:.2e})"
    );
    // The tolerances tests/conformance.rs holds the fast path to the reference choreography by.
    assert!(loss_diff < 2.5e-4, "losses differ by {loss_diff}");
    assert!(weight_diff < 2.5e-4, "weights differ by {weight_diff}");
    assert!(
        moved > 100.0 * weight_diff,
        "training moved the weights by only {moved}"
    );
}

#[test]
fn a_missing_adapter_exits_4_and_says_how_to_get_one() {
    let (code, _, stderr) = common::pnn_train(&[
        "--backend",
        "gpu:no-such-adapter-anywhere",
        "--dataset",
        "mnist",
        "--limit-train",
        "64",
        "--epochs",
        "1",
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("no usable GPU adapter whose name contains 'no-such-adapter-anywhere'"),
        "{stderr}"
    );
    assert!(stderr.contains("mesa-vulkan-drivers"), "{stderr}");
}

#[test]
fn what_the_gpu_does_not_simulate_is_refused_by_name() {
    let profile = format!("gpu:{}/devices/pcm.ron", env!("CARGO_MANIFEST_DIR"));
    let (code, _, stderr) = common::pnn_train(&[
        "--backend",
        &profile,
        "--dataset",
        "mnist",
        "--limit-train",
        "64",
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("does not simulate read_noise (drawn afresh"),
        "{stderr}"
    );
    assert!(stderr.contains("--backend sim:"), "{stderr}");
    let (code, _, stderr) = common::pnn_train(&[
        "--backend",
        "gpu",
        "--dataset",
        "mnist",
        "--arch",
        "cnn",
        "--limit-train",
        "64",
    ]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("convolutional block"), "{stderr}");
}
