//! `pnn-sweep`: train MF+DD on a simulated device at each value of one noise parameter and write
//! the accuracy against the noise level as a table (CSV and Markdown) and an SVG plot.
//!
//! Exit codes: 0 success, 2 invalid arguments, 3 data error, 4 backend or device error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pnn::data::DatasetKind;
use pnn::report::sweep;
use pnn::run::noise_sweep::{self, NoiseParam, Setup};
use pnn::train::Hyper;
use pnn_sim::profile::DeviceProfile;

#[derive(Parser, Debug)]
#[command(
    name = "pnn-sweep",
    version,
    about = "Train MF+DD on a simulated device across a range of one noise parameter; write accuracy against noise level (CSV, Markdown, SVG)"
)]
struct Args {
    /// The device profile the sweep starts from.
    #[arg(long, default_value = "devices/ideal.ron")]
    base: PathBuf,
    /// The parameter to vary, as its key under `noise` (output_noise, read_noise, input_noise,
    /// programming_error, gain_mismatch, nonlinearity, stuck.fraction, drift.nu, dac.bits,
    /// adc.bits, weight_bits, weight_clip).
    #[arg(long, default_value = "output_noise")]
    param: NoiseParam,
    /// Values, comma-separated.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "0,0.02,0.05,0.1,0.2,0.5")]
    values: Vec<f64>,
    #[arg(long, default_value = "mnist")]
    dataset: DatasetKind,
    /// Hidden widths, comma-separated (default per dataset, thesis Table 3).
    #[arg(long, value_delimiter = ',')]
    hidden: Option<Vec<usize>>,
    #[arg(long, default_value_t = 2)]
    epochs: u32,
    /// Train on the first N training samples only (the whole test set is always used).
    #[arg(long)]
    limit_train: Option<usize>,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 1e-3)]
    eps: f32,
    #[arg(long, default_value_t = 4)]
    directions: usize,
    #[arg(long, default_value_t = 50_000)]
    chunk_max: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Repeats of the finite-difference signal measurement per value (0: skip it).
    #[arg(long, default_value_t = 16)]
    fd_repeats: usize,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where sweep.csv, sweep.md and sweep.svg are written.
    #[arg(long, default_value = "sweep-out")]
    out_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.values.is_empty() || args.values.iter().any(|v| !v.is_finite()) {
        eprintln!("error: --values needs finite numbers");
        return ExitCode::from(2);
    }
    let base = match DeviceProfile::load(&args.base) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(4);
        }
    };
    for &v in &args.values {
        if let Err(e) = noise_sweep::profile_at(&base, args.param, v) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let hyper = Hyper {
        lr: args.lr,
        eps: args.eps,
        directions: args.directions,
        chunk_max: args.chunk_max,
        batch_size: args.batch_size,
        seed: args.seed,
        ..Hyper::default()
    };
    let setup = match Setup::load(
        args.dataset,
        args.data_dir.as_deref(),
        args.limit_train,
        args.hidden.clone(),
        hyper,
        args.epochs,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if let Err(e) = std::fs::create_dir_all(&args.out_dir) {
        eprintln!("error: cannot create {}: {e}", args.out_dir.display());
        return ExitCode::from(2);
    }
    eprintln!(
        "sweeping {} over {:?} on {} ({} training samples, {} epochs)",
        args.param,
        args.values,
        base.name,
        setup.data.train.len(),
        args.epochs
    );
    let points = match noise_sweep::sweep(
        &setup.as_ref(),
        &base,
        args.param,
        &args.values,
        args.fd_repeats,
        |p| {
            eprintln!(
                "{} = {}: test acc cumulative {:.4} final-layer {:.4}{} ({:.1} s)",
                args.param,
                p.value,
                p.accuracy_cumulative,
                p.accuracy_final_layer,
                p.fd.map(|f| format!(", L+ - L- SNR {:.3}", f.snr))
                    .unwrap_or_default(),
                p.train_seconds
            )
        },
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(4);
        }
    };
    let markdown = sweep::to_markdown(args.param.key(), args.eps, &points);
    let title = format!("MF+DD on {}: accuracy vs {}", base.name, args.param);
    let written = std::fs::write(
        args.out_dir.join("sweep.csv"),
        sweep::to_csv(args.param.key(), &points),
    )
    .and_then(|_| std::fs::write(args.out_dir.join("sweep.md"), &markdown))
    .map_err(|e| e.to_string())
    .and_then(|_| {
        sweep::plot_svg(
            &args.out_dir.join("sweep.svg"),
            &title,
            args.param.key(),
            &points,
        )
    });
    if let Err(e) = written {
        eprintln!(
            "error: writing the sweep to {}: {e}",
            args.out_dir.display()
        );
        return ExitCode::from(2);
    }
    println!("{markdown}");
    ExitCode::SUCCESS
}
