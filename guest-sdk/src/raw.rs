//! The byte-level face of a [`StateMachine`]: exactly what the host calls.

use serde::Serialize;

use crate::codec::{self, CodecError};
use crate::state_machine::{ApplyContext, StateMachine};

/// The outcomes of a batch, in the layout of the WIT `batch-result`: entry
/// `i`'s response, or for the entries listed in `errors` its error text, is
/// the next `output_lens[i]` bytes of `output`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutput {
    /// Length of each entry's response or error text.
    pub output_lens: Vec<u32>,
    /// Positions in the batch of the entries that returned an error, ascending.
    pub errors: Vec<u32>,
    /// The responses and error texts, back to back.
    pub output: Vec<u8>,
}

/// A batch whose parts do not fit together: three context numbers per
/// command length, command lengths that add up to the command bytes, and no
/// more entries or output than a `u32` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed batch: it needs three context numbers per command length, and command lengths that add up to the command bytes"
)]
pub struct BatchLayoutError;

/// Adapts a typed [`StateMachine`] to the byte-level contract of the WIT world:
/// commands, queries and responses as postcard bytes, errors as strings.
///
/// The exported component calls exactly these methods, so running a plugin
/// natively through `Raw` executes the same code as the component does, minus
/// the sandbox. The host uses it as a native baseline in its benchmarks.
#[derive(Debug, Default)]
pub struct Raw<T> {
    machine: T,
}

impl<T: StateMachine> Raw<T> {
    /// A state machine in its initial (`Default`) state.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps an existing state.
    #[must_use]
    pub fn from_machine(machine: T) -> Self {
        Self { machine }
    }

    /// The typed state.
    #[must_use]
    pub fn machine(&self) -> &T {
        &self.machine
    }

    /// Unwraps the typed state.
    #[must_use]
    pub fn into_machine(self) -> T {
        self.machine
    }

    /// Decodes `command`, applies it and encodes the response.
    ///
    /// # Errors
    ///
    /// The plugin's refusal as text, or a description of why `command` is not
    /// an encoded `T::Command` (the state is then untouched).
    pub fn apply(&mut self, ctx: &ApplyContext, command: &[u8]) -> Result<Vec<u8>, String> {
        // The same code as each entry of a batch runs, on purpose: the host
        // keeps a batch only if it cost well under one entry's budget, which
        // is sound only if an entry alone costs no more than its share of
        // the batch, plus the call's own constant.
        let mut response = Vec::new();
        self.apply_into(ctx, command, &mut response)?;
        Ok(response)
    }

    /// Decodes `command`, applies it and appends the encoded response to
    /// `out`, so that the responses of many commands can share one buffer.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); `out` then holds exactly the bytes it held
    /// before.
    pub fn apply_into(
        &mut self,
        ctx: &ApplyContext,
        command: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let command: T::Command =
            codec::decode(command).map_err(|e| format!("invalid command: {e}"))?;
        let response = self
            .machine
            .apply(ctx, command)
            .map_err(|e| e.to_string())?;
        encode_response(&response, out).map_err(|e| format!("response: {e}"))
    }

    /// Applies consecutive entries in the layout of the WIT `apply-batch`:
    /// entry `i` has the context `contexts[3i..3i + 3]` (index, term,
    /// timestamp) and the next `command_lens[i]` bytes of `commands` as its
    /// command. Exactly as [`apply`](Self::apply) on each entry in turn.
    ///
    /// # Errors
    ///
    /// [`BatchLayoutError`] if the parts do not fit together (a host bug);
    /// nothing is applied then.
    ///
    /// # Panics
    ///
    /// If one entry's response is 4 GiB or more, which a wasm32 guest's
    /// memory cannot hold.
    pub fn apply_batch(
        &mut self,
        contexts: &[u64],
        command_lens: &[u32],
        commands: &[u8],
    ) -> Result<BatchOutput, BatchLayoutError> {
        let total = command_lens.iter().try_fold(0usize, |sum, &len| {
            sum.checked_add(usize::try_from(len).ok()?)
        });
        if contexts.len() != command_lens.len().saturating_mul(3)
            || total != Some(commands.len())
            || u32::try_from(command_lens.len()).is_err()
        {
            return Err(BatchLayoutError);
        }
        let mut batch = BatchOutput {
            output_lens: Vec::with_capacity(command_lens.len()),
            errors: Vec::new(),
            output: Vec::new(),
        };
        let mut rest = commands;
        for (position, (context, &len)) in (0u32..).zip(contexts.chunks_exact(3).zip(command_lens))
        {
            let (command, tail) = rest.split_at(len as usize);
            rest = tail;
            let ctx = ApplyContext {
                index: context[0],
                term: context[1],
                timestamp_ms: context[2],
            };
            let start = batch.output.len();
            if let Err(message) = self.apply_into(&ctx, command, &mut batch.output) {
                batch.output.extend_from_slice(message.as_bytes());
                batch.errors.push(position);
            }
            // A wasm32 guest's memory cannot hold 4 GiB of output; natively
            // a response that large is a bug worth stopping at.
            let len = u32::try_from(batch.output.len() - start).expect("output under 4 GiB");
            batch.output_lens.push(len);
        }
        Ok(batch)
    }

