//! Test plugin whose `Loop` command never returns: the host must stop it by
//! exhausting its fuel and roll the state back.
//!
//! Wire format (postcard): `Command::Increment` = `[0]`, `Command::Loop` = `[1]`;
//! responses and the `Query::Get` (`[0]`) answer are the counter as a varint.

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds one to the counter and answers the new value.
    Increment,
    /// Adds one to the counter, then loops forever.
    Loop,
}

/// A query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Answers the counter.
    Get,
}

/// A counter: the state a runaway `Loop` must not leave changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Looper {
    count: u64,
}

impl StateMachine for Looper {
    type Command = Command;
    type Response = u64;
    type Query = Query;
    type QueryResponse = u64;
    type Error = String;

    fn apply(&mut self, _ctx: &ApplyContext, command: Command) -> Result<u64, String> {
        self.count = self.count.wrapping_add(1);
        if command == Command::Loop {
            // Changes the state on every turn so that nothing can prove the
            // loop dead and remove it.
            loop {
                self.count = std::hint::black_box(self.count.wrapping_add(1));
            }
        }
        Ok(self.count)
    }

    fn query(&self, Query::Get: Query) -> Result<u64, String> {
        Ok(self.count)
    }
}

kythira_guest::export!(Looper);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    #[test]
    fn increments_natively() {
        let mut harness = Harness::<Looper>::new();
        assert_eq!(harness.apply(&Command::Increment), Ok(1));
        assert_eq!(harness.apply(&Command::Increment), Ok(2));
        assert_eq!(harness.query(&Query::Get), Ok(2));
        harness.assert_snapshot_round_trip();
    }
}
