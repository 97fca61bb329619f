//! Cluster membership and its changes by joint consensus (Raft thesis §4.3).
//!
//! A [`Membership`] is either simple (one voter set) or joint (the incoming
//! set and the outgoing one, both of which must agree on every decision).
//! Learners receive the log but never vote, campaign or count towards a
//! quorum.
//!
//! Every change of voters goes through the joint phase: the leader appends
//! `C(old,new)`, and once that commits appends `C(new)` by itself. A change of
//! learners alone needs no joint phase (learners decide nothing). A
//! membership takes effect on every node as soon as its entry is in the log,
//! committed or not (thesis §4.1); a truncation that removes the entry rolls
//! it back.

use std::collections::BTreeSet;

use bytes::{BufMut, Bytes, BytesMut};

use crate::quorum::{VoteResult, Voters};
use crate::types::{Index, NodeId};

/// Why a membership or its encoding was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembershipError {
    /// Node id 0 means "nobody".
    #[error("node id 0 is reserved")]
    ReservedId,
    /// A node is both a voter and a learner of the incoming configuration.
    #[error("node {0} is both a voter and a learner")]
    VoterAndLearner(NodeId),
    /// A configuration needs at least one voter.
    #[error("a configuration needs at least one voter")]
    NoVoters,
    /// The node named is not a member.
    #[error("node {0} is not a member")]
    NotAMember(NodeId),
    /// The node named is a member already.
    #[error("node {0} is a member already")]
    AlreadyAMember(NodeId),
    /// The node named is not a learner.
    #[error("node {0} is not a learner")]
    NotALearner(NodeId),
    /// The bytes of a configuration entry do not decode.
    #[error("configuration entry does not decode: {0}")]
    Encoding(&'static str),
}

/// The members of the cluster at one point of the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Membership {
    voters: Voters,
    /// The voters being replaced, in the joint phase only.
    outgoing: Option<Voters>,
    learners: BTreeSet<NodeId>,
}

/// Version byte of the encoding of a configuration entry.
const ENCODING_VERSION: u8 = 1;

impl Membership {
    /// A simple (not joint) membership. Empty voters are allowed only for a
    /// node that joins an existing cluster and learns its membership from the
    /// leader; a configuration entry always has voters.
    pub fn new(
        voters: impl IntoIterator<Item = NodeId>,
        learners: impl IntoIterator<Item = NodeId>,
    ) -> Result<Self, MembershipError> {
        let m = Self {
            voters: Voters::new(voters),
            outgoing: None,
            learners: learners.into_iter().collect(),
        };
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), MembershipError> {
        let all = self
            .voters
            .ids()
            .chain(self.outgoing.iter().flat_map(Voters::ids))
            .chain(self.learners.iter().copied());
        if all.into_iter().any(|id| id == 0) {
            return Err(MembershipError::ReservedId);
        }
        if let Some(&id) = self.learners.iter().find(|&&l| self.voters.contains(l)) {
            return Err(MembershipError::VoterAndLearner(id));
        }
        if self.outgoing.as_ref().is_some_and(Voters::is_empty) {
            return Err(MembershipError::NoVoters);
        }
        Ok(())
    }

    /// The voters (of the incoming configuration, in the joint phase).
    pub fn voters(&self) -> &Voters {
        &self.voters
    }

    /// The voters being replaced, in the joint phase only.
    pub fn outgoing(&self) -> Option<&Voters> {
        self.outgoing.as_ref()
    }

    /// The learners.
    pub fn learners(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.learners.iter().copied()
    }

    /// Whether this is the joint phase of a change.
    pub fn is_joint(&self) -> bool {
        self.outgoing.is_some()
    }

