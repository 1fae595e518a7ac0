//! `pnn-report`: pictures and a table from the per-epoch metrics files (`pnn-train --metrics`).
//!
//! Writes `accuracy.svg` (test accuracy per epoch), `loss.svg` (test loss per epoch), both
//! prediction modes (thesis section 4.1: cumulative solid, final-layer thin and light), and
//! `layers.svg` (each layer's test accuracy and training local loss per epoch); several runs are
//! overlaid in one colour each, with a legend. `summary.md` compares the runs' final figures.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::metrics::EpochMetrics;

/// One run's metrics, as read from its file.
#[derive(Clone, Debug)]
pub struct RunMetrics {
    pub label: String,
    pub path: PathBuf,
    pub epochs: Vec<EpochMetrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: not a metrics record: {what}")]
    Parse {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{path}: no epochs recorded")]
    Empty { path: PathBuf },
    #[error("drawing {path}: {what}")]
    Draw { path: PathBuf, what: String },
}

impl RunMetrics {
    /// Reads a JSONL metrics file (one [`EpochMetrics`] per line; blank lines are skipped).
    pub fn load(path: &Path, label: Option<String>) -> Result<Self, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut epochs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let m: EpochMetrics = serde_json::from_str(line).map_err(|e| ReportError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                what: e.to_string(),
            })?;
            epochs.push(m);
        }
        if epochs.is_empty() {
            return Err(ReportError::Empty {
                path: path.to_path_buf(),
            });
        }
        let label = label.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string())
        });
        Ok(Self {
            label,
            path: path.to_path_buf(),
            epochs,
        })
    }

    fn last(&self) -> &EpochMetrics {
        self.epochs.last().expect("loaded runs have epochs")
    }

    fn layers(&self) -> usize {
        self.epochs
            .iter()
            .map(|e| e.test_accuracy_per_layer.len())
            .max()
            .unwrap_or(0)
    }
}

