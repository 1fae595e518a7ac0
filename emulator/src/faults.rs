//! Link faults and device resets, on purpose.
//!
//! [`FaultyTransport`] wraps any [`Transport`] and, seeded, damages bytes (one random bit of a
//! byte flipped, at a per-byte rate), loses whole frames, holds frames back, and tells its owner
//! when the device should power-cycle (every N-th request received, that request lost; the serve
//! loop, [`crate::serve()`], does the power-cycling). Tests and `pnn-emulate --corrupt-rate
//! --drop-rate --delay-ms --reset-every` use it.
//!
//! A faulty transport may sit on either side of a link; on the device side (as in the emulator),
//! "sent" frames are replies and "received" frames are requests.

use std::time::Duration;

use firmware_protocol::link::Transport;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use crate::serve::DeviceLine;

/// What goes wrong on a link, and how often.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// Seeds every fault decision: the same seed and traffic give the same faults.
    pub seed: u64,
    /// Probability that a byte is damaged (one random bit flipped), in each direction.
    pub corrupt_rate: f64,
    /// Probability that a frame is lost whole, in each direction.
    pub drop_rate: f64,
    /// Every frame sent is held back a random time, uniform up to this.
    pub max_delay: Duration,
    /// The device power-cycles at every N-th request it receives; that request is lost. The
    /// transport's owner does the power-cycling when [`FaultyTransport::take_reset`] says so.
    pub reset_every: Option<u64>,
}

impl FaultConfig {
    /// Checks that rates are probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (what, rate) in [
            ("corrupt rate", self.corrupt_rate),
            ("drop rate", self.drop_rate),
        ] {
            if !(0.0..1.0).contains(&rate) {
                return Err(format!("{what} must be in [0, 1), got {rate}"));
            }
        }
        if self.reset_every == Some(0) {
            return Err("reset-every must be at least 1".into());
        }
        Ok(())
    }

    pub fn is_clean(&self) -> bool {
        self.corrupt_rate == 0.0
            && self.drop_rate == 0.0
            && self.max_delay.is_zero()
            && self.reset_every.is_none()
    }
}

/// What a [`FaultyTransport`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounters {
    pub frames_sent: u64,
    pub frames_received: u64,
    pub bytes_corrupted: u64,
    pub frames_dropped: u64,
    pub resets: u64,
}

/// A [`Transport`] that damages, loses and delays traffic (see the module docs).
pub struct FaultyTransport<T> {
    inner: T,
    config: FaultConfig,
    rng: ChaCha8Rng,
    /// Bytes to pass before the next damaged one (a geometric draw: per-byte Bernoulli trials
    /// without a draw per byte).
    until_corrupt: u64,
    /// Receiving: inside a frame, and dropping it.
    in_frame: bool,
    dropping: bool,
    /// Received bytes not yet handed out (a reset cuts a read short).
    raw: Vec<u8>,
    raw_at: usize,
    raw_len: usize,
    reset_due: bool,
    counters: FaultCounters,
    out: Vec<u8>,
}

impl<T: Transport> FaultyTransport<T> {
    pub fn new(inner: T, config: FaultConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(firmware_protocol::direction::mix(
            config.seed ^ 0x6661_756c_7473, // "faults"
        ));
        let until_corrupt = gap(&mut rng, config.corrupt_rate);
        Self {
            inner,
            config,
            rng,
            until_corrupt,
            in_frame: false,
            dropping: false,
            raw: vec![0u8; 64 * 1024],
            raw_at: 0,
            raw_len: 0,
            reset_due: false,
            counters: FaultCounters::default(),
            out: Vec::new(),
        }
    }

    pub fn counters(&self) -> FaultCounters {
        self.counters
    }

