//! The device emulator behind `pnn-emulate`: simulated layers served on a real pseudo-terminal
//! through `firmware_protocol::server::Server`, the dispatcher a firmware runs.
//!
//! A physical device's layers are fixed by its hardware; the emulator's are given by a layer
//! list (`784x50,50x50`: inputs x outputs of each dense layer, in order), and its name by the
//! device profile.

use std::fs::File;
use std::io::ErrorKind;
use std::time::Duration;

use firmware_protocol::frame::{FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
use firmware_protocol::message::{ActivationEncoding, Capabilities, MAX_LAYERS};
use firmware_protocol::server::{DeviceConfig, Server, ServerIo};
use serialport::{SerialPort, TTYPort};

use crate::physical::DeviceDense;

/// What the emulated device is.
#[derive(Clone, Debug, PartialEq)]
pub struct EmulatorConfig {
    pub name: String,
    /// (inputs, outputs) of each dense layer.
    pub layers: Vec<(usize, usize)>,
    pub encoding: ActivationEncoding,
    pub max_batch: u32,
    pub boot_id: u32,
}

/// The server type the emulator runs.
pub type EmulatedServer<'n> = Server<'n, DeviceDense, Vec<DeviceDense>, Vec<f32>>;

/// `784x50,50x50` as (inputs, outputs) pairs.
pub fn parse_layers(s: &str) -> Result<Vec<(usize, usize)>, String> {
    let layers = s
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
        .collect::<Result<Vec<_>, String>>()?;
    if layers.len() > MAX_LAYERS {
        return Err(format!("at most {MAX_LAYERS} layers"));
    }
    Ok(layers)
}

/// `f32`, `adc-u8:SCALE` or `adc-u16:SCALE`.
pub fn parse_encoding(s: &str) -> Result<ActivationEncoding, String> {
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

/// A boot id that differs from one start to the next.
pub fn fresh_boot_id() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    firmware_protocol::direction::mix(t.as_nanos() as u64 ^ std::process::id() as u64) as u32
}

/// The protocol server over the configured simulated layers.
pub fn server(config: &EmulatorConfig) -> EmulatedServer<'_> {
    let layers = config
        .layers
        .iter()
        .map(|&(i, o)| DeviceDense::new(i, o, config.encoding))
        .collect();
    Server::new(
        layers,
        DeviceConfig {
            name: &config.name,
            boot_id: config.boot_id,
            max_request: MAX_PAYLOAD as u32,
            max_batch: config.max_batch,
            max_directions: firmware_protocol::direction::MAX_UPDATE_TERMS as u16,
            capabilities: Capabilities {
                seeded_perturbation: true,
                raw_parameter_writes: true,
                parameter_read_back: true,
            },
        },
        Vec::new(),
        Vec::new(),
    )
}

/// A pseudo-terminal pair: the device's side, and the path a host opens.
pub struct Pty {
    pub device: TTYPort,
    pub path: String,
    /// Keeps the host side open without a lock, so a host that leaves does not hang up the
    /// device side and the next host can connect (and take its own exclusive lock).
    _host_side: File,
}

pub fn open_pty() -> std::io::Result<Pty> {
    let (mut device, host_side) = TTYPort::pair().map_err(std::io::Error::from)?;
    let path = host_side
        .name()
        .ok_or_else(|| std::io::Error::other("the pseudo-terminal has no name"))?;
    let keep = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    drop(host_side);
    device
        .set_timeout(Duration::from_secs(1))
        .map_err(std::io::Error::from)?;
    Ok(Pty {
        device,
        path,
        _host_side: keep,
    })
}

/// Serves requests from `port` until reading fails; a reply nobody reads is dropped.
pub fn serve(
    port: &mut dyn SerialPort,
    server: &mut EmulatedServer<'_>,
    verbose: bool,
) -> std::io::Result<()> {
    let mut io = ServerIo {
        decoder: FrameDecoder::new(vec![0u8; MAX_ENCODED]),
        payload: vec![0u8; MAX_PAYLOAD],
        out: vec![0u8; MAX_ENCODED + 1],
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match port.read(&mut buf) {
            Ok(0) => continue,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::Interrupted => {
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = server.serve(&mut io, &buf[..n], |reply| port.write_all(reply)) {
            if verbose {
                eprintln!("pnn-emulate: reply dropped: {e}; {:?}", server.stats());
            }
            io.decoder.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists_and_encodings_parse() {
        assert_eq!(
            parse_layers("784x50, 50x50").unwrap(),
            vec![(784, 50), (50, 50)]
        );
        assert!(parse_layers("784x0").is_err());
        assert!(parse_layers("784-50").is_err());
        assert_eq!(parse_encoding("f32").unwrap(), ActivationEncoding::F32);
        assert_eq!(
            parse_encoding("adc-u8:0.5").unwrap(),
            ActivationEncoding::AdcU8 { scale: 0.5 }
        );
        assert!(parse_encoding("adc-u8:-1").is_err());
        assert!(parse_encoding("u4").is_err());
    }
}
