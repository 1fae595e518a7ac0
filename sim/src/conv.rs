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

use crate::dense::{Choreography, SimError};
use crate::direction_cache::DirectionCache;
use crate::matmul::{View, gemm_into};

/// PyTorch's BatchNorm2d defaults.
pub const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;
/// Taps of the 3x3 kernel.
const TAPS: usize = 9;
/// Separates projection seeds from every other use of a seed.
const PROJECTION_DOMAIN: u64 = 0x706E_6E2D_7072_6F6A; // "pnn-proj"
/// At most this many f32 of perturbed pre-activations are held at once by the fast path: the
/// directions of a chunk are fused into one product in groups that fit (32 MiB).
const FUSE_BUDGET: usize = 1 << 23;

/// The shape of a block and the seed of its fixed projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Spatial size of the input (and of the ReLU output, padding 1 keeps it).
    pub height: usize,
    pub width: usize,
    /// d: projected features per output channel.
    pub proj_dim: usize,
    /// Names the fixed projection `A` (see [`projection_matrix`]).
    pub projection_seed: u64,
}

impl ConvShape {
    /// Refuses shapes a block cannot have: empty dimensions, or a map too small to pool.
    pub fn check(&self) -> Result<(), String> {
        if self.in_channels == 0 || self.out_channels == 0 || self.proj_dim == 0 {
            return Err(format!(
                "a conv block needs at least one input channel, output channel and projected \
                 feature, got {} -> {} channels, d = {}",
                self.in_channels, self.out_channels, self.proj_dim
            ));
        }
        if self.height < 2 || self.width < 2 {
            return Err(format!(
                "a conv block's input must be at least 2x2 to be max-pooled, got {}x{}",
                self.height, self.width
            ));
        }
        Ok(())
    }

    /// Conv weights per output channel (C_in x 3 x 3).
    pub fn kernel_len(&self) -> usize {
        self.in_channels * TAPS
    }

    /// Parameters per output channel: conv weights, conv bias, BatchNorm scale and shift.
    pub fn channel_params(&self) -> usize {
        self.kernel_len() + 3
    }

    pub fn param_count(&self) -> usize {
        self.out_channels * self.channel_params()
    }

    /// H*W of the map that is projected (before pooling).
    pub fn spatial(&self) -> usize {
        self.height * self.width
    }

    pub fn input_width(&self) -> usize {
        self.in_channels * self.spatial()
    }

    /// C*d goodness features per sample.
    pub fn feature_width(&self) -> usize {
        self.out_channels * self.proj_dim
    }

    /// (H/2, W/2), rounded down as `MaxPool2d(2, 2)` does.
    pub fn pooled(&self) -> (usize, usize) {
        (self.height / 2, self.width / 2)
    }

    /// Values per sample passed to the next block (C x H/2 x W/2).
    pub fn output_width(&self) -> usize {
        let (ph, pw) = self.pooled();
        self.out_channels * ph * pw
    }
}

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
pub fn projection_matrix(shape: &ConvShape) -> Vec<f32> {
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

/// Whether BatchNorm normalises with the batch's statistics (and a clean pass commits them to the
/// running statistics) or with the running statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    Train,
    Eval,
}

