//! A gathered sweep ([`crate::sweep::gather`]) as files: CSV per cell, per group and per axis
//! value, a Markdown report laid out like the paper's tables (mean ± std over seeds, cumulative
//! prediction with the final-layer figure in parentheses, the best of a row in bold), and one
//! plot per axis.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::sweep::cell::CellState;
use crate::sweep::gather::{Figures, Gathered, Group, Stat};

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One row per cell: its axis values, seed, state and figures.
pub fn cells_csv(g: &Gathered) -> String {
    let mut out = String::from("index,");
    for a in &g.axes {
        out += &csv_field(a);
        out.push(',');
    }
    out += "seed,state,accuracy_cumulative,accuracy_final_layer,train_seconds,oracle_evaluations,weights_sha256\n";
    for c in &g.cells {
        out += &format!("{},", c.cell.index);
        for a in &g.axes {
            out += &csv_field(&c.cell.value_of(a).unwrap_or_default());
            out.push(',');
        }
        out += &format!("{},{},", c.cell.seed(), c.state.name());
        if let CellState::Done(s) = &c.state {
            out += &format!(
                "{},{},{:.3},{},{}\n",
                s.test_accuracy_cumulative,
                s.test_accuracy_final_layer,
                s.train_seconds,
                s.oracle_evaluations,
                s.weights_sha256
            );
        } else {
            out += ",,,,\n";
        }
    }
    out
}

const FIGURE_COLUMNS: &str = "accuracy_cumulative_mean,accuracy_cumulative_std,accuracy_final_layer_mean,accuracy_final_layer_std,train_seconds_mean,train_seconds_std,oracle_evaluations_mean,oracle_evaluations_std";

fn figure_fields(f: &Figures) -> String {
    let s = |s: &Stat| {
        if s.n == 0 {
            ",".to_string()
        } else {
            format!("{},{}", s.mean, s.std)
        }
    };
    format!(
        "{},{},{},{}",
        s(&f.accuracy_cumulative),
        s(&f.accuracy_final_layer),
        s(&f.train_seconds),
        s(&f.oracle_evaluations)
    )
}

/// One row per group of cells that differ only in their seed: mean and std over the done seeds.
pub fn groups_csv(g: &Gathered) -> String {
    let mut out = String::new();
    for a in &g.axes {
        out += &csv_field(a);
        out.push(',');
    }
    out += &format!("seeds_done,seeds_missing,{FIGURE_COLUMNS}\n");
    for group in &g.groups {
        for (_, v) in &group.values {
            out += &csv_field(v);
            out.push(',');
        }
        out += &format!(
            "{},{},{}\n",
            group.seeds_done.len(),
            group.seeds_missing.len(),
            figure_fields(&group.figures)
        );
    }
    out
}

/// One row per value of each axis, over every cell with that value.
pub fn axes_csv(g: &Gathered) -> String {
    let mut out = format!("axis,value,cells_done,{FIGURE_COLUMNS}\n");
    for a in &g.by_axis {
        out += &format!(
            "{},{},{},{}\n",
            csv_field(&a.axis),
            csv_field(&a.value),
            a.figures.accuracy_cumulative.n,
            figure_fields(&a.figures)
        );
    }
    out
}

fn pm(s: &Stat) -> String {
    if s.n == 0 {
        "–".into()
    } else {
        format!("{:.3} ± {:.3}", s.mean, s.std)
    }
}

/// `0.933 ± 0.002 (0.932 ± 0.000)`, as the paper writes a cell.
fn paper_cell(f: &Figures) -> String {
    if f.accuracy_cumulative.n == 0 {
        return "–".into();
    }
    format!(
        "{} ({})",
        pm(&f.accuracy_cumulative),
        pm(&f.accuracy_final_layer)
    )
}

fn seconds(s: &Stat) -> String {
    if s.n == 0 {
        "–".into()
    } else {
        format!("{:.1} ± {:.1}", s.mean, s.std)
    }
}

fn evaluations(s: &Stat) -> String {
    if s.n == 0 {
        "–".into()
    } else if s.std == 0.0 {
        format!("{:.0}", s.mean)
    } else {
        format!("{:.0} ± {:.0}", s.mean, s.std)
    }
}

