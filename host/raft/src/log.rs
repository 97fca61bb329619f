//! The core's in-memory view of the log: a durable prefix, then entries
//! handed to the driver for writing, then entries not yet handed out.

use crate::types::{Entry, Index, Term};

/// The log as the core sees it.
///
/// Indices `offset + 1 ..= last_index()` are held in memory; `offset` is the
/// index of the latest snapshot (0 without one), whose term is remembered for
/// the consistency check. Everything up to `offset` is committed and applied.
#[derive(Clone, Debug)]
pub struct RaftLog {
    offset: Index,
    offset_term: Term,
    entries: Vec<Entry>,
    /// Entries up to here are durable (as far as the core has been told).
    stable: Index,
    /// Entries up to here were handed to the driver to write (`>= stable`).
    /// Several writes may be outstanding; they are applied in order, each
    /// replacing what is stored from its first index on.
    handed: Index,
    /// Counts the times entries were replaced or the log reset to a
    /// snapshot. A write handed out before the latest such change vouches
    /// for nothing when it completes: its last entry may have been replaced
    /// and then appended again, identical, by a later write still
    /// outstanding, while one in between stored something else.
    rewrites: u64,
    /// Highest index known to be committed.
    committed: Index,
    /// Highest index handed to the driver for application.
    applied: Index,
}

/// What an accepted append did to the log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Appended {
    /// Last index known to match the leader.
    pub(crate) last_index: Index,
    /// First index whose entry was replaced, if any was.
    pub(crate) replaced_from: Option<Index>,
    /// First index written (replaced or new), if anything was.
    pub(crate) written_from: Option<Index>,
}

/// Why an append from the leader was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AppendRefusal {
    /// The entry at `prev_index` does not have `prev_term` (or is missing).
    Mismatch,
    /// The append would replace a committed entry: the sender is broken.
    ConflictsWithCommitted,
}

impl RaftLog {
    pub(crate) fn restore(
        snapshot: (Index, Term),
        entries: Vec<Entry>,
        committed: Index,
        applied: Index,
    ) -> Self {
        let (offset, offset_term) = snapshot;
        let stable = offset + entries.len() as Index;
        Self {
            offset,
            offset_term,
            entries,
            stable,
            handed: stable,
            rewrites: 0,
            committed,
            applied,
        }
    }

    /// Index of the latest snapshot: entries up to it are compacted away.
    pub fn snapshot_index(&self) -> Index {
        self.offset
    }

    /// Drop the entries up to `index`, which a durable snapshot now covers.
    pub(crate) fn compact_to(&mut self, index: Index) {
        assert!(
            index > self.offset && index <= self.applied && index <= self.stable,
            "compaction to {index} outside ({}, min(applied {}, stable {})]",
            self.offset,
            self.applied,
            self.stable
        );
        let term = self.term(index).expect("held");
        self.entries.drain(..(index - self.offset) as usize);
        self.offset = index;
        self.offset_term = term;
    }

    /// Replace the whole log by a received snapshot ending at (`index`,
    /// `term`): it is committed, and applied once installed.
    pub(crate) fn reset_to_snapshot(&mut self, index: Index, term: Term) {
        assert!(
            index > self.committed,
            "a snapshot never replaces committed entries"
        );
        self.replace_with_snapshot(index, term);
    }

    fn replace_with_snapshot(&mut self, index: Index, term: Term) {
        self.entries.clear();
        self.offset = index;
        self.offset_term = term;
        self.stable = index;
        self.handed = index;
        self.rewrites += 1;
        self.committed = index;
        self.applied = index;
    }

    /// [`RaftLog::reset_to_snapshot`] without its check: only for the mutant
    /// that installs snapshots over committed entries.
    #[cfg(feature = "mutants")]
    pub(crate) fn force_reset_to_snapshot(&mut self, index: Index, term: Term) {
        self.replace_with_snapshot(index, term);
    }

    /// Index of the first entry held (the snapshot's index + 1).
    pub fn first_index(&self) -> Index {
        self.offset + 1
    }

    /// Index of the last entry (0 when empty).
    pub fn last_index(&self) -> Index {
        self.offset + self.entries.len() as Index
    }

    /// Term of the last entry (0 when empty).
    pub fn last_term(&self) -> Term {
        self.entries.last().map_or(self.offset_term, |e| e.term)
    }

