//! The Raft paper ("In Search of an Understandable Consensus Algorithm",
//! Ongaro and Ousterhout, 2014), section by section, against the core's
//! public API; in the spirit of etcd's raft_paper_test.go.

mod common;

use common::*;
use kythira_raft::{AppendOutcome, Bytes, EntryKind, MessageBody, Role};

// ---- §5.1 Raft basics: terms ----------------------------------------------

/// "If one server's current term is smaller than the other's, then it updates
/// its current term to the larger value. If a candidate or leader discovers
/// that its term is out of date, it immediately reverts to follower state."
#[test]
fn s5_1_higher_term_makes_any_role_a_follower() {
    for role in [Role::Follower, Role::Candidate, Role::Leader] {
        let mut net = Network::of_size(3);
        if role != Role::Follower {
            tick_until_role_changes(net.get(1));
        }
        if role == Role::Leader {
            net.settle();
        }
        assert_eq!(net.get(1).role(), role);
        let r = net.get(1);
        let term = r.term() + 5;
        r.step(msg(
            2,
            1,
            term,
            MessageBody::Heartbeat {
                commit: 0,
                read_round: 0,
            },
        ))
        .unwrap();
        assert_eq!(r.role(), Role::Follower, "from {role:?}");
        assert_eq!(r.term(), term);
        assert_eq!(r.leader(), Some(2));
    }
}

/// "If a server receives a request with a stale term number, it rejects the request."
#[test]
fn s5_1_stale_requests_are_rejected() {
    let mut r = node_with(config(1, &[1, 2, 3]), 3, &[1, 2]);
    let before = r.log().last_index();
    let stale = MessageBody::Append {
        prev_index: 2,
        prev_term: 2,
        entries: vec![entry(3, 2)],
        commit: 3,
    };
    r.step(msg(2, 1, 2, stale)).unwrap();
    assert_eq!(r.log().last_index(), before);
    assert_eq!(r.log().committed(), 0);
    let out = drain(&mut r);
    // The stale leader learns the newer term from the answer.
    assert!(
        out.all().iter().all(|m| m.to == 2 && m.term == 3),
        "{:?}",
        out.all()
    );
    r.step(msg(
        2,
        1,
        2,
        MessageBody::Vote {
            last_index: 9,
            last_term: 2,
            transfer: false,
        },
    ))
    .unwrap();
    assert_eq!(r.vote(), None);
}

// ---- §5.2 Leader election ---------------------------------------------------

/// "When servers start up, they begin as followers."
#[test]
fn s5_2_servers_start_as_followers() {
    let r = node(1, &[1, 2, 3]);
    assert_eq!(r.role(), Role::Follower);
    assert_eq!(r.term(), 0);
}

/// "Leaders send periodic heartbeats ... to all followers."
#[test]
fn s5_2_leader_sends_heartbeats() {
    let mut net = Network::of_size(3);
    net.elect(1);
    let r = net.get(1);
    drain(r);
    for _ in 0..HEARTBEAT {
        r.tick();
    }
    let out = drain(r);
    let mut to: Vec<_> = out
        .early
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .map(|m| m.to)
        .collect();
    to.sort_unstable();
    assert_eq!(to, [2, 3]);
}

/// "To begin an election, a follower increments its current term and
/// transitions to candidate state. It then votes for itself and issues
/// RequestVote RPCs in parallel to each of the other servers."
#[test]
fn s5_2_follower_times_out_and_campaigns() {
    let mut r = node(1, &[1, 2, 3]);
    tick_until_role_changes(&mut r);
    assert_eq!(r.role(), Role::Candidate);
    assert_eq!(r.term(), 1);
    assert_eq!(r.vote(), Some(1));
    let out = drain(&mut r);
    let mut to: Vec<_> = out
        .after_persist
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Vote { .. }) && m.term == 1)
        .map(|m| m.to)
        .collect();
    to.sort_unstable();
    assert_eq!(to, [2, 3]);
    assert!(
        out.early.is_empty(),
        "vote requests carry our vote: only after it is durable"
    );
    assert_eq!(out.hard_states.last().unwrap().vote, Some(1));
}

