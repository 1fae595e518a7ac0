//! The simulated PNN in process: a [`ForwardOracle`] over `pnn_sim` layers.

use std::ops::Range;

use pnn_sim::dense::SimError;
use pnn_sim::profile::DeviceProfile;
use pnn_sim::{DenseLayer, NoiseModel};

use crate::oracle::{
    Activations, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, LayerKind, LayerSpec,
    OracleError, PerturbedPair, UpdateTerm,
};

pub struct SimOracle {
    spec: LayerSpec,
    layer: DenseLayer,
    pairs: Vec<(Vec<f32>, Vec<f32>)>,
}

impl SimOracle {
    pub fn new(spec: LayerSpec) -> Self {
        let layer = match spec.kind {
            LayerKind::Dense { inputs, outputs } => DenseLayer::new(inputs, outputs),
        };
        Self {
            spec,
            layer,
            pairs: Vec::new(),
        }
    }

    /// A layer on a device with the hardware effects of `noise`; `layer` (the layer's index in
    /// the model) keys its faults and noise streams together with the profile's seed.
    pub fn with_noise(spec: LayerSpec, noise: &NoiseModel, layer: usize) -> Self {
        let seed = pnn_sim::noise::layer_seed(noise.seed, layer);
        let layer = match spec.kind {
            LayerKind::Dense { inputs, outputs } => {
                DenseLayer::with_noise(inputs, outputs, noise, seed)
            }
        };
        Self {
            spec,
            layer,
            pairs: Vec::new(),
        }
    }

    /// One oracle per layer of a model, on devices of `profile`.
    pub fn for_profile(specs: &[LayerSpec], profile: &DeviceProfile) -> Vec<Self> {
        specs
            .iter()
            .enumerate()
            .map(|(l, spec)| Self::with_noise(spec.clone(), &profile.noise, l))
            .collect()
    }

    /// The simulated layer (its device state, effective weights, clock).
    pub fn layer(&self) -> &DenseLayer {
        &self.layer
    }

    pub fn layer_mut(&mut self) -> &mut DenseLayer {
        &mut self.layer
    }

    /// Selects the fast path or the literal reference choreography of the simulated layer.
    pub fn set_choreography(&mut self, choreography: pnn_sim::dense::Choreography) {
        self.layer.set_choreography(choreography);
    }

    /// One oracle per layer of a model.
    pub fn for_layers(specs: &[LayerSpec]) -> Vec<Self> {
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
    fn spec(&self) -> &LayerSpec {
        &self.spec
    }

    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        self.layer.set_params(params).map_err(sim_err)
    }

    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        Ok(self.layer.params().to_vec())
    }

    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        if input.width != self.spec.input_width {
            return Err(OracleError::Shape(format!(
                "input is {} wide, the layer takes {}",
                input.width, self.spec.input_width
            )));
        }
        self.layer.load_input(&input.data).map_err(sim_err)
    }

    fn forward(&mut self, _mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        let mut data = Vec::new();
        self.layer.forward(&mut data).map_err(sim_err)?;
        let features = Activations::new(self.layer.batch(), self.spec.feature_width, data);
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
            .map_err(sim_err)?;
        out.resize_with(seeds.len(), Default::default);
        let (rows, width) = (self.layer.batch(), self.spec.feature_width);
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
}
