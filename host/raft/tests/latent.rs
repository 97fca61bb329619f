//! Inputs that are legal but rare (or only come from a broken peer), each of
//! which once led the core astray.

mod common;

use common::*;
use kythira_raft::{
    AppendOutcome, HardState, MAX_TERM, Message, MessageBody, Persisted, Raft, ReplicationState,
    RestoreError, Role, StepError, Term,
};

// ---- restart ------------------------------------------------------------------

/// A commit index alone is not synced, so a state machine that checkpointed
/// at `applied` may come back with an older durable commit index.
#[test]
fn restart_with_applied_above_the_persisted_commit() {
    let persisted = Persisted {
        snapshot: None,
        hard_state: HardState {
            term: 2,
            vote: None,
            commit: 2,
        },
        entries: log_of(&[1, 1, 2, 2, 2]),
        applied: 4,
    };
    let mut r = Raft::new(config(1, &[1, 2, 3]), persisted).unwrap();
    assert_eq!(r.log().committed(), 4, "what was applied was committed");
    assert_eq!(r.log().applied(), 4);
    let out = drain(&mut r);
    assert!(out.committed.is_empty(), "nothing is applied twice");
    assert!(out.hard_states.is_empty(), "nothing new to write");
    r.step(msg(
        2,
        1,
        2,
        MessageBody::Heartbeat {
            commit: 5,
            read_round: 0,
        },
    ))
    .unwrap();
    let applied: Vec<_> = drain(&mut r).committed.iter().map(|e| e.index).collect();
    assert_eq!(applied, [5]);
}

#[test]
fn restart_still_refuses_applied_or_commit_past_the_log() {
    let restore = |commit, applied| {
        Raft::new(
            config(1, &[1, 2, 3]),
            Persisted {
                snapshot: None,
                hard_state: HardState {
                    term: 2,
                    vote: None,
                    commit,
                },
                entries: log_of(&[1, 2]),
                applied,
            },
        )
    };
    assert!(matches!(restore(0, 3), Err(RestoreError::BadCommit { .. })));
    assert!(matches!(restore(3, 0), Err(RestoreError::BadCommit { .. })));
    assert!(restore(0, 2).is_ok());
}

// ---- terms at the edge of the range ------------------------------------------------

fn heartbeat(term: Term) -> Message {
    msg(
        2,
        1,
        term,
        MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
        },
    )
}

fn vote(term: Term, last_term: Term) -> Message {
    msg(
        2,
        1,
        term,
        MessageBody::Vote {
            last_index: 1,
            last_term,
            transfer: false,
        },
    )
}

fn append(term: Term, prev_term: Term, entry_term: Term) -> Message {
    msg(
        2,
        1,
        term,
        MessageBody::Append {
            prev_index: 0,
            prev_term,
            entries: vec![entry(1, entry_term)],
            commit: 0,
        },
    )
}

fn assert_out_of_range(r: &mut Raft, m: Message) {
    let before = (r.term(), r.vote(), r.leader(), r.log().last_index());
    let err = r.step(m.clone()).expect_err("term out of range");
    assert!(
        matches!(err, StepError::Malformed { from: 2, reason } if reason.contains("out of range")),
        "{m:?}: {err}"
    );
    assert_eq!(
        (r.term(), r.vote(), r.leader(), r.log().last_index()),
        before,
        "{m:?}"
    );
}

#[test]
fn terms_past_the_largest_are_refused() {
    let mut r = node(1, &[1, 2, 3]);
    for term in [MAX_TERM + 1, u64::MAX] {
        assert_out_of_range(&mut r, heartbeat(term));
        assert_out_of_range(&mut r, vote(term, 1));
        assert_out_of_range(&mut r, append(term, 0, 1));
        assert_out_of_range(&mut r, vote(5, term));
        assert_out_of_range(&mut r, append(5, term, term));
        let reject = AppendOutcome::Rejected {
            prev_index: 0,
            hint_index: 0,
            hint_term: term,
        };
        assert_out_of_range(&mut r, msg(2, 1, 5, MessageBody::AppendResponse(reject)));
    }
    assert_eq!(r.term(), 0);
    assert!(drain(&mut r).all().is_empty());
}

