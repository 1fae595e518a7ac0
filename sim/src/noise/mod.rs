//! Hardware effects of a simulated device: what makes a physical layer differ from the clean
//! matrix `ReLU(x Wᵀ + b)`. A [`NoiseModel`] is read from the `noise` field of a device profile
//! (`devices/*.ron`); a [`Device`] is one layer's instance of it, with its fixed faults drawn and
//! its random streams seeded, and is what [`crate::DenseLayer`] computes through.
//!
//! Every effect is off by default and switched on by its own field. Units are the layer's own: the
//! inputs as the host sends them, the weights and bias as the host writes them, the outputs in
//! the units of `x Wᵀ + b`. Where a standard deviation is "relative to the bound", it is a fraction
//! of that converter's full scale (`bound`); without that converter, the bound is taken as 1.
//!
//! One forward pass on the device, per sample (rows of the batch are separate reads):
//! ```text
//! x_d  = DAC(x)                        clip to ±bound, then quantise (bits)       at load_input
//! x_a  = x_d + σ_in·B_dac·ξ            input noise, redrawn every forward
//! e_ij = effective weight (below)      fixed between writes and clock ticks
//! z_i  = Σ_j x_a_j e_ij + b_i          the bias is held digitally and exact
//!      + σ_r·sqrt(Σ_j (x_a_j e_ij)²)·ξ  read noise: e_ij(1 + σ_r ξ_ij) with ξ fresh per read
//!      + σ_out·B_adc·ξ                 output noise, redrawn every forward
//! y_i  = ADC(z_i / (1 + n|z_i|))       nonlinearity, then clip and quantise
//! a_i  = ReLU(y_i)
//! ```
//! The effective weight of a target `w` (the value the host wrote and its shadow tracks) is
//! `stuck_ij` for a stuck device, else `g_ij · d_ij(t) · (1 + σ_p δ_ij) · Q(clip(w))`: clipped to
//! `±weight_clip`, quantised to `weight_bits`, programmed with the relative error `δ` that is
//! drawn when the weight is written and kept until the next write, decayed by drift
//! `d(t) = (max(t, t0)/t0)^-nu` with `t` the time since that write, and scaled by the per-weight
//! gain `g = 1 + σ_g ξ` fixed at construction. The stored parameters stay the targets; only the
//! computation sees the effective weights.
//!
//! Simulated time: the device clock advances by `drift.seconds_per_batch` at every
//! `load_input` (one batch of one layer) and by [`Device::advance`]; all evaluations of one loaded
//! batch happen at one instant. A perturbed evaluation is not a write (the perturbation rides on
//! the programmed state and leaves no trace, as the oracle contract demands); `set_params` and
//! `apply_update` are writes.
//!
//! # Adding an effect
//! 1. `noise/mod.rs` (this file): a field of [`NoiseModel`] (off by default), its check in
//!    [`NoiseModel::validate`], and its class in [`NoiseModel::effects`] — which does not compile
//!    until the new field is classified there, and from which every fast-path decision is
//!    derived.
//! 2. `noise/device.rs`: its arithmetic in [`Device`], where its class says it acts (the input at
//!    load; [`Device::effective`] and [`Device::slope`] for a weight map; [`Device::forward`]
//!    for a per-evaluation draw; the output stage for an output transform).
//! 3. `tests/noise_effects.rs`: its non-default value in `every_effect_on` and its line in
//!    `one_at_a_time` (both exhaustive: they do not compile, or do not pass the lints, without
//!    it). The test fails if the fast path does not give what the reference choreography gives.
//!
//! Users read about effects in the top-level `README.md`; `src/run/noise_sweep.rs` sweeps them.

