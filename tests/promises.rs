//! What the README promises and no other test held: extending a finished run with
//! `--resume DIR --epochs N`, exit code 5, `pnn-eval --backend sim:<profile>`, the data-directory
//! search order, the warning when a noisy run resumes, noisy CNN runs refused, and the examples
//! running (not only compiling).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{data_dir, pnn_train, summary};
use serde_json::Value;

const EVAL: &str = env!("CARGO_BIN_EXE_pnn-eval");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn untimed(mut v: Value) -> Value {
    let obj = v.as_object_mut().unwrap();
    obj.retain(|k, _| !k.contains("seconds"));
    v
}

/// A short MNIST run's arguments.
const SHORT: [&str; 6] = [
    "--limit-train",
    "1500",
    "--limit-test",
    "500",
    "--seed",
    "2",
];

/// README, *Checkpoints*: "`--resume DIR --epochs 300` extends a finished run" — and the extended
/// run is the longer run, bit for bit.
#[test]
fn resume_with_more_epochs_extends_a_finished_run() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run");
    let ckpt = ckpt.to_str().unwrap();
    let (code, _, err) =
        pnn_train(&[&SHORT[..], &["--epochs", "1", "--checkpoint", ckpt]].concat());
    assert_eq!(code, 0, "{err}");
    let (code, extended, err) = pnn_train(&["--resume", ckpt, "--epochs", "2"]);
    assert_eq!(code, 0, "{err}");
    let (code, straight, err) = pnn_train(&[&SHORT[..], &["--epochs", "2"]].concat());
    assert_eq!(code, 0, "{err}");
    let (extended, straight) = (untimed(summary(&extended)), untimed(summary(&straight)));
    assert_eq!(extended["epochs"], 2);
    assert_eq!(extended, straight);
}

/// README, *Exit codes*: 5, the model could not be saved (and the message names the file). The
/// destination is fine when the run starts (it is checked up front) and becomes a directory
/// during the run: the save at the end fails.
#[test]
fn a_model_that_cannot_be_saved_exits_with_5() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("model.safetensors");
    let ckpt = dir.path().join("ckpt");
    let child = common::train_command(&[
        "--epochs",
        "3",
        "--limit-train",
        "20000",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--save",
        target.to_str().unwrap(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // The first checkpoint is written once the run has started, after any check of --save.
    let started = std::time::Instant::now();
    while !ckpt.join("checkpoint.pnn").exists() {
        assert!(started.elapsed().as_secs() < 60, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("occupied"), b"").unwrap();
    let out = child.wait_with_output().unwrap();
    let (out_text, err) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        out_text.is_empty(),
        "no summary for a run whose model was lost: {out_text}"
    );
}

fn eval(model: &Path, backend: &str) -> Value {
    let out = Command::new(EVAL)
        .arg("--model")
        .arg(model)
        .args(["--backend", backend, "--limit-test", "500", "-q"])
        .env("PNN_DATA_DIR", data_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{backend}: {}", text(&out.stderr));
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}

/// README: a saved model evaluates on a device profile (`pnn-eval --backend sim:<profile>`): the
/// ideal profile gives the plain simulator's figures, a noisy one other figures of the same
/// weights.
#[test]
fn pnn_eval_runs_a_saved_model_on_a_device_profile() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    let (code, _, err) = pnn_train(
        &[
            &SHORT[..],
            &["--epochs", "1", "--save", model.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let devices = repo().join("devices");
    let plain = eval(&model, "sim");
    let ideal = eval(
        &model,
        &format!("sim:{}", devices.join("ideal.ron").display()),
    );
    let pcm = eval(
        &model,
        &format!("sim:{}", devices.join("pcm.ron").display()),
    );
    for key in [
        "test_loss_cumulative",
        "test_accuracy_cumulative",
        "weights_sha256",
    ] {
        assert_eq!(plain[key], ideal[key], "{key}");
    }
    assert_eq!(plain["weights_sha256"], pcm["weights_sha256"]);
    assert_ne!(plain["test_loss_cumulative"], pcm["test_loss_cumulative"]);
    assert!(pcm["backend"].as_str().unwrap().ends_with("pcm.ron"));
}

/// An MNIST directory of `n` training and 2 test images (IDX, uncompressed).
fn write_mnist(root: &Path, n: u32) {
    let dir = root.join("mnist");
    std::fs::create_dir_all(&dir).unwrap();
    let images = |n: u32| {
        let mut b = [0x0803u32, n, 28, 28]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<u8>>();
        b.extend((0..n * 784).map(|i| (i % 251) as u8));
        b
    };
    let labels = |n: u32| {
        let mut b = [0x0801u32, n]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<u8>>();
        b.extend((0..n).map(|i| (i % 10) as u8));
        b
    };
    std::fs::write(dir.join("train-images-idx3-ubyte"), images(n)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), labels(n)).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), images(2)).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), labels(2)).unwrap();
}

