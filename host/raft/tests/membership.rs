//! Membership changes (Raft thesis chapter 4), against the core's public
//! API, in the spirit of `paper.rs`: learners, joint consensus (§4.3),
//! removed servers (§4.2.3), configurations that take effect on append and
//! roll back on truncation (§4.1), and a restart.

mod common;

use common::*;
use kythira_raft::{
    Bytes, Entry, EntryKind, HardState, Index, Membership, MembershipChangeError, MembershipError,
    Message, MessageBody, NodeId, Persisted, Proposal, Raft, Role,
};

fn members(voters: &[NodeId], learners: &[NodeId]) -> Membership {
    Membership::new(voters.iter().copied(), learners.iter().copied()).unwrap()
}

type Sets = (Vec<NodeId>, Option<Vec<NodeId>>, Vec<NodeId>);

/// (voters, outgoing voters, learners): a joint membership cannot be built
/// through the public API, so it is compared set by set.
fn sets(m: &Membership) -> Sets {
    (
        m.voters().ids().collect(),
        m.outgoing().map(|o| o.ids().collect()),
        m.learners().collect(),
    )
}

fn joint(voters: &[NodeId], outgoing: &[NodeId], learners: &[NodeId]) -> Sets {
    (voters.to_vec(), Some(outgoing.to_vec()), learners.to_vec())
}

fn simple(voters: &[NodeId], learners: &[NodeId]) -> Sets {
    (voters.to_vec(), None, learners.to_vec())
}

/// The configuration entries of `r`'s log, decoded.
fn config_entries(r: &Raft) -> Vec<(Index, Sets)> {
    let log = r.log();
    log.entries(1, log.last_index())
        .iter()
        .filter(|e| e.kind == EntryKind::Config)
        .map(|e| (e.index, sets(&Membership::decode(&e.data).unwrap())))
        .collect()
}

/// Proposes at `leader` the change `f` makes to its membership, then
/// settles the network.
fn change(
    net: &mut Network,
    leader: NodeId,
    f: impl FnOnce(&Membership) -> Result<Membership, MembershipError>,
) -> Proposal {
    let target = f(net.get(leader).membership()).unwrap();
    let p = net.get(leader).propose_membership(target).unwrap();
    net.settle();
    p
}

/// Voters 1 and 2, led by 1, and node 3 made a learner (committed).
fn two_voters_and_a_learner() -> (Network, Proposal) {
    let mut net = Network::of_size(2);
    net.add(node(3, &[1, 2]));
    net.elect(1);
    let p = change(&mut net, 1, |m| m.with_learner(3));
    (net, p)
}

// ---- Learners ----------------------------------------------------------------

/// A learner gets the log and applies it; adding one takes a single entry
/// (learners decide nothing, so no joint phase is needed).
#[test]
fn a_learner_receives_commits_and_applies_the_log() {
    let (mut net, p) = two_voters_and_a_learner();
    assert_eq!(p.index, 2, "after the election no-op");
    assert_eq!(
        config_entries(net.get(1)),
        [(2, simple(&[1, 2], &[3]))],
        "one entry, no joint phase"
    );
    assert!(net.get(1).log().committed() >= p.index);
    for id in 1..=3 {
        assert_eq!(sets(net.get(id).membership()), simple(&[1, 2], &[3]));
        assert_eq!(net.get(id).membership_index(), 2, "node {id}");
        assert!(net.get(id).membership().is_learner(3));
    }
    net.get(1).propose(Bytes::from_static(b"x")).unwrap();
    net.settle();
    net.tick_all(1);
    assert_eq!(net.get(3).log().committed(), 3);
    let applied = |id| -> Vec<(Index, EntryKind)> {
        net.applied[&id].iter().map(|e| (e.index, e.kind)).collect()
    };
    assert_eq!(
        applied(3),
        [
            (1, EntryKind::Noop),
            (2, EntryKind::Config),
            (3, EntryKind::Normal)
        ]
    );
    assert_eq!(net.applied[&3], net.applied[&1]);
    assert_eq!(net.get(3).role(), Role::Follower);
}

