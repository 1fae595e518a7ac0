//! The device emulator behind `pnn-emulate`: simulated layers served on a real pseudo-terminal
//! through `firmware_protocol::server::Server`, the dispatcher a firmware runs.
//!
//! A physical device's layers are fixed by its hardware; the emulator's are given by a layer
//! list, in order: `784x50` is a dense layer (inputs x outputs), `conv1x28x28:32` a CNN block
//! on 1 channel of 28 x 28 with 32 output channels (`pnn-train --arch cnn --channels 32,32` on
//! MNIST is `conv1x28x28:32,conv32x14x14:32`). Its name and its hardware effects come from the
//! device profile: dense layer `l` gets the profile's noise model keyed by
//! `noise::layer_seed(profile seed, l)`, exactly as `--backend sim:<profile>` builds layer `l`
//! of a model. CNN blocks are simulated ideal only, so a profile with effects is refused for
//! them (as the in-process simulator refuses it).
//!
//! A CNN block's fixed projection `A` is drawn on the device: block `l` of the list draws it
//! from `conv::block_projection_seed(seed, l)` with `seed` the emulator's `--seed`, the rule by
//! which `pnn-train --seed` names the model's projections. The seed travels in the layer's
//! descriptor and the host refuses a device whose seed is not its model's, so an emulator
//! serves the runs of one `--seed` (and one `--proj-dim`).

use std::fmt;
use std::fs::File;
use std::io::ErrorKind;
use std::time::Duration;

use firmware_protocol::frame::{FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
use firmware_protocol::message::{ActivationEncoding, Capabilities, MAX_LAYERS};
use firmware_protocol::server::{DeviceConfig, Server, ServerIo};
use serialport::{SerialPort, TTYPort};

use crate::conv::{ConvGeometry, block_projection_seed};
use crate::device::{DeviceConv, DeviceDense, DeviceLayer};
use crate::noise::{NoiseModel, layer_seed};

/// One layer of the emulated device, as `--layers` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerConfig {
    /// `784x50`: Linear + ReLU.
    Dense { inputs: usize, outputs: usize },
    /// `conv1x28x28:32`: a CNN block on `in_channels` maps of `height` x `width`.
    Conv {
        in_channels: usize,
        height: usize,
        width: usize,
        out_channels: usize,
    },
}

impl fmt::Display for LayerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Dense { inputs, outputs } => write!(f, "{inputs}x{outputs}"),
            Self::Conv {
                in_channels,
                height,
                width,
                out_channels,
            } => write!(f, "conv{in_channels}x{height}x{width}:{out_channels}"),
        }
    }
}

/// What the emulated device is.
#[derive(Clone, Debug, PartialEq)]
pub struct EmulatorConfig {
    pub name: String,
    pub layers: Vec<LayerConfig>,
    pub encoding: ActivationEncoding,
    pub max_batch: u32,
    pub boot_id: u32,
    /// The profile's hardware effects (dense layers).
    pub noise: NoiseModel,
    /// d, projected features per channel of every CNN block.
    pub proj_dim: usize,
    /// The run seed the CNN blocks' projection seeds derive from.
    pub seed: u64,
}

impl EmulatorConfig {
    /// An ideal device of `layers` with f32 activations; CNN blocks with d = 16 and seed 0 (the
    /// defaults of `pnn-train`).
    pub fn new(name: &str, layers: Vec<LayerConfig>) -> Self {
        Self {
            name: name.to_string(),
            layers,
            encoding: ActivationEncoding::F32,
            max_batch: 4096,
            boot_id: 1,
            noise: NoiseModel::default(),
            proj_dim: 16,
            seed: 0,
        }
    }

    /// The shape of layer `l` if it is a CNN block, with its projection seed.
    pub fn conv_shape(&self, l: usize) -> Option<ConvGeometry> {
        match *self.layers.get(l)? {
            LayerConfig::Conv {
                in_channels,
                height,
                width,
                out_channels,
            } => Some(ConvGeometry {
                in_channels,
                out_channels,
                height,
                width,
                proj_dim: self.proj_dim,
                projection_seed: block_projection_seed(self.seed, l),
            }),
            LayerConfig::Dense { .. } => None,
        }
    }
}

/// The server type the emulator runs.
pub type EmulatedServer<'n> = Server<'n, DeviceLayer, Vec<DeviceLayer>, Vec<f32>>;

fn positive(what: &str, v: &str, layer: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{layer}': {what} '{v}' is not a positive integer")),
    }
}

