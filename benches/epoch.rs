//! Seconds per training epoch of the simulated backend, as `cargo bench --bench epoch` prints it.
//!
//! MNIST MLP 784-50-50 (thesis Table 3), P = 4, the paper's defaults, one full epoch on real
//! MNIST; median of several runs, with the fast path and the reference choreography.
//! Set `PNN_BENCH_RUNS` to change the number of runs (default 3).

use std::time::Instant;

use pnn::backend::sim::SimOracle;
use pnn::data::{Dataset, DatasetKind, resolve_data_dir};
use pnn::model::ModelSpec;
use pnn::run::{RunConfig, run_with};
use pnn_sim::dense::Choreography;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let runs: usize = std::env::var("PNN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = resolve_data_dir(None).expect("real MNIST (set PNN_DATA_DIR)");
    let load = Instant::now();
    let data = Dataset::load(DatasetKind::Mnist, &dir).expect("MNIST loads");
    println!("loaded MNIST in {:.2} s", load.elapsed().as_secs_f64());
    let model = ModelSpec::mlp(DatasetKind::Mnist, None);
    for directions in [4] {
        let mut config = RunConfig::new(DatasetKind::Mnist);
        config.epochs = 1;
        config.hyper.directions = directions;
        let mut medians = Vec::new();
        for choreography in [Choreography::Fast, Choreography::Reference] {
            let seconds: Vec<f64> = (0..runs)
                .map(|_| {
                    let mut oracles = SimOracle::for_layers(&model.layer_specs());
                    oracles
                        .iter_mut()
                        .for_each(|o| o.set_choreography(choreography));
                    run_with(&config, &data, &model, oracles, |_| {})
                        .expect("training runs")
                        .train_seconds
                })
                .collect();
            let m = median(seconds.clone());
            medians.push(m);
            println!(
                "mnist mlp 784-50-50  P={directions}  {choreography:?}: {m:.3} s/epoch (median of {runs}; runs {seconds:.3?})"
            );
        }
        println!(
            "fast path speed-up over the reference choreography: {:.2}x",
            medians[1] / medians[0]
        );
    }
}