/// Learners do not count towards the commit quorum: with voters {1, 2} and
/// learner 3, an entry stored by 1 and 3 only is not committed.
#[test]
fn a_learner_is_not_counted_in_the_commit_quorum() {
    let (mut net, _) = two_voters_and_a_learner();
    net.isolate(2);
    let p = net.get(1).propose(Bytes::from_static(b"x")).unwrap();
    net.settle();
    assert_eq!(net.get(3).log().last_index(), p.index, "the learner has it");
    assert_eq!(net.get(1).progress(3).unwrap().matched, p.index);
    assert!(
        net.get(1).log().committed() < p.index,
        "leader + learner are not a majority of {{1, 2}}"
    );
    net.heal();
    net.tick_all(1);
    assert_eq!(net.get(1).log().committed(), p.index);
}

/// A learner never campaigns and is never asked for a vote, however long it
/// goes without hearing from a leader, with or without pre-vote.
#[test]
fn a_learner_never_votes_or_campaigns() {
    for pre_vote in [false, true] {
        let mut net = Network::with_config(&[1, 2], |c| c.pre_vote = pre_vote);
        net.add(node(3, &[1, 2]));
        net.elect(1);
        change(&mut net, 1, |m| m.with_learner(3));
        let term = net.get(3).term();
        net.isolate(1);
        net.trace.clear();
        for _ in 0..10 * ELECTION {
            net.tick_all(1);
            assert_eq!(net.get(3).role(), Role::Follower, "pre_vote {pre_vote}");
        }
        assert_ne!(
            net.get(2).role(),
            Role::Follower,
            "voter 2 does campaign (pre_vote {pre_vote})"
        );
        assert!(net.trace.iter().any(Message::is_election));
        let learner_traffic: Vec<_> = net
            .trace
            .iter()
            .filter(|m| m.is_election() && (m.from == 3 || m.to == 3))
            .collect();
        assert!(learner_traffic.is_empty(), "{learner_traffic:?}");
        assert_eq!(net.get(3).term(), term);
        assert_eq!(net.get(3).vote(), None);
    }
}

// ---- Joint consensus (§4.3) --------------------------------------------------

/// Promoting a learner goes through C(old,new): the leader appends C(new) by
/// itself once the joint entry commits, and both commit. From then on the
/// promoted node counts.
#[test]
fn s4_3_promoting_a_learner_goes_through_the_joint_phase() {
    let (mut net, learner) = two_voters_and_a_learner();
    let p = change(&mut net, 1, |m| m.with_promoted(3));
    assert_eq!(
        config_entries(net.get(1)),
        [
            (learner.index, simple(&[1, 2], &[3])),
            (p.index, joint(&[1, 2, 3], &[1, 2], &[])),
            (p.index + 1, simple(&[1, 2, 3], &[])),
        ]
    );
    assert_eq!(net.get(1).log().last_index(), p.index + 1);
    assert_eq!(net.get(1).log().committed(), p.index + 1);
    net.tick_all(1);
    for id in 1..=3 {
        assert_eq!(sets(net.get(id).membership()), simple(&[1, 2, 3], &[]));
        assert_eq!(net.get(id).membership_index(), p.index + 1);
        let configs: Vec<_> = net.applied[&id]
            .iter()
            .filter(|e| e.kind == EntryKind::Config)
            .map(|e| e.index)
            .collect();
        assert_eq!(configs, [learner.index, p.index, p.index + 1], "node {id}");
    }
    // Now leader + 3 are a majority of {1, 2, 3}.
    net.isolate(2);
    let x = net.get(1).propose(Bytes::from_static(b"x")).unwrap();
    net.settle();
    assert_eq!(net.get(1).log().committed(), x.index);
}

