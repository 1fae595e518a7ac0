//! A CNN block as a physical device would hold it (thesis section 4.1, Appendix A, Table 4):
//! Conv2d 3x3 (stride 1, padding 1) -> BatchNorm2d -> ReLU, whose ReLU output is
//!
//! - projected per output channel by a fixed random matrix `A_c` (d x HW, entries N(0, 1/HW),
//!   section 4.4 and Appendix B) into the block's goodness features (C*d per sample), and
//! - max-pooled 2x2 (stride 2) into the input of the next block.
//!
//! `A` is part of the block, not a trainable parameter: it lives on the device side, so only the
//! C*d features cross the link, never the C*H*W map.
//!
//! Parameters are flat in per-channel order: for each output channel its conv weights
//! (C_in x 3 x 3), conv bias, BatchNorm scale, BatchNorm shift (the layout of the golden
//! recordings), so a chunk of whole channels is one contiguous range.
//!
//! BatchNorm follows PyTorch's defaults: batch statistics in training with the running statistics
//! updated by momentum 0.1 (unbiased variance), running statistics in evaluation, eps 1e-5,
//! running mean 0 and variance 1 at the start. Only a clean training forward pass commits running
//! statistics; a perturbed evaluation leaves the parameters and the running statistics
//! bit-identical (thesis section 4.4, "Batch Normalization stability").
//!
//! Activations are kept channel-major internally (C x B x H x W), so a channel's BatchNorm,
//! ReLU and projection work on contiguous memory; inputs and pooled outputs are per sample in
//! NCHW order, as the host sends and expects them.

use std::ops::Range;

use firmware_protocol::direction::{direction_values, mix, step_with_vectors};
use firmware_protocol::{DirectionSeed, UpdateTerm};

mod kernels;
use crate::direction_cache::DirectionCache;
use crate::layer::SimulatedLayer;
use crate::matmul::{View, gemm_into};
use crate::{Choreography, SimError};
use kernels::{
    DIRECTIONS_AT_ONCE, bn_relu_pair, direction_contributions, dot_f64, perturbation_sums,
};

/// PyTorch's BatchNorm2d defaults.
pub const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;

use firmware_protocol::shape::{CONV_TAPS as TAPS, ForwardMode, LayerShape};
/// Separates projection seeds from every other use of a seed.
const PROJECTION_DOMAIN: u64 = 0x706E_6E2D_7072_6F6A; // "pnn-proj"
/// At most this many f32 of perturbed pre-activations are held at once by the fast path: the
/// directions of a chunk are fused into one product in groups that fit (32 MiB).
const FUSE_BUDGET: usize = 1 << 23;
/// The fast path works in tiles of whole samples, about this many columns (pre-activation
/// values per channel) each: a tile's perturbed maps and unfolded input stay in cache.
const TILE_COLUMNS: usize = 4096;
/// The second pass projects at least this many perturbed rows per product (per channel: 2P
/// maps of a tile's samples): smaller products spend much of their time packing `A_c`.
const PROJECTION_ROWS: usize = 256;
/// Kernels of at most this many taps (C_in*9) have the fast path recompute their directions'
/// contributions per tile rather than materialise them for the whole batch.
const RECOMPUTE_MAX_K: usize = 32;

pub use firmware_protocol::shape::ConvGeometry;

/// Separates the run seed's use for the blocks' projection seeds from every other use.
const BLOCK_PROJECTION_DOMAIN: u64 = 0x706E_6E2D_412D_6D61; // "pnn-A-ma"

/// The projection seed of CNN block `block` (0-based) of a run seeded `run_seed`: the one rule
/// the host's model (`pnn::model::ModelSpec`) and the emulator (`pnn-emulate --seed`) share, so
/// a device draws the very `A` the in-process simulator draws.
pub fn block_projection_seed(run_seed: u64, block: usize) -> u64 {
    mix(mix(run_seed ^ BLOCK_PROJECTION_DOMAIN).wrapping_add(block as u64))
}

