//! Test plugin that panics (traps, in the component) on `Panic`: the host must
//! turn the trap into an error result and roll the state back.
//!
//! Wire format (postcard): `Command::Increment` = `[0]`, `Command::Panic` = `[1]`;
//! responses and the `Query::Get` (`[0]`) answer are the counter as a varint.

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds one to the counter and answers the new value.
    Increment,
    /// Adds one to the counter, then panics.
    Panic,
}

/// A query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Answers the counter.
    Get,
}

/// A counter: the state a panicking command must not leave changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Panicker {
    count: u64,
}

impl StateMachine for Panicker {
    type Command = Command;
    type Response = u64;
    type Query = Query;
    type QueryResponse = u64;
    type Error = String;

    fn apply(&mut self, _ctx: &ApplyContext, command: Command) -> Result<u64, String> {
        self.count = self.count.wrapping_add(1);
        assert!(
            command != Command::Panic,
            "panicking on request at count {}",
            self.count
        );
        Ok(self.count)
    }

    fn query(&self, Query::Get: Query) -> Result<u64, String> {
        Ok(self.count)
    }
}

kythira_guest::export!(Panicker);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    #[test]
    fn increments_natively() {
        let mut harness = Harness::<Panicker>::new();
        assert_eq!(harness.apply(&Command::Increment), Ok(1));
        assert_eq!(harness.query(&Query::Get), Ok(1));
        harness.assert_snapshot_round_trip();
    }

    #[test]
    #[should_panic(expected = "panicking on request at count 2")]
    fn panics_on_request() {
        let mut harness = Harness::<Panicker>::new();
        harness.apply(&Command::Increment).unwrap();
        let _ = harness.apply(&Command::Panic);
    }
}
