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

use firmware_protocol::direction::apply_update;

use super::{
    Activations, DirectionSeed, ForwardMode, ForwardOracle, ForwardOutput, LayerShape, OracleError,
    PerturbedColumns, PerturbedPair, UpdateTerm,
};
use crate::train::chunking::weight_chunks;

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
        let all = weight_chunks(&spec.chunk_units(), n, n.div_ceil(3).max(1));
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

/// Puts one oracle through the contract (see the module docs). The oracle is left programmed
/// with [`Probe::parameters`] and loaded with [`Probe::input`].
pub fn check_contract<O: ForwardOracle + ?Sized>(oracle: &mut O, probe: &Probe) -> Report {
    let spec = *oracle.spec();
    let mut report = Report::new(describe(&spec));
    let params = probe.parameters(&spec);
    let input = probe.input(&spec);
    let chunks = probe.chunks(&spec);
    let rows = probe.rows;
    let mut clean: Option<ForwardOutput> = None;

    report.run("describes a consistent shape", || {
        ensure(
            params.len() == spec.param_count()
                && spec.input_width() > 0
                && spec.feature_width() > 0
                && spec.output_width() > 0,
            || format!("{spec:?} has an empty side"),
        )?;
        Ok(format!("{} parameters", spec.param_count()))
    });
    report.run("programs its parameters", || {
        oracle.write_parameters(&params)?;
        same_parameters(oracle, &params, "after programming")
    });
    report.run("runs a clean forward of the right shape", || {
        oracle.load_input(&input)?;
        let out = oracle.forward(ForwardMode::Eval)?;
        check_output(&spec, rows, &out)?;
        ensure(all_values(&out).iter().all(|x| x.is_finite()), || {
            "a clean forward gave a value that is not finite".into()
        })?;
        clean = Some(out);
        Ok(String::new())
    });
    let Some(clean) = clean else {
        return report; // Nothing below can be judged without a clean forward.
    };
    report.run("gives the same clean forward again", || {
        if !probe.deterministic {
            return Err(Stop::Skip("the probe expects noise".into()));
        }
        let again = oracle.forward(ForwardMode::Eval)?;
        ensure(
            bits(&all_values(&again)) == bits(&all_values(&clean)),
            || "two clean forwards of the same input differ".into(),
        )?;
        Ok(String::new())
    });
    let state_before = oracle.read_layer_state();
    let mut evaluated: Vec<Vec<PerturbedPair>> = Vec::new();
    report.run("evaluates perturbed pairs of the right shape", || {
        let mut moved = false;
        for (k, chunk) in chunks.iter().enumerate() {
            let mut pairs = Vec::new();
            oracle.evaluate_perturbed(chunk.clone(), &probe.seeds(k), probe.eps, &mut pairs)?;
            ensure(pairs.len() == probe.directions, || {
                format!("{} pairs for {} seeds", pairs.len(), probe.directions)
            })?;
            for (plus, minus) in &pairs {
                shaped(plus, rows, spec.feature_width(), "a+")?;
                shaped(minus, rows, spec.feature_width(), "a-")?;
                moved |= bits(&plus.data) != bits(&minus.data);
            }
            ensure(pair_values(&pairs).iter().all(|x| x.is_finite()), || {
                format!("chunk {chunk:?}: a perturbed value is not finite")
            })?;
            evaluated.push(pairs);
        }
        ensure(moved, || {
            "no perturbation changed any feature (is eps applied?)".into()
        })?;
        Ok(format!("chunks {chunks:?}"))
    });
    report.run("gives the same perturbed pairs again", || {
        if !probe.deterministic {
            return Err(Stop::Skip("the probe expects noise".into()));
        }
        for (k, (chunk, first)) in chunks.iter().zip(&evaluated).enumerate() {
            let mut pairs = Vec::new();
            oracle.evaluate_perturbed(chunk.clone(), &probe.seeds(k), probe.eps, &mut pairs)?;
            ensure(
                bits(&pair_values(&pairs)) == bits(&pair_values(first)),
                || format!("chunk {chunk:?}: two evaluations of the same seeds differ"),
            )?;
        }
        Ok(String::new())
    });
    report.run("leaves no trace of perturbed evaluations", || {
        let mut said =
            same_parameters(oracle, &params, "after perturbed evaluations").or_else(|stop| {
                match stop {
                    Stop::Skip(why) => Ok(format!("parameters not checked: {why}")),
                    fail => Err(fail),
                }
            })?;
        let state_after = oracle.read_layer_state()?;
        if let Ok(before) = &state_before {
            let same = match (before, &state_after) {
                (Some(a), Some(b)) => bits(a) == bits(b),
                (None, None) => true,
                _ => false,
            };
            ensure(same, || {
                "the layer state changed under perturbed evaluations".into()
            })?;
        }
        if probe.deterministic {
            let again = oracle.forward(ForwardMode::Eval)?;
            ensure(
                bits(&all_values(&again)) == bits(&all_values(&clean)),
                || "the clean forward changed after perturbed evaluations".into(),
            )?;
        } else {
            said.push_str(" (clean forward not compared: the probe expects noise)");
        }
        Ok(said.trim().to_string())
    });
    if oracle.in_process().is_some() {
        report.run("takes in-process shortcuts that change no result", || {
            in_process_shortcuts(oracle, probe, &chunks, &evaluated, &clean)
        });
    }
    report.run(
        "applies a seeded update as the protocol's arithmetic does",
        || {
            let mut host = params.clone();
            for (k, chunk) in chunks.iter().enumerate() {
                let terms = probe.terms(k);
                let scale = 1e-2 * chunk.len() as f32 / terms.len() as f32;
                oracle.apply_update(chunk.clone(), scale, &terms)?;
                let n = chunk.len();
                let (mut v, mut g) = (vec![0.0; n], vec![0.0; n]);
                apply_update(&mut host[chunk.clone()], scale, &terms, &mut v, &mut g);
            }
            ensure(bits(&host) != bits(&params), || {
                "the updates changed nothing on the host (a vacuous check)".into()
            })?;
            let said = same_parameters(oracle, &host, "after seeded updates");
            // Back to the parameters the rest of the suite assumes.
            oracle.write_parameters(&params)?;
            said
        },
    );
    report.run("keeps its layer state and restores it", || {
        let Some(state) = oracle.read_layer_state()? else {
            oracle.write_layer_state(&[])?;
            return Err(Stop::Skip(
                "no layer state the host can read (none kept, or kept on the device)".into(),
            ));
        };
        oracle.forward(ForwardMode::Train)?; // may move running statistics
        oracle.write_layer_state(&state)?;
        let back = oracle.read_layer_state()?;
        ensure(back.as_deref().map(bits) == Some(bits(&state)), || {
            "the layer state read back is not the state written".into()
        })?;
        Ok(format!("{} values", state.len()))
    });
    report.run("refuses wrong shapes without panicking", || {
        refuses_wrong_shapes(oracle, probe, &params, &input, &clean)
    });
    report
}

