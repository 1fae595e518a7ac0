//! The simulated PNN on a GPU: a [`ForwardOracle`] over `pnn_gpu` layers (wgpu compute shaders).
//!
//! `--backend gpu` opens the best Vulkan adapter (a discrete GPU before an integrated one before
//! a software one), `gpu:<name>` the first whose name contains `<name>` (case-insensitive, e.g.
//! `gpu:h100`, `gpu:llvmpipe`), and `gpu:devices/x.ron` a device profile as `sim:` reads it. The
//! layers compute as the CPU simulator's ideal layers do, within float rounding (see
//! `tests/gpu_conformance.rs` for the tolerances); the parameters are the CPU simulator's bits.
//! A profile's hardware effects are those of the CPU simulator (`pnn_sim::noise::Device`, the same
//! streams): the host programs the effective weights and converts the input, the GPU multiplies,
//! the host applies the output stage; a layer with effects evaluates perturbations by the literal
//! choreography. What the GPU backend does not simulate is refused by name: convolutional blocks,
//! and the effects drawn afresh over the whole product at every evaluation (`input_noise`,
//! `read_noise`).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use pnn_gpu::{Gpu, GpuDense, GpuError};
use pnn_sim::{Choreography, NoiseModel, SimError};

use crate::oracle::{
    Activations, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, InProcess, LayerShape,
    OracleError, PerturbedColumns, PerturbedPair, UpdateTerm,
};

/// `gpu`, `gpu:<adapter name substring>` or `gpu:<profile.ron>` (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuSpec {
    /// A substring of the adapter's name; `None`: the best adapter.
    pub adapter: Option<String>,
    /// A device profile (`devices/x.ron`); `None`: the ideal device.
    pub profile: Option<PathBuf>,
}

impl GpuSpec {
    /// What follows `gpu:`: a path ending in `.ron` is a profile, anything else an adapter name.
    pub fn parse(rest: &str) -> Result<Self, String> {
        if rest.is_empty() {
            return Err("'gpu:' needs an adapter name or a device profile after the colon (e.g. gpu:h100 or gpu:devices/pcm.ron), or use plain 'gpu'".into());
        }
        Ok(if rest.ends_with(".ron") {
            Self {
                adapter: None,
                profile: Some(PathBuf::from(rest)),
            }
        } else {
            Self {
                adapter: Some(rest.to_string()),
                profile: None,
            }
        })
    }
}

impl std::fmt::Display for GpuSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.adapter, &self.profile) {
            (Some(name), _) => write!(f, "gpu:{name}"),
            (None, Some(path)) => write!(f, "gpu:{}", path.display()),
            (None, None) => f.write_str("gpu"),
        }
    }
}

fn gpu_err(e: GpuError) -> OracleError {
    match e {
        GpuError::Layer(e @ (SimError::ParameterCount { .. } | SimError::InputShape { .. })) => {
            OracleError::Shape(e.to_string())
        }
        GpuError::Layer(e) => OracleError::Refused(e.to_string()),
        GpuError::Unsupported(what) => {
            OracleError::Refused(format!("{what} is not supported by the GPU backend"))
        }
        other => OracleError::Backend(other.to_string()),
    }
}

/// Opens the GPU `spec` names and one oracle per layer on it.
pub fn open(spec: &GpuSpec, layers: &[LayerShape]) -> Result<Vec<GpuOracle>, OracleError> {
    let noise = match &spec.profile {
        Some(path) => {
            (pnn_sim::profile::DeviceProfile::load(path))
                .map_err(|e| OracleError::Backend(e.to_string()))?
                .noise
        }
        None => NoiseModel::default(),
    };
    let unsupported = GpuDense::unsupported_effects(&noise);
    if let (false, Some(path)) = (unsupported.is_empty(), &spec.profile) {
        return Err(OracleError::Backend(format!(
            "the GPU backend does not simulate {} (drawn afresh over the whole product at every evaluation), which the profile {} switches on: run it on the CPU simulator with --backend sim:{}",
            unsupported.join(" and "),
            path.display(),
            path.display()
        )));
    }
    if let Some(conv) = layers.iter().find(|l| matches!(l, LayerShape::Conv(_))) {
        return Err(OracleError::Backend(format!(
            "the GPU backend simulates dense layers only so far; the model has a convolutional block ({}): run it with --backend sim",
            crate::oracle::conformance::describe(conv)
        )));
    }
    let gpu = Gpu::open(spec.adapter.as_deref()).map_err(gpu_err)?;
    tracing::info!("GPU backend on '{}'", gpu.name());
    let refused = |e: OracleError| match &spec.profile {
        Some(path) => OracleError::Backend(format!(
            "{e}; run the profile on the CPU simulator with --backend sim:{}",
            path.display()
        )),
        None => e,
    };
    (layers.iter().enumerate())
        .map(|(l, shape)| {
            GpuOracle::with_noise(Arc::clone(&gpu), *shape, &noise, l).map_err(refused)
        })
        .collect()
}

/// One layer on the GPU.
pub struct GpuOracle {
    spec: LayerShape,
    layer: GpuDense,
    pairs: Vec<(Vec<f32>, Vec<f32>)>,
}

impl GpuOracle {
    /// A layer of `spec` on `gpu`, all parameters zero. Dense layers only.
    pub fn new(gpu: Arc<Gpu>, spec: LayerShape) -> Result<Self, OracleError> {
        Self::with_noise(gpu, spec, &NoiseModel::default(), 0)
    }

