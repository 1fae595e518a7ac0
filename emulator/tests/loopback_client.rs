//! The typed client of `firmware_protocol::link` drives a device server in the same process
//! (`Loopback`: no thread, no timing) exactly as it drives the emulator over a pipe: the way
//! tests of device layers talk to a server, through the very code the host runs.

use std::time::Duration;

use firmware_protocol::direction::{DirectionSeed, UpdateTerm};
use firmware_protocol::link::{Client, ClientError, Link, Loopback, RetryPolicy, Transport, pipe};
use firmware_protocol::message::{ActivationEncoding, ChunkRange, DeviceError, ForwardMode};
use firmware_protocol::shape::LayerShape;
use pnn_emulator::{EmulatorConfig, serve, server};

const N_IN: usize = 30;
const N_OUT: usize = 8;
const ROWS: usize = 5;

fn policy() -> RetryPolicy {
    RetryPolicy {
        timeout: Duration::from_secs(10),
        retries: 0,
        baud: 921_600,
    }
}

fn config() -> EmulatorConfig {
    EmulatorConfig {
        boot_id: 77,
        ..EmulatorConfig::new("loopback", vec![LayerShape::dense(N_IN, N_OUT)])
    }
}

/// Programs the layer, evaluates three directions, applies their update and reads everything
/// back, through `client`; returns the bits of every result.
fn exercise<T: Transport>(client: &mut Client<T>) -> Vec<Vec<u32>> {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let info = client.hello().unwrap();
    assert_eq!((info.name, info.boot_id, info.layers), ("loopback", 77, 1));
    let d = client.describe_layer(0).unwrap();
    assert_eq!(d.param_count as usize, N_IN * N_OUT + N_OUT);
    let params: Vec<f32> = (0..N_IN * N_OUT + N_OUT)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 400.0)
        .collect();
    // Two requests, as a host splits a long write.
    let (a, b) = params.split_at(100);
    client.set_parameters(0, 0, a).unwrap();
    client.set_parameters(0, 100, b).unwrap();
    let x: Vec<f32> = (0..ROWS * N_IN).map(|i| (i % 7) as f32 / 7.0).collect();
    client.load_input(0, ROWS as u32, 0, &x).unwrap();
    let seeds = [DirectionSeed(1), DirectionSeed(2), DirectionSeed(3)];
    let chunk = ChunkRange { start: 4, end: 200 };
    let mut out = Vec::new();
    let mut all = Vec::new();
    let f32s = ActivationEncoding::F32;
    client
        .evaluate_perturbed(0, chunk, 1e-2, &seeds, 2 * 3 * ROWS * N_OUT, f32s, &mut out)
        .unwrap();
    all.push(bits(&out));
    let terms = seeds.map(|seed| UpdateTerm {
        seed,
        derivative: -0.5,
    });
    client.apply_update(0, chunk, 0.1, &terms).unwrap();
    client
        .forward(0, ForwardMode::Eval, ROWS * N_OUT, f32s, &mut out)
        .unwrap();
    all.push(bits(&out));
    client.read_parameters(0, params.len(), &mut out).unwrap();
    all.push(bits(&out));
    // A refusal comes back typed.
    let err = client.describe_layer(3).unwrap_err();
    assert!(err.is_refusal(), "{err}");
    assert!(err.to_string().starts_with("DescribeLayer: "), "{err}");
    client.reset().unwrap();
    let err = client
        .forward(0, ForwardMode::Eval, ROWS * N_OUT, f32s, &mut out)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                request: "Forward",
                error: DeviceError::NoInput
            }
        ),
        "{err}"
    );
    all
}

#[test]
fn a_server_in_process_answers_the_client_as_the_emulator_over_a_pipe_does() {
    let config = config();
    let mut loopback = Client::new(Link::new(
        Loopback::new(server(&config).unwrap()),
        policy(),
        0,
    ));
    let in_process = exercise(&mut loopback);
    let traffic = loopback.counters();
    // The server is there to inspect (as layer tests inspect their layers).
    let stats = loopback.link().transport().server().stats();
    assert_eq!(stats.requests, loopback.counters().round_trips);
    // A request sent again under its sequence number is answered from the device's cache.
    let chunk = ChunkRange { start: 0, end: 10 };
    let term = [UpdateTerm {
        seed: DirectionSeed(9),
        derivative: 1.0,
    }];
    let count = N_IN * N_OUT + N_OUT;
    loopback.set_parameters(0, 0, &vec![0.0; count]).unwrap();
    let (mut first, mut again) = (Vec::new(), Vec::new());
    for read in [&mut first, &mut again] {
        loopback.link_mut().set_last_seq(499);
        loopback.apply_update(0, chunk, 0.5, &term).unwrap();
        loopback.read_parameters(0, count, read).unwrap();
    }
    assert!(first[..10].iter().any(|&p| p != 0.0));
    assert_eq!(first, again, "applied once");
    let server = loopback.link().transport().server();
    assert_eq!(server.stats().retransmissions, 1);

    let (host, mut device) = pipe();
    let served = config.clone();
    let thread = std::thread::spawn(move || serve(&mut device, &served, usize::MAX, false));
    let mut piped = Client::new(Link::new(host, policy(), 0));
    assert_eq!(exercise(&mut piped), in_process);
    assert_eq!(piped.counters(), traffic);
    drop(piped);
    thread.join().unwrap().unwrap();
}