#[derive(Debug)]
pub struct ConvBlock {
    shape: ConvShape,
    params: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    /// `A` (C x d x HW); empty until the first evaluation needs it (drawn lazily, as the paper's
    /// blocks do once the spatial size is known).
    projection: Vec<f32>,
    input: Vec<f32>,
    batch: usize,
    /// The input unfolded for the convolution (im2col): (B*HW) x (C_in*9).
    cols: Vec<f32>,
    cols_ready: bool,
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
    directions: DirectionCache,
    /// A chunk's P directions laid out per touched channel: P x k x channel_params, zero where
    /// the chunk does not reach.
    stacked: Vec<f32>,
    saved: Vec<f32>,
    saved_stats: (Vec<f32>, Vec<f32>),
    z_scratch: Vec<f32>,
    y_scratch: Vec<f32>,
    dz: Vec<f32>,
    g_scratch: Vec<f32>,
    choreography: Choreography,
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
    /// program it with [`ConvBlock::set_params`]. Panics on a shape [`ConvShape::check`] refuses
    /// (shapes come from the model, which checks them first).
    pub fn new(shape: ConvShape) -> Self {
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
            cols: Vec::new(),
            cols_ready: false,
            z0: Vec::new(),
            z_stale: vec![true; c],
            z0_stats: vec![(0.0, 0.0); c],
            feat0: Vec::new(),
            feat_stale: vec![true; c],
            relu: Vec::new(),
            directions: DirectionCache::default(),
            stacked: Vec::new(),
            saved: Vec::new(),
            saved_stats: (Vec::new(), Vec::new()),
            z_scratch: Vec::new(),
            y_scratch: Vec::new(),
            dz: Vec::new(),
            g_scratch: Vec::new(),
            choreography: Choreography::default(),
        }
    }

    pub fn shape(&self) -> &ConvShape {
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
        self.feat_stale.iter_mut().for_each(|s| *s = true);
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
        self.cols_ready = false;
        self.mark_stale(0..self.shape.out_channels);
        Ok(())
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The ReLU output of the last clean forward pass (C x B x H x W, channel-major), which the
    /// projection and the pooling read.
    pub fn relu_output(&self) -> &[f32] {
        &self.relu
    }

    /// The clean forward pass on the cached input: `features` (batch x C*d) are the projected
    /// ReLU output, `next` (batch x C*H/2*W/2) the pooled one. In [`BnMode::Train`] BatchNorm
    /// normalises with the batch's statistics and commits them to the running statistics.
    pub fn forward(
        &mut self,
        mode: BnMode,
        features: &mut Vec<f32>,
        next: &mut Vec<f32>,
    ) -> Result<(), SimError> {
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        self.ensure_projection();
        self.ensure_cols();
        self.refresh_preactivation();
        let n = self.columns();
        let (c_out, cp, k) = (
            self.shape.out_channels,
            self.shape.channel_params(),
            self.shape.kernel_len(),
        );
        self.relu.resize(c_out * n, 0.0);
        features.clear();
        features.resize(self.batch * self.shape.feature_width(), 0.0);
        for c in 0..c_out {
            let z = &self.z0[c * n..(c + 1) * n];
            let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
            let y = &mut self.relu[c * n..(c + 1) * n];
            match mode {
                BnMode::Train => {
                    let (mean, var) = self.z0_stats[c];
                    bn_relu(z, mean, var, gamma, beta, y);
                    // PyTorch: running = (1 - momentum) running + momentum batch, with the
                    // unbiased variance.
                    let unbiased = var * n as f64 / (n - 1) as f64;
                    let (rm, rv) = (&mut self.running_mean[c], &mut self.running_var[c]);
                    *rm = ((1.0 - BN_MOMENTUM) * *rm as f64 + BN_MOMENTUM * mean) as f32;
                    *rv = ((1.0 - BN_MOMENTUM) * *rv as f64 + BN_MOMENTUM * unbiased) as f32;
                }
                BnMode::Eval => {
                    let (mean, var) = (self.running_mean[c] as f64, self.running_var[c] as f64);
                    bn_relu(z, mean, var, gamma, beta, y);
                }
            }
            project_channel(&self.shape, &self.projection, c, self.batch, y, features);
        }
        if mode == BnMode::Train {
            // These are the clean training features the fast path perturbs around.
            self.feat0.clone_from(features);
            self.feat_stale.iter_mut().for_each(|s| *s = false);
        }
        max_pool(&self.shape, self.batch, &self.relu, next);
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
        let result = self.evaluate_perturbed_vectors(chunk, vectors, eps, out);
        self.directions = directions;
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
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        let perturbation = self.stack_directions(chunk, vectors)?;
        out.resize_with(perturbation.count, Default::default);
        if perturbation.count == 0 {
            return Ok(());
        }
        self.ensure_projection();
        self.ensure_cols();
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
        self.g_scratch.resize(len, 0.0);
        let directions = &self.directions;
        let vectors = terms.iter().map(|t| {
            let v = directions.get(t.seed, len).expect("ensured above");
            (t.derivative, v)
        });
        let channels = self.channels_of(&chunk);
        step_with_vectors(&mut self.params[chunk], scale, vectors, &mut self.g_scratch);
        self.mark_stale(channels);
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
        self.z_stale[channels.clone()]
            .iter_mut()
            .for_each(|s| *s = true);
        self.feat_stale[channels].iter_mut().for_each(|s| *s = true);
    }

    fn ensure_projection(&mut self) {
        if self.projection.is_empty() {
            self.projection = projection_matrix(&self.shape);
        }
    }

    /// Unfolds the input for a 3x3 convolution with padding 1 (im2col): row `b*HW + h*W + w`,
    /// column `ci*9 + kh*3 + kw` holds `x[b, ci, h + kh - 1, w + kw - 1]`, or 0 outside the
    /// image. (This layout, with the products taken as `W · colsᵀ`, measured twice as fast as
    /// its transpose for the MNIST CNN's second block, with bit-identical results.)
    fn ensure_cols(&mut self) {
        if self.cols_ready {
            return;
        }
        let ConvShape {
            in_channels,
            height,
            width,
            ..
        } = self.shape;
        let (hw, k) = (self.shape.spatial(), self.shape.kernel_len());
        self.cols.clear();
        self.cols.resize(self.columns() * k, 0.0);
        for (b, sample) in self.cols.chunks_exact_mut(hw * k).enumerate() {
            let image = &self.input[b * in_channels * hw..][..in_channels * hw];
            for h in 0..height {
                let rows = &mut sample[h * width * k..][..width * k];
                for ci in 0..in_channels {
                    for dh in 0..3 {
                        let Some(src_h) = (h + dh).checked_sub(1).filter(|&r| r < height) else {
                            continue; // stays zero: padding
                        };
                        let src = &image[(ci * height + src_h) * width..][..width];
                        let tap = ci * TAPS + dh * 3;
                        for (w, row) in rows.chunks_exact_mut(k).enumerate() {
                            let dst = &mut row[tap..tap + 3];
                            if w > 0 {
                                dst[0] = src[w - 1];
                            }
                            dst[1] = src[w];
                            if w + 1 < width {
                                dst[2] = src[w + 1];
                            }
                        }
                    }
                }
            }
        }
        self.cols_ready = true;
    }

    /// Brings the cached clean pre-activation up to date (its stale channels only).
    fn refresh_preactivation(&mut self) {
        let n = self.columns();
        self.z0.resize(self.shape.out_channels * n, 0.0);
        let mut c = 0;
        while c < self.shape.out_channels {
            if !self.z_stale[c] {
                c += 1;
                continue;
            }
            let start = c;
            while c < self.shape.out_channels && self.z_stale[c] {
                self.z_stale[c] = false;
                c += 1;
            }
            convolve(
                &self.shape,
                &self.params,
                start..c,
                &self.cols,
                n,
                &mut self.z0[start * n..c * n],
            );
            for j in start..c {
                self.z0_stats[j] = batch_stats(&self.z0[j * n..(j + 1) * n]);
            }
        }
    }

    /// Brings the cached clean training features up to date, except in `skip` (the channels a
    /// perturbation is about to overwrite).
    fn refresh_features(&mut self, skip: &Range<usize>) {
        let n = self.columns();
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        self.feat0
            .resize(self.batch * self.shape.feature_width(), 0.0);
        for c in 0..self.shape.out_channels {
            if !self.feat_stale[c] || skip.contains(&c) {
                continue;
            }
            let z = &self.z0[c * n..(c + 1) * n];
            let (mean, var) = self.z0_stats[c];
            self.y_scratch.resize(n, 0.0);
            let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
            bn_relu(z, mean, var, gamma, beta, &mut self.y_scratch);
            project_channel(
                &self.shape,
                &self.projection,
                c,
                self.batch,
                &self.y_scratch,
                &mut self.feat0,
            );
            self.feat_stale[c] = false;
        }
    }

    /// Lays the directions out per touched channel (P x k x channel_params, zero where the chunk
    /// does not reach), so the fast path multiplies them as one matrix and both paths read the
    /// BatchNorm parts at fixed offsets.
    fn stack_directions<'a>(
        &mut self,
        chunk: Range<usize>,
        vectors: impl IntoIterator<Item = &'a [f32]>,
    ) -> Result<Perturbation, SimError> {
        let cp = self.shape.channel_params();
        let channels = self.channels_of(&chunk);
        let block = channels.len() * cp;
        let offset = chunk.start - channels.start * cp;
        self.stacked.clear();
        let mut count = 0;
        for v in vectors {
            if v.len() != chunk.len() {
                return Err(SimError::BufferLength {
                    what: "direction",
                    expected: chunk.len(),
                    got: v.len(),
                });
            }
            self.stacked.resize((count + 1) * block, 0.0);
            self.stacked[count * block + offset..][..v.len()].copy_from_slice(v);
            count += 1;
        }
        Ok(Perturbation {
            chunk,
            channels,
            offset,
            count,
        })
    }

    /// The literal choreography of Algorithm 1 and section 4.4: snapshot the running
    /// statistics, perturb the chunk by `+eps v`, run the whole training-mode forward pass
    /// (which updates the running statistics, as a PyTorch module would), by `-eps v`, again,
    /// then restore the chunk and the running statistics from their copies (bit-identical, where
    /// adding `+eps, -2eps, +eps` would not be).
    fn perturbed_reference(
        &mut self,
        perturbation: &Perturbation,
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
    ) {
        let Perturbation {
            chunk,
            channels,
            offset,
            ..
        } = perturbation;
        let block = channels.len() * self.shape.channel_params();
        let n = self.columns();
        let c_out = self.shape.out_channels;
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        self.saved.clear();
        self.saved.extend_from_slice(&self.params[chunk.clone()]);
        self.saved_stats = (self.running_mean.clone(), self.running_var.clone());
        for (p, (plus, minus)) in out.iter_mut().enumerate() {
            let v = &self.stacked[p * block + offset..][..chunk.len()];
            for (sign, target) in [(1.0f32, &mut *plus), (-1.0, &mut *minus)] {
                for ((w, w0), vi) in self.params[chunk.clone()]
                    .iter_mut()
                    .zip(&self.saved)
                    .zip(v)
                {
                    *w = w0 + sign * eps * vi;
                }
                self.z_scratch.resize(c_out * n, 0.0);
                convolve(
                    &self.shape,
                    &self.params,
                    0..c_out,
                    &self.cols,
                    n,
                    &mut self.z_scratch,
                );
                target.clear();
                target.resize(self.batch * self.shape.feature_width(), 0.0);
                self.y_scratch.resize(n, 0.0);
                for c in 0..c_out {
                    let z = &self.z_scratch[c * n..(c + 1) * n];
                    let (mean, var) = batch_stats(z);
                    let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
                    bn_relu(z, mean, var, gamma, beta, &mut self.y_scratch);
                    let unbiased = var * n as f64 / (n - 1) as f64;
                    let (rm, rv) = (&mut self.running_mean[c], &mut self.running_var[c]);
                    *rm = ((1.0 - BN_MOMENTUM) * *rm as f64 + BN_MOMENTUM * mean) as f32;
                    *rv = ((1.0 - BN_MOMENTUM) * *rv as f64 + BN_MOMENTUM * unbiased) as f32;
                    project_channel(
                        &self.shape,
                        &self.projection,
                        c,
                        self.batch,
                        &self.y_scratch,
                        target,
                    );
                }
            }
            self.params[chunk.clone()].copy_from_slice(&self.saved);
        }
        self.running_mean.copy_from_slice(&self.saved_stats.0);
        self.running_var.copy_from_slice(&self.saved_stats.1);
    }

    /// The exact fast path; the parameters and running statistics are never written. The
    /// pre-activation is linear in the conv weights and bias, `z(W ± eps v) = z0 ± eps (v ⊛ x +
    /// v_b)`, so only the touched channels' contribution is computed per direction (the P
    /// directions fused into one product), and only the touched channels' BatchNorm, ReLU and
    /// projection are recomputed: the other channels' features are the clean ones. Exact up to
    /// float rounding (the reference choreography rounds `w + eps v` first); the test
    /// `fast_path_agrees_with_the_reference_choreography` holds the two together.
    fn perturbed_fast(
        &mut self,
        perturbation: &Perturbation,
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
    ) {
        let Perturbation {
            channels, count, ..
        } = perturbation;
        self.refresh_preactivation();
        self.refresh_features(channels);
        let n = self.columns();
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        let touched = channels.len();
        let block = touched * cp;
        let group = (FUSE_BUDGET / (touched * n)).clamp(1, *count);
        for first in (0..*count).step_by(group) {
            let in_group = group.min(count - first);
            // dz (in_group*touched x N) = V · colsᵀ, V the directions' conv-weight parts.
            self.dz.resize(in_group * touched * n, 0.0);
            let weights = View {
                data: &self.stacked[first * block..],
                rows: in_group * touched,
                cols: k,
                ld: cp,
            };
            gemm_into(
                weights,
                View::new(&self.cols, n, k),
                true,
                &mut self.dz,
                n,
                false,
            );
            for q in 0..in_group {
                let p = first + q;
                let (plus, minus) = &mut out[p];
                plus.clone_from(&self.feat0);
                minus.clone_from(&self.feat0);
                for (j, c) in channels.clone().enumerate() {
                    let v = &self.stacked[p * block + j * cp..][..cp];
                    let (vb, vg, vs) = (v[k], v[k + 1], v[k + 2]);
                    let z0 = &self.z0[c * n..(c + 1) * n];
                    let dz = &self.dz[(q * touched + j) * n..][..n];
                    let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
                    // The batch statistics of z0 + s (dz + v_b) follow from those of z0 and
                    // the moments of dz, shared by both signs: one pass instead of two per sign.
                    let (mean0, var0) = self.z0_stats[c];
                    let (mean_dz, var_dz, cov) = perturbation_moments(z0, dz, mean0);
                    for (sign, target) in [(1.0f32, &mut *plus), (-1.0, &mut *minus)] {
                        let step = sign * eps;
                        let s = step as f64;
                        let mean = mean0 + s * (mean_dz + vb as f64);
                        let var = (var0 + 2.0 * s * cov + s * s * var_dz).max(0.0);
                        self.y_scratch.resize(n, 0.0);
                        bn_relu_perturbed(
                            (z0, dz, step, vb),
                            mean,
                            var,
                            gamma + sign * eps * vg,
                            beta + sign * eps * vs,
                            &mut self.y_scratch,
                        );
                        project_channel(
                            &self.shape,
                            &self.projection,
                            c,
                            self.batch,
                            &self.y_scratch,
                            target,
                        );
                    }
                }
            }
        }
    }
}

