//! Experiment configs: the settings of a `pnn-train` run in a RON file (`--config FILE`), with
//! command-line flags overriding the file.
//!
//! [`ExperimentConfig`] is both the RON schema and the set of `pnn-train` flags: one field per
//! setting, every field optional, so a value comes from the command line, else the file, else the
//! paper's default ([`ExperimentConfig::to_run_config`]). Keys are the flags' names with `_` for
//! `-`. An unknown key, a wrong type or an invalid value is an error naming the file, the line
//! and the key. Names (dataset, arch, backend) are strings; numbers and lists are plain RON:
//!
//! ```ron
//! // Thesis Table 1, MNIST row, MF+DD (P = 4).
//! (
//!     dataset: "mnist",
//!     arch: "mlp",
//!     hidden: [50, 50],
//!     epochs: 200,
//!     batch_size: 256,
//!     lr: 1e-3,
//!     eps: 1e-3,
//!     directions: 4,
//!     chunk_max: 50000,
//! )
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::RunConfig;
use crate::backend::{BackendSpec, Rig};
use crate::data::DatasetKind;
use crate::model::ArchKind;
pub use crate::model::ArchKind as Arch;
use crate::train::Hyper;
use crate::train::estimator::Difference;
use crate::train::exact::Method;
use crate::train::update::Optimizer;

/// Hidden widths: comma-separated on the command line (`50,50`), a list in RON (`[50, 50]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Widths(pub Vec<usize>);

