//! A sweep as one Slurm job array: one array task per cell not yet done, at most `%N` at once.
//! Each task is `pnn-sweep task OUT INDEX` ([`super::cell::run_cell`]), so a task that Slurm
//! preempts or requeues starts again from the cell's checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Plan, SweepDir, SweepError};
use crate::run::shell_word;

/// The `sbatch` options of the array (those left `None` are the cluster's defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    /// Per task, as sbatch takes it (`2:00:00`, `1-00:00:00`).
    pub time: Option<String>,
    pub cpus_per_task: usize,
    /// Per node, as sbatch takes it (`4G`).
    pub mem: Option<String>,
    pub account: Option<String>,
    /// At most this many tasks at once (`--array=...%N`).
    pub max_concurrent: usize,
}

impl Default for SlurmOptions {
    fn default() -> Self {
        Self {
            partition: None,
            time: None,
            cpus_per_task: 1,
            mem: None,
            account: None,
            max_concurrent: 32,
        }
    }
}

/// `0-3,5,7-9`: the indices as sbatch's `--array` list.
pub fn array_ranges(indices: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        let mut end = start;
        while i + 1 < indices.len() && indices[i + 1] == end + 1 {
            i += 1;
            end = indices[i];
        }
        out.push(if end > start {
            format!("{start}-{end}")
        } else {
            start.to_string()
        });
        i += 1;
    }
    out.join(",")
}

/// A name Slurm and shells take as it is.
fn job_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("pnn-{clean}")
}

/// The sbatch script that runs `cells` (indices into the plan) of the sweep in `dir`, running
/// `sweep_exe task` and `train_exe` from `workdir` (where relative paths in the configs point).
pub fn script(
    dir: &SweepDir,
    plan: &Plan,
    cells: &[usize],
    opts: &SlurmOptions,
    sweep_exe: &Path,
    train_exe: &Path,
    workdir: &Path,
) -> String {
    let mut s = String::from("#!/bin/bash\n");
    s += &format!(
        "# Sweep {}: {} of its {} cells, one array task each; written by `pnn-sweep slurm`.\n\
         # A task resumes its cell from the checkpoint in its folder, so requeueing is safe;\n\
         # a done cell exits at once.\n",
        plan.name,
        cells.len(),
        plan.cells.len()
    );
    let out = dir.slurm_dir().join("%A_%a.out");
    let mut line = |k: &str, v: &str| s += &format!("#SBATCH --{k}={v}\n");
    line("job-name", &job_name(&plan.name));
    line(
        "array",
        &format!("{}%{}", array_ranges(cells), opts.max_concurrent.max(1)),
    );
    line("output", &out.display().to_string());
    line("open-mode", "append");
    line("cpus-per-task", &opts.cpus_per_task.max(1).to_string());
    line("chdir", &workdir.display().to_string());
    for (k, v) in [
        ("partition", &opts.partition),
        ("time", &opts.time),
        ("mem", &opts.mem),
        ("account", &opts.account),
    ] {
        if let Some(v) = v {
            line(k, v);
        }
    }
    s += "#SBATCH --requeue\n";
    s += "set -u\n";
    s += "export PNN_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"\n";
    s += &format!("export PNN_TRAIN={}\n", shell_word(train_exe));
    s += &format!(
        "exec {} task {} \"$SLURM_ARRAY_TASK_ID\"\n",
        shell_word(sweep_exe),
        shell_word(&dir.root)
    );
    s
}

/// The script's path in the sweep folder.
pub fn script_path(dir: &SweepDir) -> PathBuf {
    dir.slurm_dir().join("sweep.sbatch")
}

fn jobs_path(dir: &SweepDir) -> PathBuf {
    dir.slurm_dir().join("jobs.txt")
}

