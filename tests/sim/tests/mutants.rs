//! Each injected bug is caught by the simulator within a known seed range
//! (found with `just sim-mutants`, which searches further).

use kythira_raft::Mutation;
use kythira_sim::{Options, run_seeds};

fn caught_within(m: Mutation, nodes: usize, first: u64, seeds: u64) {
    let summary = run_seeds(first, seeds, 2, true, |seed| Options {
        mutation: Some(m),
        ..Options::checked(nodes, seed)
    });
    let f = summary.failures.first().unwrap_or_else(|| {
        panic!(
            "{} survived seeds {first}..{} on {nodes} nodes",
            m.name(),
            first + seeds
        )
    });
    eprintln!(
        "{} caught on seed {}: {}",
        m.name(),
        f.seed,
        f.failure.as_ref().expect("failures only")
    );
}

#[test]
fn figure_8_commit_by_counting_replicas_is_caught() {
    caught_within(Mutation::CommitPreviousTermByCount, 5, 545, 10);
}

#[test]
fn vote_without_log_check_is_caught() {
    caught_within(Mutation::VoteWithoutLogCheck, 3, 0, 10);
}

#[test]
fn vote_before_persist_is_caught() {
    caught_within(Mutation::VoteBeforePersist, 3, 770, 10);
}

#[test]
fn append_without_prev_check_is_caught() {
    caught_within(Mutation::AppendWithoutPrevCheck, 3, 0, 15);
}