    /// Whether `id` votes: in either set during the joint phase.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(id) || self.outgoing.as_ref().is_some_and(|o| o.contains(id))
    }

    /// Whether `id` is a learner (and not also an outgoing voter).
    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id) && !self.is_voter(id)
    }

    /// Whether `id` receives the log: a voter of either set or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.learners.contains(&id)
    }

    /// Every member, ascending, each once.
    pub fn members(&self) -> BTreeSet<NodeId> {
        self.voters
            .ids()
            .chain(self.outgoing.iter().flat_map(Voters::ids))
            .chain(self.learners.iter().copied())
            .collect()
    }

    /// The membership with `id` added as a learner.
    pub fn with_learner(&self, id: NodeId) -> Result<Self, MembershipError> {
        let m = self.target();
        if m.contains(id) {
            return Err(MembershipError::AlreadyAMember(id));
        }
        let mut learners = m.learners.clone();
        learners.insert(id);
        Membership::new(m.voters.ids(), learners)
    }

    /// The membership with learner `id` made a voter.
    pub fn with_promoted(&self, id: NodeId) -> Result<Self, MembershipError> {
        let m = self.target();
        if !m.learners.contains(&id) {
            return Err(MembershipError::NotALearner(id));
        }
        Membership::new(
            m.voters.ids().chain([id]),
            m.learners.iter().copied().filter(|&l| l != id),
        )
    }

    /// The membership without `id` (voter or learner).
    pub fn without(&self, id: NodeId) -> Result<Self, MembershipError> {
        let m = self.target();
        if !m.contains(id) {
            return Err(MembershipError::NotAMember(id));
        }
        let m = Membership::new(
            m.voters.ids().filter(|&v| v != id),
            m.learners.iter().copied().filter(|&l| l != id),
        )?;
        if m.voters.is_empty() {
            return Err(MembershipError::NoVoters);
        }
        Ok(m)
    }

    /// Where this membership is going: itself, or the incoming side of a
    /// joint one.
    pub fn target(&self) -> Membership {
        Membership {
            voters: self.voters.clone(),
            outgoing: None,
            learners: self.learners.clone(),
        }
    }

    /// The joint membership that moves from `self` (simple) to `target`.
    pub(crate) fn joint_to(&self, target: &Membership) -> Membership {
        debug_assert!(!self.is_joint() && !target.is_joint());
        Membership {
            voters: target.voters.clone(),
            outgoing: Some(self.voters.clone()),
            learners: target.learners.clone(),
        }
    }

    /// The largest index a majority of every voter set acknowledged.
    /// (`learners_count` is only ever true for an injected bug: it counts
    /// learners' acknowledgements towards each set's majority.)
    pub(crate) fn committed_index(
        &self,
        learners_count: bool,
        acked: impl Fn(NodeId) -> Index,
    ) -> Index {
        let counted = |set: &'_ Voters| self.counted(set, learners_count).collect::<Vec<_>>();
        let incoming = self
            .voters
            .committed_index_counting(counted(&self.voters).into_iter(), &acked);
        match &self.outgoing {
            Some(o) => incoming.min(o.committed_index_counting(counted(o).into_iter(), &acked)),
            None => incoming,
        }
    }

    /// What the voters decided: both sets must win in the joint phase.
    /// (`learners_count` as for [`Membership::committed_index`].)
    pub(crate) fn vote_result(
        &self,
        learners_count: bool,
        vote: impl Fn(NodeId) -> Option<bool>,
    ) -> VoteResult {
        let incoming = self
            .voters
            .vote_result_counting(self.counted(&self.voters, learners_count), &vote);
        match &self.outgoing {
            Some(o) => incoming.and(o.vote_result_counting(self.counted(o, learners_count), &vote)),
            None => incoming,
        }
    }

    fn counted<'a>(
        &'a self,
        set: &'a Voters,
        learners_count: bool,
    ) -> impl Iterator<Item = NodeId> + 'a {
        let learners = self
            .learners
            .iter()
            .copied()
            .filter(move |&l| learners_count && !set.contains(l));
        set.ids().chain(learners)
    }

    /// The payload of a configuration entry: a version byte, the voters, a
    /// flag and the outgoing voters, the learners; every list a `u32` count
    /// and `u64` ids, little endian, ascending.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(ENCODING_VERSION);
        let list = |b: &mut BytesMut, ids: &mut dyn Iterator<Item = NodeId>, n: usize| {
            b.put_u32_le(n as u32);
            for id in ids {
                b.put_u64_le(id);
            }
        };
        list(&mut b, &mut self.voters.ids(), self.voters.len());
        match &self.outgoing {
            Some(o) => {
                b.put_u8(1);
                list(&mut b, &mut o.ids(), o.len());
            }
            None => b.put_u8(0),
        }
        list(
            &mut b,
            &mut self.learners.iter().copied(),
            self.learners.len(),
        );
        b.freeze()
    }

    /// Decodes a configuration entry's payload. Refuses anything
    /// [`Membership::encode`] could not have produced.
    pub fn decode(mut data: &[u8]) -> Result<Self, MembershipError> {
        fn take<const N: usize>(data: &mut &[u8]) -> Result<[u8; N], MembershipError> {
            let (head, rest) = data
                .split_first_chunk::<N>()
                .ok_or(MembershipError::Encoding("truncated"))?;
            *data = rest;
            Ok(*head)
        }
        fn list(data: &mut &[u8]) -> Result<Vec<NodeId>, MembershipError> {
            let n = u32::from_le_bytes(take::<4>(data)?) as usize;
            if n > data.len() / 8 {
                return Err(MembershipError::Encoding("truncated"));
            }
            let ids = (0..n)
                .map(|_| take::<8>(data).map(u64::from_le_bytes))
                .collect::<Result<Vec<_>, _>>()?;
            if ids.windows(2).any(|w| w[0] >= w[1]) {
                return Err(MembershipError::Encoding("ids not ascending"));
            }
            Ok(ids)
        }
        if take::<1>(&mut data)?[0] != ENCODING_VERSION {
            return Err(MembershipError::Encoding("unknown version"));
        }
        let voters = list(&mut data)?;
        let outgoing = match take::<1>(&mut data)?[0] {
            0 => None,
            1 => Some(Voters::new(list(&mut data)?)),
            _ => return Err(MembershipError::Encoding("bad joint flag")),
        };
        let learners = list(&mut data)?;
        if !data.is_empty() {
            return Err(MembershipError::Encoding("trailing bytes"));
        }
        if voters.is_empty() {
            return Err(MembershipError::NoVoters);
        }
        let m = Membership {
            voters: Voters::new(voters),
            outgoing,
            learners: learners.into_iter().collect(),
        };
        m.check()?;
        Ok(m)
    }
}

