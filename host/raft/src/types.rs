//! Identifiers, log entries and the state that must survive a crash.

use bytes::Bytes;

/// Identifies a member of the cluster. `0` is reserved as "nobody".
pub type NodeId = u64;
/// A Raft term.
pub type Term = u64;
/// The largest term a core adopts, campaigns in or accepts from the network.
///
/// Half the range of [`Term`]: terms grow by one per election, so no real
/// cluster comes near it, and a message beyond it can only come from a broken
/// or hostile peer. Refusing such terms keeps every `term + 1` in range.
pub const MAX_TERM: Term = u64::MAX / 2;
/// A position in the log; the first entry has index 1, index 0 is the empty prefix.
pub type Index = u64;

/// What an entry means to the layers above the core.
///
/// Non-exhaustive so that membership (`Config`) and plugin deployment
/// (`Plugin`) entries can be added without breaking drivers.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// An opaque command for the replicated state machine.
    Normal,
    /// Appended by every new leader so that it can commit entries of earlier
    /// terms (Raft §5.4.2) and serve reads (§6.4); carries no data.
    Noop,
    /// A change of membership: the payload is an encoded
    /// [`crate::Membership`], in effect from the moment it is in the log.
    Config,
}

/// One log entry. The payload is opaque to the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Term of the leader that created the entry.
    pub term: Term,
    /// Position in the log.
    pub index: Index,
    /// How the payload is to be interpreted.
    pub kind: EntryKind,
    /// Opaque payload.
    pub data: Bytes,
}

/// Fixed per-entry cost counted against the byte limit of a message, so that
/// many empty entries cannot make a message unbounded.
pub(crate) const ENTRY_OVERHEAD: usize = 24;

impl Entry {
    /// Size charged against `Config::max_bytes_per_message`.
    pub fn size(&self) -> usize {
        self.data.len() + ENTRY_OVERHEAD
    }
}

/// The state that must be durable before any message that depends on it is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HardState {
    /// Latest term this node has seen.
    pub term: Term,
    /// Candidate this node voted for in `term`, if any.
    pub vote: Option<NodeId>,
    /// Highest index known to be committed. Persisting it is an optimisation
    /// (a restarted node can apply without waiting for the leader), not a
    /// safety requirement, so it may lag: on restart the core takes the
    /// larger of it and [`Persisted::applied`]. It must not pass the log.
    pub commit: Index,
}

/// What a snapshot of the state machine stands for: every entry up to
/// `index`, and the membership in effect there. The core sees only this; the
/// driver keeps and moves the data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotMeta {
    /// Last entry the snapshot covers.
    pub index: Index,
    /// Its term.
    pub term: Term,
    /// The membership in effect at `index`.
    pub membership: crate::Membership,
}

/// What a node recovered from its durable storage at start-up. The
/// membership is the snapshot's (or, without one, the bootstrap one of
/// [`crate::Config::voters`]) as changed by the configuration entries of
/// `entries`.
#[derive(Clone, Debug, Default)]
pub struct Persisted {
    /// The last durable hard state.
    pub hard_state: HardState,
    /// The latest durable snapshot, if the log was ever compacted or a
    /// snapshot installed. The state machine starts from it.
    pub snapshot: Option<SnapshotMeta>,
    /// The durable log, contiguous from the snapshot's index + 1 (from 1
    /// without a snapshot).
    pub entries: Vec<Entry>,
    /// Highest index the driver's state machine has already applied durably;
    /// entries after it are handed out again. `0` for an in-memory state machine.
    ///
    /// It may be above `hard_state.commit` (a commit index alone is not
    /// synced): only committed entries are applied, so the core restores the
    /// commit index as the larger of the two. It must not pass the log.
    /// Below the snapshot's index it is taken as the snapshot's index (the
    /// state machine starts from the snapshot).
    pub applied: Index,
}
