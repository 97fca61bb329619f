//! One simulated run: nodes, network, disks, clients and faults driven by a
//! single event queue in virtual time.
//!
//! A checked run alternates fault phases and quiet phases. In a quiet phase
//! the network heals and every node that is not kept down on purpose comes
//! back; at its end the cluster must have a leader, must have applied every
//! acknowledged proposal on every running node and must have answered every
//! read issued once it was stable. The submodules hold the clients
//! ([`clients`]), the faults ([`faults`]) and the phases ([`phases`]).

mod clients;
mod durable;
mod faults;
mod phases;
mod reconfigure;
mod trace;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use kythira_linearizability::Operation;
use kythira_linearizability::kv::{KvInput, KvOutput};
#[cfg(feature = "mutants")]
use kythira_raft::Mutation;
use kythira_raft::{
    AppendOutcome, CompactError, Config, Driver, Entry, EntryKind, HardState, Index, Membership,
    Message, MessageBody, NodeId, Persisted, Raft, ReadState, Role, SnapshotMeta, Write,
};

use crate::kv::{KvStore, PutCommand};
use crate::network::Network;
use crate::profile::{DiskQueue, Micros, Profile};
use crate::rng::Rng;
use crate::safety::{self, Safety, Violation};
use durable::DurableLog;

use clients::{Client, Proposer};
use phases::Phase;

pub use crate::profile::TICK;

/// What the clients do.
#[derive(Clone, Copy, Debug)]
pub enum Workload {
    /// Random puts and ReadIndex gets on a few keys, recorded for the
    /// linearizability check, open-loop load, and faults in phases.
    Checked,
    /// Keep `window` proposals outstanding at the leader until `total` are
    /// applied there; no faults, no checks, a perfect network.
    Throughput {
        /// Outstanding proposals.
        window: usize,
        /// `Some(k)`: open loop instead, `k` proposals every 100 µs (still
        /// at most `window` outstanding), so that they arrive throughout
        /// each write rather than all at once.
        pace: Option<usize>,
        /// Proposals to apply.
        total: u64,
        /// Time of one disk write (fsync included), µs.
        disk: Micros,
        /// Writes each node may have outstanding at once.
        outstanding: usize,
        /// How the disks serve overlapping writes.
        queue: DiskQueue,
    },
}

/// Parameters of one run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Cluster size.
    pub nodes: usize,
    /// Determines everything else.
    pub seed: u64,
    /// What the clients do.
    pub workload: Workload,
    /// A bug to inject into every core.
    #[cfg(feature = "mutants")]
    pub mutation: Option<Mutation>,
}

impl Options {
    /// A checked run with faults.
    pub fn checked(nodes: usize, seed: u64) -> Self {
        Self {
            nodes,
            seed,
            workload: Workload::Checked,
            #[cfg(feature = "mutants")]
            mutation: None,
        }
    }
}

/// A run that goes on this long (virtual time) has lost its way.
const RUN_LIMIT: Micros = 3_600_000_000;

#[derive(Debug)]
enum Event {
    Tick {
        node: usize,
        incarnation: u64,
    },
    // Boxed: messages are large and the queue moves events around. A
    // snapshot message travels with the snapshot's data.
    Deliver(Box<Message>, Option<Box<KvStore>>),
    /// The sending of a snapshot to `to` ended (`delivered` or lost): the
    /// leader's driver reports it to its core.
    SnapshotReport {
        leader: usize,
        incarnation: u64,
        to: NodeId,
        delivered: bool,
    },
    /// The disk finished write number `write` of the node.
    Persisted {
        node: usize,
        write: u64,
    },
    Restart {
        node: usize,
        incarnation: u64,
    },
    /// A crash placed right after a send (see [`Profile::crash_after_send`]).
    Crash {
        node: usize,
        incarnation: u64,
    },
    ClientAct {
        client: usize,
    },
    ClientTimeout {
        client: usize,
        op: usize,
        attempt: u32,
    },
    LoadAct {
        proposer: usize,
    },
    Fault {
        phase: u32,
    },
    /// The end of a fault phase: the quiet phase begins.
    Heal {
        phase: u32,
    },
    CheckLeader {
        phase: u32,
        /// The second look, after a leader seen stepping down at the first.
        again: bool,
    },
    /// Clients stop starting operations; the liveness check begins.
    Drain {
        phase: u32,
    },
    QuietCheck {
        phase: u32,
    },
}

#[derive(Debug)]
struct Scheduled {
    at: Micros,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: BinaryHeap is a max-heap and we want the earliest event.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Who waits for a proposal made at a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Client {
        client: usize,
        op: usize,
        attempt: u32,
    },
    Load {
        proposer: usize,
        slot: usize,
    },
}