/// The fixed projection of a block: for each output channel `c`, `A_c` (d x HW, row-major) with
/// entries `z / sqrt(HW)`, `z` the standard normal stream of
/// `firmware_protocol::direction::direction_values` under the channel's seed (thesis section 4.4,
/// Appendix B: variance 1/HW keeps the projected variance independent of the resolution). Being
/// the portable Gaussian stream, a device generates the same `A` from the seed, bit for bit.
pub fn projection_matrix(shape: &ConvGeometry) -> Vec<f32> {
    let hw = shape.spatial();
    let per_channel = shape.proj_dim * hw;
    let scale = (1.0 / (hw as f64).sqrt()) as f32;
    let base = mix(shape.projection_seed ^ PROJECTION_DOMAIN);
    let mut a = Vec::with_capacity(shape.out_channels * per_channel);
    for c in 0..shape.out_channels {
        let seed = DirectionSeed(mix(base.wrapping_add(c as u64)));
        a.extend(direction_values(seed, per_channel).map(|z| z * scale));
    }
    a
}

#[derive(Debug)]
pub struct ConvBlock {
    shape: ConvGeometry,
    params: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    /// `A` (C x d x HW); empty until the first evaluation needs it (drawn lazily, as the paper's
    /// blocks do once the spatial size is known).
    projection: Vec<f32>,
    input: Vec<f32>,
    batch: usize,
    directions: DirectionCache,
    choreography: Choreography,
    /// The unfolded input and its transpose, each with its validity.
    unfolded: Unfolded,
    /// The clean pass's cached results, each channel with its staleness.
    clean: Clean,
    /// The fast path's buffers and what the next update may reuse.
    fast: FastWork,
    /// Scratch of the reference choreography and the clean pass.
    scratch: Scratch,
}

/// The input batch unfolded for the 3x3 convolution, in the forms the paths read, each with
/// whether it is the current batch's (rebuilt lazily after `load_input`).
#[derive(Debug, Default)]
struct Unfolded {
    /// The input unfolded for the convolution (im2col): (B*HW) x (C_in*9).
    cols: Vec<f32>,
    cols_ready: bool,
    /// One sample's input with a zero border (C_in x (H+2) x (W+2)), unfolded into `cols`.
    padded: Vec<f32>,
    /// The unfolded input transposed (C_in*9 x B*HW, rows padded), for the taps path (the
    /// fast path of a small kernel), and whether `tap_sum` and `tap_gram` are its current ones.
    cols_t: Vec<f32>,
    cols_t_ready: bool,
    gram_ready: bool,
    /// For the taps path: the transposed unfolded input's row sums and Gram matrix (f64).
    tap_sum: Vec<f64>,
    tap_gram: Vec<f64>,
}

/// The clean pass cached between evaluations: pre-activation, its statistics and the features,
/// each channel with whether it is stale (parameters, input or projection changed).
#[derive(Debug, Default)]
struct Clean {
    /// The clean pre-activation (conv + bias), C x (B*HW), and which channels of it are stale.
    z0: Vec<f32>,
    z_stale: Vec<bool>,
    /// Each channel's batch mean and biased variance of `z0`.
    z0_stats: Vec<(f64, f64)>,
    /// The clean training-mode features (B x C*d), and which channels of them are stale.
    feat0: Vec<f32>,
    feat_stale: Vec<bool>,
    /// The ReLU output of the last clean forward pass, C x (B*HW).
    relu: Vec<f32>,
}

