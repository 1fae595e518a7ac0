//! The one serve loop: the protocol server over the emulated device, fed from a line (a
//! pseudo-terminal, an in-memory pipe, either behind a fault injector), power-cycled from
//! scratch with a new boot id whenever the line says so.

use std::io::ErrorKind;
use std::time::Duration;

use firmware_protocol::frame::{FrameDecoder, MAX_PAYLOAD, wire_len};
use firmware_protocol::link::{PipeEnd, SerialPortTransport, TcpListenerLine, Transport};
use firmware_protocol::server::ServerIo;

use crate::config::EmulatorConfig;
use crate::device::paced_server;

/// Smallest frame payload a device may be given: the handshake's replies must fit, and the host
/// needs room for data in every request.
pub const MIN_FRAME: usize = 128;

/// A device's line as the serve loop sees it: a transport that may also say when the device
/// should power-cycle (a [`crate::FaultyTransport`] with `reset_every` does).
pub trait DeviceLine: Transport {
    /// Whether the device should power-cycle now (true once per reset). Plain lines never ask.
    fn take_reset(&mut self) -> bool {
        false
    }
}

impl DeviceLine for SerialPortTransport {}
impl DeviceLine for PipeEnd {}
impl DeviceLine for TcpListenerLine {}

impl<T: DeviceLine + ?Sized> DeviceLine for &mut T {
    fn take_reset(&mut self) -> bool {
        (**self).take_reset()
    }
}

/// Serves the emulated device over `line` until the host side hangs up for good
/// (`BrokenPipe`: a dropped pipe; a pseudo-terminal's device side never sees one, since
/// [`crate::Pty`] keeps the host side open for the next host) or the line fails.
///
/// Frames carry at most `max_frame` bytes of payload each way (clamped to [`MIN_FRAME`]..
/// [`MAX_PAYLOAD`]; the device declares it in the handshake). A reply that cannot be written is
/// dropped (the host retransmits). At every reset the line asks for, the device starts over: a
/// new server (nothing programmed, nothing cached) with the next boot id, as after a brown-out.
pub fn serve<L: DeviceLine + ?Sized>(
    line: &mut L,
    config: &EmulatorConfig,
    max_frame: usize,
    verbose: bool,
) -> std::io::Result<()> {
    serve_paced(line, config, max_frame, verbose, None)
}

/// [`serve()`], the device's evaluations taking the time a device of `macs_per_second` needs
/// (pace the line itself with a [`crate::timing::PacedLine`]).
pub fn serve_paced<L: DeviceLine + ?Sized>(
    line: &mut L,
    config: &EmulatorConfig,
    max_frame: usize,
    verbose: bool,
    macs_per_second: Option<f64>,
) -> std::io::Result<()> {
    let max_frame = max_frame.clamp(MIN_FRAME, MAX_PAYLOAD);
    let mut buf = vec![0u8; 64 * 1024];
    let mut boot_id = config.boot_id;
    loop {
        let booted = EmulatorConfig {
            boot_id,
            ..config.clone()
        };
        let mut server = paced_server(&booted, macs_per_second)
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e))?;
        server.set_max_request(max_frame as u32);
        let mut io = ServerIo {
            decoder: FrameDecoder::new(vec![0u8; wire_len(max_frame)]),
            payload: vec![0u8; max_frame],
            out: vec![0u8; wire_len(max_frame)],
        };
        loop {
            let n = match line.receive(&mut buf, Duration::from_millis(200)) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e),
            };
            if n > 0 {
                let served = server.serve(&mut io, &buf[..n], |reply| line.send(reply));
                if let Err(e) = served {
                    if verbose {
                        eprintln!("pnn-emulate: reply dropped: {e}; {:?}", server.stats());
                    }
                    io.decoder.clear();
                }
            }
            if line.take_reset() {
                boot_id = boot_id.wrapping_add(1);
                if verbose {
                    eprintln!(
                        "pnn-emulate: reset ({:?} since the last); boot id now {boot_id:#010x}",
                        server.stats()
                    );
                }
                break;
            }
        }
    }
}