#[derive(Debug)]
struct Node {
    id: NodeId,
    /// The core and the Ready sequence the daemon runs too; `None` while
    /// the node is down.
    driver: Option<Driver>,
    incarnation: u64,
    durable_hard_state: HardState,
    durable_log: DurableLog,
    /// Snapshots received from leaders, one of which is installed when a
    /// write of the core's says so.
    received_snapshots: Vec<(SnapshotMeta, KvStore)>,
    /// The state machine's durable checkpoint: applied index and state.
    checkpoint: Option<(Index, KvStore)>,
    /// The writes the disk has not finished, oldest first, with their
    /// numbers: lost if the node crashes first, together with the messages
    /// the driver holds back until they are durable.
    writing: VecDeque<(u64, Write)>,
    /// Start and end of the disk's last scheduled operation: a serial disk
    /// adds a write handed out before that operation starts to it.
    disk_op: (Micros, Micros),
    /// Writes handed to the disk so far (numbers completions).
    writes: u64,
    kv: KvStore,
    applied: Index,
    /// Confirmed reads waiting for the state machine to catch up.
    reads: Vec<ReadState>,
    /// Proposals made at this node since it started, by log index.
    proposals: BTreeMap<Index, Owner>,
    /// A stop-the-world pause (GC, VM migration): until then the node
    /// handles nothing; its messages, ticks and disk completions wait.
    paused_until: Micros,
    /// The disk answers nothing before this time (the node keeps running).
    disk_stalled_until: Micros,
    /// The disk refuses every write until the node restarts.
    disk_failed: bool,
    /// Ticks the node's clock skipped: the next tick delivers them at once.
    missed_ticks: u32,
    /// When its clock's next tick is due. Ticks that came due while the
    /// node was paused are delivered before it handles anything else, as a
    /// driver on a monotonic clock would deliver them (a lease measured on
    /// a clock that stopped while paused would outlive the followers'
    /// promise).
    next_tick_due: Micros,
    /// Kept down through the next quiet phase on purpose.
    held_down: bool,
}

/// How far a run went into the states that are hard to reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    /// Highest term any node reached.
    pub max_term: u64,
    /// Most durable entries one write replaced (a divergent suffix).
    pub longest_truncation: u64,
    /// Most entries the slowest running node had to catch up at the start
    /// of a liveness check.
    pub largest_lag: u64,
    /// The largest share of its deadline a liveness check used, in ‰.
    pub tightest_deadline_permille: u64,
    /// Configuration entries committed (joint and final ones alike).
    pub membership_changes: u64,
    /// `TimeoutNow` messages sent by leaders handing over.
    pub transfers: u64,
    /// Log compactions behind a snapshot.
    pub compactions: u64,
    /// Snapshots installed by followers.
    pub installs: u64,
}

impl Depth {
    /// The larger of each figure.
    pub fn max(&self, other: &Depth) -> Depth {
        Depth {
            max_term: self.max_term.max(other.max_term),
            longest_truncation: self.longest_truncation.max(other.longest_truncation),
            largest_lag: self.largest_lag.max(other.largest_lag),
            tightest_deadline_permille: self
                .tightest_deadline_permille
                .max(other.tightest_deadline_permille),
            membership_changes: self.membership_changes.max(other.membership_changes),
            transfers: self.transfers.max(other.transfers),
            compactions: self.compactions.max(other.compactions),
            installs: self.installs.max(other.installs),
        }
    }
}

/// What a run found.
#[derive(Debug)]
pub struct RunResult {
    /// Events processed.
    pub steps: u64,
    /// First broken invariant, if any (the run stops there).
    pub violation: Option<Violation>,
    /// Completed history (checked workload only).
    pub history: Vec<Operation<KvInput, KvOutput>>,
    /// Entries applied on the leader (throughput workload only).
    pub applied: u64,
    /// Virtual time the first of them was applied: rates are measured from
    /// there, not from the start, which is mostly the first election.
    pub first_applied: Micros,
    /// Median virtual time from proposal to apply on the leader, µs.
    pub median_latency: Micros,
    /// An open loop had its whole window outstanding and could not keep
    /// its pace: its latency then measures the queue, not the writes.
    pub saturated: bool,
    /// Hash of every event handled, in order.
    pub trace: u64,
    /// Virtual time at the end.
    pub end: Micros,
    /// The seed's profile, for reports.
    pub profile: String,
    /// How deep it went.
    pub depth: Depth,
}

