//! Test plugin whose `Loop` command never returns: the host must stop it by
//! exhausting its fuel and roll the state back.
//!
//! Its JSON translation misbehaves the same way: translating the command
//! `"loop"` from JSON never returns either, and the host must stop that
//! translation by fuel too (`"increment"` translates normally).
//!
//! Wire format (postcard): `Command::Increment` = `[0]`, `Command::Loop` = `[1]`;
//! responses and the `Query::Get` (`[0]`) answer are the counter as a varint.

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Adds one to the counter and answers the new value.
    Increment,
    /// Adds one to the counter, then loops forever.
    Loop,
}

/// A query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

    /// Translating `"loop"` loops forever, like applying it.
    fn command_from_json(json: &str) -> Result<Command, String> {
        let command: Command = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if command == Command::Loop {
            let mut turns = 0u64;
            loop {
                turns = std::hint::black_box(turns.wrapping_add(1));
            }
        }
        Ok(command)
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

    #[test]
    fn other_commands_translate_from_json() {
        let mut harness = Harness::<Looper>::new();
        assert_eq!(harness.apply_json(r#""increment""#), Ok("1".to_owned()));
        assert_eq!(harness.query_json(r#""get""#), Ok("1".to_owned()));
        assert!(harness.apply_json(r#""decrement""#).is_err());
    }
}
