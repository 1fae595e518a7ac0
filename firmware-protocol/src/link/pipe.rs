//! An in-memory byte pipe: two connected [`Transport`]s.

use std::io::ErrorKind;
use std::sync::mpsc;
use std::time::Duration;

use super::Transport;

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
