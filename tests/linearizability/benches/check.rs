//! Checking cost of kv histories of simulator size.
//!
//! `cargo bench -p kythira-linearizability --bench check` prints
//! `BENCH name=<id> value=<median> unit=us` lines. The baseline is a
//! sequential history of the same length, where the search never backtracks.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::KvOp;
use common::generate::{Shape, linearizable_history, specs};
use kythira_linearizability::kv::{KvInput, KvModel, KvOutput};
use kythira_linearizability::{Outcome, check};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;

const RUNS: usize = 21;

fn history(shape: Shape) -> Vec<KvOp> {
    let mut runner = TestRunner::deterministic();
    let specs = specs(shape)
        .new_tree(&mut runner)
        .expect("strategy generates")
        .current();
    linearizable_history(&specs, shape)
}

/// Median wall time of checking `history`, in microseconds.
fn median_us(history: &[KvOp], expected: &Outcome) -> f64 {
    let mut samples: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let outcome = check(&KvModel, std::hint::black_box(history), None);
            let elapsed = start.elapsed();
            assert_eq!(&outcome, expected);
            elapsed.as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[RUNS / 2]
}

fn report(name: &str, history: &[KvOp], expected: Outcome) {
    let us = median_us(history, &expected);
    let concurrency = max_concurrency(history);
    let pending = history.iter().filter(|op| op.ret.is_none()).count();
    println!("BENCH name={name} value={us:.1} unit=us");
    eprintln!(
        "  {name}: {} operations ({pending} pending), at most {concurrency} completed at once, {expected:?}",
        history.len()
    );
}

/// Largest number of completed operations whose intervals overlap at one time.
fn max_concurrency(history: &[KvOp]) -> usize {
    let mut events: Vec<(u64, bool)> = Vec::new();
    for op in history {
        if let Some(ret) = op.ret {
            events.push((op.call, false));
            events.push((ret, true));
        }
    }
    events.sort_unstable();
    let (mut open, mut max) = (0usize, 0usize);
    for (_, is_return) in events {
        if is_return {
            open -= 1;
        } else {
            open += 1;
            max = max.max(open);
        }
    }
    max
}

/// Makes the last read of key 0 return a value nobody wrote: the search
/// must exhaust that key's partition before giving up.
fn with_violation(mut history: Vec<KvOp>) -> Vec<KvOp> {
    let victim = history
        .iter()
        .rposition(|op| {
            matches!(op.output, Some(KvOutput::Get(_))) && op.input == KvInput::Get { key: 0 }
        })
        .expect("the history reads key 0");
    history[victim].output = Some(KvOutput::Get(Some(u64::MAX)));
    history
}

fn main() {
    let concurrent = Shape {
        clients: 5,
        keys: 10,
        values: 1_000,
        min_ops: 2_000,
        max_ops: 2_000,
        sequential: false,
        resume_after_pending: true,
        pending: 0.02,
    };
    let sequential = Shape {
        sequential: true,
        ..concurrent
    };

    report(
        "lin_check_sequential_2000_ops_baseline",
        &history(sequential),
        Outcome::Linearizable,
    );

    let linearizable = history(concurrent);
    report(
        "lin_check_concurrent_2000_ops_10_keys_5_clients",
        &linearizable,
        Outcome::Linearizable,
    );

    report(
        "lin_check_concurrent_2000_ops_10_keys_5_clients_violation",
        &with_violation(linearizable),
        Outcome::NotLinearizable { partition: 0 },
    );

    let one_key = Shape {
        keys: 1,
        ..concurrent
    };
    report(
        "lin_check_concurrent_2000_ops_1_key_5_clients",
        &history(one_key),
        Outcome::Linearizable,
    );

    // Many operations that never completed: each may or may not have taken
    // effect, which multiplies the states the search has to consider.
    let many_pending = Shape {
        pending: 0.1,
        ..concurrent
    };
    let linearizable = history(many_pending);
    report(
        "lin_check_concurrent_2000_ops_10_keys_5_clients_10pct_pending",
        &linearizable,
        Outcome::Linearizable,
    );
    report(
        "lin_check_concurrent_2000_ops_10_keys_5_clients_10pct_pending_violation",
        &with_violation(linearizable),
        Outcome::NotLinearizable { partition: 0 },
    );
}
