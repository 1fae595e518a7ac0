//! The projection `M_l` (features x classes) that maps a layer's features to class goodness
//! `G_l = a_l M_l` (thesis eq. 1), and its training (Algorithm 1, lines 14-24). It lives on the
//! host only.

use std::ops::Range;

use firmware_protocol::DirectionSeed;
use firmware_protocol::direction::fill_direction;
use pnn_sim::matmul::{View, gemm_into, matmul};

use super::estimator::{Difference, central_difference, forward_difference};
use super::loss::cross_entropy;
use super::update::{ProjectionStep, UpdateRule};
use crate::oracle::Activations;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Projection {
    pub rows: usize,
    pub classes: usize,
    /// rows x classes, row-major.
    pub data: Vec<f32>,
}

impl Projection {
    pub fn new(rows: usize, classes: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            rows * classes,
            "projection: shape and data disagree"
        );
        Self {
            rows,
            classes,
            data,
        }
    }

    /// `out = features · M` (batch x classes).
    pub fn goodness(&self, features: &Activations, out: &mut Vec<f32>) {
        assert_eq!(
            features.width, self.rows,
            "features do not match the projection"
        );
        out.clear();
        out.resize(features.rows * self.classes, 0.0);
        matmul(
            features.rows,
            self.classes,
            self.rows,
            &features.data,
            &self.data,
            out,
            false,
        );
    }

    /// `out = features[:, outside] · M[outside, :]`, `outside` every column but `touched`: the
    /// goodness that a chunk touching only `touched` leaves as it is.
    pub fn goodness_outside(
        &self,
        features: &Activations,
        touched: &Range<usize>,
        out: &mut Vec<f32>,
    ) {
        assert_eq!(
            features.width, self.rows,
            "features do not match the projection"
        );
        out.clear();
        out.resize(features.rows * self.classes, 0.0);
        let mut first = true;
        for cols in [0..touched.start, touched.end..self.rows] {
            if cols.is_empty() {
                continue;
            }
            let a = View {
                data: &features.data[cols.start..],
                rows: features.rows,
                cols: cols.len(),
                ld: features.width,
            };
            let m = View::new(
                &self.data[cols.start * self.classes..cols.end * self.classes],
                cols.len(),
                self.classes,
            );
            gemm_into(a, m, false, out, self.classes, !first);
            first = false;
        }
    }

    /// `out += a · M[touched, :]` for `a` the touched columns of features: `rows` rows of
    /// `touched.len()` values at row stride `ld` in `data`.
    pub fn add_goodness_of(
        &self,
        data: &[f32],
        rows: usize,
        ld: usize,
        touched: &Range<usize>,
        out: &mut [f32],
    ) {
        let a = View {
            data,
            rows,
            cols: touched.len(),
            ld,
        };
        let m = View::new(
            &self.data[touched.start * self.classes..touched.end * self.classes],
            touched.len(),
            self.classes,
        );
        gemm_into(a, m, false, out, self.classes, true);
    }
}

/// Buffers kept between batches.
#[derive(Default)]
pub struct Scratch {
    goodness: Vec<f32>,
    perturbed: Vec<f32>,
    delta: Vec<f32>,
    sub: Vec<f32>,
    u: Vec<Vec<f32>>,
    derivatives: Vec<f32>,
}

/// What one layer's `M_l` trains with.
pub struct ProjectionTraining<'a, R: ?Sized> {
    /// The layer's index in the model.
    pub layer: usize,
    /// The chunks of `M_l`, as row ranges.
    pub row_chunks: &'a [Range<usize>],
    /// Directions per chunk.
    pub directions: usize,
    pub eps: f32,
    /// Central or forward differences (forward: `L0` is the chunk's clean loss, free here).
    pub difference: Difference,
    pub lr: f32,
    /// The update rule that steps each chunk.
    pub rule: &'a mut R,
}

/// Lines 14-24: the chunks of `M_l` (whole rows), host only, on the features `a_l`. A perturbed
/// goodness is `G0 ± eps a_rows U`, exact by linearity and free of the rounding that adding
/// `eps u` to `M` first would cost. `seed_of(j, p)` names direction `p` of chunk `j`. Returns the
/// local loss before the update.
pub fn train_projection<R: UpdateRule + ?Sized>(
    projection: &mut Projection,
    t: ProjectionTraining<'_, R>,
    features: &Activations,
    labels: &[u8],
    seed_of: impl Fn(usize, usize) -> DirectionSeed,
    s: &mut Scratch,
) -> f64 {
    let classes = projection.classes;
    let batch = features.rows;
    projection.goodness(features, &mut s.goodness);
    let loss_before = cross_entropy(&s.goodness, classes, labels);
    s.u.resize_with(t.directions, Vec::new);
    for (j, rows) in t.row_chunks.iter().enumerate() {
        if j > 0 {
            projection.goodness(features, &mut s.goodness);
        }
        let l_zero = match t.difference {
            Difference::Central => 0.0,
            Difference::Forward if j == 0 => loss_before,
            Difference::Forward => cross_entropy(&s.goodness, classes, labels),
        };
        let n = rows.len() * classes;
        // The chunk's columns of a_l, contiguous (batch x rows).
        s.sub.clear();
        for row in features.data.chunks_exact(features.width) {
            s.sub.extend_from_slice(&row[rows.clone()]);
        }
        s.derivatives.clear();
        for (p, u) in s.u.iter_mut().enumerate() {
            u.resize(n, 0.0);
            fill_direction(seed_of(j, p), u);
            s.delta.resize(batch * classes, 0.0);
            matmul(batch, classes, rows.len(), &s.sub, u, &mut s.delta, false);
            let mut loss_at = |sign: f32| {
                s.perturbed.clear();
                s.perturbed.extend(
                    s.goodness
                        .iter()
                        .zip(&s.delta)
                        .map(|(g, d)| g + sign * t.eps * d),
                );
                cross_entropy(&s.perturbed, classes, labels)
            };
            s.derivatives.push(match t.difference {
                Difference::Central => {
                    let (l_plus, l_minus) = (loss_at(1.0), loss_at(-1.0));
                    central_difference(l_plus, l_minus, t.eps)
                }
                Difference::Forward => forward_difference(loss_at(1.0), l_zero, t.eps),
            });
        }
        let step = ProjectionStep {
            layer: t.layer,
            chunk_index: j,
            derivatives: &s.derivatives,
            directions: &s.u,
            lr: t.lr,
        };
        let m_chunk = &mut projection.data[rows.start * classes..rows.end * classes];
        t.rule.step_projection(&step, m_chunk);
    }
    loss_before
}