/// The configuration entries of the log, so that a truncation can roll the
/// membership back to the one before.
#[derive(Clone, Debug)]
pub(crate) struct MembershipLog {
    /// The membership before the first configuration entry held: the
    /// latest snapshot's, or the bootstrap configuration's.
    base: Membership,
    /// Configuration entries in the log, ascending by index.
    entries: Vec<(Index, Membership)>,
}

impl MembershipLog {
    pub(crate) fn new(base: Membership) -> Self {
        Self {
            base,
            entries: Vec::new(),
        }
    }

    /// The membership in effect: the last one in the log.
    pub(crate) fn current(&self) -> &Membership {
        self.entries.last().map_or(&self.base, |(_, m)| m)
    }

    /// Index of the entry of the membership in effect (0: the base).
    pub(crate) fn current_index(&self) -> Index {
        self.entries.last().map_or(0, |(i, _)| *i)
    }

    /// The membership the one in effect replaced (`None` for the base).
    pub(crate) fn previous(&self) -> Option<&Membership> {
        match self.entries.len() {
            0 => None,
            1 => Some(&self.base),
            n => Some(&self.entries[n - 2].1),
        }
    }

    /// A configuration entry was appended at `index`.
    pub(crate) fn push(&mut self, index: Index, m: Membership) {
        debug_assert!(self.entries.last().is_none_or(|(i, _)| *i < index));
        self.entries.push((index, m));
    }

    /// The membership in effect at `index` (at or after the base).
    pub(crate) fn at(&self, index: Index) -> &Membership {
        self.entries
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or(&self.base, |(_, m)| m)
    }

    /// The log was compacted up to `index`: the membership there becomes
    /// the base.
    pub(crate) fn compact_to(&mut self, index: Index) {
        self.base = self.at(index).clone();
        self.entries.retain(|(i, _)| *i > index);
    }

