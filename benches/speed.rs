//! The speed suite of the simulated backend: `cargo bench --bench speed`.
//!
//! For each configuration it prints seconds per epoch (median of several full epochs), the
//! achieved GFLOP/s of the matrix products, the peak resident memory of the process that ran it,
//! and the ratio to the reference choreography (perturb, full forward, perturb, full forward,
//! restore) measured in the same run. Each configuration runs in a child process of its own, so
//! its peak memory is its own. The reference path of the large configurations is timed on the
//! first batches of the epoch and scaled to a whole epoch (said in the output).
//!
//! `PNN_BENCH_RUNS` (default 3) sets the number of timed epochs; `PNN_BENCH_ONLY` a substring of
//! the configurations to run; `PNN_BENCH_FAST_BATCHES` times only the first N batches of the fast
//! path too, scaled to an epoch (for quick iteration; said in the output); `PNN_BENCH_CPU=1`
//! times with the thread's CPU time instead of the wall clock (on a loaded machine);
//! `PNN_BENCH_REFERENCE=0` skips the reference path (to profile the fast path alone);
//! `PNN_THREADS` sets the simulator's threads (default: the machine's logical cores; both paths
//! get them).
//!
//! Where a Vulkan adapter exists (`pnn_gpu::adapters`), a second table times the GPU backend
//! (`--backend gpu`) against the CPU simulator's fast path on the same machine, each in its own
//! process: s/epoch of both and their ratio. `PNN_BENCH_ONLY=gpu:` runs that table alone
//! (`scripts/gpu-check.sh` does); `PNN_BENCH_GPU_BATCHES` times only the first N batches of every
//! configuration there, scaled to an epoch (said in the output; the large ones always are on the
//! CPU). Configurations the GPU backend refuses (CNN blocks) say so in their row.

use std::process::Command;
use std::time::Instant;

use pnn::backend::gpu::GpuOracle;
use pnn::backend::sim::SimOracle;
use pnn::data::{Dataset, DatasetKind, Normalizer, Split, resolve_data_dir};
use pnn::model::{ArchKind, DEFAULT_PROJ_DIM, ModelSpec, initialise};
use pnn::oracle::{Activations, ForwardOracle};
use pnn::train::{Hyper, Trainer, epoch_order};
use pnn_sim::Choreography;
use pnn_sim::matmul::flops_so_far;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

struct Bench {
    name: &'static str,
    dataset: DatasetKind,
    arch: ArchKind,
    random_data: bool,
    directions: usize,
    /// Batches of the reference path to time (None: a whole epoch).
    reference_batches: Option<usize>,
}

const BENCHES: &[Bench] = &[
    Bench {
        name: "mnist-mlp-784-50-50-P1",
        dataset: DatasetKind::Mnist,
        arch: ArchKind::Mlp,
        random_data: false,
        directions: 1,
        reference_batches: None,
    },
    Bench {
        name: "mnist-mlp-784-50-50-P4",
        dataset: DatasetKind::Mnist,
        arch: ArchKind::Mlp,
        random_data: false,
        directions: 4,
        reference_batches: None,
    },
    Bench {
        name: "mnist-mlp-784-50-50-P8",
        dataset: DatasetKind::Mnist,
        arch: ArchKind::Mlp,
        random_data: false,
        directions: 8,
        reference_batches: None,
    },
    Bench {
        name: "fashion-mlp-784-100x3-P4",
        dataset: DatasetKind::FashionMnist,
        arch: ArchKind::Mlp,
        random_data: false,
        directions: 4,
        reference_batches: None,
    },
    Bench {
        name: "cifar10-shaped-mlp-3072-200x4-P4",
        dataset: DatasetKind::Cifar10,
        arch: ArchKind::Mlp,
        random_data: true,
        directions: 4,
        reference_batches: Some(8),
    },
    Bench {
        name: "mnist-cnn-32-32-P4",
        dataset: DatasetKind::Mnist,
        arch: ArchKind::Cnn,
        random_data: false,
        directions: 4,
        reference_batches: Some(10),
    },
];

