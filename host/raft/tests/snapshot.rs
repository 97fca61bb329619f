//! Raft §7, "Log compaction", against the core's public API: snapshots
//! taken by the driver and the log compacted behind them, restarting from a
//! snapshot, and InstallSnapshot for followers whose next entry is gone.
//! In the style of `paper.rs`.

mod common;

use common::*;
use kythira_raft::{
    AppendOutcome, Bytes, CompactError, Driver, HardState, Index, Membership, Message, MessageBody,
    NodeId, Persisted, Raft, ReplicationState, RestoreError, Role, SnapshotMeta, Term, Write,
};

fn members(voters: &[NodeId], learners: &[NodeId]) -> Membership {
    Membership::new(voters.iter().copied(), learners.iter().copied()).unwrap()
}

fn meta(index: Index, term: Term, membership: Membership) -> SnapshotMeta {
    SnapshotMeta {
        index,
        term,
        membership,
    }
}

fn snapshot_msg(from: NodeId, to: NodeId, term: Term, meta: SnapshotMeta) -> Message {
    msg(from, to, term, MessageBody::Snapshot { meta })
}

fn accepted(from: NodeId, to: NodeId, term: Term, last_index: Index) -> Message {
    msg(
        from,
        to,
        term,
        MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }),
    )
}

/// Node `id` of {1, 2, 3} restarted in `term` with a log of `terms`,
/// `commit` committed and already handed out for application.
fn follower(id: NodeId, term: Term, terms: &[Term], commit: Index) -> Raft {
    let mut r = Raft::new(
        config(id, &[1, 2, 3]),
        Persisted {
            snapshot: None,
            hard_state: HardState {
                term,
                vote: None,
                commit,
            },
            entries: log_of(terms),
            applied: 0,
        },
    )
    .unwrap();
    let out = drain(&mut r);
    assert_eq!(out.committed.len() as Index, commit);
    r
}

/// Every acknowledgement in `msgs`: (to, term, last index).
fn acks(msgs: &[Message]) -> Vec<(NodeId, Term, Index)> {
    msgs.iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }) => {
                Some((m.to, m.term, last_index))
            }
            _ => None,
        })
        .collect()
}

fn indices(entries: &[kythira_raft::Entry]) -> Vec<Index> {
    entries.iter().map(|e| e.index).collect()
}

fn is_snapshot(m: &Message) -> bool {
    matches!(m.body, MessageBody::Snapshot { .. })
}

fn snapshots_to(trace: &[Message], to: NodeId) -> usize {
    trace
        .iter()
        .filter(|m| m.to == to && is_snapshot(m))
        .count()
}

/// Leader 1 of {1, 2, 3} in term 1; node 3 was cut off after the no-op
/// while five more entries committed with node 2, and the leader compacted
/// its whole log (up to 6) behind a snapshot. Every link works again, and
/// nothing is in flight.
fn lagging_cluster() -> (Network, SnapshotMeta) {
    let mut net = Network::of_size(3);
    net.elect(1);
    net.tick(1, HEARTBEAT);
    assert_eq!(net.get(3).log().committed(), 1);
    net.isolate(3);
    for i in 0..5u8 {
        net.get(1).propose(Bytes::from(vec![i])).unwrap();
    }
    net.settle();
    let leader = net.get(1);
    assert_eq!((leader.log().committed(), leader.log().applied()), (6, 6));
    let meta = compact_at(leader, 6);
    assert_eq!(meta, self::meta(6, 1, members(&[1, 2, 3], &[])));
    net.heal();
    (net, meta)
}

// ---- §7 Log compaction: snapshots and the log behind them -----------------

