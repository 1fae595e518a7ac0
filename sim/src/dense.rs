//! A fully connected layer with ReLU, as a physical device would hold it (thesis Appendix A,
//! Table 3: Linear + ReLU blocks).
//!
//! Parameters are flat: the weight matrix (n_out x n_in, row-major) then the bias (n_out), the
//! layout of PyTorch's `nn.Linear` and of the golden recordings.

use std::ops::Range;

use firmware_protocol::direction::step_with_vectors;
use firmware_protocol::{DirectionSeed, UpdateTerm};

use crate::direction_cache::DirectionCache;
use crate::matmul::{View, gemm_into, matmul_a_bt};
use crate::packed::{PackedRows, packed_gemm_bt};
use crate::sparse::{Packed, SparseRows, sparse_gemm_bt};

/// Inputs with at most this share of entries off their background value (normalised MNIST
/// images: about 19%) are multiplied as sparse rows on the fast path; denser ones (hidden ReLU
/// outputs, about 50%) by the dense product, which is faster there (measured on the MNIST
/// layer's shapes).
const SPARSE_INPUT_DENSITY: f32 = 0.25;
use crate::noise::{Device, NoiseModel};

/// What a simulated layer refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimError {
    #[error("expected {expected} parameters, got {got}")]
    ParameterCount { expected: usize, got: usize },
    #[error("input of {got} values is not a whole batch of {width}-wide rows")]
    InputShape { width: usize, got: usize },
    #[error("no input loaded")]
    NoInput,
    #[error("{what}: expected {expected} values, got {got}")]
    BufferLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("chunk {start}..{end} is outside the {count} parameters")]
    ChunkOutOfRange {
        start: usize,
        end: usize,
        count: usize,
    },
}

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
    /// The weights the device computes with (n_out x n_in) where they differ from the targets in
    /// `params`; empty when they are the same.
    effective: Vec<f32>,
    saved_effective: Vec<f32>,
}

