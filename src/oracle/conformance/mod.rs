//! The conformance suite of the oracle contract, generic over [`ForwardOracle`] (as burn's
//! backend test suite is generic over the backend): every backend runs it in CI, and a firmware
//! author runs it against a board (`tests/serial_hardware.rs`, `--features hardware-tests`).
//!
//! - [`check_contract`] puts one oracle through the contract: a clean forward of the right shape
//!   (and deterministic, where [`Probe::deterministic`]); perturbed evaluations of the right
//!   shape that leave the layer bit-unchanged (parameters, layer state, clean forward); a seeded
//!   update equal to `firmware_protocol::direction::apply_update` on a host copy, bit for bit;
//!   layer state that round-trips; wrong shapes refused with [`OracleError::Shape`] or
//!   [`OracleError::Refused`], not a panic, leaving the layer usable; and, for a layer in this
//!   process ([`ForwardOracle::in_process`]), shortcuts that change no result.
//! - [`check_agreement`] holds two oracles of the same shape to each other within a
//!   [`Tolerance`]: clean forwards (both modes), perturbed pairs, parameters and forwards after
//!   the same updates, layer state.
//!
//! Both return a [`Report`] (every check by name: passed, skipped with the reason, or failed with
//! what differed) for the caller to assert on: `report.assert_passed()` or
//! `report.into_result()?`. A check that panics is a failure, not a crashed suite.

use std::fmt;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{
    Activations, DirectionSeed, ForwardOracle, ForwardOutput, LayerShape, OracleError,
    PerturbedPair, UpdateTerm,
};

mod agreement;
mod contract;

pub use agreement::check_agreement;
pub use contract::check_contract;

/// What the suite feeds an oracle.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    /// Rows of the input batch.
    pub rows: usize,
    /// Directions per perturbed evaluation.
    pub directions: usize,
    /// The perturbation's size.
    pub eps: f32,
    /// Seeds the parameters, the input and the directions.
    pub seed: u64,
    /// About four fifths of the input values zero (as MNIST's pixels are), which a simulator
    /// takes a sparse path for; else every value nonzero.
    pub sparse_input: bool,
    /// Repeating an evaluation gives the same bits (an ideal device). `false` for a device with
    /// noise drawn per evaluation: the checks that need it are skipped.
    pub deterministic: bool,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            rows: 5,
            directions: 3,
            eps: 1e-2,
            seed: 1,
            sparse_input: false,
            deterministic: true,
        }
    }
}

impl Probe {
    /// The parameters the suite programs: the model's initialisation for this shape.
    pub fn parameters(&self, spec: &LayerShape) -> Vec<f32> {
        crate::model::initialise(std::slice::from_ref(spec), 10, self.seed)
            .layers
            .remove(0)
    }

    /// The input batch: `rows` x the layer's input width, values in `[0, 1)`.
    pub fn input(&self, spec: &LayerShape) -> Activations {
        let width = spec.input_width();
        let data = (0..self.rows * width)
            .map(|i| {
                let h = splitmix(self.seed ^ 0x0069_6e70_7574 ^ (i as u64).wrapping_mul(0x9e37));
                let x = (h >> 40) as f32 / (1u64 << 24) as f32;
                if self.sparse_input && !h.is_multiple_of(5) {
                    0.0
                } else {
                    x
                }
            })
            .collect();
        Activations::new(self.rows, width, data)
    }

    /// The chunks evaluated: the first, a middle one and the last (which holds the bias of a
    /// dense layer) of the layer's chunking at about a third of its parameters.
    pub fn chunks(&self, spec: &LayerShape) -> Vec<Range<usize>> {
        let n = spec.param_count();
        let all: Vec<_> = spec.weight_chunks(n.div_ceil(3).max(1)).collect();
        let mut picked = vec![all[0].clone(), all[all.len() / 2].clone()];
        picked.push(all[all.len() - 1].clone());
        picked.dedup();
        picked
    }

