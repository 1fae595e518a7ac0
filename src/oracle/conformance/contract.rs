//! [`check_contract`]: one oracle against the contract.

use std::ops::Range;

use firmware_protocol::direction::apply_update;

use super::*;
use crate::oracle::{ForwardMode, PerturbedColumns};

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
