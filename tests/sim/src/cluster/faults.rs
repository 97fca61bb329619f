//! The faults of a fault phase: partitions, one-way links (some lasting the
//! whole phase), lossy links, crashes (some placed right after a send that
//! promises durable state), pauses, disk stalls and failures, clock jumps,
//! and in reconfiguring runs membership changes and leadership transfers.

use kythira_raft::{Message, MessageBody};

use super::{Cluster, Event};
use crate::network::Quality;
use crate::profile::Micros;
use crate::safety::Violation;

/// Placed crashes are at least this far apart, so that they do not keep
/// the cluster down for good.
const PLACED_CRASH_GAP: Micros = 20_000;

impl Cluster {
    pub(super) fn inject_fault(&mut self) -> Result<(), Violation> {
        let n = self.nodes.len();
        let rolls = if self.profile.reconfigure.is_some() {
            140
        } else {
            100
        };
        let roll = self.rng.range(0, rolls);
        match roll {
            100..130 => return self.change_membership(),
            130..140 => return self.transfer_leadership(),
            0..12 => self.heal_links(),
            12..22 => {
                let side: Vec<bool> = (0..n).map(|_| self.rng.chance(0.5)).collect();
                self.net.split(&side);
            }
            22..30 => {
                if let Some(l) = self.current_leader() {
                    let side: Vec<bool> = (0..n).map(|i| i == l).collect();
                    self.net.split(&side);
                    if self.rng.chance(0.3) {
                        // Cut off for the rest of the phase: without
                        // check-quorum it keeps taking proposals, and
                        // returns with a long suffix nobody else has.
                        for other in (0..n).filter(|&o| o != l) {
                            self.lasting_cuts.push((l, other));
                            self.lasting_cuts.push((other, l));
                        }
                    }
                }
            }
            30..38 => {
                let from = self.rng.range(0, n as u64) as usize;
                let to = self.rng.range(0, n as u64) as usize;
                if from != to {
                    self.net.block_one_way(from, to);
                    if self.rng.chance(0.3) {
                        self.lasting_cuts.push((from, to));
                    }
                }
            }
            38..55 => {
                if let Some(v) = self.crash_victim() {
                    self.crash(v);
                }
            }
            55..63 => {
                for node in 0..n {
                    if self.nodes[node].disk_failed {
                        self.crash(node);
                    }
                    let down = &self.nodes[node];
                    if down.driver.is_none() && !down.held_down {
                        self.start(node);
                    }
                }
            }
            63..70 => {
                let node = self.leader_or_any(0.5);
                let pause = self.rng.range(50_000, 800_000);
                // Its clock runs on: the ticks that come due meanwhile are
                // delivered when it resumes (see `next_tick_due`).
                let n = &mut self.nodes[node];
                n.paused_until = n.paused_until.max(self.now + pause);
            }
            70..76 => {
                let node = self.leader_or_any(0.3);
                let stall = self.rng.range(100_000, 3_000_000);
                let n = &mut self.nodes[node];
                n.disk_stalled_until = n.disk_stalled_until.max(self.now + stall);
            }
            76..80 => {
                let node = self.leader_or_any(0.3);
                self.nodes[node].disk_failed = true;
            }
            // A clock that jumps forward on a follower breaks the lease's
            // assumption of bounded drift: not with lease reads.
            80..86 if !self.profile.lease_reads => {
                let node = self.rng.range(0, n as u64) as usize;
                let jump = 3 * u64::from(self.profile.election_ticks);
                self.nodes[node].missed_ticks = self.rng.range(2, jump) as u32;
            }
            _ => {
                self.net.quality = Quality {
                    drop: self.rng.pick(&[0.0, 0.01, 0.05, 0.2]),
                    duplicate: self.rng.pick(&[0.0, 0.02, 0.1]),
                    detour: self.rng.pick(&[0.0, 0.05, 0.2]),
                };
            }
        }
        Ok(())
    }

    /// Reconnect every link except the ones cut for the whole phase.
    fn heal_links(&mut self) {
        self.net.heal();
        for &(from, to) in &self.lasting_cuts {
            self.net.block_one_way(from, to);
        }
    }

    fn leader_or_any(&mut self, leader_chance: f64) -> usize {
        match self.current_leader() {
            Some(l) if self.rng.chance(leader_chance) => l,
            _ => self.rng.range(0, self.nodes.len() as u64) as usize,
        }
    }

    /// Prefer the leader or a node in the middle of a write: the crashes
    /// that hurt.
    fn crash_victim(&mut self) -> Option<usize> {
        let n = self.nodes.len();
        let writing: Vec<usize> = (0..n)
            .filter(|&i| !self.nodes[i].writing.is_empty())
            .collect();
        let up: Vec<usize> = (0..n).filter(|&i| self.nodes[i].driver.is_some()).collect();
        let leader = self.current_leader();
        if leader.is_some() && self.rng.chance(0.3) {
            leader
        } else if !writing.is_empty() && self.rng.chance(0.6) {
            Some(self.rng.pick(&writing))
        } else if !up.is_empty() {
            Some(self.rng.pick(&up))
        } else {
            None
        }
    }

    /// Maybe crash the sender of `m` right after it leaves, while its next
    /// write is in flight: a vote, an acknowledgement or an append is where
    /// a node that promised more than it stored is found out.
    pub(super) fn maybe_crash_after(&mut self, m: &Message) {
        let p = self.profile.crash_after_send;
        if p == 0.0 || !self.phase.faulty_now() || self.now < self.next_placed_crash {
            return;
        }
        let promising = matches!(
            m.body,
            MessageBody::Vote { .. }
                | MessageBody::VoteResponse { .. }
                | MessageBody::Append { .. }
                | MessageBody::AppendResponse(_)
                | MessageBody::HeartbeatResponse { .. }
        );
        if promising && self.rng.chance(p) {
            let node = m.from as usize - 1;
            let incarnation = self.nodes[node].incarnation;
            self.next_placed_crash = self.now + PLACED_CRASH_GAP;
            // At the same instant, after the event that sent it.
            self.schedule(self.now, Event::Crash { node, incarnation });
        }
    }
}
