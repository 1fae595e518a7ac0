//! `pnn-sweep` on this machine: sweep files, local runs, resuming an interrupted cell, gathering,
//! status and errors; and the noise sweep's rough edges (issue 17, item 16). The same sweeps
//! through a real Slurm are in `tests/slurm.rs`.
//!
//! Run: `cargo test --release --test sweep`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pnn::report::metrics::RunSummary;
use pnn::run::noise_sweep::NoiseParam;
use pnn::sweep::SweepDir;
use pnn::sweep::cell::{CellDir, LOG_FILE};
use pnn_sim::noise::NoiseModel;

const SWEEP: &str = env!("CARGO_BIN_EXE_pnn-sweep");
const TRAIN: &str = env!("CARGO_BIN_EXE_pnn-train");

fn sweep(args: &[&str]) -> Output {
    Command::new(SWEEP).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// A local, uninterrupted `pnn-train` run of a cell's config.
fn local_run(config: &Path) -> RunSummary {
    let ck = tempfile::tempdir().unwrap();
    let out = Command::new(TRAIN)
        .arg("--config")
        .arg(config)
        .arg("--checkpoint")
        .arg(ck.path().join("ck"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap()
}

fn without_timings(s: &RunSummary) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap();
    let m = v.as_object_mut().unwrap();
    m.remove("train_seconds");
    m.remove("seconds_per_epoch");
    v
}

const SMALL: &str = r#"(
    name: "small",
    base: (dataset: "mnist", epochs: 2, limit_train: 300, limit_test: 200, batch_size: 50),
    grid: {"lr": [1e-3, 1e-2]},
    seeds: [0, 1],
)"#;

#[test]
fn a_local_sweep_runs_each_cell_once_as_pnn_train_would_and_gathers_mean_and_std() {
    let work = tempfile::tempdir().unwrap();
    let file = write(work.path(), "small.ron", SMALL);
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    let run = sweep(&["run", file.to_str().unwrap(), "--out", o, "--jobs", "2"]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let dir = SweepDir::new(&out);
    let mut acc: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for i in 0..4 {
        let cell = CellDir(dir.cell_dir(i));
        let swept = cell.summary().expect("every cell done");
        let local = local_run(&cell.file("config.ron"));
        assert_eq!(without_timings(&swept), without_timings(&local), "cell {i}");
        // Cells are lr-major, seeds inside.
        assert_eq!(swept.seed, (i % 2) as u64);
        acc[i / 2].push(swept.test_accuracy_cumulative);
    }
    // groups.csv: mean and sample std over the two seeds.
    let groups = std::fs::read_to_string(out.join("gather/groups.csv")).unwrap();
    let rows: Vec<&str> = groups.lines().collect();
    assert_eq!(rows.len(), 3, "{groups}");
    for (row, a) in rows[1..].iter().zip(&acc) {
        let f: Vec<&str> = row.split(',').collect();
        let mean = (a[0] + a[1]) / 2.0;
        let std = ((a[0] - mean).powi(2) + (a[1] - mean).powi(2)).sqrt();
        assert_eq!(f[1], "2", "{row}");
        assert!((f[3].parse::<f64>().unwrap() - mean).abs() < 1e-12, "{row}");
        assert!((f[4].parse::<f64>().unwrap() - std).abs() < 1e-12, "{row}");
    }
    let table = std::fs::read_to_string(out.join("gather/table.md")).unwrap();
    assert!(table.contains("4 of 4 cells done"), "{table}");
    let mean = (acc[1][0] + acc[1][1]) / 2.0;
    assert!(
        table.contains(&format!("| 0.01 | {mean:.3} ± ")),
        "the paper-style row of lr 0.01: {table}"
    );
    let svg = std::fs::read_to_string(out.join("gather/accuracy-lr.svg")).unwrap();
    assert!(svg.contains("test accuracy vs lr"), "{svg}");
    // Again: nothing runs, nothing changes.
    let before = std::fs::read_to_string(dir.cell_dir(3).join("summary.json")).unwrap();
    let again = sweep(&["run", file.to_str().unwrap(), "--out", o]);
    assert!(again.status.success());
    assert_eq!(text(&again.stderr).matches("already done").count(), 4);
    assert_eq!(
        std::fs::read_to_string(dir.cell_dir(3).join("summary.json")).unwrap(),
        before
    );
    let status = sweep(&["status", o]);
    assert_eq!(text(&status.stdout).matches("| done |").count(), 4);
    // Another sweep into the same folder is refused.
    let other = write(work.path(), "other.ron", &SMALL.replace("1e-2", "2e-2"));
    let refused = sweep(&["run", other.to_str().unwrap(), "--out", o]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(text(&refused.stderr).contains("holds another sweep"));
}

#[test]
fn an_interrupted_cell_resumes_from_its_checkpoint_and_ends_bit_identical() {
    let work = tempfile::tempdir().unwrap();
    let file = write(
        work.path(),
        "one.ron",
        r#"(base: (dataset: "mnist", hidden: [100, 100], epochs: 5, limit_train: 20000,
                   limit_test: 500, checkpoint_every: 5), seeds: [3])"#,
    );
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    // Prepare the folder without running anything.
    let dry = sweep(&["slurm", file.to_str().unwrap(), "--out", o, "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry.stderr));
    let dir = SweepDir::new(&out);
    let cell = CellDir(dir.cell_dir(0));
    // A first attempt, as a task would start it, killed after its first epoch.
    let mut first = Command::new(TRAIN)
        .arg("--config")
        .arg(cell.file("config.ron"))
        .arg("--checkpoint")
        .arg(cell.checkpoint())
        .arg("--metrics")
        .arg(cell.file("metrics.jsonl"))
        .arg("--quiet")
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(cell.file("metrics.jsonl")).map_or(true, |m| m.is_empty()) {
        assert!(start.elapsed() < Duration::from_secs(60), "no first epoch");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let status = sweep(&["status", o]);
    assert!(
        text(&status.stdout).contains("| interrupted |"),
        "{}",
        text(&status.stdout)
    );
    let task = sweep(&["task", o, "0"]);
    assert!(task.status.success(), "{}", text(&task.stderr));
    assert!(text(&task.stderr).contains("resumed"));
    let log = std::fs::read_to_string(cell.file(LOG_FILE)).unwrap();
    assert!(log.contains("resuming from"), "{log}");
    let resumed = cell.summary().unwrap();
    let uninterrupted = local_run(&cell.file("config.ron"));
    assert_eq!(resumed.weights_sha256, uninterrupted.weights_sha256);
    assert_eq!(without_timings(&resumed), without_timings(&uninterrupted));
    let metrics = std::fs::read_to_string(cell.file("metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, [1, 2, 3, 4, 5]);
}

#[test]
fn failed_and_pending_cells_are_listed_not_hidden() {
    let work = tempfile::tempdir().unwrap();
    let file = write(
        work.path(),
        "bad.ron",
        r#"(
            base: (dataset: "mnist", epochs: 1, limit_train: 100, limit_test: 100),
            cells: [{"batch_size": 50}, {"data_dir": "/nonexistent/pnn-data"}],
        )"#,
    );
    let out = work.path().join("out");
    let o = out.to_str().unwrap();
    // Prepared, not run: both pending.
    assert!(
        sweep(&["slurm", file.to_str().unwrap(), "--out", o, "--dry-run"])
            .status
            .success()
    );
    let g = sweep(&["gather", o]);
    assert!(g.status.success());
    let table = text(&g.stdout);
    assert!(table.contains("0 of 2 cells done"), "{table}");
    assert_eq!(table.matches("| pending |").count(), 2, "{table}");
    let run = sweep(&["run", file.to_str().unwrap(), "--out", o]);
    assert_eq!(run.status.code(), Some(7), "{}", text(&run.stderr));
    let table = std::fs::read_to_string(out.join("gather/table.md")).unwrap();
    assert!(table.contains("1 of 2 cells done"), "{table}");
    assert!(
        table.contains("| 1 | data_dir=/nonexistent/pnn-data seed=0 | failed | exit 3:"),
        "{table}"
    );
    let status = text(&sweep(&["status", o]).stdout);
    assert!(status.contains("| failed | exit 3"), "{status}");
}

#[test]
fn a_bad_sweep_file_is_refused_naming_the_key() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    for (body, what) in [
        (r#"(grid: {"learning_rate": [0.1]})"#, "learning_rate"),
        ("(\n  base: (\n    epochs: \"ten\",\n  ),\n)", "line 3"),
        (r#"(grid: {"noise.adc.bits": [8]})"#, "bound"),
        (r#"(axes: {})"#, "axes"),
    ] {
        let file = write(work.path(), "bad.ron", body);
        let o = sweep(&[
            "run",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{body}");
        assert!(
            text(&o.stderr).contains(what),
            "{body}: {}",
            text(&o.stderr)
        );
        assert!(!out.join("plan.json").exists());
    }
    let o = sweep(&["gather", work.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("not a sweep's output folder"));
}

// Issue 17, item 16: the noise sweep's rough edges.

#[test]
fn every_noise_key_can_be_swept_including_adc_bound_drift_t0_and_seed() {
    for (key, value) in [("adc.bound", 4.0), ("drift.t0", 10.0), ("seed", 7.0)] {
        let param: NoiseParam = key.parse().unwrap_or_else(|e| panic!("{key}: {e}"));
        let mut model = NoiseModel::default();
        param.set(&mut model, value).unwrap();
        match key {
            "adc.bound" => assert_eq!(model.adc.unwrap().bound, 4.0),
            "drift.t0" => assert_eq!(model.drift.unwrap().t0, 10.0),
            _ => assert_eq!(model.seed, 7),
        }
    }
    let e = "adc.bits"
        .parse::<NoiseParam>()
        .unwrap()
        .set(&mut NoiseModel::default(), 8.0)
        .unwrap_err();
    assert!(e.contains("bound"), "{e}");
    let e = "output_nois".parse::<NoiseParam>().unwrap_err();
    assert!(e.contains("adc.bound") && e.contains("drift.t0"), "{e}");
}

#[test]
fn the_noise_sweep_plots_the_snr_takes_limit_test_and_says_1_epoch() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("noise");
    let o = sweep(&[
        "noise",
        "--values",
        "0,0.5",
        "--epochs",
        "1",
        "--limit-train",
        "300",
        "--limit-test",
        "100",
        "--fd-repeats",
        "4",
        "--eps",
        "1",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(err.contains("100 test samples"), "{err}");
    assert!(
        err.contains("1 epoch)") && !err.contains("1 epochs"),
        "{err}"
    );
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.contains("signal-to-noise"), "the SNR panel");
    assert!(svg.contains("SNR = 1"), "the drowning line");
}

#[test]
fn every_flag_has_help_text() {
    for sub in ["run", "slurm", "task", "gather", "status", "noise"] {
        let help = text(&sweep(&[sub, "-h"]).stdout);
        let lines: Vec<&str> = help.lines().map(str::trim_start).collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with('-') || line.starts_with("-h") || line.starts_with("-V") {
                continue;
            }
            // The description follows on the line, or (when clap wraps) on the next one.
            let described = |d: &str| !d.is_empty() && !d.starts_with("[default");
            let described = match line.split_once("  ") {
                Some((_, rest)) => described(rest.trim()),
                None => lines
                    .get(i + 1)
                    .is_some_and(|next| !next.starts_with('-') && described(next)),
            };
            assert!(described, "pnn-sweep {sub}: `{line}` has no help text");
        }
    }
}

#[test]
fn a_summary_counts_the_samples_max_batches_trains_on() {
    // Every method reports the same way: MF+DD and the exact-gradient baselines.
    for method in ["dd", "mf-exact", "bp"] {
        let out = Command::new(TRAIN)
            .args([
                "--method",
                method,
                "--epochs",
                "1",
                "--max-batches",
                "2",
                "--batch-size",
                "50",
                "--limit-test",
                "100",
                "--quiet",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{method}: {}", text(&out.stderr));
        let s: RunSummary =
            serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(s.train_samples, 100, "{method}");
    }
}
