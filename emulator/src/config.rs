//! What the emulated device is: its layers, as `--layers` names them, its activation encoding,
//! its profile's effects and the seed its CNN blocks' projections derive from.

use std::fmt;

use firmware_protocol::message::{ActivationEncoding, MAX_LAYERS};
use pnn_sim::conv::{ConvGeometry, block_projection_seed};
use pnn_sim::noise::NoiseModel;

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
    firmware_protocol::link::fresh_nonce() as u32
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