/// Touched-columns evaluation equals the touched columns of the full one, prefetching changes
/// nothing, and the parameters in process are those read back.
fn in_process_shortcuts<O: ForwardOracle + ?Sized>(
    oracle: &mut O,
    probe: &Probe,
    chunks: &[Range<usize>],
    evaluated: &[Vec<PerturbedPair>],
    clean: &ForwardOutput,
) -> Result<String, Stop> {
    let spec = *oracle.spec();
    let mut given = 0;
    for (k, (chunk, full)) in chunks.iter().zip(evaluated).enumerate() {
        let seeds = probe.seeds(k);
        let layer = oracle.in_process().expect("checked by the caller");
        let mut columns = PerturbedColumns::default();
        if !layer.evaluate_perturbed_columns(chunk.clone(), &seeds, probe.eps, &mut columns)? {
            continue;
        }
        given += 1;
        let touched = spec.touched_features(chunk);
        ensure(columns.touched == touched, || {
            format!(
                "chunk {chunk:?}: touched columns {:?}, the shape says {touched:?}",
                columns.touched
            )
        })?;
        ensure(
            bits(&columns.clean.data) == bits(&clean.features.data),
            || format!("chunk {chunk:?}: the clean features given differ from a clean forward"),
        )?;
        ensure(columns.pairs.len() == full.len(), || {
            format!("chunk {chunk:?}: {} pairs of columns", columns.pairs.len())
        })?;
        for ((cp, cm), (p, m)) in columns.pairs.iter().zip(full) {
            for (c, a) in [(cp, p), (cm, m)] {
                shaped(c, probe.rows, touched.len(), "touched columns")?;
                let cut: Vec<f32> = (a.data.chunks_exact(a.width))
                    .flat_map(|row| row[touched.clone()].iter().copied())
                    .collect();
                ensure(bits(&c.data) == bits(&cut), || {
                    format!(
                        "chunk {chunk:?}: the touched columns differ from the full evaluation's"
                    )
                })?;
            }
        }
    }
    for (k, (chunk, full)) in chunks.iter().zip(evaluated).enumerate() {
        let seeds = probe.seeds(k);
        let layer = oracle.in_process().expect("checked by the caller");
        layer.prefetch_directions(chunk.clone(), &seeds);
        let mut pairs = Vec::new();
        oracle.evaluate_perturbed(chunk.clone(), &seeds, probe.eps, &mut pairs)?;
        ensure(
            bits(&pair_values(&pairs)) == bits(&pair_values(full)),
            || format!("chunk {chunk:?}: a prefetched evaluation differs"),
        )?;
    }
    let read = read_back(oracle)?;
    let layer = oracle.in_process().expect("checked by the caller");
    if let Some(read) = read {
        ensure(bits(layer.parameters()) == bits(&read), || {
            "the parameters in process differ from those read back".into()
        })?;
    }
    Ok(format!(
        "{given} of {} chunks by touched columns",
        chunks.len()
    ))
}

