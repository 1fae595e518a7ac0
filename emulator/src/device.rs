//! The emulated device's layers and the protocol server over them.

use firmware_protocol::frame::MAX_PAYLOAD;
use firmware_protocol::message::{ActivationEncoding, Capabilities, LayerDescriptor, MAX_LAYERS};
use firmware_protocol::server::{DeviceConfig, PhysicalLayer, Server};
use firmware_protocol::shape::LayerShape;
use pnn_sim::device::{DeviceConv, DeviceDense, DeviceLayer};
use pnn_sim::noise::layer_seed;

use crate::config::{EmulatorConfig, layer_name};
use crate::timing::PacedLayer;

/// The server type the emulator runs.
pub type EmulatedServer<'n> = Server<'n, DeviceLayer, Vec<DeviceLayer>, Vec<f32>>;

/// The server over layers paced to a device's arithmetic ([`PacedLayer`]).
pub type PacedServer<'n> =
    Server<'n, PacedLayer<DeviceLayer>, Vec<PacedLayer<DeviceLayer>>, Vec<f32>>;

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
            LayerShape::Dense { inputs, outputs } => {
                if !LayerDescriptor::fits(layer) {
                    let layer = layer_name(layer);
                    return Err(format!(
                        "layer {l} ({layer}) is too large for the protocol's u32 sizes"
                    ));
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
            LayerShape::Conv(geometry) => {
                let layer = layer_name(layer);
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
                DeviceConv::new(geometry, config.encoding)
                    .map(DeviceConv::erased)
                    .map_err(|e| format!("layer {l} ({layer}): {e}"))
            }
        })
        .collect()
}

/// The protocol server over the configured simulated layers, or why it cannot be built.
pub fn server(config: &EmulatorConfig) -> Result<EmulatedServer<'_>, String> {
    Ok(server_over(config, layers(config)?))
}

/// The server over the configured layers, each taking the time a device of `macs_per_second`
/// needs for its evaluations (`None`: the host's own speed); see [`crate::timing`].
pub fn paced_server(
    config: &EmulatorConfig,
    macs_per_second: Option<f64>,
) -> Result<PacedServer<'_>, String> {
    let layers = layers(config)?;
    let paced = (layers.into_iter())
        .map(|l| PacedLayer::new(l, macs_per_second))
        .collect();
    Ok(server_over(config, paced))
}

fn server_over<L: PhysicalLayer>(
    config: &EmulatorConfig,
    layers: Vec<L>,
) -> Server<'_, L, Vec<L>, Vec<f32>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_layers;
    use firmware_protocol::message::ForwardMode;
    use firmware_protocol::server::PhysicalLayer;
    use pnn_sim::conv::block_projection_seed;
    use pnn_sim::profile::DeviceProfile;

    fn profile(name: &str) -> DeviceProfile {
        let path = format!("{}/../devices/{name}.ron", env!("CARGO_MANIFEST_DIR"));
        DeviceProfile::load(std::path::Path::new(&path)).unwrap()
    }

    #[test]
    fn conv_blocks_draw_the_projection_seeds_of_the_model_rule() {
        let config = EmulatorConfig::new(
            "ideal",
            parse_layers("conv1x28x28:4,conv4x14x14:4", 8, 7).unwrap(),
        );
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
        let mut config = EmulatorConfig::new(
            &pcm.name,
            parse_layers("784x50,conv1x28x28:4", 16, 0).unwrap(),
        );
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
        let mut config =
            EmulatorConfig::new("ideal", parse_layers("conv1x28x28:4", 16, 0).unwrap());
        config.encoding = ActivationEncoding::AdcU8 { scale: 0.1 };
        assert!(layers(&config).err().unwrap().contains("--encoding f32"));
        let config = EmulatorConfig::new("ideal", parse_layers("conv1x1x9:4", 16, 0).unwrap());
        assert!(layers(&config).err().unwrap().contains("2x2"));
    }

    #[test]
    fn dense_layers_carry_the_profile_noise_keyed_as_the_simulator_keys_them() {
        let mut pcm = profile("pcm");
        // Drift from the first second on, so that a write's instant shows in the outputs.
        pcm.noise.drift.as_mut().unwrap().t0 = 0.5;
        let mut config = EmulatorConfig::new(&pcm.name, parse_layers("20x6,6x4", 16, 0).unwrap());
        config.noise = pcm.noise.clone();
        let mut layers = layers(&config).unwrap();
        let mut distinct = Vec::new();
        for (l, layer) in layers.iter_mut().enumerate() {
            let d = layer;
            let dense = d.layer().as_dense().expect("a dense layer");
            let (n_in, n_out) = (dense.n_in(), dense.n_out());
            let mut reference = pnn_sim::DenseLayer::with_noise(
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
            pnn_sim::DenseLayer::with_noise(6, 4, &pcm.noise, layer_seed(pcm.noise.seed, 0));
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