/// "Each server takes snapshots independently, covering just the committed
/// entries in its log": a snapshot stands for an index that is applied
/// (and so durable) and not compacted already.
#[test]
fn s7_snapshot_meta_needs_an_applied_uncompacted_index() {
    let mut r = Raft::new(
        config(1, &[1, 2, 3]),
        Persisted {
            snapshot: None,
            hard_state: HardState {
                term: 2,
                vote: None,
                commit: 3,
            },
            entries: log_of(&[1, 1, 2, 2, 2]),
            applied: 0,
        },
    )
    .unwrap();
    // Committed but not handed out for application yet.
    assert_eq!(
        r.snapshot_meta(2),
        Err(CompactError::OutOfRange {
            index: 2,
            snapshot: 0,
            applied: 0
        })
    );
    assert_eq!(indices(&drain(&mut r).committed), [1, 2, 3]);
    assert_eq!(
        r.snapshot_meta(4),
        Err(CompactError::OutOfRange {
            index: 4,
            snapshot: 0,
            applied: 3
        }),
        "not committed, not applied"
    );
    assert!(r.snapshot_meta(0).is_err(), "index 0 stands for nothing");
    assert_eq!(r.snapshot_meta(3), Ok(meta(3, 2, members(&[1, 2, 3], &[]))));
    assert_eq!(r.snapshot_meta(2).unwrap().term, 1);
    let m = compact_at(&mut r, 3);
    for index in [1, 3] {
        assert_eq!(
            r.snapshot_meta(index),
            Err(CompactError::OutOfRange {
                index,
                snapshot: 3,
                applied: 3
            }),
            "compacted already"
        );
    }
    assert_eq!(
        r.compact(m),
        Err(CompactError::OutOfRange {
            index: 3,
            snapshot: 3,
            applied: 3
        })
    );

    // A leader's own entry that is not durable yet cannot be snapshotted,
    // even once the write is handed out: only after `advance` (and the
    // commit and application that follow) can it be.
    let mut r = node(1, &[1]);
    tick_until_role_changes(&mut r);
    drain(&mut r);
    assert_eq!(r.role(), Role::Leader, "once its own vote is durable");
    drain(&mut r);
    let p = r.propose(Bytes::from_static(b"x")).unwrap();
    assert!(r.snapshot_meta(p.index).is_err(), "unstable");
    let rd = r.ready().unwrap();
    assert_eq!(indices(&rd.entries), [p.index]);
    assert!(r.snapshot_meta(p.index).is_err(), "being written");
    r.advance();
    assert_eq!(r.log().committed(), p.index);
    assert!(r.snapshot_meta(p.index).is_err(), "committed, not applied");
    assert_eq!(indices(&drain(&mut r).committed), [p.index]);
    assert_eq!(r.snapshot_meta(p.index).unwrap().term, p.term);
}

/// `compact` takes only what `snapshot_meta` describes; refusals change
/// nothing.
#[test]
fn s7_compact_refuses_metadata_that_is_not_the_logs() {
    let mut r = follower(1, 2, &[1, 1, 2, 2, 2], 3);
    let right = r.snapshot_meta(3).unwrap();
    let wrong_term = SnapshotMeta {
        term: 1,
        ..right.clone()
    };
    let wrong_members = SnapshotMeta {
        membership: members(&[1, 2], &[3]),
        ..right.clone()
    };
    let unapplied = SnapshotMeta {
        index: 4,
        ..right.clone()
    };
    assert_eq!(
        r.compact(wrong_term),
        Err(CompactError::Mismatch { index: 3 })
    );
    assert_eq!(
        r.compact(wrong_members),
        Err(CompactError::Mismatch { index: 3 })
    );
    assert!(matches!(
        r.compact(unapplied),
        Err(CompactError::OutOfRange { index: 4, .. })
    ));
    assert_eq!(r.log().first_index(), 1, "nothing compacted");
    assert_eq!(r.snapshot(), None);
    assert_eq!(r.compact(right.clone()), Ok(()));
    assert_eq!(r.snapshot(), Some(&right));
}

/// After compaction the log starts after the snapshot, but the snapshot's
/// last entry still answers the consistency check (the paper keeps "the
/// last included index and term" for exactly that).
#[test]
fn s7_compaction_keeps_the_term_of_the_last_included_entry() {
    let mut r = follower(1, 2, &[1, 1, 2, 2, 2], 3);
    let m = compact_at(&mut r, 3);
    let log = r.log();
    assert_eq!((log.snapshot_index(), log.first_index()), (3, 4));
    assert_eq!((log.last_index(), log.last_term()), (5, 2));
    assert_eq!(log.term(3), Some(2), "the last included term");
    assert_eq!(log.term(2), None);
    assert!(log.get(3).is_none());
    assert_eq!(indices(log.entries(1, 5)), [4, 5]);
    assert_eq!((log.committed(), log.applied()), (3, 3));
    assert_eq!(r.snapshot(), Some(&m));
    assert!(!r.has_ready(), "compaction itself asks for nothing");

    // The leader of term 2 appends after the snapshot's last entry: the
    // check at index 3 passes on the remembered term.
    r.step(msg(
        2,
        1,
        2,
        MessageBody::Append {
            prev_index: 3,
            prev_term: 2,
            entries: vec![entry(4, 2), entry(5, 2), entry(6, 2)],
            commit: 5,
        },
    ))
    .unwrap();
    let out = drain(&mut r);
    assert_eq!(acks(&out.after_persist), [(2, 2, 6)]);
    assert_eq!(indices(&out.persisted), [6]);
    assert_eq!(indices(&out.committed), [4, 5], "from after the snapshot");
    // A probe from inside the compacted prefix (committed) is answered
    // with the commit index, as for any committed prefix.
    r.step(msg(
        2,
        1,
        2,
        MessageBody::Append {
            prev_index: 1,
            prev_term: 1,
            entries: vec![entry(2, 1)],
            commit: 5,
        },
    ))
    .unwrap();
    assert_eq!(acks(&drain(&mut r).after_persist), [(2, 2, 5)]);
    assert_eq!(r.log().first_index(), 4);
}

