//! Named counters: signed 64-bit integers addressed by byte-string names,
//! changed by checked additions.
//!
//! Commands, queries and responses are postcard encodings of [`Command`],
//! [`Query`] and `i64`; encode them with [`kythira_guest::codec`]. In JSON
//! (the daemon's API and CLI): `{"add": {"name": "hits", "delta": 5}}`,
//! `{"get": {"name": "hits"}}`, answered `5`.

use std::collections::BTreeMap;

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// A command, applied through the replicated log. Every command answers the
/// counter's value after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Adds `delta` (possibly negative) to the counter `name`, which starts
    /// at zero. Refused, changing nothing, if the result would overflow.
    Add {
        #[serde(with = "kythira_guest::bytes")]
        name: Vec<u8>,
        delta: i64,
    },
    /// Sets the counter `name` to `value`.
    Set {
        #[serde(with = "kythira_guest::bytes")]
        name: Vec<u8>,
        value: i64,
    },
    /// Removes the counter `name`, which reads as zero afterwards.
    Reset {
        #[serde(with = "kythira_guest::bytes")]
        name: Vec<u8>,
    },
}

/// A read-only request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Query {
    /// Answers the counter `name` (zero if it was never set).
    Get {
        #[serde(with = "kythira_guest::bytes")]
        name: Vec<u8>,
    },
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CounterError {
    #[error("adding {delta} to {current} overflows")]
    Overflow { current: i64, delta: i64 },
}

/// The counters. Zero counters are not stored, so every state has exactly one
/// representation.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    values: BTreeMap<Vec<u8>, i64>,
}

impl Counters {
    /// The value of counter `name`.
    #[must_use]
    pub fn get(&self, name: &[u8]) -> i64 {
        self.values.get(name).copied().unwrap_or(0)
    }

    fn set(&mut self, name: Vec<u8>, value: i64) -> i64 {
        if value == 0 {
            self.values.remove(&name);
        } else {
            self.values.insert(name, value);
        }
        value
    }
}

impl StateMachine for Counters {
    type Command = Command;
    type Response = i64;
    type Query = Query;
    type QueryResponse = i64;
    type Error = CounterError;

    fn apply(&mut self, _ctx: &ApplyContext, command: Command) -> Result<i64, CounterError> {
        match command {
            Command::Add { name, delta } => {
                let current = self.get(&name);
                let value = current
                    .checked_add(delta)
                    .ok_or(CounterError::Overflow { current, delta })?;
                Ok(self.set(name, value))
            }
            Command::Set { name, value } => Ok(self.set(name, value)),
            Command::Reset { name } => Ok(self.set(name, 0)),
        }
    }

    fn query(&self, Query::Get { name }: Query) -> Result<i64, CounterError> {
        Ok(self.get(&name))
    }
}

kythira_guest::export!(Counters);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    fn add(name: &[u8], delta: i64) -> Command {
        Command::Add {
            name: name.to_vec(),
            delta,
        }
    }

    fn get(name: &[u8]) -> Query {
        Query::Get {
            name: name.to_vec(),
        }
    }

    #[test]
    fn adds_sets_and_resets() {
        let mut counters = Harness::<Counters>::new();
        assert_eq!(counters.query(&get(b"hits")), Ok(0));
        assert_eq!(counters.apply(&add(b"hits", 5)), Ok(5));
        assert_eq!(counters.apply(&add(b"hits", -7)), Ok(-2));
        assert_eq!(counters.apply(&add(b"misses", 1)), Ok(1));
        assert_eq!(
            counters.apply(&Command::Set {
                name: b"misses".to_vec(),
                value: 40
            }),
            Ok(40)
        );
        assert_eq!(counters.query(&get(b"hits")), Ok(-2));
        assert_eq!(
            counters.apply(&Command::Reset {
                name: b"hits".to_vec()
            }),
            Ok(0)
        );
        assert_eq!(counters.query(&get(b"hits")), Ok(0));
        assert_eq!(counters.query(&get(b"misses")), Ok(40));
        counters.assert_deterministic();
        counters.assert_snapshot_transparent();
    }

    #[test]
    fn refuses_overflow_and_changes_nothing() {
        let mut counters = Harness::<Counters>::new();
        counters.apply(&add(b"n", i64::MAX)).unwrap();
        let before = counters.state();
        assert_eq!(
            counters.apply(&add(b"n", 1)),
            Err(format!("adding 1 to {} overflows", i64::MAX))
        );
        assert_eq!(counters.state(), before);
        assert_eq!(counters.apply(&add(b"n", -i64::MAX)), Ok(0));
        counters.assert_deterministic();
    }

    #[test]
    fn speaks_json_with_names_as_text() {
        let mut counters = Harness::<Counters>::new();
        assert_eq!(
            counters.apply_json(r#"{"add":{"name":"hits","delta":5}}"#),
            Ok("5".to_owned())
        );
        assert_eq!(
            counters.apply_json(r#"{"set":{"name":"hits","value":-2}}"#),
            Ok("-2".to_owned())
        );
        assert_eq!(
            counters.query_json(r#"{"get":{"name":"hits"}}"#),
            Ok("-2".to_owned())
        );
        assert_eq!(
            counters.apply_json(r#"{"reset":{"name":"hits"}}"#),
            Ok("0".to_owned())
        );
        // The bytes are those of the typed command.
        assert_eq!(
            counters.log()[0].command,
            kythira_guest::codec::encode(&add(b"hits", 5)).unwrap()
        );
        counters.assert_deterministic();
    }

    #[test]
    fn zero_is_not_stored_so_equal_counters_snapshot_equally() {
        let mut touched = Harness::<Counters>::new();
        touched.apply(&add(b"n", 3)).unwrap();
        touched.apply(&add(b"n", -3)).unwrap();
        assert_eq!(touched.state(), Harness::<Counters>::new().state());
    }
}
