//! Bad input from the device side, one test each: a scripted fake device on a real
//! pseudo-terminal pair runs the real protocol server and then garbles, drops or replaces its
//! replies as each test's script says. The documented behaviour (`firmware_protocol::link`):
//! garbage, corrupt CRC, truncated frames, stale sequence numbers and silence are retried under
//! the same sequence number and recovered from; a wrong protocol version, silence past the
//! retries and a hang-up end with a clear error, quickly.

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use firmware_protocol::frame::{self, FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
use firmware_protocol::link::{LinkCounters, RetryPolicy, SerialPortTransport, Side};
use firmware_protocol::message::{PROTOCOL_VERSION, Request, Response};
use pnn::backend::serial::{self, SerialOracle};
use pnn::oracle::{
    Activations, DirectionSeed, ForwardMode, ForwardOracle, LayerShape, OracleError, UpdateTerm,
};
use pnn_emulator::{self as emulator, EmulatorConfig};
use serialport::{SerialPort, TTYPort};

/// What the fake device does with one request, after the real server has executed it.
enum Action {
    /// Send the real reply.
    Reply,
    /// Send these bytes instead.
    Send(Vec<u8>),
    /// Send nothing.
    Silence,
    /// Close the device side of the pty.
    HangUp,
}

/// One request as the fake device saw it.
struct Seen<'a> {
    seq: u16,
    request: Request<'a>,
    /// The real reply frame, delimiter included.
    reply: &'a [u8],
}

struct Fake {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const N_IN: usize = 6;
const N_OUT: usize = 4;
const ROWS: usize = 5;

fn policy() -> RetryPolicy {
    RetryPolicy {
        timeout: Duration::from_millis(150),
        retries: 3,
        baud: 921_600,
    }
}

/// A fake device serving one dense layer, scripted by `script`; returns the host's side.
fn fake_device(mut script: impl FnMut(&Seen<'_>) -> Action + Send + 'static) -> (Fake, TTYPort) {
    let (mut master, mut slave) = TTYPort::pair().expect("a pty pair");
    master.set_timeout(Duration::from_millis(20)).unwrap();
    slave.set_timeout(Duration::from_millis(150)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        let mut config = EmulatorConfig::new("fake", vec![LayerShape::dense(N_IN, N_OUT)]);
        (config.max_batch, config.boot_id) = (64, 42);
        let mut server = emulator::server(&config).unwrap();
        let mut decoder = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
        let (mut payload, mut out) = (vec![0u8; MAX_PAYLOAD], vec![0u8; MAX_ENCODED + 1]);
        let mut buf = vec![0u8; 4096];
        while !stopped.load(Ordering::Relaxed) {
            let n = match master.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::TimedOut => continue,
                Err(_) => return,
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let (used, f) = decoder.feed(rest);
                rest = &rest[used..];
                let Some(Ok(f)) = f else { continue };
                let len = server
                    .respond(f.seq, f.body, &mut payload, &mut out)
                    .unwrap();
                let seen = Seen {
                    seq: f.seq,
                    request: postcard::from_bytes(f.body).unwrap(),
                    reply: &out[..len],
                };
                match script(&seen) {
                    Action::Reply => master.write_all(&out[..len]).unwrap(),
                    Action::Send(bytes) => master.write_all(&bytes).unwrap(),
                    Action::Silence => {}
                    Action::HangUp => return,
                }
            }
        }
    });
    (
        Fake {
            stop,
            thread: Some(thread),
        },
        slave,
    )
}

fn connect(slave: TTYPort) -> Result<SerialOracle, OracleError> {
    let transport = SerialPortTransport::new(Box::new(slave), Side::Host);
    let mut oracles = serial::open_transport(
        Box::new(transport),
        policy(),
        &[LayerShape::dense(N_IN, N_OUT)],
    )?;
    Ok(oracles.remove(0))
}

