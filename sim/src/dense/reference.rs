//! The literal choreography of Algorithm 1 on a dense layer: perturb, evaluate, restore. The
//! path every fast one is held to.

use std::ops::Range;

use firmware_protocol::DirectionSeed;

use super::DenseLayer;

impl DenseLayer {
    /// The literal choreography: perturb the chunk by `+eps v`, evaluate, by `-eps v`, evaluate,
    /// restore. The chunk is saved and copied back, so the parameters are bit-identical
    /// afterwards (adding `+eps, -2eps, +eps` in floating point would not be).
    pub(super) fn perturbed_reference(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
    ) {
        let len = chunk.len();
        self.saved.clear();
        self.saved.extend_from_slice(&self.params[chunk.clone()]);
        // The effective weights of the chunk's weight part are recomputed for each perturbed
        // target (not a write: programming error and drift clock stay) and restored after.
        let nw = self.n_out * self.n_in;
        let weight_part = chunk.start.min(nw)..chunk.end.min(nw);
        self.saved_effective.clear();
        if !self.effective.is_empty() {
            self.saved_effective
                .extend_from_slice(&self.effective[weight_part.clone()]);
        }
        for (seed, (plus, minus)) in seeds.iter().zip(out.iter_mut()) {
            let v = self
                .directions
                .get(*seed, len)
                .expect("prepared by the caller");
            for (sign, target) in [(1.0f32, &mut *plus), (-1.0, &mut *minus)] {
                for ((w, w0), vi) in self.params[chunk.clone()]
                    .iter_mut()
                    .zip(&self.saved)
                    .zip(v)
                {
                    *w = w0 + sign * eps * vi;
                }
                if let Some(device) = self.device.as_deref()
                    && !self.effective.is_empty()
                {
                    device.effective_range(&self.params, weight_part.clone(), &mut self.effective);
                }
                self.forward_on(&self.params, target);
            }
            self.params[chunk.clone()].copy_from_slice(&self.saved);
        }
        if !self.effective.is_empty() {
            self.effective[weight_part].copy_from_slice(&self.saved_effective);
        }
    }
}
