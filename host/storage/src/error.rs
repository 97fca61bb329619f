//! The one error type of this crate.

use std::{io, path::PathBuf, sync::Arc};

/// Result alias used throughout the crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What is wrong with a stored log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryDefect {
    /// The stored value is shorter than the fixed entry header.
    #[error("stored value has {len} bytes, shorter than the entry header")]
    Truncated {
        /// Length of the stored value.
        len: usize,
    },
    /// The checksum over index, term and payload does not match.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// Checksum stored with the entry.
        stored: u32,
        /// Checksum of what was read.
        computed: u32,
    },
    /// The entry's term is lower than the term before it, which Raft never writes.
    #[error("term {term} is lower than the term {previous} before it")]
    TermRegression {
        /// The entry's term.
        term: u64,
        /// Term of the entry (or compacted prefix) before it.
        previous: u64,
    },
}

/// Errors of the log, hard-state and snapshot stores.
///
/// Variants whose name starts with `Corrupt`, `Missing` or `Stray` mean data that
/// may have been acknowledged is damaged; the store refuses to open rather than
/// drop it, and the operator must restore the node (for example from peers).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file-system operation failed (disk full, permissions, I/O error).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// File or directory concerned.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: io::Error,
    },
    /// The key/value store under the log failed. Shared by every caller of a failed
    /// group commit, hence the `Arc`.
    #[error("log database {path}: {source}")]
    Database {
        /// Directory of the database.
        path: PathBuf,
        /// The database error.
        #[source]
        source: Arc<fjall::Error>,
    },
    /// Writing or syncing the log failed. Whether the write reached the disk
    /// is unknown, and after a failed sync the page cache may hold data the
    /// disk does not, so the store writes nothing more; the node must stop.
    #[error(
        "writing the log in {path} failed: {source}; the store accepts no more writes. \
         Check the disk (the kernel log says more), then restart the node: it recovers \
         from what the disk holds, not from the page cache"
    )]
    WriteFailed {
        /// Directory of the database.
        path: PathBuf,
        /// The database error. Shared by every caller of the failed group.
        #[source]
        source: Arc<fjall::Error>,
    },
    /// A log entry inside the durable bounds fails validation.
    #[error("log entry {index} in {path} is corrupt: {defect}")]
    CorruptEntry {
        /// Directory of the log database.
        path: PathBuf,
        /// Index of the damaged entry.
        index: u64,
        /// What is wrong with it.
        defect: EntryDefect,
    },
    /// A log entry inside the durable bounds is absent.
    #[error(
        "log entry {index} is missing from {path}; the durable log state says entries {first}..={last} are present"
    )]
    MissingEntry {
        /// Directory of the log database.
        path: PathBuf,
        /// Index of the first missing entry.
        index: u64,
        /// First index the durable state records.
        first: u64,
        /// Last index the durable state records.
        last: u64,
    },
    /// A log entry exists beyond the durable last index: the recorded bounds are stale,
    /// so acknowledged entries could be miscounted.
    #[error("log entry {index} in {path} lies beyond the durable last index {last}")]
    StrayEntry {
        /// Directory of the log database.
        path: PathBuf,
        /// Index of the unexpected entry.
        index: u64,
        /// Last index the durable state records.
        last: u64,
    },
    /// A metadata record (log state, hard state, format marker) is damaged or missing.
    #[error("{record} record in {path} is corrupt: {detail}")]
    CorruptRecord {
        /// Directory of the log database.
        path: PathBuf,
        /// Which record.
        record: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A snapshot file is damaged.
    #[error("snapshot {path} is corrupt: {detail}")]
    CorruptSnapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The requested index is at or below the compacted prefix (send a snapshot instead).
    #[error("log index {index} is compacted; the log starts at {first_index}")]
    Compacted {
        /// The requested index.
        index: u64,
        /// First index still in the log.
        first_index: u64,
    },
    /// The requested index is beyond the last entry.
    #[error("log index {index} is beyond the last index {last_index}")]
    Unavailable {
        /// The requested index.
        index: u64,
        /// Last index in the log.
        last_index: u64,
    },
    /// An append that would leave a gap, reorder entries or lower a term.
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    /// A hard-state update that would break election safety.
    #[error("invalid hard state: {0}")]
    InvalidHardState(String),
    /// A snapshot older than the latest one kept.
    #[error("snapshot at index {index} is older than the latest snapshot at index {latest}")]
    StaleSnapshot {
        /// Index of the rejected snapshot.
        index: u64,
        /// Index of the latest snapshot.
        latest: u64,
    },
    /// Another open snapshot store (in this process or another) holds the
    /// directory.
    #[error("snapshot directory {dir} is in use by another store; stop its process first")]
    Locked {
        /// The snapshot directory.
        dir: PathBuf,
    },
    /// A snapshot is already being received into this store; only one
    /// reception runs at a time, since each one deletes the others' partial files.
    #[error("a snapshot is already being received into {dir}")]
    ReceptionInProgress {
        /// Directory of the snapshot store.
        dir: PathBuf,
    },
    /// A received chunk that does not continue the data held, or runs past the
    /// snapshot's length. Nothing of it was written.
    #[error(
        "snapshot chunk of {len} bytes at offset {offset} refused: {received} of {data_len} bytes are held"
    )]
    UnexpectedChunk {
        /// Offset the chunk claims.
        offset: u64,
        /// Its length.
        len: u64,
        /// Data bytes held, where the next chunk must start.
        received: u64,
        /// Length of the snapshot's data.
        data_len: u64,
    },
    /// A received snapshot was finished before all its data arrived. The
    /// partial file is kept for a resume.
    #[error("snapshot incomplete: {received} of {data_len} bytes received")]
    IncompleteSnapshot {
        /// Data bytes held.
        received: u64,
        /// Length of the snapshot's data.
        data_len: u64,
    },
    /// A write too large to store; refused before it reached the database,
    /// which is unchanged.
    #[error("{what} {index} is {bytes} bytes, over the storage limit of {limit} bytes")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Index of the entry.
        index: u64,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// An earlier write or sync failed; what is on disk may differ from what was
    /// in memory, so the store accepts no more writes until it is reopened.
    #[error(
        "storage at {path} stopped after a failed write ({cause}); check the disk, then restart \
         the node"
    )]
    Poisoned {
        /// Directory of the store.
        path: PathBuf,
        /// The original failure.
        cause: String,
    },
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn database(path: &std::path::Path, source: fjall::Error) -> Self {
        Self::Database {
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }

    /// Whether the error reports damaged durable data rather than a failed operation.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Self::CorruptEntry { .. }
                | Self::MissingEntry { .. }
                | Self::StrayEntry { .. }
                | Self::CorruptRecord { .. }
                | Self::CorruptSnapshot { .. }
        )
    }
}
