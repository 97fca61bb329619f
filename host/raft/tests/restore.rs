//! Restarting a core from persisted state: what it resumes with, and what
//! inconsistent state it refuses.

mod common;

use common::*;
use kythira_raft::{HardState, MAX_TERM, Persisted, Raft, RestoreError, Role};

fn restore(hard_state: HardState, terms: &[u64], applied: u64) -> Result<Raft, RestoreError> {
    Raft::new(
        config(1, &[1, 2, 3]),
        Persisted {
            snapshot: None,
            hard_state,
            entries: log_of(terms),
            applied,
        },
    )
}

#[test]
fn resumes_term_vote_and_commit_and_reapplies_only_past_applied() {
    let hs = HardState {
        term: 3,
        vote: Some(2),
        commit: 3,
    };
    let mut r = restore(hs, &[1, 2, 2, 3], 2).unwrap();
    assert_eq!((r.role(), r.term(), r.vote()), (Role::Follower, 3, Some(2)));
    assert_eq!(r.log().last_index(), 4);
    assert_eq!(r.log().stable(), 4, "what was read back is durable");
    let out = drain(&mut r);
    assert_eq!(
        out.committed.iter().map(|e| e.index).collect::<Vec<_>>(),
        [3]
    );
    assert!(
        out.persisted.is_empty() && out.hard_states.is_empty(),
        "nothing new to write"
    );
}

#[test]
fn refuses_inconsistent_state() {
    let hs = |term, vote, commit| HardState { term, vote, commit };
    assert!(matches!(
        restore(hs(3, None, 0), &[1, 3, 2], 0),
        Err(RestoreError::BadEntry { index: 3, .. })
    ));
    assert!(matches!(
        restore(hs(1, None, 0), &[1, 2], 0),
        Err(RestoreError::EntryFromFuture { .. })
    ));
    assert!(matches!(
        restore(hs(2, None, 5), &[1, 2], 0),
        Err(RestoreError::BadCommit { .. })
    ));
    assert!(matches!(
        restore(hs(2, None, 1), &[1, 2], 3),
        Err(RestoreError::BadCommit { .. })
    ));
    assert!(matches!(
        restore(hs(MAX_TERM + 1, None, 0), &[1, 2], 0),
        Err(RestoreError::TermOutOfRange { .. })
    ));
    assert!(matches!(
        restore(hs(2, Some(0), 0), &[1, 2], 0),
        Err(RestoreError::ReservedVote)
    ));
    // A vote for a node outside the bootstrap voters is kept: the entry
    // that made it a voter may have been truncated since.
    assert!(restore(hs(2, Some(9), 0), &[1, 2], 0).is_ok());
    let mut gap = log_of(&[1, 1]);
    gap[1].index = 3;
    let r = Raft::new(
        config(1, &[1, 2, 3]),
        Persisted {
            snapshot: None,
            hard_state: hs(1, None, 0),
            entries: gap,
            applied: 0,
        },
    );
    assert!(matches!(r, Err(RestoreError::BadEntry { index: 3, .. })));
    let mut bad = config(1, &[2, 3, 3]);
    assert!(matches!(
        Raft::new(bad.clone(), Persisted::default()),
        Err(RestoreError::Config(_))
    ));
    // A node outside the bootstrap voters is a learner or joins later.
    assert!(Raft::new(config(1, &[2, 3]), Persisted::default()).is_ok());
    let mut bad_config = log_of(&[1, 1]);
    bad_config[1].kind = kythira_raft::EntryKind::Config;
    let r = Raft::new(
        config(1, &[1, 2, 3]),
        Persisted {
            snapshot: None,
            hard_state: hs(1, None, 0),
            entries: bad_config,
            applied: 0,
        },
    );
    assert!(matches!(
        r,
        Err(RestoreError::BadMembership { index: 2, .. })
    ));
    bad.voters = vec![1, 2, 3];
    bad.heartbeat_ticks = bad.election_ticks;
    assert!(matches!(
        Raft::new(bad, Persisted::default()),
        Err(RestoreError::Config(_))
    ));
}