/// The main table: one row per combination of the axes but the last, one column per value of
/// the last axis (with one axis, one row per value).
fn paper_table(g: &Gathered, out: &mut String) {
    let seeds = |gr: &Group| {
        if gr.seeds_missing.is_empty() {
            String::new()
        } else {
            format!(
                " [{} of {} seeds]",
                gr.seeds_done.len(),
                gr.seeds_done.len() + gr.seeds_missing.len()
            )
        }
    };
    let Some((last, rows_axes)) = g.axes.split_last() else {
        let gr = &g.groups[0];
        let _ = writeln!(
            out,
            "| test accuracy |\n|---|\n| {}{} |",
            paper_cell(&gr.figures),
            seeds(gr)
        );
        return;
    };
    if rows_axes.is_empty() {
        let _ = writeln!(out, "| {last} | test accuracy |\n|---|---|");
        for gr in &g.groups {
            let _ = writeln!(
                out,
                "| {} | {}{} |",
                gr.values[0].1,
                paper_cell(&gr.figures),
                seeds(gr)
            );
        }
        return;
    }
    let mut columns: Vec<&str> = Vec::new();
    let mut rows: Vec<Vec<&(String, String)>> = Vec::new();
    for gr in &g.groups {
        let (l, r) = gr.values.split_last().expect("one value per axis");
        if !columns.contains(&l.1.as_str()) {
            columns.push(&l.1);
        }
        let r: Vec<_> = r.iter().collect();
        if !rows.contains(&r) {
            rows.push(r);
        }
    }
    let head: Vec<&str> = rows_axes.iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "| {} \\ {last} | {} |\n|{}",
        head.join(", "),
        columns.join(" | "),
        "---|".repeat(columns.len() + 1)
    );
    for row in rows {
        let in_row: Vec<Option<&Group>> = columns
            .iter()
            .map(|c| {
                g.groups.iter().find(|gr| {
                    let (l, r) = gr.values.split_last().expect("one value per axis");
                    l.1 == *c && r.iter().collect::<Vec<_>>() == row
                })
            })
            .collect();
        let best = in_row
            .iter()
            .flatten()
            .filter(|gr| gr.figures.accuracy_cumulative.n > 0)
            .map(|gr| gr.figures.accuracy_cumulative.mean)
            .fold(f64::NEG_INFINITY, f64::max);
        let label: Vec<&str> = row.iter().map(|(_, v)| v.as_str()).collect();
        let cells: Vec<String> = in_row
            .iter()
            .map(|gr| match gr {
                None => "–".into(),
                Some(gr) => {
                    let text = paper_cell(&gr.figures);
                    let f = &gr.figures.accuracy_cumulative;
                    let text = if f.n > 0 && f.mean == best && columns.len() > 1 {
                        format!("**{}", text.replacen(' ', "** ", 1))
                    } else {
                        text
                    };
                    format!("{text}{}", seeds(gr))
                }
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", label.join(", "), cells.join(" | "));
    }
}

/// The Markdown report: the paper-style table, every group, every axis value, and the cells
/// that are not done.
pub fn markdown(g: &Gathered) -> String {
    let done = g.cells.len() - g.missing().count();
    let mut out = format!(
        "# Sweep {}\n\n{done} of {} cells done. Test accuracy, mean ± std over seeds: cumulative prediction, final-layer prediction in parentheses (as the paper's Tables 1 and 2); the best of a row in bold.\n\n",
        g.name,
        g.cells.len()
    );
    paper_table(g, &mut out);
    out += "\n## Every group (mean ± std over seeds)\n\n|";
    for a in &g.axes {
        out += &format!(" {a} |");
    }
    out += " seeds | cumulative | final layer | train s | evaluations |\n|";
    out += &"---|".repeat(g.axes.len() + 5);
    out.push('\n');
    for gr in &g.groups {
        out.push('|');
        for (_, v) in &gr.values {
            out += &format!(" {v} |");
        }
        let f = &gr.figures;
        out += &format!(
            " {}/{} | {} | {} | {} | {} |\n",
            gr.seeds_done.len(),
            gr.seeds_done.len() + gr.seeds_missing.len(),
            pm(&f.accuracy_cumulative),
            pm(&f.accuracy_final_layer),
            seconds(&f.train_seconds),
            evaluations(&f.oracle_evaluations)
        );
    }
    if !g.axes.is_empty() {
        out += "\n## Per axis value (over every cell with that value)\n\n| axis | value | cells | cumulative | final layer | train s | evaluations |\n|---|---|---|---|---|---|---|\n";
        for a in &g.by_axis {
            let f = &a.figures;
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                a.axis,
                a.value,
                f.accuracy_cumulative.n,
                pm(&f.accuracy_cumulative),
                pm(&f.accuracy_final_layer),
                seconds(&f.train_seconds),
                evaluations(&f.oracle_evaluations)
            );
        }
    }
    let missing: Vec<_> = g.missing().collect();
    if missing.is_empty() {
        out += "\nEvery cell is done.\n";
    } else {
        out += &format!(
            "\n## Missing or failed cells ({})\n\n| cell | settings | state | detail |\n|---|---|---|---|\n",
            missing.len()
        );
        for c in missing {
            let detail = match &c.state {
                CellState::Failed(f) => format!(
                    "exit {}: {}",
                    f.exit_code
                        .map_or("by signal".to_string(), |c| c.to_string()),
                    f.message.lines().last().unwrap_or("").replace('|', "/")
                ),
                CellState::Running(r) => format!(
                    "on {} (pid {}){}",
                    r.host,
                    r.pid,
                    r.slurm_task
                        .as_ref()
                        .map(|t| format!(", Slurm task {t}"))
                        .unwrap_or_default()
                ),
                CellState::Interrupted => "checkpoint saved; the next run resumes it".into(),
                _ => String::new(),
            };
            out += &format!(
                "| {} | {} | {} | {detail} |\n",
                c.cell.index,
                c.cell.label(),
                c.state.name()
            );
        }
    }
    out
}

