//! What a device's hardware effects cost MF+DD: training on simulated devices, deploying trained
//! weights to another device, measuring the finite-difference signal, and sweeping one noise
//! parameter. The library behind `pnn-sweep` and the `tests/noise_*.rs` suite.
//!
//! Training here is a run like any other ([`crate::run::run_with`], the one training loop),
//! evaluated once at its end; the sweep's tables and plot are in [`crate::report::sweep`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use firmware_protocol::{DirectionKey, ParamGroup};
use pnn_sim::noise::NoiseModel;
use pnn_sim::profile::DeviceProfile;

use super::{RunConfig, RunError, run_with};
use crate::backend::sim::SimOracle;
use crate::data::{Dataset, DatasetKind};
use crate::model::{ArchKind, InitialParams, ModelSpec, initialise};
use crate::oracle::{Activations, ForwardOracle, OracleError, PerturbedPair};
use crate::report::export::SavedModel;
use crate::report::metrics::RunSummary;
use crate::report::observe::{ByRef, RunObserver};
use crate::report::sweep::{FdSignal, SweepPoint};
use crate::train::loss::cross_entropy;
use crate::train::{Evaluation, Hyper, Trainer, epoch_order};

/// A dataset, a model and the hyperparameters of the runs to compare.
pub struct Setup {
    pub data: Dataset,
    pub model: ModelSpec,
    pub hyper: Hyper,
    pub epochs: u32,
}

