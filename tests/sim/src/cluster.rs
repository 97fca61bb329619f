//! One simulated run: nodes, network, disks, clients and faults driven by a
//! single event queue in virtual time.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use kythira_linearizability::Operation;
use kythira_linearizability::kv::{KvInput, KvOutput};
#[cfg(feature = "mutants")]
use kythira_raft::Mutation;
use kythira_raft::{
    Config, Driver, Entry, EntryKind, HardState, Message, NodeId, Persisted, Proposal,
    ProposeError, Raft, ReadState, Role, Write,
};

use crate::kv::{KvStore, PutCommand};
use crate::network::{Network, Quality};
use crate::rng::Rng;
use crate::safety::{Safety, Violation};

/// Virtual microseconds.
pub type Micros = u64;

/// One core tick.
pub const TICK: Micros = 10_000;

/// What the clients do.
#[derive(Clone, Copy, Debug)]
pub enum Workload {
    /// Random puts and ReadIndex gets on a few keys, recorded for the
    /// linearizability check; faults during the first phase.
    Checked,
    /// Keep `window` proposals outstanding at the leader until `total` are
    /// applied there; no faults, no checks, a perfect network.
    Throughput {
        /// Outstanding proposals.
        window: usize,
        /// Proposals to apply.
        total: u64,
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

/// Phases of a checked run.
const FAULTS_END: Micros = 3_000_000;
const LEADER_DEADLINE: Micros = FAULTS_END + 150 * TICK;
const CLIENTS_STOP: Micros = 4_500_000;
const OP_TIMEOUT: Micros = 500_000;
const RUN_END: Micros = CLIENTS_STOP + OP_TIMEOUT + 50 * TICK;
const KEYS: u64 = 3;

#[derive(Debug)]
enum Event {
    Tick { node: usize, incarnation: u64 },
    // Boxed: messages are large and the queue moves events around.
    Deliver(Box<Message>),
    Persisted { node: usize, incarnation: u64 },
    Restart { node: usize, incarnation: u64 },
    ClientAct { client: usize },
    ClientTimeout { client: usize, op: usize },
    Fault,
    Heal,
    CheckLeader,
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

#[derive(Debug)]
struct Node {
    id: NodeId,
    /// The core and the Ready sequence the daemon runs too; `None` while
    /// the node is down.
    driver: Option<Driver>,
    incarnation: u64,
    durable_hard_state: HardState,
    durable_log: Vec<Entry>,
    /// The write the disk has not finished: lost if the node crashes first,
    /// together with the messages the driver holds back until it is durable.
    writing: Option<Write>,
    kv: KvStore,
    applied: u64,
    /// Confirmed reads waiting for the state machine to catch up.
    reads: Vec<ReadState>,
    /// A stop-the-world pause (GC, VM migration): until then the node
    /// handles nothing; its messages, ticks and disk completions wait.
    paused_until: Micros,
}

#[derive(Debug)]
enum Pending {
    Put { op: usize, proposal: Proposal },
    Get { op: usize, node: usize, key: u64 },
}

#[derive(Debug)]
struct Client {
    /// Identity in the history; changes when an operation is abandoned, so
    /// that no client id ever has two operations outstanding.
    id: u64,
    pending: Option<Pending>,
    leader_hint: Option<usize>,
}

/// One history record.
#[derive(Debug)]
struct Record {
    op: Operation<KvInput, KvOutput>,
    /// Known not to have taken effect: left out of the checked history.
    discard: bool,
    /// Log index a put was proposed at.
    put_index: Option<u64>,
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
}

/// The simulated cluster.
pub struct Cluster {
    opts: Options,
    rng: Rng,
    now: Micros,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    nodes: Vec<Node>,
    net: Network,
    /// Disk latency range in µs.
    disk: (u64, u64),
    /// Time between faults in µs.
    fault_gap: (u64, u64),
    /// Time from a crash to the restart in µs.
    restart_gap: (u64, u64),
    safety: Safety,
    /// Check invariants (off for throughput runs).
    check: bool,
    clients: Vec<Client>,
    history: Vec<Record>,
    steps: u64,
    faults_over: bool,
    throughput_applied: u64,
    throughput_outstanding: usize,
}

impl Cluster {
    /// Build the cluster for `opts`.
    pub fn new(opts: Options) -> Self {
        let mut rng = Rng::new(opts.seed);
        let n = opts.nodes;
        let checked = matches!(opts.workload, Workload::Checked);
        let disk = if !checked {
            (100, 101)
        } else if rng.chance(0.5) {
            (50, 1_000)
        } else {
            (1_000, 20_000)
        };
        // A third of the runs are storms: many faults and quick restarts,
        // which is what it takes for histories like figure 8 of the paper.
        let storm = checked && rng.chance(0.35);
        let (fault_gap, restart_gap) = if storm {
            ((10_000, 80_000), (5_000, 100_000))
        } else {
            ((50_000, 300_000), (20_000, 1_000_000))
        };
        let mut net = Network::new(n);
        if !checked {
            net.delay = (100, 101);
        }
        let clients = if checked { 3 } else { 1 };
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
                    durable_log: Vec::new(),
                    writing: None,
                    kv: KvStore::default(),
                    applied: 0,
                    reads: Vec::new(),
                    paused_until: 0,
                })
                .collect(),
            net,
            disk,
            fault_gap,
            restart_gap,
            safety: Safety::new(n),
            check: checked,
            clients: (0..clients)
                .map(|c| Client {
                    id: c as u64,
                    pending: None,
                    leader_hint: None,
                })
                .collect(),
            history: Vec::new(),
            steps: 0,
            faults_over: !checked,
            throughput_applied: 0,
            throughput_outstanding: 0,
            opts,
        };
        for i in 0..n {
            cluster.start(i);
        }
        for c in 0..clients {
            let at = cluster.rng.range(0, 5 * TICK);
            cluster.schedule(at, Event::ClientAct { client: c });
        }
        if checked {
            let at = cluster.rng.range(cluster.fault_gap.0, cluster.fault_gap.1);
            cluster.schedule(at, Event::Fault);
            cluster.schedule(FAULTS_END, Event::Heal);
            cluster.schedule(LEADER_DEADLINE, Event::CheckLeader);
        }
        cluster
    }