/// Everything a training step asks of a layer; returns what came back and the parameters after
/// one seeded update.
fn exercise(o: &mut SerialOracle) -> Result<Outcome, OracleError> {
    let params: Vec<f32> = (0..N_IN * N_OUT + N_OUT)
        .map(|i| (i as f32 - 12.0) / 20.0)
        .collect();
    o.write_parameters(&params)?;
    let x: Vec<f32> = (0..ROWS * N_IN).map(|i| (i % 7) as f32 / 7.0).collect();
    o.load_input(&Activations::new(ROWS, N_IN, x))?;
    let seeds = [DirectionSeed(1), DirectionSeed(2)];
    let mut pairs = Vec::new();
    o.evaluate_perturbed(3..20, &seeds, 1e-2, &mut pairs)?;
    let terms = [
        UpdateTerm {
            seed: seeds[0],
            derivative: 0.5,
        },
        UpdateTerm {
            seed: seeds[1],
            derivative: -0.25,
        },
    ];
    o.apply_update(3..20, 0.1, &terms)?;
    let forward = o.forward(ForwardMode::Train)?.features.data;
    let perturbed = pairs
        .iter()
        .flat_map(|(p, m)| p.data.iter().chain(&m.data).copied())
        .collect();
    Ok((perturbed, forward, o.read_parameters()?))
}

type Outcome = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The outcome of [`exercise`] with a well-behaved device.
fn reference() -> Outcome {
    let (_fake, slave) = fake_device(|_| Action::Reply);
    exercise(&mut connect(slave).unwrap()).unwrap()
}

/// Runs [`exercise`] against a device that misbehaves once on the first request `pick` selects,
/// as `fault` says; checks the run recovered with the reference numbers.
fn recovers(pick: fn(&Request<'_>) -> bool, fault: fn(&Seen<'_>) -> Action) -> LinkCounters {
    let mut done = false;
    let (_fake, slave) = fake_device(move |seen| {
        if !done && pick(&seen.request) {
            done = true;
            fault(seen)
        } else {
            Action::Reply
        }
    });
    let mut oracle = connect(slave).unwrap();
    let outcome = exercise(&mut oracle).expect("recovers");
    assert_eq!(
        outcome,
        reference(),
        "the same numbers as with a good device"
    );
    oracle.link_counters()
}

fn is_update(r: &Request<'_>) -> bool {
    matches!(r, Request::ApplyUpdate { .. })
}

fn is_evaluation(r: &Request<'_>) -> bool {
    matches!(r, Request::EvaluatePerturbed { .. })
}

fn is_forward(r: &Request<'_>) -> bool {
    matches!(r, Request::Forward { .. })
}

#[test]
fn garbage_before_a_reply_is_skipped() {
    let c = recovers(is_forward, |seen| {
        let mut bytes = b"\x01\xffnoise from a rebooting device\x13\x37".to_vec();
        bytes.push(0);
        bytes.extend_from_slice(b"\x05\x05\x05");
        bytes.push(0);
        bytes.extend_from_slice(seen.reply);
        Action::Send(bytes)
    });
    assert!(c.resyncs >= 1, "{c:?}");
}

#[test]
fn a_corrupted_reply_is_retried_and_the_update_applied_once() {
    // The device applies the update, its Ack is corrupted on the way: the host retransmits
    // under the same sequence number and the device answers from its cache. The parameters
    // read back at the end equal the reference's, so the update was applied exactly once.
    let c = recovers(is_update, |seen| {
        let mut bytes = seen.reply.to_vec();
        let at = bytes.len() / 2;
        bytes[at] = if bytes[at] == 0x55 { 0x56 } else { 0x55 };
        Action::Send(bytes)
    });
    assert!(c.resyncs >= 1 && c.retries >= 1, "{c:?}");
}

