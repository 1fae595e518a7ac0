//! The directional-derivative (DD) estimate of Algorithm 1, lines 6-11: for each seeded
//! direction `v_p` of a chunk, the local losses `L± = CE((a ± ) M, y)` of the perturbed features
//! and `dd_p = (L+ - L-) / (2 eps)` (thesis eq. 13), or, with [`Difference::Forward`],
//! `dd_p = (L+ - L0) / eps` from one clean loss `L0` shared by the chunk's P directions.

use std::ops::Range;

use crate::oracle::{
    Activations, DirectionSeed, ForwardMode, ForwardOracle, LayerShape, OracleError,
    PerturbedColumns, PerturbedPair,
};

/// Which finite difference turns a chunk's perturbed losses into `dd_p`.
///
/// - `Central` (the paper's, eq. 13): `(L(θ+εv) - L(θ-εv)) / 2ε`, 2P evaluations per chunk,
///   error O(ε²).
/// - `Forward`: `(L(θ+εv) - L0) / ε` with one clean `L0` per chunk shared by all P directions,
///   P+1 evaluations. Its O(ε) term `ε/2 vᵀHv` has (near) zero mean over random directions, so
///   per direction it estimates as well as central; the evaluations saved buy directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Difference {
    #[default]
    Central,
    Forward,
}

impl Difference {
    /// Evaluations of one chunk along `p` directions, as the algorithm schedules them: 2P
    /// central, P+1 forward (the clean `L0` counts one; see [`clean_features`] for what a device
    /// speaking protocol version 2 runs for it).
    pub fn evaluations(self, p: usize) -> u64 {
        match self {
            Difference::Central => 2 * p as u64,
            Difference::Forward => p as u64 + 1,
        }
    }

    pub fn is_central(&self) -> bool {
        *self == Difference::Central
    }
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Difference::Central => "central",
            Difference::Forward => "forward",
        })
    }
}

impl std::str::FromStr for Difference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "central" => Ok(Difference::Central),
            "forward" => Ok(Difference::Forward),
            other => Err(format!(
                "'{other}' is not a finite difference: expected central or forward"
            )),
        }
    }
}

/// The forward difference `(L+ - L0) / eps`, in f64, rounded to f32.
pub fn forward_difference(l_plus: f64, l_zero: f64, eps: f32) -> f32 {
    ((l_plus - l_zero) / eps as f64) as f32
}

use super::loss::cross_entropy;
use super::projection::Projection;

/// The central difference `(L+ - L-) / (2 eps)`, in f64, rounded to f32 (eq. 13).
pub fn central_difference(l_plus: f64, l_minus: f64, eps: f32) -> f32 {
    ((l_plus - l_minus) / (2.0 * eps as f64)) as f32
}

/// Buffers kept between chunks.
#[derive(Default)]
pub struct Scratch {
    pairs: Vec<PerturbedPair>,
    columns: PerturbedColumns,
    base: Vec<f32>,
    goodness: Vec<f32>,
    /// `L0` of the chunk just evaluated, where the evaluation gave the clean features with the
    /// perturbed columns (the simulator's clean pass, free).
    clean_loss: Option<f64>,
    want_clean_loss: bool,
}

/// `dd_p` of one chunk of `W_l` along each seed: [`perturbed_losses`] then
/// [`central_difference`], or [`forward_difference`] against the clean loss `L0`.
#[allow(clippy::too_many_arguments)]
pub fn directional_derivatives<O: ForwardOracle + ?Sized>(
    oracle: &mut O,
    projection: &Projection,
    chunk: &Range<usize>,
    seeds: &[DirectionSeed],
    eps: f32,
    difference: Difference,
    labels: &[u8],
    s: &mut Scratch,
    out: &mut Vec<f32>,
) -> Result<(), OracleError> {
    s.want_clean_loss = difference == Difference::Forward;
    let losses = perturbed_losses(oracle, projection, chunk, seeds, eps, labels, s);
    s.want_clean_loss = false;
    let losses = losses?;
    out.clear();
    match difference {
        Difference::Central => out.extend(
            (losses.into_iter()).map(|(l_plus, l_minus)| central_difference(l_plus, l_minus, eps)),
        ),
        Difference::Forward => {
            let l_zero = match s.clean_loss.take() {
                Some(l) => l,
                None => clean_loss(oracle, projection, chunk, seeds, labels, s)?,
            };
            out.extend(
                (losses.into_iter()).map(|(l_plus, _)| forward_difference(l_plus, l_zero, eps)),
            );
        }
    }
    Ok(())
}

