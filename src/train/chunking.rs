//! Cutting `M_l` into the chunks of thesis section 4.4 (the rule for `W_l` is the layer shape's:
//! [`crate::oracle::LayerShape::weight_chunks`]).

use std::ops::Range;

/// Chunks of `M_l` (rows x classes, row-major): whole rows, as many as fit in `chunk_max`
/// parameters (at least one row per chunk). Returned as row ranges.
pub fn projection_row_chunks(rows: usize, classes: usize, chunk_max: usize) -> Vec<Range<usize>> {
    let per_chunk = (chunk_max / classes).max(1);
    (0..rows)
        .step_by(per_chunk)
        .map(|start| start..(start + per_chunk).min(rows))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_chunks_are_whole_rows() {
        assert_eq!(projection_row_chunks(50, 10, 50_000), vec![0..50]);
        assert_eq!(
            projection_row_chunks(2048, 100, 50_000),
            vec![0..500, 500..1000, 1000..1500, 1500..2000, 2000..2048]
        );
        assert_eq!(projection_row_chunks(3, 100, 10), vec![0..1, 1..2, 2..3]);
    }
}