/// The fast path's workspace: stacked directions, their products and moments, and what an
/// update may reuse of the last evaluation.
#[derive(Debug, Default)]
struct FastWork {
    /// A chunk's P directions laid out per touched channel: P x k x channel_params, zero where
    /// the chunk does not reach.
    stacked: Vec<f32>,
    /// The products of the fast path for a large kernel: from row `dz_at / N` on, each
    /// direction's contribution `dz = v ⊛ x` to each touched channel (row `q * touched + j`).
    dz_rows: Vec<f32>,
    dz_at: usize,
    /// The touched channels' conv weights followed by the directions', for that product.
    fused_weights: Vec<f32>,
    /// The taps path's dz of up to four directions over a tile of pass 2.
    dz_tile: Vec<f32>,
    f_scratch: Vec<f32>,
    /// Per (touched channel, direction): the moments of dz, and the BatchNorm affine of each
    /// sign.
    sums: Vec<[f64; 3]>,
    affines: Vec<[(f32, f32); 2]>,
    /// Kernels of at most this many taps have their directions' contributions recomputed per
    /// tile by the fast path (RECOMPUTE_MAX_K; tests lower it to cover the other strategy).
    recompute_max_k: usize,
    g_scratch: Vec<f32>,
    /// Set by a fast evaluation that left every direction's `dz` in `dz_rows`; taken by the
    /// update that follows.
    contributions: Option<Contributions>,
    /// Whether the last fast evaluation left every direction's `dz` in `dz_rows`.
    dz_complete: bool,
}

/// Buffers of the reference choreography and the clean pass, kept between calls.
#[derive(Debug, Default)]
struct Scratch {
    saved: Vec<f32>,
    saved_stats: (Vec<f32>, Vec<f32>),
    z_scratch: Vec<f32>,
    y_scratch: Vec<f32>,
}

/// The last fast perturbed evaluation whose directions' contributions `dz` are all still in
/// `FastWork::dz_rows` (rows `q * touched + j`), computed around the current clean pre-activation:
/// the update that follows along those seeds moves the pre-activation by a combination of them.
#[derive(Debug)]
struct Contributions {
    chunk: Range<usize>,
    seeds: Vec<DirectionSeed>,
}

/// What a perturbed evaluation works on: the chunk, the channels it touches, and where the
/// directions sit in `stacked`.
struct Perturbation {
    chunk: Range<usize>,
    channels: Range<usize>,
    /// Offset of the chunk's first parameter within the first touched channel.
    offset: usize,
    count: usize,
}

impl ConvBlock {
    /// A block with all parameters zero and fresh running statistics (mean 0, variance 1);
    /// program it with [`ConvBlock::set_params`]. Panics on a shape [`ConvGeometry::check`] refuses
    /// (shapes come from the model, which checks them first).
    pub fn new(shape: ConvGeometry) -> Self {
        if let Err(e) = shape.check() {
            panic!("{e}");
        }
        let c = shape.out_channels;
        Self {
            shape,
            params: vec![0.0; shape.param_count()],
            running_mean: vec![0.0; c],
            running_var: vec![1.0; c],
            projection: Vec::new(),
            input: Vec::new(),
            batch: 0,
            directions: DirectionCache::default(),
            choreography: Choreography::default(),
            unfolded: Unfolded::default(),
            clean: Clean {
                z_stale: vec![true; c],
                z0_stats: vec![(0.0, 0.0); c],
                feat_stale: vec![true; c],
                ..Default::default()
            },
            fast: FastWork {
                recompute_max_k: RECOMPUTE_MAX_K,
                ..Default::default()
            },
            scratch: Scratch::default(),
        }
    }

    pub fn shape(&self) -> &ConvGeometry {
        &self.shape
    }

    pub fn set_choreography(&mut self, choreography: Choreography) {
        self.choreography = choreography;
    }

    pub fn choreography(&self) -> Choreography {
        self.choreography
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
        self.mark_stale(0..self.shape.out_channels);
        Ok(())
    }

    pub fn running_mean(&self) -> &[f32] {
        &self.running_mean
    }

    pub fn running_var(&self) -> &[f32] {
        &self.running_var
    }

    /// Programs the BatchNorm running statistics (one value per output channel each).
    pub fn set_running_stats(&mut self, mean: &[f32], var: &[f32]) -> Result<(), SimError> {
        let c = self.shape.out_channels;
        for (what, got) in [
            ("running mean", mean.len()),
            ("running variance", var.len()),
        ] {
            if got != c {
                return Err(SimError::BufferLength {
                    what,
                    expected: c,
                    got,
                });
            }
        }
        self.running_mean.copy_from_slice(mean);
        self.running_var.copy_from_slice(var);
        Ok(())
    }

