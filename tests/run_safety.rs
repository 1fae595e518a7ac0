//! Nothing lost, nothing silent (issue 17): a fresh run does not overwrite a saved one, SIGINT and
//! SIGTERM save the run and say how to continue it, and a diverging run stops with its own exit
//! code and keeps the last good checkpoint.

mod common;

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use pnn::run::checkpoint::{Checkpoint, Position};
use serde_json::Value;

use common::{train_command, train_output as train};

/// A small run: 2048 samples, 20-wide layers.
const SMALL: &[&str] = &[
    "--dataset",
    "mnist",
    "--hidden",
    "20,20",
    "--limit-train",
    "2048",
    "--limit-test",
    "300",
    "--seed",
    "5",
    "-q",
];

fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
    SMALL.iter().chain(args).copied().collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn summary_of(out: &Output) -> Value {
    assert!(out.status.success(), "{:?}: {}", out.status, stderr(out));
    common::summary(&String::from_utf8_lossy(&out.stdout))
}

fn untimed(mut v: Value) -> Value {
    v.as_object_mut()
        .unwrap()
        .retain(|k, _| !k.contains("seconds"));
    v
}

/// Item 1: `--checkpoint DIR` on a directory that holds a run is refused (exit 6) and names
/// `--resume` and `--fresh`; the saved run is left as it was; `--fresh` starts over.
#[test]
fn a_fresh_run_does_not_overwrite_a_saved_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    summary_of(&train(&with(&["--epochs", "1", "--checkpoint", d])));
    let saved = std::fs::read(Checkpoint::path_in(&dir)).unwrap();

    let again = train(&with(&["--epochs", "2", "--checkpoint", d]));
    let msg = stderr(&again);
    assert_eq!(again.status.code(), Some(6), "{msg}");
    assert!(again.stdout.is_empty(), "{msg}");
    assert!(
        msg.contains(&format!("pnn-train --resume {d}")) && msg.contains("--fresh"),
        "{msg}"
    );
    assert_eq!(std::fs::read(Checkpoint::path_in(&dir)).unwrap(), saved);

    // Another run that resumes elsewhere may not write here either.
    let other = tmp.path().join("other");
    let o = other.to_str().unwrap();
    summary_of(&train(&with(&["--epochs", "1", "--checkpoint", o])));
    let into = train(&["--resume", o, "--checkpoint", d, "-q"]);
    assert_eq!(into.status.code(), Some(6), "{}", stderr(&into));
    assert_eq!(std::fs::read(Checkpoint::path_in(&dir)).unwrap(), saved);

    // The same run resumed into its own directory goes on; --fresh starts over.
    summary_of(&train(&["--resume", d, "--epochs", "2", "-q"]));
    assert_eq!(
        Checkpoint::load(&dir).unwrap().position,
        Position { epoch: 2, batch: 0 }
    );
    let fresh = summary_of(&train(&with(&[
        "--epochs",
        "1",
        "--checkpoint",
        d,
        "--fresh",
    ])));
    assert_eq!(fresh["epochs"], 1);
    assert_eq!(
        Checkpoint::load(&dir).unwrap().position,
        Position { epoch: 1, batch: 0 }
    );
    let both = train(&["--resume", d, "--fresh"]);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
}

