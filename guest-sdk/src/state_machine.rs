//! The trait a plugin implements.

use core::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError};

/// Where a command sits in the replicated log and when the leader accepted it.
///
/// This is the only source of time a plugin has: `timestamp_ms` is assigned by
/// the leader, identical on every replica and never decreasing from one
/// command to the next. Expire leases, sessions and TTLs against it, never
/// against a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApplyContext {
    /// Log index of the entry being applied; strictly increasing across calls.
    pub index: u64,
    /// Raft term in which the entry was proposed.
    pub term: u64,
    /// Milliseconds since the Unix epoch, assigned by the leader.
    pub timestamp_ms: u64,
}

/// A replicated state machine, written as a plain Rust type.
///
/// The type itself is the whole state: it starts as [`Default::default`], is
/// changed only by [`apply`](Self::apply), and is snapshotted by serializing
/// it with [`codec`](crate::codec) (postcard). Export it from a plugin crate
/// with [`export!`](crate::export).
///
/// # Determinism
///
/// Every replica applies the same commands in the same order and must end in
/// the same state with the same responses. So an implementation must not read
/// a clock (use [`ApplyContext::timestamp_ms`]), draw randomness (derive it
/// from the command or the context), iterate a `HashMap`/`HashSet` (use
/// `BTreeMap`/`BTreeSet`), or spawn threads. Floats are fine: the host
/// canonicalizes NaNs.
pub trait StateMachine: Default + Serialize + DeserializeOwned {
    /// What clients submit through the log.
    type Command: Serialize + DeserializeOwned;
    /// What [`apply`](Self::apply) answers.
    type Response: Serialize + DeserializeOwned;
    /// A read-only request, answered without going through the log.
    type Query: Serialize + DeserializeOwned;
    /// What [`query`](Self::query) answers.
    type QueryResponse: Serialize + DeserializeOwned;
    /// Why a command or query was refused. Its `Display` text is what the
    /// client receives.
    type Error: fmt::Display;

    /// Applies one committed command.
    ///
    /// An `Err` is replicated like any response, and the host does not undo
    /// changes made before it: validate first, then mutate.
    fn apply(
        &mut self,
        ctx: &ApplyContext,
        command: Self::Command,
    ) -> Result<Self::Response, Self::Error>;

    /// Answers a read-only request against the current state.
    fn query(&self, query: Self::Query) -> Result<Self::QueryResponse, Self::Error>;

    /// Serializes the whole state. Equal states must give equal bytes.
    ///
    /// The default encodes `self` with postcard, which is canonical as long as
    /// the state holds only ordered collections.
    ///
    /// # Errors
    ///
    /// Only if the state's `Serialize` implementation is not representable in
    /// postcard; derived implementations over ordinary types never fail.
    fn snapshot(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    /// Rebuilds a state from bytes produced by [`snapshot`](Self::snapshot),
    /// possibly by an older version of the same plugin during an upgrade.
    ///
    /// The default decodes a postcard-encoded `Self`. Override it to migrate
    /// an older layout; a plugin whose state layout changes must keep reading
    /// the old one, or the upgrade is refused on every replica.
    ///
    /// # Errors
    ///
    /// [`RestoreError`] if the bytes are not a state this version can adopt;
    /// the current state then stays in place.
    fn restore(snapshot: &[u8]) -> Result<Self, RestoreError> {
        Ok(codec::decode(snapshot)?)
    }

    /// Reads a command written as JSON, as clients of the daemon's API and
    /// CLI send it. [`Raw::command_from_json`](crate::Raw::command_from_json)
    /// then encodes it with postcard for the log.
    ///
    /// The default reads the JSON form of `Self::Command`'s own serde
    /// implementation (externally tagged enums: `{"variant": {fields}}`, or
    /// `"variant"` for a variant without fields). Shape that form with serde
    /// attributes, which do not change the postcard bytes: `rename_all`,
    /// `default`, and `with = "kythira_guest::bytes"` so that byte strings
    /// read as strings. Override this only for a JSON form serde attributes
    /// cannot express.
    ///
    /// Translations are pure and never see the state: the host runs them on
    /// a fresh instance, never on the replicated one.
    ///
    /// # Errors
    ///
    /// Why the JSON is not a command, for the client to read.
    fn command_from_json(json: &str) -> Result<Self::Command, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    /// Reads a query written as JSON; as
    /// [`command_from_json`](Self::command_from_json), for `Self::Query`.
    ///
    /// # Errors
    ///
    /// Why the JSON is not a query.
    fn query_from_json(json: &str) -> Result<Self::Query, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    /// Writes a response of [`apply`](Self::apply) as JSON; the default is
    /// `Self::Response`'s serde implementation through `serde_json`,
    /// compact. The result must be one well-formed JSON value (the host
    /// refuses anything else).
    ///
    /// # Errors
    ///
    /// If the response has no JSON form (for example a map whose keys are
    /// not strings).
    fn response_to_json(response: &Self::Response) -> Result<String, String> {
        serde_json::to_string(response).map_err(|e| e.to_string())
    }

    /// Writes an answer of [`query`](Self::query) as JSON; as
    /// [`response_to_json`](Self::response_to_json), for
    /// `Self::QueryResponse`.
    ///
    /// # Errors
    ///
    /// If the answer has no JSON form.
    fn query_response_to_json(response: &Self::QueryResponse) -> Result<String, String> {
        serde_json::to_string(response).map_err(|e| e.to_string())
    }
}

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The bytes do not decode as this plugin's state.
    #[error("snapshot does not decode as this plugin's state: {0}")]
    Decode(#[from] CodecError),
    /// The bytes decoded but the plugin refuses them, with its reason.
    #[error("snapshot refused: {0}")]
    Refused(String),
}
