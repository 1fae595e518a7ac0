//! A fully connected layer with ReLU, as a physical device would hold it (thesis Appendix A,
//! Table 3: Linear + ReLU blocks).
//!
//! Parameters are flat: the weight matrix (n_out x n_in, row-major) then the bias (n_out), the
//! layout of PyTorch's `nn.Linear` and of the golden recordings.

use std::ops::Range;

use firmware_protocol::direction::step_with_vectors;
use firmware_protocol::shape::{ForwardMode, LayerShape};
use firmware_protocol::{DirectionSeed, UpdateTerm};

use input::{InputForm, LayerInput, SPARSE_INPUT_DENSITY};

use crate::choreography::Choreography;
use crate::direction_cache::DirectionCache;
use crate::error::SimError;
use crate::layer::SimulatedLayer;
use crate::matmul::{View, matmul_a_bt};
use crate::noise::{Device, NoiseModel};

#[derive(Debug)]
pub struct DenseLayer {
    n_in: usize,
    n_out: usize,
    params: Vec<f32>,
    /// The cached input batch, in the forms its products read.
    input: LayerInput,
    batch: usize,
    directions: DirectionCache,
    saved: Vec<f32>,
    scratch: Vec<f32>,
    /// The clean pre-activation `x Wᵀ + b` (batch x n_out) and which outputs of it are stale.
    z0: Vec<f32>,
    stale: Option<Range<usize>>,
    /// The chunk's stacked directions (P x outputs x n_in) and their products with the input.
    stacked: Vec<f32>,
    dz: Vec<f32>,
    /// Rows per direction block of `dz` (the chunk's rows of W, and any rows its bias lies in).
    dz_rows: usize,
    /// The chunk and seeds whose products `dz` holds, while `z0` is current for that chunk's
    /// outputs: the update that follows moves `z0` by a combination of them (ideal device only).
    last_fast: Option<(Range<usize>, Vec<DirectionSeed>)>,
    choreography: Choreography,
    /// The hardware effects (`None`: the ideal device, exact f32). See [`crate::noise`].
    device: Option<Box<Device>>,
    /// The seed that keyed the device's faults and streams (to power it on again).
    device_seed: u64,
    /// The weights the device computes with (n_out x n_in) where they differ from the targets in
    /// `params`; empty when they are the same.
    effective: Vec<f32>,
    saved_effective: Vec<f32>,
}

impl DenseLayer {
    /// A layer with all parameters zero; program it with [`DenseLayer::set_params`].
    pub fn new(n_in: usize, n_out: usize) -> Self {
        Self {
            n_in,
            n_out,
            params: vec![0.0; n_out * n_in + n_out],
            input: LayerInput::default(),
            batch: 0,
            directions: DirectionCache::default(),
            saved: Vec::new(),
            scratch: Vec::new(),
            z0: Vec::new(),
            stale: Some(0..n_out),
            stacked: Vec::new(),
            dz: Vec::new(),
            dz_rows: 0,
            last_fast: None,
            choreography: Choreography::default(),
            device: None,
            device_seed: 0,
            effective: Vec::new(),
            saved_effective: Vec::new(),
        }
    }

    /// A layer on a device with the hardware effects of `model`; its fixed faults and random
    /// streams are keyed by `seed` (give each layer its own). An ideal model gives exactly
    /// [`DenseLayer::new`].
    pub fn with_noise(n_in: usize, n_out: usize, model: &NoiseModel, seed: u64) -> Self {
        let mut layer = Self::new(n_in, n_out);
        if !model.is_ideal() {
            let device = Device::new(model, n_in * n_out, seed);
            if !device.weights_identity() {
                layer.effective = vec![0.0; n_in * n_out];
            }
            layer.device = Some(Box::new(device));
            layer.device_seed = seed;
            let nw = n_in * n_out;
            let params = std::mem::take(&mut layer.params);
            layer.write(&params, 0..nw);
            layer.params = params;
        }
        layer
    }

    /// The device's state, where the layer has hardware effects.
    pub fn device(&self) -> Option<&Device> {
        self.device.as_deref()
    }

