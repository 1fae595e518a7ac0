//! A fully connected layer with ReLU, as a physical device would hold it (thesis Appendix A,
//! Table 3: Linear + ReLU blocks).
//!
//! Parameters are flat: the weight matrix (n_out x n_in, row-major) then the bias (n_out), the
//! layout of PyTorch's `nn.Linear` and of the golden recordings.

use std::ops::Range;

use firmware_protocol::direction::step_with_vectors;
use firmware_protocol::{DirectionSeed, UpdateTerm};

use crate::direction_cache::DirectionCache;
use crate::matmul::matmul_a_bt;

/// What a simulated layer refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimError {
    #[error("expected {expected} parameters, got {got}")]
    ParameterCount { expected: usize, got: usize },
    #[error("input of {got} values is not a whole batch of {width}-wide rows")]
    InputShape { width: usize, got: usize },
    #[error("no input loaded")]
    NoInput,
    #[error("chunk {start}..{end} is outside the {count} parameters")]
    ChunkOutOfRange {
        start: usize,
        end: usize,
        count: usize,
    },
}

#[derive(Debug)]
pub struct DenseLayer {
    n_in: usize,
    n_out: usize,
    params: Vec<f32>,
    input: Vec<f32>,
    batch: usize,
    directions: DirectionCache,
    saved: Vec<f32>,
    scratch: Vec<f32>,
}

impl DenseLayer {
    /// A layer with all parameters zero; program it with [`DenseLayer::set_params`].
    pub fn new(n_in: usize, n_out: usize) -> Self {
        Self {
            n_in,
            n_out,
            params: vec![0.0; n_out * n_in + n_out],
            input: Vec::new(),
            batch: 0,
            directions: DirectionCache::default(),
            saved: Vec::new(),
            scratch: Vec::new(),
        }
    }

    pub fn n_in(&self) -> usize {
        self.n_in
    }

    pub fn n_out(&self) -> usize {
        self.n_out
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
        Ok(())
    }

