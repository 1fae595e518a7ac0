//! The exact fast path of a conv block: per touched channel, the directions' contributions
//! `dz = v ⊛ x` by linearity, BatchNorm statistics from their moments, and the clean
//! pre-activation moved by an update.

use super::*;

impl ConvBlock {
    /// After an update along the directions of the last fast evaluation, whose contributions
    /// are still in `dz_rows`: the pre-activation is linear in the conv weights and bias, so the
    /// update `w -= scale sum_p dd_p v_p` moves it by `-scale sum_p dd_p (dz_p + v_b,p)`, a
    /// few additions per value where recomputing it would be a whole convolution. Exact up to
    /// float rounding (the product with the stored weights rounds `w - scale g` first, as the
    /// perturbed evaluations do `w ± eps v`). Falls back to marking the channels stale when an
    /// update term's seed was not evaluated.
    pub(super) fn move_preactivation(
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
            let z = &mut self.clean.z0[c * n..(c + 1) * n];
            for (q, &a) in coef.iter().enumerate() {
                if a == 0.0 {
                    continue;
                }
                let vb = self.fast.stacked[q * block + j * cp + k];
                let dz = &self.fast.dz_rows[self.fast.dz_at + (q * touched + j) * n..][..n];
                for (z, d) in z.iter_mut().zip(dz) {
                    *z += a * (d + vb);
                }
            }
            self.clean.z0_stats[c] = batch_stats(z);
            self.clean.z_stale[c] = false;
            self.clean.feat_stale[c] = true;
        }
    }

    /// Lays the directions out per touched channel (P x k x channel_params, zero where the chunk
    /// does not reach), so the fast path multiplies them as one matrix and both paths read the
    /// BatchNorm parts at fixed offsets.
    pub(super) fn stack_directions<'a>(
        &mut self,
        chunk: Range<usize>,
        vectors: impl IntoIterator<Item = &'a [f32]>,
    ) -> Result<Perturbation, SimError> {
        let cp = self.shape.channel_params();
        let channels = self.channels_of(&chunk);
        let block = channels.len() * cp;
        let offset = chunk.start - channels.start * cp;
        self.fast.stacked.clear();
        let mut count = 0;
        for v in vectors {
            if v.len() != chunk.len() {
                return Err(SimError::BufferLength {
                    what: "direction",
                    expected: chunk.len(),
                    got: v.len(),
                });
            }
            self.fast.stacked.resize((count + 1) * block, 0.0);
            self.fast.stacked[count * block + offset..][..v.len()].copy_from_slice(v);
            count += 1;
        }
        Ok(Perturbation {
            chunk,
            channels,
            offset,
            count,
        })
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
    pub(super) fn perturbed_fast(
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
        let with_z0 = !recompute && channels.clone().all(|c| self.clean.z_stale[c]);
        let group = if recompute {
            self.ensure_cols_t();
            *count
        } else {
            (FUSE_BUDGET / (touched * n))
                .saturating_sub(with_z0 as usize)
                .clamp(1, *count)
        };
        self.fast.dz_complete = !recompute && group == *count;
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
                plus.resize(self.clean.feat0.len(), 0.0);
                minus.resize(self.clean.feat0.len(), 0.0);
            } else {
                plus.clone_from(&self.clean.feat0);
                minus.clone_from(&self.clean.feat0);
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
            self.fast.affines.clear();
            for (j, c) in channels.clone().enumerate() {
                let (mean0, var0) = self.clean.z0_stats[c];
                let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
                for q in 0..in_group {
                    let v = &self.fast.stacked[(first + q) * block + j * cp..][..cp];
                    let (vb, vg, vs) = (v[k], v[k + 1], v[k + 2]);
                    let [s1, s2, s12] = self.fast.sums[j * in_group + q].map(|s| s / n as f64);
                    let (mean_dz, cov) = (s1, s12);
                    let var_dz = (s2 - mean_dz * mean_dz).max(0.0);
                    let affine = [1.0f32, -1.0].map(|sign| {
                        let step = sign * eps;
                        let s = step as f64;
                        let mean = mean0 + s * (mean_dz + vb as f64);
                        let var = (var0 + 2.0 * s * cov + s * s * var_dz).max(0.0);
                        bn_affine(mean, var, gamma + sign * eps * vg, beta + sign * eps * vs)
                    });
                    self.fast.affines.push(affine);
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
                self.scratch.y_scratch.resize(2 * in_group * len, 0.0);
                self.fast.f_scratch.resize(2 * in_group * samples * d, 0.0);
                for (j, c) in channels.clone().enumerate() {
                    let z0 = &self.clean.z0[c * n + n0..][..len];
                    for q0 in (0..in_group).step_by(DIRECTIONS_AT_ONCE) {
                        let rows = DIRECTIONS_AT_ONCE.min(in_group - q0);
                        if recompute {
                            self.fast.dz_tile.resize(rows * len, 0.0);
                            direction_contributions(
                                &self.fast.stacked[(first + q0) * block + j * cp..],
                                (rows, block, k),
                                &self.unfolded.cols_t,
                                (cols_t_stride(n), n0),
                                &mut self.fast.dz_tile[..rows * len],
                                (len, len),
                            );
                        }
                        for q in q0..q0 + rows {
                            let dz = if recompute {
                                &self.fast.dz_tile[(q - q0) * len..][..len]
                            } else {
                                &self.fast.dz_rows[self.fast.dz_at + (q * touched + j) * n + n0..]
                                    [..len]
                            };
                            let vb = self.fast.stacked[(first + q) * block + j * cp + k];
                            let (plus, minus) =
                                self.scratch.y_scratch[2 * q * len..][..2 * len].split_at_mut(len);
                            bn_relu_pair(
                                z0,
                                dz,
                                (eps, vb),
                                self.fast.affines[j * in_group + q],
                                plus,
                                minus,
                            );
                        }
                    }
                    gemm_into(
                        View::new(&self.scratch.y_scratch, 2 * in_group * samples, hw),
                        View::new(&self.projection[c * a_len..][..a_len], d, hw),
                        true,
                        &mut self.fast.f_scratch,
                        d,
                        false,
                    );
                    for (map, rows) in self.fast.f_scratch.chunks_exact(samples * d).enumerate() {
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
    pub(super) fn contributions_product(
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
        let directions = &self.fast.stacked[first * block..(first + in_group) * block];
        let (weights, z_rows) = if with_z0 {
            self.fast.fused_weights.clear();
            self.fast
                .fused_weights
                .extend_from_slice(&self.params[channels.start * cp..channels.end * cp]);
            self.fast.fused_weights.extend_from_slice(directions);
            (&self.fast.fused_weights[..], touched)
        } else {
            (directions, 0)
        };
        self.fast
            .dz_rows
            .resize((z_rows + in_group * touched) * n, 0.0);
        gemm_into(
            View {
                data: weights,
                rows: z_rows + in_group * touched,
                cols: k,
                ld: cp,
            },
            View::new(&self.unfolded.cols, n, k),
            true,
            &mut self.fast.dz_rows,
            n,
            false,
        );
        self.clean.z0.resize(self.shape.out_channels * n, 0.0);
        for (j, c) in channels.clone().take(z_rows).enumerate() {
            let bias = self.params[c * cp + k];
            let z = &mut self.clean.z0[c * n..(c + 1) * n];
            for (z, p) in z.iter_mut().zip(&self.fast.dz_rows[j * n..(j + 1) * n]) {
                *z = p + bias;
            }
            self.clean.z0_stats[c] = batch_stats(z);
            self.clean.z_stale[c] = false;
        }
        self.fast.dz_at = z_rows * n;
    }

    /// Pass 1 of the fast path for a large kernel: the moments of each (channel, direction)'s
    /// materialised `dz` (see [`perturbation_sums`]), by tiles of columns.
    pub(super) fn dz_moments(&mut self, channels: &Range<usize>, in_group: usize) {
        let n = self.columns();
        let hw = self.shape.spatial();
        let touched = channels.len();
        let tile_samples = (TILE_COLUMNS / hw).clamp(1, self.batch);
        self.fast.sums.clear();
        self.fast.sums.resize(touched * in_group, [0.0; 3]);
        for b0 in (0..self.batch).step_by(tile_samples) {
            let (n0, len) = (b0 * hw, tile_samples.min(self.batch - b0) * hw);
            for (j, c) in channels.clone().enumerate() {
                let z0 = &self.clean.z0[c * n + n0..][..len];
                let mean0 = self.clean.z0_stats[c].0;
                for q in 0..in_group {
                    let dz =
                        &self.fast.dz_rows[self.fast.dz_at + (q * touched + j) * n + n0..][..len];
                    let add = perturbation_sums(z0, dz, mean0);
                    for (s, a) in self.fast.sums[j * in_group + q].iter_mut().zip(add) {
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
    pub(super) fn tap_moments(
        &mut self,
        channels: &Range<usize>,
        first: usize,
        in_group: usize,
        block: usize,
    ) {
        let n = self.columns() as f64;
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        self.ensure_gram();
        self.fast.sums.clear();
        for (j, c) in channels.clone().enumerate() {
            let w = &self.params[c * cp..][..k];
            for q in 0..in_group {
                let v = &self.fast.stacked[(first + q) * block + j * cp..][..k];
                let (vs, ws) = (self.tap_dot(v), self.tap_dot(w));
                let (vgv, wgv) = (self.tap_form(v, v), self.tap_form(w, v));
                self.fast.sums.push([vs, vgv, wgv - ws * vs / n]);
            }
        }
    }
}