#[test]
fn the_largest_term_is_accepted_and_never_passed() {
    let mut r = node(1, &[1, 2, 3]);
    r.step(append(MAX_TERM, 0, MAX_TERM)).unwrap();
    assert_eq!((r.term(), r.leader()), (MAX_TERM, Some(2)));
    assert_eq!(r.log().last_term(), MAX_TERM);
    drain(&mut r);
    // Its leader is gone: the node cannot campaign in a later term.
    for _ in 0..4 * ELECTION {
        r.tick();
        assert_eq!(r.term(), MAX_TERM);
        assert_eq!(r.role(), Role::Follower);
    }
    assert!(
        drain(&mut r).all().iter().all(|m| m.term <= MAX_TERM),
        "no message in a term past the largest"
    );

    let mut c = config(1, &[1, 2, 3]);
    c.pre_vote = true;
    let mut r = node_with(c, MAX_TERM, &[1]);
    for _ in 0..4 * ELECTION {
        r.tick();
        assert_eq!((r.term(), r.role()), (MAX_TERM, Role::Follower));
    }
    assert!(drain(&mut r).all().is_empty());

    // A candidate of the last term times out without a term to go to.
    let mut r = node_with(config(1, &[1, 2, 3]), MAX_TERM - 1, &[1]);
    tick_until_role_changes(&mut r);
    assert_eq!((r.term(), r.role()), (MAX_TERM, Role::Candidate));
    tick_until_role_changes(&mut r);
    assert_eq!((r.term(), r.role()), (MAX_TERM, Role::Follower));
    assert_eq!(r.vote(), Some(1), "the vote of the term stands");
}

#[test]
fn restart_refuses_a_term_past_the_largest() {
    let restore = |term| {
        Raft::new(
            config(1, &[1, 2, 3]),
            Persisted {
                snapshot: None,
                hard_state: HardState {
                    term,
                    vote: None,
                    commit: 0,
                },
                entries: vec![],
                applied: 0,
            },
        )
    };
    assert!(restore(MAX_TERM).is_ok());
    assert_eq!(
        restore(MAX_TERM + 1).unwrap_err(),
        RestoreError::TermOutOfRange { term: MAX_TERM + 1 }
    );
}

// ---- two leaders in one term -----------------------------------------------------

fn leader_of_three() -> Raft {
    let mut r = node(1, &[1, 2, 3]);
    tick_until_role_changes(&mut r);
    r.step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    assert_eq!(r.role(), Role::Leader);
    drain(&mut r);
    r
}

#[test]
fn append_or_heartbeat_from_another_leader_of_the_term_is_refused() {
    let mut r = leader_of_three();
    let term = r.term();
    let bodies = [
        MessageBody::Append {
            prev_index: 0,
            prev_term: 0,
            entries: vec![entry(1, term)],
            commit: 0,
        },
        MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
        },
    ];
    for body in bodies {
        let err = r.step(msg(3, 1, term, body)).unwrap_err();
        assert!(matches!(err, StepError::Malformed { from: 3, .. }), "{err}");
        assert_eq!(
            (r.role(), r.term(), r.leader()),
            (Role::Leader, term, Some(1))
        );
        assert_eq!(r.log().last_index(), 1, "the log is untouched");
    }
    assert!(
        drain(&mut r).all().is_empty(),
        "the offender gets no answer"
    );
}

// ---- flow control toward a slow follower ----------------------------------------------

/// Leader 1 of {1, 2} whose window of two appends to node 2 is full.
fn leader_with_full_window() -> Raft {
    let mut leader = pipelining_leader();
    assert_eq!(appends_to_2(&mut leader), [(1, 3), (4, 3)]);
    leader
}

/// (prev_index, number of entries) of the appends the leader sends to node 2.
fn appends_to_2(leader: &mut Raft) -> Vec<(u64, usize)> {
    drain(leader)
        .all()
        .iter()
        .filter_map(|m| match &m.body {
            MessageBody::Append {
                prev_index,
                entries,
                ..
            } if m.to == 2 => Some((*prev_index, entries.len())),
            _ => None,
        })
        .collect()
}

fn heartbeat_response() -> Message {
    msg(2, 1, 1, MessageBody::HeartbeatResponse { read_round: 0 })
}

#[test]
fn a_heartbeat_response_does_not_widen_a_full_window() {
    let mut leader = leader_with_full_window();
    leader.step(heartbeat_response()).unwrap();
    assert_eq!(appends_to_2(&mut leader), []);
    let ReplicationState::Replicate { inflight } = &leader.progress(2).unwrap().state else {
        panic!("still replicating");
    };
    assert_eq!(inflight.len(), 2);
}

