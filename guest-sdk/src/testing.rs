//! A native test harness for plugins.
//!
//! [`Harness`] drives a [`StateMachine`] the way the host drives the
//! component — commands encoded with [`codec`], applied through
//! [`Raw`] with a log index and a log time — and records what it applied, so a
//! test can then check the properties every replica relies on:
//!
//! - [`assert_snapshot_round_trip`](Harness::assert_snapshot_round_trip):
//!   restoring the snapshot gives a state with the same snapshot;
//! - [`assert_deterministic`](Harness::assert_deterministic): replaying the
//!   recorded log on fresh instances gives byte-identical responses and state;
//! - [`assert_snapshot_transparent`](Harness::assert_snapshot_transparent):
//!   a replica that restores a snapshot at any point of the log and applies
//!   the rest ends exactly where one that applied everything does.
//!
//! [`upgrade`](Harness::upgrade) hands the state over to another version of
//! the plugin as an upgrade entry does, to test a migration before deploying
//! it.
//!
//! ```
//! # use kythira_guest::{ApplyContext, StateMachine};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Default, Serialize, Deserialize)]
//! # struct Counter(u64);
//! # impl StateMachine for Counter {
//! #     type Command = u64;
//! #     type Response = u64;
//! #     type Query = ();
//! #     type QueryResponse = u64;
//! #     type Error = String;
//! #     fn apply(&mut self, _: &ApplyContext, add: u64) -> Result<u64, String> {
//! #         self.0 = self.0.checked_add(add).ok_or("overflow")?;
//! #         Ok(self.0)
//! #     }
//! #     fn query(&self, (): ()) -> Result<u64, String> { Ok(self.0) }
//! # }
//! use kythira_guest::testing::Harness;
//!
//! let mut harness = Harness::<Counter>::new();
//! assert_eq!(harness.apply(&2), Ok(2));
//! harness.advance_ms(1_000);
//! assert_eq!(harness.apply(&3), Ok(5));
//! assert_eq!(harness.apply(&u64::MAX), Err("overflow".to_owned()));
//! assert_eq!(harness.query(&()), Ok(5));
//! harness.assert_snapshot_round_trip();
//! harness.assert_deterministic();
//! harness.assert_snapshot_transparent();
//! ```

use crate::codec;
use crate::raw::Raw;
use crate::state_machine::{ApplyContext, StateMachine};

/// The term every harness entry carries: a harness models one stable leader.
const TERM: u64 = 1;

/// One command the harness applied, as the host would have seen it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The entry's position and log time.
    pub ctx: ApplyContext,
    /// The encoded command.
    pub command: Vec<u8>,
    /// The encoded response, or the refusal.
    pub response: Result<Vec<u8>, String>,
}

/// Drives a state machine natively through the same byte-level path as the
/// component, recording every applied command.
///
/// Log indexes start at 1 and grow by one per command; log time starts at 0
/// and moves only when the test calls [`advance_ms`](Self::advance_ms).
///
/// The `assert_*` methods panic with a description of the first difference
/// found, which is what a failing test should do.
#[derive(Debug)]
pub struct Harness<T> {
    raw: Raw<T>,
    next: ApplyContext,
    log: Vec<Applied>,
    /// The state the recorded log starts from: `None` for `T::default()`,
    /// the restored bytes for a harness made by [`upgrade`](Self::upgrade).
    /// Replays start from it, or they would not be replays of this log.
    base: Option<Vec<u8>>,
}

impl<T: StateMachine> Default for Harness<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: StateMachine> Harness<T> {
    /// A harness around a state machine in its initial state, at log time 0.
    #[must_use]
    pub fn new() -> Self {
        Self {
            raw: Raw::new(),
            next: ApplyContext {
                index: 1,
                term: TERM,
                timestamp_ms: 0,
            },
            log: Vec::new(),
            base: None,
        }
    }

    /// Upgrades to another version of the plugin, as every replica does at
    /// an upgrade entry: `U` restores this harness's current state (the old
    /// version's `get-state`, the new one's `restore-from-snapshot`). The
    /// upgrade entry takes the next log index, so `U`'s first command comes
    /// right after it, at the same log time.
    ///
    /// This harness is left as it was, so a test can keep applying the same
    /// commands to both versions and compare. The new harness's log starts
    /// empty; its checks replay it from the restored state.
    ///
    /// # Errors
    ///
    /// `U`'s refusal of the state: on a cluster the upgrade would fail and
    /// the old version would keep running.
    ///
    /// # Panics
    ///
    /// If this harness's state cannot be encoded.
    pub fn upgrade<U: StateMachine>(&self) -> Result<Harness<U>, String> {
        let state = self.state();
        let mut raw = Raw::<U>::new();
        raw.restore_from_snapshot(&state)?;
        let mut next = self.next;
        next.index += 1;
        Ok(Harness {
            raw,
            next,
            log: Vec::new(),
            base: Some(state),
        })
    }