/// One SVG per axis: test accuracy (mean ± std over seeds, both prediction modes) against the
/// axis' values, one line per combination of the other axes. Returns the files written.
pub fn plots(g: &Gathered, dir: &Path) -> Result<Vec<PathBuf>, String> {
    use plotters::prelude::*;
    let mut written = Vec::new();
    for (ai, axis) in g.axes.iter().enumerate() {
        let mut xs: Vec<&str> = Vec::new();
        for gr in &g.groups {
            if !xs.contains(&gr.values[ai].1.as_str()) {
                xs.push(&gr.values[ai].1);
            }
        }
        let mut lines: Vec<(String, Vec<(usize, &Figures)>)> = Vec::new();
        for gr in &g.groups {
            let others: Vec<String> = gr
                .values
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != ai)
                .map(|(_, (k, v))| format!("{k}={v}"))
                .collect();
            let name = others.join(" ");
            let x = xs.iter().position(|v| *v == gr.values[ai].1).expect("seen");
            match lines.iter_mut().find(|(n, _)| *n == name) {
                Some((_, points)) => points.push((x, &gr.figures)),
                None => lines.push((name, vec![(x, &gr.figures)])),
            }
        }
        let file: String = axis
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("accuracy-{file}.svg"));
        let err = |e: &dyn std::fmt::Display| format!("cannot plot {}: {e}", path.display());
        {
            let root = SVGBackend::new(&path, (760, 500)).into_drawing_area();
            root.fill(&WHITE).map_err(|e| err(&e))?;
            let n = xs.len() as f64;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "{}: test accuracy vs {axis} (mean ± std over seeds)",
                        g.name
                    ),
                    ("sans-serif", 18),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(-0.5f64..n - 0.5, 0f64..1f64)
                .map_err(|e| err(&e))?;
            let labels = xs.clone();
            chart
                .configure_mesh()
                .x_desc(axis.as_str())
                .y_desc("test accuracy")
                .x_labels(xs.len().max(2))
                .x_label_formatter(&|x| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 {
                        labels
                            .get(i as usize)
                            .map_or(String::new(), |s| s.to_string())
                    } else {
                        String::new()
                    }
                })
                .draw()
                .map_err(|e| err(&e))?;
            let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
            for (li, (name, points)) in lines.iter().enumerate() {
                let color = palette[li % palette.len()];
                for (mode, dashed, pick) in [
                    (
                        "cumulative",
                        false,
                        (|f: &Figures| f.accuracy_cumulative) as fn(&Figures) -> Stat,
                    ),
                    ("final layer", true, |f: &Figures| f.accuracy_final_layer),
                ] {
                    let series: Vec<(f64, Stat)> = points
                        .iter()
                        .map(|(x, f)| (*x as f64, pick(f)))
                        .filter(|(_, s)| s.n > 0)
                        .collect();
                    let label = if name.is_empty() {
                        mode.to_string()
                    } else {
                        format!("{name} ({mode})")
                    };
                    let style = color.stroke_width(if dashed { 1 } else { 2 });
                    chart
                        .draw_series(LineSeries::new(
                            series.iter().map(|(x, s)| (*x, s.mean)),
                            style,
                        ))
                        .map_err(|e| err(&e))?
                        .label(label)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                    // Error bars: ± one std, with caps.
                    let cap = 0.04;
                    chart
                        .draw_series(series.iter().flat_map(|(x, s)| {
                            let (lo, hi) = (s.mean - s.std, s.mean + s.std);
                            [
                                PathElement::new(vec![(*x, lo), (*x, hi)], style),
                                PathElement::new(vec![(x - cap, lo), (x + cap, lo)], style),
                                PathElement::new(vec![(x - cap, hi), (x + cap, hi)], style),
                            ]
                        }))
                        .map_err(|e| err(&e))?;
                    chart
                        .draw_series(
                            series
                                .iter()
                                .map(|(x, s)| Circle::new((*x, s.mean), 3, color.filled())),
                        )
                        .map_err(|e| err(&e))?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
            root.present().map_err(|e| err(&e))?;
        }
        written.push(path);
    }
    Ok(written)
}

/// Writes `cells.csv`, `groups.csv`, `axes.csv`, `table.md` and the plots into `dir`; returns
/// the Markdown.
pub fn write(g: &Gathered, dir: &Path) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let md = markdown(g);
    for (name, text) in [
        ("cells.csv", cells_csv(g)),
        ("groups.csv", groups_csv(g)),
        ("axes.csv", axes_csv(g)),
        ("table.md", md.clone()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    plots(g, dir)?;
    Ok(md)
}
