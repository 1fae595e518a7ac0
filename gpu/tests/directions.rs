//! The WGSL port of the direction spec against `firmware_protocol::direction::fill_direction`:
//! the same bits on a driver that rounds as IEEE does (lavapipe, a software adapter), within
//! 1e-6 elsewhere (a GPU's division and square root may be a few ulp off, and drivers may fuse
//! multiply-adds).

use firmware_protocol::DirectionSeed;
use firmware_protocol::direction::fill_direction;
use pnn_gpu::GpuDense;

#[test]
fn directions_drawn_on_the_gpu_are_the_hosts() {
    let Some(gpu) = pnn_gpu::available("directions_drawn_on_the_gpu_are_the_hosts") else {
        return;
    };
    let exact = gpu.is_software();
    let mut layer = GpuDense::new(gpu, 4, 2).unwrap();
    // Odd lengths drop a last sine; lengths past a multiple of 8 leave lanes short; the large
    // one crosses many workgroups.
    for len in [1usize, 2, 7, 9, 33, 1000, 4097] {
        let seeds: Vec<DirectionSeed> = (0..5u64)
            .map(|p| DirectionSeed(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(p + 1 + len as u64)))
            .chain([DirectionSeed(0), DirectionSeed(u64::MAX), DirectionSeed(42)])
            .collect();
        let drawn = layer.draw_directions(&seeds, len).unwrap();
        assert_eq!(drawn.len(), seeds.len() * len);
        let mut host = vec![0f32; len];
        for (p, seed) in seeds.iter().enumerate() {
            fill_direction(*seed, &mut host);
            let gpu_v = &drawn[p * len..(p + 1) * len];
            for (j, (a, b)) in gpu_v.iter().zip(&host).enumerate() {
                if exact {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "seed {seed:?}, length {len}, value {j}: GPU {a:e}, host {b:e}"
                    );
                } else {
                    assert!(
                        (a - b).abs() <= 1e-6,
                        "seed {seed:?}, length {len}, value {j}: GPU {a:e}, host {b:e}"
                    );
                }
            }
        }
    }
}
