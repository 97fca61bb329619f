//! Test plugin that never restores a snapshot: an upgrade to it must fail on
//! every replica and leave the old code and state in place. How it fails is
//! chosen by the counter the snapshot holds (a counter plugin's state), so
//! that one component covers every way: a count ending in 7 traps, one
//! ending in 8 loops forever (until fuel runs out), any other is refused
//! with an error.
//!
//! Wire format (postcard): `Command::Increment` = `[0]`; responses and the
//! `Query::Get` (`[0]`) answer are the counter as a varint.

use kythira_guest::{ApplyContext, RestoreError, StateMachine};
use serde::{Deserialize, Serialize};

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds one to the counter and answers the new value.
    Increment,
}

/// A query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Answers the counter.
    Get,
}

/// A counter whose snapshots can be taken but never restored.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRestore {
    count: u64,
}

impl StateMachine for BadRestore {
    type Command = Command;
    type Response = u64;
    type Query = Query;
    type QueryResponse = u64;
    type Error = String;

    fn apply(&mut self, _ctx: &ApplyContext, Command::Increment: Command) -> Result<u64, String> {
        self.count = self.count.wrapping_add(1);
        Ok(self.count)
    }

    fn query(&self, Query::Get: Query) -> Result<u64, String> {
        Ok(self.count)
    }

    fn restore(snapshot: &[u8]) -> Result<Self, RestoreError> {
        let count = kythira_guest::codec::decode::<BadRestore>(snapshot).map_or(0, |s| s.count);
        match count % 10 {
            7 => panic!("restore traps on a count ending in 7 ({count})"),
            8 => loop {
                std::hint::black_box(count);
            },
            _ => Err(RestoreError::Refused(
                "this plugin refuses every snapshot".to_owned(),
            )),
        }
    }
}

kythira_guest::export!(BadRestore);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::Raw;

    #[test]
    fn refuses_every_snapshot_and_keeps_its_state() {
        let mut raw = Raw::<BadRestore>::new();
        let ctx = ApplyContext {
            index: 1,
            term: 1,
            timestamp_ms: 0,
        };
        let increment = kythira_guest::codec::encode(&Command::Increment).unwrap();
        raw.apply(&ctx, &increment).unwrap();
        let before = raw.get_state().unwrap();

        let error = raw.restore_from_snapshot(&before).unwrap_err();
        assert_eq!(
            error,
            "snapshot refused: this plugin refuses every snapshot"
        );
        assert_eq!(raw.get_state().unwrap(), before);
        assert_eq!(raw.machine().count, 1);
    }
}
