//! Linearizability checker for concurrent histories.
//!
//! A history is a list of [`Operation`]s, each with the virtual time of its
//! call and (if it completed) of its return. [`check`] decides whether some
//! total order of the operations (a *linearization*) is legal for a sequential
//! [`Model`] and respects real time: an operation that returned before another
//! was called comes first.
//!
//! # Algorithm
//!
//! Wing–Gong–Lowe search with memoization, in the style of Porcupine:
//!
//! * The model splits the history into independent partitions (for a key-value
//!   store, one per key: linearizability is compositional, so checking each key
//!   alone is exact and shrinks the search exponentially). Each partition is
//!   checked on its own.
//! * A partition becomes a doubly linked list of call and return events sorted
//!   by time. The search repeatedly picks a call that precedes the first
//!   remaining return (an operation that may be linearized next), applies it to
//!   the model, and *lifts* its call and return out of the list. On reaching a
//!   return whose operation is not yet linearized it backtracks: pops the last
//!   choice, *unlifts* it (the removed nodes keep their links, so reinsertion
//!   is O(1)) and tries the next candidate.
//! * Two search paths that linearized the same set of operations and reached
//!   the same model state have the same future, so every (linearized set,
//!   state) pair is cached and never explored twice. The set is a bitset; its
//!   hash is maintained incrementally (Zobrist hashing), so a cache probe costs
//!   one hash of the model state and no allocation unless the pair is new.
//! * Pending operations are kept out of the cache key: a node is pruned when
//!   a node with the same completed set and state was reached with a
//!   *subset* of its pending operations, since that one can do everything
//!   this one can (it may simply never linearize the extra ones). Without
//!   pending operations this is plain memoization.
//!
//! # Semantics
//!
//! * **Pending operations** (`ret: None`) never completed: they may have taken
//!   effect at any point after their call, or not at all. They get no return
//!   event, so the search may linearize them anywhere after their call and
//!   succeeds as soon as every *completed* operation is linearized; a pending
//!   operation that is never chosen is one that did not take effect. The model
//!   sees such an operation with `output: None`. Pending operations that
//!   change the state can make a failing search exponential in their number
//!   per partition (each may or may not have happened), so a model's
//!   [`Model::partition`] should leave out those that cannot matter (the kv
//!   model drops pending reads and pending writes nobody read), and
//!   `max_steps` bounds the rest.
//! * **Equal times overlap.** A call at time `t` and a return at time `t` are
//!   treated as concurrent: at equal times, calls are ordered before returns
//!   (Porcupine's rule). This never reports a violation that a finer clock
//!   could explain away, and it allows instantaneous operations
//!   (`call == ret`). Give real-time order with strictly increasing times.
//! * **Budget.** `max_steps` bounds the total number of search steps over all
//!   partitions (one step is one visit of an event: an attempt to linearize a
//!   call, or a backtrack at a return); when it runs out the result is
//!   [`Outcome::Undecided`]. A history that never backtracks takes about one
//!   step per operation.
//!
//! # Example
//!
//! ```
//! use kythira_linearizability::kv::{KvInput, KvModel, KvOutput};
//! use kythira_linearizability::{Operation, Outcome, Verdict, check, check_history};
//!
//! let history = vec![
//!     // Client 1 writes 5 to key 7 and is acknowledged at time 10 ...
//!     Operation { client: 1, input: KvInput::Put { key: 7, value: 5 }, call: 0,
//!                 output: Some(KvOutput::Put), ret: Some(10) },
//!     // ... client 3's write of 6 never got a reply ...
//!     Operation { client: 3, input: KvInput::Put { key: 7, value: 6 }, call: 1,
//!                 output: None, ret: None },
//!     // ... and afterwards client 2 reads nothing: the acknowledged write is lost.
//!     Operation { client: 2, input: KvInput::Get { key: 7 }, call: 11,
//!                 output: Some(KvOutput::Get(None)), ret: Some(12) },
//! ];
//! assert_eq!(
//!     check(&KvModel, &history, Some(1_000_000)),
//!     Outcome::NotLinearizable { partition: 0 }
//! );
//! if let Ok(Verdict::NotLinearizable(counterexample)) = check_history(&KvModel, &history, None) {
//!     println!("{}", counterexample.render(&history));
//! }
//! ```
//!
//! Deliberately left out: parallel checking of partitions (callers check many
//! histories and parallelize across them) and models with nondeterministic
//! steps (a model returns at most one next state; a pending operation's
//! "did not happen" branch is handled by the checker).

mod history;
pub mod kv;
mod search;

use std::fmt::{self, Write as _};

pub use history::HistoryError;

/// A sequential specification of the object under test.
pub trait Model {
    /// State of one partition of the object.
    type State: Clone + Eq + std::hash::Hash + std::fmt::Debug;
    /// An operation's arguments.
    type Input: Clone + std::fmt::Debug;
    /// An operation's result.
    type Output: Clone + std::fmt::Debug;
    /// The state every partition starts in.
    fn init(&self) -> Self::State;
    /// Next state if `output` is a legal result of `input` in `state`; `output` is None when the operation never completed (it may or may not have taken effect).
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;
    /// Independent sub-histories (indices into the history), e.g. one per key. Default: one partition.
    ///
    /// Every index must be in range and appear at most once; operations in no
    /// partition are not checked.
    fn partition(&self, history: &[Operation<Self::Input, Self::Output>]) -> Vec<Vec<usize>> {
        vec![(0..history.len()).collect()]
    }
}

