//! Trained models on disk: the safetensors format, with the architecture in its metadata, so the
//! file is self-describing and loads in Python with `safetensors` and numpy alone.
//!
//! # Layout (format version 1)
//! Tensors, all little-endian `F32`:
//! - `layers.{l}.{role}` for each parameter tensor of layer `l`, in the order of the layer's flat
//!   parameter vector `W_l` (a dense layer: `weight` `[outputs, inputs]` then `bias` `[outputs]`);
//!   concatenating them flattened, in the listed order, gives back `W_l` exactly;
//! - `layers.{l}.projection`: `M_l`, `[features, classes]` (thesis eq. 1, `G_l = a_l M_l`).
//!
//! Metadata (the safetensors `__metadata__` string map):
//! - `format`: `"pnn-model"`, `format_version`: `"1"`;
//! - `pnn_model`: a JSON document ([`ModelMeta`]): dataset, classes, input shape `[C, H, W]`, the
//!   normaliser (per-channel mean and std of the training set: `x = (pixel/255 - mean_c)/std_c`),
//!   hyperparameters, epochs trained, and per layer its kind and shape (`{"kind": "dense",
//!   "inputs": .., "outputs": ..}`), the names, roles and shapes of its parameter tensors in flat
//!   order, and its projection tensor.
//!
//! Prediction (thesis section 4.1): a layer's goodness is `G_l = a_l M_l` on its features `a_l`;
//! *final-layer* predicts `argmax G_L`, *cumulative* predicts `argmax sum_l G_l`.
//!
//! A new layer kind adds a variant to [`KindMeta`] and an arm to [`param_tensors`] (the compiler
//! points at both); readers that do not know a kind refuse the file with a clear error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::data::{DatasetKind, Normalizer, Split};
use crate::oracle::{ConvGeometry, ForwardOracle, LayerShape, OracleError};
use crate::train::evaluation::{self, EvalSums, Evaluation};
use crate::train::projection::Projection;
use crate::train::{Hyper, Trainer};

pub const FORMAT: &str = "pnn-model";
pub const FORMAT_VERSION: u32 = 1;

/// A trained model: everything needed to run it again on any backend.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedModel {
    pub dataset: DatasetKind,
    pub classes: usize,
    /// `[channels, height, width]` of one input image.
    pub input_shape: [usize; 3],
    pub normalizer: Normalizer,
    pub hyper: Hyper,
    /// Epochs the model was trained for.
    pub epochs: u32,
    pub layers: Vec<SavedLayer>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SavedLayer {
    pub spec: LayerShape,
    /// `W_l`, flat, in the layout of `spec.kind`.
    pub params: Vec<f32>,
    pub projection: Projection,
}

/// The `pnn_model` metadata document.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelMeta {
    pub dataset: String,
    pub classes: usize,
    pub input_shape: [usize; 3],
    pub normalizer: NormalizerMeta,
    pub hyperparameters: Hyper,
    pub epochs: u32,
    pub layers: Vec<LayerMeta>,
    /// How to predict, in words, for whoever opens the file without this documentation.
    pub prediction: String,
    /// The `pnn` version that wrote the file.
    pub writer: String,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NormalizerMeta {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerMeta {
    #[serde(flatten)]
    pub kind: KindMeta,
    /// The parameter tensors, in the order they make up the flat `W_l`.
    pub params: Vec<TensorMeta>,
    pub projection: TensorMeta,
}

/// A layer's kind and shape. Serialised with a `kind` tag: `{"kind": "dense", ...}`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KindMeta {
    /// Linear + ReLU: `a = relu(x W^T + b)`.
    Dense { inputs: usize, outputs: usize },
    /// Conv 3x3 + BatchNorm + ReLU (+ MaxPool 2x2 for the next block), goodness features from a
    /// per-channel random projection `A` drawn from `projection_seed` (thesis section 4.4).
    /// Not yet written by `--save` (see [`SavedModel::check_exportable`]).
    Conv(ConvGeometry),
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub role: String,
    pub shape: Vec<usize>,
}

impl KindMeta {
    pub fn of(shape: &LayerShape) -> Self {
        match *shape {
            LayerShape::Dense { inputs, outputs } => Self::Dense { inputs, outputs },
            LayerShape::Conv(geometry) => Self::Conv(geometry),
        }
    }

