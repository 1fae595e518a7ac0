//! A CNN block behind the oracle boundary: a perturbed evaluation leaves no trace (thesis section
//! 4.4: BatchNorm running statistics snapshotted and restored), and CNN training through the
//! trainer is deterministic with the host's shadow equal to the device's parameters.

use std::ops::Range;

use firmware_protocol::DirectionSeed;
use firmware_protocol::direction::direction_values;
use pnn::backend::sim::SimOracle;
use pnn::model::{ModelSpec, initialise};
use pnn::oracle::{
    Activations, ForwardMode, ForwardOracle, ForwardOutput, LayerShape, OracleError, PerturbedPair,
    UpdateTerm,
};
use pnn::train::{Hyper, Trainer};
use pnn_sim::Choreography;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    direction_values(DirectionSeed(seed), n).collect()
}

#[test]
fn perturbed_evaluation_leaves_running_statistics_and_parameters_bit_identical() {
    let spec = LayerShape::conv(3, 6, (10, 8), 4, 99);
    for choreography in [Choreography::Fast, Choreography::Reference] {
        let mut oracle = SimOracle::new(spec);
        oracle.set_choreography(choreography);
        // Parameters with BatchNorm scales and shifts away from 1 and 0.
        oracle
            .write_parameters(&gaussian(1, spec.param_count()))
            .unwrap();
        let batch = 5;
        let input = Activations::new(
            batch,
            spec.input_width(),
            gaussian(2, batch * spec.input_width()),
        );
        oracle.load_input(&input).unwrap();
        // Two clean training passes move the running statistics away from (0, 1).
        oracle.forward(ForwardMode::Train).unwrap();
        oracle.forward(ForwardMode::Train).unwrap();
        let block = oracle.conv_block().unwrap();
        let (mean, var) = (bits(block.running_mean()), bits(block.running_var()));
        let params = bits(&oracle.read_parameters().unwrap());
        let eval_before = oracle.forward(ForwardMode::Eval).unwrap();
        // Every chunk of whole channels (3 channels of 30 parameters per chunk), 3 directions.
        let chunks = spec.weight_chunks(90).collect::<Vec<_>>();
        assert_eq!(chunks.len(), 2);
        let mut out = Vec::new();
        for (k, chunk) in chunks.iter().enumerate() {
            let seeds: Vec<_> = (0..3).map(|p| DirectionSeed(10 * k as u64 + p)).collect();
            oracle
                .evaluate_perturbed(chunk.clone(), &seeds, 1e-2, &mut out)
                .unwrap();
            assert_eq!(out.len(), 3);
            assert_ne!(out[0].0, out[0].1, "the perturbation changed nothing");
            assert_eq!(out[0].0.width, spec.feature_width());
        }
        let block = oracle.conv_block().unwrap();
        assert_eq!(
            mean,
            bits(block.running_mean()),
            "{choreography:?}: running mean"
        );
        assert_eq!(
            var,
            bits(block.running_var()),
            "{choreography:?}: running variance"
        );
        assert_eq!(
            params,
            bits(&oracle.read_parameters().unwrap()),
            "{choreography:?}: parameters"
        );
        // Observable through the oracle alone: evaluation reads the running statistics.
        let eval_after = oracle.forward(ForwardMode::Eval).unwrap();
        assert_eq!(
            bits(&eval_before.features.data),
            bits(&eval_after.features.data)
        );
        let next = eval_after.next.as_ref().expect("a conv block pools");
        assert_eq!(bits(&eval_before.next.unwrap().data), bits(&next.data));
        assert_eq!((next.rows, next.width), (batch, spec.output_width()));
    }
}

/// A simulated block seen as a device elsewhere: no in-process capability, so the trainer keeps
/// its shadow by computing each update itself (`firmware_protocol::direction::apply_update`)
/// instead of copying the block's parameters.
struct Remote(SimOracle);

impl ForwardOracle for Remote {
    fn spec(&self) -> &LayerShape {
        self.0.spec()
    }
    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        self.0.write_parameters(params)
    }
    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        self.0.read_parameters()
    }
    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        self.0.load_input(input)
    }
    fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        self.0.forward(mode)
    }
    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<PerturbedPair>,
    ) -> Result<(), OracleError> {
        self.0.evaluate_perturbed(chunk, seeds, eps, out)
    }
    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError> {
        self.0.apply_update(chunk, scale, terms)
    }
    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        self.0.read_layer_state()
    }
    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        self.0.write_layer_state(state)
    }
}

/// Trains a small two-block CNN on synthetic 1x12x12 images for a few batches, on in-process
/// blocks or on the same blocks seen as [`Remote`] devices.
fn train(seed: u64) -> (String, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    train_on(seed, SimOracle::for_layers)
}

fn train_on<O: ForwardOracle>(
    seed: u64,
    oracles: impl Fn(&[LayerShape]) -> Vec<O>,
) -> (String, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let model = ModelSpec {
        input_width: 144,
        hidden: vec![4, 6],
        classes: 3,
        arch: pnn::model::Arch::Cnn {
            image: (1, 12, 12),
            proj_dim: 5,
            seed,
        },
    };
    let specs = model.layer_specs();
    let hyper = Hyper {
        lr: 0.05,
        directions: 3,
        chunk_max: 40,
        batch_size: 16,
        seed,
        ..Hyper::default()
    };
    let init = initialise(&specs, model.classes, seed);
    let mut trainer = Trainer::new(oracles(&specs), init, hyper).unwrap();
    for b in 0..3 {
        let x = gaussian(100 + b, 16 * 144);
        let labels: Vec<u8> = (0..16).map(|i| ((i + b as usize) % 3) as u8).collect();
        trainer
            .train_batch(0, b as u32, &Activations::new(16, 144, x), &labels)
            .unwrap();
    }
    let shadow = trainer.layers().iter().map(|l| l.shadow.clone()).collect();
    let device = trainer
        .oracles_mut()
        .iter_mut()
        .map(|o| o.read_parameters().unwrap())
        .collect();
    (trainer.weights_sha256(), shadow, device)
}

#[test]
fn cnn_training_is_seeded_and_the_shadow_equals_the_device() {
    let (sha, shadow, device) = train(3);
    assert_eq!(shadow, device, "host shadow and device parameters differ");
    // In process the shadow is copied from the block, so the line above cannot fail there. Seen
    // as a remote device, the host computes its shadow itself: it must still be the block's
    // parameters bit for bit, and the run the in-process one.
    let remote = |specs: &[LayerShape]| -> Vec<Remote> {
        SimOracle::for_layers(specs)
            .into_iter()
            .map(Remote)
            .collect()
    };
    let (remote_sha, remote_shadow, remote_device) = train_on(3, remote);
    assert_eq!(
        remote_shadow, remote_device,
        "the host's own update and the block's differ"
    );
    assert_eq!(remote_sha, sha, "the in-process shortcut changed the run");
    assert_eq!(sha, train(3).0);
    assert_ne!(sha, train(4).0);
    // The updates moved every layer's parameters.
    let model = ModelSpec {
        input_width: 144,
        hidden: vec![4, 6],
        classes: 3,
        arch: pnn::model::Arch::Cnn {
            image: (1, 12, 12),
            proj_dim: 5,
            seed: 3,
        },
    };
    let init = initialise(&model.layer_specs(), 3, 3);
    for (before, after) in init.layers.iter().zip(&shadow) {
        assert_ne!(before, after);
    }
}