fn refused(what: &str, result: Result<(), OracleError>) -> Result<(), Stop> {
    match result {
        Err(OracleError::Shape(_) | OracleError::Refused(_)) => Ok(()),
        Err(e) => fail(format!(
            "{what}: refused, but as {e:?}, not Shape or Refused"
        )),
        Ok(()) => fail(format!("{what}: accepted")),
    }
}

fn refuses_wrong_shapes<O: ForwardOracle + ?Sized>(
    oracle: &mut O,
    probe: &Probe,
    params: &[f32],
    input: &Activations,
    clean: &ForwardOutput,
) -> Result<String, Stop> {
    let spec = *oracle.spec();
    let n = spec.param_count();
    let mut too_many = params.to_vec();
    too_many.push(0.0);
    refused("a parameter too many", oracle.write_parameters(&too_many))?;
    refused(
        "a parameter too few",
        oracle.write_parameters(&params[..n - 1]),
    )?;
    let width = spec.input_width() + 1;
    let wide = Activations::new(probe.rows, width, vec![0.5; probe.rows * width]);
    refused("an input one value too wide", oracle.load_input(&wide))?;
    let mut pairs = Vec::new();
    let seeds = probe.seeds(0);
    refused(
        "a chunk past the parameters",
        oracle.evaluate_perturbed(n..n + 1, &seeds, probe.eps, &mut pairs),
    )?;
    refused(
        "a chunk reaching past the parameters",
        oracle.evaluate_perturbed(0..n + 1, &seeds, probe.eps, &mut pairs),
    )?;
    refused(
        "an update past the parameters",
        oracle.apply_update(n - 1..n + 1, 1e-2, &probe.terms(0)),
    )?;
    // Still the same layer, still usable.
    same_parameters(oracle, params, "after the refusals").or_else(|stop| match stop {
        Stop::Skip(_) => Ok(String::new()),
        fail => Err(fail),
    })?;
    oracle.load_input(input)?;
    let again = oracle.forward(ForwardMode::Eval)?;
    check_output(&spec, probe.rows, &again)?;
    if probe.deterministic {
        ensure(
            bits(&all_values(&again)) == bits(&all_values(clean)),
            || "the clean forward changed after the refusals".into(),
        )?;
    }
    Ok(String::new())
}