/// `z[c] = W_c ⊛ x + b_c` for the channels `channels`, as one product of the weights (rows of
/// the flat parameters, stride channel_params) with the unfolded input; `z` holds those
/// channels' rows (channels.len() x n).
fn convolve(
    shape: &ConvShape,
    params: &[f32],
    channels: Range<usize>,
    cols: &[f32],
    n: usize,
    z: &mut [f32],
) {
    let (cp, k) = (shape.channel_params(), shape.kernel_len());
    for (j, c) in channels.clone().enumerate() {
        z[j * n..(j + 1) * n].fill(params[c * cp + k]);
    }
    let weights = View {
        data: &params[channels.start * cp..],
        rows: channels.len(),
        cols: k,
        ld: cp,
    };
    gemm_into(weights, View::new(cols, n, k), true, z, n, true);
}

/// Mean and biased variance of one channel over the batch and the map (f64, two passes, eight
/// interleaved partial sums so the loop vectorises).
fn batch_stats(z: &[f32]) -> (f64, f64) {
    let n = z.len() as f64;
    let sum = lanes_sum(z, |x| x as f64);
    let mean = sum / n;
    let sq = lanes_sum(z, |x| {
        let d = x as f64 - mean;
        d * d
    });
    (mean, sq / n)
}

fn lanes_sum(z: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let blocks = z.chunks_exact(8);
    let rest = blocks.remainder();
    for block in blocks {
        for (l, x) in lanes.iter_mut().zip(block) {
            *l += f(*x);
        }
    }
    for (l, x) in lanes.iter_mut().zip(rest) {
        *l += f(*x);
    }
    lanes.iter().sum()
}

