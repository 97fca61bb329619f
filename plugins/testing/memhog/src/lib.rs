//! Test plugin whose `Hog` command allocates memory until the host's memory
//! limit stops it; the host must then roll the state back.
//!
//! Its JSON translation misbehaves the same way: translating the command
//! `"hog"` from JSON allocates without bound, and the host's memory limit
//! must stop that translation too (`"increment"` translates normally).
//!
//! Wire format (postcard): `Command::Increment` = `[0]`, `Command::Hog` = `[1]`;
//! responses and the `Query::Get` (`[0]`) answer are the counter as a varint.

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// Bytes allocated (and touched) per step of `Hog`.
const CHUNK: usize = 64 * 1024;

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Adds one to the counter and answers the new value.
    Increment,
    /// Adds one to the counter, then allocates without bound.
    Hog,
}

/// A query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    /// Answers the counter.
    Get,
}

/// A counter: the state a failed `Hog` must not leave changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memhog {
    count: u64,
}

/// Allocates until the host stops the call.
fn hog() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Filled with non-zero bytes and passed through black_box so the
        // pages are really written and the allocation is not elided.
        hoard.push(std::hint::black_box(vec![0xA5; CHUNK]));
    }
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
            hog();
        }
        Ok(self.count)
    }

    fn query(&self, Query::Get: Query) -> Result<u64, String> {
        Ok(self.count)
    }

    /// Translating `"hog"` allocates without bound, like applying it.
    fn command_from_json(json: &str) -> Result<Command, String> {
        let command: Command = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if command == Command::Hog {
            hog();
        }
        Ok(command)
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

    #[test]
    fn other_commands_translate_from_json() {
        let mut harness = Harness::<Memhog>::new();
        assert_eq!(harness.apply_json(r#""increment""#), Ok("1".to_owned()));
        assert_eq!(harness.query_json(r#""get""#), Ok("1".to_owned()));
        assert!(harness.apply_json(r#""decrement""#).is_err());
    }
}
