//! Nanoseconds per call of `pnn::train::loss::cross_entropy`, as `cargo bench --bench loss` prints them:
//! the median of several timed runs for each shape (rows x classes), and the same for
//! `cross_entropy_portable`, the path of CPUs without AVX2. 256 x 10 is the MNIST/CIFAR batch of
//! the trainer, called about 8000 times per MNIST epoch.
//!
//! `PNN_BENCH_RUNS` (default 15) sets the number of timed runs per shape.

use std::hint::black_box;
use std::time::Instant;

use pnn::train::loss::{cross_entropy, cross_entropy_portable};

/// Logits in [-8, 8) and labels from a fixed linear congruential stream.
fn data(rows: usize, classes: usize) -> (Vec<f32>, Vec<u8>) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u32
    };
    let logits = (0..rows * classes)
        .map(|_| next() as f32 / (1u64 << 31) as f32 * 16.0 - 8.0)
        .collect();
    let labels = (0..rows)
        .map(|_| (next() as usize % classes.min(256)) as u8)
        .collect();
    (logits, labels)
}

fn main() {
    let runs: usize = std::env::var("PNN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    type Loss = fn(&[f32], usize, &[u8]) -> f64;
    let paths: [(&str, Loss); 2] = [
        ("cross_entropy", cross_entropy),
        ("cross_entropy_portable", cross_entropy_portable),
    ];
    for (name, loss) in paths {
        for (rows, classes) in [(256usize, 10usize), (256, 100), (64, 10)] {
            let (logits, labels) = data(rows, classes);
            // About 20 ms per timed run.
            let calls = (4_000_000 / (rows * classes)).max(10);
            let mut sink = 0f64;
            for _ in 0..calls {
                sink += loss(black_box(&logits), classes, black_box(&labels));
            }
            let mut ns: Vec<f64> = (0..runs)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..calls {
                        sink += loss(black_box(&logits), classes, black_box(&labels));
                    }
                    start.elapsed().as_secs_f64() * 1e9 / calls as f64
                })
                .collect();
            ns.sort_by(f64::total_cmp);
            println!(
                "{name} {rows:>3} x {classes:>3}: {:>9.0} ns per call (median of {runs}; min {:.0}, max {:.0})",
                ns[runs / 2],
                ns[0],
                ns[runs - 1]
            );
            black_box(sink);
        }
    }
}
