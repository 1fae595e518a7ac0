//! Link faults and device resets, on purpose and on detection.
//!
//! - [`FaultyTransport`] wraps any [`Transport`] and, seeded, damages bytes (one random bit of a
//!   byte flipped, at a per-byte rate), loses whole frames, holds frames back, and tells its owner
//!   when the device should power-cycle (every N-th request received, that request lost). Tests
//!   and `pnn-emulate --corrupt-rate --drop-rate --delay-ms --reset-every` use it.
//! - [`serve_device`] is the emulator's device loop over such a transport: the protocol server
//!   over simulated layers, rebuilt from scratch with a new boot id at every reset (parameters,
//!   inputs, results and the retransmission cache are gone, as after a brown-out).
//! - [`pipe`]: an in-memory byte pipe, a [`Transport`] pair for in-process tests.
//! - [`boot_id`]: how the host asks a device for its boot id, which a reset changes; the host's
//!   recovery (`crate::recovery`) compares it around its work.
//!
//! A faulty transport may sit on either side of a link; on the device side (as in the emulator),
//! "sent" frames are replies and "received" frames are requests.

use std::io::ErrorKind;
use std::sync::mpsc;
use std::time::Duration;

use firmware_protocol::frame::{FrameDecoder, wire_len};
use firmware_protocol::message::{PROTOCOL_VERSION, Request, Response};
use firmware_protocol::server::ServerIo;
use pnn_sim::emulator::{self, EmulatorConfig};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use serialport::SerialPort;

use super::link::{Link, Transport};
use crate::oracle::OracleError;

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

    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Whether the device should power-cycle now (once per reset).
    pub fn take_reset(&mut self) -> bool {
        std::mem::take(&mut self.reset_due)
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

/// One end of an in-memory byte pipe (see [`pipe`]).
pub struct PipeEnd {
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    at: usize,
}

/// Two connected in-memory [`Transport`]s: what one sends, the other receives. Dropping one end
/// hangs up the other (`BrokenPipe`).
pub fn pipe() -> (PipeEnd, PipeEnd) {
    let (a_tx, b_rx) = mpsc::channel();
    let (b_tx, a_rx) = mpsc::channel();
    let end = |tx, rx| PipeEnd {
        tx,
        rx,
        pending: Vec::new(),
        at: 0,
    };
    (end(a_tx, a_rx), end(b_tx, b_rx))
}

impl Transport for PipeEnd {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tx
            .send(bytes.to_vec())
            .map_err(|_| ErrorKind::BrokenPipe.into())
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        if self.at == self.pending.len() {
            match self.rx.recv_timeout(timeout) {
                Ok(bytes) => {
                    self.pending = bytes;
                    self.at = 0;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(0),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ErrorKind::BrokenPipe.into());
                }
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        self.at = self.pending.len();
        while self.rx.try_recv().is_ok() {}
        Ok(())
    }
}

/// The device side of a serial port (the emulator's pseudo-terminal) as a [`Transport`].
pub struct PortTransport<'a> {
    port: &'a mut dyn SerialPort,
}

impl<'a> PortTransport<'a> {
    pub fn new(port: &'a mut dyn SerialPort) -> Self {
        Self { port }
    }
}

impl Transport for PortTransport<'_> {
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.port.write_all(bytes)
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> std::io::Result<usize> {
        if self.port.timeout() != timeout {
            self.port
                .set_timeout(timeout)
                .map_err(std::io::Error::from)?;
        }
        match self.port.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::Interrupted => {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }
}

/// Smallest frame payload a device may be given: the handshake's replies must fit, and the host
/// needs room for data in every request.
pub const MIN_FRAME: usize = 128;