/// Removing a follower: joint entry, then C(new); the leader stops
/// replicating to the removed node, and the quorum is that of the new set.
#[test]
fn s4_3_removing_a_follower() {
    let mut net = Network::of_size(3);
    net.elect(1);
    let p = change(&mut net, 1, |m| m.without(3));
    assert_eq!(
        config_entries(net.get(1)),
        [
            (p.index, joint(&[1, 2], &[1, 2, 3], &[])),
            (p.index + 1, simple(&[1, 2], &[])),
        ]
    );
    assert_eq!(net.get(1).log().committed(), p.index + 1);
    for id in [1, 2] {
        assert_eq!(sets(net.get(id).membership()), simple(&[1, 2], &[]));
    }
    assert!(net.get(1).progress(3).is_none());
    net.trace.clear();
    let removed_last = net.get(3).log().last_index();
    let x = net.get(1).propose(Bytes::from_static(b"x")).unwrap();
    net.tick_all(2);
    assert_eq!(net.get(1).log().committed(), x.index);
    assert_eq!(net.get(2).log().committed(), x.index);
    assert_eq!(net.get(3).log().last_index(), removed_last);
    assert!(
        net.trace.iter().all(|m| m.to != 3),
        "nothing is sent to a removed node"
    );
    // Two voters: the leader alone is no majority.
    net.isolate(2);
    let y = net.get(1).propose(Bytes::from_static(b"y")).unwrap();
    net.settle();
    assert!(net.get(1).log().committed() < y.index);
}

/// Removing the leader (thesis §4.2.2): it manages the cluster until C(new)
/// commits, not counting itself in the new majority, then steps down; the
/// others elect a leader and the removed node never campaigns.
#[test]
fn s4_2_2_a_removed_leader_leads_until_the_new_configuration_commits() {
    for guarded in [false, true] {
        removed_leader_leads_until_the_new_configuration_commits(guarded);
    }
}

/// `guarded`: with pre-vote and check-quorum on.
fn removed_leader_leads_until_the_new_configuration_commits(guarded: bool) {
    let mut net = Network::with_config(&[1, 2, 3], |c| {
        c.pre_vote = guarded;
        c.check_quorum = guarded;
    });
    net.elect(1);
    // C(old,new) will be entry 2 and C(new) entry 3: lose the
    // acknowledgements of C(new), so that it stays uncommitted for now.
    net.drop_if(|m| {
        m.to == 1
            && matches!(
                m.body,
                MessageBody::AppendResponse(kythira_raft::AppendOutcome::Accepted { last_index })
                    if last_index >= 3
            )
    });
    let p = change(&mut net, 1, |m| m.without(1));
    assert_eq!(p.index, 2);
    let r = net.get(1);
    assert_eq!(r.log().committed(), 2, "the joint entry committed");
    assert_eq!(config_entries(r).last(), Some(&(3, simple(&[2, 3], &[]))));
    assert_eq!(r.membership_index(), 3, "in effect once appended");
    assert_eq!(
        r.role(),
        Role::Leader,
        "still leads while C(new) is pending"
    );
    assert!(!r.membership().is_voter(1));
    for _ in 0..3 {
        net.tick(1, 1);
        assert_eq!(net.get(1).role(), Role::Leader);
    }
    assert_eq!(
        net.get(1).progress(2).unwrap().matched,
        2,
        "its own copy never counts"
    );
    net.heal();
    net.tick(1, 1);
    let r = net.get(1);
    assert_eq!(r.log().committed(), 3);
    assert_eq!(r.role(), Role::Follower, "steps down once C(new) commits");
    let term = r.term();
    net.trace.clear();
    for _ in 0..6 * ELECTION {
        net.tick_all(1);
        assert_eq!(net.get(1).role(), Role::Follower);
    }
    let new_leader = net.leader().expect("2 and 3 elect a leader");
    assert!([2, 3].contains(&new_leader));
    assert!(net.get(new_leader).term() > term);
    assert_eq!(net.get(1).term(), term, "nobody asks the removed node");
    assert!(
        net.trace
            .iter()
            .all(|m| m.from != 1 && m.to != 1 || !m.is_election()),
        "no election traffic to or from the removed node"
    );
    let x = net
        .get(new_leader)
        .propose(Bytes::from_static(b"x"))
        .unwrap();
    net.tick_all(1);
    for id in [2, 3] {
        assert_eq!(net.get(id).log().committed(), x.index);
    }
}

