//! Noise injection, effect by effect: each hardware effect of a device profile is measured on a
//! simulated layer and held to what the profile says (issue 4). No dataset needed.

use std::path::Path;
use std::process::Command;

use firmware_protocol::{DirectionSeed, UpdateTerm};
use pnn_sim::Choreography;
use pnn_sim::DenseLayer;
use pnn_sim::noise::{Converter, Drift, NoiseModel, StuckFaults};
use pnn_sim::profile::DeviceProfile;

/// The ADC step of the profiles below: 10 bits over [0, 4].
const ADC_STEP: f32 = 4.0 / 512.0;

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn distinct(v: &[f32]) -> Vec<f32> {
    let mut v = v.to_vec();
    v.sort_by(f32::total_cmp);
    v.dedup();
    v
}

/// A layer with all weights zero and every bias `bias`, and a loaded batch of zeros.
fn constant_layer(model: &NoiseModel, n_out: usize, bias: f32, batch: usize) -> DenseLayer {
    let n_in = 3;
    let mut l = DenseLayer::with_noise(n_in, n_out, model, 7);
    let mut p = vec![0.0; n_in * n_out + n_out];
    p[n_in * n_out..].fill(bias);
    l.set_params(&p).unwrap();
    l.load_input(&vec![0.0; batch * n_in]).unwrap();
    l
}

/// `forward` `n` times; every output value of every pass.
fn samples(l: &mut DenseLayer, n: usize) -> Vec<f32> {
    let mut all = Vec::new();
    let mut out = Vec::new();
    for _ in 0..n {
        l.forward(&mut out).unwrap();
        all.extend_from_slice(&out);
    }
    all
}

#[test]
fn output_noise_has_the_std_the_profile_sets_relative_to_the_adc_bound() {
    // 0.05 of an ADC bound of 8 (no quantisation): std 0.4 around a bias of 4 (10 sigma above
    // the ReLU's corner, so nothing is cut).
    let model = NoiseModel {
        output_noise: 0.05,
        adc: Some(Converter {
            bits: None,
            bound: 8.0,
        }),
        ..Default::default()
    };
    let mut l = constant_layer(&model, 16, 4.0, 64);
    let (mean, std) = mean_std(&samples(&mut l, 100));
    assert!((mean - 4.0).abs() < 0.01, "mean {mean}");
    assert!((std / 0.4 - 1.0).abs() < 0.02, "std {std}, expected 0.4");
    // Without an ADC the std is the setting itself.
    let model = NoiseModel {
        output_noise: 0.3,
        ..Default::default()
    };
    let mut l = constant_layer(&model, 16, 4.0, 64);
    let (_, std) = mean_std(&samples(&mut l, 100));
    assert!((std / 0.3 - 1.0).abs() < 0.02, "std {std}, expected 0.3");
}

#[test]
fn noise_is_redrawn_every_forward_and_seeded() {
    let model = NoiseModel {
        output_noise: 0.1,
        ..Default::default()
    };
    let mut l = constant_layer(&model, 4, 2.0, 8);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    l.forward(&mut a).unwrap();
    l.forward(&mut b).unwrap();
    assert_ne!(a, b, "two forwards drew the same noise");
    // The same seed replays the same stream; another seed does not.
    let mut again = constant_layer(&model, 4, 2.0, 8);
    let mut c = Vec::new();
    again.forward(&mut c).unwrap();
    assert_eq!(a, c);
    let mut other = DenseLayer::with_noise(3, 4, &model, 8);
    let mut p = vec![0.0; 16];
    p[12..].fill(2.0);
    other.set_params(&p).unwrap();
    other.load_input(&[0.0; 24]).unwrap();
    other.forward(&mut c).unwrap();
    assert_ne!(a, c);
}

#[test]
fn input_noise_has_the_std_the_profile_sets_relative_to_the_dac_bound() {
    // y = x + noise + 5 with w = 1: std 0.02 x 2 = 0.04.
    let model = NoiseModel {
        input_noise: 0.02,
        dac: Some(Converter {
            bits: None,
            bound: 2.0,
        }),
        ..Default::default()
    };
    let mut l = DenseLayer::with_noise(1, 1, &model, 3);
    l.set_params(&[1.0, 5.0]).unwrap();
    l.load_input(&[0.5; 512]).unwrap();
    let (mean, std) = mean_std(&samples(&mut l, 100));
    assert!((mean - 5.5).abs() < 0.002, "mean {mean}");
    assert!((std / 0.04 - 1.0).abs() < 0.02, "std {std}, expected 0.04");
}

