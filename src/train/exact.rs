//! Exact-gradient baselines for the simulated MLP, so a DD run can be read against its ceiling
//! (thesis section 4.5, the three training conditions):
//!
//! - [`Method::MfExact`]: Mono-Forward with analytic local gradients (the thesis' MF+AD): every
//!   layer's `W_l`, `b_l` and `M_l` step by SGD on its own local cross-entropy (eqs. 3-5), the
//!   activations passed on are not differentiated through (one forward pass of all layers, then
//!   every layer's step, as each block's own `torch.optim.SGD` does).
//! - [`Method::Bp`]: backpropagation through the same layers with a linear classifier head
//!   (Appendix A: "a single linear classifier head is appended after the final block"), plain SGD.
//!
//! Both compute gradients on the host from the weights, which a physical device cannot give: they
//! run on the ideal simulator's arithmetic only (`crate::run` refuses them on a device). The
//! products are `pnn_sim::matmul`'s; the loss is [`super::loss::cross_entropy`]'s definition.

use pnn_sim::matmul::{matmul, matmul_a_bt};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use super::evaluation::Evaluation;
use super::loss::argmax_rows;
use super::projection::Projection;
use crate::data::{Normalizer, Split};
use crate::model::InitialParams;
use crate::oracle::Activations;

/// How a run trains: MF+DD (the default: directional derivatives through the oracle), or one of
/// the exact-gradient baselines of this module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    #[default]
    Dd,
    MfExact,
    Bp,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Dd => "dd",
            Method::MfExact => "mf-exact",
            Method::Bp => "bp",
        })
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dd" => Ok(Method::Dd),
            "mf-exact" => Ok(Method::MfExact),
            "bp" => Ok(Method::Bp),
            other => Err(format!(
                "'{other}' is not a training method: expected dd, mf-exact or bp"
            )),
        }
    }
}

/// One dense layer `ReLU(x Wᵀ + b)`, parameters as `DenseLayer` lays them out (W row-major
/// `outputs x inputs`, then b).
#[derive(Clone, Debug)]
struct Dense {
    inputs: usize,
    outputs: usize,
    params: Vec<f32>,
}

impl Dense {
    /// `z = x Wᵀ + b` for `rows` inputs.
    fn preactivation(&self, x: &[f32], rows: usize, z: &mut Vec<f32>) {
        let (w, b) = self.params.split_at(self.outputs * self.inputs);
        z.clear();
        z.resize(rows * self.outputs, 0.0);
        matmul_a_bt(rows, self.outputs, self.inputs, x, w, z, false);
        for row in z.chunks_exact_mut(self.outputs) {
            row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
        }
    }

    /// `W -= lr dZᵀ x`, `b -= lr sum_rows dZ`; `dz` is `rows x outputs`.
    fn step(&mut self, x: &[f32], dz: &[f32], rows: usize, lr: f32, scratch: &mut Scratch) {
        let (n_in, n_out) = (self.inputs, self.outputs);
        transpose(dz, rows, n_out, &mut scratch.t);
        scratch.grad.resize(n_out * n_in, 0.0);
        matmul(n_out, n_in, rows, &scratch.t, x, &mut scratch.grad, false);
        let (w, b) = self.params.split_at_mut(n_out * n_in);
        w.iter_mut()
            .zip(&scratch.grad)
            .for_each(|(wi, g)| *wi -= lr * g);
        for (o, bo) in b.iter_mut().enumerate() {
            let g: f32 = (0..rows).map(|r| dz[r * n_out + o]).sum();
            *bo -= lr * g;
        }
    }
}

#[derive(Default)]
struct Scratch {
    t: Vec<f32>,
    grad: Vec<f32>,
}

/// `out (cols x rows) = aᵀ` for `a` (rows x cols).
fn transpose(a: &[f32], rows: usize, cols: usize, out: &mut Vec<f32>) {
    out.clear();
    out.resize(rows * cols, 0.0);
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = a[r * cols + c];
        }
    }
}

/// `dL/dG` of the mean cross-entropy over `rows` rows of `classes` logits: `(softmax - onehot) / rows`
/// (in f64 per row, as [`super::loss::cross_entropy`] computes the loss). Returns the loss.
fn cross_entropy_grad(g: &[f32], classes: usize, labels: &[u8], out: &mut Vec<f32>) -> f64 {
    let rows = labels.len();
    out.clear();
    out.resize(g.len(), 0.0);
    let mut loss = 0f64;
    for (r, (row, y)) in g.chunks_exact(classes).zip(labels).enumerate() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let denom: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        loss += denom.ln() + max - row[*y as usize] as f64;
        for (c, &v) in row.iter().enumerate() {
            let p = (v as f64 - max).exp() / denom;
            let target = if c == *y as usize { 1.0 } else { 0.0 };
            out[r * classes + c] = ((p - target) / rows as f64) as f32;
        }
    }
    loss / rows as f64
}