/// Over one channel: the mean and biased variance of `dz`, and `sum (z0 - mean0) dz / n`, the
/// covariance of `z0` and `dz` (f64, eight interleaved partial sums).
fn perturbation_moments(z0: &[f32], dz: &[f32], mean0: f64) -> (f64, f64, f64) {
    let (mut s1, mut s2, mut s12) = ([0f64; 8], [0f64; 8], [0f64; 8]);
    let mut add = |l: usize, z: f32, d: f32| {
        let d = d as f64;
        s1[l] += d;
        s2[l] += d * d;
        s12[l] += (z as f64 - mean0) * d;
    };
    let (zb, db) = (z0.chunks_exact(8), dz.chunks_exact(8));
    let (zr, dr) = (zb.remainder(), db.remainder());
    for (z, d) in zb.zip(db) {
        for l in 0..8 {
            add(l, z[l], d[l]);
        }
    }
    for (l, (z, d)) in zr.iter().zip(dr).enumerate() {
        add(l, *z, *d);
    }
    let n = z0.len() as f64;
    let mean = s1.iter().sum::<f64>() / n;
    let var = (s2.iter().sum::<f64>() / n - mean * mean).max(0.0);
    (mean, var, s12.iter().sum::<f64>() / n)
}

/// [`bn_relu`] of `z = z0 + step (dz + vb)`, computed on the fly.
fn bn_relu_perturbed(
    (z0, dz, step, vb): (&[f32], &[f32], f32, f32),
    mean: f64,
    var: f64,
    gamma: f32,
    beta: f32,
    y: &mut [f32],
) {
    let (alpha, shift) = bn_affine(mean, var, gamma, beta);
    for ((y, z0), dz) in y.iter_mut().zip(z0).zip(dz) {
        let z = z0 + step * (dz + vb);
        *y = (z * alpha + shift).max(0.0);
    }
}

