//! Linearizable reads beyond the paper's ReadIndex, against the core's
//! public API, in the spirit of `paper.rs`: lease reads (Raft thesis
//! §6.4.1), the quiet period of a restarted node that lease reads need, and
//! reads forwarded by followers (thesis §6.4, last paragraph).

mod common;

use common::*;
use kythira_raft::{
    AppendOutcome, Bytes, Config, ConfigError, HardState, Message, MessageBody, NodeId, Persisted,
    ProposeError, Raft, ReadState, RestoreError, Role, Term,
};

/// The lease is this much shorter than an election timeout.
const DRIFT: u32 = 3;
/// How long a lease runs, in the leader's ticks, from the sending of the
/// round that a quorum acknowledged.
const LEASE: u64 = (ELECTION - DRIFT) as u64;

/// Paper Raft with check-quorum and lease reads.
fn lease_config(id: NodeId, voters: &[NodeId]) -> Config {
    let mut c = config(id, voters);
    c.check_quorum = true;
    c.lease_reads = true;
    c.lease_drift_ticks = DRIFT;
    c
}

/// A core with the number of times it was ticked: its own clock, in which
/// the lease is measured (the core's count is private).
struct Clocked {
    r: Raft,
    now: u64,
}

impl Clocked {
    fn tick(&mut self) -> Output {
        self.r.tick();
        self.now += 1;
        drain(&mut self.r)
    }

    fn step(&mut self, m: Message) -> Output {
        self.r.step(m).unwrap();
        drain(&mut self.r)
    }

    /// Serve a lease read and return what it produced at once.
    fn lease_read(&mut self, ctx: u64) -> Output {
        self.r.lease_read(ctx).unwrap();
        drain(&mut self.r)
    }
}

/// Node 1 leading term 1 of `voters` (elected by the first majority of the
/// others), with `cfg`; its no-op, index 1, is not committed yet.
fn leader_with(cfg: Config) -> Clocked {
    let voters = cfg.voters.clone();
    let mut l = Clocked {
        r: Raft::new(cfg, Persisted::default()).unwrap(),
        now: 0,
    };
    while l.r.role() != Role::Candidate {
        l.tick();
        assert!(l.now < 4 * u64::from(ELECTION), "never campaigned");
    }
    for &v in voters.iter().filter(|&&v| v != 1).take(voters.len() / 2) {
        l.step(msg(v, 1, 1, MessageBody::VoteResponse { granted: true }));
    }
    assert_eq!((l.r.role(), l.r.term()), (Role::Leader, 1));
    assert_eq!(l.r.log().last_index(), 1);
    l
}

fn lease_leader(voters: &[NodeId]) -> Clocked {
    leader_with(lease_config(1, voters))
}

/// [`leader_with`], its no-op committed by the first majority of the others.
fn committed_leader_with(cfg: Config) -> Clocked {
    let voters = cfg.voters.clone();
    let mut l = leader_with(cfg);
    for &v in voters.iter().filter(|&&v| v != 1).take(voters.len() / 2) {
        l.step(accepted(v, 1));
    }
    assert_eq!(l.r.log().committed(), 1);
    l
}

fn committed_lease_leader(voters: &[NodeId]) -> Clocked {
    committed_leader_with(lease_config(1, voters))
}

fn accepted(from: NodeId, last_index: u64) -> Message {
    msg(
        from,
        1,
        1,
        MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }),
    )
}

/// `from`'s acknowledgement of leader 1's heartbeat round `round` (term 1).
fn ack(from: NodeId, round: u64) -> Message {
    msg(
        from,
        1,
        1,
        MessageBody::HeartbeatResponse { read_round: round },
    )
}

/// (to, round) of every heartbeat in `out`.
fn heartbeats(out: &Output) -> Vec<(NodeId, u64)> {
    let mut hb: Vec<_> = out
        .all()
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::Heartbeat { read_round, .. } => Some((m.to, read_round)),
            _ => None,
        })
        .collect();
    hb.sort_unstable();
    hb
}

/// The round of the heartbeats in `out`, which must go to every one of
/// `to` and carry one round.
fn round_to(out: &Output, to: &[NodeId]) -> u64 {
    let hb = heartbeats(out);
    let round = hb.first().expect("a round of heartbeats").1;
    assert!(round > 0, "every heartbeat is a numbered round");
    let want: Vec<_> = to.iter().map(|&id| (id, round)).collect();
    assert_eq!(hb, want, "one round to every follower");
    round
}

fn read(index: u64, ctx: u64) -> ReadState {
    ReadState { index, ctx }
}

/// The `ReadIndexResponse`s in `out`: (to, ctx, index).
fn answers(out: &Output) -> Vec<(NodeId, u64, u64)> {
    let mut a: Vec<_> = out
        .all()
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::ReadIndexResponse { ctx, index } => Some((m.to, ctx, index)),
            _ => None,
        })
        .collect();
    a.sort_unstable();
    a
}

/// Steps each message into its recipient, without settling: the test
/// routes by hand.
fn route(net: &mut Network, msgs: Vec<Message>) {
    for m in msgs {
        net.get(m.to).step(m).unwrap();
    }
}

fn heartbeat(from: NodeId, to: NodeId, term: Term) -> Message {
    msg(
        from,
        to,
        term,
        MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
        },
    )
}

