//! Checkpoints: everything a run needs to continue bit-identically, written atomically.
//!
//! File layout (`DIR/checkpoint.pnn`): the magic `PNNCKPT1`, the payload length (u64 LE), the
//! payload's SHA-256, then the payload, a postcard encoding of [`Checkpoint`], followed by the
//! [`Extras`] as JSON: fields added after the first format (postcard is not self-describing, so a
//! new field inside the postcard part would make older checkpoints unreadable; a JSON object
//! reads with missing fields defaulted, and readers that predate it ignore the trailing bytes). A file cut at any
//! byte, or altered, fails the length or digest check and is refused; a checkpoint of another
//! model, dataset or backend shape is refused by [`Checkpoint::check_compatible`]. Writes go to
//! a temporary file in the same directory, are fsynced, then renamed over the old checkpoint, so
//! a crash mid-write leaves the previous checkpoint intact.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::data::Dataset;
use crate::model::ModelSpec;
use crate::report::metrics::EpochMetrics;
use crate::train::projection::Projection;
use crate::train::{HostState, Hyper};

const MAGIC: &[u8; 8] = b"PNNCKPT1";
const HEADER: usize = 8 + 8 + 32;
pub const FILE_NAME: &str = "checkpoint.pnn";
const TEMP_PREFIX: &str = ".checkpoint.pnn-";

/// What identifies a run: a checkpoint resumes only a run with the same identity.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunIdentity {
    pub dataset: String,
    pub arch: String,
    /// Parameters per layer and features per layer, as the backend reported them.
    pub layer_params: Vec<usize>,
    pub layer_features: Vec<usize>,
    pub classes: usize,
    pub train_samples: usize,
    /// The hyperparameters, seed included (JSON of `Hyper`, so a field added later still compares).
    pub hyper_json: String,
    /// Batches per epoch at most (`--max-batches`), which changes the order of the updates.
    pub max_batches: Option<usize>,
    /// The training data's fingerprint ([`data_fingerprint`]), so that other data under the same
    /// name is refused; `None` in checkpoints written before it was recorded (stored in [`Extras`]).
    #[serde(skip)]
    pub data: Option<String>,
}

/// The fields added to the checkpoint after its first format, stored after the postcard part as
/// JSON (see the module docs). Add new fields here, each `#[serde(default)]`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Extras {
    #[serde(default)]
    data: Option<String>,
    /// [`OptionsState::rule_state`] as bit patterns, so JSON carries every value exactly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rule_state_bits: Vec<u32>,
    /// [`OptionsState::chosen_eps`] as bit patterns (`--eps auto`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chosen_eps_bits: Vec<u32>,
    /// [`OptionsState::eps_history`] as bit patterns (`--eps auto`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    eps_history_bits: Vec<Vec<u32>>,
}

/// A training split's fingerprint: its size and the SHA-256 of its labels and of its images.
/// Hashing the 47 MB of MNIST's training images takes about 0.1 s.
pub fn data_fingerprint(split: &crate::data::Split) -> String {
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!(
        "{} samples of {} bytes, labels sha256 {}, images sha256 {}",
        split.len(),
        split.sample_len,
        &hex(&Sha256::digest(&split.labels))[..16],
        &hex(&Sha256::digest(&split.images))[..16],
    )
}

/// Where in the run the next step starts: epoch (0-based) and batch within it. A batch equal to
/// the epoch's number of batches means that its training is done and its evaluation is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: u32,
    pub batch: u32,
}