    /// A layer on a device with the hardware effects of `noise` (`layer`, the layer's index in
    /// the model, keys its faults and streams with the profile's seed, as on the CPU simulator).
    pub fn with_noise(
        gpu: Arc<Gpu>,
        spec: LayerShape,
        noise: &NoiseModel,
        layer: usize,
    ) -> Result<Self, OracleError> {
        let LayerShape::Dense { inputs, outputs } = spec else {
            return Err(OracleError::Unsupported(
                "a convolutional block on the GPU backend",
            ));
        };
        let seed = pnn_sim::noise::layer_seed(noise.seed, layer);
        Ok(Self {
            spec,
            layer: GpuDense::with_noise(gpu, inputs, outputs, noise, seed).map_err(gpu_err)?,
            pairs: Vec::new(),
        })
    }

    /// The GPU layer (its adapter, the directions it draws).
    pub fn layer_mut(&mut self) -> &mut GpuDense {
        &mut self.layer
    }
}

fn activations_of(pairs: &mut [(Vec<f32>, Vec<f32>)], out: &mut [PerturbedPair], rows: usize) {
    for ((plus, minus), (p, m)) in pairs.iter_mut().zip(out.iter_mut()) {
        // Swap buffers rather than copy: both sides keep their allocations for the next call.
        std::mem::swap(plus, &mut p.data);
        std::mem::swap(minus, &mut m.data);
        let width = p.data.len() / rows.max(1);
        (p.rows, p.width, m.rows, m.width) = (rows, width, rows, width);
    }
}

impl ForwardOracle for GpuOracle {
    fn spec(&self) -> &LayerShape {
        &self.spec
    }

    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        self.layer.set_params(params).map_err(gpu_err)
    }

    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        Ok(self.layer.params().to_vec())
    }

    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        input.check_width(&self.spec)?;
        self.layer.load_input(&input.data).map_err(gpu_err)
    }

    /// A dense layer reads no mode: its features are the next layer's input.
    fn forward(&mut self, _mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        let mut data = Vec::new();
        self.layer.forward(&mut data).map_err(gpu_err)?;
        let features = Activations::new(self.layer.batch(), self.spec.feature_width(), data);
        Ok(ForwardOutput {
            features,
            next: None,
        })
    }

    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<PerturbedPair>,
    ) -> Result<(), OracleError> {
        self.layer
            .evaluate_perturbed(chunk, seeds, eps, &mut self.pairs)
            .map_err(gpu_err)?;
        out.resize_with(seeds.len(), Default::default);
        activations_of(&mut self.pairs, out, self.layer.batch());
        Ok(())
    }

    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError> {
        self.layer
            .apply_update(chunk, scale, terms)
            .map_err(gpu_err)
    }

    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        Ok(None)
    }

    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        if state.is_empty() {
            return Ok(());
        }
        Err(OracleError::Shape(format!(
            "{} values of layer state for a dense layer, which keeps none",
            state.len()
        )))
    }

    fn in_process(&mut self) -> Option<&mut dyn InProcess> {
        Some(self)
    }
}

/// The host holds the parameters (the GPU a copy), so the trainer's shortcuts apply: the
/// parameters without a read, and the touched columns only.
impl InProcess for GpuOracle {
    fn parameters(&self) -> &[f32] {
        self.layer.params()
    }

    fn evaluate_perturbed_columns(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut PerturbedColumns,
    ) -> Result<bool, OracleError> {
        let touched = self.spec.touched_features(&chunk);
        let mut clean = std::mem::take(&mut out.clean.data);
        let done = self
            .layer
            .evaluate_perturbed_columns(chunk, seeds, eps, &mut self.pairs, &mut clean)
            .map_err(gpu_err)?;
        let rows = self.layer.batch();
        out.clean = Activations {
            rows,
            width: self.spec.feature_width(),
            data: clean,
            pixels: None,
        };
        if !done {
            return Ok(false);
        }
        if let Some((plus, _)) = self.pairs.first()
            && plus.len() != rows * touched.len()
        {
            return Err(OracleError::Shape(format!(
                "the GPU layer returned {} values per evaluation for the touched features {touched:?}",
                plus.len()
            )));
        }
        out.pairs.resize_with(seeds.len(), Default::default);
        activations_of(&mut self.pairs, &mut out.pairs, rows);
        out.touched = touched;
        Ok(true)
    }

    /// The GPU draws directions as it evaluates: nothing to draw ahead.
    fn prefetch_directions(&mut self, _chunk: Range<usize>, _seeds: &[DirectionSeed]) {}

    fn set_exact_reference(&mut self, exact: bool) {
        self.layer.set_choreography(if exact {
            Choreography::Reference
        } else {
            Choreography::Fast
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendSpec;

    #[test]
    fn the_gpu_spellings_parse_and_display_back() {
        for (text, adapter, profile) in [
            ("gpu", None, None),
            ("gpu:h100", Some("h100"), None),
            ("gpu:NVIDIA H200", Some("NVIDIA H200"), None),
            ("gpu:devices/ideal.ron", None, Some("devices/ideal.ron")),
        ] {
            let spec: BackendSpec = text.parse().unwrap();
            let expected = GpuSpec {
                adapter: adapter.map(String::from),
                profile: profile.map(PathBuf::from),
            };
            assert_eq!(spec, BackendSpec::Gpu(expected), "{text}");
            assert_eq!(spec.to_string(), text);
        }
        let err = "gpu:".parse::<BackendSpec>().unwrap_err();
        assert!(err.contains("adapter name or a device profile"), "{err}");
    }
}