    fn config(&mut self, node: usize) -> Config {
        let voters = (1..=self.opts.nodes as NodeId).collect::<Vec<_>>();
        let mut cfg = Config::new(node as NodeId + 1, voters);
        cfg.seed = self.rng.next_u64();
        if matches!(self.opts.workload, Workload::Checked) {
            // Small limits exercise batching and flow control.
            cfg.max_entries_per_message = self.rng.pick(&[1, 2, 3, 64]);
            cfg.max_inflight_messages = self.rng.range(1, 16) as usize;
            cfg.max_bytes_per_message = self.rng.range(1, 4096) as usize;
        }
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
        let persisted = Persisted {
            hard_state: n.durable_hard_state,
            entries: n.durable_log.clone(),
            applied: 0,
        };
        let raft = Raft::new(cfg, persisted).expect("the simulator's durable state is consistent");
        n.driver = Some(Driver::new(raft));
        n.kv = KvStore::default();
        n.applied = 0;
        n.reads.clear();
        n.writing = None;
        n.paused_until = 0;
        self.safety.restarted(n.id);
        let incarnation = n.incarnation;
        let at = self.now + self.rng.range(1, TICK);
        self.schedule(at, Event::Tick { node, incarnation });
    }

    fn crash(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.driver = None;
        // Whatever the disk had not finished is gone.
        n.writing = None;
        n.incarnation += 1;
        n.reads.clear();
        let incarnation = n.incarnation;
        let at = self.now + self.rng.range(self.restart_gap.0, self.restart_gap.1);
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
        }
    }

    fn run_events(&mut self) -> Result<(), Violation> {
        while let Some(Scheduled { at, event, .. }) = self.queue.pop() {
            if let Workload::Throughput { total, .. } = self.opts.workload {
                if self.throughput_applied >= total {
                    return Ok(());
                }
            } else if at > RUN_END {
                break;
            }
            self.now = at;
            self.steps += 1;
            self.handle(event)?;
        }
        if matches!(self.opts.workload, Workload::Checked) {
            self.check_acknowledged_applied()?;
        }
        Ok(())
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        let target = match &event {
            Event::Tick { node, .. } | Event::Persisted { node, .. } => Some(*node),
            Event::Deliver(m) => Some(m.to as usize - 1),
            _ => None,
        };
        if let Some(node) = target {
            let until = self.nodes[node].paused_until;
            if until > self.now {
                // Re-queued in pop order, so the node sees them in order.
                self.schedule(until, event);
                return Ok(());
            }
        }
        match event {
            Event::Tick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation {
                    return Ok(());
                }
                self.with_driver(node, |d| {
                    d.tick();
                    Ok(())
                })?;
                self.schedule(self.now + TICK, Event::Tick { node, incarnation });
                self.drive(node)
            }
            Event::Deliver(m) => {
                let (from, to) = (m.from as usize - 1, m.to as usize - 1);
                if !self.net.connected(from, to) {
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
            Event::Persisted { node, incarnation } => self.persisted(node, incarnation),
            Event::Restart { node, incarnation } => {
                if self.nodes[node].driver.is_none() && self.nodes[node].incarnation == incarnation
                {
                    self.start(node);
                }
                Ok(())
            }
            Event::ClientAct { client } => self.client_act(client),
            Event::ClientTimeout { client, op } => {
                self.client_timeout(client, op);
                Ok(())
            }
            Event::Fault => {
                if !self.faults_over {
                    self.inject_fault();
                    let at = self.now + self.rng.range(self.fault_gap.0, self.fault_gap.1);
                    self.schedule(at, Event::Fault);
                }
                Ok(())
            }
            Event::Heal => {
                self.faults_over = true;
                self.net.heal();
                for n in &mut self.nodes {
                    n.paused_until = n.paused_until.min(self.now);
                }
                self.net.quality = Quality::PERFECT;
                for node in 0..self.nodes.len() {
                    if self.nodes[node].driver.is_none() {
                        self.start(node);
                    }
                }
                Ok(())
            }
            Event::CheckLeader => self.check_leader(),
        }
    }

    /// Run `f` on the node's driver (if up) and check the invariants of its
    /// core after it.
    fn with_driver(
        &mut self,
        node: usize,
        f: impl FnOnce(&mut Driver) -> Result<(), Violation>,
    ) -> Result<(), Violation> {
        let Some(driver) = self.nodes[node].driver.as_mut() else {
            return Ok(());
        };
        f(driver)?;
        if self.check {
            self.safety.observe(driver.raft())?;
        }
        Ok(())
    }

    /// Carry out the node's batches: the network, disk and state machine
    /// take the actions the driver hands out, until it has nothing more or
    /// waits for a write.
    fn drive(&mut self, node: usize) -> Result<(), Violation> {
        loop {
            let Some(driver) = self.nodes[node].driver.as_mut() else {
                return Ok(());
            };
            let Some(batch) = driver.poll() else {
                return Ok(());
            };
            for m in batch.send {
                self.send(m);
            }
            // Committed entries are durable here already, so applying may
            // overlap with this batch's write.
            for e in &batch.apply {
                self.apply(node, e)?;
            }
            self.nodes[node].reads.extend(batch.read_states);
            self.serve_reads(node);
            for ctx in batch.dropped_reads {
                self.fail_read(ctx as usize);
            }
            // Check the core after each batch (without a write, `poll`
            // advanced it already).
            self.with_driver(node, |_| Ok(()))?;
            if let Some(write) = batch.write {
                let n = &mut self.nodes[node];
                n.writing = Some(write);
                let incarnation = n.incarnation;
                let at = self.now + self.rng.range(self.disk.0, self.disk.1);
                self.schedule(at, Event::Persisted { node, incarnation });
                return Ok(());
            }
        }
    }

    fn persisted(&mut self, node: usize, incarnation: u64) -> Result<(), Violation> {
        let n = &mut self.nodes[node];
        if n.incarnation != incarnation {
            return Ok(());
        }
        let write = n.writing.take().expect("one write per outstanding batch");
        if let Some(hs) = write.hard_state {
            n.durable_hard_state = hs;
        }
        if let Some(first) = write.entries.first() {
            n.durable_log.truncate(first.index as usize - 1);
            n.durable_log.extend_from_slice(&write.entries);
        }
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
            self.send(m);
        }
        self.with_driver(node, |_| Ok(()))?;
        self.drive(node)
    }

    fn send(&mut self, m: Message) {
        let (from, to) = (m.from as usize - 1, m.to as usize - 1);
        let delays: Vec<u64> = self.net.deliveries(from, to, &mut self.rng).collect();
        match delays.as_slice() {
            [] => {}
            [d] => self.schedule(self.now + d, Event::Deliver(Box::new(m))),
            [d, rest @ ..] => {
                for e in rest {
                    self.schedule(self.now + e, Event::Deliver(Box::new(m.clone())));
                }
                self.schedule(self.now + d, Event::Deliver(Box::new(m)));
            }
        }
    }

    fn apply(&mut self, node: usize, e: &Entry) -> Result<(), Violation> {
        if self.check {
            let n = &self.nodes[node];
            let term = n.driver.as_ref().map_or(0, |d| d.raft().term());
            self.safety.applied(n.id, term, e)?;
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
        if let Workload::Throughput { .. } = self.opts.workload {
            if cmd.is_some()
                && n.driver
                    .as_ref()
                    .is_some_and(|d| d.raft().role() == Role::Leader)
            {
                self.throughput_applied += 1;
                self.throughput_outstanding = self.throughput_outstanding.saturating_sub(1);
            }
            return Ok(());
        }
        for c in 0..self.clients.len() {
            let Some(Pending::Put { op, proposal }) = self.clients[c].pending else {
                continue;
            };
            if cmd.is_some_and(|cmd| cmd.op == op as u64) {
                self.complete(c, op, KvOutput::Put);
            } else if proposal.index == e.index {
                // Another entry took the slot: ours can never commit.
                self.history[op].discard = true;
                self.clients[c].pending = None;
                self.next_client_act(c);
            }
        }
        Ok(())
    }

    fn serve_reads(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let applied = n.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            n.reads.drain(..).partition(|r| r.index <= applied);
        n.reads = waiting;
        for r in ready {
            let op = r.ctx as usize;
            let waiting = self
                .clients
                .iter()
                .enumerate()
                .find_map(|(c, cl)| match cl.pending {
                    Some(Pending::Get {
                        op: o,
                        node: at,
                        key,
                    }) if o == op && at == node => Some((c, key)),
                    _ => None,
                });
            if let Some((c, key)) = waiting {
                let value = self.nodes[node].kv.get(key);
                self.complete(c, op, KvOutput::Get(value));
            }
        }
    }

    fn fail_read(&mut self, op: usize) {
        if let Some(c) = self
            .clients
            .iter()
            .position(|c| matches!(c.pending, Some(Pending::Get { op: o, .. }) if o == op))
        {
            // A read that returned nothing had no effect: leave it out.
            self.history[op].discard = true;
            self.clients[c].pending = None;
            self.next_client_act(c);
        }
    }

    fn complete(&mut self, client: usize, op: usize, output: KvOutput) {
        let rec = &mut self.history[op].op;
        rec.output = Some(output);
        rec.ret = Some(self.now);
        self.clients[client].pending = None;
        self.next_client_act(client);
    }

    fn next_client_act(&mut self, client: usize) {
        let at = self.now + self.rng.range(0, 2 * TICK);
        self.schedule(at, Event::ClientAct { client });
    }

    fn client_act(&mut self, client: usize) -> Result<(), Violation> {
        if let Workload::Throughput { window, .. } = self.opts.workload {
            return self.throughput_act(client, window);
        }
        if self.now >= CLIENTS_STOP || self.clients[client].pending.is_some() {
            return Ok(());
        }
        let n = self.nodes.len();
        let node = match self.clients[client].leader_hint {
            Some(h) => h,
            None => self.rng.range(0, n as u64) as usize,
        };
        let until = self.nodes[node].paused_until;
        if until > self.now {
            // The request sits in the paused node's socket buffer.
            self.schedule(until, Event::ClientAct { client });
            return Ok(());
        }
        let key = self.rng.range(0, KEYS);
        let op = self.history.len();
        let is_put = self.rng.chance(0.5);
        let Some(driver) = self.nodes[node].driver.as_mut() else {
            self.clients[client].leader_hint = None;
            let at = self.now + self.rng.range(TICK / 2, 2 * TICK);
            self.schedule(at, Event::ClientAct { client });
            return Ok(());
        };
        let (input, result) = if is_put {
            let value = op as u64;
            let data = PutCommand {
                op: op as u64,
                key,
                value,
            }
            .encode();
            let r = driver
                .propose(data)
                .map(|proposal| Pending::Put { op, proposal });
            (KvInput::Put { key, value }, r)
        } else {
            let r = driver
                .read_index(op as u64)
                .map(|()| Pending::Get { op, node, key });
            (KvInput::Get { key }, r)
        };
        match result {
            Ok(pending) => {
                let id = self.clients[client].id;
                let put_index = match pending {
                    Pending::Put { proposal, .. } => Some(proposal.index),
                    Pending::Get { .. } => None,
                };
                self.history.push(Record {
                    op: Operation {
                        client: id,
                        input,
                        call: self.now,
                        output: None,
                        ret: None,
                    },
                    discard: false,
                    put_index,
                });
                self.clients[client].pending = Some(pending);
                self.schedule(self.now + OP_TIMEOUT, Event::ClientTimeout { client, op });
                self.with_driver(node, |_| Ok(()))?;
                self.drive(node)
            }
            Err(ProposeError::NotLeader { leader }) => {
                self.clients[client].leader_hint = leader.map(|l| l as usize - 1);
                let at = self.now + self.rng.range(TICK / 2, 2 * TICK);
                self.schedule(at, Event::ClientAct { client });
                Ok(())
            }
        }
    }

    fn client_timeout(&mut self, client: usize, op: usize) {
        let c = &mut self.clients[client];
        let current = match c.pending {
            Some(Pending::Put { op: o, .. }) | Some(Pending::Get { op: o, .. }) => o == op,
            None => false,
        };
        if !current {
            return;
        }
        // Give up: a put may still take effect at any later time (it stays
        // pending in the history); a get without an answer had no effect.
        if matches!(c.pending, Some(Pending::Get { .. })) {
            self.history[op].discard = true;
        }
        c.pending = None;
        c.leader_hint = None;
        c.id += 1 << 32;
        self.next_client_act(client);
    }

    fn throughput_act(&mut self, client: usize, window: usize) -> Result<(), Violation> {
        let leader = self.nodes.iter().position(|n| {
            n.driver
                .as_ref()
                .is_some_and(|d| d.raft().role() == Role::Leader)
        });
        if let Some(l) = leader {
            let driver = self.nodes[l].driver.as_mut().expect("leader is up");
            while self.throughput_outstanding < window {
                let op = self.throughput_applied + self.throughput_outstanding as u64;
                let data = PutCommand {
                    op,
                    key: op % 1024,
                    value: op,
                }
                .encode();
                if driver.propose(data).is_err() {
                    break;
                }
                self.throughput_outstanding += 1;
            }
            self.drive(l)?;
        }
        self.schedule(self.now + 100, Event::ClientAct { client });
        Ok(())
    }

    fn inject_fault(&mut self) {
        let n = self.nodes.len();
        let roll = self.rng.range(0, 100);
        match roll {
            0..20 => self.net.heal(),
            20..35 => {
                let side: Vec<bool> = (0..n).map(|_| self.rng.chance(0.5)).collect();
                self.net.split(&side);
            }
            35..45 => {
                if let Some(l) = self.current_leader() {
                    let side: Vec<bool> = (0..n).map(|i| i == l).collect();
                    self.net.split(&side);
                }
            }
            45..55 => {
                let from = self.rng.range(0, n as u64) as usize;
                let to = self.rng.range(0, n as u64) as usize;
                if from != to {
                    self.net.block_one_way(from, to);
                }
            }
            55..75 => {
                // Prefer a node in the middle of a write: the interesting crash.
                let writing: Vec<usize> = (0..n)
                    .filter(|&i| self.nodes[i].writing.is_some())
                    .collect();
                let up: Vec<usize> = (0..n).filter(|&i| self.nodes[i].driver.is_some()).collect();
                let leader = self.current_leader();
                let victim = if leader.is_some() && self.rng.chance(0.3) {
                    leader
                } else if !writing.is_empty() && self.rng.chance(0.6) {
                    Some(self.rng.pick(&writing))
                } else if !up.is_empty() {
                    Some(self.rng.pick(&up))
                } else {
                    None
                };
                if let Some(v) = victim {
                    self.crash(v);
                }
            }
            75..85 => {
                for node in 0..n {
                    if self.nodes[node].driver.is_none() {
                        self.start(node);
                    }
                }
            }
            85..92 => {
                let leader = self.current_leader();
                let node = match leader {
                    Some(l) if self.rng.chance(0.5) => l,
                    _ => self.rng.range(0, n as u64) as usize,
                };
                let pause = self.rng.range(50_000, 800_000);
                let until = (self.now + pause).min(FAULTS_END);
                self.nodes[node].paused_until = self.nodes[node].paused_until.max(until);
            }
            _ => {
                self.net.quality = Quality {
                    drop: self.rng.pick(&[0.0, 0.01, 0.05, 0.2]),
                    duplicate: self.rng.pick(&[0.0, 0.02, 0.1]),
                    detour: self.rng.pick(&[0.0, 0.05, 0.2]),
                };
            }
        }
    }

    fn current_leader(&self) -> Option<usize> {
        let max_term = self
            .nodes
            .iter()
            .filter_map(|n| n.driver.as_ref())
            .map(|d| d.raft().term())
            .max()?;
        self.nodes.iter().position(|n| {
            n.driver.as_ref().is_some_and(|d| {
                let r = d.raft();
                r.role() == Role::Leader && r.term() == max_term
            })
        })
    }

    fn check_leader(&self) -> Result<(), Violation> {
        if self.current_leader().is_some() {
            return Ok(());
        }
        Err(Violation {
            property: "liveness",
            detail: format!(
                "no leader {} ticks after faults stopped",
                (LEADER_DEADLINE - FAULTS_END) / TICK
            ),
        })
    }

    fn check_acknowledged_applied(&self) -> Result<(), Violation> {
        let progressed = self
            .history
            .iter()
            .any(|r| !r.discard && r.op.call >= FAULTS_END && r.op.ret.is_some());
        if !progressed {
            return Err(Violation {
                property: "liveness",
                detail: "no operation invoked after the faults stopped completed".into(),
            });
        }
        for (op, r) in self.history.iter().enumerate() {
            let (Some(index), Some(_)) = (r.put_index, r.op.ret) else {
                continue;
            };
            if r.discard {
                continue;
            }
            if let Some(n) = self.nodes.iter().find(|n| n.applied < index) {
                return Err(Violation {
                    property: "liveness",
                    detail: format!(
                        "acknowledged put {op} at index {index} not applied on node {} (applied {}) after faults stopped",
                        n.id, n.applied
                    ),
                });
            }
        }
        Ok(())
    }
}