/// Colours that stay apart (Tableau 10).
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// One curve: its legend label, colour, whether it is the secondary (final-layer) style, points.
struct Curve {
    label: String,
    colour: RGBColor,
    secondary: bool,
    points: Vec<(f64, f64)>,
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    curves: &[Curve],
    y_from_zero: bool,
) -> Result<(), String> {
    // Curves that rise (accuracy) leave the lower right free; falling ones (loss) the upper.
    let legend_at = if y_from_zero {
        SeriesLabelPosition::UpperRight
    } else {
        SeriesLabelPosition::LowerRight
    };
    let pts = curves.iter().flat_map(|c| c.points.iter());
    let (mut x_max, mut y_min, mut y_max) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x_max = x_max.max(x);
        if y.is_finite() {
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_from_zero {
        y_min = y_min.min(0.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let (y_lo, y_hi) = (if y_from_zero { y_min } else { y_min - pad }, y_max + pad);
    let x_hi = if x_max <= 1.0 { 2.0 } else { x_max };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..x_hi, y_lo..y_hi)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| e.to_string())?;
    for c in curves {
        let style = if c.secondary {
            c.colour.mix(0.55).stroke_width(1)
        } else {
            c.colour.stroke_width(2)
        };
        // Markers where points are few, so that a run of one epoch still shows.
        let marker = if c.points.len() <= 20 { 2 } else { 0 };
        chart
            .draw_series(
                LineSeries::new(c.points.iter().copied().filter(|p| p.1.is_finite()), style)
                    .point_size(marker),
            )
            .map_err(|e| e.to_string())?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .position(legend_at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn mode_curves(runs: &[RunMetrics], pick: impl Fn(&EpochMetrics) -> (f64, f64)) -> Vec<Curve> {
    let mut curves = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        for (secondary, mode) in [(false, "cumulative"), (true, "final layer")] {
            curves.push(Curve {
                label: format!("{} ({mode})", run.label),
                colour: colour(i),
                secondary,
                points: run
                    .epochs
                    .iter()
                    .map(|m| {
                        let (c, f) = pick(m);
                        (m.epoch as f64, if secondary { f } else { c })
                    })
                    .collect(),
            });
        }
    }
    curves
}

fn layer_curves(runs: &[RunMetrics], pick: impl Fn(&EpochMetrics) -> &[f64]) -> Vec<Curve> {
    let mut curves = Vec::new();
    let mut k = 0;
    for run in runs {
        for l in 0..run.layers() {
            curves.push(Curve {
                label: format!("{} L{}", run.label, l + 1),
                colour: colour(k),
                secondary: false,
                points: run
                    .epochs
                    .iter()
                    .filter_map(|m| pick(m).get(l).map(|v| (m.epoch as f64, *v)))
                    .collect(),
            });
            k += 1;
        }
    }
    curves
}

fn svg_file(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String>,
) -> Result<(), ReportError> {
    let err = |what: String| ReportError::Draw {
        path: path.to_path_buf(),
        what,
    };
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    draw(&root).map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// The files [`write_report`] writes into its directory.
pub const FILES: [&str; 4] = ["accuracy.svg", "loss.svg", "layers.svg", "summary.md"];

/// Writes the plots and `summary.md` into `out_dir` (created if needed); returns the table.
pub fn write_report(runs: &[RunMetrics], out_dir: &Path) -> Result<String, ReportError> {
    std::fs::create_dir_all(out_dir).map_err(|source| ReportError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    svg_file(&out_dir.join(FILES[0]), (900, 560), |root| {
        let curves = mode_curves(runs, |m| {
            (m.test_accuracy_cumulative, m.test_accuracy_final_layer)
        });
        draw_panel(root, "Test accuracy", "accuracy", &curves, false)
    })?;
    svg_file(&out_dir.join(FILES[1]), (900, 560), |root| {
        let curves = mode_curves(runs, |m| (m.test_loss_cumulative, m.test_loss_final_layer));
        draw_panel(root, "Test loss (cross-entropy)", "loss", &curves, true)
    })?;
    svg_file(&out_dir.join(FILES[2]), (1400, 560), |root| {
        let (left, right) = root.split_horizontally(700);
        let acc = layer_curves(runs, |m| &m.test_accuracy_per_layer);
        draw_panel(&left, "Test accuracy per layer", "accuracy", &acc, false)?;
        let loss = layer_curves(runs, |m| &m.train_local_loss);
        draw_panel(&right, "Training local loss per layer", "loss", &loss, true)
    })?;
    let table = summary_table(runs);
    let path = out_dir.join(FILES[3]);
    std::fs::write(&path, &table).map_err(|source| ReportError::Io { path, source })?;
    Ok(table)
}

/// A Markdown table of each run's final figures.
pub fn summary_table(runs: &[RunMetrics]) -> String {
    let mut s = String::from(
        "| run | epochs | test acc. cumulative | test acc. final layer | best cumulative (epoch) \
         | test loss cumulative | local loss per layer (last epoch) | train s/epoch | oracle evaluations |\n\
         |---|---:|---:|---:|---:|---:|---|---:|---:|\n",
    );
    for run in runs {
        let last = run.last();
        let best = run
            .epochs
            .iter()
            .max_by(|a, b| {
                a.test_accuracy_cumulative
                    .total_cmp(&b.test_accuracy_cumulative)
            })
            .expect("loaded runs have epochs");
        let train_s: f64 = run.epochs.iter().map(|e| e.train_seconds).sum();
        let losses: Vec<String> = last
            .train_local_loss
            .iter()
            .map(|l| format!("{l:.4}"))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {:.4} | {:.4} | {:.4} ({}) | {:.4} | {} | {:.2} | {} |",
            run.label.replace('|', "\\|"),
            last.epoch,
            last.test_accuracy_cumulative,
            last.test_accuracy_final_layer,
            best.test_accuracy_cumulative,
            best.epoch,
            last.test_loss_cumulative,
            losses.join(", "),
            train_s / run.epochs.len() as f64,
            last.oracle_evaluations,
        );
    }
    s
}

/// [`write_report`] with `ceiling` (a `--method mf-exact` run, the exact-gradient ceiling of the
/// DD runs) overlaid on every plot as one more run, and a table of each run's gap to it
/// appended to `summary.md`.
pub fn write_report_with_ceiling(
    runs: &[RunMetrics],
    ceiling: &RunMetrics,
    out_dir: &Path,
) -> Result<String, ReportError> {
    let mut all = runs.to_vec();
    all.push(ceiling.clone());
    let mut table = write_report(&all, out_dir)?;
    table.push('\n');
    table.push_str(&ceiling_table(runs, ceiling));
    let path = out_dir.join(FILES[3]);
    std::fs::write(&path, &table).map_err(|source| ReportError::Io { path, source })?;
    Ok(table)
}

/// Each run's last cumulative test accuracy against the ceiling's at the same epoch (or its last,
/// where the ceiling ran fewer epochs).
pub fn ceiling_table(runs: &[RunMetrics], ceiling: &RunMetrics) -> String {
    let mut s = format!(
        "| run | epoch | test acc. cumulative | ceiling ({}) | gap |\n|---|---:|---:|---:|---:|\n",
        ceiling.label.replace('|', "\\|")
    );
    for run in runs {
        let last = run.last();
        let reference = (ceiling.epochs.iter())
            .find(|m| m.epoch == last.epoch)
            .unwrap_or_else(|| ceiling.last());
        let _ = writeln!(
            s,
            "| {} | {} | {:.4} | {:.4} | {:+.4} |",
            run.label.replace('|', "\\|"),
            last.epoch,
            last.test_accuracy_cumulative,
            reference.test_accuracy_cumulative,
            last.test_accuracy_cumulative - reference.test_accuracy_cumulative,
        );
    }
    s
}
