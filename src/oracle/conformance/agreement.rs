//! [`check_agreement`]: two oracles of the same shape held to each other.

use super::*;
use crate::oracle::ForwardMode;

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