/// The simulated cluster.
pub struct Cluster {
    opts: Options,
    profile: Profile,
    rng: Rng,
    now: Micros,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<Node>,
    net: Network,
    safety: Safety,
    /// Check invariants (off for throughput runs).
    check: bool,
    clients: Vec<Client>,
    proposers: Vec<Proposer>,
    history: Vec<clients::Record>,
    phase: Phase,
    steps: u64,
    trace: u64,
    /// Highest log index of a proposal acknowledged to its client.
    acked_index: Index,
    /// No placed crash before this time (they would otherwise cascade).
    next_placed_crash: Micros,
    /// One-way link cuts that last until the fault phase ends, whatever
    /// heals in between.
    lasting_cuts: Vec<(usize, usize)>,
    throughput_applied: u64,
    throughput_first_applied: Micros,
    throughput_outstanding: usize,
    /// When each outstanding throughput proposal was made, oldest first
    /// (they apply in order: the throughput workload has no faults).
    throughput_proposed: VecDeque<Micros>,
    throughput_latencies: Vec<Micros>,
    throughput_saturated: bool,
    depth: Depth,
    /// Index of the last configuration entry applied anywhere.
    last_config_applied: Index,
}

impl Cluster {
    /// Build the cluster for `opts`.
    pub fn new(opts: Options) -> Self {
        let mut rng = Rng::new(opts.seed);
        let checked = matches!(opts.workload, Workload::Checked);
        let profile = match opts.workload {
            Workload::Checked => Profile::draw(&mut rng, opts.nodes),
            Workload::Throughput {
                disk,
                outstanding,
                queue,
                ..
            } => Profile::throughput(opts.nodes, disk, outstanding, queue),
        };
        let n = profile.total_nodes(opts.nodes);
        let mut net = Network::new(n);
        net.delay = profile.net_delay;
        let clients = if checked { 3 } else { 1 };
        let proposers = profile.load.iter().map(Proposer::new).collect();
        let mut cluster = Self {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: (0..n)
                .map(|i| Node {
                    id: i as NodeId + 1,
                    driver: None,
                    incarnation: 0,
                    durable_hard_state: HardState::default(),
                    durable_log: DurableLog::default(),
                    received_snapshots: Vec::new(),
                    checkpoint: None,
                    writing: VecDeque::new(),
                    disk_op: (0, 0),
                    writes: 0,
                    kv: KvStore::default(),
                    applied: 0,
                    reads: Vec::new(),
                    proposals: BTreeMap::new(),
                    paused_until: 0,
                    disk_stalled_until: 0,
                    disk_failed: false,
                    missed_ticks: 0,
                    next_tick_due: 0,
                    held_down: false,
                })
                .collect(),
            net,
            safety: Safety::new((0..n).map(|i| bootstrap(&opts, i)).collect()),
            check: checked,
            clients: (0..clients).map(|c| Client::new(c as u64)).collect(),
            proposers,
            history: Vec::new(),
            phase: Phase::default(),
            steps: 0,
            trace: 0,
            acked_index: 0,
            next_placed_crash: 0,
            lasting_cuts: Vec::new(),
            throughput_applied: 0,
            throughput_first_applied: 0,
            throughput_proposed: VecDeque::new(),
            throughput_latencies: Vec::new(),
            throughput_saturated: false,
            throughput_outstanding: 0,
            depth: Depth::default(),
            last_config_applied: 0,
            profile,
            opts,
        };
        for i in 0..n {
            cluster.start(i);
        }
        if checked {
            cluster.begin_fault_phase();
        } else {
            cluster.schedule(0, Event::ClientAct { client: 0 });
        }
        cluster
    }

    fn config(&mut self, node: usize) -> Config {
        let voters = bootstrap(&self.opts, node)
            .voters()
            .ids()
            .collect::<Vec<_>>();
        let mut cfg = Config::new(node as NodeId + 1, voters);
        let p = &self.profile;
        cfg.seed = self.rng.next_u64();
        cfg.pre_vote = p.pre_vote;
        cfg.check_quorum = p.check_quorum;
        cfg.election_ticks = p.election_ticks;
        cfg.heartbeat_ticks = p.heartbeat_ticks;
        cfg.max_entries_per_message = p.max_entries;
        cfg.max_bytes_per_message = p.max_bytes;
        cfg.max_inflight_messages = p.max_inflight;
        cfg.max_outstanding_writes = p.max_outstanding_writes;
        cfg.lease_reads = p.lease_reads;
        cfg.lease_drift_ticks = p.lease_drift_ticks();
        #[cfg(feature = "mutants")]
        {
            cfg.mutation = self.opts.mutation;
        }
        cfg
    }

