//! Hand-written key-value histories with known answers.

mod common;

use common::{KvOp, get, pending_get, pending_put, put};
use kythira_linearizability::kv::{KvInput, KvModel, KvOutput};
use kythira_linearizability::{
    HistoryError, Model, Operation, Outcome, Verdict, check, check_history,
};

fn kv(history: &[KvOp]) -> Outcome {
    check(&KvModel, history, None)
}

const NOT_LINEARIZABLE: Outcome = Outcome::NotLinearizable { partition: 0 };

#[test]
fn empty_history_is_linearizable() {
    assert_eq!(kv(&[]), Outcome::Linearizable);
}

#[test]
fn sequential_read_your_write() {
    let history = [
        get(0, 1, None, 0, 1),
        put(0, 1, 10, 2, 3),
        get(1, 1, Some(10), 4, 5),
        put(1, 1, 11, 6, 7),
        get(0, 1, Some(11), 8, 9),
    ];
    assert_eq!(kv(&history), Outcome::Linearizable);
}

#[test]
fn stale_read_is_caught() {
    let history = [
        put(0, 1, 10, 0, 1),
        put(1, 1, 11, 2, 3),
        get(2, 1, Some(10), 4, 5),
    ];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);
}

#[test]
fn read_concurrent_with_write_may_see_old_or_new_value() {
    for read in [Some(10), Some(11)] {
        let history = [
            put(0, 1, 10, 0, 1),
            put(1, 1, 11, 2, 6),
            get(2, 1, read, 3, 5),
        ];
        assert_eq!(kv(&history), Outcome::Linearizable, "read {read:?}");
    }
}

#[test]
fn lost_write_is_caught() {
    let history = [
        put(0, 1, 10, 0, 1),
        put(1, 1, 11, 2, 3),
        get(2, 1, Some(11), 4, 5),
        // The acknowledged write of 11 vanished: the old value is back.
        get(2, 1, Some(10), 6, 7),
    ];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);

    let history = [put(0, 1, 10, 0, 1), get(1, 1, None, 2, 3)];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);
}

#[test]
fn read_of_a_value_never_written_is_caught() {
    let history = [put(0, 1, 10, 0, 5), get(1, 1, Some(99), 1, 4)];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);
}

#[test]
fn concurrent_writes_may_land_in_either_order() {
    for (first, second) in [(10, 11), (11, 10)] {
        let history = [
            put(0, 1, 10, 0, 10),
            put(1, 1, 11, 0, 10),
            get(2, 1, Some(first), 2, 3),
            get(2, 1, Some(second), 4, 5),
        ];
        assert_eq!(kv(&history), Outcome::Linearizable);
    }
}

#[test]
fn concurrent_writes_observed_in_both_orders_are_caught() {
    // Two readers disagree on the order of two concurrent writes.
    let history = [
        put(0, 1, 10, 0, 10),
        put(1, 1, 11, 0, 10),
        get(2, 1, Some(10), 11, 12),
        get(3, 1, Some(11), 13, 14),
        get(2, 1, Some(10), 15, 16),
    ];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);

    // The same flip-flop while the writes are still running.
    let history = [
        put(0, 1, 10, 0, 20),
        put(1, 1, 11, 0, 20),
        get(2, 1, Some(11), 1, 2),
        get(2, 1, Some(10), 3, 4),
        get(3, 1, Some(11), 5, 6),
    ];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);
}

#[test]
fn pending_write_that_took_effect() {
    let history = [pending_put(0, 1, 10, 0), get(1, 1, Some(10), 5, 6)];
    assert_eq!(kv(&history), Outcome::Linearizable);
}

#[test]
fn pending_write_that_did_not_take_effect() {
    let history = [
        pending_put(0, 1, 10, 0),
        get(1, 1, None, 5, 6),
        put(1, 1, 11, 7, 8),
        get(1, 1, Some(11), 9, 10),
    ];
    assert_eq!(kv(&history), Outcome::Linearizable);
}

#[test]
fn pending_write_may_take_effect_late() {
    let history = [
        pending_put(0, 1, 10, 0),
        get(1, 1, None, 5, 6),
        put(1, 1, 11, 7, 8),
        get(1, 1, Some(11), 9, 10),
        get(1, 1, Some(10), 11, 12),
    ];
    assert_eq!(kv(&history), Outcome::Linearizable);
}