    /// The fixed projection `A` (C x d x HW), drawing it from its seed if no evaluation has yet.
    pub fn projection(&mut self) -> &[f32] {
        self.ensure_projection();
        &self.projection
    }

    /// Replaces the fixed projection (C x d x HW), e.g. with one recorded elsewhere.
    pub fn set_projection(&mut self, a: &[f32]) -> Result<(), SimError> {
        let expected = self.shape.out_channels * self.shape.proj_dim * self.shape.spatial();
        if a.len() != expected {
            return Err(SimError::BufferLength {
                what: "projection",
                expected,
                got: a.len(),
            });
        }
        self.projection.clear();
        self.projection.extend_from_slice(a);
        self.clean.feat_stale.iter_mut().for_each(|s| *s = true);
        Ok(())
    }

    /// Caches a batch of inputs (batch x C_in*H*W, each sample NCHW) for the evaluations that
    /// follow.
    pub fn load_input(&mut self, x: &[f32]) -> Result<(), SimError> {
        let width = self.shape.input_width();
        if x.is_empty() || !x.len().is_multiple_of(width) {
            return Err(SimError::InputShape {
                width,
                got: x.len(),
            });
        }
        self.input.clear();
        self.input.extend_from_slice(x);
        self.batch = x.len() / width;
        self.unfolded.cols_ready = false;
        self.unfolded.cols_t_ready = false;
        self.mark_stale(0..self.shape.out_channels);
        Ok(())
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The ReLU output of the last clean forward pass (C x B x H x W, channel-major), which the
    /// projection and the pooling read.
    pub fn relu_output(&self) -> &[f32] {
        &self.clean.relu
    }

    /// The clean forward pass on the cached input: `features` (batch x C*d) are the projected
    /// ReLU output, `next` (batch x C*H/2*W/2) the pooled one. In [`ForwardMode::Train`] BatchNorm
    /// normalises with the batch's statistics and commits them to the running statistics.
    pub fn forward(
        &mut self,
        mode: ForwardMode,
        features: &mut Vec<f32>,
        next: &mut Vec<f32>,
    ) -> Result<(), SimError> {
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        self.ensure_projection();
        self.refresh_preactivation();
        let n = self.columns();
        let (c_out, cp, k) = (
            self.shape.out_channels,
            self.shape.channel_params(),
            self.shape.kernel_len(),
        );
        self.clean.relu.resize(c_out * n, 0.0);
        features.clear();
        features.resize(self.batch * self.shape.feature_width(), 0.0);
        for c in 0..c_out {
            let z = &self.clean.z0[c * n..(c + 1) * n];
            let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
            let y = &mut self.clean.relu[c * n..(c + 1) * n];
            match mode {
                ForwardMode::Train => {
                    let (mean, var) = self.clean.z0_stats[c];
                    bn_relu(z, mean, var, gamma, beta, y);
                    // PyTorch: running = (1 - momentum) running + momentum batch, with the
                    // unbiased variance.
                    let unbiased = var * n as f64 / (n - 1) as f64;
                    let (rm, rv) = (&mut self.running_mean[c], &mut self.running_var[c]);
                    *rm = ((1.0 - BN_MOMENTUM) * *rm as f64 + BN_MOMENTUM * mean) as f32;
                    *rv = ((1.0 - BN_MOMENTUM) * *rv as f64 + BN_MOMENTUM * unbiased) as f32;
                }
                ForwardMode::Eval => {
                    let (mean, var) = (self.running_mean[c] as f64, self.running_var[c] as f64);
                    bn_relu(z, mean, var, gamma, beta, y);
                }
            }
            project_channel(&self.shape, &self.projection, c, self.batch, y, features);
        }
        if mode == ForwardMode::Train {
            // These are the clean training features the fast path perturbs around.
            self.clean.feat0.clone_from(features);
            self.clean.feat_stale.iter_mut().for_each(|s| *s = false);
        }
        max_pool(&self.shape, self.batch, &self.clean.relu, next);
        Ok(())
    }

    /// Algorithm 1, lines 6-9, for each seed: the features under `W + eps v` and `W - eps v`
    /// (training-mode BatchNorm, as in the paper), `v` the normalised direction over `chunk`.
    /// Leaves the parameters and the running statistics bit-identical. Returns `(a+, a-)` per
    /// seed in `out`, each batch x C*d.
    pub fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), SimError> {
        self.check_chunk(&chunk)?;
        self.directions.prepare(seeds, chunk.len());
        let directions = std::mem::take(&mut self.directions);
        let len = chunk.len();
        let vectors = seeds
            .iter()
            .map(|s| directions.get(*s, len).expect("prepared just above"));
        let result = self.evaluate_perturbed_vectors(chunk.clone(), vectors, eps, out);
        self.directions = directions;
        if result.is_ok() && self.fast.dz_complete {
            self.fast.contributions = Some(Contributions {
                chunk,
                seeds: seeds.to_vec(),
            });
        }
        result
    }