/// The snapshot carries "the latest configuration as of the last included
/// index": the membership stays right when the configuration entry that
/// made it is compacted away, and a snapshot before that entry has the
/// older membership.
#[test]
fn s7_compaction_keeps_the_membership_of_compacted_configuration_entries() {
    let mut net = Network::of_size(3);
    net.elect(1);
    let target = net.get(1).membership().with_learner(4).unwrap();
    let change = net.get(1).propose_membership(target.clone()).unwrap();
    net.get(1).propose(Bytes::from_static(b"after")).unwrap();
    net.settle();
    assert_eq!(net.get(2).log().applied(), change.index + 1);

    // Node 2 snapshots before the configuration entry, then after it.
    let r = net.get(2);
    let before = compact_at(r, change.index - 1);
    assert_eq!(before.membership, members(&[1, 2, 3], &[]));
    assert_eq!(r.membership(), &target, "the entry is still in the log");
    let after = compact_at(r, change.index + 1);
    assert_eq!(after.membership, target);
    assert_eq!(r.log().first_index(), change.index + 2);
    assert_eq!(r.membership(), &target, "its entry is compacted away");
    assert!(r.membership().is_learner(4));

    // Restarted from that snapshot alone, node 2 has the same membership.
    let hs = r.hard_state();
    let restarted = Raft::new(
        config(2, &[1, 2, 3]),
        Persisted {
            snapshot: Some(after.clone()),
            hard_state: hs,
            entries: vec![],
            applied: after.index,
        },
    )
    .unwrap();
    assert_eq!(restarted.membership(), &target);
    assert_eq!(restarted.snapshot(), Some(&after));

    // The leader, compacted the same way, still replicates to the learner.
    let l = net.get(1);
    compact_at(l, change.index + 1);
    assert!(l.progress(4).is_some(), "the learner is still tracked");
    assert_eq!(l.membership(), &target);
}

// ---- §7 Restart from a snapshot -------------------------------------------

fn restart(
    snapshot: Option<SnapshotMeta>,
    term: Term,
    commit: Index,
    entries: Vec<kythira_raft::Entry>,
    applied: Index,
) -> Result<Raft, RestoreError> {
    Raft::new(
        config(1, &[1, 2, 3]),
        Persisted {
            snapshot,
            hard_state: HardState {
                term,
                vote: None,
                commit,
            },
            entries,
            applied,
        },
    )
}

/// A server restarts from its latest snapshot plus the entries after it:
/// the snapshot's membership (not the bootstrap one), everything up to the
/// snapshot committed and applied, and only the entries after it handed
/// out again.
#[test]
fn s7_restart_from_a_snapshot_and_a_log_suffix() {
    let snap = meta(5, 2, members(&[1, 2, 4], &[5]));
    let mut r = restart(Some(snap.clone()), 3, 0, log_from(6, &[2, 3, 3]), 0).unwrap();
    assert_eq!(r.membership(), &snap.membership);
    assert_eq!(r.snapshot(), Some(&snap));
    let log = r.log();
    assert_eq!(
        (log.first_index(), log.last_index(), log.last_term()),
        (6, 8, 3)
    );
    assert_eq!(log.term(5), Some(2));
    assert_eq!(
        (log.committed(), log.applied(), log.stable()),
        (5, 5, 8),
        "the state machine starts from the snapshot"
    );
    let out = drain(&mut r);
    assert!(out.committed.is_empty() && out.persisted.is_empty() && out.snapshots.is_empty());
    // Voter 4 of the snapshot's membership leads term 3.
    r.step(msg(
        4,
        1,
        3,
        MessageBody::Append {
            prev_index: 8,
            prev_term: 3,
            entries: vec![],
            commit: 7,
        },
    ))
    .unwrap();
    assert_eq!(indices(&drain(&mut r).committed), [6, 7]);

    // Campaigning asks the snapshot's voters, not the bootstrap ones.
    let mut r = restart(Some(snap.clone()), 3, 0, log_from(6, &[2, 3, 3]), 0).unwrap();
    tick_until_role_changes(&mut r);
    assert_eq!(r.role(), Role::Candidate);
    let mut asked: Vec<_> = drain(&mut r)
        .all()
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Vote { .. }))
        .map(|m| m.to)
        .collect();
    asked.sort_unstable();
    assert_eq!(asked, [2, 4]);

    // A persisted commit and applied index count from the snapshot on; an
    // applied index below it is the snapshot's.
    let mut r = restart(Some(snap.clone()), 3, 7, log_from(6, &[2, 3, 3]), 6).unwrap();
    assert_eq!(indices(&drain(&mut r).committed), [7]);
    let r = restart(Some(snap.clone()), 3, 2, log_from(6, &[2, 3, 3]), 2).unwrap();
    assert_eq!((r.log().committed(), r.log().applied()), (5, 5));
    // A snapshot alone, no suffix: the log ends at the snapshot.
    let r = restart(Some(snap.clone()), 3, 0, vec![], 0).unwrap();
    assert_eq!((r.log().last_index(), r.log().last_term()), (5, 2));
    assert_eq!(r.log().first_index(), 6);

    // A configuration entry in the suffix overrides the snapshot's.
    let mut entries = log_from(6, &[2, 3, 3]);
    let newer = members(&[1, 2, 4, 5], &[]);
    entries[1].kind = kythira_raft::EntryKind::Config;
    entries[1].data = newer.encode();
    let r = restart(Some(snap), 3, 0, entries, 0).unwrap();
    assert_eq!(r.membership(), &newer);
    assert_eq!(r.membership_index(), 7);
}