/// A configuration of the GPU table: timed on the GPU backend and on the CPU simulator.
struct GpuBench {
    name: &'static str,
    dataset: DatasetKind,
    arch: ArchKind,
    hidden: Option<&'static [usize]>,
    random_data: bool,
    /// Batches the CPU side times, scaled to an epoch (None: a whole epoch).
    cpu_batches: Option<usize>,
}

const GPU_BENCHES: &[GpuBench] = &[
    GpuBench {
        name: "gpu:mnist-mlp-784-50-50-P4",
        dataset: DatasetKind::Mnist,
        arch: ArchKind::Mlp,
        hidden: None,
        random_data: false,
        cpu_batches: None,
    },
    GpuBench {
        name: "gpu:cifar10-shaped-mlp-3072-200x4-P4",
        dataset: DatasetKind::Cifar10,
        arch: ArchKind::Mlp,
        hidden: None,
        random_data: true,
        cpu_batches: None,
    },
    GpuBench {
        name: "gpu:mnist-cnn-32-32-P4",
        dataset: DatasetKind::Mnist,
        arch: ArchKind::Cnn,
        hidden: None,
        random_data: false,
        cpu_batches: Some(20),
    },
    GpuBench {
        name: "gpu:cifar10-shaped-cnn-128-128-P4",
        dataset: DatasetKind::Cifar10,
        arch: ArchKind::Cnn,
        hidden: Some(&[128, 128]),
        random_data: true,
        cpu_batches: Some(4),
    },
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--gpu-child") {
        let bench = GPU_BENCHES
            .iter()
            .find(|b| b.name == args[i + 1])
            .expect("known benchmark");
        return gpu_child(bench, &args[i + 2]);
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let bench = BENCHES
            .iter()
            .find(|b| b.name == args[i + 1])
            .expect("known benchmark");
        return child(bench);
    }
    let only = std::env::var("PNN_BENCH_ONLY").unwrap_or_default();
    println!(
        "threads: {} (PNN_THREADS; the same bits for any count)",
        pnn_sim::threads::threads()
    );
    println!(
        "{:<34} {:>9} {:>9} {:>8} {:>10} {:>8}",
        "configuration", "s/epoch", "GFLOP/s", "peak MB", "reference", "speed-up"
    );
    for bench in BENCHES.iter().filter(|b| b.name.contains(&only)) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--child", bench.name])
            .output()
            .expect("child runs");
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().last() {
            Some(line) if out.status.success() => println!("{line}"),
            _ => println!(
                "{}: failed: {}",
                bench.name,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    gpu_table(&only);
}

/// The GPU table (see the module docs), where an adapter exists.
fn gpu_table(only: &str) {
    let benches: Vec<&GpuBench> = GPU_BENCHES
        .iter()
        .filter(|b| b.name.contains(only))
        .collect();
    if benches.is_empty() {
        return;
    }
    let adapters = pnn_gpu::adapters();
    if adapters.is_empty() {
        println!("GPU configurations skipped: no Vulkan adapter on this machine");
        return;
    }
    let names: Vec<&str> = adapters.iter().map(|a| a.name.as_str()).collect();
    println!(
        "GPU backend against the CPU simulator (adapters: {names:?}; PNN_GPU_ADAPTER picks one)"
    );
    println!(
        "{:<38} {:>12} {:>12} {:>9}",
        "configuration", "CPU s/epoch", "GPU s/epoch", "CPU/GPU"
    );
    for bench in benches {
        let mut seconds = [f64::NAN; 2];
        let mut notes = Vec::new();
        for (side, at) in [("cpu", 0), ("gpu", 1)] {
            let out = Command::new(std::env::current_exe().unwrap())
                .args(["--gpu-child", bench.name, side])
                .output()
                .expect("child runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let last = text.lines().last().unwrap_or_default();
            match last.split_once(' ') {
                Some((s, note)) if out.status.success() => {
                    seconds[at] = s.parse().unwrap_or(f64::NAN);
                    if !note.trim().is_empty() {
                        notes.push(format!("{side}: {}", note.trim()));
                    }
                }
                _ => {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let why = err
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    notes.push(format!("{side} failed: {why}"));
                }
            }
        }
        println!(
            "{:<38} {:>12.3} {:>12.3} {:>8.1}x {}",
            bench.name,
            seconds[0],
            seconds[1],
            seconds[0] / seconds[1],
            notes.join("; ")
        );
    }
}

/// One side of a GPU-table row: prints `seconds note` (seconds per epoch).
fn gpu_child(bench: &GpuBench, side: &str) {
    let data = load_data(bench.dataset, bench.random_data);
    let hidden = bench.hidden.map(|h| h.to_vec());
    let model =
        ModelSpec::new(bench.dataset, bench.arch, hidden, DEFAULT_PROJ_DIM, 0).expect("model");
    let hyper = Hyper::default();
    let specs = model.layer_specs();
    let env_batches: Option<usize> = std::env::var("PNN_BENCH_GPU_BATCHES")
        .ok()
        .and_then(|s| s.parse().ok());
    let (seconds, _, all, batches) = if side == "gpu" {
        let gpu = match pnn_gpu::Gpu::open(std::env::var("PNN_GPU_ADAPTER").ok().as_deref()) {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let oracles: Result<Vec<GpuOracle>, _> = (specs.iter())
            .map(|s| GpuOracle::new(std::sync::Arc::clone(&gpu), *s))
            .collect();
        let oracles = oracles.unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1);
        });
        let (s, f, all) = time_with(&data, &model, &hyper, oracles, env_batches);
        (s, f, all, env_batches)
    } else {
        let batches = env_batches.or(bench.cpu_batches);
        let (s, f, all) = time_with(
            &data,
            &model,
            &hyper,
            SimOracle::for_layers(&specs),
            batches,
        );
        (s, f, all, batches)
    };
    match batches.filter(|&k| k < all) {
        Some(k) => println!(
            "{} ({k} of {all} batches, scaled)",
            seconds * all as f64 / k as f64
        ),
        None => println!("{seconds} "),
    }
}

