//! Every injected bug is caught within the seeds `just test` sweeps (seeds
//! `0..2000` at 3 and at 5 nodes). The hunt searches that budget instead of
//! pinning a catching seed, so a change to how the simulator draws its
//! numbers cannot break these tests while the simulator keeps its power.

use kythira_raft::Mutation;
use kythira_sim::hunt_mutant;

/// Seeds per cluster size: the sweep `just test` runs.
const BUDGET: u64 = 2_000;

fn caught(name: &str) {
    let m = Mutation::ALL
        .into_iter()
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("no mutant named {name}"));
    match hunt_mutant(m, BUDGET, 2) {
        Some((seed, nodes, failure)) => eprintln!(
            "{name} caught on seed {seed} at {nodes} nodes: {}",
            failure.lines().next().unwrap_or("")
        ),
        None => panic!("{name} survived seeds 0..{BUDGET} at 3 and at 5 nodes"),
    }
}

macro_rules! hunts {
    ($($test:ident => $name:literal,)*) => {
        $(
            #[test]
            fn $test() {
                caught($name);
            }
        )*

        #[test]
        fn every_mutant_has_a_hunt() {
            let hunted = [$($name),*];
            for m in Mutation::ALL {
                assert!(hunted.contains(&m.name()), "no hunt for {}", m.name());
            }
        }
    };
}

hunts! {
    commit_previous_term_by_count => "commit-previous-term-by-count",
    vote_without_log_check => "vote-without-log-check",
    vote_before_persist => "vote-before-persist",
    append_without_prev_check => "append-without-prev-check",
    vote_twice_in_a_term => "vote-twice-in-a-term",
    count_duplicate_votes => "count-duplicate-votes",
    ack_before_persist => "ack-before-persist",
    leader_counts_unstable_self => "leader-counts-unstable-self",
    heartbeat_commit_unclamped => "heartbeat-commit-unclamped",
    keep_conflicting_suffix => "keep-conflicting-suffix",
    no_fast_backtracking => "no-fast-backtracking",
    probe_never_retried => "probe-never-retried",
    match_on_send => "match-on-send",
    read_without_quorum => "read-without-quorum",
    read_before_term_commit => "read-before-term-commit",
    joint_new_majority_only => "joint-new-majority-only",
    learner_in_quorum => "learner-in-quorum",
    transfer_without_catch_up => "transfer-without-catch-up",
    lease_without_quorum => "lease-without-quorum",
    snapshot_over_committed => "snapshot-over-committed",
}
