//! What a device's hardware effects cost MF+DD: training on simulated devices, deploying trained
//! weights to another device, measuring the finite-difference signal, and sweeping one noise
//! parameter. The library behind `pnn-sweep` and the `tests/noise_*.rs` suite.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use firmware_protocol::{DirectionKey, ParamGroup};
use pnn_sim::noise::{Drift, NoiseModel, StuckFaults};
use pnn_sim::profile::DeviceProfile;

use crate::backend::sim::SimOracle;
use crate::chunking::weight_chunks;
use crate::data::{Dataset, DatasetKind, resolve_data_dir};
use crate::loss::cross_entropy;
use crate::model::{InitialParams, ModelSpec, initialise};
use crate::oracle::{Activations, ForwardOracle, OracleError, PerturbedPair};
use crate::run::RunError;
use crate::trainer::{Evaluation, Hyper, Trainer, epoch_order};

/// A dataset, a model and the hyperparameters of the runs to compare.
pub struct Setup {
    pub data: Dataset,
    pub model: ModelSpec,
    pub hyper: Hyper,
    pub epochs: u32,
}

impl Setup {
    /// Loads `dataset` (the data directory resolved as `pnn-train` does), keeping the first
    /// `limit_train` training samples; the whole test set is kept.
    pub fn load(
        dataset: DatasetKind,
        data_dir: Option<&Path>,
        limit_train: Option<usize>,
        hidden: Option<Vec<usize>>,
        hyper: Hyper,
        epochs: u32,
    ) -> Result<Self, RunError> {
        hyper.validate().map_err(RunError::Config)?;
        let dir = resolve_data_dir(data_dir)?;
        let mut data = Dataset::load(dataset, &dir)?;
        if let Some(n) = limit_train {
            data.train.truncate(n);
        }
        Ok(Self {
            data,
            model: ModelSpec::mlp(dataset, hidden),
            hyper,
            epochs,
        })
    }

    /// The same data and model with other hyperparameters.
    pub fn with_hyper(&self, hyper: Hyper) -> SetupRef<'_> {
        SetupRef {
            data: &self.data,
            model: &self.model,
            hyper,
            epochs: self.epochs,
        }
    }

    pub fn as_ref(&self) -> SetupRef<'_> {
        self.with_hyper(self.hyper.clone())
    }
}

/// A [`Setup`] borrowed, with its own hyperparameters.
#[derive(Clone)]
pub struct SetupRef<'a> {
    pub data: &'a Dataset,
    pub model: &'a ModelSpec,
    pub hyper: Hyper,
    pub epochs: u32,
}

/// One oracle per layer of `model` on devices of `profile`.
pub fn oracles(model: &ModelSpec, profile: &DeviceProfile) -> Result<Vec<SimOracle>, OracleError> {
    SimOracle::for_profile(&model.layer_specs(), profile)
}

/// Trains through devices of `profile` from the seeded initialisation (as `pnn-train` does).
pub fn train(s: &SetupRef, profile: &DeviceProfile) -> Result<Trainer<SimOracle>, OracleError> {
    let init = initialise(&s.model.layer_specs(), s.model.classes, s.hyper.seed);
    let mut trainer = Trainer::new(oracles(s.model, profile)?, init, s.hyper.clone())?;
    let mut input = Activations::default();
    let train = &s.data.train;
    for epoch in 0..s.epochs {
        let order = epoch_order(s.hyper.seed, epoch, train.len());
        for (b, batch) in order.chunks(s.hyper.batch_size).enumerate() {
            s.data
                .normalizer
                .batch_activations(train, batch, &mut input);
            let labels: Vec<u8> = batch.iter().map(|&i| train.labels[i]).collect();
            trainer.train_batch(epoch, b as u32, &input, &labels)?;
        }
    }
    Ok(trainer)
}

/// Test-set figures through the trainer's devices.
pub fn evaluate(s: &SetupRef, trainer: &mut Trainer<SimOracle>) -> Result<Evaluation, OracleError> {
    trainer.evaluate(&s.data.test, &s.data.normalizer)
}