#[test]
fn s7_restart_refuses_an_inconsistent_snapshot() {
    let snap = |index, term| meta(index, term, members(&[1, 2, 3], &[]));
    let bad = |r: Result<Raft, RestoreError>| r.map(|_| ()).unwrap_err();
    assert_eq!(
        bad(restart(Some(snap(5, 4)), 3, 0, vec![], 0)),
        RestoreError::BadSnapshot,
        "a snapshot of a term the hard state never reached"
    );
    assert_eq!(
        bad(restart(Some(snap(0, 1)), 3, 0, vec![], 0)),
        RestoreError::BadSnapshot
    );
    let no_voters = meta(5, 2, members(&[], &[]));
    assert_eq!(
        bad(restart(Some(no_voters), 3, 0, vec![], 0)),
        RestoreError::BadSnapshot
    );
    assert!(matches!(
        bad(restart(Some(snap(5, 2)), 3, 0, log_from(5, &[2, 3]), 0)),
        RestoreError::BadEntry { index: 5, .. }
    ));
    assert!(matches!(
        bad(restart(Some(snap(5, 2)), 3, 0, log_from(7, &[2, 3]), 0)),
        RestoreError::BadEntry { index: 7, .. }
    ));
    assert!(matches!(
        bad(restart(Some(snap(5, 2)), 3, 0, log_from(6, &[1, 3]), 0)),
        RestoreError::BadEntry { index: 6, term: 1 }
    ));
    assert!(matches!(
        bad(restart(Some(snap(5, 2)), 3, 8, log_from(6, &[2, 3]), 0)),
        RestoreError::BadCommit {
            commit: 8,
            last: 7,
            ..
        }
    ));
    assert!(matches!(
        bad(restart(Some(snap(5, 2)), 3, 0, log_from(6, &[2, 3]), 8)),
        RestoreError::BadCommit {
            applied: 8,
            last: 7,
            ..
        }
    ));
    assert!(matches!(
        bad(restart(Some(snap(5, 2)), 2, 0, log_from(6, &[2, 3]), 0)),
        RestoreError::EntryFromFuture { .. }
    ));
    assert!(restart(Some(snap(5, 3)), 3, 0, log_from(6, &[3]), 0).is_ok());
}

// ---- §7 InstallSnapshot: the leader's side --------------------------------

/// "The leader uses a new RPC called InstallSnapshot to send snapshots to
/// followers that are too far behind": once a follower's next entry is
/// compacted away it is sent the snapshot, and nothing else but heartbeats
/// until it answers; its acceptance makes it replicate from after the
/// snapshot, and appends catch it up.
#[test]
fn s7_a_follower_behind_the_compacted_log_is_sent_the_snapshot() {
    let (mut net, snap) = lagging_cluster();
    net.hold_if(is_snapshot);
    let before = net.trace.len();
    net.tick(1, HEARTBEAT);
    assert_eq!(snapshots_to(&net.trace[before..], 3), 1);
    assert_eq!(
        net.held,
        [snapshot_msg(1, 3, 1, snap.clone())],
        "the latest snapshot"
    );
    assert_eq!(
        net.get(1).progress(3).unwrap().state,
        ReplicationState::Snapshot { index: 6 }
    );
    let sent_snapshot = net.trace.len();

    // Meanwhile the leader goes on: node 2 gets the new entries, node 3
    // heartbeats only (less than an election timeout passes).
    for i in 0..2u8 {
        net.get(1).propose(Bytes::from(vec![10 + i])).unwrap();
    }
    net.tick(1, ELECTION / 2);
    assert_eq!(net.get(2).log().last_index(), 8);
    let to_3: Vec<_> = net.trace[sent_snapshot..]
        .iter()
        .filter(|m| m.from == 1 && m.to == 3)
        .collect();
    assert!(!to_3.is_empty());
    assert!(
        to_3.iter()
            .all(|m| matches!(m.body, MessageBody::Heartbeat { commit: 1, .. })),
        "only heartbeats, carrying no commit past what node 3 holds: {to_3:?}"
    );
    assert_eq!(
        net.get(1).progress(3).unwrap().state,
        ReplicationState::Snapshot { index: 6 }
    );

    // The snapshot arrives: node 3 installs it and accepts; the leader
    // replicates the rest.
    net.release_held();
    assert_eq!(net.installed[&3], [snap]);
    let leader = net.get(1);
    let pr = leader.progress(3).unwrap();
    assert!(matches!(pr.state, ReplicationState::Replicate { .. }));
    assert_eq!(pr.matched, 8);
    let r3 = net.get(3);
    assert_eq!((r3.log().first_index(), r3.log().last_index()), (7, 8));
    assert_eq!(r3.log().committed(), 8);
    assert_eq!(net.log_terms(3), net.log_terms(1));
    assert_eq!(
        indices(&net.applied[&3]),
        [1, 7, 8],
        "the no-op before the cut, then what follows the snapshot"
    );
    assert_eq!(net.applied[&3][1..], net.applied[&1][6..]);
}

