//! The local loss of Mono-Forward: mean softmax cross-entropy of the goodness (thesis eq. 3).

/// Mean over the batch of `-log softmax(g)_y`, by log-sum-exp in f64. `logits` is rows x
/// classes, row-major. The exponentials use [`exp_nonpositive`], a fixed polynomial in plain f64
/// arithmetic that the compiler vectorises, so the value is the same on every machine.
pub fn cross_entropy(logits: &[f32], classes: usize, labels: &[u8]) -> f64 {
    assert_eq!(
        logits.len(),
        labels.len() * classes,
        "logits and labels disagree"
    );
    const ROWS: usize = 16;
    let mut total = 0f64;
    let mut shifted = [0f64; 2048];
    for (block, block_labels) in logits.chunks(ROWS * classes).zip(labels.chunks(ROWS)) {
        let rows = block_labels.len();
        let mut correct = [0f64; ROWS];
        if classes * rows > shifted.len() {
            // Very many classes: one row at a time.
            for (row, &y) in block.chunks_exact(classes).zip(block_labels) {
                total += row_loss(row, y);
            }
            continue;
        }
        for (r, (row, &y)) in block.chunks_exact(classes).zip(block_labels).enumerate() {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            for (s, &x) in shifted[r * classes..(r + 1) * classes].iter_mut().zip(row) {
                *s = x as f64 - max;
            }
            correct[r] = row[y as usize] as f64 - max;
        }
        let shifted = &mut shifted[..rows * classes];
        shifted.iter_mut().for_each(|x| *x = exp_nonpositive(*x));
        for (r, sums) in shifted.chunks_exact(classes).enumerate() {
            total += libm::log(sums.iter().sum::<f64>()) - correct[r];
        }
    }
    total / labels.len() as f64
}

fn row_loss(row: &[f32], y: u8) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| exp_nonpositive(x as f64 - max)).sum();
    libm::log(sum) - (row[y as usize] as f64 - max)
}

/// `e^x` for `x <= 0` (the shifted logits of a log-sum-exp), relative error below 1e-15, and
/// below 1e-300 in absolute terms under `x = -708` (where it returns `e^-708`). Range reduction
/// `x = k ln 2 + r`, `|r| <= ln 2 / 2`, rounding by the 1.5 * 2^52 trick; `e^r` by its Taylor
/// series to `r^13`; `2^k` assembled in the exponent bits. Branch-free so it vectorises.
#[inline(always)]
pub fn exp_nonpositive(x: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    // ln 2 split (as in fdlibm): the high part has trailing zero bits, so k * LN2_HI is exact.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    let x = x.max(-708.0);
    let t = x * std::f64::consts::LOG2_E + MAGIC;
    let k = t - MAGIC;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 6_227_020_800.0; // 1/13!
    for d in [
        479_001_600.0,
        39_916_800.0,
        3_628_800.0,
        362_880.0,
        40_320.0,
        5_040.0,
        720.0,
        120.0,
        24.0,
        6.0,
        2.0,
        1.0,
        1.0,
    ] {
        p = p * r + 1.0 / d;
    }
    let ki = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    p * f64::from_bits(((ki + 1023) as u64) << 52)
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
    fn the_exponential_is_accurate_from_0_to_minus_745() {
        let mut worst = 0f64;
        let mut x = 0.0f64;
        while x > -708.0 {
            let rel = (exp_nonpositive(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x -= 0.01234567;
        }
        assert!(worst < 2e-15, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-745.0) < 1e-300 && exp_nonpositive(-745.0) >= 0.0);
        assert!(exp_nonpositive(f64::NEG_INFINITY) < 1e-300);
    }

    #[test]
    fn many_classes_and_partial_blocks_agree_with_the_definition() {
        for (classes, rows) in [(10usize, 37usize), (100, 21), (1500, 3)] {
            let logits: Vec<f32> = (0..rows * classes)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 100.0)
                .collect();
            let labels: Vec<u8> = (0..rows)
                .map(|r| (r * 13 % classes.min(256)) as u8)
                .collect();
            let expect: f64 = logits
                .chunks_exact(classes)
                .zip(&labels)
                .map(|(row, &y)| {
                    let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
                        - row[y as usize] as f64
                })
                .sum::<f64>()
                / rows as f64;
            let got = cross_entropy(&logits, classes, &labels);
            assert!(
                (got - expect).abs() < 1e-12,
                "{classes} classes: {got} vs {expect}"
            );
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        let v: Vec<usize> = argmax_rows(&[0.0, 2.0, 2.0, 5.0, 1.0, 0.0], 3).collect();
        assert_eq!(v, vec![1, 0]);
    }
}