/// How a perturbed evaluation is computed. Both give the same numbers up to float rounding; the
/// reference is the literal choreography of Algorithm 1 and what the fast path is held to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Choreography {
    /// Exact by linearity: `z(W ± eps v) = z0 ± eps x vᵀ`. The clean pre-activation `z0` is
    /// computed once per batch and kept current as chunks update: on an ideal device an update
    /// moves it by the combination of the products the evaluation computed, else the outputs
    /// the chunk touches are recomputed. The P directions are multiplied in one fused product
    /// over the rows of W the chunk covers, through the input's sparse rows where it has them,
    /// else through a copy of the input packed once for all of the batch's products.
    /// Conv blocks (`crate::conv`) follow the same scheme per channel.
    #[default]
    Fast,
    /// Perturb the weights, run the whole forward pass, twice per direction, restore.
    ///
    /// A device with input or read noise always evaluates this way: those draw a fresh full
    /// product per evaluation, so linearity has nothing to share. Every other effect (converters,
    /// output noise, nonlinearity, and every weight effect, whose exact per-weight change under
    /// `±eps v` is what the fast path multiplies) takes the fast path exactly, drawing the same
    /// noise in the same order as this choreography does.
    Reference,
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

    /// The literal choreography: perturb the chunk by `+eps v`, evaluate, by `-eps v`, evaluate,
    /// restore. The chunk is saved and copied back, so the parameters are bit-identical
    /// afterwards (adding `+eps, -2eps, +eps` in floating point would not be).
    fn perturbed_reference(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
    ) {
        let len = chunk.len();
        self.saved.clear();
        self.saved.extend_from_slice(&self.params[chunk.clone()]);
        // The effective weights of the chunk's weight part are recomputed for each perturbed
        // target (not a write: programming error and drift clock stay) and restored after.
        let nw = self.n_out * self.n_in;
        let weight_part = chunk.start.min(nw)..chunk.end.min(nw);
        self.saved_effective.clear();
        if !self.effective.is_empty() {
            self.saved_effective
                .extend_from_slice(&self.effective[weight_part.clone()]);
        }
        for (seed, (plus, minus)) in seeds.iter().zip(out.iter_mut()) {
            let v = self
                .directions
                .get(*seed, len)
                .expect("prepared by the caller");
            for (sign, target) in [(1.0f32, &mut *plus), (-1.0, &mut *minus)] {
                for ((w, w0), vi) in self.params[chunk.clone()]
                    .iter_mut()
                    .zip(&self.saved)
                    .zip(v)
                {
                    *w = w0 + sign * eps * vi;
                }
                if let Some(device) = self.device.as_deref()
                    && !self.effective.is_empty()
                {
                    device.effective_range(&self.params, weight_part.clone(), &mut self.effective);
                }
                self.forward_on(&self.params, target);
            }
            self.params[chunk.clone()].copy_from_slice(&self.saved);
        }
        if !self.effective.is_empty() {
            self.effective[weight_part].copy_from_slice(&self.saved_effective);
        }
    }

    /// The exact fast path (see [`Choreography::Fast`]); the parameters are never written.
    fn perturbed_fast(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
        compact: bool,
    ) {
        self.refresh_preactivation();
        let (n_in, n_out, batch) = (self.n_in, self.n_out, self.batch);
        let nw = n_out * n_in;
        let outputs = self.outputs_of(&chunk);
        // The product covers only the rows of W in the chunk: a chunk that reaches into the
        // bias touches every output, but through the bias alone outside these rows.
        let rows = self.weight_rows_of(&chunk);
        let k = rows.len();
        let p_count = seeds.len();
        let device = self.device.as_deref();
        // What `±eps v` of the targets does to the effective weights, exactly: `±eps s v` where
        // the device's map is linear (s = 1 on an ideal device: one block per direction), else
        // `e(w ± eps v) - e(w)` (clipping, quantisation: one block per direction and sign).
        let linear = device.is_none_or(|d| d.weights_linear());
        let blocks = if linear { p_count } else { 2 * p_count };
        // The weight part of each direction, laid into (rows x n_in) blocks, stacked.
        let weight_part = chunk.start.min(nw)..chunk.end.min(nw);
        let offset = weight_part.start.saturating_sub(rows.start * n_in);
        let width = weight_part.len();
        // Rows of the product per block. Where the device computes with the targets themselves,
        // the directions are drawn straight into the stacked layout and the product runs on the
        // cache's buffer: a chunk's bias part (after the last row of W) then lies in extra rows,
        // whose products are computed and not used.
        let layout = self.direction_layout(&chunk);
        let laid_out = layout.is_some();
        let kk = match layout {
            Some((_, stride)) => stride / n_in,
            None => k,
        };
        if let Some((offset, stride)) = layout {
            self.directions
                .prepare_laid_out(seeds, chunk.len(), offset, stride);
        } else {
            self.directions.prepare(seeds, chunk.len());
            self.stacked.clear();
            self.stacked.resize(blocks * k * n_in, 0.0);
        }
        for (p, seed) in seeds.iter().enumerate() {
            let v = self
                .directions
                .get(*seed, chunk.len())
                .expect("prepared above");
            if weight_part.is_empty() || laid_out {
                continue;
            }
            let v = &v[..width];
            let block_at = |b: usize| b * k * n_in + offset..b * k * n_in + offset + width;
            match device {
                Some(d) if linear => {
                    let block = &mut self.stacked[block_at(p)];
                    for ((s, vi), i) in block.iter_mut().zip(v).zip(weight_part.clone()) {
                        *s = d.slope(i) * vi;
                    }
                }
                Some(d) => {
                    for (b, sign) in [(2 * p, 1.0f32), (2 * p + 1, -1.0)] {
                        let block = &mut self.stacked[block_at(b)];
                        for ((s, vi), i) in block.iter_mut().zip(v).zip(weight_part.clone()) {
                            let w = self.params[i] + sign * eps * vi;
                            *s = d.effective(i, w) - self.effective[i];
                        }
                    }
                }
                None => unreachable!("the identity lays its directions out"),
            }
        }
        // dz (batch x blocks*kk) = x · stackedᵀ: one fused product for all directions.
        self.dz.resize(batch * blocks * kk, 0.0);
        self.dz_rows = kk;
        if !weight_part.is_empty() {
            let stacked = if laid_out {
                self.directions.laid_out()
            } else {
                &self.stacked
            };
            self.input.times_bt(
                batch,
                n_in,
                View::new(stacked, blocks * kk, n_in),
                &mut self.dz,
                blocks * kk,
                false,
            );
        } else {
            self.dz.iter_mut().for_each(|d| *d = 0.0);
        }
        let bias_part = chunk.start.max(nw) - nw..chunk.end.max(nw) - nw;
        let stage = device.filter(|d| d.has_output_stage());
        let relu_now = stage.is_none();
        let mut bias_add = vec![0f32; outputs.len()];
        let mut dz_touched = vec![0f32; outputs.len()];
        let dz_at = rows.start.saturating_sub(outputs.start);
        for (p, (seed, (plus, minus))) in seeds.iter().zip(out.iter_mut()).enumerate() {
            let v = self
                .directions
                .get(*seed, chunk.len())
                .expect("prepared by the caller");
            bias_over_outputs(&v[weight_part.len()..], &bias_part, &outputs, &mut bias_add);
            for (s, sign, target) in [(0, 1.0f32, &mut *plus), (1, -1.0, &mut *minus)] {
                let block = if linear { p } else { 2 * p + s };
                // Compact: the touched outputs only; else every output, the untouched ones clean.
                let (width, at) = if compact {
                    (outputs.len(), 0)
                } else {
                    (n_out, outputs.start)
                };
                target.resize(batch * width, 0.0);
                for ((row, z), b) in target
                    .chunks_exact_mut(width)
                    .zip(self.z0.chunks_exact(n_out))
                    .zip(0..)
                {
                    if !compact {
                        let untouched = (0..outputs.start).chain(outputs.end..n_out);
                        for o in untouched {
                            row[o] = if relu_now { z[o].max(0.0) } else { z[o] };
                        }
                    }
                    let product = &self.dz[(b * blocks + block) * kk..][..k];
                    let dz_row = product_over_outputs(product, dz_at, &mut dz_touched);
                    let touched = row[at..at + outputs.len()]
                        .iter_mut()
                        .zip(&z[outputs.clone()])
                        .zip(dz_row)
                        .zip(&bias_add);
                    match (linear, relu_now) {
                        (true, true) => touched.for_each(|(((a, z), d), vb)| {
                            *a = (z + sign * eps * (d + vb)).max(0.0)
                        }),
                        (true, false) => {
                            touched.for_each(|(((a, z), d), vb)| *a = z + sign * eps * (d + vb))
                        }
                        (false, true) => touched.for_each(|(((a, z), d), vb)| {
                            *a = (z + (d + sign * eps * vb)).max(0.0)
                        }),
                        (false, false) => {
                            touched.for_each(|(((a, z), d), vb)| *a = z + (d + sign * eps * vb))
                        }
                    }
                }
                if let Some(d) = stage {
                    d.output_stage(target);
                    target.iter_mut().for_each(|a| *a = a.max(0.0));
                }
            }
        }
        if device.is_none() {
            self.last_fast = Some((chunk, seeds.to_vec()));
        }
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

impl DenseLayer {
    /// After an update `W -= scale sum_p dd_p v_p` of the chunk just evaluated, `z0` moves by
    /// `-scale sum_p dd_p (x v_pᵀ)`, and every `x v_pᵀ` is in `dz` already: the clean
    /// pre-activation stays current without another product (equal to recomputing it up to
    /// float rounding; recomputed afresh for every batch).
    fn move_preactivation(&mut self, chunk: &Range<usize>, scale: f32, terms: &[UpdateTerm]) {
        let (n_in, n_out) = (self.n_in, self.n_out);
        let nw = n_out * n_in;
        let outputs = self.outputs_of(chunk);
        let rows = self.weight_rows_of(chunk);
        let kk = self.dz_rows;
        let p_count = terms.len();
        let weight_len = chunk.end.min(nw).saturating_sub(chunk.start.min(nw));
        let bias_part = chunk.start.max(nw) - nw..chunk.end.max(nw) - nw;
        let biases: Vec<&[f32]> = terms
            .iter()
            .map(|t| {
                &self
                    .directions
                    .get(t.seed, chunk.len())
                    .expect("evaluated just before")[weight_len..]
            })
            .collect();
        // Per touched output: the bias part of each direction and, per sample, the product's
        // values, each zero where it does not reach, so the loops below run branch-free.
        let len = outputs.len();
        let mut vb = vec![0f32; p_count * len];
        for (v, vb) in biases.iter().zip(vb.chunks_exact_mut(len)) {
            bias_over_outputs(v, &bias_part, &outputs, vb);
        }
        let at = rows.start.saturating_sub(outputs.start);
        let (mut g, mut padded) = (vec![0f32; len], vec![0f32; len]);
        for (b, z) in self.z0.chunks_exact_mut(n_out).enumerate() {
            g.fill(0.0);
            for (p, t) in terms.iter().enumerate() {
                let product = &self.dz[(b * p_count + p) * kk..][..rows.len()];
                let d = product_over_outputs(product, at, &mut padded);
                let vb = &vb[p * len..(p + 1) * len];
                for ((g, d), vb) in g.iter_mut().zip(d).zip(vb) {
                    *g += t.derivative * (d + vb);
                }
            }
            for (z, g) in z[outputs.clone()].iter_mut().zip(&g) {
                *z -= scale * g;
            }
        }
        self.last_fast = None;
    }
}

/// The bias part `v_bias` of a direction (over outputs `bias_part`) laid over the touched
/// `outputs` in `out`, zero where it does not reach (adding a zero leaves a value bit-identical).
fn bias_over_outputs(
    v_bias: &[f32],
    bias_part: &Range<usize>,
    outputs: &Range<usize>,
    out: &mut [f32],
) {
    for (o, b) in outputs.clone().zip(out.iter_mut()) {
        *b = if bias_part.contains(&o) {
            v_bias[o - bias_part.start]
        } else {
            0.0
        };
    }
}

/// One sample's product values for the rows of `W` a chunk covers, laid over its touched outputs
/// from position `at`, zero on the outputs only its bias reaches: the product itself where the
/// two are the same, else copied into `padded` (whose other values must be zero).
fn product_over_outputs<'a>(product: &'a [f32], at: usize, padded: &'a mut [f32]) -> &'a [f32] {
    if product.len() == padded.len() {
        return product;
    }
    padded[at..at + product.len()].copy_from_slice(product);
    padded
}

/// The form in which the fast path's products read a layer's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum InputForm {
    /// The dense rows, through `gemm` (the reference choreography, devices that draw noise).
    #[default]
    Dense,
    /// Sparse rows only, no dense copy (an ideal layer's input mostly one value).
    Sparse,
    /// The dense rows and a packed copy that every product of the batch reads.
    Packed,
}

