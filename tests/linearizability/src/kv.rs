//! A key-value register map: `Get` and `Put` on `u64` keys and values.
//!
//! Keys are independent, so [`KvModel`] partitions a history by key (in
//! ascending key order) and a partition's state is the value of its key.
//!
//! Pending operations that cannot affect the verdict are left out of the
//! partitions, because each pending write that changes the state doubles the
//! search space of a failing history:
//!
//! * a pending read has no effect;
//! * a pending write of a value no completed read of its key returned is
//!   unobserved. In a legal order, the operation after it on its key is a
//!   write or nothing (a read would return its value), so dropping it leaves
//!   a legal order. It may have taken effect; it just makes no difference.

use std::collections::{BTreeMap, HashSet};

use crate::{Model, Operation};

/// Sequential specification of a key-value map whose keys start absent.
#[derive(Clone, Copy, Debug, Default)]
pub struct KvModel;

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvInput {
    /// Read the key's value.
    Get {
        /// The key read.
        key: u64,
    },
    /// Set the key's value.
    Put {
        /// The key written.
        key: u64,
        /// The value written.
        value: u64,
    },
}

impl KvInput {
    /// The key the operation touches.
    pub fn key(&self) -> u64 {
        match *self {
            KvInput::Get { key } | KvInput::Put { key, .. } => key,
        }
    }
}

/// The result of a [`KvInput`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvOutput {
    /// The value read; `None` if the key was absent.
    Get(Option<u64>),
    /// The write was acknowledged.
    Put,
}

impl KvModel {
    /// The key of each partition, in the order [`Model::partition`] returns
    /// them (so `keys(history)[p]` names the partition in
    /// [`crate::Outcome::NotLinearizable`]).
    pub fn keys(history: &[Operation<KvInput, KvOutput>]) -> Vec<u64> {
        by_key(history).into_keys().collect()
    }
}

fn by_key(history: &[Operation<KvInput, KvOutput>]) -> BTreeMap<u64, Vec<usize>> {
    let mut partitions: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        partitions.entry(op.input.key()).or_default().push(i);
    }
    partitions
}

impl Model for KvModel {
    /// The key's value; `None` while absent.
    type State = Option<u64>;
    type Input = KvInput;
    type Output = KvOutput;

    fn init(&self) -> Option<u64> {
        None
    }

    fn step(
        &self,
        state: &Option<u64>,
        input: &KvInput,
        output: Option<&KvOutput>,
    ) -> Option<Option<u64>> {
        match (input, output) {
            (KvInput::Get { .. }, None) => Some(*state),
            (KvInput::Get { .. }, Some(KvOutput::Get(read))) => (read == state).then_some(*state),
            (KvInput::Put { value, .. }, None | Some(KvOutput::Put)) => Some(Some(*value)),
            // An output of the wrong kind is never legal.
            (KvInput::Get { .. }, Some(KvOutput::Put))
            | (KvInput::Put { .. }, Some(KvOutput::Get(_))) => None,
        }
    }

    fn partition(&self, history: &[Operation<KvInput, KvOutput>]) -> Vec<Vec<usize>> {
        let observed: HashSet<(u64, u64)> = history
            .iter()
            .filter_map(|op| match (&op.input, &op.output) {
                (KvInput::Get { key }, Some(KvOutput::Get(Some(value)))) => Some((*key, *value)),
                _ => None,
            })
            .collect();
        let matters = |op: &Operation<KvInput, KvOutput>| match op.input {
            _ if op.ret.is_some() => true,
            KvInput::Get { .. } => false,
            KvInput::Put { key, value } => observed.contains(&(key, value)),
        };
        // Every key keeps its partition, even an empty one, so partition
        // numbers match `KvModel::keys`.
        by_key(history)
            .into_values()
            .map(|mut ops| {
                ops.retain(|&i| matters(&history[i]));
                ops
            })
            .collect()
    }
}
