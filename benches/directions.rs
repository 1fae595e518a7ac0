//! Nanoseconds per generated direction value and per updated parameter, as
//! `cargo bench --bench directions` prints them (the simulator draws 2P directions per chunk).

use std::hint::black_box;
use std::time::Instant;

use firmware_protocol::direction::{apply_update, apply_update_streaming, fill_direction};
use firmware_protocol::{DirectionSeed, UpdateTerm};

/// Draws `trials * reps` directions of `n` values (seeds 0, 1, ...): ns per value over all of
/// them, and the fastest and the median trial (the machine is shared: trials vary).
fn time_fill(n: usize, trials: usize, reps: usize) -> (f64, f64, f64) {
    let mut v = vec![0f32; n];
    let mut per_trial = Vec::with_capacity(trials);
    let mut seed = 0;
    for _ in 0..trials {
        let start = Instant::now();
        for _ in 0..reps {
            fill_direction(DirectionSeed(seed), &mut v);
            black_box(&v);
            seed += 1;
        }
        per_trial.push(start.elapsed().as_secs_f64() * 1e9 / (reps * n) as f64);
    }
    let mean = per_trial.iter().sum::<f64>() / trials as f64;
    per_trial.sort_by(f64::total_cmp);
    (mean, per_trial[0], per_trial[trials / 2])
}

fn main() {
    let n = 39_250; // the first layer of the MNIST MLP: one chunk
    let reps = 400;
    let (ns, min, median) = time_fill(n, 8, reps / 8);
    println!(
        "fill_direction: {ns:.2} ns per value ({n} values; 8 trials: fastest {min:.2}, median {median:.2})"
    );
    let short = 510; // the last layer of the MNIST MLP
    let (ns, min, median) = time_fill(short, 8, 4000);
    println!(
        "fill_direction: {ns:.2} ns per value ({short} values; 8 trials: fastest {min:.2}, median {median:.2})"
    );

    let terms: Vec<UpdateTerm> = (0..4)
        .map(|p| UpdateTerm {
            seed: DirectionSeed(p),
            derivative: 0.1,
        })
        .collect();
    let mut w = vec![0f32; n];
    let (mut s1, mut s2) = (vec![0f32; n], vec![0f32; n]);
    let start = Instant::now();
    for _ in 0..reps / 4 {
        apply_update(&mut w, 1e-3, &terms, &mut s1, &mut s2);
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / ((reps / 4) as f64 * n as f64);
    println!("apply_update, P = 4: {ns:.2} ns per parameter");
    let start = Instant::now();
    for _ in 0..reps / 4 {
        apply_update_streaming(&mut w, 1e-3, &terms);
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / ((reps / 4) as f64 * n as f64);
    println!("apply_update_streaming, P = 4: {ns:.2} ns per parameter");
    black_box(&w);
}
