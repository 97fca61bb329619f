//! The simulated network: per-link blocking (partitions, one-way links),
//! random delay, loss, duplication and reordering.
//!
//! A link delivers in order, as the daemon's one QUIC stream per peer does;
//! only a detour (a retransmission after loss, a reconnection) overtakes or
//! falls behind the rest.

use crate::rng::Rng;

/// Link quality, changed by the fault schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quality {
    /// Probability that a message is lost.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Probability that a message takes a long detour (reordering it).
    pub detour: f64,
}

impl Quality {
    /// No loss, no duplicates, no detours.
    pub const PERFECT: Quality = Quality {
        drop: 0.0,
        duplicate: 0.0,
        detour: 0.0,
    };
}

/// Which links are up, and how good they are.
#[derive(Clone, Debug)]
pub struct Network {
    n: usize,
    /// `blocked[from * n + to]`: messages on that link are lost.
    blocked: Vec<bool>,
    /// Current quality.
    pub quality: Quality,
    /// Delay of a normal delivery, in µs: `[min, max)`.
    pub delay: (u64, u64),
    /// Extra delay of a detour, in µs: `[min, max)`.
    pub detour_delay: (u64, u64),
    /// `last[from * n + to]`: delivery time of the latest in-order message.
    last: Vec<u64>,
}

impl Network {
    /// A fully connected network of `n` nodes (indices `0..n`).
    pub fn new(n: usize) -> Self {
        Self {
            n,
            blocked: vec![false; n * n],
            quality: Quality::PERFECT,
            delay: (200, 3_000),
            detour_delay: (5_000, 40_000),
            last: vec![0; n * n],
        }
    }

    /// Whether `from` can currently reach `to`.
    pub fn connected(&self, from: usize, to: usize) -> bool {
        !self.blocked[from * self.n + to]
    }

    /// Reconnect every link.
    pub fn heal(&mut self) {
        self.blocked.fill(false);
    }

    /// Block the link `from -> to` only.
    pub fn block_one_way(&mut self, from: usize, to: usize) {
        self.blocked[from * self.n + to] = true;
    }

    /// Cut every link between `side` (true) and the rest, both ways.
    pub fn split(&mut self, side: &[bool]) {
        for a in 0..self.n {
            for b in 0..self.n {
                if side[a] != side[b] {
                    self.blocked[a * self.n + b] = true;
                }
            }
        }
    }

    /// Delivery times for one message sent at `now`: none if lost, two if
    /// duplicated.
    pub fn deliveries(
        &mut self,
        now: u64,
        from: usize,
        to: usize,
        rng: &mut Rng,
    ) -> impl Iterator<Item = u64> + use<> {
        let mut times = [None, None];
        if self.connected(from, to) && !rng.chance(self.quality.drop) {
            times[0] = Some(self.delivery(now, from * self.n + to, rng));
            if rng.chance(self.quality.duplicate) {
                times[1] = Some(self.delivery(now, from * self.n + to, rng));
            }
        }
        times.into_iter().flatten()
    }

    fn delivery(&mut self, now: u64, link: usize, rng: &mut Rng) -> u64 {
        let at = now + rng.range(self.delay.0, self.delay.1);
        if rng.chance(self.quality.detour) {
            return at + rng.range(self.detour_delay.0, self.detour_delay.1);
        }
        let at = at.max(self.last[link]);
        self.last[link] = at;
        at
    }
}
