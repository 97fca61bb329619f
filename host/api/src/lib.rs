//! The client protocol of Kythira: what an application may ask a node, and
//! what it answers.
//!
//! The same types travel over QUIC (postcard-encoded, multiplexed by request
//! id) and back the HTTP API and the CLI. Every request is answered with a
//! [`Reply`]: a [`Response`] or a typed [`ApiError`] that tells the caller
//! what to do next (follow the leader, retry, or give up).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Version of this protocol, carried by [`Request::Status`] answers so that
/// clients can tell which node speaks what.
pub const PROTOCOL_VERSION: u32 = 3;

/// A command, query or answer, either in the plugin's own binary encoding or
/// as JSON that the plugin translates at the edge (the log always holds the
/// binary form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// The plugin's binary encoding, passed through untouched.
    Bytes(Bytes),
    /// JSON text: the node translates it with the plugin, and answers in JSON too.
    Json(String),
}

impl Payload {
    /// Whether this payload is JSON (and so wants a JSON answer).
    pub fn is_json(&self) -> bool {
        matches!(self, Payload::Json(_))
    }
}

/// Where a command sits in a client session, for exactly-once application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSeq {
    /// The session id returned by [`Request::RegisterSession`].
    pub id: u64,
    /// The command's serial number in the session, starting at 1. A retry of
    /// a command reuses its serial and gets the first answer back.
    pub serial: u64,
    /// Every serial below this one has been answered to the client, so the
    /// cluster may forget those answers.
    pub acked: u64,
}

/// How fresh a query must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    /// Linearizable: the leader confirms it still leads with a quorum
    /// (ReadIndex) and serves the query once it applied up to that point.
    #[default]
    Linearizable,
    /// Served by the leader from its lease (Raft thesis §6.4.1): no round of
    /// heartbeats while a quorum acknowledged it within an election timeout,
    /// less a margin for clock drift. Linearizable as long as the nodes'
    /// clocks run at about the same rate. Leader only: a follower answers
    /// [`ApiError::NotLeader`].
    Lease,
    /// Whatever the node that receives the query has applied; may be stale.
    Stale,
}

/// Resource limits for a deployed plugin; `None` takes the cluster's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployLimits {
    /// Fuel for one `apply` call.
    pub apply_fuel: Option<u64>,
    /// Fuel for one `query` call.
    pub query_fuel: Option<u64>,
    /// Maximum linear memory, in bytes.
    pub memory_bytes: Option<u64>,
    /// Fuel for one `get-state` or `restore-from-snapshot` call (checkpoints,
    /// snapshots, upgrades): these touch the whole state.
    pub snapshot_fuel: Option<u64>,
}

/// What a client asks a node. Variants are numbered by position on the
/// wire (and in snapshots' session tables): new ones go last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Replicate a command for a state machine and return its response.
    Apply {
        /// Name of the state machine.
        machine: String,
        /// The command.
        command: Payload,
        /// Session position for exactly-once application, if any.
        session: Option<SessionSeq>,
    },
    /// Run a read-only query against a state machine.
    Query {
        /// Name of the state machine.
        machine: String,
        /// The query.
        query: Payload,
        /// How fresh the answer must be.
        consistency: Consistency,
    },
    /// Deploy (or upgrade, if the name exists) a state machine's code.
    Deploy {
        /// Name of the state machine.
        machine: String,
        /// The WebAssembly component.
        component: Bytes,
        /// Resource limits for its calls.
        limits: DeployLimits,
    },
    /// Open a client session; its id numbers the commands that follow.
    RegisterSession,
    /// Describe the node and what it knows of the cluster.
    Status,
    /// The cluster's members as the leader sees them.
    Members,
    /// Add node `id` as a learner: it receives the log but does not vote.
    /// Its addresses are replicated, so every member can reach it.
    AddLearner {
        /// The new node's id (its certificate's).
        id: u64,
        /// Its peer address, `ip:port`.
        peer: String,
        /// Its client address, `ip:port`.
        client: String,
    },
    /// Make learner `id` a voter, once it has caught up with the leader.
    Promote {
        /// The learner.
        id: u64,
    },
    /// Remove node `id`, voter or learner; it stops serving.
    RemoveMember {
        /// The member.
        id: u64,
    },
    /// Hand leadership to voter `to`.
    TransferLeadership {
        /// The voter to lead.
        to: u64,
    },
    /// Answered at once by the connection's handler, without touching the
    /// node: a round trip of the client protocol alone.
    Ping,
    /// Upgrade the code of an existing state machine: at the entry's index
    /// every replica hands the old code's state to the new code, or keeps
    /// the old code if that fails. Limits named here replace the machine's.
    Upgrade {
        /// Name of the state machine.
        machine: String,
        /// The new WebAssembly component.
        component: Bytes,
        /// Limits to change with the code; those left out stay as they are.
        limits: DeployLimits,
    },
    /// Rehearse an upgrade on the node asked, against a copy of its current
    /// state, then run `commands` and `queries` on the migrated copy. Changes
    /// nothing anywhere.
    DryRunUpgrade {
        /// Name of the state machine.
        machine: String,
        /// The new WebAssembly component.
        component: Bytes,
        /// Commands to apply to the migrated copy, in order.
        commands: Vec<Payload>,
        /// Queries to run against the migrated copy after the commands.
        queries: Vec<Payload>,
    },
    /// Change a state machine's limits; its state moves to an engine with
    /// the new limits at the entry's index, or nothing changes.
    SetLimits {
        /// Name of the state machine.
        machine: String,
        /// The limits to change; those left out stay as they are.
        limits: DeployLimits,
    },
    /// Remove a state machine and its state.
    Undeploy {
        /// Name of the state machine.
        machine: String,
    },
    /// The deployed state machines with their code, history, limits and state.
    Plugins,
}