    /// Damages `byte` if its turn has come.
    fn corrupt(&mut self, byte: &mut u8) {
        if self.until_corrupt == 0 {
            *byte ^= 1 << self.rng.random_range(0..8u32);
            self.counters.bytes_corrupted += 1;
            self.until_corrupt = gap(&mut self.rng, self.config.corrupt_rate);
        } else {
            self.until_corrupt -= 1;
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }
}

/// Bytes to pass before the next damaged one, at `rate` per byte.
fn gap(rng: &mut ChaCha8Rng, rate: f64) -> u64 {
    if rate <= 0.0 {
        return u64::MAX;
    }
    let u: f64 = rng.random();
    ((1.0 - u).ln() / (1.0 - rate).ln())
        .floor()
        .min(u64::MAX as f64) as u64
}

impl<T: Transport> DeviceLine for FaultyTransport<T> {
    /// Whether the device should power-cycle now (once per reset).
    fn take_reset(&mut self) -> bool {
        std::mem::take(&mut self.reset_due)
    }
}

impl<T: Transport> Transport for FaultyTransport<T> {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        // Each frame (up to and including its delimiter) lives or dies whole.
        for frame in bytes.split_inclusive(|&b| b == 0) {
            self.counters.frames_sent += 1;
            if self.chance(self.config.drop_rate) {
                self.counters.frames_dropped += 1;
                continue;
            }
            let start = out.len();
            out.extend_from_slice(frame);
            for b in &mut out[start..] {
                self.corrupt(b);
            }
        }
        if !self.config.max_delay.is_zero() {
            let delay = self.config.max_delay.mul_f64(self.rng.random::<f64>());
            std::thread::sleep(delay);
        }
        let result = if out.is_empty() {
            Ok(())
        } else {
            self.inner.send(&out)
        };
        self.out = out;
        result
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        if self.raw_at == self.raw_len {
            let cap = buf.len().min(self.raw.len());
            let n = self.inner.receive(&mut self.raw[..cap], timeout)?;
            self.raw_at = 0;
            self.raw_len = n;
        }
        let mut written = 0;
        while self.raw_at < self.raw_len && written < buf.len() {
            let mut b = self.raw[self.raw_at];
            if !self.in_frame && b != 0 {
                // A frame begins.
                self.in_frame = true;
                self.counters.frames_received += 1;
                let reset = self
                    .config
                    .reset_every
                    .is_some_and(|n| self.counters.frames_received.is_multiple_of(n));
                if reset {
                    self.counters.resets += 1;
                    self.dropping = true;
                    self.reset_due = true;
                } else if self.chance(self.config.drop_rate) {
                    self.counters.frames_dropped += 1;
                    self.dropping = true;
                }
                if reset {
                    // Hand out what came before; the owner resets before the rest.
                    break;
                }
            }
            self.raw_at += 1;
            if b == 0 {
                self.in_frame = false;
                if std::mem::take(&mut self.dropping) {
                    continue;
                }
            } else if self.dropping {
                continue;
            }
            self.corrupt(&mut b);
            buf[written] = b;
            written += 1;
        }
        Ok(written)
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        self.raw_at = self.raw_len;
        self.in_frame = false;
        self.dropping = false;
        self.inner.discard_input()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EmulatorConfig, serve};
    use firmware_protocol::link::{Client, Link, PipeEnd, RetryPolicy, pipe};
    use firmware_protocol::message::ActivationEncoding;
    use firmware_protocol::shape::LayerShape;

    /// An emulated device (one dense layer) behind `faults`, on a thread; returns the host's end.
    fn device(
        faults: FaultConfig,
        max_frame: usize,
    ) -> (PipeEnd, std::thread::JoinHandle<FaultCounters>) {
        let (host, dev) = pipe();
        let thread = std::thread::spawn(move || {
            let config = EmulatorConfig {
                encoding: ActivationEncoding::F32,
                max_batch: 64,
                boot_id: 100,
                ..EmulatorConfig::new("faulty", vec![LayerShape::dense(6, 4)])
            };
            let mut t = FaultyTransport::new(dev, faults);
            serve(&mut t, &config, max_frame, false).unwrap();
            t.counters()
        });
        (host, thread)
    }

    fn client(host: PipeEnd, timeout_ms: u64) -> Client<PipeEnd> {
        let policy = RetryPolicy {
            timeout: Duration::from_millis(timeout_ms),
            retries: 50,
            baud: 921_600,
        };
        Client::new(Link::new(host, policy, 1))
    }

    #[test]
    fn a_noisy_line_is_survived_with_naks_resyncs_and_retries_and_resets_show_in_the_boot_id() {
        let (host, thread) = device(
            FaultConfig {
                seed: 5,
                corrupt_rate: 2e-3,
                drop_rate: 0.02,
                reset_every: Some(40),
                ..Default::default()
            },
            256,
        );
        let mut client = client(host, 20);
        let mut boots = Vec::new();
        for _ in 0..300 {
            boots.push(client.boot_id().expect("every Hello gets through"));
        }
        let c = client.counters();
        eprintln!("{c:?}");
        assert!(c.retries > 0 && c.naks > 0 && c.resyncs > 0, "{c:?}");
        // Boot ids only ever step up by one, once per reset.
        boots.dedup();
        assert!(boots.len() > 3, "{boots:?}");
        assert!(boots.windows(2).all(|w| w[1] == w[0] + 1), "{boots:?}");
        drop(client);
        let faults = thread.join().unwrap();
        assert_eq!(faults.resets as usize, boots.len() - 1);
    }

    #[test]
    fn late_replies_are_discarded_as_stale() {
        let (host, thread) = device(
            FaultConfig {
                seed: 2,
                max_delay: Duration::from_millis(30),
                ..Default::default()
            },
            1024,
        );
        // A third of the replies come after the host has given up waiting and sent again.
        let mut client = client(host, 20);
        let first = client.boot_id().unwrap();
        for _ in 0..20 {
            assert_eq!(client.boot_id().unwrap(), first);
        }
        let c = client.counters();
        assert!(c.retries > 0 && c.stale_replies > 0, "{c:?}");
        drop(client);
        thread.join().unwrap();
    }

