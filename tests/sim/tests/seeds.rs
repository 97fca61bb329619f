//! A modest number of simulator seeds in the ordinary test run. The release
//! binary (`just sim --seeds N`) runs many more.

use kythira_sim::{Options, replay_command, run_seeds};

fn run(nodes: usize, seeds: u64) {
    let summary = run_seeds(0, seeds, 2, false, |seed| Options::checked(nodes, seed));
    assert_eq!(summary.seeds, seeds);
    assert!(
        summary.steps > seeds * 1_000,
        "runs are not trivial: {} steps",
        summary.steps
    );
    if let Some(f) = summary.failures.first() {
        panic!(
            "{} of {seeds} seeds failed; first: seed {}: {}\nreplay: {}",
            summary.failures.len(),
            f.seed,
            f.failure.as_ref().expect("failures only"),
            replay_command(f.seed, nodes)
        );
    }
}

#[test]
fn three_node_clusters_stay_safe_and_linearizable() {
    run(3, 150);
}

#[test]
fn five_node_clusters_stay_safe_and_linearizable() {
    run(5, 150);
}

#[test]
fn a_seed_replays_identically() {
    let a = kythira_sim::run_seed(Options::checked(5, 7));
    let b = kythira_sim::run_seed(Options::checked(5, 7));
    assert_eq!((a.steps, a.operations), (b.steps, b.operations));
    assert!(
        a.operations > 50,
        "clients did work: {} operations",
        a.operations
    );
}
