//! Conformance of a real device, behind the `hardware-tests` feature:
//!
//! ```text
//! PNN_TEST_PORT='/dev/ttyACM0?baud=921600&timeout_ms=5000' \
//!     cargo test --release --features hardware-tests --test serial_hardware
//! ```
//!
//! Every layer the device declares is programmed, fed a batch and exercised the way training
//! does. With parameter read-back, a perturbed evaluation must leave the parameters bit-identical
//! and a seeded update must match the host's arithmetic bit for bit. An emulator's path works as
//! PNN_TEST_PORT too, which is how these tests are themselves tested.
#![cfg(feature = "hardware-tests")]

use firmware_protocol::direction::apply_update;
use pnn::backend::serial::{self, SerialSpec, device::layer_spec};
use pnn::oracle::{Activations, DirectionSeed, ForwardMode, ForwardOracle, UpdateTerm};

fn port() -> SerialSpec {
    let port = std::env::var("PNN_TEST_PORT")
        .expect("set PNN_TEST_PORT to the device's serial port, e.g. /dev/ttyACM0");
    SerialSpec::parse(&port).expect("PNN_TEST_PORT is PATH[?baud=N&timeout_ms=N&retries=N]")
}

#[test]
fn the_device_handshakes_and_every_layer_conforms() {
    let device = serial::connect(&port()).expect("handshake");
    let summary = device.summary().clone();
    eprintln!("device: {summary:?}");
    assert!(!summary.layers.is_empty(), "the device declares no layer");
    let specs: Vec<_> = summary
        .layers
        .iter()
        .map(|d| layer_spec(d).expect("the device describes its layers consistently"))
        .collect();
    let mut oracles = device.oracles(&specs).expect("its own layers match");
    let rows = (summary.max_batch as usize).clamp(1, 8);
    for (l, o) in oracles.iter_mut().enumerate() {
        let spec = o.spec().clone();
        let mut params: Vec<f32> = (0..spec.param_count())
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        o.write_parameters(&params).expect("programs");
        let x: Vec<f32> = (0..rows * spec.input_width())
            .map(|i| (i % 13) as f32 / 13.0)
            .collect();
        o.load_input(&Activations::new(rows, spec.input_width(), x))
            .expect("loads a batch");
        let clean = o.forward(ForwardMode::Eval).expect("forward");
        assert_eq!(clean.features.data.len(), rows * spec.feature_width());
        let chunk = 0..spec.param_count().min(1000);
        let seeds = [DirectionSeed(11), DirectionSeed(12)];
        let mut pairs = Vec::new();
        o.evaluate_perturbed(chunk.clone(), &seeds, 1e-2, &mut pairs)
            .expect("perturbed evaluation");
        assert_eq!(pairs.len(), 2);
        let terms = [UpdateTerm {
            seed: seeds[0],
            derivative: 0.5,
        }];
        o.apply_update(chunk.clone(), 1e-2, &terms).expect("update");
        let n = chunk.len();
        apply_update(
            &mut params[chunk],
            1e-2,
            &terms,
            &mut vec![0.0; n],
            &mut vec![0.0; n],
        );
        if summary.capabilities.parameter_read_back {
            let back = o.read_parameters().expect("read-back");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&back) == bits(&params),
                "layer {l}: after a perturbed evaluation and an update the device's parameters differ from the host's arithmetic"
            );
        }
    }
    eprintln!("wire: {:?}", oracles[0].link_counters());
}
