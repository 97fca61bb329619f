//! Each injected bug changes what the core does, in the smallest scenario
//! that shows it. Whether the simulator catches it is tested there.
#![cfg(feature = "mutants")]

mod common;

use std::fmt::Debug;

use common::*;
use kythira_raft::{
    AppendOutcome, Bytes, Config, Membership, Message, MessageBody, Mutation, NodeId, Raft,
    ReadState, Role, SnapshotMeta, Term,
};

/// The outcome of `scenario` without and with `m`; they must differ.
fn differs<T: PartialEq + Debug>(m: Mutation, scenario: impl Fn(Option<Mutation>) -> T) -> (T, T) {
    let (clean, mutated) = (scenario(None), scenario(Some(m)));
    assert_ne!(clean, mutated, "{} changes nothing", m.name());
    (clean, mutated)
}

fn cfg(id: NodeId, voters: &[NodeId], m: Option<Mutation>) -> Config {
    let mut c = config(id, voters);
    c.mutation = m;
    c
}

/// Node 1 leading term 1 of `voters` (node 2 voted for it); nothing
/// replicated yet.
fn leader(voters: &[NodeId], m: Option<Mutation>) -> Raft {
    let mut r = Raft::new(cfg(1, voters, m), Default::default()).unwrap();
    tick_until_role_changes(&mut r);
    r.step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    assert_eq!(r.role(), Role::Leader);
    drain(&mut r);
    r
}

fn accepted(from: NodeId, last_index: u64) -> Message {
    msg(
        from,
        1,
        1,
        MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }),
    )
}

fn vote_request(from: NodeId, term: Term) -> Message {
    msg(
        from,
        1,
        term,
        MessageBody::Vote {
            last_index: 0,
            last_term: 0,
            transfer: false,
        },
    )
}

fn granted_votes(out: &Output) -> Vec<NodeId> {
    out.all()
        .iter()
        .filter(|m| matches!(m.body, MessageBody::VoteResponse { granted: true }))
        .map(|m| m.to)
        .collect()
}

#[test]
fn every_mutation_has_a_distinct_name() {
    let mut names: Vec<_> = Mutation::ALL.iter().map(|m| m.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Mutation::ALL.len());
}

#[test]
fn vote_twice_in_a_term() {
    let (clean, mutated) = differs(Mutation::VoteTwiceInTerm, |m| {
        let mut r = Raft::new(cfg(1, &[1, 2, 3], m), Default::default()).unwrap();
        r.step(vote_request(2, 1)).unwrap();
        r.step(vote_request(3, 1)).unwrap();
        assert_eq!(r.vote(), Some(2), "the first vote stays recorded");
        granted_votes(&drain(&mut r))
    });
    assert_eq!((clean, mutated), (vec![2], vec![2, 3]));
}

#[test]
fn count_duplicate_votes() {
    let (clean, mutated) = differs(Mutation::CountDuplicateVotes, |m| {
        let mut r = Raft::new(cfg(1, &[1, 2, 3, 4, 5], m), Default::default()).unwrap();
        tick_until_role_changes(&mut r);
        let grant = msg(2, 1, 1, MessageBody::VoteResponse { granted: true });
        r.step(grant.clone()).unwrap();
        r.step(grant).unwrap();
        r.role()
    });
    assert_eq!((clean, mutated), (Role::Candidate, Role::Leader));
}

#[test]
fn vote_before_persist() {
    let (clean, mutated) = differs(Mutation::VoteBeforePersist, |m| {
        // The request brings a new term: neither it nor the vote is durable.
        let mut r = Raft::new(cfg(1, &[1, 2, 3], m), Default::default()).unwrap();
        r.step(vote_request(2, 1)).unwrap();
        let rd = r.ready().unwrap();
        let hs = rd.hard_state.expect("the term and vote are to be written");
        assert_eq!((hs.term, hs.vote), (1, Some(2)));
        (rd.messages.len(), rd.persisted_messages.len())
    });
    assert_eq!((clean, mutated), ((0, 1), (1, 0)));
}

#[test]
fn ack_before_persist() {
    let (clean, mutated) = differs(Mutation::AckBeforePersist, |m| {
        let mut r = Raft::new(cfg(2, &[1, 2, 3], m), Default::default()).unwrap();
        let append = MessageBody::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![entry(1, 1)],
            commit: 0,
        };
        r.step(msg(1, 2, 1, append)).unwrap();
        let heartbeat = MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
        };
        r.step(msg(1, 2, 1, heartbeat)).unwrap();
        let rd = r.ready().unwrap();
        assert_eq!(rd.entries.len(), 1);
        (rd.messages.len(), rd.persisted_messages.len())
    });
    assert_eq!((clean, mutated), ((0, 2), (2, 0)));
}

#[test]
fn leader_counts_unstable_self() {
    let (clean, mutated) = differs(Mutation::LeaderCountsUnstableSelf, |m| {
        let mut r = leader(&[1, 2, 3], m);
        r.step(accepted(2, 1)).unwrap();
        drain(&mut r);
        r.propose(Bytes::from_static(b"x")).unwrap();
        let rd = r.ready().unwrap();
        assert_eq!(rd.entries.len(), 1, "the leader's own write is outstanding");
        r.step(accepted(2, 2)).unwrap();
        let committed = r.log().committed();
        r.advance();
        committed
    });
    assert_eq!((clean, mutated), (1, 2));
}