/// `L0`: the local loss of [`clean_features`], by the same split product as the perturbed losses,
/// so that `L0` and `L+` round alike (and the simulator's free `L0` is this one bit for bit).
pub fn clean_loss<O: ForwardOracle + ?Sized>(
    oracle: &mut O,
    projection: &Projection,
    chunk: &Range<usize>,
    seeds: &[DirectionSeed],
    labels: &[u8],
    s: &mut Scratch,
) -> Result<f64, OracleError> {
    let clean = clean_features(oracle, chunk, seeds)?;
    let spec: LayerShape = *oracle.spec();
    let touched = spec.touched_features(chunk);
    if touched.len() < spec.feature_width() {
        projection.goodness_outside(&clean, &touched, &mut s.goodness);
        let ld = clean.width;
        projection.add_goodness_of(
            &clean.data[touched.start..],
            clean.rows,
            ld,
            &touched,
            &mut s.goodness,
        );
    } else {
        projection.goodness(&clean, &mut s.goodness);
    }
    Ok(cross_entropy(&s.goodness, projection.classes, labels))
}

/// `--eps auto`: clean evaluations of the same batch repeated to measure the device's noise.
pub const EPS_AUTO_REPEATS: usize = 5;
/// `--eps auto`: the mean `|L+ - L-|` must clear the noise of a difference (`sqrt 2` times the
/// clean loss's standard deviation) by this factor, so the noise is at most a tenth of a
/// directional derivative.
pub const EPS_AUTO_FACTOR: f64 = 10.0;
/// `--eps auto`: the choice is made again at every this many batches of an epoch (from batch 0),
/// as a device's noise drifts.
pub const EPS_AUTO_RECHECK_BATCHES: u32 = 50;
/// `--eps auto`: how far apart (relative) the `dd_p` at an eps and at the next one tried may be
/// for the derivative to count as resolved at the first.
pub const EPS_AUTO_CONSISTENCY: f64 = 0.25;
/// `--eps auto`: the largest eps it chooses (the perturbation's norm over a chunk).
pub const EPS_AUTO_MAX: f32 = 64.0;

/// What [`choose_eps`] found, for the log and the metrics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpsChoice {
    pub eps: f32,
    /// Standard deviation of the clean loss over the repeats.
    pub noise: f64,
    /// Mean `|L+ - L-|` at the chosen eps.
    pub signal: f64,
    /// Evaluations spent choosing.
    pub evaluations: u64,
}

