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

use crate::conv_kernels::{
    DIRECTIONS_AT_ONCE, bn_relu_pair, direction_contributions, dot_f64, perturbation_sums,
};
use crate::dense::{Choreography, SimError};
use crate::direction_cache::DirectionCache;
use crate::matmul::{View, gemm_into};

/// PyTorch's BatchNorm2d defaults.
pub const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;

use firmware_protocol::shape::{CONV_TAPS as TAPS, ForwardMode};
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
    /// For the taps path: the transposed unfolded input's row sums and Gram matrix (f64).
    tap_sum: Vec<f64>,
    tap_gram: Vec<f64>,
    /// Kernels of at most this many taps have their directions' contributions recomputed per
    /// tile by the fast path (RECOMPUTE_MAX_K; tests lower it to cover the other strategy).
    recompute_max_k: usize,
    g_scratch: Vec<f32>,
    /// Set by a fast evaluation that left every direction's `dz` in `dz_rows`; taken by the
    /// update that follows.
    contributions: Option<Contributions>,
    /// Whether the last fast evaluation left every direction's `dz` in `dz_rows`.
    dz_complete: bool,
    choreography: Choreography,
}

/// The last fast perturbed evaluation whose directions' contributions `dz` are all still in
/// `ConvBlock::dz_rows` (rows `q * touched + j`), computed around the current clean pre-activation:
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
            cols: Vec::new(),
            cols_ready: false,
            padded: Vec::new(),
            cols_t: Vec::new(),
            cols_t_ready: false,
            gram_ready: false,
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
            dz_rows: Vec::new(),
            dz_at: 0,
            fused_weights: Vec::new(),
            dz_tile: Vec::new(),
            f_scratch: Vec::new(),
            sums: Vec::new(),
            tap_sum: Vec::new(),
            tap_gram: Vec::new(),
            affines: Vec::new(),
            recompute_max_k: RECOMPUTE_MAX_K,
            g_scratch: Vec::new(),
            contributions: None,
            dz_complete: false,
            choreography: Choreography::default(),
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
        self.cols_t_ready = false;
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
        self.relu.resize(c_out * n, 0.0);
        features.clear();
        features.resize(self.batch * self.shape.feature_width(), 0.0);
        for c in 0..c_out {
            let z = &self.z0[c * n..(c + 1) * n];
            let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
            let y = &mut self.relu[c * n..(c + 1) * n];
            match mode {
                ForwardMode::Train => {
                    let (mean, var) = self.z0_stats[c];
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
        let result = self.evaluate_perturbed_vectors(chunk.clone(), vectors, eps, out);
        self.directions = directions;
        if result.is_ok() && self.dz_complete {
            self.contributions = Some(Contributions {
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
        self.contributions = None;
        self.dz_complete = false;
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
        self.g_scratch.resize(len, 0.0);
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
            &mut self.g_scratch,
        );
        match self.contributions.take() {
            Some(c) if c.chunk == chunk => self.move_preactivation(&chunk, &c.seeds, scale, terms),
            _ => self.mark_stale(channels),
        }
        Ok(())
    }

    /// After an update along the directions of the last fast evaluation, whose contributions
    /// are still in `dz_rows`: the pre-activation is linear in the conv weights and bias, so the
    /// update `w -= scale sum_p dd_p v_p` moves it by `-scale sum_p dd_p (dz_p + v_b,p)`, a
    /// few additions per value where recomputing it would be a whole convolution. Exact up to
    /// float rounding (the product with the stored weights rounds `w - scale g` first, as the
    /// perturbed evaluations do `w ± eps v`). Falls back to marking the channels stale when an
    /// update term's seed was not evaluated.
    fn move_preactivation(
        &mut self,
        chunk: &Range<usize>,
        seeds: &[DirectionSeed],
        scale: f32,
        terms: &[UpdateTerm],
    ) {
        let channels = self.channels_of(chunk);
        let mut coef = vec![0f32; seeds.len()];
        for t in terms {
            let Some(q) = seeds.iter().position(|s| *s == t.seed) else {
                return self.mark_stale(channels);
            };
            coef[q] -= scale * t.derivative;
        }
        let n = self.columns();
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        let touched = channels.len();
        let block = touched * cp;
        for (j, c) in channels.enumerate() {
            let z = &mut self.z0[c * n..(c + 1) * n];
            for (q, &a) in coef.iter().enumerate() {
                if a == 0.0 {
                    continue;
                }
                let vb = self.stacked[q * block + j * cp + k];
                let dz = &self.dz_rows[self.dz_at + (q * touched + j) * n..][..n];
                for (z, d) in z.iter_mut().zip(dz) {
                    *z += a * (d + vb);
                }
            }
            self.z0_stats[c] = batch_stats(z);
            self.z_stale[c] = false;
            self.feat_stale[c] = true;
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
        self.contributions = None;
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
    /// its transpose for the MNIST CNN's second block, with bit-identical results.) Each sample
    /// is first copied into a zero-bordered image, so that every row is written once, in order,
    /// as runs of three values (for the second block, 57 MB per batch: it was a sizeable share
    /// of a batch, written three values apart and cleared first).
    fn ensure_cols(&mut self) {
        if self.cols_ready {
            return;
        }
        let ConvGeometry {
            in_channels,
            height,
            width,
            ..
        } = self.shape;
        let (hw, k) = (self.shape.spatial(), self.shape.kernel_len());
        let (hp, wp) = (height + 2, width + 2);
        // Every value is written below.
        self.cols.resize(self.columns() * k, 0.0);
        self.padded.clear();
        self.padded.resize(in_channels * hp * wp, 0.0);
        for (b, sample) in self.cols.chunks_exact_mut(hw * k).enumerate() {
            let image = &self.input[b * in_channels * hw..][..in_channels * hw];
            for (ci, channel) in image.chunks_exact(hw).enumerate() {
                for (h, src) in channel.chunks_exact(width).enumerate() {
                    self.padded[(ci * hp + h + 1) * wp + 1..][..width].copy_from_slice(src);
                }
            }
            for (p, row) in sample.chunks_exact_mut(k).enumerate() {
                let (h, w) = (p / width, p % width);
                for (ci, taps) in row.chunks_exact_mut(TAPS).enumerate() {
                    for (dh, dst) in taps.chunks_exact_mut(3).enumerate() {
                        dst.copy_from_slice(&self.padded[(ci * hp + h + dh) * wp + w..][..3]);
                    }
                }
            }
        }
        self.cols_ready = true;
    }

    /// Whether the fast path works from the transposed unfolded input: a kernel of at most
    /// `recompute_max_k` taps, whose products are cheaper as runs of scaled rows than as a
    /// general matrix product (see [`ConvBlock::perturbed_fast`]).
    fn taps_path(&self) -> bool {
        self.choreography == Choreography::Fast && self.shape.kernel_len() <= self.recompute_max_k
    }

    /// [`ConvBlock::refresh_preactivation`] on the taps path: the stale channels' clean
    /// pre-activation as four channels' runs of scaled rows at a time (the kernel the
    /// perturbations use), and its batch statistics from the input's Gram matrix, without a
    /// pass over the values (exact for `w · X + b`; the stored values differ from it by their
    /// f32 rounding).
    fn preactivation_by_taps(&mut self) {
        self.ensure_cols_t();
        let n = self.columns();
        let (cp, k, hw) = (
            self.shape.channel_params(),
            self.shape.kernel_len(),
            self.shape.spatial(),
        );
        let c_out = self.shape.out_channels;
        self.z0.resize(c_out * n, 0.0);
        // Runs of up to four consecutive stale channels.
        let mut groups = Vec::new();
        let mut c = 0;
        while c < c_out {
            if !self.z_stale[c] {
                c += 1;
                continue;
            }
            let start = c;
            while c < c_out && self.z_stale[c] && c - start < DIRECTIONS_AT_ONCE {
                c += 1;
            }
            groups.push(start..c);
        }
        if groups.is_empty() {
            return;
        }
        let ld = cols_t_stride(n);
        let tile = (TILE_COLUMNS / hw).max(1) * hw;
        for n0 in (0..n).step_by(tile) {
            let len = tile.min(n - n0);
            for g in &groups {
                direction_contributions(
                    &self.params[g.start * cp..],
                    (g.len(), cp, k),
                    &self.cols_t,
                    (ld, n0),
                    &mut self.z0[g.start * n + n0..],
                    (len, n),
                );
                for c in g.clone() {
                    let bias = self.params[c * cp + k];
                    self.z0[c * n + n0..][..len]
                        .iter_mut()
                        .for_each(|z| *z += bias);
                }
            }
        }
        // The batch statistics from the Gram matrix: with z = w · X + b, mean = w · s / N + b
        // and var = (wᵀ G w - (w · s)² / N) / N.
        self.ensure_gram();
        let nf = n as f64;
        for g in groups {
            for c in g {
                let w = &self.params[c * cp..][..k];
                let ws = self.tap_dot(w);
                let mean = ws / nf + self.params[c * cp + k] as f64;
                let var = ((self.tap_form(w, w) - ws * ws / nf) / nf).max(0.0);
                self.z0_stats[c] = (mean, var);
                self.z_stale[c] = false;
            }
        }
    }

    /// Brings the cached clean pre-activation up to date (its stale channels only).
    fn refresh_preactivation(&mut self) {
        if self.taps_path() {
            return self.preactivation_by_taps();
        }
        self.ensure_cols();
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
        self.ensure_cols();
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
    /// v_b)`, so only the touched channels' contribution `dz = v ⊛ x` is computed per direction,
    /// once for both signs, and only the touched channels' BatchNorm, ReLU and projection are
    /// recomputed: the other channels' features are the clean ones. Exact up to float rounding
    /// (the reference choreography rounds `w + eps v` first); the test
    /// `fast_path_agrees_with_the_reference_choreography` holds the two together.
    ///
    /// Pass 1 takes the moments of each (channel, direction)'s `dz`, from which the batch
    /// statistics under `± eps` follow for both signs; pass 2 normalises the 2P perturbed maps
    /// of a channel, tile of samples by tile, and projects them as one product with `A_cᵀ`.
    /// How `dz` is had depends on the kernel's size:
    ///
    /// - at most `recompute_max_k` taps (the MNIST CNN's first block: C_in*9 = 9), the taps
    ///   path: `dz` is so cheap that writing it out for the whole batch would cost more than
    ///   its arithmetic, so pass 2 recomputes it per tile from the transposed unfolded input;
    ///   pass 1, and the clean pre-activation's batch statistics, come from that input's Gram
    ///   matrix without a pass over the columns ([`ConvBlock::tap_moments`]);
    /// - larger: one product over the touched channels and directions (in groups that fit
    ///   `FUSE_BUDGET`), which also computes a stale clean pre-activation of those channels,
    ///   and whose rows [`ConvBlock::apply_update`] then uses to move the clean pre-activation
    ///   along the update instead of convolving again.
    fn perturbed_fast(
        &mut self,
        perturbation: &Perturbation,
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
    ) {
        let Perturbation {
            channels, count, ..
        } = perturbation;
        let n = self.columns();
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        let (hw, d, fw) = (
            self.shape.spatial(),
            self.shape.proj_dim,
            self.shape.feature_width(),
        );
        let touched = channels.len();
        let block = touched * cp;
        let recompute = self.taps_path();
        // A stale clean pre-activation of the touched channels joins the first group's product
        // (one pass over the unfolded input instead of two).
        let with_z0 = !recompute && channels.clone().all(|c| self.z_stale[c]);
        let group = if recompute {
            self.ensure_cols_t();
            *count
        } else {
            (FUSE_BUDGET / (touched * n))
                .saturating_sub(with_z0 as usize)
                .clamp(1, *count)
        };
        self.dz_complete = !recompute && group == *count;
        if !recompute {
            self.ensure_cols();
            self.contributions_product(channels, 0, group.min(*count), with_z0);
        }
        self.refresh_preactivation();
        self.refresh_features(channels);
        // The untouched channels' features are the clean ones; when the chunk touches every
        // channel, every value is written below.
        let every = touched == self.shape.out_channels;
        for (plus, minus) in out.iter_mut() {
            if every {
                plus.resize(self.feat0.len(), 0.0);
                minus.resize(self.feat0.len(), 0.0);
            } else {
                plus.clone_from(&self.feat0);
                minus.clone_from(&self.feat0);
            }
        }
        let tile_samples = (TILE_COLUMNS / hw).clamp(1, self.batch);
        for first in (0..*count).step_by(group) {
            let in_group = group.min(count - first);
            if !recompute && first > 0 {
                self.contributions_product(channels, first, in_group, false);
            }

            // Pass 1: the moments of every (channel, direction)'s dz over the batch.
            if recompute {
                self.tap_moments(channels, first, in_group, block);
            } else {
                self.dz_moments(channels, in_group);
            }

            // The batch statistics of z0 ± eps (dz + v_b) from those of z0 and the moments of
            // dz, and the BatchNorm affine of each (channel, direction, sign).
            self.affines.clear();
            for (j, c) in channels.clone().enumerate() {
                let (mean0, var0) = self.z0_stats[c];
                let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
                for q in 0..in_group {
                    let v = &self.stacked[(first + q) * block + j * cp..][..cp];
                    let (vb, vg, vs) = (v[k], v[k + 1], v[k + 2]);
                    let [s1, s2, s12] = self.sums[j * in_group + q].map(|s| s / n as f64);
                    let (mean_dz, cov) = (s1, s12);
                    let var_dz = (s2 - mean_dz * mean_dz).max(0.0);
                    let affine = [1.0f32, -1.0].map(|sign| {
                        let step = sign * eps;
                        let s = step as f64;
                        let mean = mean0 + s * (mean_dz + vb as f64);
                        let var = (var0 + 2.0 * s * cov + s * s * var_dz).max(0.0);
                        bn_affine(mean, var, gamma + sign * eps * vg, beta + sign * eps * vs)
                    });
                    self.affines.push(affine);
                }
            }

            // Pass 2: per tile and channel, the 2*in_group perturbed maps (rows: map-major,
            // then sample) normalised and projected as one product.
            let a_len = d * hw;
            let tile_samples = tile_samples
                .max(PROJECTION_ROWS.div_ceil(2 * in_group))
                .min(self.batch);
            for b0 in (0..self.batch).step_by(tile_samples) {
                let samples = tile_samples.min(self.batch - b0);
                let (n0, len) = (b0 * hw, samples * hw);
                self.y_scratch.resize(2 * in_group * len, 0.0);
                self.f_scratch.resize(2 * in_group * samples * d, 0.0);
                for (j, c) in channels.clone().enumerate() {
                    let z0 = &self.z0[c * n + n0..][..len];
                    for q0 in (0..in_group).step_by(DIRECTIONS_AT_ONCE) {
                        let rows = DIRECTIONS_AT_ONCE.min(in_group - q0);
                        if recompute {
                            self.dz_tile.resize(rows * len, 0.0);
                            direction_contributions(
                                &self.stacked[(first + q0) * block + j * cp..],
                                (rows, block, k),
                                &self.cols_t,
                                (cols_t_stride(n), n0),
                                &mut self.dz_tile[..rows * len],
                                (len, len),
                            );
                        }
                        for q in q0..q0 + rows {
                            let dz = if recompute {
                                &self.dz_tile[(q - q0) * len..][..len]
                            } else {
                                &self.dz_rows[self.dz_at + (q * touched + j) * n + n0..][..len]
                            };
                            let vb = self.stacked[(first + q) * block + j * cp + k];
                            let (plus, minus) =
                                self.y_scratch[2 * q * len..][..2 * len].split_at_mut(len);
                            bn_relu_pair(
                                z0,
                                dz,
                                (eps, vb),
                                self.affines[j * in_group + q],
                                plus,
                                minus,
                            );
                        }
                    }
                    gemm_into(
                        View::new(&self.y_scratch, 2 * in_group * samples, hw),
                        View::new(&self.projection[c * a_len..][..a_len], d, hw),
                        true,
                        &mut self.f_scratch,
                        d,
                        false,
                    );
                    for (map, rows) in self.f_scratch.chunks_exact(samples * d).enumerate() {
                        let (plus, minus) = &mut out[first + map / 2];
                        let target = if map % 2 == 0 { plus } else { minus };
                        for (b, row) in rows.chunks_exact(d).enumerate() {
                            target[(b0 + b) * fw + c * d..][..d].copy_from_slice(row);
                        }
                    }
                }
            }
        }
    }

    /// `dz` of directions `first..first + in_group` over the touched channels, as one product
    /// `V · colsᵀ` (row `q * touched + j` of `dz`, V the directions' conv-weight parts). With
    /// `with_z0`, the touched channels' clean pre-activation is computed in the same product
    /// (the weights' rows first; one pass over the unfolded input instead of two) and stored
    /// as `refresh_preactivation` would.
    fn contributions_product(
        &mut self,
        channels: &Range<usize>,
        first: usize,
        in_group: usize,
        with_z0: bool,
    ) {
        let n = self.columns();
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        let touched = channels.len();
        let block = touched * cp;
        let directions = &self.stacked[first * block..(first + in_group) * block];
        let (weights, z_rows) = if with_z0 {
            self.fused_weights.clear();
            self.fused_weights
                .extend_from_slice(&self.params[channels.start * cp..channels.end * cp]);
            self.fused_weights.extend_from_slice(directions);
            (&self.fused_weights[..], touched)
        } else {
            (directions, 0)
        };
        self.dz_rows.resize((z_rows + in_group * touched) * n, 0.0);
        gemm_into(
            View {
                data: weights,
                rows: z_rows + in_group * touched,
                cols: k,
                ld: cp,
            },
            View::new(&self.cols, n, k),
            true,
            &mut self.dz_rows,
            n,
            false,
        );
        self.z0.resize(self.shape.out_channels * n, 0.0);
        for (j, c) in channels.clone().take(z_rows).enumerate() {
            let bias = self.params[c * cp + k];
            let z = &mut self.z0[c * n..(c + 1) * n];
            for (z, p) in z.iter_mut().zip(&self.dz_rows[j * n..(j + 1) * n]) {
                *z = p + bias;
            }
            self.z0_stats[c] = batch_stats(z);
            self.z_stale[c] = false;
        }
        self.dz_at = z_rows * n;
    }

    /// Pass 1 of the fast path for a large kernel: the moments of each (channel, direction)'s
    /// materialised `dz` (see [`perturbation_sums`]), by tiles of columns.
    fn dz_moments(&mut self, channels: &Range<usize>, in_group: usize) {
        let n = self.columns();
        let hw = self.shape.spatial();
        let touched = channels.len();
        let tile_samples = (TILE_COLUMNS / hw).clamp(1, self.batch);
        self.sums.clear();
        self.sums.resize(touched * in_group, [0.0; 3]);
        for b0 in (0..self.batch).step_by(tile_samples) {
            let (n0, len) = (b0 * hw, tile_samples.min(self.batch - b0) * hw);
            for (j, c) in channels.clone().enumerate() {
                let z0 = &self.z0[c * n + n0..][..len];
                let mean0 = self.z0_stats[c].0;
                for q in 0..in_group {
                    let dz = &self.dz_rows[self.dz_at + (q * touched + j) * n + n0..][..len];
                    let add = perturbation_sums(z0, dz, mean0);
                    for (s, a) in self.sums[j * in_group + q].iter_mut().zip(add) {
                        *s += a;
                    }
                }
            }
        }
    }

    /// Pass 1 of the fast path for a small kernel, without a pass over the columns: the clean
    /// pre-activation and each direction's contribution are linear in the transposed unfolded
    /// input's rows `X_t`, `z0 = w · X + b` and `dz = v · X`, so with the rows' sums `s` and Gram
    /// matrix `G` (once per batch, [`ConvBlock::ensure_gram`]):
    /// `sum dz = v · s`, `sum dz² = vᵀ G v` and `sum (z0 - mean0) dz = wᵀ G v - (w · s)(v · s) / N`.
    fn tap_moments(
        &mut self,
        channels: &Range<usize>,
        first: usize,
        in_group: usize,
        block: usize,
    ) {
        let n = self.columns() as f64;
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        self.ensure_gram();
        self.sums.clear();
        for (j, c) in channels.clone().enumerate() {
            let w = &self.params[c * cp..][..k];
            for q in 0..in_group {
                let v = &self.stacked[(first + q) * block + j * cp..][..k];
                let (vs, ws) = (self.tap_dot(v), self.tap_dot(w));
                let (vgv, wgv) = (self.tap_form(v, v), self.tap_form(w, v));
                self.sums.push([vs, vgv, wgv - ws * vs / n]);
            }
        }
    }

    /// `a · s`, `s` the transposed unfolded input's row sums (f64).
    fn tap_dot(&self, a: &[f32]) -> f64 {
        a.iter()
            .zip(&self.tap_sum)
            .map(|(&a, s)| a as f64 * s)
            .sum()
    }

    /// `aᵀ G b`, `G` the transposed unfolded input's Gram matrix (f64).
    fn tap_form(&self, a: &[f32], b: &[f32]) -> f64 {
        let k = a.len();
        a.iter()
            .zip(self.tap_gram.chunks_exact(k))
            .map(|(&a, row)| a as f64 * b.iter().zip(row).map(|(&b, g)| b as f64 * g).sum::<f64>())
            .sum()
    }

    /// The transposed unfolded input's row sums and Gram matrix (once per batch, for the batch
    /// statistics and moments of the taps path), in f64 (the products of f32 values are exact
    /// there, and the variances taken from them difference large sums), accumulated by tiles
    /// so that the rows being multiplied stay in cache.
    fn ensure_gram(&mut self) {
        if self.gram_ready {
            return;
        }
        let (n, k) = (self.columns(), self.shape.kernel_len());
        let ld = cols_t_stride(n);
        self.tap_sum.clear();
        self.tap_sum.resize(k, 0.0);
        self.tap_gram.clear();
        self.tap_gram.resize(k * k, 0.0);
        let ones = vec![1.0f32; TILE_COLUMNS.min(n)];
        for n0 in (0..n).step_by(ones.len()) {
            let len = ones.len().min(n - n0);
            for t in 0..k {
                let a = &self.cols_t[t * ld + n0..][..len];
                self.tap_sum[t] += dot_f64(a, &ones);
                for u in t..k {
                    let g = dot_f64(a, &self.cols_t[u * ld + n0..][..len]);
                    self.tap_gram[t * k + u] += g;
                    if u != t {
                        self.tap_gram[u * k + t] += g;
                    }
                }
            }
        }
        self.gram_ready = true;
    }

    /// The unfolded input transposed (C_in*9 x B*HW, row `ci*9 + kh*3 + kw` the input shifted
    /// by that tap, 0 outside the image), for the fast path of a small kernel: a run of a
    /// direction's contribution is then a sum of C_in*9 scaled contiguous runs.
    fn ensure_cols_t(&mut self) {
        if self.cols_t_ready {
            return;
        }
        let ConvGeometry {
            in_channels,
            height,
            width,
            ..
        } = self.shape;
        let (hw, n, k) = (
            self.shape.spatial(),
            self.columns(),
            self.shape.kernel_len(),
        );
        let ld = cols_t_stride(n);
        self.cols_t.clear();
        self.cols_t.resize(k * ld, 0.0);
        for (tap, row) in self.cols_t.chunks_exact_mut(ld).enumerate() {
            let (ci, dh, dw) = (tap / TAPS, tap % TAPS / 3, tap % 3);
            for (b, dst) in row[..n].chunks_exact_mut(hw).enumerate() {
                let image = &self.input[(b * in_channels + ci) * hw..][..hw];
                for (h, dst) in dst.chunks_exact_mut(width).enumerate() {
                    let Some(src_h) = (h + dh).checked_sub(1).filter(|&r| r < height) else {
                        continue; // stays zero: padding
                    };
                    let src = &image[src_h * width..][..width];
                    match dw {
                        0 => dst[1..].copy_from_slice(&src[..width - 1]),
                        1 => dst.copy_from_slice(src),
                        _ => dst[..width - 1].copy_from_slice(&src[1..]),
                    }
                }
            }
        }
        self.gram_ready = false;
        self.cols_t_ready = true;
    }
}

/// The row stride of the transposed unfolded input for `n` columns: padded so that the taps'
/// rows, read side by side, do not fall on the same cache sets (B*HW is often a multiple of
/// 1024 floats, and nine such rows would thrash an 8-way L1).
fn cols_t_stride(n: usize) -> usize {
    n + 16
}

/// `z[c] = W_c ⊛ x + b_c` for the channels `channels`, as one product of the weights (rows of
/// the flat parameters, stride channel_params) with the unfolded input; `z` holds those
/// channels' rows (channels.len() x n).
fn convolve(
    shape: &ConvGeometry,
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
    shape: &ConvGeometry,
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
fn max_pool(shape: &ConvGeometry, batch: usize, y: &[f32], next: &mut Vec<f32>) {
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
    use firmware_protocol::direction::fill_direction;

    fn shape() -> ConvGeometry {
        ConvGeometry {
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
        s: &ConvGeometry,
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
        b.forward(ForwardMode::Train, &mut f, &mut next).unwrap();
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
        b.forward(ForwardMode::Eval, &mut f, &mut next).unwrap();
        let (ef, ep, _) = naive(&s, b.params(), &b.input, batch, &a, Some((&rm, &rv)));
        assert_close(&f, &ef, 1e-5);
        assert_close(&next, &ep, 1e-5);
        assert_eq!(bits(&rm), bits(b.running_mean()));
        assert_eq!(bits(&rv), bits(b.running_var()));
    }

    #[test]
    fn the_unfolded_inputs_follow_their_definition() {
        let (batch, s) = (3, shape());
        let mut b = block(batch);
        b.ensure_cols();
        b.ensure_cols_t();
        let (h, w, k, n) = (s.height, s.width, s.kernel_len(), batch * s.spatial());
        let ld = cols_t_stride(n);
        for bi in 0..batch {
            for (i, j) in (0..h).flat_map(|i| (0..w).map(move |j| (i, j))) {
                let col = (bi * h + i) * w + j;
                for t in 0..k {
                    let (ci, di, dj) = (t / TAPS, t % TAPS / 3, t % 3);
                    let (si, sj) = ((i + di) as isize - 1, (j + dj) as isize - 1);
                    let inside = si >= 0 && sj >= 0 && si < h as isize && sj < w as isize;
                    let x = if inside {
                        b.input[((bi * s.in_channels + ci) * h + si as usize) * w + sj as usize]
                    } else {
                        0.0
                    };
                    assert_eq!(b.cols[col * k + t].to_bits(), x.to_bits());
                    assert_eq!(b.cols_t[t * ld + col].to_bits(), x.to_bits());
                }
            }
        }
    }

    #[test]
    fn taps_path_statistics_equal_the_stored_pre_activations() {
        // The taps path takes the batch statistics from the input's Gram matrix instead of the
        // stored values; a large bias and an input with a large mean make the variance a
        // difference of large sums.
        let s = shape();
        let mut b = block(4);
        let mut p = b.params().to_vec();
        p[s.kernel_len()] = 50.0;
        b.set_params(&p).unwrap();
        let x: Vec<f32> = values(4 * s.input_width(), 5, 11, 0.2)
            .iter()
            .map(|v| v + 30.0)
            .collect();
        b.load_input(&x).unwrap();
        assert!(b.taps_path());
        b.refresh_preactivation();
        let n = b.columns();
        for c in 0..s.out_channels {
            let (mean, var) = b.z0_stats[c];
            let (m, v) = batch_stats(&b.z0[c * n..(c + 1) * n]);
            assert!(
                (mean - m).abs() <= 1e-6 * m.abs().max(1.0),
                "{c}: {mean} vs {m}"
            );
            assert!((var - v).abs() <= 1e-5 * v, "{c}: {var} vs {v}");
        }
    }

    #[test]
    fn the_projection_is_seeded_and_scaled_by_the_map_size() {
        let s = ConvGeometry {
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
            projection_matrix(&ConvGeometry {
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
        for (choreography, recompute_max_k) in [
            (Choreography::Fast, RECOMPUTE_MAX_K),
            (Choreography::Fast, 0),
            (Choreography::Reference, RECOMPUTE_MAX_K),
        ] {
            let mut b = block(4);
            b.set_choreography(choreography);
            b.recompute_max_k = recompute_max_k;
            let (mut f, mut next) = (Vec::new(), Vec::new());
            b.forward(ForwardMode::Train, &mut f, &mut next).unwrap();
            let (params, rm, rv) = (
                bits(b.params()),
                bits(b.running_mean()),
                bits(b.running_var()),
            );
            let (mut eval_before, mut next_before) = (Vec::new(), Vec::new());
            b.forward(ForwardMode::Eval, &mut eval_before, &mut next_before)
                .unwrap();
            let mut out = Vec::new();
            let seeds = [DirectionSeed(1), DirectionSeed(2)];
            b.evaluate_perturbed(5..60, &seeds, 1e-2, &mut out).unwrap();
            assert_eq!(out.len(), 2);
            assert_ne!(out[0].0, out[0].1, "the perturbation changed nothing");
            assert_eq!(params, bits(b.params()));
            assert_eq!(rm, bits(b.running_mean()));
            assert_eq!(rv, bits(b.running_var()));
            b.forward(ForwardMode::Eval, &mut f, &mut next).unwrap();
            assert_eq!(bits(&eval_before), bits(&f));
            assert_eq!(bits(&next_before), bits(&next));
        }
    }

    /// Trains a block for a few chunked steps under one choreography; returns every
    /// evaluation's features and the final parameters and running statistics.
    fn run(
        choreography: Choreography,
        recompute_max_k: usize,
        chunks: &[Range<usize>],
    ) -> (Vec<Vec<f32>>, Vec<f32>) {
        let mut b = block(3);
        b.set_choreography(choreography);
        b.recompute_max_k = recompute_max_k;
        let mut seen = Vec::new();
        let mut out = Vec::new();
        let (mut f, mut next) = (Vec::new(), Vec::new());
        for (k, chunk) in chunks.iter().enumerate() {
            // Six directions: the fast path takes four at a time, then the remaining two.
            let seeds: Vec<_> = (0..6).map(|p| DirectionSeed((k * 10 + p) as u64)).collect();
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
                    derivative: (i as f32 - 2.5) * 0.4,
                })
                .collect();
            b.apply_update(chunk.clone(), 0.05, &terms).unwrap();
            if k % 2 == 1 {
                b.forward(ForwardMode::Train, &mut f, &mut next).unwrap();
                seen.push(f.clone());
                seen.push(next.clone());
            }
        }
        b.forward(ForwardMode::Eval, &mut f, &mut next).unwrap();
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
        let (reference, ref_state) = run(Choreography::Reference, RECOMPUTE_MAX_K, &chunks);
        // Both strategies of the fast path: dz recomputed per tile (this block's 18 taps), and
        // materialised in one product, which also moves the clean pre-activation along the
        // update instead of recomputing it.
        for recompute_max_k in [RECOMPUTE_MAX_K, 0] {
            let (fast, fast_state) = run(Choreography::Fast, recompute_max_k, &chunks);
            assert_eq!(fast.len(), reference.len());
            // The same update arithmetic runs on both. The activations differ by the rounding
            // of `w + eps v` against `z0 + eps dz` (a few f32 ulps, then divided by the batch's
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
    }

    #[test]
    fn a_chunk_changes_only_its_channels_features() {
        for recompute_max_k in [RECOMPUTE_MAX_K, 0] {
            let mut b = block(3);
            b.recompute_max_k = recompute_max_k;
            let (mut f, mut next) = (Vec::new(), Vec::new());
            b.forward(ForwardMode::Train, &mut f, &mut next).unwrap();
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
    }

    #[test]
    fn cached_update_equals_the_protocol_update() {
        crate::physical::assert_cached_update_is_the_protocol_update(&mut block(2), 2..47);
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
            b.forward(ForwardMode::Train, &mut f, &mut next),
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
            ConvGeometry {
                height: 1,
                ..shape()
            }
            .check()
            .is_err()
        );
    }
}