/// A server restarted from a snapshot remembers it: elected, it sends that
/// snapshot to followers whose logs stop before it.
#[test]
fn s7_a_leader_restarted_from_a_snapshot_sends_it() {
    let snap = meta(5, 1, members(&[1, 2, 3], &[]));
    let r1 = Raft::new(
        config(1, &[1, 2, 3]),
        Persisted {
            snapshot: Some(snap.clone()),
            hard_state: HardState {
                term: 1,
                vote: None,
                commit: 5,
            },
            entries: vec![],
            applied: 5,
        },
    )
    .unwrap();
    let mut net = Network::new([r1, node(2, &[1, 2, 3]), node(3, &[1, 2, 3])]);
    net.elect(1);
    assert_eq!(net.leader(), Some(1));
    for id in [2, 3] {
        assert_eq!(net.installed[&id], std::slice::from_ref(&snap));
        let r = net.get(id);
        assert_eq!(r.snapshot(), Some(&snap));
        assert_eq!((r.log().last_index(), r.log().committed()), (6, 6));
        assert_eq!(indices(&net.applied[&id]), [6]);
    }
}

/// A learner added after compaction starts from the snapshot, whose
/// membership does not have it yet; the configuration entry that follows
/// makes it a learner.
#[test]
fn s7_a_new_learner_starts_from_the_snapshot() {
    let mut net = Network::of_size(3);
    net.elect(1);
    for i in 0..3u8 {
        net.get(1).propose(Bytes::from(vec![i])).unwrap();
    }
    net.settle();
    let snap = compact_at(net.get(1), 4);
    net.add(node(4, &[1, 2, 3]));
    let target = net.get(1).membership().with_learner(4).unwrap();
    let p = net.get(1).propose_membership(target.clone()).unwrap();
    net.settle();
    assert_eq!(net.installed[&4], std::slice::from_ref(&snap));
    assert!(!snap.membership.contains(4));
    let r4 = net.get(4);
    assert_eq!(r4.membership(), &target);
    assert_eq!(
        (r4.log().last_index(), r4.log().committed()),
        (p.index, p.index)
    );
    assert_eq!(indices(&net.applied[&4]), [p.index]);
    assert!(matches!(
        net.get(1).progress(4).unwrap().state,
        ReplicationState::Replicate { .. }
    ));
}

/// The driver could not deliver the snapshot: the leader probes from the
/// follower's match again, which sends the snapshot anew at the next
/// heartbeat response. Delivered, it probes after the snapshot instead.
#[test]
fn s7_a_failed_snapshot_is_sent_again_at_the_next_probe() {
    let (mut net, snap) = lagging_cluster();
    net.drop_if(is_snapshot);
    net.tick(1, HEARTBEAT);
    assert_eq!(snapshots_to(&net.trace, 3), 1);
    net.get(1).report_snapshot(3, false);
    let pr = net.get(1).progress(3).unwrap();
    assert_eq!(pr.state, ReplicationState::Probe { paused: false });
    assert_eq!((pr.matched, pr.next), (1, 2));
    net.settle();
    assert_eq!(snapshots_to(&net.trace, 3), 1, "not before the next probe");
    net.tick(1, HEARTBEAT);
    assert_eq!(snapshots_to(&net.trace, 3), 2);
    assert_eq!(
        net.get(1).progress(3).unwrap().state,
        ReplicationState::Snapshot { index: 6 }
    );

    // Reported delivered (as if node 3 had it now): the next probe is an
    // append right after the snapshot.
    net.get(1).report_snapshot(3, true);
    let pr = net.get(1).progress(3).unwrap();
    assert_eq!(pr.state, ReplicationState::Probe { paused: false });
    assert_eq!(pr.next, snap.index + 1);
    // Only a report on a snapshot in progress counts.
    net.get(1).report_snapshot(3, false);
    net.get(1).report_snapshot(9, true);
    assert_eq!(net.get(1).progress(3).unwrap().next, snap.index + 1);
    let before = net.trace.len();
    net.tick(1, HEARTBEAT);
    let first = net.trace[before..]
        .iter()
        .find(|m| m.to == 3 && !matches!(m.body, MessageBody::Heartbeat { .. }))
        .expect("a probe");
    assert!(
        matches!(
            first.body,
            MessageBody::Append {
                prev_index: 6,
                prev_term: 1,
                ..
            }
        ),
        "{first:?}"
    );
}