    pub fn layer_spec(&self) -> LayerShape {
        match *self {
            Self::Dense { inputs, outputs } => LayerShape::dense(inputs, outputs),
            Self::Conv(geometry) => LayerShape::Conv(geometry),
        }
    }
}

/// The parameter tensors of a layer, `(role, shape)`, in the order of its flat parameter vector.
pub fn param_tensors(shape: &LayerShape) -> Vec<(&'static str, Vec<usize>)> {
    match *shape {
        LayerShape::Dense { inputs, outputs } => {
            vec![("weight", vec![outputs, inputs]), ("bias", vec![outputs])]
        }
        // Per output channel: conv weights (C_in x 3 x 3), conv bias, BN scale, BN shift.
        LayerShape::Conv(g) => vec![("channel_params", vec![g.out_channels, g.channel_params()])],
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable safetensors file: {what}")]
    SafeTensors { path: PathBuf, what: String },
    #[error("{path}: not a pnn model: {what}")]
    Format { path: PathBuf, what: String },
}

/// A tensor about to be written: name, shape, values.
type NamedTensor<'a> = (String, Vec<usize>, &'a [f32]);

const WRITER: &str = concat!("pnn ", env!("CARGO_PKG_VERSION"));

impl SavedModel {
    /// The trainer's current model (its host shadow of every `W_l`, and every `M_l`).
    pub fn from_trainer<O: ForwardOracle>(
        trainer: &Trainer<O>,
        specs: &[LayerShape],
        data: &crate::data::Dataset,
        epochs: u32,
    ) -> Self {
        let (c, h, w) = data.kind.image_shape();
        Self {
            dataset: data.kind,
            classes: data.classes(),
            input_shape: [c, h, w],
            normalizer: data.normalizer.clone(),
            hyper: trainer.hyper().clone(),
            epochs,
            layers: trainer
                .layers()
                .iter()
                .zip(specs)
                .map(|(state, spec)| SavedLayer {
                    spec: *spec,
                    params: state.shadow.clone(),
                    projection: state.projection.clone(),
                })
                .collect(),
        }
    }

    /// Refuses what the format cannot hold yet: a CNN's BatchNorm running statistics live on the
    /// device, outside the host's shadow of the parameters, so a saved CNN would not evaluate as
    /// trained.
    pub fn check_exportable(arch: crate::model::ArchKind) -> Result<(), String> {
        match arch == crate::model::ArchKind::Cnn {
            true => Err(
                "--save does not support CNN models yet: their BatchNorm running statistics \
                         are device state that the model file does not carry"
                    .into(),
            ),
            false => Ok(()),
        }
    }

    pub fn layer_specs(&self) -> Vec<LayerShape> {
        self.layers.iter().map(|l| l.spec).collect()
    }

    /// The same digest as [`Trainer::weights_sha256`] (every `W_l`, then every `M_l`, as
    /// little-endian f32), so a file can be matched to the run summary that produced it.
    pub fn weights_sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for layer in &self.layers {
            layer.params.iter().for_each(|w| h.update(w.to_le_bytes()));
        }
        for layer in &self.layers {
            let m = &layer.projection.data;
            m.iter().for_each(|w| h.update(w.to_le_bytes()));
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn projections(&self) -> Vec<Projection> {
        self.layers.iter().map(|l| l.projection.clone()).collect()
    }

    /// The metadata document and the tensors (name, shape, values) in file order.
    fn to_parts(&self) -> (ModelMeta, Vec<NamedTensor<'_>>) {
        let mut tensors = Vec::new();
        let mut layers = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let mut params = Vec::new();
            let mut offset = 0;
            for (role, shape) in param_tensors(&layer.spec) {
                let n: usize = shape.iter().product();
                let name = format!("layers.{l}.{role}");
                tensors.push((
                    name.clone(),
                    shape.clone(),
                    &layer.params[offset..offset + n],
                ));
                offset += n;
                params.push(TensorMeta {
                    name,
                    role: role.into(),
                    shape,
                });
            }
            let p = &layer.projection;
            let projection = TensorMeta {
                name: format!("layers.{l}.projection"),
                role: "projection".into(),
                shape: vec![p.rows, p.classes],
            };
            tensors.push((
                projection.name.clone(),
                projection.shape.clone(),
                &p.data[..],
            ));
            layers.push(LayerMeta {
                kind: KindMeta::of(&layer.spec),
                params,
                projection,
            });
        }
        let meta = ModelMeta {
            dataset: self.dataset.name().into(),
            classes: self.classes,
            input_shape: self.input_shape,
            normalizer: NormalizerMeta {
                mean: self.normalizer.mean.clone(),
                std: self.normalizer.std.clone(),
            },
            hyperparameters: self.hyper.clone(),
            epochs: self.epochs,
            layers,
            prediction: "x = (pixels/255 - mean[c]) / std[c], flattened C,H,W; per layer a_l = \
                         layer(a_{l-1}), G_l = a_l @ projection_l; cumulative = argmax sum_l G_l, \
                         final_layer = argmax G_L"
                .into(),
            writer: WRITER.into(),
        };
        (meta, tensors)
    }

