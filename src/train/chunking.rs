//! Cutting parameters into the chunks of thesis section 4.4.

use std::ops::Range;

use crate::oracle::ChunkUnits;

/// Chunks of `W_l`: consecutive ranges of at most `chunk_max` parameters over the flat layout
/// (weights then bias); with [`ChunkUnits::Groups`], whole groups are accumulated until the next
/// one would exceed `chunk_max` (a group larger than `chunk_max` is a chunk by itself).
pub fn weight_chunks(
    units: &ChunkUnits,
    param_count: usize,
    chunk_max: usize,
) -> Vec<Range<usize>> {
    assert!(chunk_max > 0, "chunk_max must be positive");
    match *units {
        ChunkUnits::Flat => (0..param_count)
            .step_by(chunk_max)
            .map(|start| start..(start + chunk_max).min(param_count))
            .collect(),
        ChunkUnits::Groups { size } => {
            assert!(
                size > 0 && param_count.is_multiple_of(size),
                "groups of {size} must cover the {param_count} parameters"
            );
            let per_chunk = (chunk_max / size).max(1) * size;
            (0..param_count)
                .step_by(per_chunk)
                .map(|start| start..(start + per_chunk).min(param_count))
                .collect()
        }
    }
}

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
    fn flat_chunks_cover_consecutively_and_respect_the_bound() {
        let chunks = weight_chunks(&ChunkUnits::Flat, 120_300, 50_000);
        assert_eq!(chunks, vec![0..50_000, 50_000..100_000, 100_000..120_300]);
        // The MNIST MLP's first layer fits one chunk (section 4.5).
        assert_eq!(
            weight_chunks(&ChunkUnits::Flat, 39_250, 50_000),
            vec![0..39_250]
        );
    }

    #[test]
    fn groups_are_never_split() {
        let chunks = weight_chunks(&ChunkUnits::Groups { size: 10 }, 60, 25);
        assert_eq!(chunks, vec![0..20, 20..40, 40..60]);
        // A group larger than the bound is a chunk by itself.
        let chunks = weight_chunks(&ChunkUnits::Groups { size: 30 }, 60, 25);
        assert_eq!(chunks, vec![0..30, 30..60]);
    }

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