/// Holds two oracles of the same shape to each other within `tolerance` (see the module docs).
/// Both are left programmed with [`Probe::parameters`] after the updates and loaded with
/// [`Probe::input`].
pub fn check_agreement<A, B>(a: &mut A, b: &mut B, probe: &Probe, tolerance: Tolerance) -> Report
where
    A: ForwardOracle + ?Sized,
    B: ForwardOracle + ?Sized,
{
    let spec = *a.spec();
    let mut report = Report::new(format!(
        "a pair of {} within {tolerance:?}",
        describe(&spec)
    ));
    let params = probe.parameters(&spec);
    let input = probe.input(&spec);
    let chunks = probe.chunks(&spec);
    let differ = |what: &str, x: &[f32], y: &[f32]| match tolerance.disagreement(x, y) {
        Some(d) => fail(format!("{what}: {d}")),
        None => Ok(largest_gap(x, y)),
    };
    let mut ready = false;
    report.run("describe the same shape", || {
        ensure(*b.spec() == spec, || {
            format!("{spec:?} against {:?}", b.spec())
        })?;
        a.write_parameters(&params)?;
        b.write_parameters(&params)?;
        a.load_input(&input)?;
        b.load_input(&input)?;
        ready = true;
        Ok(String::new())
    });
    if !ready {
        return report;
    }
    report.run("agree on clean forwards", || {
        let x = all_values(&a.forward(ForwardMode::Eval)?);
        let y = all_values(&b.forward(ForwardMode::Eval)?);
        let gap = differ("eval mode", &x, &y)?;
        Ok(format!("largest gap {gap:e}"))
    });
    report.run("agree on perturbed pairs", || {
        let mut gap = 0f32;
        for (k, chunk) in chunks.iter().enumerate() {
            let seeds = probe.seeds(k);
            let (mut x, mut y) = (Vec::new(), Vec::new());
            a.evaluate_perturbed(chunk.clone(), &seeds, probe.eps, &mut x)?;
            b.evaluate_perturbed(chunk.clone(), &seeds, probe.eps, &mut y)?;
            let what = format!("chunk {chunk:?}");
            gap = gap.max(differ(&what, &pair_values(&x), &pair_values(&y))?);
        }
        Ok(format!("largest gap {gap:e} over chunks {chunks:?}"))
    });
    report.run("agree after the same seeded updates", || {
        for (k, chunk) in chunks.iter().enumerate() {
            let terms = probe.terms(k);
            let scale = 1e-2 * chunk.len() as f32 / terms.len() as f32;
            a.apply_update(chunk.clone(), scale, &terms)?;
            b.apply_update(chunk.clone(), scale, &terms)?;
        }
        let mut said = String::new();
        match (read_back(a)?, read_back(b)?) {
            (Some(x), Some(y)) => {
                let gap = differ("parameters", &x, &y)?;
                said = format!("parameters {gap:e} apart; ");
            }
            _ => said.push_str("parameters not compared (no read-back); "),
        }
        let x = all_values(&a.forward(ForwardMode::Eval)?);
        let y = all_values(&b.forward(ForwardMode::Eval)?);
        let gap = differ("clean forward after the updates", &x, &y)?;
        a.write_parameters(&params)?;
        b.write_parameters(&params)?;
        Ok(format!("{said}forwards {gap:e} apart"))
    });
    report.run("agree on training-mode forwards and layer state", || {
        let x = all_values(&a.forward(ForwardMode::Train)?);
        let y = all_values(&b.forward(ForwardMode::Train)?);
        let gap = differ("train mode", &x, &y)?;
        match (a.read_layer_state()?, b.read_layer_state()?) {
            (Some(x), Some(y)) => {
                differ("layer state", &x, &y)?;
            }
            (None, None) => {}
            // A device whose protocol does not carry its state (serial) cannot be compared.
            _ => {
                return Ok(format!(
                    "largest gap {gap:e}; layer state held by one side only"
                ));
            }
        }
        Ok(format!("largest gap {gap:e}"))
    });
    report
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
