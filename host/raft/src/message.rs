//! Messages exchanged between cores.

use crate::types::{Entry, Index, NodeId, SnapshotMeta, Term};

/// A message from one core to another. The driver carries it unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// Sender's term; for `PreVote` the term the sender would campaign in.
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// The kinds of messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// Would you vote for me in `term` (Raft thesis §9.6)? Changes no state.
    PreVote {
        /// Index of the sender's last entry.
        last_index: Index,
        /// Term of the sender's last entry.
        last_term: Term,
    },
    /// Answer to `PreVote`.
    PreVoteResponse {
        /// Whether the vote would be granted.
        granted: bool,
    },
    /// RequestVote (Raft §5.2).
    Vote {
        /// Index of the candidate's last entry.
        last_index: Index,
        /// Term of the candidate's last entry.
        last_term: Term,
        /// The candidate campaigns because the leader handed over to it
        /// (`TimeoutNow`): voters set aside the leader lease (thesis §3.10).
        transfer: bool,
    },
    /// Answer to `Vote`.
    VoteResponse {
        /// Whether the vote was granted.
        granted: bool,
    },
    /// AppendEntries (Raft §5.3).
    Append {
        /// Index of the entry preceding `entries`.
        prev_index: Index,
        /// Term of that entry.
        prev_term: Term,
        /// New entries, contiguous from `prev_index + 1`; may be empty.
        entries: Vec<Entry>,
        /// Leader's commit index.
        commit: Index,
    },
    /// Answer to `Append`.
    AppendResponse(AppendOutcome),
    /// Leader liveness and read confirmation; never carries entries.
    Heartbeat {
        /// `min(leader commit, follower's known match)`, so that it never
        /// commits entries the follower may not have.
        commit: Index,
        /// ReadIndex round the heartbeat confirms (0: none).
        read_round: u64,
    },
    /// Answer to `Heartbeat`.
    HeartbeatResponse {
        /// The `read_round` of the heartbeat answered.
        read_round: u64,
    },
    /// Leadership transfer (thesis §3.10): the leader, having brought the
    /// recipient's log up to date, asks it to campaign at once.
    TimeoutNow,
    /// InstallSnapshot (Raft §7): the follower's next entry is compacted
    /// away. The driver streams the snapshot's data alongside and delivers
    /// this message to the follower's core once the data is complete and
    /// verified; the core sees only the metadata.
    Snapshot {
        /// What the snapshot stands for.
        meta: SnapshotMeta,
    },
    /// A follower asks its leader for a read index (thesis §6.4, follower
    /// reads).
    ReadIndexRequest {
        /// The follower's context for the read.
        ctx: u64,
    },
    /// The leader's answer: serve the read once `index` is applied.
    ReadIndexResponse {
        /// The follower's context for the read.
        ctx: u64,
        /// The leader's commit index once it confirmed its leadership.
        index: Index,
    },
}

/// Result of an `Append` at the follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The follower's log now matches the leader's up to `last_index`.
    Accepted {
        /// Last index known to match.
        last_index: Index,
    },
    /// The entry at `prev_index` did not match. The hint lets the leader skip
    /// a whole term of conflicting entries per round trip (Raft §5.3, last
    /// paragraph): the follower's largest index `<= min(prev_index, last)`
    /// whose term is `<=` the leader's `prev_term`, and that term.
    Rejected {
        /// The `prev_index` of the rejected append.
        prev_index: Index,
        /// Candidate index for the next probe.
        hint_index: Index,
        /// Term of the follower's entry at `hint_index`.
        hint_term: Term,
    },
}

impl Message {
    /// Whether this is a request or answer of an election.
    pub fn is_election(&self) -> bool {
        matches!(
            self.body,
            MessageBody::PreVote { .. }
                | MessageBody::PreVoteResponse { .. }
                | MessageBody::Vote { .. }
                | MessageBody::VoteResponse { .. }
        )
    }
}