impl Request {
    /// Whether only an administrator may send this request: code, the
    /// membership and the leadership are the operators'; data is the
    /// applications'.
    pub fn needs_admin(&self) -> bool {
        self.admin_action().is_some()
    }

    /// What an administrator's request does, for a refusal to name.
    pub fn admin_action(&self) -> Option<&'static str> {
        match self {
            Request::Deploy { .. }
            | Request::Upgrade { .. }
            | Request::DryRunUpgrade { .. }
            | Request::SetLimits { .. }
            | Request::Undeploy { .. } => Some("deploying code"),
            // Serializes every machine's state on the node asked.
            Request::Plugins => Some("reading the state machines' states"),
            Request::AddLearner { .. } | Request::Promote { .. } | Request::RemoveMember { .. } => {
                Some("changing the membership")
            }
            Request::TransferLeadership { .. } => Some("transferring leadership"),
            Request::Apply { .. }
            | Request::Query { .. }
            | Request::RegisterSession
            | Request::Status
            | Request::Members
            | Request::Ping => None,
        }
    }

    /// Whether the request changes replicated state (and so must reach the leader).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Apply { .. }
                | Request::Deploy { .. }
                | Request::Upgrade { .. }
                | Request::SetLimits { .. }
                | Request::Undeploy { .. }
                | Request::RegisterSession
                | Request::AddLearner { .. }
                | Request::Promote { .. }
                | Request::RemoveMember { .. }
        )
    }

    /// Whether only the leader answers it (a follower redirects).
    pub fn needs_leader(&self) -> bool {
        match self {
            Request::Query { consistency, .. } => *consistency == Consistency::Lease,
            Request::Members | Request::TransferLeadership { .. } => true,
            other => other.is_write(),
        }
    }
}

/// A successful answer. New variants go last (see [`Request`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The command was committed and applied at `index`.
    Applied {
        /// Log index of the command.
        index: u64,
        /// The state machine's response, in the encoding of the command.
        output: Payload,
    },
    /// The query's answer.
    Queried {
        /// The state machine's answer, in the encoding of the query.
        output: Payload,
    },
    /// The code was deployed at `index`.
    Deployed {
        /// Log index of the deploy entry.
        index: u64,
        /// sha256 of the component, hex.
        sha256: String,
    },
    /// A new session.
    Session {
        /// Its id (the log index that registered it).
        id: u64,
    },
    /// The node's status.
    Status(NodeStatus),
    /// The members, after a change or when listed.
    Members(Members),
    /// Leadership moved to `leader`, which leads `term`.
    Transferred {
        /// The new leader.
        leader: u64,
        /// Its term.
        term: u64,
    },
    /// The answer to `Ping`.
    Pong,
    /// The state machine was removed at `index`.
    Undeployed {
        /// Log index of the entry that removed it.
        index: u64,
    },
    /// What an upgrade would do, from a dry run.
    DryRun(DryRunReport),
    /// The deployed state machines.
    Plugins(Vec<PluginReport>),
}

/// What a node reports of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node's id.
    pub id: u64,
    /// `leader`, `follower`, `candidate` or `pre-candidate`.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// Client address of that leader.
    pub leader_addr: Option<String>,
    /// Last index in the log.
    pub last_index: u64,
    /// Highest committed index known.
    pub commit: u64,
    /// Highest index applied to the state machines.
    pub applied: u64,
    /// The deployed state machines.
    pub machines: Vec<MachineStatus>,
    /// Open client sessions.
    pub sessions: u64,
    /// Protocol version the node speaks.
    pub protocol: u32,
    /// Last index of the latest snapshot (0: none); the log holds only the
    /// entries after the index it was compacted behind.
    pub snapshot_index: u64,
    /// First index the log still holds.
    pub first_index: u64,
}

