//! Wing–Gong–Lowe search over one partition, memoized on (linearized set, state).

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::{Model, Operation};

/// Step allowance shared by all partitions of one check.
pub(crate) struct Budget {
    remaining: Option<u64>,
}

impl Budget {
    pub(crate) fn new(max_steps: Option<u64>) -> Self {
        Self {
            remaining: max_steps,
        }
    }

    /// Consumes one step; false when none is left.
    fn take(&mut self) -> bool {
        match &mut self.remaining {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }
}

pub(crate) enum PartitionResult {
    Linearizable,
    /// `longest_linearization` holds history indices in linearization order.
    NotLinearizable {
        longest_linearization: Vec<usize>,
    },
    Undecided,
}

/// Index of a node in [`EventList::nodes`].
type NodeId = u32;
const NIL: NodeId = NodeId::MAX;
const HEAD: NodeId = 0;

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `ret` is the operation's return node, or `NIL` for a pending operation.
    Call {
        ret: NodeId,
    },
    Return,
}

#[derive(Clone, Copy, Debug)]
struct Node {
    /// Index of the operation within the partition.
    op: u32,
    kind: Kind,
    prev: NodeId,
    next: NodeId,
}

/// Call and return events sorted by time, as a doubly linked list behind a
/// sentinel head. Lifted nodes keep their own links, so they can be put back
/// in O(1) as long as lifts are undone in reverse order (the search's stack
/// guarantees that).
struct EventList {
    nodes: Vec<Node>,
}

impl EventList {
    /// `ops[i]` is operation `i` of the partition.
    fn new<I, O>(ops: &[&Operation<I, O>]) -> Self {
        // (time, calls before returns at equal times, operation, is return)
        let mut events: Vec<(u64, bool, u32)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            let i = u32::try_from(i).expect("partition has fewer than 2^32 operations");
            events.push((op.call, false, i));
            if let Some(ret) = op.ret {
                events.push((ret, true, i));
            }
        }
        assert!(
            events.len() < NIL as usize,
            "partition too large for the event list"
        );
        // The operation index makes the order total, so the search is
        // deterministic regardless of the sort's stability.
        events.sort_unstable();