/// BatchNorm as one affine map per channel: `alpha = gamma / sqrt(var + eps)` and
/// `shift = beta - mean alpha` (PyTorch's CPU kernel form).
fn bn_affine(mean: f64, var: f64, gamma: f32, beta: f32) -> (f32, f32) {
    let alpha = gamma as f64 / (var + BN_EPS).sqrt();
    ((alpha) as f32, (beta as f64 - mean * alpha) as f32)
}

/// `y = ReLU(gamma (z - mean) / sqrt(var + eps) + beta)`, as `y = max(0, z alpha + shift)` with
/// `alpha = gamma / sqrt(var + eps)` and `shift = beta - mean alpha` (PyTorch's CPU kernel form).
fn bn_relu(z: &[f32], mean: f64, var: f64, gamma: f32, beta: f32, y: &mut [f32]) {
    let (alpha, shift) = bn_affine(mean, var, gamma, beta);
    for (y, z) in y.iter_mut().zip(z) {
        *y = (z * alpha + shift).max(0.0);
    }
}

/// Section 4.4: `features[b, c*d + i] = sum_j A_c[i, j] y_c[b, j]`, i.e. `Y_c (B x HW) · A_cᵀ`
/// written into the channel's d columns of `features` (B x C*d).
fn project_channel(
    shape: &ConvShape,
    projection: &[f32],
    c: usize,
    batch: usize,
    y: &[f32],
    features: &mut [f32],
) {
    let (d, hw) = (shape.proj_dim, shape.spatial());
    let a = &projection[c * d * hw..(c + 1) * d * hw];
    gemm_into(
        View::new(y, batch, hw),
        View::new(a, d, hw),
        true,
        &mut features[c * d..],
        shape.feature_width(),
        false,
    );
}