fn vote(from: NodeId, to: NodeId, term: Term, last: (u64, Term), transfer: bool) -> Message {
    msg(
        from,
        to,
        term,
        MessageBody::Vote {
            last_index: last.0,
            last_term: last.1,
            transfer,
        },
    )
}

// ---- §6.4.1 lease reads ------------------------------------------------------

/// "The leader would use the normal heartbeat mechanism to maintain a lease
/// ... once the leader's heartbeats were acknowledged by a majority of the
/// cluster, it would extend its lease": a lease read is then answered at
/// once, without a round of heartbeats, at the commit index.
#[test]
fn lease_read_is_served_at_once_after_a_quorum_acknowledged_a_round() {
    let mut l = committed_lease_leader(&[1, 2, 3]);
    assert!(!l.r.lease_holds(), "no round acknowledged yet");
    l.r.propose(Bytes::from_static(b"a")).unwrap();
    drain(&mut l.r);
    l.step(accepted(2, 2));
    assert_eq!(l.r.log().committed(), 2);
    let round = round_to(&l.tick(), &[2, 3]);
    assert!(!l.r.lease_holds(), "sent, not acknowledged");
    l.step(ack(2, round));
    assert!(l.r.lease_holds(), "the leader and node 2 are a majority");
    let out = l.lease_read(7);
    assert_eq!(out.reads, [read(2, 7)]);
    assert!(out.all().is_empty(), "no heartbeats: {:?}", out.all());
    // The commit index at the time of the read, not at the acknowledgement.
    l.r.propose(Bytes::from_static(b"b")).unwrap();
    drain(&mut l.r);
    l.step(accepted(3, 3));
    let out = l.lease_read(8);
    assert_eq!(out.reads, [read(3, 8)]);
    assert!(out.all().is_empty());
    // Each read is answered once: nothing waits for the next rounds.
    for _ in 0..2 {
        let round = round_to(&l.tick(), &[2, 3]);
        let out = l.step(ack(2, round));
        assert!(out.reads.is_empty(), "{:?}", out.reads);
    }
}

/// The lease needs a majority of the voters: in a cluster of five, the
/// leader and one follower are not enough.
#[test]
fn lease_needs_a_majority_of_acknowledgements() {
    let mut l = committed_lease_leader(&[1, 2, 3, 4, 5]);
    let round = round_to(&l.tick(), &[2, 3, 4, 5]);
    l.step(ack(2, round));
    assert!(!l.r.lease_holds(), "two of five");
    let out = l.lease_read(1);
    assert!(out.reads.is_empty());
    let read_round = round_to(&out, &[2, 3, 4, 5]);
    assert!(read_round > round, "the read takes the ReadIndex path");
    l.step(ack(4, round));
    assert!(
        l.r.lease_holds(),
        "three of five acknowledged the first round"
    );
    let out = l.lease_read(2);
    assert_eq!(out.reads, [read(1, 2)]);
    assert!(out.all().is_empty());
    // The ReadIndex read still needs its own round acknowledged.
    let out = l.step(ack(2, read_round));
    assert!(out.reads.is_empty());
    let out = l.step(ack(5, read_round));
    assert_eq!(out.reads, [read(1, 1)]);
}

/// A single voter's rounds are acknowledged by itself: its lease runs from
/// its latest heartbeat, with nobody to hear from.
#[test]
fn a_single_voter_holds_the_lease_from_its_own_rounds() {
    let mut l = Clocked {
        r: Raft::new(lease_config(1, &[1]), Persisted::default()).unwrap(),
        now: 0,
    };
    while l.r.role() != Role::Leader {
        l.tick();
    }
    drain(&mut l.r);
    assert_eq!(l.r.log().committed(), 1);
    assert!(!l.r.lease_holds(), "no round sent yet");
    assert_eq!(heartbeats(&l.tick()), [], "nobody to send to");
    assert!(l.r.lease_holds());
    let out = l.lease_read(3);
    assert_eq!(out.reads, [read(1, 3)]);
    assert!(out.all().is_empty());
}

/// Thesis §6.4 step 1 holds for lease reads too: until an entry of its term
/// commits, a new leader's commit index may lag its predecessor's, so even
/// an acknowledged round gives no lease; the read waits for ReadIndex,
/// whose round starts once the no-op commits.
#[test]
fn no_lease_before_the_term_has_a_committed_entry() {
    let mut l = lease_leader(&[1, 2, 3]);
    let round = round_to(&l.tick(), &[2, 3]);
    l.step(ack(2, round));
    assert_eq!(l.r.log().committed(), 0);
    assert!(!l.r.lease_holds());
    let out = l.lease_read(7);
    assert!(out.reads.is_empty());
    assert_eq!(heartbeats(&out), [], "no ReadIndex round before the commit");
    let out = l.step(accepted(2, 1));
    assert_eq!(l.r.log().committed(), 1);
    assert!(out.reads.is_empty());
    let read_round = round_to(&out, &[2, 3]);
    let out = l.step(ack(3, read_round));
    assert_eq!(out.reads, [read(1, 7)]);
    // The round acknowledged before the commit still counts for the lease:
    // it was a heartbeat of this leadership.
    assert!(l.r.lease_holds());
    assert_eq!(l.lease_read(8).reads, [read(1, 8)]);
}