    /// Boot (or reboot) `node` from its durable state.
    fn start(&mut self, node: usize) {
        let cfg = self.config(node);
        let n = &mut self.nodes[node];
        let (applied, kv) = n.checkpoint.clone().unwrap_or_default();
        let persisted = Persisted {
            snapshot: n.durable_log.snapshot.as_ref().map(|(m, _)| m.clone()),
            hard_state: n.durable_hard_state,
            entries: n.durable_log.entries.clone(),
            applied,
        };
        let raft = Raft::new(cfg, persisted).expect("the simulator's durable state is consistent");
        n.driver = Some(Driver::new(raft));
        n.kv = kv;
        n.applied = applied;
        n.reads.clear();
        n.proposals.clear();
        n.writing.clear();
        n.disk_op = (0, 0);
        n.received_snapshots.clear();
        n.paused_until = 0;
        n.disk_stalled_until = 0;
        n.disk_failed = false;
        n.missed_ticks = 0;
        n.held_down = false;
        self.safety.restarted(n.id, applied);
        let incarnation = n.incarnation;
        let at = self.now + self.rng.range(1, TICK);
        self.nodes[node].next_tick_due = at;
        self.schedule(at, Event::Tick { node, incarnation });
    }

    /// Stop `node`: its volatile state and unfinished write are gone.
    fn crash(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        if n.driver.is_none() {
            return;
        }
        n.driver = None;
        n.writing.clear();
        n.incarnation += 1;
        n.reads.clear();
        n.proposals.clear();
        self.schedule_restart(node);
    }

    fn schedule_restart(&mut self, node: usize) {
        let incarnation = self.nodes[node].incarnation;
        let (lo, hi) = self.profile.restart_gap;
        let at = self.now + self.rng.range(lo, hi);
        self.schedule(at, Event::Restart { node, incarnation });
    }

    fn schedule(&mut self, at: Micros, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    /// Run to the end; stops at the first violation.
    pub fn run(mut self) -> RunResult {
        let violation = self.run_events().err();
        if violation.is_some() && std::env::var_os("SIM_DEBUG").is_some() {
            self.dump();
        }
        let history = self
            .history
            .drain(..)
            .filter(|r| !r.discard)
            .map(|r| r.op)
            .collect();
        RunResult {
            steps: self.steps,
            violation,
            history,
            applied: self.throughput_applied,
            first_applied: self.throughput_first_applied,
            saturated: self.throughput_saturated,
            median_latency: {
                let mut l = std::mem::take(&mut self.throughput_latencies);
                l.sort_unstable();
                l.get(l.len() / 2).copied().unwrap_or(0)
            },
            trace: self.trace,
            end: self.now,
            profile: self.profile.describe(),
            depth: self.depth,
        }
    }

    fn run_events(&mut self) -> Result<(), Violation> {
        while let Some(Scheduled { at, event, .. }) = self.queue.pop() {
            if let Workload::Throughput { total, .. } = self.opts.workload {
                if self.throughput_applied >= total {
                    return Ok(());
                }
            } else if self.phase.finished {
                return Ok(());
            }
            if at > RUN_LIMIT {
                return Err(Violation {
                    property: "liveness",
                    detail: "the run did not finish within an hour of virtual time".into(),
                });
            }
            self.now = at;
            self.steps += 1;
            self.trace = trace::mix(self.trace, at, &event);
            self.handle(event)?;
        }
        if self.check && !self.phase.finished {
            return Err(Violation {
                property: "simulator",
                detail: "the event queue ran dry before the last phase ended".into(),
            });
        }
        Ok(())
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        let target = match &event {
            Event::Tick { node, .. } | Event::Persisted { node, .. } => Some(*node),
            Event::Deliver(m, _) => Some(m.to as usize - 1),
            _ => None,
        };
        if let Some(node) = target {
            let until = self.nodes[node].paused_until;
            if until > self.now {
                // Re-queued in pop order, so the node sees them in order.
                self.schedule(until, event);
                return Ok(());
            }
            if self.nodes[node].driver.is_some() {
                self.deliver_due_ticks(node)?;
            }
        }
        match event {
            Event::Tick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation {
                    return Ok(());
                }
                // A clock jump: ticks delivered at once on top.
                for _ in 0..std::mem::take(&mut self.nodes[node].missed_ticks) {
                    self.with_driver(node, |d| {
                        d.tick();
                        Ok(())
                    })?;
                    self.drive(node)?;
                }
                let at = self.nodes[node].next_tick_due;
                self.schedule(at, Event::Tick { node, incarnation });
                Ok(())
            }
            Event::Deliver(m, data) => {
                let (from, to) = (m.from as usize - 1, m.to as usize - 1);
                let connected = self.net.connected(from, to);
                if let (MessageBody::Snapshot { meta }, Some(data)) = (&m.body, data) {
                    let incarnation = self.nodes[from].incarnation;
                    self.schedule(
                        self.now,
                        Event::SnapshotReport {
                            leader: from,
                            incarnation,
                            to: m.to,
                            delivered: connected,
                        },
                    );
                    if connected && self.nodes[to].driver.is_some() {
                        self.nodes[to]
                            .received_snapshots
                            .push((meta.clone(), *data));
                    }
                }
                if !connected {
                    // The partition formed while the message was in flight.
                    return Ok(());
                }
                self.with_driver(to, |d| {
                    d.step(*m).map_err(|e| Violation {
                        property: "protocol",
                        detail: e.to_string(),
                    })
                })?;
                self.drive(to)
            }
            Event::Persisted { node, write } => self.persisted(node, write),
            Event::SnapshotReport {
                leader,
                incarnation,
                to,
                delivered,
            } => {
                if self.nodes[leader].incarnation != incarnation {
                    return Ok(());
                }
                self.with_driver(leader, |d| {
                    d.report_snapshot(to, delivered);
                    Ok(())
                })?;
                self.drive(leader)
            }
            Event::Restart { node, incarnation } => {
                let n = &self.nodes[node];
                if n.driver.is_none() && n.incarnation == incarnation && !n.held_down {
                    self.start(node);
                }
                Ok(())
            }
            Event::Crash { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation {
                    self.crash(node);
                }
                Ok(())
            }
            Event::ClientAct { client } => self.client_act(client),
            Event::ClientTimeout {
                client,
                op,
                attempt,
            } => self.client_timeout(client, op, attempt),
            Event::LoadAct { proposer } => self.load_act(proposer),
            Event::Fault { phase } => {
                if self.phase.faulty(phase) {
                    self.inject_fault()?;
                    let (lo, hi) = self.profile.fault_gap;
                    let at = self.now + self.rng.range(lo, hi);
                    self.schedule(at, Event::Fault { phase });
                }
                Ok(())
            }
            Event::Heal { phase } => {
                self.begin_quiet_phase(phase);
                Ok(())
            }
            Event::CheckLeader { phase, again } => self.check_leader(phase, again),
            Event::Drain { phase } => {
                self.drain(phase);
                Ok(())
            }
            Event::QuietCheck { phase } => self.quiet_check(phase),
        }
    }

