use std::time::Instant;

use firmware_protocol::{DirectionSeed, UpdateTerm};
use pnn_sim::conv::{BnMode, ConvBlock, ConvShape};
use pnn_sim::dense::Choreography;

fn main() {
    let batch = 256;
    for (cin, cout, hw) in [(1, 32, 28), (32, 32, 14)] {
        for ch in [Choreography::Fast, Choreography::Reference] {
            let s = ConvShape {
                in_channels: cin,
                out_channels: cout,
                height: hw,
                width: hw,
                proj_dim: 16,
                projection_seed: 1,
            };
            let mut b = ConvBlock::new(s);
            b.set_choreography(ch);
            let p: Vec<f32> = (0..s.param_count())
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 30.0)
                .collect();
            b.set_params(&p).unwrap();
            let x: Vec<f32> = (0..batch * s.input_width())
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0)
                .collect();
            let (mut f, mut n, mut out) = (Vec::new(), Vec::new(), Vec::new());
            let seeds: Vec<_> = (0..4).map(DirectionSeed).collect();
            let terms: Vec<_> = seeds
                .iter()
                .map(|s| UpdateTerm {
                    seed: *s,
                    derivative: 0.1,
                })
                .collect();
            let reps = 5;
            let mut t = [0f64; 4];
            for _ in 0..reps {
                let t0 = Instant::now();
                b.load_input(&x).unwrap();
                b.forward(BnMode::Eval, &mut f, &mut n).unwrap();
                let t1 = Instant::now();
                b.evaluate_perturbed(0..s.param_count(), &seeds, 1e-3, &mut out)
                    .unwrap();
                let t2 = Instant::now();
                b.apply_update(0..s.param_count(), 1e-3, &terms).unwrap();
                b.forward(BnMode::Train, &mut f, &mut n).unwrap();
                let t3 = Instant::now();
                t[0] += (t1 - t0).as_secs_f64();
                t[1] += (t2 - t1).as_secs_f64();
                t[2] += (t3 - t2).as_secs_f64();
            }
            println!(
                "{cin}->{cout} {hw}x{hw} {ch:?}: load+eval fwd {:.1} ms, perturbed P=4 {:.1} ms, update+clean {:.1} ms",
                t[0] / reps as f64 * 1e3,
                t[1] / reps as f64 * 1e3,
                t[2] / reps as f64 * 1e3
            );
        }
    }
}