/// "A candidate wins an election if it receives votes from a majority of the
/// servers"; with a majority of rejections it gives up.
#[test]
fn s5_2_election_is_decided_by_a_majority() {
    // (cluster size, granting voters, expected role)
    let cases: &[(u64, &[u64], Role)] = &[
        (1, &[], Role::Leader),
        (3, &[2], Role::Leader),
        (3, &[], Role::Candidate),
        (5, &[2, 3], Role::Leader),
        (5, &[2], Role::Candidate),
    ];
    for &(n, granting, want) in cases {
        let voters: Vec<u64> = (1..=n).collect();
        let mut r = node(1, &voters);
        tick_until_role_changes(&mut r);
        // The candidate's own vote counts once durable.
        drain(&mut r);
        for &v in granting {
            r.step(msg(
                v,
                1,
                r.term(),
                MessageBody::VoteResponse { granted: true },
            ))
            .unwrap();
        }
        assert_eq!(r.role(), want, "n={n} granted by {granting:?}");
    }
    let mut r = node(1, &[1, 2, 3]);
    tick_until_role_changes(&mut r);
    for v in [2, 3] {
        r.step(msg(v, 1, 1, MessageBody::VoteResponse { granted: false }))
            .unwrap();
    }
    assert_eq!(
        r.role(),
        Role::Follower,
        "a majority of rejections ends the campaign"
    );
}

/// "Each server will vote for at most one candidate in a given term, on a
/// first-come-first-served basis."
#[test]
fn s5_2_one_vote_per_term_first_come_first_served() {
    let mut r = node(1, &[1, 2, 3]);
    r.step(msg(
        2,
        1,
        1,
        MessageBody::Vote {
            last_index: 0,
            last_term: 0,
            transfer: false,
        },
    ))
    .unwrap();
    r.step(msg(
        3,
        1,
        1,
        MessageBody::Vote {
            last_index: 0,
            last_term: 0,
            transfer: false,
        },
    ))
    .unwrap();
    r.step(msg(
        2,
        1,
        1,
        MessageBody::Vote {
            last_index: 0,
            last_term: 0,
            transfer: false,
        },
    ))
    .unwrap();
    let out = drain(&mut r);
    let answers: Vec<_> = out
        .after_persist
        .iter()
        .map(|m| {
            (
                m.to,
                matches!(m.body, MessageBody::VoteResponse { granted: true }),
            )
        })
        .collect();
    assert_eq!(answers, [(2, true), (3, false), (2, true)]);
    assert_eq!(r.vote(), Some(2));
    assert!(
        out.early.is_empty(),
        "a vote never goes out before it is durable"
    );
}

/// "If the AppendEntries RPC is from a leader whose term is at least as large
/// as the candidate's current term, then the candidate ... returns to follower state."
#[test]
fn s5_2_candidate_yields_to_a_leader_of_its_term() {
    for delta in [0, 1] {
        let mut r = node(1, &[1, 2, 3]);
        tick_until_role_changes(&mut r);
        let term = r.term() + delta;
        r.step(msg(
            2,
            1,
            term,
            MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![],
                commit: 0,
            },
        ))
        .unwrap();
        assert_eq!(r.role(), Role::Follower);
        assert_eq!(r.leader(), Some(2));
        assert_eq!(r.term(), term);
    }
}

/// "Raft uses randomized election timeouts ... chosen randomly from a fixed
/// interval": timeouts fall in [election, 2 * election) and differ between seeds.
#[test]
fn s5_2_election_timeouts_are_randomized() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let mut cfg = config(1, &[1, 2, 3]);
        cfg.seed = seed;
        let mut r = kythira_raft::Raft::new(cfg, Default::default()).unwrap();
        let mut ticks = 0;
        while r.role() == Role::Follower {
            r.tick();
            ticks += 1;
        }
        assert!((ELECTION..2 * ELECTION).contains(&ticks), "timeout {ticks}");
        seen.insert(ticks);
    }
    assert!(
        seen.len() > ELECTION as usize / 2,
        "timeouts spread: {seen:?}"
    );
}