#[test]
fn read_noise_is_multiplicative_in_the_weight() {
    // Each output reads one weight: y_i = x w_i (1 + 0.05 xi) + 10, std 0.05 |x w_i|.
    let model = NoiseModel {
        read_noise: 0.05,
        ..Default::default()
    };
    let mut l = DenseLayer::with_noise(1, 3, &model, 5);
    l.set_params(&[1.0, 3.0, -2.0, 10.0, 10.0, 10.0]).unwrap();
    l.load_input(&[2.0; 256]).unwrap();
    let all = samples(&mut l, 200);
    for (i, w) in [1.0f64, 3.0, -2.0].into_iter().enumerate() {
        let column: Vec<f32> = all.iter().skip(i).step_by(3).copied().collect();
        let (mean, std) = mean_std(&column);
        let expected = 0.05 * (2.0 * w).abs();
        assert!(
            (mean - (10.0 + 2.0 * w)).abs() < 0.01,
            "output {i}: mean {mean}"
        );
        assert!(
            (std / expected - 1.0).abs() < 0.03,
            "output {i}: std {std}, expected {expected}"
        );
    }
}

#[test]
fn converters_give_exactly_two_to_the_bits_levels_within_their_bounds() {
    for bits in [2u32, 4, 7] {
        // DAC: a sweep far past the bound, offset by the bound so the ReLU cuts nothing.
        let bound = 1.5;
        let model = NoiseModel {
            dac: Some(Converter {
                bits: Some(bits),
                bound,
            }),
            ..Default::default()
        };
        let mut l = DenseLayer::with_noise(1, 1, &model, 1);
        l.set_params(&[1.0, bound]).unwrap();
        let x: Vec<f32> = (0..20_001).map(|i| (i as f32 - 10_000.0) * 4e-4).collect();
        l.load_input(&x).unwrap();
        let mut out = Vec::new();
        l.forward(&mut out).unwrap();
        let levels = distinct(&out);
        assert_eq!(levels.len(), 1 << bits, "DAC with {bits} bits");
        // Clipped to [-bound, bound): the offset outputs lie in [0, 2 bound).
        assert_eq!(levels[0], 0.0);
        assert!(*levels.last().unwrap() < 2.0 * bound);

        // ADC: the same sweep on the output; the ReLU keeps the codes 0..2^(bits-1)-1.
        let model = NoiseModel {
            adc: Some(Converter {
                bits: Some(bits),
                bound,
            }),
            ..Default::default()
        };
        let mut l = DenseLayer::with_noise(1, 1, &model, 1);
        l.set_params(&[1.0, 0.0]).unwrap();
        l.load_input(&x).unwrap();
        l.forward(&mut out).unwrap();
        let levels = distinct(&out);
        assert_eq!(levels.len(), 1 << (bits - 1), "ADC with {bits} bits");
        let step = bound / (1u32 << (bits - 1)) as f32;
        assert_eq!(*levels.last().unwrap(), bound - step);
        // And the converter itself, negative codes included.
        let c = Converter {
            bits: Some(bits),
            bound,
        };
        let all: Vec<f32> = x.iter().map(|&v| c.convert(v)).collect();
        assert_eq!(distinct(&all).len(), 1 << bits);
    }
}

