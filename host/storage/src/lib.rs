//! Durable storage for Kythira's Raft: the log and hard state in fjall, snapshots
//! in files.
//!
//! - [`LogStore`], [`HardStateStore`] and [`RaftStorage`] are the interface the
//!   consensus driver uses; [`FjallStore`] implements them durably with group
//!   commit, [`MemoryStore`] in memory for tests and simulation.
//! - [`SnapshotStore`] keeps the latest complete snapshot, written as a stream and
//!   read back in chunks, and receives one from another node, resuming an
//!   interrupted transfer ([`Incoming`]).
//!
//! Every write is acknowledged only after it is synced to disk. Every entry, record
//! and snapshot carries a CRC-32C; damage to acknowledged data is reported as a
//! typed [`StorageError`] naming the file and index, never silently dropped.
//!
//! The API is blocking. An async daemon calls it through `spawn_blocking` or from
//! a dedicated storage thread.

mod codec;
mod error;
mod fjall_store;
mod memory;
mod shape;
mod snapshot;
mod traits;
mod types;

pub use error::{EntryDefect, Result, StorageError};
pub use fjall_store::{FjallStore, layout};
pub use memory::MemoryStore;
pub use snapshot::{Incoming, SnapshotInfo, SnapshotReader, SnapshotStore, SnapshotWriter};
pub use traits::{HardStateStore, LogStore, RaftStorage};
pub use types::{
    ENTRY_OVERHEAD, HardState, LogEntry, MAX_ENTRY_BYTES, MAX_WRITE_BYTES, SnapshotMeta,
};