/// A voter demoted to a learner goes through the joint phase (it votes in
/// the outgoing set until C(new)); afterwards it keeps receiving the log but
/// never campaigns.
#[test]
fn s4_3_demoting_a_voter_to_a_learner() {
    let mut net = Network::of_size(3);
    net.elect(1);
    let p = net
        .get(1)
        .propose_membership(members(&[1, 2], &[3]))
        .unwrap();
    net.settle();
    assert_eq!(
        config_entries(net.get(1)),
        [
            (p.index, joint(&[1, 2], &[1, 2, 3], &[3])),
            (p.index + 1, simple(&[1, 2], &[3])),
        ]
    );
    net.tick_all(1);
    assert!(net.get(3).membership().is_learner(3));
    assert_eq!(net.get(3).log().committed(), p.index + 1);
    net.isolate(1);
    net.trace.clear();
    net.tick_all(5 * ELECTION);
    assert_eq!(net.get(3).role(), Role::Follower);
    assert!(
        net.trace
            .iter()
            .all(|m| !m.is_election() || (m.from != 3 && m.to != 3))
    );
    assert!(net.trace.iter().any(|m| m.from == 2 && m.is_election()));
}

/// A leader that demotes itself to a learner leads until C(new) commits,
/// then steps down and, as a learner, follows the leader the others elect.
#[test]
fn s4_2_2_a_leader_demoted_to_a_learner_then_follows() {
    let mut net = Network::of_size(3);
    net.elect(1);
    let term = net.get(1).term();
    let p = net
        .get(1)
        .propose_membership(members(&[2, 3], &[1]))
        .unwrap();
    net.settle();
    let r = net.get(1);
    assert_eq!(r.log().committed(), p.index + 1);
    assert_eq!(r.role(), Role::Follower);
    assert!(r.membership().is_learner(1));
    net.trace.clear();
    net.tick_all(4 * ELECTION);
    let leader = net.leader().expect("2 and 3 elect a leader");
    assert_ne!(leader, 1);
    assert!(net.get(leader).term() > term);
    assert!(
        net.trace
            .iter()
            .all(|m| !m.is_election() || (m.from != 1 && m.to != 1))
    );
    let x = net.get(leader).propose(Bytes::from_static(b"x")).unwrap();
    net.tick_all(1);
    let r = net.get(1);
    assert_eq!(r.leader(), Some(leader));
    assert_eq!(r.log().committed(), x.index);
    assert_eq!(net.applied[&1].last().map(|e| e.index), Some(x.index));
}

/// Removing a learner takes one entry, and the leader stops replicating to
/// it.
#[test]
fn removing_a_learner_takes_one_entry() {
    let (mut net, learner) = two_voters_and_a_learner();
    let p = change(&mut net, 1, |m| m.without(3));
    assert_eq!(p.index, learner.index + 1);
    assert_eq!(
        config_entries(net.get(1)),
        [
            (learner.index, simple(&[1, 2], &[3])),
            (p.index, simple(&[1, 2], &[])),
        ]
    );
    assert_eq!(net.get(1).log().committed(), p.index);
    assert!(net.get(1).progress(3).is_none());
    net.trace.clear();
    net.get(1).propose(Bytes::from_static(b"x")).unwrap();
    net.tick_all(2);
    assert!(net.trace.iter().all(|m| m.to != 3));
}

