//! Membership changes by joint consensus (thesis §4.3): proposing a change,
//! following the configuration entries of the log, leaving the joint phase
//! and stepping down once removed.

use std::borrow::Cow;

use crate::config::Config;
#[cfg(feature = "mutants")]
use crate::config::Mutation;
use crate::error::MembershipChangeError;
use crate::membership::{Membership, MembershipLog};
use crate::progress::Progress;
use crate::quorum::VoteResult;
use crate::types::{Entry, EntryKind, Index, NodeId};

use super::{Broadcast, Proposal, Raft, State};

impl Raft {
    /// Propose a change to `target`, a simple membership (build it from
    /// [`Raft::membership`] with [`Membership::with_learner`],
    /// [`Membership::with_promoted`] or [`Membership::without`]).
    ///
    /// A change of voters goes through the joint phase: the entry proposed
    /// here holds both sets, and the leader appends the target by itself
    /// once it commits. A change of learners alone takes one entry. One
    /// change at a time: refused while the last configuration entry is
    /// uncommitted or joint, or while leadership is being transferred.
    pub fn propose_membership(
        &mut self,
        target: Membership,
    ) -> Result<Proposal, MembershipChangeError> {
        let State::Leader(l) = &self.state else {
            return Err(MembershipChangeError::NotLeader {
                leader: self.leader,
            });
        };
        if let Some(t) = &l.transfer {
            return Err(MembershipChangeError::Transferring { to: t.to });
        }
        let current = self.memberships.current();
        if current.is_joint() || self.memberships.current_index() > self.log.committed() {
            return Err(MembershipChangeError::Pending);
        }
        let target = target.target();
        if target.voters().is_empty() {
            return Err(crate::MembershipError::NoVoters.into());
        }
        let entry = if target.voters() == current.voters() {
            target
        } else {
            current.joint_to(&target)
        };
        Ok(self.append_config(entry))
    }

    /// Append a configuration entry as leader; it is in effect at once.
    pub(super) fn append_config(&mut self, m: Membership) -> Proposal {
        let index = self.log.last_index() + 1;
        self.log.append(Entry {
            term: self.term,
            index,
            kind: EntryKind::Config,
            data: m.encode(),
        });
        self.memberships.push(index, m);
        self.sync_progress();
        if let State::Leader(l) = &mut self.state {
            l.broadcast = l.broadcast.max(Broadcast::Entries);
        }
        // Who counts has changed: a removed laggard may have been all that
        // held back a commit or a read round, and no acknowledgement may
        // ever come again to re-examine them (a voter left alone).
        self.maybe_commit();
        self.maybe_confirm_read_after_change();
        Proposal {
            index,
            term: self.term,
        }
    }

    /// A follower's log changed from `from` on: the configuration entries
    /// from there are re-read, so a truncated one is rolled back.
    pub(super) fn follow_log_memberships(&mut self, from: Index) {
        self.memberships.truncate_from(from);
        for e in self.log.entries(from, self.log.last_index()) {
            if e.kind == EntryKind::Config {
                let m = Membership::decode(&e.data).expect("validated when received");
                self.memberships.push(e.index, m);
            }
        }
    }

    /// Make the leader's progress map track exactly the other members.
    pub(super) fn sync_progress(&mut self) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        let mut members = self.memberships.current().members();
        members.remove(&self.cfg.id);
        l.progress.retain(|id, _| members.contains(id));
        // A new member starts probing at the last entry, the configuration
        // entry that added it; backtracking finds the rest.
        let next = self.log.last_index().max(1);
        for id in members {
            l.progress.entry(id).or_insert_with(|| Progress::new(next));
        }
        if let Some(t) = l.transfer
            && !self.memberships.current().voters().contains(t.to)
        {
            l.transfer = None;
        }
    }

    /// The commit index moved (leader only): a committed joint
    /// configuration is left at once, and a leader that the committed
    /// configuration no longer counts as a voter steps down.
    pub(super) fn after_commit(&mut self) {
        if !matches!(self.state, State::Leader(_))
            || self.memberships.current_index() > self.log.committed()
        {
            return;
        }
        let m = self.memberships.current();
        if m.is_joint() {
            let target = m.target();
            self.append_config(target);
        } else if !m.is_voter(self.cfg.id) {
            let term = self.term;
            self.become_follower(term, None);
        }
    }
}

/// The majorities that decide: those of the membership in effect. Every
/// quorum question of the core goes through here, so a mutant that changes
/// who counts changes it everywhere at once.
pub(super) struct Quorum<'a> {
    membership: Cow<'a, Membership>,
    learners_count: bool,
}

impl Quorum<'_> {
    /// The largest index acknowledged by a majority of every voter set.
    pub(super) fn committed_index(&self, acked: impl Fn(NodeId) -> Index) -> Index {
        self.membership.committed_index(self.learners_count, acked)
    }

    /// The outcome of a vote.
    pub(super) fn vote_result(&self, vote: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
        self.membership.vote_result(self.learners_count, vote)
    }

    /// Whether every voter set has a majority answering yes.
    pub(super) fn agree(&self, yes: impl Fn(NodeId) -> bool) -> bool {
        self.vote_result(|id| Some(yes(id))) == VoteResult::Won
    }
}

/// The quorum of the membership in effect (a free function so that callers
/// can hold it while they borrow the leader's state mutably).
#[cfg_attr(not(feature = "mutants"), expect(unused_variables))]
pub(super) fn quorum<'a>(cfg: &Config, memberships: &'a MembershipLog) -> Quorum<'a> {
    let m = memberships.current();
    #[cfg(feature = "mutants")]
    if cfg.mutated(Mutation::JointNewMajorityOnly) {
        return Quorum {
            membership: Cow::Owned(m.target()),
            learners_count: false,
        };
    }
    Quorum {
        membership: Cow::Borrowed(m),
        #[cfg(feature = "mutants")]
        learners_count: cfg.mutated(Mutation::LearnerInQuorum),
        #[cfg(not(feature = "mutants"))]
        learners_count: false,
    }
}
