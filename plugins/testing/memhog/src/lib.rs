//! Test plugin whose `Hog` command allocates memory until the host's memory
//! limit stops it; the host must then roll the state back.
//!
//! Wire format (postcard): `Command::Increment` = `[0]`, `Command::Hog` = `[1]`;
//! responses and the `Query::Get` (`[0]`) answer are the counter as a varint.

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// Bytes allocated (and touched) per step of `Hog`.
const CHUNK: usize = 64 * 1024;

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds one to the counter and answers the new value.
    Increment,
    /// Adds one to the counter, then allocates without bound.
    Hog,
}

/// A query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Answers the counter.
    Get,
}

/// A counter: the state a failed `Hog` must not leave changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memhog {
    count: u64,
}

impl StateMachine for Memhog {
    type Command = Command;
    type Response = u64;
    type Query = Query;
    type QueryResponse = u64;
    type Error = String;

    fn apply(&mut self, _ctx: &ApplyContext, command: Command) -> Result<u64, String> {
        self.count = self.count.wrapping_add(1);
        if command == Command::Hog {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // Filled with non-zero bytes and passed through black_box so the
                // pages are really written and the allocation is not elided.
                hoard.push(std::hint::black_box(vec![0xA5; CHUNK]));
            }
        }
        Ok(self.count)
    }

    fn query(&self, Query::Get: Query) -> Result<u64, String> {
        Ok(self.count)
    }
}

kythira_guest::export!(Memhog);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    #[test]
    fn increments_natively() {
        let mut harness = Harness::<Memhog>::new();
        assert_eq!(harness.apply(&Command::Increment), Ok(1));
        assert_eq!(harness.query(&Query::Get), Ok(1));
        harness.assert_snapshot_round_trip();
    }
}