/// The driver's report is lost: after an election timeout in which the
/// follower answers heartbeats and accepts nothing, the leader probes
/// again, which sends the snapshot again.
#[test]
fn s7_a_lost_snapshot_report_is_recovered_after_an_election_timeout() {
    let (mut net, snap) = lagging_cluster();
    net.drop_if(is_snapshot);
    net.tick(1, HEARTBEAT);
    assert_eq!(snapshots_to(&net.trace, 3), 1);
    net.tick(1, ELECTION - 1);
    assert_eq!(snapshots_to(&net.trace, 3), 1, "within an election timeout");
    assert_eq!(
        net.get(1).progress(3).unwrap().state,
        ReplicationState::Snapshot { index: 6 }
    );
    net.tick(1, 1);
    assert_eq!(snapshots_to(&net.trace, 3), 2, "after a whole one");
    // This time it arrives.
    net.heal();
    net.tick(1, ELECTION);
    assert_eq!(net.installed[&3], [snap]);
    assert_eq!(net.get(3).log().committed(), 6);
    assert!(matches!(
        net.get(1).progress(3).unwrap().state,
        ReplicationState::Replicate { .. }
    ));
}

/// An acceptance that does not reach the snapshot (a late answer to an
/// append sent before it) cannot end the snapshot's transfer: the follower
/// still needs entries the leader no longer has, and sending the snapshot a
/// second time would only stream it twice.
#[test]
fn s7_a_stale_acceptance_does_not_send_the_snapshot_twice() {
    let (mut net, snap) = lagging_cluster();
    net.hold_if(is_snapshot);
    net.tick(1, HEARTBEAT);
    assert_eq!(net.held.len(), 1);
    for last_index in [1, 0] {
        net.get(1).step(accepted(3, 1, 1, last_index)).unwrap();
        net.settle();
    }
    assert_eq!(net.held.len(), 1, "{:?}", net.held);
    assert_eq!(
        net.get(1).progress(3).unwrap().state,
        ReplicationState::Snapshot { index: 6 }
    );
    net.release_held();
    assert_eq!(net.installed[&3], [snap]);
    assert_eq!(net.get(3).log().committed(), 6);
}

// ---- §7 InstallSnapshot: the follower's side ------------------------------

/// "If the snapshot ... is not a prefix of the follower's log, the follower
/// discards its entire log; it is all superseded by the snapshot" (§7).
/// The install comes first in the next `Ready`, no entry it covers is
/// handed out for application, the membership becomes the snapshot's, and
/// the acceptance waits for the install to be durable. An acknowledgement
/// still waiting that claims entries past the snapshot is withdrawn: those
/// entries are gone.
#[test]
fn s7_a_snapshot_replaces_a_conflicting_uncommitted_log() {
    let mut r = follower(2, 2, &[1, 1, 2, 2, 2], 2);
    // Leader 1 of term 2 appends entry 6; its acknowledgement waits.
    r.step(msg(
        1,
        2,
        2,
        MessageBody::Append {
            prev_index: 5,
            prev_term: 2,
            entries: vec![entry(6, 2)],
            commit: 2,
        },
    ))
    .unwrap();
    // Leader 3 of term 3 committed different entries up to 4.
    let snap = meta(4, 3, members(&[1, 2, 3], &[4]));
    r.step(snapshot_msg(3, 2, 3, snap.clone())).unwrap();
    assert_eq!((r.term(), r.leader()), (3, Some(3)));
    let rd = r.ready().unwrap();
    assert_eq!(rd.snapshot, Some(snap.clone()));
    assert!(rd.entries.is_empty(), "the old suffix is not written");
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 3,
            vote: None,
            commit: 4
        })
    );
    assert!(
        rd.committed_entries.is_empty(),
        "3 and 4 were committed but come with the snapshot"
    );
    assert!(rd.messages.is_empty());
    assert_eq!(
        acks(&rd.persisted_messages),
        [(3, 3, 4)],
        "the acknowledgement of entry 6 to node 1 is withdrawn"
    );
    r.advance();
    let log = r.log();
    assert_eq!(
        (log.first_index(), log.last_index(), log.last_term()),
        (5, 4, 3)
    );
    assert_eq!((log.committed(), log.applied(), log.stable()), (4, 4, 4));
    assert_eq!(log.term(4), Some(3));
    assert!(log.get(5).is_none(), "the conflicting suffix is gone");
    assert_eq!(r.membership(), &snap.membership);
    assert_eq!(r.snapshot(), Some(&snap));
    assert!(!r.has_ready());

    // The leader goes on after the snapshot.
    r.step(msg(
        3,
        2,
        3,
        MessageBody::Append {
            prev_index: 4,
            prev_term: 3,
            entries: vec![entry(5, 3)],
            commit: 5,
        },
    ))
    .unwrap();
    let out = drain(&mut r);
    assert_eq!(indices(&out.committed), [5]);
    assert_eq!(acks(&out.after_persist), [(3, 3, 5)]);
}

