//! What a run reports: one record per epoch (the `--metrics` JSONL) and the closing summary.

use crate::train::Evaluation;

/// One line of the `--metrics` file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: u32,
    pub train_seconds: f64,
    pub eval_seconds: f64,
    /// Mean over the epoch's batches of each layer's local loss (clean pass, before the M update).
    pub train_local_loss: Vec<f64>,
    pub test_accuracy_cumulative: f64,
    pub test_accuracy_final_layer: f64,
    pub test_loss_cumulative: f64,
    pub test_loss_final_layer: f64,
    pub test_accuracy_per_layer: Vec<f64>,
    pub test_loss_per_layer: Vec<f64>,
    /// Oracle forward evaluations for training, cumulative since the start of the run.
    pub oracle_evaluations: u64,
    /// Each layer's busy time (its device's requests and the host's arithmetic for it) over the
    /// epoch's training wall time: on the sequential schedule they add up to about 1, on the
    /// pipelined one each layer's device can approach 1. Timing, not state: in the metrics file
    /// ([`EpochMetrics::to_json_line`]), not in checkpoints (whose format it would change).
    #[serde(skip)]
    pub layer_utilisation: Option<Vec<f64>>,
    /// Each layer's link traffic this epoch (training and evaluation), `[up, down]` bytes, where
    /// every layer is behind a link. In the metrics file only, as `layer_utilisation`.
    #[serde(skip)]
    pub layer_wire_bytes: Option<Vec<[u64; 2]>>,
    /// `--eps auto`: each layer's eps at the epoch's end. Not part of this type's serde form
    /// (a checkpoint's postcard layout of it is fixed): the metrics file adds it as the key `eps`
    /// ([`EpochMetrics::to_json_line`]), a checkpoint carries it in its options' state.
    #[serde(skip)]
    pub eps: Option<Vec<f32>>,
}

impl EpochMetrics {
    pub fn new(
        epoch: u32,
        train_seconds: f64,
        eval_seconds: f64,
        train_local_loss: Vec<f64>,
        eval: &Evaluation,
        oracle_evaluations: u64,
    ) -> Self {
        Self {
            epoch,
            train_seconds,
            eval_seconds,
            train_local_loss,
            test_accuracy_cumulative: eval.accuracy_cumulative,
            test_accuracy_final_layer: eval.accuracy_final_layer,
            test_loss_cumulative: eval.loss_cumulative,
            test_loss_final_layer: eval.loss_final_layer,
            test_accuracy_per_layer: eval.accuracy_per_layer.clone(),
            test_loss_per_layer: eval.loss_per_layer.clone(),
            oracle_evaluations,
            layer_utilisation: None,
            layer_wire_bytes: None,
            eps: None,
        }
    }

    /// One line of a metrics file (JSON): every field, the link figures included where there
    /// are some.
    pub fn to_json_line(&self) -> String {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            #[serde(flatten)]
            metrics: &'a EpochMetrics,
            #[serde(skip_serializing_if = "Option::is_none")]
            layer_utilisation: &'a Option<Vec<f64>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            layer_wire_bytes: &'a Option<Vec<[u64; 2]>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            eps: &'a Option<Vec<f32>>,
        }
        serde_json::to_string(&Line {
            metrics: self,
            layer_utilisation: &self.layer_utilisation,
            layer_wire_bytes: &self.layer_wire_bytes,
            eps: &self.eps,
        })
        .expect("metrics serialise")
    }
}

/// The JSON object `pnn-train` prints as its last line on stdout.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSummary {
    pub dataset: String,
    pub backend: String,
    pub arch: String,
    pub hidden: Vec<usize>,
    pub epochs: u32,
    pub batch_size: usize,
    pub lr: f32,
    pub eps: f32,
    pub directions: usize,
    pub chunk_max: usize,
    pub seed: u64,
    pub train_samples: usize,
    pub test_samples: usize,
    pub mf_parameters: usize,
    pub test_accuracy_cumulative: f64,
    pub test_accuracy_final_layer: f64,
    pub test_loss_cumulative: f64,
    pub test_loss_final_layer: f64,
    pub test_accuracy_per_layer: Vec<f64>,
    /// Seconds spent in training steps (evaluation excluded), all epochs.
    pub train_seconds: f64,
    pub seconds_per_epoch: f64,
    pub oracle_evaluations: u64,
    /// SHA-256 of all final parameters (see `Trainer::weights_sha256`).
    pub weights_sha256: String,
    /// Bytes sent to the device(s), all framing included (backends with a link only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes_up: Option<u64>,
    /// Bytes received from the device(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_bytes_down: Option<u64>,
    /// Request/reply exchanges with the device(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_trips: Option<u64>,
    /// Requests sent again (after silence, a damaged reply or the device's NAK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u64>,
    /// Damaged frames dropped, after which the host resynchronised at the next delimiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resyncs: Option<u64>,
    /// Devices re-programmed from the shadow after a reset (`pnn::run::recovery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprograms: Option<u64>,
}
