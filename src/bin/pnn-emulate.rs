//! `pnn-emulate`: a simulated device on a real pseudo-terminal (a thin CLI over `pnn_emulator`).
//!
//! Prints the path a host opens (e.g. `/dev/pts/7`) as the first line on stdout, then serves
//! the device protocol there, one host after another, until killed:
//!
//! ```text
//! pnn-emulate --profile devices/ideal.ron --layers 784x50,50x50
//! pnn-emulate --profile devices/pcm.ron --layers 784x50,50x50          # the profile's noise
//! pnn-emulate --profile devices/ideal.ron --layers conv1x28x28:32,conv32x14x14:32 --seed 3
//! ```
//!
//! A bad line and a flaky device on purpose (`pnn_emulator::faults`): every byte damaged
//! with probability `--corrupt-rate`, every frame lost with `--drop-rate`, replies held back up to
//! `--delay-ms`, and a power-cycle at every `--reset-every`-th request (parameters and input
//! forgotten, a new boot id), all drawn from `--fault-seed`. `--max-frame` makes frames short,
//! as a noisy line needs:
//!
//! ```text
//! pnn-emulate --profile devices/ideal.ron --layers 784x50,50x50 \
//!     --corrupt-rate 1e-3 --drop-rate 0.01 --reset-every 3000 --max-frame 256
//! ```
//!
//! Several devices from one process: `--layers` once per device, each served on its own
//! pseudo-terminal (its path printed on its own line, in order) and from its own thread:
//!
//! ```text
//! pnn-emulate --profile devices/ideal.ron --layers 784x50 --layers 50x50
//! ```
//!
//! Over the network, as a board behind ser2net is: `--listen ADDR` (once per device) serves
//! each device on a TCP address instead, printing the address bound (port 0 picks a free one)
//! for `pnn-train --backend tcp:HOST:PORT`:
//!
//! ```text
//! pnn-emulate --profile devices/ideal.ron --layers 784x50,50x50 --listen 127.0.0.1:4000
//! ```
//!
//! Real link speeds (`pnn_emulator::timing`): `--baud` paces the line as a UART (10 bits a
//! byte), `--latency-us` adds a fixed time to every frame, `--macs-per-second` makes the
//! device's evaluations take the time a microcontroller would:
//!
//! ```text
//! pnn-emulate --profile devices/ideal.ron --layers 784x50 --layers 50x50 --baud 921600
//! ```
//!
//! Exit codes: 2 invalid arguments or profile (or layers the profile cannot serve), 4 the
//! pseudo-terminal or socket failed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use firmware_protocol::frame::MAX_PAYLOAD;
use firmware_protocol::link::TcpListenerLine;
use firmware_protocol::message::ActivationEncoding;
use pnn::model::DEFAULT_PROJ_DIM;
use pnn_emulator::{
    self as emulator, DeviceLine, EmulatorConfig, FaultConfig, FaultyTransport, PacedLine, Timing,
};
use pnn_sim::profile::DeviceProfile;

#[derive(Parser, Debug)]
#[command(
    name = "pnn-emulate",
    version,
    about = "Serve simulated PNN devices on pseudo-terminals or TCP; prints the path (or address) of each first"
)]
struct Args {
    /// Device profile (RON), e.g. devices/ideal.ron: the device's name, and the hardware effects
    /// of its dense layers (keyed per layer as `--backend sim:<profile>` keys them).
    #[arg(long)]
    profile: PathBuf,
    /// The device's layers, comma-separated: INPUTSxOUTPUTS for a dense layer (784x50),
    /// convCxHxW:OUT for a CNN block on C maps of H x W with OUT channels (conv1x28x28:32).
    /// Given several times: several devices, one per occurrence, served concurrently.
    #[arg(long, value_parser = check_layers, required = true)]
    layers: Vec<String>,
    /// Pace the line as a UART of this many baud (10 bits a byte, each direction on its own
    /// clock): a frame reaches the device, and its reply the host, no sooner than such a line
    /// carries it. USB full speed is about --baud 12000000.
    #[arg(long, value_parser = clap::value_parser!(u32).range(300..))]
    baud: Option<u32>,
    /// Microseconds added to every frame, each way (a USB frame, a driver's turnaround).
    #[arg(long, default_value_t = 0)]
    latency_us: u64,
    /// The device's arithmetic: multiply-accumulates per second (a dense forward pass is rows x
    /// inputs x outputs of them; a perturbed evaluation 2P passes). Default: the host's speed.
    #[arg(long, value_parser = positive_rate)]
    macs_per_second: Option<f64>,
    /// Serve over TCP on ADDR (HOST:PORT; port 0 picks one) instead of a pseudo-terminal, one
    /// host connection at a time; given once per device. Prints the address bound.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// CNN blocks: projected features d per channel (pnn-train's --proj-dim).
    #[arg(long, default_value_t = DEFAULT_PROJ_DIM, value_parser = positive_usize)]
    proj_dim: usize,
    /// CNN blocks: pnn-train's --seed of the runs this device serves; block l draws its fixed
    /// projection A from the seed the model derives from it (the host checks they agree).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// How activations travel: f32, adc-u8:SCALE or adc-u16:SCALE (value = code * SCALE).
    #[arg(long, default_value = "f32", value_parser = emulator::parse_encoding)]
    encoding: ActivationEncoding,
    /// Most rows of one input batch.
    #[arg(long, default_value_t = 4096)]
    max_batch: u32,
    /// Boot id reported in the handshake (default: drawn at start).
    #[arg(long)]
    boot_id: Option<u32>,
    /// Log dropped replies (and resets) to stderr.
    #[arg(long)]
    verbose: bool,
    /// Probability that a byte is damaged (a bit flipped), in each direction.
    #[arg(long, default_value_t = 0.0)]
    corrupt_rate: f64,
    /// Probability that a frame is lost, in each direction.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Hold every reply back a random time up to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Power-cycle the device at every N-th request received (that request is lost).
    #[arg(long, value_name = "N")]
    reset_every: Option<u64>,
    /// Seed of the faults.
    #[arg(long, default_value_t = 0)]
    fault_seed: u64,
    /// Largest frame payload, in bytes, each way (the device declares it; 128 to 65536).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(128..=65536))]
    max_frame: Option<u32>,
}

