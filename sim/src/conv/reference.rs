//! The literal choreography of Algorithm 1 and section 4.4 on a conv block: snapshot, perturb,
//! forward, restore. The path every fast one is held to.

use super::*;

impl ConvBlock {
    /// The literal choreography of Algorithm 1 and section 4.4: snapshot the running
    /// statistics, perturb the chunk by `+eps v`, run the whole training-mode forward pass
    /// (which updates the running statistics, as a PyTorch module would), by `-eps v`, again,
    /// then restore the chunk and the running statistics from their copies (bit-identical, where
    /// adding `+eps, -2eps, +eps` would not be).
    pub(super) fn perturbed_reference(
        &mut self,
        perturbation: &Perturbation,
        eps: f32,
        out: &mut [(Vec<f32>, Vec<f32>)],
    ) {
        let Perturbation {
            chunk,
            channels,
            offset,
            ..
        } = perturbation;
        self.ensure_cols();
        let block = channels.len() * self.shape.channel_params();
        let n = self.columns();
        let c_out = self.shape.out_channels;
        let (cp, k) = (self.shape.channel_params(), self.shape.kernel_len());
        self.scratch.saved.clear();
        self.scratch
            .saved
            .extend_from_slice(&self.params[chunk.clone()]);
        self.scratch.saved_stats = (self.running_mean.clone(), self.running_var.clone());
        for (p, (plus, minus)) in out.iter_mut().enumerate() {
            let v = &self.fast.stacked[p * block + offset..][..chunk.len()];
            for (sign, target) in [(1.0f32, &mut *plus), (-1.0, &mut *minus)] {
                for ((w, w0), vi) in self.params[chunk.clone()]
                    .iter_mut()
                    .zip(&self.scratch.saved)
                    .zip(v)
                {
                    *w = w0 + sign * eps * vi;
                }
                self.scratch.z_scratch.resize(c_out * n, 0.0);
                convolve(
                    &self.shape,
                    &self.params,
                    0..c_out,
                    &self.unfolded.cols,
                    n,
                    &mut self.scratch.z_scratch,
                );
                target.clear();
                target.resize(self.batch * self.shape.feature_width(), 0.0);
                self.scratch.y_scratch.resize(n, 0.0);
                for c in 0..c_out {
                    let z = &self.scratch.z_scratch[c * n..(c + 1) * n];
                    let (mean, var) = batch_stats(z);
                    let (gamma, beta) = (self.params[c * cp + k + 1], self.params[c * cp + k + 2]);
                    bn_relu(z, mean, var, gamma, beta, &mut self.scratch.y_scratch);
                    let unbiased = var * n as f64 / (n - 1) as f64;
                    let (rm, rv) = (&mut self.running_mean[c], &mut self.running_var[c]);
                    *rm = ((1.0 - BN_MOMENTUM) * *rm as f64 + BN_MOMENTUM * mean) as f32;
                    *rv = ((1.0 - BN_MOMENTUM) * *rv as f64 + BN_MOMENTUM * unbiased) as f32;
                    project_channel(
                        &self.shape,
                        &self.projection,
                        c,
                        self.batch,
                        &self.scratch.y_scratch,
                        target,
                    );
                }
            }
            self.params[chunk.clone()].copy_from_slice(&self.scratch.saved);
        }
        self.running_mean
            .copy_from_slice(&self.scratch.saved_stats.0);
        self.running_var
            .copy_from_slice(&self.scratch.saved_stats.1);
    }
}