    /// The safetensors bytes of this model.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (meta, tensors) = self.to_parts();
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(name, shape, values)| {
                let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name, shape, raw)
            })
            .collect();
        let views = bytes.iter().map(|(name, shape, raw)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), raw)
                .expect("shape and data agree by construction");
            (name.as_str(), view)
        });
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            (
                "pnn_model".to_string(),
                serde_json::to_string(&meta).expect("metadata serialises"),
            ),
        ]);
        safetensors::serialize(views, Some(metadata)).expect("tensors serialise")
    }

    /// Checks, before a run, that [`SavedModel::save`] will be able to write `path`: it names a
    /// file, not a directory, and its directory exists or can be created and takes a file. A run
    /// should not learn only at its end that its model cannot be kept. Errors name the path.
    pub fn check_destination(path: &Path) -> Result<(), String> {
        let shown = path.display();
        if path.as_os_str().is_empty() || path.is_dir() {
            return Err(format!(
                "--save {shown} is a directory; name the model file, e.g. {}",
                path.join("model.safetensors").display()
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                format!(
                    "--save {shown}: cannot create its directory {}: {e}",
                    dir.display()
                )
            })?;
        }
        // The same temporary file the save writes, left empty and removed again.
        let tmp = Self::temporary(path);
        std::fs::write(&tmp, b"")
            .map_err(|e| format!("--save {shown}: cannot write a file there: {e}"))?;
        let _ = std::fs::remove_file(&tmp);
        Ok(())
    }

    fn temporary(path: &Path) -> PathBuf {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        PathBuf::from(tmp)
    }

    /// Writes the model atomically (a temporary file beside it, then a rename).
    pub fn save(&self, path: &Path) -> Result<(), ExportError> {
        let io = |source| ExportError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = Self::temporary(path);
        std::fs::write(&tmp, self.to_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn load(path: &Path) -> Result<Self, ExportError> {
        let bytes = std::fs::read(path).map_err(|source| ExportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses and checks a model file; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, ExportError> {
        let bad = |what: String| ExportError::Format {
            path: path.to_path_buf(),
            what,
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| ExportError::SafeTensors {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| ExportError::SafeTensors {
                path: path.to_path_buf(),
                what: e.to_string(),
            })?;
        let info = header
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("the file has no metadata".into()))?;
        match info.get("format") {
            Some(f) if f == FORMAT => {}
            other => {
                return Err(bad(format!(
                    "metadata 'format' is {other:?}, expected \"{FORMAT}\""
                )));
            }
        }
        match info.get("format_version").map(|v| v.parse::<u32>()) {
            Some(Ok(FORMAT_VERSION)) => {}
            _ => {
                return Err(bad(format!(
                    "metadata 'format_version' is {:?}; this build reads version {FORMAT_VERSION}",
                    info.get("format_version")
                )));
            }
        }
        let json = info
            .get("pnn_model")
            .ok_or_else(|| bad("metadata has no 'pnn_model' entry".into()))?;
        let meta: ModelMeta = serde_json::from_str(json)
            .map_err(|e| bad(format!("metadata 'pnn_model' is not valid: {e}")))?;
        let dataset: DatasetKind = meta.dataset.parse().map_err(bad)?;
        let [c, h, w] = meta.input_shape;
        if (c, h, w) != dataset.image_shape() {
            return Err(bad(format!(
                "input shape {:?} does not match {dataset} ({:?})",
                meta.input_shape,
                dataset.image_shape()
            )));
        }
        if meta.classes != dataset.classes() {
            return Err(bad(format!(
                "{} classes, {dataset} has {}",
                meta.classes,
                dataset.classes()
            )));
        }
        let norm = &meta.normalizer;
        if norm.mean.len() != c || norm.std.len() != c {
            return Err(bad(format!(
                "the normaliser has {} means and {} stds for {c} channels",
                norm.mean.len(),
                norm.std.len()
            )));
        }
        if norm.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || norm.mean.iter().any(|m| !m.is_finite())
        {
            return Err(bad(
                "the normaliser has a non-finite mean or a std <= 0".into()
            ));
        }
        meta.hyperparameters.validate().map_err(bad)?;
        if meta.layers.is_empty() {
            return Err(bad("the model has no layers".into()));
        }
        let read = |t: &TensorMeta| -> Result<Vec<f32>, ExportError> {
            let view = st
                .tensor(&t.name)
                .map_err(|e| bad(format!("tensor '{}': {e}", t.name)))?;
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!(
                    "tensor '{}' is {:?}, expected F32",
                    t.name,
                    view.dtype()
                )));
            }
            if view.shape() != t.shape.as_slice() {
                return Err(bad(format!(
                    "tensor '{}' has shape {:?}, the metadata says {:?}",
                    t.name,
                    view.shape(),
                    t.shape
                )));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let mut layers = Vec::new();
        let mut width = c * h * w;
        for (l, lm) in meta.layers.iter().enumerate() {
            let spec = lm.kind.layer_spec();
            if spec.input_width() != width {
                return Err(bad(format!(
                    "layer {l} takes {} inputs, the previous stage gives {width}",
                    spec.input_width()
                )));
            }
            let expected = param_tensors(&spec);
            let roles: Vec<(&str, &[usize])> = lm
                .params
                .iter()
                .map(|t| (t.role.as_str(), t.shape.as_slice()))
                .collect();
            let wanted: Vec<(&str, &[usize])> =
                expected.iter().map(|(r, s)| (*r, s.as_slice())).collect();
            if roles != wanted {
                return Err(bad(format!(
                    "layer {l}: parameter tensors {roles:?}, a {:?} layer has {wanted:?}",
                    lm.kind
                )));
            }
            let mut params = Vec::with_capacity(spec.param_count());
            for t in &lm.params {
                params.extend(read(t)?);
            }
            if lm.projection.shape != [spec.feature_width(), meta.classes] {
                return Err(bad(format!(
                    "layer {l}: projection shape {:?}, expected [{}, {}]",
                    lm.projection.shape,
                    spec.feature_width(),
                    meta.classes
                )));
            }
            let m = read(&lm.projection)?;
            if params.iter().chain(&m).any(|v| !v.is_finite()) {
                return Err(bad(format!("layer {l} holds a non-finite value")));
            }
            width = spec.output_width();
            layers.push(SavedLayer {
                projection: Projection::new(spec.feature_width(), meta.classes, m),
                params,
                spec,
            });
        }
        Ok(Self {
            dataset,
            classes: meta.classes,
            input_shape: meta.input_shape,
            normalizer: Normalizer {
                mean: norm.mean.clone(),
                std: norm.std.clone(),
                plane: h * w,
            },
            hyper: meta.hyperparameters,
            epochs: meta.epochs,
            layers,
        })
    }

    /// Programs the model's parameters into one oracle per layer (the backend's, opened for
    /// [`SavedModel::layer_specs`]).
    pub fn program<O: ForwardOracle>(&self, oracles: &mut [O]) -> Result<(), OracleError> {
        if oracles.len() != self.layers.len() {
            return Err(OracleError::Shape(format!(
                "the model has {} layers, the backend provides {}",
                self.layers.len(),
                oracles.len()
            )));
        }
        for (l, (oracle, layer)) in oracles.iter_mut().zip(&self.layers).enumerate() {
            if oracle.spec() != &layer.spec {
                return Err(OracleError::Shape(format!(
                    "layer {l}: the backend's layer is {:?}, the model's {:?}",
                    oracle.spec(),
                    layer.spec
                )));
            }
            oracle.write_parameters(&layer.params)?;
        }
        Ok(())
    }
}

/// Each sample's label and predicted class in both modes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Predictions {
    pub labels: Vec<u8>,
    pub cumulative: Vec<usize>,
    pub final_layer: Vec<usize>,
}

impl Predictions {
    /// CSV with a header: `index,label,cumulative,final_layer`.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("index,label,cumulative,final_layer\n");
        for (i, ((y, c), f)) in self
            .labels
            .iter()
            .zip(&self.cumulative)
            .zip(&self.final_layer)
            .enumerate()
        {
            s.push_str(&format!("{i},{y},{c},{f}\n"));
        }
        s
    }
}

