//! A node's durable log: the latest snapshot (its metadata and the state
//! machine it holds) and the entries after it.

use kythira_raft::{Entry, Index, SnapshotMeta, Term};

use crate::kv::KvStore;

#[derive(Debug, Default, Clone)]
pub(super) struct DurableLog {
    /// The latest snapshot, taken here or installed.
    pub(super) snapshot: Option<(SnapshotMeta, KvStore)>,
    /// Entries after the snapshot.
    pub(super) entries: Vec<Entry>,
}

impl DurableLog {
    /// Index of the latest snapshot (0: none).
    pub(super) fn snapshot_index(&self) -> Index {
        self.snapshot.as_ref().map_or(0, |(m, _)| m.index)
    }

    /// Index of the last durable entry (or of the snapshot).
    pub(super) fn last_index(&self) -> Index {
        self.snapshot_index() + self.entries.len() as Index
    }

    /// Term at `index`, if held (the snapshot's own index included).
    pub(super) fn term(&self, index: Index) -> Option<Term> {
        let base = self.snapshot_index();
        match &self.snapshot {
            Some((m, _)) if index == m.index => Some(m.term),
            _ if index > base => self
                .entries
                .get((index - base - 1) as usize)
                .map(|e| e.term),
            _ => None,
        }
    }

    /// Write `entries`, replacing every entry from the first one's index;
    /// returns how many durable entries were replaced.
    pub(super) fn write(&mut self, entries: &[Entry]) -> u64 {
        let Some(first) = entries.first() else {
            return 0;
        };
        let base = self.snapshot_index();
        assert!(
            first.index > base,
            "a write never reaches into the snapshot"
        );
        let keep = (first.index - base - 1) as usize;
        let replaced = self.entries.len().saturating_sub(keep) as u64;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
        replaced
    }

    /// A snapshot at `meta.index` holding `state` is durable: the entries it
    /// covers go.
    pub(super) fn compact(&mut self, meta: SnapshotMeta, state: KvStore) {
        let drop = (meta.index - self.snapshot_index()) as usize;
        self.entries.drain(..drop);
        self.snapshot = Some((meta, state));
    }

    /// A received snapshot replaces everything.
    pub(super) fn install(&mut self, meta: SnapshotMeta, state: KvStore) {
        self.entries.clear();
        self.snapshot = Some((meta, state));
    }
}
