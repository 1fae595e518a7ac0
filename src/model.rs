//! Architectures (thesis Appendix A) and their initialisation.

use firmware_protocol::direction::mix;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use crate::data::DatasetKind;
use crate::oracle::LayerSpec;
use crate::projection::Projection;

/// An MLP of Linear + ReLU blocks, each with its projection `M_l` (Table 3).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelSpec {
    pub input_width: usize,
    pub hidden: Vec<usize>,
    pub classes: usize,
}

impl ModelSpec {
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
        }
    }

    pub fn layer_specs(&self) -> Vec<LayerSpec> {
        let mut inputs = self.input_width;
        self.hidden
            .iter()
            .map(|&outputs| {
                let spec = LayerSpec::dense(inputs, outputs);
                inputs = outputs;
                spec
            })
            .collect()
    }

    /// Trainable parameters of MF: every `W_l` and every `M_l` (Table 3's "MF params").
    pub fn mf_parameter_count(&self) -> usize {
        self.layer_specs()
            .iter()
            .map(|s| s.param_count + s.feature_width * self.classes)
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
pub fn initialise(specs: &[LayerSpec], classes: usize, seed: u64) -> InitialParams {
    let mut layers = Vec::new();
    let mut projections = Vec::new();
    for (l, spec) in specs.iter().enumerate() {
        let mut rng =
            ChaCha8Rng::seed_from_u64(mix(mix(seed ^ INIT_DOMAIN).wrapping_add(l as u64)));
        let bound = 1.0 / (spec.input_width as f32).sqrt();
        let params: Vec<f32> = (0..spec.param_count)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let m_bound = 1.0 / (classes as f32).sqrt();
        let m: Vec<f32> = (0..spec.feature_width * classes)
            .map(|_| rng.random_range(-m_bound..m_bound))
            .collect();
        layers.push(params);
        projections.push(Projection::new(spec.feature_width, classes, m));
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
    fn initialisation_is_seeded_and_bounded() {
        let spec = ModelSpec::mlp(DatasetKind::Mnist, None);
        let a = initialise(&spec.layer_specs(), 10, 3);
        let b = initialise(&spec.layer_specs(), 10, 3);
        let c = initialise(&spec.layer_specs(), 10, 4);
        assert_eq!(a.layers, b.layers);
        assert_ne!(a.layers, c.layers);
        let bound = 1.0 / 784f32.sqrt();
        assert!(a.layers[0].iter().all(|w| w.abs() <= bound));
        // Uniform on ±bound: the largest magnitude is close to the bound, the mean close to 0.
        let max = a.layers[0].iter().fold(0f32, |m, w| m.max(w.abs()));
        assert!(max > 0.99 * bound);
        let m_bound = 1.0 / 10f32.sqrt();
        assert!(a.projections[1].data.iter().all(|w| w.abs() <= m_bound));
    }
}
