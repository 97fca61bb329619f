//! Majorities, in one place (as etcd's `quorum` package): the commit index,
//! elections, check-quorum and ReadIndex all ask a voter set, or the two sets
//! of a joint configuration (see [`crate::Membership`]), what a majority
//! says.
//!
//! The questions are asked through closures from a voter's id to what is
//! known of it, so the leader is a voter like any other (its own
//! acknowledgement is whatever the caller answers for its id), and a set in
//! which the leader does not appear is as easy to ask as one in which it does.

use std::collections::BTreeSet;

use crate::types::{Index, NodeId};

/// The outcome of a vote (or of any yes/no question put to every voter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VoteResult {
    /// A majority said yes.
    Won,
    /// A majority can no longer say yes.
    Lost,
    /// Neither yet.
    Pending,
}

impl VoteResult {
    /// The outcome of a joint vote: won only if both sets won, lost as soon
    /// as either lost.
    pub(crate) fn and(self, other: VoteResult) -> VoteResult {
        match (self, other) {
            (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
            (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
            _ => VoteResult::Pending,
        }
    }
}

/// A set of voters deciding by simple majority.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Voters(BTreeSet<NodeId>);

impl Voters {
    pub(crate) fn new(ids: impl IntoIterator<Item = NodeId>) -> Self {
        Self(ids.into_iter().collect())
    }

    /// Whether `id` is one of the voters.
    pub fn contains(&self, id: NodeId) -> bool {
        self.0.contains(&id)
    }

    /// The voters, in ascending order.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.0.iter().copied()
    }

    /// How many voters there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many voters make a majority.
    pub fn majority(&self) -> usize {
        self.0.len() / 2 + 1
    }

    /// The largest index that a majority has acknowledged (`acked` answers
    /// for one voter).
    ///
    /// # Panics
    /// On an empty set: there is no majority of nobody, and a leader always
    /// has voters (it was elected by them).
    #[cfg(test)]
    pub(crate) fn committed_index(&self, acked: impl Fn(NodeId) -> Index) -> Index {
        self.committed_index_counting(self.ids(), acked)
    }

    /// [`Voters::committed_index`] with the acknowledgements of `counted`
    /// (the voters themselves, but for a mutant that counts others too).
    pub(crate) fn committed_index_counting(
        &self,
        counted: impl Iterator<Item = NodeId>,
        acked: impl Fn(NodeId) -> Index,
    ) -> Index {
        assert!(!self.0.is_empty(), "a quorum of an empty voter set");
        let mut acks: Vec<Index> = counted.map(acked).collect();
        // The majority-th largest: a majority acknowledged at least this much.
        acks.sort_unstable_by(|a, b| b.cmp(a));
        acks[self.majority() - 1]
    }

    /// What the voters decided, from each one's answer (`None`: not yet).
    /// An empty set never decides.
    #[cfg(test)]
    pub(crate) fn vote_result(&self, vote: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
        self.vote_result_counting(self.ids(), vote)
    }

    /// [`Voters::vote_result`] with the answers of `counted` (the voters
    /// themselves, but for a mutant that counts others too).
    pub(crate) fn vote_result_counting(
        &self,
        counted: impl Iterator<Item = NodeId>,
        vote: impl Fn(NodeId) -> Option<bool>,
    ) -> VoteResult {
        if self.0.is_empty() {
            return VoteResult::Lost;
        }
        let (mut yes, mut missing) = (0, 0);
        for id in counted {
            match vote(id) {
                Some(true) => yes += 1,
                Some(false) => {}
                None => missing += 1,
            }
        }
        let majority = self.majority();
        if yes >= majority {
            VoteResult::Won
        } else if yes + missing >= majority {
            VoteResult::Pending
        } else {
            VoteResult::Lost
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_index_is_the_majoritys_smallest_ack() {
        let v = Voters::new([1, 2, 3, 4, 5]);
        let acks = [(1, 9), (2, 3), (3, 7), (4, 1), (5, 8)];
        let acked = |id| acks.iter().find(|(i, _)| *i == id).map_or(0, |(_, a)| *a);
        assert_eq!(v.committed_index(acked), 7);
        assert_eq!(Voters::new([1]).committed_index(|_| 4), 4);
        assert_eq!(
            Voters::new([1, 2]).committed_index(|id| if id == 1 { 4 } else { 0 }),
            0
        );
    }

    #[test]
    fn a_vote_is_decided_as_soon_as_it_can_be() {
        let v = Voters::new([1, 2, 3, 4]);
        assert_eq!(
            v.vote_result(|id| (id <= 2).then_some(true)),
            VoteResult::Pending
        );
        assert_eq!(
            v.vote_result(|id| (id <= 3).then_some(true)),
            VoteResult::Won
        );
        assert_eq!(
            v.vote_result(|id| (id <= 2).then_some(false)),
            VoteResult::Lost
        );
        assert_eq!(
            v.vote_result(|id| Some(id <= 2)),
            VoteResult::Lost,
            "a tie loses"
        );
        assert_eq!(
            Voters::default().vote_result(|_| Some(true)),
            VoteResult::Lost
        );
    }

    #[test]
    fn ids_outside_the_set_do_not_count() {
        let v = Voters::new([2, 3, 4]);
        // The asker (1) is not a voter here: its own yes is not asked for.
        assert_eq!(
            v.vote_result(|id| Some(id == 1 || id == 2)),
            VoteResult::Lost
        );
        assert_eq!(v.vote_result(|id| Some(id != 4)), VoteResult::Won);
    }

    #[test]
    fn a_joint_vote_needs_both() {
        use VoteResult::*;
        assert_eq!(Won.and(Won), Won);
        assert_eq!(Won.and(Pending), Pending);
        assert_eq!(Pending.and(Lost), Lost);
        assert_eq!(Lost.and(Won), Lost);
    }
}