#[test]
fn pending_write_cannot_take_effect_twice_or_before_its_call() {
    // Once seen, the pending write cannot be undone by nothing.
    let history = [
        pending_put(0, 1, 10, 0),
        get(1, 1, Some(10), 5, 6),
        get(1, 1, None, 7, 8),
    ];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);

    // It applies once: it cannot reappear after being overwritten.
    let history = [
        pending_put(0, 1, 10, 0),
        get(1, 1, Some(10), 5, 6),
        put(1, 1, 11, 7, 8),
        get(1, 1, Some(10), 9, 10),
    ];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);

    // A value cannot be read before the write was even called.
    let history = [get(1, 1, Some(10), 5, 6), pending_put(0, 1, 10, 7)];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);
}

#[test]
fn pending_reads_are_unconstrained() {
    let history = [
        pending_get(0, 1, 0),
        put(1, 1, 10, 1, 2),
        pending_get(2, 1, 3),
        get(1, 1, Some(10), 4, 5),
    ];
    assert_eq!(kv(&history), Outcome::Linearizable);
}

#[test]
fn many_pending_reads_do_not_blow_up_the_search() {
    let mut history: Vec<KvOp> = (0..200).map(|c| pending_get(c, 1, c)).collect();
    history.push(put(500, 1, 1, 0, 1000));
    history.push(get(500, 1, Some(2), 1001, 1002));
    // Every pending read is skipped, so the search is linear in the history.
    assert_eq!(check(&KvModel, &history, Some(10_000)), NOT_LINEARIZABLE);
}

#[test]
fn keys_are_checked_independently() {
    let history = [
        put(0, 1, 10, 0, 1),
        put(0, 2, 20, 2, 3),
        // Key 2 reads key 1's value: wrong for key 2, and not an excuse for
        // anything on key 1.
        get(1, 1, Some(10), 4, 5),
        get(1, 2, Some(10), 6, 7),
    ];
    assert_eq!(kv(&history), Outcome::NotLinearizable { partition: 1 });
    assert_eq!(KvModel::keys(&history), vec![1, 2]);

    // Partitions are numbered in ascending key order, whatever order the
    // keys first appear in.
    let history = [
        put(0, 7, 70, 0, 1),
        get(1, 7, Some(70), 2, 3),
        put(0, 3, 30, 4, 5),
        get(1, 3, Some(31), 6, 7),
    ];
    assert_eq!(kv(&history), Outcome::NotLinearizable { partition: 0 });
    assert_eq!(KvModel::keys(&history), vec![3, 7]);
}

#[test]
fn equal_times_overlap() {
    // A return at t and a call at t are concurrent: the read may come first.
    let history = [put(0, 1, 10, 0, 5), get(1, 1, None, 5, 6)];
    assert_eq!(kv(&history), Outcome::Linearizable);
    // One tick apart they are ordered.
    let history = [put(0, 1, 10, 0, 4), get(1, 1, None, 5, 6)];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);
}

#[test]
fn instantaneous_operations() {
    let history = [put(0, 1, 10, 3, 3), get(1, 1, Some(10), 3, 3)];
    assert_eq!(kv(&history), Outcome::Linearizable);
    let history = [put(0, 1, 10, 3, 3), get(1, 1, None, 3, 3)];
    assert_eq!(kv(&history), Outcome::Linearizable);
    let history = [put(0, 1, 10, 1, 1), get(1, 1, None, 2, 2)];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);
}

#[test]
fn output_of_the_wrong_kind_is_illegal() {
    let history = [Operation {
        client: 0,
        input: KvInput::Get { key: 1 },
        call: 0,
        output: Some(KvOutput::Put),
        ret: Some(1),
    }];
    assert_eq!(kv(&history), NOT_LINEARIZABLE);
}

/// Many concurrent writers, then one read of a value nobody wrote: the
/// search must explore every order of the writes before giving up.
fn hard_history() -> Vec<KvOp> {
    let mut history: Vec<KvOp> = (0..12).map(|c| put(c, 1, c, 0, 100)).collect();
    history.push(get(99, 1, Some(99), 101, 102));
    history
}

