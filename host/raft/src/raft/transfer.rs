//! Leadership transfer (Raft thesis §3.10): the leader brings a voter's log
//! up to date, refuses proposals meanwhile, and sends it `TimeoutNow`; the
//! target campaigns at once, past pre-vote and past the others' lease.

#[cfg(feature = "mutants")]
use crate::config::Mutation;
use crate::error::TransferError;
use crate::message::MessageBody;
use crate::types::NodeId;

use super::{Raft, State, Transfer, send_append};

impl Raft {
    /// Hand leadership to voter `to`. Proposals are refused until the
    /// transfer ends: it ends when this node steps down, or is abandoned
    /// after an election timeout. Asking again for the same target changes
    /// nothing; asking for another one replaces the transfer.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), TransferError> {
        let State::Leader(l) = &mut self.state else {
            return Err(TransferError::NotLeader {
                leader: self.leader,
            });
        };
        if to == self.cfg.id {
            return Err(TransferError::AlreadyLeader(to));
        }
        if !self.memberships.current().voters().contains(to) {
            return Err(TransferError::NotAVoter(to));
        }
        if l.transfer.is_some_and(|t| t.to == to) {
            return Ok(());
        }
        l.transfer = Some(Transfer { to, elapsed: 0 });
        #[cfg(feature = "mutants")]
        if self.cfg.mutated(Mutation::TransferWithoutCatchUp) {
            l.lease_revoked = true;
            self.out.send(self.term, to, MessageBody::TimeoutNow);
            return Ok(());
        }
        if !self.maybe_send_timeout_now(to) {
            let State::Leader(l) = &mut self.state else {
                unreachable!("still leader");
            };
            let pr = l.progress.get_mut(&to).expect("a voter has progress");
            send_append(
                &mut self.out,
                &self.log,
                self.snapshot.as_ref(),
                &self.cfg,
                self.term,
                to,
                pr,
                false,
            );
        }
        Ok(())
    }

    /// The voter leadership is being handed to, if a transfer is under way.
    pub fn transfer_target(&self) -> Option<NodeId> {
        match &self.state {
            State::Leader(l) => l.transfer.map(|t| t.to),
            _ => None,
        }
    }

    /// Sends `TimeoutNow` if `to` is the transfer's target and durably holds
    /// this leader's whole log. Returns whether it did.
    pub(super) fn maybe_send_timeout_now(&mut self, to: NodeId) -> bool {
        let State::Leader(l) = &mut self.state else {
            return false;
        };
        let caught_up = l.transfer.is_some_and(|t| t.to == to)
            && l.progress
                .get(&to)
                .is_some_and(|p| p.matched == self.log.last_index());
        if caught_up {
            l.lease_revoked = true;
            self.out.send(self.term, to, MessageBody::TimeoutNow);
        }
        caught_up
    }

    /// A `TimeoutNow` leaves the core only if its target still holds the
    /// whole log: between the step that queued it and the `Ready` that hands
    /// it out (a write may be outstanding for long), the transfer may have
    /// been abandoned and new entries proposed, or the joint phase left.
    /// A dropped one is sent again when the target catches up.
    pub(super) fn withdraw_stale_timeout_now(&mut self) {
        let last = self.log.last_index();
        let current = |to: NodeId| match &self.state {
            State::Leader(l) => {
                l.transfer.is_some_and(|t| t.to == to)
                    && l.progress.get(&to).is_some_and(|p| p.matched == last)
            }
            _ => false,
        };
        let keep: Vec<bool> = self
            .out
            .now
            .iter()
            .map(|m| m.body != MessageBody::TimeoutNow || current(m.to))
            .collect();
        let mut keep = keep.into_iter();
        #[cfg(feature = "mutants")]
        if self.cfg.mutated(Mutation::TransferWithoutCatchUp) {
            return;
        }
        self.out
            .now
            .retain(|_| keep.next().expect("one flag per message"));
    }

    /// One leader tick: a transfer that has not ended within an election
    /// timeout is abandoned, and proposals are accepted again.
    pub(super) fn tick_transfer(&mut self) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        if let Some(t) = &mut l.transfer {
            t.elapsed += 1;
            if t.elapsed >= self.cfg.election_ticks {
                l.transfer = None;
            }
        }
    }

    /// The leader of this term asks this node to campaign now.
    pub(super) fn handle_timeout_now(&mut self, from: NodeId) {
        let from_leader = matches!(self.state, State::Follower) && self.leader == Some(from);
        if from_leader && self.memberships.current().is_voter(self.cfg.id) {
            self.campaign_for_real(true);
        }
    }
}