/// A leader cut off from everybody serves lease reads for
/// `election_ticks - lease_drift_ticks` ticks from the sending of the last
/// acknowledged round, and none after: the read then takes the ReadIndex
/// path (a round of heartbeats), and is served once that is acknowledged.
#[test]
fn lease_runs_out_without_acknowledgements() {
    let mut l = committed_lease_leader(&[1, 2, 3]);
    let round = round_to(&l.tick(), &[2, 3]);
    let sent_at = l.now;
    l.step(ack(2, round));
    // Cut off: every later round goes unanswered.
    while l.now < sent_at + LEASE {
        assert!(l.r.lease_holds(), "tick {} of the lease", l.now - sent_at);
        let out = l.lease_read(l.now);
        assert_eq!(out.reads, [read(1, l.now)]);
        assert_eq!(heartbeats(&out), []);
        l.tick();
    }
    assert_eq!(l.r.role(), Role::Leader, "check-quorum has not struck yet");
    assert!(!l.r.lease_holds());
    let out = l.lease_read(99);
    assert!(out.reads.is_empty(), "served after the lease ran out");
    let read_round = round_to(&out, &[2, 3]);
    // The partition heals: the ReadIndex round is acknowledged.
    let out = l.step(ack(3, read_round));
    assert_eq!(out.reads, [read(1, 99)]);
    assert!(
        l.r.lease_holds(),
        "the read round renewed the lease from its sending"
    );
}

/// The lease runs from when the acknowledged round was SENT, not from when
/// the acknowledgements arrived: the followers' promise not to vote runs
/// from their receipt of it, which may have been long before the answer
/// came back.
#[test]
fn lease_runs_from_the_sending_of_the_acknowledged_round() {
    let mut l = committed_lease_leader(&[1, 2, 3]);
    let first = round_to(&l.tick(), &[2, 3]);
    let sent_at = l.now;
    let mut later = Vec::new();
    for _ in 0..4 {
        later.push((round_to(&l.tick(), &[2, 3]), l.now));
    }
    assert!(!l.r.lease_holds());
    // The acknowledgements of the first round arrive four ticks late.
    l.step(ack(2, first));
    let acked_at = l.now;
    assert_eq!(acked_at, sent_at + 4);
    assert!(l.r.lease_holds());
    while l.r.lease_holds() {
        l.tick();
        assert!(l.now <= acked_at + LEASE, "the lease ran from the ack");
    }
    assert_eq!(l.now, sent_at + LEASE, "the lease ran from the sending");
    assert!(l.lease_read(1).reads.is_empty());
    // An acknowledgement of the last of the delayed rounds extends the
    // lease to that round's sending plus the lease.
    let (round, at) = *later.last().unwrap();
    l.step(ack(3, round));
    assert!(l.r.lease_holds());
    // A late acknowledgement of an older round takes nothing back.
    l.step(ack(2, first));
    while l.r.lease_holds() {
        l.tick();
    }
    assert_eq!(l.now, at + LEASE);
    assert_eq!(l.r.role(), Role::Leader);
}

/// Thesis §3.10: the transfer's target campaigns past every lease. While a
/// transfer is under way the leader serves no lease reads (ReadIndex still
/// works); a transfer abandoned before any `TimeoutNow` went out gives the
/// lease back.
#[test]
fn no_lease_during_a_leadership_transfer() {
    let mut l = committed_lease_leader(&[1, 2, 3]);
    let round = round_to(&l.tick(), &[2, 3]);
    l.step(ack(2, round));
    assert!(l.r.lease_holds());
    // Node 3 stores nothing yet: the leader first brings it up to date.
    l.r.transfer_leadership(3).unwrap();
    let out = drain(&mut l.r);
    assert!(!out.all().iter().any(|m| m.body == MessageBody::TimeoutNow));
    assert!(!l.r.lease_holds(), "a transfer is under way");
    let out = l.lease_read(7);
    assert!(out.reads.is_empty());
    let read_round = round_to(&out, &[2, 3]);
    let out = l.step(ack(2, read_round));
    assert_eq!(out.reads, [read(1, 7)], "ReadIndex still works");
    // Node 3 never answers: the transfer is abandoned after an election
    // timeout. Node 2 keeps acknowledging.
    for _ in 0..ELECTION {
        assert_eq!(l.r.transfer_target(), Some(3));
        assert!(!l.r.lease_holds());
        let round = round_to(&l.tick(), &[2, 3]);
        l.step(ack(2, round));
    }
    assert_eq!(l.r.transfer_target(), None);
    assert_eq!(l.r.role(), Role::Leader);
    assert!(
        l.r.lease_holds(),
        "no TimeoutNow went out: the lease is back"
    );
    assert_eq!(l.lease_read(8).reads, [read(1, 8)]);
}