    fn collect(t: &mut FaultyTransport<PipeEnd>) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 37];
        let mut idle = 0;
        while idle < 3 {
            let n = t.receive(&mut buf, Duration::from_millis(5)).unwrap();
            idle = if n == 0 && t.raw_at == t.raw_len {
                idle + 1
            } else {
                0
            };
            all.extend_from_slice(&buf[..n]);
        }
        all
    }

    #[test]
    fn a_clean_transport_passes_bytes_unchanged() {
        let (mut a, b) = pipe();
        let mut t = FaultyTransport::new(b, FaultConfig::default());
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        a.send(&data).unwrap();
        assert_eq!(collect(&mut t), data);
        assert_eq!(t.counters().bytes_corrupted, 0);
    }

    #[test]
    fn corruption_hits_bytes_at_the_rate_asked() {
        let (mut a, b) = pipe();
        let rate = 1e-3;
        let mut t = FaultyTransport::new(
            b,
            FaultConfig {
                seed: 3,
                corrupt_rate: rate,
                ..Default::default()
            },
        );
        let data = vec![0x55u8; 2_000_000];
        for part in data.chunks(50_000) {
            a.send(part).unwrap();
        }
        let got = collect(&mut t);
        let hit = got.iter().filter(|&&b| b != 0x55).count() as f64;
        // Binomial(2e6, 1e-3): mean 2000, sd 45; each damaged byte differs in one bit.
        assert!((hit - 2000.0).abs() < 250.0, "{hit} damaged bytes");
        assert!(got.iter().all(|b| (b ^ 0x55).count_ones() <= 1));
        assert_eq!(t.counters().bytes_corrupted as f64, hit);
    }

    #[test]
    fn frames_are_dropped_whole_and_resets_come_every_n_requests() {
        let (mut a, b) = pipe();
        let mut t = FaultyTransport::new(
            b,
            FaultConfig {
                seed: 1,
                drop_rate: 0.25,
                reset_every: Some(10),
                ..Default::default()
            },
        );
        // 100 frames "k k k 0", several per write.
        let frames: Vec<Vec<u8>> = (1..=100u8).map(|k| vec![k, k, k, 0]).collect();
        for group in frames.chunks(7) {
            a.send(&group.concat()).unwrap();
        }
        let mut got = Vec::new();
        let mut resets_seen = Vec::new();
        let mut buf = [0u8; 64];
        let mut idle = 0;
        while idle < 3 {
            let n = t.receive(&mut buf, Duration::from_millis(5)).unwrap();
            got.extend_from_slice(&buf[..n]);
            if t.take_reset() {
                resets_seen.push(got.len());
            }
            idle = if n == 0 && t.raw_at == t.raw_len {
                idle + 1
            } else {
                0
            };
        }
        let kept: Vec<u8> = got.chunks(4).map(|f| f[0]).collect();
        assert!(
            got.chunks(4)
                .all(|f| f[1] == f[0] && f[2] == f[0] && f[3] == 0)
        );
        // Every 10th frame went with a reset, the bytes before it handed out first.
        for k in (10..=100u8).step_by(10) {
            assert!(!kept.contains(&k), "frame {k} was lost to a reset");
        }
        assert_eq!(t.counters().resets, 10);
        assert_eq!(resets_seen.len(), 10);
        for (i, at) in resets_seen.iter().enumerate() {
            let before: Vec<u8> = got[..*at].chunks(4).map(|f| f[0]).collect();
            assert!(before.iter().all(|&k| k < 10 * (i as u8 + 1)), "{before:?}");
        }
        let dropped = t.counters().frames_dropped;
        assert_eq!(kept.len() as u64, 100 - 10 - dropped);
        assert!(
            (10..40).contains(&dropped),
            "{dropped} of 90 dropped at 25%"
        );
    }

    #[test]
    fn sent_frames_are_dropped_and_delayed() {
        let (a, mut b) = pipe();
        let mut t = FaultyTransport::new(
            a,
            FaultConfig {
                seed: 9,
                drop_rate: 0.5,
                max_delay: Duration::from_millis(2),
                ..Default::default()
            },
        );
        let start = std::time::Instant::now();
        for k in 1..=40u8 {
            t.send(&[k, 0]).unwrap();
        }
        assert!(start.elapsed() >= Duration::from_millis(10));
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok(n @ 1..) = b.receive(&mut buf, Duration::from_millis(5)) {
            got.extend_from_slice(&buf[..n]);
        }
        let c = t.counters();
        assert_eq!(c.frames_sent, 40);
        assert_eq!(got.len() as u64, 2 * (40 - c.frames_dropped));
        assert!((8..32).contains(&c.frames_dropped));
    }
}
