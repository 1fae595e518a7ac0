//! Wire economy through the emulator on a real pseudo-terminal: directions travel as seeds
//! (the bytes sent per perturbed evaluation do not depend on the chunk), and a training step
//! sends each batch's input once per layer and little else. Prints the measured figures.

mod serial_support;

use std::ops::Range;

use pnn::backend::serial::{self, SerialSpec};
use pnn::model::initialise;
use pnn::oracle::{
    Activations, DirectionSeed, ForwardOracle, LayerShape, LinkCounters, UpdateTerm,
};
use pnn::train::{Hyper, Trainer};
use serial_support::Emulator;

fn delta(a: LinkCounters, b: LinkCounters) -> LinkCounters {
    b - a
}

fn input(rows: usize, width: usize) -> Activations {
    Activations::new(
        rows,
        width,
        (0..rows * width).map(|i| (i % 29) as f32 / 29.0).collect(),
    )
}

#[test]
fn bytes_sent_per_perturbed_evaluation_do_not_depend_on_the_chunk() {
    let emulator = Emulator::spawn("784x50", &[]);
    let spec = SerialSpec::parse(&emulator.path).unwrap();
    let layer = LayerShape::dense(784, 50);
    let mut o = serial::open(&spec, std::slice::from_ref(&layer))
        .unwrap()
        .remove(0);
    let params = initialise(std::slice::from_ref(&layer), 10, 3)
        .layers
        .remove(0);
    o.write_parameters(&params).unwrap();
    let rows = 16;
    o.load_input(&input(rows, 784)).unwrap();
    let seeds: Vec<DirectionSeed> = (0..8).map(DirectionSeed).collect();
    let mut pairs = Vec::new();
    let mut evaluate = |o: &mut serial::SerialOracle, chunk: Range<usize>, p: usize| {
        let before = o.link().unwrap().counters();
        o.evaluate_perturbed(chunk, &seeds[..p], 1e-3, &mut pairs)
            .unwrap();
        delta(before, o.link().unwrap().counters())
    };
    let chunks = [0..1, 0..100, 5_000..6_000, 39_200..39_250, 0..39_250];
    let per_chunk: Vec<LinkCounters> = chunks
        .iter()
        .map(|c| evaluate(&mut o, c.clone(), 4))
        .collect();
    for (c, w) in chunks.iter().zip(&per_chunk) {
        eprintln!(
            "perturbed evaluation, P = 4, chunk of {:>6}: {} bytes up, {} down, {} round trips",
            c.len(),
            w.bytes_up,
            w.bytes_down,
            w.round_trips
        );
    }
    // Identical uplink whatever the chunk: the direction never travels, only its seed.
    assert!(
        per_chunk
            .iter()
            .all(|w| w.bytes_up == per_chunk[0].bytes_up)
    );
    // Far below even one f32 per parameter of the smallest chunk above 100 parameters.
    assert!(per_chunk[0].bytes_up < 100, "{:?}", per_chunk[0]);
    // Each extra direction costs its 8-byte seed (the first request is small enough that its
    // COBS overhead stays one byte).
    let up: Vec<u64> = (1..=8)
        .map(|p| evaluate(&mut o, 0..39_250, p).bytes_up)
        .collect();
    for p in 1..8 {
        assert_eq!(up[p] - up[p - 1], 8, "{up:?}");
    }
    // The downlink is the activations: 2P blocks of rows x outputs f32, whatever the chunk.
    assert!(
        per_chunk
            .iter()
            .all(|w| w.bytes_down == per_chunk[0].bytes_down)
    );
    let activations = (2 * 4 * rows * 50 * 4) as u64;
    assert!(per_chunk[0].bytes_down >= activations);
    assert!(per_chunk[0].bytes_down < activations + activations / 50 + 64);
    // Updates, too, carry seeds and derivatives only.
    let terms: Vec<UpdateTerm> = seeds[..4]
        .iter()
        .map(|&seed| UpdateTerm {
            seed,
            derivative: 0.5,
        })
        .collect();
    let update_bytes: Vec<u64> = chunks
        .iter()
        .map(|c| {
            let before = o.link().unwrap().counters();
            o.apply_update(c.clone(), 1e-3, &terms).unwrap();
            delta(before, o.link().unwrap().counters()).bytes_up
        })
        .collect();
    eprintln!("seeded update, P = 4: {update_bytes:?} bytes up per chunk");
    assert!(
        update_bytes
            .iter()
            .all(|&b| b == update_bytes[0] && b < 100)
    );
}

