//! A minimal in-memory driver for testing the core through its public API.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use kythira_raft::{
    AppendOutcome, Bytes, Config, Entry, EntryKind, HardState, Index, Message, MessageBody, NodeId,
    Persisted, Raft, ReadState, Role, SnapshotMeta, Term,
};

pub const ELECTION: u32 = 10;
pub const HEARTBEAT: u32 = 1;

/// Paper Raft: no pre-vote, no check-quorum (tests of those switch them on).
pub fn config(id: NodeId, voters: &[NodeId]) -> Config {
    let mut c = Config::new(id, voters.iter().copied());
    c.election_ticks = ELECTION;
    c.heartbeat_ticks = HEARTBEAT;
    c.pre_vote = false;
    c.check_quorum = false;
    c
}

pub fn entry(index: Index, term: Term) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Normal,
        data: Bytes::new(),
    }
}

/// Entries 1.. with the given terms.
pub fn log_of(terms: &[Term]) -> Vec<Entry> {
    log_from(1, terms)
}

/// Entries `first..` with the given terms (a log suffix after a snapshot).
pub fn log_from(first: Index, terms: &[Term]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| entry(first + i as Index, t))
        .collect()
}

/// Snapshot `r` at `index` (applied) and compact its log behind it.
pub fn compact_at(r: &mut Raft, index: Index) -> SnapshotMeta {
    let meta = r.snapshot_meta(index).unwrap();
    r.compact(meta.clone()).unwrap();
    meta
}

pub fn node(id: NodeId, voters: &[NodeId]) -> Raft {
    Raft::new(config(id, voters), Persisted::default()).unwrap()
}

pub fn node_with(cfg: Config, term: Term, terms: &[Term]) -> Raft {
    let persisted = Persisted {
        snapshot: None,
        hard_state: HardState {
            term,
            vote: None,
            commit: 0,
        },
        entries: log_of(terms),
        applied: 0,
    };
    Raft::new(cfg, persisted).unwrap()
}

/// Everything the core asked for, with writes treated as instantly durable.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages that may precede durability.
    pub early: Vec<Message>,
    /// Messages that must wait for durability.
    pub after_persist: Vec<Message>,
    pub committed: Vec<Entry>,
    pub reads: Vec<ReadState>,
    pub dropped_reads: Vec<u64>,
    pub hard_states: Vec<HardState>,
    pub persisted: Vec<Entry>,
    /// Received snapshots to install, in order.
    pub snapshots: Vec<SnapshotMeta>,
}

impl Output {
    pub fn all(&self) -> Vec<Message> {
        self.early
            .iter()
            .chain(&self.after_persist)
            .cloned()
            .collect()
    }
}

pub fn drain(r: &mut Raft) -> Output {
    let mut out = Output::default();
    while let Some(rd) = r.ready() {
        out.early.extend(rd.messages);
        out.after_persist.extend(rd.persisted_messages);
        out.committed.extend(rd.committed_entries);
        out.reads.extend(rd.read_states);
        out.dropped_reads.extend(rd.dropped_reads);
        out.hard_states.extend(rd.hard_state);
        out.persisted.extend(rd.entries);
        out.snapshots.extend(rd.snapshot);
        r.advance();
    }
    out
}