#[test]
fn weights_are_clipped_and_quantised_to_two_to_the_bits_levels() {
    let model = NoiseModel {
        weight_clip: Some(0.5),
        weight_bits: Some(4),
        ..Default::default()
    };
    let (n_in, n_out) = (100, 10);
    let mut l = DenseLayer::with_noise(n_in, n_out, &model, 2);
    let targets: Vec<f32> = (0..n_in * n_out)
        .map(|i| -1.0 + 2.0 * i as f32 / (n_in * n_out) as f32)
        .chain(std::iter::repeat_n(0.0, n_out))
        .collect();
    l.set_params(&targets).unwrap();
    let levels = distinct(l.effective_weights());
    assert_eq!(levels.len(), 16);
    assert_eq!(levels[0], -0.5);
    assert!(*levels.last().unwrap() < 0.5);
    // The stored parameters stay the targets the host wrote.
    assert_eq!(l.params(), &targets[..]);
    // Clipping alone bounds every effective weight.
    let clip = NoiseModel {
        weight_clip: Some(0.25),
        ..Default::default()
    };
    let mut l = DenseLayer::with_noise(n_in, n_out, &clip, 2);
    l.set_params(&targets).unwrap();
    let w = l.effective_weights();
    assert!(w.iter().all(|v| v.abs() <= 0.25));
    let beyond = targets[..n_in * n_out]
        .iter()
        .filter(|t| t.abs() >= 0.25)
        .count();
    assert!(beyond > 700);
    assert_eq!(w.iter().filter(|v| v.abs() == 0.25).count(), beyond);
}

#[test]
fn clipping_bounds_the_inputs_and_outputs() {
    let model = NoiseModel {
        dac: Some(Converter {
            bits: None,
            bound: 2.0,
        }),
        adc: Some(Converter {
            bits: None,
            bound: 3.0,
        }),
        ..Default::default()
    };
    let mut l = DenseLayer::with_noise(1, 2, &model, 1);
    // Output 0 passes the clipped input; output 1 amplifies it past the ADC's bound.
    l.set_params(&[1.0, 10.0, 0.0, 0.0]).unwrap();
    l.load_input(&[5.0, 1.0, -7.0]).unwrap();
    let mut out = Vec::new();
    l.forward(&mut out).unwrap();
    assert_eq!(out, vec![2.0, 3.0, 1.0, 3.0, 0.0, 0.0]);
}

#[test]
fn output_nonlinearity_is_y_over_one_plus_n_abs_y() {
    let model = NoiseModel {
        nonlinearity: 0.25,
        ..Default::default()
    };
    let mut l = DenseLayer::with_noise(1, 1, &model, 1);
    l.set_params(&[1.0, 0.0]).unwrap();
    let x = [0.0f32, 0.5, 1.0, 4.0, 10.0];
    l.load_input(&x).unwrap();
    let mut out = Vec::new();
    l.forward(&mut out).unwrap();
    for (y, x) in out.iter().zip(x) {
        assert!((y - x / (1.0 + 0.25 * x)).abs() < 1e-6, "{x} -> {y}");
    }
}

fn training_terms(step: u64) -> [UpdateTerm; 2] {
    [
        UpdateTerm {
            seed: DirectionSeed(100 + step),
            derivative: 0.8,
        },
        UpdateTerm {
            seed: DirectionSeed(200 + step),
            derivative: -0.5,
        },
    ]
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| 0.1 + 0.01 * (i % 37) as f32).collect()
}

#[test]
fn programming_error_is_kept_between_writes_and_redrawn_by_a_write() {
    let model = NoiseModel {
        programming_error: 0.1,
        ..Default::default()
    };
    let (n_in, n_out) = (50, 40);
    let mut l = DenseLayer::with_noise(n_in, n_out, &model, 9);
    let targets = ramp(n_in * n_out + n_out);
    l.set_params(&targets).unwrap();
    let first = l.effective_weights().to_vec();
    // Relative error of the stated std.
    let rel: Vec<f32> = first
        .iter()
        .zip(&targets)
        .map(|(e, w)| e / w - 1.0)
        .collect();
    let (mean, std) = mean_std(&rel);
    assert!(
        mean.abs() < 0.01 && (std / 0.1 - 1.0).abs() < 0.06,
        "{mean} {std}"
    );
    // Reads, loads and perturbed evaluations do not reprogram.
    let mut out = Vec::new();
    let mut pairs = Vec::new();
    for k in 0..5 {
        l.load_input(&vec![0.3; 8 * n_in]).unwrap();
        l.forward(&mut out).unwrap();
        l.evaluate_perturbed(0..500, &[DirectionSeed(k)], 1e-2, &mut pairs)
            .unwrap();
        assert_eq!(l.effective_weights(), &first[..]);
    }
    // Writing the same targets again draws a new error.
    l.set_params(&targets).unwrap();
    let second = l.effective_weights().to_vec();
    let changed = first.iter().zip(&second).filter(|(a, b)| a != b).count();
    assert_eq!(changed, first.len());
    // An update writes its chunk only.
    l.apply_update(100..300, 0.01, &training_terms(0)).unwrap();
    let third = l.effective_weights();
    for (i, (a, b)) in second.iter().zip(third).enumerate() {
        assert_eq!((100..300).contains(&i), a != b, "weight {i}");
    }
}

