//! The byte-level face of a [`StateMachine`]: exactly what the host calls.

use crate::codec::{self, CodecError};
use crate::state_machine::{ApplyContext, StateMachine};

/// How one entry of a batch ended: its response, or if `is_error` its error
/// text, is the next `len` bytes of the batch's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// The bytes are an error text, not a response.
    pub is_error: bool,
    /// Length of the response or error text.
    pub len: u32,
}

/// The command lengths of a batch do not add up to its command bytes, or an
/// output does not fit a `u32` length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("batch layout: command lengths must add up to the command bytes, outputs must fit a u32")]
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
        let mut response = Vec::new();
        self.apply_into(ctx, command, &mut response)?;
        Ok(response)
    }

    /// Like [`apply`](Self::apply), but appends the encoded response to `out`,
    /// so a batch of entries shares one output buffer. On `Err`, `out` is as
    /// it was.
    ///
    /// # Errors
    ///
    /// As for [`apply`](Self::apply).
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
        codec::encode_into(&response, out).map_err(|e| format!("response: {e}"))
    }

    /// Applies consecutive entries in the layout of the WIT `apply-batch`:
    /// `entries` gives each entry's context and command length, `commands`
    /// holds the commands back to back. Each response or error text is
    /// appended to `output`; the outcomes say which it is and how long.
    /// Exactly as [`apply`](Self::apply) on each entry in turn.
    ///
    /// # Errors
    ///
    /// [`BatchLayoutError`] if the lengths do not add up to `commands` (a host
    /// bug). Entries before the first one that does not fit have been
    /// applied.
    pub fn apply_batch(
        &mut self,
        entries: impl IntoIterator<Item = (ApplyContext, u32)>,
        commands: &[u8],
        output: &mut Vec<u8>,
    ) -> Result<Vec<BatchOutcome>, BatchLayoutError> {
        let entries = entries.into_iter();
        let mut outcomes = Vec::with_capacity(entries.size_hint().0);
        let mut rest = commands;
        for (ctx, len) in entries {
            let (command, tail) = usize::try_from(len)
                .ok()
                .and_then(|len| rest.split_at_checked(len))
                .ok_or(BatchLayoutError)?;
            rest = tail;
            let start = output.len();
            let is_error = match self.apply_into(&ctx, command, output) {
                Ok(()) => false,
                Err(message) => {
                    output.extend_from_slice(message.as_bytes());
                    true
                }
            };
            let len = u32::try_from(output.len() - start).map_err(|_| BatchLayoutError)?;
            outcomes.push(BatchOutcome { is_error, len });
        }
        if rest.is_empty() {
            Ok(outcomes)
        } else {
            Err(BatchLayoutError)
        }
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
        codec::encode(&answer).map_err(|e| format!("query response: {e}"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;
    use crate::test_machines::Journal;

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
        let layout = commands
            .iter()
            .zip(1..)
            .map(|(c, i)| (ctx(i), c.len() as u32));
        let mut output = Vec::new();
        let outcomes = batched
            .apply_batch(layout, &commands.concat(), &mut output)
            .unwrap();

        let mut rest = output.as_slice();
        let got: Vec<Result<Vec<u8>, String>> = outcomes
            .iter()
            .map(|outcome| {
                let (bytes, tail) = rest.split_at(outcome.len as usize);
                rest = tail;
                if outcome.is_error {
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
    fn a_batch_whose_lengths_do_not_add_up_is_refused() {
        let command = encode(&7u32).unwrap();
        let mut raw = Raw::<Journal>::new();
        let mut output = Vec::new();
        // One length too long for the bytes.
        assert_eq!(
            raw.apply_batch([(ctx(1), 5)], &command, &mut output),
            Err(BatchLayoutError)
        );
        // Bytes left over after the last entry.
        let mut two = command.clone();
        two.extend(&command);
        assert_eq!(
            raw.apply_batch([(ctx(1), 1)], &two, &mut output),
            Err(BatchLayoutError)
        );
    }
}
