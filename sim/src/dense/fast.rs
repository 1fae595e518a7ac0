//! The exact fast path of a dense layer (see [`crate::Choreography::Fast`]): all P directions
//! of a chunk in one product, only the touched outputs moved, and the clean pre-activation moved
//! by an update instead of recomputed.

use std::ops::Range;

use firmware_protocol::{DirectionSeed, UpdateTerm};

use super::DenseLayer;
use crate::matmul::View;

/// Where a chunk lies in the layer and how its products are laid out: what every step of the
/// fast path reads.
struct Plan {
    /// The outputs whose pre-activation the chunk moves.
    outputs: Range<usize>,
    /// The rows of `W` the chunk covers, the only ones its product needs (a chunk that reaches
    /// into the bias touches every output, but through the bias alone outside these rows).
    rows: Range<usize>,
    /// The chunk's part in `W` (flat indices) and in the bias (output indices).
    weight_part: Range<usize>,
    bias_part: Range<usize>,
    /// What `±eps v` of the targets does to the effective weights, exactly: `±eps s v` where
    /// the device's map is linear (s = 1 on an ideal device: one block per direction), else
    /// `e(w ± eps v) - e(w)` (clipping, quantisation: one block per direction and sign).
    linear: bool,
    blocks: usize,
    /// Where the device computes with the targets themselves, the directions are drawn straight
    /// into the stacked layout ([`DenseLayer::direction_layout`]: offset, stride) and the product
    /// runs on the cache's buffer; a chunk's bias part (after the last row of W) then lies in
    /// extra rows, whose products are computed and not used.
    layout: Option<(usize, usize)>,
    /// Rows of the product per block.
    kk: usize,
}

impl DenseLayer {
    /// The exact fast path (see [`crate::Choreography::Fast`]); the parameters are never
    /// written. `compact`: each result holds the touched outputs only.
    pub(super) fn perturbed_fast(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
        compact: bool,
    ) {
        self.refresh_preactivation();
        let plan = self.plan(&chunk, seeds.len());
        self.stack_directions(&plan, &chunk, seeds, eps);
        self.direction_products(&plan);
        self.perturbed_outputs(&plan, &chunk, seeds, eps, out, compact);
        if self.device.is_none() {
            self.last_fast = Some((chunk, seeds.to_vec()));
        }
    }

    fn plan(&self, chunk: &Range<usize>, p_count: usize) -> Plan {
        let nw = self.n_out * self.n_in;
        let rows = self.weight_rows_of(chunk);
        let linear = self.device.as_deref().is_none_or(|d| d.weights_linear());
        let layout = self.direction_layout(chunk);
        Plan {
            outputs: self.outputs_of(chunk),
            kk: match layout {
                Some((_, stride)) => stride / self.n_in,
                None => rows.len(),
            },
            rows,
            weight_part: chunk.start.min(nw)..chunk.end.min(nw),
            bias_part: chunk.start.max(nw) - nw..chunk.end.max(nw) - nw,
            linear,
            blocks: if linear { p_count } else { 2 * p_count },
            layout,
        }
    }

    /// Step 1: the directions drawn, and the weight part of each (as the device's effective
    /// weights see it) laid into (rows x n_in) blocks, stacked: straight into the cache's buffer
    /// where the plan lays them out, else into `stacked`.
    fn stack_directions(
        &mut self,
        plan: &Plan,
        chunk: &Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
    ) {
        let n_in = self.n_in;
        if let Some((offset, stride)) = plan.layout {
            self.directions
                .prepare_laid_out(seeds, chunk.len(), offset, stride);
            return;
        }
        let k = plan.rows.len();
        self.directions.prepare(seeds, chunk.len());
        self.stacked.clear();
        self.stacked.resize(plan.blocks * k * n_in, 0.0);
        let weight_part = plan.weight_part.clone();
        if weight_part.is_empty() {
            return;
        }
        let offset = weight_part.start.saturating_sub(plan.rows.start * n_in);
        let width = weight_part.len();
        let device = self
            .device
            .as_deref()
            .expect("the identity lays its directions out");
        for (p, seed) in seeds.iter().enumerate() {
            let v = self
                .directions
                .get(*seed, chunk.len())
                .expect("prepared above");
            let v = &v[..width];
            let block_at = |b: usize| b * k * n_in + offset..b * k * n_in + offset + width;
            if plan.linear {
                let block = &mut self.stacked[block_at(p)];
                for ((s, vi), i) in block.iter_mut().zip(v).zip(weight_part.clone()) {
                    *s = device.slope(i) * vi;
                }
            } else {
                for (b, sign) in [(2 * p, 1.0f32), (2 * p + 1, -1.0)] {
                    let block = &mut self.stacked[block_at(b)];
                    for ((s, vi), i) in block.iter_mut().zip(v).zip(weight_part.clone()) {
                        let w = self.params[i] + sign * eps * vi;
                        *s = device.effective(i, w) - self.effective[i];
                    }
                }
            }
        }
    }

    /// Step 2: `dz` (batch x blocks*kk) = x · stackedᵀ, one fused product for all directions.
    fn direction_products(&mut self, plan: &Plan) {
        let (n_in, batch) = (self.n_in, self.batch);
        let width = plan.blocks * plan.kk;
        self.dz.resize(batch * width, 0.0);
        self.dz_rows = plan.kk;
        if plan.weight_part.is_empty() {
            self.dz.iter_mut().for_each(|d| *d = 0.0);
            return;
        }
        let stacked = if plan.layout.is_some() {
            self.directions.laid_out()
        } else {
            &self.stacked
        };
        self.input.times_bt(
            batch,
            n_in,
            View::new(stacked, width, n_in),
            &mut self.dz,
            width,
            false,
        );
    }

    /// Step 3: each `(a+, a-)` from the clean pre-activation moved along its products and bias
    /// part over the touched outputs (the untouched ones clean, unless `compact`), through the
    /// device's output stage where it has one, then ReLU.
    fn perturbed_outputs(
        &self,
        plan: &Plan,
        chunk: &Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
        compact: bool,
    ) {
        let (n_out, batch) = (self.n_out, self.batch);
        let (outputs, blocks, kk, linear) = (&plan.outputs, plan.blocks, plan.kk, plan.linear);
        let k = plan.rows.len();
        let stage = self.device.as_deref().filter(|d| d.has_output_stage());
        let relu_now = stage.is_none();
        let mut bias_add = vec![0f32; outputs.len()];
        let mut dz_touched = vec![0f32; outputs.len()];
        let dz_at = plan.rows.start.saturating_sub(outputs.start);
        for (p, (seed, (plus, minus))) in seeds.iter().zip(out.iter_mut()).enumerate() {
            let v = self
                .directions
                .get(*seed, chunk.len())
                .expect("prepared by the caller");
            bias_over_outputs(
                &v[plan.weight_part.len()..],
                &plan.bias_part,
                outputs,
                &mut bias_add,
            );
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
    }
}

impl DenseLayer {
    /// After an update `W -= scale sum_p dd_p v_p` of the chunk just evaluated, `z0` moves by
    /// `-scale sum_p dd_p (x v_pᵀ)`, and every `x v_pᵀ` is in `dz` already: the clean
    /// pre-activation stays current without another product (equal to recomputing it up to
    /// float rounding; recomputed afresh for every batch).
    pub(super) fn move_preactivation(
        &mut self,
        chunk: &Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) {
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
