//! The node's metrics, in the Prometheus text format.
//!
//! One [`Metrics`] per node, shared by the event loop (consensus state, log
//! writes, proposals, replication lag), the applier (applied index, apply
//! time, sessions) and the machines (per machine applies, fuel and time).
//! Every handle is an atomic the writer updates in place: the event loop
//! touches no lock for a metric, and label families (machines, peers) are
//! looked up once per batch or per tick, never per entry. Values are read
//! only when a scraper asks ([`Metrics::encode`]).
//!
//! Names carry the unit (`_seconds`, `_entries`, `_bytes`); counters get
//! their `_total` from the encoder.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use kythira_api::ChangeKind;
use kythira_raft::{NodeId, Raft, Role};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Why a proposal did not reach a known outcome, as the `reason` label of
/// `kythira_proposal_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProposalFailure {
    /// This node does not lead.
    NotLeader,
    /// A leadership transfer is under way.
    Transferring,
    /// The state machines are too far behind the log.
    Backpressure,
    /// The entry would exceed the largest a log entry may hold.
    TooLarge,
    /// Too many requests queued for the event loop.
    Overloaded,
    /// No answer within the request timeout.
    Timeout,
    /// Proposed, but leadership was lost or another term's entry took its
    /// index: it may or may not have applied.
    Lost,
}

impl ProposalFailure {
    const ALL: [ProposalFailure; 7] = [
        Self::NotLeader,
        Self::Transferring,
        Self::Backpressure,
        Self::TooLarge,
        Self::Overloaded,
        Self::Timeout,
        Self::Lost,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotLeader => "not_leader",
            Self::Transferring => "transferring",
            Self::Backpressure => "backpressure",
            Self::TooLarge => "too_large",
            Self::Overloaded => "overloaded",
            Self::Timeout => "timeout",
            Self::Lost => "lost",
        }
    }
}

/// Every role, in the order of [`role_index`].
const ROLES: [Role; 4] = [
    Role::Follower,
    Role::PreCandidate,
    Role::Candidate,
    Role::Leader,
];

fn role_index(role: Role) -> usize {
    match role {
        Role::Follower => 0,
        Role::PreCandidate => 1,
        Role::Candidate => 2,
        Role::Leader => 3,
    }
}

/// A role as operators read it (the same words as `kythira status`).
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre-candidate",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Labels of the per machine families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MachineLabel {
    /// The machine's name.
    pub machine: String,
}

/// Labels of the code change family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeChangeLabel {
    /// The machine's name.
    pub machine: String,
    /// `upgrade` or `limits`.
    pub change: String,
    /// `ok`, or `failed` (the old code kept running).
    pub outcome: String,
}

