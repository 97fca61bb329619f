//! Static configuration of a core.

use crate::error::ConfigError;
use crate::types::NodeId;

/// Settings of one core. Build with [`Config::new`] and adjust fields
/// (non-exhaustive, so that settings can be added without breaking drivers).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// This node.
    pub id: NodeId,
    /// The voters the cluster was bootstrapped with. Configuration entries
    /// in the log override them. Empty for a node that joins an existing
    /// cluster: it learns the membership from the leader's log, and neither
    /// votes nor campaigns until the log makes it a voter.
    pub voters: Vec<NodeId>,
    /// Minimum election timeout in ticks; each timeout is drawn uniformly from
    /// `[election_ticks, 2 * election_ticks)`. Also the check-quorum period and
    /// the leader lease during which vote requests are ignored.
    pub election_ticks: u32,
    /// Ticks between heartbeats; must be smaller than `election_ticks`.
    pub heartbeat_ticks: u32,
    /// Most entries in one `Append`.
    pub max_entries_per_message: usize,
    /// Most payload bytes (plus a fixed per-entry overhead) in one `Append`;
    /// a single larger entry is still sent alone.
    pub max_bytes_per_message: usize,
    /// Most unacknowledged `Append`s per follower in the replicate state.
    pub max_inflight_messages: usize,
    /// Most writes outstanding at once in the [`crate::Driver`]: while one
    /// is being made durable the next may already be handed out, and they
    /// are acknowledged in order. One means each write waits for the last.
    pub max_outstanding_writes: usize,
    /// Run a pre-vote round before incrementing the term (thesis §9.6), so a
    /// node rejoining from a partition does not disrupt a working leader.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within `election_ticks`
    /// steps down, and nodes ignore vote requests while they have a live leader.
    pub check_quorum: bool,
    /// Serve [`crate::Raft::lease_read`] from the leader lease, without a
    /// round of heartbeats (thesis §6.4.1). Needs `check_quorum`, and must be
    /// the same on every node: a restarted node then refuses to vote for an
    /// election timeout, since it forgot the leader it heard from.
    ///
    /// Assumes that the tick rates of any two nodes differ by less than
    /// `lease_drift_ticks` in `election_ticks` (clock drift, not skew: the
    /// lease is measured in each node's own ticks).
    pub lease_reads: bool,
    /// How many ticks shorter than `election_ticks` the lease is: the margin
    /// for clock drift between nodes, plus one for tick phase (so at least
    /// one). With tick
    /// rates within ±5 % of each other, `election_ticks / 10 + 2` suffices.
    pub lease_drift_ticks: u32,
    /// Seed of the election-timeout generator; give each node its own.
    pub seed: u64,
    /// An injected bug, for testing the tests.
    #[cfg(feature = "mutants")]
    pub mutation: Option<Mutation>,
}

/// Classic Raft bugs that can be switched on to check that the simulator
/// catches them. Exists only with the `mutants` feature.
#[cfg(feature = "mutants")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// Commit an entry of an earlier term once a quorum stores it (the bug of
    /// figure 8 in the Raft paper).
    CommitPreviousTermByCount,
    /// Grant votes without checking that the candidate's log is up to date.
    VoteWithoutLogCheck,
    /// Send vote responses before the vote is durable.
    VoteBeforePersist,
    /// Accept an `Append` without checking the entry before it.
    AppendWithoutPrevCheck,
    /// Grant a vote although this node already voted for another candidate
    /// in the term (the log check stays).
    VoteTwiceInTerm,
    /// Count every granted vote response, so a duplicated message counts
    /// twice. Needs five voters to matter: with three, one grant besides the
    /// candidate's own already wins.
    CountDuplicateVotes,
    /// Send append and heartbeat responses before the entries or term they
    /// acknowledge are durable.
    AckBeforePersist,
    /// Count the leader's own last index towards the commit quorum, not its
    /// durable one.
    LeaderCountsUnstableSelf,
    /// Send the leader's full commit index on heartbeats, not clamped to
    /// what the follower is known to store.
    HeartbeatCommitUnclamped,
    /// On a conflict, overwrite the conflicting entries in place but keep
    /// the follower's old entries after the new ones.
    KeepConflictingSuffix,
    /// Answer every rejection with a hint one entry back, so the leader backs
    /// up one entry per round trip.
    NoFastBacktracking,
    /// A heartbeat response does not unpause a probe: a lost probe stalls the
    /// follower until the next leader.
    ProbeNeverRetried,
    /// Take a follower's match as the end of each append when sending it in
    /// the replicate state, not when it is accepted.
    MatchOnSend,
    /// Confirm ReadIndex rounds on the leader's own acknowledgement alone.
    ReadWithoutQuorum,
    /// Start ReadIndex rounds before an entry of the leader's term commits.
    ReadBeforeTermCommit,
    /// In the joint phase, decide commits, elections and reads on the
    /// incoming voters' majority alone.
    JointNewMajorityOnly,
    /// Count learners' acknowledgements and votes towards the voters'
    /// majorities.
    LearnerInQuorum,
    /// Send `TimeoutNow` to a transfer's target without first bringing its
    /// log up to date.
    TransferWithoutCatchUp,
    /// Run the lease from the last heartbeat sent, acknowledged or not: a
    /// deposed leader cut off from the others keeps serving lease reads.
    LeaseWithoutQuorum,
    /// Install a received snapshot even when this node has already
    /// committed (and applied) past it.
    SnapshotOverCommitted,
}