/// Once a `TimeoutNow` went out, its target may campaign past every lease
/// at any time (the message may be delayed), so the leader serves no lease
/// read for the rest of its term, even after the transfer is abandoned.
#[test]
fn no_lease_after_timeout_now_was_sent() {
    let mut l = committed_lease_leader(&[1, 2, 3]);
    let round = round_to(&l.tick(), &[2, 3]);
    l.step(ack(2, round));
    assert!(l.r.lease_holds());
    // Node 2 holds the whole log: TimeoutNow goes out at once (and is lost).
    l.r.transfer_leadership(2).unwrap();
    let out = drain(&mut l.r);
    assert!(
        out.all()
            .iter()
            .any(|m| m.to == 2 && m.body == MessageBody::TimeoutNow)
    );
    for _ in 0..ELECTION {
        assert!(!l.r.lease_holds());
        let round = round_to(&l.tick(), &[2, 3]);
        l.step(ack(2, round));
        l.step(ack(3, round));
    }
    assert_eq!(l.r.transfer_target(), None, "abandoned");
    assert_eq!(l.r.role(), Role::Leader);
    assert!(!l.r.lease_holds(), "the target may still campaign");
    let out = l.lease_read(7);
    assert!(out.reads.is_empty());
    let read_round = round_to(&out, &[2, 3]);
    assert_eq!(l.step(ack(3, read_round)).reads, [read(1, 7)]);
}

/// Without `lease_reads` a lease read is a ReadIndex read, whatever was
/// acknowledged.
#[test]
fn without_lease_reads_a_lease_read_is_a_read_index() {
    let mut c = config(1, &[1, 2, 3]);
    c.check_quorum = true;
    let mut l = committed_leader_with(c);
    let round = round_to(&l.tick(), &[2, 3]);
    l.step(ack(2, round));
    l.step(ack(3, round));
    assert!(!l.r.lease_holds());
    let out = l.lease_read(7);
    assert!(out.reads.is_empty());
    let read_round = round_to(&out, &[2, 3]);
    assert_eq!(l.step(ack(3, read_round)).reads, [read(1, 7)]);
}

/// On a follower a lease read takes the ReadIndex path: it is forwarded.
#[test]
fn lease_read_on_a_follower_is_forwarded() {
    let mut r = Raft::new(lease_config(2, &[1, 2, 3]), Persisted::default()).unwrap();
    r.step(heartbeat(1, 2, 1)).unwrap();
    drain(&mut r);
    assert!(!r.lease_holds());
    r.lease_read(4).unwrap();
    let out = drain(&mut r);
    assert!(out.reads.is_empty());
    assert_eq!(
        out.all(),
        [msg(2, 1, 1, MessageBody::ReadIndexRequest { ctx: 4 })]
    );
}

/// The point of it all, in a cluster: the leader is cut off right after a
/// round was acknowledged. While its lease holds it serves lease reads and
/// no other leader exists; the others elect one only after it ran out.
#[test]
fn the_lease_ends_before_another_leader_is_elected() {
    let voters = [1, 2, 3];
    let mut net = Network::with_config(&voters, |c| {
        c.check_quorum = true;
        c.lease_reads = true;
        c.lease_drift_ticks = DRIFT;
    });
    // Everybody starts quiet for an election timeout: tick them together.
    for _ in 0..4 * ELECTION {
        if net.leader().is_some() {
            break;
        }
        net.tick_all(1);
    }
    let old = net.leader().expect("a leader");
    let term = net.get(old).term();
    net.get(old).propose(Bytes::from_static(b"a")).unwrap();
    net.settle();
    net.tick_all(1);
    let commit = net.get(old).log().committed();
    assert!(net.get(old).lease_holds());
    net.get(old).lease_read(1).unwrap();
    assert_eq!(drain(net.get(old)).reads, [read(commit, 1)]);
    net.isolate(old);
    let mut served = 0;
    for t in 0..10 * ELECTION {
        net.tick_all(1);
        let others = net
            .nodes
            .values()
            .filter(|r| r.id() != old && r.role() == Role::Leader)
            .map(|r| (r.id(), r.term()))
            .collect::<Vec<_>>();
        let holds = net.get(old).lease_holds();
        if holds {
            served += 1;
            net.get(old).lease_read(100 + u64::from(t)).unwrap();
            let reads = drain(net.get(old)).reads;
            assert_eq!(reads, [read(commit, 100 + u64::from(t))]);
        }
        if let Some(&(id, new_term)) = others.first() {
            assert!(new_term > term);
            assert!(!holds, "tick {t}: {id} leads while {old}'s lease holds");
            assert!(
                served > 0 && served < LEASE,
                "the lease held for {served} ticks"
            );
            return;
        }
    }
    panic!("no new leader");
}

// ---- configuration ---------------------------------------------------------

/// Lease reads need check-quorum (without it a follower votes while it
/// still hears from its leader) and a drift margin of at least the one tick
/// of phase and below the election timeout (or the lease would be empty).
#[test]
fn lease_configuration_is_validated() {
    let make = |lease_reads: bool, check_quorum: bool, drift: u32| {
        let mut c = config(1, &[1, 2, 3]);
        c.lease_reads = lease_reads;
        c.check_quorum = check_quorum;
        c.lease_drift_ticks = drift;
        Raft::new(c, Persisted::default()).map(|_| ())
    };
    let refused = |drift| {
        Err(RestoreError::Config(ConfigError::Lease {
            drift,
            election: ELECTION,
        }))
    };
    assert_eq!(make(true, false, DRIFT), refused(DRIFT), "no check-quorum");
    assert_eq!(make(true, false, 0), refused(0));
    assert_eq!(make(true, true, ELECTION), refused(ELECTION));
    assert_eq!(make(true, true, ELECTION + 1), refused(ELECTION + 1));
    assert_eq!(make(true, true, ELECTION - 1), Ok(()));
    assert_eq!(make(true, true, 0), refused(0), "no room for tick phase");
    assert_eq!(make(true, true, 1), Ok(()));
    assert_eq!(make(false, false, ELECTION + 1), Ok(()), "lease reads off");
    assert_eq!(make(false, true, ELECTION), Ok(()));
}