    /// The typed state.
    #[must_use]
    pub fn machine(&self) -> &T {
        self.raw.machine()
    }

    /// The context the next command will be applied with.
    #[must_use]
    pub fn next_context(&self) -> ApplyContext {
        self.next
    }

    /// Moves log time forward by `ms` milliseconds.
    ///
    /// # Panics
    ///
    /// If log time would overflow `u64`.
    pub fn advance_ms(&mut self, ms: u64) {
        self.next.timestamp_ms = self
            .next
            .timestamp_ms
            .checked_add(ms)
            .expect("log time overflows u64");
    }

    /// Encodes `command`, applies it as the next log entry and decodes the
    /// response.
    ///
    /// # Errors
    ///
    /// The plugin's refusal, as the client would receive it.
    ///
    /// # Panics
    ///
    /// If the command cannot be encoded or the response does not decode as
    /// `T::Response` (both are bugs in the plugin's types).
    pub fn apply(&mut self, command: &T::Command) -> Result<T::Response, String> {
        let command = codec::encode(command).expect("command cannot be encoded");
        self.apply_bytes(&command)
            .map(|response| codec::decode(&response).expect("response does not decode"))
    }

    /// Applies already-encoded command bytes as the next log entry, e.g. to
    /// check how the plugin treats malformed input.
    ///
    /// # Errors
    ///
    /// The plugin's refusal, or why the bytes are not a command.
    pub fn apply_bytes(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        let ctx = self.next;
        let response = self.raw.apply(&ctx, command);
        self.log.push(Applied {
            ctx,
            command: command.to_vec(),
            response: response.clone(),
        });
        self.next.index += 1;
        response
    }

    /// Encodes `query`, answers it and decodes the answer.
    ///
    /// # Errors
    ///
    /// The plugin's refusal.
    ///
    /// # Panics
    ///
    /// If the query cannot be encoded or the answer does not decode as
    /// `T::QueryResponse`.
    pub fn query(&self, query: &T::Query) -> Result<T::QueryResponse, String> {
        let query = codec::encode(query).expect("query cannot be encoded");
        self.raw
            .query(&query)
            .map(|answer| codec::decode(&answer).expect("query response does not decode"))
    }

    /// Translates `json` into a command as the host does for a client
    /// ([`Raw::command_from_json`]), applies it as the next log entry and
    /// translates the response back ([`Raw::response_to_json`]).
    ///
    /// # Errors
    ///
    /// Why the JSON is not a command (nothing is applied then), or the
    /// plugin's refusal.
    ///
    /// # Panics
    ///
    /// If a successful response does not translate into JSON.
    pub fn apply_json(&mut self, json: &str) -> Result<String, String> {
        let command = Raw::<T>::command_from_json(json)?;
        let response = self.apply_bytes(&command)?;
        Ok(Raw::<T>::response_to_json(&response)
            .unwrap_or_else(|e| panic!("the response of {json} does not translate: {e}")))
    }

    /// Translates `json` into a query, answers it and translates the answer
    /// back, as [`apply_json`](Self::apply_json) does for commands.
    ///
    /// # Errors
    ///
    /// Why the JSON is not a query, or the plugin's refusal.
    ///
    /// # Panics
    ///
    /// If a successful answer does not translate into JSON.
    pub fn query_json(&self, json: &str) -> Result<String, String> {
        let query = Raw::<T>::query_from_json(json)?;
        let answer = self.raw.query(&query)?;
        Ok(Raw::<T>::query_response_to_json(&answer)
            .unwrap_or_else(|e| panic!("the answer to {json} does not translate: {e}")))
    }

    /// The snapshot of the current state.
    ///
    /// # Panics
    ///
    /// If the state cannot be encoded.
    #[must_use]
    pub fn state(&self) -> Vec<u8> {
        snapshot(&self.raw)
    }

    /// Every command applied so far, in order.
    #[must_use]
    pub fn log(&self) -> &[Applied] {
        &self.log
    }

    /// Checks that restoring the current snapshot into a fresh instance gives
    /// a state whose snapshot is byte-identical.
    ///
    /// # Panics
    ///
    /// If the snapshot is refused or differs after the round trip.
    pub fn assert_snapshot_round_trip(&self) {
        let state = self.state();
        let mut restored = Raw::<T>::new();
        if let Err(error) = restored.restore_from_snapshot(&state) {
            panic!("restoring the current snapshot fails: {error}");
        }
        assert!(
            snapshot(&restored) == state,
            "the snapshot of a restored state differs from the snapshot it was restored from"
        );
    }

