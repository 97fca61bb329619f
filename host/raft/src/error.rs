//! Errors returned by the core. None of them changes the core's state.

use crate::membership::MembershipError;
use crate::types::{Index, NodeId, Term};

/// The configuration cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Node id 0 means "nobody".
    #[error("node id 0 is reserved")]
    ReservedId,
    /// A voter is listed twice.
    #[error("a voter is listed twice")]
    DuplicateVoter,
    /// Heartbeats must come more often than elections.
    #[error(
        "heartbeat ({heartbeat} ticks) must be positive and below the election timeout ({election} ticks)"
    )]
    Timeouts {
        /// Configured heartbeat interval.
        heartbeat: u32,
        /// Configured election timeout.
        election: u32,
    },
    /// A message limit is zero.
    #[error("message, inflight and outstanding-write limits must be positive")]
    ZeroLimit,
    /// Lease reads need check-quorum and a lease shorter than an election
    /// timeout.
    #[error(
        "lease reads need check_quorum and a drift margin ({drift} ticks) of at least one tick, below the election timeout ({election} ticks)"
    )]
    Lease {
        /// Configured drift margin.
        drift: u32,
        /// Configured election timeout.
        election: u32,
    },
}

/// The persisted state handed to [`crate::Raft::new`] is inconsistent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Entries must be contiguous from index 1 with non-decreasing terms.
    #[error("persisted entry {index} is out of place (term {term})")]
    BadEntry {
        /// Index found.
        index: Index,
        /// Its term.
        term: Term,
    },
    /// An entry's term is above the persisted current term.
    #[error("persisted entry term {entry_term} is above the persisted term {term}")]
    EntryFromFuture {
        /// The entry's term.
        entry_term: Term,
        /// The hard state's term.
        term: Term,
    },
    /// The commit index or the applied index is past the end of the log.
    /// (Applied above commit is fine: the restored commit index is the larger.)
    #[error("commit {commit} / applied {applied} out of range of the log ending at {last}")]
    BadCommit {
        /// Persisted commit.
        commit: Index,
        /// Persisted applied.
        applied: Index,
        /// Last persisted index.
        last: Index,
    },
    /// The persisted term is above [`crate::MAX_TERM`].
    #[error("persisted term {term} is above the largest term")]
    TermOutOfRange {
        /// The hard state's term.
        term: Term,
    },
    /// The persisted snapshot is of a later term than the hard state, at
    /// index 0, or without voters.
    #[error("persisted snapshot is inconsistent with the hard state")]
    BadSnapshot,
    /// The persisted vote is for node 0 ("nobody").
    #[error("persisted vote for the reserved node id 0")]
    ReservedVote,
    /// A persisted configuration entry does not decode.
    #[error("persisted configuration entry {index}: {error}")]
    BadMembership {
        /// Its index.
        index: Index,
        /// Why it does not decode.
        error: MembershipError,
    },
}

/// A message was refused; the core is unchanged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    /// The message is not addressed to this node.
    #[error("message for {to} delivered to {me}")]
    WrongRecipient {
        /// Addressee.
        to: NodeId,
        /// This node.
        me: NodeId,
    },
    /// The sender is node 0 ("nobody") or this node itself.
    #[error("message from impossible sender {0}")]
    UnknownSender(NodeId),
    /// The message violates the protocol's structural rules.
    #[error("malformed message from {from}: {reason}")]
    Malformed {
        /// Sender.
        from: NodeId,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A proposal was refused; nothing was appended.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    /// Only the leader accepts proposals.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// Leadership is being handed to another node; retry there.
    #[error("leadership is being transferred to {to}")]
    Transferring {
        /// The node becoming leader.
        to: NodeId,
    },
}

/// A membership change was refused; nothing was appended.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembershipChangeError {
    /// Only the leader changes the membership.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// Leadership is being handed to another node; retry there.
    #[error("leadership is being transferred to {to}")]
    Transferring {
        /// The node becoming leader.
        to: NodeId,
    },
    /// A membership change is still under way (not committed, or in its
    /// joint phase): one change at a time.
    #[error("a membership change is still under way")]
    Pending,
    /// The requested membership is not a valid target.
    #[error("invalid membership: {0}")]
    Invalid(#[from] MembershipError),
}

/// A snapshot or compaction was refused; nothing changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompactError {
    /// The index is not both applied and above the latest snapshot.
    #[error("no snapshot at {index}: the latest is at {snapshot}, applied is {applied}")]
    OutOfRange {
        /// Index asked for.
        index: Index,
        /// The latest snapshot's index.
        snapshot: Index,
        /// Highest index handed out for application.
        applied: Index,
    },
    /// This node does not know the membership at that index.
    #[error("the membership at {index} is not known here")]
    UnknownMembership {
        /// Index of the snapshot.
        index: Index,
    },
    /// The metadata is not the log's at that index.
    #[error("snapshot metadata at {index} does not match the log")]
    Mismatch {
        /// Index of the snapshot.
        index: Index,
    },
}

/// A leadership transfer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    /// Only the leader can hand over leadership.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// The target is this node.
    #[error("node {0} leads already")]
    AlreadyLeader(NodeId),
    /// The target is not a voter of the incoming configuration.
    #[error("node {0} is not a voter")]
    NotAVoter(NodeId),
}