    /// Term of the entry at `index`, if known.
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == self.offset {
            return Some(self.offset_term);
        }
        self.get(index).map(|e| e.term)
    }

    /// The entry at `index`, if held.
    pub fn get(&self, index: Index) -> Option<&Entry> {
        if index <= self.offset {
            return None;
        }
        self.entries.get((index - self.offset - 1) as usize)
    }

    /// Entries in `lo..=hi` that are held (clamped to what exists).
    pub fn entries(&self, lo: Index, hi: Index) -> &[Entry] {
        let lo = lo.max(self.first_index());
        let hi = hi.min(self.last_index());
        if lo > hi {
            return &[];
        }
        &self.entries[(lo - self.offset - 1) as usize..(hi - self.offset) as usize]
    }

    /// Highest committed index.
    pub fn committed(&self) -> Index {
        self.committed
    }

    /// Highest index handed out for application.
    pub fn applied(&self) -> Index {
        self.applied
    }

    /// Highest index known to be durable.
    pub fn stable(&self) -> Index {
        self.stable
    }

    /// Whether a log ending at (`last_index`, `last_term`) is at least as
    /// up to date as this one (Raft §5.4.1).
    pub fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    pub(crate) fn matches(&self, index: Index, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// Append new entries at the end (leader path).
    pub(crate) fn append(&mut self, entry: Entry) {
        debug_assert_eq!(
            entry.index,
            self.last_index() + 1,
            "leader append must be contiguous"
        );
        debug_assert!(
            entry.term >= self.last_term(),
            "terms never decrease along the log"
        );
        self.entries.push(entry);
    }

    /// Follower path: the consistency check, then truncation of the
    /// conflicting suffix only, then append (`check_prev` and `truncate` are
    /// false only for mutants). Returns the last index known to match the
    /// leader.
    pub(crate) fn try_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        entries: &[Entry],
        check_prev: bool,
        truncate: bool,
    ) -> Result<Appended, AppendRefusal> {
        if prev_index > self.last_index() || (check_prev && !self.matches(prev_index, prev_term)) {
            return Err(AppendRefusal::Mismatch);
        }
        let last_new = prev_index + entries.len() as Index;
        // First entry that is not already present with the same term. Entries
        // that match are kept: a delayed or duplicated append must never cut
        // off entries that a later append added.
        let conflict = entries.iter().find(|e| !self.matches(e.index, e.term));
        let mut replaced_from = None;
        let written_from = conflict.map(|e| e.index);
        if let Some(first_new) = conflict {
            if first_new.index <= self.last_index() {
                replaced_from = Some(first_new.index);
                if first_new.index <= self.committed {
                    return Err(AppendRefusal::ConflictsWithCommitted);
                }
                if truncate {
                    self.truncate_from(first_new.index);
                } else {
                    // Everything from the first overwritten entry on is
                    // rewritten, the kept old suffix included.
                    self.stable = self.stable.min(first_new.index - 1);
                    self.handed = self.handed.min(first_new.index - 1);
                    self.rewrites += 1;
                }
            }
            let skip = (first_new.index - prev_index - 1) as usize;
            for e in &entries[skip..] {
                match self.get(e.index) {
                    Some(_) => {
                        let at = (e.index - self.offset - 1) as usize;
                        self.entries[at] = e.clone();
                    }
                    None => {
                        debug_assert_eq!(e.index, self.last_index() + 1);
                        self.entries.push(e.clone());
                    }
                }
            }
        }
        Ok(Appended {
            last_index: last_new,
            replaced_from,
            written_from,
        })
    }

    fn truncate_from(&mut self, index: Index) {
        assert!(index > self.committed, "never truncate committed entries");
        debug_assert!(index > self.offset, "compacted entries are committed");
        debug_assert!(index > self.offset);
        self.entries.truncate((index - self.offset - 1) as usize);
        // The replacements are written by a later write, which replaces
        // whatever an outstanding one stores from `index` on.
        self.stable = self.stable.min(index - 1);
        self.handed = self.handed.min(index - 1);
        self.rewrites += 1;
    }

    /// The largest index `<= index` whose term is `<= term`, with its term:
    /// the fast-backtracking hint (etcd's findConflictByTerm).
    pub(crate) fn find_conflict_by_term(&self, index: Index, term: Term) -> (Index, Term) {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Some(t) if t > term => i -= 1,
                Some(t) => return (i, t),
                None => return (i, 0),
            }
        }
    }

    /// Raise the commit index. Never lowers it.
    pub(crate) fn commit_to(&mut self, index: Index) -> bool {
        if index > self.committed {
            assert!(
                index <= self.last_index(),
                "commit {index} past last index {}",
                self.last_index()
            );
            self.committed = index;
            true
        } else {
            false
        }
    }

    /// Entries not yet handed to the driver for persistence.
    pub(crate) fn unhanded(&self) -> &[Entry] {
        self.entries(self.handed + 1, self.last_index())
    }

    /// Hands out every entry not yet handed out (for one write); returns them.
    pub(crate) fn hand_out(&mut self) -> Vec<Entry> {
        let out = self.unhanded().to_vec();
        self.handed = self.last_index();
        out
    }

    /// Highest index handed to the driver for writing.
    pub fn handed(&self) -> Index {
        self.handed
    }

    /// How many times entries were replaced or the log reset: a write
    /// records it when handed out (see [`RaftLog::stable_to`]).
    pub(crate) fn rewrites(&self) -> u64 {
        self.rewrites
    }

    /// A write handed out when [`RaftLog::rewrites`] was `rewrites`, whose
    /// last entry was (`index`, `term`), is durable, and so is every write
    /// handed out before it. Its entries count as durable only if nothing
    /// was replaced since it was handed out: then the log up to `index` is
    /// exactly what the writes up to it stored. Otherwise the write that
    /// carries the replacements marks them (it also covers the entries
    /// before them, which earlier writes stored).
    pub(crate) fn stable_to(&mut self, index: Index, term: Term, rewrites: u64) {
        if rewrites == self.rewrites && index > self.stable {
            debug_assert!(index <= self.handed && self.matches(index, term));
            self.stable = index;
        }
    }

    /// Committed, durable entries not yet handed out; hands them out.
    pub(crate) fn take_committed(&mut self) -> Vec<Entry> {
        let hi = self.committed.min(self.stable);
        if hi <= self.applied {
            return Vec::new();
        }
        let out = self.entries(self.applied + 1, hi).to_vec();
        debug_assert_eq!(out.first().map(|e| e.index), Some(self.applied + 1));
        self.applied = hi;
        out
    }

    pub(crate) fn has_committed_to_apply(&self) -> bool {
        self.committed.min(self.stable) > self.applied
    }

    /// Entries from `lo` for one message, within both limits; at least one
    /// entry if any exists.
    pub(crate) fn slice_for_message(
        &self,
        lo: Index,
        max_entries: usize,
        max_bytes: usize,
    ) -> Vec<Entry> {
        let all = self.entries(lo, self.last_index());
        let mut bytes = 0;
        let mut n = 0;
        for e in all.iter().take(max_entries) {
            bytes += e.size();
            if n > 0 && bytes > max_bytes {
                break;
            }
            n += 1;
        }
        all[..n].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EntryKind;

    fn e(index: Index, term: Term) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Normal,
            data: Default::default(),
        }
    }

    fn log(terms: &[Term]) -> RaftLog {
        RaftLog::restore(
            (0, 0),
            terms
                .iter()
                .enumerate()
                .map(|(i, &t)| e(i as Index + 1, t))
                .collect(),
            0,
            0,
        )
    }

    fn terms(l: &RaftLog) -> Vec<Term> {
        l.entries(1, l.last_index())
            .iter()
            .map(|e| e.term)
            .collect()
    }

    #[test]
    fn stale_append_keeps_later_entries() {
        let mut l = log(&[1, 1, 1]);
        assert_eq!(
            l.try_append(0, 0, &[e(1, 1)], true, true),
            Ok(Appended {
                last_index: 1,
                replaced_from: None,
                written_from: None,
            })
        );
        assert_eq!(terms(&l), [1, 1, 1]);
    }

    #[test]
    fn conflicting_suffix_is_replaced() {
        let mut l = log(&[1, 1, 2, 2]);
        assert_eq!(
            l.try_append(2, 1, &[e(3, 3)], true, true),
            Ok(Appended {
                last_index: 3,
                replaced_from: Some(3),
                written_from: Some(3),
            })
        );
        assert_eq!(terms(&l), [1, 1, 3]);
        assert_eq!(l.stable(), 2);
    }

    #[test]
    fn committed_entries_are_never_replaced() {
        let mut l = log(&[1, 1, 2]);
        l.commit_to(3);
        assert_eq!(
            l.try_append(2, 1, &[e(3, 3)], true, true),
            Err(AppendRefusal::ConflictsWithCommitted)
        );
        assert_eq!(terms(&l), [1, 1, 2]);
    }

    #[test]
    fn conflict_hint_skips_terms() {
        let l = log(&[1, 1, 2, 2, 4, 4]);
        assert_eq!(l.find_conflict_by_term(6, 3), (4, 2));
        assert_eq!(l.find_conflict_by_term(9, 5), (6, 4));
        assert_eq!(l.find_conflict_by_term(6, 0), (0, 0));
    }

    #[test]
    fn slices_respect_limits() {
        let l = log(&[1; 10]);
        assert_eq!(l.slice_for_message(3, 4, usize::MAX).len(), 4);
        assert_eq!(l.slice_for_message(3, 100, 2 * ENTRY_OVERHEAD).len(), 2);
        assert_eq!(l.slice_for_message(3, 100, 1).len(), 1);
        assert!(l.slice_for_message(11, 100, 100).is_empty());
    }

    use crate::types::ENTRY_OVERHEAD;

    #[test]
    fn compaction_keeps_the_term_at_the_snapshot() {
        let mut l = RaftLog::restore((0, 0), (1..=5).map(|i| e(i, 1 + i / 3)).collect(), 4, 4);
        l.compact_to(3);
        assert_eq!(l.first_index(), 4);
        assert_eq!(
            l.term(3),
            Some(2),
            "the snapshot's term answers the consistency check"
        );
        assert_eq!(l.term(2), None);
        assert!(l.get(3).is_none());
        assert_eq!(l.entries(1, 5).len(), 2);
        assert_eq!(l.last_index(), 5);
        assert_eq!(
            l.find_conflict_by_term(5, 1),
            (2, 0),
            "below the snapshot: unknown"
        );
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn unapplied_entries_are_never_compacted() {
        let mut l = RaftLog::restore((0, 0), (1..=5).map(|i| e(i, 1)).collect(), 4, 2);
        l.compact_to(3);
    }

    #[test]
    fn an_outstanding_write_of_replaced_entries_makes_nothing_durable() {
        // Entries 3..=5 of term 1 are handed out for a write; before it is
        // durable, a leader of term 2 replaces them from 4 on.
        let mut l = RaftLog::restore((0, 0), (1..=2).map(|i| e(i, 1)).collect(), 2, 2);
        for i in 3..=5 {
            l.append(e(i, 1));
        }
        let first = l.rewrites();
        assert_eq!(l.hand_out().len(), 3);
        assert!(l.unhanded().is_empty());
        l.try_append(3, 1, &[e(4, 2)], true, true).unwrap();
        assert_eq!(
            (l.stable(), l.handed()),
            (2, 3),
            "4 and 5 are written again"
        );
        assert_eq!(l.unhanded(), &[e(4, 2)]);
        // The first write's entries were replaced since: it vouches for nothing.
        l.stable_to(5, 1, first);
        assert_eq!(l.stable(), 2);
        let second = l.rewrites();
        assert_eq!(l.hand_out(), vec![e(4, 2)]);
        l.stable_to(4, 2, second);
        assert_eq!(l.stable(), 4);
    }

    #[test]
    fn an_entry_replaced_and_appended_again_is_not_durable_through_the_first_write() {
        // Entries 2..=3 of term 1 go out in a write (W1); a leader of term 2
        // replaces them (W2); a leader of term 3 brings back entries 2..=3 of
        // term 1 (W3). When W1 completes, the log again ends in (3, 1), but
        // W2 will overwrite those indexes on disk before W3 restores them.
        let mut l = RaftLog::restore((0, 0), vec![e(1, 1)], 1, 1);
        l.append(e(2, 1));
        l.append(e(3, 1));
        let w1 = l.rewrites();
        l.hand_out();
        l.try_append(1, 1, &[e(2, 2), e(3, 2)], true, true).unwrap();
        let w2 = l.rewrites();
        l.hand_out();
        l.try_append(1, 1, &[e(2, 1), e(3, 1)], true, true).unwrap();
        let w3 = l.rewrites();
        l.hand_out();
        l.stable_to(3, 1, w1);
        assert_eq!(l.stable(), 1, "W1 vouches for nothing after a rewrite");
        l.stable_to(3, 2, w2);
        assert_eq!(l.stable(), 1);
        l.stable_to(3, 1, w3);
        assert_eq!(l.stable(), 3);
    }

    #[test]
    fn a_snapshot_replaces_the_log() {
        let mut l = RaftLog::restore((0, 0), (1..=5).map(|i| e(i, 1)).collect(), 2, 2);
        l.reset_to_snapshot(9, 3);
        assert_eq!((l.last_index(), l.last_term()), (9, 3));
        assert_eq!((l.committed(), l.applied(), l.stable()), (9, 9, 9));
        assert!(l.unhanded().is_empty());
    }
}