/// Submits the script with `sbatch` and returns the job id (also appended to `slurm/jobs.txt`).
pub fn submit(dir: &SweepDir, script: &Path) -> Result<String, SweepError> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(script)
        .output()
        .map_err(|e| {
            SweepError::Slurm(format!(
                "cannot run sbatch ({e}): run this on a Slurm login node, or use --dry-run to only write {}",
                script.display()
            ))
        })?;
    if !out.status.success() {
        return Err(SweepError::Slurm(format!(
            "sbatch refused {}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text
        .trim()
        .split(';')
        .next()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| SweepError::Slurm(format!("sbatch printed no job id: {text:?}")))?
        .to_string();
    let mut jobs = std::fs::read_to_string(jobs_path(dir)).unwrap_or_default();
    jobs += &format!("{id}\n");
    super::write_atomic(&jobs_path(dir), &jobs)
        .map_err(|e| SweepError::Folder(format!("cannot record the job id: {e}")))?;
    Ok(id)
}

/// The jobs submitted for this folder, oldest first.
pub fn jobs(dir: &SweepDir) -> Vec<String> {
    std::fs::read_to_string(jobs_path(dir))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// What `squeue` says of this folder's array tasks: cell index → state (`PENDING`, `RUNNING`,
/// …, with the reason for pending ones). `None` where `squeue` is missing or fails.
pub fn queue_states(dir: &SweepDir) -> Option<BTreeMap<usize, String>> {
    let jobs = jobs(dir);
    if jobs.is_empty() {
        return Some(BTreeMap::new());
    }
    let out = Command::new("squeue")
        .args(["--noheader", "--array", "--format=%i|%T|%r", "--jobs"])
        .arg(jobs.join(","))
        .output()
        .ok()?;
    if !out.status.success() {
        // A finished job is no longer known to squeue: that is not a failure of squeue.
        let err = String::from_utf8_lossy(&out.stderr);
        return err.contains("Invalid job id").then(BTreeMap::new);
    }
    Some(parse_states(&String::from_utf8_lossy(&out.stdout)))
}

/// What Slurm's accounting (`sacct`) says of this folder's array tasks that ended: cell index →
/// the last attempt's state (`COMPLETED`, `FAILED`, `TIMEOUT`, `OUT_OF_MEMORY`, `CANCELLED`, …),
/// which tells why a task killed from outside left no note in its cell. `None` where `sacct` is
/// missing or accounting is off.
pub fn accounting_states(dir: &SweepDir) -> Option<BTreeMap<usize, String>> {
    let jobs = jobs(dir);
    if jobs.is_empty() {
        return Some(BTreeMap::new());
    }
    let out = Command::new("sacct")
        .args(["--noheader", "--parsable2", "--allocations"])
        .args(["--format=JobID,State", "--jobs"])
        .arg(jobs.join(","))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| parse_states(&String::from_utf8_lossy(&out.stdout)))
}

/// `JOBID_INDEX|STATE[|REASON]` lines (squeue's and sacct's output) as cell index → state; a
/// later line (a later job of the folder) wins.
pub fn parse_states(text: &str) -> BTreeMap<usize, String> {
    let mut states = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split('|');
        let (Some(id), Some(state), reason) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some(index) = id
            .rsplit_once('_')
            .and_then(|(_, i)| i.trim().parse::<usize>().ok())
        else {
            continue;
        };
        let state = state.trim();
        let state = match reason.map(str::trim) {
            Some(r) if state == "PENDING" && r != "None" && !r.is_empty() => {
                format!("{state} ({r})")
            }
            _ => state.to_string(),
        };
        states.insert(index, state);
    }
    states
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_and_sacct_lines_give_each_cell_its_state() {
        let squeue = "12_0|RUNNING|None\n12_3|PENDING|JobArrayTaskLimit\n12_[4-7%2]|PENDING|x\n";
        let s = parse_states(squeue);
        assert_eq!(s[&0], "RUNNING");
        assert_eq!(s[&3], "PENDING (JobArrayTaskLimit)");
        assert_eq!(s.len(), 2, "an unexpanded range names no one cell");
        let sacct = "12_1|TIMEOUT\n12_2|CANCELLED by 0\n13_1|COMPLETED\n";
        let s = parse_states(sacct);
        assert_eq!(s[&1], "COMPLETED", "the later job wins");
        assert_eq!(s[&2], "CANCELLED by 0");
    }

    #[test]
    fn array_ranges_compress_runs() {
        assert_eq!(array_ranges(&[0, 1, 2, 3, 5, 7, 8, 9]), "0-3,5,7-9");
        assert_eq!(array_ranges(&[4]), "4");
        assert_eq!(array_ranges(&[]), "");
    }
}