    /// The weights the device computes with now (n_out x n_in): the targets in [`Self::params`]
    /// as the device's effects transform them (read noise aside, which each read draws anew).
    pub fn effective_weights(&self) -> &[f32] {
        if self.effective.is_empty() {
            &self.params[..self.n_out * self.n_in]
        } else {
            &self.effective
        }
    }

    /// Advances the device's clock by `seconds` (drift); see [`crate::noise`].
    pub fn advance_time(&mut self, seconds: f64) {
        if let Some(d) = self.device.as_mut()
            && d.advance(seconds)
        {
            self.refresh_effective(0..self.n_out * self.n_in);
            self.mark_stale(0..self.n_out);
        }
    }

    /// A device write of the weights in `range` (targets: all parameters, as `params` will hold
    /// them): draws their programming error, restarts their drift clock, and refreshes the
    /// effective weights that changed.
    fn write(&mut self, targets: &[f32], range: Range<usize>) {
        let nw = self.n_out * self.n_in;
        let range = range.start.min(nw)..range.end.min(nw);
        let Some(device) = self.device.as_deref_mut() else {
            return;
        };
        if range.is_empty() {
            return;
        }
        let changed = device.program(&targets[..nw], range);
        if !self.effective.is_empty() {
            device.effective_range(targets, changed.clone(), &mut self.effective);
            let outputs = changed.start / self.n_in..changed.end.div_ceil(self.n_in);
            self.mark_stale(outputs);
        }
    }

    fn refresh_effective(&mut self, range: Range<usize>) {
        if let Some(device) = self.device.as_deref()
            && !self.effective.is_empty()
        {
            device.effective_range(&self.params, range, &mut self.effective);
        }
    }

    /// Sets how perturbed evaluations are computed. Switching away from the fast path drops an
    /// input held as sparse rows only (see [`DenseLayer::load_input`]): load it again.
    pub fn set_choreography(&mut self, choreography: Choreography) {
        if choreography != Choreography::Fast {
            if self.input.form == InputForm::Sparse {
                self.batch = 0;
            }
            self.input.form = InputForm::Dense;
        }
        self.choreography = choreography;
    }

    pub fn choreography(&self) -> Choreography {
        self.choreography
    }

    fn mark_stale(&mut self, outputs: Range<usize>) {
        self.last_fast = None;
        self.stale = Some(match self.stale.take() {
            Some(s) => s.start.min(outputs.start)..s.end.max(outputs.end),
            None => outputs,
        });
    }

    /// The outputs whose pre-activation depends on the parameters in `chunk`.
    fn outputs_of(&self, chunk: &Range<usize>) -> Range<usize> {
        let nw = self.n_out * self.n_in;
        let (mut lo, mut hi) = (self.n_out, 0);
        if chunk.start < nw {
            lo = chunk.start / self.n_in;
            hi = chunk.end.min(nw).div_ceil(self.n_in);
        }
        if chunk.end > nw {
            lo = lo.min(chunk.start.max(nw) - nw);
            hi = hi.max(chunk.end - nw);
        }
        lo..hi
    }

    /// The outputs whose weights (not bias) are in `chunk`: the rows of `W` the chunk covers, the
    /// only ones its perturbation needs a product for (a bias entry moves its output by itself).
    fn weight_rows_of(&self, chunk: &Range<usize>) -> Range<usize> {
        let nw = self.n_out * self.n_in;
        if chunk.start >= nw {
            return 0..0;
        }
        chunk.start / self.n_in..chunk.end.min(nw).div_ceil(self.n_in)
    }