#[test]
fn a_truncated_reply_is_retried() {
    // Half a frame, then nothing: the host times out, retransmits; the half frame and the next
    // reply run together and fail the CRC; the retransmission after that gets through.
    let c = recovers(is_evaluation, |seen| {
        Action::Send(seen.reply[..seen.reply.len() / 2].to_vec())
    });
    assert!(c.retries >= 1, "{c:?}");
}

#[test]
fn a_reply_with_another_sequence_number_is_discarded() {
    let c = recovers(is_forward, |seen| {
        // The same reply under the previous request's sequence number (a late duplicate).
        let mut body_dec = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
        let (_, f) = body_dec.feed(seen.reply);
        let body: Response = f.unwrap().unwrap().decode().unwrap();
        let (mut scratch, mut out) = (vec![0u8; MAX_PAYLOAD], vec![0u8; MAX_ENCODED + 1]);
        let n = frame::encode(seen.seq.wrapping_sub(1), &body, &mut scratch, &mut out).unwrap();
        Action::Send(out[..n].to_vec())
    });
    assert!(c.stale_replies >= 1 && c.retries >= 1, "{c:?}");
}

/// A device that answers the handshake with `version` instead of its own.
fn device_speaking(version: u16) -> (Fake, TTYPort) {
    fake_device(move |seen| {
        let mut dec = FrameDecoder::new(vec![0u8; MAX_ENCODED]);
        let (_, f) = dec.feed(seen.reply);
        let f = f.unwrap().unwrap();
        match f.decode::<Response>().unwrap() {
            Response::Hello(mut info) => {
                info.protocol_version = version;
                let (mut scratch, mut out) = (vec![0u8; 256], vec![0u8; 300]);
                let n = frame::encode(seen.seq, &Response::Hello(info), &mut scratch, &mut out)
                    .unwrap();
                Action::Send(out[..n].to_vec())
            }
            _ => Action::Reply,
        }
    })
}

#[test]
fn a_wrong_protocol_version_is_a_clear_error() {
    // A newer device, and an older one (version 1 firmware knows no CNN blocks).
    for version in [99, PROTOCOL_VERSION - 1] {
        let (_fake, slave) = device_speaking(version);
        let err = connect(slave).err().expect("refused").to_string();
        assert!(
            err.contains(&format!("protocol version {version},"))
                && err.contains(&format!("this host speaks version {PROTOCOL_VERSION}")),
            "{err}"
        );
    }
    // The same device speaking this host's version is accepted: the refusal is the version's.
    let (_fake, slave) = device_speaking(PROTOCOL_VERSION);
    assert!(connect(slave).is_ok());
}

#[test]
fn a_silent_device_is_retried_then_given_up_on() {
    let (_fake, slave) = fake_device(|seen| {
        if is_forward(&seen.request) {
            Action::Silence
        } else {
            Action::Reply
        }
    });
    let mut oracle = connect(slave).unwrap();
    let start = Instant::now();
    let err = exercise(&mut oracle).expect_err("gives up").to_string();
    let p = policy();
    assert!(
        err.contains("did not answer Forward") && err.contains("4 tries"),
        "{err}"
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed >= p.timeout * (p.retries + 1) && elapsed < p.timeout * (p.retries + 1) * 3,
        "gave up after {elapsed:?}"
    );
    assert_eq!(oracle.link_counters().retries, p.retries as u64);
}

#[test]
fn a_device_that_hangs_up_ends_at_once() {
    let (_fake, slave) = fake_device(|seen| {
        if is_evaluation(&seen.request) {
            Action::HangUp
        } else {
            Action::Reply
        }
    });
    let mut oracle = connect(slave).unwrap();
    let start = Instant::now();
    let err = exercise(&mut oracle).expect_err("fails").to_string();
    assert!(err.contains("closed the link"), "{err}");
    assert!(
        start.elapsed() < policy().timeout * 2,
        "{:?}",
        start.elapsed()
    );
    assert_eq!(oracle.link_counters().retries, 0);
}
