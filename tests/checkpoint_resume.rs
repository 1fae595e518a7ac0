//! Checkpoints and exact resume (issue 7): a `pnn-train --checkpoint` process killed with SIGKILL
//! at a random point and resumed ends with the weights, summary (timings aside) and metrics file
//! of an uninterrupted run, for an MLP and for a CNN (whose BatchNorm running statistics live
//! outside the shadow); a run cut short by a failing layer saves its last batch boundary; a
//! damaged checkpoint, or one of another run, is refused at the command line with exit code 6.
//!
//! The kill point is random: a delay after the first mid-run checkpoint, drawn from
//! `PNN_KILL_SEED` if set, else from the clock, and printed so that a failure can be replayed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use pnn::data::{Dataset, DatasetKind, resolve_data_dir};
use pnn::model::{ArchKind, ModelSpec};
use pnn::oracle::{
    Activations, DeviceLink, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, LayerShape,
    LinkCounters, OracleError, PerturbedPair, UpdateTerm,
};
use pnn::report::observe::NoObserver;
use pnn::run::checkpoint::{Checkpoint, Position};
use pnn::run::{RunConfig, RunError, run, run_with};
use serde_json::Value;

use common::{train_command, train_output as train};

fn summary_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "pnn-train failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    common::summary(&String::from_utf8_lossy(&out.stdout))
}

/// A summary or metrics record without its timings.
fn untimed(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    for key in [
        "train_seconds",
        "seconds_per_epoch",
        "eval_seconds",
        "backend",
    ] {
        o.remove(key);
    }
    v
}

fn metrics_file(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| untimed(serde_json::from_str(l).unwrap()))
        .collect()
}

/// A small xorshift, so that the kill points need no extra crate.
struct Draw(u64);