#[test]
fn drift_follows_the_power_law_from_each_write() {
    let nu = 0.05;
    let model = NoiseModel {
        drift: Some(Drift {
            nu,
            nu_std: 0.0,
            t0: 20.0,
            seconds_per_batch: 0.0,
        }),
        ..Default::default()
    };
    let (n_in, n_out) = (10, 4);
    let mut l = DenseLayer::with_noise(n_in, n_out, &model, 1);
    let targets = ramp(n_in * n_out + n_out);
    l.set_params(&targets).unwrap();
    let w0 = targets[..n_in * n_out].to_vec();
    // Before t0 nothing drifts; after it, w0 (t/t0)^-nu.
    l.advance_time(10.0);
    assert_eq!(l.effective_weights(), &w0[..]);
    let mut t = 10.0;
    let mut points = Vec::new();
    for target_t in [20.0, 200.0, 2_000.0, 20_000.0, 2.0e6] {
        l.advance_time(target_t - t);
        t = target_t;
        let ratio = l.effective_weights()[7] / w0[7];
        let expected = (t / 20.0f64).powf(-nu as f64) as f32;
        assert!(
            (ratio / expected - 1.0).abs() < 1e-5,
            "t {t}: {ratio} vs {expected}"
        );
        points.push(((t / 20.0).ln(), (ratio as f64).ln()));
    }
    // The log-log slope is -nu.
    let (a, b) = (points[1], points[4]);
    let slope = (b.1 - a.1) / (b.0 - a.0);
    assert!((slope + nu as f64).abs() < 1e-4, "slope {slope}");
    // A write restarts the clock of what it writes: those weights are back at their target.
    l.apply_update(0..10, 0.01, &training_terms(1)).unwrap();
    let e = l.effective_weights();
    assert_eq!(&e[..10], &l.params()[..10]);
    assert!((e[20] / w0[20] - (1.0e5f64).powf(-0.05) as f32).abs() < 1e-5);
    // The clock also ticks per loaded batch.
    let ticking = NoiseModel {
        drift: Some(Drift {
            nu,
            nu_std: 0.0,
            t0: 1.0,
            seconds_per_batch: 10.0,
        }),
        ..Default::default()
    };
    let mut l = DenseLayer::with_noise(n_in, n_out, &ticking, 1);
    l.set_params(&targets).unwrap();
    for _ in 0..3 {
        l.load_input(&[1.0; 10]).unwrap();
    }
    let ratio = l.effective_weights()[3] / w0[3];
    assert!((ratio - 30f32.powf(-nu)).abs() < 1e-6);
}

#[test]
fn drift_exponents_vary_per_weight_but_each_follows_its_power_law() {
    let model = NoiseModel {
        drift: Some(Drift {
            nu: 0.05,
            nu_std: 0.01,
            t0: 20.0,
            seconds_per_batch: 0.0,
        }),
        ..Default::default()
    };
    let mut l = DenseLayer::with_noise(30, 30, &model, 4);
    let targets = ramp(930);
    l.set_params(&targets).unwrap();
    l.advance_time(200.0);
    let at200 = l.effective_weights().to_vec();
    l.advance_time(1800.0);
    let at2000 = l.effective_weights();
    let nus: Vec<f32> = targets
        .iter()
        .zip(&at200)
        .map(|(w, e)| -(e / w).ln() / 10f32.ln())
        .collect();
    let (mean, std) = mean_std(&nus);
    assert!(
        (mean - 0.05).abs() < 0.002 && (std - 0.01).abs() < 0.002,
        "{mean} {std}"
    );
    for ((w, e), nu) in targets.iter().zip(at2000).zip(&nus) {
        assert!((e / w - 100f32.powf(-nu)).abs() < 1e-4);
    }
}