/// Serves the emulated device over `transport` until receiving fails (the host side hung up).
/// Frames carry at most `max_frame` bytes of payload each way. At every reset the transport
/// asks for, the device starts over: a new server (nothing programmed, nothing cached) with the
/// next boot id. Returns the fault counters when the link ends.
pub fn serve_device<T: Transport>(
    transport: &mut FaultyTransport<T>,
    config: &EmulatorConfig,
    max_frame: usize,
    verbose: bool,
) -> std::io::Result<FaultCounters> {
    let max_frame = max_frame.clamp(MIN_FRAME, firmware_protocol::frame::MAX_PAYLOAD);
    let mut buf = vec![0u8; 64 * 1024];
    let mut boot_id = config.boot_id;
    loop {
        let booted = EmulatorConfig {
            boot_id,
            ..config.clone()
        };
        let mut server = emulator::server(&booted)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        server.set_max_request(max_frame as u32);
        let mut io = ServerIo {
            decoder: FrameDecoder::new(vec![0u8; wire_len(max_frame)]),
            payload: vec![0u8; max_frame],
            out: vec![0u8; wire_len(max_frame)],
        };
        loop {
            let n = match transport.receive(&mut buf, Duration::from_millis(200)) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(transport.counters()),
                Err(e) => return Err(e),
            };
            if n > 0 {
                let served = server.serve(&mut io, &buf[..n], |reply| transport.send(reply));
                if let Err(e) = served {
                    if verbose {
                        eprintln!("pnn-emulate: reply dropped: {e}; {:?}", server.stats());
                    }
                    io.decoder.clear();
                }
            }
            if transport.take_reset() {
                boot_id = boot_id.wrapping_add(1);
                if verbose {
                    eprintln!(
                        "pnn-emulate: reset after {} requests ({:?} since the last); boot id now {boot_id:#010x}",
                        transport.counters().frames_received,
                        server.stats()
                    );
                }
                break;
            }
        }
    }
}

/// Asks the device for its boot id (a `Hello`); a device that has reset answers with a new one.
pub fn boot_id(link: &mut Link) -> Result<u32, OracleError> {
    let hello = Request::Hello {
        protocol_version: PROTOCOL_VERSION,
    };
    let body = link
        .call(&hello)
        .map_err(|e| OracleError::Link(e.to_string()))?;
    match postcard::from_bytes::<Response>(body) {
        Ok(Response::Hello(info)) => Ok(info.boot_id),
        Ok(Response::Error(e)) => Err(OracleError::Refused(format!("Hello: {e}"))),
        _ => Err(OracleError::Link(
            "protocol error: the reply to Hello does not decode".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::serial::link::RetryPolicy;
    use firmware_protocol::message::ActivationEncoding;

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
                ..EmulatorConfig::new(
                    "faulty",
                    vec![pnn_sim::emulator::LayerConfig::Dense {
                        inputs: 6,
                        outputs: 4,
                    }],
                )
            };
            let mut t = FaultyTransport::new(dev, faults);
            serve_device(&mut t, &config, max_frame, false).unwrap()
        });
        (host, thread)
    }

    fn link(host: PipeEnd, timeout_ms: u64) -> Link {
        let policy = RetryPolicy {
            timeout: Duration::from_millis(timeout_ms),
            retries: 50,
            baud: 921_600,
        };
        Link::new(Box::new(host), policy, 1)
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
        let mut link = link(host, 20);
        let mut boots = Vec::new();
        for _ in 0..300 {
            boots.push(boot_id(&mut link).expect("every Hello gets through"));
        }
        let c = link.counters();
        eprintln!("{c:?}");
        assert!(
            c.retransmissions > 0 && c.naks > 0 && c.corrupt_frames > 0,
            "{c:?}"
        );
        // Boot ids only ever step up by one, once per reset.
        boots.dedup();
        assert!(boots.len() > 3, "{boots:?}");
        assert!(boots.windows(2).all(|w| w[1] == w[0] + 1), "{boots:?}");
        drop(link);
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
        let mut link = link(host, 20);
        let first = boot_id(&mut link).unwrap();
        for _ in 0..20 {
            assert_eq!(boot_id(&mut link).unwrap(), first);
        }
        let c = link.counters();
        assert!(c.retransmissions > 0 && c.stale_replies > 0, "{c:?}");
        drop(link);
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
