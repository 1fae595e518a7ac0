//! A device server in the host's process, as a [`Transport`]: what is sent is served at once,
//! and the replies wait to be received. Tests of a device's layers drive it through the very
//! [`super::Client`] and [`super::Link`] a host uses, with no thread and no timing.

use std::time::Duration;

use super::Transport;
use crate::frame::{FrameDecoder, MAX_ENCODED, MAX_PAYLOAD};
use crate::server::{Buffer, PhysicalLayer, Server, ServerIo};

/// A [`Server`] as a [`Transport`] (see the module docs).
pub struct Loopback<'n, L, Ls, B> {
    server: Server<'n, L, Ls, B>,
    io: ServerIo<Vec<u8>>,
    replies: Vec<u8>,
    at: usize,
}

impl<'n, L, Ls, B> Loopback<'n, L, Ls, B>
where
    L: PhysicalLayer,
    Ls: AsMut<[L]> + AsRef<[L]>,
    B: Buffer,
{
    /// `server` with buffers that take any frame.
    pub fn new(server: Server<'n, L, Ls, B>) -> Self {
        Self {
            server,
            io: ServerIo {
                decoder: FrameDecoder::new(vec![0; MAX_ENCODED]),
                payload: vec![0; MAX_PAYLOAD],
                out: vec![0; MAX_ENCODED + 1],
            },
            replies: Vec::new(),
            at: 0,
        }
    }

    pub fn server(&self) -> &Server<'n, L, Ls, B> {
        &self.server
    }

    pub fn server_mut(&mut self) -> &mut Server<'n, L, Ls, B> {
        &mut self.server
    }
}

impl<L, Ls, B> Transport for Loopback<'_, L, Ls, B>
where
    L: PhysicalLayer,
    Ls: AsMut<[L]> + AsRef<[L]>,
    B: Buffer,
    Self: Send,
{
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.at == self.replies.len() {
            self.replies.clear();
            self.at = 0;
        }
        let replies = &mut self.replies;
        let Ok(()) = self.server.serve(&mut self.io, bytes, |reply| {
            replies.extend_from_slice(reply);
            Ok::<_, core::convert::Infallible>(())
        });
        Ok(())
    }

    fn receive(&mut self, buf: &mut [u8], _timeout: Duration) -> std::io::Result<usize> {
        let n = buf.len().min(self.replies.len() - self.at);
        buf[..n].copy_from_slice(&self.replies[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }

    fn discard_input(&mut self) -> std::io::Result<()> {
        self.at = self.replies.len();
        Ok(())
    }
}
