//! Architectures (thesis Appendix A) and their initialisation.

use std::fmt;
use std::str::FromStr;

use firmware_protocol::direction::mix;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use crate::data::DatasetKind;
use crate::oracle::LayerShape;
use crate::train::projection::Projection;

/// The architectures of thesis Appendix A, as named on the command line (`--arch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchKind {
    /// Linear + ReLU blocks (Table 3).
    #[default]
    Mlp,
    /// Conv + BatchNorm + ReLU + MaxPool blocks with per-channel random projections (Table 4).
    Cnn,
}

impl ArchKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Mlp => "mlp",
            Self::Cnn => "cnn",
        }
    }
}

impl fmt::Display for ArchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ArchKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "mlp" => Ok(Self::Mlp),
            "cnn" => Ok(Self::Cnn),
            _ => Err(format!("unknown architecture '{s}' (expected: mlp or cnn)")),
        }
    }
}

/// What a model's blocks are, beyond their widths.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Arch {
    /// `hidden` are the widths of Linear + ReLU blocks.
    #[default]
    Mlp,
    /// `hidden` are the output channels of CNN blocks on images of `image` = (channels,
    /// height, width); each block's features are `proj_dim` per channel, projected by a fixed
    /// random matrix drawn from `seed` and the block's index (section 4.4).
    Cnn {
        image: (usize, usize, usize),
        proj_dim: usize,
        seed: u64,
    },
}

/// Thesis section 4.4: d = 16 projected features per channel.
pub const DEFAULT_PROJ_DIM: usize = 16;

/// A model: its blocks (MLP or CNN), each with its projection `M_l` (Tables 3 and 4).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    pub input_width: usize,
    /// Widths of MLP blocks, or output channels of CNN blocks.
    pub hidden: Vec<usize>,
    pub classes: usize,
    #[serde(default)]
    pub arch: Arch,
}

impl ModelSpec {
    /// The model `--arch` names for the dataset; `hidden` overrides the paper's widths or
    /// channels, `proj_dim` is the CNN's d, `seed` the run seed (it names the CNN's fixed
    /// projections).
    pub fn new(
        dataset: DatasetKind,
        arch: ArchKind,
        hidden: Option<Vec<usize>>,
        proj_dim: usize,
        seed: u64,
    ) -> Result<Self, String> {
        match arch {
            ArchKind::Mlp => Ok(Self::mlp(dataset, hidden)),
            ArchKind::Cnn => Self::cnn(dataset, hidden, proj_dim, seed),
        }
    }

    /// Table 4's channels: MNIST [32, 32], Fashion-MNIST [64, 64], CIFAR [128, 128].
    pub fn default_channels(dataset: DatasetKind) -> Vec<usize> {
        match dataset {
            DatasetKind::Mnist => vec![32; 2],
            DatasetKind::FashionMnist => vec![64; 2],
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => vec![128; 2],
        }
    }

    /// CNN blocks (Table 4) with `channels` output channels each (default per dataset).
    pub fn cnn(
        dataset: DatasetKind,
        channels: Option<Vec<usize>>,
        proj_dim: usize,
        seed: u64,
    ) -> Result<Self, String> {
        let image = dataset.image_shape();
        let model = Self {
            input_width: image.0 * image.1 * image.2,
            hidden: channels.unwrap_or_else(|| Self::default_channels(dataset)),
            classes: dataset.classes(),
            arch: Arch::Cnn {
                image,
                proj_dim,
                seed,
            },
        };
        if model.hidden.is_empty() {
            return Err("a CNN needs at least one block".into());
        }
        let (_, mut h, mut w) = image;
        for (l, &c) in model.hidden.iter().enumerate() {
            pnn_sim::conv::ConvGeometry {
                in_channels: 1,
                out_channels: c,
                height: h,
                width: w,
                proj_dim,
                projection_seed: 0,
            }
            .check()
            .map_err(|e| format!("CNN block {}: {e}", l + 1))?;
            (h, w) = (h / 2, w / 2);
        }
        Ok(model)
    }

