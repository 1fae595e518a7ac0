//! Real link speeds and device compute time, so that a rig's epoch time is measured, not guessed:
//! a pseudo-terminal moves ~17 MB/s and the simulated layers compute at the host CPU's speed,
//! where a board's UART moves 92 kB/s at 921,600 baud and its microcontroller does some millions
//! of multiply-accumulates a second.
//!
//! - [`PacedLine`]: a device's line at a byte rate (a UART's `baud / 10`: a start bit, 8 data
//!   bits and a stop bit per byte), each direction on its own clock (a UART is full duplex), and
//!   a fixed latency per frame (a USB frame, a driver's turnaround).
//! - [`PacedLayer`]: a layer that takes `MACs / rate` seconds per evaluation, a MAC being one
//!   multiply-accumulate of a forward pass (`rows x inputs x outputs` for a dense layer; a
//!   perturbed evaluation is `2P` forward passes).
//!
//! Neither changes a single value that crosses the link: only when it arrives.

use std::ops::Range;
use std::time::{Duration, Instant};

use firmware_protocol::direction::{DirectionSeed, UpdateTerm};
use firmware_protocol::link::Transport;
use firmware_protocol::message::{DeviceError, ForwardMode, LayerDescriptor};
use firmware_protocol::server::PhysicalLayer;
use firmware_protocol::shape::LayerShape;

use crate::serve::DeviceLine;

/// How fast a device's line and arithmetic are; the default is as fast as the host can.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timing {
    /// Line rate in baud, 10 bits per byte (UART 8N1).
    pub baud: Option<u32>,
    /// Added to every frame, each way.
    pub latency: Duration,
    /// Multiply-accumulates per second of the device's arithmetic.
    pub macs_per_second: Option<f64>,
}

impl Timing {
    /// Seconds one byte takes on the line.
    pub fn byte_time(&self) -> Option<f64> {
        self.baud.map(|b| 10.0 / b as f64)
    }

    /// Whether anything is paced at all.
    pub fn is_unpaced(&self) -> bool {
        self.baud.is_none() && self.latency.is_zero() && self.macs_per_second.is_none()
    }
}

/// Multiply-accumulates of one row's forward pass through `shape`.
pub fn macs_per_row(shape: &LayerShape) -> f64 {
    match *shape {
        LayerShape::Dense { inputs, outputs } => inputs as f64 * outputs as f64,
        LayerShape::Conv(g) => {
            // 3x3 convolution over every pixel, then the projection of each channel's pooled map.
            let conv = (g.in_channels * 9) as f64 * (g.out_channels * g.height * g.width) as f64;
            let pooled = (g.height / 2) * (g.width / 2);
            conv + (g.out_channels * pooled * g.proj_dim) as f64
        }
    }
}

/// Sleeps until `deadline` (if it is still ahead).
fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

/// A device's line at a real link's speed (see the module docs). Bytes the host wrote are handed
/// on no sooner than the line could have carried them; a reply is sent once the line could have
/// carried all of it (a frame's latency added each way, counted at each frame's last byte, the
/// COBS delimiter 0).
pub struct PacedLine<T> {
    inner: T,
    timing: Timing,
    /// When the uplink (host to device) and downlink have carried everything so far.
    up_free: Instant,
    down_free: Instant,
}

impl<T> PacedLine<T> {
    pub fn new(inner: T, timing: Timing) -> Self {
        let now = Instant::now();
        Self {
            inner,
            timing,
            up_free: now,
            down_free: now,
        }
    }

    /// When `bytes` have crossed a line that is free from `free` on.
    fn carried(&self, free: Instant, bytes: &[u8]) -> Instant {
        let start = free.max(Instant::now());
        let frames = bytes.iter().filter(|&&b| b == 0).count() as u32;
        let wire = self.timing.byte_time().map_or(Duration::ZERO, |t| {
            Duration::from_secs_f64(t * bytes.len() as f64)
        });
        start + wire + self.timing.latency * frames
    }
}

impl<T: Transport> Transport for PacedLine<T> {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.down_free = self.carried(self.down_free, bytes);
        sleep_until(self.down_free);
        self.inner.send(bytes)
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        let n = self.inner.receive(buf, timeout)?;
        if n > 0 {
            self.up_free = self.carried(self.up_free, &buf[..n]);
            sleep_until(self.up_free);
        }
        Ok(n)
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        self.inner.discard_input()
    }
}

impl<T: DeviceLine> DeviceLine for PacedLine<T> {
    fn take_reset(&mut self) -> bool {
        self.inner.take_reset()
    }
}

