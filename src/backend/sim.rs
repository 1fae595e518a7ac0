//! The simulated PNN in process: a [`ForwardOracle`] over `pnn_sim` layers.

use std::ops::Range;

use pnn_sim::conv::ConvBlock;
use pnn_sim::layer::{self, SimulatedLayer};
use pnn_sim::profile::DeviceProfile;
use pnn_sim::{DenseLayer, NoiseModel, SimError};

use crate::oracle::{
    Activations, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, InProcess, LayerShape,
    OracleError, PerturbedColumns, PerturbedPair, UpdateTerm,
};

pub struct SimOracle {
    spec: LayerShape,
    /// The simulated layer (the one interface the device server serves too); called once per
    /// request, its hot loops inside.
    layer: Box<dyn SimulatedLayer>,
    pairs: Vec<(Vec<f32>, Vec<f32>)>,
    next: Vec<f32>,
}

impl SimOracle {
    pub fn new(spec: LayerShape) -> Self {
        Self::over(spec, layer::ideal(spec))
    }

    fn over(spec: LayerShape, layer: Box<dyn SimulatedLayer>) -> Self {
        Self {
            spec,
            layer,
            pairs: Vec::new(),
            next: Vec::new(),
        }
    }

    /// A layer on a device with the hardware effects of `noise`; `layer` (the layer's index in
    /// the model) keys its faults and noise streams together with the profile's seed. Conv
    /// blocks are simulated ideal only: a profile with any effect switched on is refused for them.
    pub fn with_noise(
        spec: LayerShape,
        noise: &NoiseModel,
        layer: usize,
    ) -> Result<Self, OracleError> {
        let seed = pnn_sim::noise::layer_seed(noise.seed, layer);
        match spec {
            LayerShape::Dense { inputs, outputs } => Ok(Self::over(
                spec,
                Box::new(DenseLayer::with_noise(inputs, outputs, noise, seed)),
            )),
            LayerShape::Conv(_) if noise.is_ideal() => Ok(Self::new(spec)),
            LayerShape::Conv(_) => Err(OracleError::Unsupported(
                "hardware effects on convolutional blocks (the noise model covers dense layers)",
            )),
        }
    }

    /// One oracle per layer of a model, on devices of `profile`.
    pub fn for_profile(
        specs: &[LayerShape],
        profile: &DeviceProfile,
    ) -> Result<Vec<Self>, OracleError> {
        specs
            .iter()
            .enumerate()
            .map(|(l, spec)| Self::with_noise(*spec, &profile.noise, l))
            .collect()
    }

    /// The simulated layer.
    pub fn simulated(&self) -> &dyn SimulatedLayer {
        &*self.layer
    }

    /// The simulated dense layer (its device state, effective weights, clock), if it is one.
    pub fn layer(&self) -> Option<&DenseLayer> {
        self.layer.as_dense()
    }

    pub fn layer_mut(&mut self) -> Option<&mut DenseLayer> {
        self.layer.as_dense_mut()
    }

    /// Selects the fast path or the literal reference choreography of the simulated layer.
    pub fn set_choreography(&mut self, choreography: pnn_sim::Choreography) {
        self.layer.set_choreography(choreography);
    }

    /// The simulated CNN block, if this oracle is one (for inspecting BatchNorm state).
    pub fn conv_block(&self) -> Option<&ConvBlock> {
        self.layer.as_conv()
    }

    /// The simulated CNN block, mutable: to program its fixed projection `A` from a recording
    /// (`tests/cnn_golden.rs` replays one through the trainer).
    pub fn conv_block_mut(&mut self) -> Option<&mut ConvBlock> {
        self.layer.as_conv_mut()
    }

    fn batch(&self) -> usize {
        self.layer.batch()
    }

    /// One oracle per layer of a model.
    pub fn for_layers(specs: &[LayerShape]) -> Vec<Self> {
        specs.iter().cloned().map(Self::new).collect()
    }
}

