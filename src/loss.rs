//! The local loss of Mono-Forward: mean softmax cross-entropy of the goodness (thesis eq. 3).

/// Mean over the batch of `-log softmax(g)_y`, by log-sum-exp in f64 (with `libm`, so the value
/// is the same on every machine). `logits` is rows x classes, row-major.
pub fn cross_entropy(logits: &[f32], classes: usize, labels: &[u8]) -> f64 {
    assert_eq!(
        logits.len(),
        labels.len() * classes,
        "logits and labels disagree"
    );
    let total: f64 = logits
        .chunks_exact(classes)
        .zip(labels)
        .map(|(row, &y)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let sum: f64 = row.iter().map(|&x| libm::exp(x as f64 - max)).sum();
            max + libm::log(sum) - row[y as usize] as f64
        })
        .sum();
    total / labels.len() as f64
}

/// The index of the largest value of each row (the first on ties).
pub fn argmax_rows(logits: &[f32], classes: usize) -> impl Iterator<Item = usize> + '_ {
    logits.chunks_exact(classes).map(|row| {
        row.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv { (i, v) } else { (bi, bv) }
            })
            .0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_definition_and_is_stable() {
        let logits = [1.0f32, 2.0, 3.0, 0.0, 0.0, 0.0];
        let labels = [2u8, 0];
        let l0 = -((3f64).exp() / (1f64.exp() + 2f64.exp() + 3f64.exp())).ln();
        let l1 = (3f64).ln();
        assert!((cross_entropy(&logits, 3, &labels) - (l0 + l1) / 2.0).abs() < 1e-12);
        // Large logits do not overflow.
        let big = [1000.0f32, 0.0];
        assert!((cross_entropy(&big, 2, &[0]) - 0.0).abs() < 1e-12);
        assert!((cross_entropy(&big, 2, &[1]) - 1000.0).abs() < 1e-9);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        let v: Vec<usize> = argmax_rows(&[0.0, 2.0, 2.0, 5.0, 1.0, 0.0], 3).collect();
        assert_eq!(v, vec![1, 0]);
    }
}