/// An MLP trained by one of the exact-gradient [`Method`]s.
pub struct ExactTrainer {
    method: Method,
    layers: Vec<Dense>,
    /// MF: each layer's `M_l`. BP: empty.
    projections: Vec<Projection>,
    /// BP: the linear head, `classes x last width` then `classes` biases.
    head: Dense,
    classes: usize,
    lr: f32,
    scratch: Scratch,
}

/// Seeds the head's initialisation apart from the layers'.
const HEAD_DOMAIN: u64 = 0x706E_6E2D_6865_6164; // "pnn-head"

impl ExactTrainer {
    /// The model of `init` (the DD run's initial parameters, so the two start alike), dense layers
    /// of `widths` (input width first); BP's head drawn as PyTorch's `nn.Linear` default,
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub fn new(method: Method, widths: &[usize], init: InitialParams, lr: f32, seed: u64) -> Self {
        assert!(method != Method::Dd, "MF+DD trains through the oracles");
        let classes = init.projections.first().map_or(0, |p| p.classes);
        let layers: Vec<Dense> = (widths.windows(2).zip(init.layers))
            .map(|(w, params)| Dense {
                inputs: w[0],
                outputs: w[1],
                params,
            })
            .collect();
        let last = *widths.last().expect("at least the input width");
        let bound = 1.0 / (last as f32).sqrt();
        let mut rng =
            ChaCha8Rng::seed_from_u64(firmware_protocol::direction::mix(seed ^ HEAD_DOMAIN));
        let head = Dense {
            inputs: last,
            outputs: classes,
            params: (0..classes * last + classes)
                .map(|_| rng.random_range(-bound..bound))
                .collect(),
        };
        Self {
            method,
            layers,
            projections: if method == Method::MfExact {
                init.projections
            } else {
                Vec::new()
            },
            head,
            classes,
            lr,
            scratch: Scratch::default(),
        }
    }

    /// One SGD step on a batch. Returns each layer's local loss (MF) or the head's loss (BP).
    pub fn train_batch(&mut self, input: &Activations, labels: &[u8]) -> Vec<f64> {
        let rows = input.rows;
        // The forward pass, every layer's pre-activation and output kept.
        let mut xs: Vec<Vec<f32>> = vec![input.data.clone()];
        let mut zs: Vec<Vec<f32>> = Vec::new();
        for layer in &self.layers {
            let mut z = Vec::new();
            layer.preactivation(xs.last().unwrap(), rows, &mut z);
            xs.push(z.iter().map(|v| v.max(0.0)).collect());
            zs.push(z);
        }
        let c = self.classes;
        let (mut g, mut dg, mut da) = (Vec::new(), Vec::new(), Vec::new());
        match self.method {
            Method::MfExact => {
                let mut losses = Vec::new();
                for (l, (layer, m)) in self
                    .layers
                    .iter_mut()
                    .zip(&mut self.projections)
                    .enumerate()
                {
                    let (a, n) = (&xs[l + 1], layer.outputs);
                    g.resize(rows * c, 0.0);
                    matmul(rows, c, n, a, &m.data, &mut g, false);
                    losses.push(cross_entropy_grad(&g, c, labels, &mut dg));
                    // dA = dG Mᵀ, dZ = dA where z > 0; dM = Aᵀ dG.
                    da.resize(rows * n, 0.0);
                    matmul_a_bt(rows, n, c, &dg, &m.data, &mut da, false);
                    da.iter_mut()
                        .zip(&zs[l])
                        .for_each(|(d, z)| *d = if *z > 0.0 { *d } else { 0.0 });
                    let s = &mut self.scratch;
                    transpose(a, rows, n, &mut s.t);
                    s.grad.resize(n * c, 0.0);
                    matmul(n, c, rows, &s.t, &dg, &mut s.grad, false);
                    let lr = self.lr;
                    m.data
                        .iter_mut()
                        .zip(&s.grad)
                        .for_each(|(mi, gi)| *mi -= lr * gi);
                    layer.step(&xs[l], &da, rows, lr, s);
                }
                losses
            }
            Method::Bp => {
                let last = xs.last().unwrap();
                self.head.preactivation(last, rows, &mut g);
                let loss = cross_entropy_grad(&g, c, labels, &mut dg);
                // Backwards: the head, then each layer, dX = dZ W before W steps.
                let mut dx = Vec::new();
                let w = &self.head.params[..c * self.head.inputs];
                dx.resize(rows * self.head.inputs, 0.0);
                matmul(rows, self.head.inputs, c, &dg, w, &mut dx, false);
                self.head.step(last, &dg, rows, self.lr, &mut self.scratch);
                for l in (0..self.layers.len()).rev() {
                    let mut dz = dx;
                    dz.iter_mut()
                        .zip(&zs[l])
                        .for_each(|(d, z)| *d = if *z > 0.0 { *d } else { 0.0 });
                    let layer = &mut self.layers[l];
                    dx = vec![0.0; rows * layer.inputs];
                    if l > 0 {
                        let w = &layer.params[..layer.outputs * layer.inputs];
                        matmul(rows, layer.inputs, layer.outputs, &dz, w, &mut dx, false);
                    }
                    layer.step(&xs[l], &dz, rows, self.lr, &mut self.scratch);
                }
                vec![loss]
            }
            Method::Dd => unreachable!("refused in new"),
        }
    }

