//! A custom backend: implement `ForwardOracle` for your own layer and train it with MF+DD.
//!
//! `QuirkyDense` is a toy "device": a dense layer held in plain Rust matrices whose outputs pass
//! through a per-unit gain mismatch (fixed at manufacture, unknown to the trainer) and a soft
//! saturation `y / (1 + k|y|)`, as analogue outputs do. The trainer never sees these quirks: it
//! only asks for forward passes, which is the point of MF+DD (thesis section 3). The perturbation
//! choreography here is the literal one (perturb, forward, restore), as a device without a fast
//! path would run it.
//!
//! Before training, the layer goes through the library's conformance suite
//! (`pnn::oracle::conformance::check_contract`), as every backend does in CI: it is how a new
//! backend learns that it keeps the contract (no trace of perturbations, the update arithmetic
//! bit for bit, wrong shapes refused).
//!
//! Run: `PNN_DATA_DIR=/path/to/data cargo run --release --example custom_oracle`

use std::ops::Range;

use firmware_protocol::direction::{apply_update, fill_direction};
use pnn::data::{Dataset, DatasetKind, resolve_data_dir};
use pnn::model::ModelSpec;
use pnn::oracle::conformance::{Probe, check_contract};
use pnn::oracle::{
    Activations, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, LayerShape, OracleError,
    PerturbedPair, UpdateTerm,
};
use pnn::run::{RunConfig, run_with};

struct QuirkyDense {
    spec: LayerShape,
    inputs: usize,
    outputs: usize,
    /// `W` (outputs x inputs, row-major) then the bias: the layout of `LayerShape::Dense`.
    params: Vec<f32>,
    gain: Vec<f32>,
    saturation: f32,
    input: Activations,
    forwards: u64,
}

impl QuirkyDense {
    fn new(spec: LayerShape, unit_seed: u32) -> Self {
        let LayerShape::Dense { inputs, outputs } = spec else {
            panic!("this toy device implements dense layers only");
        };
        // A fixed gain per output unit within +-10 %, from a tiny hash of the unit's index.
        let gain = (0..outputs as u32)
            .map(|j| {
                let h = (j ^ unit_seed).wrapping_mul(2_654_435_761) >> 16;
                0.9 + 0.2 * (h % 1000) as f32 / 1000.0
            })
            .collect();
        Self {
            params: vec![0.0; spec.param_count()],
            spec,
            inputs,
            outputs,
            gain,
            saturation: 0.05,
            input: Activations::default(),
            forwards: 0,
        }
    }

    /// A chunk of these parameters, or a refusal (never a panic: the contract).
    fn check_chunk(&self, chunk: &Range<usize>) -> Result<(), OracleError> {
        if chunk.is_empty() || chunk.end > self.params.len() {
            return Err(OracleError::Shape(format!(
                "chunk {chunk:?} of a layer of {} parameters",
                self.params.len()
            )));
        }
        Ok(())
    }

    /// The device's forward pass on the cached input: `relu(g * s(x W^T + b))`.
    fn run(&mut self) -> Activations {
        self.forwards += 1;
        let (w, b) = self.params.split_at(self.inputs * self.outputs);
        let mut out = Vec::with_capacity(self.input.rows * self.outputs);
        for x in self.input.data.chunks_exact(self.inputs) {
            for (j, row) in w.chunks_exact(self.inputs).enumerate() {
                let z: f32 = row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + b[j];
                let y = self.gain[j] * z / (1.0 + self.saturation * z.abs());
                out.push(y.max(0.0));
            }
        }
        Activations::new(self.input.rows, self.outputs, out)
    }
}

impl ForwardOracle for QuirkyDense {
    fn spec(&self) -> &LayerShape {
        &self.spec
    }

    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        if params.len() != self.params.len() {
            return Err(OracleError::Shape(format!(
                "{} parameters for a layer of {}",
                params.len(),
                self.params.len()
            )));
        }
        self.params.copy_from_slice(params);
        Ok(())
    }

    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        Ok(self.params.clone())
    }

    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        if input.width != self.inputs {
            return Err(OracleError::Shape(format!(
                "input is {} wide, the layer takes {}",
                input.width, self.inputs
            )));
        }
        self.input = input.clone();
        Ok(())
    }

    fn forward(&mut self, _mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        Ok(ForwardOutput {
            features: self.run(),
            next: None,
        })
    }

    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<PerturbedPair>,
    ) -> Result<(), OracleError> {
        self.check_chunk(&chunk)?;
        let saved = self.params[chunk.clone()].to_vec();
        let mut v = vec![0.0; chunk.len()];
        out.clear();
        for &seed in seeds {
            // The direction the seed names: the same unit vector the trainer's shadow uses.
            fill_direction(seed, &mut v);
            let pass = |sign: f32, this: &mut Self| {
                for ((p, s), v) in this.params[chunk.clone()].iter_mut().zip(&saved).zip(&v) {
                    *p = s + sign * eps * v;
                }
                this.run()
            };
            let plus = pass(1.0, self);
            let minus = pass(-1.0, self);
            out.push((plus, minus));
        }
        // Restore exactly: a perturbed evaluation must leave no trace (the oracle contract).
        self.params[chunk].copy_from_slice(&saved);
        Ok(())
    }

    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError> {
        // Algorithm 1 line 12, with the one shared arithmetic so the host's shadow stays equal.
        self.check_chunk(&chunk)?;
        let n = chunk.len();
        let (mut v, mut g) = (vec![0.0; n], vec![0.0; n]);
        apply_update(&mut self.params[chunk], scale, terms, &mut v, &mut g);
        Ok(())
    }

    /// A dense layer keeps no state besides its parameters.
    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        Ok(None)
    }

    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        match state {
            [] => Ok(()),
            _ => Err(OracleError::Shape(
                "a dense layer keeps no layer state".into(),
            )),
        }
    }

    // No capability accessors: this device is neither in this process's memory as the simulator
    // is (`in_process`) nor behind a link (`link`), so the defaults (`None`) say so.
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The contract first, on a small layer of the same kind.
    let probe = Probe::default();
    let report = check_contract(&mut QuirkyDense::new(LayerShape::dense(30, 8), 0), &probe);
    println!("{report}");
    report.into_result()?;

    let dir = resolve_data_dir(None)?;
    let mut data = Dataset::load(DatasetKind::Mnist, &dir)?;
    data.train.truncate(10_000);
    let model = ModelSpec::mlp(DatasetKind::Mnist, Some(vec![50, 50]));
    let oracles: Vec<QuirkyDense> = model
        .layer_specs()
        .into_iter()
        .enumerate()
        .map(|(l, spec)| QuirkyDense::new(spec, l as u32))
        .collect();
    let mut config = RunConfig::new(DatasetKind::Mnist);
    config.epochs = 3;
    let summary = run_with(
        &config,
        &data,
        &model,
        oracles,
        |m: &pnn::report::metrics::EpochMetrics| {
            println!(
                "epoch {}: local loss {:?}, test accuracy cumulative {:.4}, final-layer {:.4}",
                m.epoch,
                m.train_local_loss,
                m.test_accuracy_cumulative,
                m.test_accuracy_final_layer
            );
        },
    )?;
    println!(
        "trained a quirky device for {} epochs on {} samples: {} oracle evaluations, test accuracy {:.4} (cumulative)",
        summary.epochs,
        summary.train_samples,
        summary.oracle_evaluations,
        summary.test_accuracy_cumulative
    );
    Ok(())
}
