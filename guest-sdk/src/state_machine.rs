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