    /// Test figures: MF's both prediction modes (section 4.1) and every layer's, or BP's head
    /// (its one prediction, reported as both modes).
    pub fn evaluate(
        &self,
        split: &Split,
        normalizer: &Normalizer,
        batch_size: usize,
    ) -> Evaluation {
        let c = self.classes;
        let heads = if self.method == Method::Bp {
            1
        } else {
            self.layers.len()
        };
        let (mut correct, mut loss) = (vec![0usize; heads], vec![0f64; heads]);
        let (mut correct_cum, mut loss_cum) = (0usize, 0f64);
        let mut input = Activations::default();
        let (mut z, mut g, mut dg) = (Vec::new(), Vec::new(), Vec::new());
        let indices: Vec<usize> = (0..split.len()).collect();
        for batch in indices.chunks(batch_size.max(1)) {
            normalizer.batch_activations(split, batch, &mut input);
            let labels: Vec<u8> = batch.iter().map(|&i| split.labels[i]).collect();
            let rows = batch.len();
            let mut x = input.data.clone();
            let mut cumulative = vec![0f32; rows * c];
            for (l, layer) in self.layers.iter().enumerate() {
                layer.preactivation(&x, rows, &mut z);
                x = z.iter().map(|v| v.max(0.0)).collect();
                if let Some(m) = self.projections.get(l) {
                    g.resize(rows * c, 0.0);
                    matmul(rows, c, layer.outputs, &x, &m.data, &mut g, false);
                    loss[l] += cross_entropy_grad(&g, c, &labels, &mut dg) * rows as f64;
                    correct[l] += count_correct(&g, c, &labels);
                    cumulative.iter_mut().zip(&g).for_each(|(s, v)| *s += v);
                }
            }
            if self.method == Method::Bp {
                self.head.preactivation(&x, rows, &mut g);
                cumulative.clone_from(&g);
                loss[0] += cross_entropy_grad(&g, c, &labels, &mut dg) * rows as f64;
                correct[0] += count_correct(&g, c, &labels);
            }
            loss_cum += cross_entropy_grad(&cumulative, c, &labels, &mut dg) * rows as f64;
            correct_cum += count_correct(&cumulative, c, &labels);
        }
        let n = split.len().max(1) as f64;
        let last = heads - 1;
        Evaluation {
            accuracy_cumulative: correct_cum as f64 / n,
            accuracy_final_layer: correct[last] as f64 / n,
            loss_cumulative: loss_cum / n,
            loss_final_layer: loss[last] / n,
            accuracy_per_layer: correct.iter().map(|&k| k as f64 / n).collect(),
            loss_per_layer: loss.iter().map(|&l| l / n).collect(),
        }
    }

    /// Layer `l`'s parameters (W row-major, then b).
    pub fn layer_params(&self, l: usize) -> &[f32] {
        &self.layers[l].params
    }

    /// SHA-256 of every layer's parameters, then the projections (MF) or the head (BP), as
    /// little-endian f32 bytes.
    pub fn weights_sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let heads: Vec<&[f32]> = if self.method == Method::Bp {
            vec![&self.head.params]
        } else {
            self.projections.iter().map(|p| &p.data[..]).collect()
        };
        for values in (self.layers.iter().map(|l| &l.params[..])).chain(heads) {
            values.iter().for_each(|w| h.update(w.to_le_bytes()));
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn count_correct(g: &[f32], classes: usize, labels: &[u8]) -> usize {
    argmax_rows(g, classes)
        .zip(labels)
        .filter(|(p, y)| *p == **y as usize)
        .count()
}
