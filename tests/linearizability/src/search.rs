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
    /// `ret` is the operation's return node; `None` for a pending operation.
    Call {
        ret: Option<NodeId>,
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
        // (time, is return, operation): at equal times calls sort first.
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
                nodes[call as usize].kind = Kind::Call { ret: Some(id) };
                Kind::Return
            } else {
                call_node[op as usize] = id;
                Kind::Call { ret: None }
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
        if let Kind::Call { ret: Some(ret) } = self.node(call).kind {
            self.unlink(ret);
        }
    }

    /// Undoes the most recent [`EventList::lift`] still in effect.
    fn unlift(&mut self, call: NodeId) {
        if let Kind::Call { ret: Some(ret) } = self.node(call).kind {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// The linearized completed operations, with an incrementally maintained
/// Zobrist hash (xor of a fixed random key per member).
struct CompletedSet {
    words: Vec<u64>,
    keys: Vec<u64>,
    hash: u64,
}

impl CompletedSet {
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

/// Operations that never completed, as a plain bitset: they are not part of
/// the cache key, only of the dominance test (see [`Cache`]).
struct PendingSet {
    words: Vec<u64>,
}

impl PendingSet {
    fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
        }
    }

    fn insert(&mut self, op: u32) {
        debug_assert_eq!(self.words[op as usize / 64] & (1 << (op % 64)), 0);
        self.words[op as usize / 64] |= 1 << (op % 64);
    }

    fn remove(&mut self, op: u32) {
        debug_assert_ne!(self.words[op as usize / 64] & (1 << (op % 64)), 0);
        self.words[op as usize / 64] &= !(1 << (op % 64));
    }
}

/// True if every member of `a` is in `b`.
fn is_subset(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).all(|(a, b)| a & !b == 0)
}

struct CacheEntry<S> {
    hash: u64,
    /// Offset of the completed set's words in [`Cache::words`].
    offset: usize,
    state: S,
    /// Pending sets reached with this completed set and state, none a
    /// superset of another, back to back. Empty when the partition has no
    /// pending operations.
    pending: Vec<u64>,
}

/// The search nodes reached so far, as (completed set, state) keys with the
/// minimal pending sets reached for each.
///
/// A node (completed C, pending P, state s) *dominates* (C, P', s) when P ⊆
/// P': every continuation of the second is one of the first, which may
/// simply never linearize the pending operations in P' \ P (whether a
/// pending operation can be linearized depends only on the completed
/// operations still to go). So a node dominated by one already reached is
/// pruned. This is sound for the same reason plain memoization is: if a
/// legal linearization exists, take a reached node with the shortest legal
/// continuation; its next node was either reached (shorter continuation) or
/// pruned for a reached node that dominates it (at most as long), so the
/// search finds it. With no pending operations, dominance is equality.
struct Cache<S> {
    table: HashTable<CacheEntry<S>>,
    /// The completed sets' words, back to back: one allocation for all
    /// entries.
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

