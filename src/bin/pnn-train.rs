//! `pnn-train`: train an MF+DD model on a backend and print a JSON summary as the last stdout line.
//!
//! Exit codes: 0 success, 2 invalid arguments, 3 data error, 4 backend or device error.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pnn::backend::BackendSpec;
use pnn::data::DatasetKind;
use pnn::model::{ArchKind, DEFAULT_PROJ_DIM};
use pnn::run::{RunConfig, RunError, run};
use pnn::trainer::Hyper;

#[derive(Parser, Debug)]
#[command(
    name = "pnn-train",
    version,
    about = "Train a neural network with MF+DD (Mono-Forward with directional derivatives) on a simulated or physical backend"
)]
#[command(allow_negative_numbers = true)]
struct Args {
    /// Where the layers execute: `sim` (the ideal simulated PNN, in process), or
    /// `sim:<profile.ron>` (simulated with a device profile's hardware effects, e.g.
    /// `sim:devices/pcm.ron`), or
    /// `serial:PATH[?baud=921600&timeout_ms=2000&retries=3]` (a device, or `pnn-emulate`'s pty).
    #[arg(long, default_value = "sim")]
    backend: BackendSpec,
    /// mnist, fashion-mnist, cifar10 or cifar100.
    #[arg(long, default_value = "mnist")]
    dataset: DatasetKind,
    /// Architecture: mlp (thesis Table 3) or cnn (Table 4).
    #[arg(long, default_value = "mlp")]
    arch: ArchKind,
    /// Hidden widths (mlp) or channels per block (cnn), comma-separated (default per dataset,
    /// thesis Tables 3 and 4: mnist 50,50 / 32,32).
    #[arg(long, visible_alias = "channels", value_parser = parse_hidden)]
    hidden: Option<Widths>,
    /// CNN: projected features d per channel (section 4.4).
    #[arg(long, default_value_t = DEFAULT_PROJ_DIM, value_parser = positive_usize)]
    proj_dim: usize,
    /// Training epochs (the paper trains 200).
    #[arg(long, default_value_t = 200)]
    epochs: u32,
    #[arg(long, default_value_t = 256, value_parser = positive_usize)]
    batch_size: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = positive_f32, allow_hyphen_values = true)]
    lr: f32,
    /// Perturbation magnitude of the central difference.
    #[arg(long, default_value_t = 1e-3, value_parser = positive_f32, allow_hyphen_values = true)]
    eps: f32,
    /// Perturbation directions P per chunk (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    directions: u16,
    /// Largest chunk, in parameters (C_max).
    #[arg(long, default_value_t = 50_000, value_parser = positive_usize)]
    chunk_max: usize,
    /// Seed of initialisation, shuffling and directions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on the first N training samples only.
    #[arg(long, value_parser = positive_usize)]
    limit_train: Option<usize>,
    /// Data directory (else $PNN_DATA_DIR, ./data, ../shared/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write one JSON object per epoch to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,
}

#[derive(Clone, Debug)]
struct Widths(Vec<usize>);

fn parse_hidden(s: &str) -> Result<Widths, String> {
    let widths: Result<Vec<usize>, String> = s
        .split(',')
        .map(|w| match w.trim().parse::<usize>() {
            Ok(0) => Err("a hidden width must be at least 1".to_string()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!(
                "'{w}' is not a width: expected comma-separated positive integers such as 50,50"
            )),
        })
        .collect();
    widths.map(Widths)
}

fn positive_usize(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive integer")),
    }
}

fn positive_f32(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        Ok(x) => Err(format!("must be a positive number, got {x}")),
        Err(_) => Err(format!("'{s}' is not a number")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = RunConfig {
        dataset: args.dataset,
        data_dir: args.data_dir,
        arch: args.arch,
        hidden: args.hidden.map(|w| w.0),
        proj_dim: args.proj_dim,
        epochs: args.epochs,
        hyper: Hyper {
            lr: args.lr,
            eps: args.eps,
            directions: args.directions as usize,
            chunk_max: args.chunk_max,
            batch_size: args.batch_size,
            seed: args.seed,
        },
        limit_train: args.limit_train,
        backend: args.backend,
    };
    let mut metrics_file = match args.metrics.as_ref().map(File::create).transpose() {
        Ok(f) => f.map(BufWriter::new),
        Err(e) => {
            eprintln!(
                "error: cannot create the metrics file {}: {e}",
                args.metrics.unwrap().display()
            );
            return ExitCode::from(2);
        }
    };
    let epochs = config.epochs;
    let mut metrics_error = None;
    let result = run(&config, |m| {
        let losses: Vec<String> = m
            .train_local_loss
            .iter()
            .map(|l| format!("{l:.4}"))
            .collect();
        eprintln!(
            "epoch {}/{epochs}  local loss [{}]  test acc cumulative {:.4} final-layer {:.4}  ({:.2} s train, {:.2} s eval)",
            m.epoch,
            losses.join(", "),
            m.test_accuracy_cumulative,
            m.test_accuracy_final_layer,
            m.train_seconds,
            m.eval_seconds
        );
        if let Some(f) = metrics_file.as_mut() {
            let line = serde_json::to_string(m).expect("metrics serialise");
            if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                metrics_error.get_or_insert(e);
            }
        }
    });
    if let Some(e) = metrics_error {
        eprintln!("warning: writing the metrics file failed: {e}");
    }
    match result {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string(&summary).expect("summary serialises")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                RunError::Config(_) => 2,
                RunError::Data(_) => 3,
                RunError::Oracle(_) => 4,
            })
        }
    }
}
