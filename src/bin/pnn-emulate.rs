//! `pnn-emulate`: a simulated device on a real pseudo-terminal (see `pnn_sim::emulator`).
//!
//! Prints the path a host opens (e.g. `/dev/pts/7`) as the first line on stdout, then serves
//! the device protocol there, one host after another, until killed:
//!
//! ```text
//! pnn-emulate --profile devices/ideal.ron --layers 784x50,50x50
//! ```
//!
//! Exit codes: 2 invalid arguments or profile, 4 the pseudo-terminal failed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use firmware_protocol::message::ActivationEncoding;
use pnn_sim::emulator::{self, EmulatorConfig};
use pnn_sim::profile::DeviceProfile;

#[derive(Parser, Debug)]
#[command(
    name = "pnn-emulate",
    version,
    about = "Serve a simulated PNN device on a pseudo-terminal; prints the path to open first"
)]
struct Args {
    /// Device profile (RON), e.g. devices/ideal.ron; its name is the device's name.
    #[arg(long)]
    profile: PathBuf,
    /// The device's dense layers, INPUTSxOUTPUTS each, comma-separated: 784x50,50x50.
    #[arg(long, value_parser = parse_layers)]
    layers: Layers,
    /// How activations travel: f32, adc-u8:SCALE or adc-u16:SCALE (value = code * SCALE).
    #[arg(long, default_value = "f32", value_parser = emulator::parse_encoding)]
    encoding: ActivationEncoding,
    /// Most rows of one input batch.
    #[arg(long, default_value_t = 4096)]
    max_batch: u32,
    /// Boot id reported in the handshake (default: drawn at start).
    #[arg(long)]
    boot_id: Option<u32>,
    /// Log dropped replies to stderr.
    #[arg(long)]
    verbose: bool,
}

#[derive(Clone, Debug)]
struct Layers(Vec<(usize, usize)>);

fn parse_layers(s: &str) -> Result<Layers, String> {
    emulator::parse_layers(s).map(Layers)
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
    let config = EmulatorConfig {
        name: profile.name.clone(),
        layers: args.layers.0.clone(),
        encoding: args.encoding,
        max_batch: args.max_batch,
        boot_id: args.boot_id.unwrap_or_else(emulator::fresh_boot_id),
    };
    let mut pty = match emulator::open_pty() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot create a pseudo-terminal: {e}");
            return ExitCode::from(4);
        }
    };
    println!("{}", pty.path);
    if std::io::stdout().flush().is_err() {
        return ExitCode::from(4);
    }
    eprintln!(
        "pnn-emulate: device '{}' (boot id {:#010x}), layers {:?}, serving on {}",
        config.name, config.boot_id, config.layers, pty.path
    );
    let mut server = emulator::server(&config);
    match emulator::serve(&mut pty.device, &mut server, args.verbose) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: serving on {} failed: {e}", pty.path);
            ExitCode::from(4)
        }
    }
}
