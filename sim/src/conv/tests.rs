use super::*;
use firmware_protocol::direction::fill_direction;

fn shape() -> ConvGeometry {
    ConvGeometry {
        in_channels: 2,
        out_channels: 3,
        height: 5,
        width: 4,
        proj_dim: 3,
        projection_seed: 7,
    }
}

fn values(n: usize, a: usize, m: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * a % m) as f32 - (m / 2) as f32) * scale)
        .collect()
}

fn block(batch: usize) -> ConvBlock {
    let s = shape();
    let mut b = ConvBlock::new(s);
    let mut p = values(s.param_count(), 7, 13, 0.05);
    for c in 0..s.out_channels {
        p[c * s.channel_params() + s.kernel_len() + 1] = 1.0 + 0.1 * c as f32;
    }
    b.set_params(&p).unwrap();
    b.load_input(&values(batch * s.input_width(), 5, 11, 0.2))
        .unwrap();
    b
}

/// Conv -> BatchNorm -> ReLU -> (projection, pooling), written out loop by loop.
fn naive(
    s: &ConvGeometry,
    params: &[f32],
    x: &[f32],
    batch: usize,
    a: &[f32],
    stats: Option<(&[f32], &[f32])>,
) -> (Vec<f32>, Vec<f32>, Vec<(f64, f64)>) {
    let (h, w, cin, cout, d) = (s.height, s.width, s.in_channels, s.out_channels, s.proj_dim);
    let cp = s.channel_params();
    let mut y = vec![vec![0f64; batch * h * w]; cout];
    let mut batch_stats = Vec::new();
    for (c, yc) in y.iter_mut().enumerate() {
        let p = &params[c * cp..(c + 1) * cp];
        let mut z = vec![0f64; batch * h * w];
        for b in 0..batch {
            for i in 0..h {
                for j in 0..w {
                    let mut acc = p[cin * 9] as f64;
                    for ci in 0..cin {
                        for di in 0..3 {
                            for dj in 0..3 {
                                let (si, sj) = (i as isize + di - 1, j as isize + dj - 1);
                                if si < 0 || sj < 0 || si >= h as isize || sj >= w as isize {
                                    continue;
                                }
                                let xv =
                                    x[((b * cin + ci) * h + si as usize) * w + sj as usize] as f64;
                                acc += xv * p[ci * 9 + (di * 3 + dj) as usize] as f64;
                            }
                        }
                    }
                    z[(b * h + i) * w + j] = acc;
                }
            }
        }
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        batch_stats.push((mean, var));
        let (m, v) = match stats {
            Some((rm, rv)) => (rm[c] as f64, rv[c] as f64),
            None => (mean, var),
        };
        let (gamma, beta) = (p[cin * 9 + 1] as f64, p[cin * 9 + 2] as f64);
        for (yv, zv) in yc.iter_mut().zip(&z) {
            *yv = ((zv - m) / (v + 1e-5).sqrt() * gamma + beta).max(0.0);
        }
    }
    let hw = h * w;
    let mut features = vec![0f32; batch * cout * d];
    for b in 0..batch {
        for c in 0..cout {
            for i in 0..d {
                let row = &a[(c * d + i) * hw..][..hw];
                let u = &y[c][b * hw..][..hw];
                features[b * cout * d + c * d + i] =
                    row.iter().zip(u).map(|(a, u)| *a as f64 * u).sum::<f64>() as f32;
            }
        }
    }
    let (ph, pw) = (h / 2, w / 2);
    let mut pooled = vec![0f32; batch * cout * ph * pw];
    for b in 0..batch {
        for c in 0..cout {
            for i in 0..ph {
                for j in 0..pw {
                    let at = |di: usize, dj: usize| y[c][b * hw + (2 * i + di) * w + 2 * j + dj];
                    pooled[((b * cout + c) * ph + i) * pw + j] =
                        at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1)) as f32;
                }
            }
        }
    }
    (features, pooled, batch_stats)
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "[{i}] {x} vs {y}");
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn forward_matches_a_direct_implementation() {
    let batch = 3;
    let mut b = block(batch);
    let s = shape();
    let a = b.projection().to_vec();
    let (rm, rv) = (b.running_mean().to_vec(), b.running_var().to_vec());
    let (mut f, mut next) = (Vec::new(), Vec::new());
    b.forward(ForwardMode::Train, &mut f, &mut next).unwrap();
    let (ef, ep, stats) = naive(&s, b.params(), &b.input, batch, &a, None);
    assert_close(&f, &ef, 1e-5);
    assert_close(&next, &ep, 1e-5);
    assert_eq!(next.len(), batch * s.output_width());
    // One momentum-0.1 update with the unbiased variance.
    let n = (batch * s.spatial()) as f64;
    for c in 0..s.out_channels {
        let (mean, var) = stats[c];
        let em = 0.9 * rm[c] as f64 + 0.1 * mean;
        let ev = 0.9 * rv[c] as f64 + 0.1 * var * n / (n - 1.0);
        assert!((b.running_mean()[c] as f64 - em).abs() < 1e-6);
        assert!((b.running_var()[c] as f64 - ev).abs() < 1e-6);
    }
    // Evaluation normalises with the running statistics and commits nothing.
    let (rm, rv) = (b.running_mean().to_vec(), b.running_var().to_vec());
    b.forward(ForwardMode::Eval, &mut f, &mut next).unwrap();
    let (ef, ep, _) = naive(&s, b.params(), &b.input, batch, &a, Some((&rm, &rv)));
    assert_close(&f, &ef, 1e-5);
    assert_close(&next, &ep, 1e-5);
    assert_eq!(bits(&rm), bits(b.running_mean()));
    assert_eq!(bits(&rv), bits(b.running_var()));
}