/// In the joint phase a decision needs a majority of each set: with old
/// {1, 2, 3} and new {1, 4, 5}, neither set's majority alone commits the
/// joint entry.
#[test]
fn s4_3_joint_consensus_needs_both_majorities() {
    for (cut_off, alone) in [([2, 3], "new"), ([4, 5], "old")] {
        let mut net = Network::of_size(3);
        net.elect(1);
        for id in [4, 5] {
            net.add(node(id, &[]));
        }
        for id in cut_off {
            net.cut(1, id);
        }
        let p = net
            .get(1)
            .propose_membership(members(&[1, 4, 5], &[]))
            .unwrap();
        net.settle();
        let r = net.get(1);
        assert_eq!(sets(r.membership()), joint(&[1, 4, 5], &[1, 2, 3], &[]));
        let others: Vec<NodeId> = [2, 3, 4, 5]
            .into_iter()
            .filter(|id| !cut_off.contains(id))
            .collect();
        for id in others {
            assert_eq!(r.progress(id).unwrap().matched, p.index, "node {id}");
        }
        assert!(
            r.log().committed() < p.index,
            "a majority of the {alone} set alone commits nothing"
        );
        assert_eq!(r.log().last_index(), p.index, "no C(new) yet");
        net.heal();
        net.tick(1, 1);
        let r = net.get(1);
        assert_eq!(r.log().committed(), p.index + 1);
        assert_eq!(sets(r.membership()), simple(&[1, 4, 5], &[]));
        assert_eq!(r.role(), Role::Leader);
    }
}

/// One change at a time: refused while a configuration entry is
/// uncommitted, in particular through the whole joint phase.
#[test]
fn s4_3_one_change_at_a_time() {
    let mut net = Network::of_size(3);
    net.elect(1);
    assert_eq!(
        net.get(2).propose_membership(members(&[1, 2], &[])),
        Err(MembershipChangeError::NotLeader { leader: Some(1) })
    );
    assert_eq!(
        net.get(1).propose_membership(members(&[], &[4])),
        Err(MembershipChangeError::Invalid(MembershipError::NoVoters))
    );
    // A learner change, uncommitted.
    net.drop_if(|m| matches!(m.body, MessageBody::AppendResponse(_)));
    let learner = members(&[1, 2, 3], &[4]);
    let p = net.get(1).propose_membership(learner.clone()).unwrap();
    net.settle();
    assert!(net.get(1).log().committed() < p.index);
    assert_eq!(
        net.get(1).propose_membership(members(&[1, 2], &[4])),
        Err(MembershipChangeError::Pending)
    );
    net.heal();
    net.tick(1, 1);
    assert_eq!(net.get(1).log().committed(), p.index);
    // A voter change: refused while the joint entry is uncommitted...
    let target = learner.without(3).unwrap();
    let p = net.get(1).propose_membership(target).unwrap();
    assert!(net.get(1).membership().is_joint());
    assert_eq!(
        net.get(1).propose_membership(members(&[1, 2, 3], &[])),
        Err(MembershipChangeError::Pending)
    );
    // ... and while C(new) is.
    net.drop_if(move |m| {
        matches!(
            m.body,
            MessageBody::AppendResponse(kythira_raft::AppendOutcome::Accepted { last_index })
                if last_index > p.index
        )
    });
    net.settle();
    let r = net.get(1);
    assert_eq!(r.log().committed(), p.index);
    assert!(!r.membership().is_joint());
    assert_eq!(r.membership_index(), p.index + 1);
    assert_eq!(
        r.propose_membership(members(&[1, 2, 3], &[])),
        Err(MembershipChangeError::Pending)
    );
    assert_eq!(r.log().last_index(), p.index + 1, "nothing was appended");
    net.heal();
    net.tick(1, 1);
    assert_eq!(net.get(1).log().committed(), p.index + 1);
    assert!(
        net.get(1).propose_membership(members(&[1, 2], &[])).is_ok(),
        "the next change once the last one committed"
    );
}