    /// Where the fast path lays a chunk's directions (offset in, and length of, each
    /// direction's block of whole rows of `W`, its bias part in rows after them), for a device
    /// that computes with the targets themselves; `None` for any other layer or a bias-only chunk.
    fn direction_layout(&self, chunk: &Range<usize>) -> Option<(usize, usize)> {
        let n_in = self.n_in;
        let nw = self.n_out * n_in;
        let weight_part = chunk.start.min(nw)..chunk.end.min(nw);
        let identity = self.device.as_deref().is_none_or(|d| d.weights_identity());
        if !identity || weight_part.is_empty() || self.choreography != Choreography::Fast {
            return None;
        }
        let rows = self.weight_rows_of(chunk);
        let offset = weight_part.start - rows.start * n_in;
        let kk = rows.len() + (chunk.len() - weight_part.len()).div_ceil(n_in);
        Some((offset, kk * n_in))
    }

    /// A hint that the next perturbed evaluation will be of `chunk` along `seeds`: where another
    /// thread is free, their directions are drawn there meanwhile (the same values; nothing
    /// changes if the hint is wrong, but the draw is wasted).
    pub fn prefetch_directions(&mut self, chunk: Range<usize>, seeds: &[DirectionSeed]) {
        if crate::threads::threads() < 2 || self.check_chunk(&chunk).is_err() {
            return;
        }
        if let Some((offset, stride)) = self.direction_layout(&chunk) {
            self.directions
                .prefetch_laid_out(seeds, chunk.len(), offset, stride);
        }
    }

    /// Brings the cached clean pre-activation up to date (only its stale outputs).
    fn refresh_preactivation(&mut self) {
        let Some(rows) = self.stale.take() else {
            return;
        };
        let (n_in, n_out, batch) = (self.n_in, self.n_out, self.batch);
        self.z0.resize(batch * n_out, 0.0);
        let (w, b) = self.params.split_at(n_out * n_in);
        let w = if self.effective.is_empty() {
            w
        } else {
            &self.effective
        };
        for zrow in self.z0.chunks_exact_mut(n_out) {
            zrow[rows.clone()].copy_from_slice(&b[rows.clone()]);
        }
        let weights = View {
            data: &w[rows.start * n_in..],
            rows: rows.len(),
            cols: n_in,
            ld: n_in,
        };
        self.input.times_bt(
            batch,
            n_in,
            weights,
            &mut self.z0[rows.start..],
            n_out,
            true,
        );
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }

    pub fn n_out(&self) -> usize {
        self.n_out
    }