impl Setup {
    /// Loads `dataset` as `pnn-train` does ([`crate::run::load`]: the data directory resolved the
    /// same way), keeping the first `limit_train` training samples; the whole test set is kept.
    pub fn load(
        dataset: DatasetKind,
        data_dir: Option<&Path>,
        limit_train: Option<usize>,
        hidden: Option<Vec<usize>>,
        hyper: Hyper,
        epochs: u32,
    ) -> Result<Self, RunError> {
        let config = RunConfig {
            data_dir: data_dir.map(PathBuf::from),
            arch: ArchKind::Mlp,
            hidden,
            hyper,
            epochs,
            limit_train,
            ..RunConfig::new(dataset)
        };
        let (data, model) = super::load(&config)?;
        Ok(Self {
            data,
            model,
            hyper: config.hyper,
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

impl SetupRef<'_> {
    /// The run these settings describe: every batch of every epoch, evaluated once at the end
    /// (an evaluation on a noisy device draws from its noise streams, so evaluating after each
    /// epoch would change the training that follows).
    pub fn run_config(&self) -> RunConfig {
        RunConfig {
            hidden: Some(self.model.hidden.clone()),
            epochs: self.epochs,
            hyper: self.hyper.clone(),
            evaluate_each_epoch: false,
            ..RunConfig::new(self.data.kind)
        }
    }
}

/// One oracle per layer of `model` on devices of `profile`.
pub fn oracles(model: &ModelSpec, profile: &DeviceProfile) -> Result<Vec<SimOracle>, OracleError> {
    SimOracle::for_profile(&model.layer_specs(), profile)
}

/// A finished training run: its summary (test figures through the devices it trained on) and
/// the trained model (the host's shadow of every layer, and every projection).
#[derive(Clone, Debug)]
pub struct Trained {
    pub summary: RunSummary,
    pub model: SavedModel,
}

/// Keeps the trained model a run hands its observer.
#[derive(Default)]
struct KeepModel(Option<SavedModel>);

impl RunObserver for KeepModel {
    fn wants_model(&self) -> bool {
        true
    }
    fn model_trained(&mut self, model: &SavedModel) {
        self.0 = Some(model.clone());
    }
}

/// Trains through devices of `profile` from the seeded initialisation, as `pnn-train` does (the
/// same loop), and evaluates through them at the end.
pub fn train(s: &SetupRef, profile: &DeviceProfile) -> Result<Trained, RunError> {
    let mut keep = KeepModel::default();
    let summary = run_with(
        &s.run_config(),
        s.data,
        s.model,
        oracles(s.model, profile)?,
        ByRef(&mut keep),
    )?;
    let model = keep.0.expect("a finished run hands over its model");
    Ok(Trained { summary, model })
}

/// Test-set figures through the trainer's devices.
pub fn evaluate(s: &SetupRef, trainer: &mut Trainer<SimOracle>) -> Result<Evaluation, OracleError> {
    trainer.evaluate(&s.data.test, &s.data.normalizer)
}

/// Deploys trained weights to fresh devices of `profile`: programs every layer with the trained
/// model's weights (the host's shadow: the intended weights) and keeps its projections.
/// Evaluating the result is "train elsewhere, deploy here".
pub fn deploy(
    s: &SetupRef,
    trained: &SavedModel,
    profile: &DeviceProfile,
) -> Result<Trainer<SimOracle>, OracleError> {
    let init = InitialParams {
        layers: trained.layers.iter().map(|l| l.params.clone()).collect(),
        projections: trained.projections(),
    };
    Trainer::new(oracles(s.model, profile)?, init, s.hyper.clone())
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
    let chunk = (specs[0].weight_chunks(s.hyper.chunk_max).next()).expect("a layer has parameters");
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

/// A noise parameter that a sweep varies, named by its path under the profile's `noise`
/// (`output_noise`, `adc.bound`, `drift.t0`, `stuck.fraction`, `seed`, …): any field of
/// [`NoiseModel`], found from its serialised form, so a new effect is sweepable with no code here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoiseParam(String);

impl NoiseParam {
    pub fn key(&self) -> &str {
        &self.0
    }

    /// Sets the parameter in `model` (a whole number for integer fields such as `adc.bits` or
    /// `seed`). A stuck or drift block is created where absent (stuck at 0; drift with t0 = 20 s,
    /// 1 s per batch); a converter needs its bound.
    pub fn set(&self, model: &mut NoiseModel, value: f64) -> Result<(), String> {
        set_noise_key(model, &self.0, &number(value))
    }
}

/// `value` as JSON: an integer where it is whole (integer fields refuse `8.0`).
fn number(value: f64) -> serde_json::Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        serde_json::Value::from(value as i64)
    } else {
        serde_json::Value::from(value)
    }
}

/// The field paths of a noise model: `seed`, `adc.bits`, `adc.bound`, `drift.nu`, …
pub fn noise_keys() -> Vec<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        if let serde_json::Value::Object(map) = v {
            for (k, v) in map {
                let key = format!("{prefix}{k}");
                match v {
                    serde_json::Value::Object(_) => walk(&format!("{key}."), v, out),
                    _ => out.push(key),
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut full = serde_json::to_value(NoiseModel::default()).expect("noise models serialise");
    if let serde_json::Value::Object(map) = &mut full {
        for (k, v) in map.iter_mut() {
            if v.is_null() {
                *v = default_block(k).unwrap_or(serde_json::Value::Null);
            }
        }
    }
    walk("", &full, &mut out);
    out
}

/// What an absent optional block starts as when one of its fields is set: a drift clock of
/// t0 = 20 s ticking 1 s per batch with no drift, no stuck devices (stuck at 0), a converter
/// with no bits (its `bound` must be given).
fn default_block(key: &str) -> Option<serde_json::Value> {
    Some(match key {
        "drift" => {
            serde_json::json!({"nu": 0.0, "nu_std": 0.0, "t0": 20.0, "seconds_per_batch": 1.0})
        }
        "stuck" => serde_json::json!({"fraction": 0.0, "values": [0.0]}),
        "dac" | "adc" => serde_json::json!({"bits": null, "bound": null}),
        _ => return None,
    })
}

/// Sets the noise field at `path` (`output_noise`, `adc.bound`, `drift.t0`, `seed`, or a whole
/// block such as `drift`) to `value`, then checks the model as a profile's is checked.
pub fn set_noise_key(
    model: &mut NoiseModel,
    path: &str,
    value: &serde_json::Value,
) -> Result<(), String> {
    set_noise_keys(model, &[(path, value)])
}

/// Sets several noise fields at once (a converter's `bits` and `bound` together), then checks.
pub fn set_noise_keys(
    model: &mut NoiseModel,
    settings: &[(&str, &serde_json::Value)],
) -> Result<(), String> {
    let mut root = serde_json::to_value(&*model).expect("noise models serialise");
    let unknown = |path: &str| {
        format!(
            "unknown noise parameter '{path}' (expected one of: {})",
            noise_keys().join(", ")
        )
    };
    /// Sets `parts` under `at`; false if a part names no field.
    fn put(at: &mut serde_json::Value, parts: &[&str], value: &serde_json::Value) -> bool {
        let Some((first, rest)) = parts.split_first() else {
            return false;
        };
        let Some(slot) = at.as_object_mut().and_then(|m| m.get_mut(*first)) else {
            return false;
        };
        if rest.is_empty() {
            *slot = value.clone();
            return true;
        }
        if slot.is_null() {
            match default_block(first) {
                Some(block) => *slot = block,
                None => return false,
            }
        }
        put(slot, rest, value)
    }
    for &(path, value) in settings {
        let parts: Vec<&str> = path.split('.').collect();
        if !put(&mut root, &parts, value) {
            return Err(unknown(path));
        }
    }
    let what = settings
        .iter()
        .map(|(p, v)| format!("{p} = {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    for conv in ["dac", "adc"] {
        if root[conv].is_object() && root[conv]["bound"].is_null() {
            return Err(format!(
                "{what}: the base profile has no `{conv}` and a converter needs its bound: give the profile one (e.g. `{conv}: (bound: 1.0)`) or set noise.{conv}.bound too"
            ));
        }
    }
    let new: NoiseModel = serde_json::from_value(root).map_err(|e| format!("{what}: {e}"))?;
    new.validate("noise").map_err(|e| format!("{what}: {e}"))?;
    *model = new;
    Ok(())
}

impl FromStr for NoiseParam {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let keys = noise_keys();
        if keys.iter().any(|k| k == s) || default_block(s).is_some() {
            Ok(Self(s.to_string()))
        } else {
            Err(format!(
                "unknown noise parameter '{s}' (expected one of: {})",
                keys.join(", ")
            ))
        }
    }
}

impl fmt::Display for NoiseParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The profile `base` with `param` set to `value`.
pub fn profile_at(
    base: &DeviceProfile,
    param: &NoiseParam,
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
    param: &NoiseParam,
    values: &[f64],
    fd_repeats: usize,
    mut on_point: impl FnMut(&SweepPoint),
) -> Result<Vec<SweepPoint>, String> {
    let mut points = Vec::new();
    for &value in values {
        let profile = profile_at(base, param, value)?;
        let trained = train(s, &profile).map_err(|e| e.to_string())?.summary;
        let fd = if fd_repeats > 0 {
            Some(fd_signal(s, &profile, 8, fd_repeats).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let point = SweepPoint {
            value,
            accuracy_cumulative: trained.test_accuracy_cumulative,
            accuracy_final_layer: trained.test_accuracy_final_layer,
            loss_cumulative: trained.test_loss_cumulative,
            fd,
            train_seconds: trained.train_seconds,
        };
        on_point(&point);
        points.push(point);
    }
    Ok(points)
}
