//! The projection `M_l` (features x classes) that maps a layer's features to class goodness
//! `G_l = a_l M_l` (thesis eq. 1). It lives on the host only.

use pnn_sim::matmul::matmul;

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
}
