//! Cross-check against stateright's exhaustive `LinearizabilityTester` on
//! small histories, linearizable and not.

mod common;

use std::collections::BTreeMap;

use common::KvOp;
use common::generate::{Shape, linearizable_history, specs};
use kythira_linearizability::kv::{KvInput, KvModel, KvOutput};
use kythira_linearizability::{Outcome, check};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

/// The same map as [`KvModel`], as stateright's reference object.
#[derive(Clone, Debug, Default)]
struct KvSpec(BTreeMap<u64, u64>);

impl SequentialSpec for KvSpec {
    type Op = KvInput;
    type Ret = KvOutput;

    fn invoke(&mut self, op: &KvInput) -> KvOutput {
        match *op {
            KvInput::Get { key } => KvOutput::Get(self.0.get(&key).copied()),
            KvInput::Put { key, value } => {
                self.0.insert(key, value);
                KvOutput::Put
            }
        }
    }
}

/// stateright's answer. It sees events in the order this crate sorts them
/// (calls before returns at equal times), so both use the same real-time
/// order.
fn stateright_linearizable(history: &[KvOp]) -> bool {
    // (time, is return, index)
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, op) in history.iter().enumerate() {
        events.push((op.call, false, i));
        if let Some(ret) = op.ret {
            events.push((ret, true, i));
        }
    }
    events.sort_unstable();
    let mut tester = LinearizabilityTester::new(KvSpec::default());
    for (_, is_return, i) in events {
        let op = &history[i];
        if is_return {
            let output = op
                .output
                .clone()
                .expect("completed operations have outputs");
            tester
                .on_return(op.client, output)
                .expect("well-formed history");
        } else {
            tester
                .on_invoke(op.client, op.input.clone())
                .expect("well-formed history");
        }
    }
    tester.is_consistent()
}

const SMALL: Shape = Shape {
    clients: 3,
    keys: 2,
    values: 3,
    min_ops: 0,
    max_ops: 12,
    sequential: false,
    // stateright allows one operation in flight per client.
    resume_after_pending: false,
    pending: 0.2,
};

/// Small histories, about half of them made wrong by changing what one read
/// returned to another small value (which may or may not still be legal).
fn small_history() -> impl Strategy<Value = Vec<KvOp>> {
    (
        specs(SMALL),
        prop::option::of((any::<prop::sample::Index>(), prop::option::of(0..4u64))),
    )
        .prop_map(|(specs, mutation)| {
            let mut history = linearizable_history(&specs, SMALL);
            let reads: Vec<usize> = (0..history.len())
                .filter(|&i| matches!(history[i].output, Some(KvOutput::Get(_))))
                .collect();
            if let Some((victim, read)) = mutation
                && !reads.is_empty()
            {
                history[reads[victim.index(reads.len())]].output = Some(KvOutput::Get(read));
            }
            history
        })
}

#[test]
fn agrees_with_stateright_on_small_histories() {
    let mut runner = TestRunner::deterministic();
    let strategy = small_history();
    let (mut linearizable, mut not_linearizable) = (0, 0);
    for _ in 0..3_000 {
        let history = strategy
            .new_tree(&mut runner)
            .expect("strategy generates")
            .current();
        let expected = stateright_linearizable(&history);
        let outcome = check(&KvModel, &history, None);
        assert_eq!(
            outcome == Outcome::Linearizable,
            expected,
            "disagreement (stateright says linearizable: {expected}) on {history:#?}"
        );
        assert_ne!(outcome, Outcome::Undecided);
        if expected {
            linearizable += 1;
        } else {
            not_linearizable += 1;
        }
    }
    // Both answers must be well represented for the agreement to mean much.
    assert!(linearizable > 500, "only {linearizable} linearizable");
    assert!(
        not_linearizable > 500,
        "only {not_linearizable} not linearizable"
    );
}
