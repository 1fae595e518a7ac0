//! Running a sweep's cells on this machine, several at a time.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::cell::{CellDir, Outcome, run_cell};
use super::{Plan, SweepDir};

/// Runs every cell of `plan` in `dir` that is not done, `jobs` at a time, with `train`
/// (`pnn-train`); each run gets an equal share of the cores (`PNN_THREADS`, unless set).
/// `report` hears of each cell as it ends. Returns each cell's outcome, in cell order.
pub fn run_all(
    dir: &SweepDir,
    plan: &Plan,
    jobs: usize,
    train: &Path,
    report: impl Fn(usize, &std::io::Result<Outcome>) + Sync,
) -> Vec<std::io::Result<Outcome>> {
    let jobs = jobs.clamp(1, plan.cells.len().max(1));
    let threads = match std::env::var("PNN_THREADS") {
        Ok(_) => None,
        Err(_) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Some((cores / jobs).max(1))
        }
    };
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<std::io::Result<Outcome>>>> =
        Mutex::new((0..plan.cells.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(cell) = plan.cells.get(i) else {
                        break;
                    };
                    let outcome =
                        run_cell(&CellDir(dir.cell_dir(cell.index)), train, threads, None);
                    report(i, &outcome);
                    results.lock().expect("no panics while held")[i] = Some(outcome);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("no panics while held")
        .into_iter()
        .map(|r| r.expect("every cell ran"))
        .collect()
}
