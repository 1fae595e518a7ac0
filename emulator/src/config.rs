//! What the emulated device is: its layers, as `--layers` names them, its activation encoding,
//! its profile's effects and the seed its CNN blocks' projections derive from.

use firmware_protocol::message::{ActivationEncoding, MAX_LAYERS};
use firmware_protocol::shape::LayerShape;
use pnn_sim::conv::block_projection_seed;
use pnn_sim::noise::NoiseModel;

/// A layer as `--layers` names it: `784x50`, or `conv1x28x28:32` (a CNN block's d and
/// projection seed are not part of its name).
pub fn layer_name(shape: &LayerShape) -> String {
    match shape {
        LayerShape::Dense { inputs, outputs } => format!("{inputs}x{outputs}"),
        LayerShape::Conv(g) => format!(
            "conv{}x{}x{}:{}",
            g.in_channels, g.height, g.width, g.out_channels
        ),
    }
}

/// What the emulated device is.
#[derive(Clone, Debug, PartialEq)]
pub struct EmulatorConfig {
    pub name: String,
    /// The device's layers, in order (see [`parse_layers`]).
    pub layers: Vec<LayerShape>,
    pub encoding: ActivationEncoding,
    pub max_batch: u32,
    pub boot_id: u32,
    /// The profile's hardware effects (dense layers).
    pub noise: NoiseModel,
}

impl EmulatorConfig {
    /// An ideal device of `layers` with f32 activations.
    pub fn new(name: &str, layers: Vec<LayerShape>) -> Self {
        Self {
            name: name.to_string(),
            layers,
            encoding: ActivationEncoding::F32,
            max_batch: 4096,
            boot_id: 1,
            noise: NoiseModel::default(),
        }
    }
}

fn positive(what: &str, v: &str, layer: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{layer}': {what} '{v}' is not a positive integer")),
    }
}

/// `784x50,conv1x28x28:32` as layers (see the module docs): every CNN block projects to
/// `proj_dim` features per channel, and block `l` of the list (counting every layer) draws its
/// projection from `block_projection_seed(seed, l)`, the rule of `pnn-train --seed`.
pub fn parse_layers(s: &str, proj_dim: usize, seed: u64) -> Result<Vec<LayerShape>, String> {
    let layers = s
        .split(',')
        .enumerate()
        .map(|(index, l)| {
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
                let in_channels = positive("the input channel count", c, l)?;
                let height = positive("the height", h, l)?;
                let width = positive("the width", w, l)?;
                let out_channels = positive("the output channel count", out, l)?;
                return Ok(LayerShape::conv(
                    in_channels,
                    out_channels,
                    (height, width),
                    proj_dim,
                    block_projection_seed(seed, index),
                ));
            }
            let (a, b) = l.split_once('x').ok_or_else(|| {
                format!(
                    "'{l}' is not INPUTSxOUTPUTS (e.g. 784x50) or convCxHxW:OUT (e.g. conv1x28x28:32)"
                )
            })?;
            match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if a > 0 && b > 0 => Ok(LayerShape::dense(a, b)),
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
        let dense = LayerShape::dense;
        assert_eq!(
            parse_layers("784x50, 50x50", 16, 0).unwrap(),
            vec![dense(784, 50), dense(50, 50)]
        );
        assert!(parse_layers("784x0", 16, 0).is_err());
        assert!(parse_layers("784-50", 16, 0).is_err());
        let layers = parse_layers("conv1x28x28:32,conv32x14x14:32,1568x10", 8, 3).unwrap();
        assert_eq!(
            layers[1],
            LayerShape::conv(32, 32, (14, 14), 8, block_projection_seed(3, 1))
        );
        assert_eq!(layer_name(&layers[0]), "conv1x28x28:32");
        assert_eq!(layers[2], dense(1568, 10));
        for bad in [
            "conv1x28:32",
            "conv1x28x28",
            "conv1x28x28:0",
            "convx28x28:3",
            "conv1x2x3x4:5",
        ] {
            let err = parse_layers(bad, 16, 0).unwrap_err();
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
