//! Fault phases and quiet phases, and the liveness check that ends each
//! quiet phase.
//!
//! A quiet phase heals the network and the disks and restarts every node
//! except a minority kept down on purpose. Once a leader deadline has passed
//! the cluster counts as stable: from then on every read must be answered.
//! After a while the clients stop starting operations and the check waits,
//! within a deadline derived from the configuration and the replication lag,
//! for the cluster to have a leader and to have applied every acknowledged
//! proposal on every running node.

use super::{Cluster, Event};
use crate::network::Quality;
use crate::profile::{Micros, TICK};
use crate::safety::Violation;

/// Length of a fault phase, µs.
const FAULT_PHASE: (Micros, Micros) = (500_000, 3_000_000);
/// How long clients keep working in a quiet phase once it is stable.
const QUIET_OPEN: Micros = 1_000_000;
/// Slack on top of the computed catch-up time.
const CATCH_UP_SLACK: Micros = 1_000_000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Kind {
    #[default]
    Fault,
    Quiet,
    /// Quiet, clients stopped, waiting for the liveness check to pass.
    Draining,
}

/// Where the run is.
#[derive(Debug, Default)]
pub(super) struct Phase {
    /// Number of the current phase, from 1.
    index: u32,
    kind: Kind,
    /// Clients start new operations.
    pub(super) clients_active: bool,
    /// Operations completed in this phase.
    pub(super) completed: u64,
    /// When the clients stopped, and when the liveness check fails.
    drained_at: Micros,
    deadline: Micros,
    /// The last quiet phase passed its check.
    pub(super) finished: bool,
}

impl Phase {
    /// Whether faults of phase `phase` are still due.
    pub(super) fn faulty(&self, phase: u32) -> bool {
        self.kind == Kind::Fault && self.index == phase
    }

    /// Whether a fault phase is under way.
    pub(super) fn faulty_now(&self) -> bool {
        self.kind == Kind::Fault && !self.finished
    }

    /// Whether a quiet phase is under way (its reads must be answered).
    pub(super) fn quiet(&self) -> bool {
        self.kind != Kind::Fault && !self.finished
    }

    fn current(&self, phase: u32, kind: Kind) -> bool {
        self.index == phase && self.kind == kind
    }
}

impl Cluster {
    pub(super) fn begin_fault_phase(&mut self) {
        let p = &mut self.phase;
        p.index += 1;
        p.kind = Kind::Fault;
        p.clients_active = true;
        p.completed = 0;
        let phase = p.index;
        // Nodes kept down through the last quiet phase come back, behind.
        for node in 0..self.nodes.len() {
            if self.nodes[node].held_down {
                self.nodes[node].held_down = false;
                self.start(node);
            }
        }
        // A minority down for a long time: this whole phase and the next
        // quiet one. With load running, it returns thousands of entries
        // behind, and (if it led) with a suffix nobody else has.
        // Chosen among the voters (of the leader's membership, if there is
        // a leader): a minority of them.
        let voters = self.voters_now();
        let n = voters.len();
        if n >= 3 && self.rng.chance(0.3) {
            let count = self.rng.range(1, (n as u64 - 1) / 2 + 1) as usize;
            let mut victims = Vec::new();
            if let Some(l) = self.current_leader()
                && self.rng.chance(0.5)
            {
                victims.push(l);
            }
            while victims.len() < count {
                let v = self.rng.pick(&voters);
                if !victims.contains(&v) {
                    victims.push(v);
                }
            }
            for v in victims {
                self.crash(v);
                self.nodes[v].held_down = true;
            }
        }
        for client in 0..self.clients.len() {
            self.schedule_client_soon(client);
        }
        for proposer in 0..self.proposers.len() {
            self.schedule(self.now, Event::LoadAct { proposer });
        }
        let (lo, hi) = self.profile.fault_gap;
        let at = self.now + self.rng.range(lo, hi);
        self.schedule(at, Event::Fault { phase });
        let at = self.now + self.rng.range(FAULT_PHASE.0, FAULT_PHASE.1);
        self.schedule(at, Event::Heal { phase });
    }

    fn schedule_client_soon(&mut self, client: usize) {
        let at = self.now + self.rng.range(0, 5 * TICK);
        self.schedule(at, Event::ClientAct { client });
    }

    pub(super) fn begin_quiet_phase(&mut self, phase: u32) {
        if !self.phase.current(phase, Kind::Fault) {
            return;
        }
        self.phase.kind = Kind::Quiet;
        self.phase.completed = 0;
        self.net.heal();
        self.lasting_cuts.clear();
        self.net.quality = Quality::PERFECT;
        for node in 0..self.nodes.len() {
            // Pauses run out on their own (they are shorter than the leader
            // deadline); a stalled disk answers now.
            let n = &mut self.nodes[node];
            if n.disk_stalled_until > self.now {
                n.disk_stalled_until = self.now;
                if let Some(&(write, _)) = n.writing.back() {
                    self.schedule(self.now, Event::Persisted { node, write });
                }
            }
            if self.nodes[node].disk_failed {
                // Only a restart clears a failed disk.
                self.crash(node);
            }
            if self.nodes[node].driver.is_none() && !self.nodes[node].held_down {
                self.start(node);
            }
        }
        let deadline = self.profile.leader_deadline();
        self.schedule(
            self.now + deadline,
            Event::CheckLeader {
                phase,
                again: false,
            },
        );
        self.schedule(self.now + deadline + QUIET_OPEN, Event::Drain { phase });
    }