    /// The seeds of the `directions` directions of chunk `k`.
    pub fn seeds(&self, k: usize) -> Vec<DirectionSeed> {
        (0..self.directions)
            .map(|p| DirectionSeed(splitmix(self.seed.wrapping_add(1000 * k as u64 + p as u64))))
            .collect()
    }

    /// Seeded terms of an update of chunk `k`.
    pub fn terms(&self, k: usize) -> Vec<UpdateTerm> {
        let derivatives = [0.5, -0.25, 1.5, -2.0];
        (self.seeds(k).into_iter().zip(derivatives.iter().cycle()))
            .map(|(seed, &derivative)| UpdateTerm { seed, derivative })
            .collect()
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How far two oracles' values may be apart: `|a - b| <= abs + rel * max(|a|, |b|)`.
/// [`Tolerance::EXACT`] asks for the same bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub abs: f32,
    pub rel: f32,
}

impl Tolerance {
    /// The same bits.
    pub const EXACT: Self = Self { abs: 0.0, rel: 0.0 };

    /// `None` where `a` and `b` agree; else the largest gap and where it is.
    fn disagreement(&self, a: &[f32], b: &[f32]) -> Option<String> {
        if a.len() != b.len() {
            return Some(format!("{} values against {}", a.len(), b.len()));
        }
        let mut worst: Option<(usize, f32)> = None;
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            let ok = if *self == Self::EXACT {
                x.to_bits() == y.to_bits()
            } else {
                (x - y).abs() <= self.abs + self.rel * x.abs().max(y.abs())
            };
            if !ok && worst.is_none_or(|(_, g)| (x - y).abs() > g || (x - y).is_nan()) {
                worst = Some((i, (x - y).abs()));
            }
        }
        worst.map(|(i, gap)| format!("value {i}: {} against {} (gap {gap:e})", a[i], b[i]))
    }
}

/// The largest `|a - b|` (for reports).
fn largest_gap(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// How one check ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Passed; what was measured, if anything worth saying.
    Passed(String),
    /// Not applicable to this oracle, and why (no parameter read-back, not deterministic...).
    Skipped(String),
    /// What went wrong.
    Failed(String),
}

/// One named check.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
}

/// Every check of one run of the suite, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// What was checked (a layer's shape, a pair of backends).
    pub subject: String,
    pub checks: Vec<Check>,
}

/// A report with at least one failed check.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConformanceError(pub Report);

impl Report {
    fn new(subject: String) -> Self {
        Self {
            subject,
            checks: Vec::new(),
        }
    }