/// README, *Data*: `--data-dir`, then `$PNN_DATA_DIR`, then `./data`, then `../shared/data`;
/// each place holds a data set of another size, so the run's `train_samples` says which was read.
#[test]
fn the_data_directory_is_searched_in_the_documented_order() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let cwd = root.join("work");
    let (explicit, env) = (root.join("explicit"), root.join("env"));
    write_mnist(&explicit, 6);
    write_mnist(&env, 5);
    write_mnist(&cwd.join("data"), 3);
    write_mnist(&root.join("shared/data"), 4);
    let run = |args: &[&str], env_dir: Option<&Path>| -> u64 {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pnn-train"));
        c.args(["--epochs", "1", "-q"])
            .args(args)
            .current_dir(&cwd)
            .env_remove("PNN_DATA_DIR")
            .stdin(Stdio::null());
        if let Some(d) = env_dir {
            c.env("PNN_DATA_DIR", d);
        }
        let out: Output = c.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let s = summary(&text(&out.stdout));
        s["train_samples"].as_u64().unwrap()
    };
    let explicit_arg = ["--data-dir", explicit.to_str().unwrap()];
    assert_eq!(run(&explicit_arg, Some(&env)), 6, "--data-dir first");
    assert_eq!(run(&[], Some(&env)), 5, "then $PNN_DATA_DIR");
    assert_eq!(run(&[], None), 3, "then ./data");
    std::fs::remove_dir_all(cwd.join("data")).unwrap();
    assert_eq!(run(&[], None), 4, "then ../shared/data");
}

/// README, *Checkpoints*: noisy `sim:<profile>` runs resume, and the run says it will not be
/// bit-identical; an ideal run resumes without the warning.
#[test]
fn a_resumed_noisy_run_warns_that_it_is_not_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for (profile, warns) in [("pcm", true), ("ideal", false)] {
        let ckpt = dir.path().join(profile);
        let ckpt = ckpt.to_str().unwrap();
        let backend = format!(
            "sim:{}",
            repo().join(format!("devices/{profile}.ron")).display()
        );
        let args = [
            "--backend",
            &backend,
            "--epochs",
            "1",
            "--max-batches",
            "2",
            "--limit-test",
            "100",
            "--checkpoint",
            ckpt,
        ];
        let (code, _, err) = pnn_train(&args);
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = pnn_train(&["--resume", ckpt, "--epochs", "2"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            err.contains("not end bit-identical"),
            warns,
            "{profile}: {err}"
        );
    }
}

/// README: hardware effects cover dense layers; a noisy profile with `--arch cnn` is refused
/// with exit code 4 and a message that says so (not trained as if ideal).
#[test]
fn a_noisy_profile_is_refused_for_a_cnn() {
    let backend = format!("sim:{}", repo().join("devices/pcm.ron").display());
    let (code, out, err) = pnn_train(&[
        "--backend",
        &backend,
        "--arch",
        "cnn",
        "--epochs",
        "1",
        "--max-batches",
        "1",
    ]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("convolutional"), "{err}");
    assert!(out.is_empty());
    // The ideal profile is no hardware effect: a CNN runs on it.
    let ideal = format!("sim:{}", repo().join("devices/ideal.ron").display());
    let (code, _, err) = pnn_train(&[
        "--backend",
        &ideal,
        "--arch",
        "cnn",
        "--epochs",
        "1",
        "--max-batches",
        "1",
        "--limit-test",
        "50",
    ]);
    assert_eq!(code, 0, "{err}");
}

/// The examples run to their end (cargo test builds them into `target/<profile>/examples`).
#[test]
fn the_examples_run() {
    // This test binary is target/<profile>/deps/promises-<hash>.
    let exe = std::env::current_exe().unwrap();
    let examples: PathBuf = exe.parent().unwrap().parent().unwrap().join("examples");
    for (name, expect) in [
        ("library_training", "reloaded from"),
        ("custom_oracle", "trained a quirky device"),
    ] {
        let bin = examples.join(name);
        let source = repo().join(format!("examples/{name}.rs"));
        let fresh = (bin.metadata().and_then(|m| m.modified()).ok())
            .zip(source.metadata().and_then(|m| m.modified()).ok())
            .is_some_and(|(built, written)| built >= written);
        if !fresh {
            firmware_protocol::skipped::skipped(
                "the_examples_run",
                &format!(
                    "{} is missing or older than its source (build it with `cargo test` or \
                     `cargo build --release --examples`)",
                    bin.display()
                ),
            );
            continue;
        }
        let out = Command::new(&bin)
            .env("PNN_DATA_DIR", data_dir())
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        assert!(stdout.contains(expect), "{name}: {stdout}");
    }
}