/// One operation of a concurrent history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation<I, O> {
    /// The client that issued the operation (informational: real-time order
    /// comes from the times alone).
    pub client: u64,
    /// The operation's arguments.
    pub input: I,
    /// Virtual time of the call.
    pub call: u64,
    /// The result; `Some` exactly when `ret` is `Some`.
    pub output: Option<O>,
    /// Virtual time of the return; `None` if the operation never completed.
    pub ret: Option<u64>,
}

/// Result of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every partition has a legal linearization.
    Linearizable,
    /// The partition with this index (in the order of [`Model::partition`])
    /// has no legal linearization.
    NotLinearizable {
        /// Index of the failing partition.
        partition: usize,
    },
    /// The step budget ran out before a decision.
    Undecided,
}

/// Detailed result of [`check_history`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every partition has a legal linearization.
    Linearizable,
    /// A partition has no legal linearization.
    NotLinearizable(Counterexample),
    /// The step budget ran out before a decision.
    Undecided,
}

impl Verdict {
    /// The summary [`Outcome`].
    pub fn outcome(&self) -> Outcome {
        match self {
            Verdict::Linearizable => Outcome::Linearizable,
            Verdict::NotLinearizable(c) => Outcome::NotLinearizable {
                partition: c.partition,
            },
            Verdict::Undecided => Outcome::Undecided,
        }
    }
}

/// Evidence that a partition is not linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counterexample {
    /// Index of the failing partition.
    pub partition: usize,
    /// The partition's operations (indices into the history).
    pub operations: Vec<usize>,
    /// The longest legal linearization of a prefix the search found, in
    /// linearization order (indices into the history). The operations of the
    /// partition that are neither in it nor pending are where it got stuck.
    pub longest_linearization: Vec<usize>,
}

impl Counterexample {
    /// A human-readable account: the partition's operations by call time and
    /// the longest legal linearization found.
    pub fn render<I: fmt::Debug, O: fmt::Debug>(&self, history: &[Operation<I, O>]) -> String {
        let mut ops = self.operations.clone();
        ops.sort_by_key(|&i| (history[i].call, i));
        let mut out = format!(
            "partition {} is not linearizable ({} operations)\n",
            self.partition,
            ops.len()
        );
        for &i in &ops {
            let op = &history[i];
            let ret = op
                .ret
                .map_or_else(|| "pending".to_owned(), |r| r.to_string());
            let order = self
                .longest_linearization
                .iter()
                .position(|&j| j == i)
                .map_or_else(|| "-".to_owned(), |p| format!("#{}", p + 1));
            // Writing into a String cannot fail.
            let _ = writeln!(
                out,
                "  op {i:>5} client {:>3} [{:>6}, {ret:>7}] {:?} -> {:?}  linearized: {order}",
                op.client, op.call, op.input, op.output
            );
        }
        let _ = writeln!(
            out,
            "longest legal linearization: {} of {} operations",
            self.longest_linearization.len(),
            ops.len()
        );
        out
    }
}

/// Checks `history` against `model`.
///
/// `max_steps` bounds the search over all partitions; `None` means unbounded.
///
/// # Panics
///
/// If the history is malformed (see [`HistoryError`]); use [`check_history`]
/// to get the error instead. Also if one partition has 2^31 operations or
/// more (the search indexes them with 32 bits).
pub fn check<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    max_steps: Option<u64>,
) -> Outcome {
    match check_history(model, history, max_steps) {
        Ok(verdict) => verdict.outcome(),
        Err(e) => panic!("malformed history: {e}"),
    }
}

/// Checks `history` against `model`, with a counterexample on failure.
///
/// Partitions are checked in order; the first one found not linearizable is
/// reported. `max_steps` bounds the search over all partitions.
///
/// # Panics
///
/// If one partition has 2^31 operations or more.
pub fn check_history<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    max_steps: Option<u64>,
) -> Result<Verdict, HistoryError> {
    history::validate_operations(history)?;
    let partitions = model.partition(history);
    history::validate_partitions(history.len(), &partitions)?;
    let mut budget = search::Budget::new(max_steps);
    for (index, operations) in partitions.into_iter().enumerate() {
        match search::check_partition(model, history, &operations, &mut budget) {
            search::PartitionResult::Linearizable => {}
            search::PartitionResult::Undecided => return Ok(Verdict::Undecided),
            search::PartitionResult::NotLinearizable {
                longest_linearization,
            } => {
                return Ok(Verdict::NotLinearizable(Counterexample {
                    partition: index,
                    operations,
                    longest_linearization,
                }));
            }
        }
    }
    Ok(Verdict::Linearizable)
}
