//! `pnn-train`: train an MF+DD model on a backend and print a JSON summary as the last stdout line.
//!
//! Settings come from the flags, else from `--config FILE` (RON, see `pnn::run::settings`), else the
//! paper's defaults. Progress goes to stderr; stdout carries the summary alone.
//!
//! With `--checkpoint DIR` the run is saved as it goes; `--resume DIR` continues it, with the
//! settings saved in the checkpoint, bit-identical to an uninterrupted run (those that do not
//! change the training's numbers may be given anew: `ExperimentConfig::RESUMABLE`). A device that fails for good mid-run ends the
//! run with a checkpoint and the command that continues it.
//!
//! Exit codes: 0 success, 2 invalid arguments or config, 3 data error, 4 backend or device error
//! (the message says how to resume where the run was saved), 5 the model could not be saved,
//! 6 a checkpoint could not be read (missing, damaged, of another run) or written, or the
//! --checkpoint directory holds a run that this one would overwrite (`--resume` it, or `--fresh`),
//! 7 training diverged (a loss or weight became NaN or infinite; the last good checkpoint is
//! kept), 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (into --checkpoint DIR, else
//! a `pnn-rescue-*` directory in the temporary directory) and printing the command to continue.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use pnn::report::observe::{ByRef, NoObserver, SaveModel};
use pnn::report::progress::{Progress, ProgressMode, init_tracing};
use pnn::run::checkpoint::Checkpoint;
use pnn::run::run;
use pnn::run::settings::ExperimentConfig;

#[derive(Parser, Debug)]
#[command(
    name = "pnn-train",
    version,
    about = "Train a neural network with MF+DD (Mono-Forward with directional derivatives) on a simulated or physical backend"
)]
#[command(allow_negative_numbers = true)]
struct Args {
    /// Experiment config (RON); flags given on the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: ExperimentConfig,
    /// Print nothing but the JSON summary (errors still go to stderr).
    #[arg(long, short)]
    quiet: bool,
    /// How progress is shown on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
    /// Threads for the simulator's large products and direction draws; results are the same
    /// bits for any count [default: $PNN_THREADS, else the machine's logical cores]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(n) = args.threads {
        pnn_sim::threads::set_threads(n as usize);
    }
    let mode = if args.quiet {
        ProgressMode::Quiet
    } else {
        args.progress.resolve()
    };
    let multi = init_tracing(mode);
    if let Err(e) = pnn::run::interrupt::install() {
        tracing::warn!("Ctrl-C and SIGTERM will end the run without saving it: {e}");
    }
    let mut settings = match &args.config {
        Some(path) => match ExperimentConfig::load(path) {
            Ok(file) => file.overlay(args.settings),
            Err(e) => return fail(2, e),
        },
        None => args.settings,
    };
    // A rig file is read now: the rig itself is what a checkpoint stores (and what a resume's
    // own --backend or --rig replaces).
    if let Err(e) = settings.resolve_rig() {
        return fail(2, e);
    }
    if let Some(dir) = settings.resume.clone() {
        // The saved settings, under those given now.
        let saved = match Checkpoint::load(&dir) {
            Ok(c) => c.settings,
            Err(e) => return fail(6, e),
        };
        if let Some(text) = saved {
            let origin = format!("saved in {}", Checkpoint::path_in(&dir).display());
            match ExperimentConfig::parse(&text, &origin) {
                Ok(saved) => match saved.check_resume_changes(&settings) {
                    Ok(()) => settings = saved.overlay(settings),
                    Err(e) => return fail(6, e),
                },
                Err(e) => return fail(6, e),
            }
        }
    }
    let mut config = match settings.to_run_config() {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    config.settings = Some(settings.to_ron());
    let mut metrics_file = match settings.metrics.as_ref().map(create).transpose() {
        Ok(f) => f.map(BufWriter::new),
        Err(e) => {
            let path = settings.metrics.as_ref().unwrap().display();
            return fail(2, format!("cannot create the metrics file {path}: {e}"));
        }
    };
    let mut metrics_error = None;
    let write_metrics = |m: &pnn::report::metrics::EpochMetrics| {
        if let Some(f) = metrics_file.as_mut() {
            let line = m.to_json_line();
            if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                metrics_error.get_or_insert(e);
            }
        }
    };
    if let Some(Err(e)) =
        (settings.save.as_deref()).map(pnn::report::export::SavedModel::check_destination)
    {
        return fail(2, e);
    }
    if let (Some(_), Err(e)) = (
        &settings.save,
        pnn::report::export::SavedModel::check_exportable(config.arch),
    ) {
        return fail(2, e);
    }
    let mut saver = settings.save.clone().map(SaveModel::new);
    let progress = Progress::new(mode, multi, config.epochs);
    let result = match saver.as_mut() {
        Some(s) => run(&config, (progress, write_metrics, ByRef(s))),
        None => run(&config, (progress, write_metrics, NoObserver)),
    };
    if let Some(e) = metrics_error {
        tracing::warn!("writing the metrics file failed: {e}");
    }
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => return fail(e.exit_code(), e),
    };
    if let Some(Some(Err(e))) = saver.map(|s| s.result) {
        return fail(5, e);
    }
    println!(
        "{}",
        serde_json::to_string(&summary).expect("summary serialises")
    );
    ExitCode::SUCCESS
}

/// Creates `path`'s directory if needed (configs name files under `runs/`).
fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

fn create(path: &PathBuf) -> std::io::Result<File> {
    create_parent(path)?;
    File::create(path)
}

fn fail(code: u8, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}