/// Entries appended after the snapshot before the next `Ready` are written
/// in it, after the install.
#[test]
fn s7_entries_after_a_snapshot_go_in_the_same_ready() {
    let mut r = follower(2, 1, &[1], 1);
    let snap = meta(4, 1, members(&[1, 2, 3], &[]));
    r.step(snapshot_msg(1, 2, 1, snap.clone())).unwrap();
    r.step(msg(
        1,
        2,
        1,
        MessageBody::Append {
            prev_index: 4,
            prev_term: 1,
            entries: vec![entry(5, 1), entry(6, 1)],
            commit: 5,
        },
    ))
    .unwrap();
    let rd = r.ready().unwrap();
    assert_eq!(rd.snapshot, Some(snap));
    assert_eq!(indices(&rd.entries), [5, 6]);
    assert!(rd.committed_entries.is_empty(), "5 is not durable yet");
    assert_eq!(acks(&rd.persisted_messages), [(1, 1, 4), (1, 1, 6)]);
    r.advance();
    assert_eq!(indices(&drain(&mut r).committed), [5]);
}

/// "If instead the follower receives a snapshot that describes a prefix of
/// its log ..., then log entries covered by the snapshot are deleted but
/// entries following the snapshot are still valid and must be retained."
/// Here nothing is installed: the entries are all there, and the snapshot
/// only tells that they are committed.
#[test]
fn s7_a_snapshot_of_a_prefix_keeps_the_entries_after_it() {
    let mut r = follower(2, 2, &[1, 1, 2, 2, 2], 1);
    let snap = meta(3, 2, members(&[1, 2, 3], &[]));
    r.step(snapshot_msg(1, 2, 2, snap)).unwrap();
    let out = drain(&mut r);
    assert!(out.snapshots.is_empty(), "nothing to install");
    assert!(out.persisted.is_empty());
    assert_eq!(indices(&out.committed), [2, 3], "applied from the log");
    assert_eq!(acks(&out.after_persist), [(1, 2, 3)]);
    let log = r.log();
    assert_eq!((log.first_index(), log.last_index()), (1, 5));
    assert_eq!(log.committed(), 3);
    assert_eq!(r.snapshot(), None);
    // The suffix is still there for the leader's next append to check.
    r.step(msg(
        1,
        2,
        2,
        MessageBody::Append {
            prev_index: 5,
            prev_term: 2,
            entries: vec![],
            commit: 5,
        },
    ))
    .unwrap();
    let out = drain(&mut r);
    assert_eq!(acks(&out.after_persist), [(1, 2, 5)]);
    assert_eq!(indices(&out.committed), [4, 5]);
}

/// A snapshot at or below the commit index (a late or duplicated one) is
/// news to nobody: it changes nothing and is answered with the commit
/// index, so that the leader moves on.
#[test]
fn s7_a_stale_snapshot_changes_nothing() {
    for (index, term) in [(2, 1), (3, 2)] {
        let mut r = follower(2, 2, &[1, 1, 2, 2], 3);
        let hs = r.hard_state();
        r.step(snapshot_msg(
            1,
            2,
            2,
            meta(index, term, members(&[1, 2, 3], &[])),
        ))
        .unwrap();
        let out = drain(&mut r);
        assert!(out.snapshots.is_empty() && out.persisted.is_empty() && out.committed.is_empty());
        assert!(out.early.is_empty());
        assert_eq!(acks(&out.after_persist), [(1, 2, 3)], "snapshot at {index}");
        assert_eq!(r.hard_state(), hs);
        assert_eq!((r.log().first_index(), r.log().last_index()), (1, 4));
        assert_eq!(r.snapshot(), None);
    }
    // Below the follower's own snapshot, too.
    let mut r = follower(2, 2, &[1, 1, 2, 2], 3);
    let own = compact_at(&mut r, 3);
    r.step(snapshot_msg(1, 2, 2, meta(2, 1, members(&[1, 2, 3], &[]))))
        .unwrap();
    let out = drain(&mut r);
    assert!(out.snapshots.is_empty());
    assert_eq!(acks(&out.after_persist), [(1, 2, 3)]);
    assert_eq!(r.snapshot(), Some(&own));
    assert_eq!(r.log().first_index(), 4);
}

/// A snapshot answered by the stale path (the follower caught up some other
/// way) still ends the leader's snapshot state: the commit index it carries
/// is past the snapshot.
#[test]
fn s7_a_stale_answer_past_the_snapshot_ends_the_transfer() {
    let (mut net, _) = lagging_cluster();
    net.hold_if(is_snapshot);
    net.tick(1, HEARTBEAT);
    net.get(1).step(accepted(3, 1, 1, 6)).unwrap();
    net.settle();
    let pr = net.get(1).progress(3).unwrap();
    assert!(matches!(pr.state, ReplicationState::Replicate { .. }));
    assert_eq!(pr.matched, 6);
}