/// README, *Checkpoints*: "temporary file, fsync, rename: a crash mid-write leaves the previous
/// one". A 3 MB checkpoint saved after every batch, the run SIGKILLed as soon as a save's
/// temporary file appears, until three kills landed inside a write (the temporary file left
/// behind): every time the checkpoint in place loads and verifies, and the run resumes from it
/// to its end.
#[test]
fn a_run_killed_mid_checkpoint_write_keeps_a_whole_checkpoint() {
    use pnn::run::checkpoint::Checkpoint;
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run");
    let ckpt_arg = ckpt.to_str().unwrap().to_string();
    let fresh = [
        "--hidden",
        "600,600",
        "--epochs",
        "1",
        "--max-batches",
        "5",
        "--limit-test",
        "100",
        "--checkpoint-every",
        "1",
        "--checkpoint",
        &ckpt_arg,
    ];
    let resume = ["--resume", &ckpt_arg];
    let writing = |dir: &Path| {
        std::fs::read_dir(dir)
            .is_ok_and(|entries| entries.flatten().any(|e| e.file_name() != "checkpoint.pnn"))
    };
    let (mut kills, mut mid_write) = (0, 0);
    while mid_write < 3 && kills < 10 {
        let args: &[&str] = if ckpt.join("checkpoint.pnn").exists() {
            &resume
        } else {
            &fresh
        };
        let mut child = common::train_command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill the moment a save's temporary file shows: inside the write (or, rarely, just
        // after its rename, which leaves nothing behind and is not counted).
        let started = std::time::Instant::now();
        while !(ckpt.join("checkpoint.pnn").exists() && writing(&ckpt)) {
            assert!(started.elapsed().as_secs() < 60, "no checkpoint write seen");
            if child.try_wait().unwrap().is_some() {
                break;
            }
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            break; // the run ended first
        }
        kills += 1;
        let leftovers: Vec<PathBuf> = (std::fs::read_dir(&ckpt).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| !p.ends_with("checkpoint.pnn"))
            .collect();
        mid_write += !leftovers.is_empty() as usize;
        let saved = Checkpoint::load(&ckpt);
        assert!(
            saved.is_ok(),
            "kill {kills} (mid-write: {}): {}",
            !leftovers.is_empty(),
            saved.unwrap_err()
        );
        // The next run's saves would remove them; removed here so that the next kill is
        // triggered by a temporary file of its own.
        leftovers
            .iter()
            .for_each(|p| std::fs::remove_file(p).unwrap());
    }
    eprintln!("{kills} kills, {mid_write} inside a checkpoint write");
    assert!(
        mid_write >= 2,
        "only {mid_write} of {kills} kills landed inside a write"
    );
    let (code, out, err) = pnn_train(&resume);
    assert_eq!(code, 0, "{err}");
    assert_eq!(summary(&out)["epochs"], 1);
}

/// The README's headline figure, read from the README itself ("cumulative test accuracy 0.836
/// after 5 epochs"), reproduced by its first command. Within 0.01: the README allows another
/// CPU to round differently (the matrix kernels are chosen per CPU), which moves a few test
/// predictions; the same machine gives the same bits.
#[test]
fn the_readme_headline_accuracy_is_what_its_command_gives() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let command = "cargo run --release --bin pnn-train -- ";
    let args: Vec<&str> = (readme.lines())
        .find_map(|l| l.strip_prefix(command))
        .expect("the README's first command")
        .split_whitespace()
        .collect();
    let claim = "cumulative test accuracy ";
    let stated: f64 = readme
        .split_once(claim)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the README states the headline accuracy");
    let (code, out, err) = pnn_train(&args);
    assert_eq!(code, 0, "{err}");
    let got = summary(&out)["test_accuracy_cumulative"].as_f64().unwrap();
    eprintln!("README states {stated}, the command gives {got}");
    assert!(
        (got - stated).abs() <= 0.01,
        "README says {stated}, `{}` gives {got}",
        args.join(" ")
    );
}
