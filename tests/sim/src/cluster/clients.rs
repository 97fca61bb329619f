//! Clients as real ones behave: closed-loop clients whose puts and reads are
//! recorded for the linearizability check, which time out and retry the same
//! operation elsewhere; and open-loop proposers that keep many puts in flight.

use kythira_linearizability::Operation;
use kythira_linearizability::kv::{KvInput, KvOutput};
use kythira_raft::{Index, ProposeError, Role};

use super::{Cluster, Event, Owner, Workload};
use crate::kv::PutCommand;
use crate::profile::{LoadSpec, Micros, TICK};
use crate::safety::Violation;

/// How long a client waits for an answer before it retries or gives up.
const OP_TIMEOUT: Micros = 500_000;
/// The same for the open-loop load: long, or a slow cluster would be
/// flooded with retries of proposals that are merely queued.
const LOAD_TIMEOUT: Micros = 3_000_000;
/// Keys the closed-loop clients use (few, so that operations conflict).
const KEYS: u64 = 3;
/// Keys of the open-loop load: disjoint from the checked ones.
const LOAD_KEYS: u64 = 64;
const LOAD_KEY_BASE: u64 = 1_000;
/// Operation ids of the load: disjoint from history indices.
const LOAD_OP_BASE: u64 = 1 << 48;
/// Chance that a timed-out operation is retried rather than abandoned.
const RETRY: f64 = 0.75;

/// One history record.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) op: Operation<KvInput, KvOutput>,
    /// Known not to have taken effect: left out of the checked history.
    pub(super) discard: bool,
    /// A read issued in a quiet phase: it must be answered.
    must_answer: bool,
}

#[derive(Debug)]
struct Pending {
    /// Index of the operation in the history; also its id in the log.
    op: usize,
    key: u64,
    is_put: bool,
    /// Attempts are numbered; only the latest one is waited for.
    attempt: u32,
    /// Whether the latest attempt was accepted by a node.
    outstanding: bool,
    /// Whether any attempt was accepted (else it cannot have taken effect).
    accepted: bool,
    /// Where the latest attempt went.
    node: usize,
}

#[derive(Debug)]
pub(super) struct Client {
    /// Identity in the history; changes when an operation is abandoned, so
    /// that no client id ever has two operations outstanding.
    id: u64,
    pending: Option<Pending>,
    leader_hint: Option<usize>,
}

