//! The tools around a run, through the binaries as a person runs them: every shipped config,
//! model export and evaluation (and the Python check of the file), `pnn-report`'s SVG, and what
//! goes to stdout and stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use pnn::report::metrics::{EpochMetrics, RunSummary};
use pnn::run::settings::ExperimentConfig;

const TRAIN: &str = env!("CARGO_BIN_EXE_pnn-train");
const EVAL: &str = env!("CARGO_BIN_EXE_pnn-eval");
const REPORT: &str = env!("CARGO_BIN_EXE_pnn-report");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// A deterministic byte stream for synthetic images.
fn pixels(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect()
}

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    dims.iter().for_each(|d| out.extend(d.to_be_bytes()));
    out.extend_from_slice(data);
    out
}

fn cifar(records: usize, label_bytes: usize, classes: usize, seed: u64) -> Vec<u8> {
    let px = pixels(records * 3072, seed);
    let mut out = Vec::new();
    for (i, img) in px.chunks_exact(3072).enumerate() {
        out.extend(std::iter::repeat_n((i % classes) as u8, label_bytes));
        out.extend_from_slice(img);
    }
    out
}

/// All four datasets in their real file formats, tiny (MNIST-like: 96 train, 40 test; CIFAR:
/// 5 x 20 train, 40 test), so every config can run a batch without the real CIFAR files.
fn synthetic_data() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = scratch().join("synthetic-data");
        for name in ["mnist", "fashion-mnist"] {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for (prefix, n, seed) in [("train", 96u32, 1), ("t10k", 40, 2)] {
                let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
                let images = pixels(n as usize * 784, seed);
                std::fs::write(
                    dir.join(format!("{prefix}-images-idx3-ubyte")),
                    idx(0x803, &[n, 28, 28], &images),
                )
                .unwrap();
                std::fs::write(
                    dir.join(format!("{prefix}-labels-idx1-ubyte")),
                    idx(0x801, &[n], &labels),
                )
                .unwrap();
            }
        }
        let c10 = root.join("cifar-10-batches-bin");
        std::fs::create_dir_all(&c10).unwrap();
        for i in 1..=5 {
            std::fs::write(c10.join(format!("data_batch_{i}.bin")), cifar(20, 1, 10, i)).unwrap();
        }
        std::fs::write(c10.join("test_batch.bin"), cifar(40, 1, 10, 9)).unwrap();
        let c100 = root.join("cifar-100-binary");
        std::fs::create_dir_all(&c100).unwrap();
        std::fs::write(c100.join("train.bin"), cifar(100, 2, 100, 3)).unwrap();
        std::fs::write(c100.join("test.bin"), cifar(40, 2, 100, 4)).unwrap();
        root
    })
}

fn run(cmd: &mut Command) -> Output {
    cmd.env_remove("RUST_LOG")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The summary on the last stdout line, and a check that stdout holds nothing else.
fn only_summary<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must be the JSON line alone: {stdout:?}"
    );
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {}", lines[0]))
}

