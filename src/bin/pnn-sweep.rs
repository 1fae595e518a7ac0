//! `pnn-sweep`: many `pnn-train` runs from one sweep file (a base config, axes over any setting,
//! seeds), on this machine (`run`) or as a Slurm job array (`slurm`), gathered into mean ± std
//! tables and plots (`gather`), with `status` in between; and `noise`, one noise key of a
//! simulated device swept with the finite-difference signal measured at each level.
//!
//! Exit codes: 0 success, 2 invalid arguments, sweep file or output folder, 3 data error, 4
//! backend, device or Slurm error, 7 some cells of the sweep failed (listed; each cell's folder
//! says why); `task` exits with its run's status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pnn::data::DatasetKind;
use pnn::report::{sweep, sweep_gather};
use pnn::run::noise_sweep::{self, NoiseParam, Setup};
use pnn::sweep::cell::{self, CellDir, CellState, Outcome};
use pnn::sweep::slurm::{self, SlurmOptions};
use pnn::sweep::{EXIT_CELLS_FAILED, SweepDir, SweepError, gather, local, spec};
use pnn::train::Hyper;
use pnn_sim::profile::DeviceProfile;

#[derive(Parser, Debug)]
#[command(
    name = "pnn-sweep",
    version,
    about = "Run many MF+DD trainings from one sweep file (locally or as a Slurm job array) and gather them into mean ± std tables and plots"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sweep's cells on this machine, several at a time, then gather them. Cells that
    /// are done are skipped; interrupted ones resume from their checkpoints.
    Run {
        /// The sweep file (RON: base config, grid and/or cells, seeds; see sweeps/).
        sweep: PathBuf,
        /// The sweep's output folder (one folder per cell, the plan, the gathered tables).
        #[arg(long)]
        out: PathBuf,
        /// Cells run at once; each gets an equal share of the cores.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// Override a base setting: KEY=VALUE, value in RON (e.g. --set epochs=5); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = spec::parse_override)]
        overrides: Vec<(String, serde_json::Value)>,
    },
    /// Write the sweep as one `sbatch --array` script (one task per cell not yet done), submit
    /// it with sbatch and print the job id.
    Slurm {
        /// The sweep file.
        sweep: PathBuf,
        /// The sweep's output folder; it must be on a file system the compute nodes share.
        #[arg(long)]
        out: PathBuf,
        /// Slurm partition [default: the cluster's].
        #[arg(long)]
        partition: Option<String>,
        /// Time limit per task, as sbatch takes it (e.g. 2:00:00) [default: the partition's].
        #[arg(long)]
        time: Option<String>,
        /// Cores per task (each run's PNN_THREADS).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        cpus_per_task: u16,
        /// Memory per task, as sbatch takes it (e.g. 4G) [default: the partition's].
        #[arg(long)]
        mem: Option<String>,
        /// Account to charge [default: yours].
        #[arg(long)]
        account: Option<String>,
        /// At most this many tasks at once (the array's %N).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
        max_concurrent: u16,
        /// Write the script and print it, but do not submit it.
        #[arg(long)]
        dry_run: bool,
        /// Override a base setting: KEY=VALUE, value in RON (e.g. --set epochs=5); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = spec::parse_override)]
        overrides: Vec<(String, serde_json::Value)>,
    },
    /// Run one cell of a prepared sweep folder (what each Slurm array task runs).
    Task {
        /// The sweep's output folder.
        dir: PathBuf,
        /// The cell's index (Slurm's $SLURM_ARRAY_TASK_ID).
        index: usize,
    },
    /// Gather the done cells: mean ± std over seeds per cell and per axis value (CSV, a Markdown
    /// table laid out like the paper's, plots); cells not done are listed.
    Gather {
        /// The sweep's output folder.
        dir: PathBuf,
        /// Where the tables and plots go [default: DIR/gather].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Which cells are done, running, interrupted, failed or pending (from the cell folders and,
    /// where squeue exists, from Slurm).
    Status {
        /// The sweep's output folder.
        dir: PathBuf,
    },
    /// Train on a simulated device at each value of one noise key and measure the
    /// finite-difference signal there; write accuracy and signal-to-noise against the noise level
    /// (CSV, Markdown, SVG).
    Noise(NoiseArgs),
}