/// A layer whose evaluations take the time a device of `macs_per_second` needs (see the module
/// docs); every value is the wrapped layer's.
pub struct PacedLayer<L> {
    inner: L,
    macs_per_second: Option<f64>,
    macs_per_row: f64,
    rows: usize,
}

impl<L: PhysicalLayer> PacedLayer<L> {
    pub fn new(inner: L, macs_per_second: Option<f64>) -> Self {
        let macs_per_row = macs_per_row(&inner.descriptor().kind);
        Self {
            inner,
            macs_per_second,
            macs_per_row,
            rows: 0,
        }
    }

    pub fn inner(&self) -> &L {
        &self.inner
    }

    /// Runs `f`, then waits out what `passes` forward passes over the cached batch take on the
    /// device, less the time `f` took on the host.
    fn paced<T>(&mut self, passes: f64, f: impl FnOnce(&mut L) -> T) -> T {
        let start = Instant::now();
        let out = f(&mut self.inner);
        if let Some(rate) = self.macs_per_second {
            let secs = passes * self.rows as f64 * self.macs_per_row / rate;
            sleep_until(start + Duration::from_secs_f64(secs));
        }
        out
    }
}

impl<L: PhysicalLayer> PhysicalLayer for PacedLayer<L> {
    fn descriptor(&self) -> LayerDescriptor {
        self.inner.descriptor()
    }

    fn write_parameters(&mut self, offset: usize, values: &[f32]) -> Result<(), DeviceError> {
        self.inner.write_parameters(offset, values)
    }

    fn read_parameters(&mut self, offset: usize, out: &mut [f32]) -> Result<(), DeviceError> {
        self.inner.read_parameters(offset, out)
    }

    fn load_input(
        &mut self,
        rows: usize,
        offset: usize,
        values: &[f32],
    ) -> Result<(), DeviceError> {
        self.rows = rows;
        self.inner.load_input(rows, offset, values)
    }

    fn forward(&mut self, mode: ForwardMode, out: &mut [f32]) -> Result<(), DeviceError> {
        self.paced(1.0, |l| l.forward(mode, out))
    }

    fn forward_features(&mut self, out: &mut [f32]) -> Result<(), DeviceError> {
        self.paced(1.0, |l| l.forward_features(out))
    }

    fn evaluate_perturbed(
        &mut self,
        chunk: Range<usize>,
        seeds: &[DirectionSeed],
        eps: f32,
        out: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<(), DeviceError> {
        let passes = 2.0 * seeds.len() as f64;
        self.paced(passes, |l| {
            l.evaluate_perturbed(chunk, seeds, eps, out, scratch)
        })
    }

    fn apply_update(
        &mut self,
        chunk: Range<usize>,
        scale: f32,
        terms: &[UpdateTerm],
        scratch: &mut [f32],
    ) -> Result<(), DeviceError> {
        self.inner.apply_update(chunk, scale, terms, scratch)
    }

    fn perturbation_scratch(&self, chunk_len: usize) -> usize {
        self.inner.perturbation_scratch(chunk_len)
    }

    fn update_scratch(&self, chunk_len: usize) -> usize {
        self.inner.update_scratch(chunk_len)
    }

    fn reset(&mut self) {
        self.rows = 0;
        self.inner.reset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_protocol::link::pipe;

    #[test]
    fn a_paced_line_carries_bytes_at_the_line_rate_each_way() {
        let (mut host, device) = pipe();
        // 10 kbaud: 1 kB/s, 1 ms a byte; 5 ms a frame.
        let timing = Timing {
            baud: Some(10_000),
            latency: Duration::from_millis(5),
            macs_per_second: None,
        };
        let mut line = PacedLine::new(device, timing);
        let start = Instant::now();
        host.send(&[1u8; 19].iter().chain(&[0]).copied().collect::<Vec<_>>())
            .unwrap();
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 20 {
            got += line.receive(&mut buf, Duration::from_millis(100)).unwrap();
        }
        let up = start.elapsed();
        assert!(
            up >= Duration::from_millis(25),
            "20 bytes + a frame: {up:?}"
        );
        let start = Instant::now();
        line.send(&[2u8; 30]).unwrap();
        let down = start.elapsed();
        assert!(down >= Duration::from_millis(30), "30 bytes: {down:?}");
        assert_eq!(host.receive(&mut buf, Duration::from_secs(1)).unwrap(), 30);
        assert!(Timing::default().is_unpaced());
    }

    #[test]
    fn macs_count_a_dense_forward_pass() {
        assert_eq!(macs_per_row(&LayerShape::dense(784, 50)), 39_200.0);
    }
}
