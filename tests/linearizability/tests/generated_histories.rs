//! Property tests on generated kv histories.

mod common;

use common::generate::{Shape, linearizable_history, specs};
use kythira_linearizability::kv::{KvInput, KvModel, KvOutput};
use kythira_linearizability::{Outcome, check};
use proptest::prelude::*;

const SEQUENTIAL: Shape = Shape {
    clients: 3,
    keys: 4,
    values: 50,
    min_ops: 0,
    max_ops: 80,
    sequential: true,
    resume_after_pending: true,
    pending: 0.1,
};

const CONCURRENT: Shape = Shape {
    clients: 5,
    keys: 4,
    values: 50,
    min_ops: 0,
    max_ops: 120,
    sequential: false,
    resume_after_pending: true,
    pending: 0.1,
};

/// No generated value reaches this.
const NEVER_WRITTEN: u64 = 1_000_000;

proptest! {
    #[test]
    fn sequential_histories_of_a_real_map_are_linearizable(specs in specs(SEQUENTIAL)) {
        let history = linearizable_history(&specs, SEQUENTIAL);
        prop_assert_eq!(check(&KvModel, &history, None), Outcome::Linearizable);
    }

    #[test]
    fn concurrent_histories_of_a_real_map_are_linearizable(specs in specs(CONCURRENT)) {
        let history = linearizable_history(&specs, CONCURRENT);
        prop_assert_eq!(check(&KvModel, &history, None), Outcome::Linearizable);
    }

    #[test]
    fn reading_a_value_never_written_is_caught(
        specs in specs(CONCURRENT),
        sequential in any::<bool>(),
        victim in any::<prop::sample::Index>(),
    ) {
        let shape = Shape { sequential, ..CONCURRENT };
        let mut history = linearizable_history(&specs, shape);
        let reads: Vec<usize> = history
            .iter()
            .enumerate()
            .filter(|(_, op)| matches!(op.output, Some(KvOutput::Get(_))))
            .map(|(i, _)| i)
            .collect();
        prop_assume!(!reads.is_empty());
        let victim = reads[victim.index(reads.len())];
        history[victim].output = Some(KvOutput::Get(Some(NEVER_WRITTEN)));
        let KvInput::Get { key } = history[victim].input else {
            unreachable!("only reads were chosen");
        };
        let partition = KvModel::keys(&history)
            .iter()
            .position(|&k| k == key)
            .expect("the victim's key has a partition");
        prop_assert_eq!(
            check(&KvModel, &history, None),
            Outcome::NotLinearizable { partition }
        );
    }
}