/// `MaxPool2d(2, 2)` of the channel-major map `y` (C x B x H x W) into `next` (B x C x H/2 x W/2).
fn max_pool(shape: &ConvShape, batch: usize, y: &[f32], next: &mut Vec<f32>) {
    let (h, w) = (shape.height, shape.width);
    let (ph, pw) = shape.pooled();
    let c_out = shape.out_channels;
    next.clear();
    next.resize(batch * c_out * ph * pw, 0.0);
    for c in 0..c_out {
        for b in 0..batch {
            let map = &y[(c * batch + b) * h * w..][..h * w];
            let dst = &mut next[(b * c_out + c) * ph * pw..][..ph * pw];
            for i in 0..ph {
                let (r0, r1) = (&map[2 * i * w..][..w], &map[(2 * i + 1) * w..][..w]);
                for (j, o) in dst[i * pw..(i + 1) * pw].iter_mut().enumerate() {
                    *o = r0[2 * j]
                        .max(r0[2 * j + 1])
                        .max(r1[2 * j])
                        .max(r1[2 * j + 1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_protocol::direction::{apply_update, fill_direction};

    fn shape() -> ConvShape {
        ConvShape {
            in_channels: 2,
            out_channels: 3,
            height: 5,
            width: 4,
            proj_dim: 3,
            projection_seed: 7,
        }
    }

    fn values(n: usize, a: usize, m: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * a % m) as f32 - (m / 2) as f32) * scale)
            .collect()
    }

    fn block(batch: usize) -> ConvBlock {
        let s = shape();
        let mut b = ConvBlock::new(s);
        let mut p = values(s.param_count(), 7, 13, 0.05);
        for c in 0..s.out_channels {
            p[c * s.channel_params() + s.kernel_len() + 1] = 1.0 + 0.1 * c as f32;
        }
        b.set_params(&p).unwrap();
        b.load_input(&values(batch * s.input_width(), 5, 11, 0.2))
            .unwrap();
        b
    }

    /// Conv -> BatchNorm -> ReLU -> (projection, pooling), written out loop by loop.
    fn naive(
        s: &ConvShape,
        params: &[f32],
        x: &[f32],
        batch: usize,
        a: &[f32],
        stats: Option<(&[f32], &[f32])>,
    ) -> (Vec<f32>, Vec<f32>, Vec<(f64, f64)>) {
        let (h, w, cin, cout, d) = (s.height, s.width, s.in_channels, s.out_channels, s.proj_dim);
        let cp = s.channel_params();
        let mut y = vec![vec![0f64; batch * h * w]; cout];
        let mut batch_stats = Vec::new();
        for (c, yc) in y.iter_mut().enumerate() {
            let p = &params[c * cp..(c + 1) * cp];
            let mut z = vec![0f64; batch * h * w];
            for b in 0..batch {
                for i in 0..h {
                    for j in 0..w {
                        let mut acc = p[cin * 9] as f64;
                        for ci in 0..cin {
                            for di in 0..3 {
                                for dj in 0..3 {
                                    let (si, sj) = (i as isize + di - 1, j as isize + dj - 1);
                                    if si < 0 || sj < 0 || si >= h as isize || sj >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((b * cin + ci) * h + si as usize) * w + sj as usize]
                                        as f64;
                                    acc += xv * p[ci * 9 + (di * 3 + dj) as usize] as f64;
                                }
                            }
                        }
                        z[(b * h + i) * w + j] = acc;
                    }
                }
            }
            let n = z.len() as f64;
            let mean = z.iter().sum::<f64>() / n;
            let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            batch_stats.push((mean, var));
            let (m, v) = match stats {
                Some((rm, rv)) => (rm[c] as f64, rv[c] as f64),
                None => (mean, var),
            };
            let (gamma, beta) = (p[cin * 9 + 1] as f64, p[cin * 9 + 2] as f64);
            for (yv, zv) in yc.iter_mut().zip(&z) {
                *yv = ((zv - m) / (v + 1e-5).sqrt() * gamma + beta).max(0.0);
            }
        }
        let hw = h * w;
        let mut features = vec![0f32; batch * cout * d];
        for b in 0..batch {
            for c in 0..cout {
                for i in 0..d {
                    let row = &a[(c * d + i) * hw..][..hw];
                    let u = &y[c][b * hw..][..hw];
                    features[b * cout * d + c * d + i] =
                        row.iter().zip(u).map(|(a, u)| *a as f64 * u).sum::<f64>() as f32;
                }
            }
        }
        let (ph, pw) = (h / 2, w / 2);
        let mut pooled = vec![0f32; batch * cout * ph * pw];
        for b in 0..batch {
            for c in 0..cout {
                for i in 0..ph {
                    for j in 0..pw {
                        let at =
                            |di: usize, dj: usize| y[c][b * hw + (2 * i + di) * w + 2 * j + dj];
                        pooled[((b * cout + c) * ph + i) * pw + j] =
                            at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1)) as f32;
                    }
                }
            }
        }
        (features, pooled, batch_stats)
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "[{i}] {x} vs {y}");
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn forward_matches_a_direct_implementation() {
        let batch = 3;
        let mut b = block(batch);
        let s = shape();
        let a = b.projection().to_vec();
        let (rm, rv) = (b.running_mean().to_vec(), b.running_var().to_vec());
        let (mut f, mut next) = (Vec::new(), Vec::new());
        b.forward(BnMode::Train, &mut f, &mut next).unwrap();
        let (ef, ep, stats) = naive(&s, b.params(), &b.input, batch, &a, None);
        assert_close(&f, &ef, 1e-5);
        assert_close(&next, &ep, 1e-5);
        assert_eq!(next.len(), batch * s.output_width());
        // One momentum-0.1 update with the unbiased variance.
        let n = (batch * s.spatial()) as f64;
        for c in 0..s.out_channels {
            let (mean, var) = stats[c];
            let em = 0.9 * rm[c] as f64 + 0.1 * mean;
            let ev = 0.9 * rv[c] as f64 + 0.1 * var * n / (n - 1.0);
            assert!((b.running_mean()[c] as f64 - em).abs() < 1e-6);
            assert!((b.running_var()[c] as f64 - ev).abs() < 1e-6);
        }
        // Evaluation normalises with the running statistics and commits nothing.
        let (rm, rv) = (b.running_mean().to_vec(), b.running_var().to_vec());
        b.forward(BnMode::Eval, &mut f, &mut next).unwrap();
        let (ef, ep, _) = naive(&s, b.params(), &b.input, batch, &a, Some((&rm, &rv)));
        assert_close(&f, &ef, 1e-5);
        assert_close(&next, &ep, 1e-5);
        assert_eq!(bits(&rm), bits(b.running_mean()));
        assert_eq!(bits(&rv), bits(b.running_var()));
    }

    #[test]
    fn the_projection_is_seeded_and_scaled_by_the_map_size() {
        let s = ConvShape {
            in_channels: 1,
            out_channels: 4,
            height: 16,
            width: 16,
            proj_dim: 16,
            projection_seed: 3,
        };
        let a = projection_matrix(&s);
        assert_eq!(a, projection_matrix(&s));
        assert_ne!(
            a,
            projection_matrix(&ConvShape {
                projection_seed: 4,
                ..s
            })
        );
        assert_eq!(a.len(), 4 * 16 * 256);
        let var = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        // 16384 draws: the sample variance is within a few percent of 1/HW.
        assert!((var * 256.0 - 1.0).abs() < 0.05, "{}", var * 256.0);
    }

    #[test]
    fn perturbed_evaluation_leaves_no_trace() {
        for choreography in [Choreography::Fast, Choreography::Reference] {
            let mut b = block(4);
            b.set_choreography(choreography);
            let (mut f, mut next) = (Vec::new(), Vec::new());
            b.forward(BnMode::Train, &mut f, &mut next).unwrap();
            let (params, rm, rv) = (
                bits(b.params()),
                bits(b.running_mean()),
                bits(b.running_var()),
            );
            let (mut eval_before, mut next_before) = (Vec::new(), Vec::new());
            b.forward(BnMode::Eval, &mut eval_before, &mut next_before)
                .unwrap();
            let mut out = Vec::new();
            let seeds = [DirectionSeed(1), DirectionSeed(2)];
            b.evaluate_perturbed(5..60, &seeds, 1e-2, &mut out).unwrap();
            assert_eq!(out.len(), 2);
            assert_ne!(out[0].0, out[0].1, "the perturbation changed nothing");
            assert_eq!(params, bits(b.params()));
            assert_eq!(rm, bits(b.running_mean()));
            assert_eq!(rv, bits(b.running_var()));
            b.forward(BnMode::Eval, &mut f, &mut next).unwrap();
            assert_eq!(bits(&eval_before), bits(&f));
            assert_eq!(bits(&next_before), bits(&next));
        }
    }

    /// Trains a block for a few chunked steps under one choreography; returns every
    /// evaluation's features and the final parameters and running statistics.
    fn run(choreography: Choreography, chunks: &[Range<usize>]) -> (Vec<Vec<f32>>, Vec<f32>) {
        let mut b = block(3);
        b.set_choreography(choreography);
        let mut seen = Vec::new();
        let mut out = Vec::new();
        let (mut f, mut next) = (Vec::new(), Vec::new());
        for (k, chunk) in chunks.iter().enumerate() {
            let seeds: Vec<_> = (0..3).map(|p| DirectionSeed((k * 10 + p) as u64)).collect();
            b.evaluate_perturbed(chunk.clone(), &seeds, 1e-2, &mut out)
                .unwrap();
            for (plus, minus) in &out {
                seen.push(plus.clone());
                seen.push(minus.clone());
            }
            let terms: Vec<_> = seeds
                .iter()
                .enumerate()
                .map(|(i, s)| UpdateTerm {
                    seed: *s,
                    derivative: i as f32 - 1.0,
                })
                .collect();
            b.apply_update(chunk.clone(), 0.05, &terms).unwrap();
            if k % 2 == 1 {
                b.forward(BnMode::Train, &mut f, &mut next).unwrap();
                seen.push(f.clone());
                seen.push(next.clone());
            }
        }
        b.forward(BnMode::Eval, &mut f, &mut next).unwrap();
        seen.push(f);
        let mut state = b.params().to_vec();
        state.extend_from_slice(b.running_mean());
        state.extend_from_slice(b.running_var());
        (seen, state)
    }

    #[test]
    fn fast_path_agrees_with_the_reference_choreography() {
        // 3 channels of 21 parameters: whole channels, one channel, the BatchNorm parts only,
        // chunks that start and end mid-channel, and the whole block.
        let chunks = [0..63, 21..42, 40..42, 5..30, 19..20, 41..62, 0..63];
        let (fast, fast_state) = run(Choreography::Fast, &chunks);
        let (reference, ref_state) = run(Choreography::Reference, &chunks);
        assert_eq!(fast.len(), reference.len());
        // The same update arithmetic runs on both. The activations differ by the rounding of
        // `w + eps v` against `z0 + eps dz` (a few f32 ulps, then divided by the batch's
        // standard deviation); the parameters only through the clean passes' running
        // statistics, which both compute from the same parameters.
        assert_eq!(
            bits(&fast_state[..63]),
            bits(&ref_state[..63]),
            "parameters differ"
        );
        assert_close(&fast_state, &ref_state, 1e-6);
        for (a, b) in fast.iter().zip(&reference) {
            assert_close(a, b, 2e-5);
        }
    }

    #[test]
    fn a_chunk_changes_only_its_channels_features() {
        let mut b = block(3);
        let (mut f, mut next) = (Vec::new(), Vec::new());
        b.forward(BnMode::Train, &mut f, &mut next).unwrap();
        let mut out = Vec::new();
        // Channel 1's parameters only.
        b.evaluate_perturbed(21..42, &[DirectionSeed(9)], 1e-2, &mut out)
            .unwrap();
        let d = shape().proj_dim;
        for (row_f, row_p) in f.chunks(9).zip(out[0].0.chunks(9)) {
            assert_eq!(bits(&row_f[..d]), bits(&row_p[..d]));
            assert_eq!(bits(&row_f[2 * d..]), bits(&row_p[2 * d..]));
            assert_ne!(bits(&row_f[d..2 * d]), bits(&row_p[d..2 * d]));
        }
    }

    #[test]
    fn cached_update_equals_the_protocol_update() {
        let mut b = block(2);
        let mut shadow = b.params().to_vec();
        let terms = [
            UpdateTerm {
                seed: DirectionSeed(11),
                derivative: 0.5,
            },
            UpdateTerm {
                seed: DirectionSeed(12),
                derivative: -1.25,
            },
        ];
        let mut out = Vec::new();
        b.evaluate_perturbed(
            2..47,
            &[DirectionSeed(11), DirectionSeed(12)],
            1e-3,
            &mut out,
        )
        .unwrap();
        b.apply_update(2..47, 0.3, &terms).unwrap();
        let (mut v, mut g) = (vec![0.0; 45], vec![0.0; 45]);
        apply_update(&mut shadow[2..47], 0.3, &terms, &mut v, &mut g);
        assert_eq!(bits(&shadow), bits(b.params()));
        assert_ne!(shadow[2], block(2).params()[2]);
    }

    #[test]
    fn recorded_vectors_equal_seeded_directions() {
        let mut b = block(2);
        let mut v = vec![0.0; 30];
        fill_direction(DirectionSeed(4), &mut v);
        let (mut by_seed, mut by_vector) = (Vec::new(), Vec::new());
        b.evaluate_perturbed(10..40, &[DirectionSeed(4)], 1e-3, &mut by_seed)
            .unwrap();
        b.evaluate_perturbed_vectors(10..40, [&v[..]], 1e-3, &mut by_vector)
            .unwrap();
        assert_eq!(by_seed, by_vector);
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut b = ConvBlock::new(shape());
        assert_eq!(
            b.set_params(&[0.0; 3]),
            Err(SimError::ParameterCount {
                expected: 63,
                got: 3
            })
        );
        assert!(matches!(
            b.load_input(&[0.0; 41]),
            Err(SimError::InputShape { width: 40, .. })
        ));
        let (mut f, mut next) = (Vec::new(), Vec::new());
        assert_eq!(
            b.forward(BnMode::Train, &mut f, &mut next),
            Err(SimError::NoInput)
        );
        assert!(matches!(
            b.apply_update(60..64, 1.0, &[]),
            Err(SimError::ChunkOutOfRange { .. })
        ));
        assert!(matches!(
            b.set_projection(&[0.0; 5]),
            Err(SimError::BufferLength { .. })
        ));
        assert!(matches!(
            b.set_running_stats(&[0.0; 3], &[1.0; 2]),
            Err(SimError::BufferLength { .. })
        ));
        b.load_input(&[0.0; 80]).unwrap();
        assert!(matches!(
            b.evaluate_perturbed_vectors(0..10, [&[0.0f32; 9][..]], 1e-3, &mut Vec::new()),
            Err(SimError::BufferLength { .. })
        ));
        assert!(
            ConvShape {
                height: 1,
                ..shape()
            }
            .check()
            .is_err()
        );
    }
}