// ---- The driver ------------------------------------------------------------

/// The install is part of the durable write (and forces it), and the
/// acceptance leaves only once the write is durable.
#[test]
fn driver_writes_the_snapshot_and_holds_the_acceptance() {
    let mut d = Driver::new(Raft::new(config(2, &[1, 2, 3]), Persisted::default()).unwrap());
    let snap = meta(3, 1, members(&[1, 2, 3], &[]));
    d.step(snapshot_msg(1, 2, 1, snap.clone())).unwrap();
    let b = d.poll().expect("an install to write");
    assert_eq!(
        b.write,
        Some(Write {
            snapshot: Some(snap.clone()),
            hard_state: Some(HardState {
                term: 1,
                vote: None,
                commit: 3
            }),
            entries: vec![],
        })
    );
    assert!(acks(&b.send).is_empty(), "{:?}", b.send);
    assert!(b.apply.is_empty());
    assert!(d.is_writing());
    assert!(d.poll().is_none());
    assert_eq!(acks(&d.persisted()), [(1, 1, 3)]);
    assert_eq!(d.raft().snapshot(), Some(&snap));
    assert_eq!(d.raft().log().applied(), 3);
    assert!(d.poll().is_none());

    // A snapshot without a new term or vote forces the write all the same
    // (a commit index alone would not).
    let mut d = Driver::new(follower(2, 1, &[1], 1));
    d.step(snapshot_msg(1, 2, 1, snap.clone())).unwrap();
    let b = d.poll().unwrap();
    let w = b.write.expect("the install is synced");
    assert_eq!(w.snapshot, Some(snap));
    assert!(acks(&b.send).is_empty());
    assert_eq!(acks(&d.persisted()), [(1, 1, 3)]);
}

/// A joint configuration in effect at a snapshot is still left: a leader
/// elected with it appends the target at once, though the joint entry is
/// compacted away.
#[test]
fn s7_a_joint_membership_from_a_snapshot_is_left_by_the_next_leader() {
    // The joint membership {1, 2, 3} -> {1, 2, 4}, as a leader proposes it.
    let mut l = node(1, &[1, 2, 3]);
    tick_until_role_changes(&mut l);
    l.step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    l.step(accepted(2, 1, 1, 1)).unwrap();
    drain(&mut l);
    let target = members(&[1, 2, 4], &[]);
    l.propose_membership(target.clone()).unwrap();
    let joint = l.membership().clone();
    assert!(joint.is_joint());

    let snap = meta(5, 1, joint.clone());
    let mut r = restart(Some(snap), 1, 5, vec![], 5).unwrap();
    assert_eq!(r.membership(), &joint);
    tick_until_role_changes(&mut r);
    // Node 2 is in both majorities with node 1.
    r.step(msg(2, 1, 2, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    assert_eq!(r.role(), Role::Leader);
    assert_eq!(r.membership(), &target, "C(new) appended at once");
    assert_eq!(r.membership_index(), 7, "after the no-op at 6");
    let appended = drain(&mut r);
    assert_eq!(indices(&appended.persisted), [6, 7]);
}

/// A snapshot is a leader's message: a candidate of its term steps down
/// and installs it; a leader of the same term refuses it, as it refuses
/// appends; a malformed one changes nothing.
#[test]
fn s7_snapshot_messages_come_from_the_leader_of_the_term() {
    let snap = meta(4, 1, members(&[1, 2, 3], &[]));
    let mut r = node(2, &[1, 2, 3]);
    tick_until_role_changes(&mut r);
    assert_eq!((r.role(), r.term()), (Role::Candidate, 1));
    r.step(snapshot_msg(1, 2, 1, snap.clone())).unwrap();
    assert_eq!((r.role(), r.leader()), (Role::Follower, Some(1)));
    assert_eq!(drain(&mut r).snapshots, std::slice::from_ref(&snap));

    let mut l = node(2, &[1, 2, 3]);
    tick_until_role_changes(&mut l);
    l.step(msg(3, 2, 1, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    assert_eq!(l.role(), Role::Leader);
    assert!(l.step(snapshot_msg(1, 2, 1, snap.clone())).is_err());
    assert_eq!(l.role(), Role::Leader);
    assert_eq!(l.log().snapshot_index(), 0);

    let mut r = follower(2, 1, &[1], 1);
    for bad in [
        meta(0, 1, members(&[1, 2, 3], &[])),
        meta(4, 1, members(&[], &[4])),
        meta(4, 2, members(&[1, 2, 3], &[])),
    ] {
        assert!(
            matches!(
                r.step(snapshot_msg(1, 2, 1, bad.clone())),
                Err(kythira_raft::StepError::Malformed { from: 1, .. })
            ),
            "{bad:?}"
        );
        assert!(!r.has_ready());
        assert_eq!((r.log().last_index(), r.log().committed()), (1, 1));
    }
}