    /// The architecture's name as reported in summaries (`mlp` or `cnn`).
    pub fn arch_name(&self) -> &'static str {
        match self.arch {
            Arch::Mlp => "mlp",
            Arch::Cnn { .. } => "cnn",
        }
    }

    /// Table 3's hidden widths: MNIST 2 x 50, Fashion-MNIST 3 x 100, CIFAR 4 x 200.
    pub fn default_hidden(dataset: DatasetKind) -> Vec<usize> {
        match dataset {
            DatasetKind::Mnist => vec![50; 2],
            DatasetKind::FashionMnist => vec![100; 3],
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => vec![200; 4],
        }
    }

    pub fn mlp(dataset: DatasetKind, hidden: Option<Vec<usize>>) -> Self {
        let (c, h, w) = dataset.image_shape();
        Self {
            input_width: c * h * w,
            hidden: hidden.unwrap_or_else(|| Self::default_hidden(dataset)),
            classes: dataset.classes(),
            arch: Arch::Mlp,
        }
    }

    pub fn layer_specs(&self) -> Vec<LayerShape> {
        if let Arch::Cnn {
            image: (channels, height, width),
            proj_dim,
            seed,
        } = self.arch
        {
            let (mut c_in, mut h, mut w) = (channels, height, width);
            return self
                .hidden
                .iter()
                .enumerate()
                .map(|(l, &c_out)| {
                    let spec = LayerShape::conv(
                        c_in,
                        c_out,
                        (h, w),
                        proj_dim,
                        pnn_sim::conv::block_projection_seed(seed, l),
                    );
                    (c_in, h, w) = (c_out, h / 2, w / 2);
                    spec
                })
                .collect();
        }
        let mut inputs = self.input_width;
        self.hidden
            .iter()
            .map(|&outputs| {
                let spec = LayerShape::dense(inputs, outputs);
                inputs = outputs;
                spec
            })
            .collect()
    }

    /// Trainable parameters of MF: every `W_l` and every `M_l` (Table 3's "MF params").
    pub fn mf_parameter_count(&self) -> usize {
        self.layer_specs()
            .iter()
            .map(|s| s.param_count() + s.feature_width() * self.classes)
            .sum()
    }
}

/// Initial parameters of every layer and projection.
#[derive(Clone, Debug)]
pub struct InitialParams {
    pub layers: Vec<Vec<f32>>,
    pub projections: Vec<Projection>,
}

const INIT_DOMAIN: u64 = 0x706E_6E2D_696E_6974; // "pnn-init"

