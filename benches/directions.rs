//! Nanoseconds per generated direction value and per updated parameter, as
//! `cargo bench --bench directions` prints them (the simulator draws 2P directions per chunk).

use std::hint::black_box;
use std::time::Instant;

use firmware_protocol::direction::{apply_update, apply_update_streaming, fill_direction};
use firmware_protocol::{DirectionSeed, UpdateTerm};

fn main() {
    let n = 39_250; // the first layer of the MNIST MLP: one chunk
    let reps = 400;
    let mut v = vec![0f32; n];
    let start = Instant::now();
    for r in 0..reps {
        fill_direction(DirectionSeed(r), &mut v);
        black_box(&v);
    }
    let ns = start.elapsed().as_secs_f64() * 1e9 / (reps as f64 * n as f64);
    println!("fill_direction: {ns:.2} ns per value ({n} values)");

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
