//! A register: one byte-string value, stamped with the log time and index of
//! the command that set it.
//!
//! Commands, queries and responses are postcard encodings of [`Command`],
//! [`Query`] and the response types; encode them with
//! [`kythira_guest::codec`]. Clients of the daemon write them as JSON, which
//! the SDK translates with serde_json over the same types:
//! `{"set": {"value": "hello"}}`, `"clear"`, `"get"`. The serde attributes
//! below shape that JSON and leave the postcard bytes alone.

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// The largest value a `Set` may store.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// A command, applied through the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Stores `value`; answers the previous value.
    Set {
        /// A string in JSON if it is UTF-8, `{"hex": "…"}` otherwise.
        #[serde(with = "kythira_guest::bytes")]
        value: Vec<u8>,
    },
    /// Empties the register; answers the previous value.
    Clear,
}

/// A read-only request, answered without going through the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    /// Answers the current value.
    Get,
}

/// A stored value and when it was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    #[serde(with = "kythira_guest::bytes")]
    pub value: Vec<u8>,
    /// Log time of the `Set`: the leader's timestamp, never a local clock.
    pub set_at_ms: u64,
    /// Log index of the `Set`.
    pub set_at_index: u64,
}

/// The whole state. It is serialized with postcard for snapshots, so keep it
/// canonical: `BTreeMap`/`BTreeSet`, never `HashMap`/`HashSet`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMachine {
    current: Option<Stamped>,
}

impl StateMachine for TemplateMachine {
    type Command = Command;
    type Response = Option<Stamped>;
    type Query = Query;
    type QueryResponse = Option<Stamped>;
    type Error = String;

    fn apply(&mut self, ctx: &ApplyContext, command: Command) -> Result<Option<Stamped>, String> {
        match command {
            Command::Set { value } => {
                // Validate before mutating: the host does not undo changes
                // made before an error.
                if value.len() > MAX_VALUE_LEN {
                    return Err(format!(
                        "value of {} bytes exceeds {MAX_VALUE_LEN}",
                        value.len()
                    ));
                }
                Ok(self.current.replace(Stamped {
                    value,
                    set_at_ms: ctx.timestamp_ms,
                    set_at_index: ctx.index,
                }))
            }
            Command::Clear => Ok(self.current.take()),
        }
    }

    fn query(&self, Query::Get: Query) -> Result<Option<Stamped>, String> {
        Ok(self.current.clone())
    }
}

#[cfg(feature = "component")]
kythira_guest::export!(TemplateMachine);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    #[test]
    fn set_get_clear() {
        let mut register = Harness::<TemplateMachine>::new();
        assert_eq!(register.query(&Query::Get), Ok(None));
        register.advance_ms(1_000);
        let set = Command::Set {
            value: b"hello".to_vec(),
        };
        assert_eq!(register.apply(&set), Ok(None));
        let stamped = Stamped {
            value: b"hello".to_vec(),
            set_at_ms: 1_000,
            set_at_index: 1,
        };
        assert_eq!(register.query(&Query::Get), Ok(Some(stamped.clone())));
        assert_eq!(register.apply(&Command::Clear), Ok(Some(stamped)));
        assert_eq!(register.query(&Query::Get), Ok(None));
    }

    #[test]
    fn speaks_json() {
        let mut register = Harness::<TemplateMachine>::new();
        register.advance_ms(1_000);
        assert_eq!(
            register.apply_json(r#"{"set":{"value":"hello"}}"#),
            Ok("null".to_owned())
        );
        assert_eq!(
            register.query_json(r#""get""#),
            Ok(r#"{"value":"hello","set_at_ms":1000,"set_at_index":1}"#.to_owned())
        );
        assert!(register.apply_json(r#"{"set":{}}"#).is_err());
        assert!(register.apply_json(r#""clear""#).is_ok());
    }

    #[test]
    fn refuses_oversized_values_without_changing_state() {
        let mut register = Harness::<TemplateMachine>::new();
        register
            .apply(&Command::Set {
                value: b"kept".to_vec(),
            })
            .unwrap();
        let before = register.state();
        let oversized = Command::Set {
            value: vec![0; MAX_VALUE_LEN + 1],
        };
        assert!(register.apply(&oversized).is_err());
        assert_eq!(register.state(), before);
    }

    #[test]
    fn replicas_agree() {
        let mut register = Harness::<TemplateMachine>::new();
        for i in 0u8..20 {
            register.advance_ms(10);
            let command = if i % 5 == 4 {
                Command::Clear
            } else {
                Command::Set { value: vec![i; 3] }
            };
            register.apply(&command).unwrap();
        }
        register.assert_snapshot_round_trip();
        register.assert_deterministic();
        register.assert_snapshot_transparent();
    }
}
