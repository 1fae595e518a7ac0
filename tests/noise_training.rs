//! MF+DD training through the device presets on real MNIST (issue 4): every preset still learns
//! within a measured margin of the ideal run, and in-situ training compensates fixed faults
//! that training elsewhere and deploying cannot.
//!
//! The short run: the first 10,000 training samples, 4 epochs, batch 256, P = 4, lr 0.01, and
//! eps = 1 (not the thesis's 1e-3: on a noisy device `L+ - L-` drowns once the output noise
//! passes about 0.4 eps, see `noise_sweep.rs`; on the ideal device eps = 1 and eps = 1e-3 give
//! the same accuracy here, 0.723 and 0.729). Accuracies are of the cumulative prediction on the
//! whole test set, evaluated through the device.
//!
//! Run: `PNN_DATA_DIR=/path/to/data cargo test --release --test noise_training -- --nocapture`.

use std::path::Path;
use std::sync::OnceLock;

use pnn::data::DatasetKind;
use pnn::run::noise_sweep::{self, Setup, Trained};
use pnn::train::Hyper;
use pnn_sim::profile::DeviceProfile;

/// The real datasets: `$PNN_DATA_DIR`, else `shared/data` beside the repository.
fn data_dir() -> std::path::PathBuf {
    std::env::var_os("PNN_DATA_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
        Into::into,
    )
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let hyper = Hyper {
            lr: 0.01,
            eps: 1.0,
            ..Hyper::default()
        };
        Setup::load(DatasetKind::Mnist, None, Some(10_000), None, hyper, 4).unwrap_or_else(|e| {
            panic!("these tests train on real MNIST ({e}); set PNN_DATA_DIR or place shared/data beside the repository")
        })
    })
}

fn profile(name: &str) -> DeviceProfile {
    DeviceProfile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("devices/{name}.ron")))
        .unwrap()
}

/// Trains through `name`'s devices; the summary holds the test figures through them.
fn train(name: &str) -> Trained {
    let trained = noise_sweep::train(&setup().as_ref(), &profile(name)).unwrap();
    println!(
        "{name}: test accuracy cumulative {:.4}, final layer {:.4}",
        trained.summary.test_accuracy_cumulative, trained.summary.test_accuracy_final_layer
    );
    trained
}

/// The ideal run, shared by every test of this file (measured: 0.7229).
fn ideal() -> &'static Trained {
    static IDEAL: OnceLock<Trained> = OnceLock::new();
    IDEAL.get_or_init(|| train("ideal"))
}

/// Every preset must reach this accuracy whatever its margin (chance is 0.1; the ideal run of
/// the same length reaches 0.72).
const LEARNS: f64 = 0.6;

fn assert_within(name: &str, margin: f64) {
    let ideal_run = ideal();
    let ideal = ideal_run.summary.test_accuracy_cumulative;
    let trained = train(name);
    let acc = trained.summary.test_accuracy_cumulative;
    println!(
        "{name}: {acc:.4} vs ideal {ideal:.4} ({:+.4}, margin {margin})",
        acc - ideal
    );
    assert!(acc >= LEARNS, "{name} did not learn: {acc}");
    // Within the margin, but not the ideal run itself: a preset whose effects never reached
    // training would pass the margin too.
    assert_ne!(
        trained.summary.weights_sha256, ideal_run.summary.weights_sha256,
        "{name} trained to the ideal run's weights: its effects never reached training"
    );
    assert!(
        acc >= ideal - margin,
        "{name}: {acc} is more than {margin} below the ideal run's {ideal}"
    );
}

// Margins: each is the largest shortfall measured over seeds 0, 1 and 2 (in brackets: each
// seed's accuracy minus that seed's ideal run) plus about 0.03, the spread of the ideal run
// itself over those seeds (0.722 to 0.732), for run-to-run variation. The tests run seed 0.

/// Output noise 0.06 in output units, 7/9-bit converters; the DAC's bound of 1 clips the hidden
/// activations (the second layer sees little more than their signs: its own accuracy falls to
/// 0.17-0.32), the cumulative prediction holds. Measured [-0.034, -0.049, -0.034].
#[test]
fn aihwkit_io_learns_within_8_points_of_ideal() {
    assert_within("aihwkit-io", 0.08);
}

/// 8-bit converters, output noise, 1.75% read noise, weights clipped at 1 (never reached).
/// Measured [-0.031, -0.044, -0.030].
#[test]
fn aihwkit_hwa_learns_within_8_points_of_ideal() {
    assert_within("aihwkit-hwa", 0.08);
}

/// 6% programming error, 2% read noise, drift. Measured [+0.002, -0.029, -0.022].
#[test]
fn pcm_learns_within_6_points_of_ideal() {
    assert_within("pcm", 0.06);
}