#[test]
fn heartbeat_commit_unclamped() {
    let (clean, mutated) = differs(Mutation::HeartbeatCommitUnclamped, |m| {
        let mut r = leader(&[1, 2, 3], m);
        r.step(accepted(2, 1)).unwrap();
        drain(&mut r);
        assert_eq!(r.log().committed(), 1);
        for _ in 0..HEARTBEAT {
            r.tick();
        }
        drain(&mut r)
            .all()
            .iter()
            .find_map(|m| match m.body {
                MessageBody::Heartbeat { commit, .. } if m.to == 3 => Some(commit),
                _ => None,
            })
            .expect("a heartbeat to node 3")
    });
    assert_eq!((clean, mutated), (0, 1), "node 3 stores nothing yet");
}

#[test]
fn keep_conflicting_suffix() {
    let (clean, mutated) = differs(Mutation::KeepConflictingSuffix, |m| {
        let mut r = node_with(cfg(1, &[1, 2, 3], m), 3, &[1, 1, 2, 2]);
        let append = MessageBody::Append {
            prev_index: 1,
            prev_term: 1,
            entries: vec![entry(2, 3)],
            commit: 0,
        };
        r.step(msg(2, 1, 3, append)).unwrap();
        let out = drain(&mut r);
        let rewritten: Vec<_> = out.persisted.iter().map(|e| (e.index, e.term)).collect();
        (rewritten, r.log().stable() == r.log().last_index())
    });
    assert_eq!(clean, (vec![(2, 3)], true));
    assert_eq!(mutated, (vec![(2, 3), (3, 2), (4, 2)], true));
}

#[test]
fn no_fast_backtracking() {
    let (clean, mutated) = differs(Mutation::NoFastBacktracking, |m| {
        let mut r = node_with(cfg(1, &[1, 2, 3], m), 3, &[1]);
        let append = MessageBody::Append {
            prev_index: 10,
            prev_term: 3,
            entries: vec![],
            commit: 0,
        };
        r.step(msg(2, 1, 3, append)).unwrap();
        drain(&mut r).all().iter().find_map(|m| match m.body {
            MessageBody::AppendResponse(AppendOutcome::Rejected {
                hint_index,
                hint_term,
                ..
            }) => Some((hint_index, hint_term)),
            _ => None,
        })
    });
    assert_eq!((clean, mutated), (Some((1, 1)), Some((9, 0))));
}

fn appends_to(out: &Output, to: NodeId) -> usize {
    out.all()
        .iter()
        .filter(|m| m.to == to && matches!(m.body, MessageBody::Append { .. }))
        .count()
}

#[test]
fn probe_never_retried() {
    let (clean, mutated) = differs(Mutation::ProbeNeverRetried, |m| {
        // The first probe to node 2 went out with the election and is lost.
        let mut r = leader(&[1, 2, 3], m);
        r.step(msg(
            2,
            1,
            1,
            MessageBody::HeartbeatResponse { read_round: 0 },
        ))
        .unwrap();
        appends_to(&drain(&mut r), 2)
    });
    assert_eq!((clean, mutated), (1, 0));
}

#[test]
fn match_on_send() {
    let (clean, mutated) = differs(Mutation::MatchOnSend, |m| {
        let mut r = leader(&[1, 2, 3], m);
        r.step(accepted(2, 1)).unwrap();
        drain(&mut r);
        r.propose(Bytes::from_static(b"x")).unwrap();
        assert!(appends_to(&drain(&mut r), 2) > 0);
        (r.progress(2).unwrap().matched, r.log().committed())
    });
    assert_eq!(
        (clean, mutated),
        ((1, 1), (2, 2)),
        "the mutant commits what only the leader stores"
    );
}

#[test]
fn read_without_quorum() {
    let (clean, mutated) = differs(Mutation::ReadWithoutQuorum, |m| {
        let mut r = leader(&[1, 2, 3], m);
        r.step(accepted(2, 1)).unwrap();
        drain(&mut r);
        r.read_index(7).unwrap();
        drain(&mut r).reads.len()
    });
    assert_eq!((clean, mutated), (0, 1));
}

#[test]
fn read_before_term_commit() {
    let (clean, mutated) = differs(Mutation::ReadBeforeTermCommit, |m| {
        let mut r = leader(&[1, 2, 3], m);
        assert_eq!(
            r.log().committed(),
            0,
            "the no-op of term 1 is not committed"
        );
        r.read_index(7).unwrap();
        drain(&mut r)
            .all()
            .iter()
            .filter(
                |m| matches!(m.body, MessageBody::Heartbeat { read_round, .. } if read_round > 0),
            )
            .count()
    });
    assert_eq!((clean, mutated), (0, 2));
}

