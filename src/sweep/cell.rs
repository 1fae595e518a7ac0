//! One cell of a sweep: its folder, its state, and running it (locally or as a Slurm task).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::report::metrics::{EpochMetrics, RunSummary};
use crate::run::checkpoint::Checkpoint;
use crate::run::settings::ExperimentConfig;

use super::write_atomic;

pub const CONFIG_FILE: &str = "config.ron";
pub const SUMMARY_FILE: &str = "summary.json";
pub const FAILED_FILE: &str = "failed.json";
pub const RUNNING_FILE: &str = "running.json";
pub const LOG_FILE: &str = "train.log";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Metrics of earlier attempts, kept across a resume (pnn-train starts its file afresh).
const EARLIER_METRICS_FILE: &str = "metrics.earlier.jsonl";
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// Why a cell's last attempt failed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// pnn-train's exit status (`None`: killed by a signal).
    pub exit_code: Option<i32>,
    /// The last lines of its stderr.
    pub message: String,
    pub unix_time: u64,
}

/// Who runs a cell now.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Running {
    pub host: String,
    pub pid: u32,
    pub unix_time: u64,
    /// `JOBID_TASK` when a Slurm array task runs it.
    pub slurm_task: Option<String>,
}

impl Running {
    /// Whether the process is alive on this host and is a `pnn-sweep` (not a reused pid).
    pub fn alive_here(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("pnn-sweep"))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum CellState {
    /// Finished: its summary, complete (all the epochs its config asks for).
    Done(Box<RunSummary>),
    /// Its last attempt failed.
    Failed(Failure),
    /// A process says it runs the cell (on this host: it is alive).
    Running(Running),
    /// Started and saved, not running now: the next attempt resumes from its checkpoint.
    Interrupted,
    /// Not started.
    Pending,
}

impl CellState {
    pub fn name(&self) -> &'static str {
        match self {
            CellState::Done(_) => "done",
            CellState::Failed(_) => "failed",
            CellState::Running(_) => "running",
            CellState::Interrupted => "interrupted",
            CellState::Pending => "pending",
        }
    }
}

/// A cell's folder.
#[derive(Clone, Debug)]
pub struct CellDir(pub PathBuf);

impl CellDir {
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn checkpoint(&self) -> PathBuf {
        self.0.join(CHECKPOINT_DIR)
    }

    fn expected_epochs(&self) -> Option<u32> {
        let config = ExperimentConfig::load(&self.file(CONFIG_FILE)).ok()?;
        let default = crate::run::RunConfig::new(crate::data::DatasetKind::Mnist).epochs;
        Some(config.epochs.unwrap_or(default))
    }

    /// The finished run's summary, if the cell finished every epoch its config asks for.
    pub fn summary(&self) -> Option<RunSummary> {
        let text = std::fs::read_to_string(self.file(SUMMARY_FILE)).ok()?;
        let summary: RunSummary = serde_json::from_str(&text).ok()?;
        (Some(summary.epochs) == self.expected_epochs()).then_some(summary)
    }