/// A run's whole state. Random streams are counter-based (directions by `DirectionKey`, data
/// order by (seed, epoch)), so the position is every generator's counter; plain SGD keeps no
/// optimizer state.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub identity: RunIdentity,
    pub epochs: u32,
    pub position: Position,
    /// The host's shadow of every layer's parameters.
    pub layers: Vec<Vec<f32>>,
    pub projections: Vec<Projection>,
    /// Sums of the local losses over the batches done in the current epoch.
    pub epoch_loss_sums: Vec<f64>,
    pub epoch_batches: u32,
    pub epoch_train_seconds: f64,
    pub train_seconds: f64,
    pub oracle_evaluations: u64,
    /// Metrics of the completed epochs.
    pub metrics: Vec<EpochMetrics>,
    /// Each layer's state outside its parameters (BatchNorm running statistics), where it has some
    /// (`ForwardOracle::read_layer_state`).
    pub layer_state: Vec<Option<Vec<f32>>>,
    /// Link traffic and recoveries so far, for backends with a link.
    pub link: Option<LinkTotals>,
    /// The settings the run was started with, as a config file (RON): `pnn-train --resume DIR`
    /// needs nothing else.
    pub settings: Option<String>,
    /// State of the estimator's options (optimizer moments). Stored in the [`Extras`] after the
    /// postcard part, so every older checkpoint loads (with empty options state).
    #[serde(skip)]
    pub options: OptionsState,
}

/// What a run with non-default estimator options must carry across a resume (see
/// [`Checkpoint::options`]).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptionsState {
    /// [`crate::train::update::UpdateRule::state`]: momentum's or Adam's moments.
    pub rule_state: Vec<f32>,
    /// `--eps auto`: each layer's eps now.
    pub chosen_eps: Vec<f32>,
    /// `--eps auto`: each completed epoch's eps per layer, as its metrics reported them
    /// ([`EpochMetrics::eps`], which the payload's metrics do not carry).
    pub eps_history: Vec<Vec<f32>>,
}

/// A run's link counters ([`crate::oracle::LinkCounters`]: traffic and health), summed over the
/// processes that carried it, with the re-programmings after device resets. Its own type because
/// it is part of the checkpoint file (postcard: the fields and their order are the format).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkTotals {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub round_trips: u64,
    pub retries: u64,
    pub resyncs: u64,
    pub reprograms: u64,
}

impl std::ops::Add for LinkTotals {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            bytes_up: self.bytes_up + o.bytes_up,
            bytes_down: self.bytes_down + o.bytes_down,
            round_trips: self.round_trips + o.round_trips,
            retries: self.retries + o.retries,
            resyncs: self.resyncs + o.resyncs,
            reprograms: self.reprograms + o.reprograms,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a pnn checkpoint: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("the checkpoint in {path} is of another run: {what}")]
    Mismatch { path: PathBuf, what: String },
    #[error(
        "the run in {path} was started for {saved} epochs and --epochs {given} is fewer: resume continues a run or extends it (--epochs {saved} or more), it does not cut it short"
    )]
    FewerEpochs {
        path: PathBuf,
        saved: u32,
        given: u32,
    },
    /// A fresh run was pointed at a checkpoint directory that holds a run (the
    /// checkpoint-safety rule: nothing overwrites a saved run unless told to).
    #[error(
        "{path} holds {what}; a new run would overwrite it. Continue that run with `pnn-train --resume {dir}`, or start over with --fresh (the saved run is then lost), or choose another --checkpoint directory"
    )]
    HoldsRun {
        path: PathBuf,
        what: String,
        /// The directory, as one shell word.
        dir: String,
    },
}

impl RunIdentity {
    /// The identity of a run of `model` on `data` with `hyper`, at most `max_batches` batches
    /// per epoch.
    pub fn of(
        model: &ModelSpec,
        data: &Dataset,
        hyper: &Hyper,
        max_batches: Option<usize>,
    ) -> Self {
        let specs = model.layer_specs();
        Self {
            dataset: data.kind.name().into(),
            arch: model.arch_name().into(),
            layer_params: specs.iter().map(|s| s.param_count()).collect(),
            layer_features: specs.iter().map(|s| s.feature_width()).collect(),
            classes: model.classes,
            train_samples: data.train.len(),
            hyper_json: serde_json::to_string(hyper).expect("hyperparameters serialise"),
            max_batches,
            data: Some(data_fingerprint(&data.train)),
        }
    }
}