/// Split votes resolve: a cluster always elects exactly one leader.
#[test]
fn s5_2_cluster_elects_one_leader() {
    let mut net = Network::of_size(5);
    net.tick_all(3 * ELECTION);
    let leaders: Vec<_> = net
        .nodes
        .values()
        .filter(|r| r.role() == Role::Leader)
        .collect();
    assert_eq!(leaders.len(), 1);
    let term = leaders[0].term();
    assert!(net.nodes.values().all(|r| r.term() == term));
}

// ---- §5.3 Log replication ---------------------------------------------------

/// "The leader appends the command to its log as a new entry, then issues
/// AppendEntries RPCs in parallel to each of the other servers."
#[test]
fn s5_3_leader_replicates_proposals() {
    let mut net = Network::of_size(3);
    net.elect(1);
    let r = net.get(1);
    let p = r.propose(Bytes::from_static(b"x")).unwrap();
    assert_eq!((p.index, p.term), (2, 1), "after the election no-op");
    let out = drain(r);
    let appends: Vec<_> = out
        .early
        .iter()
        .filter_map(|m| match &m.body {
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                ..
            } => Some((
                m.to,
                *prev_index,
                *prev_term,
                entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(appends, [(2, 1, 1, vec![2]), (3, 1, 1, vec![2])]);
    assert_eq!(
        out.persisted.iter().map(|e| e.index).collect::<Vec<_>>(),
        [2]
    );
}

/// "A log entry is committed once the leader that created the entry has
/// replicated it on a majority of the servers"; committed entries are applied
/// everywhere, in order, once.
#[test]
fn s5_3_entries_commit_on_a_majority_and_apply_everywhere_once() {
    let mut net = Network::of_size(5);
    net.elect(1);
    net.isolate(4);
    net.isolate(5);
    for i in 0..3u8 {
        net.get(1).propose(Bytes::from(vec![i])).unwrap();
    }
    net.settle();
    assert_eq!(
        net.get(1).log().committed(),
        4,
        "leader + 2 of 5 is a majority"
    );
    net.heal();
    net.tick_all(2);
    for id in 1..=5 {
        let applied: Vec<_> = net.applied[&id].iter().map(|e| (e.index, e.kind)).collect();
        assert_eq!(
            applied,
            [
                (1, EntryKind::Noop),
                (2, EntryKind::Normal),
                (3, EntryKind::Normal),
                (4, EntryKind::Normal)
            ],
            "node {id}"
        );
    }
}

/// Without a majority nothing commits.
#[test]
fn s5_3_no_commit_without_a_majority() {
    let mut net = Network::of_size(5);
    net.elect(1);
    net.isolate(3);
    net.isolate(4);
    net.isolate(5);
    let p = net.get(1).propose(Bytes::from_static(b"x")).unwrap();
    net.settle();
    assert!(net.get(1).log().committed() < p.index);
}

/// "When sending an AppendEntries RPC, the leader includes the index and term
/// of the entry in its log that immediately precedes the new entries. If the
/// follower does not find an entry in its log with the same index and term,
/// then it refuses the new entries."
#[test]
fn s5_3_consistency_check() {
    let mut r = node_with(config(1, &[1, 2, 3]), 2, &[1, 2]);
    // (prev_index, prev_term, accepted)
    for (prev_index, prev_term, accepted) in [
        (0, 0, true),
        (1, 1, true),
        (2, 2, true),
        (2, 1, false),
        (3, 2, false),
    ] {
        r.step(msg(
            2,
            1,
            2,
            MessageBody::Append {
                prev_index,
                prev_term,
                entries: vec![],
                commit: 0,
            },
        ))
        .unwrap();
        let out = drain(&mut r);
        let [m] = out.after_persist.as_slice() else {
            panic!("one answer: {out:?}")
        };
        let got = matches!(
            m.body,
            MessageBody::AppendResponse(AppendOutcome::Accepted { .. })
        );
        assert_eq!(got, accepted, "prev ({prev_index}, {prev_term})");
    }
}

/// "If an existing entry conflicts with a new one (same index but different
/// terms), delete the existing entry and all that follow it"; entries that
/// match are kept.
#[test]
fn s5_3_follower_replaces_only_the_conflicting_suffix() {
    // (existing terms, prev_index, prev_term, new entries (index, term), result)
    /// Existing terms, prev index, prev term, new (index, term) entries, resulting terms.
    type Case<'a> = (&'a [u64], u64, u64, &'a [(u64, u64)], &'a [u64]);
    let cases: &[Case] = &[
        (&[1, 2], 2, 2, &[(3, 3)], &[1, 2, 3]),
        (&[1, 2], 1, 1, &[(2, 3), (3, 3)], &[1, 3, 3]),
        (&[1, 2, 2], 0, 0, &[(1, 1)], &[1, 2, 2]),
        (&[1, 2, 2], 0, 0, &[(1, 1), (2, 3)], &[1, 3]),
    ];
    for &(existing, prev_index, prev_term, new, want) in cases {
        let mut r = node_with(config(1, &[1, 2, 3]), 3, existing);
        let entries = new.iter().map(|&(i, t)| entry(i, t)).collect();
        r.step(msg(
            2,
            1,
            3,
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit: 0,
            },
        ))
        .unwrap();
        let out = drain(&mut r);
        let log = r.log();
        let terms: Vec<_> = log
            .entries(1, log.last_index())
            .iter()
            .map(|e| e.term)
            .collect();
        assert_eq!(terms, want, "{existing:?} + {new:?}");
        if let Some(first) = out.persisted.first() {
            assert!(
                existing.get(first.index as usize - 1) != Some(&first.term),
                "rewrites start at the conflict"
            );
        }
    }
}

/// "If leaderCommit > commitIndex, set commitIndex = min(leaderCommit, index of
/// last new entry)."
#[test]
fn s5_3_follower_commits_what_the_leader_committed() {
    let mut r = node_with(config(1, &[1, 2, 3]), 1, &[1, 1, 1]);
    let append = |prev_index, entries, commit| {
        msg(
            2,
            1,
            1,
            MessageBody::Append {
                prev_index,
                prev_term: 1,
                entries,
                commit,
            },
        )
    };
    r.step(append(1, vec![], 5)).unwrap();
    assert_eq!(
        r.log().committed(),
        1,
        "only up to the last entry known to match"
    );
    r.step(append(3, vec![entry(4, 1)], 3)).unwrap();
    assert_eq!(r.log().committed(), 3);
    let applied: Vec<_> = drain(&mut r).committed.iter().map(|e| e.index).collect();
    assert_eq!(applied, [1, 2, 3]);
}

/// Figure 7: whatever the follower's log (a)–(f), the leader brings it in line
/// with its own, overwriting only uncommitted entries.
#[test]
fn s5_3_figure_7_leader_repairs_every_follower_log() {
    let leader_log: &[u64] = &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
    let followers: &[&[u64]] = &[
        &[1, 1, 1, 4, 4, 5, 5, 6, 6],
        &[1, 1, 1, 4],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
        &[1, 1, 1, 4, 4, 4, 4],
        &[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
    ];
    for (i, follower) in followers.iter().enumerate() {
        let voters = [1, 2, 3];
        let mut leader = node_with(config(1, &voters), 7, leader_log);
        let mut nodes = vec![];
        // Node 3 is an empty, up-to-date-enough voter so the leader can win.
        let mut c3 = config(3, &voters);
        c3.seed = 99;
        nodes.push(node_with(c3, 7, &[]));
        nodes.push(node_with(config(2, &voters), 7, follower));
        tick_until_role_changes(&mut leader);
        nodes.push(leader);
        let mut net = Network::new(nodes);
        net.settle();
        assert_eq!(net.get(1).role(), Role::Leader, "case {i}");
        net.tick_all(3);
        let mut want = leader_log.to_vec();
        want.push(8);
        assert_eq!(
            net.log_terms(2),
            want,
            "follower ({})",
            (b'a' + i as u8) as char
        );
    }
}

// ---- §5.4 Safety ---------------------------------------------------------

/// §5.4.1: "the voter denies its vote if its own log is more up-to-date than
/// that of the candidate."
#[test]
fn s5_4_1_votes_only_for_up_to_date_logs() {
    // voter log [1, 1, 2]; (candidate last_index, last_term, granted)
    for (last_index, last_term, granted) in [
        (3, 2, true),
        (4, 2, true),
        (2, 2, false),
        (9, 1, false),
        (1, 3, true),
        (0, 0, false),
    ] {
        let mut r = node_with(config(1, &[1, 2, 3]), 2, &[1, 1, 2]);
        r.step(msg(
            2,
            1,
            3,
            MessageBody::Vote {
                last_index,
                last_term,
                transfer: false,
            },
        ))
        .unwrap();
        let out = drain(&mut r);
        let got = out
            .after_persist
            .iter()
            .any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true }));
        assert_eq!(got, granted, "candidate ({last_index}, {last_term})");
    }
}