#[test]
fn the_unfolded_inputs_follow_their_definition() {
    let (batch, s) = (3, shape());
    let mut b = block(batch);
    b.ensure_cols();
    b.ensure_cols_t();
    let (h, w, k, n) = (s.height, s.width, s.kernel_len(), batch * s.spatial());
    let ld = cols_t_stride(n);
    for bi in 0..batch {
        for (i, j) in (0..h).flat_map(|i| (0..w).map(move |j| (i, j))) {
            let col = (bi * h + i) * w + j;
            for t in 0..k {
                let (ci, di, dj) = (t / TAPS, t % TAPS / 3, t % 3);
                let (si, sj) = ((i + di) as isize - 1, (j + dj) as isize - 1);
                let inside = si >= 0 && sj >= 0 && si < h as isize && sj < w as isize;
                let x = if inside {
                    b.input[((bi * s.in_channels + ci) * h + si as usize) * w + sj as usize]
                } else {
                    0.0
                };
                assert_eq!(b.unfolded.cols[col * k + t].to_bits(), x.to_bits());
                assert_eq!(b.unfolded.cols_t[t * ld + col].to_bits(), x.to_bits());
            }
        }
    }
}

#[test]
fn taps_path_statistics_equal_the_stored_pre_activations() {
    // The taps path takes the batch statistics from the input's Gram matrix instead of the
    // stored values; a large bias and an input with a large mean make the variance a
    // difference of large sums.
    let s = shape();
    let mut b = block(4);
    let mut p = b.params().to_vec();
    p[s.kernel_len()] = 50.0;
    b.set_params(&p).unwrap();
    let x: Vec<f32> = values(4 * s.input_width(), 5, 11, 0.2)
        .iter()
        .map(|v| v + 30.0)
        .collect();
    b.load_input(&x).unwrap();
    assert!(b.taps_path());
    b.refresh_preactivation();
    let n = b.columns();
    for c in 0..s.out_channels {
        let (mean, var) = b.clean.z0_stats[c];
        let (m, v) = batch_stats(&b.clean.z0[c * n..(c + 1) * n]);
        assert!(
            (mean - m).abs() <= 1e-6 * m.abs().max(1.0),
            "{c}: {mean} vs {m}"
        );
        assert!((var - v).abs() <= 1e-5 * v, "{c}: {var} vs {v}");
    }
}

