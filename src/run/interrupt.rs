//! Stopping a run on SIGINT (Ctrl-C) or SIGTERM (`kill`, Slurm's pre-emption) without losing it.
//!
//! [`install`] makes the first such signal a request: the run loop finishes the batch in
//! progress (or abandons the test-set evaluation in progress: it is repeated on resume), saves a
//! checkpoint (into `--checkpoint DIR`, else the rescue location, see [`super::rescue_dir`]),
//! prints the command that continues it and exits with 128 + the signal's number (130, 143), as
//! shells and batch schedulers expect of a process ended by a signal. A second signal while the
//! first is being served ends the process at once with that status. Without [`install`] (library
//! use) signals keep their default action and the run never polls a request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

/// The number of the signal that asked the run to stop; 0 while none did.
static REQUESTED: AtomicUsize = AtomicUsize::new(0);
/// Whether a signal came already: the next one ends the process at once.
static SEEN: AtomicBool = AtomicBool::new(false);

/// A signal that asked the run to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    fn number(self) -> i32 {
        match self {
            StopSignal::Interrupt => SIGINT,
            StopSignal::Terminate => SIGTERM,
        }
    }

    /// 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM.
    pub fn exit_code(self) -> u8 {
        (128 + self.number()) as u8
    }

    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }
}

/// Turns SIGINT and SIGTERM into stop requests that the run loop serves (see the module docs).
pub fn install() -> std::io::Result<()> {
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees SEEN as it was before this signal.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, &SEEN)?;
        signal_hook::flag::register_usize(signal, &REQUESTED, signal as usize)?;
        signal_hook::flag::register(signal, &SEEN)?;
    }
    Ok(())
}

/// The signal that asked the run to stop, if one did.
pub fn requested() -> Option<StopSignal> {
    match REQUESTED.load(Ordering::SeqCst) as i32 {
        0 => None,
        SIGINT => Some(StopSignal::Interrupt),
        _ => Some(StopSignal::Terminate),
    }
}