impl FromStr for Widths {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let widths = s
            .split(',')
            .map(|w| match w.trim().parse::<usize>() {
                Ok(n) => Ok(n),
                Err(_) => Err(format!(
                    "'{w}' is not a width: expected comma-separated positive integers such as 50,50"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::checked(widths)
    }
}

impl Widths {
    fn checked(widths: Vec<usize>) -> Result<Self, String> {
        if widths.is_empty() {
            return Err("at least one hidden width is needed".into());
        }
        if widths.contains(&0) {
            return Err("a hidden width must be at least 1".into());
        }
        Ok(Self(widths))
    }
}

impl<'de> Deserialize<'de> for Widths {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::checked(Vec::<usize>::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Defines the settings struct and [`ExperimentConfig::overlay`] from one list of fields, so
/// that a setting added to the struct is overlaid without another line to write.
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident: $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            /// `over`'s settings where it has them, else `self`'s: `file.overlay(command_line)`.
            pub fn overlay(self, over: Self) -> Self {
                Self {
                    $( $field: Overlay::overlay(self.$field, over.$field), )*
                }
            }
        }
    };
}

/// How a setting given in two places combines: the overriding value where there is one.
trait Overlay {
    fn overlay(self, over: Self) -> Self;
}

impl<T> Overlay for Option<T> {
    fn overlay(self, over: Self) -> Self {
        over.or(self)
    }
}

/// A switch is on if either place turns it on (a flag cannot be given as off).
impl Overlay for bool {
    fn overlay(self, over: Self) -> Self {
        over || self
    }
}

settings! {
/// The settings of a run: the RON schema of `--config` files and the `pnn-train` flags. Each
/// setting is spelled here once: the flag, the RON key, its reading and writing, and how a
/// value given in one place overrides another ([`ExperimentConfig::overlay`]) all derive from
/// its field.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// mnist, fashion-mnist, cifar10 or cifar100 [default: mnist]
    #[arg(long)]
    #[serde(default, deserialize_with = "de_parsed", serialize_with = "ser_display", skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetKind>,
    /// Model family: mlp or cnn (thesis Appendix A) [default: mlp]
    #[arg(long)]
    #[serde(default, deserialize_with = "de_parsed", serialize_with = "ser_display", skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    /// Hidden widths (mlp) or channels per block (cnn), comma-separated [default per dataset,
    /// Tables 3 and 4: mnist 50,50 / 32,32]
    #[arg(long, visible_alias = "channels")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<Widths>,
    /// CNN only: the random projection's dimension d per channel [default: 16, Table 4]
    #[arg(long)]
    #[serde(default, deserialize_with = "de_positive", skip_serializing_if = "Option::is_none")]
    pub proj_dim: Option<usize>,
    /// Where the layers execute [default: sim]: `sim` (the ideal simulated PNN, in process),
    /// `sim:<profile.ron>` (a device profile's hardware effects, e.g. `sim:devices/pcm.ron`) or
    /// `serial:PATH[?baud=921600&timeout_ms=2000&retries=3]` (a device, or `pnn-emulate`'s pty)
    #[arg(long)]
    #[serde(default, deserialize_with = "de_parsed", serialize_with = "ser_backend", skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendSpec>,
    /// A rig file (RON, e.g. rigs/two-boards.ron): the devices, their ports and link options and
    /// the layers each holds, in place of --backend (which also takes one backend per layer,
    /// comma-separated)
    #[arg(long, conflicts_with = "backend")]
    #[serde(default, serialize_with = "ser_path", skip_serializing_if = "Option::is_none")]
    pub rig: Option<PathBuf>,
    /// Training epochs [default: 200, as the paper]
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Batch size [default: 256]
    #[arg(long, value_parser = positive_usize)]
    #[serde(default, deserialize_with = "de_positive", skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Learning rate eta [default: 1e-3]
    #[arg(long, value_parser = positive_f32, allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "de_positive_f32", skip_serializing_if = "Option::is_none")]
    pub lr: Option<f32>,
    /// Perturbation magnitude of the finite difference, or `auto`: chosen per layer from the
    /// device's measured noise (the clean loss's spread over repeated evaluations), at least
    /// 1e-3, re-chosen every 50 batches [default: 1e-3]
    #[arg(long, allow_hyphen_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<Eps>,
    /// Finite difference of the estimate: central (the paper's, 2P evaluations per chunk) or
    /// forward (one clean loss shared by the P directions: P+1) [default: central]
    #[arg(long)]
    #[serde(default, deserialize_with = "de_parsed", serialize_with = "ser_display", skip_serializing_if = "Option::is_none")]
    pub difference: Option<Difference>,
    /// Update rule on the estimate: sgd (the paper's), momentum (beta 0.9) or adam
    /// (0.9, 0.999) [default: sgd]
    #[arg(long)]
    #[serde(default, deserialize_with = "de_parsed", serialize_with = "ser_display", skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<Optimizer>,
    /// Training method: dd (MF+DD, the paper's, through the backend), or an exact-gradient
    /// baseline on the host, ideal simulator and MLP only: mf-exact (Mono-Forward with analytic
    /// local gradients, the thesis' MF+AD) or bp (backpropagation with a linear head) [default: dd]
    #[arg(long)]
    #[serde(default, deserialize_with = "de_parsed", serialize_with = "ser_display", skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Perturbation directions P per chunk, 1 to 64 [default: 4]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    #[serde(default, deserialize_with = "de_directions", skip_serializing_if = "Option::is_none")]
    pub directions: Option<u16>,
    /// Largest chunk, in parameters (C_max) [default: 50000]
    #[arg(long, value_parser = positive_usize)]
    #[serde(default, deserialize_with = "de_positive", skip_serializing_if = "Option::is_none")]
    pub chunk_max: Option<usize>,
    /// Seed of initialisation, shuffling and directions [default: 0]
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Train on the first N training samples only
    #[arg(long, value_parser = positive_usize)]
    #[serde(default, deserialize_with = "de_positive", skip_serializing_if = "Option::is_none")]
    pub limit_train: Option<usize>,
    /// Train at most N batches per epoch (smoke tests)
    #[arg(long, value_parser = positive_usize)]
    #[serde(default, deserialize_with = "de_positive", skip_serializing_if = "Option::is_none")]
    pub max_batches: Option<usize>,
    /// Data directory (else $PNN_DATA_DIR, ./data, ../shared/data)
    #[arg(long)]
    #[serde(default, serialize_with = "ser_path", skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Write one JSON object per epoch to this file
    #[arg(long)]
    #[serde(default, serialize_with = "ser_path", skip_serializing_if = "Option::is_none")]
    pub metrics: Option<PathBuf>,
    /// Write the trained model to this file (safetensors, architecture in its metadata)
    #[arg(long)]
    #[serde(default, serialize_with = "ser_path", skip_serializing_if = "Option::is_none")]
    pub save: Option<PathBuf>,
    /// Evaluate on the first N test samples only
    #[arg(long, value_parser = positive_usize)]
    #[serde(default, deserialize_with = "de_positive", skip_serializing_if = "Option::is_none")]
    pub limit_test: Option<usize>,
    /// Save a checkpoint in this directory at every epoch's end (written atomically), so that
    /// `--resume` can continue the run
    #[arg(long, value_name = "DIR")]
    #[serde(default, serialize_with = "ser_path", skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: also save one every N batches
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    #[serde(default, deserialize_with = "de_positive", skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<usize>,
    /// Evaluate perturbations by the reference choreography of Algorithm 1 (perturb, full
    /// forward, perturb, full forward, restore) instead of the simulator's exact fast paths:
    /// slower, the same results up to float rounding (simulated backends only)
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exact_reference: bool,
    /// Train on the pipelined schedule, in windows of N batches: layer l trains batch t while
    /// layer l-1 trains batch t+1, every layer on its own thread (and device), bit-identical to
    /// the sequential schedule. Each window is one step for reset recovery and ends at a
    /// checkpoint; 8 to 32 keeps the pipeline full
    #[arg(long, value_name = "N", value_parser = positive_usize)]
    #[serde(default, deserialize_with = "de_positive", skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<usize>,
    /// Continue the run whose checkpoint is in DIR, with its saved settings; ends bit-identical
    /// to an uninterrupted run. Only epochs (more), backend, data_dir, limit_test, metrics, save,
    /// checkpoint and checkpoint_every may be given anew. Checkpoints go on into DIR unless
    /// --checkpoint says otherwise
    #[arg(long, value_name = "DIR")]
    #[serde(default, skip_serializing)]
    pub resume: Option<PathBuf>,
    /// Start a new run even though the --checkpoint directory holds a saved one, which is then
    /// overwritten (without it, such a run is refused: continue it with --resume instead)
    #[arg(long, conflicts_with = "resume")]
    #[serde(default, skip_serializing)]
    pub fresh: bool,
}
}

fn ser_display<T: fmt::Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&v.to_string()),
        None => s.serialize_none(),
    }
}

