//! Gathering a sweep: each cell's state and summary, and mean ± std over seeds per group of
//! cells that differ only in their seed, and per value of each axis (the paper's tables report
//! means ± std over 3 seeds, section 5). Written out by [`crate::report::sweep_gather`].

use super::cell::{CellDir, CellState};
use super::spec::SEED_KEY;
use super::{Cell, Plan, SweepDir};

/// Mean and sample standard deviation (n − 1; 0 for one value) of some figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
}

impl Stat {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let v: Vec<f64> = values.into_iter().collect();
        let n = v.len();
        if n == 0 {
            return Self::default();
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Self { n, mean, std }
    }
}

/// The figures of some finished cells.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    pub accuracy_cumulative: Stat,
    pub accuracy_final_layer: Stat,
    pub train_seconds: Stat,
    pub oracle_evaluations: Stat,
}

impl Figures {
    fn of<'a>(cells: impl Iterator<Item = &'a GatheredCell> + Clone) -> Self {
        let done = cells.filter_map(|c| match &c.state {
            CellState::Done(s) => Some(s),
            _ => None,
        });
        Self {
            accuracy_cumulative: Stat::of(done.clone().map(|s| s.test_accuracy_cumulative)),
            accuracy_final_layer: Stat::of(done.clone().map(|s| s.test_accuracy_final_layer)),
            train_seconds: Stat::of(done.clone().map(|s| s.train_seconds)),
            oracle_evaluations: Stat::of(done.map(|s| s.oracle_evaluations as f64)),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GatheredCell {
    pub cell: Cell,
    pub state: CellState,
}

/// Cells that differ only in their seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// The non-seed axes' values, in axis order.
    pub values: Vec<(String, String)>,
    /// Seeds whose cell is done.
    pub seeds_done: Vec<u64>,
    /// Seeds whose cell is not.
    pub seeds_missing: Vec<u64>,
    pub figures: Figures,
}

/// All cells with one value of one axis.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisValue {
    pub axis: String,
    pub value: String,
    pub figures: Figures,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Gathered {
    pub name: String,
    /// The axes other than the seed.
    pub axes: Vec<String>,
    pub cells: Vec<GatheredCell>,
    pub groups: Vec<Group>,
    pub by_axis: Vec<AxisValue>,
}

impl Gathered {
    /// The cells that are not done, with their state.
    pub fn missing(&self) -> impl Iterator<Item = &GatheredCell> {
        self.cells
            .iter()
            .filter(|c| !matches!(c.state, CellState::Done(_)))
    }
}

/// Reads every cell of `plan` in `dir` and works out the groups and axis values.
pub fn gather(dir: &SweepDir, plan: &Plan) -> Gathered {
    let cells: Vec<GatheredCell> = plan
        .cells
        .iter()
        .map(|c| GatheredCell {
            cell: c.clone(),
            state: CellDir(dir.cell_dir(c.index)).state(),
        })
        .collect();
    let axes: Vec<String> = plan
        .axes
        .iter()
        .filter(|a| *a != SEED_KEY)
        .cloned()
        .collect();
    let key_of = |c: &Cell| -> Vec<(String, String)> {
        axes.iter()
            .map(|a| (a.clone(), c.value_of(a).unwrap_or_else(|| "-".into())))
            .collect()
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        let key = key_of(&c.cell);
        let g = match groups.iter().position(|g| g.values == key) {
            Some(g) => g,
            None => {
                groups.push(Group {
                    values: key,
                    seeds_done: Vec::new(),
                    seeds_missing: Vec::new(),
                    figures: Figures::default(),
                });
                members.push(Vec::new());
                groups.len() - 1
            }
        };
        members[g].push(i);
        match c.state {
            CellState::Done(_) => groups[g].seeds_done.push(c.cell.seed()),
            _ => groups[g].seeds_missing.push(c.cell.seed()),
        }
    }
    for (g, m) in groups.iter_mut().zip(&members) {
        g.figures = Figures::of(m.iter().map(|&i| &cells[i]));
    }
    let mut by_axis = Vec::new();
    for axis in &axes {
        let mut values: Vec<String> = Vec::new();
        for c in &cells {
            let v = c.cell.value_of(axis).unwrap_or_else(|| "-".into());
            if !values.contains(&v) {
                values.push(v);
            }
        }
        for value in values {
            let figures = Figures::of(
                cells
                    .iter()
                    .filter(|c| c.cell.value_of(axis).unwrap_or_else(|| "-".into()) == value),
            );
            by_axis.push(AxisValue {
                axis: axis.clone(),
                value,
                figures,
            });
        }
    }
    Gathered {
        name: plan.name.clone(),
        axes,
        cells,
        groups,
        by_axis,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_the_mean_and_sample_std() {
        let s = Stat::of([0.8, 0.9, 1.0]);
        assert_eq!(s.n, 3);
        assert!((s.mean - 0.9).abs() < 1e-12);
        assert!((s.std - 0.1).abs() < 1e-12);
        assert_eq!(Stat::of([0.5]).std, 0.0);
        assert_eq!(Stat::of([]).n, 0);
    }
}