impl Checkpoint {
    /// The host's state the checkpoint holds.
    pub fn host_state(&self) -> HostState {
        HostState {
            shadows: self.layers.clone(),
            projections: self.projections.clone(),
            oracle_evaluations: self.oracle_evaluations,
            rule_state: self.options.rule_state.clone(),
            chosen_eps: self.options.chosen_eps.clone(),
        }
    }

    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Writes the checkpoint into `dir` atomically (temporary file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut payload = postcard::to_stdvec(self).expect("a checkpoint always serialises");
        let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let extras = Extras {
            data: self.identity.data.clone(),
            rule_state_bits: bits(&self.options.rule_state),
            chosen_eps_bits: bits(&self.options.chosen_eps),
            eps_history_bits: self.options.eps_history.iter().map(|e| bits(e)).collect(),
        };
        serde_json::to_writer(&mut payload, &extras).expect("extras serialise");
        // Temporary files of writes that a crash cut short are of no use to anyone.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let mut file = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(io)?;
        file.write_all(MAGIC).map_err(io)?;
        file.write_all(&(payload.len() as u64).to_le_bytes())
            .map_err(io)?;
        file.write_all(&Sha256::digest(&payload)).map_err(io)?;
        file.write_all(&payload).map_err(io)?;
        file.as_file().sync_all().map_err(io)?;
        file.persist(Self::path_in(dir)).map_err(|e| io(e.error))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads and verifies the checkpoint in `dir`.
    pub fn load(dir: &Path) -> Result<Self, CheckpointError> {
        let path = Self::path_in(dir);
        let bytes = std::fs::read(&path).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|what| CheckpointError::Corrupt { path, what })
    }