    pub fn state(&self) -> CellState {
        if let Some(s) = self.summary() {
            return CellState::Done(Box::new(s));
        }
        if let Some(r) = read_json::<Running>(&self.file(RUNNING_FILE))
            && (r.host != hostname() || r.alive_here())
        {
            return CellState::Running(r);
        }
        if let Some(f) = read_json::<Failure>(&self.file(FAILED_FILE)) {
            return CellState::Failed(f);
        }
        if Checkpoint::path_in(&self.checkpoint()).exists() {
            CellState::Interrupted
        } else {
            CellState::Pending
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How a call of [`run_cell`] ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The cell was already done; nothing ran.
    AlreadyDone(Box<RunSummary>),
    /// It ran (resuming where it was saved, if it was) and finished.
    Finished {
        summary: Box<RunSummary>,
        resumed: bool,
    },
    Failed(Failure),
}

/// The `pnn-train` to run: `$PNN_TRAIN`, else the one beside this executable, else `pnn-train`
/// on the `PATH`.
pub fn train_exe() -> PathBuf {
    if let Some(p) = std::env::var_os("PNN_TRAIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|me| {
            let sibling = me.with_file_name(format!("pnn-train{}", std::env::consts::EXE_SUFFIX));
            sibling.exists().then_some(sibling)
        })
        .unwrap_or_else(|| PathBuf::from("pnn-train"))
}

/// Runs the cell in `dir` to its end with `train` (`pnn-train`): nothing if it is done; else
/// `pnn-train --config config.ron --checkpoint checkpoint --metrics metrics.jsonl`, or
/// `pnn-train --resume checkpoint --metrics metrics.jsonl` where a checkpoint is saved (a run
/// that was preempted, requeued or killed goes on from it, bit-identical). `threads` sets `PNN_THREADS` for it. The summary is
/// written atomically when the run succeeds: a cell is done exactly when its summary is there.
pub fn run_cell(
    dir: &CellDir,
    train: &Path,
    threads: Option<usize>,
    slurm_task: Option<String>,
) -> std::io::Result<Outcome> {
    if let Some(s) = dir.summary() {
        return Ok(Outcome::AlreadyDone(Box::new(s)));
    }
    // Two runs of one cell would write one checkpoint; one still alive on this host wins. (One
    // on another host cannot be checked from here: a requeued task finds its killed
    // predecessor's note, so a note alone must not stop it.)
    if let Some(r) = read_json::<Running>(&dir.file(RUNNING_FILE))
        && r.host == hostname()
        && r.pid != std::process::id()
        && r.alive_here()
    {
        return Err(std::io::Error::other(format!(
            "{} is being run by pnn-sweep (pid {}) on this host",
            dir.0.display(),
            r.pid
        )));
    }
    let running = Running {
        host: hostname(),
        pid: std::process::id(),
        unix_time: now(),
        slurm_task,
    };
    write_atomic(
        &dir.file(RUNNING_FILE),
        &serde_json::to_string(&running).expect("serialises"),
    )?;
    let checkpoint = dir.checkpoint();
    let resumed = Checkpoint::path_in(&checkpoint).exists();
    keep_earlier_metrics(dir, resumed)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.file(LOG_FILE))?;
    writeln!(
        log,
        "--- {} on {} (pid {}){}",
        if resumed { "resumed" } else { "started" },
        running.host,
        running.pid,
        running
            .slurm_task
            .as_ref()
            .map(|t| format!(", Slurm task {t}"))
            .unwrap_or_default()
    )?;
    let mut cmd = Command::new(train);
    if resumed {
        // The checkpoint holds the cell's settings: nothing given now can differ from them.
        cmd.arg("--resume").arg(&checkpoint);
    } else {
        cmd.arg("--config")
            .arg(dir.file(CONFIG_FILE))
            .arg("--checkpoint")
            .arg(&checkpoint);
    }
    cmd.arg("--metrics")
        .arg(dir.file(METRICS_FILE))
        .args(["--progress", "lines"]);
    if let Some(n) = threads {
        cmd.env("PNN_THREADS", n.to_string());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log.try_clone()?))
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot start {}: {e} (set PNN_TRAIN to pnn-train's path)",
                    train.display()
                ),
            )
        })?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)?;
    let status = child.wait()?;
    let summary = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<RunSummary>(l).ok());
    let _ = std::fs::remove_file(dir.file(RUNNING_FILE));
    match (status.success(), summary) {
        (true, Some(summary)) => {
            merge_metrics(dir)?;
            write_atomic(
                &dir.file(SUMMARY_FILE),
                &serde_json::to_string_pretty(&summary).expect("serialises"),
            )?;
            let _ = std::fs::remove_file(dir.file(FAILED_FILE));
            Ok(Outcome::Finished {
                summary: Box::new(summary),
                resumed,
            })
        }
        (ok, _) => {
            let failure = Failure {
                exit_code: status.code(),
                message: if ok {
                    "pnn-train succeeded but printed no summary".into()
                } else {
                    log_tail(&dir.file(LOG_FILE), 6)
                },
                unix_time: now(),
            };
            write_atomic(
                &dir.file(FAILED_FILE),
                &serde_json::to_string_pretty(&failure).expect("serialises"),
            )?;
            Ok(Outcome::Failed(failure))
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(f) = std::fs::File::open(path) else {
        return String::new();
    };
    let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Before an attempt: a resumed run appends what the last attempt recorded to the earlier
/// metrics (pnn-train starts its file afresh); a fresh run forgets them.
fn keep_earlier_metrics(dir: &CellDir, resumed: bool) -> std::io::Result<()> {
    let earlier = dir.file(EARLIER_METRICS_FILE);
    let current = dir.file(METRICS_FILE);
    if !resumed {
        let _ = std::fs::remove_file(&earlier);
        return Ok(());
    }
    if let Ok(text) = std::fs::read_to_string(&current) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&earlier)?;
        f.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// After success: one metrics line per epoch, the latest attempt's where attempts overlap.
fn merge_metrics(dir: &CellDir) -> std::io::Result<()> {
    let earlier = dir.file(EARLIER_METRICS_FILE);
    let Ok(old) = std::fs::read_to_string(&earlier) else {
        return Ok(());
    };
    let new = std::fs::read_to_string(dir.file(METRICS_FILE)).unwrap_or_default();
    let mut by_epoch: std::collections::BTreeMap<u32, String> = Default::default();
    for line in old.lines().chain(new.lines()) {
        if let Ok(m) = serde_json::from_str::<EpochMetrics>(line) {
            by_epoch.insert(m.epoch, line.to_string());
        }
    }
    let text: String = by_epoch.values().map(|l| format!("{l}\n")).collect();
    write_atomic(&dir.file(METRICS_FILE), &text)?;
    std::fs::remove_file(earlier)
}