/// The hardware effects of a device, as its profile states them. `Default` is the ideal device.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseModel {
    /// Seeds the fixed faults (stuck devices, gains) and the random streams of the device.
    pub seed: u64,
    /// Input digital-to-analog converter: clip to `±bound`, then quantise to `bits`.
    pub dac: Option<Converter>,
    /// Output analog-to-digital converter: clip to `±bound`, then quantise to `bits`.
    pub adc: Option<Converter>,
    /// Additive Gaussian noise on the analog inputs, std relative to the DAC bound.
    pub input_noise: f32,
    /// Additive Gaussian noise on the analog outputs, std relative to the ADC bound.
    pub output_noise: f32,
    /// Multiplicative weight noise on every read, std relative to the weight: `e (1 + σ ξ)`.
    pub read_noise: f32,
    /// Relative programming error, drawn at each write of a weight and kept until the next.
    pub programming_error: f32,
    /// Power-law conductance drift.
    pub drift: Option<Drift>,
    /// Weights are clipped to `±weight_clip` (the device's range).
    pub weight_clip: Option<f32>,
    /// Weights are quantised to this many bits: over `±weight_clip` when set, else over the
    /// largest target magnitude at the last write (a per-tensor scale, as int8 kernels use).
    pub weight_bits: Option<u32>,
    /// A fraction of the weights stuck at fixed values, chosen at construction.
    pub stuck: Option<StuckFaults>,
    /// Per-weight gain mismatch: each weight is scaled by `1 + σ ξ`, fixed at construction.
    pub gain_mismatch: f32,
    /// Output nonlinearity `y / (1 + n |y|)` (n in 1/output units), before the ADC.
    pub nonlinearity: f32,
}

/// Where an effect acts, which decides how the exact fast path treats it (see
/// [`NoiseModel::effects`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// On the input once, as a batch is loaded (DAC): the fast path reads the converted input.
    InputTransform,
    /// Drawn afresh over the whole product at every forward pass (input noise, read noise): the
    /// fast path cannot share a product between evaluations, so the layer evaluates by the
    /// reference choreography.
    PerEvaluationDraw,
    /// A per-weight map from target to effective weight, programmed at writes, linear in the
    /// target (`e = s w`: programming error, drift, gain, stuck devices): the fast path
    /// multiplies `±eps s v`.
    LinearWeightMap,
    /// A per-weight map that is not linear in the target (clipping, quantisation): the fast path
    /// multiplies `e(w ± eps v) - e(w)`, one block per direction and sign.
    NonlinearWeightMap,
    /// Between the pre-activation and the ReLU (output noise, nonlinearity, ADC): the fast path
    /// runs the output stage on every evaluation, drawing in the reference's order.
    OutputTransform,
}

/// Which kinds of [`Effect`] a model switches on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Some field differs from the ideal device's.
    pub any_set: bool,
    pub input_transform: bool,
    pub per_evaluation_draw: bool,
    pub linear_weight_map: bool,
    pub nonlinear_weight_map: bool,
    pub output_transform: bool,
}

impl Effects {
    fn add(&mut self, effect: Effect, set: bool, on: bool) {
        self.any_set |= set;
        let class = match effect {
            Effect::InputTransform => &mut self.input_transform,
            Effect::PerEvaluationDraw => &mut self.per_evaluation_draw,
            Effect::LinearWeightMap => &mut self.linear_weight_map,
            Effect::NonlinearWeightMap => &mut self.nonlinear_weight_map,
            Effect::OutputTransform => &mut self.output_transform,
        };
        *class |= on;
    }
}

/// A converter: values are clipped to `±bound` and, with `bits`, quantised to the `2^bits` codes
/// `-2^(bits-1) ..= 2^(bits-1) - 1` of step `bound / 2^(bits-1)` (a two's-complement converter
/// whose full scale is `±bound`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Converter {
    #[serde(default)]
    pub bits: Option<u32>,
    pub bound: f32,
}

/// Power-law drift `w(t) = w0 (t / t0)^-nu` for `t >= t0` after the write (`w0` before).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drift {
    pub nu: f32,
    /// Device-to-device spread of `nu`: each weight drifts with `|nu + nu_std ξ|`, fixed at
    /// construction (aihwkit's PCM model does the same).
    #[serde(default)]
    pub nu_std: f32,
    /// Reference time in seconds (aihwkit's PCM model uses 20 s).
    #[serde(default = "default_t0")]
    pub t0: f64,
    /// Simulated seconds that pass at each loaded batch.
    #[serde(default)]
    pub seconds_per_batch: f64,
}

fn default_t0() -> f64 {
    20.0
}

/// Stuck-at faults: each weight is stuck with probability `fraction`, at one of `values` (chosen
/// uniformly), for the life of the device.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StuckFaults {
    pub fraction: f32,
    pub values: Vec<f32>,
}

/// A profile value that makes no sense, with the key that holds it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidNoise {
    /// The key's path inside the profile, such as `noise.adc.bits`.
    pub key: String,
    pub message: String,
}

