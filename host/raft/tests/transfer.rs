//! Leadership transfer (Raft thesis §3.10), against the core's public API,
//! in the spirit of `paper.rs`: the leader brings the target's log up to
//! date, refuses proposals meanwhile, and sends it `TimeoutNow`; the target
//! campaigns at once, past pre-vote and past the others' leader lease.

mod common;

use common::*;
use kythira_raft::{
    AppendOutcome, Bytes, Index, MembershipChangeError, Message, MessageBody, NodeId, ProposeError,
    Role, TransferError,
};

fn is_timeout_now(m: &Message) -> bool {
    m.body == MessageBody::TimeoutNow
}

fn accepted_by(m: &Message, from: NodeId) -> Option<Index> {
    match m.body {
        MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }) if m.from == from => {
            Some(last_index)
        }
        _ => None,
    }
}

/// Three voters led by 1 in term 1, every log complete and committed.
fn steady(net: &mut Network) {
    net.elect(1);
    net.get(1).propose(Bytes::from_static(b"a")).unwrap();
    net.settle();
    net.tick_all(1);
    let last = net.get(1).log().last_index();
    for id in [2, 3] {
        assert_eq!(net.get(1).progress(id).unwrap().matched, last);
    }
}

/// "The prior leader sends a TimeoutNow request to the target server ...
/// [which] starts a new election ... and is very likely to win": a target
/// that is up to date gets `TimeoutNow` at once, with nothing to catch up,
/// and leads the next term; the old leader follows it.
#[test]
fn s3_10_transfer_to_an_up_to_date_follower() {
    let mut net = Network::of_size(3);
    steady(&mut net);
    let term = net.get(1).term();
    net.get(1).transfer_leadership(2).unwrap();
    assert_eq!(net.get(1).transfer_target(), Some(2));
    let out = drain(net.get(1));
    let to_2: Vec<_> = out.all().into_iter().filter(|m| m.to == 2).collect();
    assert_eq!(to_2, [msg(1, 2, term, MessageBody::TimeoutNow)]);
    assert!(
        out.early.iter().any(is_timeout_now),
        "it promises nothing durable"
    );
    net.trace.clear();
    net.deliver(out.all());
    let r = net.get(2);
    assert_eq!((r.role(), r.term()), (Role::Leader, term + 1));
    for id in [1, 3] {
        let r = net.get(id);
        assert_eq!(r.role(), Role::Follower, "node {id}");
        assert_eq!((r.term(), r.leader()), (term + 1, Some(2)), "node {id}");
    }
    assert_eq!(net.get(1).transfer_target(), None);
    let requests: Vec<_> = net
        .trace
        .iter()
        .filter(|m| m.from == 2 && m.is_election())
        .map(|m| (m.to, m.body.clone()))
        .collect();
    let vote = MessageBody::Vote {
        last_index: 2,
        last_term: 1,
        transfer: true,
    };
    assert_eq!(requests, [(1, vote.clone()), (3, vote)]);
    net.tick_all(1);
    assert_eq!(net.get(2).log().committed(), 3, "its no-op commits");
    assert_eq!(net.log_terms(1), net.log_terms(2));
}

