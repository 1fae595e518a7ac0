//! `pnn-eval`: evaluate a saved model (`pnn-train --save`) on a backend; prints both prediction
//! modes, as JSON on the last stdout line.
//!
//! Exit codes: 0 success, 2 invalid arguments, model file or device profile, 3 data error, 4 backend or device
//! error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use pnn::backend::{self, BackendSpec};
use pnn::data::{Dataset, DatasetKind, resolve_data_dir};
use pnn::report::export::{SavedModel, evaluate_with_predictions};
use pnn::report::progress::{ProgressMode, init_tracing};

#[derive(Parser, Debug)]
#[command(
    name = "pnn-eval",
    version,
    about = "Evaluate a saved pnn model (safetensors) on a backend, in both prediction modes"
)]
struct Args {
    /// The model file written by `pnn-train --save`.
    #[arg(long)]
    model: PathBuf,
    /// Test set to evaluate on [default: the model's]; it must have the model's input shape and
    /// classes.
    #[arg(long)]
    dataset: Option<DatasetKind>,
    /// Where the layers execute.
    #[arg(long, default_value = "sim")]
    backend: BackendSpec,
    /// Data directory (else $PNN_DATA_DIR, ./data, ../shared/data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Evaluation batch size [default: the model's training batch size].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: Option<u64>,
    /// Evaluate on the first N test samples only.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    limit_test: Option<u64>,
    /// Write each sample's label and both predictions as CSV to this file.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Print nothing but the JSON result (errors still go to stderr).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(serde::Serialize)]
struct EvalSummary {
    model: String,
    dataset: String,
    backend: String,
    test_samples: usize,
    test_accuracy_cumulative: f64,
    test_accuracy_final_layer: f64,
    test_loss_cumulative: f64,
    test_loss_final_layer: f64,
    test_accuracy_per_layer: Vec<f64>,
    test_loss_per_layer: Vec<f64>,
    eval_seconds: f64,
    /// The digest `pnn-train` printed for these parameters.
    weights_sha256: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(if args.quiet {
        ProgressMode::Quiet
    } else {
        ProgressMode::Lines
    });
    let model = match SavedModel::load(&args.model) {
        Ok(m) => m,
        Err(e) => return fail(2, e),
    };
    let kind = args.dataset.unwrap_or(model.dataset);
    if kind.image_shape() != model.dataset.image_shape() || kind.classes() != model.classes {
        return fail(
            2,
            format!(
                "the model was trained on {} ({:?}, {} classes); {kind} is {:?} with {} classes",
                model.dataset,
                model.dataset.image_shape(),
                model.classes,
                kind.image_shape(),
                kind.classes()
            ),
        );
    }
    let mut test = match resolve_data_dir(args.data_dir.as_deref())
        .and_then(|dir| Dataset::load_test(kind, &dir))
    {
        Ok(d) => d,
        Err(e) => return fail(3, e),
    };
    if let Some(n) = args.limit_test {
        test.truncate(n as usize);
    }
    let mut oracles = match backend::open(&args.backend, &model.layer_specs()) {
        Ok(o) => o,
        Err(e) => return fail(e.exit_code(), e),
    };
    if let Err(e) = model.program(&mut oracles) {
        return fail(4, e);
    }
    let batch = args
        .batch_size
        .map_or(model.hyper.batch_size, |b| b as usize);
    let start = Instant::now();
    // The model's own normaliser: the statistics of the set it was trained on.
    let result = evaluate_with_predictions(
        &mut oracles,
        &model.projections(),
        &test,
        &model.normalizer,
        batch,
    );
    let (eval, predictions) = match result {
        Ok(r) => r,
        Err(e) => return fail(4, e),
    };
    if let Some(path) = &args.predictions
        && let Err(e) = std::fs::write(path, predictions.to_csv())
    {
        return fail(2, format!("cannot write {}: {e}", path.display()));
    }
    tracing::info!(
        "{} on {kind} ({} test samples, backend {}): accuracy cumulative {:.4}, final-layer {:.4}",
        args.model.display(),
        test.len(),
        args.backend,
        eval.accuracy_cumulative,
        eval.accuracy_final_layer
    );
    let summary = EvalSummary {
        model: args.model.display().to_string(),
        dataset: kind.name().into(),
        backend: args.backend.to_string(),
        test_samples: test.len(),
        test_accuracy_cumulative: eval.accuracy_cumulative,
        test_accuracy_final_layer: eval.accuracy_final_layer,
        test_loss_cumulative: eval.loss_cumulative,
        test_loss_final_layer: eval.loss_final_layer,
        test_accuracy_per_layer: eval.accuracy_per_layer,
        test_loss_per_layer: eval.loss_per_layer,
        eval_seconds: start.elapsed().as_secs_f64(),
        weights_sha256: model.weights_sha256(),
    };
    println!("{}", serde_json::to_string(&summary).expect("serialises"));
    ExitCode::SUCCESS
}

fn fail(code: u8, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}
