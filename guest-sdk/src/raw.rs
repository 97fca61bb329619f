//! The byte-level face of a [`StateMachine`]: exactly what the host calls.

use crate::codec::{self, CodecError};
use crate::state_machine::{ApplyContext, StateMachine};

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
        let command: T::Command =
            codec::decode(command).map_err(|e| format!("invalid command: {e}"))?;
        let response = self
            .machine
            .apply(ctx, command)
            .map_err(|e| e.to_string())?;
        codec::encode(&response).map_err(|e| format!("response: {e}"))
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