/// Deploys trained weights to fresh devices of `profile`: programs every layer with the
/// trainer's shadow (the intended weights) and keeps its projections. Evaluating the result is
/// "train elsewhere, deploy here".
pub fn deploy(
    s: &SetupRef,
    trained: &Trainer<SimOracle>,
    profile: &DeviceProfile,
) -> Result<Trainer<SimOracle>, OracleError> {
    let init = InitialParams {
        layers: trained.layers().iter().map(|l| l.shadow.clone()).collect(),
        projections: trained
            .layers()
            .iter()
            .map(|l| l.projection.clone())
            .collect(),
    };
    Trainer::new(oracles(s.model, profile)?, init, s.hyper.clone())
}

/// The finite-difference signal `L+ - L-` of the first layer's first chunk, on the first training
/// batch at the initial weights, over `directions` directions each evaluated `repeats` times.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct FdSignal {
    /// RMS over directions of the mean of `L+ - L-` (what the estimator wants: `2 eps ∇L·v`),
    /// with the bias of estimating it from noisy draws removed.
    pub signal: f64,
    /// RMS over directions of the standard deviation of `L+ - L-` over repeats (what noise adds).
    pub noise: f64,
    /// `signal / noise` (infinite on a deterministic device).
    pub snr: f64,
}

pub fn fd_signal(
    s: &SetupRef,
    profile: &DeviceProfile,
    directions: usize,
    repeats: usize,
) -> Result<FdSignal, OracleError> {
    let specs = s.model.layer_specs();
    let init = initialise(&specs, s.model.classes, s.hyper.seed);
    let mut oracle = SimOracle::with_noise(specs[0], &profile.noise, 0)?;
    oracle.write_parameters(&init.layers[0])?;
    let train = &s.data.train;
    let order = epoch_order(s.hyper.seed, 0, train.len());
    let batch = &order[..s.hyper.batch_size.min(order.len())];
    let mut x = Vec::new();
    s.data.normalizer.batch(train, batch, &mut x);
    let labels: Vec<u8> = batch.iter().map(|&i| train.labels[i]).collect();
    oracle.load_input(&Activations::new(batch.len(), s.data.input_width(), x))?;
    let chunk = weight_chunks(
        &specs[0].chunk_units(),
        specs[0].param_count(),
        s.hyper.chunk_max,
    )[0]
    .clone();
    let seeds: Vec<_> = (0..directions)
        .map(|p| {
            DirectionKey {
                run_seed: s.hyper.seed,
                epoch: 0,
                batch: 0,
                layer: 0,
                group: ParamGroup::Weights,
                chunk: 0,
                index: p as u32,
            }
            .seed()
        })
        .collect();
    let projection = &init.projections[0];
    let classes = s.model.classes;
    let mut diffs = vec![Vec::with_capacity(repeats); directions];
    let mut pairs: Vec<PerturbedPair> = Vec::new();
    let mut g = Vec::new();
    for _ in 0..repeats {
        oracle.evaluate_perturbed(chunk.clone(), &seeds, s.hyper.eps, &mut pairs)?;
        for ((plus, minus), d) in pairs.iter().zip(&mut diffs) {
            projection.goodness(plus, &mut g);
            let l_plus = cross_entropy(&g, classes, &labels);
            projection.goodness(minus, &mut g);
            d.push(l_plus - cross_entropy(&g, classes, &labels));
        }
    }
    let (mut signal, mut noise) = (0.0, 0.0);
    for d in &diffs {
        let n = d.len() as f64;
        let mean = d.iter().sum::<f64>() / n;
        let var = d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        // The squared mean of n draws overestimates the squared signal by var / n.
        signal += mean * mean - if n > 1.0 { var / n } else { 0.0 };
        noise += var;
    }
    let signal = (signal / directions as f64).max(0.0).sqrt();
    let noise = (noise / directions as f64).sqrt();
    Ok(FdSignal {
        signal,
        noise,
        snr: if noise > 0.0 {
            signal / noise
        } else {
            f64::INFINITY
        },
    })
}

/// A noise parameter that a sweep varies, named as its key in the profile's `noise`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseParam {
    InputNoise,
    OutputNoise,
    ReadNoise,
    ProgrammingError,
    GainMismatch,
    Nonlinearity,
    StuckFraction,
    DriftNu,
    DacBits,
    AdcBits,
    WeightBits,
    WeightClip,
}