impl Client {
    pub(super) fn new(id: u64) -> Self {
        Self {
            id,
            pending: None,
            leader_hint: None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Slot {
    Idle,
    /// Must be proposed (again).
    Waiting {
        op: u64,
        attempt: u32,
    },
    InFlight {
        op: u64,
        attempt: u32,
        node: usize,
        index: Index,
        since: Micros,
    },
}

#[derive(Debug)]
pub(super) struct Proposer {
    remaining: u64,
    created: u64,
    slots: Vec<Slot>,
    leader_hint: Option<usize>,
}

impl Proposer {
    pub(super) fn new(spec: &LoadSpec) -> Self {
        Self {
            remaining: spec.total,
            created: 0,
            slots: vec![Slot::Idle; spec.window],
            leader_hint: None,
        }
    }
}

/// A read's context: its operation and attempt.
fn read_ctx(op: usize, attempt: u32) -> u64 {
    ((op as u64) << 20) | u64::from(attempt & 0xF_FFFF)
}

fn load_command(op: u64) -> PutCommand {
    PutCommand {
        op,
        key: LOAD_KEY_BASE + op % LOAD_KEYS,
        value: op,
    }
}

impl Cluster {
    fn node_for(&mut self, hint: Option<usize>) -> usize {
        match hint {
            Some(h) => h,
            None => self.rng.range(0, self.nodes.len() as u64) as usize,
        }
    }

    fn schedule_client(&mut self, client: usize, lo: Micros, hi: Micros) {
        let at = self.now + self.rng.range(lo, hi);
        self.schedule(at, Event::ClientAct { client });
    }

    pub(super) fn client_act(&mut self, client: usize) -> Result<(), Violation> {
        if let Workload::Throughput { window, pace, .. } = self.opts.workload {
            return self.throughput_act(client, window, pace);
        }
        match &self.clients[client].pending {
            Some(p) if p.outstanding => return Ok(()),
            // A retry goes out even while clients start nothing new.
            Some(_) => {}
            None if !self.phase.clients_active => return Ok(()),
            None => {
                let key = self.rng.range(0, KEYS);
                let is_put = self.rng.chance(0.5);
                let op = self.history.len();
                let input = if is_put {
                    KvInput::Put {
                        key,
                        value: op as u64,
                    }
                } else {
                    KvInput::Get { key }
                };
                self.history.push(Record {
                    op: Operation {
                        client: self.clients[client].id,
                        input,
                        call: self.now,
                        output: None,
                        ret: None,
                    },
                    discard: false,
                    must_answer: !is_put && self.phase.quiet(),
                });
                self.clients[client].pending = Some(Pending {
                    op,
                    key,
                    is_put,
                    attempt: 0,
                    outstanding: false,
                    accepted: false,
                    node: 0,
                });
            }
        }
        self.attempt(client)
    }

    /// Send the pending operation's next attempt to the node the client
    /// believes leads.
    fn attempt(&mut self, client: usize) -> Result<(), Violation> {
        let is_put = self.clients[client]
            .pending
            .as_ref()
            .is_some_and(|p| p.is_put);
        // A third of the reads go to any node: a follower forwards them to
        // its leader (follower reads).
        let hint = if !is_put && self.rng.chance(0.3) {
            None
        } else {
            self.clients[client].leader_hint
        };
        let node = self.node_for(hint);
        let lease = self.profile.lease_reads && self.rng.chance(0.5);
        if self.nodes[node].paused_until <= self.now && self.nodes[node].driver.is_some() {
            self.deliver_due_ticks(node)?;
        }
        let until = self.nodes[node].paused_until;
        if until > self.now {
            // The request sits in the paused node's socket buffer.
            self.schedule(until, Event::ClientAct { client });
            return Ok(());
        }
        let Some(driver) = self.nodes[node].driver.as_mut() else {
            self.clients[client].leader_hint = None;
            self.schedule_client(client, TICK / 2, 2 * TICK);
            return Ok(());
        };
        let p = self.clients[client]
            .pending
            .as_mut()
            .expect("an attempt is made for a pending operation");
        p.attempt += 1;
        let (op, attempt) = (p.op, p.attempt);
        let result = if p.is_put {
            let data = PutCommand {
                op: op as u64,
                key: p.key,
                value: op as u64,
            }
            .encode();
            driver.propose(data).map(|proposal| Some(proposal.index))
        } else if lease {
            driver.lease_read(read_ctx(op, attempt)).map(|()| None)
        } else {
            driver.read_index(read_ctx(op, attempt)).map(|()| None)
        };
        match result {
            Ok(index) => {
                p.outstanding = true;
                p.node = node;
                p.accepted = true;
                if let Some(index) = index {
                    self.nodes[node].proposals.insert(
                        index,
                        Owner::Client {
                            client,
                            op,
                            attempt,
                        },
                    );
                }
                self.schedule(
                    self.now + OP_TIMEOUT,
                    Event::ClientTimeout {
                        client,
                        op,
                        attempt,
                    },
                );
                self.with_driver(node, |_| Ok(()))?;
                self.drive(node)
            }
            Err(e) => {
                let hint = match e {
                    ProposeError::NotLeader { leader } => leader,
                    ProposeError::Transferring { to } => Some(to),
                };
                self.clients[client].leader_hint = hint.map(|l| l as usize - 1);
                self.schedule_client(client, TICK / 2, 2 * TICK);
                Ok(())
            }
        }
    }

    /// Whether `(op, attempt)` is the attempt `client` waits for.
    fn is_current(&self, client: usize, op: usize, attempt: u32) -> bool {
        self.clients[client]
            .pending
            .as_ref()
            .is_some_and(|p| p.op == op && p.attempt == attempt && p.outstanding)
    }

    /// The latest attempt failed without an answer: try again soon.
    fn retry(&mut self, client: usize) {
        let c = &mut self.clients[client];
        if let Some(p) = c.pending.as_mut() {
            p.outstanding = false;
        }
        c.leader_hint = None;
        self.schedule_client(client, 0, 2 * TICK);
    }

    pub(super) fn client_timeout(
        &mut self,
        client: usize,
        op: usize,
        attempt: u32,
    ) -> Result<(), Violation> {
        if !self.is_current(client, op, attempt) {
            return Ok(());
        }
        let is_put = self.clients[client]
            .pending
            .as_ref()
            .is_some_and(|p| p.is_put);
        // A read issued in a quiet phase is retried until it is answered:
        // the phase's check waits for it.
        let must_answer = self.history[op].must_answer;
        if must_answer || (self.phase.clients_active && self.rng.chance(RETRY)) {
            self.retry(client);
            return Ok(());
        }
        // Give up: a put may still take effect at any later time (it stays
        // pending in the history); a get without an answer had no effect.
        if !is_put {
            self.history[op].discard = true;
        }
        let c = &mut self.clients[client];
        c.pending = None;
        c.leader_hint = None;
        c.id += 1 << 32;
        self.schedule_client(client, 0, 2 * TICK);
        Ok(())
    }

    /// The entry at `index` of a node where `client` proposed attempt
    /// `attempt` of `op` was applied; it holds `applied_op` (None: a no-op).
    pub(super) fn client_proposal_applied(
        &mut self,
        client: usize,
        op: usize,
        attempt: u32,
        index: Index,
        applied_op: Option<u64>,
    ) {
        let waiting = self.clients[client]
            .pending
            .as_ref()
            .is_some_and(|p| p.op == op);
        if !waiting {
            return;
        }
        if applied_op == Some(op as u64) {
            // Any attempt's success answers the operation.
            self.acked_index = self.acked_index.max(index);
            self.complete(client, KvOutput::Put);
        } else if self.is_current(client, op, attempt) {
            // Another entry took the slot: this attempt can never commit.
            self.retry(client);
        }
    }

    pub(super) fn serve_reads(&mut self, node: usize) -> Result<(), Violation> {
        let n = &mut self.nodes[node];
        let applied = n.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            n.reads.drain(..).partition(|r| r.index <= applied);
        n.reads = waiting;
        for r in ready {
            let op = (r.ctx >> 20) as usize;
            let client = self
                .clients
                .iter()
                .position(|c| c.pending.as_ref().is_some_and(|p| p.op == op && !p.is_put));
            if let Some(c) = client {
                let key = self.clients[c].pending.as_ref().map_or(0, |p| p.key);
                let value = self.nodes[node].kv.get(key);
                self.complete(c, KvOutput::Get(value));
            }
        }
        Ok(())
    }

    pub(super) fn read_dropped(&mut self, ctx: u64) -> Result<(), Violation> {
        let (op, attempt) = ((ctx >> 20) as usize, (ctx & 0xF_FFFF) as u32);
        let Some(client) = self
            .clients
            .iter()
            .position(|c| c.pending.as_ref().is_some_and(|p| p.op == op))
        else {
            return Ok(());
        };
        if !self.is_current(client, op, attempt) {
            return Ok(());
        }
        self.retry(client);
        Ok(())
    }

    fn complete(&mut self, client: usize, output: KvOutput) {
        let p = self.clients[client]
            .pending
            .take()
            .expect("completing a pending operation");
        debug_assert!(p.accepted);
        let rec = &mut self.history[p.op].op;
        rec.output = Some(output);
        rec.ret = Some(self.now);
        self.phase.completed += 1;
        self.schedule_client(client, 0, 2 * TICK);
    }

    /// A read that must be answered and is still waiting.
    pub(super) fn unanswered_stable_read(&self) -> Option<usize> {
        self.clients.iter().find_map(|c| {
            let p = c.pending.as_ref()?;
            (!p.is_put && self.history[p.op].must_answer).then_some(p.op)
        })
    }

    /// Operations that never reached any node had no effect.
    pub(super) fn discard_unaccepted(&mut self) {
        for c in &self.clients {
            if let Some(p) = &c.pending
                && !p.accepted
            {
                self.history[p.op].discard = true;
            }
        }
    }

    pub(super) fn load_act(&mut self, proposer: usize) -> Result<(), Violation> {
        if !self.phase.clients_active {
            return Ok(());
        }
        let now = self.now;
        let pr = &mut self.proposers[proposer];
        for slot in &mut pr.slots {
            *slot = match *slot {
                Slot::InFlight {
                    op, attempt, since, ..
                } if since + LOAD_TIMEOUT <= now => Slot::Waiting { op, attempt },
                Slot::Idle if pr.remaining > 0 => {
                    pr.remaining -= 1;
                    pr.created += 1;
                    let op = LOAD_OP_BASE + ((proposer as u64) << 40) + pr.created;
                    Slot::Waiting { op, attempt: 0 }
                }
                s => s,
            };
        }
        let hint = pr.leader_hint;
        let node = self.node_for(hint);
        let mut proposed = Vec::new();
        if self.nodes[node].paused_until <= self.now
            && let Some(driver) = self.nodes[node].driver.as_mut()
        {
            let pr = &mut self.proposers[proposer];
            for (i, slot) in pr.slots.iter_mut().enumerate() {
                let Slot::Waiting { op, attempt } = *slot else {
                    continue;
                };
                match driver.propose(load_command(op).encode()) {
                    Ok(p) => {
                        *slot = Slot::InFlight {
                            op,
                            attempt: attempt + 1,
                            node,
                            index: p.index,
                            since: now,
                        };
                        proposed.push((p.index, i));
                    }
                    Err(ProposeError::NotLeader { leader }) => {
                        pr.leader_hint = leader.map(|l| l as usize - 1);
                        break;
                    }
                    Err(ProposeError::Transferring { to }) => {
                        pr.leader_hint = Some(to as usize - 1);
                        break;
                    }
                }
            }
        } else {
            self.proposers[proposer].leader_hint = None;
        }
        if !proposed.is_empty() {
            let n = &mut self.nodes[node];
            for (index, slot) in proposed {
                n.proposals.insert(index, Owner::Load { proposer, slot });
            }
            self.with_driver(node, |_| Ok(()))?;
            self.drive(node)?;
        }
        let at = self.now + self.rng.range(TICK / 4, TICK);
        self.schedule(at, Event::LoadAct { proposer });
        Ok(())
    }

    pub(super) fn load_proposal_applied(
        &mut self,
        proposer: usize,
        slot: usize,
        node: usize,
        index: Index,
        applied_op: Option<u64>,
    ) {
        let s = &mut self.proposers[proposer].slots[slot];
        let Slot::InFlight {
            op,
            attempt,
            node: at,
            index: i,
            ..
        } = *s
        else {
            return;
        };
        if (at, i) != (node, index) {
            return;
        }
        if applied_op == Some(op) {
            *s = Slot::Idle;
            self.acked_index = self.acked_index.max(index);
            self.phase.completed += 1;
        } else {
            *s = Slot::Waiting { op, attempt };
        }
    }

    fn throughput_act(
        &mut self,
        client: usize,
        window: usize,
        pace: Option<usize>,
    ) -> Result<(), Violation> {
        let leader = self.nodes.iter().position(|n| {
            n.driver
                .as_ref()
                .is_some_and(|d| d.raft().role() == Role::Leader)
        });
        if let Some(l) = leader {
            let driver = self.nodes[l].driver.as_mut().expect("leader is up");
            let mut budget = pace.unwrap_or(usize::MAX);
            while self.throughput_outstanding < window && budget > 0 {
                budget -= 1;
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
                self.throughput_proposed.push_back(self.now);
            }
            // An open loop that hit its window no longer offers its pace.
            if pace.is_some() && budget > 0 && self.throughput_outstanding >= window {
                self.throughput_saturated = true;
            }
            self.drive(l)?;
        }
        self.schedule(self.now + 100, Event::ClientAct { client });
        Ok(())
    }
}