    /// Runs one check, catching its panic as a failure.
    fn run(&mut self, name: &'static str, check: impl FnOnce() -> Result<String, Stop>) {
        let outcome = match catch_unwind(AssertUnwindSafe(check)) {
            Ok(Ok(note)) => Outcome::Passed(note),
            Ok(Err(Stop::Skip(why))) => Outcome::Skipped(why),
            Ok(Err(Stop::Fail(what))) => Outcome::Failed(what),
            Err(panic) => Outcome::Failed(format!("panicked: {}", panic_message(&panic))),
        };
        self.checks.push(Check { name, outcome });
    }

    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        (self.checks.iter()).filter(|c| matches!(c.outcome, Outcome::Failed(_)))
    }

    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// `Ok(self)` where every check passed or was skipped.
    pub fn into_result(self) -> Result<Self, ConformanceError> {
        if self.passed() {
            Ok(self)
        } else {
            Err(ConformanceError(self))
        }
    }

    /// Panics with the whole report where a check failed; prints it either way (for
    /// `--nocapture`).
    #[track_caller]
    pub fn assert_passed(&self) {
        eprintln!("{self}");
        assert!(self.passed(), "the oracle does not conform:\n{self}");
    }

    /// The outcome of the check `name`.
    pub fn outcome(&self, name: &str) -> Option<&Outcome> {
        (self.checks.iter())
            .find(|c| c.name == name)
            .map(|c| &c.outcome)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "conformance of {}:", self.subject)?;
        for c in &self.checks {
            let (mark, text) = match &c.outcome {
                Outcome::Passed(note) => ("ok  ", note),
                Outcome::Skipped(why) => ("skip", why),
                Outcome::Failed(what) => ("FAIL", what),
            };
            writeln!(
                f,
                "  {mark} {}{}{text}",
                c.name,
                if text.is_empty() { "" } else { ": " }
            )?;
        }
        Ok(())
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    (panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Why a check stopped before passing.
enum Stop {
    Skip(String),
    Fail(String),
}

impl From<OracleError> for Stop {
    fn from(e: OracleError) -> Self {
        Stop::Fail(format!("the oracle failed: {e}"))
    }
}

fn fail<T>(what: impl Into<String>) -> Result<T, Stop> {
    Err(Stop::Fail(what.into()))
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), Stop> {
    if ok { Ok(()) } else { fail(what()) }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `a` as rows x width, or what is wrong with it.
fn shaped(a: &Activations, rows: usize, width: usize, what: &str) -> Result<(), Stop> {
    ensure(
        a.rows == rows && a.width == width && a.data.len() == rows * width,
        || {
            format!(
                "{what}: {} rows of {} ({} values), expected {rows} rows of {width}",
                a.rows,
                a.width,
                a.data.len()
            )
        },
    )
}

fn check_output(spec: &LayerShape, rows: usize, out: &ForwardOutput) -> Result<(), Stop> {
    shaped(&out.features, rows, spec.feature_width(), "features")?;
    match &out.next {
        Some(next) => shaped(next, rows, spec.output_width(), "next-layer input"),
        None => ensure(spec.output_width() == spec.feature_width(), || {
            format!(
                "no next-layer input, though the layer's output ({}) is not its features ({})",
                spec.output_width(),
                spec.feature_width()
            )
        }),
    }
}

fn all_values(out: &ForwardOutput) -> Vec<f32> {
    let mut v = out.features.data.clone();
    if let Some(next) = &out.next {
        v.extend_from_slice(&next.data);
    }
    v
}

fn pair_values(pairs: &[PerturbedPair]) -> Vec<f32> {
    (pairs.iter())
        .flat_map(|(p, m)| p.data.iter().chain(&m.data).copied())
        .collect()
}

/// Parameters as read back, `None` where the oracle cannot read them back.
fn read_back<O: ForwardOracle + ?Sized>(o: &mut O) -> Result<Option<Vec<f32>>, Stop> {
    match o.read_parameters() {
        Ok(p) => Ok(Some(p)),
        Err(OracleError::Unsupported(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The layer's parameters equal `expected` bit for bit, by read-back and (in process) in place;
/// skipped where neither can be seen.
fn same_parameters<O: ForwardOracle + ?Sized>(
    o: &mut O,
    expected: &[f32],
    when: &str,
) -> Result<String, Stop> {
    let mut seen = false;
    if let Some(p) = read_back(o)? {
        ensure(bits(&p) == bits(expected), || {
            format!(
                "{when}, the parameters read back differ from the host's (largest gap {:e})",
                largest_gap(&p, expected)
            )
        })?;
        seen = true;
    }
    if let Some(layer) = o.in_process() {
        let p = layer.parameters();
        ensure(bits(p) == bits(expected), || {
            format!("{when}, the parameters in process differ from the host's")
        })?;
        seen = true;
    }
    if seen {
        Ok(String::new())
    } else {
        Err(Stop::Skip(
            "the parameters cannot be read back (no parameter read-back)".into(),
        ))
    }
}

/// `dense 784x50` or `conv 1x28x28 -> 4 channels`, for reports.
pub fn describe(spec: &LayerShape) -> String {
    match *spec {
        LayerShape::Dense { inputs, outputs } => format!("dense {inputs}x{outputs}"),
        LayerShape::Conv(g) => format!(
            "conv {}x{}x{} -> {} channels",
            g.in_channels, g.height, g.width, g.out_channels
        ),
    }
}