    /// Records the node; false if a node reached before dominates it.
    fn insert(&mut self, completed: &CompletedSet, pending: &PendingSet, state: &S) -> bool {
        let hash = completed.hash ^ self.hasher.hash_one(state);
        let len = completed.words.len();
        let words = &self.words;
        let entry = self.table.entry(
            hash,
            |e| {
                e.hash == hash
                    && e.state == *state
                    && words[e.offset..e.offset + len] == *completed.words
            },
            |e| e.hash,
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(mut occupied) => {
                let pending = &pending.words[..];
                if pending.is_empty() {
                    return false;
                }
                let known = &mut occupied.get_mut().pending;
                if known.chunks(pending.len()).any(|p| is_subset(p, pending)) {
                    return false;
                }
                // Sets this one dominates are redundant from now on.
                let mut kept = 0;
                for i in (0..known.len()).step_by(pending.len()) {
                    if !is_subset(pending, &known[i..i + pending.len()]) {
                        known.copy_within(i..i + pending.len(), kept);
                        kept += pending.len();
                    }
                }
                known.truncate(kept);
                known.extend_from_slice(pending);
                true
            }
            hashbrown::hash_table::Entry::Vacant(vacant) => {
                vacant.insert(CacheEntry {
                    hash,
                    offset: self.words.len(),
                    state: state.clone(),
                    pending: pending.words.clone(),
                });
                self.words.extend_from_slice(&completed.words);
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

/// Which operations are linearized, completed and pending ones apart.
struct Linearized {
    completed: CompletedSet,
    pending: PendingSet,
    /// Each partition-local operation's bit in `completed` or `pending`.
    slots: Vec<Slot>,
    /// Completed operations not yet linearized.
    completed_left: usize,
}

#[derive(Clone, Copy)]
enum Slot {
    Completed(u32),
    Pending(u32),
}

impl Linearized {
    fn new<I, O>(ops: &[&Operation<I, O>]) -> Self {
        let (mut completed, mut pending) = (0u32, 0u32);
        let slots = ops
            .iter()
            .map(|op| {
                if op.ret.is_some() {
                    completed += 1;
                    Slot::Completed(completed - 1)
                } else {
                    pending += 1;
                    Slot::Pending(pending - 1)
                }
            })
            .collect();
        Self {
            completed: CompletedSet::new(completed as usize),
            pending: PendingSet::new(pending as usize),
            slots,
            completed_left: completed as usize,
        }
    }

    fn insert(&mut self, op: u32) {
        match self.slots[op as usize] {
            Slot::Completed(bit) => {
                self.completed.insert(bit);
                self.completed_left -= 1;
            }
            Slot::Pending(bit) => self.pending.insert(bit),
        }
    }

    fn remove(&mut self, op: u32) {
        match self.slots[op as usize] {
            Slot::Completed(bit) => {
                self.completed.remove(bit);
                self.completed_left += 1;
            }
            Slot::Pending(bit) => self.pending.remove(bit),
        }
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
    let mut list = EventList::new(&ops);
    let mut linearized = Linearized::new(&ops);
    let mut cache = Cache::new(ops.len(), linearized.completed.words.len());
    let mut state = model.init();
    // Each linearized operation's call node and the state before it.
    let mut stack: Vec<(NodeId, M::State)> = Vec::new();
    let mut longest = Longest::default();

    let mut entry = list.first();
    loop {
        // Pending operations need not be linearized: they may never have
        // taken effect.
        if linearized.completed_left == 0 {
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
                    // (e.g. a read) is dominated by not linearizing it:
                    // skip it without asking the cache.
                    && (ret.is_some() || next != state)
                {
                    linearized.insert(node.op);
                    if cache.insert(&linearized.completed, &linearized.pending, &next) {
                        stack.push((entry, std::mem::replace(&mut state, next)));
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
                linearized.remove(call_node.op);
                list.unlift(call);
                entry = call_node.next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>) -> Operation<(), ()> {
        Operation {
            client: 0,
            input: (),
            call,
            output: ret.map(|_| ()),
            ret,
        }
    }

    /// The list from the head, as (operation, is return).
    fn walk(list: &EventList) -> Vec<(u32, bool)> {
        let mut out = Vec::new();
        let mut id = list.first();
        while id != NIL {
            let node = list.node(id);
            out.push((node.op, matches!(node.kind, Kind::Return)));
            id = node.next;
        }
        out
    }

    #[test]
    fn events_sort_by_time_with_calls_before_returns_on_ties() {
        let ops = [op(5, Some(5)), op(0, Some(5)), op(5, Some(9)), op(1, None)];
        let refs: Vec<_> = ops.iter().collect();
        let list = EventList::new(&refs);
        assert_eq!(
            walk(&list),
            vec![
                (1, false),
                (3, false),
                (0, false),
                (2, false),
                (0, true),
                (1, true),
                (2, true),
            ]
        );
    }

    #[test]
    fn unlift_in_reverse_order_restores_the_list() {
        let ops = [op(0, Some(4)), op(1, Some(2)), op(3, None), op(5, Some(6))];
        let refs: Vec<_> = ops.iter().collect();
        let mut list = EventList::new(&refs);
        let original = walk(&list);
        let calls: Vec<NodeId> = (1..list.nodes.len() as NodeId)
            .filter(|&id| matches!(list.node(id).kind, Kind::Call { .. }))
            .collect();
        // Lift in an order that is not the list order, including the
        // pending operation (no return node) and the last node.
        let order = [calls[1], calls[3], calls[2], calls[0]];
        for &call in &order {
            list.lift(call);
        }
        assert_eq!(walk(&list), vec![]);
        for &call in order.iter().rev() {
            list.unlift(call);
        }
        assert_eq!(walk(&list), original);

        list.lift(calls[1]);
        assert_eq!(
            walk(&list),
            vec![(0, false), (2, false), (0, true), (3, false), (3, true)]
        );
        list.unlift(calls[1]);
        assert_eq!(walk(&list), original);
    }

    #[test]
    fn longest_keeps_the_deepest_stack() {
        let mut stack: Vec<u32> = Vec::new();
        let mut longest = Longest::default();
        let push = |stack: &mut Vec<u32>, longest: &mut Longest, op| {
            stack.push(op);
            longest.pushed(stack.len(), |i| stack[i]);
        };
        push(&mut stack, &mut longest, 1);
        push(&mut stack, &mut longest, 2);
        stack.pop();
        longest.popped(stack.len());
        push(&mut stack, &mut longest, 3);
        assert_eq!(longest.ops, vec![1, 2]);
        push(&mut stack, &mut longest, 4);
        assert_eq!(longest.ops, vec![1, 3, 4]);
        stack.clear();
        longest.popped(0);
        push(&mut stack, &mut longest, 5);
        assert_eq!(longest.ops, vec![1, 3, 4]);
    }

    #[test]
    fn budget_counts_steps() {
        let mut budget = Budget::new(Some(2));
        assert!(budget.take());
        assert!(budget.take());
        assert!(!budget.take());
        let mut unbounded = Budget::new(None);
        assert!((0..1000).all(|_| unbounded.take()));
    }

    #[test]
    fn linearized_set_hash_depends_only_on_membership() {
        let mut a = CompletedSet::new(130);
        let mut b = CompletedSet::new(130);
        for op in [3, 129, 64] {
            a.insert(op);
        }
        for op in [64, 3, 7, 129] {
            b.insert(op);
        }
        b.remove(7);
        assert_eq!(a.words, b.words);
        assert_eq!(a.hash, b.hash);
        a.remove(129);
        assert_ne!(a.hash, b.hash);
    }

    #[test]
    fn cache_prunes_nodes_dominated_by_fewer_pending_operations() {
        let completed = CompletedSet::new(3);
        let mut cache = Cache::new(4, 1);
        let pending = |ops: &[u32]| {
            let mut set = PendingSet::new(4);
            ops.iter().for_each(|&op| set.insert(op));
            set
        };
        assert!(cache.insert(&completed, &pending(&[0, 1]), &7));
        assert!(!cache.insert(&completed, &pending(&[0, 1]), &7));
        assert!(cache.insert(&completed, &pending(&[0]), &7));
        assert!(!cache.insert(&completed, &pending(&[0, 1]), &7));
        assert!(!cache.insert(&completed, &pending(&[0, 2, 3]), &7));
        assert!(cache.insert(&completed, &pending(&[1, 2]), &7));
        // Another state or another completed set is another node.
        assert!(cache.insert(&completed, &pending(&[0, 1]), &8));
        let mut more = CompletedSet::new(3);
        more.insert(2);
        assert!(cache.insert(&more, &pending(&[0, 1]), &7));
        // Only the minimal pending sets are kept.
        let entry = cache
            .table
            .iter()
            .find(|e| e.state == 7 && e.offset == 0)
            .expect("entry for the empty completed set");
        assert_eq!(entry.pending, vec![0b1, 0b110]);
    }

    #[test]
    fn without_pending_operations_the_cache_is_exact() {
        let mut completed = CompletedSet::new(70);
        let none = PendingSet::new(0);
        let mut cache = Cache::new(4, 2);
        assert!(cache.insert(&completed, &none, &1));
        assert!(!cache.insert(&completed, &none, &1));
        completed.insert(69);
        assert!(cache.insert(&completed, &none, &1));
        assert!(!cache.insert(&completed, &none, &1));
        assert!(cache.insert(&completed, &none, &2));
    }
}