/// `--eps auto` on one layer's chunk: measures the spread of the clean loss over
/// [`EPS_AUTO_REPEATS`] evaluations of the loaded batch, then, from `floor` up, multiplies eps
/// until the mean `|L+ - L-|` along `seeds` clears `sqrt 2 * spread` by [`EPS_AUTO_FACTOR`]
/// (the signal grows about linearly with eps, the noise not at all); on a device without spread,
/// until the `dd_p` agree with those at the next eps tried within [`EPS_AUTO_CONSISTENCY`] (a
/// quantised device is deterministic but blind below its step). A device whose repeats agree bit for bit and which
/// resolves `floor` (the ideal simulator) keeps `floor`, the configured eps.
#[allow(clippy::too_many_arguments)]
pub fn choose_eps<O: ForwardOracle + ?Sized>(
    oracle: &mut O,
    projection: &Projection,
    chunk: &Range<usize>,
    seeds: &[DirectionSeed],
    floor: f32,
    labels: &[u8],
    s: &mut Scratch,
) -> Result<EpsChoice, OracleError> {
    let mut evaluations = 0u64;
    let mut repeats = Vec::with_capacity(EPS_AUTO_REPEATS);
    for _ in 0..EPS_AUTO_REPEATS {
        repeats.push(clean_loss(oracle, projection, chunk, seeds, labels, s)?);
        evaluations += 1;
    }
    let mean = repeats.iter().sum::<f64>() / repeats.len() as f64;
    let noise = (repeats.iter().map(|l| (l - mean).powi(2)).sum::<f64>()
        / (repeats.len() - 1) as f64)
        .sqrt();
    let wanted = EPS_AUTO_FACTOR * std::f64::consts::SQRT_2 * noise;
    // (eps, dd_p at it, whether its mean |L+ - L-| cleared the noise)
    let mut previous: Option<(f32, Vec<f64>, bool, f64)> = None;
    let mut eps = floor;
    loop {
        let losses = perturbed_losses(oracle, projection, chunk, seeds, eps, labels, s)?;
        evaluations += 2 * seeds.len() as u64;
        let signal =
            losses.iter().map(|(p, m)| (p - m).abs()).sum::<f64>() / losses.len().max(1) as f64;
        let dd: Vec<f64> = (losses.iter())
            .map(|(p, m)| (p - m) / (2.0 * eps as f64))
            .collect();
        let clears = signal >= wanted;
        if clears && noise > 0.0 {
            return Ok(EpsChoice {
                eps,
                noise,
                signal,
                evaluations,
            });
        }
        // A deterministic device: the derivative is resolved where a larger eps gives the same
        // dd_p (up to the O(eps²) of a smooth loss). A quantised device (int8 weights) has no
        // spread, but below its step dd_p is the rounding's, not the loss's. (On a noisy device
        // the noise, not the loss, would decide this test: there the spread's criterion alone
        // holds.)
        if let Some((at, before, cleared, before_signal)) = previous.take()
            && cleared
        {
            let gap: f64 = before.iter().zip(&dd).map(|(a, b)| (a - b).abs()).sum();
            let size: f64 = before.iter().zip(&dd).map(|(a, b)| a.abs() + b.abs()).sum();
            if gap <= EPS_AUTO_CONSISTENCY * size / 2.0 {
                return Ok(EpsChoice {
                    eps: at,
                    noise,
                    signal: before_signal,
                    evaluations,
                });
            }
        }
        if eps >= EPS_AUTO_MAX {
            return Ok(EpsChoice {
                eps,
                noise,
                signal,
                evaluations,
            });
        }
        // Linear growth would need wanted / signal; step at least 2x and at most 16x, as the
        // measured signal is itself noisy at small eps.
        let step = if clears {
            2.0
        } else if signal == 0.0 {
            16.0
        } else {
            (wanted / signal).clamp(2.0, 16.0) as f32
        };
        previous = Some((eps, dd, clears, signal));
        eps = (eps * step).min(EPS_AUTO_MAX);
    }
}

/// The clean features `L0` is computed from: the current parameters evaluated as a perturbed
/// evaluation is, so that `L+ - L0` holds no difference but the perturbation's. A dense layer
/// reads no mode: its clean pass is one evaluation. A CNN block must normalise with the batch's
/// statistics without committing them to its running statistics (as the perturbed passes do), and
/// protocol version 2 has no such clean request: the block is asked for the perturbed pair of
/// `eps = 0` along the chunk's first direction (`w + 0 v = w`), whose `+` side is that pass, on
/// every backend alike, so serial and simulator agree bit for bit. (On a device that pair is two
/// passes; [`Difference::evaluations`] counts the algorithm's one.)
pub fn clean_features<O: ForwardOracle + ?Sized>(
    oracle: &mut O,
    chunk: &Range<usize>,
    seeds: &[DirectionSeed],
) -> Result<Activations, OracleError> {
    match oracle.spec() {
        LayerShape::Dense { .. } => Ok(oracle.forward(ForwardMode::Train)?.features),
        LayerShape::Conv(_) => {
            let mut pair = Vec::new();
            oracle.evaluate_perturbed(chunk.clone(), &seeds[..1], 0.0, &mut pair)?;
            pair.pop()
                .map(|(plus, _)| plus)
                .ok_or_else(|| OracleError::Shape("no clean evaluation came back".into()))
        }
    }
}