        let mut nodes = Vec::with_capacity(events.len() + 1);
        nodes.push(Node {
            op: u32::MAX,
            kind: Kind::Return,
            prev: NIL,
            next: NIL,
        });
        let mut call_node = vec![NIL; ops.len()];
        for (position, &(_, is_return, op)) in events.iter().enumerate() {
            // Position 0 is the head; the casts cannot truncate (asserted above).
            let id = position as NodeId + 1;
            let kind = if is_return {
                // Calls sort before their returns (call <= ret, and at equal
                // times calls come first), so the call node exists already.
                let call = call_node[op as usize];
                debug_assert_ne!(call, NIL);
                nodes[call as usize].kind = Kind::Call { ret: id };
                Kind::Return
            } else {
                call_node[op as usize] = id;
                Kind::Call { ret: NIL }
            };
            nodes.push(Node {
                op,
                kind,
                prev: id - 1,
                next: NIL,
            });
            nodes[id as usize - 1].next = id;
        }
        Self { nodes }
    }

    fn node(&self, id: NodeId) -> Node {
        self.nodes[id as usize]
    }

    fn first(&self) -> NodeId {
        self.nodes[HEAD as usize].next
    }

    fn unlink(&mut self, id: NodeId) {
        let Node { prev, next, .. } = self.node(id);
        self.nodes[prev as usize].next = next;
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn relink(&mut self, id: NodeId) {
        let Node { prev, next, .. } = self.node(id);
        self.nodes[prev as usize].next = id;
        if next != NIL {
            self.nodes[next as usize].prev = id;
        }
    }

    /// Removes a call node and its return node.
    fn lift(&mut self, call: NodeId) {
        self.unlink(call);
        if let Kind::Call { ret } = self.node(call).kind
            && ret != NIL
        {
            self.unlink(ret);
        }
    }

    /// Undoes the most recent [`EventList::lift`] still in effect.
    fn unlift(&mut self, call: NodeId) {
        if let Kind::Call { ret } = self.node(call).kind
            && ret != NIL
        {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// The set of linearized operations, with an incrementally maintained
/// Zobrist hash (xor of a fixed random key per member).
struct LinearizedSet {
    words: Vec<u64>,
    keys: Vec<u64>,
    hash: u64,
}

impl LinearizedSet {
    fn new(len: usize) -> Self {
        let mut seed = 0x6a09_e667_f3bc_c908;
        let keys = (0..len).map(|_| splitmix64(&mut seed)).collect();
        Self {
            words: vec![0; len.div_ceil(64)],
            keys,
            hash: 0,
        }
    }

    fn insert(&mut self, op: u32) {
        let (word, bit) = (op as usize / 64, op % 64);
        debug_assert_eq!(self.words[word] & (1 << bit), 0);
        self.words[word] |= 1 << bit;
        self.hash ^= self.keys[op as usize];
    }

    fn remove(&mut self, op: u32) {
        let (word, bit) = (op as usize / 64, op % 64);
        debug_assert_ne!(self.words[word] & (1 << bit), 0);
        self.words[word] &= !(1 << bit);
        self.hash ^= self.keys[op as usize];
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct CacheEntry<S> {
    hash: u64,
    /// Offset of the set's words in [`Cache::words`].
    offset: usize,
    state: S,
}

/// Every (linearized set, state) pair the search has reached.
struct Cache<S> {
    table: HashTable<CacheEntry<S>>,
    /// The sets' words, back to back: one allocation for all entries.
    words: Vec<u64>,
    hasher: foldhash::fast::FixedState,
}

impl<S: Clone + Eq + std::hash::Hash> Cache<S> {
    fn new(capacity: usize, words_per_set: usize) -> Self {
        Self {
            table: HashTable::with_capacity(capacity),
            words: Vec::with_capacity(capacity * words_per_set),
            hasher: foldhash::fast::FixedState::with_seed(0xbb67_ae85_84ca_a73b),
        }
    }

    /// Records the pair; false if it was already there.
    fn insert(&mut self, set: &LinearizedSet, state: &S) -> bool {
        let hash = set.hash ^ self.hasher.hash_one(state);
        let len = set.words.len();
        let words = &self.words;
        let entry = self.table.entry(
            hash,
            |e| {
                e.hash == hash && e.state == *state && words[e.offset..e.offset + len] == *set.words
            },
            |e| e.hash,
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(_) => false,
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(CacheEntry {
                    hash,
                    offset: self.words.len(),
                    state: state.clone(),
                });
                self.words.extend_from_slice(&set.words);
                true
            }
        }
    }
}

/// The deepest stack of linearized operations seen so far, kept in
/// amortized O(1) per search step: only the part of the stack that changed
/// since the last record is copied.
#[derive(Default)]
struct Longest {
    /// Partition-local operations in linearization order.
    ops: Vec<u32>,
    /// Length of the prefix `ops` shares with the current stack.
    shared: usize,
}

impl Longest {
    /// The stack grew to `depth`; `op_at(i)` is its `i`th operation.
    fn pushed(&mut self, depth: usize, op_at: impl Fn(usize) -> u32) {
        if depth > self.ops.len() {
            self.ops.truncate(self.shared);
            self.ops.extend((self.shared..depth).map(op_at));
            self.shared = depth;
        }
    }

    /// The stack shrank to `depth`.
    fn popped(&mut self, depth: usize) {
        self.shared = self.shared.min(depth);
    }
}

/// Searches for a legal linearization of the operations `indices` of
/// `history`.
pub(crate) fn check_partition<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    indices: &[usize],
    budget: &mut Budget,
) -> PartitionResult {
    let ops: Vec<&Operation<M::Input, M::Output>> = indices.iter().map(|&i| &history[i]).collect();
    let mut unlinearized_completed = ops.iter().filter(|op| op.ret.is_some()).count();
    let mut list = EventList::new(&ops);
    let mut linearized = LinearizedSet::new(ops.len());
    let mut cache = Cache::new(ops.len(), linearized.words.len());
    let mut state = model.init();
    // Each linearized operation's call node and the state before it.
    let mut stack: Vec<(NodeId, M::State)> = Vec::new();
    let mut longest = Longest::default();

    let mut entry = list.first();
    loop {
        // Pending operations need not be linearized: they may never have
        // taken effect.
        if unlinearized_completed == 0 {
            return PartitionResult::Linearizable;
        }
        // An unlinearized completed operation keeps its return node in the
        // list after its call, so the walk meets a return before the end.
        debug_assert_ne!(entry, NIL);
        if !budget.take() {
            return PartitionResult::Undecided;
        }
        let node = list.node(entry);
        match node.kind {
            Kind::Call { ret } => {
                let op = ops[node.op as usize];
                if let Some(next) = model.step(&state, &op.input, op.output.as_ref())
                    // A pending operation that leaves the state unchanged
                    // (e.g. a read) is equivalent to one that never took
                    // effect: skipping it keeps the search from branching
                    // on it.
                    && (ret != NIL || next != state)
                {
                    linearized.insert(node.op);
                    if cache.insert(&linearized, &next) {
                        stack.push((entry, std::mem::replace(&mut state, next)));
                        if ret != NIL {
                            unlinearized_completed -= 1;
                        }
                        list.lift(entry);
                        longest.pushed(stack.len(), |depth| list.node(stack[depth].0).op);
                        entry = list.first();
                        continue;
                    }
                    linearized.remove(node.op);
                }
                entry = node.next;
            }
            Kind::Return => {
                // The operation returning here must be linearized before
                // anything called later: undo the last choice instead.
                let Some((call, previous)) = stack.pop() else {
                    return PartitionResult::NotLinearizable {
                        longest_linearization: longest
                            .ops
                            .iter()
                            .map(|&op| indices[op as usize])
                            .collect(),
                    };
                };
                state = previous;
                longest.popped(stack.len());
                let call_node = list.node(call);
                if let Kind::Call { ret } = call_node.kind
                    && ret != NIL
                {
                    unlinearized_completed += 1;
                }
                linearized.remove(call_node.op);
                list.unlift(call);
                entry = call_node.next;
            }
        }
    }
}