fn faulty_model() -> NoiseModel {
    NoiseModel {
        seed: 1,
        gain_mismatch: 0.2,
        stuck: Some(StuckFaults {
            fraction: 0.2,
            values: vec![0.0, 0.5, -0.5],
        }),
        ..Default::default()
    }
}

#[test]
fn stuck_weights_are_unchanged_by_training_updates() {
    let (n_in, n_out) = (20, 10);
    let mut l = DenseLayer::with_noise(n_in, n_out, &faulty_model(), 11);
    let targets = ramp(n_in * n_out + n_out);
    l.set_params(&targets).unwrap();
    let device = l.device().unwrap();
    let stuck: Vec<(usize, f32)> = (0..n_in * n_out)
        .filter_map(|i| device.stuck_at(i).map(|v| (i, v)))
        .collect();
    let fraction = stuck.len() as f64 / (n_in * n_out) as f64;
    assert!((0.12..0.28).contains(&fraction), "{fraction}");
    let before = l.effective_weights().to_vec();
    l.load_input(&vec![0.5; 4 * n_in]).unwrap();
    let mut pairs = Vec::new();
    for step in 0..20 {
        let chunk = (step as usize * 37) % 150..(step as usize * 37) % 150 + 60;
        let terms = training_terms(step);
        let seeds: Vec<_> = terms.iter().map(|t| t.seed).collect();
        l.evaluate_perturbed(chunk.clone(), &seeds, 1e-2, &mut pairs)
            .unwrap();
        l.apply_update(chunk, 0.05, &terms).unwrap();
    }
    let after = l.effective_weights();
    for &(i, v) in &stuck {
        assert_eq!(after[i], v, "stuck weight {i} moved");
        assert_ne!(
            l.params()[i],
            targets[i],
            "the target of {i} was never updated"
        );
    }
    let moved = (0..n_in * n_out).filter(|&i| after[i] != before[i]).count();
    assert!(moved >= (n_in * n_out - stuck.len()) * 3 / 4, "{moved}");
}

#[test]
fn faults_and_gains_are_fixed_by_the_seed() {
    let model = faulty_model();
    let a = DenseLayer::with_noise(20, 10, &model, 11);
    let b = DenseLayer::with_noise(20, 10, &model, 11);
    let c = DenseLayer::with_noise(20, 10, &model, 12);
    let (da, db, dc) = (
        a.device().unwrap(),
        b.device().unwrap(),
        c.device().unwrap(),
    );
    let gains = |d: &pnn_sim::noise::Device| (0..200).map(|i| d.gain(i)).collect::<Vec<_>>();
    let stuck = |d: &pnn_sim::noise::Device| (0..200).map(|i| d.stuck_at(i)).collect::<Vec<_>>();
    assert_eq!(gains(da), gains(db));
    assert_eq!(stuck(da), stuck(db));
    assert_ne!(gains(da), gains(dc));
    assert_ne!(stuck(da), stuck(dc));
    let (mean, std) = mean_std(&gains(da));
    assert!(
        (mean - 1.0).abs() < 0.04 && (std - 0.2).abs() < 0.03,
        "{mean} {std}"
    );
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
    let mut seen = Vec::new();
    let mut out = Vec::new();
    // Chunks that start and end mid-row, cover whole rows, and reach into the bias.
    for (k, chunk) in [0..98, 5..30, 26..39, 90..98, 85..93, 91..92]
        .into_iter()
        .enumerate()
    {
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

/// Fast and reference agree: values within float rounding, except where that rounding moves a
/// value across an ADC step of `adc_step` (one step apart, rare); without an ADC, within rounding.
fn assert_agree(model: &NoiseModel, adc_step: Option<f32>) {
    let (fast, fast_params) = drive(model, Choreography::Fast);
    let (reference, ref_params) = drive(model, Choreography::Reference);
    assert_eq!(fast_params, ref_params);
    assert_eq!(fast.len(), reference.len());
    let (mut total, mut flips) = (0, 0);
    for (a, b) in fast.iter().zip(&reference) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            total += 1;
            let d = (x - y).abs();
            if d > 1e-5 {
                let one_step = adc_step.is_some_and(|step| (d - step).abs() < 1e-5);
                assert!(one_step, "{x} vs {y}");
                flips += 1;
            }
        }
    }
    assert!(
        flips * 100 <= total,
        "{flips} of {total} values differ by a step"
    );
}

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

