//! Every backend through the one conformance suite (`pnn::oracle::conformance`): the contract
//! on each oracle, and agreement between pairs within stated tolerances.
//!
//! - the simulated oracle, ideal, dense and conv, on the fast path (dense and sparse inputs, the
//!   touched-columns shortcut) and on the literal reference choreography; on the noise-free
//!   device profiles (`faulty`, `mcu-int8`) too;
//! - the serial oracle over an in-process pipe to the emulated device, and over the emulator
//!   binary's pseudo-terminal (`pnn-emulate`), each held bit for bit to the simulated oracle.
//!
//! `tests/serial_hardware.rs` runs the same suite against a real device.

mod serial_support;

use pnn::backend::serial::{self, SerialOracle, SerialSpec, device::layer_spec};
use pnn::backend::sim::SimOracle;
use pnn::model::DEFAULT_PROJ_DIM;
use pnn::oracle::conformance::{Probe, Tolerance, check_agreement, check_contract};
use pnn::oracle::{ForwardOracle, LayerShape};
use serial_support::{Emulator, profile_path};

/// A small dense layer and a CNN block of 4 channels on MNIST's images, as the emulator builds
/// them from [`LAYERS`] (the block's fixed projection drawn from the run seed 0 and its index).
fn shapes() -> Vec<LayerShape> {
    pnn_emulator::parse_layers(LAYERS, DEFAULT_PROJ_DIM, 0).unwrap()
}

fn sim(spec: LayerShape, exact_reference: bool) -> SimOracle {
    let mut o = SimOracle::new(spec);
    o.in_process()
        .expect("the simulator is in process")
        .set_exact_reference(exact_reference);
    o
}

fn probes() -> [Probe; 2] {
    [
        Probe::default(),
        Probe {
            sparse_input: true,
            seed: 2,
            ..Probe::default()
        },
    ]
}

#[test]
fn the_simulated_oracle_conforms_on_every_path() {
    for spec in shapes() {
        for exact in [false, true] {
            for probe in probes() {
                eprintln!(
                    "exact reference: {exact}, sparse input: {}",
                    probe.sparse_input
                );
                check_contract(&mut sim(spec, exact), &probe).assert_passed();
            }
        }
    }
}

#[test]
fn a_batch_large_enough_to_pack_conforms() {
    // Dense inputs of many rows take the packed-panel product on the fast path.
    let probe = Probe {
        rows: 64,
        ..Probe::default()
    };
    check_contract(&mut sim(LayerShape::dense(784, 16), false), &probe).assert_passed();
}

/// How far the fast paths' perturbed features may be from the literal choreography's: the
/// reference rounds `w ± eps v` to f32, which costs about 2^-24 |w| / (eps |v|) of the
/// perturbation (see tests/conformance.rs). Measured: up to 6.6e-7 on features of about 1
/// (printed with --nocapture); clean forwards, parameters after updates and the forwards after
/// them agree bit for bit.
const FAST_VS_REFERENCE: Tolerance = Tolerance {
    abs: 1e-5,
    rel: 0.0,
};

#[test]
fn the_fast_paths_agree_with_the_reference_choreography() {
    let tolerance = FAST_VS_REFERENCE;
    for spec in shapes() {
        for probe in probes() {
            check_agreement(
                &mut sim(spec, false),
                &mut sim(spec, true),
                &probe,
                tolerance,
            )
            .assert_passed();
        }
    }
}

#[test]
fn the_noise_free_device_profiles_conform_on_both_paths() {
    for name in ["faulty", "mcu-int8"] {
        let profile =
            pnn_sim::profile::DeviceProfile::load(std::path::Path::new(&profile_path(name)))
                .unwrap();
        let layer = |exact| {
            let spec = LayerShape::dense(784, 16);
            let mut o = SimOracle::for_profile(&[spec], &profile).unwrap().remove(0);
            o.in_process().unwrap().set_exact_reference(exact);
            o
        };
        for probe in probes() {
            eprintln!("profile {name}");
            check_contract(&mut layer(false), &probe).assert_passed();
            check_contract(&mut layer(true), &probe).assert_passed();
            check_agreement(
                &mut layer(false),
                &mut layer(true),
                &probe,
                FAST_VS_REFERENCE,
            )
            .assert_passed();
        }
    }
}