    /// Decodes `request`, answers it and encodes the answer.
    ///
    /// # Errors
    ///
    /// The plugin's refusal as text, or a description of why `request` is not
    /// an encoded `T::Query`.
    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let query: T::Query = codec::decode(request).map_err(|e| format!("invalid query: {e}"))?;
        let answer = self.machine.query(query).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        encode_response(&answer, &mut out).map_err(|e| format!("query response: {e}"))?;
        Ok(out)
    }

    /// Translates a command written as JSON into the bytes
    /// [`apply`](Self::apply) takes: [`StateMachine::command_from_json`],
    /// then postcard. Pure: it needs no state, so it is an associated
    /// function, and the component's `command-from-json` export calls it
    /// without touching the machine.
    ///
    /// # Errors
    ///
    /// `invalid command JSON: …` with the plugin's reason.
    pub fn command_from_json(json: &str) -> Result<Vec<u8>, String> {
        let command =
            T::command_from_json(json).map_err(|e| format!("invalid command JSON: {e}"))?;
        codec::encode(&command).map_err(|e| format!("command: {e}"))
    }

    /// Translates a query written as JSON into the bytes
    /// [`query`](Self::query) takes; as
    /// [`command_from_json`](Self::command_from_json).
    ///
    /// # Errors
    ///
    /// `invalid query JSON: …` with the plugin's reason.
    pub fn query_from_json(json: &str) -> Result<Vec<u8>, String> {
        let query = T::query_from_json(json).map_err(|e| format!("invalid query JSON: {e}"))?;
        codec::encode(&query).map_err(|e| format!("query: {e}"))
    }

    /// Translates a successful response of [`apply`](Self::apply) into JSON:
    /// postcard, then [`StateMachine::response_to_json`].
    ///
    /// # Errors
    ///
    /// If the bytes are not an encoded `T::Response`, or it has no JSON form.
    pub fn response_to_json(response: &[u8]) -> Result<String, String> {
        let response: T::Response =
            codec::decode(response).map_err(|e| format!("invalid response: {e}"))?;
        T::response_to_json(&response).map_err(|e| format!("response has no JSON form: {e}"))
    }

    /// Translates a successful answer of [`query`](Self::query) into JSON;
    /// as [`response_to_json`](Self::response_to_json).
    ///
    /// # Errors
    ///
    /// If the bytes are not an encoded `T::QueryResponse`, or it has no JSON
    /// form.
    pub fn query_response_to_json(response: &[u8]) -> Result<String, String> {
        let response: T::QueryResponse =
            codec::decode(response).map_err(|e| format!("invalid query response: {e}"))?;
        T::query_response_to_json(&response)
            .map_err(|e| format!("query response has no JSON form: {e}"))
    }

    /// The state's snapshot bytes.
    ///
    /// # Errors
    ///
    /// Only if the plugin's state is not representable in postcard (a bug in
    /// the plugin, the same on every replica).
    pub fn get_state(&self) -> Result<Vec<u8>, CodecError> {
        self.machine.snapshot()
    }

    /// Replaces the state with one rebuilt from `snapshot`; on error the
    /// current state stays exactly as it was.
    ///
    /// # Errors
    ///
    /// Why the snapshot was refused, as text.
    pub fn restore_from_snapshot(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.machine = T::restore(snapshot).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Appends `value`'s encoding to `out`, reserving room for it first.
///
/// Responses leave the component as boxed slices: a vector grown from empty
/// would be reallocated while growing and once more when shrunk to its
/// length, and for the small responses most commands have, those allocator
/// calls cost more than measuring the encoding first. Into an empty vector,
/// this allocates exactly once; into a batch's shared buffer, it grows it as
/// pushing would.
fn encode_response<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let size = codec::encoded_size(value)?;
    out.reserve(size);
    let start = out.len();
    codec::encode_into(value, out)?;
    debug_assert_eq!(
        out.len() - start,
        size,
        "encoded_size disagrees with encode_into"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;
    use crate::test_machines::Journal;
    use serde::Deserialize;

    /// Records each command's number and answers all of them so far, so
    /// responses grow; refuses 0.
    #[derive(Default, Serialize, Deserialize)]
    struct History(Vec<u32>);

    impl StateMachine for History {
        type Command = u32;
        type Response = Vec<u32>;
        type Query = usize;
        type QueryResponse = Option<u32>;
        type Error = &'static str;

        fn apply(&mut self, _ctx: &ApplyContext, n: u32) -> Result<Vec<u32>, &'static str> {
            if n == 0 {
                return Err("zero");
            }
            self.0.push(n);
            Ok(self.0.clone())
        }

        fn query(&self, at: usize) -> Result<Option<u32>, &'static str> {
            Ok(self.0.get(at).copied())
        }
    }

    fn ctx(index: u64) -> ApplyContext {
        ApplyContext {
            index,
            term: 1,
            timestamp_ms: index,
        }
    }

    #[test]
    fn a_batch_gives_the_outcomes_of_applying_one_by_one() {
        let commands: Vec<Vec<u8>> = vec![
            encode(&7u32).unwrap(),
            encode(&0u32).unwrap(),
            vec![0xFF; 6], // not a u32
            encode(&300u32).unwrap(),
        ];
        let mut single = Raw::<Journal>::new();
        let expected: Vec<Result<Vec<u8>, String>> = commands
            .iter()
            .zip(1..)
            .map(|(command, index)| single.apply(&ctx(index), command))
            .collect();

        let mut batched = Raw::<Journal>::new();
        let contexts: Vec<u64> = (1..=4)
            .flat_map(|i| {
                let ctx = ctx(i);
                [ctx.index, ctx.term, ctx.timestamp_ms]
            })
            .collect();
        let lens: Vec<u32> = commands.iter().map(|c| c.len() as u32).collect();
        let batch = batched
            .apply_batch(&contexts, &lens, &commands.concat())
            .unwrap();

        assert_eq!(batch.errors, [1, 2]);
        let mut rest = batch.output.as_slice();
        let got: Vec<Result<Vec<u8>, String>> = (0u32..)
            .zip(&batch.output_lens)
            .map(|(position, &len)| {
                let (bytes, tail) = rest.split_at(len as usize);
                rest = tail;
                if batch.errors.contains(&position) {
                    Err(String::from_utf8(bytes.to_vec()).unwrap())
                } else {
                    Ok(bytes.to_vec())
                }
            })
            .collect();
        assert!(rest.is_empty());
        assert_eq!(got, expected);
        assert_eq!(batched.machine().0, single.machine().0);
        assert_eq!(batched.machine().0, [7, 300]);
    }

    #[test]
    fn a_batch_whose_parts_do_not_fit_together_applies_nothing() {
        let command = encode(&7u32).unwrap();
        let contexts = [1, 1, 0];
        let mut raw = Raw::<Journal>::new();
        // A length past the bytes, bytes left over, a context too few.
        assert_eq!(
            raw.apply_batch(&contexts, &[5], &command),
            Err(BatchLayoutError)
        );
        assert_eq!(
            raw.apply_batch(
                &contexts,
                &[1],
                &[command.clone(), command.clone()].concat()
            ),
            Err(BatchLayoutError)
        );
        assert_eq!(
            raw.apply_batch(&contexts[..2], &[1], &command),
            Err(BatchLayoutError)
        );
        assert!(raw.machine().0.is_empty());
        assert!(raw.apply_batch(&contexts, &[1], &command).is_ok());
        assert_eq!(raw.machine().0, [7]);
    }

    #[test]
    fn apply_into_appends_what_apply_returns() {
        let mut one = Raw::<History>::new();
        let mut shared = Raw::<History>::new();
        let mut out = vec![0xEE];
        let mut expected = out.clone();
        for (index, n) in [1u32, 300, 70_000].into_iter().enumerate() {
            let command = codec::encode(&n).unwrap();
            let ctx = ctx(index as u64 + 1);
            expected.extend(one.apply(&ctx, &command).unwrap());
            shared.apply_into(&ctx, &command, &mut out).unwrap();
        }
        assert_eq!(out, expected);
        assert_eq!(
            codec::decode::<Vec<u32>>(&one.apply(&ctx(4), &[5]).unwrap()).unwrap(),
            [1, 300, 70_000, 5]
        );
    }

    #[test]
    fn failed_apply_into_leaves_the_output_as_it_was() {
        let mut raw = Raw::<History>::new();
        let mut out = vec![1, 2, 3];
        let refused = raw.apply_into(&ctx(1), &codec::encode(&0u32).unwrap(), &mut out);
        assert_eq!(refused, Err("zero".to_owned()));
        let malformed = raw.apply_into(&ctx(1), &[0xFF], &mut out);
        assert!(malformed.unwrap_err().starts_with("invalid command"));
        assert_eq!(out, [1, 2, 3]);
        assert!(raw.machine().0.is_empty());
    }

    #[test]
    fn json_translates_through_the_plugins_own_types() {
        let command = Raw::<History>::command_from_json("7").unwrap();
        assert_eq!(command, codec::encode(&7u32).unwrap());
        let mut raw = Raw::<History>::new();
        let response = raw.apply(&ctx(1), &command).unwrap();
        assert_eq!(Raw::<History>::response_to_json(&response).unwrap(), "[7]");
        let answer = |raw: &Raw<History>, json: &str| {
            let query = Raw::<History>::query_from_json(json).unwrap();
            Raw::<History>::query_response_to_json(&raw.query(&query).unwrap()).unwrap()
        };
        assert_eq!(answer(&raw, "0"), "7");
        assert_eq!(answer(&raw, " 5 "), "null");
    }

    #[test]
    fn json_that_does_not_translate_is_refused_with_the_reason() {
        let refused = |result: Result<Vec<u8>, String>, start: &str, part: &str| {
            let error = result.unwrap_err();
            assert!(error.starts_with(start) && error.contains(part), "{error}");
        };
        refused(
            Raw::<History>::command_from_json(r#""seven""#),
            "invalid command JSON: ",
            "invalid type: string",
        );
        refused(
            Raw::<History>::command_from_json("7 8"),
            "invalid command JSON: ",
            "trailing characters",
        );
        refused(
            Raw::<History>::command_from_json(""),
            "invalid command JSON: ",
            "EOF",
        );
        refused(
            Raw::<History>::query_from_json("-1"),
            "invalid query JSON: ",
            "invalid value",
        );
        let error = Raw::<History>::response_to_json(&[0xFF]).unwrap_err();
        assert!(error.starts_with("invalid response: "), "{error}");
        // A varint that runs past the end; and a whole value with a byte after it.
        let error = Raw::<History>::query_response_to_json(&[1, 0x80]).unwrap_err();
        assert!(error.starts_with("invalid query response: "), "{error}");
        let error = Raw::<History>::query_response_to_json(&[0, 0]).unwrap_err();
        assert!(error.contains("trailing"), "{error}");
    }

    #[test]
    fn an_answer_without_a_json_form_is_refused() {
        use crate::test_machines::{Shelf, ShelfAnswer};
        let all = codec::encode(&ShelfAnswer::All([(b"k".to_vec(), 1)].into())).unwrap();
        let error = Raw::<Shelf>::query_response_to_json(&all).unwrap_err();
        assert!(
            error.starts_with("query response has no JSON form: key must be a string"),
            "{error}"
        );
        let count = codec::encode(&ShelfAnswer::Count(3)).unwrap();
        assert_eq!(
            Raw::<Shelf>::query_response_to_json(&count).unwrap(),
            r#"{"count":3}"#
        );
    }
}