/// The follower answers heartbeats but acknowledges nothing of the full
/// window for a whole election timeout: the appends were lost.
#[test]
fn a_window_full_for_an_election_timeout_is_lost_and_probed_again() {
    let mut leader = leader_with_full_window();
    for _ in 0..9 {
        leader.tick();
        leader.step(heartbeat_response()).unwrap();
        assert_eq!(appends_to_2(&mut leader), [], "still waiting");
    }
    leader.tick();
    leader.step(heartbeat_response()).unwrap();
    assert_eq!(
        appends_to_2(&mut leader),
        [(1, 3)],
        "one probe from the last known match"
    );
    let pr = leader.progress(2).unwrap();
    assert_eq!(pr.state, ReplicationState::Probe { paused: true });
    leader.step(heartbeat_response()).unwrap();
    assert_eq!(
        appends_to_2(&mut leader),
        [(1, 3)],
        "an unanswered probe is retried"
    );
    leader
        .step(msg(
            2,
            1,
            1,
            MessageBody::AppendResponse(AppendOutcome::Accepted { last_index: 4 }),
        ))
        .unwrap();
    assert_eq!(
        appends_to_2(&mut leader),
        [(4, 3), (7, 3)],
        "pipelining resumes"
    );
}

#[test]
fn an_acknowledgement_restarts_the_count() {
    let mut leader = leader_with_full_window();
    for _ in 0..9 {
        leader.tick();
    }
    leader
        .step(msg(
            2,
            1,
            1,
            MessageBody::AppendResponse(AppendOutcome::Accepted { last_index: 4 }),
        ))
        .unwrap();
    assert_eq!(appends_to_2(&mut leader), [(7, 3)]);
    for _ in 0..9 {
        leader.tick();
        leader.step(heartbeat_response()).unwrap();
    }
    assert_eq!(appends_to_2(&mut leader), [], "full again, not for long");
    assert!(matches!(
        leader.progress(2).unwrap().state,
        ReplicationState::Replicate { .. }
    ));
}

// ---- acknowledgements that wait for a write ------------------------------------

fn append_body(prev_index: u64, prev_term: Term, entries: &[(u64, Term)]) -> MessageBody {
    MessageBody::Append {
        prev_index,
        prev_term,
        entries: entries
            .iter()
            .map(|&(index, term)| entry(index, term))
            .collect(),
        commit: 0,
    }
}

/// A follower whose disk is busy accepts an entry from the leader of term
/// 1, then a leader of term 2 replaces it before the next write. The
/// acknowledgement to the first leader must not leave after that write: the
/// entry it acknowledges was never made durable (the simulator found this
/// with a stalled disk and three leaders in a row).
#[test]
fn an_acknowledgement_of_replaced_entries_is_withdrawn() {
    let mut d =
        kythira_raft::Driver::new(Raft::new(config(3, &[1, 2, 3]), Persisted::default()).unwrap());
    // A vote keeps the disk busy.
    d.step(msg(
        2,
        3,
        1,
        MessageBody::Vote {
            last_index: 0,
            last_term: 0,
            transfer: false,
        },
    ))
    .unwrap();
    let b = d.poll().unwrap();
    assert!(b.write.is_some());
    d.step(msg(1, 3, 1, append_body(0, 0, &[(1, 1)]))).unwrap();
    d.step(msg(2, 3, 2, append_body(0, 0, &[(1, 2)]))).unwrap();
    let mut sent = d.persisted();
    let b = d.poll().unwrap();
    let w = b.write.expect("the term-2 entry to persist");
    assert_eq!(w.entries.iter().map(|e| e.term).collect::<Vec<_>>(), [2]);
    sent.extend(b.send);
    sent.extend(d.persisted());
    let acks: Vec<_> = sent
        .iter()
        .filter_map(|m| match m.body {
            MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }) => {
                Some((m.to, m.term, last_index))
            }
            _ => None,
        })
        .collect();
    assert_eq!(acks, [(2, 2, 1)], "only the term-2 entry is acknowledged");
}

// ---- elections ----------------------------------------------------------------

/// Only a granted vote or a leader resets the election timer (Raft figure
/// 2). A node that rejects a candidate of a higher term keeps counting:
/// otherwise candidates that cannot win keep the one node that could from
/// ever timing out (the simulator found a five-node cluster with two nodes
/// down stuck this way).
#[test]
fn a_rejected_vote_request_does_not_reset_the_election_timer() {
    let fresh = || node_with(config(1, &[1, 2, 3]), 1, &[1, 1]);
    let mut a = fresh();
    let mut ticks = 0;
    while a.role() == Role::Follower {
        a.tick();
        ticks += 1;
    }
    let mut b = fresh();
    for _ in 0..ticks - 1 {
        b.tick();
    }
    let stale_candidate = MessageBody::Vote {
        last_index: 1,
        last_term: 1,
        transfer: false,
    };
    b.step(msg(2, 1, 5, stale_candidate)).unwrap();
    assert_eq!(
        (b.term(), b.vote()),
        (5, None),
        "term adopted, vote refused"
    );
    b.tick();
    assert_ne!(b.role(), Role::Follower, "campaigns on its own schedule");
}