/// Labels of the snapshot transfer family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Labels of the per peer family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The peer's node id.
    pub peer: NodeId,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// A node's metrics. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// `kythira_raft_term`: the current term.
    pub term: Gauge<u64, AtomicU64>,
    /// `kythira_raft_role{role}`: 1 for this node's role, 0 for the others.
    roles: [Gauge; 4],
    /// `kythira_raft_leader`: the leader's id, 0 when none is known.
    pub leader: Gauge<u64, AtomicU64>,
    /// `kythira_raft_leader_changes_total`: leaders this node has come to
    /// know of (each term's leader once).
    pub leader_changes: Counter,
    /// `kythira_raft_last_index`: the last index in the log.
    pub last_index: Gauge<u64, AtomicU64>,
    /// `kythira_raft_commit_index`: the highest index known committed.
    pub commit_index: Gauge<u64, AtomicU64>,
    /// `kythira_applied_index`: the highest index applied to the machines.
    pub applied_index: Gauge<u64, AtomicU64>,
    /// `kythira_proposals_total`: entries this node proposed as leader.
    pub proposals: Counter,
    /// `kythira_proposal_failures_total{reason}`, one per [`ProposalFailure`].
    proposal_failures: [Counter; 7],
    /// `kythira_log_fsync_seconds`: from handing a write to the log until it
    /// is durable (the write and its fdatasync, and any wait behind the
    /// writes handed out before it).
    pub fsync_seconds: Histogram,
    /// `kythira_log_write_entries`: entries per log write (the group commit).
    pub write_entries: Histogram,
    /// `kythira_apply_seconds`: time to apply one batch of committed entries.
    pub apply_seconds: Histogram,
    /// `kythira_machine_applies_total{machine}`: commands a machine applied.
    pub machine_applies: Family<MachineLabel, Counter>,
    /// `kythira_machine_fuel_used_total{machine}`: fuel its applies used.
    pub machine_fuel: Family<MachineLabel, Counter>,
    /// `kythira_machine_apply_seconds{machine}`: time of one call into the
    /// machine (a run of consecutive commands applied as one batch).
    pub machine_apply_seconds: HistogramFamily<MachineLabel>,
    /// `kythira_machine_code_changes_total{machine,change,outcome}`:
    /// upgrades and limit changes applied, and whether they took.
    pub machine_code_changes: Family<CodeChangeLabel, Counter>,
    /// `kythira_replication_lag_entries{peer}`: on the leader, how far each
    /// peer's log is behind the leader's last index.
    pub replication_lag: Family<PeerLabel, Gauge<u64, AtomicU64>>,
    /// `kythira_snapshots_total`: snapshots taken.
    pub snapshots: Counter,
    /// `kythira_snapshot_seconds`: time to take one snapshot.
    pub snapshot_seconds: Histogram,
    /// `kythira_snapshot_bytes`: size of each snapshot taken.
    pub snapshot_bytes: Histogram,
    /// `kythira_snapshots_installed_total`: snapshots received from a leader
    /// and installed.
    pub snapshots_installed: Counter,
    /// `kythira_snapshot_transfers_total{outcome}`: snapshot transfers this
    /// node sent, by outcome (`delivered`, `failed`).
    snapshot_transfers: Family<OutcomeLabel, Counter>,
    /// `kythira_snapshot_sent_bytes_total`: snapshot bytes sent.
    pub snapshot_sent_bytes: Counter,
    /// `kythira_snapshot_resumed_bytes_total`: snapshot bytes not sent again
    /// because the follower kept them from a broken transfer.
    pub snapshot_resumed_bytes: Counter,
    /// `kythira_sessions`: open client sessions.
    pub sessions: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn seconds_histogram() -> Histogram {
    // 10 µs to about 40 s: a plugin call, an fsync, a slow disk.
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

impl Metrics {
    /// Every metric registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kythira");
        let term = Gauge::default();
        registry.register("raft_term", "The current Raft term", term.clone());
        let role_family = Family::<RoleLabel, Gauge>::default();
        registry.register(
            "raft_role",
            "1 for this node's Raft role, 0 for the others",
            role_family.clone(),
        );
        let roles = ROLES.map(|r| {
            role_family
                .get_or_create(&RoleLabel { role: role_name(r) })
                .clone()
        });
        let leader = Gauge::default();
        registry.register(
            "raft_leader",
            "Id of the leader this node knows of, 0 when none",
            leader.clone(),
        );
        let leader_changes = Counter::default();
        registry.register(
            "raft_leader_changes",
            "Leaders this node has come to know of, each term's once",
            leader_changes.clone(),
        );
        let last_index = Gauge::default();
        registry.register(
            "raft_last_index",
            "Last index in this node's log",
            last_index.clone(),
        );
        let commit_index = Gauge::default();
        registry.register(
            "raft_commit_index",
            "Highest log index this node knows to be committed",
            commit_index.clone(),
        );
        let applied_index = Gauge::default();
        registry.register(
            "applied_index",
            "Highest log index applied to the state machines",
            applied_index.clone(),
        );
        let proposals = Counter::default();
        registry.register(
            "proposals",
            "Entries this node proposed as leader",
            proposals.clone(),
        );
        let failure_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "proposal_failures",
            "Proposals refused or left without a known outcome, by reason",
            failure_family.clone(),
        );
        let proposal_failures = ProposalFailure::ALL.map(|f| {
            failure_family
                .get_or_create(&ReasonLabel { reason: f.as_str() })
                .clone()
        });
        let fsync_seconds = seconds_histogram();
        registry.register(
            "log_fsync_seconds",
            "Time from handing a write to the log until it is durable (fdatasync and any wait behind earlier writes included)",
            fsync_seconds.clone(),
        );
        let write_entries = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "log_write_entries",
            "Entries per write handed to the log (writes queued behind a busy disk share one fsync)",
            write_entries.clone(),
        );
        let apply_seconds = seconds_histogram();
        registry.register(
            "apply_seconds",
            "Time to apply one batch of committed entries",
            apply_seconds.clone(),
        );
        let machine_applies = Family::<MachineLabel, Counter>::default();
        registry.register(
            "machine_applies",
            "Commands applied by each state machine",
            machine_applies.clone(),
        );
        let machine_fuel = Family::<MachineLabel, Counter>::default();
        registry.register(
            "machine_fuel_used",
            "Fuel used by each state machine's applies",
            machine_fuel.clone(),
        );
        let machine_apply_seconds: HistogramFamily<MachineLabel> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "machine_apply_seconds",
            "Time of one call into a state machine (a run of consecutive commands)",
            machine_apply_seconds.clone(),
        );
        let machine_code_changes = Family::<CodeChangeLabel, Counter>::default();
        registry.register(
            "machine_code_changes",
            "Upgrades and limit changes of each state machine, by outcome",
            machine_code_changes.clone(),
        );
        let replication_lag = Family::<PeerLabel, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "replication_lag_entries",
            "On the leader: entries each peer's log is behind the leader's last index",
            replication_lag.clone(),
        );
        let snapshots = Counter::default();
        registry.register("snapshots", "Snapshots taken", snapshots.clone());
        let snapshot_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "snapshot_seconds",
            "Time to take one snapshot",
            snapshot_seconds.clone(),
        );
        let snapshot_bytes = Histogram::new(exponential_buckets(1024.0, 4.0, 12));
        registry.register(
            "snapshot_bytes",
            "Size of each snapshot taken",
            snapshot_bytes.clone(),
        );
        let snapshots_installed = Counter::default();
        registry.register(
            "snapshots_installed",
            "Snapshots received from a leader and installed",
            snapshots_installed.clone(),
        );
        let snapshot_transfers = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "snapshot_transfers",
            "Snapshot transfers sent, by outcome",
            snapshot_transfers.clone(),
        );
        let snapshot_sent_bytes = Counter::default();
        registry.register(
            "snapshot_sent_bytes",
            "Snapshot bytes sent",
            snapshot_sent_bytes.clone(),
        );
        let snapshot_resumed_bytes = Counter::default();
        registry.register(
            "snapshot_resumed_bytes",
            "Snapshot bytes a follower kept from a broken transfer, not sent again",
            snapshot_resumed_bytes.clone(),
        );
        let sessions = Gauge::default();
        registry.register("sessions", "Open client sessions", sessions.clone());
        let metrics = Self {
            registry,
            term,
            roles,
            leader,
            leader_changes,
            last_index,
            commit_index,
            applied_index,
            proposals,
            proposal_failures,
            fsync_seconds,
            write_entries,
            apply_seconds,
            machine_applies,
            machine_fuel,
            machine_apply_seconds,
            machine_code_changes,
            replication_lag,
            snapshots,
            snapshot_seconds,
            snapshot_bytes,
            snapshots_installed,
            snapshot_transfers,
            snapshot_sent_bytes,
            snapshot_resumed_bytes,
            sessions,
        };
        metrics.set_role(Role::Follower);
        metrics
    }

    /// The metrics in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Counts a snapshot transfer's outcome.
    pub fn snapshot_transfer(&self, delivered: bool) {
        let outcome = if delivered { "delivered" } else { "failed" };
        self.snapshot_transfers
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Marks `role` as this node's.
    pub fn set_role(&self, role: Role) {
        for (i, gauge) in self.roles.iter().enumerate() {
            gauge.set(i64::from(i == role_index(role)));
        }
    }

    /// Counts a proposal that failed for `why`.
    pub fn proposal_failed(&self, why: ProposalFailure) {
        let i = ProposalFailure::ALL
            .iter()
            .position(|f| *f == why)
            .expect("every reason is listed");
        self.proposal_failures[i].inc();
    }

    /// The core's state after a batch: term, indexes, leader.
    pub fn observe_raft(&self, raft: &Raft) {
        self.term.set(raft.term());
        self.leader.set(raft.leader().unwrap_or(0));
        self.last_index.set(raft.log().last_index());
        self.commit_index.set(raft.log().committed());
    }

    /// Publishes `lag` as peer `peer`'s replication lag.
    pub fn set_replication_lag(&self, peer: NodeId, lag: u64) {
        self.replication_lag
            .get_or_create(&PeerLabel { peer })
            .set(lag);
    }

    /// Stops publishing peer `peer`'s replication lag.
    pub fn forget_peer(&self, peer: NodeId) {
        self.replication_lag.remove(&PeerLabel { peer });
    }

    /// Machine `machine` runs: its series start at zero, so that a
    /// machine that has applied nothing yet shows as such.
    pub fn machine_deployed(&self, machine: &str) {
        let label = MachineLabel {
            machine: machine.to_string(),
        };
        drop(self.machine_applies.get_or_create(&label));
        drop(self.machine_fuel.get_or_create(&label));
        drop(self.machine_apply_seconds.get_or_create(&label));
    }

    /// Machine `machine` is gone: so are its series.
    pub fn machine_removed(&self, machine: &str) {
        let label = MachineLabel {
            machine: machine.to_string(),
        };
        self.machine_applies.remove(&label);
        self.machine_fuel.remove(&label);
        self.machine_apply_seconds.remove(&label);
        for change in [ChangeKind::Upgrade, ChangeKind::Limits] {
            for outcome in ["ok", "failed"] {
                self.machine_code_changes.remove(&CodeChangeLabel {
                    machine: machine.to_string(),
                    change: change.to_string(),
                    outcome: outcome.to_string(),
                });
            }
        }
    }

    /// Machine `machine`'s code or limits changed (`ok`), or the change
    /// failed and the old code kept running.
    pub fn machine_changed(&self, machine: &str, change: ChangeKind, ok: bool) {
        self.machine_code_changes
            .get_or_create(&CodeChangeLabel {
                machine: machine.to_string(),
                change: change.to_string(),
                outcome: if ok { "ok" } else { "failed" }.to_string(),
            })
            .inc();
    }

    /// One run of `commands` applied by `machine` with `fuel` in `took`.
    pub fn machine_applied(&self, machine: &str, commands: u64, fuel: u64, took: Duration) {
        let label = MachineLabel {
            machine: machine.to_string(),
        };
        self.machine_applies.get_or_create(&label).inc_by(commands);
        self.machine_fuel.get_or_create(&label).inc_by(fuel);
        self.machine_apply_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `name{labels} value` lines, without comments.
    fn samples(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("a sample line");
                (name.to_string(), value.parse().expect("a number"))
            })
            .collect()
    }

    fn value(text: &str, name: &str) -> Option<f64> {
        samples(text)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    #[test]
    fn every_metric_is_exported_from_the_start() {
        let m = Metrics::new();
        let text = m.encode();
        for name in [
            "kythira_raft_term",
            "kythira_raft_leader",
            "kythira_raft_leader_changes_total",
            "kythira_raft_last_index",
            "kythira_raft_commit_index",
            "kythira_applied_index",
            "kythira_proposals_total",
            "kythira_log_fsync_seconds_count",
            "kythira_log_write_entries_count",
            "kythira_apply_seconds_count",
            "kythira_snapshots_total",
            "kythira_snapshot_seconds_count",
            "kythira_snapshot_bytes_count",
            "kythira_sessions",
        ] {
            assert_eq!(value(&text, name), Some(0.0), "{name} in:\n{text}");
        }
        assert_eq!(
            value(&text, r#"kythira_raft_role{role="follower"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"kythira_raft_role{role="leader"}"#),
            Some(0.0)
        );
        for f in ProposalFailure::ALL {
            let name = format!(
                "kythira_proposal_failures_total{{reason=\"{}\"}}",
                f.as_str()
            );
            assert_eq!(value(&text, &name), Some(0.0), "{name}");
        }
    }

    #[test]
    fn updates_show_in_the_text() {
        let m = Metrics::new();
        m.set_role(Role::Leader);
        m.proposal_failed(ProposalFailure::Timeout);
        m.proposal_failed(ProposalFailure::Timeout);
        m.machine_applied("kv", 3, 1200, Duration::from_millis(2));
        m.machine_applied("kv", 2, 800, Duration::from_millis(1));
        m.write_entries.observe(5.0);
        m.machine_deployed("counter");
        let text = m.encode();
        assert_eq!(
            value(&text, r#"kythira_machine_applies_total{machine="counter"}"#),
            Some(0.0)
        );
        assert_eq!(
            value(&text, r#"kythira_raft_role{role="leader"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"kythira_raft_role{role="follower"}"#),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                r#"kythira_proposal_failures_total{reason="timeout"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&text, r#"kythira_machine_applies_total{machine="kv"}"#),
            Some(5.0)
        );
        assert_eq!(
            value(&text, r#"kythira_machine_fuel_used_total{machine="kv"}"#),
            Some(2000.0)
        );
        assert_eq!(
            value(
                &text,
                r#"kythira_machine_apply_seconds_count{machine="kv"}"#
            ),
            Some(2.0)
        );
        assert_eq!(value(&text, "kythira_log_write_entries_sum"), Some(5.0));
    }
}
