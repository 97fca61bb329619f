//! State machines shared by this crate's unit tests.

use serde::{Deserialize, Serialize};

use crate::{ApplyContext, StateMachine};

/// Appends to a list; answers the list's length; refuses zero.
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Journal(pub(crate) Vec<u32>);

impl StateMachine for Journal {
    type Command = u32;
    type Response = usize;
    type Query = ();
    type QueryResponse = Vec<u32>;
    type Error = String;

    fn apply(&mut self, ctx: &ApplyContext, value: u32) -> Result<usize, String> {
        if value == 0 {
            return Err(format!("zero refused at {}", ctx.timestamp_ms));
        }
        self.0.push(value);
        Ok(self.0.len())
    }

    fn query(&self, (): ()) -> Result<Vec<u32>, String> {
        Ok(self.0.clone())
    }
}