#[derive(clap::Args, Debug)]
struct NoiseArgs {
    /// The device profile the sweep starts from.
    #[arg(long, default_value = "devices/ideal.ron")]
    base: PathBuf,
    /// The parameter to vary, as its path under the profile's `noise` (output_noise, read_noise,
    /// input_noise, programming_error, gain_mismatch, nonlinearity, stuck.fraction, drift.nu,
    /// drift.t0, dac.bits, adc.bits, adc.bound, weight_bits, weight_clip, seed, …).
    #[arg(long, default_value = "output_noise")]
    param: NoiseParam,
    /// Values, comma-separated.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "0,0.02,0.05,0.1,0.2,0.5")]
    values: Vec<f64>,
    /// mnist, fashion-mnist, cifar10 or cifar100.
    #[arg(long, default_value = "mnist")]
    dataset: DatasetKind,
    /// Hidden widths, comma-separated (default per dataset, thesis Table 3).
    #[arg(long, value_delimiter = ',')]
    hidden: Option<Vec<usize>>,
    /// Training epochs per value.
    #[arg(long, default_value_t = 2)]
    epochs: u32,
    /// Train on the first N training samples only.
    #[arg(long)]
    limit_train: Option<usize>,
    /// Evaluate on the first N test samples only.
    #[arg(long)]
    limit_test: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Learning rate eta.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Perturbation magnitude of the central difference (noisy devices need a larger one).
    #[arg(long, default_value_t = 1e-3)]
    eps: f32,
    /// Perturbation directions P per chunk.
    #[arg(long, default_value_t = 4)]
    directions: usize,
    /// Largest chunk, in parameters (C_max).
    #[arg(long, default_value_t = 50_000)]
    chunk_max: usize,
    /// Seed of initialisation, shuffling and directions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Repeats of the finite-difference signal measurement per value (0: skip it).
    #[arg(long, default_value_t = 16)]
    fd_repeats: usize,
    /// Data directory (else $PNN_DATA_DIR, ./data, ../shared/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where sweep.csv, sweep.md and sweep.svg are written.
    #[arg(long, default_value = "sweep-out")]
    out_dir: PathBuf,
}

fn main() -> ExitCode {
    match Args::parse().command {
        Command::Run {
            sweep,
            out,
            jobs,
            overrides,
        } => run(&sweep, &out, &overrides, jobs as usize),
        Command::Slurm {
            sweep,
            out,
            partition,
            time,
            cpus_per_task,
            mem,
            account,
            max_concurrent,
            dry_run,
            overrides,
        } => submit(
            &sweep,
            &out,
            &overrides,
            &SlurmOptions {
                partition,
                time,
                cpus_per_task: cpus_per_task as usize,
                mem,
                account,
                max_concurrent: max_concurrent as usize,
            },
            dry_run,
        ),
        Command::Task { dir, index } => task(&dir, index),
        Command::Gather { dir, out } => gather_cmd(&dir, out.as_deref()),
        Command::Status { dir } => status(&dir),
        Command::Noise(args) => noise(args),
    }
}

fn fail(code: u8, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}

fn sweep_fail(e: SweepError) -> ExitCode {
    fail(e.exit_code(), e)
}

type Overrides = [(String, serde_json::Value)];

fn prepared(
    sweep: &Path,
    out: &Path,
    overrides: &Overrides,
) -> Result<(SweepDir, pnn::sweep::Plan), SweepError> {
    let dir = SweepDir::new(out);
    let plan = dir.plan_file(sweep, overrides)?;
    dir.prepare(&plan)?;
    Ok((dir, plan))
}

fn run(sweep: &Path, out: &Path, overrides: &Overrides, jobs: usize) -> ExitCode {
    let (dir, plan) = match prepared(sweep, out, overrides) {
        Ok(p) => p,
        Err(e) => return sweep_fail(e),
    };
    let total = plan.cells.len();
    eprintln!(
        "sweep {}: {total} cells in {}, {jobs} at a time",
        plan.name,
        dir.root.display()
    );
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results = local::run_all(&dir, &plan, jobs, &cell::train_exe(), |i, outcome| {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let label = plan.cells[i].label();
        match outcome {
            Ok(Outcome::AlreadyDone(_)) => {
                eprintln!("[{n}/{total}] cell {i} ({label}): already done")
            }
            Ok(Outcome::Finished { summary, resumed }) => eprintln!(
                "[{n}/{total}] cell {i} ({label}): {}cumulative {:.4}, final layer {:.4} ({:.1} s)",
                if *resumed { "resumed, " } else { "" },
                summary.test_accuracy_cumulative,
                summary.test_accuracy_final_layer,
                summary.train_seconds
            ),
            Ok(Outcome::Failed(f)) => eprintln!(
                "[{n}/{total}] cell {i} ({label}): FAILED (exit {:?}): {}",
                f.exit_code,
                f.message.lines().last().unwrap_or("")
            ),
            Err(e) => eprintln!("[{n}/{total}] cell {i} ({label}): FAILED: {e}"),
        }
    });
    let failed = results
        .iter()
        .filter(|r| !matches!(r, Ok(Outcome::AlreadyDone(_) | Outcome::Finished { .. })))
        .count();
    let code = gather_cmd(&dir.root, None);
    if failed > 0 {
        return fail(
            EXIT_CELLS_FAILED,
            format!(
                "{failed} of {total} cells failed (listed in {}); run the same command again to retry them",
                dir.root.join("gather/table.md").display()
            ),
        );
    }
    code
}