fn random_split(n: usize, width: usize, classes: usize, rng: &mut ChaCha8Rng) -> Split {
    Split {
        images: (0..n * width).map(|_| rng.random::<u8>()).collect(),
        labels: (0..n).map(|_| rng.random_range(0..classes as u8)).collect(),
        sample_len: width,
    }
}

fn load(bench: &Bench) -> Dataset {
    load_data(bench.dataset, bench.random_data)
}

fn load_data(dataset: DatasetKind, random_data: bool) -> Dataset {
    if random_data {
        // CIFAR is not on these machines; random images of the real shape time the same work.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let train = random_split(50_000, 3072, 10, &mut rng);
        let test = random_split(10_000, 3072, 10, &mut rng);
        let normalizer = Normalizer::from_training_set(&train, 3);
        return Dataset {
            kind: dataset,
            train,
            test,
            normalizer,
        };
    }
    let dir = resolve_data_dir(None).expect("real data (set PNN_DATA_DIR)");
    Dataset::load(dataset, &dir).expect("dataset loads")
}

/// Seconds for `batches` batches of epoch 0 (all of them when None), and the products' flops.
fn time_batches(
    data: &Dataset,
    model: &ModelSpec,
    hyper: &Hyper,
    choreography: Choreography,
    batches: Option<usize>,
) -> (f64, u64, usize) {
    let mut oracles = SimOracle::for_layers(&model.layer_specs());
    oracles
        .iter_mut()
        .for_each(|o| o.set_choreography(choreography));
    time_with(data, model, hyper, oracles, batches)
}