    pub fn param_count(&self) -> usize {
        self.params.len()
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn set_params(&mut self, params: &[f32]) -> Result<(), SimError> {
        if params.len() != self.params.len() {
            return Err(SimError::ParameterCount {
                expected: self.params.len(),
                got: params.len(),
            });
        }
        self.params.copy_from_slice(params);
        self.mark_stale(0..self.n_out);
        if self.device.is_some() {
            let params = std::mem::take(&mut self.params);
            self.write(&params, 0..params.len());
            self.params = params;
        }
        Ok(())
    }

    /// Caches a batch of inputs (batch x n_in, row-major) for the evaluations that follow.
    pub fn load_input(&mut self, x: &[f32]) -> Result<(), SimError> {
        if x.is_empty() || !x.len().is_multiple_of(self.n_in) {
            return Err(SimError::InputShape {
                width: self.n_in,
                got: x.len(),
            });
        }
        self.batch = x.len() / self.n_in;
        self.mark_stale(0..self.n_out);
        // An ideal layer on the fast path reads a sparse input through its sparse rows alone:
        // it keeps no dense copy of one.
        let fast = self.choreography == Choreography::Fast;
        let (batch, n_in) = (self.batch, self.n_in);
        let input = &mut self.input;
        input.dense.clear();
        if let Some(device) = self.device.as_mut() {
            input.dense.extend_from_slice(x);
            device.convert_input(&mut input.dense);
            if device.tick() {
                self.refresh_effective(0..self.n_out * self.n_in);
            }
            self.input.choose_form(fast, batch, n_in);
        } else if fast
            && input
                .sparse
                .detect_into(x, batch, n_in, SPARSE_INPUT_DENSITY)
        {
            input.form = InputForm::Sparse;
        } else {
            input.dense.extend_from_slice(x);
            input.choose_form(fast, batch, n_in);
        }
        Ok(())
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// `out = ReLU(x Wᵀ + b)` on the cached input (batch x n_out).
    pub fn forward(&mut self, out: &mut Vec<f32>) -> Result<(), SimError> {
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        if self.device.is_none() && self.choreography == Choreography::Fast {
            // The cached pre-activation, kept current through the updates: no product at all
            // when the chunks' updates moved it (see `apply_update`).
            self.refresh_preactivation();
            out.clear();
            out.extend(self.z0.iter().map(|z| z.max(0.0)));
        } else {
            self.forward_on(&self.params, out);
        }
        Ok(())
    }

    /// The device's forward pass with targets `params` (whose effective weights are current in
    /// `self.effective` where that is kept).
    fn forward_on(&self, params: &[f32], out: &mut Vec<f32>) {
        match self.device.as_deref() {
            None => forward_with(
                params,
                self.n_in,
                self.n_out,
                &self.input.dense,
                self.batch,
                out,
            ),
            Some(device) => {
                let nw = self.n_out * self.n_in;
                let weights = if self.effective.is_empty() {
                    &params[..nw]
                } else {
                    &self.effective
                };
                device.forward(weights, &params[nw..], &self.input.dense, self.batch, out);
            }
        }
    }

    fn check_chunk(&self, chunk: &Range<usize>) -> Result<(), SimError> {
        if chunk.start >= chunk.end || chunk.end > self.params.len() {
            return Err(SimError::ChunkOutOfRange {
                start: chunk.start,
                end: chunk.end,
                count: self.params.len(),
            });
        }
        Ok(())
    }

    /// Algorithm 1, lines 6-9, for each seed: the activations under `W + eps v` and `W - eps v`,
    /// `v` the normalised direction over `chunk`. Leaves the parameters bit-identical. Returns
    /// `(a+, a-)` per seed in `out`.
    pub fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), SimError> {
        self.check_chunk(&chunk)?;
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        out.resize_with(seeds.len(), Default::default);
        let full_forward = self.device.as_ref().is_some_and(|d| d.needs_full_forward());
        match self.choreography {
            Choreography::Fast if !full_forward => {
                self.perturbed_fast(chunk, seeds, eps, out, false)
            }
            _ => {
                self.directions.prepare(seeds, chunk.len());
                self.perturbed_reference(chunk, seeds, eps, out)
            }
        }
        Ok(())
    }

    /// [`DenseLayer::evaluate_perturbed`] over the outputs the chunk touches only (each pair
    /// batch x touched outputs), with the clean activations of the current parameters in
    /// `clean` (batch x n_out), which every evaluation equals elsewhere: for an ideal layer on
    /// the fast path, where that holds bit for bit. Returns `false`, computing nothing, for any
    /// other layer (a device draws noise per evaluation; the reference runs the literal
    /// choreography).
    pub fn evaluate_perturbed_columns(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
        clean: &mut Vec<f32>,
    ) -> Result<bool, SimError> {
        self.check_chunk(&chunk)?;
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        if self.device.is_some() || self.choreography != Choreography::Fast {
            return Ok(false);
        }
        out.resize_with(seeds.len(), Default::default);
        self.perturbed_fast(chunk, seeds, eps, out, true);
        clean.clear();
        clean.extend(self.z0.iter().map(|z| z.max(0.0)));
        Ok(true)
    }

    /// Algorithm 1, lines 10 and 12, on the chunk, with the arithmetic of
    /// `firmware_protocol::direction::apply_update`.
    pub fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), SimError> {
        self.check_chunk(&chunk)?;
        let len = chunk.len();
        self.directions.ensure(terms, len);
        self.scratch.resize(len, 0.0);
        let directions = &self.directions;
        let vectors = terms.iter().map(|t| {
            let v = directions.get(t.seed, len).expect("ensured above");
            (t.derivative, v)
        });
        let outputs = self.outputs_of(&chunk);
        step_with_vectors(
            &mut self.params[chunk.clone()],
            scale,
            vectors,
            &mut self.scratch,
        );
        let follows_evaluation = self.last_fast.as_ref().is_some_and(|(c, seeds)| {
            *c == chunk
                && seeds.len() == terms.len()
                && seeds.iter().zip(terms).all(|(s, t)| *s == t.seed)
        });
        if follows_evaluation && self.choreography == Choreography::Fast {
            self.move_preactivation(&chunk, scale, terms);
        } else {
            self.mark_stale(outputs);
        }
        if self.device.is_some() {
            // An update is a write of the chunk: stuck devices ignore it (their effective weight
            // stays), the others are programmed anew.
            let params = std::mem::take(&mut self.params);
            self.write(&params, chunk);
            self.params = params;
        }
        Ok(())
    }
}

