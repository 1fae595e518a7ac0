//! What a person watching a run sees: an indicatif bar per epoch on a terminal, plain log lines
//! elsewhere, nothing with `--quiet`. Everything goes to stderr (through `tracing`, filtered by
//! `RUST_LOG`), so stdout carries the JSON summary alone.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use super::metrics::EpochMetrics;
use super::observe::{BatchProgress, RunObserver};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    /// An indicatif bar per epoch (stderr).
    Bar,
    /// Log lines: one per epoch, and one at most every 10 s within a long epoch.
    Lines,
    /// Nothing.
    Quiet,
}

impl ProgressMode {
    /// `Auto` resolved against stderr.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if std::io::stderr().is_terminal() => Self::Bar,
            Self::Auto => Self::Lines,
            other => other,
        }
    }
}

/// Installs the `tracing` subscriber: events to stderr, filtered by `RUST_LOG` (default `info`;
/// with [`ProgressMode::Quiet`], nothing unless `RUST_LOG` asks). While a bar is shown, log lines
/// are printed above it. Returns the handle bars are drawn through.
pub fn init_tracing(mode: ProgressMode) -> MultiProgress {
    let multi = MultiProgress::with_draw_target(match mode {
        ProgressMode::Bar => ProgressDrawTarget::stderr(),
        _ => ProgressDrawTarget::hidden(),
    });
    let default = if mode == ProgressMode::Quiet {
        "off"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // A second initialisation (tests, library callers with their own subscriber) is harmless.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(SuspendingStderr(multi.clone()))
        .try_init();
    multi
}

/// Writes to stderr with the bars lifted out of the way.
#[derive(Clone)]
struct SuspendingStderr(MultiProgress);

impl<'a> MakeWriter<'a> for SuspendingStderr {
    type Writer = Self;
    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

impl Write for SuspendingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write(buf))
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.suspend(|| std::io::stderr().write_all(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The progress display, as a [`RunObserver`].
pub struct Progress {
    mode: ProgressMode,
    multi: MultiProgress,
    epochs: u32,
    bar: Option<ProgressBar>,
    epoch: u32,
    loss_sums: Vec<f64>,
    batches_done: usize,
    epoch_start: Instant,
    evals_at_start: u64,
    last_evals: u64,
    last_line: Instant,
    epoch_evals: u64,
}

const LINE_EVERY: Duration = Duration::from_secs(10);

impl Progress {
    /// `mode` already resolved; `epochs` is the run's total.
    pub fn new(mode: ProgressMode, multi: MultiProgress, epochs: u32) -> Self {
        Self {
            mode: mode.resolve(),
            multi,
            epochs,
            bar: None,
            epoch: 0,
            loss_sums: Vec::new(),
            batches_done: 0,
            epoch_start: Instant::now(),
            evals_at_start: 0,
            last_evals: 0,
            last_line: Instant::now(),
            epoch_evals: 0,
        }
    }

    fn running_losses(&self) -> String {
        let n = self.batches_done.max(1) as f64;
        let parts: Vec<String> = self
            .loss_sums
            .iter()
            .map(|s| format!("{:.3}", s / n))
            .collect();
        format!("[{}]", parts.join(" "))
    }

    fn evals_per_second(&self) -> f64 {
        self.epoch_evals as f64 / self.epoch_start.elapsed().as_secs_f64().max(1e-9)
    }
}

impl RunObserver for Progress {
    fn epoch_started(&mut self, epoch: u32, batches: usize) {
        self.epoch = epoch;
        self.loss_sums.clear();
        self.batches_done = 0;
        self.epoch_start = Instant::now();
        self.last_line = Instant::now();
        // Training evaluations are counted cumulatively; test-set evaluation adds none.
        self.evals_at_start = self.last_evals;
        self.epoch_evals = 0;
        if self.mode == ProgressMode::Bar {
            let bar = self.multi.add(ProgressBar::new(batches as u64));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} batches {elapsed_precise} (eta {eta}) {msg}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("epoch {epoch}/{}", self.epochs));
            self.bar = Some(bar);
        }
    }

    fn batch_done(&mut self, p: &BatchProgress<'_>) {
        if self.loss_sums.len() != p.local_loss.len() {
            self.loss_sums = vec![0.0; p.local_loss.len()];
        }
        self.loss_sums
            .iter_mut()
            .zip(p.local_loss)
            .for_each(|(s, l)| *s += l);
        self.batches_done += 1;
        self.last_evals = p.oracle_evaluations;
        self.epoch_evals = p.oracle_evaluations.saturating_sub(self.evals_at_start);
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(p.batch as u64);
                    bar.set_message(format!(
                        "local loss {}  {:.0} evals/s",
                        self.running_losses(),
                        self.evals_per_second()
                    ));
                }
            }
            ProgressMode::Lines if self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                tracing::info!(
                    "epoch {}/{}  batch {}/{}  local loss {}  {:.0} evals/s",
                    p.epoch,
                    self.epochs,
                    p.batch,
                    p.batches,
                    self.running_losses(),
                    self.evals_per_second()
                );
            }
            _ => {}
        }
    }

    /// One line for the epochs done before, rather than their lines again.
    fn resumed(&mut self, history: &[EpochMetrics]) {
        if let Some(m) = history.last() {
            self.last_evals = m.oracle_evaluations;
            tracing::info!(
                "{} epochs done before; last: test acc cumulative {:.4} final-layer {:.4}",
                history.len(),
                m.test_accuracy_cumulative,
                m.test_accuracy_final_layer
            );
        }
    }

    fn epoch_done(&mut self, m: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        let losses: Vec<String> = m
            .train_local_loss
            .iter()
            .map(|l| format!("{l:.4}"))
            .collect();
        tracing::info!(
            "epoch {}/{}  local loss [{}]  test acc cumulative {:.4} final-layer {:.4}  ({:.2} s train, {:.2} s eval, {:.0} evals/s)",
            m.epoch,
            self.epochs,
            losses.join(", "),
            m.test_accuracy_cumulative,
            m.test_accuracy_final_layer,
            m.train_seconds,
            m.eval_seconds,
            self.epoch_evals as f64 / m.train_seconds.max(1e-9),
        );
    }
}
