//! The shape of a log without its payloads: bounds plus the term of every index.
//!
//! Terms change rarely, so they are kept as runs (first index of each term). This
//! answers `term(index)` without touching disk and validates every mutation before
//! it is written, for both store implementations.

use crate::{LogEntry, Result, StorageError, codec::LogBounds};

/// A maximal stretch of consecutive entries with the same term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TermRun {
    first: u64,
    term: u64,
}

/// Bounds and terms of a log. Invariants: runs lie within
/// `compacted_index + 1 ..= last_index`, the first run starts at `compacted_index + 1`,
/// run starts and terms strictly increase, and no term is below `compacted_term`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LogShape {
    compacted_index: u64,
    compacted_term: u64,
    last_index: u64,
    runs: Vec<TermRun>,
}

impl Default for LogShape {
    fn default() -> Self {
        Self::empty_after(0, 0)
    }
}

impl LogShape {
    /// An empty log whose prefix up to `index` (of `term`) is compacted.
    pub fn empty_after(index: u64, term: u64) -> Self {
        Self {
            compacted_index: index,
            compacted_term: term,
            last_index: index,
            runs: Vec::new(),
        }
    }

    pub fn first_index(&self) -> u64 {
        self.compacted_index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    pub fn last_term(&self) -> u64 {
        self.runs.last().map_or(self.compacted_term, |run| run.term)
    }

    pub fn bounds(&self) -> LogBounds {
        LogBounds {
            compacted_index: self.compacted_index,
            compacted_term: self.compacted_term,
            last_index: self.last_index,
        }
    }

    /// Term of `index`, including the last compacted index.
    pub fn term(&self, index: u64) -> Result<u64> {
        self.check_readable(index)?;
        if index == self.compacted_index {
            return Ok(self.compacted_term);
        }
        let run = self.runs.partition_point(|run| run.first <= index) - 1;
        Ok(self.runs[run].term)
    }

    /// Errors unless `index` is the last compacted index or in the log.
    pub fn check_readable(&self, index: u64) -> Result<()> {
        if index < self.compacted_index {
            Err(StorageError::Compacted {
                index,
                first_index: self.first_index(),
            })
        } else if index > self.last_index {
            Err(StorageError::Unavailable {
                index,
                last_index: self.last_index,
            })
        } else {
            Ok(())
        }
    }

    /// Errors unless every index of `lo..hi` is in the log (an empty range at a
    /// valid position is fine).
    pub fn check_range(&self, lo: u64, hi: u64) -> Result<()> {
        if lo < self.first_index() {
            return Err(StorageError::Compacted {
                index: lo,
                first_index: self.first_index(),
            });
        }
        if hi > self.last_index + 1 {
            return Err(StorageError::Unavailable {
                index: hi - 1,
                last_index: self.last_index,
            });
        }
        Ok(())
    }

    /// Checks that `entries` may be appended: contiguous, starting inside the log
    /// or right after it but after the compacted prefix, terms never decreasing.
    /// Entries from the first one's index on replace the current suffix.
    pub fn check_append(&self, entries: &[LogEntry]) -> Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.compacted_index || first.index > self.last_index + 1 {
            return Err(StorageError::InvalidAppend(format!(
                "first entry has index {}, but appends must start within {}..={}",
                first.index,
                self.first_index(),
                self.last_index + 1
            )));
        }
        let mut previous = self.term(first.index - 1)?;
        for (expected, entry) in (first.index..).zip(entries) {
            if entry.index != expected {
                return Err(StorageError::InvalidAppend(format!(
                    "entry with index {} where {expected} was expected",
                    entry.index
                )));
            }
            if entry.term < previous {
                return Err(StorageError::InvalidAppend(format!(
                    "entry {} has term {}, lower than the term {previous} before it",
                    entry.index, entry.term
                )));
            }
            previous = entry.term;
        }
        Ok(())
    }

    /// Applies an append that [`check_append`](Self::check_append) accepted.
    pub fn append(&mut self, entries: &[LogEntry]) {
        let Some(first) = entries.first() else {
            return;
        };
        self.truncate(first.index);
        for entry in entries {
            self.push(entry.index, entry.term);
        }
    }

    /// Records one more entry at the end; used while scanning a stored log.
    pub fn push(&mut self, index: u64, term: u64) {
        debug_assert_eq!(index, self.last_index + 1);
        debug_assert!(term >= self.last_term());
        if self.runs.is_empty() || term > self.last_term() {
            self.runs.push(TermRun { first: index, term });
        }
        self.last_index = index;
    }

    /// Records entries through `index` that all have the last entry's term; used
    /// while scanning a stored log.
    pub fn extend_to(&mut self, index: u64) {
        debug_assert!(!self.runs.is_empty() && index >= self.last_index);
        self.last_index = index;
    }