/// Waits until `ready` holds (polling), or the child has ended.
fn wait_until(child: &mut Child, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be signalled"
        );
        assert!(Instant::now() < deadline, "the run made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The directory the stop message says the run is saved in (`pnn-train --resume DIR`).
fn resume_dir(msg: &str) -> String {
    let line = msg
        .lines()
        .find(|l| l.trim_start().starts_with("pnn-train --resume "))
        .unwrap_or_else(|| panic!("no resume command in: {msg}"));
    line.trim_start()["pnn-train --resume ".len()..]
        .trim()
        .to_string()
}

/// Item 2: SIGTERM mid-run saves into --checkpoint DIR and exits 143; SIGINT without a checkpoint
/// directory saves into the rescue location (in $TMPDIR) and exits 130; each says how to
/// continue, and the continued runs end as an uninterrupted one does.
#[test]
fn sigint_and_sigterm_save_the_run_and_print_how_to_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let epochs = ["--epochs", "12"];
    let reference = untimed(summary_of(&train(&with(&epochs))));

    // SIGTERM, with a checkpoint directory: once a mid-run checkpoint shows, the handler is in.
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    let mut child = train_command(&with(&[&epochs[..], &["--checkpoint", d]].concat()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&mut child, || {
        Checkpoint::load(&dir).is_ok_and(|c| c.position.epoch >= 1)
    });
    signal(&child, "TERM");
    let out = child.wait_with_output().unwrap();
    let msg = stderr(&out);
    assert_eq!(out.status.code(), Some(143), "{msg}");
    assert!(msg.contains("stopped by SIGTERM"), "{msg}");
    assert_eq!(resume_dir(&msg), d);
    let at = Checkpoint::load(&dir).unwrap().position;
    assert!(at.epoch < 12, "{at:?}");
    let resumed = untimed(summary_of(&train(&["--resume", d, "-q"])));
    assert_eq!(resumed, reference);

    // SIGINT, no checkpoint directory: the rescue location, in the temporary directory.
    let rescue_root = tmp.path().join("tmp");
    std::fs::create_dir(&rescue_root).unwrap();
    let metrics = tmp.path().join("m.jsonl");
    let mut child = train_command(&with(
        &[&epochs[..], &["--metrics", metrics.to_str().unwrap()]].concat(),
    ))
    .env("TMPDIR", &rescue_root)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_until(&mut child, || {
        std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 1)
    });
    signal(&child, "INT");
    let out = child.wait_with_output().unwrap();
    let msg = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{msg}");
    assert!(out.stdout.is_empty(), "{msg}");
    let rescue = resume_dir(&msg);
    assert!(
        Path::new(&rescue).starts_with(&rescue_root)
            && Path::new(&rescue)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pnn-rescue-"),
        "{rescue}"
    );
    let resumed = untimed(summary_of(&train(&["--resume", &rescue, "-q"])));
    assert_eq!(resumed, reference);
}

/// Item 4: a learning rate that blows the weights up, or a device whose outputs are swamped by
/// noise, stops the run with exit code 7 and no summary, and the last good checkpoint stays.
#[test]
fn a_diverging_run_stops_with_its_own_exit_code_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    let out = train(&with(&[
        "--epochs",
        "2",
        "--lr",
        "1e30",
        "--checkpoint",
        d,
        "--checkpoint-every",
        "1",
    ]));
    let msg = stderr(&out);
    assert_eq!(out.status.code(), Some(7), "{msg}");
    assert!(out.stdout.is_empty(), "{msg}");
    assert!(
        msg.contains("diverged") && msg.contains("last good checkpoint"),
        "{msg}"
    );
    let kept = Checkpoint::load(&dir).unwrap();
    assert!(
        kept.layers.iter().flatten().all(|w| w.is_finite()),
        "the kept checkpoint holds non-finite weights"
    );
    assert!(
        kept.epoch_loss_sums.iter().all(|l| l.is_finite()),
        "{kept:?}"
    );

    let profile = tmp.path().join("loud.ron");
    std::fs::write(
        &profile,
        "(name: \"loud\", noise: (seed: 1, output_noise: 1e30))",
    )
    .unwrap();
    let backend = format!("sim:{}", profile.display());
    let out = train(&with(&["--epochs", "1", "--backend", &backend]));
    let msg = stderr(&out);
    assert_eq!(out.status.code(), Some(7), "{msg}");
    assert!(out.stdout.is_empty() && msg.contains("diverged"), "{msg}");
}

/// Item 3: `--save` to a directory, or to a place that cannot be written, is refused before the
/// run starts (exit 2, nothing trained), naming the path.
#[test]
fn an_unusable_save_path_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let under_file = blocker.join("m.safetensors");
    for bad in [
        tmp.path().to_str().unwrap(),
        "/proc/nope/m.safetensors",
        under_file.to_str().unwrap(),
    ] {
        let out = train(&with(&["--epochs", "1", "--save", bad, "--checkpoint", d]));
        let msg = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {msg}");
        assert!(
            msg.contains(bad),
            "{bad}: the message does not name it: {msg}"
        );
        assert!(!dir.exists(), "{bad}: the run started");
    }
}