    /// Checks that replaying the recorded log on two fresh instances gives
    /// exactly the recorded responses and this harness's state, byte for
    /// byte. Catches hidden inputs (clocks, randomness, `HashMap` order,
    /// addresses) and state outside the snapshot.
    ///
    /// # Panics
    ///
    /// On the first difference.
    pub fn assert_deterministic(&self) {
        let state = self.state();
        for run in 1..=2 {
            let mut replica = self.start();
            replay(&mut replica, &self.log, &format!("replay {run}"));
            assert!(
                snapshot(&replica) == state,
                "replay {run} ends in a different state"
            );
        }
    }

    /// Checks that a replica which restores a snapshot taken after any prefix
    /// of the log, then applies the rest, gives the recorded responses and
    /// ends in this harness's state. Catches state a snapshot leaves out.
    ///
    /// Costs a replay per log position: meant for test-sized logs.
    ///
    /// # Panics
    ///
    /// On the first difference.
    pub fn assert_snapshot_transparent(&self) {
        let state = self.state();
        for split in 0..=self.log.len() {
            let (before, after) = self.log.split_at(split);
            let mut donor = self.start();
            replay(&mut donor, before, "replay before the snapshot");
            let mut replica = Raw::<T>::new();
            if let Err(error) = replica.restore_from_snapshot(&snapshot(&donor)) {
                panic!("restoring the snapshot taken after {split} entries fails: {error}");
            }
            replay(
                &mut replica,
                after,
                &format!("replay after a snapshot at {split} entries"),
            );
            assert!(
                snapshot(&replica) == state,
                "a replica restored from the snapshot after {split} entries ends in a different state"
            );
        }
    }

    /// A fresh instance in the state the recorded log starts from.
    fn start(&self) -> Raw<T> {
        let mut raw = Raw::new();
        if let Some(base) = &self.base {
            // It was restored once already: failing now is nondeterminism.
            if let Err(error) = raw.restore_from_snapshot(base) {
                panic!("restoring the state the log starts from fails this time: {error}");
            }
        }
        raw
    }
}

fn snapshot<T: StateMachine>(raw: &Raw<T>) -> Vec<u8> {
    raw.get_state()
        .unwrap_or_else(|error| panic!("state cannot be encoded: {error}"))
}

