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
                None => {
                    // The same split product as the perturbed losses, so that L0 and L+ round
                    // alike (and the simulator's free L0 is this one bit for bit).
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
                    cross_entropy(&s.goodness, projection.classes, labels)
                }
            };
            out.extend(
                (losses.into_iter()).map(|(l_plus, _)| forward_difference(l_plus, l_zero, eps)),
            );
        }
    }
    Ok(())
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