    /// Entries from `index` on were removed from the log.
    pub(crate) fn truncate_from(&mut self, index: Index) {
        while self.entries.last().is_some_and(|(i, _)| *i >= index) {
            self.entries.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership::new(voters.iter().copied(), learners.iter().copied()).unwrap()
    }

    #[test]
    fn encoding_round_trips_and_refuses_junk() {
        let simple = m(&[1, 2, 3], &[7]);
        let joint = v(&[1, 2, 3]).joint_to(&m(&[2, 3, 4], &[1]));
        for x in [&simple, &joint] {
            assert_eq!(&Membership::decode(&x.encode()).unwrap(), x);
        }
        let bytes = joint.encode();
        for cut in 0..bytes.len() {
            assert!(Membership::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(Membership::decode(&long).is_err());
        let mut unsorted = m(&[1, 2], &[]).encode().to_vec();
        unsorted.swap(5, 13);
        assert!(Membership::decode(&unsorted).is_err());
        assert_eq!(
            Membership::decode(&m(&[], &[]).encode()),
            Err(MembershipError::NoVoters)
        );
        let huge = [1, 0xff, 0xff, 0xff, 0xff];
        assert!(Membership::decode(&huge).is_err());
    }

    // `m` with one list of voters and no learners.
    fn v(voters: &[NodeId]) -> Membership {
        m(voters, &[])
    }

    #[test]
    fn changes_are_checked() {
        let base = m(&[1, 2, 3], &[4]);
        assert_eq!(
            base.with_learner(4),
            Err(MembershipError::AlreadyAMember(4))
        );
        assert_eq!(
            base.with_learner(2),
            Err(MembershipError::AlreadyAMember(2))
        );
        assert_eq!(base.with_promoted(5), Err(MembershipError::NotALearner(5)));
        assert_eq!(base.with_promoted(4).unwrap(), v(&[1, 2, 3, 4]));
        assert_eq!(base.without(4).unwrap(), v(&[1, 2, 3]));
        assert_eq!(base.without(9), Err(MembershipError::NotAMember(9)));
        assert_eq!(v(&[1]).without(1), Err(MembershipError::NoVoters));
        assert_eq!(
            Membership::new([1, 2], [2]),
            Err(MembershipError::VoterAndLearner(2))
        );
        assert_eq!(Membership::new([0], []), Err(MembershipError::ReservedId));
    }

    #[test]
    fn joint_decisions_need_both_majorities() {
        let j = v(&[1, 2, 3]).joint_to(&v(&[3, 4, 5]));
        assert!(j.is_voter(1) && j.is_voter(5));
        // 1, 2, 3 have index 9; 4 and 5 have 2: the new set has no majority.
        let acked = |id| if id <= 3 { 9 } else { 2 };
        assert_eq!(j.committed_index(false, acked), 2);
        let agree = |yes: &dyn Fn(NodeId) -> bool| j.vote_result(false, |id| Some(yes(id)));
        assert_eq!(agree(&|id| id <= 3), VoteResult::Lost);
        assert_eq!(agree(&|id| id == 1 || id == 3 || id == 4), VoteResult::Won);
        assert_eq!(j.target(), v(&[3, 4, 5]));
    }

    #[test]
    fn truncation_rolls_the_membership_back() {
        let mut log = MembershipLog::new(v(&[1, 2, 3]));
        log.push(5, v(&[1, 2, 3]).joint_to(&v(&[1, 2])));
        log.push(8, v(&[1, 2]));
        assert_eq!(log.current(), &v(&[1, 2]));
        log.truncate_from(6);
        assert!(log.current().is_joint());
        assert_eq!(log.current_index(), 5);
        log.truncate_from(5);
        assert_eq!(log.current(), &v(&[1, 2, 3]));
        assert_eq!(log.current_index(), 0);
        log.push(5, v(&[1, 2]));
        log.push(9, v(&[1]));
        assert_eq!(log.at(7), &v(&[1, 2]));
        log.compact_to(7);
        assert_eq!(log.at(7), &v(&[1, 2]));
        assert_eq!(log.current(), &v(&[1]));
        assert_eq!(log.previous(), Some(&v(&[1, 2])));
    }
}
