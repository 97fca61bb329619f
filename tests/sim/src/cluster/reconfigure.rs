//! Membership changes and leadership transfers, injected among the faults of
//! a fault phase: add a learner, promote one, remove a voter (the leader
//! too) or a learner, replace a voter by a learner, hand leadership over.
//! The core refuses what it must (a change while one is pending, a transfer
//! to a non-voter); the simulator only checks that what it accepts is safe.

use kythira_raft::{Membership, NodeId};

use super::Cluster;
use crate::safety::Violation;

impl Cluster {
    /// Propose a random membership change at the current leader.
    pub(super) fn change_membership(&mut self) -> Result<(), Violation> {
        let Some(l) = self.current_leader() else {
            return Ok(());
        };
        let Some(target) = self.draw_membership(l) else {
            return Ok(());
        };
        let driver = self.nodes[l].driver.as_mut().expect("a leader is up");
        // Refused while another change is under way: fine, it is a fault.
        let _ = driver.propose_membership(target);
        self.with_driver(l, |_| Ok(()))?;
        self.drive(l)
    }

    /// A change of the leader's membership, or `None` if the draw finds none
    /// that applies.
    fn draw_membership(&mut self, leader: usize) -> Option<Membership> {
        let raft = self.nodes[leader].driver.as_ref()?.raft();
        let m = raft.membership().target();
        let leader_id = raft.id();
        let voters: Vec<NodeId> = m.voters().ids().collect();
        let learners: Vec<NodeId> = m.learners().collect();
        let outsiders: Vec<NodeId> = self
            .nodes
            .iter()
            .map(|n| n.id)
            .filter(|&id| !m.contains(id))
            .collect();
        // Keep the cluster within one voter of its starting size, so that
        // each size the sweeps name is what they test.
        let (min_voters, max_voters) = (
            self.opts.nodes.saturating_sub(1).max(1),
            self.opts.nodes + 1,
        );
        // Each kind of change in turn, from a random one, until one applies:
        // a change is never skipped for want of a learner to promote.
        let first = self.rng.range(0, 5);
        let mut change = None;
        for k in 0..5 {
            change = match (first + k) % 5 {
                0 if !outsiders.is_empty() => Some(m.with_learner(self.rng.pick(&outsiders))),
                1 if !learners.is_empty() && voters.len() < max_voters => {
                    Some(m.with_promoted(self.rng.pick(&learners)))
                }
                2 if voters.len() > min_voters => {
                    let victim = self.pick_victim(leader_id, &voters);
                    Some(m.without(victim))
                }
                3 if !learners.is_empty() && self.rng.chance(0.3) => {
                    Some(m.without(self.rng.pick(&learners)))
                }
                // Replace a voter (the leader, at times) by a learner: the
                // change whose joint phase has an old and a new majority
                // that share the least.
                4 if !learners.is_empty() => {
                    let victim = self.pick_victim(leader_id, &voters);
                    Some(
                        m.with_promoted(self.rng.pick(&learners))
                            .and_then(|m| m.without(victim)),
                    )
                }
                _ => None,
            };
            if change.is_some() {
                break;
            }
        }
        let change = change?;
        let target = change.ok()?;
        // Nodes kept down through the next quiet phase must stay a minority
        // of every voter set, or the quiet phase could not make progress.
        let held = |id: NodeId| self.nodes[id as usize - 1].held_down;
        let live = [m.voters(), target.voters()]
            .iter()
            .all(|set| set.ids().filter(|&v| !held(v)).count() >= set.majority());
        live.then_some(target)
    }

    /// A voter to remove: the leader itself at times.
    fn pick_victim(&mut self, leader: NodeId, voters: &[NodeId]) -> NodeId {
        if self.rng.chance(0.4) {
            leader
        } else {
            self.rng.pick(voters)
        }
    }

    /// Ask the current leader to hand leadership to a random other voter.
    pub(super) fn transfer_leadership(&mut self) -> Result<(), Violation> {
        let Some(l) = self.current_leader() else {
            return Ok(());
        };
        let raft = self.nodes[l]
            .driver
            .as_ref()
            .expect("a leader is up")
            .raft();
        let others: Vec<NodeId> = raft
            .membership()
            .voters()
            .ids()
            .filter(|&v| v != raft.id())
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let to = self.rng.pick(&others);
        let driver = self.nodes[l].driver.as_mut().expect("a leader is up");
        driver.transfer_leadership(to).map_err(|e| Violation {
            property: "simulator",
            detail: format!("transfer to voter {to} refused: {e}"),
        })?;
        self.with_driver(l, |_| Ok(()))?;
        self.drive(l)
    }
}

impl Cluster {
    /// The voters of the current leader's membership (of the bootstrap one
    /// while there is no leader), as node indices.
    pub(super) fn voters_now(&self) -> Vec<usize> {
        let raft = match self.current_leader() {
            Some(l) => self.nodes[l].driver.as_ref().map(|d| d.raft()),
            // The newest membership any running node holds.
            None => self
                .nodes
                .iter()
                .filter_map(|n| n.driver.as_ref().map(|d| d.raft()))
                .max_by_key(|r| (r.term(), r.membership_index())),
        };
        let m = raft.map_or_else(
            || super::bootstrap(&self.opts, 0),
            |r| r.membership().clone(),
        );
        (0..self.nodes.len())
            .filter(|&i| m.is_voter(self.nodes[i].id))
            .collect()
    }
}
