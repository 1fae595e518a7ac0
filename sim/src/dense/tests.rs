use super::*;

fn layer() -> DenseLayer {
    let mut l = DenseLayer::new(6, 4);
    let p: Vec<f32> = (0..l.param_count())
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
        .collect();
    l.set_params(&p).unwrap();
    let x: Vec<f32> = (0..3 * 6)
        .map(|i| ((i * 5 % 7) as f32 - 3.0) / 3.0)
        .collect();
    l.load_input(&x).unwrap();
    l
}

#[test]
fn forward_is_relu_of_affine_map() {
    let mut l = layer();
    let mut out = Vec::new();
    l.forward(&mut out).unwrap();
    let (w, b) = l.params().split_at(24);
    for s in 0..3 {
        for o in 0..4 {
            let z: f32 = (0..6)
                .map(|i| l.input.dense[s * 6 + i] * w[o * 6 + i])
                .sum::<f32>()
                + b[o];
            assert!((out[s * 4 + o] - z.max(0.0)).abs() < 1e-5);
        }
    }
}

#[test]
fn perturbed_evaluation_restores_parameters_bit_for_bit() {
    let mut l = layer();
    let before = l.params().to_vec();
    let mut out = Vec::new();
    let seeds = [DirectionSeed(1), DirectionSeed(2), DirectionSeed(3)];
    l.evaluate_perturbed(3..20, &seeds, 1e-3, &mut out).unwrap();
    assert_eq!(out.len(), 3);
    assert!(out[0].0 != out[0].1, "perturbation changed nothing");
    assert_eq!(
        before.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        l.params().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn cached_update_equals_the_protocol_update() {
    crate::device::assert_cached_update_is_the_protocol_update(&mut layer(), 2..17);
}

#[test]
fn a_sparse_input_is_dropped_when_the_choreography_leaves_the_fast_path() {
    let mut l = layer();
    // Mostly background: held as sparse rows only.
    let x: Vec<f32> = (0..3 * 6)
        .map(|i| if i % 6 == 2 { 0.5 } else { -0.4 })
        .collect();
    l.load_input(&x).unwrap();
    let mut fast = Vec::new();
    l.forward(&mut fast).unwrap();
    l.set_choreography(Choreography::Reference);
    assert_eq!(l.forward(&mut Vec::new()), Err(SimError::NoInput));
    l.load_input(&x).unwrap();
    let mut reference = Vec::new();
    l.forward(&mut reference).unwrap();
    for (a, b) in fast.iter().zip(&reference) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn bad_shapes_are_refused() {
    let mut l = DenseLayer::new(6, 4);
    assert_eq!(
        l.set_params(&[0.0; 3]),
        Err(SimError::ParameterCount {
            expected: 28,
            got: 3
        })
    );
    assert!(matches!(
        l.load_input(&[0.0; 7]),
        Err(SimError::InputShape { .. })
    ));
    assert_eq!(l.forward(&mut Vec::new()), Err(SimError::NoInput));
    assert!(matches!(
        l.apply_update(20..40, 1.0, &[]),
        Err(SimError::ChunkOutOfRange { .. })
    ));
}

mod choreography_tests {
    use super::super::*;

    /// Trains a layer for a few chunked steps under one choreography; returns every
    /// evaluation's activations and the final parameters.
    fn run(choreography: Choreography, chunks: &[Range<usize>]) -> (Vec<Vec<f32>>, Vec<f32>) {
        let (n_in, n_out, batch) = (13, 7, 5);
        let mut l = DenseLayer::new(n_in, n_out);
        l.set_choreography(choreography);
        let p: Vec<f32> = (0..l.param_count())
            .map(|i| ((i * 29 % 31) as f32 - 15.0) / 40.0)
            .collect();
        l.set_params(&p).unwrap();
        let x: Vec<f32> = (0..batch * n_in)
            .map(|i| ((i * 11 % 19) as f32 - 9.0) / 9.0)
            .collect();
        l.load_input(&x).unwrap();
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for (k, chunk) in chunks.iter().enumerate() {
            let seeds: Vec<_> = (0..3).map(|p| DirectionSeed((k * 10 + p) as u64)).collect();
            l.evaluate_perturbed(chunk.clone(), &seeds, 1e-2, &mut out)
                .unwrap();
            for (a, b) in &out {
                seen.push(a.clone());
                seen.push(b.clone());
            }
            let terms: Vec<_> = seeds
                .iter()
                .enumerate()
                .map(|(i, s)| UpdateTerm {
                    seed: *s,
                    derivative: i as f32 - 1.0,
                })
                .collect();
            l.apply_update(chunk.clone(), 0.05, &terms).unwrap();
            let mut clean = Vec::new();
            l.forward(&mut clean).unwrap();
            seen.push(clean);
        }
        (seen, l.params().to_vec())
    }

    #[test]
    fn fast_path_agrees_with_the_reference_choreography() {
        // Chunks that start and end mid-row, cover whole rows, and reach into the bias.
        let chunks = [0..98, 5..30, 26..39, 90..98, 85..93, 91..92];
        let (fast, fast_params) = run(Choreography::Fast, &chunks);
        let (reference, ref_params) = run(Choreography::Reference, &chunks);
        assert_eq!(fast.len(), reference.len());
        // The same update arithmetic runs on both, so parameters agree exactly; activations
        // differ only by the rounding of `w + eps v` (a few f32 ulps of values below 4).
        assert_eq!(fast_params, ref_params);
        for (a, b) in fast.iter().zip(&reference) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 2e-6, "{x} vs {y}");
            }
        }
    }
}
