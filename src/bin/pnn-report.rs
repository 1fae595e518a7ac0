//! `pnn-report`: SVG plots and a Markdown table from one or more `pnn-train --metrics` files.
//!
//! Exit codes: 0 success, 2 invalid arguments or unreadable metrics, 5 the report could not be
//! written.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pnn::report::plots::{FILES, ReportError, RunMetrics, write_report, write_report_with_ceiling};

#[derive(Parser, Debug)]
#[command(
    name = "pnn-report",
    version,
    about = "Plot pnn-train metrics (test accuracy and local loss per epoch, both prediction modes, per layer) and compare runs"
)]
struct Args {
    /// A JSONL metrics file (`pnn-train --metrics`); repeat to overlay runs.
    #[arg(long, required = true)]
    metrics: Vec<PathBuf>,
    /// A run's name in legends and the table, in the order of --metrics [default: file stem].
    #[arg(long)]
    label: Vec<String>,
    /// The metrics of the same run trained with `pnn-train --method mf-exact` (exact local
    /// gradients): overlaid on every plot as the DD runs' ceiling, with each run's gap to it in
    /// the table.
    #[arg(long, value_name = "FILE")]
    ceiling: Option<PathBuf>,
    /// Directory to write accuracy.svg, loss.svg, layers.svg and summary.md into.
    #[arg(long, default_value = "report")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.label.len() > args.metrics.len() {
        eprintln!(
            "error: {} labels for {} metrics files",
            args.label.len(),
            args.metrics.len()
        );
        return ExitCode::from(2);
    }
    let mut labels = args.label.into_iter();
    let runs: Result<Vec<_>, _> = args
        .metrics
        .iter()
        .map(|p| RunMetrics::load(p, labels.next()))
        .collect();
    let runs = match runs {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let ceiling = args
        .ceiling
        .as_deref()
        .map(|p| {
            let stem = p
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            RunMetrics::load(p, Some(format!("{stem} (ceiling)")))
        })
        .transpose();
    let ceiling = match ceiling {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let written = match &ceiling {
        Some(c) => write_report_with_ceiling(&runs, c, &args.out),
        None => write_report(&runs, &args.out),
    };
    match written {
        Ok(table) => {
            print!("{table}");
            let files: Vec<String> = FILES
                .iter()
                .map(|f| args.out.join(f).display().to_string())
                .collect();
            eprintln!("wrote {}", files.join(", "));
            ExitCode::SUCCESS
        }
        Err(e @ ReportError::Io { .. }) | Err(e @ ReportError::Draw { .. }) => {
            eprintln!("error: {e}");
            ExitCode::from(5)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