#[test]
fn step_budget_leaves_the_answer_undecided() {
    let history = hard_history();
    assert_eq!(check(&KvModel, &history, Some(0)), Outcome::Undecided);
    assert_eq!(check(&KvModel, &history, Some(100)), Outcome::Undecided);
    // Memoization keeps the full search small: 2^12 sets of writes, each
    // with one of a few last values.
    assert_eq!(check(&KvModel, &history, Some(1_000_000)), NOT_LINEARIZABLE);
}

#[test]
fn counterexample_names_the_failing_partition_and_its_longest_linearization() {
    let history = [
        put(0, 1, 10, 0, 1),
        put(0, 2, 20, 2, 3),
        get(1, 2, Some(20), 4, 5),
        get(1, 2, None, 6, 7),
        put(1, 2, 21, 8, 9),
    ];
    let Verdict::NotLinearizable(counterexample) = check_history(&KvModel, &history, None).unwrap()
    else {
        panic!("history is not linearizable");
    };
    assert_eq!(counterexample.partition, 1);
    assert_eq!(counterexample.operations, vec![1, 2, 3, 4]);
    assert_eq!(counterexample.longest_linearization, vec![1, 2]);
    let text = counterexample.render(&history);
    assert!(text.contains("partition 1 is not linearizable"), "{text}");
    assert!(
        text.contains("longest legal linearization: 2 of 4"),
        "{text}"
    );
    assert!(text.contains("Get(None)"), "{text}");
}

#[test]
fn malformed_histories_are_reported() {
    let mut history = vec![put(0, 1, 10, 5, 4)];
    assert_eq!(
        check_history(&KvModel, &history, None),
        Err(HistoryError::ReturnBeforeCall {
            index: 0,
            call: 5,
            ret: 4
        })
    );
    history[0].ret = None;
    assert_eq!(
        check_history(&KvModel, &history, None),
        Err(HistoryError::OutputWithoutReturn { index: 0 })
    );
}

#[test]
#[should_panic(expected = "malformed history")]
fn check_panics_on_malformed_history() {
    check(&KvModel, &[put(0, 1, 10, 5, 4)], None);
}

/// A model whose partitioning is broken.
struct OverlappingPartitions;

impl Model for OverlappingPartitions {
    type State = ();
    type Input = ();
    type Output = ();
    fn init(&self) {}
    fn step(&self, _: &(), _: &(), _: Option<&()>) -> Option<()> {
        Some(())
    }
    fn partition(&self, history: &[Operation<(), ()>]) -> Vec<Vec<usize>> {
        vec![(0..history.len()).collect(), vec![0]]
    }
}

#[test]
fn broken_partitioning_is_reported() {
    let history = [Operation {
        client: 0,
        input: (),
        call: 0,
        output: Some(()),
        ret: Some(1),
    }];
    assert_eq!(
        check_history(&OverlappingPartitions, &history, None),
        Err(HistoryError::DuplicateInPartitions { index: 0 })
    );
}

#[test]
fn unobserved_pending_operations_are_left_out_of_the_partitions() {
    let history = [
        pending_put(0, 1, 10, 0),
        pending_put(1, 1, 11, 0),
        pending_get(2, 1, 0),
        get(3, 1, Some(11), 1, 2),
        pending_put(4, 2, 20, 0),
    ];
    // The write of 10 and the read could not matter; the write of 11 was
    // observed. Key 2 keeps its (empty) partition.
    assert_eq!(KvModel.partition(&history), vec![vec![1, 3], vec![]]);
}

#[test]
fn many_unobserved_pending_writes_do_not_blow_up_the_search() {
    // Each of 40 timed-out writes may or may not have happened: 2^40
    // combinations for a plain search of a failing history.
    let mut history: Vec<KvOp> = (0..40).map(|c| pending_put(c, 1, c, 0)).collect();
    history.push(put(100, 1, 500, 10, 11));
    history.push(get(100, 1, Some(999), 12, 13));
    assert_eq!(check(&KvModel, &history, Some(1_000)), NOT_LINEARIZABLE);

    // One observed pending write is still considered.
    let last = history.len() - 1;
    history[last] = get(100, 1, Some(7), 12, 13);
    assert_eq!(
        check(&KvModel, &history, Some(1_000)),
        Outcome::Linearizable
    );
}