/// PyTorch's defaults, as the runs that reproduce the paper used them: `nn.Linear` weight and bias
/// uniform in `±1/sqrt(fan_in)`; `M_l` (features x classes) uniform in `±1/sqrt(classes)`.
/// Layer `l` draws from its own ChaCha8 stream keyed by (seed, l): weights, bias, then `M_l`.
/// A CNN block's `Conv2d` weight and bias are uniform in `±1/sqrt(C_in*9)` (drawn channel by
/// channel, in the layout's order), its BatchNorm scale is 1 and shift 0.
pub fn initialise(specs: &[LayerShape], classes: usize, seed: u64) -> InitialParams {
    let mut layers = Vec::new();
    let mut projections = Vec::new();
    for (l, spec) in specs.iter().enumerate() {
        let mut rng =
            ChaCha8Rng::seed_from_u64(mix(mix(seed ^ INIT_DOMAIN).wrapping_add(l as u64)));
        let params: Vec<f32> = match spec {
            LayerShape::Dense { .. } => {
                let bound = 1.0 / (spec.input_width() as f32).sqrt();
                (0..spec.param_count())
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            }
            LayerShape::Conv(g) => {
                let fan_in = g.kernel_len();
                let bound = 1.0 / (fan_in as f32).sqrt();
                let mut params = Vec::with_capacity(spec.param_count());
                while params.len() < spec.param_count() {
                    params.extend((0..=fan_in).map(|_| rng.random_range(-bound..bound)));
                    params.extend([1.0, 0.0]);
                }
                params
            }
        };
        let m_bound = 1.0 / (classes as f32).sqrt();
        let m: Vec<f32> = (0..spec.feature_width() * classes)
            .map(|_| rng.random_range(-m_bound..m_bound))
            .collect();
        layers.push(params);
        projections.push(Projection::new(spec.feature_width(), classes, m));
    }
    InitialParams {
        layers,
        projections,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mf_parameter_counts_match_table_3() {
        let count = |d| ModelSpec::mlp(d, None).mf_parameter_count();
        assert_eq!(count(DatasetKind::Mnist), 42_800);
        assert_eq!(count(DatasetKind::FashionMnist), 101_700);
        assert_eq!(count(DatasetKind::Cifar10), 743_200);
        assert_eq!(count(DatasetKind::Cifar100), 815_200);
    }

    #[test]
    fn mf_parameter_counts_match_table_4() {
        let count = |d| {
            ModelSpec::cnn(d, None, DEFAULT_PROJ_DIM, 0)
                .unwrap()
                .mf_parameter_count()
        };
        assert_eq!(count(DatasetKind::Mnist), 19_936);
        assert_eq!(count(DatasetKind::FashionMnist), 58_304);
        assert_eq!(count(DatasetKind::Cifar10), 192_640);
        assert_eq!(count(DatasetKind::Cifar100), 561_280);
    }

    #[test]
    fn cnn_blocks_follow_table_4() {
        let model = ModelSpec::cnn(DatasetKind::Cifar10, None, 16, 5).unwrap();
        let specs = model.layer_specs();
        assert_eq!(specs.len(), 2);
        // Spatial 32x32 then 16x16 before pooling; features C*d; the output is pooled.
        let LayerShape::Conv(g) = specs[1] else {
            panic!("not a conv block")
        };
        assert_eq!((g.height, g.width), (16, 16));
        assert_eq!(specs[0].input_width(), 3 * 32 * 32);
        assert_eq!(specs[0].output_width(), specs[1].input_width());
        assert_eq!(specs[1].feature_width(), 128 * 16);
        assert_eq!(specs[1].output_width(), 128 * 8 * 8);
        assert_ne!(
            specs[0],
            ModelSpec::cnn(DatasetKind::Cifar10, None, 16, 6)
                .unwrap()
                .layer_specs()[0]
        );
        // Whole channels per chunk (section 4.4): 1155 parameters each.
        let chunks = specs[1].weight_chunks(5000).collect::<Vec<_>>();
        assert_eq!(chunks[0], 0..4 * 1155);
        assert_eq!(chunks.len(), 32);
        // Too many blocks for the image.
        let err = ModelSpec::cnn(DatasetKind::Mnist, Some(vec![8; 5]), 16, 0).unwrap_err();
        assert!(err.contains("block 5"), "{err}");
        assert!("CNN".parse::<ArchKind>().is_ok() && "rnn".parse::<ArchKind>().is_err());
    }

    #[test]
    fn cnn_initialisation_is_pytorchs() {
        let model = ModelSpec::cnn(DatasetKind::Mnist, None, 16, 0).unwrap();
        let init = initialise(&model.layer_specs(), 10, 1);
        let layer = &init.layers[1];
        assert_eq!(layer.len(), 32 * 291);
        let bound = 1.0 / 288f32.sqrt();
        for channel in layer.chunks(291) {
            assert!(channel[..289].iter().all(|w| w.abs() <= bound));
            assert_eq!(&channel[289..], &[1.0, 0.0]);
        }
        let max = layer
            .iter()
            .step_by(7)
            .fold(0f32, |m, w| if *w == 1.0 { m } else { m.max(w.abs()) });
        assert!(max > 0.98 * bound);
        assert_eq!(init.projections[0].rows, 512);
        let m_bound = 1.0 / 10f32.sqrt();
        assert!(init.projections[0].data.iter().all(|w| w.abs() <= m_bound));
    }

    #[test]
    fn initialisation_is_seeded_and_bounded() {
        let spec = ModelSpec::mlp(DatasetKind::Mnist, None);
        let a = initialise(&spec.layer_specs(), 10, 3);
        let b = initialise(&spec.layer_specs(), 10, 3);
        let c = initialise(&spec.layer_specs(), 10, 4);
        assert_eq!(a.layers, b.layers);
        assert_ne!(a.layers, c.layers);
        let bound = 1.0 / 784f32.sqrt();
        assert!(a.layers[0].iter().all(|w| w.abs() <= bound));
        // Uniform on ±bound: the largest magnitude is close to the bound, the mean close to 0
        // and the variance bound²/3 (a one-sided or narrower draw fails one of them).
        let max = a.layers[0].iter().fold(0f32, |m, w| m.max(w.abs()));
        assert!(max > 0.99 * bound);
        assert_uniform(&a.layers[0], bound);
        let m_bound = 1.0 / 10f32.sqrt();
        assert!(a.projections[1].data.iter().all(|w| w.abs() <= m_bound));
        assert_uniform(&a.projections[0].data, m_bound);
        assert_uniform(&a.layers[1], 1.0 / 50f32.sqrt());
    }

    /// `values` look uniform on ±bound: mean within 5 standard errors of 0, variance within 5%
    /// of bound²/3 (5 standard errors for the smallest set checked, 500 values).
    fn assert_uniform(values: &[f32], bound: f32) {
        let n = values.len() as f64;
        let mean = values.iter().map(|&w| w as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&w| (w as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let want = (bound as f64).powi(2) / 3.0;
        assert!(
            mean.abs() < 5.0 * (want / n).sqrt(),
            "mean {mean} of {n} values on ±{bound}"
        );
        assert!(
            (var / want - 1.0).abs() < 0.05 + 5.0 * (0.8 / n).sqrt(),
            "variance {var}, uniform on ±{bound} has {want}"
        );
    }
}
