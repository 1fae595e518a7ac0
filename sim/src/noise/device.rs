//! One layer's [`Device`]: a [`NoiseModel`] with its fixed faults drawn (stuck devices, gains,
//! drift exponents), its state (programming error, write times, clock) and its seeded random
//! streams; the arithmetic of every effect (see the module docs of [`crate::noise`]).

use std::ops::Range;
use std::sync::Mutex;

use firmware_protocol::direction::mix;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

use super::{Effects, NoiseModel, Quantizer};
use crate::matmul::matmul_a_bt;

// Domains that separate the device's random streams, so that switching one effect on or off
// leaves the draws of every other unchanged.
const STUCK: u64 = 0x7374_7563_6b00_0001;
const GAIN: u64 = 0x6761_696e_0000_0002;
const PROGRAM: u64 = 0x7072_6f67_0000_0003;
const INPUT: u64 = 0x696e_7075_7400_0004;
const READ: u64 = 0x7265_6164_0000_0005;
const OUTPUT: u64 = 0x6f75_7470_7574_0006;
const DRIFT: u64 = 0x6472_6966_7400_0007;

/// The device seed of layer `layer` (0-based) of a model on devices of a profile whose noise
/// seed is `profile_seed`: every backend that serves a profile (the in-process simulator, the
/// emulator) derives its layers' seeds this way, so they draw the same faults and noise.
pub fn layer_seed(profile_seed: u64, layer: usize) -> u64 {
    mix(profile_seed ^ mix(layer as u64 + 1))
}

fn stream(seed: u64, domain: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(seed) ^ domain))
}

/// The per-forward random streams (behind a lock so that a clean forward can take `&self`).
#[derive(Debug)]
struct Streams {
    input: ChaCha8Rng,
    read: ChaCha8Rng,
    output: ChaCha8Rng,
}

/// One layer's device: the [`NoiseModel`] with its fixed faults drawn and its state.
#[derive(Debug)]
pub struct Device {
    model: NoiseModel,
    /// `model.effects()`, which the fast-path predicates read.
    effects: Effects,
    n_weights: usize,
    /// Stuck value per weight (NaN where not stuck); empty without stuck faults.
    stuck: Vec<f32>,
    /// Gain per weight; empty without gain mismatch.
    gain: Vec<f32>,
    /// `1 + σ_p δ` per weight, redrawn at each write; empty without programming error.
    program_factor: Vec<f32>,
    /// Time of the last write of each weight, and its drift factor now; empty without drift.
    written_at: Vec<f64>,
    drift_factor: Vec<f32>,
    /// Drift exponent per weight; empty when every weight has the profile's `nu`.
    nu: Vec<f32>,
    now: f64,
    /// The weight quantiser in force (per-tensor ones change at writes).
    weight_quantizer: Option<Quantizer>,
    program_rng: ChaCha8Rng,
    streams: Mutex<Streams>,
}

