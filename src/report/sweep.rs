//! A noise sweep's results ([`crate::run::noise_sweep`] produces them): one [`SweepPoint`] per
//! level of the swept parameter, written as CSV, a Markdown table and an SVG plot.

use std::fmt;
use std::path::Path;

/// The finite-difference signal `L+ - L-` of the first layer's first chunk, on the first training
/// batch at the initial weights, over `directions` directions each evaluated `repeats` times.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct FdSignal {
    /// RMS over directions of the mean of `L+ - L-` (what the estimator wants: `2 eps ∇L·v`),
    /// with the bias of estimating it from noisy draws removed.
    pub signal: f64,
    /// RMS over directions of the standard deviation of `L+ - L-` over repeats (what noise adds).
    pub noise: f64,
    /// `signal / noise` (infinite on a deterministic device).
    pub snr: f64,
}

/// One point of a sweep.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SweepPoint {
    pub value: f64,
    pub accuracy_cumulative: f64,
    pub accuracy_final_layer: f64,
    pub loss_cumulative: f64,
    /// The finite-difference signal at this level (see [`crate::run::noise_sweep::fd_signal`]);
    /// `None` if not measured.
    pub fd: Option<FdSignal>,
    pub train_seconds: f64,
}

/// Where the FD signal-to-noise ratio crosses 1, interpolated in log space between the sweep's
/// points (`None` if it never does within the sweep).
pub fn drowning_level(points: &[SweepPoint]) -> Option<f64> {
    let snr: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.fd.map(|f| (p.value, f.snr)))
        .collect();
    snr.windows(2).find_map(|w| {
        let ((v0, s0), (v1, s1)) = (w[0], w[1]);
        if s0 >= 1.0 && s1 < 1.0 {
            if !s0.is_finite() || v0 <= 0.0 {
                return Some(v1);
            }
            // log snr is linear in log value between the points (snr ∝ 1/σ for output noise).
            let t = s0.ln() / (s0.ln() - s1.ln());
            Some((v0.ln() + t * (v1.ln() - v0.ln())).exp())
        } else {
            None
        }
    })
}

/// The sweep as CSV; `param` names the swept parameter.
pub fn to_csv(param: &str, points: &[SweepPoint]) -> String {
    let mut out = format!(
        "{},accuracy_cumulative,accuracy_final_layer,loss_cumulative,fd_signal,fd_noise,fd_snr,train_seconds\n",
        param
    );
    for p in points {
        let (sig, noise, snr) =
            p.fd.map(|f| (f.signal.to_string(), f.noise.to_string(), f.snr.to_string()))
                .unwrap_or_default();
        out += &format!(
            "{},{:.4},{:.4},{:.4},{sig},{noise},{snr},{:.2}\n",
            p.value,
            p.accuracy_cumulative,
            p.accuracy_final_layer,
            p.loss_cumulative,
            p.train_seconds
        );
    }
    out
}

/// The sweep as a Markdown table.
pub fn to_markdown(param: &str, eps: f32, points: &[SweepPoint]) -> String {
    let mut out = format!(
        "| {} | test acc (cumulative) | test acc (final layer) | L+ - L- signal | noise | SNR |\n|---|---|---|---|---|---|\n",
        param
    );
    for p in points {
        let fd = p.fd.map_or("| | | ".to_string(), |f| {
            format!("| {:.3e} | {:.3e} | {:.3}", f.signal, f.noise, f.snr)
        });
        out += &format!(
            "| {} | {:.4} | {:.4} {fd} |\n",
            p.value, p.accuracy_cumulative, p.accuracy_final_layer
        );
    }
    if let Some(level) = drowning_level(points) {
        out += &format!(
            "\nThe finite-difference signal drowns (SNR < 1) at {} ≈ {level:.3e}, {:.3} x eps (eps = {eps:e}).\n",
            param,
            level / eps as f64
        );
    }
    out
}

/// An SVG plot of test accuracy against the parameter's value and, where the finite-difference
/// signal was measured, a second panel of its signal-to-noise ratio (log scale, with SNR = 1,
/// where the signal drowns, marked).
pub fn plot_svg(
    path: &Path,
    title: &str,
    param: &str,
    points: &[SweepPoint],
) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn fmt::Display| format!("cannot plot {}: {e}", path.display());
    let snr: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.fd.map(|f| (p.value, f.snr)))
        .filter(|(_, s)| s.is_finite() && *s > 0.0)
        .collect();
    let height = if snr.is_empty() { 480 } else { 860 };
    let root = SVGBackend::new(path, (720, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = if snr.is_empty() {
        (root.clone(), None)
    } else {
        let (t, b) = root.split_vertically(480);
        (t, Some(b))
    };
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.value), b.max(p.value))
        });
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        (lo - 1.0, hi + 1.0)
    };
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(lo..hi, 0f64..1f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(param)
        .y_desc("test accuracy")
        .draw()
        .map_err(|e| err(&e))?;
    for (name, color, get) in [
        (
            "cumulative",
            BLUE,
            (|p: &SweepPoint| p.accuracy_cumulative) as fn(&SweepPoint) -> f64,
        ),
        ("final layer", RED, |p: &SweepPoint| p.accuracy_final_layer),
    ] {
        let series: Vec<(f64, f64)> = points.iter().map(|p| (p.value, get(p))).collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                series
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    if let Some(bottom) = bottom {
        let (smin, smax) = snr
            .iter()
            .fold((1.0f64, 1.0f64), |(a, b), &(_, s)| (a.min(s), b.max(s)));
        let mut chart = ChartBuilder::on(&bottom)
            .caption(
                format!("finite-difference signal-to-noise ratio of L+ - L- vs {param}"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(lo..hi, (smin / 2.0..smax * 2.0).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(param)
            .y_desc("SNR (log)")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(snr.clone(), GREEN.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("SNR of L+ - L-")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        chart
            .draw_series(
                snr.iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, GREEN.filled())),
            )
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(vec![(lo, 1.0), (hi, 1.0)], BLACK.mix(0.5)))
            .map_err(|e| err(&e))?
            .label("SNR = 1: the signal drowns")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
