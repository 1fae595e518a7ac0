//! Sweeps: many independent `pnn-train` runs (seeds × settings × devices) from one file, run on
//! this machine or as a Slurm job array, and gathered into the paper's tables (mean ± std over
//! seeds, section 5).
//!
//! A sweep's output folder holds everything about it, so any machine that sees the folder can run,
//! resume, inspect or gather it:
//!
//! ```text
//! OUT/plan.json            the cells (spec::Plan); a second `run` or `slurm` on OUT must agree
//! OUT/cells/<i>/config.ron the cell's settings (pnn-train --config); device.ron for noise keys
//! OUT/cells/<i>/checkpoint the cell's checkpoint (pnn-train --checkpoint / --resume)
//! OUT/cells/<i>/summary.json  the run's summary, written when it finished (the cell is done)
//! OUT/cells/<i>/metrics.jsonl per-epoch metrics; train.log its stderr; failed.json, running.json
//! OUT/slurm/               the sbatch script, job ids and Slurm's output files
//! OUT/gather/              what `gather` writes
//! ```
//!
//! A cell is run by [`cell::run_cell`], the same code locally ([`local`]) and in each Slurm array
//! task ([`slurm`], through `pnn-sweep task OUT INDEX`): it trains with periodic checkpoints in the
//! cell's folder and resumes from them, so a task that is preempted or requeued continues where
//! it was saved and ends bit-identical to an uninterrupted run; a done cell is not run again.

pub mod cell;
pub mod gather;
pub mod local;
pub mod slurm;
pub mod spec;

use std::path::{Path, PathBuf};

pub use spec::{Cell, Plan};

/// Exit status of `pnn-sweep` when some cells failed (each cell's own status is in its folder).
pub const EXIT_CELLS_FAILED: u8 = 7;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error("{0}")]
    Folder(String),
    #[error("{0}")]
    Slurm(String),
}

impl SweepError {
    /// 2: a bad sweep file, option or output folder; 4: Slurm refused or is missing.
    pub fn exit_code(&self) -> u8 {
        match self {
            SweepError::Spec(_) | SweepError::Folder(_) => 2,
            SweepError::Slurm(_) => 4,
        }
    }
}

/// A sweep's output folder.
#[derive(Clone, Debug)]
pub struct SweepDir {
    pub root: PathBuf,
}

impl SweepDir {
    /// The folder `root`, made absolute (Slurm tasks run elsewhere).
    pub fn new(root: &Path) -> Self {
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        Self { root }
    }

    pub fn plan_path(&self) -> PathBuf {
        self.root.join("plan.json")
    }

    pub fn cell_dir(&self, index: usize) -> PathBuf {
        self.root.join("cells").join(format!("{index:04}"))
    }

    pub fn slurm_dir(&self) -> PathBuf {
        self.root.join("slurm")
    }

    /// Reads the sweep file and works out its cells in this folder.
    pub fn plan_file(
        &self,
        sweep: &Path,
        overrides: &[(String, serde_json::Value)],
    ) -> Result<Plan, SweepError> {
        Ok(spec::load(sweep, overrides, |i| self.cell_dir(i))?)
    }

    /// The plan stored in the folder.
    pub fn load_plan(&self) -> Result<Plan, SweepError> {
        let path = self.plan_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            SweepError::Folder(format!(
                "{} is not a sweep's output folder (cannot read {}: {e}); give the --out of `pnn-sweep run` or `pnn-sweep slurm`",
                self.root.display(),
                path.display()
            ))
        })?;
        serde_json::from_str(&text)
            .map_err(|e| SweepError::Folder(format!("{} is damaged: {e}", path.display())))
    }

    /// Writes `plan` and each cell's config into the folder. A folder that holds another sweep is
    /// refused (its cells would be mixed up); the same sweep again goes on where it was.
    pub fn prepare(&self, plan: &Plan) -> Result<(), SweepError> {
        let io = |what: &Path, e: std::io::Error| {
            SweepError::Folder(format!("cannot write {}: {e}", what.display()))
        };
        if self.plan_path().exists() {
            let old = self.load_plan()?;
            if old != *plan {
                return Err(SweepError::Folder(format!(
                    "{} holds another sweep ({}, {} cells) than this one ({}, {} cells): give another --out, or remove it",
                    self.root.display(),
                    old.name,
                    old.cells.len(),
                    plan.name,
                    plan.cells.len()
                )));
            }
        }
        for (cell, config) in plan.cells.iter().zip(&plan.configs) {
            let dir = self.cell_dir(cell.index);
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            write_if_changed(&dir.join(cell::CONFIG_FILE), &config.config)
                .map_err(|e| io(&dir, e))?;
            if let Some(profile) = &config.profile {
                write_if_changed(&dir.join(spec::PROFILE_FILE), profile)
                    .map_err(|e| io(&dir, e))?;
            }
        }
        let text = serde_json::to_string_pretty(plan).expect("plans serialise");
        write_atomic(&self.plan_path(), &text).map_err(|e| io(&self.plan_path(), e))?;
        Ok(())
    }
}

fn write_if_changed(path: &Path, text: &str) -> std::io::Result<()> {
    match std::fs::read_to_string(path) {
        Ok(old) if old == text => Ok(()),
        _ => write_atomic(path, text),
    }
}

/// Writes `text` to a temporary file beside `path` and renames it over `path`, so a reader never
/// sees half a file (a task killed mid-write leaves the old one).
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
