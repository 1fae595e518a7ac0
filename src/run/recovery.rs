//! Surviving device resets: a device that browns out forgets its parameters and its input and
//! comes back with a new boot id; the run notices, re-programs it from the host's shadow and
//! repeats the interrupted step, and ends bit-identical to an undisturbed run.
//!
//! The unit of work is one step of the run loop: one batch of Algorithm 1, or one evaluation of
//! the test set. Before a step, the host takes a snapshot of what the step changes (its
//! [`HostState`]: shadows, projections, counter; and each layer's state outside its parameters,
//! such as BatchNorm running statistics). After the step, it asks every layer behind a link for
//! its session ([`crate::oracle::DeviceLink::session`], the boot id; one small `Hello` per
//! layer). An unchanged session proves that the step ran on a device that kept everything
//! written to it; a changed one (or an error, such as a forward pass refused for want of input,
//! after which the session has changed) means the step's results cannot be trusted: the host
//! rolls back to the snapshot, programs every layer from it, and runs the step again. Every step
//! is a pure function of the snapshot and its (epoch, batch) counters, so the repeat computes
//! exactly what the first attempt would have.
//!
//! Why here, in the host's run loop, and not inside the serial oracle: a reset wipes every layer
//! of the device at once, while each oracle sees one layer; the shadows, projections and the
//! batch being trained live in the trainer; and a reset can pass unnoticed by any single request
//! (a fresh device accepts an input batch and evaluates zero weights without complaint), so
//! only a check that brackets a whole step, against a snapshot taken before it, can tell good
//! results from bad. Doing it per step costs one snapshot copy and one `Hello` per layer per
//! batch; backends that cannot reset (the simulator) report no session and pay nothing.
//!
//! A device that does not come back (the link is closed, or the device stays silent past its
//! retries) ends the step with that error; the run loop then saves a checkpoint of the snapshot,
//! the last completed batch boundary, so that `--resume` continues from there.

use crate::oracle::{ForwardOracle, LayerShape, OracleError};
use crate::train::{HostState, Trainer};

/// Resets survived in a row, within one step, before the run gives up.
const MAX_RESETS_PER_STEP: u32 = 8;

/// What a step may change, taken before it.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub host: HostState,
    /// Each layer's state outside its parameters, where it has some.
    pub layer_state: Vec<Option<Vec<f32>>>,
}

impl Snapshot {
    pub fn take<O: ForwardOracle>(trainer: &mut Trainer<O>) -> Result<Self, OracleError> {
        let host = trainer.host_state();
        let layer_state = trainer
            .oracles_mut()
            .iter_mut()
            .map(|o| o.read_layer_state())
            .collect::<Result<_, _>>()?;
        Ok(Self { host, layer_state })
    }

    /// Programs every layer from the snapshot: parameters from the shadow, then layer state.
    pub fn restore<O: ForwardOracle>(&self, trainer: &mut Trainer<O>) -> Result<(), OracleError> {
        trainer.restore(&self.host)?;
        for (oracle, state) in trainer.oracles_mut().iter_mut().zip(&self.layer_state) {
            if let Some(state) = state {
                oracle.write_layer_state(state)?;
            }
        }
        Ok(())
    }
}

/// The reset watch over a run's layers (see the module docs).
#[derive(Debug)]
pub struct Recovery {
    /// Each layer's session as of its last programming; `None` for layers that cannot reset.
    sessions: Vec<Option<u64>>,
    reprograms: u64,
}

impl Recovery {
    /// Reads every layer's session. Call it before the layers are programmed, so that a reset
    /// during the programming shows at the first check.
    pub fn new<O: ForwardOracle>(oracles: &mut [O]) -> Result<Self, OracleError> {
        let sessions = read_sessions(oracles)?;
        let recovery = Self {
            sessions,
            reprograms: 0,
        };
        if recovery.enabled() {
            for (l, o) in oracles.iter_mut().enumerate() {
                if matches!(o.spec(), LayerShape::Conv(_)) && o.read_layer_state()?.is_none() {
                    tracing::warn!(
                        "layer {l}: the backend cannot read its BatchNorm statistics back, so after a device reset or a resume they restart and the run is no longer bit-identical"
                    );
                }
            }
        }
        Ok(recovery)
    }

    /// Whether any layer can reset (a device behind a link).
    pub fn enabled(&self) -> bool {
        self.sessions.iter().any(Option::is_some)
    }

    /// Devices re-programmed after a reset, so far.
    pub fn reprograms(&self) -> u64 {
        self.reprograms
    }

    /// A snapshot for the next step, where a layer can reset.
    pub fn snapshot<O: ForwardOracle>(
        &self,
        trainer: &mut Trainer<O>,
    ) -> Result<Option<Snapshot>, OracleError> {
        if self.enabled() {
            Snapshot::take(trainer).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Runs `step`, and again from `snapshot` for as long as a device reset during it (at most
    /// `MAX_RESETS_PER_STEP` (8) times in a row). Without a snapshot (no layer can reset), runs
    /// `step` once.
    pub fn run<O: ForwardOracle, T>(
        &mut self,
        trainer: &mut Trainer<O>,
        snapshot: Option<&Snapshot>,
        mut step: impl FnMut(&mut Trainer<O>) -> Result<T, OracleError>,
    ) -> Result<T, OracleError> {
        let Some(snapshot) = snapshot else {
            return step(trainer);
        };
        let mut resets = 0;
        loop {
            let result = step(trainer);
            let outcome = match &result {
                Ok(_) => "the step completed",
                Err(_) => "the step failed",
            };
            // Whatever the step's outcome, its results count only if no layer reset meanwhile.
            match self.reset_since(trainer) {
                Ok(false) => return result,
                Ok(true) => {}
                // The device does not answer: report what went wrong first.
                Err(e) => return Err(result.err().unwrap_or(e)),
            }
            // Re-program until a programming survives (a reset may hit it too).
            loop {
                resets += 1;
                if resets > MAX_RESETS_PER_STEP {
                    return Err(OracleError::Link(format!(
                        "the device reset {MAX_RESETS_PER_STEP} times in a row during one step"
                    )));
                }
                tracing::warn!(
                    "device reset detected ({outcome}, {}): re-programming it from the shadow and repeating the step",
                    match &result {
                        Ok(_) => "new boot id".to_string(),
                        Err(e) => e.to_string(),
                    }
                );
                match self.reprogram(trainer, snapshot) {
                    Ok(()) => break,
                    Err(e) => match self.reset_since(trainer) {
                        Ok(true) => continue,
                        Ok(false) => return Err(e),
                        Err(_) => return Err(e),
                    },
                }
            }
        }
    }

    /// Whether any layer's session differs from the one it was programmed in.
    fn reset_since<O: ForwardOracle>(&self, trainer: &mut Trainer<O>) -> Result<bool, OracleError> {
        let now = read_sessions(trainer.oracles_mut())?;
        Ok(now != self.sessions)
    }

    /// Rolls back to `snapshot` and programs every layer from it. The sessions are read first:
    /// a reset during the programming then shows at the next check.
    fn reprogram<O: ForwardOracle>(
        &mut self,
        trainer: &mut Trainer<O>,
        snapshot: &Snapshot,
    ) -> Result<(), OracleError> {
        self.sessions = read_sessions(trainer.oracles_mut())?;
        self.reprograms += 1;
        snapshot.restore(trainer)
    }
}

fn read_sessions<O: ForwardOracle>(oracles: &mut [O]) -> Result<Vec<Option<u64>>, OracleError> {
    (oracles.iter_mut())
        .map(|o| o.link_mut().map(|l| l.session()).transpose())
        .collect()
}