fn submit(
    sweep: &Path,
    out: &Path,
    overrides: &Overrides,
    opts: &SlurmOptions,
    dry_run: bool,
) -> ExitCode {
    let (dir, plan) = match prepared(sweep, out, overrides) {
        Ok(p) => p,
        Err(e) => return sweep_fail(e),
    };
    let todo: Vec<usize> = plan
        .cells
        .iter()
        .filter(|c| CellDir(dir.cell_dir(c.index)).summary().is_none())
        .map(|c| c.index)
        .collect();
    if todo.is_empty() {
        eprintln!(
            "every cell of {} is done: nothing to submit (pnn-sweep gather {})",
            plan.name,
            dir.root.display()
        );
        return ExitCode::SUCCESS;
    }
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(4, format!("cannot find pnn-sweep's own path: {e}")),
    };
    let workdir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let text = slurm::script(
        &dir,
        &plan,
        &todo,
        opts,
        &me,
        &std::path::absolute(cell::train_exe()).unwrap_or_else(|_| cell::train_exe()),
        &workdir,
    );
    let path = slurm::script_path(&dir);
    if let Err(e) =
        std::fs::create_dir_all(dir.slurm_dir()).and_then(|_| std::fs::write(&path, &text))
    {
        return fail(2, format!("cannot write {}: {e}", path.display()));
    }
    if dry_run {
        eprintln!("wrote {} (not submitted: --dry-run)", path.display());
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    match slurm::submit(&dir, &path) {
        Ok(id) => {
            eprintln!(
                "submitted {} tasks of sweep {} as job {id}; follow with: pnn-sweep status {}",
                todo.len(),
                plan.name,
                dir.root.display()
            );
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(e) => sweep_fail(e),
    }
}

fn task(dir: &Path, index: usize) -> ExitCode {
    let dir = SweepDir::new(dir);
    let plan = match dir.load_plan() {
        Ok(p) => p,
        Err(e) => return sweep_fail(e),
    };
    if index >= plan.cells.len() {
        return fail(
            2,
            format!(
                "the sweep in {} has {} cells (0 to {}), not {index}",
                dir.root.display(),
                plan.cells.len(),
                plan.cells.len().saturating_sub(1)
            ),
        );
    }
    let slurm_task = std::env::var("SLURM_ARRAY_JOB_ID")
        .ok()
        .map(|j| format!("{j}_{index}"));
    let threads = std::env::var("PNN_THREADS")
        .ok()
        .and_then(|t| t.parse().ok());
    let label = plan.cells[index].label();
    match cell::run_cell(
        &CellDir(dir.cell_dir(index)),
        &cell::train_exe(),
        threads,
        slurm_task,
    ) {
        Ok(Outcome::AlreadyDone(_)) => {
            eprintln!("cell {index} ({label}) is already done");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Finished { summary, resumed }) => {
            eprintln!(
                "cell {index} ({label}){}: cumulative {:.4}, final layer {:.4}",
                if resumed { ", resumed" } else { "" },
                summary.test_accuracy_cumulative,
                summary.test_accuracy_final_layer
            );
            ExitCode::SUCCESS
        }
        Ok(Outcome::Failed(f)) => {
            eprintln!("cell {index} ({label}) failed:\n{}", f.message);
            ExitCode::from(f.exit_code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1))
        }
        Err(e) => fail(4, format!("cell {index} ({label}): {e}")),
    }
}

