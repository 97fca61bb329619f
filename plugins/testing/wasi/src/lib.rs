//! Test plugin that reads the environment and the clock and prints: built for
//! `wasm32-wasip2`, its component imports `wasi:*` interfaces, and the host
//! must refuse to deploy it. Natively it is an ordinary (nondeterministic)
//! counter, which is exactly what a plugin must not be.
//!
//! Wire format (postcard): `Command::Increment` = `[0]`; responses and the
//! `Query::Get` (`[0]`) answer are the counter as a varint.

use std::time::{SystemTime, UNIX_EPOCH};

use kythira_guest::{ApplyContext, StateMachine};
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

/// A counter that also looks at its environment and the wall clock.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wasi {
    count: u64,
}

impl StateMachine for Wasi {
    type Command = Command;
    type Response = u64;
    type Query = Query;
    type QueryResponse = u64;
    type Error = String;

    fn apply(&mut self, _ctx: &ApplyContext, Command::Increment: Command) -> Result<u64, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?;
        let home = std::env::var("HOME").unwrap_or_default();
        println!("increment at {now:?} with HOME={home}");
        self.count = self.count.wrapping_add(1);
        Ok(self.count)
    }

    fn query(&self, Query::Get: Query) -> Result<u64, String> {
        Ok(self.count)
    }
}

kythira_guest::export!(Wasi);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    #[test]
    fn increments_natively() {
        let mut harness = Harness::<Wasi>::new();
        assert_eq!(harness.apply(&Command::Increment), Ok(1));
        assert_eq!(harness.query(&Query::Get), Ok(1));
    }
}
