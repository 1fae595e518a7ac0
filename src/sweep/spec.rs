//! A sweep file and the cells it expands to.
//!
//! A sweep is a RON file: a base experiment config (the `--config` schema of
//! [`ExperimentConfig`]) and the settings that vary, as a grid (every combination), an explicit
//! list of cells, or both (every listed cell at every grid point), each at every seed:
//!
//! ```ron
//! (
//!     name: "figure2-mlp",
//!     base: (dataset: "fashion-mnist", arch: "mlp", epochs: 200),
//!     grid: {"directions": [1, 2, 4, 8]},
//!     cells: [{"lr": 1e-3}, {"lr": 1e-2, "eps": 1.0}],
//!     seeds: [0, 1, 2],
//! )
//! ```
//!
//! An axis is named by its setting's key in the config schema, so every setting the run config
//! has can be swept with no code here: a value is put into the base config and read back
//! through the schema's own checks ([`with_setting`]). Keys under `noise.` (`noise.output_noise`,
//! `noise.adc.bound`, `noise.drift.t0`, `noise.seed`, …) set the simulated device's profile
//! ([`crate::run::noise_sweep::set_noise_key`]); the cell then trains on `sim:<its profile>`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::backend::BackendSpec;
use crate::run::noise_sweep::set_noise_key;
use crate::run::settings::ExperimentConfig;
use pnn_sim::profile::DeviceProfile;

/// Settings the sweep sets for each cell itself (its folder holds them), so a sweep may not.
pub const MANAGED_KEYS: [&str; 4] = ["metrics", "checkpoint", "resume", "save"];

/// The key of the seed axis (`seeds: [...]`).
pub const SEED_KEY: &str = "seed";

/// Keys with values, in the order written.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Ordered<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V_<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V_<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a map from setting names (strings) to values, e.g. {\"lr\": [1e-3, 1e-2]}",
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    if out.iter().any(|(seen, _)| *seen == k) {
                        return Err(serde::de::Error::custom(format!("`{k}` is given twice")));
                    }
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V_(std::marker::PhantomData))
    }
}

/// A sweep file as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Names the sweep in job names and reports [default: the file's stem].
    #[serde(default)]
    pub name: Option<String>,
    /// A config file (relative to the sweep file) the base starts from; `base` overrides it.
    #[serde(default)]
    pub base_config: Option<PathBuf>,
    /// The settings every cell shares (the `--config` schema).
    #[serde(default)]
    pub base: ExperimentConfig,
    /// Every combination of these values.
    #[serde(default)]
    pub grid: Ordered<Vec<Value>>,
    /// Explicit cells (each a set of settings), each at every grid point.
    #[serde(default)]
    pub cells: Vec<Ordered<Value>>,
    /// Every cell runs once per seed [default: the base's seed, else 0].
    #[serde(default)]
    pub seeds: Vec<u64>,
}

/// One run of the sweep: its settings where they differ from the base, and its seed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cell {
    /// Its position in the sweep: its folder is `cells/<index>` and its Slurm array index.
    pub index: usize,
    /// The settings that vary, in axis order, the seed last.
    pub values: Vec<(String, Value)>,
}

impl Cell {
    pub fn seed(&self) -> u64 {
        self.values
            .iter()
            .find(|(k, _)| k == SEED_KEY)
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(0)
    }