/// Evaluates both prediction modes and every layer on `split` through programmed oracles, by
/// the one evaluation loop ([`evaluation::evaluate_batch`]: the trainer's batches and
/// arithmetic), and returns each prediction too.
pub fn evaluate_with_predictions<O: ForwardOracle>(
    oracles: &mut [O],
    projections: &[Projection],
    split: &Split,
    normalizer: &Normalizer,
    batch_size: usize,
) -> Result<(Evaluation, Predictions), OracleError> {
    let mut sums = EvalSums::new(oracles.len());
    let mut preds = Predictions::default();
    let indices: Vec<usize> = (0..split.len()).collect();
    for batch in indices.chunks(batch_size.max(1)) {
        let predicted =
            evaluation::evaluate_batch(oracles, projections, split, normalizer, batch, &mut sums)?;
        preds.labels.extend(batch.iter().map(|&i| split.labels[i]));
        preds.cumulative.extend(predicted.cumulative);
        preds.final_layer.extend(predicted.final_layer);
    }
    Ok((sums.finish(), preds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelSpec, initialise};

    fn model() -> SavedModel {
        let spec = ModelSpec::mlp(DatasetKind::Mnist, Some(vec![7, 5]));
        let specs = spec.layer_specs();
        let init = initialise(&specs, 10, 1);
        SavedModel {
            dataset: DatasetKind::Mnist,
            classes: 10,
            input_shape: [1, 28, 28],
            normalizer: Normalizer {
                mean: vec![0.13],
                std: vec![0.31],
                plane: 784,
            },
            hyper: Hyper::default(),
            epochs: 3,
            layers: specs
                .into_iter()
                .zip(init.layers)
                .zip(init.projections)
                .map(|((spec, params), projection)| SavedLayer {
                    spec,
                    params,
                    projection,
                })
                .collect(),
        }
    }

    #[test]
    fn a_model_round_trips_bit_exactly() {
        let m = model();
        let back = SavedModel::from_bytes(&m.to_bytes(), Path::new("m.safetensors")).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn metadata_names_the_architecture() {
        let bytes = model().to_bytes();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let info = header.metadata().as_ref().unwrap();
        let meta: ModelMeta = serde_json::from_str(&info["pnn_model"]).unwrap();
        assert_eq!(
            meta.layers[0].kind,
            KindMeta::Dense {
                inputs: 784,
                outputs: 7
            }
        );
        let v: serde_json::Value = serde_json::from_str(&info["pnn_model"]).unwrap();
        assert_eq!(v["layers"][1]["kind"], "dense");
        assert_eq!(
            v["layers"][1]["params"][0]["shape"],
            serde_json::json!([5, 7])
        );
    }

    #[test]
    fn garbage_and_mismatches_are_errors_not_panics() {
        let p = Path::new("x.safetensors");
        for junk in [
            &b""[..],
            b"\x08\0\0\0\0\0\0\0{}",
            b"hello world, not a model",
        ] {
            assert!(SavedModel::from_bytes(junk, p).is_err());
        }
        // A file whose metadata says one shape and whose tensor has another.
        let mut m = model();
        m.layers[1].spec = LayerShape::dense(7, 6);
        m.layers[1].params.extend([0.0; 8]);
        m.layers[1].projection = Projection::new(6, 10, vec![0.0; 60]);
        let ok = SavedModel::from_bytes(&m.to_bytes(), p).unwrap();
        assert_eq!(ok.layers[1].spec.feature_width(), 6);
        let mut bad = model();
        bad.layers[1].spec = LayerShape::dense(9, 5); // does not chain from the 7-wide layer 0
        bad.layers[1].params.extend([0.0; 10]);
        let err = SavedModel::from_bytes(&bad.to_bytes(), p).unwrap_err();
        assert!(err.to_string().contains("layer 1 takes 9 inputs"), "{err}");
    }
}
