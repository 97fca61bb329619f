//! The storage interface the consensus driver programs against.
//!
//! Every method blocks until its work is done and, for writes, durable. From an
//! async runtime, call them through `tokio::task::spawn_blocking` or from a
//! dedicated storage thread; never on a reactor thread.

use crate::{HardState, LogEntry, Result};
use std::ops::Range;

/// The Raft log: a contiguous run of entries after a compacted prefix.
///
/// Indexes start at 1; an empty, never-compacted log has `first_index() == 1` and
/// `last_index() == 0`. Writes return only once they are durable (fsync'd) and then
/// are visible to reads; reads never see a write that is not yet durable.
pub trait LogStore: Send + Sync {
    /// First index still stored (one past the compacted prefix).
    fn first_index(&self) -> u64;

    /// Index of the last entry, or of the last compacted entry if the log is empty.
    fn last_index(&self) -> u64;

    /// Term of `index`. Works for the last compacted index too (Raft's consistency
    /// check needs the term just before the first stored entry).
    fn term(&self, index: u64) -> Result<u64>;

    /// The entry at `index`.
    fn entry(&self, index: u64) -> Result<LogEntry>;

    /// Entries of `range` in order, stopping before the total
    /// [`size`](LogEntry::size) would exceed `max_bytes`, but always at least one
    /// entry when the range is non-empty.
    fn entries(&self, range: Range<u64>, max_bytes: u64) -> Result<Vec<LogEntry>>;

    /// Appends contiguous `entries`. The first may start anywhere from
    /// `first_index()` to `last_index() + 1`; every stored entry from there on is
    /// replaced, so a follower resolves a conflict in one atomic step. Terms must
    /// not decrease.
    ///
    /// Replacement is unconditional: the caller applies Raft's rule first and passes
    /// only the entries from the first conflicting (or new) index. Passing a stale,
    /// shorter batch that merely matches the log would truncate it.
    fn append(&self, entries: &[LogEntry]) -> Result<()>;

    /// Removes every entry from `from` on (a no-op past the end). The compacted
    /// prefix cannot be truncated.
    fn truncate_suffix(&self, from: u64) -> Result<()>;

    /// Discards entries up to and including `upto`, which must be in the log,
    /// remembering its term. A no-op for an already compacted index.
    fn compact_prefix(&self, upto: u64) -> Result<()>;

    /// Discards the whole log so that it continues after a snapshot at
    /// (`index`, `term`); used when a follower installs a snapshot that its log does
    /// not match.
    fn reset(&self, index: u64, term: u64) -> Result<()>;
}

/// Storage of Raft's [`HardState`].
pub trait HardStateStore: Send + Sync {
    /// The last durably saved hard state (all zero on a new store).
    fn hard_state(&self) -> HardState;

    /// Saves `state` durably. Rejects a lower term, and a different vote in the
    /// same term: either would let this node vote twice in one term.
    fn save_hard_state(&self, state: &HardState) -> Result<()>;
}

/// Both halves of Raft's persistent state, written together.
pub trait RaftStorage: LogStore + HardStateStore {
    /// Saves `hard_state` (if any) and appends `entries` (as
    /// [`LogStore::append`]) in one atomic, durable step: what a driver does with
    /// each batch of consensus output before sending the messages that depend on it.
    fn save(&self, hard_state: Option<&HardState>, entries: &[LogEntry]) -> Result<()>;
}

/// Checks that moving from `current` to `next` keeps election safety.
pub(crate) fn check_hard_state(current: &HardState, next: &HardState) -> Result<()> {
    use crate::StorageError::InvalidHardState;
    if next.term < current.term {
        return Err(InvalidHardState(format!(
            "term would go back from {} to {}",
            current.term, next.term
        )));
    }
    if next.term == current.term && current.vote.is_some() && next.vote != current.vote {
        return Err(InvalidHardState(format!(
            "vote in term {} would change from {:?} to {:?}",
            next.term, current.vote, next.vote
        )));
    }
    Ok(())
}

/// Entries of `source` within `max_bytes`, at least one.
pub(crate) fn within_budget(
    source: impl Iterator<Item = Result<LogEntry>>,
    max_bytes: u64,
) -> Result<Vec<LogEntry>> {
    let mut out = Vec::new();
    let mut total = 0u64;
    for entry in source {
        let entry = entry?;
        total = total.saturating_add(entry.size());
        if !out.is_empty() && total > max_bytes {
            break;
        }
        out.push(entry);
    }
    Ok(out)
}