// ---- the quiet period after a restart --------------------------------------

/// Node 2 restarted in term 2, having voted for 1, with entries 1..=2.
fn restarted(cfg: Config) -> Raft {
    let persisted = Persisted {
        hard_state: HardState {
            term: 2,
            vote: Some(1),
            commit: 2,
        },
        entries: log_of(&[1, 2]),
        ..Persisted::default()
    };
    Raft::new(cfg, persisted).unwrap()
}

fn vote_answers(out: &Output) -> Vec<Message> {
    out.all()
        .into_iter()
        .filter(|m| {
            matches!(
                m.body,
                MessageBody::VoteResponse { .. } | MessageBody::PreVoteResponse { .. }
            )
        })
        .collect()
}

/// A restarted node forgot the leader it heard from, whose lease may still
/// run on its acknowledgement: for an election timeout it ignores vote
/// requests of higher terms, term and all, and answers them after.
#[test]
fn restarted_node_ignores_higher_term_votes_for_an_election_timeout() {
    let mut c = lease_config(2, &[1, 2, 3]);
    // Its own timeout then leaves the term alone.
    c.pre_vote = true;
    let mut r = restarted(c);
    for now in 0..ELECTION {
        r.step(vote(3, 2, 3, (2, 2), false)).unwrap();
        r.step(msg(
            3,
            2,
            3,
            MessageBody::PreVote {
                last_index: 2,
                last_term: 2,
            },
        ))
        .unwrap();
        let out = drain(&mut r);
        assert_eq!((r.term(), r.vote()), (2, Some(1)), "tick {now}");
        assert_eq!(vote_answers(&out), [], "tick {now}");
        r.tick();
        drain(&mut r);
    }
    // An election timeout after the restart the request is heard.
    r.step(vote(3, 2, 3, (2, 2), false)).unwrap();
    assert_eq!((r.term(), r.vote()), (3, Some(3)));
    assert_eq!(
        vote_answers(&drain(&mut r)),
        [msg(2, 3, 3, MessageBody::VoteResponse { granted: true })]
    );
}

/// Only vote requests wait: a leader of a higher term is followed at once.
#[test]
fn restarted_node_follows_a_new_leader_at_once() {
    let mut r = restarted(lease_config(2, &[1, 2, 3]));
    r.step(heartbeat(3, 2, 3)).unwrap();
    assert_eq!((r.term(), r.leader()), (3, Some(3)));
}

/// A candidate the leader handed over to (`TimeoutNow`) sets the lease
/// aside, the quiet period included: the leader revoked its own lease.
#[test]
fn restarted_node_honours_a_transfer_vote_at_once() {
    let mut r = restarted(lease_config(2, &[1, 2, 3]));
    r.step(vote(3, 2, 3, (2, 2), true)).unwrap();
    assert_eq!((r.term(), r.vote()), (3, Some(3)));
    assert_eq!(
        vote_answers(&drain(&mut r)),
        [msg(2, 3, 3, MessageBody::VoteResponse { granted: true })]
    );
}

/// The quiet period exists for lease reads only.
#[test]
fn without_lease_reads_a_restarted_node_votes_at_once() {
    let mut c = config(2, &[1, 2, 3]);
    c.check_quorum = true;
    let mut r = restarted(c);
    r.step(vote(3, 2, 3, (2, 2), false)).unwrap();
    assert_eq!((r.term(), r.vote()), (3, Some(3)));
}

/// Node 2, lease reads on, past its quiet period: it pre-campaigned for
/// term 1 (asking nodes 1 and 3), then node 1 won term 1 and node 2
/// acknowledged its heartbeat round, so node 1's lease counts on node 2 not
/// voting for anyone else for an election timeout.
fn follower_in_lease() -> Raft {
    let mut c = lease_config(2, &[1, 2, 3]);
    c.pre_vote = true;
    let mut f = Raft::new(c, Persisted::default()).unwrap();
    tick_until_role_changes(&mut f);
    assert_eq!(f.role(), Role::PreCandidate);
    drain(&mut f);
    f.step(msg(
        1,
        2,
        1,
        MessageBody::Heartbeat {
            commit: 0,
            read_round: 1,
        },
    ))
    .unwrap();
    assert_eq!(f.leader(), Some(1));
    assert!(drain(&mut f).all().contains(&msg(
        2,
        1,
        1,
        MessageBody::HeartbeatResponse { read_round: 1 }
    )));
    // Within the lease, a vote request of a higher term is ignored.
    f.step(vote(3, 2, 2, (0, 0), false)).unwrap();
    assert_eq!((f.term(), f.vote()), (1, None));
    assert_eq!(vote_answers(&drain(&mut f)), []);
    f
}

/// Node 3, whose log is as good as node 2's, asks node 2 for its vote in
/// term 3, within the lease node 2 acknowledged.
fn votes_inside_the_lease(mut f: Raft) {
    f.step(vote(3, 2, 3, (0, 0), false)).unwrap();
    let out = drain(&mut f);
    assert_eq!(
        vote_answers(&out),
        [],
        "node 2 voted inside the lease it acknowledged (term {}, vote {:?})",
        f.term(),
        f.vote()
    );
    assert_ne!(f.vote(), Some(3));
}

