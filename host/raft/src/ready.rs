//! The batch of work the core hands to its driver.

use crate::message::Message;
use crate::types::{Entry, HardState, Index, SnapshotMeta};

/// Work for the driver, produced by [`crate::Raft::ready`].
///
/// The driver must, for each `Ready`, in this order of dependencies:
///
/// 1. send `messages` at any time, even before step 2 finishes: these are a
///    leader's `Append` and `Heartbeat` (followers count an entry only after
///    *they* persist it, and the leader counts its own copy only after step 4,
///    so the leader may write its log in parallel with replication, Raft
///    thesis §10.2.1) and `PreVote` traffic (which changes no state);
/// 2. durably install `snapshot` (if present: the received snapshot's data
///    replaces the state machine and the whole log, which then starts after
///    `snapshot.index`), then write `hard_state` (if present) and `entries`,
///    atomically, with `entries` replacing every stored entry at index
///    `>= entries[0].index` (fsync before step 3), after every `Ready`
///    handed out before it;
/// 3. only then, once this `Ready` and every one handed out before it are
///    durable, send `persisted_messages`: votes, vote requests and every
///    acknowledgement, which promise that the term, vote or entries they
///    describe survive a crash (a `Ready` with nothing to write may still
///    carry an acknowledgement of entries an earlier one is writing);
/// 4. apply `committed_entries` in order (they are already durable locally,
///    so this may overlap with step 2), serve `read_states` once the applied
///    index reaches their `index`, fail the reads in `dropped_reads`, and call
///    [`crate::Raft::advance`] after step 2 is durable, once per `Ready`, in
///    the order they were handed out.
///
/// The core may be stepped and ticked while a `Ready` is being handled, and
/// hands out further ones before the first is advanced; [`crate::Driver`]
/// keeps these rules and bounds how many are outstanding.
#[derive(Debug, Default)]
#[must_use = "a Ready must be persisted, sent and applied, then acknowledged with advance()"]
pub struct Ready {
    /// A received snapshot to install before the entries and hard state.
    pub snapshot: Option<SnapshotMeta>,
    /// New hard state to persist, if it changed.
    pub hard_state: Option<HardState>,
    /// Entries to persist, contiguous, replacing any stored suffix from the first.
    pub entries: Vec<Entry>,
    /// Messages that may be sent before this batch is durable.
    pub messages: Vec<Message>,
    /// Messages that must not be sent before this batch is durable.
    pub persisted_messages: Vec<Message>,
    /// Committed entries to apply, in log order, each handed out exactly once.
    pub committed_entries: Vec<Entry>,
    /// Linearizable reads whose leadership check completed.
    pub read_states: Vec<ReadState>,
    /// Read requests abandoned because this node stopped being leader.
    pub dropped_reads: Vec<u64>,
}

/// A confirmed ReadIndex request: the read may be served from the state
/// machine once it has applied `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// Commit index at the time the request was confirmed to come from the leader.
    pub index: Index,
    /// The caller's context given to [`crate::Raft::read_index`].
    pub ctx: u64,
}