/// `out = ReLU(x Wᵀ + b)` for parameters laid out as [`DenseLayer`] keeps them.
pub fn forward_with(
    params: &[f32],
    n_in: usize,
    n_out: usize,
    x: &[f32],
    batch: usize,
    out: &mut Vec<f32>,
) {
    let (w, b) = params.split_at(n_out * n_in);
    out.resize(batch * n_out, 0.0);
    for row in out.chunks_exact_mut(n_out) {
        row.copy_from_slice(b);
    }
    matmul_a_bt(batch, n_out, n_in, x, w, out, true);
    out.iter_mut().for_each(|a| *a = a.max(0.0));
}

impl SimulatedLayer for DenseLayer {
    fn shape(&self) -> LayerShape {
        LayerShape::dense(self.n_in, self.n_out)
    }
    fn params(&self) -> &[f32] {
        &self.params
    }
    fn set_params(&mut self, params: &[f32]) -> Result<(), SimError> {
        DenseLayer::set_params(self, params)
    }
    fn load_input(&mut self, x: &[f32]) -> Result<(), SimError> {
        DenseLayer::load_input(self, x)
    }
    fn batch(&self) -> usize {
        self.batch
    }
    /// The features alone: a dense layer's output is the next layer's input.
    fn forward(
        &mut self,
        _mode: ForwardMode,
        features: &mut Vec<f32>,
        next: &mut Vec<f32>,
    ) -> Result<(), SimError> {
        next.clear();
        DenseLayer::forward(self, features)
    }
    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), SimError> {
        DenseLayer::evaluate_perturbed(self, chunk, seeds, eps, out)
    }
    fn evaluate_perturbed_columns(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
        clean: &mut Vec<f32>,
    ) -> Result<bool, SimError> {
        DenseLayer::evaluate_perturbed_columns(self, chunk, seeds, eps, out, clean)
    }
    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), SimError> {
        DenseLayer::apply_update(self, chunk, scale, terms)
    }
    fn layer_state(&self) -> Vec<f32> {
        Vec::new()
    }
    fn set_layer_state(&mut self, state: &[f32]) -> Result<(), SimError> {
        if state.is_empty() {
            return Ok(());
        }
        Err(SimError::BufferLength {
            what: "layer state (a dense layer keeps none)",
            expected: 0,
            got: state.len(),
        })
    }
    fn prefetch_directions(&mut self, chunk: Range<usize>, seeds: &[DirectionSeed]) {
        DenseLayer::prefetch_directions(self, chunk, seeds)
    }
    fn choreography(&self) -> Choreography {
        self.choreography
    }
    fn set_choreography(&mut self, choreography: Choreography) {
        DenseLayer::set_choreography(self, choreography)
    }
    /// The same device (its model and seed), freshly made: zero parameters, faults as drawn at
    /// construction, streams and clock from their start.
    fn power_on(&mut self) {
        let model = self.device.as_ref().map(|d| d.model().clone());
        let choreography = self.choreography;
        *self = Self::with_noise(
            self.n_in,
            self.n_out,
            &model.unwrap_or_default(),
            self.device_seed,
        );
        DenseLayer::set_choreography(self, choreography);
    }
    fn as_dense(&self) -> Option<&DenseLayer> {
        Some(self)
    }
    fn as_dense_mut(&mut self) -> Option<&mut DenseLayer> {
        Some(self)
    }
}

mod fast;
mod input;
mod reference;
#[cfg(test)]
mod tests;