/// Seconds for `batches` batches of epoch 0 through `oracles`, the products' flops (CPU
/// simulator only), and the epoch's batches.
fn time_with<O: ForwardOracle>(
    data: &Dataset,
    model: &ModelSpec,
    hyper: &Hyper,
    oracles: Vec<O>,
    batches: Option<usize>,
) -> (f64, u64, usize) {
    let init = initialise(&model.layer_specs(), model.classes, hyper.seed);
    let mut trainer = Trainer::new(oracles, init, hyper.clone()).expect("trainer");
    let order = epoch_order(hyper.seed, 0, data.train.len());
    let all: Vec<&[usize]> = order.chunks(hyper.batch_size).collect();
    let count = batches.unwrap_or(all.len()).min(all.len());
    let mut input = Activations::default();
    let flops0 = flops_so_far();
    let start = Clock::now();
    for (b, batch) in all[..count].iter().enumerate() {
        data.normalizer
            .batch_activations(&data.train, batch, &mut input);
        let labels: Vec<u8> = batch.iter().map(|&i| data.train.labels[i]).collect();
        trainer
            .train_batch(0, b as u32, &input, &labels)
            .expect("training step");
    }
    (start.elapsed(), flops_so_far() - flops0, all.len())
}

/// The wall clock, or with `PNN_BENCH_CPU=1` this thread's time on a CPU (Linux schedstat).
enum Clock {
    Wall(Instant),
    Cpu(f64),
}

impl Clock {
    fn cpu_seconds() -> Option<f64> {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        Some(s.split_whitespace().next()?.parse::<f64>().ok()? / 1e9)
    }

    fn now() -> Self {
        match std::env::var("PNN_BENCH_CPU").as_deref() {
            Ok("1") => Self::Cpu(Self::cpu_seconds().expect("schedstat")),
            _ => Self::Wall(Instant::now()),
        }
    }

    fn elapsed(&self) -> f64 {
        match self {
            Self::Wall(start) => start.elapsed().as_secs_f64(),
            Self::Cpu(start) => Self::cpu_seconds().expect("schedstat") - start,
        }
    }
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn child(bench: &Bench) {
    let runs: usize = std::env::var("PNN_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let data = load(bench);
    let model =
        ModelSpec::new(bench.dataset, bench.arch, None, DEFAULT_PROJ_DIM, 0).expect("model");
    let hyper = Hyper {
        directions: bench.directions,
        ..Hyper::default()
    };
    let fast_batches: Option<usize> = std::env::var("PNN_BENCH_FAST_BATCHES")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut fast_note = String::new();
    let mut fast: Vec<(f64, u64)> = (0..runs)
        .map(|_| {
            let (s, f, all) = time_batches(&data, &model, &hyper, Choreography::Fast, fast_batches);
            let Some(k) = fast_batches.filter(|&k| k < all) else {
                return (s, f);
            };
            fast_note = format!(" (fast: {k} of {all} batches, scaled)");
            let scale = all as f64 / k as f64;
            (s * scale, (f as f64 * scale) as u64)
        })
        .collect();
    fast.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (seconds, flops) = fast[runs / 2];
    let peak = peak_rss_mb();
    // `PNN_BENCH_REFERENCE=0` skips the reference (for profiling the fast path alone).
    let (ref_seconds, _, batches) = match std::env::var("PNN_BENCH_REFERENCE").as_deref() {
        Ok("0") => (f64::NAN, 0, 1),
        _ => time_batches(
            &data,
            &model,
            &hyper,
            Choreography::Reference,
            bench.reference_batches,
        ),
    };
    let (reference, note) = match bench.reference_batches {
        Some(k) => (
            ref_seconds * batches as f64 / k.min(batches) as f64,
            format!(" (reference: {k} of {batches} batches, scaled)"),
        ),
        None => (ref_seconds, String::new()),
    };
    let note = note + &fast_note;
    println!(
        "{:<34} {:>9.3} {:>9.1} {:>8.0} {:>10.3} {:>7.1}x{note}",
        bench.name,
        seconds,
        flops as f64 / seconds / 1e9,
        peak,
        reference,
        reference / seconds
    );
}