/// int8 weights and activations: nearly free. Measured [-0.005, -0.005, -0.006].
#[test]
fn mcu_int8_learns_within_3_points_of_ideal() {
    assert_within("mcu-int8", 0.03);
}

/// Gain mismatch and 10% stuck weights, trained through. Measured [-0.015, -0.033, -0.048].
#[test]
fn faulty_learns_within_8_points_of_ideal() {
    assert_within("faulty", 0.08);
}

/// Training through the faulty device against training on the ideal simulator and deploying
/// the weights to the faulty device (the same device: same profile, same seed, so the same
/// faults). Measured in-situ minus deployed: +0.114, +0.140, +0.142 for seeds 0, 1, 2; the
/// deployed weights lose 0.13 to 0.19 against the ideal run.
#[test]
fn in_situ_training_compensates_faults_that_deployment_cannot() {
    let s = setup().as_ref();
    let faulty = profile("faulty");
    let in_situ = train("faulty").summary.test_accuracy_cumulative;
    let mut deployed = noise_sweep::deploy(&s, &ideal().model, &faulty).unwrap();
    let deployed = noise_sweep::evaluate(&s, &mut deployed).unwrap();
    let ideal_acc = ideal().summary.test_accuracy_cumulative;
    println!(
        "ideal {ideal_acc:.4}; trained ideal, deployed to faulty {:.4}; trained in situ on faulty {:.4} ({:+.4})",
        deployed.accuracy_cumulative,
        in_situ,
        in_situ - deployed.accuracy_cumulative
    );
    assert!(
        in_situ >= deployed.accuracy_cumulative + 0.06,
        "in situ {in_situ} vs deployed {}",
        deployed.accuracy_cumulative
    );
    // The faults cost the deployed weights a lot: they are what in-situ training recovers.
    assert!(deployed.accuracy_cumulative < ideal_acc - 0.08);
}

/// Noise is drawn from seeded streams: the same run on a noisy device gives the same weights.
#[test]
fn training_on_a_noisy_device_is_deterministic() {
    let s = noise_sweep::SetupRef {
        epochs: 1,
        ..setup().as_ref()
    };
    let hwa = profile("aihwkit-hwa");
    let a = noise_sweep::train(&s, &hwa).unwrap().summary.weights_sha256;
    let b = noise_sweep::train(&s, &hwa).unwrap().summary.weights_sha256;
    assert_eq!(a, b);
    let other = DeviceProfile {
        noise: pnn_sim::NoiseModel {
            seed: hwa.noise.seed + 1,
            ..hwa.noise.clone()
        },
        ..hwa
    };
    assert_ne!(
        a,
        noise_sweep::train(&s, &other)
            .unwrap()
            .summary
            .weights_sha256
    );
}

/// Noise must reach training, for every profile in devices/ (a new one included): the same short
/// run on a device with any effect on ends with other weights and other test figures (evaluated
/// through the device) than on the ideal profile.
#[test]
fn every_shipped_preset_changes_training() {
    let mut data = setup().data.clone();
    data.train.truncate(2048);
    data.test.truncate(2000);
    let s = noise_sweep::SetupRef {
        data: &data,
        model: &setup().model,
        hyper: setup().hyper.clone(),
        epochs: 1,
    };
    let ideal = noise_sweep::train(&s, &profile("ideal")).unwrap().summary;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("devices");
    let mut presets = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "ron") {
            continue;
        }
        let device = DeviceProfile::load(&path).unwrap();
        if device.noise.is_ideal() {
            continue;
        }
        let trained = noise_sweep::train(&s, &device).unwrap().summary;
        println!(
            "{}: loss {:.4} vs ideal {:.4}",
            device.name, trained.test_loss_cumulative, ideal.test_loss_cumulative
        );
        assert_ne!(
            trained.weights_sha256, ideal.weights_sha256,
            "{}: trained to the ideal weights",
            device.name
        );
        assert_ne!(
            trained.test_loss_cumulative, ideal.test_loss_cumulative,
            "{}: evaluated as the ideal device",
            device.name
        );
        presets += 1;
    }
    assert!(presets >= 5, "only {presets} noisy presets in devices/");
}

/// `--backend sim` and `--backend sim:devices/ideal.ron` are the same device: the same run gives
/// the same figures and weights, bit for bit.
#[test]
fn the_plain_simulator_and_the_ideal_profile_train_alike_at_the_cli() {
    let run = |backend: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pnn-train"))
            .args(["--backend", backend, "--dataset", "mnist", "--epochs", "2"])
            .args([
                "--limit-train",
                "2000",
                "--limit-test",
                "1000",
                "--seed",
                "3",
            ])
            .env("PNN_DATA_DIR", data_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.retain(|k, _| !k.contains("seconds"));
        obj.remove("backend");
        v
    };
    let ideal = Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/ideal.ron");
    assert_eq!(run("sim"), run(&format!("sim:{}", ideal.display())));
}
