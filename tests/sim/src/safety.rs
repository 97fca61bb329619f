//! The safety properties of Raft (paper, figure 3), checked incrementally so
//! that they can run after every event (constant work per event, plus a scan
//! of the log per election and a nodes² comparison per commit or write):
//!
//! * election safety: at most one leader per term;
//! * leader append-only: a leader never overwrites or deletes its entries;
//! * log matching: two logs with an entry of the same index and term agree on
//!   every entry up to it (checked on durable logs with prefix hashes);
//! * leader completeness: a new leader of term T holds every entry committed
//!   in a term below T. An entry counts as committed once any node reports a
//!   commit index at or past it (or applies it); the term of the node that
//!   reported it bounds the term it was committed in from above (the node
//!   learned the commit from a leader of that term or later), so entries
//!   whose smallest such bound is below T are required. Leaders of older
//!   terms can appear late in real time (a paused node collecting votes
//!   granted long ago) and need not hold newer commits;
//! * state machine safety: no two nodes commit or apply different entries at
//!   an index, and each node applies its entries in order, each once;
//! * committed entries are protected: after every commit and every durable
//!   write, no node whose durable log lacks the latest entry applied anywhere
//!   could collect votes from a majority (judged on durable logs, the state
//!   that survives any crash). This is the argument behind leader
//!   completeness (paper §5.4.3), checked before a bad election happens
//!   rather than after. A candidate needs a majority of every voter set of
//!   the membership its durable log holds (both sets in a joint phase);
//!   every node is judged a candidate, whether or not it would campaign;
//! * every decision has both majorities: when a leader's commit index
//!   moves, a majority of each voter set of its membership (the old and the
//!   new one in a joint phase; learners never count) durably holds the
//!   newly committed entry;
//! * durability promises, checked when a message leaves: a granted vote and
//!   a vote request are backed by the sender's durable vote (or a durable
//!   later term), an `Accepted { last_index }` by that many durable entries,
//!   and every message but pre-vote traffic by a durable term at least its
//!   own; the durable term and vote never go back.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::hash::{BuildHasherDefault, Hasher};

use kythira_raft::{
    AppendOutcome, Entry, EntryKind, HardState, Index, Membership, Message, MessageBody, NodeId,
    Raft, Role, SnapshotMeta, Term, Voters,
};

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which property.
    pub property: &'static str,
    /// What was seen.
    pub detail: String,
}

/// A fast hasher for small integer keys (the Fx mix used by rustc); the
/// keys are simulator-generated, so there is nothing to defend against.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// An entry known to be committed.
#[derive(Debug, Clone, Copy)]
struct Committed {
    term: Term,
    hash: u64,
    /// Upper bound on the term in which the entry was committed: the
    /// smallest term of a node when it reported or applied the entry.
    committed_by: Term,
}

/// Per-node state of the checker. Node ids are `1..=n`.
#[derive(Debug, Default, Clone)]
struct NodeView {
    /// (term, last index, term of last) when last seen as leader.
    leader_tip: Option<(Term, Index, Term)>,
    /// Prefix hashes of its durable log, index i at i - 1.
    durable_prefix: Vec<u64>,
    /// Terms of its durable log, index i at i - 1.
    durable_terms: Vec<Term>,
    /// Last applied index since its last restart.
    applied: Index,
    /// The membership before any configuration entry (its bootstrap one).
    base: Membership,
    /// Configuration entries of its durable log, ascending.
    durable_memberships: Vec<(Index, Membership)>,
    /// Highest commit index seen while it led, and in which term.
    leader_commit: (Term, Index),
}

impl NodeView {
    /// The membership its durable log holds.
    fn durable_membership(&self) -> &Membership {
        self.durable_memberships
            .last()
            .map_or(&self.base, |(_, m)| m)
    }
}

/// Incremental checker of every node's observable state.
#[derive(Debug)]
pub struct Safety {
    leaders: FxMap<Term, NodeId>,
    nodes: Vec<NodeView>,
    /// Prefix hash of every (index, term) ever made durable anywhere.
    prefix_by_position: FxMap<(Index, Term), u64>,
    /// Entries known to be committed, index i at i - 1: the longest commit
    /// index any node ever reported.
    committed: Vec<Committed>,
    /// Prefix hash of the committed log, index i at i - 1.
    committed_prefix: Vec<u64>,
}