    /// Deliver every tick of the node's clock that has come due (more than
    /// one after a pause), keeping the clock's phase.
    fn deliver_due_ticks(&mut self, node: usize) -> Result<(), Violation> {
        let interval = self.profile.tick_interval[node];
        while self.nodes[node].next_tick_due <= self.now && self.nodes[node].driver.is_some() {
            self.nodes[node].next_tick_due += interval;
            self.with_driver(node, |d| {
                d.tick();
                Ok(())
            })?;
            self.drive(node)?;
        }
        Ok(())
    }

    /// Run `f` on the node's driver (if up) and check the invariants of its
    /// core after it.
    fn with_driver(
        &mut self,
        node: usize,
        f: impl FnOnce(&mut Driver) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        let n = &mut self.nodes[node];
        let Some(driver) = n.driver.as_mut() else {
            return Ok(());
        };
        f(driver)?;
        if self.check {
            // What the core counts as durable is on the disk: its last
            // stable entry is the disk's entry there (Log Matching then
            // vouches for the rest). A core that overstates it could apply,
            // compact or acknowledge entries a crash loses.
            let log = driver.raft().log();
            let stable = log.stable();
            let disk = &n.durable_log;
            if stable > log.snapshot_index() && disk.term(stable) != log.term(stable) {
                return Err(Violation {
                    property: "durability",
                    detail: format!(
                        "node {} counts entries up to {stable} (term {:?}) as durable, but its \
                         disk holds term {:?} there",
                        node + 1,
                        log.term(stable),
                        disk.term(stable)
                    ),
                });
            }
            self.safety.observe(driver.raft())?;
            if self.profile.lease_reads {
                self.check_leases()?;
            }
        }
        Ok(())
    }

    /// While a leader's lease holds, no node leads a later term: what lease
    /// reads rest on, checked directly rather than only through a read
    /// that happens to land in the gap.
    fn check_leases(&self) -> Result<(), Violation> {
        let leaders = || {
            self.nodes
                .iter()
                .filter_map(|n| n.driver.as_ref().map(|d| d.raft()))
                .filter(|r| r.role() == Role::Leader)
        };
        let Some(newest) = leaders().max_by_key(|r| r.term()) else {
            return Ok(());
        };
        // A paused node's clock is behind until it resumes, when the ticks
        // it missed come first: its lease is judged then, not now.
        let clock_current = |id: NodeId| {
            let n = &self.nodes[id as usize - 1];
            n.paused_until <= self.now && n.next_tick_due >= self.now
        };
        let stale = leaders()
            .find(|r| r.term() < newest.term() && clock_current(r.id()) && r.lease_valid());
        match stale {
            Some(stale) => Err(Violation {
                property: "lease",
                detail: format!(
                    "node {} leads term {} while node {}'s lease of term {} still holds",
                    newest.id(),
                    newest.term(),
                    stale.id(),
                    stale.term()
                ),
            }),
            None => Ok(()),
        }
    }