/// A backend as `--backend` takes it, every option spelled out.
fn ser_backend<S: Serializer>(b: &Option<BackendSpec>, s: S) -> Result<S::Ok, S::Error> {
    ser_display(&b.as_ref().map(BackendSpec::spelled_out), s)
}

/// A path as text (as it displays, where it is not Unicode).
fn ser_path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    ser_display(&p.as_ref().map(|p| p.display()), s)
}

/// `eps`: a positive number, or `auto` (`crate::train::estimator::choose_eps`). A number in RON
/// and a flag, or the string "auto".
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Eps {
    Fixed(f32),
    Auto,
}

impl FromStr for Eps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Eps::Auto);
        }
        positive_f32(s)
            .map(Eps::Fixed)
            .map_err(|e| format!("{e}; expected a positive number or auto"))
    }
}

impl Serialize for Eps {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Eps::Fixed(x) => s.serialize_f32(*x),
            Eps::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Eps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Eps;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive number or \"auto\"")
            }
            fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Eps, E> {
                let x = x as f32;
                if x.is_finite() && x > 0.0 {
                    Ok(Eps::Fixed(x))
                } else {
                    Err(E::custom(format!("must be a positive number, got {x}")))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, x: u64) -> Result<Eps, E> {
                self.visit_f64(x as f64)
            }
            fn visit_i64<E: serde::de::Error>(self, x: i64) -> Result<Eps, E> {
                self.visit_f64(x as f64)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Eps, E> {
                match s {
                    "auto" => Ok(Eps::Auto),
                    other => Err(E::custom(format!(
                        "'{other}' is not an eps: expected a positive number or \"auto\""
                    ))),
                }
            }
        }
        d.deserialize_any(Visit)
    }
}

