//! When a node snapshots: a rule that reads only the log, so every replica
//! snapshots at the same indexes and writes the same bytes there.
//!
//! Identical snapshots on every replica are what let a follower resume a
//! transfer from another node after its sender failed.

use kythira_raft::Entry;

/// The snapshot rule: after every entry whose index is a multiple of
/// `every_entries`, and after any entry that brings the bytes of the entries
/// applied since the last due point to `every_bytes`.
///
/// The byte count restarts at every due point, and a replica starts counting
/// at 0 or at a snapshot (itself a due point), so replicas with the same
/// settings agree on every due point. Nodes configured differently still
/// work; their snapshots just differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    every_entries: u64,
    every_bytes: u64,
    since_bytes: u64,
}

impl Policy {
    /// A rule counting from a due point (the start of the log or a snapshot).
    /// Zero turns the corresponding half of the rule off.
    pub fn new(every_entries: u64, every_bytes: u64) -> Self {
        Self {
            every_entries,
            every_bytes,
            since_bytes: 0,
        }
    }

    /// Counts `e`, just applied; true if a snapshot falls due after it.
    pub fn due_after(&mut self, e: &Entry) -> bool {
        // Index and term count too, so empty entries cannot pile up unseen.
        self.since_bytes = self.since_bytes.saturating_add(e.data.len() as u64 + 16);
        let due = (self.every_entries > 0 && e.index.is_multiple_of(self.every_entries))
            || (self.every_bytes > 0 && self.since_bytes >= self.every_bytes);
        if due {
            self.since_bytes = 0;
        }
        due
    }

    /// Counting restarts after an installed snapshot.
    pub fn restart(&mut self) {
        self.since_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kythira_raft::EntryKind;

    fn entry(index: u64, len: usize) -> Entry {
        Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: Bytes::from(vec![0; len]),
        }
    }

    #[test]
    fn due_at_multiples_of_the_interval() {
        let mut p = Policy::new(10, 0);
        let due: Vec<u64> = (1..=35).filter(|&i| p.due_after(&entry(i, 100))).collect();
        assert_eq!(due, [10, 20, 30]);
    }

    #[test]
    fn due_when_the_bytes_since_the_last_due_point_reach_the_limit() {
        let mut p = Policy::new(10, 1_000);
        // 484 bytes an entry with the overhead: the limit is reached every
        // third entry, and the count restarts at the multiple of 10 too.
        let due: Vec<u64> = (1..=12).filter(|&i| p.due_after(&entry(i, 468))).collect();
        assert_eq!(due, [3, 6, 9, 10]);
    }

    #[test]
    fn two_replicas_agree_whatever_their_batches() {
        let entries: Vec<Entry> = (1..=500)
            .map(|i| entry(i, (i * 37 % 300) as usize))
            .collect();
        let mut a = Policy::new(64, 5_000);
        let mut b = Policy::new(64, 5_000);
        let due_a: Vec<u64> = entries
            .iter()
            .filter(|e| a.due_after(e))
            .map(|e| e.index)
            .collect();
        // Another replica restarts from the snapshot at the third due point.
        let third = due_a[2];
        b.restart();
        let due_b: Vec<u64> = entries[third as usize..]
            .iter()
            .filter(|e| b.due_after(e))
            .map(|e| e.index)
            .collect();
        assert_eq!(due_b, due_a[3..]);
    }
}
