//! The block's input unfolded for the 3x3 convolution (im2col), its transpose, and the taps
//! path of a small kernel that works from the transpose's row sums and Gram matrix.

use super::*;

impl ConvBlock {
    /// Unfolds the input for a 3x3 convolution with padding 1 (im2col): row `b*HW + h*W + w`,
    /// column `ci*9 + kh*3 + kw` holds `x[b, ci, h + kh - 1, w + kw - 1]`, or 0 outside the
    /// image. (This layout, with the products taken as `W · colsᵀ`, measured twice as fast as
    /// its transpose for the MNIST CNN's second block, with bit-identical results.) Each sample
    /// is first copied into a zero-bordered image, so that every row is written once, in order,
    /// as runs of three values (for the second block, 57 MB per batch: it was a sizeable share
    /// of a batch, written three values apart and cleared first).
    pub(super) fn ensure_cols(&mut self) {
        if self.unfolded.cols_ready {
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
        self.unfolded.cols.resize(self.columns() * k, 0.0);
        self.unfolded.padded.clear();
        self.unfolded.padded.resize(in_channels * hp * wp, 0.0);
        for (b, sample) in self.unfolded.cols.chunks_exact_mut(hw * k).enumerate() {
            let image = &self.input[b * in_channels * hw..][..in_channels * hw];
            for (ci, channel) in image.chunks_exact(hw).enumerate() {
                for (h, src) in channel.chunks_exact(width).enumerate() {
                    self.unfolded.padded[(ci * hp + h + 1) * wp + 1..][..width]
                        .copy_from_slice(src);
                }
            }
            for (p, row) in sample.chunks_exact_mut(k).enumerate() {
                let (h, w) = (p / width, p % width);
                for (ci, taps) in row.chunks_exact_mut(TAPS).enumerate() {
                    for (dh, dst) in taps.chunks_exact_mut(3).enumerate() {
                        dst.copy_from_slice(
                            &self.unfolded.padded[(ci * hp + h + dh) * wp + w..][..3],
                        );
                    }
                }
            }
        }
        self.unfolded.cols_ready = true;
    }

    /// Whether the fast path works from the transposed unfolded input: a kernel of at most
    /// `recompute_max_k` taps, whose products are cheaper as runs of scaled rows than as a
    /// general matrix product (see [`ConvBlock::perturbed_fast`]).
    pub(super) fn taps_path(&self) -> bool {
        self.choreography == Choreography::Fast
            && self.shape.kernel_len() <= self.fast.recompute_max_k
    }

    /// [`ConvBlock::refresh_preactivation`] on the taps path: the stale channels' clean
    /// pre-activation as four channels' runs of scaled rows at a time (the kernel the
    /// perturbations use), and its batch statistics from the input's Gram matrix, without a
    /// pass over the values (exact for `w · X + b`; the stored values differ from it by their
    /// f32 rounding).
    pub(super) fn preactivation_by_taps(&mut self) {
        self.ensure_cols_t();
        let n = self.columns();
        let (cp, k, hw) = (
            self.shape.channel_params(),
            self.shape.kernel_len(),
            self.shape.spatial(),
        );
        let c_out = self.shape.out_channels;
        self.clean.z0.resize(c_out * n, 0.0);
        // Runs of up to four consecutive stale channels.
        let mut groups = Vec::new();
        let mut c = 0;
        while c < c_out {
            if !self.clean.z_stale[c] {
                c += 1;
                continue;
            }
            let start = c;
            while c < c_out && self.clean.z_stale[c] && c - start < DIRECTIONS_AT_ONCE {
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
                    &self.unfolded.cols_t,
                    (ld, n0),
                    &mut self.clean.z0[g.start * n + n0..],
                    (len, n),
                );
                for c in g.clone() {
                    let bias = self.params[c * cp + k];
                    self.clean.z0[c * n + n0..][..len]
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
                self.clean.z0_stats[c] = (mean, var);
                self.clean.z_stale[c] = false;
            }
        }
    }

    /// `a · s`, `s` the transposed unfolded input's row sums (f64).
    pub(super) fn tap_dot(&self, a: &[f32]) -> f64 {
        a.iter()
            .zip(&self.unfolded.tap_sum)
            .map(|(&a, s)| a as f64 * s)
            .sum()
    }

    /// `aᵀ G b`, `G` the transposed unfolded input's Gram matrix (f64).
    pub(super) fn tap_form(&self, a: &[f32], b: &[f32]) -> f64 {
        let k = a.len();
        a.iter()
            .zip(self.unfolded.tap_gram.chunks_exact(k))
            .map(|(&a, row)| a as f64 * b.iter().zip(row).map(|(&b, g)| b as f64 * g).sum::<f64>())
            .sum()
    }

    /// The transposed unfolded input's row sums and Gram matrix (once per batch, for the batch
    /// statistics and moments of the taps path), in f64 (the products of f32 values are exact
    /// there, and the variances taken from them difference large sums), accumulated by tiles
    /// so that the rows being multiplied stay in cache.
    pub(super) fn ensure_gram(&mut self) {
        if self.unfolded.gram_ready {
            return;
        }
        let (n, k) = (self.columns(), self.shape.kernel_len());
        let ld = cols_t_stride(n);
        self.unfolded.tap_sum.clear();
        self.unfolded.tap_sum.resize(k, 0.0);
        self.unfolded.tap_gram.clear();
        self.unfolded.tap_gram.resize(k * k, 0.0);
        let ones = vec![1.0f32; TILE_COLUMNS.min(n)];
        for n0 in (0..n).step_by(ones.len()) {
            let len = ones.len().min(n - n0);
            for t in 0..k {
                let a = &self.unfolded.cols_t[t * ld + n0..][..len];
                self.unfolded.tap_sum[t] += dot_f64(a, &ones);
                for u in t..k {
                    let g = dot_f64(a, &self.unfolded.cols_t[u * ld + n0..][..len]);
                    self.unfolded.tap_gram[t * k + u] += g;
                    if u != t {
                        self.unfolded.tap_gram[u * k + t] += g;
                    }
                }
            }
        }
        self.unfolded.gram_ready = true;
    }

    /// The unfolded input transposed (C_in*9 x B*HW, row `ci*9 + kh*3 + kw` the input shifted
    /// by that tap, 0 outside the image), for the fast path of a small kernel: a run of a
    /// direction's contribution is then a sum of C_in*9 scaled contiguous runs.
    pub(super) fn ensure_cols_t(&mut self) {
        if self.unfolded.cols_t_ready {
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
        self.unfolded.cols_t.clear();
        self.unfolded.cols_t.resize(k * ld, 0.0);
        for (tap, row) in self.unfolded.cols_t.chunks_exact_mut(ld).enumerate() {
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
        self.unfolded.gram_ready = false;
        self.unfolded.cols_t_ready = true;
    }
}

/// The row stride of the transposed unfolded input for `n` columns: padded so that the taps'
/// rows, read side by side, do not fall on the same cache sets (B*HW is often a multiple of
/// 1024 floats, and nine such rows would thrash an 8-way L1).
pub(super) fn cols_t_stride(n: usize) -> usize {
    n + 16
}