#[cfg(feature = "mutants")]
impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 20] = [
        Mutation::CommitPreviousTermByCount,
        Mutation::VoteWithoutLogCheck,
        Mutation::VoteBeforePersist,
        Mutation::AppendWithoutPrevCheck,
        Mutation::VoteTwiceInTerm,
        Mutation::CountDuplicateVotes,
        Mutation::AckBeforePersist,
        Mutation::LeaderCountsUnstableSelf,
        Mutation::HeartbeatCommitUnclamped,
        Mutation::KeepConflictingSuffix,
        Mutation::NoFastBacktracking,
        Mutation::ProbeNeverRetried,
        Mutation::MatchOnSend,
        Mutation::ReadWithoutQuorum,
        Mutation::ReadBeforeTermCommit,
        Mutation::JointNewMajorityOnly,
        Mutation::LearnerInQuorum,
        Mutation::TransferWithoutCatchUp,
        Mutation::LeaseWithoutQuorum,
        Mutation::SnapshotOverCommitted,
    ];

    /// Stable short name.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::CommitPreviousTermByCount => "commit-previous-term-by-count",
            Mutation::VoteWithoutLogCheck => "vote-without-log-check",
            Mutation::VoteBeforePersist => "vote-before-persist",
            Mutation::AppendWithoutPrevCheck => "append-without-prev-check",
            Mutation::VoteTwiceInTerm => "vote-twice-in-a-term",
            Mutation::CountDuplicateVotes => "count-duplicate-votes",
            Mutation::AckBeforePersist => "ack-before-persist",
            Mutation::LeaderCountsUnstableSelf => "leader-counts-unstable-self",
            Mutation::HeartbeatCommitUnclamped => "heartbeat-commit-unclamped",
            Mutation::KeepConflictingSuffix => "keep-conflicting-suffix",
            Mutation::NoFastBacktracking => "no-fast-backtracking",
            Mutation::ProbeNeverRetried => "probe-never-retried",
            Mutation::MatchOnSend => "match-on-send",
            Mutation::ReadWithoutQuorum => "read-without-quorum",
            Mutation::ReadBeforeTermCommit => "read-before-term-commit",
            Mutation::JointNewMajorityOnly => "joint-new-majority-only",
            Mutation::LearnerInQuorum => "learner-in-quorum",
            Mutation::TransferWithoutCatchUp => "transfer-without-catch-up",
            Mutation::LeaseWithoutQuorum => "lease-without-quorum",
            Mutation::SnapshotOverCommitted => "snapshot-over-committed",
        }
    }
}

impl Config {
    /// Defaults that suit a LAN with a tick of about 10 ms: election timeout
    /// 10–20 ticks, heartbeat every 2, pre-vote and check-quorum on.
    pub fn new(id: NodeId, voters: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            id,
            voters: voters.into_iter().collect(),
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_entries_per_message: 256,
            max_bytes_per_message: 1 << 20,
            max_inflight_messages: 64,
            max_outstanding_writes: 64,
            pre_vote: true,
            check_quorum: true,
            lease_reads: false,
            lease_drift_ticks: 3,
            seed: id,
            #[cfg(feature = "mutants")]
            mutation: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::ReservedId);
        }
        let mut voters = self.voters.clone();
        voters.sort_unstable();
        if voters.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateVoter);
        }
        if voters.contains(&0) {
            return Err(ConfigError::ReservedId);
        }
        if self.heartbeat_ticks == 0 || self.heartbeat_ticks >= self.election_ticks {
            return Err(ConfigError::Timeouts {
                heartbeat: self.heartbeat_ticks,
                election: self.election_ticks,
            });
        }
        if self.lease_reads
            && (!self.check_quorum
                || self.lease_drift_ticks == 0
                || self.lease_drift_ticks >= self.election_ticks)
        {
            return Err(ConfigError::Lease {
                drift: self.lease_drift_ticks,
                election: self.election_ticks,
            });
        }
        if self.max_entries_per_message == 0
            || self.max_bytes_per_message == 0
            || self.max_inflight_messages == 0
            || self.max_outstanding_writes == 0
        {
            return Err(ConfigError::ZeroLimit);
        }
        Ok(())
    }

    #[cfg(feature = "mutants")]
    pub(crate) fn mutated(&self, m: Mutation) -> bool {
        self.mutation == Some(m)
    }
}