#[test]
fn the_projection_is_seeded_and_scaled_by_the_map_size() {
    let s = ConvGeometry {
        in_channels: 1,
        out_channels: 4,
        height: 16,
        width: 16,
        proj_dim: 16,
        projection_seed: 3,
    };
    let a = projection_matrix(&s);
    assert_eq!(a, projection_matrix(&s));
    assert_ne!(
        a,
        projection_matrix(&ConvGeometry {
            projection_seed: 4,
            ..s
        })
    );
    assert_eq!(a.len(), 4 * 16 * 256);
    let var = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len() as f64;
    // 16384 draws: the sample variance is within a few percent of 1/HW.
    assert!((var * 256.0 - 1.0).abs() < 0.05, "{}", var * 256.0);
}

#[test]
fn perturbed_evaluation_leaves_no_trace() {
    for (choreography, recompute_max_k) in [
        (Choreography::Fast, RECOMPUTE_MAX_K),
        (Choreography::Fast, 0),
        (Choreography::Reference, RECOMPUTE_MAX_K),
    ] {
        let mut b = block(4);
        b.set_choreography(choreography);
        b.fast.recompute_max_k = recompute_max_k;
        let (mut f, mut next) = (Vec::new(), Vec::new());
        b.forward(ForwardMode::Train, &mut f, &mut next).unwrap();
        let (params, rm, rv) = (
            bits(b.params()),
            bits(b.running_mean()),
            bits(b.running_var()),
        );
        let (mut eval_before, mut next_before) = (Vec::new(), Vec::new());
        b.forward(ForwardMode::Eval, &mut eval_before, &mut next_before)
            .unwrap();
        let mut out = Vec::new();
        let seeds = [DirectionSeed(1), DirectionSeed(2)];
        b.evaluate_perturbed(5..60, &seeds, 1e-2, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_ne!(out[0].0, out[0].1, "the perturbation changed nothing");
        assert_eq!(params, bits(b.params()));
        assert_eq!(rm, bits(b.running_mean()));
        assert_eq!(rv, bits(b.running_var()));
        b.forward(ForwardMode::Eval, &mut f, &mut next).unwrap();
        assert_eq!(bits(&eval_before), bits(&f));
        assert_eq!(bits(&next_before), bits(&next));
    }
}

/// Trains a block for a few chunked steps under one choreography; returns every
/// evaluation's features and the final parameters and running statistics.
fn run(
    choreography: Choreography,
    recompute_max_k: usize,
    chunks: &[Range<usize>],
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let mut b = block(3);
    b.set_choreography(choreography);
    b.fast.recompute_max_k = recompute_max_k;
    let mut seen = Vec::new();
    let mut out = Vec::new();
    let (mut f, mut next) = (Vec::new(), Vec::new());
    for (k, chunk) in chunks.iter().enumerate() {
        // Six directions: the fast path takes four at a time, then the remaining two.
        let seeds: Vec<_> = (0..6).map(|p| DirectionSeed((k * 10 + p) as u64)).collect();
        b.evaluate_perturbed(chunk.clone(), &seeds, 1e-2, &mut out)
            .unwrap();
        for (plus, minus) in &out {
            seen.push(plus.clone());
            seen.push(minus.clone());
        }
        let terms: Vec<_> = seeds
            .iter()
            .enumerate()
            .map(|(i, s)| UpdateTerm {
                seed: *s,
                derivative: (i as f32 - 2.5) * 0.4,
            })
            .collect();
        b.apply_update(chunk.clone(), 0.05, &terms).unwrap();
        if k % 2 == 1 {
            b.forward(ForwardMode::Train, &mut f, &mut next).unwrap();
            seen.push(f.clone());
            seen.push(next.clone());
        }
    }
    b.forward(ForwardMode::Eval, &mut f, &mut next).unwrap();
    seen.push(f);
    let mut state = b.params().to_vec();
    state.extend_from_slice(b.running_mean());
    state.extend_from_slice(b.running_var());
    (seen, state)
}

#[test]
fn fast_path_agrees_with_the_reference_choreography() {
    // 3 channels of 21 parameters: whole channels, one channel, the BatchNorm parts only,
    // chunks that start and end mid-channel, and the whole block.
    let chunks = [0..63, 21..42, 40..42, 5..30, 19..20, 41..62, 0..63];
    let (reference, ref_state) = run(Choreography::Reference, RECOMPUTE_MAX_K, &chunks);
    // Both strategies of the fast path: dz recomputed per tile (this block's 18 taps), and
    // materialised in one product, which also moves the clean pre-activation along the
    // update instead of recomputing it.
    for recompute_max_k in [RECOMPUTE_MAX_K, 0] {
        let (fast, fast_state) = run(Choreography::Fast, recompute_max_k, &chunks);
        assert_eq!(fast.len(), reference.len());
        // The same update arithmetic runs on both. The activations differ by the rounding
        // of `w + eps v` against `z0 + eps dz` (a few f32 ulps, then divided by the batch's
        // standard deviation); the parameters only through the clean passes' running
        // statistics, which both compute from the same parameters.
        assert_eq!(
            bits(&fast_state[..63]),
            bits(&ref_state[..63]),
            "parameters differ"
        );
        assert_close(&fast_state, &ref_state, 1e-6);
        for (a, b) in fast.iter().zip(&reference) {
            assert_close(a, b, 2e-5);
        }
    }
}

#[test]
fn a_chunk_changes_only_its_channels_features() {
    for recompute_max_k in [RECOMPUTE_MAX_K, 0] {
        let mut b = block(3);
        b.fast.recompute_max_k = recompute_max_k;
        let (mut f, mut next) = (Vec::new(), Vec::new());
        b.forward(ForwardMode::Train, &mut f, &mut next).unwrap();
        let mut out = Vec::new();
        // Channel 1's parameters only.
        b.evaluate_perturbed(21..42, &[DirectionSeed(9)], 1e-2, &mut out)
            .unwrap();
        let d = shape().proj_dim;
        for (row_f, row_p) in f.chunks(9).zip(out[0].0.chunks(9)) {
            assert_eq!(bits(&row_f[..d]), bits(&row_p[..d]));
            assert_eq!(bits(&row_f[2 * d..]), bits(&row_p[2 * d..]));
            assert_ne!(bits(&row_f[d..2 * d]), bits(&row_p[d..2 * d]));
        }
    }
}

#[test]
fn cached_update_equals_the_protocol_update() {
    crate::device::assert_cached_update_is_the_protocol_update(&mut block(2), 2..47);
}

#[test]
fn recorded_vectors_equal_seeded_directions() {
    let mut b = block(2);
    let mut v = vec![0.0; 30];
    fill_direction(DirectionSeed(4), &mut v);
    let (mut by_seed, mut by_vector) = (Vec::new(), Vec::new());
    b.evaluate_perturbed(10..40, &[DirectionSeed(4)], 1e-3, &mut by_seed)
        .unwrap();
    b.evaluate_perturbed_vectors(10..40, [&v[..]], 1e-3, &mut by_vector)
        .unwrap();
    assert_eq!(by_seed, by_vector);
}

#[test]
fn bad_requests_are_refused() {
    let mut b = ConvBlock::new(shape());
    assert_eq!(
        b.set_params(&[0.0; 3]),
        Err(SimError::ParameterCount {
            expected: 63,
            got: 3
        })
    );
    assert!(matches!(
        b.load_input(&[0.0; 41]),
        Err(SimError::InputShape { width: 40, .. })
    ));
    let (mut f, mut next) = (Vec::new(), Vec::new());
    assert_eq!(
        b.forward(ForwardMode::Train, &mut f, &mut next),
        Err(SimError::NoInput)
    );
    assert!(matches!(
        b.apply_update(60..64, 1.0, &[]),
        Err(SimError::ChunkOutOfRange { .. })
    ));
    assert!(matches!(
        b.set_projection(&[0.0; 5]),
        Err(SimError::BufferLength { .. })
    ));
    assert!(matches!(
        b.set_running_stats(&[0.0; 3], &[1.0; 2]),
        Err(SimError::BufferLength { .. })
    ));
    b.load_input(&[0.0; 80]).unwrap();
    assert!(matches!(
        b.evaluate_perturbed_vectors(0..10, [&[0.0f32; 9][..]], 1e-3, &mut Vec::new()),
        Err(SimError::BufferLength { .. })
    ));
    assert!(
        ConvGeometry {
            height: 1,
            ..shape()
        }
        .check()
        .is_err()
    );
}