fn gather_cmd(dir: &Path, out: Option<&Path>) -> ExitCode {
    let dir = SweepDir::new(dir);
    let plan = match dir.load_plan() {
        Ok(p) => p,
        Err(e) => return sweep_fail(e),
    };
    let gathered = gather::gather(&dir, &plan);
    let out = out.map_or_else(|| dir.root.join("gather"), Path::to_path_buf);
    match sweep_gather::write(&gathered, &out) {
        Ok(md) => {
            eprintln!("wrote the tables and plots to {}", out.display());
            println!("{md}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(2, e),
    }
}

fn status(dir: &Path) -> ExitCode {
    let dir = SweepDir::new(dir);
    let plan = match dir.load_plan() {
        Ok(p) => p,
        Err(e) => return sweep_fail(e),
    };
    let queue = slurm::queue_states(&dir);
    let jobs = slurm::jobs(&dir);
    // Accounting says why a task ended that left no note (a time limit, memory, a cancel).
    let ended = if jobs.is_empty() {
        None
    } else {
        slurm::accounting_states(&dir)
    };
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    println!("| cell | settings | state | detail |\n|---|---|---|---|");
    for c in &plan.cells {
        let state = CellDir(dir.cell_dir(c.index)).state();
        let queued = queue.as_ref().and_then(|q| q.get(&c.index));
        let slurm_end = ended
            .as_ref()
            .and_then(|e| e.get(&c.index))
            .map(|s| format!(" (Slurm: {s})"))
            .unwrap_or_default();
        let (name, detail) = match (&state, queued) {
            (CellState::Done(s), _) => (
                "done".to_string(),
                format!(
                    "cumulative {:.4}, final layer {:.4}, {:.1} s",
                    s.test_accuracy_cumulative, s.test_accuracy_final_layer, s.train_seconds
                ),
            ),
            (_, Some(q)) if q.starts_with("RUNNING") => ("running".into(), format!("Slurm: {q}")),
            (_, Some(q)) => ("queued".into(), format!("Slurm: {q}")),
            (CellState::Running(r), None) => {
                ("running".into(), format!("on {} (pid {})", r.host, r.pid))
            }
            (CellState::Failed(f), None) => (
                "failed".into(),
                format!(
                    "exit {}: {}",
                    f.exit_code.map_or("by signal".into(), |c| c.to_string()),
                    f.message.lines().last().unwrap_or("")
                ),
            ),
            (CellState::Interrupted, None) => (
                "interrupted".into(),
                format!("checkpoint saved; the next run or submission resumes it{slurm_end}"),
            ),
            (CellState::Pending, None) => ("pending".into(), slurm_end.trim().to_string()),
        };
        println!("| {} | {} | {name} | {detail} |", c.index, c.label());
        *counts.entry(name).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    eprintln!(
        "sweep {}: {} cells: {}{}",
        plan.name,
        plan.cells.len(),
        summary.join(", "),
        match (&queue, jobs.is_empty()) {
            (_, true) => String::new(),
            (None, false) => format!(
                " (Slurm jobs {}: squeue is not available here)",
                jobs.join(", ")
            ),
            (Some(_), false) => format!(" (Slurm jobs {})", jobs.join(", ")),
        }
    );
    ExitCode::SUCCESS
}

fn plural(n: u32, one: &str) -> String {
    format!("{n} {one}{}", if n == 1 { "" } else { "s" })
}

fn noise(args: NoiseArgs) -> ExitCode {
    if args.values.is_empty() || args.values.iter().any(|v| !v.is_finite()) {
        return fail(2, "--values needs finite numbers");
    }
    let base = match DeviceProfile::load(&args.base) {
        Ok(p) => p,
        Err(e) => return fail(2, e),
    };
    for &v in &args.values {
        if let Err(e) = noise_sweep::profile_at(&base, &args.param, v) {
            return fail(2, e);
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
    let mut setup = match Setup::load(
        args.dataset,
        args.data_dir.as_deref(),
        args.limit_train,
        args.hidden.clone(),
        hyper,
        args.epochs,
    ) {
        Ok(s) => s,
        Err(e) => return fail(e.exit_code(), e),
    };
    if let Some(n) = args.limit_test {
        setup.data.test.truncate(n);
    }
    if let Err(e) = std::fs::create_dir_all(&args.out_dir) {
        return fail(2, format!("cannot create {}: {e}", args.out_dir.display()));
    }
    eprintln!(
        "sweeping {} over {:?} on {} ({} training and {} test samples, {})",
        args.param,
        args.values,
        base.name,
        setup.data.train.len(),
        setup.data.test.len(),
        plural(args.epochs, "epoch")
    );
    let points = match noise_sweep::sweep(
        &setup.as_ref(),
        &base,
        &args.param,
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
        Err(e) => return fail(4, e),
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
        return fail(
            2,
            format!("writing the sweep to {}: {e}", args.out_dir.display()),
        );
    }
    println!("{markdown}");
    ExitCode::SUCCESS
}
