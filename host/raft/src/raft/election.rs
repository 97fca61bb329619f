//! Elections: timeouts, pre-vote, votes and role changes (Raft §5.2, §5.4.1; thesis §9.6).

use bytes::Bytes;

#[cfg(feature = "mutants")]
use crate::config::Mutation;
use crate::message::MessageBody;
use crate::progress::Progress;
use crate::read_index::ReadRounds;
use crate::types::{Entry, EntryKind, Index, MAX_TERM, NodeId, Term};

use super::membership::quorum;
use super::{Broadcast, Leadership, Raft, State, Votes};
use crate::quorum::VoteResult;

impl Raft {
    /// Whether this node heard from a live leader within the minimum
    /// election timeout: vote requests are then ignored, term and all
    /// (thesis §4.2.3). Only with check-quorum, which guarantees that such a
    /// leader still hears from a quorum (as etcd does). This, or pre-vote,
    /// is what keeps a removed server that never learned of its removal
    /// from disrupting the cluster through a member whose log is too far
    /// behind to know of the removal: with both off, that member adopts the
    /// removed server's terms and deposes leader after leader.
    pub(super) fn in_lease(&self) -> bool {
        let leading = matches!(self.state, State::Leader(_))
            && self.election_elapsed < self.cfg.election_ticks;
        self.cfg.check_quorum && (self.ticks < self.lease_until || leading)
    }

    pub(super) fn reset_timers(&mut self) {
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let min = u64::from(self.cfg.election_ticks);
        self.randomized_timeout = self.rng.range(min, 2 * min) as u32;
    }

