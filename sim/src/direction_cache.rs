//! Directions generated for a perturbed evaluation, kept until the update that follows it, so
//! that the simulator draws each direction once per step rather than twice (and, through
//! `fill_direction_recent`, the host's shadow update copies them instead of drawing them again).

use firmware_protocol::direction::fill_direction_recent;
use firmware_protocol::{DirectionSeed, UpdateTerm};

#[derive(Default, Debug)]
pub struct DirectionCache {
    len: usize,
    seeds: Vec<DirectionSeed>,
    vectors: Vec<Vec<f32>>,
}

impl DirectionCache {
    /// Fills the cache with the directions of `seeds` for chunks of length `len`.
    pub fn prepare(&mut self, seeds: &[DirectionSeed], len: usize) {
        self.len = len;
        self.seeds.clear();
        self.seeds.extend_from_slice(seeds);
        if self.vectors.len() < seeds.len() {
            self.vectors.resize_with(seeds.len(), Vec::new);
        }
        for (seed, v) in seeds.iter().zip(&mut self.vectors) {
            v.resize(len, 0.0);
            fill_direction_recent(*seed, v);
        }
    }

    /// The cached vector for `seed`, if it was prepared for chunks of length `len`.
    pub fn get(&self, seed: DirectionSeed, len: usize) -> Option<&[f32]> {
        if len != self.len {
            return None;
        }
        let i = self.seeds.iter().position(|s| *s == seed)?;
        Some(&self.vectors[i][..len])
    }

    /// Prepares the directions of an update's terms unless every one is cached already.
    pub fn ensure(&mut self, terms: &[UpdateTerm], len: usize) {
        if terms.iter().any(|t| self.get(t.seed, len).is_none()) {
            let seeds: Vec<DirectionSeed> = terms.iter().map(|t| t.seed).collect();
            self.prepare(&seeds, len);
        }
    }
}