    /// Carry out the node's batches: the network, disk and state machine
    /// take the actions the driver hands out, until it has nothing more (or
    /// only writes it may not hand out before earlier ones complete).
    fn drive(&mut self, node: usize) -> Result<(), Violation> {
        loop {
            let Some(driver) = self.nodes[node].driver.as_mut() else {
                return Ok(());
            };
            let Some(batch) = driver.poll() else {
                return Ok(());
            };
            for m in batch.send {
                self.send(m)?;
            }
            // Committed entries are durable here already, so applying may
            // overlap with this batch's write.
            for e in &batch.apply {
                self.apply(node, e)?;
            }
            self.nodes[node].reads.extend(batch.read_states);
            self.serve_reads(node)?;
            for ctx in batch.dropped_reads {
                self.read_dropped(ctx)?;
            }
            // Check the core after each batch (without a write, `poll`
            // advanced it already).
            self.with_driver(node, |_| Ok(()))?;
            if let Some(write) = batch.write {
                let (lo, hi) = self.profile.disk;
                let latency = self.rng.range(lo, hi);
                let now = self.now;
                let queue = self.profile.disk_queue;
                let n = &mut self.nodes[node];
                n.writes += 1;
                let number = n.writes;
                n.writing.push_back((number, write));
                let (start, end) = n.disk_op;
                let at = match queue {
                    // Still queued: made durable by the operation that waits.
                    DiskQueue::Serial if now < start => end,
                    DiskQueue::Serial => {
                        let start = now.max(end);
                        n.disk_op = (start, start + latency);
                        start + latency
                    }
                    // In order: never before the write handed out before it.
                    DiskQueue::Pipelined => {
                        let at = (now + latency).max(end);
                        n.disk_op = (now, at);
                        at
                    }
                };
                self.schedule_persisted(node, number, at);
            }
        }
    }

    fn schedule_persisted(&mut self, node: usize, write: u64, at: Micros) {
        self.schedule(at, Event::Persisted { node, write });
    }

    /// Write `number` of `node` is done, and with it every write handed
    /// out before it (the disk completes them in order).
    fn persisted(&mut self, node: usize, number: u64) -> Result<(), Violation> {
        let n = &mut self.nodes[node];
        // Stale: lost in a crash, or completed with a later one.
        if n.writing.front().is_none_or(|(w, _)| *w > number) {
            return Ok(());
        }
        if n.disk_stalled_until > self.now {
            let at = n.disk_stalled_until;
            self.schedule_persisted(node, number, at);
            return Ok(());
        }
        if n.disk_failed {
            // The write is refused and lost, and every one queued behind it.
            // The daemon stops the node; a node that keeps running is stuck
            // behind them until restarted, still ticking and receiving.
            n.writing.clear();
            if self.rng.chance(0.5) {
                self.crash(node);
            }
            return Ok(());
        }
        while self.nodes[node]
            .writing
            .front()
            .is_some_and(|(w, _)| *w <= number)
        {
            self.persist_first(node)?;
        }
        self.drive(node)
    }

    /// Makes the oldest outstanding write of `node` durable.
    fn persist_first(&mut self, node: usize) -> Result<(), Violation> {
        let n = &mut self.nodes[node];
        let (_, write) = n.writing.pop_front().expect("checked above");
        if let Some(meta) = &write.snapshot {
            // The received snapshot first: it replaces the state machine
            // and the whole log, then come the entries and hard state.
            let at = n
                .received_snapshots
                .iter()
                .position(|(m, _)| m == meta)
                .expect("the core installs only a snapshot delivered to it");
            let (received, state) = n.received_snapshots.swap_remove(at);
            n.received_snapshots
                .retain(|(m, _)| m.index > received.index);
            n.durable_log.install(received, state.clone());
            n.checkpoint = Some((meta.index, state.clone()));
            n.kv = state;
            n.applied = meta.index;
            self.depth.installs += 1;
            if self.check {
                self.safety.installed(n.id, meta)?;
            }
        }
        if let Some(hs) = write.hard_state {
            self.depth.max_term = self.depth.max_term.max(hs.term);
            if self.check {
                safety::check_durable_hard_state(n.id, n.durable_hard_state, hs)?;
            }
            n.durable_hard_state = hs;
        }
        let replaced = n.durable_log.write(&write.entries);
        self.depth.longest_truncation = self.depth.longest_truncation.max(replaced);
        if self.check {
            self.safety.persisted(n.id, &write.entries)?;
        }
        // Durable now: the acknowledgements the driver held back may go out.
        let released = n
            .driver
            .as_mut()
            .expect("a node with an outstanding write is up")
            .persisted();
        for m in released {
            self.send(m)?;
        }
        // Reads waiting for entries a snapshot covered may be served now.
        self.serve_reads(node)?;
        self.with_driver(node, |_| Ok(()))
    }