/// The cluster's membership as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// The leader answering.
    pub leader: u64,
    /// Its term.
    pub term: u64,
    /// Log index of the configuration in effect (0: the bootstrap one).
    pub config_index: u64,
    /// Whether that configuration is committed.
    pub committed: bool,
    /// Whether a change of voters is half way (the joint configuration).
    pub joint: bool,
    /// Every member, by id.
    pub members: Vec<MemberStatus>,
}

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its id.
    pub id: u64,
    /// `voter`, `learner`, or `outgoing` (a voter being removed, in the
    /// joint configuration).
    pub role: String,
    /// Its peer address, if known.
    pub peer: Option<String>,
    /// Its client address, if known.
    pub client: Option<String>,
    /// Highest log index known to be on its disk.
    pub matched: u64,
    /// Entries it is behind the leader's log.
    pub lag: u64,
}

/// One deployed state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// Its name.
    pub name: String,
    /// sha256 of its code, hex.
    pub sha256: String,
    /// Log index of the deploy that installed that code.
    pub deployed_at: u64,
}

/// A change of a state machine's code or limits, as its history lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeChange {
    /// Log index of the entry that made it.
    pub index: u64,
    /// sha256 of the code run from then on, hex.
    pub sha256: String,
    /// What changed.
    pub change: ChangeKind,
}

/// What a [`CodeChange`] was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// The machine was created.
    Deploy,
    /// New code took the machine's state over.
    Upgrade,
    /// The machine moved to other limits, same code.
    Limits,
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChangeKind::Deploy => "deploy",
            ChangeKind::Upgrade => "upgrade",
            ChangeKind::Limits => "limits",
        })
    }
}

/// The limits a state machine runs under, all of them resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsReport {
    /// Fuel for one apply.
    pub apply_fuel: u64,
    /// Fuel for one query.
    pub query_fuel: u64,
    /// Fuel for `get-state` and `restore-from-snapshot`.
    pub snapshot_fuel: u64,
    /// Memory cap in bytes.
    pub memory_bytes: u64,
}

/// One deployed state machine, as `kythira plugins` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginReport {
    /// Its name.
    pub name: String,
    /// sha256 of its code, hex.
    pub sha256: String,
    /// The WIT package its code conforms to.
    pub wit: String,
    /// Its limits.
    pub limits: LimitsReport,
    /// Deploys, upgrades and limit changes, oldest first (the latest 32).
    pub history: Vec<CodeChange>,
    /// Index the node had applied when it answered.
    pub applied: u64,
    /// Size of its state (`get-state`) on the node that answered.
    pub state_bytes: Option<u64>,
    /// sha256 of that state, hex: equal on replicas that applied the same
    /// index.
    pub state_sha256: Option<String>,
    /// Why the state could not be read, or why the machine is unavailable.
    pub error: Option<String>,
}

/// The outcome of a dry-run upgrade.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunReport {
    /// The state machine.
    pub machine: String,
    /// Index of the state the rehearsal started from.
    pub at_index: u64,
    /// sha256 of the code it runs, hex.
    pub from_sha256: String,
    /// sha256 of the new code, hex.
    pub to_sha256: String,
    /// The migration: its cost, or why it failed (then nothing else ran).
    pub migration: Result<MigrationReport, String>,
    /// Each command's answer on the migrated copy, in order.
    pub commands: Vec<Result<Payload, ApiError>>,
    /// Each query's answer, after the commands.
    pub queries: Vec<Result<Payload, ApiError>>,
}

/// What the migration of a dry run cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Fuel of the old code's `get-state` and the new code's restore.
    pub fuel_used: u64,
    /// Their wall-clock time on the node, in microseconds.
    pub micros: u64,
    /// Size of the state handed over, in bytes.
    pub state_bytes: u64,
}