impl Device {
    /// The device of a layer with `n_weights` weights, its faults and streams keyed by `seed`.
    pub fn new(model: &NoiseModel, n_weights: usize, seed: u64) -> Self {
        let stuck = match &model.stuck {
            Some(s) if s.fraction > 0.0 => {
                let mut rng = stream(seed, STUCK);
                (0..n_weights)
                    .map(|_| {
                        let hit = rng.random::<f32>() < s.fraction;
                        let which = rng.random_range(0..s.values.len());
                        if hit { s.values[which] } else { f32::NAN }
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let gain = if model.gain_mismatch > 0.0 {
            let mut rng = stream(seed, GAIN);
            (0..n_weights)
                .map(|_| 1.0 + model.gain_mismatch * rng.sample::<f32, _>(StandardNormal))
                .collect()
        } else {
            Vec::new()
        };
        let drifts = model.drifts();
        let nu = match model.drift {
            Some(d) if d.nu_std > 0.0 => {
                let mut rng = stream(seed, DRIFT);
                (0..n_weights)
                    .map(|_| (d.nu + d.nu_std * rng.sample::<f32, _>(StandardNormal)).abs())
                    .collect()
            }
            _ => Vec::new(),
        };
        Self {
            nu,
            n_weights,
            stuck,
            gain,
            program_factor: if model.programming_error > 0.0 {
                vec![1.0; n_weights]
            } else {
                Vec::new()
            },
            written_at: if drifts {
                vec![0.0; n_weights]
            } else {
                Vec::new()
            },
            drift_factor: if drifts {
                vec![1.0; n_weights]
            } else {
                Vec::new()
            },
            now: 0.0,
            weight_quantizer: match (model.weight_bits, model.weight_clip) {
                (Some(b), Some(c)) => Some(Quantizer::converter(b, c)),
                _ => None,
            },
            program_rng: stream(seed, PROGRAM),
            streams: Mutex::new(Streams {
                input: stream(seed, INPUT),
                read: stream(seed, READ),
                output: stream(seed, OUTPUT),
            }),
            effects: model.effects(),
            model: model.clone(),
        }
    }

    pub fn model(&self) -> &NoiseModel {
        &self.model
    }

    /// Simulated seconds since the device was made.
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Whether weight `i` is stuck, and at what.
    pub fn stuck_at(&self, i: usize) -> Option<f32> {
        self.stuck.get(i).copied().filter(|v| !v.is_nan())
    }

    /// The fixed gain of weight `i` (1 without gain mismatch).
    pub fn gain(&self, i: usize) -> f32 {
        self.gain.get(i).copied().unwrap_or(1.0)
    }

    /// Whether the effective weights equal the targets (no weight map, [`NoiseModel::effects`]).
    pub fn weights_identity(&self) -> bool {
        !self.effects.linear_weight_map && !self.effects.nonlinear_weight_map
    }

    /// Whether the effective weight is linear in the target (no clipping, no quantisation), so a
    /// perturbation `±eps v` of the targets is `±eps s v` of the effective weights.
    pub fn weights_linear(&self) -> bool {
        !self.effects.nonlinear_weight_map
    }

    /// Whether a forward pass needs a full product with fresh noise (input or read noise), which
    /// the linear fast path cannot share between evaluations.
    pub fn needs_full_forward(&self) -> bool {
        self.effects.per_evaluation_draw
    }

    /// Whether anything happens between the pre-activation and the ReLU.
    pub fn has_output_stage(&self) -> bool {
        self.effects.output_transform
    }

    /// The DAC, applied once to a loaded batch.
    pub fn convert_input(&self, x: &mut [f32]) {
        if let Some(c) = &self.model.dac {
            x.iter_mut().for_each(|v| *v = c.convert(*v));
        }
    }

    /// The effective weight of weight `i` when its target is `w`.
    #[inline]
    pub fn effective(&self, i: usize, w: f32) -> f32 {
        if let Some(&s) = self.stuck.get(i)
            && !s.is_nan()
        {
            return s;
        }
        let mut e = w;
        if let Some(c) = self.model.weight_clip {
            e = e.clamp(-c, c);
        }
        if let Some(q) = &self.weight_quantizer {
            e = q.apply(e);
        }
        if let Some(p) = self.program_factor.get(i) {
            e *= p;
        }
        if let Some(d) = self.drift_factor.get(i) {
            e *= d;
        }
        if let Some(g) = self.gain.get(i) {
            e *= g;
        }
        e
    }

    /// `d effective / d target` of weight `i` where the map is linear ([`Self::weights_linear`]).
    #[inline]
    pub fn slope(&self, i: usize) -> f32 {
        if self.stuck_at(i).is_some() {
            return 0.0;
        }
        self.program_factor.get(i).copied().unwrap_or(1.0)
            * self.drift_factor.get(i).copied().unwrap_or(1.0)
            * self.gain(i)
    }

    /// Effective weights of `targets` (all weights of the layer) over `range`, into `out[range]`.
    pub fn effective_range(&self, targets: &[f32], range: Range<usize>, out: &mut [f32]) {
        for i in range {
            out[i] = self.effective(i, targets[i]);
        }
    }

    /// A write of `range` of the weights (`targets` holds them all): draws the programming error
    /// of the range and restarts its drift clock. Returns the range whose effective weights
    /// changed (all of them when a per-tensor quantisation scale moved).
    pub fn program(&mut self, targets: &[f32], range: Range<usize>) -> Range<usize> {
        if !self.program_factor.is_empty() {
            let sigma = self.model.programming_error;
            for f in &mut self.program_factor[range.clone()] {
                *f = 1.0 + sigma * self.program_rng.sample::<f32, _>(StandardNormal);
            }
        }
        if !self.written_at.is_empty() {
            self.written_at[range.clone()].fill(self.now);
            self.drift_factor[range.clone()].fill(1.0);
        }
        if let (Some(bits), None) = (self.model.weight_bits, self.model.weight_clip) {
            let max = targets.iter().fold(0f32, |m, w| m.max(w.abs()));
            let q = Some(Quantizer::symmetric(bits, max));
            if q != self.weight_quantizer {
                self.weight_quantizer = q;
                return 0..self.n_weights;
            }
        }
        range
    }

    /// Advances the device clock; returns whether any effective weight changed (drift).
    pub fn advance(&mut self, seconds: f64) -> bool {
        if seconds <= 0.0 {
            return false;
        }
        self.now += seconds;
        let Some(drift) = self.model.drift.filter(|_| self.model.drifts()) else {
            return false;
        };
        // Weights written together share their age: its log is computed once per run.
        let mut last = (f64::NAN, 0.0f64);
        for (i, (f, &t)) in self
            .drift_factor
            .iter_mut()
            .zip(&self.written_at)
            .enumerate()
        {
            if t != last.0 {
                last = (t, ((self.now - t).max(drift.t0) / drift.t0).ln());
            }
            let nu = self.nu.get(i).copied().unwrap_or(drift.nu) as f64;
            *f = (-nu * last.1).exp() as f32;
        }
        true
    }

    /// The clock tick of one loaded batch.
    pub fn tick(&mut self) -> bool {
        match self.model.drift {
            Some(d) => self.advance(d.seconds_per_batch),
            None => false,
        }
    }

    /// A whole forward pass on the device: `out = ReLU(ADC(nl(noisy(x e^T + b))))` (see the
    /// module docs). `x` is the converted input (batch x n_in), `weights` the effective weights.
    pub fn forward(
        &self,
        weights: &[f32],
        bias: &[f32],
        x: &[f32],
        batch: usize,
        out: &mut Vec<f32>,
    ) {
        let n_out = bias.len();
        let n_in = weights.len() / n_out.max(1);
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let noisy_input;
        let x = if self.model.input_noise > 0.0 {
            let std = self.model.input_noise_std();
            noisy_input = x
                .iter()
                .map(|v| v + std * streams.input.sample::<f32, _>(StandardNormal))
                .collect::<Vec<f32>>();
            &noisy_input[..]
        } else {
            x
        };
        out.resize(batch * n_out, 0.0);
        for row in out.chunks_exact_mut(n_out) {
            row.copy_from_slice(bias);
        }
        matmul_a_bt(batch, n_out, n_in, x, weights, out, true);
        if self.model.read_noise > 0.0 {
            // Each sample's read draws every weight anew: e (1 + σ ξ). Summed over the inputs,
            // that is one Gaussian per output of std σ sqrt(Σ_j (x_j e_j)²), drawn here.
            let x2: Vec<f32> = x.iter().map(|v| v * v).collect();
            let w2: Vec<f32> = weights.iter().map(|v| v * v).collect();
            let mut var = vec![0f32; batch * n_out];
            matmul_a_bt(batch, n_out, n_in, &x2, &w2, &mut var, false);
            let sigma = self.model.read_noise;
            for (z, v) in out.iter_mut().zip(&var) {
                *z += sigma * v.max(0.0).sqrt() * streams.read.sample::<f32, _>(StandardNormal);
            }
        }
        self.output_stage_with(out, &mut streams.output);
        out.iter_mut().for_each(|a| *a = a.max(0.0));
    }

    /// Output noise, nonlinearity and ADC on pre-activations (batch x n_out, row-major).
    pub fn output_stage(&self, z: &mut [f32]) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        self.output_stage_with(z, &mut streams.output);
    }

    fn output_stage_with(&self, z: &mut [f32], rng: &mut ChaCha8Rng) {
        let m = &self.model;
        if m.output_noise > 0.0 {
            let std = m.output_noise_std();
            z.iter_mut()
                .for_each(|v| *v += std * rng.sample::<f32, _>(StandardNormal));
        }
        if m.nonlinearity > 0.0 {
            let n = m.nonlinearity;
            z.iter_mut().for_each(|v| *v /= 1.0 + n * v.abs());
        }
        if let Some(c) = &m.adc {
            z.iter_mut().for_each(|v| *v = c.convert(*v));
        }
    }
}
