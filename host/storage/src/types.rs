//! The storage-level records: log entries, hard state and snapshot metadata.

use bytes::Bytes;

/// Bytes an entry costs on top of its payload when sizing reads (index and term).
pub const ENTRY_OVERHEAD: u64 = 16;

/// Largest payload one entry may carry. fjall panics inside its writer thread
/// on a value of 4 GiB or more (its journal records lengths in 32 bits) and
/// holds a whole batch in memory; a limit far below both is checked before a
/// write reaches the writer thread, so the caller gets an error and the store
/// keeps working.
pub const MAX_ENTRY_BYTES: u64 = 64 << 20;

/// The most the writer puts into one atomic batch when it groups writes; a
/// single write larger than this (many entries, each within the limit) is a
/// batch of its own, since a Raft write must be stored whole.
pub const MAX_WRITE_BYTES: u64 = 256 << 20;

/// Refuses entries over [`MAX_ENTRY_BYTES`].
pub(crate) fn check_sizes(entries: &[LogEntry]) -> crate::Result<()> {
    match entries
        .iter()
        .find(|e| e.payload.len() as u64 > MAX_ENTRY_BYTES)
    {
        Some(entry) => Err(crate::StorageError::TooLarge {
            what: "log entry",
            index: entry.index,
            bytes: entry.payload.len() as u64,
            limit: MAX_ENTRY_BYTES,
        }),
        None => Ok(()),
    }
}

/// One Raft log entry as the storage layer sees it.
///
/// The payload is opaque here: the consensus layer encodes the entry kind and its
/// data into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the log, starting at 1.
    pub index: u64,
    /// Term of the leader that created the entry.
    pub term: u64,
    /// Opaque entry body.
    pub payload: Bytes,
}

impl LogEntry {
    /// Creates an entry.
    pub fn new(index: u64, term: u64, payload: impl Into<Bytes>) -> Self {
        Self {
            index,
            term,
            payload: payload.into(),
        }
    }

    /// Size the entry counts for against the byte budget of
    /// [`LogStore::entries`](crate::LogStore::entries): payload plus [`ENTRY_OVERHEAD`].
    pub fn size(&self) -> u64 {
        ENTRY_OVERHEAD + self.payload.len() as u64
    }
}

/// The part of Raft's state besides the log that must survive a restart.
///
/// `term` and `vote` are required for election safety: a node that forgot them
/// could vote twice in one term. `commit` is not required for safety (a restarted
/// node relearns it from the leader) but lets a restarted node apply its committed
/// entries without waiting for a leader. The applied index is deliberately absent:
/// state machines are rebuilt from the latest snapshot plus the log on every start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HardState {
    /// Latest term this node has seen.
    pub term: u64,
    /// Candidate this node voted for in `term`, if any.
    pub vote: Option<u64>,
    /// Highest log index known to be committed.
    pub commit: u64,
}

/// What a snapshot stands for: the log prefix it replaces and the membership then.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Index of the last log entry the snapshot includes.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// Cluster configuration as of `index`, encoded by the consensus layer.
    pub configuration: Bytes,
}