impl Draw {
    fn new() -> Self {
        let seed = std::env::var("PNN_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("kill points drawn from PNN_KILL_SEED={seed}");
        Self(seed | 1)
    }

    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Waits until the checkpoint in `dir` is past `after`, or the child is gone.
fn wait_for_checkpoint(dir: &Path, after: Position, child: &mut std::process::Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(c) = Checkpoint::load(dir)
            && (c.position.epoch, c.position.batch) > (after.epoch, after.batch)
        {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("no checkpoint progress in {}", dir.display());
}

/// Starts `args`, kills it with SIGKILL a random time after its first mid-run checkpoint (the
/// time drawn within what the reference run `span` leaves of the run), and says whether it was
/// killed (it may have finished first).
fn start_and_kill(args: &[&str], dir: &Path, span: Duration, scale: f64, draw: &mut Draw) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let started = Instant::now();
    let mut child = train_command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Checkpoint::load(dir)
        .map(|c| c.position)
        .unwrap_or(Position { epoch: 0, batch: 0 });
    if wait_for_checkpoint(dir, start, &mut child) {
        let left = span.saturating_sub(started.elapsed());
        let delay = left.mul_f64(scale * draw.unit());
        std::thread::sleep(delay);
        let _ = child.kill();
        eprintln!("SIGKILL {delay:?} after the first checkpoint");
    }
    let status = child.wait().unwrap();
    let killed = status.signal() == Some(9);
    if killed {
        let at = Checkpoint::load(dir).unwrap().position;
        eprintln!(
            "  killed; resumes at epoch {}, batch {}",
            at.epoch + 1,
            at.batch
        );
    } else {
        assert!(status.success(), "{status:?}");
    }
    killed
}

/// Runs `args` uninterrupted, then with checkpoints and `kills` SIGKILLs, resuming after each;
/// the ends must agree but for timings.
fn killed_runs_end_as_an_uninterrupted_one(args: &[&str], kills: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let (reference_metrics, metrics) = (tmp.path().join("ref.jsonl"), tmp.path().join("m.jsonl"));
    let dir = tmp.path().join("ckpt");
    let (ref_m, m, d) = (
        reference_metrics.to_str().unwrap(),
        metrics.to_str().unwrap(),
        dir.to_str().unwrap(),
    );
    let t0 = Instant::now();
    let reference = summary_of(&train(&[args, &["--metrics", ref_m]].concat()));
    let span = t0.elapsed();
    let mut draw = Draw::new();
    let first = [
        args,
        &["--metrics", m, "--checkpoint", d, "--checkpoint-every", "2"],
    ]
    .concat();
    // The first kill must land: a run that finished first is started over, with shorter delays.
    let mut scale = 0.9;
    while !start_and_kill(&first, &dir, span, scale, &mut draw) {
        scale /= 2.0;
        assert!(scale > 0.05, "the run always finished before the kill");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let mut killed = 1;
    // Resume with the saved settings alone, and kill again.
    for _ in 1..kills {
        killed += start_and_kill(&["--resume", d], &dir, span, 0.5, &mut draw) as usize;
    }
    let resumed = summary_of(&train(&["--resume", d]));
    eprintln!(
        "{killed} of {kills} runs killed mid-run; reference {}",
        reference["weights_sha256"]
    );
    assert_eq!(untimed(resumed), untimed(reference));
    assert_eq!(metrics_file(&metrics), metrics_file(&reference_metrics));
}

#[test]
fn a_killed_mlp_run_resumes_bit_identically() {
    killed_runs_end_as_an_uninterrupted_one(
        &[
            "--dataset",
            "mnist",
            "--epochs",
            "3",
            "--limit-train",
            "8192",
            "--limit-test",
            "2000",
            "--seed",
            "11",
        ],
        2,
    );
}

#[test]
fn a_killed_run_with_adam_and_forward_differences_resumes_bit_identically() {
    // Adam's moments live on the host and travel in the checkpoint (issue 15).
    killed_runs_end_as_an_uninterrupted_one(
        &[
            "--dataset",
            "mnist",
            "--epochs",
            "2",
            "--limit-train",
            "8192",
            "--limit-test",
            "2000",
            "--seed",
            "11",
            "--optimizer",
            "adam",
            "--difference",
            "forward",
        ],
        2,
    );
}

#[test]
fn a_killed_momentum_run_resumes_bit_identically() {
    killed_runs_end_as_an_uninterrupted_one(
        &[
            "--dataset",
            "mnist",
            "--epochs",
            "2",
            "--limit-train",
            "8192",
            "--limit-test",
            "2000",
            "--seed",
            "11",
            "--optimizer",
            "momentum",
        ],
        1,
    );
}

#[test]
fn a_killed_cnn_run_resumes_bit_identically() {
    killed_runs_end_as_an_uninterrupted_one(
        &[
            "--dataset",
            "mnist",
            "--arch",
            "cnn",
            "--channels",
            "6,6",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--limit-train",
            "1536",
            "--limit-test",
            "1000",
            "--seed",
            "4",
        ],
        1,
    );
}

/// A layer that stops answering after `budget` oracle calls, as an unplugged device does. It
/// reports a session, so the run takes a snapshot before every step.
struct Unplugged<O> {
    inner: O,
    budget: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<O: ForwardOracle> Unplugged<O> {
    fn spend(&mut self) -> Result<(), OracleError> {
        match self.budget.get() {
            0 => Err(OracleError::Link(
                "the device closed the link (unplugged)".into(),
            )),
            n => {
                self.budget.set(n - 1);
                Ok(())
            }
        }
    }
}

impl<O: ForwardOracle> ForwardOracle for Unplugged<O> {
    fn spec(&self) -> &LayerShape {
        self.inner.spec()
    }
    fn write_parameters(&mut self, params: &[f32]) -> Result<(), OracleError> {
        self.inner.write_parameters(params)
    }
    fn load_input(&mut self, input: &Activations) -> Result<(), OracleError> {
        self.spend()?;
        self.inner.load_input(input)
    }
    fn forward(&mut self, mode: ForwardMode) -> Result<ForwardOutput, OracleError> {
        self.spend()?;
        self.inner.forward(mode)
    }
    fn evaluate_perturbed(
        &mut self,
        chunk: std::ops::Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut Vec<PerturbedPair>,
    ) -> Result<(), OracleError> {
        self.spend()?;
        self.inner.evaluate_perturbed(chunk, seeds, eps, out)
    }
    fn apply_update(
        &mut self,
        chunk: std::ops::Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
    ) -> Result<(), OracleError> {
        self.spend()?;
        self.inner.apply_update(chunk, scale, terms)
    }
    fn read_parameters(&mut self) -> Result<Vec<f32>, OracleError> {
        self.inner.read_parameters()
    }
    fn read_layer_state(&mut self) -> Result<Option<Vec<f32>>, OracleError> {
        self.inner.read_layer_state()
    }
    fn write_layer_state(&mut self, state: &[f32]) -> Result<(), OracleError> {
        self.inner.write_layer_state(state)
    }
    fn link(&self) -> Option<&dyn DeviceLink> {
        Some(self)
    }
    fn link_mut(&mut self) -> Option<&mut dyn DeviceLink> {
        Some(self)
    }
}

impl<O: ForwardOracle> DeviceLink for Unplugged<O> {
    fn counters(&self) -> LinkCounters {
        LinkCounters::default()
    }
    fn session(&mut self) -> Result<u64, OracleError> {
        self.spend()?;
        Ok(1)
    }
}

fn cnn_config() -> RunConfig {
    let mut config = RunConfig::new(DatasetKind::Mnist);
    config.arch = ArchKind::Cnn;
    config.hidden = Some(vec![6, 6]);
    config.epochs = 2;
    config.hyper.batch_size = 64;
    config.hyper.seed = 2;
    config.limit_train = Some(1024);
    config.limit_test = Some(1000);
    config
}

/// Everything but timings, the backend's name and link counters (the cut run's fake device
/// reported a session, so its resumption carries that link's counters, all zero).
fn core(s: &pnn::report::metrics::RunSummary) -> Value {
    let mut v = untimed(serde_json::to_value(s).unwrap());
    let o = v.as_object_mut().unwrap();
    for key in [
        "wire_bytes_up",
        "wire_bytes_down",
        "round_trips",
        "retries",
        "resyncs",
        "reprograms",
    ] {
        o.remove(key);
    }
    v
}

#[test]
fn a_cnn_cut_short_mid_epoch_saves_its_last_batch_and_resumes_bit_identically() {
    let config = cnn_config();
    let reference = run(&config, NoObserver).unwrap_or_else(|e| {
        panic!("{e} (MNIST is looked up via PNN_DATA_DIR, ./data, ../shared/data)")
    });

    // The same run on layers that stop answering in the second epoch, mid-batch.
    let dir = tempfile::tempdir().unwrap();
    let mut cut = config.clone();
    cut.checkpoint = Some(dir.path().to_path_buf());
    cut.checkpoint_every = Some(5);
    let model = ModelSpec::new(
        config.dataset,
        config.arch,
        config.hidden.clone(),
        config.proj_dim,
        config.hyper.seed,
    )
    .unwrap();
    let mut data = Dataset::load(config.dataset, &resolve_data_dir(None).unwrap()).unwrap();
    data.train.truncate(1024);
    data.test.truncate(1000);
    let budget = std::rc::Rc::new(std::cell::Cell::new(0));
    let oracles: Vec<_> = pnn::backend::sim::SimOracle::for_layers(&model.layer_specs())
        .into_iter()
        .map(|inner| Unplugged {
            inner,
            budget: budget.clone(),
        })
        .collect();
    // Calls: 2 sessions at the start; per training batch 2 layers x (load, perturb, update,
    // forward) and 2 session checks; per test batch 2 x (load, forward) and 2 checks. An epoch
    // is 16 training and 16 test batches: 256 calls. The budget ends in batch 8 of epoch 2.
    budget.set(2 + 256 + 7 * 10 + 5);
    let err = run_with(&cut, &data, &model, oracles, NoObserver).unwrap_err();
    let RunError::Interrupted {
        dir: saved,
        position,
        ..
    } = &err
    else {
        panic!("expected an interrupted run, got {err}");
    };
    assert_eq!(saved, dir.path());
    assert!(
        err.to_string()
            .contains(&format!("pnn-train --resume {}", dir.path().display()))
    );
    let checkpoint = Checkpoint::load(dir.path()).unwrap();
    assert_eq!(checkpoint.position, *position);
    eprintln!(
        "cut short at epoch {}, batch {}",
        position.epoch + 1,
        position.batch
    );
    assert_eq!(position.epoch, 1, "the cut falls in the second epoch");
    assert!(
        position.batch % 5 != 0,
        "saved at the failure, not at a periodic checkpoint"
    );
    let stats = checkpoint.layer_state.iter().flatten().count();
    assert_eq!(stats, 2, "both blocks' BatchNorm statistics are saved");

    // Resumed on fresh (simulated) layers: the same ending.
    let mut resume = config.clone();
    resume.resume = Some(dir.path().to_path_buf());
    let resumed = run(&resume, NoObserver).unwrap();
    assert_eq!(core(&resumed), core(&reference));

    // Without the BatchNorm statistics the weights still agree (training uses batch statistics)
    // but the evaluation does not: the statistics are what made the resume exact.
    let mut forgetful = checkpoint.clone();
    forgetful.layer_state = vec![None, None];
    let other = tempfile::tempdir().unwrap();
    forgetful.save(other.path()).unwrap();
    resume.resume = Some(other.path().to_path_buf());
    let without = run(&resume, NoObserver).unwrap();
    assert_eq!(without.weights_sha256, reference.weights_sha256);
    assert_ne!(
        (without.test_loss_cumulative, without.test_loss_final_layer),
        (
            reference.test_loss_cumulative,
            reference.test_loss_final_layer
        )
    );
}

fn refused(args: &[&str]) -> String {
    let out = train(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(6), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "no summary: {stderr}");
    stderr
}

#[test]
fn damaged_missing_and_foreign_checkpoints_are_refused_at_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    let d = dir.to_str().unwrap();
    let run = [
        "--dataset",
        "mnist",
        "--hidden",
        "20,20",
        "--epochs",
        "1",
        "--limit-train",
        "512",
        "--limit-test",
        "100",
        "--quiet",
    ];
    summary_of(&train(&[&run[..], &["--checkpoint", d]].concat()));
    let path: PathBuf = Checkpoint::path_in(&dir);
    let good = std::fs::read(&path).unwrap();

    // Cut at a sample of bytes (every byte is covered by the unit test of the format).
    let n = good.len();
    for cut in [0, 1, 7, 8, 15, 16, 47, 48, 49, n / 3, n / 2, n - 2, n - 1] {
        std::fs::write(&path, &good[..cut]).unwrap();
        let msg = refused(&["--resume", d]);
        assert!(
            msg.contains("is not a pnn checkpoint"),
            "cut at {cut}: {msg}"
        );
    }
    let mut flipped = good.clone();
    flipped[n / 2] ^= 0x04;
    std::fs::write(&path, &flipped).unwrap();
    let msg = refused(&["--resume", d]);
    assert!(msg.contains("digest mismatch"), "{msg}");

    // Another model, another dataset: each difference named.
    std::fs::write(&path, &good).unwrap();
    let msg = refused(&["--resume", d, "--hidden", "30,20"]);
    assert!(
        msg.contains("hidden is [20, 20] in the checkpoint but [30, 20] now"),
        "{msg}"
    );
    let msg = refused(&["--resume", d, "--dataset", "fashion-mnist"]);
    assert!(
        msg.contains("dataset is mnist in the checkpoint but fashion-mnist now"),
        "{msg}"
    );
    let msg = refused(&["--resume", d, "--seed", "9"]);
    assert!(
        msg.contains("seed is 0 in the checkpoint but 9 now"),
        "{msg}"
    );

    // Nothing there at all.
    let empty = tmp.path().join("empty");
    let msg = refused(&["--resume", empty.to_str().unwrap()]);
    assert!(msg.contains("checkpoint.pnn"), "{msg}");

    // The intact checkpoint still resumes (the run was complete: the same summary again).
    let again = summary_of(&train(&["--resume", d, "--quiet"]));
    assert_eq!(again["epochs"], 1);
}

/// A checkpoint written by the version before the settings were serialised by serde (its
/// settings are the hand-written RON of the old `to_ron`): `pnn-train` 1da1356 ran
/// `--hidden 8,8 --limit-train 600 --limit-test 300 --batch-size 100 --max-batches 4 --epochs 1
/// --checkpoint DIR`. Resumed for a second epoch, it ends as an uninterrupted two-epoch run does
/// (weights `8b6678a6…` with that version, here).
#[test]
fn a_checkpoint_of_the_previous_format_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    std::fs::create_dir(&dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/checkpoint-previous-format/checkpoint.pnn");
    std::fs::copy(&fixture, dir.join("checkpoint.pnn")).unwrap();
    let dir = dir.to_str().unwrap();
    // --checkpoint: the saved settings name the directory the fixture was written in.
    let out = train(&["-q", "--resume", dir, "--checkpoint", dir, "--epochs", "2"]);
    let resumed = untimed(summary_of(&out));
    let whole = untimed(summary_of(&train(&[
        "-q",
        "--hidden",
        "8,8",
        "--limit-train",
        "600",
        "--limit-test",
        "300",
        "--batch-size",
        "100",
        "--max-batches",
        "4",
        "--epochs",
        "2",
    ])));
    assert_eq!(resumed, whole);
    assert_eq!(resumed["hidden"], serde_json::json!([8, 8]));
}