/// A layer's cached input batch (batch x n_in) in the forms its products read.
#[derive(Debug, Default)]
struct LayerInput {
    /// Empty when the form is `Sparse`.
    dense: Vec<f32>,
    sparse: SparseRows,
    packed: PackedRows,
    form: InputForm,
    /// Scratch of the sparse products.
    panels: Packed,
}

impl LayerInput {
    /// After `dense` is loaded: the fast path reads sparse rows where the input is mostly one
    /// value (as a device converted it), else a copy packed once for the batch's products.
    fn choose_form(&mut self, fast: bool, batch: usize, n_in: usize) {
        self.form = if !fast {
            InputForm::Dense
        } else if (self.sparse).detect_into(&self.dense, batch, n_in, SPARSE_INPUT_DENSITY) {
            InputForm::Sparse
        } else {
            self.packed.pack(&self.dense, batch, n_in);
            InputForm::Packed
        };
    }

    /// `c [+]= x bᵀ` (batch x b.rows, row stride ldc).
    fn times_bt(
        &mut self,
        batch: usize,
        n_in: usize,
        b: View,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        match self.form {
            InputForm::Sparse => {
                sparse_gemm_bt(&self.sparse, b, c, ldc, accumulate, &mut self.panels)
            }
            InputForm::Packed => {
                assert_eq!(b.cols, n_in, "product: inner dimensions differ");
                packed_gemm_bt(&self.packed, b.data, b.rows, b.ld, c, ldc, accumulate)
            }
            InputForm::Dense => gemm_into(
                View::new(&self.dense, batch, n_in),
                b,
                true,
                c,
                ldc,
                accumulate,
            ),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> DenseLayer {
        let mut l = DenseLayer::new(6, 4);
        let p: Vec<f32> = (0..l.param_count())
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
            .collect();
        l.set_params(&p).unwrap();
        let x: Vec<f32> = (0..3 * 6)
            .map(|i| ((i * 5 % 7) as f32 - 3.0) / 3.0)
            .collect();
        l.load_input(&x).unwrap();
        l
    }

    #[test]
    fn forward_is_relu_of_affine_map() {
        let mut l = layer();
        let mut out = Vec::new();
        l.forward(&mut out).unwrap();
        let (w, b) = l.params().split_at(24);
        for s in 0..3 {
            for o in 0..4 {
                let z: f32 = (0..6)
                    .map(|i| l.input.dense[s * 6 + i] * w[o * 6 + i])
                    .sum::<f32>()
                    + b[o];
                assert!((out[s * 4 + o] - z.max(0.0)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn perturbed_evaluation_restores_parameters_bit_for_bit() {
        let mut l = layer();
        let before = l.params().to_vec();
        let mut out = Vec::new();
        let seeds = [DirectionSeed(1), DirectionSeed(2), DirectionSeed(3)];
        l.evaluate_perturbed(3..20, &seeds, 1e-3, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[0].0 != out[0].1, "perturbation changed nothing");
        assert_eq!(
            before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            l.params().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn cached_update_equals_the_protocol_update() {
        crate::physical::assert_cached_update_is_the_protocol_update(&mut layer(), 2..17);
    }

    #[test]
    fn a_sparse_input_is_dropped_when_the_choreography_leaves_the_fast_path() {
        let mut l = layer();
        // Mostly background: held as sparse rows only.
        let x: Vec<f32> = (0..3 * 6)
            .map(|i| if i % 6 == 2 { 0.5 } else { -0.4 })
            .collect();
        l.load_input(&x).unwrap();
        let mut fast = Vec::new();
        l.forward(&mut fast).unwrap();
        l.set_choreography(Choreography::Reference);
        assert_eq!(l.forward(&mut Vec::new()), Err(SimError::NoInput));
        l.load_input(&x).unwrap();
        let mut reference = Vec::new();
        l.forward(&mut reference).unwrap();
        for (a, b) in fast.iter().zip(&reference) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let mut l = DenseLayer::new(6, 4);
        assert_eq!(
            l.set_params(&[0.0; 3]),
            Err(SimError::ParameterCount {
                expected: 28,
                got: 3
            })
        );
        assert!(matches!(
            l.load_input(&[0.0; 7]),
            Err(SimError::InputShape { .. })
        ));
        assert_eq!(l.forward(&mut Vec::new()), Err(SimError::NoInput));
        assert!(matches!(
            l.apply_update(20..40, 1.0, &[]),
            Err(SimError::ChunkOutOfRange { .. })
        ));
    }
}

#[cfg(test)]
mod choreography_tests {
    use super::*;

    /// Trains a layer for a few chunked steps under one choreography; returns every
    /// evaluation's activations and the final parameters.
    fn run(choreography: Choreography, chunks: &[Range<usize>]) -> (Vec<Vec<f32>>, Vec<f32>) {
        let (n_in, n_out, batch) = (13, 7, 5);
        let mut l = DenseLayer::new(n_in, n_out);
        l.set_choreography(choreography);
        let p: Vec<f32> = (0..l.param_count())
            .map(|i| ((i * 29 % 31) as f32 - 15.0) / 40.0)
            .collect();
        l.set_params(&p).unwrap();
        let x: Vec<f32> = (0..batch * n_in)
            .map(|i| ((i * 11 % 19) as f32 - 9.0) / 9.0)
            .collect();
        l.load_input(&x).unwrap();
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (k, chunk) in chunks.iter().enumerate() {
            let seeds: Vec<_> = (0..3).map(|p| DirectionSeed((k * 10 + p) as u64)).collect();
            l.evaluate_perturbed(chunk.clone(), &seeds, 1e-2, &mut out)
                .unwrap();
            for (a, b) in &out {
                seen.push(a.clone());
                seen.push(b.clone());
            }
            let terms: Vec<_> = seeds
                .iter()
                .enumerate()
                .map(|(i, s)| UpdateTerm {
                    seed: *s,
                    derivative: i as f32 - 1.0,
                })
                .collect();
            l.apply_update(chunk.clone(), 0.05, &terms).unwrap();
            let mut clean = Vec::new();
            l.forward(&mut clean).unwrap();
            seen.push(clean);
        }
        (seen, l.params().to_vec())
    }

    #[test]
    fn fast_path_agrees_with_the_reference_choreography() {
        // Chunks that start and end mid-row, cover whole rows, and reach into the bias.
        let chunks = [0..98, 5..30, 26..39, 90..98, 85..93, 91..92];
        let (fast, fast_params) = run(Choreography::Fast, &chunks);
        let (reference, ref_params) = run(Choreography::Reference, &chunks);
        assert_eq!(fast.len(), reference.len());
        // The same update arithmetic runs on both, so parameters agree exactly; activations
        // differ only by the rounding of `w + eps v` (a few f32 ulps of values below 4).
        assert_eq!(fast_params, ref_params);
        for (a, b) in fast.iter().zip(&reference) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 2e-6, "{x} vs {y}");
            }
        }
    }
}