    /// [`ConvBlock::evaluate_perturbed`] along directions given as vectors (each as long as the
    /// chunk), e.g. directions recorded by another implementation.
    pub fn evaluate_perturbed_vectors<'a>(
        &mut self,
        chunk: Range<usize>,
        vectors: impl IntoIterator<Item = &'a [f32]>,
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), SimError> {
        self.check_chunk(&chunk)?;
        self.fast.contributions = None;
        self.fast.dz_complete = false;
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        let perturbation = self.stack_directions(chunk, vectors)?;
        out.resize_with(perturbation.count, Default::default);
        if perturbation.count == 0 {
            return Ok(());
        }
        self.ensure_projection();
        match self.choreography {
            Choreography::Fast => self.perturbed_fast(&perturbation, eps, out),
            Choreography::Reference => self.perturbed_reference(&perturbation, eps, out),
        }
        Ok(())
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
        self.fast.g_scratch.resize(len, 0.0);
        let directions = &self.directions;
        let vectors = terms.iter().map(|t| {
            let v = directions.get(t.seed, len).expect("ensured above");
            (t.derivative, v)
        });
        let channels = self.channels_of(&chunk);
        step_with_vectors(
            &mut self.params[chunk.clone()],
            scale,
            vectors,
            &mut self.fast.g_scratch,
        );
        match self.fast.contributions.take() {
            Some(c) if c.chunk == chunk => self.move_preactivation(&chunk, &c.seeds, scale, terms),
            _ => self.mark_stale(channels),
        }
        Ok(())
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

    /// B*HW: the columns of the unfolded input and of a channel's pre-activation.
    fn columns(&self) -> usize {
        self.batch * self.shape.spatial()
    }

    /// The output channels whose parameters intersect `chunk`.
    fn channels_of(&self, chunk: &Range<usize>) -> Range<usize> {
        let cp = self.shape.channel_params();
        chunk.start / cp..chunk.end.div_ceil(cp)
    }

    fn mark_stale(&mut self, channels: Range<usize>) {
        self.fast.contributions = None;
        self.clean.z_stale[channels.clone()]
            .iter_mut()
            .for_each(|s| *s = true);
        self.clean.feat_stale[channels]
            .iter_mut()
            .for_each(|s| *s = true);
    }

    fn ensure_projection(&mut self) {
        if self.projection.is_empty() {
            self.projection = projection_matrix(&self.shape);
        }
    }

    /// Brings the cached clean pre-activation up to date (its stale channels only).
    fn refresh_preactivation(&mut self) {
        if self.taps_path() {
            return self.preactivation_by_taps();
        }
        self.ensure_cols();
        let n = self.columns();
        self.clean.z0.resize(self.shape.out_channels * n, 0.0);
        let mut c = 0;
        while c < self.shape.out_channels {
            if !self.clean.z_stale[c] {
                c += 1;
                continue;
            }
            let start = c;
            while c < self.shape.out_channels && self.clean.z_stale[c] {
                self.clean.z_stale[c] = false;
                c += 1;
            }
            convolve(
                &self.shape,
                &self.params,
                start..c,
                &self.unfolded.cols,
                n,
                &mut self.clean.z0[start * n..c * n],
            );
            for j in start..c {
                self.clean.z0_stats[j] = batch_stats(&self.clean.z0[j * n..(j + 1) * n]);
            }
        }
    }

    /// Brings the cached clean training features up to date, except in `skip` (the channels a
    /// perturbation is about to overwrite).
    fn refresh_features(&mut self, skip: &Range<usize>) {
        let n = self.columns();
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        self.clean
            .feat0
            .resize(self.batch * self.shape.feature_width(), 0.0);
        for c in 0..self.shape.out_channels {
            if !self.clean.feat_stale[c] || skip.contains(&c) {
                continue;
            }
            let z = &self.clean.z0[c * n..(c + 1) * n];
            let (mean, var) = self.clean.z0_stats[c];
            self.scratch.y_scratch.resize(n, 0.0);
            let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
            bn_relu(z, mean, var, gamma, beta, &mut self.scratch.y_scratch);
            project_channel(
                &self.shape,
                &self.projection,
                c,
                self.batch,
                &self.scratch.y_scratch,
                &mut self.clean.feat0,
            );
            self.clean.feat_stale[c] = false;
        }
    }
}