impl NoiseParam {
    pub const ALL: [NoiseParam; 12] = [
        Self::InputNoise,
        Self::OutputNoise,
        Self::ReadNoise,
        Self::ProgrammingError,
        Self::GainMismatch,
        Self::Nonlinearity,
        Self::StuckFraction,
        Self::DriftNu,
        Self::DacBits,
        Self::AdcBits,
        Self::WeightBits,
        Self::WeightClip,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::InputNoise => "input_noise",
            Self::OutputNoise => "output_noise",
            Self::ReadNoise => "read_noise",
            Self::ProgrammingError => "programming_error",
            Self::GainMismatch => "gain_mismatch",
            Self::Nonlinearity => "nonlinearity",
            Self::StuckFraction => "stuck.fraction",
            Self::DriftNu => "drift.nu",
            Self::DacBits => "dac.bits",
            Self::AdcBits => "adc.bits",
            Self::WeightBits => "weight_bits",
            Self::WeightClip => "weight_clip",
        }
    }

    /// Sets the parameter in `model`. A stuck or drift block is created where absent (stuck at
    /// 0; drift with t0 = 20 s, 1 s per batch); converter bits need the converter's bound.
    pub fn set(self, model: &mut NoiseModel, value: f64) -> Result<(), String> {
        let bits = || {
            if value.fract() == 0.0 && (1.0..=24.0).contains(&value) {
                Ok(value as u32)
            } else {
                Err(format!(
                    "{} must be a whole number of bits from 1 to 24, got {value}",
                    self.key()
                ))
            }
        };
        let v = value as f32;
        match self {
            Self::InputNoise => model.input_noise = v,
            Self::OutputNoise => model.output_noise = v,
            Self::ReadNoise => model.read_noise = v,
            Self::ProgrammingError => model.programming_error = v,
            Self::GainMismatch => model.gain_mismatch = v,
            Self::Nonlinearity => model.nonlinearity = v,
            Self::StuckFraction => {
                model
                    .stuck
                    .get_or_insert_with(|| StuckFaults {
                        fraction: 0.0,
                        values: vec![0.0],
                    })
                    .fraction = v
            }
            Self::DriftNu => {
                model
                    .drift
                    .get_or_insert(Drift {
                        nu: 0.0,
                        nu_std: 0.0,
                        t0: 20.0,
                        seconds_per_batch: 1.0,
                    })
                    .nu = v
            }
            Self::DacBits | Self::AdcBits => {
                let conv = if self == Self::DacBits {
                    &mut model.dac
                } else {
                    &mut model.adc
                };
                let Some(c) = conv.as_mut() else {
                    return Err(format!(
                        "the base profile has no {} to set the bits of: give it `{}: (bound: ...)`",
                        &self.key()[..3],
                        &self.key()[..3]
                    ));
                };
                c.bits = Some(bits()?);
            }
            Self::WeightBits => model.weight_bits = Some(bits()?),
            Self::WeightClip => model.weight_clip = Some(v),
        }
        model
            .validate("noise")
            .map_err(|e| format!("{} = {value}: {e}", self.key()))
    }
}

impl FromStr for NoiseParam {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|p| p.key() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|p| p.key()).collect();
            format!(
                "unknown noise parameter '{s}' (expected one of: {})",
                names.join(", ")
            )
        })
    }
}

impl fmt::Display for NoiseParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// One point of a sweep.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SweepPoint {
    pub value: f64,
    pub accuracy_cumulative: f64,
    pub accuracy_final_layer: f64,
    pub loss_cumulative: f64,
    /// The finite-difference signal at this level (see [`fd_signal`]); `None` if not measured.
    pub fd: Option<FdSignal>,
    pub train_seconds: f64,
}

/// The profile `base` with `param` set to `value`.
pub fn profile_at(
    base: &DeviceProfile,
    param: NoiseParam,
    value: f64,
) -> Result<DeviceProfile, String> {
    let mut p = base.clone();
    param.set(&mut p.noise, value)?;
    p.name = format!("{}+{}={value}", base.name, param.key());
    Ok(p)
}