/// Lines 6-9 of Algorithm 1 on one chunk: `(L+, L-)` per seed.
///
/// A chunk changes only the features [`LayerShape::touched_features`] names, so the goodness is
/// computed as `G = a[:, outside] M[outside] + a[:, touched] M[touched]`. A layer in this process
/// that can promise the untouched features are the clean ones
/// ([`crate::oracle::InProcess::evaluate_perturbed_columns`]) gives the touched columns alone and
/// the first term is computed once for all evaluations; any other oracle gives whole features and
/// both terms are computed per evaluation. The two ways perform the same operations on the same
/// values wherever the promise holds, so they give the same losses bit for bit; where the
/// features are not split (a chunk touching all of them) the goodness is one product.
pub fn perturbed_losses<O: ForwardOracle + ?Sized>(
    oracle: &mut O,
    projection: &Projection,
    chunk: &Range<usize>,
    seeds: &[DirectionSeed],
    eps: f32,
    labels: &[u8],
    s: &mut Scratch,
) -> Result<Vec<(f64, f64)>, OracleError> {
    let spec: LayerShape = *oracle.spec();
    let classes = projection.classes;
    let touched = spec.touched_features(chunk);
    let split = touched.len() < spec.feature_width();
    let mut losses = Vec::with_capacity(seeds.len());
    s.clean_loss = None;
    let columns_given = match oracle.in_process() {
        Some(layer) if split => {
            layer.evaluate_perturbed_columns(chunk.clone(), seeds, eps, &mut s.columns)?
        }
        _ => false,
    };
    if columns_given {
        let c = &s.columns;
        if c.touched != touched
            || c.pairs.len() != seeds.len()
            || c.clean.width != spec.feature_width()
        {
            return Err(OracleError::Shape(format!(
                "the backend's perturbed columns {:?} are not the chunk's {touched:?}",
                c.touched
            )));
        }
        projection.goodness_outside(&c.clean, &touched, &mut s.base);
        if s.want_clean_loss {
            // L0 for forward differences, from the clean pass the layer gave with the columns,
            // by the same split product as the perturbed losses.
            s.goodness.clone_from(&s.base);
            let ld = c.clean.width;
            projection.add_goodness_of(
                &c.clean.data[touched.start..],
                c.clean.rows,
                ld,
                &touched,
                &mut s.goodness,
            );
            s.clean_loss = Some(cross_entropy(&s.goodness, classes, labels));
        }
        for (plus, minus) in &c.pairs {
            let mut loss = |a: &Activations| {
                s.goodness.clone_from(&s.base);
                projection.add_goodness_of(
                    &a.data,
                    a.rows,
                    touched.len(),
                    &touched,
                    &mut s.goodness,
                );
                cross_entropy(&s.goodness, classes, labels)
            };
            losses.push((loss(plus), loss(minus)));
        }
        return Ok(losses);
    }
    oracle.evaluate_perturbed(chunk.clone(), seeds, eps, &mut s.pairs)?;
    for (plus, minus) in &s.pairs {
        let mut loss = |a: &Activations| {
            if split {
                projection.goodness_outside(a, &touched, &mut s.goodness);
                let ld = a.width;
                projection.add_goodness_of(
                    &a.data[touched.start..],
                    a.rows,
                    ld,
                    &touched,
                    &mut s.goodness,
                );
            } else {
                projection.goodness(a, &mut s.goodness);
            }
            cross_entropy(&s.goodness, classes, labels)
        };
        losses.push((loss(plus), loss(minus)));
    }
    Ok(losses)
}
