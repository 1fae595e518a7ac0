//! `pnn-emulate`: a simulated device on a real pseudo-terminal.
//!
//! Creates a pty pair, prints the path of the side to open (e.g. `/dev/pts/7`) as the first line
//! on stdout, and serves the device protocol on it through `firmware_protocol::server::Server`,
//! the dispatcher a firmware runs, over the simulated layers of `pnn_sim::physical`. It keeps
//! serving, one host after another, until it is killed.
//!
//! A physical device's layers are fixed by its hardware; the emulator's are given by `--layers`
//! (`784x50,50x50`: inputs x outputs of each dense layer, in order). The profile names the
//! device in its handshake.
//!
//! Exit codes: 2 invalid arguments or profile, 4 the pseudo-terminal failed.

use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use firmware_protocol::frame::{FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
use firmware_protocol::message::{ActivationEncoding, Capabilities};
use firmware_protocol::server::{DeviceConfig, Server, ServerIo};
use pnn_sim::physical::DeviceDense;
use pnn_sim::profile::DeviceProfile;
use serialport::{SerialPort, TTYPort};

#[derive(Parser, Debug)]
#[command(
    name = "pnn-emulate",
    version,
    about = "Serve a simulated PNN device on a pseudo-terminal; prints the path to open first"
)]
struct Args {
    /// Device profile (RON), e.g. devices/ideal.ron.
    #[arg(long)]
    profile: PathBuf,
    /// The device's dense layers, inputs x outputs each, comma-separated: 784x50,50x50.
    #[arg(long, value_parser = parse_layers)]
    layers: Layers,
    /// How activations travel: f32, adc-u8:SCALE or adc-u16:SCALE (value = code * SCALE).
    #[arg(long, default_value = "f32", value_parser = parse_encoding)]
    encoding: ActivationEncoding,
    /// Most rows of one input batch.
    #[arg(long, default_value_t = 4096)]
    max_batch: u32,
    /// Boot id reported in the handshake (default: drawn at start).
    #[arg(long)]
    boot_id: Option<u32>,
    /// Log every request's outcome counters to stderr when a host goes away.
    #[arg(long)]
    verbose: bool,
}

#[derive(Clone, Debug)]
struct Layers(Vec<(usize, usize)>);

fn parse_layers(s: &str) -> Result<Layers, String> {
    let layers: Result<Vec<_>, String> = s
        .split(',')
        .map(|l| {
            let (a, b) = l
                .trim()
                .split_once('x')
                .ok_or_else(|| format!("'{l}' is not INPUTSxOUTPUTS (e.g. 784x50)"))?;
            match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if a > 0 && b > 0 => Ok((a, b)),
                _ => Err(format!("'{l}': both sizes must be positive integers")),
            }
        })
        .collect();
    let layers = layers?;
    if layers.len() > firmware_protocol::message::MAX_LAYERS {
        return Err(format!(
            "at most {} layers",
            firmware_protocol::message::MAX_LAYERS
        ));
    }
    Ok(Layers(layers))
}

fn parse_encoding(s: &str) -> Result<ActivationEncoding, String> {
    let scale = |v: &str| match v.parse::<f32>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("'{v}' is not a positive scale")),
    };
    match s.split_once(':') {
        None if s == "f32" => Ok(ActivationEncoding::F32),
        Some(("adc-u8", v)) => Ok(ActivationEncoding::AdcU8 { scale: scale(v)? }),
        Some(("adc-u16", v)) => Ok(ActivationEncoding::AdcU16 { scale: scale(v)? }),
        _ => Err(format!(
            "unknown encoding '{s}' (expected f32, adc-u8:SCALE or adc-u16:SCALE)"
        )),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let profile = match DeviceProfile::load(&args.profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(&args, &profile) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(4)
        }
    }
}

fn serve(args: &Args, profile: &DeviceProfile) -> std::io::Result<()> {
    let (mut device, host_side) = TTYPort::pair().map_err(std::io::Error::from)?;
    let path = host_side
        .name()
        .ok_or_else(|| std::io::Error::other("the pseudo-terminal has no name"))?;
    // The host opens the path itself (with its own exclusive lock), so our handle of that side
    // must hold no lock: swap it for a plain one. Keeping that side open means a host that
    // leaves does not hang up the device side, and the next host can connect.
    let _keep_open = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    drop(host_side);
    device
        .set_timeout(Duration::from_secs(1))
        .map_err(std::io::Error::from)?;
    let boot_id = args.boot_id.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        firmware_protocol::direction::mix(t.as_nanos() as u64 ^ std::process::id() as u64) as u32
    });
    let layers: Vec<DeviceDense> = args
        .layers
        .0
        .iter()
        .map(|&(i, o)| DeviceDense::new(i, o, args.encoding))
        .collect();
    let config = DeviceConfig {
        name: &profile.name,
        boot_id,
        max_request: MAX_PAYLOAD as u32,
        max_batch: args.max_batch,
        max_directions: firmware_protocol::direction::MAX_UPDATE_TERMS as u16,
        capabilities: Capabilities {
            seeded_perturbation: true,
            raw_parameter_writes: true,
            parameter_read_back: true,
        },
    };
    let mut server = Server::new(layers, config, Vec::new(), Vec::new());
    let mut io = ServerIo {
        decoder: FrameDecoder::new(vec![0u8; MAX_ENCODED]),
        payload: vec![0u8; MAX_PAYLOAD],
        out: vec![0u8; MAX_ENCODED + 1],
    };
    println!("{path}");
    std::io::stdout().flush()?;
    eprintln!(
        "pnn-emulate: device '{}' (boot id {boot_id:#010x}), layers {:?}, serving on {path}",
        profile.name, args.layers.0
    );
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match device.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::Interrupted => {
                continue;
            }
            Err(e) => return Err(e),
        };
        let result = server.serve(&mut io, &buf[..n], |reply| device.write_all(reply));
        if let Err(e) = result {
            // Nobody reads (the host went away mid-reply): drop the reply, keep serving.
            if args.verbose {
                eprintln!("pnn-emulate: reply dropped: {e}; {:?}", server.stats());
            }
            io.decoder.clear();
        }
    }
}
