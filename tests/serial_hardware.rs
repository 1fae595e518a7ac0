//! The conformance suite (`pnn::oracle::conformance`) against a real device, behind the
//! `hardware-tests` feature:
//!
//! ```text
//! PNN_TEST_PORT='/dev/ttyACM0?baud=921600&timeout_ms=5000' \
//!     cargo test --release --features hardware-tests --test serial_hardware -- --nocapture
//! ```
//!
//! Every layer the device declares goes through the contract, as every backend does in CI
//! (tests/oracle_conformance.rs): programming, clean forwards, perturbed evaluations that leave
//! no trace, seeded updates equal to the protocol's arithmetic bit for bit (where the device can
//! read its parameters back; skipped, and said so, where it cannot), and wrong shapes refused.
//! A device that draws noise per evaluation sets `PNN_TEST_NOISY=1`: the checks that compare two
//! evaluations bit for bit are then skipped. An emulator's path works as PNN_TEST_PORT too, which
//! is how this test is itself tested.
#![cfg(feature = "hardware-tests")]

use pnn::backend::serial::{self, SerialSpec, device::layer_spec};
use pnn::oracle::conformance::{Outcome, Probe, check_contract};

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
    let probe = Probe {
        rows: (summary.max_batch as usize).clamp(1, 8),
        directions: (summary.max_directions as usize).clamp(1, 3),
        deterministic: std::env::var_os("PNN_TEST_NOISY").is_none(),
        ..Probe::default()
    };
    let mut failed = Vec::new();
    for (l, o) in oracles.iter_mut().enumerate() {
        let report = check_contract(o, &probe);
        eprintln!("layer {l}: {report}");
        if summary.capabilities.parameter_read_back {
            let update =
                report.outcome("applies a seeded update as the protocol's arithmetic does");
            assert!(
                matches!(update, Some(Outcome::Passed(_))),
                "layer {l}: a device with read-back must have its update checked: {update:?}"
            );
        }
        if !report.passed() {
            failed.push(l);
        }
    }
    eprintln!("wire: {:?}", oracles[0].link_counters());
    assert!(
        failed.is_empty(),
        "layers {failed:?} do not conform (reports above)"
    );
}