/// A membership takes effect on append and a truncation rolls it back
/// (thesis §4.1): a leader isolated with a minority cannot commit its change,
/// and once the partition heals its follower drops the entry and returns to
/// the previous membership.
#[test]
fn s4_1_a_change_in_a_minority_partition_is_rolled_back() {
    let mut net = Network::of_size(5);
    net.elect(1);
    net.partition(&[&[1, 2], &[3, 4, 5]]);
    let before = net.get(2).membership().clone();
    assert_eq!(sets(&before), simple(&[1, 2, 3, 4, 5], &[]));
    let p = change(&mut net, 1, |m| m.without(5));
    for id in [1, 2] {
        let r = net.get(id);
        assert_eq!(
            sets(r.membership()),
            joint(&[1, 2, 3, 4], &[1, 2, 3, 4, 5], &[]),
            "node {id}: in effect uncommitted"
        );
        assert_eq!(r.membership_index(), p.index);
        assert!(r.log().committed() < p.index);
    }
    assert_eq!(net.get(1).role(), Role::Leader);
    net.elect(3);
    assert_eq!(net.get(3).role(), Role::Leader);
    let x = net.get(3).propose(Bytes::from_static(b"x")).unwrap();
    net.settle();
    assert_eq!(net.get(3).log().committed(), x.index);
    net.heal();
    net.tick_all(3);
    assert_eq!(net.leader(), Some(3));
    for id in 1..=5 {
        let r = net.get(id);
        assert_eq!(r.membership(), &before, "node {id} rolled back");
        assert_eq!(r.membership_index(), 0);
        assert!(config_entries(r).is_empty());
        assert_eq!(r.log().committed(), x.index);
        assert_eq!(net.log_terms(id), net.log_terms(3), "node {id}");
    }
    assert!(
        net.applied
            .values()
            .flatten()
            .all(|e| e.kind != EntryKind::Config)
    );
}

/// The same rollback on one follower, message by message: a later leader's
/// append replaces the configuration entry, and the follower's membership is
/// the one before it again.
#[test]
fn s4_1_a_truncated_configuration_entry_is_rolled_back() {
    let mut r = node(3, &[1, 2, 3]);
    let base = r.membership().clone();
    let config = Entry {
        kind: EntryKind::Config,
        data: members(&[1, 2, 3], &[4]).encode(),
        ..entry(2, 1)
    };
    r.step(msg(
        1,
        3,
        1,
        MessageBody::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![entry(1, 1), config],
            commit: 1,
        },
    ))
    .unwrap();
    drain(&mut r);
    assert_eq!(sets(r.membership()), simple(&[1, 2, 3], &[4]));
    assert_eq!(r.membership_index(), 2);
    r.step(msg(
        2,
        3,
        2,
        MessageBody::Append {
            prev_index: 1,
            prev_term: 1,
            entries: vec![entry(2, 2)],
            commit: 1,
        },
    ))
    .unwrap();
    assert_eq!(r.membership(), &base);
    assert_eq!(r.membership_index(), 0);
    assert_eq!(r.log().last_index(), 2);
}

// ---- Removed and joining servers ---------------------------------------------

/// Thesis §4.2.3: a removed server that never learns of its removal keeps
/// timing out and campaigning in ever higher terms; the members ignore its
/// requests, term and all. Pre-vote and check-quorum are off, so that only
/// the membership rule protects the cluster.
#[test]
fn s4_2_3_a_removed_server_cannot_disrupt_the_cluster() {
    let mut net = Network::with_config(&[1, 2, 3], |c| {
        c.pre_vote = false;
        c.check_quorum = false;
    });
    net.elect(1);
    change(&mut net, 1, |m| m.without(3));
    assert!(
        net.get(3).membership().is_voter(3),
        "node 3 never received C(new)"
    );
    let term = net.get(1).term();
    net.trace.clear();
    for _ in 0..10 * ELECTION {
        net.tick_all(1);
        assert_eq!(net.leader(), Some(1));
    }
    assert!(
        net.get(3).term() >= term + 5,
        "node 3 kept campaigning, now in term {}",
        net.get(3).term()
    );
    let requests = net
        .trace
        .iter()
        .filter(|m| m.from == 3 && matches!(m.body, MessageBody::Vote { .. }))
        .count();
    assert!(requests >= 10, "{requests} vote requests");
    for id in [1, 2] {
        assert_eq!(net.get(id).term(), term, "node {id}");
    }
    assert!(
        net.trace.iter().all(|m| m.to != 3),
        "the members answer nothing"
    );
    let x = net.get(1).propose(Bytes::from_static(b"x")).unwrap();
    net.settle();
    assert_eq!(net.get(2).log().committed(), x.index);
}