/// Trains and evaluates at each value of `param`; `fd_repeats > 0` also measures the
/// finite-difference signal (8 directions) at each value.
pub fn sweep(
    s: &SetupRef,
    base: &DeviceProfile,
    param: NoiseParam,
    values: &[f64],
    fd_repeats: usize,
    mut on_point: impl FnMut(&SweepPoint),
) -> Result<Vec<SweepPoint>, String> {
    let mut points = Vec::new();
    for &value in values {
        let profile = profile_at(base, param, value)?;
        let start = std::time::Instant::now();
        let mut trainer = train(s, &profile).map_err(|e| e.to_string())?;
        let train_seconds = start.elapsed().as_secs_f64();
        let eval = evaluate(s, &mut trainer).map_err(|e| e.to_string())?;
        let fd = if fd_repeats > 0 {
            Some(fd_signal(s, &profile, 8, fd_repeats).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let point = SweepPoint {
            value,
            accuracy_cumulative: eval.accuracy_cumulative,
            accuracy_final_layer: eval.accuracy_final_layer,
            loss_cumulative: eval.loss_cumulative,
            fd,
            train_seconds,
        };
        on_point(&point);
        points.push(point);
    }
    Ok(points)
}

/// Where the FD signal-to-noise ratio crosses 1, interpolated in log space between the sweep's
/// points (`None` if it never does within the sweep).
pub fn drowning_level(points: &[SweepPoint]) -> Option<f64> {
    let snr: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.fd.map(|f| (p.value, f.snr)))
        .collect();
    snr.windows(2).find_map(|w| {
        let ((v0, s0), (v1, s1)) = (w[0], w[1]);
        if s0 >= 1.0 && s1 < 1.0 {
            if !s0.is_finite() || v0 <= 0.0 {
                return Some(v1);
            }
            // log snr is linear in log value between the points (snr ∝ 1/σ for output noise).
            let t = s0.ln() / (s0.ln() - s1.ln());
            Some((v0.ln() + t * (v1.ln() - v0.ln())).exp())
        } else {
            None
        }
    })
}

/// The sweep as CSV.
pub fn to_csv(param: NoiseParam, points: &[SweepPoint]) -> String {
    let mut out = format!(
        "{},accuracy_cumulative,accuracy_final_layer,loss_cumulative,fd_signal,fd_noise,fd_snr,train_seconds\n",
        param.key()
    );
    for p in points {
        let (sig, noise, snr) =
            p.fd.map(|f| (f.signal.to_string(), f.noise.to_string(), f.snr.to_string()))
                .unwrap_or_default();
        out += &format!(
            "{},{:.4},{:.4},{:.4},{sig},{noise},{snr},{:.2}\n",
            p.value,
            p.accuracy_cumulative,
            p.accuracy_final_layer,
            p.loss_cumulative,
            p.train_seconds
        );
    }
    out
}

/// The sweep as a Markdown table.
pub fn to_markdown(param: NoiseParam, eps: f32, points: &[SweepPoint]) -> String {
    let mut out = format!(
        "| {} | test acc (cumulative) | test acc (final layer) | L+ - L- signal | noise | SNR |\n|---|---|---|---|---|---|\n",
        param.key()
    );
    for p in points {
        let fd = p.fd.map_or("| | | ".to_string(), |f| {
            format!("| {:.3e} | {:.3e} | {:.3}", f.signal, f.noise, f.snr)
        });
        out += &format!(
            "| {} | {:.4} | {:.4} {fd} |\n",
            p.value, p.accuracy_cumulative, p.accuracy_final_layer
        );
    }
    if let Some(level) = drowning_level(points) {
        out += &format!(
            "\nThe finite-difference signal drowns (SNR < 1) at {} ≈ {level:.3e}, {:.3} x eps (eps = {eps:e}).\n",
            param.key(),
            level / eps as f64
        );
    }
    out
}

/// An SVG plot of test accuracy against the parameter's value.
pub fn plot_svg(
    path: &Path,
    title: &str,
    param: NoiseParam,
    points: &[SweepPoint],
) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn fmt::Display| format!("cannot plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.value), b.max(p.value))
        });
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        (lo - 1.0, hi + 1.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(lo..hi, 0f64..1f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(param.key())
        .y_desc("test accuracy")
        .draw()
        .map_err(|e| err(&e))?;
    for (name, color, get) in [
        (
            "cumulative",
            BLUE,
            (|p: &SweepPoint| p.accuracy_cumulative) as fn(&SweepPoint) -> f64,
        ),
        ("final layer", RED, |p: &SweepPoint| p.accuracy_final_layer),
    ] {
        let series: Vec<(f64, f64)> = points.iter().map(|p| (p.value, get(p))).collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                series
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
