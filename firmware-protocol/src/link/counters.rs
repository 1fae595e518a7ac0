//! The one record of a link's traffic and health.

use core::ops::{Add, AddAssign, Sub};

/// What went over a link and how it fared. One type for the whole link (a [`super::Link`]
/// counts into it), for one layer's share of it, and for a run's totals across processes.
///
/// `retries` counts retransmissions (after silence, a damaged frame or a NAK); `resyncs` counts
/// frames dropped as damaged, after each of which the receiver resynchronised at the next
/// delimiter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LinkCounters {
    /// Bytes sent to the device, on the wire (COBS and delimiters included).
    pub bytes_up: u64,
    /// Bytes received from the device, on the wire.
    pub bytes_down: u64,
    /// Requests answered.
    pub round_trips: u64,
    /// Retransmissions.
    pub retries: u64,
    /// Damaged frames dropped (bad COBS or CRC, truncated).
    pub resyncs: u64,
    /// Replies to other requests than the one awaited (late replies), discarded.
    pub stale_replies: u64,
    /// Negative acknowledgements: the device received a request damaged and said so.
    pub naks: u64,
}

impl LinkCounters {
    /// The traffic alone (bytes and round trips), without the health counters.
    pub fn traffic(self) -> Self {
        Self {
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            round_trips: self.round_trips,
            ..Self::default()
        }
    }
}

impl Add for LinkCounters {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            bytes_up: self.bytes_up + o.bytes_up,
            bytes_down: self.bytes_down + o.bytes_down,
            round_trips: self.round_trips + o.round_trips,
            retries: self.retries + o.retries,
            resyncs: self.resyncs + o.resyncs,
            stale_replies: self.stale_replies + o.stale_replies,
            naks: self.naks + o.naks,
        }
    }
}

impl AddAssign for LinkCounters {
    fn add_assign(&mut self, o: Self) {
        *self = *self + o;
    }
}

/// What happened between two readings of the same counters (`later - earlier`).
impl Sub for LinkCounters {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            bytes_up: self.bytes_up - o.bytes_up,
            bytes_down: self.bytes_down - o.bytes_down,
            round_trips: self.round_trips - o.round_trips,
            retries: self.retries - o.retries,
            resyncs: self.resyncs - o.resyncs,
            stale_replies: self.stale_replies - o.stale_replies,
            naks: self.naks - o.naks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differences_undo_them() {
        let a = LinkCounters {
            bytes_up: 10,
            bytes_down: 20,
            round_trips: 2,
            retries: 1,
            resyncs: 3,
            stale_replies: 4,
            naks: 5,
        };
        let mut total = LinkCounters::default();
        total += a;
        total += a;
        assert_eq!(total - a, a);
        assert_eq!(
            a.traffic(),
            LinkCounters {
                bytes_up: 10,
                bytes_down: 20,
                round_trips: 2,
                ..LinkCounters::default()
            }
        );
    }
}