/// Content hash of an entry (FNV-1a over kind and payload).
pub fn entry_hash(e: &Entry) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let kind = match e.kind {
        EntryKind::Noop => 1u8,
        EntryKind::Config => 3u8,
        _ => 2u8,
    };
    for b in std::iter::once(kind).chain(e.data.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn chain(prev: u64, term: Term, content: u64) -> u64 {
    let mut z = prev ^ term.rotate_left(17) ^ content.rotate_left(41);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn violation(property: &'static str, detail: String) -> Result<(), Violation> {
    Err(Violation { property, detail })
}

impl Safety {
    /// A checker for nodes `1..=nodes`, each starting from its bootstrap
    /// membership (`bases[i]` for node `i + 1`).
    pub fn new(bases: Vec<Membership>) -> Self {
        Self {
            leaders: FxMap::default(),
            nodes: bases
                .into_iter()
                .map(|base| NodeView {
                    base,
                    ..NodeView::default()
                })
                .collect(),
            prefix_by_position: FxMap::default(),
            committed: Vec::new(),
            committed_prefix: Vec::new(),
        }
    }

    fn node(&mut self, id: NodeId) -> &mut NodeView {
        &mut self.nodes[id as usize - 1]
    }

    /// Check the observable state of `raft` after it handled an input.
    pub fn observe(&mut self, raft: &Raft) -> Result<(), Violation> {
        self.record_commit(raft)?;
        let id = raft.id();
        if raft.role() != Role::Leader {
            self.node(id).leader_tip = None;
            return Ok(());
        }
        self.check_commit_quorum(raft)?;
        let term = raft.term();
        match self.leaders.entry(term) {
            MapEntry::Occupied(o) if *o.get() != id => {
                return violation(
                    "election safety",
                    format!("nodes {} and {id} both lead term {term}", o.get()),
                );
            }
            MapEntry::Occupied(_) => {}
            MapEntry::Vacant(v) => {
                v.insert(id);
            }
        }
        let log = raft.log();
        match self.node(id).leader_tip {
            Some((t, last, last_term)) if t == term => {
                if log.last_index() < last || log.term(last) != Some(last_term) {
                    return violation(
                        "leader append-only",
                        format!(
                            "leader {id} of term {term} had ({last}, {last_term}), now ends at {}",
                            log.last_index()
                        ),
                    );
                }
            }
            _ => self.check_completeness(raft)?,
        }
        self.node(id).leader_tip = Some((term, log.last_index(), log.last_term()));
        Ok(())
    }

    /// Learn the entries `raft` reports committed beyond what is known, and
    /// check that its last committed entry is the known one.
    fn record_commit(&mut self, raft: &Raft) -> Result<(), Violation> {
        let log = raft.log();
        let commit = log.committed();
        let known = self.committed.len() as Index;
        if commit == 0 {
            return Ok(());
        }
        if commit <= known {
            let c = self.committed[commit as usize - 1];
            return match log.get(commit) {
                Some(e) if e.term == c.term && entry_hash(e) == c.hash => {
                    let c = &mut self.committed[commit as usize - 1];
                    c.committed_by = c.committed_by.min(raft.term());
                    Ok(())
                }
                // Compacted away: nothing to compare (no compaction yet).
                None => Ok(()),
                Some(e) => violation(
                    "state machine safety",
                    format!(
                        "node {} commits ({commit}, {}) where ({commit}, {}) was committed",
                        raft.id(),
                        e.term,
                        c.term
                    ),
                ),
            };
        }
        for index in known + 1..=commit {
            let e = log
                .get(index)
                .expect("a node holds the entries it reports committed");
            self.push_committed(Committed {
                term: e.term,
                hash: entry_hash(e),
                committed_by: raft.term(),
            });
        }
        self.check_commit_protected()
    }

    /// A leader's new commit index is durably held by a majority of every
    /// voter set of its membership, and each joint configuration entry it
    /// newly committed by a majority of both of that entry's sets. (The
    /// second is what the joint phase is for; the first alone would not see
    /// it, since a leader leaves the joint phase in the very input that
    /// commits it, and a later decision under the new voters alone is sound
    /// once the joint entry is committed, thesis §4.3.)
    fn check_commit_quorum(&mut self, raft: &Raft) -> Result<(), Violation> {
        let (term, commit) = (raft.term(), raft.log().committed());
        let seen = &mut self.node(raft.id()).leader_commit;
        let first_sight = seen.0 != term;
        if !first_sight && seen.1 >= commit {
            return Ok(());
        }
        let before = std::mem::replace(seen, (term, commit)).1;
        if first_sight {
            // What it committed before it led was decided by others, under
            // the membership of the time.
            return Ok(());
        }
        let log = raft.log();
        self.check_held(raft, commit, raft.membership())?;
        for e in log.entries(before + 1, commit) {
            if e.kind != EntryKind::Config {
                continue;
            }
            let m = Membership::decode(&e.data).expect("a leader's log decodes");
            if m.is_joint() {
                self.check_held(raft, e.index, &m)?;
            }
        }
        Ok(())
    }

    /// `raft` (a leader) decided that `index` is committed: a majority of
    /// every voter set of `m` must durably hold it.
    fn check_held(&self, raft: &Raft, index: Index, m: &Membership) -> Result<(), Violation> {
        let Some(entry_term) = raft.log().term(index) else {
            return Ok(());
        };
        let holds = |id: NodeId| {
            self.nodes
                .get(id as usize - 1)
                .and_then(|v| v.durable_terms.get(index as usize - 1))
                == Some(&entry_term)
        };
        for set in std::iter::once(m.voters()).chain(m.outgoing()) {
            let holding = set.ids().filter(|&id| holds(id)).count();
            if holding < set.majority() {
                return violation(
                    "quorum",
                    format!(
                        "leader {} of term {} committed ({index}, {entry_term}), held durably \
                         by {holding} of voters {:?} (membership {m:?})",
                        raft.id(),
                        raft.term(),
                        set.ids().collect::<Vec<_>>()
                    ),
                );
            }
        }
        Ok(())
    }

    /// A new leader must hold every entry committed in an earlier term.
    fn check_completeness(&self, raft: &Raft) -> Result<(), Violation> {
        let log = raft.log();
        for (i, a) in self.committed.iter().enumerate() {
            if a.committed_by >= raft.term() {
                continue;
            }
            let (term, hash) = (a.term, a.hash);
            let index = i as Index + 1;
            let snapshot = log.snapshot_index();
            if index < snapshot {
                // Covered by its snapshot, checked at the snapshot's index.
                continue;
            }
            match log.get(index) {
                Some(e) if e.term == term && entry_hash(e) == hash => {}
                None if index == snapshot && log.term(index) == Some(term) => {}
                other => {
                    return violation(
                        "leader completeness",
                        format!(
                            "leader {} of term {} has {:?} at {index}, applied entry has term {term}",
                            raft.id(),
                            raft.term(),
                            other.map(|e| e.term)
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// `node` durably wrote `entries`, replacing its log from `entries[0].index`.
    pub fn persisted(&mut self, node: NodeId, entries: &[Entry]) -> Result<(), Violation> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let view = &mut self.nodes[node as usize - 1];
        let prefix = &mut view.durable_prefix;
        view.durable_terms.truncate(first.index as usize - 1);
        view.durable_terms.extend(entries.iter().map(|e| e.term));
        view.durable_memberships
            .retain(|&(index, _)| index < first.index);
        for e in entries.iter().filter(|e| e.kind == EntryKind::Config) {
            let m = Membership::decode(&e.data).map_err(|err| Violation {
                property: "protocol",
                detail: format!("node {node} wrote an undecodable configuration entry: {err}"),
            })?;
            view.durable_memberships.push((e.index, m));
        }
        if first.index as usize > prefix.len() + 1 {
            return violation(
                "log matching",
                format!(
                    "node {node} wrote entry {} after a log ending at {}",
                    first.index,
                    prefix.len()
                ),
            );
        }
        prefix.truncate(first.index as usize - 1);
        for e in entries {
            let prev = prefix.last().copied().unwrap_or(0);
            let h = chain(prev, e.term, entry_hash(e));
            match self.prefix_by_position.entry((e.index, e.term)) {
                MapEntry::Occupied(o) if *o.get() != h => {
                    return violation(
                        "log matching",
                        format!(
                            "node {node} holds ({}, {}) with a prefix that differs from another node's",
                            e.index, e.term
                        ),
                    );
                }
                MapEntry::Occupied(_) => {}
                MapEntry::Vacant(v) => {
                    v.insert(h);
                }
            }
            prefix.push(h);
        }
        self.check_commit_protected()
    }

    /// No node lacking the latest committed entry could win an election.
    fn check_commit_protected(&self) -> Result<(), Violation> {
        let Some(&Committed { term, .. }) = self.committed.last() else {
            return Ok(());
        };
        let index = self.committed.len();
        let last = |v: &NodeView| {
            (
                v.durable_terms.last().copied().unwrap_or(0),
                v.durable_terms.len(),
            )
        };
        for (i, candidate) in self.nodes.iter().enumerate() {
            let id = i as NodeId + 1;
            if candidate.durable_terms.get(index - 1) == Some(&term) {
                continue;
            }
            // Every node counts as a candidate, even one that would not
            // campaign: voting looks at logs alone, so none lacking a
            // committed entry may be able to gather the votes.
            let m = candidate.durable_membership();
            let (c_term, c_index) = last(candidate);
            let would_vote = |v: NodeId| {
                self.nodes.get(v as usize - 1).is_some_and(|v| {
                    let (v_term, v_index) = last(v);
                    c_term > v_term || (c_term == v_term && c_index >= v_index)
                })
            };
            let wins =
                |set: &Voters| set.ids().filter(|&v| would_vote(v)).count() >= set.majority();
            if wins(m.voters()) && m.outgoing().is_none_or(wins) {
                return violation(
                    "leader completeness",
                    format!(
                        "node {id} lacks committed entry ({index}, {term}) yet a majority of \
                         every voter set of its membership {m:?} would vote for it"
                    ),
                );
            }
        }
        Ok(())
    }

    fn push_committed(&mut self, c: Committed) {
        let prev = self.committed_prefix.last().copied().unwrap_or(0);
        self.committed_prefix.push(chain(prev, c.term, c.hash));
        self.committed.push(c);
    }

    /// `node` installed a snapshot received from a leader: it must be news
    /// (past everything the node applied) and covers only committed
    /// entries. Its durable log is now the committed prefix up to it.
    pub fn installed(&mut self, node: NodeId, meta: &SnapshotMeta) -> Result<(), Violation> {
        let index = meta.index;
        let view = &self.nodes[node as usize - 1];
        if index <= view.applied {
            return violation(
                "snapshot",
                format!(
                    "node {node} installed a snapshot at {index} over applied entries (applied {})",
                    view.applied
                ),
            );
        }
        let Some(c) = self.committed.get(index as usize - 1) else {
            return violation(
                "snapshot",
                format!(
                    "node {node} installed a snapshot at {index} past every commit ({})",
                    self.committed.len()
                ),
            );
        };
        if c.term != meta.term {
            return violation(
                "snapshot",
                format!(
                    "node {node} installed a snapshot at ({index}, {}) where ({index}, {}) was committed",
                    meta.term, c.term
                ),
            );
        }
        let view = &mut self.nodes[node as usize - 1];
        view.durable_terms = self.committed[..index as usize]
            .iter()
            .map(|c| c.term)
            .collect();
        view.durable_prefix = self.committed_prefix[..index as usize].to_vec();
        view.durable_memberships = vec![(index, meta.membership.clone())];
        view.applied = index;
        Ok(())
    }

    /// `node` lost its volatile state; it resumes applying after `applied`
    /// (its state machine's checkpoint, or 0).
    pub fn restarted(&mut self, node: NodeId, applied: Index) {
        let view = self.node(node);
        view.applied = applied;
        view.leader_tip = None;
    }

    /// `node`, in term `node_term`, applied `e`.
    pub fn applied(&mut self, node: NodeId, node_term: Term, e: &Entry) -> Result<(), Violation> {
        let last = &mut self.node(node).applied;
        if e.index != *last + 1 {
            return violation(
                "state machine safety",
                format!("node {node} applied {} right after {}", e.index, *last),
            );
        }
        *last = e.index;
        let hash = entry_hash(e);
        match self.committed.get_mut(e.index as usize - 1) {
            Some(a) if a.term != e.term || a.hash != hash => violation(
                "state machine safety",
                format!(
                    "node {node} applied ({}, {}) where ({}, {}) was committed",
                    e.index, e.term, e.index, a.term
                ),
            ),
            Some(a) => {
                a.committed_by = a.committed_by.min(node_term);
                Ok(())
            }
            None => {
                if self.committed.len() as Index + 1 != e.index {
                    return violation(
                        "state machine safety",
                        format!(
                            "node {node} applied {} beyond any reported commit ({})",
                            e.index,
                            self.committed.len()
                        ),
                    );
                }
                self.push_committed(Committed {
                    term: e.term,
                    hash,
                    committed_by: node_term,
                });
                self.check_commit_protected()
            }
        }
    }

    /// Entries known to be committed.
    pub fn committed_anywhere(&self) -> Index {
        self.committed.len() as Index
    }
}

/// What a sender has made durable, as far as a message can promise it.
#[derive(Clone, Copy, Debug)]
pub struct DurableView {
    /// Its durable hard state.
    pub hard_state: HardState,
    /// Length of its durable log.
    pub log_len: Index,
    /// For an `Accepted { last_index }`: the term of its durable entry at
    /// `last_index`, and the term the addressee holds there if it still leads
    /// the message's term (it then still has the entries it sent).
    pub accepted_terms: Option<(Option<Term>, Option<Term>)>,
}

/// A message may leave only if the sender's durable state backs what it says.
pub fn check_send(m: &Message, view: DurableView) -> Result<(), Violation> {
    let DurableView {
        hard_state: durable,
        log_len: durable_len,
        accepted_terms,
    } = view;
    let fail = |what: String| {
        violation(
            "durability",
            format!("node {} sent {:?} to {}: {what}", m.from, m.body, m.to),
        )
    };
    // A vote is kept if it is durable, or if a later term is (the node can
    // never vote in the earlier term again).
    let vote_backed = |voted: NodeId| {
        durable.term > m.term || (durable.term == m.term && durable.vote == Some(voted))
    };
    match m.body {
        MessageBody::PreVote { .. } | MessageBody::PreVoteResponse { .. } => return Ok(()),
        MessageBody::VoteResponse { granted: true } if !vote_backed(m.to) => {
            return fail(format!("its durable hard state is {durable:?}"));
        }
        MessageBody::Vote { .. } if !vote_backed(m.from) => {
            return fail(format!("its durable hard state is {durable:?}"));
        }
        MessageBody::AppendResponse(AppendOutcome::Accepted { last_index })
            if last_index > durable_len =>
        {
            return fail(format!("only {durable_len} entries are durable"));
        }
        MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }) => {
            if let Some((Some(ours), Some(leaders))) = accepted_terms
                && ours != leaders
            {
                return fail(format!(
                    "its durable entry {last_index} has term {ours}, the leader's has term {leaders}"
                ));
            }
        }
        _ => {}
    }
    if durable.term < m.term {
        return fail(format!("its durable term is {}", durable.term));
    }
    Ok(())
}

/// The durable term and vote only move forward.
pub fn check_durable_hard_state(
    node: NodeId,
    old: HardState,
    new: HardState,
) -> Result<(), Violation> {
    let forward = new.term > old.term
        || (new.term == old.term && (old.vote.is_none() || new.vote == old.vote));
    if forward {
        Ok(())
    } else {
        violation(
            "durability",
            format!("node {node} made {new:?} durable over {old:?}"),
        )
    }
}