    pub(super) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        debug_assert!(term >= self.term, "terms never decrease");
        if let State::Leader(l) = &mut self.state {
            // Local reads fail now; followers' forwarded reads expire there.
            self.dropped_reads
                .extend(l.reads.drain().filter(|r| r.from.is_none()).map(|r| r.ctx));
        }
        if term != self.term || leader != self.leader {
            self.drop_forwarded();
        }
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.state = State::Follower;
        self.leader = leader;
        self.reset_timers();
    }

    /// Whether this node starts elections: a voter of the membership in
    /// effect, or of the one it replaced while the new one is not known to
    /// be committed. The second case is a leader that removed itself and
    /// lost its quorum (or crashed) before the new configuration committed:
    /// its log may be the only one the others' joint configuration lets win,
    /// and if it did not campaign nobody could. Who campaigns is a matter of
    /// liveness only; a candidate still needs a majority of every voter set
    /// of its own membership.
    pub(super) fn may_campaign(&self) -> bool {
        let id = self.cfg.id;
        self.memberships.current().is_voter(id)
            || (self.memberships.current_index() > self.log.committed()
                && self.memberships.previous().is_some_and(|m| m.is_voter(id)))
    }

    pub(super) fn campaign(&mut self) {
        if !self.may_campaign() {
            // Learners, joining and removed nodes never campaign.
            return;
        }
        if self.next_term().is_none() {
            // No term left to campaign in: keep waiting for a leader of this one.
            let term = self.term;
            self.become_follower(term, None);
            return;
        }
        if self.cfg.pre_vote {
            self.leader = None;
            self.drop_forwarded();
            self.state = State::PreCandidate(Votes::default());
            self.reset_timers();
            self.request_votes(true, false);
        } else {
            self.campaign_for_real(false);
        }
    }

    /// The term after the current one, unless that would pass `MAX_TERM`.
    fn next_term(&self) -> Option<Term> {
        self.term.checked_add(1).filter(|&t| t <= MAX_TERM)
    }

    /// Campaign in the next term; `transfer` when the leader handed over to
    /// this node (its vote requests then set the leader lease aside).
    pub(super) fn campaign_for_real(&mut self, transfer: bool) {
        let Some(term) = self.next_term() else {
            let term = self.term;
            self.become_follower(term, None);
            return;
        };
        self.term = term;
        self.vote = Some(self.cfg.id);
        self.leader = None;
        self.drop_forwarded();
        self.state = State::Candidate(Votes::default());
        self.reset_timers();
        self.request_votes(false, transfer);
    }

    pub(super) fn request_votes(&mut self, pre: bool, transfer: bool) {
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let term = if pre {
            self.next_term().expect("campaign checks for a next term")
        } else {
            self.term
        };
        let m = self.memberships.current();
        let voters: Vec<NodeId> = m
            .voters()
            .ids()
            .chain(m.outgoing().into_iter().flat_map(|o| o.ids()))
            .filter(|&v| v != self.cfg.id)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for to in voters {
            let body = if pre {
                MessageBody::PreVote {
                    last_index,
                    last_term,
                }
            } else {
                MessageBody::Vote {
                    last_index,
                    last_term,
                    transfer,
                }
            };
            self.out.send(term, to, body);
        }
        if pre {
            // A pre-vote promises nothing: ours counts at once.
            self.handle_vote_response(self.cfg.id, term, true, true);
        } else if let State::Candidate(votes) = &mut self.state {
            // Our own vote is recorded, but it decides nothing until it is
            // durable: a lone voter that led before its vote reached the
            // disk could, after a crash, vote for another candidate in the
            // same term. (Anyone else's vote answers a request that left
            // only once ours was durable, so only a lone voter waits.)
            votes.record(self.cfg.id, true);
            self.own_vote_pending = true;
        }
    }

    /// The write holding this candidate's vote for itself is durable: the
    /// election is decided on it if it decides alone.
    pub(super) fn count_own_vote_if_durable(&mut self) {
        let durable = self.durable.term == self.term && self.durable.vote == Some(self.cfg.id);
        if self.own_vote_pending && durable && matches!(self.state, State::Candidate(_)) {
            self.own_vote_pending = false;
            let term = self.term;
            self.handle_vote_response(self.cfg.id, term, true, false);
        }
    }

    pub(super) fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: Term,
        last_index: Index,
        last_term: Term,
        pre: bool,
    ) {
        let can_vote = self.vote == Some(from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre && term > self.term);
        #[cfg(feature = "mutants")]
        let can_vote =
            can_vote || (self.cfg.mutated(Mutation::VoteTwiceInTerm) && self.leader.is_none());
        let up_to_date = self.log.is_up_to_date(last_index, last_term);
        #[cfg(feature = "mutants")]
        let up_to_date = up_to_date || self.cfg.mutated(Mutation::VoteWithoutLogCheck);
        let granted = can_vote && up_to_date;
        if pre {
            // A granted pre-vote answers in the term asked about, so the
            // pre-candidate can tell it from a rejection by a newer term.
            let reply_term = if granted { term } else { self.term };
            self.out
                .send(reply_term, from, MessageBody::PreVoteResponse { granted });
        } else {
            if granted {
                // The mutant's second vote leaves the first one recorded, so
                // that a candidate keeps counting itself.
                let second_vote = false;
                #[cfg(feature = "mutants")]
                let second_vote = second_vote
                    || (self.vote.is_some_and(|v| v != from)
                        && self.cfg.mutated(Mutation::VoteTwiceInTerm));
                if !second_vote {
                    debug_assert!(
                        self.vote.is_none() || self.vote == Some(from),
                        "one vote per term"
                    );
                    self.vote = Some(from);
                }
                self.election_elapsed = 0;
            }
            self.out
                .send(self.term, from, MessageBody::VoteResponse { granted });
        }
    }

    pub(super) fn handle_vote_response(
        &mut self,
        from: NodeId,
        term: Term,
        granted: bool,
        pre: bool,
    ) {
        let votes = match &mut self.state {
            State::PreCandidate(v) if pre && Some(term) == self.term.checked_add(1) => v,
            // A rejected pre-vote carries the responder's (not higher) term.
            State::PreCandidate(v) if pre && !granted && term <= self.term => v,
            State::Candidate(v) if !pre && term == self.term => v,
            _ => return,
        };
        #[cfg(feature = "mutants")]
        if self.cfg.mutated(Mutation::CountDuplicateVotes) {
            votes.count_again(from, granted);
        }
        votes.record(from, granted);
        let q = quorum(&self.cfg, &self.memberships);
        #[allow(unused_mut)]
        let mut result = q.vote_result(|id| votes.by_voter.get(&id).copied());
        #[cfg(feature = "mutants")]
        if self.cfg.mutated(Mutation::CountDuplicateVotes)
            && result == VoteResult::Pending
            && votes.tally() >= self.memberships.current().voters().majority()
        {
            result = VoteResult::Won;
        }
        match result {
            VoteResult::Won if pre => self.campaign_for_real(false),
            VoteResult::Won => self.become_leader(),
            VoteResult::Lost => {
                let term = self.term;
                self.become_follower(term, None);
            }
            VoteResult::Pending => {}
        }
    }

    pub(super) fn become_leader(&mut self) {
        debug_assert_eq!(self.vote, Some(self.cfg.id), "a leader voted for itself");
        let next = self.log.last_index() + 1;
        let mut members = self.memberships.current().members();
        members.remove(&self.cfg.id);
        self.state = State::Leader(Box::new(Leadership {
            progress: members
                .into_iter()
                .map(|p| (p, Progress::new(next)))
                .collect(),
            reads: ReadRounds::default(),
            broadcast: Broadcast::Entries,
            transfer: None,
            lease_revoked: false,
        }));
        self.leader = Some(self.cfg.id);
        self.reset_timers();
        // Committing an entry of our own term commits all earlier ones and
        // lets reads be served (Raft §5.4.2, §8).
        self.log.append(Entry {
            term: self.term,
            index: next,
            kind: EntryKind::Noop,
            data: Bytes::new(),
        });
        // The joint configuration in effect may be committed already: the
        // last leader committed C(old,new) and was gone before C(new)
        // reached us. Only a commit would otherwise append C(new), and our
        // commit index may already be past the joint entry, so without this
        // the joint phase would outlive its commit until our no-op commits.
        self.after_commit();
    }

    pub(super) fn quorum_recently_active(&mut self) -> bool {
        let State::Leader(l) = &mut self.state else {
            return false;
        };
        let me = self.cfg.id;
        let active = quorum(&self.cfg, &self.memberships)
            .agree(|id| id == me || l.progress.get(&id).is_some_and(|p| p.recent_active));
        for p in l.progress.values_mut() {
            p.recent_active = false;
        }
        active
    }
}