#[test]
fn joint_new_majority_only() {
    let (clean, mutated) = differs(Mutation::JointNewMajorityOnly, |m| {
        // Old {1, 2, 3}, new {1, 4, 5}: only the new set stores the joint entry.
        let mut r = leader(&[1, 2, 3], m);
        let target = Membership::new([1, 4, 5], []).unwrap();
        let p = r.propose_membership(target).unwrap();
        drain(&mut r);
        for id in [4, 5] {
            r.step(accepted(id, p.index)).unwrap();
        }
        drain(&mut r);
        r.log().committed()
    });
    assert_eq!(
        (clean, mutated),
        (0, 2),
        "the mutant commits without a majority of the old set"
    );
}

#[test]
fn learner_in_quorum() {
    let (clean, mutated) = differs(Mutation::LearnerInQuorum, |m| {
        // Voters {1, 2}, learner 3: only the leader and the learner store
        // the configuration entry that added the learner.
        let mut r = leader(&[1, 2], m);
        let target = Membership::new([1, 2], [3]).unwrap();
        let p = r.propose_membership(target).unwrap();
        drain(&mut r);
        r.step(accepted(3, p.index)).unwrap();
        drain(&mut r);
        r.log().committed()
    });
    assert_eq!((clean, mutated), (0, 2));
}

#[test]
fn transfer_without_catch_up() {
    let (clean, mutated) = differs(Mutation::TransferWithoutCatchUp, |m| {
        // Node 2 stores the leader's no-op; node 3 stores nothing.
        let mut r = leader(&[1, 2, 3], m);
        r.step(accepted(2, 1)).unwrap();
        drain(&mut r);
        r.transfer_leadership(3).unwrap();
        drain(&mut r)
            .all()
            .iter()
            .filter(|m| m.body == MessageBody::TimeoutNow)
            .map(|m| m.to)
            .collect::<Vec<_>>()
    });
    assert_eq!((clean, mutated), (vec![], vec![3]));
}

#[test]
fn lease_without_quorum() {
    let (clean, mutated) = differs(Mutation::LeaseWithoutQuorum, |m| {
        // Leader 1 of {1, 2, 3} with lease reads; its no-op committed, and
        // node 2 acknowledged the first round of heartbeats. Then the leader
        // is cut off: it keeps sending rounds that nobody answers.
        let mut c = cfg(1, &[1, 2, 3], m);
        c.check_quorum = true;
        c.lease_reads = true;
        c.lease_drift_ticks = 3;
        let mut r = Raft::new(c, Default::default()).unwrap();
        tick_until_role_changes(&mut r);
        r.step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }))
            .unwrap();
        drain(&mut r);
        r.step(accepted(2, 1)).unwrap();
        drain(&mut r);
        r.tick();
        let round = drain(&mut r)
            .all()
            .iter()
            .find_map(|m| match m.body {
                MessageBody::Heartbeat { read_round, .. } => Some(read_round),
                _ => None,
            })
            .expect("a round of heartbeats");
        r.step(msg(
            2,
            1,
            1,
            MessageBody::HeartbeatResponse { read_round: round },
        ))
        .unwrap();
        drain(&mut r);
        assert!(r.lease_holds());
        // The acknowledged lease runs out (check-quorum has not struck yet).
        for _ in 0..ELECTION - 3 {
            r.tick();
            drain(&mut r);
        }
        assert_eq!(r.role(), Role::Leader);
        r.lease_read(7).unwrap();
        drain(&mut r).reads
    });
    assert_eq!(
        (clean, mutated),
        (vec![], vec![ReadState { index: 1, ctx: 7 }]),
        "the mutant serves at once from a lease nobody acknowledged"
    );
}

#[test]
fn snapshot_over_committed() {
    let (clean, mutated) = differs(Mutation::SnapshotOverCommitted, |m| {
        // Node 2 committed and applied up to 4 of its five entries; a late
        // snapshot of leader 1 at 3 (a prefix of its log) arrives.
        let mut r = node_with(cfg(2, &[1, 2, 3], m), 2, &[1, 1, 2, 2, 2]);
        r.step(msg(
            1,
            2,
            2,
            MessageBody::Append {
                prev_index: 5,
                prev_term: 2,
                entries: vec![],
                commit: 4,
            },
        ))
        .unwrap();
        assert_eq!(drain(&mut r).committed.len(), 4);
        let meta = SnapshotMeta {
            index: 3,
            term: 2,
            membership: Membership::new([1, 2, 3], []).unwrap(),
        };
        r.step(msg(1, 2, 2, MessageBody::Snapshot { meta }))
            .unwrap();
        let out = drain(&mut r);
        let acked: Vec<_> = out
            .all()
            .iter()
            .filter_map(|m| match m.body {
                MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }) => {
                    Some(last_index)
                }
                _ => None,
            })
            .collect();
        (
            out.snapshots.len(),
            r.log().last_index(),
            r.log().committed(),
            acked,
        )
    });
    assert_eq!(clean, (0, 5, 4, vec![4]), "stale: answered with the commit");
    assert_eq!(
        mutated,
        (1, 3, 3, vec![3]),
        "the mutant installs it, dropping committed entries it acknowledged"
    );
}