/// Every hardware effect, switched on alone, is one the fast path honours: it gives what the
/// reference choreography gives (bit for bit where the effect draws per evaluation, else within
/// float rounding and the odd ADC step). Both lists above are exhaustive over `NoiseModel`'s
/// fields, so a new effect does not compile until it is listed there, and then fails here if
/// `NoiseModel::effects` misclassifies it.
#[test]
fn every_effect_alone_is_classified_and_honoured_by_the_fast_path() {
    let ideal = drive(&NoiseModel::default(), Choreography::Reference);
    for (name, model) in one_at_a_time() {
        assert!(!model.is_ideal(), "{name}: counted as ideal");
        model.validate("noise").unwrap();
        // The effect shows at all (else this test would hold it to nothing).
        let reference = drive(&model, Choreography::Reference);
        assert_ne!(reference.0, ideal.0, "{name}: no effect on the outputs");
        if model.effects().per_evaluation_draw {
            assert_eq!(
                drive(&model, Choreography::Fast),
                reference,
                "{name}: drawn per evaluation, so bit for bit"
            );
        } else {
            assert_agree(&model, model.adc.as_ref().map(|_| ADC_STEP));
        }
    }
}

#[test]
fn the_fast_path_sees_every_effect_exactly_as_the_reference_choreography() {
    // Output noise, nonlinearity, ADC and every linear weight effect: the fast path, exact.
    let linear = NoiseModel {
        seed: 3,
        dac: Some(Converter {
            bits: Some(6),
            bound: 1.0,
        }),
        adc: Some(Converter {
            bits: Some(10),
            bound: 4.0,
        }),
        output_noise: 0.01,
        nonlinearity: 0.1,
        programming_error: 0.05,
        gain_mismatch: 0.1,
        stuck: Some(StuckFaults {
            fraction: 0.1,
            values: vec![0.0, 0.3],
        }),
        drift: Some(Drift {
            nu: 0.05,
            nu_std: 0.01,
            t0: 1.0,
            seconds_per_batch: 2.0,
        }),
        ..Default::default()
    };
    assert_agree(&linear, Some(ADC_STEP));
    // Clipped and quantised weights: the exact per-weight change, one block per sign.
    let nonlinear = NoiseModel {
        weight_clip: Some(0.3),
        weight_bits: Some(5),
        ..linear.clone()
    };
    assert_agree(&nonlinear, Some(ADC_STEP));
    // Per-tensor weight scale.
    let per_tensor = NoiseModel {
        weight_bits: Some(6),
        ..linear.clone()
    };
    assert_agree(&per_tensor, Some(ADC_STEP));
    // Input and read noise: the fast path evaluates as the reference does, bit for bit.
    let full = NoiseModel {
        input_noise: 0.01,
        read_noise: 0.02,
        ..linear
    };
    assert_eq!(
        drive(&full, Choreography::Fast),
        drive(&full, Choreography::Reference)
    );
}

#[test]
fn perturbed_evaluations_leave_no_trace_on_a_noisy_device() {
    let model = NoiseModel {
        programming_error: 0.05,
        weight_clip: Some(0.3),
        weight_bits: Some(6),
        read_noise: 0.01,
        ..faulty_model()
    };
    for choreography in [Choreography::Fast, Choreography::Reference] {
        let mut l = DenseLayer::with_noise(13, 7, &model, 2);
        l.set_choreography(choreography);
        l.set_params(&ramp(98)).unwrap();
        l.load_input(&[0.2; 26]).unwrap();
        let (params, effective) = (l.params().to_vec(), l.effective_weights().to_vec());
        let mut out = Vec::new();
        l.evaluate_perturbed(3..95, &[DirectionSeed(1), DirectionSeed(2)], 0.1, &mut out)
            .unwrap();
        assert_eq!(l.params(), &params[..]);
        assert_eq!(l.effective_weights(), &effective[..]);
    }
}

