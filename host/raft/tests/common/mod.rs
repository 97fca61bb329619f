//! A minimal in-memory driver for testing the core through its public API.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use kythira_raft::{
    AppendOutcome, Bytes, Config, Entry, EntryKind, HardState, Index, Message, MessageBody, NodeId,
    Persisted, Raft, ReadState, Role, Term,
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
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| entry(i as Index + 1, t))
        .collect()
}

pub fn node(id: NodeId, voters: &[NodeId]) -> Raft {
    Raft::new(config(id, voters), Persisted::default()).unwrap()
}

pub fn node_with(cfg: Config, term: Term, terms: &[Term]) -> Raft {
    let persisted = Persisted {
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

/// A set of cores connected by a lossless, ordered, instantaneous network,
/// with optional cut links.
pub struct Network {
    pub nodes: BTreeMap<NodeId, Raft>,
    pub applied: BTreeMap<NodeId, Vec<Entry>>,
    pub reads: BTreeMap<NodeId, Vec<ReadState>>,
    cut: BTreeSet<(NodeId, NodeId)>,
    queue: VecDeque<Message>,
}

impl Network {
    pub fn new(nodes: impl IntoIterator<Item = Raft>) -> Self {
        let nodes: BTreeMap<_, _> = nodes.into_iter().map(|r| (r.id(), r)).collect();
        Self {
            applied: nodes.keys().map(|&id| (id, Vec::new())).collect(),
            reads: nodes.keys().map(|&id| (id, Vec::new())).collect(),
            nodes,
            cut: BTreeSet::new(),
            queue: VecDeque::new(),
        }
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

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    pub fn get(&mut self, id: NodeId) -> &mut Raft {
        self.nodes.get_mut(&id).unwrap()
    }

    /// Deliver messages until the network is quiet.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                let out = drain(self.nodes.get_mut(&id).unwrap());
                self.applied.get_mut(&id).unwrap().extend(out.committed);
                self.reads.get_mut(&id).unwrap().extend(out.reads);
                self.queue.extend(out.early);
                self.queue.extend(out.after_persist);
            }
            let Some(m) = self.queue.pop_front() else {
                return;
            };
            if !self.cut.contains(&(m.from, m.to)) {
                self.nodes.get_mut(&m.to).unwrap().step(m).unwrap();
            }
        }
        panic!("network never settled");
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