impl Converter {
    pub(crate) fn quantizer(&self) -> Option<Quantizer> {
        self.bits.map(|b| Quantizer::converter(b, self.bound))
    }

    /// The converted value: clipped, then quantised.
    pub fn convert(&self, x: f32) -> f32 {
        match self.quantizer() {
            Some(q) => q.apply(x),
            None => x.clamp(-self.bound, self.bound),
        }
    }
}

/// Uniform quantisation onto integer codes `lo..=hi` times `step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    pub step: f32,
    pub lo: f32,
    pub hi: f32,
}

impl Quantizer {
    /// A `bits`-bit converter of full scale `±bound`: `2^bits` codes.
    pub fn converter(bits: u32, bound: f32) -> Self {
        let half = (1u64 << (bits - 1)) as f32;
        Self {
            step: bound / half,
            lo: -half,
            hi: half - 1.0,
        }
    }

    /// Symmetric `bits`-bit quantisation whose largest code is `max` (int8: `max / 127`).
    pub fn symmetric(bits: u32, max: f32) -> Self {
        let half = (1u64 << (bits - 1)) as f32;
        Self {
            step: max / (half - 1.0),
            lo: -half,
            hi: half - 1.0,
        }
    }

    pub fn apply(&self, x: f32) -> f32 {
        if self.step > 0.0 {
            (x / self.step).round().clamp(self.lo, self.hi) * self.step
        } else {
            0.0
        }
    }
}

impl NoiseModel {
    /// Whether every effect is off (the simulator is then exact, bit for bit).
    pub fn is_ideal(&self) -> bool {
        !self.effects().any_set
    }

    /// Every effect of the model, classified by where it acts: **the one place that decides how
    /// the fast path treats an effect**. It destructures the model exhaustively (no `..`), so a
    /// new field does not compile until it is classified here; [`Device`]'s fast-path
    /// predicates ([`Device::weights_identity`], [`Device::weights_linear`],
    /// [`Device::needs_full_forward`], [`Device::has_output_stage`]) and [`Self::is_ideal`] all
    /// read the result. The test in `tests/noise_effects.rs` then switches each effect on
    /// alone and holds the fast path to the reference choreography.
    pub fn effects(&self) -> Effects {
        let NoiseModel {
            seed: _,
            dac,
            adc,
            input_noise,
            output_noise,
            read_noise,
            programming_error,
            drift,
            weight_clip,
            weight_bits,
            stuck,
            gain_mismatch,
            nonlinearity,
        } = self;
        let mut e = Effects::default();
        // `set`: the field differs from the ideal device's; `on`: the effect acts on numbers (the
        // same for every value `validate` accepts).
        e.add(Effect::InputTransform, dac.is_some(), dac.is_some());
        e.add(
            Effect::PerEvaluationDraw,
            *input_noise != 0.0,
            *input_noise > 0.0,
        );
        e.add(
            Effect::PerEvaluationDraw,
            *read_noise != 0.0,
            *read_noise > 0.0,
        );
        let drifts = drift.is_some_and(|d| d.nu > 0.0 || d.nu_std > 0.0);
        let drift_set = drift.is_some_and(|d| d.nu != 0.0 || d.nu_std != 0.0);
        e.add(Effect::LinearWeightMap, drift_set, drifts);
        e.add(
            Effect::LinearWeightMap,
            *programming_error != 0.0,
            *programming_error > 0.0,
        );
        e.add(
            Effect::LinearWeightMap,
            *gain_mismatch != 0.0,
            *gain_mismatch > 0.0,
        );
        let stuck_set = stuck.as_ref().is_some_and(|s| s.fraction != 0.0);
        let stuck_on = stuck.as_ref().is_some_and(|s| s.fraction > 0.0);
        e.add(Effect::LinearWeightMap, stuck_set, stuck_on);
        e.add(
            Effect::NonlinearWeightMap,
            weight_clip.is_some(),
            weight_clip.is_some(),
        );
        e.add(
            Effect::NonlinearWeightMap,
            weight_bits.is_some(),
            weight_bits.is_some(),
        );
        e.add(
            Effect::OutputTransform,
            *output_noise != 0.0,
            *output_noise > 0.0,
        );
        e.add(
            Effect::OutputTransform,
            *nonlinearity != 0.0,
            *nonlinearity > 0.0,
        );
        e.add(Effect::OutputTransform, adc.is_some(), adc.is_some());
        e
    }