#[test]
fn the_ideal_profile_is_the_plain_simulator_bit_for_bit() {
    let ideal =
        DeviceProfile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("devices/ideal.ron"))
            .unwrap();
    assert!(ideal.noise.is_ideal());
    let plain = drive(&NoiseModel::default(), Choreography::Fast);
    assert_eq!(drive(&ideal.noise, Choreography::Fast), plain);
    // The layer a profile builds is the plain layer: no device state, and the same features,
    // perturbed features and updates, bit for bit, on both choreographies.
    for choreography in [Choreography::Fast, Choreography::Reference] {
        let mut l = DenseLayer::new(13, 7);
        let mut m = DenseLayer::with_noise(13, 7, &ideal.noise, 5);
        assert!(m.device().is_none());
        let input: Vec<f32> = (0..26).map(|i| (i as f32 * 0.37).sin()).collect();
        let seeds = [DirectionSeed(1), DirectionSeed(2)];
        let terms = [UpdateTerm {
            seed: DirectionSeed(1),
            derivative: 0.5,
        }];
        let mut outputs = Vec::new();
        for layer in [&mut l, &mut m] {
            layer.set_choreography(choreography);
            layer.set_params(&ramp(98)).unwrap();
            layer.load_input(&input).unwrap();
            let (mut features, mut pairs) = (Vec::new(), Vec::new());
            layer.forward(&mut features).unwrap();
            layer
                .evaluate_perturbed(3..95, &seeds, 0.1, &mut pairs)
                .unwrap();
            layer.apply_update(0..98, 0.01, &terms).unwrap();
            outputs.push((features, pairs, layer.params().to_vec()));
        }
        assert_eq!(outputs[0], outputs[1], "{choreography:?}");
        assert_ne!(
            outputs[0].0,
            vec![0.0; 14],
            "the comparison is of something"
        );
    }
}

#[test]
fn every_shipped_profile_parses_and_says_where_its_numbers_come_from() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("devices");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "ron") {
            continue;
        }
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        let profile = DeviceProfile::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            profile.name,
            name,
            "{}: name differs from the file's",
            path.display()
        );
        assert_eq!(profile.noise.is_ideal(), name == "ideal", "{name}");
        // The leading comment names the source of the numbers: a `// Source:` line that says
        // more than a word (a paper, a library and its file, a measurement).
        let text = std::fs::read_to_string(&path).unwrap();
        let comment: Vec<&str> = (text.lines())
            .take_while(|l| l.trim_start().starts_with("//"))
            .collect();
        let source = (comment.iter()).find_map(|l| {
            l.trim_start()
                .trim_start_matches('/')
                .trim()
                .strip_prefix("Source:")
        });
        let words = source.map_or(0, |s| s.split_whitespace().count());
        assert!(
            words >= 3,
            "{name}: its leading comment has no `// Source: ...` line naming where its numbers come from"
        );
        names.push(name);
    }
    names.sort();
    assert_eq!(
        names,
        [
            "aihwkit-hwa",
            "aihwkit-io",
            "faulty",
            "ideal",
            "mcu-int8",
            "pcm"
        ],
        "the presets README.md and tests/noise_training.rs describe"
    );
}

#[test]
fn a_bad_profile_on_the_command_line_names_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("pnn-noise-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.ron");
    std::fs::write(
        &bad,
        "(\n  name: \"bad\",\n  noise: (\n    adc: (bits: 9, bound: 12.0),\n    read_noise: -0.1,\n  ),\n)\n",
    )
    .unwrap();
    let run = |backend: String| {
        Command::new(env!("CARGO_BIN_EXE_pnn-train"))
            .args(["--backend", &backend, "--epochs", "1", "--limit-train", "1"])
            .output()
            .unwrap()
    };
    let out = run(format!("sim:{}", bad.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("bad.ron")
            && stderr.contains("line 5")
            && stderr.contains("noise.read_noise"),
        "{stderr}"
    );
    let out = run(format!("sim:{}", dir.join("missing.ron").display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("missing.ron"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