pub fn msg(from: NodeId, to: NodeId, term: Term, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

/// Tick until the node changes role (bounded).
pub fn tick_until_role_changes(r: &mut Raft) {
    let role = r.role();
    for _ in 0..(4 * ELECTION) {
        r.tick();
        if r.role() != role {
            return;
        }
    }
    panic!("role never changed from {role:?}");
}

/// Decides whether a message in flight is lost.
pub type DropRule = Box<dyn FnMut(&Message) -> bool>;

/// A set of cores connected by a lossless, ordered, instantaneous network,
/// with optional cut links and an optional rule that loses chosen messages.
pub struct Network {
    pub nodes: BTreeMap<NodeId, Raft>,
    pub applied: BTreeMap<NodeId, Vec<Entry>>,
    pub reads: BTreeMap<NodeId, Vec<ReadState>>,
    /// Received snapshots each node installed (its state machine restarts
    /// from each: `applied` goes on with the entries after it).
    pub installed: BTreeMap<NodeId, Vec<SnapshotMeta>>,
    /// Every message sent, in order, delivered or not.
    pub trace: Vec<Message>,
    /// Messages kept back by the hold rule, in order, until `release_held`.
    pub held: Vec<Message>,
    cut: BTreeSet<(NodeId, NodeId)>,
    drop_rule: Option<DropRule>,
    hold_rule: Option<DropRule>,
    queue: VecDeque<Message>,
}

impl Network {
    pub fn new(nodes: impl IntoIterator<Item = Raft>) -> Self {
        let nodes: BTreeMap<_, _> = nodes.into_iter().map(|r| (r.id(), r)).collect();
        Self {
            applied: nodes.keys().map(|&id| (id, Vec::new())).collect(),
            reads: nodes.keys().map(|&id| (id, Vec::new())).collect(),
            installed: nodes.keys().map(|&id| (id, Vec::new())).collect(),
            nodes,
            trace: Vec::new(),
            held: Vec::new(),
            cut: BTreeSet::new(),
            drop_rule: None,
            hold_rule: None,
            queue: VecDeque::new(),
        }
    }

    /// `voters` with each node's configuration adjusted by `f`.
    pub fn with_config(voters: &[NodeId], f: impl Fn(&mut Config)) -> Self {
        Self::new(voters.iter().map(|&id| {
            let mut c = config(id, voters);
            f(&mut c);
            Raft::new(c, Persisted::default()).unwrap()
        }))
    }

    /// Connects one more node (a joining server, say).
    pub fn add(&mut self, r: Raft) {
        let id = r.id();
        self.applied.insert(id, Vec::new());
        self.reads.insert(id, Vec::new());
        self.installed.insert(id, Vec::new());
        assert!(
            self.nodes.insert(id, r).is_none(),
            "node {id} is there already"
        );
    }

    /// Cuts the links between `a` and `b`, both ways.
    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert((a, b));
        self.cut.insert((b, a));
    }

    /// Cuts every link between nodes of different groups.
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        for (i, g) in groups.iter().enumerate() {
            for h in &groups[i + 1..] {
                for &a in g.iter() {
                    for &b in h.iter() {
                        self.cut(a, b);
                    }
                }
            }
        }
    }

    /// Loses every message for which `rule` says so, until `heal`.
    pub fn drop_if(&mut self, rule: impl FnMut(&Message) -> bool + 'static) {
        self.drop_rule = Some(Box::new(rule));
    }

    pub fn of_size(n: u64) -> Self {
        let voters: Vec<NodeId> = (1..=n).collect();
        Self::new(voters.iter().map(|&id| node(id, &voters)))
    }

    pub fn isolate(&mut self, id: NodeId) {
        for &other in self.nodes.keys() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    /// Keeps back every message for which `rule` says so (in `held`), until
    /// `release_held`.
    pub fn hold_if(&mut self, rule: impl FnMut(&Message) -> bool + 'static) {
        self.hold_rule = Some(Box::new(rule));
    }

    /// Stops holding messages back and delivers those held, then settles.
    pub fn release_held(&mut self) {
        self.hold_rule = None;
        let held = std::mem::take(&mut self.held);
        self.queue.extend(held);
        self.settle();
    }

    /// Restores every link and stops losing messages.
    pub fn heal(&mut self) {
        self.cut.clear();
        self.drop_rule = None;
    }

    pub fn get(&mut self, id: NodeId) -> &mut Raft {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Deliver messages until the network is quiet. A message to a node
    /// that is not connected is lost.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                let out = drain(self.nodes.get_mut(&id).unwrap());
                self.trace.extend(out.all());
                self.applied.get_mut(&id).unwrap().extend(out.committed);
                self.reads.get_mut(&id).unwrap().extend(out.reads);
                self.installed.get_mut(&id).unwrap().extend(out.snapshots);
                self.queue.extend(out.early);
                self.queue.extend(out.after_persist);
            }
            let Some(m) = self.queue.pop_front() else {
                return;
            };
            let lost = self.cut.contains(&(m.from, m.to))
                || self.drop_rule.as_mut().is_some_and(|rule| rule(&m));
            if !lost && self.hold_rule.as_mut().is_some_and(|rule| rule(&m)) {
                self.held.push(m);
                continue;
            }
            if !lost && let Some(to) = self.nodes.get_mut(&m.to) {
                to.step(m).unwrap();
            }
        }
        panic!("network never settled");
    }

    /// Sends `msgs` (taken from a node's `Ready` by hand) through the
    /// network, then settles.
    pub fn deliver(&mut self, msgs: Vec<Message>) {
        self.trace.extend(msgs.iter().cloned());
        self.queue.extend(msgs);
        self.settle();
    }

    /// Tick only `id`, `ticks` times, settling after each.
    pub fn tick(&mut self, id: NodeId, ticks: u32) {
        for _ in 0..ticks {
            self.get(id).tick();
            self.settle();
        }
    }

    /// Let `id` time out and campaign, then settle.
    pub fn elect(&mut self, id: NodeId) {
        tick_until_role_changes(self.get(id));
        self.settle();
        // With pre-vote the first change is to pre-candidate.
        if self.get(id).role() == Role::PreCandidate {
            self.settle();
        }
    }

    pub fn tick_all(&mut self, ticks: u32) {
        for _ in 0..ticks {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.get(id).tick();
            }
            self.settle();
        }
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .values()
            .find(|r| r.role() == Role::Leader)
            .map(Raft::id)
    }

    pub fn log_terms(&self, id: NodeId) -> Vec<Term> {
        let log = self.nodes[&id].log();
        log.entries(1, log.last_index())
            .iter()
            .map(|e| e.term)
            .collect()
    }
}

/// Leader 1 of {1, 2} sending at most 3 entries per append with a window of
/// 2, node 2 known to match its no-op, and 20 proposals waiting to go out.
pub fn pipelining_leader() -> Raft {
    let mut c = config(1, &[1, 2]);
    c.max_entries_per_message = 3;
    c.max_inflight_messages = 2;
    let mut leader = Raft::new(c, Default::default()).unwrap();
    tick_until_role_changes(&mut leader);
    leader
        .step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    drain(&mut leader);
    leader
        .step(msg(
            2,
            1,
            1,
            MessageBody::AppendResponse(AppendOutcome::Accepted { last_index: 1 }),
        ))
        .unwrap();
    drain(&mut leader);
    for i in 0..20u8 {
        leader.propose(Bytes::from(vec![i])).unwrap();
    }
    leader
}