/// A node that joins with no voters configured knows nothing, so it never
/// campaigns; it learns the membership from the leader's log, first as a
/// learner, then as a voter that campaigns when the leader goes away.
#[test]
fn a_joining_node_learns_the_membership_from_the_log() {
    let mut net = Network::of_size(3);
    net.elect(1);
    net.get(1).propose(Bytes::from_static(b"a")).unwrap();
    net.settle();
    net.add(node(4, &[]));
    assert!(net.get(4).membership().voters().is_empty());
    net.tick(4, 5 * ELECTION);
    assert_eq!((net.get(4).role(), net.get(4).term()), (Role::Follower, 0));
    assert!(net.trace.iter().all(|m| m.from != 4));
    let p = change(&mut net, 1, |m| m.with_learner(4));
    net.tick_all(1);
    let leader_log = net.get(1).log().entries(1, p.index).to_vec();
    assert_eq!(net.get(4).log().entries(1, p.index), leader_log.as_slice());
    assert_eq!(net.nodes[&4].membership(), net.nodes[&1].membership());
    assert!(net.get(4).membership().is_learner(4));
    assert_eq!(net.applied[&4], net.applied[&1]);
    let p = change(&mut net, 1, |m| m.with_promoted(4));
    net.tick_all(1);
    let r = net.get(4);
    assert_eq!(sets(r.membership()), simple(&[1, 2, 3, 4], &[]));
    assert_eq!(r.membership_index(), p.index + 1);
    assert_eq!(r.log().committed(), p.index + 1);
    net.isolate(1);
    tick_until_role_changes(net.get(4));
    assert_eq!(net.get(4).role(), Role::Candidate);
}

// ---- Restart -----------------------------------------------------------------

/// `Raft::new` rebuilds the membership from the configuration entries of
/// the persisted log, whatever the bootstrap voters: at every prefix, the
/// membership of its last configuration entry (the bootstrap one before the
/// first), joint ones included; and the restored membership decides whether
/// the node campaigns.
#[test]
fn a_restart_restores_the_membership_from_the_log() {
    let mut net = Network::of_size(3);
    net.elect(1);
    net.add(node(4, &[]));
    change(&mut net, 1, |m| m.with_learner(4));
    change(&mut net, 1, |m| m.with_promoted(4));
    change(&mut net, 1, |m| m.without(3));
    net.tick_all(1);
    let r = net.get(4);
    let entries = r.log().entries(1, r.log().last_index()).to_vec();
    let hs = r.hard_state();
    let configs = config_entries(r);
    assert_eq!(configs.len(), 5, "learner, joint, new, joint, new");
    let restart = |id: NodeId, voters: &[NodeId], upto: Index| {
        let persisted = Persisted {
            snapshot: None,
            hard_state: HardState {
                commit: hs.commit.min(upto),
                ..hs
            },
            entries: entries[..upto as usize].to_vec(),
            applied: 0,
        };
        Raft::new(config(id, voters), persisted).unwrap()
    };
    let before_first = configs[0].0 - 1;
    let r = restart(4, &[1, 2, 3], before_first);
    assert_eq!(sets(r.membership()), simple(&[1, 2, 3], &[]));
    assert_eq!(r.membership_index(), 0);
    for (k, (index, want)) in configs.iter().enumerate() {
        let next = configs
            .get(k + 1)
            .map_or(entries.len() as Index + 1, |c| c.0);
        for upto in *index..next {
            for bootstrap in [&[1, 2, 3][..], &[]] {
                let r = restart(4, bootstrap, upto);
                assert_eq!(&sets(r.membership()), want, "prefix {upto}");
                assert_eq!(r.membership_index(), *index);
            }
        }
    }
    assert_eq!(
        configs.last().unwrap().1,
        simple(&[1, 2, 4], &[]),
        "the final membership"
    );
    // Restored as a learner: it never campaigns. As a voter: it does.
    let mut learner = restart(4, &[], configs[0].0);
    for _ in 0..5 * ELECTION {
        learner.tick();
    }
    assert_eq!((learner.role(), learner.term()), (Role::Follower, hs.term));
    assert!(drain(&mut learner).all().is_empty());
    let mut voter = restart(4, &[], entries.len() as Index);
    tick_until_role_changes(&mut voter);
    assert_eq!(voter.role(), Role::Candidate);
    let asked: Vec<_> = drain(&mut voter).all().iter().map(|m| m.to).collect();
    assert_eq!(asked, [1, 2], "the voters of the restored membership");
    // Restored removed: it never campaigns either.
    let mut removed = restart(3, &[1, 2, 3], entries.len() as Index);
    for _ in 0..5 * ELECTION {
        removed.tick();
    }
    assert_eq!(removed.role(), Role::Follower);
}