/// §5.4.2 / figure 8: "Raft never commits log entries from previous terms by
/// counting replicas"; once an entry of the current term commits, the earlier
/// ones commit with it.
#[test]
fn s5_4_2_previous_term_entries_commit_only_with_a_current_term_entry() {
    let voters = [1, 2, 3];
    let mut r = node_with(config(1, &voters), 2, &[1, 2]);
    tick_until_role_changes(&mut r);
    r.step(msg(2, 1, 3, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    assert_eq!(r.role(), Role::Leader);
    drain(&mut r);
    // Follower 2 stores the term-2 entry but not yet the no-op of term 3.
    r.step(msg(
        2,
        1,
        3,
        MessageBody::AppendResponse(AppendOutcome::Accepted { last_index: 2 }),
    ))
    .unwrap();
    drain(&mut r);
    assert_eq!(
        r.log().committed(),
        0,
        "a quorum holds index 2, but it is of term 2"
    );
    r.step(msg(
        2,
        1,
        3,
        MessageBody::AppendResponse(AppendOutcome::Accepted { last_index: 3 }),
    ))
    .unwrap();
    assert_eq!(r.log().committed(), 3);
    let applied: Vec<_> = drain(&mut r)
        .committed
        .iter()
        .map(|e| (e.index, e.term))
        .collect();
    assert_eq!(applied, [(1, 1), (2, 2), (3, 3)]);
}

/// §5.4.3 leader completeness in action: after the leader changes, every
/// committed entry survives in the new leader's log.
#[test]
fn s5_4_3_committed_entries_survive_leader_changes() {
    let mut net = Network::of_size(3);
    net.elect(1);
    net.get(1).propose(Bytes::from_static(b"a")).unwrap();
    net.settle();
    let committed = net.get(1).log().committed();
    net.isolate(1);
    net.elect(2);
    assert_eq!(net.get(2).role(), Role::Leader);
    assert!(net.get(2).log().last_index() > committed);
    assert_eq!(
        net.log_terms(2)[..committed as usize],
        net.log_terms(1)[..committed as usize]
    );
    net.heal();
    net.tick_all(2);
    assert_eq!(net.get(1).role(), Role::Follower);
    assert_eq!(net.log_terms(1), net.log_terms(2));
}

// ---- §5.6 / §8 / thesis §6.4, §9.6: timing, clients, extensions --------------

/// Thesis §6.4: ReadIndex returns the commit index once a quorum confirms
/// leadership; concurrent reads share one round of heartbeats.
#[test]
fn read_index_is_confirmed_by_a_quorum_and_batched() {
    let mut net = Network::of_size(3);
    net.elect(1);
    net.get(1).propose(Bytes::from_static(b"a")).unwrap();
    net.settle();
    let r = net.get(1);
    r.read_index(7).unwrap();
    let first = drain(r);
    let round_heartbeats = |o: &Output| {
        o.early
            .iter()
            .filter(
                |m| matches!(m.body, MessageBody::Heartbeat { read_round, .. } if read_round > 0),
            )
            .count()
    };
    assert_eq!(round_heartbeats(&first), 2, "one round to both followers");
    // Reads arriving while that round is in flight wait for one shared round.
    for ctx in 8..20 {
        r.read_index(ctx).unwrap();
    }
    assert_eq!(round_heartbeats(&drain(r)), 0);
    for m in first.early {
        net.get(m.to).step(m).unwrap();
    }
    net.settle();
    let reads = &net.reads[&1];
    assert_eq!(
        reads.iter().map(|r| r.ctx).collect::<Vec<_>>(),
        (7..20).collect::<Vec<_>>()
    );
    assert!(reads.iter().all(|r| r.index == 2));
    // A follower forwards the read to its leader (follower reads).
    net.get(2).read_index(1).unwrap();
    let forwarded = drain(net.get(2));
    assert!(
        forwarded
            .early
            .iter()
            .any(|m| m.to == 1 && m.body == MessageBody::ReadIndexRequest { ctx: 1 })
    );
}

/// A leader cut off from the quorum cannot confirm reads, and drops them when
/// it steps down (check-quorum).
#[test]
fn read_index_needs_a_quorum_and_fails_on_step_down() {
    let voters = [1, 2, 3];
    let mut net = Network::new(voters.iter().map(|&id| {
        let mut c = config(id, &voters);
        c.check_quorum = true;
        kythira_raft::Raft::new(c, Default::default()).unwrap()
    }));
    net.elect(1);
    net.isolate(1);
    net.get(1).read_index(5).unwrap();
    net.settle();
    assert!(net.reads[&1].is_empty());
    let r = net.get(1);
    let mut dropped = vec![];
    // The period in which the partition began still saw the quorum; the
    // next full election timeout without it ends the leadership.
    for _ in 0..2 * ELECTION {
        r.tick();
        dropped.extend(drain(r).dropped_reads);
    }
    assert_eq!(
        r.role(),
        Role::Follower,
        "check-quorum: no quorum heard within an election timeout"
    );
    assert_eq!(dropped, [5]);
}

/// Thesis §9.6: with pre-vote, a node that was partitioned away does not
/// raise its term and depose a working leader when it returns.
#[test]
fn pre_vote_keeps_a_rejoining_node_from_disrupting() {
    let voters = [1, 2, 3];
    let mut net = Network::new(voters.iter().map(|&id| {
        let mut c = config(id, &voters);
        c.pre_vote = true;
        c.check_quorum = true;
        kythira_raft::Raft::new(c, Default::default()).unwrap()
    }));
    net.elect(1);
    let term = net.get(1).term();
    net.isolate(3);
    for _ in 0..5 * ELECTION {
        net.get(3).tick();
        net.settle();
    }
    assert_eq!(net.get(3).role(), Role::PreCandidate);
    assert_eq!(net.get(3).term(), term, "pre-votes never raise the term");
    net.heal();
    net.tick_all(2 * ELECTION);
    assert_eq!(net.leader(), Some(1));
    assert_eq!(net.get(1).term(), term);
}

/// Check-quorum lease: a node that heard from its leader within the minimum
/// election timeout ignores vote requests, even of higher terms.
#[test]
fn vote_requests_are_ignored_during_the_leader_lease() {
    let mut c = config(1, &[1, 2, 3]);
    c.check_quorum = true;
    let mut r = kythira_raft::Raft::new(c, Default::default()).unwrap();
    r.step(msg(
        2,
        1,
        1,
        MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
        },
    ))
    .unwrap();
    r.step(msg(
        3,
        1,
        5,
        MessageBody::Vote {
            last_index: 9,
            last_term: 4,
            transfer: false,
        },
    ))
    .unwrap();
    assert_eq!((r.term(), r.vote()), (1, None));
    for _ in 0..ELECTION {
        r.tick();
        if r.role() != Role::Follower {
            break;
        }
    }
    let mut r2 = {
        let mut c = config(1, &[1, 2, 3]);
        c.check_quorum = true;
        kythira_raft::Raft::new(c, Default::default()).unwrap()
    };
    r2.step(msg(
        3,
        1,
        5,
        MessageBody::Vote {
            last_index: 9,
            last_term: 4,
            transfer: false,
        },
    ))
    .unwrap();
    assert_eq!(
        (r2.term(), r2.vote()),
        (5, Some(3)),
        "without a known leader the vote is granted"
    );
}

/// Replication is batched and pipelined within the configured limits.
#[test]
fn appends_respect_batch_and_inflight_limits() {
    let mut leader = pipelining_leader();
    let out = drain(&mut leader);
    let sizes: Vec<_> = out
        .early
        .iter()
        .filter_map(|m| match &m.body {
            MessageBody::Append { entries, .. } => Some(entries.len()),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, [3, 3], "two messages of three entries in flight");
    leader
        .step(msg(
            2,
            1,
            1,
            MessageBody::AppendResponse(AppendOutcome::Accepted { last_index: 4 }),
        ))
        .unwrap();
    let out = drain(&mut leader);
    let next: Vec<_> = out
        .early
        .iter()
        .filter_map(|m| match &m.body {
            MessageBody::Append {
                prev_index,
                entries,
                ..
            } => Some((*prev_index, entries.len())),
            _ => None,
        })
        .collect();
    assert_eq!(next, [(7, 3)], "an acknowledgement opens one slot");
}

/// Fast backtracking: one rejection with a conflict hint skips a whole term
/// of divergent entries.
#[test]
fn rejection_hint_skips_a_conflicting_term() {
    let voters = [1, 2, 3];
    let mut leader = node_with(config(1, &voters), 5, &[1, 1, 4, 4, 4, 4]);
    tick_until_role_changes(&mut leader);
    leader
        .step(msg(2, 1, 6, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    drain(&mut leader);
    // Follower 2 has [1, 1, 2, 2, 2, 2, 2, 2]: rejects prev (6, 4) with hint (6, 2).
    let reject = AppendOutcome::Rejected {
        prev_index: 6,
        hint_index: 6,
        hint_term: 2,
    };
    leader
        .step(msg(2, 1, 6, MessageBody::AppendResponse(reject)))
        .unwrap();
    let out = drain(&mut leader);
    let probe = out
        .early
        .iter()
        .find_map(|m| match &m.body {
            MessageBody::Append { prev_index, .. } if m.to == 2 => Some(*prev_index),
            _ => None,
        })
        .unwrap();
    assert_eq!(probe, 2, "leader's last entry of term <= 2 is index 2");
}

/// Bad input from the network is refused with an error and changes nothing.
#[test]
fn malformed_messages_are_refused() {
    let mut r = node(1, &[1, 2, 3]);
    let gap = MessageBody::Append {
        prev_index: 0,
        prev_term: 0,
        entries: vec![entry(2, 1)],
        commit: 0,
    };
    assert!(r.step(msg(2, 1, 1, gap)).is_err());
    // From "nobody" or from itself. (Any other sender may be a member this
    // node has not heard of yet.)
    for from in [0, 1] {
        assert!(
            r.step(msg(
                from,
                1,
                1,
                MessageBody::Heartbeat {
                    commit: 0,
                    read_round: 0
                }
            ))
            .is_err()
        );
    }
    let bad_config = MessageBody::Append {
        prev_index: 0,
        prev_term: 0,
        entries: vec![kythira_raft::Entry {
            kind: EntryKind::Config,
            data: Bytes::from_static(b"junk"),
            ..entry(1, 1)
        }],
        commit: 0,
    };
    assert!(r.step(msg(2, 1, 1, bad_config)).is_err());
    assert!(
        r.step(msg(
            2,
            3,
            1,
            MessageBody::Heartbeat {
                commit: 0,
                read_round: 0
            }
        ))
        .is_err()
    );
    assert_eq!(r.term(), 0);
    assert_eq!(r.log().last_index(), 0);
}

/// The `Ready` contract: a leader's appends may leave before its own write is
/// durable; a follower's acknowledgement and a vote wait for theirs, and the
/// leader counts its own copy only after `advance`.
#[test]
fn ready_separates_messages_by_durability() {
    let voters = [1, 2, 3];
    let mut leader = node(1, &voters);
    tick_until_role_changes(&mut leader);
    leader
        .step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    drain(&mut leader);
    for f in [2, 3] {
        let ack = AppendOutcome::Accepted { last_index: 1 };
        leader
            .step(msg(f, 1, 1, MessageBody::AppendResponse(ack)))
            .unwrap();
    }
    drain(&mut leader);
    leader.propose(Bytes::from_static(b"x")).unwrap();
    let rd = leader.ready().unwrap();
    assert!(
        rd.messages
            .iter()
            .all(|m| matches!(m.body, MessageBody::Append { .. }))
    );
    assert_eq!(rd.messages.len(), 2);
    assert!(rd.persisted_messages.is_empty());
    // Both followers acknowledge everything before the leader's write is done.
    for f in [2, 3] {
        leader
            .step(msg(
                f,
                1,
                1,
                MessageBody::AppendResponse(AppendOutcome::Accepted { last_index: 2 }),
            ))
            .unwrap();
    }
    assert_eq!(
        leader.log().committed(),
        2,
        "two followers are a quorum without the leader"
    );
    leader.advance();

    let mut follower = node(2, &voters);
    let append = MessageBody::Append {
        prev_index: 0,
        prev_term: 0,
        entries: vec![entry(1, 1)],
        commit: 0,
    };
    follower.step(msg(1, 2, 1, append)).unwrap();
    let rd = follower.ready().unwrap();
    assert!(rd.messages.is_empty());
    assert_eq!(rd.entries.len(), 1);
    assert!(matches!(
        rd.persisted_messages.as_slice(),
        [m] if matches!(m.body, MessageBody::AppendResponse(AppendOutcome::Accepted { last_index: 1 }))
    ));
    assert!(follower.ready().is_none(), "one Ready at a time");
    follower.advance();
}

/// Answers about entries a leader never sent are refused, whatever their hints.
#[test]
fn leader_refuses_answers_about_unknown_entries() {
    let voters = [1, 2, 3];
    let mut leader = node(1, &voters);
    tick_until_role_changes(&mut leader);
    leader
        .step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    drain(&mut leader);
    let bogus = [
        AppendOutcome::Accepted { last_index: 9 },
        AppendOutcome::Rejected {
            prev_index: u64::MAX,
            hint_index: u64::MAX,
            hint_term: 0,
        },
    ];
    for outcome in bogus {
        assert!(
            leader
                .step(msg(2, 1, 1, MessageBody::AppendResponse(outcome)))
                .is_err()
        );
    }
    // A current rejection with an absurd hint is clamped, not trusted.
    let reject = AppendOutcome::Rejected {
        prev_index: 0,
        hint_index: u64::MAX,
        hint_term: 0,
    };
    leader
        .step(msg(3, 1, 1, MessageBody::AppendResponse(reject)))
        .unwrap();
    drain(&mut leader);
    assert_eq!(leader.log().committed(), 0);
    assert_eq!(leader.role(), Role::Leader);
    let overflow = MessageBody::Append {
        prev_index: u64::MAX,
        prev_term: 1,
        entries: vec![entry(0, 1)],
        commit: 0,
    };
    assert!(node(2, &voters).step(msg(1, 2, 1, overflow)).is_err());
}