    /// Caches a batch of inputs (batch x n_in, row-major) for the evaluations that follow.
    pub fn load_input(&mut self, x: &[f32]) -> Result<(), SimError> {
        if x.is_empty() || x.len() % self.n_in != 0 {
            return Err(SimError::InputShape {
                width: self.n_in,
                got: x.len(),
            });
        }
        self.input.clear();
        self.input.extend_from_slice(x);
        self.batch = x.len() / self.n_in;
        Ok(())
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// `out = ReLU(x Wᵀ + b)` on the cached input (batch x n_out).
    pub fn forward(&self, out: &mut Vec<f32>) -> Result<(), SimError> {
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        forward_with(
            &self.params,
            self.n_in,
            self.n_out,
            &self.input,
            self.batch,
            out,
        );
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

    /// Algorithm 1, lines 6-9, for each seed: perturb the chunk by `+eps v`, evaluate, by
    /// `-eps v`, evaluate, restore. The chunk is saved and copied back, so the parameters are
    /// bit-identical afterwards (adding `+eps, -2eps, +eps` in floating point would not be).
    /// Returns `(a+, a-)` per seed in `out`.
    pub fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), SimError> {
        self.check_chunk(&chunk)?;
        if self.batch == 0 {
            return Err(SimError::NoInput);
        }
        let len = chunk.len();
        self.directions.prepare(seeds, len);
        self.saved.clear();
        self.saved.extend_from_slice(&self.params[chunk.clone()]);
        out.resize_with(seeds.len(), Default::default);
        for (seed, (plus, minus)) in seeds.iter().zip(out.iter_mut()) {
            let v = self.directions.get(*seed, len).expect("prepared above");
            for sign in [1.0f32, -1.0] {
                for ((w, w0), vi) in self.params[chunk.clone()]
                    .iter_mut()
                    .zip(&self.saved)
                    .zip(v)
                {
                    *w = w0 + sign * eps * vi;
                }
                let target = if sign > 0.0 { &mut *plus } else { &mut *minus };
                forward_with(
                    &self.params,
                    self.n_in,
                    self.n_out,
                    &self.input,
                    self.batch,
                    target,
                );
            }
            self.params[chunk.clone()].copy_from_slice(&self.saved);
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
        self.scratch.resize(len, 0.0);
        let directions = &self.directions;
        let vectors = terms.iter().map(|t| {
            let v = directions.get(t.seed, len).expect("ensured above");
            (t.derivative, v)
        });
        step_with_vectors(&mut self.params[chunk], scale, vectors, &mut self.scratch);
        Ok(())
    }
}

/// `out = ReLU(x Wᵀ + b)` for parameters laid out as [`DenseLayer`] keeps them.
pub fn forward_with(
    params: &[f32],
    n_in: usize,
    n_out: usize,
    x: &[f32],
    batch: usize,
    out: &mut Vec<f32>,
) {
    let (w, b) = params.split_at(n_out * n_in);
    out.resize(batch * n_out, 0.0);
    for row in out.chunks_exact_mut(n_out) {
        row.copy_from_slice(b);
    }
    matmul_a_bt(batch, n_out, n_in, x, w, out, true);
    out.iter_mut().for_each(|a| *a = a.max(0.0));
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_protocol::direction::apply_update;

    fn layer() -> DenseLayer {
        let mut l = DenseLayer::new(6, 4);
        let p: Vec<f32> = (0..l.param_count())
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
            .collect();
        l.set_params(&p).unwrap();
        let x: Vec<f32> = (0..3 * 6)
            .map(|i| ((i * 5 % 7) as f32 - 3.0) / 3.0)
            .collect();
        l.load_input(&x).unwrap();
        l
    }

    #[test]
    fn forward_is_relu_of_affine_map() {
        let l = layer();
        let mut out = Vec::new();
        l.forward(&mut out).unwrap();
        let (w, b) = l.params().split_at(24);
        for s in 0..3 {
            for o in 0..4 {
                let z: f32 = (0..6)
                    .map(|i| l.input[s * 6 + i] * w[o * 6 + i])
                    .sum::<f32>()
                    + b[o];
                assert!((out[s * 4 + o] - z.max(0.0)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn perturbed_evaluation_restores_parameters_bit_for_bit() {
        let mut l = layer();
        let before = l.params().to_vec();
        let mut out = Vec::new();
        let seeds = [DirectionSeed(1), DirectionSeed(2), DirectionSeed(3)];
        l.evaluate_perturbed(3..20, &seeds, 1e-3, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(out[0].0 != out[0].1, "perturbation changed nothing");
        assert_eq!(
            before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            l.params().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn cached_update_equals_the_protocol_update() {
        let mut l = layer();
        let mut shadow = l.params().to_vec();
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
        l.evaluate_perturbed(
            2..17,
            &[DirectionSeed(11), DirectionSeed(12)],
            1e-3,
            &mut out,
        )
        .unwrap();
        l.apply_update(2..17, 0.3, &terms).unwrap();
        let (mut v, mut g) = (vec![0.0; 15], vec![0.0; 15]);
        apply_update(&mut shadow[2..17], 0.3, &terms, &mut v, &mut g);
        assert_eq!(shadow, l.params());
        assert_ne!(shadow[2], layer().params()[2]);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let mut l = DenseLayer::new(6, 4);
        assert_eq!(
            l.set_params(&[0.0; 3]),
            Err(SimError::ParameterCount {
                expected: 28,
                got: 3
            })
        );
        assert!(matches!(
            l.load_input(&[0.0; 7]),
            Err(SimError::InputShape { .. })
        ));
        assert_eq!(l.forward(&mut Vec::new()), Err(SimError::NoInput));
        assert!(matches!(
            l.apply_update(20..40, 1.0, &[]),
            Err(SimError::ChunkOutOfRange { .. })
        ));
    }
}
