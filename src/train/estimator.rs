//! The directional-derivative (DD) estimate of Algorithm 1, lines 6-11: for each seeded
//! direction `v_p` of a chunk, the local losses `L± = CE((a ± ) M, y)` of the perturbed features
//! and `dd_p = (L+ - L-) / (2 eps)` (thesis eq. 13).

use std::ops::Range;

use crate::oracle::{
    Activations, DirectionSeed, ForwardOracle, LayerShape, OracleError, PerturbedColumns,
    PerturbedPair,
};

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
}

/// `dd_p` of one chunk of `W_l` along each seed: [`perturbed_losses`] then
/// [`central_difference`].
#[allow(clippy::too_many_arguments)]
pub fn directional_derivatives<O: ForwardOracle + ?Sized>(
    oracle: &mut O,
    projection: &Projection,
    chunk: &Range<usize>,
    seeds: &[DirectionSeed],
    eps: f32,
    labels: &[u8],
    s: &mut Scratch,
    out: &mut Vec<f32>,
) -> Result<(), OracleError> {
    let losses = perturbed_losses(oracle, projection, chunk, seeds, eps, labels, s)?;
    out.clear();
    out.extend(
        (losses.into_iter()).map(|(l_plus, l_minus)| central_difference(l_plus, l_minus, eps)),
    );
    Ok(())
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