/// A stale answer of a higher term to one of a follower's old requests
/// makes it adopt that term with no leader (`become_follower(term, None)`
/// in `step_inner`), so `in_lease()` no longer holds and it grants votes
/// inside the lease it acknowledged: node 3 could be elected while node 1
/// still serves lease reads. Here the answer is a rejection of the pre-vote
/// node 2 sent before node 1 was elected, from node 3, which has since
/// reached term 2 in a failed campaign.
#[test]
fn a_stale_pre_vote_rejection_does_not_end_a_followers_lease() {
    let mut f = follower_in_lease();
    f.step(msg(
        3,
        2,
        2,
        MessageBody::PreVoteResponse { granted: false },
    ))
    .unwrap();
    drain(&mut f);
    votes_inside_the_lease(f);
}

/// The same with the answer to a heartbeat node 2 sent while it led an
/// earlier term, from a node that has since reached term 2: a stale leader
/// is told of the newer term this way.
#[test]
fn a_stale_heartbeat_answer_does_not_end_a_followers_lease() {
    let mut f = follower_in_lease();
    f.step(msg(
        3,
        2,
        2,
        MessageBody::HeartbeatResponse { read_round: 0 },
    ))
    .unwrap();
    drain(&mut f);
    votes_inside_the_lease(f);
}

/// The consequence in a cluster, with clocks in step: node A led an earlier
/// term and its heartbeat to node C was delayed; B now leads (A handed
/// over), A acknowledges B's rounds, and C, cut off from B, campaigns in
/// vain. When A's stale heartbeat reaches C, C's answer carries its higher
/// term to A, which forgets B and votes for C's next campaign, while B's
/// lease (acknowledged by A just before; A's later answers to B are lost)
/// still runs. Whether C is elected in time depends on when the stale
/// heartbeat arrives; some delay makes it.
#[test]
fn no_second_leader_while_the_lease_holds_despite_stale_answers() {
    for delay in 0..3 * ELECTION {
        if let Some(report) = second_leader_within_lease(delay) {
            panic!("stale heartbeat delivered {delay} ticks after C campaigned: {report}");
        }
    }
}

/// One run of the scenario above; reports a second leader elected, and
/// what a lease read then returns, while the old leader's lease holds.
fn second_leader_within_lease(delay: u32) -> Option<String> {
    let mut net = Network::with_config(&[1, 2, 3], |c| {
        c.check_quorum = true;
        c.lease_reads = true;
        c.lease_drift_ticks = DRIFT;
    });
    for _ in 0..4 * ELECTION {
        if net.leader().is_some() {
            break;
        }
        net.tick_all(1);
    }
    let a = net.leader().expect("a leader");
    let (b, c) = match a {
        1 => (2, 3),
        2 => (3, 1),
        _ => (1, 2),
    };
    net.tick_all(1);
    // A's heartbeat to C is held back.
    net.get(a).tick();
    let out = drain(net.get(a));
    let (stale, rest): (Vec<_>, Vec<_>) = out.all().into_iter().partition(|m| m.to == c);
    net.deliver(rest);
    net.get(a).transfer_leadership(b).unwrap();
    net.settle();
    assert_eq!(net.leader(), Some(b));
    let term = net.get(b).term();
    net.tick_all(1);
    net.cut(b, c);
    // C times out and campaigns in vain: A hears from B.
    for _ in 0..4 * ELECTION {
        if net.get(c).role() == Role::Candidate {
            break;
        }
        net.tick_all(1);
    }
    assert_eq!(net.get(c).role(), Role::Candidate);
    net.tick_all(delay);
    if net.leader() != Some(b) {
        return None;
    }
    // The stale heartbeat arrives; from now on A's answers to B are lost.
    net.drop_if(move |m| m.from == a && m.to == b);
    net.deliver(stale);
    for _ in 0..2 * ELECTION {
        net.tick_all(1);
        let new = net
            .nodes
            .values()
            .find(|r| r.role() == Role::Leader && r.term() > term)
            .map(Raft::id);
        let Some(new) = new else { continue };
        if !net.get(b).lease_holds() {
            return None;
        }
        net.get(new).propose(Bytes::from_static(b"w")).unwrap();
        net.settle();
        let committed = net.get(new).log().committed();
        net.get(b).lease_read(1).unwrap();
        let reads = drain(net.get(b)).reads;
        return Some(format!(
            "node {new} leads term {} and committed up to {committed}, while node {b} \
             (term {term}) still holds its lease and serves {reads:?}",
            net.get(new).term()
        ));
    }
    None
}

// ---- §6.4 follower reads ----------------------------------------------------

/// Three voters led by 1 in term 1, the leader's commit index 2 everywhere.
fn steady() -> Network {
    let mut net = Network::of_size(3);
    net.elect(1);
    net.get(1).propose(Bytes::from_static(b"a")).unwrap();
    net.settle();
    net.tick_all(1);
    for id in [1, 2, 3] {
        assert_eq!(net.get(id).log().committed(), 2);
        assert_eq!(net.get(id).leader(), Some(1));
    }
    net
}

