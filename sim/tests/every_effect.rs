//! Every hardware effect, switched on alone, is one the fast path honours: it gives what the
//! reference choreography gives (bit for bit where the effect draws per evaluation, else within
//! float rounding and the odd ADC step). Both lists below are exhaustive over `NoiseModel`'s
//! fields, so a new effect does not compile until it is listed here, and then fails here if
//! `NoiseModel::effects` misclassifies it.

use firmware_protocol::{DirectionSeed, UpdateTerm};
use pnn_sim::noise::{Converter, Drift, NoiseModel, StuckFaults};
use pnn_sim::{Choreography, DenseLayer};

const ADC_STEP: f32 = 4.0 / 512.0;

/// Every field away from the ideal device (an exhaustive literal: no `..Default::default()`).
fn every_effect_on() -> NoiseModel {
    NoiseModel {
        seed: 3,
        dac: Some(Converter {
            bits: Some(6),
            bound: 1.0,
        }),
        adc: Some(Converter {
            bits: Some(10),
            bound: 4.0,
        }),
        input_noise: 0.01,
        output_noise: 0.01,
        read_noise: 0.02,
        programming_error: 0.05,
        drift: Some(Drift {
            nu: 0.05,
            nu_std: 0.01,
            t0: 1.0,
            seconds_per_batch: 2.0,
        }),
        weight_clip: Some(0.3),
        weight_bits: Some(5),
        stuck: Some(StuckFaults {
            fraction: 0.1,
            values: vec![0.0, 0.3],
        }),
        gain_mismatch: 0.1,
        nonlinearity: 0.1,
    }
}

/// One model per effect, that effect alone on (destructured exhaustively: a field left out of
/// the list is an unused variable, which the lints refuse).
fn one_at_a_time() -> Vec<(&'static str, NoiseModel)> {
    let NoiseModel {
        seed,
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
    } = every_effect_on();
    let ideal = NoiseModel {
        seed,
        ..NoiseModel::default()
    };
    vec![
        (
            "dac",
            NoiseModel {
                dac,
                ..ideal.clone()
            },
        ),
        (
            "adc",
            NoiseModel {
                adc,
                ..ideal.clone()
            },
        ),
        (
            "input_noise",
            NoiseModel {
                input_noise,
                ..ideal.clone()
            },
        ),
        (
            "output_noise",
            NoiseModel {
                output_noise,
                ..ideal.clone()
            },
        ),
        (
            "read_noise",
            NoiseModel {
                read_noise,
                ..ideal.clone()
            },
        ),
        (
            "programming_error",
            NoiseModel {
                programming_error,
                ..ideal.clone()
            },
        ),
        (
            "drift",
            NoiseModel {
                drift,
                ..ideal.clone()
            },
        ),
        (
            "weight_clip",
            NoiseModel {
                weight_clip,
                ..ideal.clone()
            },
        ),
        (
            "weight_bits",
            NoiseModel {
                weight_bits,
                ..ideal.clone()
            },
        ),
        (
            "stuck",
            NoiseModel {
                stuck,
                ..ideal.clone()
            },
        ),
        (
            "gain_mismatch",
            NoiseModel {
                gain_mismatch,
                ..ideal.clone()
            },
        ),
        (
            "nonlinearity",
            NoiseModel {
                nonlinearity,
                ..ideal
            },
        ),
    ]
}

/// Drives one layer through evaluations and updates under a choreography; returns every
/// activation it produced and the final parameters.
fn drive(model: &NoiseModel, choreography: Choreography) -> (Vec<Vec<f32>>, Vec<f32>) {
    let (n_in, n_out, batch) = (13, 7, 5);
    let mut l = DenseLayer::with_noise(n_in, n_out, model, 21);
    l.set_choreography(choreography);
    let p: Vec<f32> = (0..l.param_count())
        .map(|i| ((i * 29 % 31) as f32 - 15.0) / 40.0)
        .collect();
    l.set_params(&p).unwrap();
    let x: Vec<f32> = (0..batch * n_in)
        .map(|i| ((i * 11 % 19) as f32 - 9.0) / 9.0)
        .collect();
    let (mut seen, mut out) = (Vec::new(), Vec::new());
    // Chunks that start and end mid-row, cover whole rows, and reach into the bias.
    for (k, chunk) in [0..98, 5..30, 90..98, 85..93].into_iter().enumerate() {
        l.load_input(&x).unwrap();
        let seeds: Vec<_> = (0..3).map(|p| DirectionSeed((k * 10 + p) as u64)).collect();
        l.evaluate_perturbed(chunk.clone(), &seeds, 0.05, &mut out)
            .unwrap();
        for (a, b) in &out {
            seen.push(a.clone());
            seen.push(b.clone());
        }
        let terms: Vec<_> = seeds
            .iter()
            .enumerate()
            .map(|(i, s)| UpdateTerm {
                seed: *s,
                derivative: i as f32 - 1.0,
            })
            .collect();
        l.apply_update(chunk, 0.05, &terms).unwrap();
        let mut clean = Vec::new();
        l.forward(&mut clean).unwrap();
        seen.push(clean);
    }
    (seen, l.params().to_vec())
}

#[test]
fn every_effect_is_classified_and_honoured_by_the_fast_path() {
    let ideal = drive(&NoiseModel::default(), Choreography::Reference);
    for (name, model) in one_at_a_time() {
        assert!(!model.is_ideal(), "{name}: counted as ideal");
        model.validate("noise").unwrap();
        let fast = drive(&model, Choreography::Fast);
        let reference = drive(&model, Choreography::Reference);
        // The effect shows at all (else this test would hold it to nothing).
        assert_ne!(reference.0, ideal.0, "{name}: no effect on the outputs");
        assert_eq!(fast.1, reference.1, "{name}: parameters differ");
        if model.effects().per_evaluation_draw {
            assert_eq!(
                fast, reference,
                "{name}: drawn per evaluation, so bit for bit"
            );
            continue;
        }
        let (mut total, mut flips) = (0, 0);
        for (a, b) in fast.0.iter().zip(&reference.0) {
            assert_eq!(a.len(), b.len(), "{name}");
            for (x, y) in a.iter().zip(b) {
                total += 1;
                let d = (x - y).abs();
                if d > 1e-5 {
                    assert!(
                        model.adc.is_some() && (d - ADC_STEP).abs() < 1e-5,
                        "{name}: fast {x} vs reference {y}"
                    );
                    flips += 1;
                }
            }
        }
        assert!(flips * 100 <= total, "{name}: {flips} of {total} differ");
    }
}