    /// Verifies and decodes the bytes of a checkpoint file; the error says what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(format!("no checkpoint header ({} bytes)", bytes.len()));
        }
        let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        let payload = &bytes[HEADER..];
        if payload.len() as u64 != len {
            return Err(format!(
                "truncated or padded: header says {len} bytes of payload, file has {}",
                payload.len()
            ));
        }
        if Sha256::digest(payload).as_slice() != &bytes[16..HEADER] {
            return Err("payload digest mismatch (the file was altered or damaged)".into());
        }
        let (mut checkpoint, rest): (Self, _) = postcard::take_from_bytes(payload)
            .map_err(|e| format!("payload does not decode: {e}"))?;
        if !rest.is_empty() {
            let extras: Extras = serde_json::from_slice(rest)
                .map_err(|e| format!("the payload's extras do not decode: {e}"))?;
            checkpoint.identity.data = extras.data;
            let values = |bits: Vec<u32>| bits.into_iter().map(f32::from_bits).collect::<Vec<_>>();
            checkpoint.options.rule_state = values(extras.rule_state_bits);
            checkpoint.options.chosen_eps = values(extras.chosen_eps_bits);
            checkpoint.options.eps_history =
                extras.eps_history_bits.into_iter().map(values).collect();
            for (m, eps) in checkpoint
                .metrics
                .iter_mut()
                .zip(&checkpoint.options.eps_history)
            {
                m.eps = Some(eps.clone());
            }
        }
        Ok(checkpoint)
    }

    /// Refuses a checkpoint whose run differs from `identity` (another model, dataset, data
    /// subset, hyperparameters or backend layer shapes).
    pub fn check_compatible(
        &self,
        identity: &RunIdentity,
        dir: &Path,
    ) -> Result<(), CheckpointError> {
        let mine = &self.identity;
        let mut diffs = Vec::new();
        let mut cmp = |what: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{what} is {a} in the checkpoint but {b} now"));
            }
        };
        cmp("dataset", mine.dataset.clone(), identity.dataset.clone());
        cmp("architecture", mine.arch.clone(), identity.arch.clone());
        cmp(
            "parameters per layer",
            format!("{:?}", mine.layer_params),
            format!("{:?}", identity.layer_params),
        );
        cmp(
            "features per layer",
            format!("{:?}", mine.layer_features),
            format!("{:?}", identity.layer_features),
        );
        cmp(
            "classes",
            mine.classes.to_string(),
            identity.classes.to_string(),
        );
        cmp(
            "training samples",
            mine.train_samples.to_string(),
            identity.train_samples.to_string(),
        );
        cmp(
            "hyperparameters",
            mine.hyper_json.clone(),
            identity.hyper_json.clone(),
        );
        if let (Some(saved), Some(now)) = (&mine.data, &identity.data) {
            cmp("the training data", saved.clone(), now.clone());
        }
        cmp(
            "max batches per epoch",
            format!("{:?}", mine.max_batches),
            format!("{:?}", identity.max_batches),
        );
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::Mismatch {
                path: Self::path_in(dir),
                what: diffs.join("; "),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            identity: RunIdentity {
                dataset: "mnist".into(),
                arch: "mlp".into(),
                layer_params: vec![6, 3],
                layer_features: vec![2, 1],
                classes: 2,
                train_samples: 10,
                hyper_json: "{}".into(),
                max_batches: None,
                data: Some("10 samples of 3 bytes".into()),
            },
            epochs: 3,
            position: Position { epoch: 1, batch: 4 },
            layers: vec![
                vec![0.5, -1.25, 3.0, f32::MIN_POSITIVE, -0.0, 7.0],
                vec![1.0, 2.0, 3.0],
            ],
            projections: vec![
                Projection::new(2, 2, vec![0.1, 0.2, 0.3, 0.4]),
                Projection::new(1, 2, vec![9.0, 8.0]),
            ],
            epoch_loss_sums: vec![1.5, 2.5],
            epoch_batches: 4,
            epoch_train_seconds: 0.25,
            train_seconds: 1.5,
            oracle_evaluations: 99,
            metrics: Vec::new(),
            layer_state: vec![None, Some(vec![0.5, 2.0])],
            link: Some(LinkTotals {
                retries: 3,
                ..Default::default()
            }),
            settings: Some("(epochs: 3)".into()),
            options: OptionsState::default(),
        }
    }

    #[test]
    fn round_trips_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let c = sample();
        c.save(dir.path()).unwrap();
        let back = Checkpoint::load(dir.path()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.layers[0][4].to_bits(), (-0.0f32).to_bits());
        // Saving again replaces it and leaves no temporary files behind.
        c.save(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn optimizer_state_round_trips_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let plain = sample();
        plain.save(dir.path()).unwrap();
        assert_eq!(Checkpoint::load(dir.path()).unwrap(), plain);
        let mut with = sample();
        with.options.rule_state = vec![1.5, -0.0, f32::from_bits(7)];
        with.save(dir.path()).unwrap();
        let back = Checkpoint::load(dir.path()).unwrap();
        assert_eq!(back, with);
        assert_eq!(
            back.host_state().rule_state[1].to_bits(),
            (-0.0f32).to_bits()
        );
    }

    #[test]
    fn a_checkpoint_cut_at_any_byte_or_altered_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        sample().save(dir.path()).unwrap();
        let path = Checkpoint::path_in(dir.path());
        let full = std::fs::read(&path).unwrap();
        for cut in 0..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let err = Checkpoint::load(dir.path()).expect_err("a truncated checkpoint loaded");
            assert!(
                matches!(err, CheckpointError::Corrupt { .. }),
                "cut at {cut}: {err}"
            );
        }
        for flip in [0, 9, 20, HEADER, full.len() - 1] {
            let mut bad = full.clone();
            bad[flip] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            assert!(
                Checkpoint::load(dir.path()).is_err(),
                "flipped byte {flip} loaded"
            );
        }
    }

    #[test]
    fn another_run_is_refused_with_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let c = sample();
        let mut other = c.identity.clone();
        other.layer_params = vec![6, 4];
        other.dataset = "fashion-mnist".into();
        let err = c
            .check_compatible(&other, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dataset is mnist in the checkpoint but fashion-mnist now"),
            "{err}"
        );
        assert!(
            err.contains("parameters per layer is [6, 3] in the checkpoint but [6, 4] now"),
            "{err}"
        );
        assert!(c.check_compatible(&c.identity, dir.path()).is_ok());
    }
}