/// "A follower could also offload the processing of reads ...: it would
/// send a request to the leader asking for its current readIndex; the
/// leader would then run through steps 1–3": the read is forwarded, the
/// leader confirms it with a round of heartbeats, answers once a quorum
/// acknowledged it, and the follower emits the read state.
#[test]
fn follower_read_is_forwarded_and_confirmed_by_a_heartbeat_round() {
    let mut net = steady();
    net.get(2).read_index(7).unwrap();
    let out = drain(net.get(2));
    assert_eq!(
        out.early,
        [msg(2, 1, 1, MessageBody::ReadIndexRequest { ctx: 7 })],
        "promises nothing durable"
    );
    assert!(out.after_persist.is_empty() && out.reads.is_empty());
    route(&mut net, out.all());
    let out = drain(net.get(1));
    let round = round_to(&out, &[2, 3]);
    assert_eq!(answers(&out), [], "not before a quorum acknowledged");
    assert!(out.reads.is_empty());
    // Node 3's acknowledgement (with the leader's own) is a quorum.
    let out = {
        net.get(1).step(ack(3, round)).unwrap();
        drain(net.get(1))
    };
    assert_eq!(answers(&out), [(2, 7, 2)]);
    assert!(out.reads.is_empty(), "not a read of the leader's");
    route(&mut net, out.all());
    let out = drain(net.get(2));
    assert_eq!(out.reads, [read(2, 7)]);
    assert!(out.all().is_empty());
}

/// The follower's read index is the leader's commit index, which may be
/// past the follower's: the driver serves the read once it has applied
/// that far.
#[test]
fn follower_read_index_is_the_leaders_commit_index() {
    let mut net = steady();
    net.drop_if(|m| m.to == 2 && matches!(m.body, MessageBody::Append { .. }));
    net.get(1).propose(Bytes::from_static(b"b")).unwrap();
    net.settle();
    assert_eq!(net.get(1).log().committed(), 3);
    assert_eq!(net.get(2).log().committed(), 2);
    net.get(2).read_index(8).unwrap();
    net.settle();
    assert_eq!(net.reads[&2], [read(3, 8)]);
    assert_eq!(net.get(2).log().committed(), 2, "not applicable yet");
    net.heal();
    net.tick_all(1);
    assert_eq!(net.get(2).log().committed(), 3);
    assert_eq!(net.applied[&2].len(), 3);
}

/// Thesis §6.4: "the leader can batch": forwarded reads from two followers
/// and the leader's own that arrive while a round is in flight all share
/// the next round.
#[test]
fn forwarded_and_local_reads_share_one_round() {
    let mut net = steady();
    net.get(1).read_index(100).unwrap();
    let first = round_to(&drain(net.get(1)), &[2, 3]);
    net.get(2).read_index(1).unwrap();
    net.get(3).read_index(2).unwrap();
    net.get(3).read_index(3).unwrap();
    for id in [2, 3] {
        let out = drain(net.get(id));
        route(&mut net, out.all());
    }
    net.get(1).read_index(101).unwrap();
    let out = drain(net.get(1));
    assert_eq!(heartbeats(&out), [], "one round in flight at a time");
    net.get(1).step(ack(2, first)).unwrap();
    let out = drain(net.get(1));
    assert_eq!(out.reads, [read(2, 100)]);
    assert_eq!(answers(&out), []);
    let shared = round_to(&out, &[2, 3]);
    assert!(shared > first);
    net.get(1).step(ack(3, shared)).unwrap();
    let out = drain(net.get(1));
    assert_eq!(out.reads, [read(2, 101)]);
    assert_eq!(answers(&out), [(2, 1, 2), (3, 2, 2), (3, 3, 2)]);
    assert_eq!(heartbeats(&out), [], "nothing left waiting");
    route(&mut net, out.all());
    assert_eq!(drain(net.get(2)).reads, [read(2, 1)]);
    assert_eq!(drain(net.get(3)).reads, [read(2, 2), read(2, 3)]);
}

/// A forwarded read reaching a new leader waits, like its own reads, for
/// an entry of its term to commit (thesis §6.4, step 1).
#[test]
fn forwarded_read_waits_for_the_leaders_term_to_commit() {
    let mut c = config(1, &[1, 2, 3]);
    c.check_quorum = true;
    let mut l = leader_with(c);
    let out = l.step(msg(2, 1, 1, MessageBody::ReadIndexRequest { ctx: 5 }));
    assert_eq!(heartbeats(&out), []);
    let out = l.step(accepted(3, 1));
    let round = round_to(&out, &[2, 3]);
    assert_eq!(answers(&out), []);
    let out = l.step(ack(3, round));
    assert_eq!(answers(&out), [(2, 5, 1)]);
}

/// A follower that knows no leader (or a candidate) has nobody to ask.
#[test]
fn follower_without_a_leader_refuses_reads() {
    let none = Err(ProposeError::NotLeader { leader: None });
    let mut r = node(2, &[1, 2, 3]);
    assert_eq!(r.read_index(1), none);
    tick_until_role_changes(&mut r);
    assert_eq!(r.role(), Role::Candidate);
    assert_eq!(r.read_index(1), none);
    let mut c = config(2, &[1, 2, 3]);
    c.pre_vote = true;
    let mut r = Raft::new(c, Persisted::default()).unwrap();
    tick_until_role_changes(&mut r);
    assert_eq!(r.role(), Role::PreCandidate);
    assert_eq!(r.read_index(1), none);
    let mut r = Raft::new(lease_config(2, &[1, 2, 3]), Persisted::default()).unwrap();
    assert_eq!(r.lease_read(1), none);
    // Nothing was sent or recorded.
    let out = drain(&mut r);
    assert!(out.all().is_empty() && out.reads.is_empty() && out.dropped_reads.is_empty());
}