    /// `directions=4 lr=0.01 seed=1`.
    pub fn label(&self) -> String {
        self.values
            .iter()
            .map(|(k, v)| format!("{k}={}", value_text(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The value of `key` in this cell, as text.
    pub fn value_of(&self, key: &str) -> Option<String> {
        self.values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| value_text(v))
    }
}

/// A value as a person writes it: strings bare, numbers and lists as JSON.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A sweep with its cells worked out: what `run`, `slurm` and `gather` share (stored as
/// `plan.json` in the output folder).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub name: String,
    /// The varying keys, in order, `seed` last.
    pub axes: Vec<String>,
    /// The base settings, as a config file.
    pub base: String,
    pub cells: Vec<Cell>,
    /// Each cell's full settings, as a config file (the `--config` of its run), and, when it
    /// sets `noise.` keys, its device profile; in cell order.
    pub configs: Vec<CellConfig>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CellConfig {
    pub config: String,
    /// The cell's device profile (RON), when the sweep sets `noise.` keys; its backend is then
    /// `sim:<cell folder>/device.ron`.
    pub profile: Option<String>,
}

/// Name of the cell profile file in a cell's folder.
pub const PROFILE_FILE: &str = "device.ron";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read sweep file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sweep file {origin}, line {line}, column {column}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Parse {
        origin: String,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
    #[error("sweep file {origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl SweepFile {
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let options = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        options.from_str(text).map_err(|e| {
            let at = pnn_sim::ron_error::locate(text, &e);
            SpecError::Parse {
                origin: origin.to_string(),
                line: at.line,
                column: at.column,
                key: at.key,
                message: at.message,
            }
        })
    }
}

/// `KEY=VALUE` as `--set` takes it: the value is RON (`epochs=5`, `hidden=[10,10]`); a bare
/// word that is not RON is a string (`dataset=fashion-mnist`).
pub fn parse_override(s: &str) -> Result<(String, Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE (e.g. epochs=5)"))?;
    let value = ron::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

/// Reads a sweep file and works out its cells, with `overrides` (`--set`) over its base.
/// `cell_dir(i)` is where cell `i`'s folder will be (a cell that sets `noise.` keys names its
/// profile there).
pub fn load(
    path: &Path,
    overrides: &[(String, Value)],
    cell_dir: impl Fn(usize) -> PathBuf,
) -> Result<Plan, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let origin = path.display().to_string();
    let mut file = SweepFile::parse(&text, &origin)?;
    for (k, v) in overrides {
        file.base = with_setting(&file.base, k, v).map_err(|message| SpecError::Invalid {
            origin: format!("{origin} with --set"),
            message,
        })?;
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sweep".into());
    let base_dir = path.parent().unwrap_or(Path::new(""));
    plan(file, &stem, base_dir, &origin, cell_dir)
}

/// Works out the cells of `file` (`dir` resolves `base_config`; `origin` names the file in
/// errors).
pub fn plan(
    file: SweepFile,
    stem: &str,
    dir: &Path,
    origin: &str,
    cell_dir: impl Fn(usize) -> PathBuf,
) -> Result<Plan, SpecError> {
    let invalid = |message: String| SpecError::Invalid {
        origin: origin.to_string(),
        message,
    };
    let mut base = match &file.base_config {
        Some(p) => {
            let p = dir.join(p);
            ExperimentConfig::load(&p)
                .map_err(|e| invalid(format!("base_config: {e}")))?
                .overlay(file.base.clone())
        }
        None => file.base.clone(),
    };
    for key in MANAGED_KEYS {
        let set = match key {
            "metrics" => base.metrics.is_some(),
            "checkpoint" => base.checkpoint.is_some(),
            "resume" => base.resume.is_some(),
            _ => false,
        };
        if set {
            return Err(invalid(format!(
                "base: `{key}` is set by the sweep for each cell (in its folder, cells/<index>/); remove it"
            )));
        }
    }
    let wants_model = base.save.take().is_some();
    let seeds = if file.seeds.is_empty() {
        vec![base.seed.unwrap_or(0)]
    } else {
        file.seeds.clone()
    };
    base.seed = None;
    for (i, s) in seeds.iter().enumerate() {
        if seeds[..i].contains(s) {
            return Err(invalid(format!("seeds: {s} is given twice")));
        }
    }
    // Axis order: grid keys, then keys of the listed cells as they first appear, then the seed.
    let mut axes: Vec<String> = Vec::new();
    for (k, values) in &file.grid.0 {
        if values.is_empty() {
            return Err(invalid(format!("grid: `{k}` has no values")));
        }
        axes.push(k.clone());
    }
    for cell in &file.cells {
        for (k, _) in &cell.0 {
            if file.grid.0.iter().any(|(g, _)| g == k) {
                return Err(invalid(format!(
                    "`{k}` is both a grid axis and set by a listed cell: keep it in one place"
                )));
            }
            if !axes.contains(k) {
                axes.push(k.clone());
            }
        }
    }
    for k in &axes {
        check_key(k).map_err(|m| invalid(m.to_string()))?;
    }
    axes.push(SEED_KEY.into());

    let listed: Vec<Vec<(String, Value)>> = if file.cells.is_empty() {
        vec![Vec::new()]
    } else {
        file.cells.iter().map(|c| c.0.clone()).collect()
    };
    let mut points: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (k, values) in &file.grid.0 {
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut p = p.clone();
                    p.push((k.clone(), v.clone()));
                    p
                })
            })
            .collect();
    }
    let mut cells = Vec::new();
    let mut configs = Vec::new();
    for point in &points {
        for extra in &listed {
            for &seed in &seeds {
                let index = cells.len();
                let mut values = point.clone();
                values.extend(extra.iter().cloned());
                values.push((SEED_KEY.into(), Value::from(seed)));
                let cell = Cell { index, values };
                let config = cell_config(&base, &cell, wants_model, &cell_dir(index))
                    .map_err(|m| invalid(format!("cell {index} ({}): {m}", cell.label())))?;
                if let Some(same) = configs.iter().position(|c| *c == config) {
                    return Err(invalid(format!(
                        "cells {same} and {index} ({}) are the same run: a key is given twice with one value",
                        cell.label()
                    )));
                }
                configs.push(config);
                cells.push(cell);
            }
        }
    }
    Ok(Plan {
        name: file.name.unwrap_or_else(|| stem.to_string()),
        axes,
        base: base.to_ron(),
        cells,
        configs,
    })
}