fn positive_usize(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive integer")),
    }
}

fn positive_f32(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(x) => Err(format!("must be a positive number, got {x}")),
        Err(_) => Err(format!("'{s}' is not a number")),
    }
}

fn de_parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match usize::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        n => Ok(Some(n)),
    }
}

fn de_positive_f32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    let x = f32::deserialize(d)?;
    if x.is_finite() && x > 0.0 {
        Ok(Some(x))
    } else {
        Err(serde::de::Error::custom(format!(
            "must be a positive number, got {x}"
        )))
    }
}

fn de_directions<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    match u16::deserialize(d)? {
        p @ 1..=64 => Ok(Some(p)),
        p => Err(serde::de::Error::custom(format!(
            "must be between 1 and 64, got {p}"
        ))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin}, line {line}, column {column}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Parse {
        origin: String,
        line: usize,
        column: usize,
        /// The key whose value is wrong, where the error is about one.
        key: Option<String>,
        message: String,
    },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl ExperimentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses config text; `origin` names it in errors. Options may be written bare (`epochs:
    /// 5`, RON's `implicit_some`).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let options = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        options.from_str(text).map_err(|e| {
            let at = pnn_sim::ron_error::locate(text, &e);
            ConfigError::Parse {
                origin: origin.to_string(),
                line: at.line,
                column: at.column,
                key: at.key,
                message: at.message,
            }
        })
    }

    /// These settings as a config file that [`ExperimentConfig::parse`] reads back to the same
    /// settings (`resume` left out: it says where a run comes from, not what it is). Checkpoints
    /// store it, so that `--resume DIR` alone continues a run.
    pub fn to_ron(&self) -> String {
        let pretty = ron::ser::PrettyConfig::new()
            .extensions(ron::extensions::Extensions::IMPLICIT_SOME)
            .new_line("\n")
            .compact_arrays(true);
        ron::ser::to_string_pretty(self, pretty).expect("settings serialise")
    }

    /// The settings `--resume` may change: where the run executes and saves, how far it goes
    /// (more epochs only, checked against the checkpoint), and what it reports. Every other
    /// setting changes the training's numbers, so the continued run would be neither the saved
    /// run nor a fresh one.
    pub const RESUMABLE: &'static [&'static str] = &[
        "epochs",
        "backend",
        "rig",
        "pipeline",
        "data_dir",
        "limit_test",
        "metrics",
        "save",
        "checkpoint",
        "checkpoint_every",
    ];

    /// Refuses `given` (the command line over `--config`) as changes to `self`, the settings
    /// saved in a checkpoint, where it changes a setting outside [`Self::RESUMABLE`], naming each
    /// such setting with both values. Values equal to the saved ones (or to the defaults the
    /// saved run used) are no change.
    pub fn check_resume_changes(&self, given: &Self) -> Result<(), ConfigError> {
        let saved = self.to_run_config()?;
        let merged = self.clone().overlay(given.clone()).to_run_config()?;
        let widths = |r: &RunConfig| {
            r.hidden.clone().unwrap_or_else(|| match r.arch {
                ArchKind::Mlp => crate::model::ModelSpec::default_hidden(r.dataset),
                ArchKind::Cnn => crate::model::ModelSpec::default_channels(r.dataset),
            })
        };
        let (a, b) = (&saved.hyper, &merged.hyper);
        let mut changed = Vec::new();
        let mut cmp = |key: &str, was: String, now: String| {
            if was != now {
                changed.push(format!("{key} is {was} in the checkpoint but {now} now"));
            }
        };
        cmp(
            "dataset",
            saved.dataset.to_string(),
            merged.dataset.to_string(),
        );
        cmp("arch", saved.arch.to_string(), merged.arch.to_string());
        cmp(
            "hidden",
            format!("{:?}", widths(&saved)),
            format!("{:?}", widths(&merged)),
        );
        cmp(
            "proj_dim",
            saved.proj_dim.to_string(),
            merged.proj_dim.to_string(),
        );
        // Every hyperparameter, by its serialised name, so one added to `Hyper` is covered
        // without a line here (a field left out of the JSON holds its default).
        let fields = |h: &crate::train::Hyper| match serde_json::to_value(h) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => unreachable!("Hyper serialises to an object"),
        };
        let (fa, fb) = (fields(a), fields(b));
        let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let show = |v: Option<&serde_json::Value>| {
                v.map_or("the default".to_string(), |v| v.to_string())
            };
            cmp(key, show(fa.get(key)), show(fb.get(key)));
        }
        let all = |n: Option<usize>| n.map_or("all".to_string(), |n| n.to_string());
        cmp(
            "limit_train",
            all(saved.limit_train),
            all(merged.limit_train),
        );
        cmp(
            "max_batches",
            all(saved.max_batches),
            all(merged.max_batches),
        );
        cmp(
            "exact_reference",
            saved.exact_reference.to_string(),
            merged.exact_reference.to_string(),
        );
        if changed.is_empty() {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            key: "resume",
            message: format!(
                "a resumed run keeps the settings it was started with, and these would change: {}. \
                 Resume may change only {} (epochs to more); to train with other settings, start a \
                 new run (another --checkpoint directory, or --fresh)",
                changed.join(", "),
                Self::RESUMABLE.join(", ")
            ),
        })
    }

    /// Reads the rig file, if one is named, into the backend setting: what is stored (in
    /// checkpoints) is then the rig itself, every device's port and options, not a path to a
    /// file that may change. Naming both a rig and a backend is an error.
    pub fn resolve_rig(&mut self) -> Result<(), ConfigError> {
        let Some(path) = self.rig.take() else {
            return Ok(());
        };
        if self.backend.is_some() {
            return Err(ConfigError::Invalid {
                key: "rig",
                message: "give a rig or a backend, not both".into(),
            });
        }
        let rig = Rig::load(&path).map_err(|message| ConfigError::Invalid {
            key: "rig",
            message,
        })?;
        self.backend = Some(BackendSpec::Rig(rig));
        Ok(())
    }

    /// The run these settings describe, with the paper's defaults (section 4.5) for what is unset.
    pub fn to_run_config(&self) -> Result<RunConfig, ConfigError> {
        if self.rig.is_some() {
            let mut resolved = self.clone();
            resolved.resolve_rig()?;
            return resolved.to_run_config();
        }
        let dataset = self.dataset.unwrap_or(DatasetKind::Mnist);
        let arch = self.arch.unwrap_or_default();
        if arch == ArchKind::Mlp && self.proj_dim.is_some() {
            return Err(ConfigError::Invalid {
                key: "proj_dim",
                message: "applies to arch cnn only".into(),
            });
        }
        let defaults = Hyper::default();
        let mut run = RunConfig::new(dataset);
        run.data_dir = self.data_dir.clone();
        run.arch = arch;
        run.proj_dim = self.proj_dim.unwrap_or(run.proj_dim);
        run.hidden = self.hidden.as_ref().map(|w| w.0.clone());
        run.epochs = self.epochs.unwrap_or(run.epochs);
        run.hyper = Hyper {
            lr: self.lr.unwrap_or(defaults.lr),
            eps: match self.eps {
                Some(Eps::Fixed(eps)) => eps,
                Some(Eps::Auto) | None => defaults.eps,
            },
            directions: self.directions.map_or(defaults.directions, usize::from),
            chunk_max: self.chunk_max.unwrap_or(defaults.chunk_max),
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            seed: self.seed.unwrap_or(defaults.seed),
            difference: self.difference.unwrap_or(defaults.difference),
            optimizer: self.optimizer.unwrap_or(defaults.optimizer),
            eps_auto: self.eps == Some(Eps::Auto),
        };
        run.method = self.method.unwrap_or_default();
        run.limit_train = self.limit_train;
        run.limit_test = self.limit_test;
        run.max_batches = self.max_batches;
        if self.checkpoint_every.is_some() && self.checkpoint.is_none() && self.resume.is_none() {
            return Err(ConfigError::Invalid {
                key: "checkpoint_every",
                message: "needs a checkpoint directory (--checkpoint DIR)".into(),
            });
        }
        // A resumed run goes on saving where it came from, unless told otherwise.
        run.checkpoint = self.checkpoint.clone().or_else(|| self.resume.clone());
        run.checkpoint_every = self.checkpoint_every;
        run.resume = self.resume.clone();
        if self.fresh && self.resume.is_some() {
            return Err(ConfigError::Invalid {
                key: "fresh",
                message: "starts a new run, so it cannot go with resume".into(),
            });
        }
        run.fresh = self.fresh;
        run.backend = self.backend.clone().unwrap_or(BackendSpec::Sim);
        if self.exact_reference && !run.backend.is_simulated() {
            return Err(ConfigError::Invalid {
                key: "exact_reference",
                message: "chooses how the simulator evaluates, so it needs a simulated backend \
                          (sim or sim:<profile.ron>); a device evaluates as it does"
                    .into(),
            });
        }
        run.exact_reference = self.exact_reference;
        run.pipeline = self.pipeline;
        Ok(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ExperimentConfig, ConfigError> {
        ExperimentConfig::parse(text, "t.ron")
    }

    #[test]
    fn a_full_config_parses_and_fills_a_run() {
        let c = parse(
            "// comment\n(\n  dataset: \"fashion-mnist\",\n  arch: \"mlp\",\n  hidden: [100, 100, 100],\n  epochs: 7,\n  batch_size: 128,\n  lr: 2e-3,\n  eps: 1e-3,\n  directions: 8,\n  chunk_max: 50000,\n  seed: 3,\n  backend: \"sim\",\n  metrics: \"m.jsonl\",\n)",
        )
        .unwrap();
        let run = c.to_run_config().unwrap();
        assert_eq!(run.dataset, DatasetKind::FashionMnist);
        assert_eq!(run.hidden, Some(vec![100, 100, 100]));
        assert_eq!(run.epochs, 7);
        assert_eq!(run.hyper.batch_size, 128);
        assert_eq!(run.hyper.lr, 2e-3);
        assert_eq!(run.hyper.directions, 8);
        assert_eq!(run.hyper.seed, 3);
        assert_eq!(c.metrics, Some(PathBuf::from("m.jsonl")));
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let file = parse("(epochs: 7, directions: 8, seed: 3)").unwrap();
        let cli = ExperimentConfig {
            directions: Some(2),
            ..Default::default()
        };
        let run = file.overlay(cli).to_run_config().unwrap();
        assert_eq!(
            (run.epochs, run.hyper.directions, run.hyper.seed),
            (7, 2, 3)
        );
    }

    #[test]
    fn an_empty_config_is_the_paper_defaults() {
        let run = parse("()").unwrap().to_run_config().unwrap();
        // Section 4.5's numbers, written out (not `Hyper::default()`, which would compare the
        // defaults with themselves).
        let paper = Hyper {
            lr: 1e-3,
            eps: 1e-3,
            directions: 4,
            chunk_max: 50_000,
            batch_size: 256,
            seed: 0,
            difference: crate::train::estimator::Difference::Central,
            optimizer: crate::train::update::Optimizer::Sgd,
            eps_auto: false,
        };
        assert_eq!(run.hyper, paper);
        assert_eq!(run.epochs, 200);
        assert_eq!(run.dataset, DatasetKind::Mnist);
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn an_unknown_key_names_the_key_and_the_line() {
        let msg = error("(\n  epochs: 3,\n  learning_rate: 0.1,\n)");
        assert!(
            msg.contains("line 3") && msg.contains("learning_rate"),
            "{msg}"
        );
    }

    #[test]
    fn a_wrong_type_names_the_key_and_the_line() {
        let msg = error("(\n  dataset: \"mnist\",\n  epochs: \"ten\",\n)");
        assert!(
            msg.contains("line 3") && msg.contains("key `epochs`"),
            "{msg}"
        );
        let msg = error("(\n  hidden: 50,\n)");
        assert!(
            msg.contains("line 2") && msg.contains("key `hidden`"),
            "{msg}"
        );
        let msg = error("(\n  lr: \"fast\",\n)");
        assert!(msg.contains("line 2") && msg.contains("key `lr`"), "{msg}");
    }

    #[test]
    fn an_invalid_value_names_the_key_and_the_line() {
        for (text, key, what) in [
            (
                "(\n\n  dataset: \"imagenet\",\n)",
                "dataset",
                "unknown dataset",
            ),
            (
                "(\n\n  directions: 65,\n)",
                "directions",
                "between 1 and 64",
            ),
            ("(\n\n  lr: -1.0,\n)", "lr", "positive"),
            ("(\n\n  hidden: [50, 0],\n)", "hidden", "at least 1"),
            ("(\n\n  batch_size: 0,\n)", "batch_size", "at least 1"),
            ("(\n\n  backend: \"tpu\",\n)", "backend", "unknown backend"),
            ("(\n\n  arch: \"rnn\",\n)", "arch", "unknown architecture"),
        ] {
            let msg = error(text);
            assert!(
                msg.contains("line 3")
                    && msg.contains(&format!("key `{key}`"))
                    && msg.contains(what),
                "{text}: {msg}"
            );
        }
    }

    /// Issue 17, item 13: the key named is the one whose value is wrong, for a value that spans
    /// lines (followed by another key on its last line) and in a config on a single line.
    #[test]
    fn the_wrong_key_is_named_across_lines_and_on_one_line() {
        let msg = error("(\n  hidden: [50,\n    0], epochs: 3,\n)");
        assert!(
            msg.contains("key `hidden`") && msg.contains("at least 1"),
            "{msg}"
        );
        for (text, key) in [
            ("(epochs: 3, directions: 65, lr: 0.1)", "directions"),
            ("(epochs: \"ten\", lr: 0.1)", "epochs"),
            ("(lr: 0.1, epochs: \"ten\")", "epochs"),
            ("(seed: 1, hidden: [50, 0])", "hidden"),
            ("(dataset: \"mnist\", batch_size: 0, seed: 2)", "batch_size"),
        ] {
            let msg = error(text);
            assert!(msg.contains(&format!("key `{key}`")), "{text}: {msg}");
        }
    }

    #[test]
    fn eps_is_a_number_or_auto_and_the_estimator_options_parse_by_name() {
        let c = parse("(eps: \"auto\", difference: \"forward\", optimizer: \"momentum\")").unwrap();
        assert_eq!(c.eps, Some(Eps::Auto));
        let run = c.to_run_config().unwrap();
        assert!(run.hyper.eps_auto);
        assert_eq!(run.hyper.eps, Hyper::default().eps);
        assert_eq!(run.hyper.difference, Difference::Forward);
        assert_eq!(run.hyper.optimizer, Optimizer::Momentum);
        assert_eq!(parse(&c.to_ron()).unwrap(), c);
        assert_eq!(parse("(eps: 2)").unwrap().eps, Some(Eps::Fixed(2.0)));
        for (text, what) in [
            ("(eps: \"often\")", "expected a positive number or \"auto\""),
            ("(eps: -1.0)", "must be a positive number"),
            ("(optimizer: \"rmsprop\")", "expected sgd, momentum or adam"),
            ("(difference: \"backward\")", "expected central or forward"),
        ] {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(what), "{text}: {msg}");
        }
        assert_eq!("auto".parse::<Eps>(), Ok(Eps::Auto));
        assert!(
            "0".parse::<Eps>()
                .unwrap_err()
                .contains("positive number or auto")
        );
    }

    #[test]
    fn settings_written_as_ron_read_back_the_same() {
        let full = ExperimentConfig {
            dataset: Some(DatasetKind::FashionMnist),
            arch: Some(Arch::Cnn),
            hidden: Some(Widths(vec![8, 16])),
            proj_dim: Some(4),
            backend: Some(
                "serial:/dev/pts/3?baud=115200&timeout_ms=20&retries=7"
                    .parse()
                    .unwrap(),
            ),
            rig: Some(PathBuf::from("rigs/two boards.ron")),
            epochs: Some(3),
            batch_size: Some(32),
            lr: Some(1.7e-3),
            eps: Some(Eps::Fixed(0.1)),
            difference: Some(Difference::Forward),
            optimizer: Some(Optimizer::Adam),
            method: Some(Method::Bp),
            directions: Some(8),
            chunk_max: Some(1000),
            seed: Some(u64::MAX),
            limit_train: Some(100),
            max_batches: Some(5),
            data_dir: Some(PathBuf::from("data dir/with \"quotes\"")),
            metrics: Some(PathBuf::from("runs/m.jsonl")),
            save: Some(PathBuf::from("runs/m.safetensors")),
            limit_test: Some(50),
            checkpoint: Some(PathBuf::from("runs/ckpt")),
            checkpoint_every: Some(10),
            resume: None,
            exact_reference: true,
            pipeline: Some(16),
            fresh: false,
        };
        let rig = ExperimentConfig {
            backend: Some(
                "sim,tcp:127.0.0.1:4000?baud=115200&timeout_ms=20&retries=7"
                    .parse()
                    .unwrap(),
            ),
            ..Default::default()
        };
        for c in [full, ExperimentConfig::default(), rig] {
            let text = c.to_ron();
            assert_eq!(parse(&text).unwrap(), c, "{text}");
        }
        let resumed = ExperimentConfig {
            resume: Some(PathBuf::from("x")),
            ..Default::default()
        };
        assert_eq!(
            parse(&resumed.to_ron()).unwrap(),
            ExperimentConfig::default()
        );
    }

    /// Checkpoints store the settings as text; those written by the previous, hand-written
    /// `to_ron` (one `key: value,` per line, no `implicit_some` header) still read the same.
    #[test]
    fn settings_saved_by_the_previous_writer_read_back_the_same() {
        let old = "(\n    dataset: \"fashion-mnist\",\n    arch: \"cnn\",\n    hidden: [8, 16],\n    proj_dim: 4,\n    backend: \"serial:/dev/pts/3?baud=115200&timeout_ms=20&retries=7\",\n    epochs: 3,\n    batch_size: 32,\n    lr: 0.0017,\n    eps: 0.1,\n    directions: 8,\n    chunk_max: 1000,\n    seed: 18446744073709551615,\n    limit_train: 100,\n    limit_test: 50,\n    max_batches: 5,\n    data_dir: \"data dir/with \\\"quotes\\\"\",\n    checkpoint: \"runs/ckpt\",\n    checkpoint_every: 10,\n    exact_reference: true,\n)";
        let read = parse(old).unwrap();
        assert_eq!(parse(&read.to_ron()).unwrap(), read);
        assert_eq!(read.lr, Some(1.7e-3));
        assert_eq!(read.seed, Some(u64::MAX));
        assert_eq!(
            read.data_dir,
            Some(PathBuf::from("data dir/with \"quotes\""))
        );
        assert!(read.exact_reference);
    }

    #[test]
    fn checkpoint_every_needs_a_directory_and_a_resumed_run_saves_where_it_came_from() {
        let every = parse("(checkpoint_every: 5)").unwrap();
        assert!(
            every
                .to_run_config()
                .unwrap_err()
                .to_string()
                .contains("checkpoint_every")
        );
        let run = parse("(resume: \"runs/a\", checkpoint_every: 5)")
            .unwrap()
            .to_run_config()
            .unwrap();
        assert_eq!(run.checkpoint, Some(PathBuf::from("runs/a")));
        assert_eq!(run.resume, Some(PathBuf::from("runs/a")));
    }

    #[test]
    fn cnn_settings_parse() {
        let c = parse("(arch: \"cnn\", proj_dim: 16)").unwrap();
        assert_eq!(c.arch, Some(Arch::Cnn));
        assert_eq!(c.proj_dim, Some(16));
        let mlp = parse("(arch: \"mlp\", proj_dim: 16)").unwrap();
        assert!(
            mlp.to_run_config()
                .unwrap_err()
                .to_string()
                .contains("proj_dim")
        );
    }
}
