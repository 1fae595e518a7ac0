//! A dense layer's cached input batch in the forms its products read: dense rows, sparse rows,
//! or a copy packed once per batch.

/// Inputs with at most this share of entries off their background value (normalised MNIST
/// images: about 19%) are multiplied as sparse rows on the fast path; denser ones (hidden ReLU
/// outputs, about 50%) by the dense product, which is faster there (measured on the MNIST
/// layer's shapes).
pub(super) const SPARSE_INPUT_DENSITY: f32 = 0.25;

use crate::matmul::{View, gemm_into};
use crate::packed::{PackedRows, packed_gemm_bt};
use crate::sparse::{Packed, SparseRows, sparse_gemm_bt};

/// The form in which the fast path's products read a layer's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum InputForm {
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
pub(super) struct LayerInput {
    /// Empty when the form is `Sparse`.
    pub(super) dense: Vec<f32>,
    pub(super) sparse: SparseRows,
    packed: PackedRows,
    pub(super) form: InputForm,
    /// Scratch of the sparse products.
    panels: Packed,
}

impl LayerInput {
    /// After `dense` is loaded: the fast path reads sparse rows where the input is mostly one
    /// value (as a device converted it), else a copy packed once for the batch's products.
    pub(super) fn choose_form(&mut self, fast: bool, batch: usize, n_in: usize) {
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
    pub(super) fn times_bt(
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