/// `784x50,conv1x28x28:32` as layers (see the module docs).
pub fn parse_layers(s: &str) -> Result<Vec<LayerConfig>, String> {
    let layers = s
        .split(',')
        .map(|l| {
            let l = l.trim();
            if let Some(conv) = l.strip_prefix("conv") {
                let form = || {
                    format!(
                        "'{l}' is not convCxHxW:OUT (e.g. conv1x28x28:32: 1 input channel of 28 x 28, 32 output channels)"
                    )
                };
                let (input, out) = conv.split_once(':').ok_or_else(form)?;
                let dims: Vec<&str> = input.split('x').collect();
                let [c, h, w] = dims[..] else {
                    return Err(form());
                };
                return Ok(LayerConfig::Conv {
                    in_channels: positive("the input channel count", c, l)?,
                    height: positive("the height", h, l)?,
                    width: positive("the width", w, l)?,
                    out_channels: positive("the output channel count", out, l)?,
                });
            }
            let (a, b) = l.split_once('x').ok_or_else(|| {
                format!(
                    "'{l}' is not INPUTSxOUTPUTS (e.g. 784x50) or convCxHxW:OUT (e.g. conv1x28x28:32)"
                )
            })?;
            match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if a > 0 && b > 0 => Ok(LayerConfig::Dense {
                    inputs: a,
                    outputs: b,
                }),
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

/// The simulated layers of `config`, or why the device cannot be built.
pub fn layers(config: &EmulatorConfig) -> Result<Vec<DeviceLayer>, String> {
    if config.layers.len() > MAX_LAYERS {
        return Err(format!("at most {MAX_LAYERS} layers"));
    }
    config
        .layers
        .iter()
        .enumerate()
        .map(|(l, layer)| match *layer {
            LayerConfig::Dense { inputs, outputs } => {
                if u32::try_from(inputs.saturating_mul(outputs).saturating_add(outputs)).is_err() {
                    return Err(format!("layer {l} ({layer}) has too many parameters"));
                }
                Ok(DeviceDense::with_noise(
                    inputs,
                    outputs,
                    config.encoding,
                    &config.noise,
                    layer_seed(config.noise.seed, l),
                )
                .erased())
            }
            LayerConfig::Conv { .. } => {
                if !config.noise.is_ideal() {
                    return Err(format!(
                        "layer {l} ({layer}): device profile '{}' has hardware effects, and the \
                         simulator models them for dense layers only; serve CNN blocks with an \
                         ideal profile such as devices/ideal.ron",
                        config.name
                    ));
                }
                if config.encoding != ActivationEncoding::F32 {
                    return Err(format!(
                        "layer {l} ({layer}): a CNN block's projected features are signed, which \
                         ADC codes (0 and up) cannot carry; use --encoding f32"
                    ));
                }
                let shape = config.conv_shape(l).expect("a conv layer");
                DeviceConv::new(shape, config.encoding)
                    .map(DeviceConv::erased)
                    .map_err(|e| format!("layer {l} ({layer}): {e}"))
            }
        })
        .collect()
}

/// The protocol server over the configured simulated layers, or why it cannot be built.
pub fn server(config: &EmulatorConfig) -> Result<EmulatedServer<'_>, String> {
    let layers = layers(config)?;
    Ok(Server::new(
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
    ))
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
        let dense = |inputs, outputs| LayerConfig::Dense { inputs, outputs };
        assert_eq!(
            parse_layers("784x50, 50x50").unwrap(),
            vec![dense(784, 50), dense(50, 50)]
        );
        assert!(parse_layers("784x0").is_err());
        assert!(parse_layers("784-50").is_err());
        let layers = parse_layers("conv1x28x28:32,conv32x14x14:32,1568x10").unwrap();
        assert_eq!(
            layers[1],
            LayerConfig::Conv {
                in_channels: 32,
                height: 14,
                width: 14,
                out_channels: 32
            }
        );
        assert_eq!(layers[0].to_string(), "conv1x28x28:32");
        assert_eq!(layers[2], dense(1568, 10));
        for bad in [
            "conv1x28:32",
            "conv1x28x28",
            "conv1x28x28:0",
            "convx28x28:3",
            "conv1x2x3x4:5",
        ] {
            let err = parse_layers(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        assert_eq!(parse_encoding("f32").unwrap(), ActivationEncoding::F32);
        assert_eq!(
            parse_encoding("adc-u8:0.5").unwrap(),
            ActivationEncoding::AdcU8 { scale: 0.5 }
        );
        assert!(parse_encoding("adc-u8:-1").is_err());
        assert!(parse_encoding("u4").is_err());
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;
    use crate::profile::DeviceProfile;
    use firmware_protocol::message::ForwardMode;
    use firmware_protocol::server::PhysicalLayer;

    fn profile(name: &str) -> DeviceProfile {
        let path = format!("{}/../devices/{name}.ron", env!("CARGO_MANIFEST_DIR"));
        DeviceProfile::load(std::path::Path::new(&path)).unwrap()
    }

    #[test]
    fn conv_blocks_draw_the_projection_seeds_of_the_model_rule() {
        let mut config = EmulatorConfig::new(
            "ideal",
            parse_layers("conv1x28x28:4,conv4x14x14:4").unwrap(),
        );
        config.seed = 7;
        config.proj_dim = 8;
        let layers = layers(&config).unwrap();
        for (l, layer) in layers.iter().enumerate() {
            let d = layer.descriptor();
            let firmware_protocol::shape::LayerShape::Conv(
                firmware_protocol::shape::ConvGeometry {
                    projection_seed,
                    proj_dim,
                    ..
                },
            ) = d.kind
            else {
                panic!("not a conv layer: {d:?}")
            };
            assert_eq!(projection_seed, block_projection_seed(7, l));
            assert_eq!(proj_dim, 8);
        }
    }

    #[test]
    fn conv_blocks_on_a_noisy_profile_or_adc_codes_are_refused_clearly() {
        let pcm = profile("pcm");
        let mut config =
            EmulatorConfig::new(&pcm.name, parse_layers("784x50,conv1x28x28:4").unwrap());
        config.noise = pcm.noise.clone();
        let err = layers(&config).err().unwrap();
        assert!(
            err.contains("layer 1 (conv1x28x28:4)")
                && err.contains("'pcm'")
                && err.contains("dense layers only"),
            "{err}"
        );
        // Dense layers alone take the profile.
        config.layers.truncate(1);
        assert!(layers(&config).is_ok());
        let mut config = EmulatorConfig::new("ideal", parse_layers("conv1x28x28:4").unwrap());
        config.encoding = ActivationEncoding::AdcU8 { scale: 0.1 };
        assert!(layers(&config).err().unwrap().contains("--encoding f32"));
        let config = EmulatorConfig::new("ideal", parse_layers("conv1x1x9:4").unwrap());
        assert!(layers(&config).err().unwrap().contains("2x2"));
    }

    #[test]
    fn dense_layers_carry_the_profile_noise_keyed_as_the_simulator_keys_them() {
        let mut pcm = profile("pcm");
        // Drift from the first second on, so that a write's instant shows in the outputs.
        pcm.noise.drift.as_mut().unwrap().t0 = 0.5;
        let mut config = EmulatorConfig::new(&pcm.name, parse_layers("20x6,6x4").unwrap());
        config.noise = pcm.noise.clone();
        let mut layers = layers(&config).unwrap();
        let mut distinct = Vec::new();
        for (l, layer) in layers.iter_mut().enumerate() {
            let d = layer;
            let dense = d.layer().as_dense().expect("a dense layer");
            let (n_in, n_out) = (dense.n_in(), dense.n_out());
            let mut reference = crate::DenseLayer::with_noise(
                n_in,
                n_out,
                &pcm.noise,
                layer_seed(pcm.noise.seed, l),
            );
            let params: Vec<f32> = (0..n_in * n_out + n_out)
                .map(|i| (i % 7) as f32 / 10.0 - 0.3)
                .collect();
            let x: Vec<f32> = (0..3 * n_in).map(|i| (i % 5) as f32 / 5.0).collect();
            // The device path: parameters, then a batch, then two forward passes (programming
            // error, drift and read noise all drawn from the layer's streams).
            d.write_parameters(0, &params).unwrap();
            d.load_input(3, 0, &x).unwrap();
            let mut out = vec![0.0; 3 * n_out];
            let mut want = Vec::new();
            reference.set_params(&params).unwrap();
            reference.load_input(&x).unwrap();
            for _ in 0..2 {
                d.forward(ForwardMode::Train, &mut out).unwrap();
                reference.forward(&mut want).unwrap();
                assert_eq!(bits(&out), bits(&want), "layer {l}");
            }
            distinct.push(bits(&out));
        }
        // Each layer is keyed apart: the same computation on the other key differs.
        let mut other =
            crate::DenseLayer::with_noise(6, 4, &pcm.noise, layer_seed(pcm.noise.seed, 0));
        let params: Vec<f32> = (0..28).map(|i| (i % 7) as f32 / 10.0 - 0.3).collect();
        other.set_params(&params).unwrap();
        other
            .load_input(&(0..18).map(|i| (i % 5) as f32 / 5.0).collect::<Vec<_>>())
            .unwrap();
        let mut out = Vec::new();
        other.forward(&mut out).unwrap();
        other.forward(&mut out).unwrap();
        assert_ne!(bits(&out), distinct[1]);
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}