/// Node 2 following node 1 in term 1, with read 5 forwarded (and lost).
fn follower_with_forwarded_read() -> Raft {
    let mut f = node(2, &[1, 2, 3]);
    f.step(heartbeat(1, 2, 1)).unwrap();
    drain(&mut f);
    f.read_index(5).unwrap();
    let out = drain(&mut f);
    assert_eq!(
        out.all(),
        [msg(2, 1, 1, MessageBody::ReadIndexRequest { ctx: 5 })]
    );
    f
}

/// A read forwarded to a leader that is no longer the follower's is
/// dropped: the old leader's answer could come from a deposed leader.
#[test]
fn forwarded_read_is_dropped_when_the_leader_changes() {
    // A new leader of a later term.
    let mut f = follower_with_forwarded_read();
    f.step(heartbeat(3, 2, 2)).unwrap();
    let out = drain(&mut f);
    assert_eq!(out.dropped_reads, [5]);
    assert!(out.reads.is_empty());
    // The old leader's late answer is of an older term: ignored.
    f.step(msg(
        1,
        2,
        1,
        MessageBody::ReadIndexResponse { ctx: 5, index: 2 },
    ))
    .unwrap();
    assert!(drain(&mut f).reads.is_empty());
    // New reads go to the new leader.
    f.read_index(6).unwrap();
    assert_eq!(
        drain(&mut f).all(),
        [msg(2, 3, 2, MessageBody::ReadIndexRequest { ctx: 6 })]
    );

    // A vote request of a later term: no leader any more.
    let mut f = follower_with_forwarded_read();
    f.step(vote(3, 2, 2, (9, 1), false)).unwrap();
    assert_eq!((f.term(), f.leader()), (2, None));
    assert_eq!(drain(&mut f).dropped_reads, [5]);
    assert_eq!(
        f.read_index(6),
        Err(ProposeError::NotLeader { leader: None })
    );
}

/// The leader (or its answer) may be lost: a forwarded read is dropped
/// after an election timeout without an answer, and a later answer is
/// ignored. Each read has its own deadline.
#[test]
fn forwarded_read_expires_after_an_election_timeout() {
    let mut f = follower_with_forwarded_read();
    let mut dropped = Vec::new();
    for now in 1..=ELECTION + 5 {
        f.tick();
        // The leader is alive but never answers.
        f.step(heartbeat(1, 2, 1)).unwrap();
        if now == 3 {
            f.read_index(6).unwrap();
        }
        let out = drain(&mut f);
        assert!(out.reads.is_empty());
        dropped.extend(out.dropped_reads.into_iter().map(|ctx| (now, ctx)));
    }
    assert_eq!(f.role(), Role::Follower);
    assert_eq!(dropped, [(ELECTION, 5), (ELECTION + 3, 6)]);
    f.step(msg(
        1,
        2,
        1,
        MessageBody::ReadIndexResponse { ctx: 5, index: 2 },
    ))
    .unwrap();
    assert!(drain(&mut f).reads.is_empty(), "expired");
}

/// Only the follower's leader answers its reads: an answer from anyone
/// else is ignored, and the leader's answer counts once.
#[test]
fn read_index_response_from_a_non_leader_is_ignored() {
    let mut f = follower_with_forwarded_read();
    f.step(msg(
        3,
        2,
        1,
        MessageBody::ReadIndexResponse { ctx: 5, index: 9 },
    ))
    .unwrap();
    let out = drain(&mut f);
    assert!(out.reads.is_empty() && out.dropped_reads.is_empty());
    assert_eq!(f.leader(), Some(1));
    // An answer to a read never asked for.
    f.step(msg(
        1,
        2,
        1,
        MessageBody::ReadIndexResponse { ctx: 77, index: 2 },
    ))
    .unwrap();
    assert!(drain(&mut f).reads.is_empty());
    // The leader's answer, duplicated by the network.
    for _ in 0..2 {
        f.step(msg(
            1,
            2,
            1,
            MessageBody::ReadIndexResponse { ctx: 5, index: 2 },
        ))
        .unwrap();
    }
    assert_eq!(drain(&mut f).reads, [read(2, 5)]);
}

/// A leader that steps down fails its own pending reads at once; those
/// forwarded by followers are not its to fail (they expire or are dropped
/// at the follower), and are never answered.
#[test]
fn leader_stepping_down_drops_only_its_local_reads() {
    let mut net = steady();
    net.get(1).read_index(10).unwrap();
    drain(net.get(1));
    net.get(2).read_index(20).unwrap();
    let out = drain(net.get(2));
    route(&mut net, out.all());
    net.get(1).read_index(11).unwrap();
    drain(net.get(1));
    net.get(1).step(heartbeat(3, 1, 2)).unwrap();
    let out = drain(net.get(1));
    assert_eq!(net.get(1).role(), Role::Follower);
    assert_eq!(out.dropped_reads, [10, 11]);
    assert_eq!(answers(&out), []);
    // Node 2 learns of the new leader and drops its read there.
    net.get(2).step(heartbeat(3, 2, 2)).unwrap();
    assert_eq!(drain(net.get(2)).dropped_reads, [20]);
}