/// The contract on every layer of a device, and the device held bit for bit to the simulated
/// oracle of each layer it describes. One simulated oracle follows each device layer through
/// every probe: a conv block's BatchNorm running statistics, which the protocol cannot reset,
/// then have the same history on both sides.
fn device_conforms(oracles: &mut [SerialOracle]) {
    assert_eq!(oracles.len(), 2, "a dense layer and a conv block");
    for o in oracles {
        let mut twin = sim(*o.spec(), false);
        for probe in probes() {
            check_contract(o, &probe).assert_passed();
            check_agreement(o, &mut twin, &probe, Tolerance::EXACT).assert_passed();
        }
    }
}

/// The layers every backend here is checked on, as `pnn-emulate --layers` says them.
const LAYERS: &str = "784x16,conv1x28x28:4";

/// Oracles for every layer the device describes, as the device describes them.
fn own_layers(device: serial::device::SerialDevice) -> Vec<SerialOracle> {
    let specs: Vec<LayerShape> = (device.summary().layers.iter())
        .map(|d| layer_spec(d).unwrap())
        .collect();
    device.oracles(&specs).unwrap()
}

#[test]
fn the_serial_oracle_conforms_over_an_in_process_pipe() {
    let (mut oracles, device) = serial_support::in_process(LAYERS, &shapes());
    device_conforms(&mut oracles);
    drop(oracles);
    device.join().unwrap();
}

#[test]
fn the_serial_oracle_conforms_over_the_emulators_pseudo_terminal() {
    let emulator = Emulator::spawn(LAYERS, &[]);
    let spec = SerialSpec::parse(&format!("{}?timeout_ms=10000", emulator.path)).unwrap();
    let mut oracles = own_layers(serial::connect(&spec).expect("handshakes"));
    device_conforms(&mut oracles);
}

/// The suite is not vacuous: an oracle that breaks the contract fails the checks it breaks.
mod broken {
    use std::ops::Range;

    use pnn::oracle::conformance::{Outcome, Probe, check_contract};
    use pnn::oracle::{
        Activations, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, LayerShape,
        OracleError, PerturbedPair, UpdateTerm,
    };

    use super::sim;

    /// A simulated layer whose perturbed evaluations leave a trace and whose updates are a
    /// little too large, and which panics on an input of the wrong width.
    struct Broken(pnn::backend::sim::SimOracle);

    impl ForwardOracle for Broken {
        fn spec(&self) -> &LayerShape {
            self.0.spec()
        }
        fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
            self.0.write_parameters(params)
        }
        fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
            self.0.read_parameters()
        }
        fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
            assert_eq!(input.width, self.spec().input_width(), "wrong width");
            self.0.load_input(input)
        }
        fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
            self.0.forward(mode)
        }
        fn evaluate_perturbed(
            &mut self,
            chunk: Range<usize>,
            seeds: &[DirectionSeed],
            eps: f32,
            out: &mut Vec<PerturbedPair>,
        ) -> Result<(), OracleError> {
            self.0.evaluate_perturbed(chunk.clone(), seeds, eps, out)?;
            let trace = [UpdateTerm {
                seed: seeds[0],
                derivative: 1.0,
            }];
            self.0.apply_update(chunk, 1e-3, &trace)
        }
        fn apply_update(
            &mut self,
            chunk: Range<usize>,
            scale: f32,
            terms: &[UpdateTerm],
        ) -> Result<(), OracleError> {
            self.0.apply_update(chunk, scale * 1.001, terms)
        }
        fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
            self.0.read_layer_state()
        }
        fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
            self.0.write_layer_state(state)
        }
    }

    #[test]
    fn a_broken_oracle_fails_the_checks_it_breaks() {
        let mut o = Broken(sim(LayerShape::dense(784, 16), false));
        let report = check_contract(&mut o, &Probe::default());
        eprintln!("{report}");
        assert!(!report.passed());
        for name in [
            "leaves no trace of perturbed evaluations",
            "applies a seeded update as the protocol's arithmetic does",
            "refuses wrong shapes without panicking",
        ] {
            assert!(
                matches!(report.outcome(name), Some(Outcome::Failed(_))),
                "{name}: {:?}",
                report.outcome(name)
            );
        }
        assert!(matches!(
            report.outcome("runs a clean forward of the right shape"),
            Some(Outcome::Passed(_))
        ));
    }
}