fn check_key(key: &str) -> Result<(), String> {
    if key == SEED_KEY {
        return Err("`seed` is swept with `seeds: [...]`, not as an axis".into());
    }
    if MANAGED_KEYS.contains(&key) {
        return Err(format!(
            "`{key}` is set by the sweep for each cell (in its folder); it cannot be an axis"
        ));
    }
    Ok(())
}

/// `base` with `key` set to `value`, read back through the config schema's checks: any setting
/// the schema has can be set, and a wrong key or value is refused with the schema's message.
pub fn with_setting(
    base: &ExperimentConfig,
    key: &str,
    value: &Value,
) -> Result<ExperimentConfig, String> {
    let Value::Object(mut map) = serde_json::to_value(base).expect("settings serialise") else {
        unreachable!("settings serialise to a map")
    };
    map.insert(key.to_string(), value.clone());
    serde_json::from_value(Value::Object(map))
        .map_err(|e| format!("`{key}: {}`: {e}", value_text(value)))
}

/// The full settings of `cell`: the base, its values, its seed; its noise keys in a profile of
/// its own.
fn cell_config(
    base: &ExperimentConfig,
    cell: &Cell,
    wants_model: bool,
    dir: &Path,
) -> Result<CellConfig, String> {
    let mut config = base.clone();
    let mut noise: Vec<(&str, &Value)> = Vec::new();
    for (k, v) in &cell.values {
        match k.strip_prefix("noise.") {
            Some(path) => noise.push((path, v)),
            None => config = with_setting(&config, k, v)?,
        }
    }
    // Checked as the cell's run will see them: with its checkpoint folder.
    ExperimentConfig {
        checkpoint: Some(dir.join(super::cell::CHECKPOINT_DIR)),
        ..config.clone()
    }
    .to_run_config()
    .map_err(|e| format!("the cell's settings: {e}"))?;
    let profile = if noise.is_empty() {
        None
    } else {
        let mut profile = match &config.backend {
            None | Some(BackendSpec::Sim) => DeviceProfile {
                name: "ideal".into(),
                ..Default::default()
            },
            Some(BackendSpec::SimProfile(p)) => {
                DeviceProfile::load(p).map_err(|e| e.to_string())?
            }
            Some(other) => {
                return Err(format!(
                    "`noise.` keys set a simulated device's profile, but the backend is {other}: use sim or sim:<profile.ron>"
                ));
            }
        };
        let mut name = profile.name.clone();
        for (path, v) in noise {
            set_noise_key(&mut profile.noise, path, v)?;
            name += &format!("+{path}={}", value_text(v));
        }
        profile.name = name;
        let path = dir.join(PROFILE_FILE);
        config.backend = Some(BackendSpec::SimProfile(path));
        Some(
            ron::ser::to_string_pretty(&profile, ron::ser::PrettyConfig::new())
                .expect("profiles serialise"),
        )
    };
    if wants_model {
        config.save = Some(dir.join("model.safetensors"));
    }
    Ok(CellConfig {
        config: config.to_ron(),
        profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(text: &str) -> Result<Plan, SpecError> {
        let file = SweepFile::parse(text, "t.ron")?;
        plan(file, "t", Path::new("."), "t.ron", |i| {
            PathBuf::from(format!("out/cells/{i}"))
        })
    }

    fn config(p: &Plan, i: usize) -> ExperimentConfig {
        ExperimentConfig::parse(&p.configs[i].config, "cell").unwrap()
    }

    #[test]
    fn a_grid_times_seeds_expands_in_order_and_sets_each_setting() {
        let p = plan_of(
            r#"(base: (dataset: "fashion-mnist", epochs: 3), grid: {"lr": [1e-3, 1e-2], "hidden": [[10], [20, 20]]}, seeds: [0, 1])"#,
        )
        .unwrap();
        assert_eq!(p.axes, ["lr", "hidden", "seed"]);
        assert_eq!(p.cells.len(), 8);
        assert_eq!(p.cells[5].label(), "lr=0.01 hidden=[10] seed=1");
        let c = config(&p, 5);
        assert_eq!(c.lr, Some(1e-2));
        assert_eq!(c.hidden.unwrap().0, vec![10]);
        assert_eq!(c.seed, Some(1));
        assert_eq!(c.epochs, Some(3));
        assert_eq!(c.dataset.unwrap().name(), "fashion-mnist");
    }

    #[test]
    fn listed_cells_run_at_every_grid_point() {
        let p = plan_of(
            r#"(grid: {"directions": [1, 2]}, cells: [{"lr": 0.1}, {"lr": 0.01, "eps": 1.0}])"#,
        )
        .unwrap();
        assert_eq!(p.axes, ["directions", "lr", "eps", "seed"]);
        let labels: Vec<_> = p.cells.iter().map(Cell::label).collect();
        assert_eq!(
            labels,
            [
                "directions=1 lr=0.1 seed=0",
                "directions=1 lr=0.01 eps=1.0 seed=0",
                "directions=2 lr=0.1 seed=0",
                "directions=2 lr=0.01 eps=1.0 seed=0",
            ]
        );
        assert_eq!(
            config(&p, 3).eps,
            Some(crate::run::settings::Eps::Fixed(1.0))
        );
    }

    #[test]
    fn a_bad_axis_is_refused_naming_it() {
        for (text, what) in [
            (r#"(grid: {"learning_rate": [1]})"#, "learning_rate"),
            (r#"(grid: {"lr": [-1.0]})"#, "positive"),
            (r#"(grid: {"directions": [65]})"#, "between 1 and 64"),
            (r#"(grid: {"seed": [1]})"#, "seeds"),
            (r#"(grid: {"metrics": ["x"]})"#, "metrics"),
            (r#"(grid: {"lr": []})"#, "no values"),
            (r#"(base: (checkpoint: "c"))"#, "checkpoint"),
            (r#"(grid: {"noise.output_noisy": [0.1]})"#, "output_noisy"),
            (
                r#"(base: (backend: "serial:/dev/null"), grid: {"noise.output_noise": [0.1]})"#,
                "simulated",
            ),
            (r#"(seeds: [1, 1])"#, "twice"),
        ] {
            let e = plan_of(text).unwrap_err().to_string();
            assert!(e.contains(what), "{text}: {e}");
        }
    }

    #[test]
    fn noise_keys_give_each_cell_its_profile() {
        let p = plan_of(
            r#"(grid: {"noise.output_noise": [0.0, 0.1], "noise.adc.bound": [4.0], "noise.drift.t0": [10.0], "noise.seed": [7]})"#,
        )
        .unwrap();
        let c = config(&p, 1);
        assert_eq!(
            c.backend.unwrap().to_string(),
            format!("sim:out/cells/1/{PROFILE_FILE}")
        );
        let profile = DeviceProfile::parse(p.configs[1].profile.as_ref().unwrap(), "p").unwrap();
        assert_eq!(profile.noise.output_noise, 0.1);
        assert_eq!(profile.noise.adc.unwrap().bound, 4.0);
        assert_eq!(profile.noise.drift.unwrap().t0, 10.0);
        assert_eq!(profile.noise.seed, 7);
    }
}