/// A node elected while the last configuration entry is a committed joint
/// one (its predecessor committed C(old,new) but never got C(new) out)
/// leaves the joint phase at once: it appends C(new) right after its no-op.
#[test]
fn s4_3_a_new_leader_completes_a_committed_joint_change() {
    let mut net = Network::of_size(3);
    net.elect(1);
    net.add(node(4, &[]));
    change(&mut net, 1, |m| m.with_learner(4));
    let target = net.get(1).membership().with_promoted(4).unwrap();
    let j = net.get(1).propose_membership(target).unwrap();
    // An entry right behind the joint one: both commit at once, so the
    // followers learn a commit index past the joint entry.
    net.get(1).propose(Bytes::from_static(b"x")).unwrap();
    let c_new = j.index + 2;
    net.drop_if(move |m| {
        matches!(&m.body, MessageBody::Append { entries, .. }
            if entries.last().is_some_and(|e| e.index >= c_new))
    });
    net.settle();
    net.tick(1, 1);
    assert_eq!(net.get(1).log().committed(), j.index + 1);
    assert_eq!(net.get(1).membership_index(), c_new);
    for id in [2, 3, 4] {
        let r = net.get(id);
        assert_eq!(r.log().committed(), j.index + 1, "node {id}");
        assert_eq!(r.membership_index(), j.index, "node {id}");
        assert!(r.membership().is_joint());
    }
    // Node 2 is elected, and nothing it sends is acknowledged yet.
    net.heal();
    net.isolate(1);
    net.drop_if(|m| m.to == 2 && matches!(m.body, MessageBody::AppendResponse(_)));
    net.elect(2);
    let r = net.get(2);
    assert_eq!(r.role(), Role::Leader);
    assert_eq!(r.log().committed(), j.index + 1, "its no-op is uncommitted");
    assert_eq!(
        sets(r.membership()),
        simple(&[1, 2, 3, 4], &[]),
        "C(new) is appended without waiting for the no-op to commit"
    );
    let term = r.term();
    let tail: Vec<_> = r
        .log()
        .entries(j.index + 2, r.log().last_index())
        .iter()
        .map(|e| (e.index, e.term, e.kind))
        .collect();
    assert_eq!(
        tail,
        [
            (j.index + 2, term, EntryKind::Noop),
            (j.index + 3, term, EntryKind::Config)
        ]
    );
    net.heal();
    net.isolate(1);
    net.tick(2, 1);
    for id in [2, 3, 4] {
        let r = net.get(id);
        assert_eq!(sets(r.membership()), simple(&[1, 2, 3, 4], &[]));
        assert_eq!(r.log().committed(), j.index + 3, "node {id}");
    }
}