/// "The prior leader ... brings the target server's log up to date", and
/// only then sends `TimeoutNow`: never before the target has acknowledged the
/// leader's last entry, however many appends catching up takes.
#[test]
fn s3_10_transfer_to_a_lagging_node_catches_it_up_first() {
    let mut net = Network::with_config(&[1, 2, 3], |c| c.max_entries_per_message = 1);
    steady(&mut net);
    net.isolate(3);
    for i in 0..4u8 {
        net.get(1).propose(Bytes::from(vec![i])).unwrap();
    }
    net.settle();
    net.heal();
    let last = net.get(1).log().last_index();
    assert_eq!(net.get(1).log().committed(), last);
    assert!(net.get(3).log().last_index() < last, "node 3 lags");
    let term = net.get(1).term();
    net.trace.clear();
    net.get(1).transfer_leadership(3).unwrap();
    let out = drain(net.get(1));
    assert!(!out.all().iter().any(is_timeout_now));
    net.deliver(out.all());
    for _ in 0..ELECTION {
        if net.get(3).role() == Role::Leader {
            break;
        }
        assert_eq!(net.get(1).transfer_target(), Some(3));
        assert!(
            net.get(1).propose(Bytes::from_static(b"no")).is_err(),
            "no proposal while transferring"
        );
        net.tick_all(1);
    }
    assert_eq!(
        (net.get(3).role(), net.get(3).term()),
        (Role::Leader, term + 1)
    );
    let first = net
        .trace
        .iter()
        .position(is_timeout_now)
        .expect("a TimeoutNow");
    assert_eq!((net.trace[first].from, net.trace[first].to), (1, 3));
    let before = &net.trace[..first];
    let acks: Vec<Index> = before.iter().filter_map(|m| accepted_by(m, 3)).collect();
    assert_eq!(
        acks.last(),
        Some(&last),
        "sent once node 3 matched: {acks:?}"
    );
    assert!(
        acks.iter().filter(|&&a| a == last).count() == 1,
        "not before either: {acks:?}"
    );
    let caught_up_with: Vec<Index> = before
        .iter()
        .filter(|m| m.from == 1 && m.to == 3)
        .filter_map(|m| match &m.body {
            MessageBody::Append { entries, .. } => entries.last().map(|e| e.index),
            _ => None,
        })
        .collect();
    assert!(
        caught_up_with.len() >= 2 && caught_up_with.last() == Some(&last),
        "the missing entries went out first, one per append: {caught_up_with:?}"
    );
}

/// Proposals (and membership changes) are refused while a transfer is under
/// way; a transfer that has not ended within an election timeout is
/// abandoned, and the leader takes proposals again.
#[test]
fn s3_10_proposals_are_refused_until_the_transfer_is_abandoned() {
    let mut net = Network::of_size(3);
    steady(&mut net);
    let term = net.get(1).term();
    net.isolate(3);
    net.get(1).transfer_leadership(3).unwrap();
    net.settle();
    let r = net.get(1);
    assert_eq!(
        r.propose(Bytes::from_static(b"x")),
        Err(ProposeError::Transferring { to: 3 })
    );
    let target = r.membership().without(2).unwrap();
    assert_eq!(
        r.propose_membership(target.clone()),
        Err(MembershipChangeError::Transferring { to: 3 })
    );
    let last = r.log().last_index();
    for _ in 1..ELECTION {
        net.tick(1, 1);
        assert_eq!(net.get(1).transfer_target(), Some(3));
        assert_eq!(
            net.get(1).propose(Bytes::from_static(b"x")),
            Err(ProposeError::Transferring { to: 3 })
        );
    }
    net.tick(1, 1);
    let r = net.get(1);
    assert_eq!(
        r.transfer_target(),
        None,
        "abandoned after an election timeout"
    );
    assert_eq!((r.role(), r.term()), (Role::Leader, term));
    assert_eq!(r.log().last_index(), last, "nothing was appended meanwhile");
    let p = r.propose(Bytes::from_static(b"x")).unwrap();
    net.settle();
    assert_eq!(net.get(1).log().committed(), p.index);
    assert_eq!(net.get(3).term(), term, "node 3 never campaigned");
}

/// With check-quorum, followers that heard from the leader within the
/// election timeout ignore vote requests; the transfer's candidate is the
/// exception (its requests say it was handed over to), and with pre-vote on
/// it skips the pre-vote round.
#[test]
fn s3_10_transfer_passes_the_lease_and_pre_vote() {
    let mut net = Network::with_config(&[1, 2, 3, 4, 5], |c| {
        c.pre_vote = true;
        c.check_quorum = true;
    });
    net.elect(1);
    net.tick_all(2);
    let term = net.get(1).term();
    assert_eq!(net.leader(), Some(1));
    // Inside the lease an ordinary vote request is ignored, term and all,
    // however up to date the candidate.
    let ordinary = MessageBody::Vote {
        last_index: 99,
        last_term: term,
        transfer: false,
    };
    let before = net.get(3).hard_state();
    net.get(3).step(msg(2, 3, term + 1, ordinary)).unwrap();
    assert_eq!(net.get(3).hard_state(), before);
    assert_eq!(before.term, term);
    assert!(drain(net.get(3)).all().is_empty());
    net.trace.clear();
    net.get(1).transfer_leadership(2).unwrap();
    net.settle();
    assert_eq!(net.leader(), Some(2));
    assert_eq!(net.get(2).term(), term + 1);
    assert!(
        !net.trace
            .iter()
            .any(|m| matches!(m.body, MessageBody::PreVote { .. })),
        "no pre-vote round"
    );
    let mut granted_by: Vec<NodeId> = net
        .trace
        .iter()
        .filter(|m| m.to == 2 && m.body == MessageBody::VoteResponse { granted: true })
        .map(|m| m.from)
        .collect();
    granted_by.sort_unstable();
    assert_eq!(granted_by, [1, 3, 4, 5], "every voter, inside its lease");
    net.tick_all(3 * ELECTION);
    assert_eq!(net.leader(), Some(2), "and it stays leader");
    assert_eq!(net.get(2).term(), term + 1);
}