    fn send(&mut self, m: Message) -> Result<(), Violation> {
        let (from, to) = (m.from as usize - 1, m.to as usize - 1);
        if self.check {
            let n = &self.nodes[from];
            let accepted_terms = match m.body {
                MessageBody::AppendResponse(AppendOutcome::Accepted { last_index })
                    if last_index > 0 =>
                {
                    let ours = n.durable_log.term(last_index);
                    let leaders = self.nodes[to].driver.as_ref().and_then(|d| {
                        let r = d.raft();
                        (r.role() == Role::Leader && r.term() == m.term)
                            .then(|| r.log().term(last_index))
                            .flatten()
                    });
                    Some((ours, leaders))
                }
                _ => None,
            };
            safety::check_send(
                &m,
                safety::DurableView {
                    hard_state: n.durable_hard_state,
                    log_len: n.durable_log.last_index(),
                    accepted_terms,
                },
            )?;
            if m.body == MessageBody::TimeoutNow {
                self.check_transfer_target(&m)?;
                self.depth.transfers += 1;
            }
            self.maybe_crash_after(&m);
        }
        // A snapshot goes with the sender's latest snapshot data.
        let data = match &m.body {
            MessageBody::Snapshot { meta } => {
                let (held, state) = self.nodes[from]
                    .durable_log
                    .snapshot
                    .as_ref()
                    .expect("a core sends only a snapshot its node holds");
                assert_eq!(held, meta, "the core sends the latest snapshot");
                Some(Box::new(state.clone()))
            }
            _ => None,
        };
        let times: Vec<u64> = self
            .net
            .deliveries(self.now, from, to, &mut self.rng)
            .collect();
        if times.is_empty() && data.is_some() {
            // Lost: the stream breaks, and the sender learns it.
            let incarnation = self.nodes[from].incarnation;
            let at = self.now + self.profile.round_trip();
            self.schedule(
                at,
                Event::SnapshotReport {
                    leader: from,
                    incarnation,
                    to: m.to,
                    delivered: false,
                },
            );
        }
        for &t in &times {
            self.schedule(t, Event::Deliver(Box::new(m.clone()), data.clone()));
        }
        Ok(())
    }

    /// A leader hands over only to a voter whose durable log holds its whole
    /// log (unless the target already moved past the leader's term: then the
    /// leader is deposed, and its `TimeoutNow` is ignored).
    fn check_transfer_target(&self, m: &Message) -> Result<(), Violation> {
        let Some(leader) = self.nodes[m.from as usize - 1].driver.as_ref() else {
            return Ok(());
        };
        let log = leader.raft().log();
        let (last, last_term) = (log.last_index(), log.last_term());
        let target = &self.nodes[m.to as usize - 1];
        if target.durable_hard_state.term > m.term {
            return Ok(());
        }
        let held = last == 0 || target.durable_log.term(last) == Some(last_term);
        if held {
            Ok(())
        } else {
            Err(Violation {
                property: "transfer",
                detail: format!(
                    "leader {} of term {} handed over to {} whose durable log ({} entries) \
                     lacks its last entry ({last}, {last_term})",
                    m.from,
                    m.term,
                    m.to,
                    target.durable_log.last_index()
                ),
            })
        }
    }

