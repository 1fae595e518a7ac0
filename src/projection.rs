//! The projection `M_l` (features x classes) that maps a layer's features to class goodness
//! `G_l = a_l M_l` (thesis eq. 1). It lives on the host only.

use std::ops::Range;

use pnn_sim::matmul::{View, gemm_into, matmul};

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
