//! The replicated key/value state machine the simulated clients use.

use std::collections::{HashMap, HashSet};

use kythira_raft::Bytes;

/// A put as it travels in a log entry: the operation id makes every entry
/// unique and lets the simulator match applications to client requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutCommand {
    /// Index of the operation in the history.
    pub op: u64,
    /// Key written.
    pub key: u64,
    /// Value written.
    pub value: u64,
}

impl PutCommand {
    /// Encoded entry payload.
    pub fn encode(&self) -> Bytes {
        let mut b = Vec::with_capacity(24);
        for x in [self.op, self.key, self.value] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        Bytes::from(b)
    }

    /// Decode a payload; `None` if it is not a put.
    pub fn decode(data: &[u8]) -> Option<Self> {
        let word = |i: usize| {
            Some(u64::from_le_bytes(
                data.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        (data.len() == 24).then_some(())?;
        Some(Self {
            op: word(0)?,
            key: word(1)?,
            value: word(2)?,
        })
    }
}

/// The state machine of one node. A retried put carries the same operation
/// id as its first attempt, and an operation takes effect once however many
/// of its attempts are committed: what the host's client sessions provide.
#[derive(Clone, Debug, Default)]
pub struct KvStore {
    values: HashMap<u64, u64>,
    applied_ops: HashSet<u64>,
}

impl KvStore {
    /// Apply a put; `false` if its operation already took effect.
    pub fn apply(&mut self, cmd: &PutCommand) -> bool {
        if !self.applied_ops.insert(cmd.op) {
            return false;
        }
        self.values.insert(cmd.key, cmd.value);
        true
    }

    /// Current value of `key`.
    pub fn get(&self, key: u64) -> Option<u64> {
        self.values.get(&key).copied()
    }
}