fn sim_err(e: SimError) -> OracleError {
    match e {
        SimError::ParameterCount { .. } | SimError::InputShape { .. } => {
            OracleError::Shape(e.to_string())
        }
        _ => OracleError::Refused(e.to_string()),
    }
}

impl ForwardOracle for SimOracle {
    fn spec(&self) -> &LayerShape {
        &self.spec
    }

    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        self.layer.set_params(params).map_err(sim_err)
    }

    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        Ok(self.layer.params().to_vec())
    }

    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        input.check_width(&self.spec)?;
        self.layer.load_input(&input.data).map_err(sim_err)
    }

    fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        let mut data = Vec::new();
        self.layer
            .forward(mode, &mut data, &mut self.next)
            .map_err(sim_err)?;
        let rows = self.batch();
        let next = self.spec.has_separate_output().then(|| {
            Activations::new(
                rows,
                self.spec.output_width(),
                std::mem::take(&mut self.next),
            )
        });
        let features = Activations::new(rows, self.spec.feature_width(), data);
        Ok(ForwardOutput { features, next })
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
            .map_err(sim_err)?;
        out.resize_with(seeds.len(), Default::default);
        let (rows, width) = (self.batch(), self.spec.feature_width());
        for ((plus, minus), (p, m)) in self.pairs.iter_mut().zip(out.iter_mut()) {
            // Swap buffers rather than copy: both sides keep their allocations for the next call.
            std::mem::swap(plus, &mut p.data);
            std::mem::swap(minus, &mut m.data);
            (p.rows, p.width, m.rows, m.width) = (rows, width, rows, width);
        }
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
            .map_err(sim_err)
    }

    /// A conv block's BatchNorm running statistics: the means, then the variances.
    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        let state = self.layer.layer_state();
        Ok((!state.is_empty()).then_some(state))
    }

    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        let keeps = self.layer.layer_state().len();
        if keeps == 0 && !state.is_empty() {
            return Err(OracleError::Shape(format!(
                "{} values of layer state for a dense layer, which keeps none",
                state.len()
            )));
        }
        if keeps > 0 && !state.len().is_multiple_of(2) {
            return Err(OracleError::Shape(format!(
                "{} values of BatchNorm state: expected means and variances, as many of each",
                state.len()
            )));
        }
        self.layer.set_layer_state(state).map_err(sim_err)
    }

    fn in_process(&mut self) -> Option<&mut dyn InProcess> {
        Some(self)
    }
}

/// The simulated layer is in this process: its parameters, the touched-columns evaluation,
/// direction prefetching, and the reference choreography.
impl InProcess for SimOracle {
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
            .map_err(sim_err)?;
        let (rows, width) = (self.batch(), self.spec.feature_width());
        // Not `Activations::new`: the layer may leave `clean` empty when it declines (`!done`).
        out.clean = Activations {
            rows,
            width,
            data: clean,
            pixels: None,
        };
        if !done {
            return Ok(false);
        }
        // The layer's own idea of the touched outputs must be the spec's, which the trainer reads.
        if let Some((plus, _)) = self.pairs.first()
            && plus.len() != rows * touched.len()
        {
            return Err(OracleError::Shape(format!(
                "the layer returned {} values per evaluation for the touched features {touched:?}",
                plus.len()
            )));
        }
        out.pairs.resize_with(seeds.len(), Default::default);
        for ((plus, minus), (p, m)) in self.pairs.iter_mut().zip(out.pairs.iter_mut()) {
            std::mem::swap(plus, &mut p.data);
            std::mem::swap(minus, &mut m.data);
            (p.rows, p.width) = (rows, touched.len());
            (m.rows, m.width) = (rows, touched.len());
        }
        out.touched = touched;
        Ok(true)
    }

    fn prefetch_directions(&mut self, chunk: Range<usize>, seeds: &[DirectionSeed]) {
        self.layer.prefetch_directions(chunk, seeds);
    }

    fn set_exact_reference(&mut self, exact: bool) {
        self.set_choreography(if exact {
            pnn_sim::Choreography::Reference
        } else {
            pnn_sim::Choreography::Fast
        });
    }
}
