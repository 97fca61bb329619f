//! Errors returned by the core. None of them changes the core's state.

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
    /// The node itself must be a voter.
    #[error("node {0} is not among the voters")]
    NotAVoter(NodeId),
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
    #[error("message and inflight limits must be positive")]
    ZeroLimit,
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
    /// The persisted vote is not a voter.
    #[error("persisted vote for {0} who is not a voter")]
    UnknownVote(NodeId),
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
    /// The sender is not a member.
    #[error("message from unknown node {0}")]
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
}
