//! The stages of a block's forward pass as free functions: convolution, batch statistics,
//! BatchNorm + ReLU, projection and max pooling.

use super::*;

/// `z[c] = W_c ⊛ x + b_c` for the channels `channels`, as one product of the weights (rows of
/// the flat parameters, stride channel_params) with the unfolded input; `z` holds those
/// channels' rows (channels.len() x n).
pub(super) fn convolve(
    shape: &ConvGeometry,
    params: &[f32],
    channels: Range<usize>,
    cols: &[f32],
    n: usize,
    z: &mut [f32],
) {
    let (cp, k) = (shape.channel_params(), shape.kernel_len());
    for (j, c) in channels.clone().enumerate() {
        z[j * n..(j + 1) * n].fill(params[c * cp + k]);
    }
    let weights = View {
        data: &params[channels.start * cp..],
        rows: channels.len(),
        cols: k,
        ld: cp,
    };
    gemm_into(weights, View::new(cols, n, k), true, z, n, true);
}

/// Mean and biased variance of one channel over the batch and the map (f64, two passes, eight
/// interleaved partial sums so the loop vectorises).
pub(super) fn batch_stats(z: &[f32]) -> (f64, f64) {
    let n = z.len() as f64;
    let sum = lanes_sum(z, |x| x as f64);
    let mean = sum / n;
    let sq = lanes_sum(z, |x| {
        let d = x as f64 - mean;
        d * d
    });
    (mean, sq / n)
}

pub(super) fn lanes_sum(z: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let blocks = z.chunks_exact(8);
    let rest = blocks.remainder();
    for block in blocks {
        for (l, x) in lanes.iter_mut().zip(block) {
            *l += f(*x);
        }
    }
    for (l, x) in lanes.iter_mut().zip(rest) {
        *l += f(*x);
    }
    lanes.iter().sum()
}

/// BatchNorm as one affine map per channel: `alpha = gamma / sqrt(var + eps)` and
/// `shift = beta - mean alpha` (PyTorch's CPU kernel form).
pub(super) fn bn_affine(mean: f64, var: f64, gamma: f32, beta: f32) -> (f32, f32) {
    let alpha = gamma as f64 / (var + BN_EPS).sqrt();
    ((alpha) as f32, (beta as f64 - mean * alpha) as f32)
}

/// `y = ReLU(gamma (z - mean) / sqrt(var + eps) + beta)`, as `y = max(0, z alpha + shift)` with
/// `alpha = gamma / sqrt(var + eps)` and `shift = beta - mean alpha` (PyTorch's CPU kernel form).
pub(super) fn bn_relu(z: &[f32], mean: f64, var: f64, gamma: f32, beta: f32, y: &mut [f32]) {
    let (alpha, shift) = bn_affine(mean, var, gamma, beta);
    for (y, z) in y.iter_mut().zip(z) {
        *y = (z * alpha + shift).max(0.0);
    }
}

/// Section 4.4: `features[b, c*d + i] = sum_j A_c[i, j] y_c[b, j]`, i.e. `Y_c (B x HW) · A_cᵀ`
/// written into the channel's d columns of `features` (B x C*d).
pub(super) fn project_channel(
    shape: &ConvGeometry,
    projection: &[f32],
    c: usize,
    batch: usize,
    y: &[f32],
    features: &mut [f32],
) {
    let (d, hw) = (shape.proj_dim, shape.spatial());
    let a = &projection[c * d * hw..(c + 1) * d * hw];
    gemm_into(
        View::new(y, batch, hw),
        View::new(a, d, hw),
        true,
        &mut features[c * d..],
        shape.feature_width(),
        false,
    );
}

/// `MaxPool2d(2, 2)` of the channel-major map `y` (C x B x H x W) into `next` (B x C x H/2 x W/2).
pub(super) fn max_pool(shape: &ConvGeometry, batch: usize, y: &[f32], next: &mut Vec<f32>) {
    let (h, w) = (shape.height, shape.width);
    let (ph, pw) = shape.pooled();
    let c_out = shape.out_channels;
    next.clear();
    next.resize(batch * c_out * ph * pw, 0.0);
    for c in 0..c_out {
        for b in 0..batch {
            let map = &y[(c * batch + b) * h * w..][..h * w];
            let dst = &mut next[(b * c_out + c) * ph * pw..][..ph * pw];
            for i in 0..ph {
                let (r0, r1) = (&map[2 * i * w..][..w], &map[(2 * i + 1) * w..][..w]);
                for (j, o) in dst[i * pw..(i + 1) * pw].iter_mut().enumerate() {
                    *o = r0[2 * j]
                        .max(r0[2 * j + 1])
                        .max(r1[2 * j])
                        .max(r1[2 * j + 1]);
                }
            }
        }
    }
}