fn shipped_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("examples/configs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_parses_and_runs_for_one_batch() {
    let configs = shipped_configs();
    // Tables 1 and 2 (4 datasets each) and Figure 2's P sweep (4 values, MLP and CNN).
    assert_eq!(configs.len(), 16, "{configs:?}");
    let mut ran = 0;
    for path in &configs {
        let name = path.file_name().unwrap().to_string_lossy();
        let source = std::fs::read_to_string(path).unwrap();
        assert!(
            source.contains("Reproduces thesis Table")
                || source.contains("Reproduces thesis Figure"),
            "{name} does not say which result it reproduces"
        );
        let config = ExperimentConfig::load(path).unwrap_or_else(|e| panic!("{e}"));
        let metrics = scratch().join(format!("{name}.jsonl"));
        let out = run(Command::new(TRAIN)
            .args(["--config".as_ref(), path.as_os_str()])
            .args(["--epochs", "1", "--max-batches", "1", "--quiet"])
            .arg("--data-dir")
            .arg(synthetic_data())
            .arg("--metrics")
            .arg(&metrics));
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let summary: RunSummary = only_summary(&out);
        let run = config.to_run_config().unwrap();
        // What the file name promises (`table1-mlp-mnist`, `figure2-cnn-fashion-mnist-p8`), not
        // the file's own parse: Tables 1 and 2 are P = 4, Figure 2 sweeps P.
        let stem = path.file_stem().unwrap().to_string_lossy();
        let (stem, want_p) = match stem.rsplit_once("-p") {
            Some((rest, p)) if p.parse::<usize>().is_ok() => (rest.to_string(), p.parse().unwrap()),
            _ => (stem.to_string(), 4),
        };
        let mut parts = stem.splitn(3, '-').skip(1);
        let (want_arch, want_dataset) = (parts.next().unwrap(), parts.next().unwrap());
        assert_eq!(summary.dataset, want_dataset, "{name}");
        assert_eq!(summary.arch, want_arch, "{name}");
        assert_eq!(summary.directions, want_p, "{name}");
        assert_eq!(summary.dataset, run.dataset.name(), "{name}");
        assert_eq!(summary.directions, run.hyper.directions, "{name}");
        assert_eq!(summary.batch_size, 256, "{name}");
        assert_eq!((summary.lr, summary.eps), (1e-3, 1e-3), "{name}");
        assert_eq!(summary.chunk_max, 50_000, "{name}");
        let default_widths = match run.arch {
            pnn::model::ArchKind::Mlp => pnn::model::ModelSpec::default_hidden(run.dataset),
            pnn::model::ArchKind::Cnn => pnn::model::ModelSpec::default_channels(run.dataset),
        };
        assert_eq!(
            summary.hidden,
            run.hidden.clone().unwrap_or(default_widths),
            "{name}"
        );
        assert_eq!(summary.arch, run.arch.name(), "{name}");
        // One batch, one epoch: P directions x 2 per chunk, plus a clean pass, per layer.
        let model = pnn::model::ModelSpec::new(
            run.dataset,
            run.arch,
            run.hidden.clone(),
            run.proj_dim,
            run.hyper.seed,
        )
        .unwrap();
        let expected: usize = (model.layer_specs().iter())
            .map(|l| 2 * want_p * l.weight_chunks(50_000).count() + 1)
            .sum();
        assert_eq!(summary.oracle_evaluations, expected as u64, "{name}");
        let lines = std::fs::read_to_string(&metrics).unwrap();
        assert_eq!(lines.lines().count(), 1, "{name}");
        ran += 1;
    }
    assert!(ran >= 8, "only {ran} configs ran");
}

