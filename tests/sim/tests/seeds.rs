//! A modest number of simulator seeds in the ordinary test run (with the
//! core's assertions on); `just sim --seeds N` runs many more.

use kythira_sim::{Options, mixed_size, replay_command, run_seed, run_seeds};

fn run(seeds: u64, size: impl Fn(u64) -> usize + Sync) {
    let summary = run_seeds(0, seeds, 2, false, |seed| {
        Options::checked(size(seed), seed)
    });
    assert_eq!(summary.seeds, seeds);
    assert_eq!(summary.undecided, 0, "every history was decided");
    assert!(
        summary.steps > seeds * 1_000,
        "runs are not trivial: {} steps",
        summary.steps
    );
    if let Some(f) = summary.failures.first() {
        panic!(
            "{} of {seeds} seeds failed; first: seed {}: {}\nprofile: {}\nreplay: {}",
            summary.failures.len(),
            f.seed,
            f.failure.as_ref().expect("failures only"),
            f.profile,
            replay_command(f.seed, size(f.seed))
        );
    }
}

#[test]
fn three_node_clusters_stay_safe_live_and_linearizable() {
    run(60, |_| 3);
}

#[test]
fn five_node_clusters_stay_safe_live_and_linearizable() {
    run(60, |_| 5);
}

#[test]
fn clusters_of_one_to_seven_nodes_stay_safe_live_and_linearizable() {
    run(70, mixed_size);
}

#[test]
fn a_seed_replays_identically() {
    let a = run_seed(Options::checked(5, 7));
    let b = run_seed(Options::checked(5, 7));
    assert!(a.failure.is_none(), "{:?}", a.failure);
    assert_eq!(a.trace, b.trace, "the whole event trace replays");
    assert_eq!((a.steps, a.operations), (b.steps, b.operations));
    assert!(
        a.operations > 50,
        "clients did work: {} operations",
        a.operations
    );
    let other = run_seed(Options::checked(5, 8));
    assert_ne!(a.trace, other.trace, "the trace hash tells runs apart");
}

#[test]
fn mixed_sizes_cover_one_to_seven() {
    let mut seen = [false; 8];
    for seed in 0..200 {
        seen[mixed_size(seed)] = true;
    }
    assert_eq!(seen, [false, true, true, true, true, true, true, true]);
}