    /// Checks every value; the error names the key (under `prefix`, e.g. `noise`).
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidNoise> {
        let bad = |key: &str, message: String| InvalidNoise {
            key: format!("{prefix}.{key}"),
            message,
        };
        let nonneg = |key: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(bad(key, format!("must be a finite number >= 0, got {v}")))
            }
        };
        let positive = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(key, format!("must be a finite number > 0, got {v}")))
            }
        };
        let bits = |key: &str, b: u32, min: u32| {
            if (min..=24).contains(&b) {
                Ok(())
            } else {
                Err(bad(key, format!("must be between {min} and 24, got {b}")))
            }
        };
        for (name, conv) in [("dac", &self.dac), ("adc", &self.adc)] {
            if let Some(c) = conv {
                positive(&format!("{name}.bound"), c.bound as f64)?;
                if let Some(b) = c.bits {
                    bits(&format!("{name}.bits"), b, 1)?;
                }
            }
        }
        nonneg("input_noise", self.input_noise)?;
        nonneg("output_noise", self.output_noise)?;
        nonneg("read_noise", self.read_noise)?;
        nonneg("programming_error", self.programming_error)?;
        nonneg("gain_mismatch", self.gain_mismatch)?;
        nonneg("nonlinearity", self.nonlinearity)?;
        if let Some(d) = &self.drift {
            nonneg("drift.nu", d.nu)?;
            nonneg("drift.nu_std", d.nu_std)?;
            positive("drift.t0", d.t0)?;
            if !(d.seconds_per_batch.is_finite() && d.seconds_per_batch >= 0.0) {
                return Err(bad(
                    "drift.seconds_per_batch",
                    format!("must be a finite number >= 0, got {}", d.seconds_per_batch),
                ));
            }
        }
        if let Some(c) = self.weight_clip {
            positive("weight_clip", c as f64)?;
        }
        if let Some(b) = self.weight_bits {
            bits("weight_bits", b, 2)?;
        }
        if let Some(s) = &self.stuck {
            if !(0.0..=1.0).contains(&s.fraction) {
                return Err(bad(
                    "stuck.fraction",
                    format!("must be between 0 and 1, got {}", s.fraction),
                ));
            }
            if s.fraction > 0.0 && s.values.is_empty() {
                return Err(bad(
                    "stuck.values",
                    "must name at least one value when fraction > 0".into(),
                ));
            }
            if let Some(v) = s.values.iter().find(|v| !v.is_finite()) {
                return Err(bad("stuck.values", format!("must be finite, got {v}")));
            }
        }
        Ok(())
    }

    pub(crate) fn input_noise_std(&self) -> f32 {
        self.input_noise * self.dac.map_or(1.0, |c| c.bound)
    }

    pub(crate) fn output_noise_std(&self) -> f32 {
        self.output_noise * self.adc.map_or(1.0, |c| c.bound)
    }

    pub(crate) fn drifts(&self) -> bool {
        self.drift.is_some_and(|d| d.nu > 0.0 || d.nu_std > 0.0)
    }
}

mod device;

pub use device::{Device, layer_seed};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_converter_has_exactly_two_to_the_bits_levels() {
        for bits in [1, 3, 7, 9] {
            let c = Converter {
                bits: Some(bits),
                bound: 2.5,
            };
            let mut levels: Vec<f32> = (-40_000..=40_000)
                .map(|i| c.convert(i as f32 * 1e-4))
                .collect();
            levels.sort_by(f32::total_cmp);
            levels.dedup();
            assert_eq!(levels.len(), 1 << bits, "{bits} bits");
            assert_eq!(levels[0], -2.5);
            assert!(*levels.last().unwrap() < 2.5);
        }
    }

    #[test]
    fn validation_names_the_key() {
        let m = NoiseModel {
            adc: Some(Converter {
                bits: Some(0),
                bound: 1.0,
            }),
            ..Default::default()
        };
        assert_eq!(m.validate("noise").unwrap_err().key, "noise.adc.bits");
        let m = NoiseModel {
            output_noise: -0.1,
            ..Default::default()
        };
        assert_eq!(m.validate("noise").unwrap_err().key, "noise.output_noise");
    }
}