#[test]
fn a_training_step_sends_each_input_once_per_layer() {
    let emulator = Emulator::spawn("784x50,50x50", &[]);
    let spec = SerialSpec::parse(&emulator.path).unwrap();
    let specs = [LayerShape::dense(784, 50), LayerShape::dense(50, 50)];
    let oracles = serial::open(&spec, &specs).unwrap();
    let hyper = Hyper::default();
    let mut trainer = Trainer::new(oracles, initialise(&specs, 10, 0), hyper.clone()).unwrap();
    let total = |t: &mut Trainer<serial::SerialOracle>| {
        t.oracles_mut()
            .iter()
            .map(|o| o.link().unwrap().counters())
            .fold(LinkCounters::default(), |a, b| a + b)
    };
    let rows = 256;
    let labels: Vec<u8> = (0..rows).map(|i| (i % 10) as u8).collect();
    let before = total(&mut trainer);
    trainer
        .train_batch(0, 0, &input(rows, 784), &labels)
        .unwrap();
    let step = delta(before, total(&mut trainer));
    // The minimum: each layer's input once (f32), P seeds and P update terms per chunk (one
    // chunk per layer here), and 2P perturbed plus one clean activation block down per layer.
    let p = hyper.directions;
    let min_up = (4 * rows * (784 + 50) + 2 * (8 * p + 12 * p)) as u64;
    let min_down = (2 * (2 * p + 1) * rows * 50 * 4) as u64;
    eprintln!(
        "one training step (batch 256, 784-50-50, P = 4): {} bytes up (minimum {min_up}, {:.2}%), {} down (minimum {min_down}, {:.2}%), {} round trips",
        step.bytes_up,
        100.0 * (step.bytes_up as f64 / min_up as f64 - 1.0),
        step.bytes_down,
        100.0 * (step.bytes_down as f64 / min_down as f64 - 1.0),
        step.round_trips
    );
    assert!(step.bytes_up >= min_up && step.bytes_up < min_up + min_up / 100);
    assert!(step.bytes_down >= min_down && step.bytes_down < min_down + min_down / 100);
}

#[test]
fn adc_coded_activations_come_down_in_the_declared_encoding() {
    let layer = LayerShape::dense(784, 50);
    let params = initialise(std::slice::from_ref(&layer), 10, 5)
        .layers
        .remove(0);
    let rows = 32;
    let scale = 1e-4f32;
    let mut results = Vec::new();
    for encoding in [
        "f32",
        &format!("adc-u16:{scale}"),
        &format!("adc-u8:{}", 0.01),
    ] {
        let emulator = Emulator::spawn("784x50", &["--encoding", encoding]);
        let spec = SerialSpec::parse(&emulator.path).unwrap();
        let mut o = serial::open(&spec, std::slice::from_ref(&layer))
            .unwrap()
            .remove(0);
        o.write_parameters(&params).unwrap();
        o.load_input(&input(rows, 784)).unwrap();
        let before = o.link().unwrap().counters();
        let out = o.forward(pnn::oracle::ForwardMode::Eval).unwrap();
        let down = delta(before, o.link().unwrap().counters()).bytes_down;
        eprintln!("forward, {rows} x 50 activations as {encoding}: {down} bytes down");
        results.push((out.features.data, down));
    }
    let (exact, f32_bytes) = &results[0];
    let (u16_coded, u16_bytes) = &results[1];
    let (u8_coded, u8_bytes) = &results[2];
    // value = code * scale: within half a step of the exact value (codes are never negative,
    // and these activations are far below the top code).
    for (e, c) in exact.iter().zip(u16_coded) {
        assert!((e - c).abs() <= scale * 0.5 + 1e-6, "{e} vs {c}");
    }
    for (e, c) in exact.iter().zip(u8_coded) {
        assert!((e.min(2.55) - c).abs() <= 0.005 + 1e-6, "{e} vs {c}");
    }
    assert!(exact.iter().any(|&e| e > 0.0));
    let payload = (rows * 50) as u64;
    assert!(*f32_bytes >= 4 * payload && *f32_bytes < 4 * payload + 64);
    assert!(*u16_bytes >= 2 * payload && *u16_bytes < 2 * payload + 64);
    assert!(*u8_bytes >= payload && *u8_bytes < payload + 64);
}