/// Item 8: resume may change only the settings that leave the training's numbers alone; the
/// others are refused by name, and so is an --epochs below the saved run's.
#[test]
fn resume_refuses_settings_it_cannot_change_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    let first = untimed(summary_of(&train(&with(&[
        "--epochs",
        "2",
        "--checkpoint",
        d,
    ]))));
    for (flag, value) in [
        ("--lr", "0.5"),
        ("--batch-size", "64"),
        ("--directions", "2"),
        ("--limit-train", "1000"),
    ] {
        let out = train(&["--resume", d, flag, value, "-q"]);
        let msg = stderr(&out);
        assert_eq!(out.status.code(), Some(6), "{flag}: {msg}");
        let key = flag.trim_start_matches("--").replace('-', "_");
        assert!(
            msg.contains(&format!("{key} is ")) && msg.contains(value),
            "{flag}: {msg}"
        );
        assert!(msg.contains("Resume may change only epochs"), "{msg}");
    }
    let fewer = train(&["--resume", d, "--epochs", "1", "-q"]);
    let msg = stderr(&fewer);
    assert_eq!(fewer.status.code(), Some(6), "{msg}");
    assert!(
        msg.contains("--epochs 1") && msg.contains("2 epochs"),
        "{msg}"
    );
    // The saved values themselves, and the settings resume may change, are accepted.
    let same = untimed(summary_of(&train(&[
        "--resume", d, "--lr", "0.001", "--seed", "5", "-q",
    ])));
    assert_eq!(same, first);
    let more = summary_of(&train(&[
        "--resume",
        d,
        "--epochs",
        "3",
        "--limit-test",
        "200",
        "-q",
    ]));
    assert_eq!(
        (more["epochs"].as_u64(), more["test_samples"].as_u64()),
        (Some(3), Some(200))
    );
}

/// A copy of MNIST in a new data directory, its training labels (written raw) or its training
/// set replaced.
fn mnist_copy(root: &Path, train_labels: Option<Vec<u8>>, empty_train: bool) -> std::path::PathBuf {
    use std::io::Read;
    let src = common::data_dir().join("mnist");
    let dst = root.join("data");
    let mnist = dst.join("mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    for name in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        std::os::unix::fs::symlink(src.join(name), mnist.join(name)).unwrap();
    }
    if empty_train {
        let images = [
            &[0u8, 0, 8, 3][..],
            &0u32.to_be_bytes(),
            &28u32.to_be_bytes(),
            &28u32.to_be_bytes(),
        ]
        .concat();
        std::fs::write(mnist.join("train-images-idx3-ubyte"), images).unwrap();
        let labels = [&[0u8, 0, 8, 1][..], &0u32.to_be_bytes()].concat();
        std::fs::write(mnist.join("train-labels-idx1-ubyte"), labels).unwrap();
        return dst;
    }
    let name = "train-images-idx3-ubyte.gz";
    std::os::unix::fs::symlink(src.join(name), mnist.join(name)).unwrap();
    let mut labels = Vec::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(src.join("train-labels-idx1-ubyte.gz")).unwrap(),
    )
    .read_to_end(&mut labels)
    .unwrap();
    if let Some(replace) = train_labels {
        labels = replace;
    }
    std::fs::write(mnist.join("train-labels-idx1-ubyte"), labels).unwrap();
    dst
}

/// Item 9: a checkpoint records the training data's fingerprint; other data under the same name
/// (here one label changed) is refused.
#[test]
fn other_data_under_the_same_name_does_not_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    let d = dir.to_str().unwrap();
    summary_of(&train(&with(&["--epochs", "1", "--checkpoint", d])));
    let same = mnist_copy(tmp.path(), None, false);
    summary_of(&train(&[
        "--resume",
        d,
        "--epochs",
        "2",
        "--data-dir",
        same.to_str().unwrap(),
        "-q",
    ]));

    let other_root = tmp.path().join("other");
    let mut labels = {
        use std::io::Read;
        let mut v = Vec::new();
        let f = std::fs::File::open(common::data_dir().join("mnist/train-labels-idx1-ubyte.gz"))
            .unwrap();
        flate2::read::GzDecoder::new(f).read_to_end(&mut v).unwrap();
        v
    };
    labels[8 + 100] = (labels[8 + 100] + 1) % 10;
    let other = mnist_copy(&other_root, Some(labels), false);
    let out = train(&[
        "--resume",
        d,
        "--epochs",
        "3",
        "--data-dir",
        other.to_str().unwrap(),
        "-q",
    ]);
    let msg = stderr(&out);
    assert_eq!(out.status.code(), Some(6), "{msg}");
    assert!(msg.contains("the training data is 2048 samples"), "{msg}");
}

/// Item 7: training files that hold no samples are a data error (exit 3), not a model trained on
/// nothing.
#[test]
fn empty_training_files_are_a_data_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = mnist_copy(tmp.path(), None, true);
    let save = tmp.path().join("m.safetensors");
    let out = train(&[
        "--epochs",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
        "--save",
        save.to_str().unwrap(),
        "-q",
    ]);
    let msg = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{msg}");
    assert!(msg.contains("training files hold no samples"), "{msg}");
    assert!(!save.exists());
}