    fn apply(&mut self, node: usize, e: &Entry) -> Result<(), Violation> {
        if self.check {
            let n = &self.nodes[node];
            let term = n.driver.as_ref().map_or(0, |d| d.raft().term());
            self.safety.applied(n.id, term, e)?;
        }
        if e.kind == EntryKind::Config && e.index > self.last_config_applied {
            self.last_config_applied = e.index;
            self.depth.membership_changes += 1;
        }
        let n = &mut self.nodes[node];
        n.applied = e.index;
        let cmd = match e.kind {
            EntryKind::Normal => match PutCommand::decode(&e.data) {
                Some(cmd) => Some(cmd),
                None => {
                    return Err(Violation {
                        property: "protocol",
                        detail: format!("undecodable entry {}", e.index),
                    });
                }
            },
            _ => None,
        };
        if let Some(cmd) = &cmd {
            n.kv.apply(cmd);
        }
        if let Some(every) = self.profile.checkpoint_every
            && e.index.is_multiple_of(every)
        {
            // Durable at once: the state machine's own fsync.
            n.checkpoint = Some((e.index, n.kv.clone()));
            if self.profile.compaction && self.rng.chance(0.5) {
                // The checkpoint is the snapshot: the log behind it goes.
                let driver = n.driver.as_mut().expect("applying node is up");
                match driver.snapshot_meta(e.index) {
                    Ok(meta) => {
                        driver.compact(meta.clone()).map_err(|err| Violation {
                            property: "snapshot",
                            detail: format!("node {} cannot compact to {}: {err}", n.id, e.index),
                        })?;
                        n.durable_log.compact(meta, n.kv.clone());
                        self.depth.compactions += 1;
                    }
                    // A node that joined does not know the members before
                    // the entry that added it: no snapshot there.
                    Err(CompactError::UnknownMembership { .. }) => {}
                    Err(err) => {
                        return Err(Violation {
                            property: "snapshot",
                            detail: format!("node {} cannot snapshot at {}: {err}", n.id, e.index),
                        });
                    }
                }
            }
        }
        if let Workload::Throughput { .. } = self.opts.workload {
            if cmd.is_some()
                && n.driver
                    .as_ref()
                    .is_some_and(|d| d.raft().role() == Role::Leader)
            {
                if self.throughput_applied == 0 {
                    self.throughput_first_applied = self.now;
                }
                self.throughput_applied += 1;
                self.throughput_outstanding = self.throughput_outstanding.saturating_sub(1);
                if let Some(at) = self.throughput_proposed.pop_front() {
                    self.throughput_latencies.push(self.now - at);
                }
            }
            return Ok(());
        }
        let Some(owner) = n.proposals.remove(&e.index) else {
            return Ok(());
        };
        let applied_op = cmd.map(|c| c.op);
        match owner {
            Owner::Client {
                client,
                op,
                attempt,
            } => {
                self.client_proposal_applied(client, op, attempt, e.index, applied_op);
                Ok(())
            }
            Owner::Load { proposer, slot } => {
                self.load_proposal_applied(proposer, slot, node, e.index, applied_op);
                Ok(())
            }
        }
    }

    /// The state of every node, for diagnosing a failed seed
    /// (`SIM_DEBUG=1 just sim --seed S`).
    fn dump(&self) {
        eprintln!("at {} µs, phase {:?}", self.now, self.phase);
        for n in &self.nodes {
            let core = n.driver.as_ref().map(|d| {
                let r = d.raft();
                format!(
                    "{:?} term {} vote {:?} leader {:?} last {} ({}) commit {} writing {} \
                     membership {:?} at {}",
                    r.role(),
                    r.term(),
                    r.vote(),
                    r.leader(),
                    r.log().last_index(),
                    r.log().last_term(),
                    r.log().committed(),
                    d.is_writing(),
                    r.membership(),
                    r.membership_index()
                )
            });
            eprintln!(
                "  node {}: {} applied {} durable {:?}/{} paused {} stalled {} failed {} held {}",
                n.id,
                core.unwrap_or_else(|| "down".into()),
                n.applied,
                n.durable_hard_state,
                n.durable_log.last_index(),
                n.paused_until,
                n.disk_stalled_until,
                n.disk_failed,
                n.held_down
            );
        }
        eprintln!("  blocked links: {:?}", self.net);
    }

    /// The leader of the highest term among leaders, if no running member
    /// of its membership has moved to a later term. (Nodes outside it, such
    /// as a removed one that never learned of its removal, may campaign in
    /// ever higher terms that nobody listens to.)
    fn current_leader(&self) -> Option<usize> {
        let (l, raft) = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.driver.as_ref().map(|d| (i, d.raft())))
            .filter(|(_, r)| r.role() == Role::Leader)
            .max_by_key(|(_, r)| r.term())?;
        let members = raft.membership().members();
        let superseded = self.nodes.iter().any(|n| {
            members.contains(&n.id)
                && n.driver
                    .as_ref()
                    .is_some_and(|d| d.raft().term() > raft.term())
        });
        (!superseded).then_some(l)
    }

    /// The nodes that must keep up: the members of the current leader's
    /// membership (every node, if there is no leader).
    fn members_now(&self) -> Vec<usize> {
        let Some(l) = self.current_leader() else {
            return (0..self.nodes.len()).collect();
        };
        let raft = self.nodes[l]
            .driver
            .as_ref()
            .expect("a leader is up")
            .raft();
        let members = raft.membership().members();
        (0..self.nodes.len())
            .filter(|&i| members.contains(&self.nodes[i].id))
            .collect()
    }
}

/// The membership node `i` boots with: the first `opts.nodes` nodes are the
/// cluster's voters; the spares know nobody and learn the membership from
/// the log once a leader adds them.
fn bootstrap(opts: &Options, i: usize) -> Membership {
    let voters: Vec<NodeId> = if i < opts.nodes {
        (1..=opts.nodes as NodeId).collect()
    } else {
        Vec::new()
    };
    Membership::new(voters, []).expect("ids are positive and distinct")
}
