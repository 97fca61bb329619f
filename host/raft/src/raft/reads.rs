//! Linearizable reads: ReadIndex on the leader, lease reads (thesis
//! §6.4.1) and reads forwarded by followers (§6.4, last paragraph).

#[cfg(feature = "mutants")]
use crate::config::Mutation;
use crate::error::ProposeError;
use crate::message::MessageBody;
use crate::read_index::ReadRequest;
use crate::ready::ReadState;
use crate::types::{Index, NodeId};

use super::{Raft, State};

/// Most forwarded reads a leader keeps waiting for its next round.
const MAX_WAITING_FORWARDED: usize = 65_536;

impl Raft {
    /// Request a linearizable read identified by `ctx`. It appears in
    /// `Ready::read_states` once this node's leadership is confirmed by a
    /// quorum (or in `Ready::dropped_reads` if it loses leadership first).
    ///
    /// On a follower that knows its leader, the read is forwarded there and
    /// appears once the leader's read index comes back; it is dropped if the
    /// leader changes or does not answer within an election timeout.
    pub fn read_index(&mut self, ctx: u64) -> Result<(), ProposeError> {
        match &mut self.state {
            State::Leader(l) => {
                l.reads.request(ReadRequest { ctx, from: None });
                self.maybe_start_read_round();
                Ok(())
            }
            // A node outside its own membership gets no entries from the
            // leader (which ignores its requests): the caller is sent there.
            State::Follower if !self.memberships.current().contains(self.cfg.id) => {
                Err(ProposeError::NotLeader {
                    leader: self.leader,
                })
            }
            State::Follower => match self.leader {
                Some(leader) => {
                    self.forwarded.push((ctx, self.ticks));
                    self.out
                        .send(self.term, leader, MessageBody::ReadIndexRequest { ctx });
                    Ok(())
                }
                None => Err(ProposeError::NotLeader { leader: None }),
            },
            State::PreCandidate(_) | State::Candidate(_) => {
                Err(ProposeError::NotLeader { leader: None })
            }
        }
    }

    /// Request a read like [`Raft::read_index`], served at once from the
    /// leader lease when [`crate::Config::lease_reads`] is on and the lease
    /// holds: no other leader can have been elected since a quorum last
    /// acknowledged this leader, less the drift margin. Otherwise (a
    /// follower, no lease, a transfer under way) it takes the ReadIndex path.
    pub fn lease_read(&mut self, ctx: u64) -> Result<(), ProposeError> {
        if self.lease_holds() {
            let index = self.log.committed();
            self.read_states.push(ReadState { index, ctx });
            return Ok(());
        }
        self.read_index(ctx)
    }

    /// Whether this node leads under a lease that still runs.
    pub fn lease_holds(&mut self) -> bool {
        if !self.cfg.lease_reads || !self.term_committed() {
            return false;
        }
        // A single voter's rounds are acknowledged by itself alone.
        if self.maybe_confirm_read() {
            self.maybe_start_read_round();
        }
        self.lease_valid()
    }

    /// Whether this node leads under a lease that still runs, as of the
    /// acknowledgements already counted (a query: [`Raft::lease_holds`]
    /// counts them first). While it holds, no other node can lead a later
    /// term.
    pub fn lease_valid(&self) -> bool {
        if !self.cfg.lease_reads || !self.term_committed() {
            return false;
        }
        let State::Leader(l) = &self.state else {
            return false;
        };
        // Once leadership is handed over, the target campaigns past every
        // lease (a `TimeoutNow` may arrive after the transfer is abandoned).
        if l.transfer.is_some() || l.lease_revoked {
            return false;
        }
        let from = l.reads.lease_from();
        #[cfg(feature = "mutants")]
        let from = if self.cfg.mutated(Mutation::LeaseWithoutQuorum) {
            l.reads.newest_sent()
        } else {
            from
        };
        let lease = u64::from(self.cfg.election_ticks - self.cfg.lease_drift_ticks);
        from.is_some_and(|from| self.ticks < from + lease)
    }

    /// Whether an entry of this leader's term is committed: until then its
    /// commit index may lag the previous leader's (thesis §6.4, step 1).
    pub(super) fn term_committed(&self) -> bool {
        self.log.term(self.log.committed()) == Some(self.term)
    }

    /// A follower forwarded a read (leader only; ignored otherwise: the
    /// follower's read expires).
    pub(super) fn handle_read_request(&mut self, from: NodeId, ctx: u64) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        // A node outside the membership gets no entries, so it could never
        // apply up to the read index: its read expires there instead.
        if !l.progress.contains_key(&from) {
            return;
        }
        // Bounded: while a round cannot complete (no quorum, no entry of this
        // term committed yet) a follower could otherwise grow the list without
        // end. A read refused here expires on the follower.
        if l.reads.waiting() >= MAX_WAITING_FORWARDED {
            return;
        }
        l.reads.request(ReadRequest {
            ctx,
            from: Some(from),
        });
        self.maybe_start_read_round();
    }

    /// The leader's read index for a forwarded read.
    pub(super) fn handle_read_response(&mut self, from: NodeId, ctx: u64, index: Index) {
        if self.leader != Some(from) {
            return;
        }
        if let Some(at) = self.forwarded.iter().position(|&(c, _)| c == ctx) {
            self.forwarded.swap_remove(at);
            self.read_states.push(ReadState { index, ctx });
        }
    }

    /// Confirmed reads: local ones become read states, forwarded ones go
    /// back to their follower.
    pub(super) fn answer_reads(&mut self, confirmed: Vec<(ReadRequest, Index)>) {
        for (r, index) in confirmed {
            match r.from {
                None => self.read_states.push(ReadState { index, ctx: r.ctx }),
                Some(to) => self.out.send(
                    self.term,
                    to,
                    MessageBody::ReadIndexResponse { ctx: r.ctx, index },
                ),
            }
        }
    }

    /// Forwarded reads that the leader has not answered within an election
    /// timeout are dropped (the request or the answer was lost).
    pub(super) fn expire_forwarded(&mut self) {
        let deadline = u64::from(self.cfg.election_ticks);
        let now = self.ticks;
        let dropped = &mut self.dropped_reads;
        self.forwarded.retain(|&(ctx, at)| {
            let live = now - at < deadline;
            if !live {
                dropped.push(ctx);
            }
            live
        });
    }

    /// The leader changed: reads forwarded to the old one are dropped.
    pub(super) fn drop_forwarded(&mut self) {
        self.dropped_reads
            .extend(self.forwarded.drain(..).map(|(ctx, _)| ctx));
    }
}