/// Only a leader transfers, and only to another voter; a refused transfer
/// leaves everything as it was.
#[test]
fn s3_10_transfers_that_are_refused() {
    let mut net = Network::of_size(3);
    net.add(node(4, &[]));
    net.elect(1);
    let target = net.get(1).membership().with_learner(4).unwrap();
    net.get(1).propose_membership(target).unwrap();
    net.settle();
    assert!(net.get(1).membership().is_learner(4));
    net.trace.clear();
    let r = net.get(1);
    assert_eq!(r.transfer_leadership(4), Err(TransferError::NotAVoter(4)));
    assert_eq!(r.transfer_leadership(9), Err(TransferError::NotAVoter(9)));
    assert_eq!(
        r.transfer_leadership(1),
        Err(TransferError::AlreadyLeader(1))
    );
    assert_eq!(r.transfer_target(), None);
    assert!(r.propose(Bytes::from_static(b"x")).is_ok());
    assert_eq!(
        net.get(2).transfer_leadership(3),
        Err(TransferError::NotLeader { leader: Some(1) })
    );
    assert_eq!(
        node(2, &[1, 2, 3]).transfer_leadership(3),
        Err(TransferError::NotLeader { leader: None })
    );
    net.settle();
    assert!(!net.trace.iter().any(is_timeout_now));
    assert_eq!(net.leader(), Some(1));
}

/// Asking again for the same target keeps the transfer (and its clock);
/// asking for another voter replaces it.
#[test]
fn s3_10_a_second_request_keeps_or_replaces_the_transfer() {
    let mut net = Network::of_size(3);
    steady(&mut net);
    net.isolate(2);
    net.isolate(3);
    net.get(1).transfer_leadership(2).unwrap();
    net.tick(1, ELECTION - 1);
    net.get(1).transfer_leadership(2).unwrap();
    net.tick(1, 1);
    assert_eq!(
        net.get(1).transfer_target(),
        None,
        "the same request did not restart the clock"
    );
    net.get(1).transfer_leadership(2).unwrap();
    net.tick(1, ELECTION - 1);
    net.get(1).transfer_leadership(3).unwrap();
    assert_eq!(net.get(1).transfer_target(), Some(3));
    net.tick(1, 1);
    assert_eq!(
        net.get(1).transfer_target(),
        Some(3),
        "a new target starts a new clock"
    );
    net.tick(1, ELECTION - 2);
    assert_eq!(net.get(1).transfer_target(), Some(3));
    net.tick(1, 1);
    assert_eq!(net.get(1).transfer_target(), None);
    assert_eq!(net.leader(), Some(1));
}

/// `TimeoutNow` is obeyed only from the leader this node follows, and
/// never by a node that is not a voter.
#[test]
fn s3_10_timeout_now_only_from_the_leader_and_only_by_a_voter() {
    let heartbeat = |from| {
        msg(
            from,
            3,
            1,
            MessageBody::Heartbeat {
                commit: 0,
                read_round: 0,
            },
        )
    };
    let mut r = node(3, &[1, 2, 3]);
    r.step(heartbeat(1)).unwrap();
    r.step(msg(2, 3, 1, MessageBody::TimeoutNow)).unwrap();
    assert_eq!(
        (r.role(), r.term()),
        (Role::Follower, 1),
        "2 is not the leader"
    );
    r.step(msg(1, 3, 1, MessageBody::TimeoutNow)).unwrap();
    assert_eq!((r.role(), r.term()), (Role::Candidate, 2));
    let mut learner = node(3, &[1, 2]);
    learner.step(heartbeat(1)).unwrap();
    learner.step(msg(1, 3, 1, MessageBody::TimeoutNow)).unwrap();
    assert_eq!((learner.role(), learner.term()), (Role::Follower, 1));
    assert!(drain(&mut learner).all().iter().all(|m| !m.is_election()));
}