    pub(super) fn check_leader(&mut self, phase: u32, again: bool) -> Result<(), Violation> {
        if !self.phase.current(phase, Kind::Quiet) {
            return Ok(());
        }
        if self.current_leader().is_none() && !again && self.profile.reconfigure.is_some() {
            // A leader that removed itself steps down once the change
            // commits, however quiet the network: one more election is due.
            let grace = 4 * u64::from(self.profile.election_ticks) * self.profile.slowest_tick();
            self.schedule(self.now + grace, Event::CheckLeader { phase, again: true });
            return Ok(());
        }
        if self.current_leader().is_none() {
            return Err(Violation {
                property: "liveness",
                detail: format!(
                    "no leader {} ticks into quiet phase {phase}",
                    self.profile.leader_deadline() / TICK
                ),
            });
        }
        Ok(())
    }

    pub(super) fn drain(&mut self, phase: u32) {
        if !self.phase.current(phase, Kind::Quiet) {
            return;
        }
        self.phase.kind = Kind::Draining;
        self.phase.clients_active = false;
        self.phase.drained_at = self.now;
        self.phase.deadline = self.now + self.catch_up_allowance();
        self.schedule(self.now, Event::QuietCheck { phase });
    }

    /// How long the running nodes may take to apply everything: the lag of
    /// the slowest over what one round trip carries, a probe per term of
    /// divergent history and a few more round trips, half again, and slack.
    /// Tight enough that a core replicating at a fraction of that speed
    /// fails (`tightest_deadline_permille` reports the margin).
    fn catch_up_allowance(&mut self) -> Micros {
        let up = || self.nodes.iter().filter_map(|n| n.driver.as_ref());
        let last = up().map(|d| d.raft().log().last_index()).max().unwrap_or(0);
        let applied = self
            .members_now()
            .into_iter()
            .map(|i| &self.nodes[i])
            .filter(|n| n.driver.is_some())
            .map(|n| n.applied)
            .min()
            .unwrap_or(0);
        let top_term = up().map(|d| d.raft().term()).max().unwrap_or(0);
        let low_term = up().map(|d| d.raft().log().last_term()).min().unwrap_or(0);
        let per_round = self.profile.entries_per_append() * self.profile.max_inflight as u64;
        let lag = last.saturating_sub(applied);
        let rounds = lag / per_round + (top_term - low_term) + 20;
        self.depth.largest_lag = self.depth.largest_lag.max(lag);
        3 * rounds * self.profile.round_trip() / 2 + CATCH_UP_SLACK
    }

    pub(super) fn quiet_check(&mut self, phase: u32) -> Result<(), Violation> {
        if !self.phase.current(phase, Kind::Draining) {
            return Ok(());
        }
        let unmet = self.unmet_liveness();
        let Some(unmet) = unmet else {
            let used = self.now - self.phase.drained_at;
            let allowed = self.phase.deadline - self.phase.drained_at;
            let permille = used * 1_000 / allowed.max(1);
            self.depth.tightest_deadline_permille =
                self.depth.tightest_deadline_permille.max(permille);
            if self.phase.index < self.profile.phases {
                self.begin_fault_phase();
            } else {
                self.phase.finished = true;
                self.discard_unaccepted();
            }
            return Ok(());
        };
        if self.now >= self.phase.deadline {
            return Err(Violation {
                property: "liveness",
                detail: format!("at the end of quiet phase {phase}: {unmet}"),
            });
        }
        self.schedule(self.now + 5 * TICK, Event::QuietCheck { phase });
        Ok(())
    }

    /// What the cluster has not achieved yet, if anything.
    fn unmet_liveness(&self) -> Option<String> {
        let Some(leader) = self.current_leader() else {
            return Some("no leader".into());
        };
        if self.phase.completed == 0 {
            return Some("no operation completed in the phase".into());
        }
        let raft = self.nodes[leader]
            .driver
            .as_ref()
            .expect("a leader is up")
            .raft();
        if raft.membership().is_joint() || raft.membership_index() > raft.log().committed() {
            return Some(format!(
                "membership change at {} not finished: {:?}",
                raft.membership_index(),
                raft.membership()
            ));
        }
        if let Some(n) = self
            .members_now()
            .into_iter()
            .map(|i| &self.nodes[i])
            .find(|n| n.driver.is_some() && n.applied < self.acked_index)
        {
            return Some(format!(
                "acknowledged index {} not applied on node {} (applied {})",
                self.acked_index, n.id, n.applied
            ));
        }
        if let Some(op) = self.unanswered_stable_read() {
            return Some(format!("read {op} issued while stable is unanswered"));
        }
        None
    }
}