#[test]
fn command_line_flags_override_the_config_file() {
    let cfg = scratch().join("override.ron");
    std::fs::write(
        &cfg,
        "(dataset: \"fashion-mnist\", hidden: [8, 6], epochs: 3, directions: 8, seed: 5)",
    )
    .unwrap();
    let out = run(Command::new(TRAIN)
        .arg("--config")
        .arg(&cfg)
        .args([
            "--epochs",
            "1",
            "--directions",
            "2",
            "--max-batches",
            "1",
            "-q",
        ])
        .arg("--data-dir")
        .arg(synthetic_data()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: RunSummary = only_summary(&out);
    assert_eq!(s.dataset, "fashion-mnist");
    assert_eq!(s.hidden, vec![8, 6]);
    assert_eq!((s.epochs, s.directions, s.seed), (1, 2, 5));
}

#[test]
fn a_bad_config_is_an_error_naming_the_key_and_the_line() {
    let cfg = scratch().join("bad.ron");
    std::fs::write(
        &cfg,
        "(\n    dataset: \"mnist\",\n    directions: \"four\",\n)\n",
    )
    .unwrap();
    let out = run(Command::new(TRAIN).arg("--config").arg(&cfg));
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("key `directions`"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn progress_stays_off_stdout_and_quiet_silences_the_rest() {
    let common = |cmd: &mut Command| {
        cmd.args(["--hidden", "10", "--epochs", "2", "--batch-size", "32"])
            .arg("--data-dir")
            .arg(synthetic_data());
    };
    // Progress as log lines (stderr is a pipe here) and as a bar: stdout is the summary alone.
    for progress in ["auto", "lines", "bar"] {
        // RUST_LOG=debug: whatever the filter lets through goes to stderr, never to stdout.
        let out = Command::new(TRAIN)
            .args(["--progress", progress])
            .env("RUST_LOG", "debug")
            .tap(common)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let s: RunSummary = only_summary(&out);
        assert_eq!(s.epochs, 2);
        if progress != "bar" {
            let err = text(&out.stderr);
            assert!(
                err.contains("epoch 1/2") && err.contains("epoch 2/2"),
                "{err}"
            );
        }
    }
    let out = run(Command::new(TRAIN).arg("--quiet").tap(common));
    assert!(out.status.success());
    let _: RunSummary = only_summary(&out);
    assert_eq!(text(&out.stderr), "", "--quiet must leave stderr empty");
}

trait Tap {
    fn tap(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self;
}

impl Tap for Command {
    fn tap(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self {
        f(self);
        self
    }
}

/// The data the export tests use: the real MNIST where the normal resolution finds it (CI has
/// it beside the repository), else the synthetic set.
fn export_data_dir() -> PathBuf {
    match pnn::data::resolve_data_dir(None) {
        Ok(dir) if dir.join("mnist").is_dir() => dir,
        _ => {
            eprintln!("no real MNIST found: exporting a model trained on synthetic data");
            synthetic_data().to_path_buf()
        }
    }
}

/// A model trained for one short epoch and saved, with the summary pnn-train printed.
fn trained_model() -> &'static (PathBuf, RunSummary) {
    static MODEL: OnceLock<(PathBuf, RunSummary)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = scratch().join("models/mnist.safetensors");
        let out = run(Command::new(TRAIN)
            .args(["--dataset", "mnist", "--epochs", "1", "-q"])
            .arg("--data-dir")
            .arg(export_data_dir())
            .arg("--save")
            .arg(&path));
        assert!(out.status.success(), "{}", text(&out.stderr));
        (path, only_summary(&out))
    })
}

#[derive(serde::Deserialize)]
struct EvalSummary {
    test_samples: usize,
    test_accuracy_cumulative: f64,
    test_accuracy_final_layer: f64,
    test_loss_cumulative: f64,
    test_accuracy_per_layer: Vec<f64>,
    weights_sha256: String,
}

#[test]
fn an_exported_model_reads_back_with_the_same_test_accuracy() {
    let (path, trained) = trained_model();
    let loaded = pnn::report::export::SavedModel::load(path).unwrap();
    assert_eq!(loaded.layers.len(), trained.hidden.len());
    assert_eq!(loaded.hyper.seed, trained.seed);
    let out = run(Command::new(EVAL)
        .arg("--model")
        .arg(path)
        .arg("--data-dir")
        .arg(export_data_dir())
        .arg("--predictions")
        .arg(scratch().join("predictions.csv")));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let e: EvalSummary = only_summary(&out);
    assert_eq!(e.test_samples, trained.test_samples);
    assert_eq!(
        e.weights_sha256, trained.weights_sha256,
        "the file holds other parameters"
    );
    // The same parameters on the same backend: the same figures, to the last bit.
    assert_eq!(e.test_accuracy_cumulative, trained.test_accuracy_cumulative);
    assert_eq!(
        e.test_accuracy_final_layer,
        trained.test_accuracy_final_layer
    );
    assert_eq!(e.test_loss_cumulative, trained.test_loss_cumulative);
    assert_eq!(e.test_accuracy_per_layer, trained.test_accuracy_per_layer);
    eprintln!(
        "exported model: test accuracy cumulative {:.4}, final-layer {:.4} (trained and re-read)",
        e.test_accuracy_cumulative, e.test_accuracy_final_layer
    );
}

#[test]
fn a_damaged_model_file_is_a_clear_error() {
    let bad = scratch().join("damaged.safetensors");
    std::fs::write(&bad, b"\x10\0\0\0\0\0\0\0{\"a\": 1}").unwrap();
    let out = run(Command::new(EVAL).arg("--model").arg(&bad));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("damaged.safetensors"));
}

/// python3 with safetensors and numpy loads the file and recomputes every prediction.
#[test]
fn python_recomputes_the_predictions_with_numpy() {
    let probe = Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output();
    match probe {
        Err(e) => {
            firmware_protocol::skipped::skipped(
                "python_recomputes_the_predictions_with_numpy",
                &format!("python3 is not available ({e})"),
            );
            return;
        }
        Ok(o) if !o.status.success() => {
            firmware_protocol::skipped::skipped(
                "python_recomputes_the_predictions_with_numpy",
                &format!(
                    "python3 lacks safetensors or numpy (`python3 -m pip install safetensors \
                     numpy`): {}",
                    text(&o.stderr).lines().last().unwrap_or("")
                ),
            );
            return;
        }
        Ok(_) => {}
    }
    let (path, _) = trained_model();
    let csv = scratch().join("predictions-for-python.csv");
    let out = run(Command::new(EVAL)
        .arg("--model")
        .arg(path)
        .arg("--data-dir")
        .arg(export_data_dir())
        .arg("--predictions")
        .arg(&csv)
        .arg("-q"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(Command::new("python3")
        .arg(repo().join("tests/python/check_export.py"))
        .arg(path)
        .arg(export_data_dir())
        .arg(&csv));
    eprintln!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "the Python check failed");
}

fn metrics_file(name: &str, epochs: u32, layers: usize, offset: f64) -> PathBuf {
    let path = scratch().join(format!("{name}.jsonl"));
    let mut s = String::new();
    for e in 1..=epochs {
        let acc = 0.5 + offset + 0.05 * e as f64;
        let m = EpochMetrics {
            epoch: e,
            train_seconds: 1.0,
            eval_seconds: 0.1,
            train_local_loss: (0..layers)
                .map(|l| 2.0 - 0.1 * (e + l as u32) as f64)
                .collect(),
            test_accuracy_cumulative: acc,
            test_accuracy_final_layer: acc - 0.02,
            test_loss_cumulative: 2.0 / e as f64,
            test_loss_final_layer: 2.2 / e as f64,
            test_accuracy_per_layer: (0..layers).map(|l| acc - 0.01 * l as f64).collect(),
            test_loss_per_layer: vec![1.0; layers],
            oracle_evaluations: 100 * e as u64,
            layer_utilisation: None,
            layer_wire_bytes: None,
            eps: None,
        };
        s.push_str(&serde_json::to_string(&m).unwrap());
        s.push('\n');
    }
    std::fs::write(&path, s).unwrap();
    path
}

/// Polylines with exactly `points` vertices (the curves; legend swatches have two) and the texts.
fn curves_and_texts(svg: &Path, points: usize) -> (usize, Vec<String>) {
    let source = std::fs::read_to_string(svg).unwrap();
    let doc = roxmltree::Document::parse(&source)
        .unwrap_or_else(|e| panic!("{} is not valid XML: {e}", svg.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let curves = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .filter(|n| {
            n.attribute("points")
                .is_some_and(|p| p.split_whitespace().count() == points)
        })
        .count();
    let texts = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect();
    (curves, texts)
}

#[test]
fn pnn_report_draws_one_curve_per_run_and_mode() {
    let (epochs, layers) = (4, 3);
    let a = metrics_file("run-a", epochs, layers, 0.0);
    let b = metrics_file("run-b", epochs, layers, 0.1);
    let out_dir = scratch().join("report");
    let out = run(Command::new(REPORT)
        .arg("--metrics")
        .arg(&a)
        .arg("--metrics")
        .arg(&b)
        .args(["--label", "P=4"])
        .arg("--out")
        .arg(&out_dir));
    assert!(out.status.success(), "{}", text(&out.stderr));
    for file in ["accuracy.svg", "loss.svg"] {
        let (curves, texts) = curves_and_texts(&out_dir.join(file), epochs as usize);
        assert_eq!(curves, 2 * 2, "{file}: two runs x two prediction modes");
        for label in [
            "P=4 (cumulative)",
            "P=4 (final layer)",
            "run-b (cumulative)",
            "run-b (final layer)",
        ] {
            assert!(
                texts.iter().any(|t| t == label),
                "{file}: no legend {label}: {texts:?}"
            );
        }
    }
    let (curves, texts) = curves_and_texts(&out_dir.join("layers.svg"), epochs as usize);
    assert_eq!(
        curves,
        2 * layers * 2,
        "two runs x three layers x two panels"
    );
    assert!(texts.iter().any(|t| t == "run-b L3"), "{texts:?}");
    let table = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert_eq!(table, text(&out.stdout));
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].starts_with("| P=4 | 4 | 0.7000 | 0.6800 |"),
        "{table}"
    );
    assert!(
        rows[1].starts_with("| run-b | 4 | 0.8000 | 0.7800 |"),
        "{table}"
    );
}

#[test]
fn pnn_report_overlays_a_dd_run_with_its_mf_exact_ceiling() {
    let epochs = 4;
    let dd = metrics_file("dd-run", epochs, 2, 0.0);
    let ceiling = metrics_file("mf-exact-run", epochs, 2, 0.15);
    let out_dir = scratch().join("report-ceiling");
    let out = run(Command::new(REPORT)
        .arg("--metrics")
        .arg(&dd)
        .arg("--ceiling")
        .arg(&ceiling)
        .arg("--out")
        .arg(&out_dir));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (curves, texts) = curves_and_texts(&out_dir.join("accuracy.svg"), epochs as usize);
    assert_eq!(
        curves,
        2 * 2,
        "the run and its ceiling, two prediction modes each"
    );
    assert!(
        texts
            .iter()
            .any(|t| t == "mf-exact-run (ceiling) (cumulative)"),
        "{texts:?}"
    );
    let table = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(
        table.contains("| dd-run | 4 | 0.7000 | 0.8500 | -0.1500 |"),
        "{table}"
    );
}

#[test]
fn the_fast_configs_parse_and_run_one_batch_with_their_options() {
    let dir = repo().join("examples/configs/fast");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    configs.sort();
    assert_eq!(
        configs.len(),
        4,
        "one per MLP dataset of Table 1: {configs:?}"
    );
    for path in &configs {
        let name = path.file_name().unwrap().to_string_lossy();
        let run_config = ExperimentConfig::load(path)
            .unwrap_or_else(|e| panic!("{e}"))
            .to_run_config()
            .unwrap();
        assert_eq!(
            run_config.hyper.difference,
            pnn::train::estimator::Difference::Forward,
            "{name}"
        );
        let out = run(Command::new(TRAIN)
            .args(["--config".as_ref(), path.as_os_str()])
            .args(["--epochs", "1", "--max-batches", "1", "--quiet"])
            .arg("--data-dir")
            .arg(synthetic_data())
            .arg("--metrics")
            .arg(scratch().join(format!("{name}.jsonl"))));
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let summary: RunSummary = only_summary(&out);
        assert_eq!(summary.directions, 7, "{name}");
    }
}

#[test]
fn pnn_report_names_a_bad_metrics_line() {
    let bad = scratch().join("bad-metrics.jsonl");
    std::fs::write(&bad, "{\"epoch\": 1}\n").unwrap();
    let out = run(Command::new(REPORT).arg("--metrics").arg(&bad));
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("bad-metrics.jsonl, line 1"), "{err}");
}