/// The layer list's syntax, checked while the arguments are parsed; the layers themselves are
/// built once `--proj-dim` and `--seed` are known.
fn check_layers(s: &str) -> Result<String, String> {
    emulator::parse_layers(s, DEFAULT_PROJ_DIM, 0).map(|_| s.to_string())
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("'{s}' is not a positive rate")),
    }
}

fn positive_usize(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive integer")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let check = FaultConfig {
        corrupt_rate: args.corrupt_rate,
        drop_rate: args.drop_rate,
        reset_every: args.reset_every,
        ..Default::default()
    }
    .validate();
    if let Err(e) = check {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let profile = match DeviceProfile::load(&args.profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.listen.is_empty() && args.listen.len() != args.layers.len() {
        eprintln!(
            "error: {} --listen addresses for {} devices (--layers): give one per device",
            args.listen.len(),
            args.layers.len()
        );
        return ExitCode::from(2);
    }
    let boot_id = args.boot_id.unwrap_or_else(emulator::fresh_boot_id);
    let several = args.layers.len() > 1;
    let configs: Vec<EmulatorConfig> = (args.layers.iter().enumerate())
        .map(|(k, layers)| EmulatorConfig {
            name: if several {
                format!("{}-{k}", profile.name)
            } else {
                profile.name.clone()
            },
            layers: emulator::parse_layers(layers, args.proj_dim, args.seed)
                .expect("checked while parsing the arguments"),
            encoding: args.encoding,
            max_batch: args.max_batch,
            boot_id: boot_id.wrapping_add(k as u32),
            noise: profile.noise.clone(),
        })
        .collect();
    // Built before any line exists, so that a device the profile cannot be is refused at once.
    for config in &configs {
        if let Err(e) = emulator::layers(config) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    // Every device's line, opened before any is announced.
    let mut lines: Vec<(Line, String)> = Vec::new();
    for k in 0..configs.len() {
        let opened = match args.listen.get(k) {
            Some(addr) => TcpListenerLine::bind(addr)
                .and_then(|l| Ok((l.local_addr()?.to_string(), l)))
                .map(|(at, l)| (Line::Tcp(l), at))
                .map_err(|e| format!("cannot listen on {addr}: {e}")),
            None => emulator::open_pty()
                .map(|p| {
                    let path = p.path.clone();
                    (Line::Pty(p), path)
                })
                .map_err(|e| format!("cannot create a pseudo-terminal: {e}")),
        };
        match opened {
            Ok(line) => lines.push(line),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(4);
            }
        }
    }
    for (_, at) in &lines {
        println!("{at}");
    }
    if std::io::stdout().flush().is_err() {
        return ExitCode::from(4);
    }
    let faults = FaultConfig {
        seed: args.fault_seed,
        corrupt_rate: args.corrupt_rate,
        drop_rate: args.drop_rate,
        max_delay: Duration::from_millis(args.delay_ms),
        reset_every: args.reset_every,
    };
    let max_frame = args.max_frame.map_or(MAX_PAYLOAD, |m| m as usize);
    let timing = Timing {
        baud: args.baud,
        latency: Duration::from_micros(args.latency_us),
        macs_per_second: args.macs_per_second,
    };
    if !timing.is_unpaced() {
        eprintln!("pnn-emulate: paced as {timing:?}");
    }
    let failed = std::thread::scope(|scope| {
        let served: Vec<_> = (lines.iter_mut().zip(&configs))
            .map(|((line, at), config)| {
                let layers: Vec<String> = config.layers.iter().map(emulator::layer_name).collect();
                eprintln!(
                    "pnn-emulate: device '{}' (boot id {:#010x}), layers [{}]{}, serving on {at}",
                    config.name,
                    config.boot_id,
                    layers.join(","),
                    if config.noise.is_ideal() {
                        ""
                    } else {
                        " with the profile's hardware effects"
                    },
                );
                let (faults, verbose) = (faults.clone(), args.verbose);
                let at = at.clone();
                scope.spawn(move || {
                    let line: &mut dyn DeviceLine = match line {
                        Line::Pty(p) => &mut p.device,
                        Line::Tcp(l) => l,
                    };
                    let mut line = PacedLine::new(line, timing);
                    let rate = timing.macs_per_second;
                    let served = if faults.is_clean() {
                        emulator::serve_paced(&mut line, config, max_frame, verbose, rate)
                    } else {
                        eprintln!(
                            "pnn-emulate: faults {faults:?}, frames of at most {max_frame} bytes"
                        );
                        let mut line = FaultyTransport::new(line, faults);
                        emulator::serve_paced(&mut line, config, max_frame, verbose, rate)
                    };
                    served.map_err(|e| format!("serving on {at} failed: {e}"))
                })
            })
            .collect();
        served
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a device thread panicked".into()))
                    .err()
            })
            .next()
    });
    match failed {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("error: {e}");
            ExitCode::from(4)
        }
    }
}

/// Where one device is served.
enum Line {
    Pty(emulator::Pty),
    Tcp(TcpListenerLine),
}