impl SimulatedLayer for ConvBlock {
    fn shape(&self) -> LayerShape {
        LayerShape::Conv(self.shape)
    }
    fn params(&self) -> &[f32] {
        &self.params
    }
    fn set_params(&mut self, params: &[f32]) -> Result<(), SimError> {
        ConvBlock::set_params(self, params)
    }
    fn load_input(&mut self, x: &[f32]) -> Result<(), SimError> {
        ConvBlock::load_input(self, x)
    }
    fn batch(&self) -> usize {
        self.batch
    }
    fn forward(
        &mut self,
        mode: ForwardMode,
        features: &mut Vec<f32>,
        next: &mut Vec<f32>,
    ) -> Result<(), SimError> {
        ConvBlock::forward(self, mode, features, next)
    }
    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), SimError> {
        ConvBlock::evaluate_perturbed(self, chunk, seeds, eps, out)
    }
    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), SimError> {
        ConvBlock::apply_update(self, chunk, scale, terms)
    }
    /// The BatchNorm running means, then the running variances.
    fn layer_state(&self) -> Vec<f32> {
        [&self.running_mean[..], &self.running_var[..]].concat()
    }
    fn set_layer_state(&mut self, state: &[f32]) -> Result<(), SimError> {
        let c = self.shape.out_channels;
        if state.len() != 2 * c {
            return Err(SimError::BufferLength {
                what: "BatchNorm state (running means, then variances)",
                expected: 2 * c,
                got: state.len(),
            });
        }
        let (mean, var) = state.split_at(c);
        self.set_running_stats(mean, var)
    }
    fn choreography(&self) -> Choreography {
        self.choreography
    }
    fn set_choreography(&mut self, choreography: Choreography) {
        self.choreography = choreography;
    }
    /// Zero parameters, running mean 0 and variance 1, no input.
    fn power_on(&mut self) {
        let choreography = self.choreography;
        *self = Self::new(self.shape);
        self.choreography = choreography;
    }
    fn as_conv(&self) -> Option<&ConvBlock> {
        Some(self)
    }
    fn as_conv_mut(&mut self) -> Option<&mut ConvBlock> {
        Some(self)
    }
}

mod fast;
mod reference;
mod stages;
#[cfg(test)]
mod tests;
mod unfold;

use stages::*;
use unfold::cols_t_stride;