    /// Checks that the suffix from `from` may be removed: never the compacted prefix.
    pub fn check_truncate(&self, from: u64) -> Result<()> {
        if from <= self.compacted_index {
            return Err(StorageError::Compacted {
                index: from,
                first_index: self.first_index(),
            });
        }
        Ok(())
    }

    /// Removes entries `from..`; a no-op when `from` is past the end.
    pub fn truncate(&mut self, from: u64) {
        debug_assert!(from > self.compacted_index);
        if from > self.last_index {
            return;
        }
        self.last_index = from - 1;
        let keep = self.runs.partition_point(|run| run.first < from);
        self.runs.truncate(keep);
    }

    /// Checks that the prefix up to `upto` may be compacted: it must be in the log.
    pub fn check_compact(&self, upto: u64) -> Result<()> {
        if upto > self.last_index {
            return Err(StorageError::Unavailable {
                index: upto,
                last_index: self.last_index,
            });
        }
        Ok(())
    }

    /// Drops entries up to `upto`, keeping its term; a no-op if already compacted.
    pub fn compact(&mut self, upto: u64) {
        debug_assert!(upto <= self.last_index);
        if upto <= self.compacted_index {
            return;
        }
        let term = self.term(upto).expect("upto is within the log");
        // Runs that start at or before `upto + 1`: all but the last are gone entirely.
        let covering = self.runs.partition_point(|run| run.first <= upto + 1);
        self.runs.drain(..covering.saturating_sub(1));
        if let Some(run) = self.runs.first_mut() {
            run.first = run.first.max(upto + 1);
        }
        if upto == self.last_index {
            self.runs.clear();
        }
        self.compacted_index = upto;
        self.compacted_term = term;
    }

    /// Checks that the log may be reset to start after a snapshot at `index`.
    pub fn check_reset(&self, index: u64, term: u64) -> Result<()> {
        if index < self.compacted_index {
            return Err(StorageError::Compacted {
                index,
                first_index: self.first_index(),
            });
        }
        if term < self.compacted_term {
            return Err(StorageError::InvalidAppend(format!(
                "reset to term {term}, below the compacted term {}",
                self.compacted_term
            )));
        }
        Ok(())
    }

    /// Discards the whole log; it continues after `index` (of `term`).
    pub fn reset(&mut self, index: u64, term: u64) {
        *self = Self::empty_after(index, term);
    }

    /// Asserts the structural invariants; cheap, used by tests and debug builds.
    pub fn assert_invariants(&self) {
        assert!(self.compacted_index <= self.last_index);
        assert_eq!(
            self.runs.is_empty(),
            self.compacted_index == self.last_index
        );
        if let Some(first) = self.runs.first() {
            assert_eq!(first.first, self.compacted_index + 1);
            assert!(first.term >= self.compacted_term);
        }
        for pair in self.runs.windows(2) {
            assert!(pair[0].first < pair[1].first && pair[0].term < pair[1].term);
        }
        if let Some(last) = self.runs.last() {
            assert!(last.first <= self.last_index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<LogEntry> {
        range
            .map(|index| LogEntry::new(index, term, vec![]))
            .collect()
    }

    #[test]
    fn terms_follow_appends_truncations_and_compactions() {
        let mut shape = LogShape::default();
        shape.append(&entries(1..=5, 1));
        shape.append(&entries(6..=8, 3));
        shape.assert_invariants();
        assert_eq!(shape.term(5).unwrap(), 1);
        assert_eq!(shape.term(6).unwrap(), 3);
        assert_eq!(shape.term(0).unwrap(), 0);

        shape.check_append(&entries(4..=4, 4)).unwrap();
        shape.append(&entries(4..=4, 4));
        shape.assert_invariants();
        assert_eq!(shape.last_index(), 4);
        assert_eq!(shape.last_term(), 4);

        shape.compact(3);
        shape.assert_invariants();
        assert_eq!(shape.term(3).unwrap(), 1);
        assert!(matches!(shape.term(2), Err(StorageError::Compacted { .. })));
        shape.compact(4);
        shape.assert_invariants();
        assert_eq!(shape.first_index(), 5);
        assert_eq!(shape.last_term(), 4);
    }

    #[test]
    fn rejects_gaps_lower_terms_and_rewrites_of_the_compacted_prefix() {
        let mut shape = LogShape::default();
        shape.append(&entries(1..=3, 2));
        assert!(shape.check_append(&entries(5..=5, 2)).is_err());
        assert!(shape.check_append(&entries(4..=4, 1)).is_err());
        let mut shuffled = entries(4..=5, 2);
        shuffled.swap(0, 1);
        assert!(shape.check_append(&shuffled).is_err());
        shape.compact(2);
        assert!(shape.check_append(&entries(2..=2, 2)).is_err());
        assert!(shape.check_truncate(2).is_err());
        shape.check_truncate(3).unwrap();
    }
}