/// Why a request failed, and so what the caller can do about it. New
/// variants go last (see [`Request`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    /// This node does not lead; ask `leader` (at `addr`, if known).
    #[error("not the leader{}", leader_hint(*.leader, .addr.as_deref()))]
    NotLeader {
        /// The leader this node knows of.
        leader: Option<u64>,
        /// Its client address.
        addr: Option<String>,
    },
    /// The command was proposed, but leadership changed before it committed;
    /// it may or may not take effect. Retry within a session to be sure.
    #[error(
        "the command's outcome is unknown (leadership changed or the node stopped before it committed); it may or may not have been applied"
    )]
    Outcome,
    /// No state machine of that name is deployed.
    #[error("no state machine named {0:?} is deployed")]
    UnknownMachine(String),
    /// The request could not be understood (for example, JSON the plugin refused).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The state machine answered with an error (replicated like any answer).
    #[error("state machine error: {0}")]
    Rejected(String),
    /// The plugin failed: trapped, ran out of fuel or memory.
    #[error("plugin failed: {0}")]
    Plugin(String),
    /// The deploy was refused (not a valid component, wrong imports, bad limits).
    #[error("deploy refused: {0}")]
    Deploy(String),
    /// The session is unknown or expired; register a new one.
    #[error("session {0} is unknown or expired")]
    SessionExpired(u64),
    /// The caller's certificate does not allow this request.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The membership change was refused (an unknown or existing id, the
    /// last voter, a learner not caught up, another change under way) or
    /// did not complete; nothing changed unless the text says so.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// Leadership did not move to the node asked for, and why.
    #[error("leadership transfer failed: {0}")]
    Transfer(String),
    /// The node is overloaded or shutting down; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The node gave up waiting (for a commit or a read).
    #[error("timed out")]
    Timeout,
    /// A fault in the node; the message says which.
    #[error("internal error: {0}")]
    Internal(String),
    /// The upgrade's entry committed at `index`, but the new code could not
    /// take the state over: every replica keeps the old code and state.
    #[error("upgrade of {machine} failed at index {index}, the old code keeps running: {reason}")]
    UpgradeFailed {
        /// The state machine.
        machine: String,
        /// Log index of the upgrade entry.
        index: u64,
        /// Why, as the runtime reported it (the plugin's error, a trap, fuel, memory).
        reason: String,
    },
}

fn leader_hint(leader: Option<u64>, addr: Option<&str>) -> String {
    match (leader, addr) {
        (Some(id), Some(addr)) => format!("; the leader is node {id} at {addr}"),
        (Some(id), None) => format!("; the leader is node {id}"),
        _ => "; no leader is known".to_string(),
    }
}

impl ApiError {
    /// Whether the same request may succeed if sent again (possibly elsewhere).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::NotLeader { .. }
                | ApiError::Outcome
                | ApiError::Unavailable(_)
                | ApiError::Timeout
        )
    }
}

/// The answer to every request.
pub type Reply = Result<Response, ApiError>;

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Json(s) => f.write_str(s),
            Payload::Bytes(b) => {
                for byte in b.iter() {
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_membership_and_leadership_are_for_administrators() {
        let admin = [
            Request::Deploy {
                machine: "kv".into(),
                component: Bytes::new(),
                limits: DeployLimits::default(),
            },
            Request::AddLearner {
                id: 4,
                peer: "127.0.0.1:1".into(),
                client: "127.0.0.1:2".into(),
            },
            Request::Promote { id: 4 },
            Request::RemoveMember { id: 4 },
            Request::TransferLeadership { to: 2 },
            Request::Upgrade {
                machine: "kv".into(),
                component: Bytes::new(),
                limits: DeployLimits::default(),
            },
            Request::DryRunUpgrade {
                machine: "kv".into(),
                component: Bytes::new(),
                commands: Vec::new(),
                queries: Vec::new(),
            },
            Request::SetLimits {
                machine: "kv".into(),
                limits: DeployLimits::default(),
            },
            Request::Undeploy {
                machine: "kv".into(),
            },
            Request::Plugins,
        ];
        for r in &admin {
            assert!(r.needs_admin(), "{r:?}");
        }
        let anyone = [
            Request::Apply {
                machine: "kv".into(),
                command: Payload::Json("{}".into()),
                session: None,
            },
            Request::Query {
                machine: "kv".into(),
                query: Payload::Json("{}".into()),
                consistency: Consistency::Lease,
            },
            Request::RegisterSession,
            Request::Status,
            Request::Members,
            Request::Ping,
        ];
        for r in &anyone {
            assert!(!r.needs_admin(), "{r:?}");
        }
    }

    #[test]
    fn followers_serve_linearizable_and_stale_reads_but_not_lease_reads() {
        let query = |consistency| Request::Query {
            machine: "kv".into(),
            query: Payload::Json("{}".into()),
            consistency,
        };
        assert!(!query(Consistency::Linearizable).needs_leader());
        assert!(!query(Consistency::Stale).needs_leader());
        assert!(query(Consistency::Lease).needs_leader());
        assert!(Request::Members.needs_leader());
        assert!(Request::Promote { id: 2 }.needs_leader());
        assert!(!Request::Status.needs_leader());
    }
}
