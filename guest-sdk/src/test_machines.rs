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

/// Counts items by name: commands and queries in the JSON shape plugins are
/// meant to have (snake-case variants, byte strings as text), and one answer
/// with no JSON form (a map keyed by bytes).
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct Shelf(pub(crate) std::collections::BTreeMap<Vec<u8>, u64>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ShelfCommand {
    Add {
        #[serde(with = "crate::bytes")]
        item: Vec<u8>,
        count: u64,
    },
    Clear,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ShelfQuery {
    Count {
        #[serde(with = "crate::bytes")]
        item: Vec<u8>,
    },
    All,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ShelfAnswer {
    Count(u64),
    All(std::collections::BTreeMap<Vec<u8>, u64>),
}

impl StateMachine for Shelf {
    type Command = ShelfCommand;
    type Response = u64;
    type Query = ShelfQuery;
    type QueryResponse = ShelfAnswer;
    type Error = String;

    fn apply(&mut self, _ctx: &ApplyContext, command: ShelfCommand) -> Result<u64, String> {
        match command {
            ShelfCommand::Add { item, count } => {
                let stock = self.0.entry(item).or_default();
                *stock = stock.checked_add(count).ok_or("stock overflows")?;
                Ok(*stock)
            }
            ShelfCommand::Clear => {
                self.0.clear();
                Ok(0)
            }
        }
    }

    fn query(&self, query: ShelfQuery) -> Result<ShelfAnswer, String> {
        Ok(match query {
            ShelfQuery::Count { item } => {
                ShelfAnswer::Count(self.0.get(&item).copied().unwrap_or(0))
            }
            ShelfQuery::All => ShelfAnswer::All(self.0.clone()),
        })
    }

    /// Also takes a bare string as shorthand for adding one of that item.
    fn command_from_json(json: &str) -> Result<ShelfCommand, String> {
        match serde_json::from_str::<String>(json) {
            Ok(item) if item != "clear" => Ok(ShelfCommand::Add {
                item: item.into_bytes(),
                count: 1,
            }),
            _ => serde_json::from_str(json).map_err(|e| e.to_string()),
        }
    }
}