/// Applies `entries` to `raw`, checking each response against the recorded one.
fn replay<T: StateMachine>(raw: &mut Raw<T>, entries: &[Applied], what: &str) {
    for entry in entries {
        let response = raw.apply(&entry.ctx, &entry.command);
        assert!(
            response == entry.response,
            "{what}: the entry at index {} answers {response:?} instead of {:?}",
            entry.ctx.index,
            entry.response
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_machines::Journal;
    use serde::{Deserialize, Serialize};
    use std::cell::Cell;
    use std::collections::HashMap;

    #[test]
    fn applies_through_the_byte_path_and_records_the_log() {
        let mut harness = Harness::<Journal>::new();
        assert_eq!(harness.apply(&7), Ok(1));
        harness.advance_ms(250);
        assert_eq!(harness.apply(&0), Err("zero refused at 250".to_owned()));
        assert_eq!(harness.apply(&9), Ok(2));
        assert_eq!(harness.query(&()), Ok(vec![7, 9]));

        let indexes: Vec<u64> = harness.log().iter().map(|entry| entry.ctx.index).collect();
        assert_eq!(indexes, [1, 2, 3]);
        assert_eq!(harness.log()[1].ctx.timestamp_ms, 250);
        assert_eq!(harness.next_context().index, 4);

        let malformed = harness.apply_bytes(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(malformed.unwrap_err().starts_with("invalid command"));
        assert_eq!(harness.machine().0, [7, 9]);

        harness.assert_snapshot_round_trip();
        harness.assert_deterministic();
        harness.assert_snapshot_transparent();
    }

    /// Keeps its entries in a HashMap and answers them in iteration order.
    #[derive(Default, Serialize, Deserialize)]
    struct Unordered(HashMap<u32, u32>);

    impl StateMachine for Unordered {
        type Command = u32;
        type Response = Vec<u32>;
        type Query = ();
        type QueryResponse = ();
        type Error = String;

        fn apply(&mut self, _: &ApplyContext, key: u32) -> Result<Vec<u32>, String> {
            self.0.insert(key, key);
            Ok(self.0.keys().copied().collect())
        }

        fn query(&self, (): ()) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    #[should_panic(expected = "instead of")]
    fn catches_hash_map_iteration_order() {
        let mut harness = Harness::<Unordered>::new();
        for key in 0..64 {
            harness.apply(&key).unwrap();
        }
        harness.assert_deterministic();
    }

    thread_local! {
        static HIDDEN: Cell<u64> = const { Cell::new(0) };
    }

    /// Counts in a variable outside its state.
    #[derive(Default, Serialize, Deserialize)]
    struct Leaky;

    impl StateMachine for Leaky {
        type Command = ();
        type Response = u64;
        type Query = ();
        type QueryResponse = ();
        type Error = String;

        fn apply(&mut self, _: &ApplyContext, (): ()) -> Result<u64, String> {
            Ok(HIDDEN.replace(HIDDEN.get() + 1))
        }

        fn query(&self, (): ()) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    #[should_panic(expected = "replay 1: the entry at index 1 answers")]
    fn catches_state_outside_the_snapshot() {
        let mut harness = Harness::<Leaky>::new();
        harness.apply(&()).unwrap();
        harness.apply(&()).unwrap();
        harness.assert_deterministic();
    }

    #[test]
    fn json_goes_through_the_same_byte_path_and_log() {
        use crate::test_machines::{Shelf, ShelfCommand};
        let mut shelf = Harness::<Shelf>::new();
        assert_eq!(
            shelf.apply_json(r#"{"add":{"item":"bolt","count":5}}"#),
            Ok("5".to_owned())
        );
        // The plugin's own shorthand, from its override.
        assert_eq!(shelf.apply_json(r#""bolt""#), Ok("6".to_owned()));
        assert_eq!(
            shelf.query_json(r#"{"count":{"item":"bolt"}}"#),
            Ok(r#"{"count":6}"#.to_owned())
        );
        // Exactly what applying the typed command records.
        assert_eq!(
            shelf.log()[0].command,
            codec::encode(&ShelfCommand::Add {
                item: b"bolt".to_vec(),
                count: 5
            })
            .unwrap()
        );

        // JSON that is not a command is refused before anything is applied.
        let error = shelf
            .apply_json(r#"{"add":{"item":"bolt","count":1,"colour":"red"}}"#)
            .unwrap_err();
        assert!(
            error.starts_with("invalid command JSON: unknown field `colour`"),
            "{error}"
        );
        let error = shelf.apply_json(r#"{"remove":{}}"#).unwrap_err();
        assert!(error.contains("unknown variant `remove`"), "{error}");
        assert_eq!(shelf.log().len(), 2);

        // The plugin's refusal is the client's answer, as with bytes.
        shelf
            .apply_json(&format!(
                r#"{{"add":{{"item":"nut","count":{}}}}}"#,
                u64::MAX
            ))
            .unwrap();
        assert_eq!(
            shelf.apply_json(r#"{"add":{"item":"nut","count":1}}"#),
            Err("stock overflows".to_owned())
        );
        assert_eq!(shelf.apply_json(r#""clear""#), Ok("0".to_owned()));
        shelf.assert_deterministic();
    }

    #[test]
    fn an_upgrade_restores_the_state_and_takes_a_log_index() {
        use crate::test_machines::Shelf;
        let mut old = Harness::<Journal>::new();
        old.advance_ms(40);
        assert_eq!(old.apply(&7), Ok(1));
        assert_eq!(old.apply(&9), Ok(2));

        let mut new = old.upgrade::<Journal>().unwrap();
        assert_eq!(new.query(&()), Ok(vec![7, 9]));
        // Entries 1 and 2, the upgrade at 3, then the new version's log.
        assert_eq!(new.next_context().index, 4);
        assert_eq!(new.next_context().timestamp_ms, 40);
        assert_eq!(new.apply(&5), Ok(3));
        assert_eq!(new.log().len(), 1);
        assert_eq!(new.log()[0].ctx.index, 4);
        // The checks replay from the restored state: from an empty one the
        // entry would answer 1.
        new.assert_snapshot_round_trip();
        new.assert_deterministic();
        new.assert_snapshot_transparent();
        // The old harness is untouched.
        assert_eq!(old.query(&()), Ok(vec![7, 9]));
        assert_eq!(old.next_context().index, 3);

        // A version that cannot read the state: the upgrade is refused.
        let Err(error) = old.upgrade::<Shelf>() else {
            panic!("a list restored as a map");
        };
        assert!(error.starts_with("snapshot does not decode"), "{error}");
    }

    #[test]
    #[should_panic(expected = "key must be a string")]
    fn an_answer_without_a_json_form_is_a_bug_the_harness_reports() {
        let mut shelf = Harness::<crate::test_machines::Shelf>::new();
        shelf.apply_json(r#""bolt""#).unwrap();
        let _ = shelf.query_json(r#""all""#);
    }
}
